"""What the config validation, the records and the sweep plan need to know of the models
before torch is imported (run.py checks a command line first): octconv's channel split and
branch order, the built-in models' classes, and the name a run's records give its model."""

#: The class each built-in model's YAML (conf/model/) names in its _target_.
MODEL_TARGETS = {"seed_cnn": "octconv_exp.models.octave.ClassificationModel",
                 "resnet_cifar": "octconv_exp.models.resnet.ResNetCifar",
                 "resnet_imagenet": "octconv_exp.models.resnet.ResNetImageNet"}
#: Where those classes were before the package had subpackages (issue 28): the configs in
#: checkpoints and run dirs written then name them so.
LEGACY_MODEL_TARGETS = {"octconv_exp.model.ClassificationModel": MODEL_TARGETS["seed_cnn"],
                        "octconv_exp.resnet.ResNetCifar": MODEL_TARGETS["resnet_cifar"],
                        "octconv_exp.resnet.ResNetImageNet": MODEL_TARGETS["resnet_imagenet"]}
OCTAVE_BRANCHES = ("h2h", "h2l", "l2l", "l2h")  # octconv's execution order


def split_high_low(channels, alpha):
    """octconv's split: int((1 - alpha) * C) high-frequency channels, the rest low."""
    high = int((1 - alpha) * channels)
    return high, channels - high


def recorded_model_name(node, legacy=False):
    """The model as the log, metrics.json, checkpoints, MLflow and sweep reports name it
    (``node``: the model config as a dict): a built-in model by its name (``seed_cnn``,
    ``resnet_cifar-20``, ``-w2`` for width 2), a user model by the ``model.name`` its user
    gave, else by its class, ``module.Class``. A built-in's name beside another class is the
    YAML's default left over (``model._target_=my_research.TinyNet`` keeps seed_cnn's
    ``name``): it would mix the user's runs with the built-in's, so the class names it.
    ``legacy``: the name before that rule (checkpoints written then carry it)."""
    target, name = node.get("_target_"), node.get("name")
    target = LEGACY_MODEL_TARGETS.get(target, target) if isinstance(target, str) else target
    if legacy:
        name = str(name or str(target).rpartition(".")[2])
    elif name is None or (target is not None and MODEL_TARGETS.get(name, target) != target):
        name = None if target is None else str(target)
    if name is None:
        return None
    name = str(name)
    if "depth" in node:
        name += f"-{node['depth']}"
    if node.get("width", 1) not in (1, None):
        name += f"-w{node['width']}"
    return name
