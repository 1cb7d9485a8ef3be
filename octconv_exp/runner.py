"""One run: validate the config, build data/model/backend, train, evaluate, write outputs."""
import json
import logging
import os
import random
import signal
import time

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from . import distributed, outputs
from .backends import ipus_needed, make_backend, resolve_device
from .backends.threads import resolve_threads, thread_record
from .config import validate
from .data import load_data
from .data import derived_seed
from .loggers import NullLogger, make_logger
from .checkpoint import (CHECKPOINT_DIR, INFERENCE, LAST, Checkpointer, check_identity,
                         identity, inference_record, mode_for, monitor_for, rng_state,
                         saved_preprocessing, set_rng_state)
from .checkpoint import load as load_checkpoint
from .checkpoint import resolve_path as resolve_checkpoint
from .errors import RunInterrupted, UserError
from .stopping import StopNow, StopRequest  # noqa: F401  (re-exported)
from .resume import config_for_evaluation, config_for_resume, resume_hint
from .targets import check_saved_targets
from .records import provenance
from .loop import (EpochProgress, EpochStats, Interrupted, best_epoch, epochs_without_improvement,
                   evaluate, send_test_signal, should_stop_early, train_epoch,
                   validate as validate_epoch)
from .model import (build_model, check_input_size, count_flops_per_image, count_parameters,
                    model_name, theoretical_ratio)

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
    import datetime

    return datetime.datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def show_progress(cfg):
    """tqdm bars only on a terminal: piped and redirected logs stay free of bar frames."""
    import sys

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
        m = {
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
            "train_loss": last.train_loss if last else None,
            "train_accuracy": last.train_accuracy if last else None,
            "test_accuracy": self.test_accuracy,
            "test_samples": self.test_samples,
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
            "pid": os.getpid(),
            "torch_threads": self.torch_threads,
            # the thread counts, the OpenMP/MKL environment and why (backends/threads.py)
            "threads": self.threads,
            # speed.compile (CPU/GPU): whether the training steps ran torch.compile'd, and why
            "compiled": getattr(self.backend, "compile", None),
            "compile_decision": getattr(self.backend, "compile_reason", None),
            # speed.malloc (CPU/GPU backends): whether glibc's malloc keeps freed memory
            "malloc": getattr(self.backend, "malloc_decision", None),
            "versions": outputs.package_versions(),
            # The octconv-exp checkout's git commit and dirty flag (None outside a checkout)
            "code_version": provenance.code_version(),
        }
        if self.checkpoint is not None:
            m["checkpoint"] = self.checkpoint
        if self.error is not None:
            m["error"] = self.error
        return m

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


class Session:
    """The parts of one run, built once and read from one place by every step below."""

    def __init__(self, cfg, run, backend, device):
        self.cfg, self.run, self.backend, self.device = cfg, run, backend, device
        self.output_dir = run.output_dir
        self.data = self.model = self.optimizer = self.scheduler = None
        self.train_loader = self.test_loader = None
        self.checkpointer = self.logger = self.stop = self.step = None
        self.best_weights = None  # (epoch, host state dict): trainer.test_on=best

    @property
    def num_classes(self):
        return self.data.num_classes


