"""One run's life (:class:`RunLifecycle`): validate the config, build data/model/backend,
restore, train, evaluate, write outputs; every ending one :class:`Ending`."""
import contextlib
import datetime
import enum
import json
import logging
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..backends import distributed, make_backend, resolve_device
from ..backends.base import Backend, ResumableLoader
from ..backends.checks import ipus_needed
from ..backends.threads import resolve_threads, thread_record
from ..config.schema import confusion_formats, validate
from ..config.targets import check_saved_targets
from ..data.datasets import derived_seed
from ..data.loading import load_data
from ..errors import USER_ERROR_EXIT, Diverged, RunInterrupted, UserError
from ..models.flops import count_flops_per_image, theoretical_ratio
from ..models.octave import build_model, check_input_size, count_parameters, model_name
from ..records import outputs, provenance
from ..records.loggers import NullLogger, make_logger
from .checkpoint import (
    CHECKPOINT_DIR,
    INFERENCE,
    LAST,
    Checkpointer,
    check_identity,
    identity,
    inference_record,
    mode_for,
    monitor_for,
    rng_state,
    saved_preprocessing,
    set_rng_state,
)
from .checkpoint import load as load_checkpoint
from .checkpoint import resolve_path as resolve_checkpoint
from .evaluation import ConfusionMatrix
from .evaluation import write_outputs as write_evaluation_files
from .loop import (
    EpochProgress,
    EpochStats,
    Interrupted,
    best_epoch,
    epochs_without_improvement,
    evaluate,
    send_test_signal,
    should_stop_early,
    train_epoch,
)
from .loop import validate as validate_epoch
from .resume import config_for_evaluation, config_for_resume, resume_hint
from .rundir import RunDirBusy, RunDirLock
from .stopping import StopNow, StopRequest  # noqa: F401  (re-exported)

log = logging.getLogger("octconv_exp")


def build_scheduler(sched_cfg, optimizer):
    """The configured learning-rate schedule (stepped once per epoch), or None."""
    if sched_cfg.name == "none":
        return None
    node = OmegaConf.to_container(sched_cfg, resolve=True)
    node.pop("name")
    return instantiate(node, optimizer=optimizer)


FLOPS_KEYS = ("flops_per_image", "flops_ratio", "flops_ratio_theoretical")


def flops_summary(cfg, num_classes, image_shape=(3, 32, 32)):
    """Counted FLOPs per image, their ratio to the vanilla model of the same config, and the
    ratio the channel split would give in theory (None for a model whose layers we cannot
    read). Counted on CPU models built for the purpose, so every backend reports the same."""
    model = build_model(cfg, num_classes=num_classes)
    flops = count_flops_per_image(model, tuple(image_shape))
    vanilla_cfg = OmegaConf.merge(cfg, {"conv": {"mode": "vanilla"}})
    vanilla = count_flops_per_image(build_model(vanilla_cfg, num_classes=num_classes),
                                    tuple(image_shape))
    return {"flops_per_image": flops, "flops_ratio": flops / vanilla if vanilla else None,
            "flops_ratio_theoretical": theoretical_ratio(model, cfg, image_shape, num_classes)}


def set_threads(threads):
    """torch's intra-op thread count (None: leave torch's default)."""
    if threads is not None:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def iso_time(seconds):
    """ISO-8601 local time with its UTC offset, e.g. 2026-11-30T07:52:01+00:00."""
    return datetime.datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def show_progress(cfg):
    """tqdm bars only on a terminal: piped and redirected logs stay free of bar frames."""
    return bool(cfg.trainer.progress_bar) and sys.stderr.isatty()


