"""The config schema: what every key means, its type, and the values it accepts.

Types are enforced by Hydra/OmegaConf when the config is composed (the dataclasses below are
registered in the ConfigStore as ``octconv_exp_schema`` and the primary config extends it);
ranges and cross-key rules are enforced by :func:`validate`, which raises a
:class:`~octconv_exp.errors.ConfigError` naming the key, the value and what is accepted.

The values themselves live in ``conf/``: the dataclass defaults below only matter for keys a
YAML file does not set, and every YAML file sets the keys it is about.
"""
import contextlib
import dataclasses
import difflib
import importlib
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ..backends.allocator import decide
from ..backends.checks import check_ipu_profiling, check_ipu_training, check_optimizer_for_device
from ..errors import ConfigError
from ..models.spec import OCTAVE_BRANCHES, split_high_low
from ..records.loggers import LOGGERS, selected
from ..records.objectives import OBJECTIVES
from . import resolvers
from .keys import not_read

CONV_MODES = ("vanilla", "octave", "multi-octave")
DEVICES = ("auto", "cpu", "cuda", "ipu")
DATASETS = ("cifar10", "synthetic", "image_folder")
MODELS = ("seed_cnn", "resnet_cifar", "resnet_imagenet")
# optimizer name -> torch.optim class the YAML's _target_ must point at (native backend).
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "lamb")
SCHEDULERS = ("none", "cosine", "step", "multistep")
MULTI_CONV_PLAN_TYPES = ("parallel", "serial")
PARTIALS_TYPES = ("float", "half")
OUTPUT_MODES = ("default", "final", "all", "sum")
#: The sweep report's figure formats (report.format), and the default: a PNG to look at,
#: a PDF for the paper.
REPORT_FORMATS = ("png", "pdf", "svg")
DEFAULT_REPORT_FORMATS = ("png", "pdf")
DEFAULT_REPORT_DPI = 200
#: Each run's confusion-matrix figure (report.confusion_format): a PNG (at
#: evaluation.CONFUSION_DPI).
DEFAULT_CONFUSION_FORMATS = ("png",)
REPORT_DPI_RANGE = (50, 1200)



@dataclass
class MultiConvConfig:
    """Options of ``poptorch.MultiConv`` (IPU only; ignored by the CPU/GPU backend)."""

    plan_type: str = "parallel"
    # Per-convolution options take one value for every convolution, or one per octave branch
    # in execution order [h2h, h2l, l2l, l2h]; each MultiConv group (one per octave layer)
    # gets the entries of the branches it has (the first layer has no low input, the last no
    # low output).
    available_memory_proportions: Optional[List[float]] = None  # each in [0, 1)
    partials_types: Optional[List[str]] = None  # "float" or "half"
    per_conv_reserved_tiles: Optional[int] = None
    cycle_back_off: Optional[float] = None


@dataclass
class ConvConfig:
    mode: str = MISSING
    multi_conv: MultiConvConfig = field(default_factory=MultiConvConfig)


@dataclass
class DatasetConfig:
    """What every data set takes; each option in conf/dataset/ extends it with its own keys
    (its schema below), so ``--cfg job`` shows only the keys that apply."""

    name: str = MISSING
    # Seeds the validation split (and the synthetic generator): the same seed, the same images.
    seed: int = 0
    # Training images held out for validation: a count (>= 1) or a fraction in [0, 1).
    val_size: Union[int, float] = 0
    # CIFAR augmentation (4-pixel pad + random 32x32 crop, horizontal flip) of training batches.
    augment: bool = False
    # Per-channel normalisation of images scaled to [0, 1]; null: computed from the training set.
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None


@dataclass
class Cifar10Config(DatasetConfig):
    root: str = "data"  # the folder holding cifar-10-batches-py/ (the seed's --data-dir)
    download: bool = True
    # Verify the files' MD5 sums (off only for hand-made CIFAR-format files).
    verify_checksums: bool = True


@dataclass
class SyntheticConfig(DatasetConfig):
    train_size: int = 10000
    test_size: int = 2000


@dataclass
class ImageFolderConfig(DatasetConfig):
    # The folder holding train/<class>/* and test/<class>/*; ??? (MISSING): required.
    root: str = MISSING
    # Images are resized to image_size x image_size (32: CIFAR-sized).
    image_size: int = 32
    # true: decoded into memory; false: streamed from disk by DataLoader workers; auto:
    # streamed when the decoded images would exceed max_memory_gb.
    in_memory: str = "auto"
    max_memory_gb: float = 4.0
    # DataLoader worker processes decoding a streamed folder (0: in the training process).
    workers: int = 2
    # A streamed folder's normalisation statistics come from this many training images.
    stats_images: int = 10000


#: The schema of each data set option (conf/dataset/<name>.yaml names it in its defaults).
DATASET_SCHEMAS = {"cifar10": Cifar10Config, "synthetic": SyntheticConfig,
                   "image_folder": ImageFolderConfig}