def run_experiment(cfg: DictConfig, output_dir, run=None, threads=None, fresh_if_no_checkpoint=False,
                   explicit=None, stop=None, gpu_claim=None):
    """Train and evaluate the configured model (or only evaluate one, ``train=false``);
    returns the metrics dict.

    ``run`` (a :class:`Run`) lets the caller report how far a failed run got; ``threads``
    sets torch's thread count (the launcher's share of the cores in a parallel sweep);
    ``fresh_if_no_checkpoint`` lets resume=true start a job that never ran (resuming a sweep);
    ``explicit`` lists the keys the command line set: resume and evaluation take the config
    saved with the checkpoint, and only these may differ from it (see :mod:`.resume`);
    ``stop`` is the caller's entered :class:`StopRequest` (run.py holds one from start-up to
    the last output written), else this call installs its own; ``gpu_claim`` (a
    :class:`~octconv_exp.distributed.GpuClaim`): a parallel sweep's job takes a GPU of its own.
    """
    if stop is None:
        with StopRequest() as own:
            return run_experiment(cfg, output_dir, run, threads, fresh_if_no_checkpoint,
                                  explicit, stop=own, gpu_claim=gpu_claim)
    validate(cfg)
    run = run or Run(cfg, output_dir)
    resume_from = evaluate_from = None  # (path, state) of the checkpoint, read once
    if cfg.resume:
        resume_from = find_resume_checkpoint(cfg, output_dir, fresh_if_no_checkpoint)
        if resume_from is not None:
            command_cfg = cfg
            cfg = config_for_resume(cfg, resume_from[1], explicit or [], resume_from[0])
            check_saved_targets(cfg, command_cfg, resume_from[1], explicit or [],
                                resume_from[0], "resume=true")
    elif not cfg.train:
        check_not_a_training_record(output_dir)
        path = resolve_checkpoint(cfg.ckpt_path, prefer_final=True)
        evaluate_from = (path, load_checkpoint(path))
        command_cfg = cfg
        cfg = config_for_evaluation(cfg, evaluate_from[1], explicit or [])
        check_saved_targets(cfg, command_cfg, evaluate_from[1], explicit or [], path,
                            "train=false")
    run.cfg = cfg
    os.makedirs(output_dir, exist_ok=True)
    threads, why = resolve_threads(cfg.get("threads"), threads)
    run.torch_threads = set_threads(threads)
    run.threads = thread_record(why)
    device = resolve_device(cfg.device, ipus_needed=ipus_needed(cfg))
    if device == "ipu" and cfg.trainer.get("sync_batchnorm", False):
        raise UserError("trainer.sync_batchnorm=true: not on IPUs (each replica normalises "
                        "its own micro-batch); set trainer.sync_batchnorm=false for device=ipu")
    try:
        device = distributed.setup(cfg, device)  # torchrun/submitit ranks: join the group
    except RuntimeError as exc:  # the group could not form (a rank missing, a timeout)
        distributed.teardown()
        raise distributed.peer_failure(exc) from exc
    if device == "cuda" and gpu_claim is not None:  # one GPU per job of a parallel sweep
        device = gpu_claim.acquire(torch.cuda.device_count())
        if device != "cuda":
            torch.cuda.set_device(torch.device(device))
            log.info("Parallel sweep: job %d runs on GPU %s", gpu_claim.job_num, device)
    run.device = device
    if resume_from is not None:
        check_resume_device(resume_from[1].get("device"), device, resume_from[0])
    seed_everything(cfg.seed)
    set_deterministic(cfg.deterministic)
    backend = make_backend(cfg, device)
    run.backend = backend
    session = Session(cfg, run, backend, device)
    session.stop = stop
    try:
        return _run(session, resume_from, evaluate_from)
    except (RuntimeError, ValueError) as exc:
        if distributed.WORLD.active and distributed.is_collective_failure(exc):
            raise distributed.peer_failure(exc) from exc
        raise
    except getattr(backend, "device_errors", ()) as exc:
        # The device refused (no IPUs to attach, a failed compilation): one line, not a trace.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"device={device}: PopTorch failed: {first}") from exc
    finally:
        if session.logger is not None:
            session.logger.close(run.status)  # a run that ended early: its tracker says so
        backend.close()
        distributed.teardown()
        if gpu_claim is not None:
            gpu_claim.release()


