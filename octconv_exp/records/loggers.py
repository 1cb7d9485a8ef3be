"""Per-run loggers beyond the always-on CSV/JSON files (``logger`` config group, whose
options combine: ``logger=[csv,tensorboard,mlflow]``)."""
import contextlib
import fcntl
import json
import logging
import os
import time

from omegaconf import OmegaConf

from ..errors import UserError
from .outputs import flatten as flatten_dict
from .outputs import write_json_atomic

log = logging.getLogger("octconv_exp")

#: The options of the logger group (conf/logger/): csv adds nothing to the run dir's files.
LOGGERS = ("csv", "tensorboard", "mlflow")


class NullLogger:
    def log_epoch(self, stats):
        pass

    def finish(self, metrics):
        pass

    def close(self, status):
        """The run ended without finish() (failed, interrupted): nothing to record."""


class Loggers:
    """Several loggers as one."""

    def __init__(self, loggers):
        self.loggers = list(loggers)

    def log_epoch(self, stats):
        for logger in self.loggers:
            logger.log_epoch(stats)

    def finish(self, metrics):
        for logger in self.loggers:
            logger.finish(metrics)

    def close(self, status):
        for logger in self.loggers:
            logger.close(status)


class TensorBoardLogger:
    """Per-epoch scalars and, at the end, the run's hyper-parameters with its final metrics
    (``SummaryWriter.add_hparams``), so ``tensorboard --logdir SWEEP_DIR`` compares runs."""

    def __init__(self, log_dir, hparams):
        try:
            from torch.utils.tensorboard import (
                SummaryWriter,  # deferred: loads torch; imported before torch at start-up
            )
        except ImportError:
            raise UserError("logger=tensorboard needs the tensorboard package: "
                            "pip install tensorboard (or use logger=csv)") from None
        self.writer = SummaryWriter(log_dir=log_dir)
        self.hparams = hparams

    def log_epoch(self, stats):
        for name in ("train_loss", "train_accuracy", "train_images_per_second", "lr",
                     "val_loss", "val_accuracy"):  # val_*: None without a validation split
            value = getattr(stats, name)
            if value is not None:
                self.writer.add_scalar(name, value, stats.epoch)
        self.writer.flush()

    def finish(self, metrics):
        # val_accuracy: the best epoch's (metrics.json), present with a validation split.
        final = {f"final/{k}": metrics[k] for k in ("test_accuracy", "test_loss",
                                                     "test_top5_accuracy", "train_loss",
                                                     "train_images_per_second", "val_accuracy")
                 if isinstance(metrics.get(k), (int, float))
                 and not isinstance(metrics.get(k), bool)}
        if metrics.get("test_accuracy") is not None:
            self.writer.add_scalar("test_accuracy", metrics["test_accuracy"],
                                   metrics.get("epochs_completed") or 0)
        self.writer.add_hparams(self.hparams, final, run_name="hparams")
        self.writer.close()

    def close(self, status):
        self.writer.close()


def selected(cfg):
    """The logger options a config selects, with their nodes: ``{name: node}``. Configs from
    before loggers combined name one, as ``logger.name``."""
    node = cfg.logger
    if "name" in node:
        return {str(node.name): node}
    return {str(name): node[name] for name in node}


def make_logger(cfg, output_dir, device=None):
    """The run's loggers; ``device``: the device it runs on (cfg.device may say auto)."""
    found = selected(cfg)
    loggers = []
    if "tensorboard" in found:
        hparams = {"conv": cfg.conv.mode, "alpha": float(cfg.alpha), "expansion": int(cfg.expansion),
                   "optimizer": str(cfg.optimizer.name), "lr": float(cfg.optimizer.lr),
                   "scheduler": str(cfg.scheduler.name), "seed": int(cfg.seed),
                   "dataset": str(cfg.dataset.name), "batch_size": int(cfg.trainer.batch_size),
                   "epochs": int(cfg.trainer.epochs),
                   "val_size": float(cfg.dataset.get("val_size", 0) or 0),
                   "augment": bool(cfg.dataset.get("augment", False))}
        log_dir = found["tensorboard"].get("log_dir", "tensorboard")
        loggers.append(TensorBoardLogger(os.path.join(output_dir, log_dir), hparams))
    if "mlflow" in found:
        loggers.append(MlflowLogger(cfg, found["mlflow"], output_dir, device=device))
    return Loggers(loggers) if loggers else NullLogger()