@dataclass
class EarlyStoppingConfig:
    # Stop when `monitor` has not improved by more than `min_delta` for this many epochs (an
    # integer >= 1); null: train every epoch.
    patience: Optional[int] = None
    # What early stopping, best.pt and the tested "best" weights follow: val_accuracy,
    # val_loss (both need dataset.val_size > 0) or train_loss; null: val_accuracy with a
    # validation split, else train_loss.
    monitor: Optional[str] = None
    # max | min; null: max for an accuracy, min for a loss.
    mode: Optional[str] = None
    # The smallest change of `monitor` that counts as an improvement for early stopping (>= 0).
    min_delta: float = 0.0


@dataclass
class TrainerConfig:
    epochs: int = MISSING
    batch_size: int = MISSING
    test_batch_size: int = MISSING
    # Drop the last, smaller training batch (the seed did; keeps BatchNorm statistics sane).
    drop_last: bool = True
    progress_bar: bool = True
    # Write the trained weights (model.pt) into the run dir.
    save_model: bool = True
    # Write checkpoints/last.pt after every epoch, and best.pt for the best epoch (by
    # trainer.early_stopping.monitor: validation accuracy with dataset.val_size > 0, else
    # training loss, unless set).
    checkpoint: bool = True
    # Label smoothing of the cross-entropy loss (0: none, the seed's loss).
    label_smoothing: float = 0.0
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # The weights the test set scores: best (the best epoch by early_stopping.monitor) or last.
    test_on: str = "best"
    # Data-parallel runs (torchrun, submitit tasks): BatchNorm over the global batch.
    sync_batchnorm: bool = False


@dataclass
class DistributedConfig:
    """Data-parallel runs (torchrun, submitit tasks): octconv_exp/backends/distributed.py."""

    # auto (gloo on CPU, nccl on CUDA) | gloo | nccl
    backend: str = "auto"
    # How long a collective waits for the other ranks before the run fails (a rank that died).
    timeout_s: float = 300.0


@dataclass
class SpeedConfig:
    """CPU/GPU speed settings (the IPU backend ignores them)."""

    # true | false | auto (true on CPU, where it was measured faster for every conv mode)
    channels_last: str = "auto"
    # true | false | auto (on where measured to repay its compilation over the run's steps;
    # off on torch < 2.1, with deterministic=true, and where compiled steps measured no faster:
    # octconv_exp/backends/native.py COMPILE_MEASURED)
    compile: str = "auto"
    # true | false | auto (true on CPU where malloc is glibc's: freed memory stays mapped, so a
    # step's tensors do not page-fault; octconv_exp/backends/allocator.py)
    malloc: str = "auto"
    autocast_bf16: bool = False  # CUDA: bf16 autocast for the forward pass
    cudnn_benchmark: bool = False  # CUDA: let cuDNN pick the fastest algorithms


@dataclass
class IpuConfig:
    """``poptorch.Options`` (consumed by the IPU backend; composed and validated everywhere)."""

    device_iterations: int = 50
    replicas: int = 1
    gradient_accumulation: int = 1
    cache_dir: Optional[str] = None
    use_ipu_model: bool = False
    output_mode: str = "default"
    available_memory_proportion: Optional[float] = None
    synthetic_data: bool = False
    loss_scaling: Optional[float] = None
    num_workers: int = 4


DISTRIBUTED_BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class SearchConfig:
    """What a search optimises (hydra/sweeper=octconv_exp_optuna), and the objectives of the
    Pareto front in a sweep's report: names in octconv_exp.records.objectives.OBJECTIVES."""

    objectives: List[str] = field(default_factory=lambda: ["accuracy", "flops_per_image"])


@dataclass
class ReportConfig:
    """The figures: the sweep report's (octconv_exp/reports/report.py; also python -m
    octconv_exp.report --format/--dpi) and each run's confusion matrix
    (octconv_exp/training/evaluation.py)."""

    # A list of png, pdf, svg (or one of them): each figure is written in every format given.
    format: Any = field(default_factory=lambda: list(DEFAULT_REPORT_FORMATS))
    # Dots per inch of PNG figures (PDF/SVG are vector: text and lines at any size).
    dpi: int = DEFAULT_REPORT_DPI
    # Each run's confusion_matrix.<format>: some of png, pdf, svg, or [] for none (the
    # matrix's CSV is written whatever this says).
    confusion_format: Any = field(default_factory=lambda: list(DEFAULT_CONFUSION_FORMATS))