def _run(s, resume_from, evaluate_from):
    """The run itself, on a backend that :func:`run_experiment` closes however it ends."""
    cfg, run, backend = s.cfg, s.run, s.backend
    if cfg.profile_dir is not None:
        # The profiled batch has the data's image size and classes (the model is built for them).
        s.data = load_data(cfg.dataset)
        model = backend.build_model(num_classes=s.num_classes)
        try:
            check_input_size(model, s.data.image_shape)
        except ValueError as exc:
            raise UserError(f"model={model_name(cfg)} {exc}") from None
        optimizer = backend.build_optimizer(model)
        written = backend.profile(model, optimizer, cfg.profile_dir, s.data.image_shape,
                                  s.num_classes)
        log.info("Profile of one training iteration on %s written to %s", s.device,
                 ", ".join(written))
        run.status = "profiled"
        run.write_metrics()
        return run.metrics()

    t0 = time.perf_counter()
    s.data = load_data(cfg.dataset, **saved_data_settings(resume_from or evaluate_from))
    log.info("Data: %s, %d training and %d test images, %d classes (%.2fs)",
             cfg.dataset.name, len(s.data.train), len(s.data.test), s.num_classes,
             time.perf_counter() - t0)
    if s.data.streamed and s.device == "ipu":
        raise UserError("dataset.in_memory: device=ipu reads an image folder in memory (the "
                        "streamed loader is CPU/GPU only); set dataset.in_memory=true, or "
                        "dataset.image_size smaller so that it fits")
    check_batches(cfg, len(s.data.train))
    check_ranks(cfg, s.data)
    image_shape = s.data.image_shape
    run.image_size = list(image_shape[1:])
    s.model = backend.build_model(num_classes=s.num_classes)
    try:
        check_input_size(s.model, image_shape)
    except ValueError as exc:
        raise UserError(f"model={model_name(cfg)} {exc}") from None
    run.params = count_parameters(s.model)
    world = distributed.WORLD
    if world.active:
        if cfg.trainer.get("sync_batchnorm", False):
            s.model = distributed.convert_sync_batchnorm(s.model, s.device)
        # The weights are the same on every rank (same seed; DDP also broadcasts rank 0's);
        # what is random in training (dropout) differs per rank, as in separate processes.
        torch.manual_seed(derived_seed("rank", cfg.seed, world.rank))
        log.info("Data-parallel: rank %d of %d (%s, %s), batch %d per rank, %d in all%s",
                 world.rank, world.world_size, world.launcher, world.backend,
                 cfg.trainer.batch_size, cfg.trainer.batch_size * world.world_size,
                 ", synchronised BatchNorm" if cfg.trainer.get("sync_batchnorm", False) else "")
    run.flops = flops_summary(cfg, s.num_classes, image_shape)
    theory = run.flops["flops_ratio_theoretical"]
    log.info("Model: %s conv=%s%s, %d parameters, %.2f MFLOPs per %dx%d image "
             "(%.3f of vanilla; %s in theory); device %s, %d threads", model_name(cfg),
             cfg.conv.mode, "" if cfg.conv.mode == "vanilla" else f" alpha={cfg.alpha}",  # vanilla ignores it
             run.params, run.flops["flops_per_image"] / 1e6,
             image_shape[1], image_shape[2], run.flops["flops_ratio"],
             "n/a" if theory is None else f"{theory:.3f}", s.device, run.torch_threads)
    send_test_signal("start-up")
    if not cfg.train:
        return evaluate_only(s, evaluate_from)

    s.optimizer = backend.build_optimizer(s.model)
    if resume_from is not None and hasattr(backend, "start_at_epoch"):
        # The IPU loader's order is fixed when its worker starts: tell it first.
        backend.start_at_epoch(resume_from[1]["epoch"] + 1)
    s.train_loader, s.test_loader = backend.make_loaders(s.data)
    s.val_loader = None
    if s.data.val is not None and getattr(backend, "synthetic_data", False):
        log.info("ipu.synthetic_data=true: no validation (the device computes on its own data)")
    elif s.data.val is not None:
        s.val_loader = backend.make_val_loader(s.data)
        run.val_samples = len(s.data.val)
        log.info("Validation: %d images held out of the training set (dataset.seed=%s), "
                 "evaluated after every epoch", run.val_samples, cfg.dataset.get("seed"))
    # best.pt, metrics.json's best_epoch, early stopping and test_on=best follow one monitor.
    run.monitor = monitor_for(cfg)
    if run.monitor.startswith("val_") and s.val_loader is None:
        run.monitor = "train_loss"  # ipu.synthetic_data: no validation numbers
    run.mode = mode_for(cfg, run.monitor)
    s.scheduler = build_scheduler(cfg.scheduler, s.optimizer)
    s.checkpointer = Checkpointer(s.output_dir, monitor=run.monitor, mode=run.mode)
    start = restore(s, resume_from) if resume_from is not None else None
    s.logger = (make_logger(cfg, s.output_dir, device=s.device) if distributed.is_writer()
                else NullLogger())
    s.step = backend.training_step(s.model, s.optimizer)
    done = start[1].steps if start and start[1] else 0  # of a resumed epoch
    if hasattr(backend, "plan"):  # the steps still to take, for speed.compile=auto
        backend.plan(len(s.train_loader) * (cfg.trainer.epochs - (start[0] if start else 1) + 1)
                     - done)
    s.stop.set_phase("polled", "during training")
    steps = len(s.train_loader) + done
    augmented = ", batches augmented (4-pixel pad, random crop, horizontal flip)"
    log.info("Training: epochs %d-%d, %d steps each%s", start[0] if start else 1,
             cfg.trainer.epochs, steps, augmented if cfg.dataset.get("augment", False) else "")
    train(s, start)
    s.stop.set_phase("immediate", "during evaluation, after training had finished")
    backend.finish_training(s.model)
    # Into the host model: every backend's inference step reads it (an IPU inference model
    # copies the host's weights to its device when it attaches, as after each validation).
    load_tested_weights(s)
    infer = backend.inference_step(s.model)
    run.test_accuracy, run.test_samples, _ = evaluate(infer, s.test_loader,
                                                      progress_bar=show_progress(cfg),
                                                      reduce=reducer())
    s.stop.set_phase("finishing", "while writing the finished run's outputs")
    send_test_signal("accuracy")
    report_test_accuracy(run, backend)
    if cfg.trainer.save_model and distributed.is_writer():
        outputs.save_torch_atomic(os.path.join(s.output_dir, outputs.MODEL_FILE),
                                  model_file(cfg, s.model, s.num_classes, s.data))
    run.status = "completed"
    run.write_metrics()
    metrics = run.metrics()
    s.logger.finish(metrics)
    return metrics


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


