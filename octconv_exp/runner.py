"""One run: validate the config, build data/model/backend, train, evaluate, write outputs."""
import logging
import os
import random
import signal
import threading
import time

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from . import outputs
from .backends import make_backend, resolve_device
from .config import validate
from .data import load_data
from .loggers import make_logger
from .checkpoint import (CHECKPOINT_DIR, LAST, Checkpointer, check_identity, identity, rng_state,
                         set_rng_state)
from .checkpoint import load as load_checkpoint
from .checkpoint import resolve_path as resolve_checkpoint
from .errors import RunInterrupted, UserError
from .loop import EpochProgress, EpochStats, Interrupted, evaluate, train_epoch
from .model import build_model, count_flops_per_image, count_parameters, theoretical_flops_ratio

log = logging.getLogger("octconv_exp")


def build_scheduler(sched_cfg, optimizer):
    """The configured learning-rate schedule (stepped once per epoch), or None."""
    if sched_cfg.name == "none":
        return None
    node = OmegaConf.to_container(sched_cfg, resolve=True)
    node.pop("name")
    return instantiate(node, optimizer=optimizer)


FLOPS_KEYS = ("flops_per_image", "flops_ratio", "flops_ratio_theoretical")


def flops_summary(cfg, num_classes):
    """Counted FLOPs per image, their ratio to the vanilla model of the same expansion, and
    the ratio the channel split would give in theory. Counted on CPU models built for the
    purpose, so every backend reports the same numbers."""
    model = build_model(cfg, num_classes=num_classes)
    flops = count_flops_per_image(model)
    vanilla_cfg = OmegaConf.merge(cfg, {"conv": {"mode": "vanilla"}})
    vanilla = count_flops_per_image(build_model(vanilla_cfg, num_classes=num_classes))
    return {"flops_per_image": flops, "flops_ratio": flops / vanilla,
            "flops_ratio_theoretical": theoretical_flops_ratio(cfg.conv.mode, float(cfg.alpha),
                                                               int(cfg.expansion), num_classes)}


def set_threads(threads):
    """torch's intra-op thread count (None: leave torch's default)."""
    if threads is not None:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
        self.torch_threads = None
        self.checkpoint = None

    def metrics(self):
        cfg = self.cfg
        last = self.epochs[-1] if self.epochs else None
        train_images = sum(e.train_images for e in self.epochs)
        train_seconds = sum(e.train_seconds for e in self.epochs)
        m = {
            "status": self.status,
            "conv": cfg.conv.mode,
            "alpha": cfg.alpha,
            "expansion": cfg.expansion,
            "optimizer": cfg.optimizer.get("name"),
            "lr": cfg.optimizer.get("lr"),
            "scheduler": cfg.scheduler.get("name"),
            "dataset": cfg.dataset.name,
            "device": self.device,
            "seed": cfg.seed,
            "epochs": cfg.trainer.epochs,
            "epochs_completed": len(self.epochs),
            "batch_size": cfg.trainer.batch_size,
            "train_loss": last.train_loss if last else None,
            "train_accuracy": last.train_accuracy if last else None,
            "test_accuracy": self.test_accuracy,
            "test_samples": self.test_samples,
            "params": self.params,
            **(self.flops or dict.fromkeys(FLOPS_KEYS)),
            "train_images_per_second": (train_images / train_seconds) if train_seconds else None,
            "train_seconds": train_seconds,
            "wall_seconds": time.time() - self.started,
            "started_at": self.started,
            "finished_at": time.time(),
            "pid": os.getpid(),
            "torch_threads": self.torch_threads,
            "versions": outputs.package_versions(),
        }
        if self.checkpoint is not None:
            m["checkpoint"] = self.checkpoint
        if self.error is not None:
            m["error"] = self.error
        return m

    def write_metrics(self):
        outputs.write_json_atomic(os.path.join(self.output_dir, outputs.METRICS_FILE),
                                  self.metrics())


