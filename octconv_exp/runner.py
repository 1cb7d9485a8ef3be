"""One run: validate the config, build data/model/backend, train, evaluate, write outputs."""
import logging
import os
import random
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
from .loop import evaluate, train_epoch
from .model import build_model, count_flops_per_image, count_parameters, theoretical_flops_ratio

log = logging.getLogger("octconv_exp")


def build_scheduler(sched_cfg, optimizer):
    """The configured learning-rate schedule (stepped once per epoch), or None."""
    if sched_cfg.name == "none":
        return None
    node = OmegaConf.to_container(sched_cfg, resolve=True)
    node.pop("name")
    return instantiate(node, optimizer=optimizer)


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
            "flops_per_image": self.flops.get("flops_per_image") if self.flops else None,
            "flops_ratio": self.flops.get("flops_ratio") if self.flops else None,
            "flops_ratio_theoretical": self.flops.get("flops_ratio_theoretical") if self.flops else None,
            "train_images_per_second": (train_images / train_seconds) if train_seconds else None,
            "train_seconds": train_seconds,
            "wall_seconds": time.time() - self.started,
            "started_at": self.started,
            "finished_at": time.time(),
            "pid": os.getpid(),
            "torch_threads": self.torch_threads,
            "versions": outputs.package_versions(),
        }
        if self.error is not None:
            m["error"] = self.error
        return m

    def write_metrics(self):
        outputs.write_json_atomic(os.path.join(self.output_dir, outputs.METRICS_FILE),
                                  self.metrics())


def run_experiment(cfg: DictConfig, output_dir, run=None, threads=None):
    """Train and evaluate the configured model; returns the metrics dict.

    ``run`` (a :class:`Run`) lets the caller report how far a failed run got; ``threads``
    sets torch's thread count (the launcher's share of the cores in a parallel sweep).
    """
    validate(cfg)
    run = run or Run(cfg, output_dir)
    os.makedirs(output_dir, exist_ok=True)
    run.torch_threads = set_threads(threads)
    device = resolve_device(cfg.device)
    run.device = device
    seed_everything(cfg.seed)
    backend = make_backend(cfg, device)
    try:
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
        optimizer = backend.build_optimizer(model)
        train_loader, test_loader = backend.make_loaders(data)
        log.info("Model: conv=%s alpha=%s expansion=%d, %d parameters, %.2f MFLOPs per image "
                 "(%.3f of vanilla; %.3f in theory); device %s, %d threads", cfg.conv.mode,
                 cfg.alpha, cfg.expansion, run.params, run.flops["flops_per_image"] / 1e6,
                 run.flops["flops_ratio"], run.flops["flops_ratio_theoretical"], device,
                 run.torch_threads)

        scheduler = build_scheduler(cfg.scheduler, optimizer)
        logger = make_logger(cfg, output_dir)
        step = backend.training_step(model, optimizer)
        epochs_csv = os.path.join(output_dir, outputs.EPOCHS_FILE)
        for epoch in range(1, cfg.trainer.epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            stats = train_epoch(step, train_loader, epoch, cfg.trainer.epochs,
                                progress_bar=cfg.trainer.progress_bar)
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
        backend.finish_training(model)

        infer = backend.inference_step(model)
        run.test_accuracy, run.test_samples = evaluate(infer, test_loader,
                                                       progress_bar=cfg.trainer.progress_bar)
        log.info("Accuracy on test set: %.2f%% (%d images)", run.test_accuracy, run.test_samples)
        if cfg.trainer.save_model:
            outputs.save_torch_atomic(os.path.join(output_dir, outputs.MODEL_FILE), {
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "conv": cfg.conv.mode, "alpha": cfg.alpha, "expansion": cfg.expansion,
                "num_classes": data.num_classes,
                "config": OmegaConf.to_container(cfg, resolve=True),
            })
        run.status = "completed"
        run.write_metrics()
        metrics = run.metrics()
        logger.finish(metrics)
        return metrics
    finally:
        backend.close()