def keep_best_weights(s, stats):
    """trainer.test_on=best: a host copy of the weights of the best epoch so far (best.pt
    holds them too, but only with trainer.checkpoint=true and only on rank 0's disk)."""
    run = s.run
    if s.cfg.trainer.get("test_on", "best") != "best" \
            or best_epoch(run.epochs, run.monitor, run.mode) is not stats:
        return
    if not s.cfg.trainer.checkpoint:
        s.backend.sync_to_host(s.model)  # (save_checkpoint has just done it otherwise)
    s.best_weights = (stats.epoch, {k: v.detach().cpu().clone()
                                    for k, v in s.model.state_dict().items()})


def load_tested_weights(s):
    """Put the weights trainer.test_on names into ``s.model`` and record which they are: the
    best epoch's by the monitor (from memory, or best.pt for an epoch before a resume), or
    the last epoch's."""
    cfg, run = s.cfg, s.run
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
        weights = best_weights_of(s, best.epoch)
        if weights is None:
            log.warning("trainer.test_on=best: the weights of epoch %d (best %s) are neither "
                        "in memory nor in %s; testing the last epoch's (%d)", best.epoch,
                        run.monitor, s.checkpointer.best_path, last.epoch)
            return
        s.model.load_state_dict(weights)
    run.test_checkpoint, run.test_epoch = "best", best.epoch
    log.info("Testing the weights of epoch %d, the best by %s (%s %.4f; trainer.test_on=best)",
             best.epoch, run.monitor, run.mode, getattr(best, run.monitor))