class Run:
    """The state of one run that ``metrics.json`` reports, however far the run got."""

    def __init__(self, cfg: DictConfig, output_dir):
        self.cfg = cfg
        self.output_dir = output_dir
        self.started = time.time()
        self.device = None
        self.params = None
        self.epochs = []
        self.test_accuracy = None
        self.test_samples = None
        self.test_loss = None  # the plain cross-entropy, as val_loss
        self.test_confusion = None  # an evaluation.ConfusionMatrix of the test set
        self.status = "running"
        self.error = None
        self.flops = None
        self.image_size = None
        self.torch_threads = None
        self.threads = None  # metrics.json's thread record (backends.threads.thread_record)
        self.checkpoint = None
        self.resumed = False  # a resume restored its checkpoint (from then on, it may write)
        self.val_samples = None  # images in the validation split (None: no split)
        self.stopped_early = False  # trainer.early_stopping ended training before the last epoch
        self.monitor = None  # what best.pt follows (None: from the config, see metrics())
        self.mode = None  # which way the monitor is better (None: from the config)
        self.test_checkpoint = None  # which weights the test set scored: "best" or "last"
        self.test_epoch = None  # the epoch whose weights the test set scored
        self.backend = None  # speed.compile's decision is read from it (CPU/GPU backends)
        # A resume: the run dir's record of the attempts before this one, and the epochs the
        # checkpoint held (what this attempt trained is what it added to them).
        self.earlier = None
        self.epochs_restored = None

    def metrics(self):
        """What metrics.json holds. ``train_loss``/``train_accuracy`` are the last epoch's.
        ``best_epoch`` is the epoch best.pt holds, by ``best_monitor`` in direction
        ``best_mode`` (trainer.early_stopping.monitor/mode). ``test_accuracy`` is of the
        weights ``test_checkpoint`` names (trainer.test_on: "best" or "last"), those of epoch
        ``test_epoch``; ``val_accuracy`` and ``val_loss`` are that epoch's (without a tested
        epoch: the best epoch's), on ``val_samples`` images."""
        cfg = self.cfg
        now = time.time()
        last = self.epochs[-1] if self.epochs else None
        monitor = self.monitor or monitor_for(cfg)
        mode = self.mode or mode_for(cfg, monitor)
        best = best_epoch(self.epochs, monitor, mode)
        tested = next((e for e in self.epochs if e.epoch == self.test_epoch), None) \
            if self.test_epoch is not None else best
        train_images = sum(e.train_images for e in self.epochs)
        train_seconds = sum(e.train_seconds for e in self.epochs)
        confusion = self.test_confusion
        m = {
            **self.what_ran(),
            "train_loss": last.train_loss if last else None,
            "train_accuracy": last.train_accuracy if last else None,
            "test_accuracy": self.test_accuracy,
            "test_samples": self.test_samples,
            "test_loss": self.test_loss,
            # Percent, as test_accuracy; None with 5 classes or fewer.
            "test_top5_accuracy": confusion.top_k_accuracy() if confusion else None,
            "test_per_class_accuracy": confusion.per_class_accuracy() if confusion else None,
            "test_checkpoint": self.test_checkpoint,
            "test_epoch": self.test_epoch,
            "best_epoch": best.epoch if best else None,
            "best_monitor": monitor,
            "best_mode": mode,
            "val_accuracy": tested.val_accuracy if tested else None,
            "val_loss": tested.val_loss if tested else None,
            "val_samples": self.val_samples,
            "stopped_early": self.stopped_early,
            "params": self.params,
            **(self.flops or dict.fromkeys(FLOPS_KEYS)),
            "train_images_per_second": (train_images / train_seconds) if train_seconds else None,
            "train_seconds": train_seconds,
            **self.timing(now),
            **self.how_it_ran(),
        }
        if self.checkpoint is not None:
            m["checkpoint"] = self.checkpoint
        if self.error is not None:
            m["error"] = self.error
        return m

    def what_ran(self):
        """metrics.json's first keys: the run's outcome so far and its settings."""
        cfg = self.cfg
        return {
            "status": self.status,
            "model": model_name(cfg),
            "conv": cfg.conv.mode,
            "alpha": cfg.alpha,
            "expansion": cfg.expansion,
            "optimizer": cfg.optimizer.get("name"),
            "lr": cfg.optimizer.get("lr"),
            "scheduler": cfg.scheduler.get("name"),
            "dataset": cfg.dataset.get("name"),
            "image_size": self.image_size,
            "device": self.device,
            "seed": cfg.seed,
            "epochs": cfg.trainer.epochs,
            "epochs_completed": len(self.epochs),
            "batch_size": cfg.trainer.batch_size,
            # Data-parallel ranks (torchrun, submitit tasks); batch_size is per rank.
            "world_size": distributed.WORLD.world_size,
            "global_batch_size": cfg.trainer.batch_size * distributed.WORLD.world_size,
        }

    def how_it_ran(self):
        """metrics.json's last keys: the process, threads, speed decisions and versions."""
        return {
            "pid": os.getpid(),
            "torch_threads": self.torch_threads,
            # the thread counts, the OpenMP/MKL environment and why (backends/threads.py)
            "threads": self.threads,
            # speed.compile (CPU/GPU): whether the training steps ran torch.compile'd, and why
            "compiled": None if self.backend is None else self.backend.compile,
            "compile_decision": None if self.backend is None else self.backend.compile_reason,
            # speed.malloc (CPU/GPU backends): whether glibc's malloc keeps freed memory
            "malloc": None if self.backend is None else self.backend.malloc_decision,
            "versions": outputs.package_versions(),
            # The octconv-exp checkout's git commit and dirty flag (None outside a checkout)
            "code_version": provenance.code_version(),
        }

    def timing(self, now):
        """``wall_seconds``, ``started_at``/``finished_at`` (and their ISO-8601 forms). A
        resumed run's wall time adds its earlier attempts' (the record it continues) and it
        started when its first attempt did. A finished run that a resume only re-evaluated
        keeps its record's times, so they still describe its training; the re-evaluation is
        recorded beside them (``reevaluated_at``, ``reevaluation_seconds``)."""
        attempt = now - self.started
        earlier = self.earlier or {}
        before = earlier_number(earlier, "wall_seconds")
        first_start = earlier_number(earlier, "started_at")
        t = {"wall_seconds": attempt, "started_at": self.started, "finished_at": now}
        extra = {}
        if before is not None and first_start is not None:
            finished = earlier_number(earlier, "finished_at")
            if (earlier.get("status") == "completed" and finished is not None
                    and len(self.epochs) == self.epochs_restored):
                t = {"wall_seconds": before, "started_at": first_start, "finished_at": finished}
                extra = {"reevaluated_at": iso_time(now), "reevaluation_seconds": attempt}
            else:
                t = {"wall_seconds": before + attempt, "started_at": first_start,
                     "finished_at": now}
        return dict(t, started=iso_time(t["started_at"]), finished=iso_time(t["finished_at"]),
                    **extra)

    def write_metrics(self):
        if not distributed.is_writer():
            return  # data-parallel: rank 0 writes the run's record
        outputs.write_json_atomic(os.path.join(self.output_dir, outputs.METRICS_FILE),
                                  self.metrics())