def figure_formats(formats, key, allow_none=False):
    """``formats`` checked: a tuple of REPORT_FORMATS (a single name or a comma-separated
    string counts as a list), in the order given, each once; empty only with ``allow_none``.
    A ConfigError names ``key`` and the accepted values otherwise."""
    expected = "expected some of " + ", ".join(REPORT_FORMATS) + (
        ", or [] for none" if allow_none else "")
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",")]
    if formats is None or isinstance(formats, (int, float, bool, dict)) or not hasattr(
            formats, "__iter__"):
        raise ConfigError(key, formats, expected)
    chosen = []
    for name in formats:
        name = str(name).strip().lower()
        if name not in REPORT_FORMATS:
            raise ConfigError(key, name, "is not a figure format; " + expected)
        if name not in chosen:
            chosen.append(name)
    if not chosen and not allow_none:
        raise ConfigError(key, "[]", "needs at least one of " + ", ".join(REPORT_FORMATS))
    return tuple(chosen)


def confusion_formats(cfg):
    """The formats of the run's confusion-matrix figure (``report.confusion_format``)."""
    report = cfg.get("report")
    if report is None or "confusion_format" not in report:
        return DEFAULT_CONFUSION_FORMATS  # a config saved before the key existed
    value = report.confusion_format
    if OmegaConf.is_config(value):
        value = OmegaConf.to_object(value)
    return figure_formats(value, "report.confusion_format", allow_none=True)


def report_settings(formats, dpi, keys=("report.format", "report.dpi")):
    """``(formats, dpi)`` checked: formats as :func:`figure_formats` checks them (at least
    one), dpi an integer in REPORT_DPI_RANGE. A ConfigError names ``keys`` and the accepted
    values otherwise."""
    chosen = figure_formats(formats, keys[0])
    low, high = REPORT_DPI_RANGE
    if not isinstance(dpi, int) or isinstance(dpi, bool) or not low <= dpi <= high:
        raise ConfigError(keys[1], dpi, f"must be an integer in [{low}, {high}]")
    return tuple(chosen), dpi


@dataclass
class Schema:
    alpha: float = MISSING
    expansion: int = MISSING
    seed: int = MISSING
    device: str = MISSING
    profile_dir: Optional[str] = None
    threads: Optional[int] = None
    train: bool = True
    resume: bool = False
    ckpt_path: Optional[str] = None
    deterministic: bool = False
    conv: ConvConfig = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    logger: Any = MISSING
    # The model group (conf/model/): _target_, name and the model's own arguments.
    model: Any = MISSING
    # A data set option (its schema: DATASET_SCHEMAS) or your own (_target_ + its arguments).
    dataset: Any = MISSING
    ipu: IpuConfig = MISSING
    speed: SpeedConfig = MISSING
    trainer: TrainerConfig = MISSING
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def register_configs():
    cs = ConfigStore.instance()
    cs.store(name="octconv_exp_schema", node=Schema)
    for name, schema in DATASET_SCHEMAS.items():
        cs.store(group="dataset", name=f"{name}_schema", node=schema)
    cs.store(group="hydra/sweeper", name="octconv_exp", node={
        "_target_": "hydra_plugins.octconv_exp_sweeper.dedup_sweeper.DedupSweeper",
        "max_batch_size": None, "params": None})
    resolvers.register()
    register_optuna_sweeper(cs)


def register_optuna_sweeper(cs):
    """``hydra/sweeper=octconv_exp_optuna`` (experiment=alpha_search): the Hydra Optuna
    sweeper plugin's config with our sweeper class and NSGA-II, when the plugin is installed."""
    try:
        from hydra_plugins.hydra_optuna_sweeper.config import (
            OptunaSweeperConf,  # optional: a Hydra plugin that may not be installed
        )
    except ImportError:
        return

    @dataclass
    class OctconvExpOptunaConf(OptunaSweeperConf):
        _target_: str = ("hydra_plugins.octconv_exp_sweeper.optuna_search."
                         "OptunaSearchSweeper")
        defaults: List[Any] = field(default_factory=lambda: [{"sampler": "nsgaii"}])

    cs.store(group="hydra/sweeper", name="octconv_exp_optuna", node=OctconvExpOptunaConf,
             provider="octconv_exp")


register_configs()


# --------------------------------------------------------------------------------------------
# Validation


def channel_splits(expansion):
    """The channel counts of every octave layer output/input that gets split by alpha."""
    c = 16 * expansion
    return sorted({c, 2 * c})


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require_int(key, value, minimum, what):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(key, value, what)


def _optimizer_name(cfg):
    target = str(cfg.optimizer.get("_target_", ""))
    name = cfg.optimizer.get("name", None)
    if name not in OPTIMIZERS:
        raise ConfigError("optimizer.name", name, "expected one of " + ", ".join(OPTIMIZERS))
    if not target:
        raise ConfigError("optimizer._target_", target, "must name an optimizer class")
    return name