def best_weights_of(s, epoch):
    """The state dict of ``epoch`` kept by :func:`keep_best_weights`, else best.pt's if it
    holds that epoch (a resumed run's best epoch came before the resume), else None."""
    kept = getattr(s, "best_weights", None)
    if kept is not None and kept[0] == epoch:
        return kept[1]
    path = s.checkpointer.best_path
    if not os.path.isfile(path):
        return None
    state = load_checkpoint(path)
    if state.get("epoch") != epoch or not s.checkpointer.follows(state):
        return None
    return state["state_dict"]


def train(s, start):
    """The epochs (from where a checkpoint left off), each followed by the validation pass
    (with a validation split) and a checkpoint; early stopping ends them when the monitor has
    not improved for ``trainer.early_stopping.patience`` epochs."""
    cfg, run = s.cfg, s.run
    epochs_csv = os.path.join(run.output_dir, outputs.EPOCHS_FILE)
    first_epoch, progress = (start or (1, None))
    if progress is None and run.epochs and first_epoch <= cfg.trainer.epochs \
            and stops_early(cfg, run):
        run.stopped_early = True  # a resumed run that had stopped early stays stopped
        log.info("Early stopping: %s has not improved since epoch %d", run.monitor,
                 epochs_since(run))
        return
    if distributed.WORLD.active:  # every rank stops at the step any of them was asked to
        def should_stop():
            signum = distributed.max_over_ranks(s.stop.signal or 0)
            if signum and s.stop.signal is None:
                s.stop.signal = signum  # another rank's signal: this one stops as it does
            return bool(signum)
    else:
        should_stop = s.stop
    for epoch in range(first_epoch, cfg.trainer.epochs + 1):
        lr = s.optimizer.param_groups[0]["lr"]
        try:
            stats = train_epoch(s.step, s.train_loader, epoch, cfg.trainer.epochs,
                                progress_bar=show_progress(cfg), resume=progress,
                                should_stop=should_stop, reduce=reducer())
        except Interrupted as exc:
            if not hasattr(s.train_loader, "resume_pass"):
                # PopTorch's loader cannot start a pass part-way: a checkpoint here would call
                # the steps already trained "epoch - 1 done" and train them again on resume.
                # The last whole epoch's checkpoint stays, and the epoch is redone from it.
                raise run_interrupted(run, s.stop, epoch, exc.progress.steps,
                                      whole_epochs=True) from None
            save_checkpoint(s, epoch - 1, exc.progress)
            raise run_interrupted(run, s.stop, epoch, exc.progress.steps) from None
        progress = None
        stats.lr = lr
        if s.val_loader is not None:
            stats.val_accuracy, _, stats.val_loss = validate_epoch(
                s.backend, s.model, s.val_loader, progress_bar=show_progress(cfg),
                reduce=reducer())
        if s.scheduler is not None:
            s.scheduler.step()
            s.backend.on_epoch_end(s.optimizer)
        run.epochs.append(stats)
        if distributed.is_writer():
            outputs.write_epochs_csv(epochs_csv, [e.as_row() for e in run.epochs])
        s.logger.log_epoch(stats)
        log.info("Epoch %d/%d: loss %.4f, accuracy %s, %.0f images/s, lr %g%s", epoch,
                 cfg.trainer.epochs, stats.train_loss,
                 "n/a" if stats.train_accuracy is None else f"{stats.train_accuracy:.2f}%",
                 stats.train_images_per_second, lr,
                 "" if stats.val_accuracy is None else
                 f"; validation loss {stats.val_loss:.4f}, accuracy {stats.val_accuracy:.2f}%")
        if cfg.trainer.checkpoint:
            save_checkpoint(s, epoch, None, metric=getattr(stats, s.checkpointer.monitor))
        keep_best_weights(s, stats)
        if epoch < cfg.trainer.epochs and stops_early(cfg, run):
            run.stopped_early = True
            best = best_epoch(run.epochs, run.monitor, run.mode)
            log.info("Early stopping after epoch %d: %s has not improved since epoch %d "
                     "(trainer.early_stopping.patience=%s; best %.4f at epoch %d)", epoch,
                     run.monitor, epochs_since(run), cfg.trainer.early_stopping.patience,
                     getattr(best, run.monitor), best.epoch)
            break
        if should_stop() and epoch < cfg.trainer.epochs:
            raise run_interrupted(run, s.stop, epoch + 1, 0)