def set_deterministic(enabled):
    """torch's deterministic algorithms (CUDA too: cuDNN and cuBLAS), or the fast defaults."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(bool(enabled))
    torch.backends.cudnn.deterministic = bool(enabled)
    if enabled:
        torch.backends.cudnn.benchmark = False


def run_experiment(cfg: DictConfig, output_dir, run=None, threads=None, fresh_if_no_checkpoint=False):
    """Train and evaluate the configured model (or only evaluate one, ``train=false``);
    returns the metrics dict.

    ``run`` (a :class:`Run`) lets the caller report how far a failed run got; ``threads``
    sets torch's thread count (the launcher's share of the cores in a parallel sweep);
    ``fresh_if_no_checkpoint`` lets resume=true start a job that never ran (resuming a sweep).
    """
    validate(cfg)
    run = run or Run(cfg, output_dir)
    os.makedirs(output_dir, exist_ok=True)
    run.torch_threads = set_threads(threads)
    device = resolve_device(cfg.device, ipus_needed=int(cfg.ipu.replicas))
    run.device = device
    seed_everything(cfg.seed)
    set_deterministic(cfg.deterministic)
    backend = make_backend(cfg, device)
    try:
        return _run(cfg, output_dir, run, backend, device, fresh_if_no_checkpoint)
    except getattr(backend, "device_errors", ()) as exc:
        # The device refused (no IPUs to attach, a failed compilation): one line, not a trace.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"device={device}: PopTorch failed: {first}") from exc
    finally:
        backend.close()


def _run(cfg, output_dir, run, backend, device, fresh_if_no_checkpoint):
    """The run itself, on a backend that :func:`run_experiment` closes however it ends."""
    if cfg.profile_dir is not None:
        model = backend.build_model(num_classes=10)
        optimizer = backend.build_optimizer(model)
        written = backend.profile(model, optimizer, cfg.profile_dir)
        log.info("Profile of one training iteration on %s written to %s", device,
                 ", ".join(written))
        run.status = "profiled"
        return run.metrics()

    t0 = time.perf_counter()
    data = load_data(cfg.dataset)
    log.info("Data: %s, %d training and %d test images, %d classes (%.2fs)",
             cfg.dataset.name, len(data.train), len(data.test), data.num_classes,
             time.perf_counter() - t0)
    model = backend.build_model(num_classes=data.num_classes)
    run.params = count_parameters(model)
    run.flops = flops_summary(cfg, data.num_classes)
    log.info("Model: conv=%s alpha=%s expansion=%d, %d parameters, %.2f MFLOPs per image "
             "(%.3f of vanilla; %.3f in theory); device %s, %d threads", cfg.conv.mode,
             cfg.alpha, cfg.expansion, run.params, run.flops["flops_per_image"] / 1e6,
             run.flops["flops_ratio"], run.flops["flops_ratio_theoretical"], device,
             run.torch_threads)
    if not cfg.train:
        return evaluate_only(cfg, run, backend, model, data)

    optimizer = backend.build_optimizer(model)
    resume_from = None
    if cfg.resume:
        resume_from = find_resume_checkpoint(cfg, output_dir, device, fresh_if_no_checkpoint)
        if resume_from is not None and hasattr(backend, "start_at_epoch"):
            # The IPU loader's order is fixed when its worker starts: tell it first.
            backend.start_at_epoch(resume_from[1]["epoch"] + 1)
    train_loader, test_loader = backend.make_loaders(data)
    scheduler = build_scheduler(cfg.scheduler, optimizer)
    checkpointer = Checkpointer(output_dir, monitor="train_loss")
    start = None
    if resume_from is not None:
        start = restore(cfg, output_dir, run, model, optimizer, scheduler, train_loader,
                        checkpointer, data.num_classes, resume_from)
    logger = make_logger(cfg, output_dir)
    step = backend.training_step(model, optimizer)
    with StopRequest() as stop:
        train(cfg, run, backend, model, optimizer, scheduler, step, train_loader, logger,
              checkpointer, stop, data.num_classes, start)
        backend.finish_training(model)
        infer = backend.inference_step(model)
        run.test_accuracy, run.test_samples = evaluate(infer, test_loader,
                                                       progress_bar=cfg.trainer.progress_bar)
    report_test_accuracy(run, backend)
    if cfg.trainer.save_model:
        outputs.save_torch_atomic(os.path.join(output_dir, outputs.MODEL_FILE),
                                  model_file(cfg, model, data.num_classes))
    run.status = "completed"
    run.write_metrics()
    metrics = run.metrics()
    logger.finish(metrics)
    return metrics


def train(cfg, run, backend, model, optimizer, scheduler, step, loader, logger, checkpointer,
          stop, num_classes, start):
    """The epochs (from where a checkpoint left off), with a checkpoint after each."""
    epochs_csv = os.path.join(run.output_dir, outputs.EPOCHS_FILE)
    first_epoch, progress = (start or (1, None))
    for epoch in range(first_epoch, cfg.trainer.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        try:
            stats = train_epoch(step, loader, epoch, cfg.trainer.epochs,
                                progress_bar=cfg.trainer.progress_bar, resume=progress,
                                should_stop=stop)
        except Interrupted as exc:
            save_checkpoint(cfg, run, backend, model, optimizer, scheduler, loader, checkpointer,
                            num_classes, epoch - 1, exc.progress)
            raise run_interrupted(run, stop, epoch, exc.progress.steps) from None
        progress = None
        stats.lr = lr
        if scheduler is not None:
            scheduler.step()
            backend.on_epoch_end(optimizer)
        run.epochs.append(stats)
        outputs.write_epochs_csv(epochs_csv, [e.as_row() for e in run.epochs])
        logger.log_epoch(stats)
        log.info("Epoch %d/%d: loss %.4f, accuracy %s, %.0f images/s, lr %g", epoch,
                 cfg.trainer.epochs, stats.train_loss,
                 "n/a" if stats.train_accuracy is None else f"{stats.train_accuracy:.2f}%",
                 stats.train_images_per_second, lr)
        if cfg.trainer.checkpoint:
            save_checkpoint(cfg, run, backend, model, optimizer, scheduler, loader, checkpointer,
                            num_classes, epoch, None, metric=stats.train_loss)
        if stop() and epoch < cfg.trainer.epochs:
            raise run_interrupted(run, stop, epoch + 1, 0)


def model_file(cfg, model, num_classes):
    """What model.pt holds, and what every checkpoint starts with: the model's identity (which
    check_identity compares), its weights on the host, and the run's config."""
    return dict(identity(cfg, num_classes),
                state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
                config=OmegaConf.to_container(cfg, resolve=True))