def validate(cfg: DictConfig, check_environment=True):
    """Check ranges and cross-key rules; raise ConfigError on the first violation.

    ``check_environment`` also checks what depends on this machine (CUDA present, dataset
    folders existing); the CI validator turns it off to check configs meant for elsewhere.
    """
    _refuse_unknown_keys(cfg)
    alpha = cfg.alpha
    if not _is_number(alpha) or not 0 <= alpha < 1:
        raise ConfigError("alpha", alpha, "must be a number in [0, 1)")
    _require_int("expansion", cfg.expansion, 1, "must be an integer >= 1")
    mode = cfg.conv.mode
    if mode not in CONV_MODES:
        raise ConfigError("conv.mode", mode, "expected one of " + ", ".join(CONV_MODES))
    seed_cnn = cfg.get("model") is None or cfg.model.get("name") == "seed_cnn"
    if mode != "vanilla" and alpha > 0 and seed_cnn:  # other models: their own check (meta build)
        for channels in channel_splits(cfg.expansion):
            high, low = split_high_low(channels, alpha)
            if high == 0 or low == 0:
                raise ConfigError(
                    "alpha", alpha,
                    f"splits a {channels}-channel layer into {high} high- and {low} "
                    f"low-frequency channels at expansion={cfg.expansion}; both must be > 0 "
                    "(use a smaller alpha, a larger expansion, or alpha=0)")
    _require_int("seed", cfg.seed, 0, "must be an integer >= 0")
    if cfg.seed > MAX_SEED:
        raise ConfigError("seed", cfg.seed, f"must be an integer in [0, {MAX_SEED}] (torch seeds are 64-bit)")
    if cfg.get("threads") is not None:
        _require_int("threads", cfg.threads, 1, "must be null or an integer >= 1")
    if cfg.device not in DEVICES:
        raise ConfigError("device", cfg.device, "expected one of " + ", ".join(DEVICES))

    t = cfg.trainer
    _require_int("trainer.epochs", t.epochs, 1, "must be an integer >= 1")
    _require_int("trainer.batch_size", t.batch_size, 1, "must be a positive integer")
    _require_int("trainer.test_batch_size", t.test_batch_size, 1, "must be a positive integer")
    objectives = OmegaConf.select(cfg, "search.objectives", default=None)
    if objectives is not None:
        if len(objectives) == 0:
            raise ConfigError("search.objectives", [], "needs at least one of " + ", ".join(OBJECTIVES))
        for name in objectives:
            if name not in OBJECTIVES:
                raise ConfigError("search.objectives", list(objectives),
                                  f"{name} is not an objective; expected some of "
                                  + ", ".join(OBJECTIVES))
    if cfg.get("report") is not None:
        report_settings(OmegaConf.to_object(cfg.report.format)
                        if OmegaConf.is_config(cfg.report.format) else cfg.report.format,
                        cfg.report.dpi)
        confusion_formats(cfg)
    d = cfg.get("distributed")
    if d is not None:
        if d.backend not in DISTRIBUTED_BACKENDS:
            raise ConfigError("distributed.backend", d.backend,
                              "expected one of " + ", ".join(DISTRIBUTED_BACKENDS))
        if not _is_number(d.timeout_s) or d.timeout_s <= 0:
            raise ConfigError("distributed.timeout_s", d.timeout_s, "must be a number of seconds > 0")

    name = _optimizer_name(cfg)
    lr = cfg.optimizer.get("lr", None)
    if not _is_number(lr) or lr <= 0:
        raise ConfigError("optimizer.lr", lr, "must be a number > 0")
    if cfg.device in ("cpu", "cuda"):
        check_optimizer_for_device(name)
    _check_optimizer_arguments(cfg.optimizer)

    scheduler = cfg.scheduler.get("name", None)
    if scheduler not in SCHEDULERS:
        raise ConfigError("scheduler.name", scheduler, "expected one of " + ", ".join(SCHEDULERS))
    if scheduler != "none" and not cfg.scheduler.get("_target_"):
        raise ConfigError("scheduler._target_", None, "must name a torch.optim.lr_scheduler class")
    if scheduler != "none":
        _check_scheduler(cfg.scheduler, float(lr))

    for name in selected(cfg):
        if name not in LOGGERS:
            raise ConfigError("logger", name, "expected some of " + ", ".join(LOGGERS))

    for key in ("channels_last", "compile", "malloc"):
        value = cfg.speed.get(key, "auto")  # malloc: absent from configs before it existed
        if str(value) not in ("true", "false", "auto", "True", "False"):
            raise ConfigError(f"speed.{key}", value, "expected one of true, false, auto")
    if cfg.device not in ("cpu", "auto"):  # the CPU's own case is decided when the run starts

        decide(cfg.speed.get("malloc", "auto"), cfg.device)  # speed.malloc=true: ConfigError
    for key in ("autocast_bf16", "cudnn_benchmark"):
        if cfg.speed[key] and cfg.device == "cpu":
            raise ConfigError(f"speed.{key}", "true", "applies to CUDA only; use device=cuda "
                              "or device=auto on a GPU machine")

    _validate_dataset(cfg.dataset, check_environment)
    _validate_early_stopping(cfg)
    _validate_ipu(cfg)
    _validate_multi_conv(cfg.conv.multi_conv)

    if cfg.device == "ipu":
        check_ipu_profiling(cfg)
        check_ipu_training(cfg)

    if not cfg.train and cfg.ckpt_path is None:
        raise ConfigError("train", "false", "needs ckpt_path=PATH (a model.pt, a checkpoint, or "
                          "a run dir) to evaluate")
    if not cfg.train and cfg.resume:
        raise ConfigError("resume", "true", "continues training: it cannot be combined with "
                          "train=false")

    _validate_model(cfg)
    if check_environment:
        check_model_fits_in_memory(cfg)
    else:
        check_model(cfg)

    if check_environment and cfg.device == "cuda":
        import torch  # deferred: loads torch; imported before torch at start-up

        if not torch.cuda.is_available():
            raise ConfigError("device", "cuda",
                              "no CUDA device is available here; use device=auto or device=cpu")