# ------------------------------------------------------------------------------------------
# MLflow
def default_tracking_uri():
    """A local SQLite database in the working dir (beside outputs/ and multirun/)."""
    return "sqlite:///" + os.path.abspath("mlruns.db")


def _mlflow():
    try:
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient  # optional: only logger=mlflow needs mlflow
    except ImportError:
        raise UserError("logger=mlflow needs MLflow: pip install -r requirements.txt "
                        "(mlflow-skinny)") from None
    return MlflowClient


def flatten(node, prefix=""):
    """A nested dict as MLflow params: dotted keys, values as text (at most 500 characters:
    older tracking servers refuse longer ones)."""
    return {name: str(value)[:500] for name, value in flatten_dict(node, prefix).items()}


def connect(node):
    """The MLflow client for ``logger.mlflow`` and the experiment's id, checking first that
    the tracking store answers (an unreachable server: one line, before any training)."""
    MlflowClient = _mlflow()
    uri = node.get("tracking_uri") or default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        # Fail fast at start instead of retrying for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if uri.startswith("sqlite:///"):
        folder = os.path.dirname(uri[len("sqlite:///"):]) or "."
        if not os.path.isdir(folder):  # a typo would otherwise create a store of its own
            raise UserError(f"logger.mlflow.tracking_uri={uri}: the folder {folder} does not "
                            "exist; create it, or set logger.mlflow.tracking_uri=null for "
                            "mlruns.db in the working dir")
    name = str(node.get("experiment_name") or "octconv-exp")
    try:
        # Inside the try: an unknown scheme, a file that is no database or a damaged one
        # fail here, as the store is opened.
        with _store_lock(uri):
            client = MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                artifacts = None
                if uri.startswith("sqlite:///"):  # beside the database, not in ./mlruns
                    folder = os.path.join(os.path.dirname(uri[len("sqlite:///"):]) or ".",
                                          "mlartifacts")
                    artifacts = "file://" + os.path.abspath(folder)
                experiment_id = client.create_experiment(name, artifact_location=artifacts)
            else:
                experiment_id = experiment.experiment_id
    except Exception as exc:  # noqa: BLE001 - whatever the store raises: one line
        first = " ".join(str(exc).split())[:300]
        trouble = ("does not answer" if uri.startswith(("http://", "https://"))
                   else "cannot be used")
        advice = "start it" if uri.startswith(("http://", "https://")) else "fix or move it"
        raise UserError(f"logger.mlflow.tracking_uri={uri}: the tracking store {trouble} "
                        f"({type(exc).__name__}: {first}); {advice}, or set "
                        "logger.mlflow.tracking_uri=null for a local SQLite database") from None
    return client, experiment_id, uri