def save_checkpoint(cfg, run, backend, model, optimizer, scheduler, loader, checkpointer,
                    num_classes, epochs_done, progress, metric=None):
    backend.sync_to_host(model)
    loader_state = (loader.state_dict(inside_pass=progress is not None)
                    if hasattr(loader, "resume_pass") else None)
    checkpointer.save(dict(
        model_file(cfg, model, num_classes),
        optimizer=optimizer.state_dict(),
        scheduler=None if scheduler is None else scheduler.state_dict(),
        rng=rng_state(), loader=loader_state, epoch=epochs_done,
        progress=None if progress is None or loader_state is None else progress.state_dict(),
        epochs=[vars(e) for e in run.epochs], device=run.device), metric=metric)


def find_resume_checkpoint(cfg, output_dir, device, fresh_if_no_checkpoint=False):
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
    check_resume_device(state.get("device"), device, path)
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


def restore(cfg, output_dir, run, model, optimizer, scheduler, loader, checkpointer, num_classes,
            resume_from):
    """Apply a checkpoint found by :func:`find_resume_checkpoint`; returns the epoch to
    continue with and how far into it the checkpoint got."""
    path, state = resume_from
    check_identity(state, cfg, num_classes, path)
    model.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    run.epochs = [EpochStats(**e) for e in state["epochs"]]
    if run.epochs:
        outputs.write_epochs_csv(os.path.join(output_dir, outputs.EPOCHS_FILE),
                                 [e.as_row() for e in run.epochs])
    checkpointer.best = state.get("best")
    set_rng_state(state["rng"])
    progress = None
    loader_state = state.get("loader")
    if loader_state is not None and hasattr(loader, "resume_pass"):
        progress_state = state.get("progress")
        skip = progress_state["steps"] if progress_state else 0
        loader.resume_pass(loader_state["generator"], skip)
        if progress_state:
            progress = EpochProgress.from_state_dict(progress_state, device=loader.device)
    log.info("Resuming from %s: %d epoch(s) done%s", path, state["epoch"],
             f", {progress.steps} step(s) into epoch {state['epoch'] + 1}" if progress else "")
    return state["epoch"] + 1, progress


def report_test_accuracy(run, backend):
    if getattr(backend, "synthetic_data", False):
        # The inference model computed on synthetic data too: the number means nothing.
        run.test_accuracy = None
        log.info("Synthetic data on the device (ipu.synthetic_data=true): throughput only, "
                 "no accuracy (%d test images run)", run.test_samples)
    else:
        log.info("Accuracy on test set: %.2f%% (%d images)", run.test_accuracy, run.test_samples)


def evaluate_only(cfg, run, backend, model, data):
    """train=false: evaluate a saved model (ckpt_path: model.pt, a checkpoint or a run dir)."""
    path = resolve_checkpoint(cfg.ckpt_path, prefer_final=True)
    state = load_checkpoint(path)
    check_identity(state, cfg, data.num_classes, path)
    model.load_state_dict(state["state_dict"])
    _, test_loader = backend.make_loaders(data, train=False)  # no training loader or worker
    infer = backend.inference_step(model)
    run.test_accuracy, run.test_samples = evaluate(infer, test_loader,
                                                   progress_bar=cfg.trainer.progress_bar)
    log.info("Evaluated %s", path)
    report_test_accuracy(run, backend)
    run.status = "evaluated"
    run.checkpoint = os.path.abspath(path)
    run.write_metrics()
    return run.metrics()


def run_interrupted(run, stop, epoch, steps):
    run.status = "interrupted"
    name = signal.Signals(stop.signal).name if stop.signal else "a stop request"
    run.error = (f"interrupted by {name} at epoch {epoch}, step {steps}; checkpoint in "
                 f"{os.path.join(run.output_dir, CHECKPOINT_DIR, LAST)}; continue with resume=true "
                 f"hydra.run.dir={run.output_dir}")
    run.write_metrics()
    return RunInterrupted(run.error, 128 + (stop.signal or signal.SIGINT))


class StopRequest:
    """SIGINT/SIGTERM during training: the first asks the loop to stop after the current step
    (checkpoint, metrics, exit); a second one stops at once."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __call__(self):
        return self.signal is not None

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("%s received: stopping after the current step (again to stop at once)",
                    signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