MAX_SEED = 2**63 - 1


def _refuse_unknown_keys(node, path=""):
    """A key added with ``+`` to a part of the schema is read by nothing: refuse it (with the
    closest real key) instead of ignoring it silently."""
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    fields = ([f.name for f in dataclasses.fields(schema)]
              if schema is not None and dataclasses.is_dataclass(schema) else None)
    for key in node.keys():
        where = f"{path}{key}"
        if fields is not None and key not in fields:
            hint = not_read(where, fields, node._get_root())
            # An added key without a value (+key=???) is named as the user wrote it.
            value = "???" if OmegaConf.is_missing(node, str(key)) else node[key]
            raise ConfigError(where, value, hint)
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _refuse_unknown_keys(child, where + ".")


#: Code a config may name that the CI validator runs without --trust-code: octconv-exp's own
#: and torch's (PopTorch's) optimizers and schedules, by module.
TRUSTED_CODE = ("octconv_exp", "torch.optim", "poptorch.optim")
#: While the validator checks without --trust-code: the (key, target) pairs whose code it did
#: not import or run (None: every target is run, as a run does).
_UNTRUSTED = {"skipped": None}


@contextlib.contextmanager
def without_config_code():
    """:func:`validate` inside this block neither imports nor runs the code of a ``_target_``
    outside :data:`TRUSTED_CODE` (a preset's model could be ``os.system``); it checks the rest
    and lists what it skipped in the list this yields."""
    skipped, before = [], _UNTRUSTED["skipped"]
    _UNTRUSTED["skipped"] = skipped
    try:
        yield skipped
    finally:
        _UNTRUSTED["skipped"] = before


def _is_trusted(target):
    """Does ``target`` name code of :data:`TRUSTED_CODE`? Its name must say so (importing a
    module runs it), and so must the object it resolves to (not a name a trusted module
    imported from elsewhere, e.g. ``os``)."""
    text = str(target)
    if not any(text.startswith(prefix + ".") for prefix in TRUSTED_CODE):
        return False
    obj = _import_target(text)
    if obj is None:
        return True  # nothing to run: the check that imports it reports the name
    module = str(getattr(obj, "__module__", "") or "")
    return any(module == prefix or module.startswith(prefix + ".") for prefix in TRUSTED_CODE)


def _skips_code(key, target):
    """True (and noted) when the code ``target`` names must not be imported or run here."""
    skipped = _UNTRUSTED["skipped"]
    if skipped is None or target is None or _is_trusted(target):
        return False
    skipped.append((key, str(target)))
    return True


def _import_target(target):
    module, _, name = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _check_optimizer_arguments(opt):
    """Every optimizer argument must be one the optimizer takes (checked against its
    signature before the run), with the closest names suggested."""
    if _skips_code("optimizer._target_", opt.get("_target_")):
        return
    cls = _import_target(opt.get("_target_"))
    if cls is None:
        return  # poptorch.optim outside an SDK: the IPU backend checks it
    accepted = [n for n, p in inspect.signature(cls).parameters.items()
                if n != "params" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for key in opt.keys():
        if key in ("name", "_target_") or key in accepted:
            continue
        close = difflib.get_close_matches(str(key), accepted, n=2, cutoff=0.6)
        hint = f"did you mean {' or '.join('optimizer.' + c for c in close)}? " if close else ""
        raise ConfigError(f"optimizer.{key}", opt[key],
                          f"{cls.__name__} takes no argument '{key}'; {hint}it takes "
                          + ", ".join(accepted))


def _check_scheduler(sched, lr):
    """Build the schedule on a stand-in optimizer and step it once: bad arguments fail here,
    naming the scheduler, instead of after the first epoch."""
    import torch  # deferred: loads torch; imported before torch at start-up

    for key in ("step_size", "T_max"):
        value = sched.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 1):
            raise ConfigError(f"scheduler.{key}", value, "must be an integer >= 1")
    if _skips_code("scheduler._target_", sched.get("_target_")):
        return
    cls = _import_target(sched.get("_target_"))
    if cls is None:
        raise ConfigError("scheduler._target_", sched.get("_target_"),
                          "cannot be imported: name a torch.optim.lr_scheduler class")
    node = OmegaConf.to_container(sched, resolve=True)
    args = {k: v for k, v in node.items() if k not in ("name", "_target_")}
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=lr)
    try:
        scheduler = cls(optimizer, **args)
        optimizer.step()
        scheduler.step()
    except (TypeError, ValueError, ZeroDivisionError, KeyError) as exc:
        shown = ", ".join(f"{k}={v}" for k, v in args.items())
        raise ConfigError(f"scheduler={sched.get('name')}", shown or "(no arguments)",
                          f"{cls.__name__} refuses them: {exc}") from None


