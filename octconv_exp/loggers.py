"""Per-run loggers beyond the always-on CSV/JSON files (``logger`` config group)."""
import os

from .errors import UserError


class NullLogger:
    def log_epoch(self, stats):
        pass

    def finish(self, metrics):
        pass


class TensorBoardLogger:
    """Per-epoch scalars and, at the end, the run's hyper-parameters with its final metrics
    (``SummaryWriter.add_hparams``), so ``tensorboard --logdir SWEEP_DIR`` compares runs."""

    def __init__(self, log_dir, hparams):
        try:
            from torch.utils.tensorboard import SummaryWriter
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
        final = {f"final/{k}": metrics[k] for k in ("test_accuracy", "train_loss",
                                                     "train_images_per_second", "val_accuracy")
                 if isinstance(metrics.get(k), (int, float))
                 and not isinstance(metrics.get(k), bool)}
        if metrics.get("test_accuracy") is not None:
            self.writer.add_scalar("test_accuracy", metrics["test_accuracy"],
                                   metrics.get("epochs_completed") or 0)
        self.writer.add_hparams(self.hparams, final, run_name="hparams")
        self.writer.close()


def make_logger(cfg, output_dir):
    if cfg.logger.name != "tensorboard":
        return NullLogger()
    hparams = {"conv": cfg.conv.mode, "alpha": float(cfg.alpha), "expansion": int(cfg.expansion),
               "optimizer": str(cfg.optimizer.name), "lr": float(cfg.optimizer.lr),
               "scheduler": str(cfg.scheduler.name), "seed": int(cfg.seed),
               "dataset": str(cfg.dataset.name), "batch_size": int(cfg.trainer.batch_size),
               "epochs": int(cfg.trainer.epochs),
               "val_size": float(cfg.dataset.get("val_size", 0) or 0),
               "augment": bool(cfg.dataset.get("augment", False))}
    return TensorBoardLogger(os.path.join(output_dir, cfg.logger.log_dir), hparams)
