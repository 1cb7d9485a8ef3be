"""What a backend refuses in a config, checked by the config validation before a run and by
the backend itself once ``device=auto`` has resolved to it (the validation cannot know then)."""
from ..errors import ConfigError

def ipus_needed(cfg):
    """The IPUs a run needs: one per replica (the model is not pipelined over several)."""
    return int(cfg.ipu.replicas)


#: Optimizers PopTorch has and torch does not.
IPU_ONLY_OPTIMIZERS = ("lamb",)


def check_optimizer_for_device(name):
    """For CPU/GPU runs (also device=auto once it resolved to one): no IPU-only optimizer."""
    if name in IPU_ONLY_OPTIMIZERS:
        raise ConfigError("optimizer", name, "is only available on IPUs (poptorch.optim); use "
                          "device=ipu or choose sgd, adam, adamw or rmsprop")


def check_ipu_profiling(cfg):
    """For IPU runs (also device=auto once it resolved to one): profiling needs a fresh
    compilation, which a cached executable skips."""
    if cfg.profile_dir is not None and cfg.ipu.cache_dir is not None:
        raise ConfigError("profile_dir", cfg.profile_dir,
                          "cannot be combined with ipu.cache_dir (profiling needs a fresh "
                          "compilation); unset one of them")


def check_ipu_training(cfg):
    """For IPU runs (also device=auto once it resolved to one): what a compiled IPU training
    model cannot do."""
    if not cfg.trainer.drop_last:
        # PopTorch >= 3.2 re-batches an Async loader with drop_last=False and hands out a
        # smaller last batch (poptorch 3.4 python/__init__.py, DataLoader.__init__ /
        # __len__), which a training executable compiled for the combined batch cannot take.
        raise ConfigError("trainer.drop_last", "false",
                          "a compiled IPU training model takes whole combined batches only "
                          "(trainer.batch_size x ipu.device_iterations x ipu.replicas x "
                          "ipu.gradient_accumulation); use trainer.drop_last=true on device=ipu")