def estimated_training_bytes(cfg):
    """A lower bound on the memory training needs: weights, gradients and up to two optimizer
    states (4 bytes each), counted on the model built on the meta device (no memory)."""
    import torch  # deferred: loads torch; imported before torch at start-up

    from ..models.octave import (  # deferred: loads torch; imported before torch at start-up
        ModelConstructorError,
        build_model,
        count_parameters,
    )

    try:
        with torch.device("meta"):
            params = count_parameters(build_model(cfg))
    except ModelConstructorError:
        # A user constructor that computes with its tensors (.item(), numpy) cannot on the
        # meta device: it is built for real, to refuse only what fails there too.
        params = count_parameters(build_model(cfg))
    return params * 4 * 4


_MODEL_CHECKS = {}


def check_model(cfg):
    """Build the model on the meta device (no memory, no time): a model that refuses its
    arguments (a ResNet depth, an alpha its layers cannot split, a user model's signature) is
    a ConfigError naming the model. Returns the training-memory estimate; remembered per model
    configuration, since ``validate`` checks many configs that share one model."""
    from ..models.octave import (  # deferred: loads torch; imported before torch at start-up
        model_name,
        model_node,
    )

    if _skips_code("model._target_", model_node(cfg).get("_target_")):
        return 0
    key = json.dumps([model_node(cfg), cfg.conv.mode, float(cfg.alpha), int(cfg.expansion)],
                     sort_keys=True, default=str)
    if key not in _MODEL_CHECKS:
        try:
            _MODEL_CHECKS[key] = estimated_training_bytes(cfg)
        except ValueError as exc:
            where = ("" if cfg.conv.mode == "vanilla"
                     else f"at conv={cfg.conv.mode} alpha={cfg.alpha}: ")
            _MODEL_CHECKS[key] = ConfigError("model", model_name(cfg), where + str(exc))
    result = _MODEL_CHECKS[key]
    if isinstance(result, ConfigError):
        raise ConfigError(result.key, result.value, result.expected)
    return result


def _available_memory():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _free_gpu_memory(device):
    """Free memory of the CUDA device a run will use (None when it will not use one)."""
    import torch  # deferred: loads torch; imported before torch at start-up

    if device not in ("cuda", "auto") or not torch.cuda.is_available():
        return None
    try:
        return torch.cuda.mem_get_info()[0]
    except (RuntimeError, AssertionError):
        return None


def check_model_fits_in_memory(cfg):
    """Refuse a model whose weights alone cannot fit, before allocating it: in host memory
    (the kernel would kill the process instead) and, on CUDA, in the GPU's free memory (torch
    would fail with an out-of-memory traceback mid-run)."""
    need, have = check_model(cfg), _available_memory()
    what = "expansion" if (cfg.get("model") is None or cfg.model.get("name") == "seed_cnn") \
        else "model"
    shown = cfg.expansion if what == "expansion" else cfg.model.get("name")
    if have is not None and need > have:
        raise ConfigError(what, shown,
                          f"needs at least {need / 2**30:.1f} GiB for weights, gradients and "
                          f"optimizer state, and {have / 2**30:.1f} GiB is available; use a "
                          f"smaller {what}")
    gpu = _free_gpu_memory(cfg.device)
    if gpu is not None and need > gpu:
        raise ConfigError(what, shown,
                          f"needs at least {need / 2**30:.1f} GiB of GPU memory for weights, "
                          f"gradients and optimizer state, and the GPU has {gpu / 2**30:.1f} GiB "
                          f"free; use a smaller {what}, or device=cpu")