@contextlib.contextmanager
def _store_lock(uri):
    """For a local SQLite store, ``<database>.lock`` held (flock) while the store is opened:
    a parallel sweep's jobs each open it, and MLflow's first opening creates its tables by a
    migration that two processes at once break (``table _alembic_tmp_experiments already
    exists``); two could also both create the experiment."""
    if not uri.startswith("sqlite:///"):
        yield
        return

    # connect() has refused a database folder that does not exist before this lock is taken.
    path = os.path.abspath(uri[len("sqlite:///"):])
    with open(path + ".lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file closes
        yield


#: The run dir's note of its MLflow run: a resumed run goes on logging into the same one.
MLFLOW_RUN_FILE = "mlflow_run.json"


class MlflowLogger:
    """One MLflow run per job (per run dir): params, per-epoch metrics, final metrics,
    artifacts and tags; a resumed run continues its MLflow run."""

    EPOCH_METRICS = ("train_loss", "train_accuracy", "train_images_per_second", "lr",
                     "val_loss", "val_accuracy")
    FINAL_METRICS = ("test_accuracy", "val_accuracy", "train_loss", "train_accuracy",
                     "test_loss", "test_top5_accuracy",
                     "train_images_per_second", "flops_per_image", "flops_ratio", "params",
                     "wall_seconds", "epochs_completed")

    def __init__(self, cfg, node, output_dir, device=None):
        self.client, experiment_id, self.uri = connect(node)
        self.output_dir = output_dir
        self.finished = False
        self.run_id = self._previous_run()
        if self.run_id is None:
            from ..models.octave import model_name  # deferred: loads torch; imported before torch at start-up

            tags = {"conv": str(cfg.conv.mode), "alpha": str(cfg.alpha),
                    "model": model_name(cfg), "device": str(device or cfg.device),
                    "dataset": str(cfg.dataset.get("name")),
                    "run_dir": os.path.abspath(output_dir)}
            sweep_dir = _sweep_dir()
            if sweep_dir:
                tags["sweep_dir"] = sweep_dir
            run = self.client.create_run(experiment_id, run_name=_run_name(output_dir),
                                         tags=tags)
            self.run_id = run.info.run_id
            config = OmegaConf.to_container(cfg, resolve=True)
            self._log_params(flatten(config))

            write_json_atomic(os.path.join(output_dir, MLFLOW_RUN_FILE),
                              {"run_id": self.run_id, "tracking_uri": self.uri,
                               "experiment_id": experiment_id})
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        log.info("MLflow: run %s in %s", self.run_id, self.uri)

    def _previous_run(self):
        path = os.path.join(self.output_dir, MLFLOW_RUN_FILE)
        if not os.path.exists(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            run_id = saved["run_id"]
            if not isinstance(run_id, str):
                raise TypeError("run_id is not text")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Not silently a new MLflow run: the note is this run dir's link to its history.
            reason = " ".join(str(exc).split())[:200]
            raise UserError(f"{os.path.abspath(path)}: not a readable note of this run's "
                            f"MLflow run ({type(exc).__name__}: {reason}); restore it, or "
                            "delete it to log into a new MLflow run") from None
        if saved.get("tracking_uri") != self.uri:
            return None
        try:
            return self.client.get_run(run_id).info.run_id
        except Exception:  # noqa: BLE001 - a run the store no longer has
            return None

    def _log_params(self, params):
        from mlflow.entities import Param  # optional: only logger=mlflow needs mlflow

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def _log_metrics(self, values, step):
        from mlflow.entities import Metric  # optional: only logger=mlflow needs mlflow

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(step)) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_epoch(self, stats):
        self._log_metrics({k: getattr(stats, k) for k in self.EPOCH_METRICS}, stats.epoch)

    def finish(self, metrics):
        final = {f"final_{k}" if k in self.EPOCH_METRICS else k: metrics.get(k)
                 for k in self.FINAL_METRICS}
        self._log_metrics(final, metrics.get("epochs_completed") or 0)
        for name in ("metrics.json", "epochs.csv", os.path.join(".hydra", "config.yaml"),
                     "confusion_matrix.csv", "confusion_matrix.png", "confusion_matrix.pdf",
                     "confusion_matrix.svg", "per_class_accuracy.csv"):
            path = os.path.join(self.output_dir, name)
            if os.path.isfile(path):
                self.client.log_artifact(self.run_id, path)
        self.client.set_terminated(self.run_id, "FINISHED")
        self.finished = True

    def close(self, status):
        if self.finished:
            return
        try:
            self.client.set_terminated(self.run_id,
                                       "KILLED" if status == "interrupted" else "FAILED")
        except Exception:  # noqa: BLE001 - the run's own error is what matters
            pass


def log_sweep(config, sweep_dir, files):
    """A sweep's report as an MLflow run of its own (``sweep report``) in the experiment of
    its jobs, tagged with the sweep dir: summary, Pareto front and plots as artifacts."""
    node = selected(config).get("mlflow")
    if node is None:
        return None
    client, experiment_id, _ = connect(node)
    run = client.create_run(experiment_id, run_name="sweep report",
                            tags={"sweep_dir": os.path.abspath(sweep_dir), "kind": "sweep report"})
    for path in files:
        if os.path.isfile(path):
            client.log_artifact(run.info.run_id, path)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _run_name(output_dir):
    """The run dir's name, with its parent's for a sweep job (``alpha=0.25,conv=octave/seed=0``)."""
    parent, name = os.path.split(os.path.abspath(output_dir))
    return f"{os.path.basename(parent)}/{name}" if name.startswith("seed=") else name


def _sweep_dir():
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return os.path.abspath(str(hydra_cfg.sweep.dir))
    except (ImportError, ValueError):
        pass
    return None