def epochs_since(run):
    """The epoch of the last improvement early stopping counted (by min_delta)."""
    es = run.cfg.trainer.early_stopping
    return run.epochs[-1].epoch - epochs_without_improvement(
        run.epochs, run.monitor, run.mode, float(es.get("min_delta", 0.0) or 0.0))


def model_file(cfg, model, num_classes, data=None):
    """What model.pt holds, and what every checkpoint starts with: the model's identity (which
    check_identity compares), its weights on the host, the run's config and, given the run's
    ``data``, what reusing the model needs (:func:`~octconv_exp.checkpoint.inference_record`)."""
    record = {} if data is None else {INFERENCE: inference_record(cfg, data)}
    return dict(identity(cfg, num_classes),
                state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
                config=OmegaConf.to_container(cfg, resolve=True), **record)


def saved_data_settings(saved):
    """load_data's arguments for a run that continues or evaluates the checkpoint ``saved``
    (``(path, state)``, or None for a new run): the normalisation and classes the model was
    trained with. A checkpoint from before they were recorded: recomputed, with a warning."""
    if saved is None:
        return {}
    path, state = saved
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


def save_checkpoint(s, epochs_done, progress, metric=None):
    """Rank 0 writes the checkpoint (data-parallel: with every rank's RNG state and, inside an
    epoch, every rank's running sums, gathered here from all of them)."""
    s.backend.sync_to_host(s.model)
    loader = s.train_loader
    loader_state = (loader.state_dict(inside_pass=progress is not None)
                    if hasattr(loader, "resume_pass") else None)
    progress_state = None if progress is None or loader_state is None else progress.state_dict()
    world = distributed.WORLD
    extra = {}
    if world.active:
        ranks = distributed.gather({"rng": rng_state(), "progress": progress_state})
        extra = {"world_size": world.world_size, "ranks": ranks}
    if not distributed.is_writer():
        return
    s.checkpointer.save(dict(
        model_file(s.cfg, s.model, s.num_classes, s.data),
        optimizer=s.optimizer.state_dict(),
        scheduler=None if s.scheduler is None else s.scheduler.state_dict(),
        rng=rng_state(), loader=loader_state, epoch=epochs_done,
        progress=progress_state,
        epochs=[vars(e) for e in s.run.epochs], device=s.run.device, **extra), metric=metric)


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
    """resume=true: the last checkpoint (ckpt_path, else this run dir's) as ``(path, state)``,
    or None when a sweep job that never ran may start afresh."""
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
    return path, state


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