def _validate_dataset(ds, check_environment):
    custom = "_target_" in list(ds.keys())
    if ds.get("name") not in DATASETS and not custom:
        raise ConfigError("dataset.name", ds.get("name"), "expected one of " + ", ".join(DATASETS)
                          + " (or dataset=custom dataset._target_=package.module.Class)")
    for key, positive in (("mean", False), ("std", True)):
        values = ds.get(key)
        if values is not None and (len(values) != 3 or not all(
                _is_number(v) and (v > 0 if positive else True) for v in values)):
            raise ConfigError(f"dataset.{key}", OmegaConf.to_container(values),
                              "must be null or a list of 3 numbers" + (" > 0" if positive else ""))
    seed = ds.get("seed", 0)
    _require_int("dataset.seed", seed, 0, "must be an integer >= 0")
    if seed > MAX_SEED:
        raise ConfigError("dataset.seed", seed, f"must be an integer in [0, {MAX_SEED}]")
    val = ds.get("val_size", 0)
    if not _is_number(val) or val < 0 or (val >= 1 and not float(val).is_integer()):
        raise ConfigError("dataset.val_size", val, "must be a count of images (an integer >= 1), "
                          "a fraction in [0, 1), or 0 for no validation split")
    if isinstance(val, float) and val == 1.0:
        # 1.0 reads as "the whole set" but counted one image: a best.pt picked on one image.
        raise ConfigError("dataset.val_size", val, "is ambiguous (a fraction of 1.0 would be the "
                          "whole training set, a count of 1 a single image); give a count as an "
                          "integer (dataset.val_size=500) or a fraction below 1 (0.1)")
    if not isinstance(ds.get("augment", False), bool):
        raise ConfigError("dataset.augment", ds.get("augment"), "must be true or false")
    if custom:
        if OmegaConf.is_missing(ds, "_target_"):
            if not check_environment:
                return  # to be given on the command line, as image_folder's root
            raise ConfigError("dataset._target_", "???", "dataset=custom needs "
                              "dataset._target_=package.module.Class (README: your own data set)")
        if check_environment and _import_target(ds._target_) is None:
            raise ConfigError("dataset._target_", ds._target_, "cannot be imported; name a class "
                              "as package.module.Class, importable from where run.py starts")
        return
    if ds.name == "synthetic":
        _require_int("dataset.train_size", ds.train_size, 1, "must be a positive integer")
        _require_int("dataset.test_size", ds.test_size, 1, "must be a positive integer")
        return
    if ds.name == "image_folder":
        _require_int("dataset.image_size", ds.get("image_size", 32), 1,
                     "must be a positive integer (pixels per side)")
        from ..data.streaming import (
            choose_in_memory,  # deferred: loads torch; imported before torch at start-up
        )

        choose_in_memory(ds.get("in_memory", "auto"), 0, 1, ds.get("max_memory_gb", 4))
        _require_int("dataset.workers", ds.get("workers", 2), 0, "must be an integer >= 0")
        _require_int("dataset.stats_images", ds.get("stats_images", 10000), 2,
                     "must be an integer >= 2")
    if OmegaConf.is_missing(ds, "root"):
        if not check_environment:
            return  # to be given on the command line; the run itself checks it
        raise ConfigError("dataset.root", "???",
                          f"dataset={ds.name} needs a folder: add dataset.root=/path/to/folder")
    if ds.root is None or str(ds.root) == "":
        raise ConfigError("dataset.root", ds.root,
                          f"dataset={ds.name} needs a folder: add dataset.root=/path/to/folder")
    if check_environment and not os.path.isdir(ds.root):
        if ds.name == "cifar10" and ds.download:
            return  # torchvision creates it and downloads into it
        raise ConfigError("dataset.root", ds.root,
                          f"folder does not exist (looked at {os.path.abspath(ds.root)})")


TEST_ON = ("best", "last")
EARLY_STOPPING_MODES = ("max", "min")
#: What best.pt and metrics.json's best_epoch follow (trainer.early_stopping.monitor; by
#: default the validation accuracy with a validation split, else the training loss).
MONITORS = ("val_accuracy", "val_loss", "train_loss")


def _validate_early_stopping(cfg):
    """trainer.early_stopping (patience, monitor, mode, min_delta) and trainer.test_on: a
    validation monitor needs a validation split."""
    test_on = OmegaConf.select(cfg, "trainer.test_on", default="best")
    if test_on not in TEST_ON:
        raise ConfigError("trainer.test_on", test_on, "expected one of " + ", ".join(TEST_ON))
    es = OmegaConf.select(cfg, "trainer.early_stopping", default=None)
    if es is None:
        return
    patience, monitor = es.get("patience"), es.get("monitor")
    if patience is not None:
        _require_int("trainer.early_stopping.patience", patience, 1,
                     "must be null (off) or an integer >= 1")
    if monitor is not None and monitor not in MONITORS:
        raise ConfigError("trainer.early_stopping.monitor", monitor,
                          "expected null or one of " + ", ".join(MONITORS))
    mode = es.get("mode")
    if mode is not None and mode not in EARLY_STOPPING_MODES:
        raise ConfigError("trainer.early_stopping.mode", mode,
                          "expected null (from the monitor) or one of "
                          + ", ".join(EARLY_STOPPING_MODES))
    min_delta = es.get("min_delta", 0.0)
    if not _is_number(min_delta) or min_delta < 0:
        raise ConfigError("trainer.early_stopping.min_delta", min_delta, "must be a number >= 0")
    split = _is_number(cfg.dataset.get("val_size", 0) or 0) and (cfg.dataset.get("val_size", 0)
                                                                 or 0) > 0
    if split:
        return
    if monitor is not None and str(monitor).startswith("val_"):
        raise ConfigError("trainer.early_stopping.monitor", monitor,
                          "needs a validation split: set dataset.val_size (a count or a "
                          "fraction of the training images), or "
                          "trainer.early_stopping.monitor=train_loss")
    if patience is not None and monitor is None:
        raise ConfigError("trainer.early_stopping.patience", patience,
                          "stops on the validation accuracy and needs a validation split: set "
                          "dataset.val_size (a count or a fraction of the training images), "
                          "trainer.early_stopping.monitor=train_loss, or "
                          "trainer.early_stopping.patience=null")