def earlier_number(record, key):
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def earlier_record(output_dir):
    """The run dir's metrics.json as a dict (None when there is none, or it is unreadable)."""
    try:
        with open(os.path.join(output_dir, outputs.METRICS_FILE)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def set_deterministic(enabled):
    """torch's deterministic algorithms (CUDA too: cuDNN and cuBLAS), or the fast defaults."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Only when it changes something: on the newest torch the call imports torch._inductor
    # (about 1 s on this machine's 2 cores, for every run).
    if bool(enabled) != torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(bool(enabled))
    torch.backends.cudnn.deterministic = bool(enabled)
    if enabled:
        torch.backends.cudnn.benchmark = False


@dataclass(frozen=True)
class SavedState:
    """A checkpoint or model.pt, read once: where it is and what it holds."""
    path: str
    state: dict


@dataclass(frozen=True)
class ResumePoint(SavedState):
    """The training checkpoint resume=true continues from."""

    @property
    def epochs_done(self):
        return int(self.state["epoch"])

    @property
    def device(self):
        """The device it was trained on (None: not recorded)."""
        return self.state.get("device")


@dataclass(frozen=True)
class TrainingStart:
    """Where training begins: the first epoch to train and, for a checkpoint taken inside
    that epoch, how far it had got (None: from the epoch's start)."""
    epoch: int = 1
    progress: Optional[EpochProgress] = None

    @property
    def steps_done(self):
        return self.progress.steps if self.progress is not None else 0


class Outcome(enum.Enum):
    """How a run ended. The CLI turns it into an exit status (cli.outcome.report_ending)."""
    COMPLETED = "completed"  # trained and tested, evaluated (train=false) or profiled
    INTERRUPTED = "interrupted"  # SIGINT/SIGTERM: 128 + the signal
    DIVERGED = "diverged"  # a non-finite loss: a user error
    FAILED = "failed"  # a user error (one line), or a programming error (its traceback)


@dataclass
class Ending:
    """One run's ending: its outcome and what the CLI says and returns for it."""
    outcome: Outcome
    metrics: Optional[dict] = None  # completed: what metrics.json holds
    message: Optional[str] = None  # the one line of an interrupted, diverged or failed run
    exit_code: int = 0  # a single run's exit status
    #: A programming error in a single run: the CLI raises it again, with its traceback, and
    #: the record is left as the run last wrote it.
    bug: Optional[BaseException] = None


def run_experiment(cfg: DictConfig, output_dir, run=None, threads=None, fresh_if_no_checkpoint=False,
                   explicit=None, stop=None, gpu_claim=None):
    """Train and evaluate the configured model (or only evaluate one, ``train=false``);
    returns the metrics dict and raises however the run fails (the CLI uses
    :meth:`RunLifecycle.run`, which turns that into an :class:`Ending`).

    ``run`` (a :class:`Run`) lets the caller report how far a failed run got; ``threads``
    sets torch's thread count; ``fresh_if_no_checkpoint`` lets resume=true start a job that
    never ran (resuming a sweep); ``explicit`` lists the keys the command line set;
    ``stop`` is the caller's entered :class:`StopRequest`, else this call installs its own;
    ``gpu_claim`` (a :class:`~octconv_exp.backends.distributed.GpuClaim`): a parallel sweep's job
    takes a GPU of its own. See :class:`RunLifecycle`.
    """
    if stop is None:
        with StopRequest() as own:
            return run_experiment(cfg, output_dir, run, threads, fresh_if_no_checkpoint,
                                  explicit, stop=own, gpu_claim=gpu_claim)
    return RunLifecycle(cfg, output_dir, stop=stop, run=run, threads=threads,
                        sweep_job=fresh_if_no_checkpoint, explicit=explicit,
                        gpu_claim=gpu_claim).execute()


class RunLifecycle:
    """One run's life, owned by one object: :meth:`set_up` (the config a checkpoint holds,
    the device, the ranks, the backend), then :meth:`perform`: load the data and build the
    model, :meth:`restore` from a :class:`ResumePoint`, :meth:`fit`, :meth:`test`,
    :meth:`finish` (or :meth:`evaluate_only`, :meth:`profile`), and :meth:`close` however it
    ends. :meth:`run` holds the run dir for it and turns every way it ends into one
    :class:`Ending`.

    ``stop``: the entered :class:`StopRequest` (from start-up to the last output; or given to
    :meth:`run`);
    ``sweep_job``: a job of a sweep (resume=true may start it afresh when it never ran, and a
    programming error is recorded in its metrics.json, not raised: the sweep goes on);
    ``explicit``: the keys the command line set (a resume or an evaluation takes the rest
    from the checkpoint, :mod:`.resume`); ``attempt_subdir``: where Hydra wrote this
    attempt's files (``hydra.output_subdir``), adopted as the run's record by a new run dir.
    """

    def __init__(self, cfg, output_dir, stop=None, run=None, threads=None, sweep_job=False,
                 explicit=None, gpu_claim=None, attempt_subdir=None):
        self.command_cfg = self.cfg = cfg  # the command's; self.cfg: the one the run uses
        self.output_dir = output_dir
        self.stop = stop
        self.run_record = run or Run(cfg, output_dir)
        self.threads, self.sweep_job = threads, sweep_job
        self.explicit = list(explicit or [])
        self.gpu_claim, self.attempt_subdir = gpu_claim, attempt_subdir
        self.resume_point: Optional[ResumePoint] = None
        self.evaluated: Optional[SavedState] = None  # train=false: the saved model
        self.backend: Optional[Backend] = None
        self.device = None
        self.data = self.model = self.optimizer = self.scheduler = None
        self.train_loader = self.test_loader = self.val_loader = None
        self.checkpointer = self.logger = self.step = None
        self.best_weights = None  # (epoch, host state dict): trainer.test_on=best

    @property
    def num_classes(self):
        return self.data.num_classes

    # ------------------------------------------------------------------ the whole life

    def run(self, stop=None):
        """The run from its dir's lock to its last record: an :class:`Ending` however it
        ends (data-parallel: rank 0 holds the lock and writes the record)."""
        self.stop = stop or self.stop
        writer = distributed.launched_rank() == 0
        run = self.run_record
        try:
            with (RunDirLock(self.output_dir) if writer else contextlib.nullcontext()):
                if writer:
                    adopt_attempt_files(self.output_dir, self.attempt_subdir)
                try:
                    metrics = self.execute()
                finally:
                    self.stop.set_phase("closing", "")
                    if writer and (run.resumed or run.status == "evaluated"):
                        record_effective_config(self.output_dir, run.cfg)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an Ending
            self.stop.set_phase("closing", "")
            # An error that follows a stop (the signal interrupted an import) is the stop.
            return self.ending_of(self.stop.raised or exc)
        except StopNow as exc:  # a BaseException: see stopping.StopNow
            self.stop.set_phase("closing", "")
            return self.ending_of(exc)
        return Ending(Outcome.COMPLETED, metrics=metrics)

    def execute(self):
        """Set up, perform and close the run; returns its metrics, raises how it failed."""
        self.set_up()
        try:
            return self.perform()
        except (RuntimeError, ValueError) as exc:
            if distributed.WORLD.active and distributed.is_collective_failure(exc):
                raise distributed.peer_failure(exc) from exc
            raise
        except self.backend.device_errors as exc:
            # The device refused (no IPUs to attach, a failed compilation): one line, not a trace.
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"device={self.device}: PopTorch failed: {first}") from exc
        finally:
            self.close()

    def perform(self):
        """The run itself, on a backend that :meth:`close` closes however it ends."""
        if self.cfg.profile_dir is not None:
            return self.profile()
        self.load_data()
        self.build_model()
        send_test_signal("start-up")
        if not self.cfg.train:
            return self.evaluate_only()
        start = self.prepare_training()
        self.fit(start)
        self.test()
        return self.finish()

    def close(self):
        if self.logger is not None:
            self.logger.close(self.run_record.status)  # a run that ended early: its tracker says so
        self.backend.close()
        distributed.teardown()
        if self.gpu_claim is not None:
            self.gpu_claim.release()

    # ------------------------------------------------------------------ set-up

    def set_up(self):
        """The config (a checkpoint's, for a resume or an evaluation), the device, the
        data-parallel group and the backend."""
        validate(self.cfg)
        self.read_saved()
        run = self.run_record
        run.cfg = self.cfg
        os.makedirs(self.output_dir, exist_ok=True)
        threads, why = resolve_threads(self.cfg.get("threads"), self.threads)
        run.torch_threads = set_threads(threads)
        run.threads = thread_record(why)
        self.device = run.device = self.join_device()
        if self.resume_point is not None:
            check_resume_device(self.resume_point.device, self.device, self.resume_point.path)
        seed_everything(self.cfg.seed)
        set_deterministic(self.cfg.deterministic)
        self.backend = run.backend = make_backend(self.cfg, self.device)

    def read_saved(self):
        """resume=true: the checkpoint to continue and its config; train=false: the saved
        model to evaluate and its config (each read once)."""
        cfg = self.command_cfg
        if cfg.resume:
            point = find_resume_checkpoint(cfg, self.output_dir, self.sweep_job)
            if point is not None:
                self.cfg = config_for_resume(cfg, point.state, self.explicit, point.path)
                check_saved_targets(self.cfg, cfg, point.state, self.explicit, point.path,
                                    "resume=true")
            self.resume_point = point
        elif not cfg.train:
            check_not_a_training_record(self.output_dir)
            path = resolve_checkpoint(cfg.ckpt_path, prefer_final=True)
            self.evaluated = SavedState(path, load_checkpoint(path))
            self.cfg = config_for_evaluation(cfg, self.evaluated.state, self.explicit)
            check_saved_targets(self.cfg, cfg, self.evaluated.state, self.explicit, path,
                                "train=false")

    def join_device(self):
        """The device this run (this rank, this sweep job) computes on."""
        cfg = self.cfg
        device = resolve_device(cfg.device, ipus_needed=ipus_needed(cfg))
        if device == "ipu" and cfg.trainer.get("sync_batchnorm", False):
            raise UserError("trainer.sync_batchnorm=true: not on IPUs (each replica normalises "
                            "its own micro-batch); set trainer.sync_batchnorm=false for device=ipu")
        try:
            device = distributed.setup(cfg, device)  # torchrun/submitit ranks: join the group
        except RuntimeError as exc:  # the group could not form (a rank missing, a timeout)
            distributed.teardown()
            raise distributed.peer_failure(exc) from exc
        claim = self.gpu_claim
        if device == "cuda" and claim is not None:  # one GPU per job of a parallel sweep
            device = claim.acquire(torch.cuda.device_count())
            if device != "cuda":
                torch.cuda.set_device(torch.device(device))
                log.info("Parallel sweep: job %d runs on GPU %s", claim.job_num, device)
        return device

    def profile(self):
        """profile_dir: one training iteration profiled, on a batch with the data's image
        size and classes (the model is built for them)."""
        cfg, run, backend = self.cfg, self.run_record, self.backend
        self.data = load_data(cfg.dataset)
        model = backend.build_model(num_classes=self.num_classes)
        try:
            check_input_size(model, self.data.image_shape)
        except ValueError as exc:
            raise UserError(f"model={model_name(cfg)} {exc}") from None
        optimizer = backend.build_optimizer(model)
        written = backend.profile(model, optimizer, cfg.profile_dir, self.data.image_shape,
                                  self.num_classes)
        log.info("Profile of one training iteration on %s written to %s", self.device,
                 ", ".join(written))
        run.status = "profiled"
        run.write_metrics()
        return run.metrics()

    def load_data(self):
        cfg = self.cfg
        t0 = time.perf_counter()
        self.data = load_data(cfg.dataset,
                              **saved_data_settings(self.resume_point or self.evaluated))
        log.info("Data: %s, %d training and %d test images, %d classes (%.2fs)",
                 cfg.dataset.name, len(self.data.train), len(self.data.test), self.num_classes,
                 time.perf_counter() - t0)
        if self.data.streamed and self.device == "ipu":
            raise UserError("dataset.in_memory: device=ipu reads an image folder in memory (the "
                            "streamed loader is CPU/GPU only); set dataset.in_memory=true, or "
                            "dataset.image_size smaller so that it fits")
        check_batches(cfg, len(self.data.train))
        check_ranks(cfg, self.data)
        self.run_record.image_size = list(self.data.image_shape[1:])

    def build_model(self):
        """The model for the data's images and classes, on every rank the same."""
        cfg, run = self.cfg, self.run_record
        image_shape = self.data.image_shape
        self.model = self.backend.build_model(num_classes=self.num_classes)
        try:
            check_input_size(self.model, image_shape)
        except ValueError as exc:
            raise UserError(f"model={model_name(cfg)} {exc}") from None
        run.params = count_parameters(self.model)
        world = distributed.WORLD
        if world.active:
            if cfg.trainer.get("sync_batchnorm", False):
                self.model = distributed.convert_sync_batchnorm(self.model, self.device)
            # The weights are the same on every rank (same seed; DDP also broadcasts rank
            # 0's); what is random in training (dropout) differs per rank, as in separate
            # processes.
            torch.manual_seed(derived_seed("rank", cfg.seed, world.rank))
            log.info("Data-parallel: rank %d of %d (%s, %s), batch %d per rank, %d in all%s",
                     world.rank, world.world_size, world.launcher, world.backend,
                     cfg.trainer.batch_size, cfg.trainer.batch_size * world.world_size,
                     ", synchronised BatchNorm" if cfg.trainer.get("sync_batchnorm", False)
                     else "")
        run.flops = flops_summary(cfg, self.num_classes, image_shape)
        theory = run.flops["flops_ratio_theoretical"]
        log.info("Model: %s conv=%s%s, %d parameters, %.2f MFLOPs per %dx%d image "
                 "(%.3f of vanilla; %s in theory); device %s, %d threads", model_name(cfg),
                 cfg.conv.mode, "" if cfg.conv.mode == "vanilla" else f" alpha={cfg.alpha}",
                 run.params, run.flops["flops_per_image"] / 1e6,
                 image_shape[1], image_shape[2], run.flops["flops_ratio"],
                 "n/a" if theory is None else f"{theory:.3f}", self.device, run.torch_threads)

    def prepare_training(self):
        """Optimizer, loaders, the monitor best.pt follows, scheduler, checkpointer, the
        checkpoint restored, logger and training step; returns where training begins."""
        cfg, run, backend = self.cfg, self.run_record, self.backend
        self.optimizer = backend.build_optimizer(self.model)
        if self.resume_point is not None:
            # A loader whose order is fixed when its worker starts (IPU) is told first.
            backend.start_at_epoch(self.resume_point.epochs_done + 1)
        self.train_loader, self.test_loader = backend.make_loaders(self.data)
        self.prepare_validation()
        # best.pt, metrics.json's best_epoch, early stopping and test_on=best follow one monitor.
        run.monitor = monitor_for(cfg)
        if run.monitor.startswith("val_") and self.val_loader is None:
            run.monitor = "train_loss"  # ipu.synthetic_data: no validation numbers
        run.mode = mode_for(cfg, run.monitor)
        self.scheduler = build_scheduler(cfg.scheduler, self.optimizer)
        self.checkpointer = Checkpointer(self.output_dir, monitor=run.monitor, mode=run.mode)
        start = self.restore() if self.resume_point is not None else TrainingStart()
        self.logger = (make_logger(cfg, self.output_dir, device=self.device)
                       if distributed.is_writer() else NullLogger())
        self.step = backend.training_step(self.model, self.optimizer)
        # The steps still to take, for speed.compile=auto.
        backend.plan(len(self.train_loader) * (cfg.trainer.epochs - start.epoch + 1)
                     - start.steps_done)
        self.stop.set_phase("polled", "during training")
        steps = len(self.train_loader) + start.steps_done
        augmented = ", batches augmented (4-pixel pad, random crop, horizontal flip)"
        log.info("Training: epochs %d-%d, %d steps each%s", start.epoch, cfg.trainer.epochs,
                 steps, augmented if cfg.dataset.get("augment", False) else "")
        return start

    def prepare_validation(self):
        data, run = self.data, self.run_record
        self.val_loader = None
        if data.val is not None and self.backend.synthetic_data:
            log.info("ipu.synthetic_data=true: no validation (the device computes on its own data)")
        elif data.val is not None:
            self.val_loader = self.backend.make_val_loader(data)
            run.val_samples = len(data.val)
            log.info("Validation: %d images held out of the training set (dataset.seed=%s), "
                     "evaluated after every epoch", run.val_samples, self.cfg.dataset.get("seed"))

    # ------------------------------------------------------------------ restore

    def restore(self):
        """Apply the checkpoint :meth:`read_saved` found; returns where training continues."""
        point, run = self.resume_point, self.run_record
        check_identity(point.state, self.cfg, self.num_classes, point.path)
        self.model.load_state_dict(point.state["state_dict"])
        self.optimizer.load_state_dict(point.state["optimizer"])
        if self.scheduler is not None and point.state.get("scheduler") is not None:
            self.scheduler.load_state_dict(point.state["scheduler"])
        state = state_of_this_rank(point.state, point.path)
        run.epochs = [EpochStats(**e) for e in state["epochs"]]
        if os.path.abspath(point.path).startswith(os.path.join(os.path.abspath(self.output_dir),
                                                               "")):
            # This run dir's own checkpoint: its metrics.json records the same run's attempts.
            run.earlier = earlier_record(self.output_dir)
        run.epochs_restored = len(run.epochs)
        if run.epochs and distributed.is_writer():
            outputs.write_epochs_csv(os.path.join(self.output_dir, outputs.EPOCHS_FILE),
                                     [e.as_row() for e in run.epochs])
        # The best so far, if it is of what this run's best.pt follows.
        if self.checkpointer.follows(state):
            self.checkpointer.best = state.get("best")
        set_rng_state(state["rng"])
        progress = self.restore_loader(state)
        run.resumed = True
        log.info("Resuming from %s: %d epoch(s) done%s", point.path, state["epoch"],
                 f", {progress.steps} step(s) into epoch {state['epoch'] + 1}" if progress else "")
        return TrainingStart(state["epoch"] + 1, progress)

    def restore_loader(self, state):
        """A resumable training loader continues the pass the checkpoint recorded; returns
        how far into its epoch that was (None: at the epoch's start)."""
        loader_state = state.get("loader")
        if loader_state is None or not self.backend.resumes_inside_epoch:
            return None
        loader: ResumableLoader = self.train_loader
        progress_state = state.get("progress")
        skip = progress_state["steps"] if progress_state else 0
        # The pass numbered as the epoch it is: its augmentation depends on it.
        loader.resume_pass(loader_state["generator"], skip, epoch=state["epoch"] + 1)
        if not progress_state:
            return None
        return EpochProgress.from_state_dict(progress_state, device=loader.device)

    # ------------------------------------------------------------------ fit

    def fit(self, start: TrainingStart):
        """The epochs (from where a checkpoint left off), each followed by the validation pass
        (with a validation split) and a checkpoint; early stopping ends them when the monitor
        has not improved for ``trainer.early_stopping.patience`` epochs."""
        cfg, run = self.cfg, self.run_record
        if start.progress is None and run.epochs and start.epoch <= cfg.trainer.epochs \
                and stops_early(cfg, run):
            run.stopped_early = True  # a resumed run that had stopped early stays stopped
            log.info("Early stopping: %s has not improved since epoch %d", run.monitor,
                     epochs_since(run))
            return
        progress = start.progress
        for epoch in range(start.epoch, cfg.trainer.epochs + 1):
            stats = self.train_one_epoch(epoch, progress)
            progress = None
            self.end_epoch(epoch, stats)
            if epoch < cfg.trainer.epochs and stops_early(cfg, run):
                self.log_early_stop(epoch)
                break
            if self.stop_requested() and epoch < cfg.trainer.epochs:
                raise self.interrupted(epoch + 1, 0)

    def stop_requested(self):
        """Whether training stops here. Data-parallel: every rank stops at the step any of
        them was asked to."""
        if not distributed.WORLD.active:
            return self.stop()
        signum = distributed.max_over_ranks(self.stop.signal or 0)
        if signum and self.stop.signal is None:
            self.stop.adopt(signum)  # another rank's signal: this one stops as it does
        return bool(signum)

    def train_one_epoch(self, epoch, progress):
        """One epoch's training pass (``progress``: continuing one a checkpoint stopped
        inside); a stop inside it is checkpointed and raised as :class:`RunInterrupted`."""
        lr = self.optimizer.param_groups[0]["lr"]
        try:
            stats = train_epoch(self.step, self.train_loader, epoch, self.cfg.trainer.epochs,
                                progress_bar=show_progress(self.cfg), resume=progress,
                                should_stop=self.stop_requested, reduce=reducer())
        except Interrupted as exc:
            if not self.backend.resumes_inside_epoch:
                # A loader that cannot start a pass part-way (PopTorch's): a checkpoint here
                # would call the steps already trained "epoch - 1 done" and train them again
                # on resume. The last whole epoch's checkpoint stays, and the epoch is redone.
                raise self.interrupted(epoch, exc.progress.steps, whole_epochs=True) from None
            self.save_checkpoint(epoch - 1, exc.progress)
            raise self.interrupted(epoch, exc.progress.steps) from None
        stats.lr = lr
        return stats

    def end_epoch(self, epoch, stats):
        """After an epoch's training pass: validation, the schedule's step, the epoch's row
        in epochs.csv and the logger, its checkpoint and (test_on=best) its weights."""
        cfg, run = self.cfg, self.run_record
        if self.val_loader is not None:
            stats.val_accuracy, _, stats.val_loss = validate_epoch(
                self.backend, self.model, self.val_loader, progress_bar=show_progress(cfg),
                reduce=reducer())
        if self.scheduler is not None:
            self.scheduler.step()
            self.backend.on_epoch_end(self.optimizer)
        run.epochs.append(stats)
        if distributed.is_writer():
            outputs.write_epochs_csv(os.path.join(self.output_dir, outputs.EPOCHS_FILE),
                                     [e.as_row() for e in run.epochs])
        self.logger.log_epoch(stats)
        log.info("Epoch %d/%d: loss %.4f, accuracy %s, %.0f images/s, lr %g%s", epoch,
                 cfg.trainer.epochs, stats.train_loss,
                 "n/a" if stats.train_accuracy is None else f"{stats.train_accuracy:.2f}%",
                 stats.train_images_per_second, stats.lr,
                 "" if stats.val_accuracy is None else
                 f"; validation loss {stats.val_loss:.4f}, accuracy {stats.val_accuracy:.2f}%")
        if cfg.trainer.checkpoint:
            self.save_checkpoint(epoch, None, metric=getattr(stats, self.checkpointer.monitor))
        self.keep_best_weights(stats)

    def log_early_stop(self, epoch):
        run = self.run_record
        run.stopped_early = True
        best = best_epoch(run.epochs, run.monitor, run.mode)
        log.info("Early stopping after epoch %d: %s has not improved since epoch %d "
                 "(trainer.early_stopping.patience=%s; best %.4f at epoch %d)", epoch,
                 run.monitor, epochs_since(run), self.cfg.trainer.early_stopping.patience,
                 getattr(best, run.monitor), best.epoch)

    def save_checkpoint(self, epochs_done, progress, metric=None):
        """Rank 0 writes the checkpoint (data-parallel: with every rank's RNG state and, inside
        an epoch, every rank's running sums, gathered here from all of them)."""
        self.backend.sync_to_host(self.model)
        loader_state = progress_state = None
        if self.backend.resumes_inside_epoch:
            loader: ResumableLoader = self.train_loader
            loader_state = loader.state_dict(inside_pass=progress is not None)
            progress_state = None if progress is None else progress.state_dict()
        world = distributed.WORLD
        extra = {}
        if world.active:
            ranks = distributed.gather({"rng": rng_state(), "progress": progress_state})
            extra = {"world_size": world.world_size, "ranks": ranks}
        if not distributed.is_writer():
            return
        self.checkpointer.save(dict(
            model_file(self.cfg, self.model, self.num_classes, self.data),
            optimizer=self.optimizer.state_dict(),
            scheduler=None if self.scheduler is None else self.scheduler.state_dict(),
            rng=rng_state(), loader=loader_state, epoch=epochs_done,
            progress=progress_state, epochs=[vars(e) for e in self.run_record.epochs],
            device=self.run_record.device, **extra), metric=metric)

    def keep_best_weights(self, stats):
        """trainer.test_on=best: a host copy of the weights of the best epoch so far (best.pt
        holds them too, but only with trainer.checkpoint=true and only on rank 0's disk)."""
        run = self.run_record
        if self.cfg.trainer.get("test_on", "best") != "best" \
                or best_epoch(run.epochs, run.monitor, run.mode) is not stats:
            return
        if not self.cfg.trainer.checkpoint:
            self.backend.sync_to_host(self.model)  # (save_checkpoint has just done it otherwise)
        self.best_weights = (stats.epoch, {k: v.detach().cpu().clone()
                                           for k, v in self.model.state_dict().items()})

    # ------------------------------------------------------------------ test and finish

    def test(self):
        """The test set, scored with the weights trainer.test_on names."""
        self.stop.set_phase("immediate", "during evaluation, after training had finished")
        self.backend.finish_training(self.model)
        # Into the host model: every backend's inference step reads it (an IPU inference
        # model copies the host's weights to its device when it attaches, as after each
        # validation).
        self.load_tested_weights()
        infer = self.backend.inference_step(self.model)
        run = self.run_record
        run.test_accuracy, run.test_samples, run.test_loss, run.test_confusion = \
            self.score_test_set(infer)

    def score_test_set(self, infer):
        """Test accuracy, images, loss and confusion matrix; the matrix only once the pass is
        whole (a stopped evaluation records none)."""
        confusion = ConfusionMatrix(self.data.train.classes)
        accuracy, samples, loss = evaluate(infer, self.test_loader,
                                           progress_bar=show_progress(self.cfg),
                                           reduce=reducer(), confusion=confusion)
        return accuracy, samples, loss, confusion

    def finish(self):
        """The finished run's outputs: model.pt, metrics.json, the logger's last word."""
        self.stop.set_phase("finishing", "while writing the finished run's outputs")
        send_test_signal("accuracy")
        run = self.run_record
        report_test_accuracy(run, self.backend)
        write_test_evaluation(run)
        if self.cfg.trainer.save_model and distributed.is_writer():
            outputs.save_torch_atomic(os.path.join(self.output_dir, outputs.MODEL_FILE),
                                      model_file(self.cfg, self.model, self.num_classes,
                                                 self.data))
        run.status = "completed"
        run.write_metrics()
        metrics = run.metrics()
        self.logger.finish(metrics)
        return metrics

    def load_tested_weights(self):
        """Put the weights trainer.test_on names into the model and record which they are:
        the best epoch's by the monitor (from memory, or best.pt for an epoch before a
        resume), or the last epoch's."""
        cfg, run = self.cfg, self.run_record
        last = run.epochs[-1] if run.epochs else None
        run.test_checkpoint, run.test_epoch = "last", None if last is None else last.epoch
        if cfg.trainer.get("test_on", "best") != "best" or last is None:
            return
        best = best_epoch(run.epochs, run.monitor, run.mode)
        if best is None:
            log.info("trainer.test_on=best: no epoch has a %s; testing the last epoch's weights",
                     run.monitor)
            return
        if best is not last:
            weights = self.best_weights_of(best.epoch)
            if weights is None:
                log.warning("trainer.test_on=best: the weights of epoch %d (best %s) are neither "
                            "in memory nor in %s; testing the last epoch's (%d)", best.epoch,
                            run.monitor, self.checkpointer.best_path, last.epoch)
                return
            self.model.load_state_dict(weights)
        run.test_checkpoint, run.test_epoch = "best", best.epoch
        log.info("Testing the weights of epoch %d, the best by %s (%s %.4f; trainer.test_on=best)",
                 best.epoch, run.monitor, run.mode, getattr(best, run.monitor))

    def best_weights_of(self, epoch):
        """The state dict of ``epoch`` kept by :meth:`keep_best_weights`, else best.pt's if it
        holds that epoch (a resumed run's best epoch came before the resume), else None."""
        kept = self.best_weights
        if kept is not None and kept[0] == epoch:
            return kept[1]
        path = self.checkpointer.best_path
        if not os.path.isfile(path):
            return None
        state = load_checkpoint(path)
        if state.get("epoch") != epoch or not self.checkpointer.follows(state):
            return None
        return state["state_dict"]

    def evaluate_only(self):
        """train=false: evaluate a saved model (ckpt_path: model.pt, a checkpoint or a run dir)."""
        cfg, run, saved = self.cfg, self.run_record, self.evaluated
        state = saved.state
        check_identity(state, cfg, self.num_classes, saved.path)
        self.model.load_state_dict(state["state_dict"])
        # No training loader (nor its worker).
        _, self.test_loader = self.backend.make_loaders(self.data, train=False)
        infer = self.backend.inference_step(self.model)
        self.stop.set_phase("immediate", "during evaluation")
        run.test_accuracy, run.test_samples, run.test_loss, run.test_confusion = \
            self.score_test_set(infer)
        self.stop.set_phase("finishing", "while writing the evaluation's outputs")
        send_test_signal("accuracy")
        if "epoch" in state:  # a checkpoint: how far its training had got
            run.epochs = [EpochStats(**e) for e in state.get("epochs", [])]
            # metrics.json's best_epoch / val_* describe that training (not re-validated here).
            run.monitor = state.get("monitor") or monitor_for(cfg)
            run.mode = state.get("mode") or mode_for(cfg, run.monitor)
            if state.get("progress") is None:  # not saved inside an epoch: that epoch's weights
                run.test_epoch = state["epoch"]
            if run.monitor == "val_accuracy" and self.data.val is not None:
                run.val_samples = len(self.data.val)
        log.info("Evaluated %s", saved.path)
        report_test_accuracy(run, self.backend)
        write_test_evaluation(run)
        run.status = "evaluated"
        run.checkpoint = os.path.abspath(saved.path)
        run.write_metrics()
        return run.metrics()

    # ------------------------------------------------------------------ endings

    def interrupted(self, epoch, steps, whole_epochs=False):
        """A stop during training, after its checkpoint: recorded, and the
        :class:`RunInterrupted` to raise. ``whole_epochs``: the checkpoint is the last whole
        epoch's (a loader that cannot resume inside an epoch), if any."""
        run, stop = self.run_record, self.stop
        run.status = "interrupted"
        name = signal.Signals(stop.signal).name if stop.signal else "a stop request"
        last = os.path.join(run.output_dir, CHECKPOINT_DIR, LAST)
        if not whole_epochs:
            then = f"checkpoint in {last}; continue with: {resume_hint(run.output_dir, run.cfg)}"
        elif os.path.exists(last):
            then = (f"device=ipu checkpoints whole epochs only: checkpoint of epoch {epoch - 1} in "
                    f"{last}, epoch {epoch} starts again; continue with: "
                    f"{resume_hint(run.output_dir, run.cfg)}")
        else:
            then = ("device=ipu checkpoints whole epochs only and none has ended: start the run "
                    "again")
        run.error = f"interrupted by {name} at epoch {epoch}, step {steps}; {then}"
        run.write_metrics()
        # Data-parallel: no rank ends before rank 0 has written the checkpoint and this
        # record. A launcher stops the rest of the group when one rank exits (torchrun: SIGTERM,
        # then SIGKILL after its grace period), which would land in rank 0's writing.
        distributed.max_over_ranks(0)
        return RunInterrupted(run.error, 128 + (stop.signal or signal.SIGINT))

    def stopped_now(self, exc: StopNow):
        """The status and the one line for a :class:`StopNow`: where it stopped and how to go
        on from what is on disk."""
        run = self.run_record
        last = os.path.join(run.output_dir, CHECKPOINT_DIR, LAST)
        if os.path.exists(last):
            then = (f"checkpoint {last} is intact; continue with: "
                    f"{resume_hint(run.output_dir, run.cfg)}")
        else:
            then = "no checkpoint was written yet: start the run again"
        run.status = "interrupted"
        run.error = f"{exc}; {then}"
        return run.error

    def ending_of(self, exc: BaseException):
        """The :class:`Ending` of a run that raised ``exc``, recorded in metrics.json where this
        attempt owns the record."""
        run = self.run_record
        if isinstance(exc, OSError) and exc.filename and exc.strerror:
            # The file system refused (a file where a folder should be, permissions, ...).
            exc = UserError(f"{exc.strerror.lower()}: {exc.filename}")
        if not isinstance(exc, (UserError, StopNow)):
            return self.ending_of_a_bug(exc)
        if isinstance(exc, (StopNow, RunInterrupted)):
            if isinstance(exc, StopNow):
                self.stopped_now(exc)
                self.write_record_if_owned()
            else:
                run.error = str(exc)  # its checkpoint and metrics are written
            return Ending(Outcome.INTERRUPTED, message=run.error, exit_code=exc.exit_code)
        outcome = Outcome.DIVERGED if isinstance(exc, Diverged) else Outcome.FAILED
        run.status, run.error = outcome.value, str(exc)
        if not isinstance(exc, RunDirBusy):
            self.write_record_if_owned()
        log_to_files(logging.ERROR, run.error)
        return Ending(outcome, message=run.error, exit_code=USER_ERROR_EXIT)

    def ending_of_a_bug(self, exc):
        """A programming error: a single run keeps its traceback (the CLI raises it again);
        a sweep's job records it, its traceback in the job's log, and the sweep goes on."""
        if not self.sweep_job:
            return Ending(Outcome.FAILED, bug=exc, exit_code=1)
        run = self.run_record
        run.status, run.error = Outcome.FAILED.value, f"{type(exc).__name__}: {exc}"
        self.write_record_if_owned()
        log.error("job failed", exc_info=exc)  # the traceback goes to this job's log
        return Ending(Outcome.FAILED, message=run.error, exit_code=USER_ERROR_EXIT)

    def not_started(self, signum):
        """A sweep job due after the sweep was interrupted: recorded, not run."""
        run = self.run_record
        run.status = "interrupted"
        run.error = (f"not started: the sweep was interrupted by {signal.Signals(signum).name}; "
                     "run the sweep again with resume=true to continue it")
        self.write_record_if_owned()
        return Ending(Outcome.INTERRUPTED, message=run.error, exit_code=128 + signum)

    def write_record_if_owned(self):
        if self.owns_record():
            try:
                self.run_record.write_metrics()
            except (OSError, UserError):
                pass  # the output dir itself may be what is wrong

    def owns_record(self):
        """May a failed run write metrics.json? Not a resume or an evaluation that failed
        before it got going in a dir that already holds a run's record."""
        if distributed.launched_rank() != 0:
            return False  # data-parallel: rank 0 writes the record
        cfg = self.command_cfg
        attempt = bool(cfg.resume) or not cfg.train
        return (not attempt or self.run_record.resumed
                or not os.path.exists(os.path.join(self.output_dir, outputs.METRICS_FILE)))


def log_to_files(level, message):
    """Record a message in the run's log file only (the console gets the one error line)."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def adopt_attempt_files(output_dir, attempt_subdir):
    """A run dir without its own .hydra/ files (a new run dir, or a sweep job that never ran
    before a resume) takes the attempt's (Hydra's ``output_subdir``) as its record."""
    if not attempt_subdir or not str(attempt_subdir).startswith(".hydra/attempts/"):
        return
    record = os.path.join(output_dir, ".hydra")
    if os.path.exists(os.path.join(record, "config.yaml")):
        return
    attempt = os.path.join(output_dir, str(attempt_subdir))
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        if os.path.isfile(os.path.join(attempt, name)):
            shutil.copyfile(os.path.join(attempt, name), os.path.join(record, name))


def record_effective_config(output_dir, cfg):
    """The run's record after a resume or an evaluation: the config it ran with (a resume:
    its own, with the changes a resume may make, e.g. more epochs; an evaluation: the model
    and data set its checkpoint named)."""
    path = os.path.join(output_dir, ".hydra", "config.yaml")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        outputs.write_text_atomic(path, OmegaConf.to_yaml(cfg))
    except (OSError, UserError):  # write_text_atomic reports a failed write as OutputError
        pass


def reducer():
    """How a rank's sums become the run's (data-parallel: summed over ranks), or None."""
    return distributed.all_reduce_sum if distributed.WORLD.active else None


def check_ranks(cfg, data):
    """Data-parallel: every rank needs samples in every step and in every evaluation."""
    world = distributed.WORLD.world_size
    if world == 1:
        return
    t = cfg.trainer
    n = len(data.train)
    tail = n % (t.batch_size * world)
    if cfg.train and not t.drop_last and 0 < tail < world:
        raise UserError(f"{world} ranks: the last training batch has {tail} images, fewer than "
                        "the ranks that share it; set trainer.drop_last=true or change "
                        "trainer.batch_size")
    for name, part in (("test", data.test), ("validation", data.val)):
        if part is not None and len(part) < world:
            raise UserError(f"{world} ranks: the {name} set has {len(part)} images, fewer than "
                            "the ranks that share it; run with fewer ranks")


def check_batches(cfg, train_images):
    """A training set smaller than one batch yields no batch when the last one is dropped."""
    t = cfg.trainer
    world = distributed.WORLD.world_size
    if cfg.train and t.drop_last and train_images < t.batch_size * world:
        if world > 1:
            raise UserError(f"trainer.batch_size={t.batch_size} per rank x {world} ranks is "
                            f"larger than the training set ({train_images} images) and "
                            "trainer.drop_last=true drops every batch; lower trainer.batch_size "
                            "or run with fewer ranks")
        held = cfg.dataset.get("val_size", 0) or 0
        after = f" after dataset.val_size={held} held out" if held else ""
        raise UserError(f"trainer.batch_size={t.batch_size} is larger than the training set "
                        f"({train_images} images{after}) and trainer.drop_last=true drops every "
                        "batch; lower trainer.batch_size"
                        + (" or dataset.val_size" if held else "")
                        + " or set trainer.drop_last=false")


def stops_early(cfg, run):
    """Whether early stopping ends training after ``run.epochs``: the monitor has not
    improved by more than ``min_delta`` for ``patience`` epochs (trainer.early_stopping)."""
    es = OmegaConf.select(cfg, "trainer.early_stopping", default=None) or {}
    patience = es.get("patience")
    if patience is None or run.monitor != monitor_for(cfg):
        return False  # off, or no validation numbers to stop on (ipu.synthetic_data)
    return should_stop_early(run.epochs, run.monitor, patience, run.mode,
                             float(es.get("min_delta", 0.0) or 0.0))


def epochs_since(run):
    """The epoch of the last improvement early stopping counted (by min_delta)."""
    es = run.cfg.trainer.early_stopping
    return run.epochs[-1].epoch - epochs_without_improvement(
        run.epochs, run.monitor, run.mode, float(es.get("min_delta", 0.0) or 0.0))


def model_file(cfg, model, num_classes, data=None):
    """What model.pt holds, and what every checkpoint starts with: the model's identity (which
    check_identity compares), its weights on the host, the run's config and, given the run's
    ``data``, what reusing the model needs (:func:`~octconv_exp.training.checkpoint.inference_record`)."""
    record = {} if data is None else {INFERENCE: inference_record(cfg, data)}
    return dict(identity(cfg, num_classes),
                state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
                config=OmegaConf.to_container(cfg, resolve=True), **record)


def saved_data_settings(saved):
    """load_data's arguments for a run that continues or evaluates the checkpoint ``saved``
    (a :class:`SavedState`, or None for a new run): the normalisation and classes the model was
    trained with. A checkpoint from before they were recorded: recomputed, with a warning."""
    if saved is None:
        return {}
    path, state = saved.path, saved.state
    settings = saved_preprocessing(state)
    if settings is None:
        log.warning("%s records no normalisation statistics (written by an older octconv-exp): "
                    "recomputing them from the training images as they are now; if these "
                    "changed since, the results differ from the run's", path)
        return {}
    log.info("Normalisation from %s: mean %s, std %s", path,
             ", ".join(f"{m:.4f}" for m in settings["stats"][0]),
             ", ".join(f"{v:.4f}" for v in settings["stats"][1]))
    return settings


def check_not_a_training_record(output_dir):
    """train=false writes an evaluation's metrics.json: never over a training run's record."""
    path = os.path.join(output_dir, outputs.METRICS_FILE)
    try:
        with open(path) as f:
            status = json.load(f).get("status")
    except (OSError, ValueError, AttributeError):
        return
    if status != "evaluated":
        raise UserError(f"train=false: {output_dir} holds a training run's record "
                        f"(metrics.json status {status}), which an evaluation would replace; "
                        "evaluate into another dir (leave hydra.run.dir out), or re-evaluate "
                        f"that run in place with: {resume_hint(output_dir)}")


def find_resume_checkpoint(cfg, output_dir, fresh_if_no_checkpoint=False):
    """resume=true: the last checkpoint (ckpt_path, else this run dir's) as a
    :class:`ResumePoint`, or None when a sweep job that never ran may start afresh."""
    where = cfg.ckpt_path if cfg.ckpt_path is not None else output_dir
    try:
        path = resolve_checkpoint(where)
    except UserError:
        if fresh_if_no_checkpoint and cfg.ckpt_path is None:
            log.info("resume=true: no checkpoint in %s yet: starting this job afresh", where)
            return None
        raise UserError(f"resume=true: no checkpoint in {os.path.abspath(where)} (looked for "
                        f"{os.path.join(os.path.abspath(where), 'checkpoints', 'last.pt')}); "
                        "start without resume=true, or point ckpt_path at a run dir") from None
    state = load_checkpoint(path)
    if "epoch" not in state:
        raise UserError(f"resume=true: {path} is a final model, not a training checkpoint; "
                        "evaluate it with train=false ckpt_path=...")
    return ResumePoint(path, state)


def check_resume_device(saved, device, path):
    """An IPU optimizer state lives on the IPU and only loads onto one (poptorch 3.4
    python/optim.py, set_state_dict: "Only IPU optimizer states can be loaded onto the IPU");
    a torch optimizer cannot read PopTorch's. CPU <-> CUDA states convert as torch does."""
    if saved is None or (saved == "ipu") == (device == "ipu"):
        return
    raise UserError(
        f"resume=true: checkpoint {path} was trained on device={saved} and this run is on "
        f"device={device}; their optimizer states do not convert. Resume it with "
        f"device={saved}, or evaluate its weights here with train=false ckpt_path={path}")


def state_of_this_rank(state, path):
    """A data-parallel checkpoint holds every rank's RNG state and running sums: this rank's
    replace rank 0's. One taken inside an epoch resumes only with the ranks that took it (the
    rest of the epoch is split by rank); at an epoch's end any number of ranks may go on."""
    saved = int(state.get("world_size", 1))
    world = distributed.WORLD
    inside = state.get("progress") is not None
    if saved != world.world_size:
        if inside:
            raise UserError(f"resume=true: checkpoint {path} was written inside an epoch by "
                            f"{saved} rank(s) and this run has {world.world_size}; resume it "
                            f"with {saved} (torchrun --nproc_per_node={saved} ...)")
        log.warning("resume=true: checkpoint %s was written by %d rank(s), this run has %d: "
                    "the global batch changes from here on", path, saved, world.world_size)
        return state
    if world.active and state.get("ranks"):
        mine = state["ranks"][world.rank]
        state = dict(state, rng=mine["rng"], progress=mine["progress"])
    return state


def write_test_evaluation(run):
    """The test set's confusion matrix and per-class accuracies beside metrics.json (rank 0)."""
    if run.test_confusion is None or not distributed.is_writer():
        return
    top5 = run.test_confusion.top_k_accuracy()
    log.info("Test loss %.4f%s; confusion matrix and per-class accuracy in %s", run.test_loss,
             "" if top5 is None else f", top-5 accuracy {top5:.2f}%",
             ", ".join(os.path.basename(p)
                       for p in write_evaluation_files(run.test_confusion, run.output_dir,
                                                       confusion_formats(run.cfg))))


def report_test_accuracy(run, backend):
    if backend.synthetic_data:
        # The inference model computed on synthetic data too: the number means nothing.
        run.test_accuracy = run.test_loss = run.test_confusion = None
        log.info("Synthetic data on the device (ipu.synthetic_data=true): throughput only, "
                 "no accuracy (%d test images run)", run.test_samples)
    else:
        log.info("Accuracy on test set: %.2f%% (%d images)", run.test_accuracy, run.test_samples)