def restore(s, resume_from):
    """Apply a checkpoint found by :func:`find_resume_checkpoint`; returns the epoch to
    continue with and how far into it the checkpoint got."""
    path, state = resume_from
    check_identity(state, s.cfg, s.num_classes, path)
    s.model.load_state_dict(state["state_dict"])
    s.optimizer.load_state_dict(state["optimizer"])
    if s.scheduler is not None and state.get("scheduler") is not None:
        s.scheduler.load_state_dict(state["scheduler"])
    run = s.run
    state = state_of_this_rank(state, path)
    run.epochs = [EpochStats(**e) for e in state["epochs"]]
    if os.path.abspath(path).startswith(os.path.join(os.path.abspath(s.output_dir), "")):
        # This run dir's own checkpoint: its metrics.json records the same run's attempts.
        run.earlier = earlier_record(s.output_dir)
    run.epochs_restored = len(run.epochs)
    if run.epochs and distributed.is_writer():
        outputs.write_epochs_csv(os.path.join(s.output_dir, outputs.EPOCHS_FILE),
                                 [e.as_row() for e in run.epochs])
    # The best so far, if it is of what this run's best.pt follows.
    if s.checkpointer.follows(state):
        s.checkpointer.best = state.get("best")
    set_rng_state(state["rng"])
    progress = None
    loader = s.train_loader
    loader_state = state.get("loader")
    if loader_state is not None and hasattr(loader, "resume_pass"):
        progress_state = state.get("progress")
        skip = progress_state["steps"] if progress_state else 0
        # The pass numbered as the epoch it is: its augmentation depends on it.
        loader.resume_pass(loader_state["generator"], skip, epoch=state["epoch"] + 1)
        if progress_state:
            progress = EpochProgress.from_state_dict(progress_state, device=loader.device)
    run.resumed = True
    log.info("Resuming from %s: %d epoch(s) done%s", path, state["epoch"],
             f", {progress.steps} step(s) into epoch {state['epoch'] + 1}" if progress else "")
    return state["epoch"] + 1, progress


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


def report_test_accuracy(run, backend):
    if getattr(backend, "synthetic_data", False):
        # The inference model computed on synthetic data too: the number means nothing.
        run.test_accuracy = None
        log.info("Synthetic data on the device (ipu.synthetic_data=true): throughput only, "
                 "no accuracy (%d test images run)", run.test_samples)
    else:
        log.info("Accuracy on test set: %.2f%% (%d images)", run.test_accuracy, run.test_samples)


def evaluate_only(s, evaluate_from):
    """train=false: evaluate a saved model (ckpt_path: model.pt, a checkpoint or a run dir),
    read by :func:`run_experiment` as ``(path, state)``."""
    cfg, run = s.cfg, s.run
    path, state = evaluate_from
    check_identity(state, cfg, s.num_classes, path)
    s.model.load_state_dict(state["state_dict"])
    _, s.test_loader = s.backend.make_loaders(s.data, train=False)  # no training loader/worker
    infer = s.backend.inference_step(s.model)
    s.stop.set_phase("immediate", "during evaluation")
    run.test_accuracy, run.test_samples, _ = evaluate(infer, s.test_loader,
                                                      progress_bar=show_progress(cfg),
                                                      reduce=reducer())
    s.stop.set_phase("finishing", "while writing the evaluation's outputs")
    send_test_signal("accuracy")
    if "epoch" in state:  # a checkpoint: how far its training had got
        run.epochs = [EpochStats(**e) for e in state.get("epochs", [])]
        # metrics.json's best_epoch / val_* describe that training (not re-validated here).
        run.monitor = state.get("monitor") or monitor_for(cfg)
        run.mode = state.get("mode") or mode_for(cfg, run.monitor)
        if state.get("progress") is None:  # not saved inside an epoch: that epoch's weights
            run.test_epoch = state["epoch"]
        if run.monitor == "val_accuracy" and s.data.val is not None:
            run.val_samples = len(s.data.val)
    log.info("Evaluated %s", path)
    report_test_accuracy(run, s.backend)
    run.status = "evaluated"
    run.checkpoint = os.path.abspath(path)
    run.write_metrics()
    return run.metrics()


def run_interrupted(run, stop, epoch, steps, whole_epochs=False):
    """``whole_epochs``: the checkpoint is the last whole epoch's (device=ipu), if any."""
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
    return RunInterrupted(run.error, 128 + (stop.signal or signal.SIGINT))


def stopped_now(run, exc):
    """The status and the one line for a :class:`StopNow`: where it stopped and how to go on
    from what is on disk."""
    last = os.path.join(run.output_dir, CHECKPOINT_DIR, LAST)
    if os.path.exists(last):
        then = (f"checkpoint {last} is intact; continue with: "
                f"{resume_hint(run.output_dir, run.cfg)}")
    else:
        then = "no checkpoint was written yet: start the run again"
    run.status = "interrupted"
    run.error = f"{exc}; {then}"
    return run.error