def _validate_model(cfg):
    node = cfg.get("model")
    if node is None:
        return  # a config from before the model group: the seed's CNN
    if not isinstance(node, DictConfig) or not node.get("_target_"):
        raise ConfigError("model._target_", None if not isinstance(node, DictConfig)
                          else node.get("_target_"),
                          "must name a model class (model=" + "|".join(MODELS)
                          + ", or model._target_=package.module.Class)")
    ls = cfg.trainer.get("label_smoothing", 0.0)
    if not _is_number(ls) or not 0 <= ls < 1:
        raise ConfigError("trainer.label_smoothing", ls, "must be a number in [0, 1)")


def _validate_ipu(cfg):
    ipu = cfg.ipu
    _require_int("ipu.device_iterations", ipu.device_iterations, 1, "must be a positive integer")
    _require_int("ipu.replicas", ipu.replicas, 1, "must be a positive integer")
    if ipu.replicas & (ipu.replicas - 1):
        # PopTorch reserves a power of 2 of IPUs per process and refuses any other count
        # unless autoRoundNumIPUs, which this backend does not set (CompilerImpl.cpp:693-716).
        raise ConfigError("ipu.replicas", ipu.replicas,
                          "must be a power of 2 (1, 2, 4, 8, ...): PopTorch reserves IPUs per "
                          "process in powers of 2")
    _require_int("ipu.gradient_accumulation", ipu.gradient_accumulation, 1,
                 "must be a positive integer")
    _require_int("ipu.num_workers", ipu.num_workers, 0, "must be an integer >= 0")
    if ipu.output_mode not in OUTPUT_MODES:
        raise ConfigError("ipu.output_mode", ipu.output_mode,
                          "expected one of " + ", ".join(OUTPUT_MODES))
    amp = ipu.available_memory_proportion
    if amp is not None and (not _is_number(amp) or not 0 < amp <= 1):
        raise ConfigError("ipu.available_memory_proportion", amp, "must be a number in (0, 1]")
    if ipu.loss_scaling is not None and (not _is_number(ipu.loss_scaling)
                                         or ipu.loss_scaling <= 0):
        raise ConfigError("ipu.loss_scaling", ipu.loss_scaling, "must be a number > 0")
    if ipu.use_ipu_model and ipu.replicas > 1:
        # The IPU Model simulates a single IPU: Poplar cannot replicate a graph on it.
        raise ConfigError("ipu.replicas", ipu.replicas,
                          "the IPU Model (ipu.use_ipu_model=true) runs one replica only; set "
                          "ipu.replicas=1 or run on IPU hardware")


def _validate_multi_conv(mc):
    if mc.plan_type not in MULTI_CONV_PLAN_TYPES:
        raise ConfigError("conv.multi_conv.plan_type", mc.plan_type,
                          "expected one of " + ", ".join(MULTI_CONV_PLAN_TYPES))
    if mc.available_memory_proportions is not None:
        values = list(mc.available_memory_proportions)
        if len(values) not in (1, len(OCTAVE_BRANCHES)) or not all(
                _is_number(v) and 0 <= v < 1 for v in values):
            raise ConfigError("conv.multi_conv.available_memory_proportions",
                              OmegaConf.to_container(mc.available_memory_proportions),
                              "must be a list of 1 or 4 numbers in [0, 1) (one for all, or "
                              "one per branch h2h, h2l, l2l, l2h)")
    if mc.partials_types is not None:
        values = list(mc.partials_types)
        if len(values) not in (1, len(OCTAVE_BRANCHES)) or not all(
                v in PARTIALS_TYPES for v in values):
            raise ConfigError("conv.multi_conv.partials_types",
                              OmegaConf.to_container(mc.partials_types),
                              "must be a list of 1 or 4 of: " + ", ".join(PARTIALS_TYPES)
                              + " (one for all, or one per branch h2h, h2l, l2l, l2h)")
    if mc.per_conv_reserved_tiles is not None:
        _require_int("conv.multi_conv.per_conv_reserved_tiles", mc.per_conv_reserved_tiles, 0,
                     "must be an integer >= 0")
    cbo = mc.cycle_back_off
    if cbo is not None and (not _is_number(cbo) or not 0 <= cbo <= 1):
        raise ConfigError("conv.multi_conv.cycle_back_off", cbo, "must be a number in [0, 1]")
