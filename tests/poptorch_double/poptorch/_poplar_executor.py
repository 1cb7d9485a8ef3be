"""poptorch.trainingModel / inferenceModel / PoplarExecutor as in PopTorch 3.4
(__init__.py:660-746, _poplar_executor.py, _optimizer_attributes.py at sdk/poptorch/3.4.0).

The double computes on the CPU, with the model's own (host) parameters: PopTorch keeps the
weights on the IPU but copies them back implicitly whenever the host model is read
(PoptorchModel / PoptorchParameter hooks, _poplar_executor.py:250-367), so for a user reading
weights the difference does not show; what does not work on real PopTorch either is noted
where modelled. Not modelled: device-resident weights that host writes do not reach
(``model.load_state_dict`` on the user model after compilation is silently overwritten on real
PopTorch unless ``executor.load_state_dict``/``copyWeightsToDevice`` is used),
pipelining/phased execution, anchors. What a training model trains is what PopTorch marks as
its loss, not what its forward returns (:class:`_LossTracer`).
"""
import collections
import copy
import inspect
import os
import weakref
from types import MethodType
from typing import List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import enums, optim, ops
from ._errors import NO_EXECUTABLE_ERR, _RuntimeError, _cpp_error, createPoptorchError
from ._log import IPUS_IN_USE, LOG, warn
from .options import Options

__version__ = "3.4.0+double"

_IPU_CONTEXT = [False]  # _impl.py:21, isRunningOnIpu (76-92)
_WRAPPER_TYPES = set()   # _impl.registerWrapperType / isWrapped


def isRunningOnIpu() -> bool:
    return _IPU_CONTEXT[0]


def _is_wrapped(model):
    return type(model) in _WRAPPER_TYPES


def _unwrap(model):
    # _impl.unwrapModelIfNecessary: back to the user's class.
    if _is_wrapped(model):
        model.__class__ = model.__class__.__bases__[0]


# ------------------------------------------------------------------------------- devices


def _env_flag(name):
    value = os.environ.get(name)
    return value is not None and value != "" and int(value) != 0


def _ipu_model_env():
    # popart_compiler/source/Utils.cpp:30-53: POPTORCH_IPU_MODEL / POPTORCH_SMALL_IPU_MODEL
    return _env_flag("POPTORCH_IPU_MODEL") or _env_flag("POPTORCH_SMALL_IPU_MODEL")


def _physical_ipus():
    return int(os.environ.get("POPTORCH_DOUBLE_IPUS", "0"))


def _uses_ipu_model(options):
    # CompilerImpl.cpp:462-476 (updateUseModelConfig): the option if set, else the env var.
    if options.exists("use_model"):
        return bool(options.use_model)
    return _ipu_model_env()


def _num_ipus(options):
    """CompilerImpl.cpp:619-630, 693-714: IPUs = IPUs used by the model (1 here) x
    replication factor, rounded up to a power of 2 only with autoRoundNumIPUs, else an error;
    at most 64 (CompilerImpl.cpp:234-239)."""
    num_ipus = options.replication_factor
    if num_ipus > 64:
        raise _cpp_error(f"Too many IPUs requested ({num_ipus}). Experiments that need more "
                         "than 64 IPUs require distributed execution.",
                         "popart_compiler/source/CompilerImpl.cpp:235")
    rounded = 1
    while rounded < num_ipus:  # Utils.cpp:89-97 roundUpNumIPUs
        rounded *= 2
    if rounded != num_ipus:
        common = (", because PopTorch must reserve a power of 2 or maximum of 64 IPUs per "
                  "process")
        if options.auto_round_num_ipus:
            warn(f"Reserving {rounded} IPUs when the model specifices the use of only "
                 f"{num_ipus}{common}. {rounded - num_ipus} will be reserved but not used.")
            num_ipus = rounded
        else:
            raise _cpp_error(
                f"The model specifies the use of {num_ipus} IPUs, however PopTorch must reserve"
                f" a minimum of {rounded} in order to allow the model to run{common}. Please "
                "reconfigure your model to use a different number of IPUs or set "
                "poptorch.Options().autoRoundNumIPUs(True).",
                "popart_compiler/source/CompilerImpl.cpp:707")
    return num_ipus


def _acquire(num_ipus):
    """CompilerImpl.cpp:716-727 (tryAcquireAvailableDevice) and checkSystemConfig (444-459)."""
    physical = _physical_ipus()
    if IPUS_IN_USE[0] + num_ipus <= physical:
        IPUS_IN_USE[0] += num_ipus
        return
    if physical == 0:
        detail = ("\nNo IPU detected in the system. \nFor more information use the Graphcore "
                  "command-line tool `gc-monitor`.")
    elif num_ipus > physical:
        detail = (f"\nNo device found on the system with {num_ipus} IPUs: the configuration "
                  "needs changing")
    else:
        detail = ""  # all taken (POPTORCH_WAIT_FOR_IPU=1 would wait; the double cannot)
    raise _cpp_error(f"Failed to acquire {num_ipus} IPU(s){detail}",
                     "popart_compiler/source/CompilerImpl.cpp:723")


# ------------------------------------------------------------------------------- optimizers

_OPTIMIZER_TYPES = ["SGD1", "SGD2", "ADAM", "ADAMW", "ADAMW_NO_BIAS", "RMSPROP",
                    "RMSPROP_CENTERED", "LAMB", "LAMB_NO_BIAS"]  # _optimizer_attributes.py:273


def _optimizer_type(optimizer):
    """_optimizer_attributes.py:303-349 -> (type name, poptorch.optim class)."""
    if isinstance(optimizer, torch.optim.SGD):
        combined = getattr(optimizer, "use_combined_accum", False)
        return ("SGD1" if combined else "SGD2"), optim.SGD
    if isinstance(optimizer, torch.optim.Adam):
        return "ADAM", optim.Adam
    if isinstance(optimizer, torch.optim.AdamW):
        if isinstance(optimizer, optim.AdamW) and not getattr(optimizer, "bias_correction",
                                                               True):
            return "ADAMW_NO_BIAS", optim.AdamW
        return "ADAMW", optim.AdamW
    if isinstance(optimizer, torch.optim.RMSprop):
        centered = optimizer.param_groups[0]["centered"]
        for i, group in enumerate(optimizer.param_groups):
            assert group["centered"] == centered, (
                "All parameter groups must have the same value for the 'centered' attribute "
                f"(Group 0: {centered} / Group {i}: {group['centered']})")
        return ("RMSPROP_CENTERED" if centered else "RMSPROP"), optim.RMSprop
    if isinstance(optimizer, optim.LAMB):
        return ("LAMB" if getattr(optimizer, "bias_correction", True) else "LAMB_NO_BIAS",
                optim.LAMB)
    return None, None


def _convert_optimizer(optimizer, options, is_compiled):
    """_optimizer_attributes.py:55-270 (convertOptimizerToDict), reduced to what decides
    PopART's view: each attribute's (value, is_const). With ``variable_attrs`` (poptorch.optim)
    const-ness is ``variable_attrs.isConstant``; for torch optimizers it is the value test of
    the readers (lr never constant; weight_decay const iff 0 (AdamW: 1e-2), momentum/dampening
    iff 0, eps iff 1e-08, loss_scaling iff 1.0, velocity_scaling iff 1.0, max_weight_norm iff
    65500, alpha/nesterov/betas always)."""
    type_name, opt_class = _optimizer_type(optimizer)
    # _optimizer_attributes.py:23-26 (setType) / 59-61: an AssertionError for other optimizers.
    assert type_name is not None, (
        "Unsupported optimizer type. Types supported %s" %
        ", ".join("_OptimizerType." + t for t in _OPTIMIZER_TYPES))
    variable_attrs = getattr(optimizer, "variable_attrs", None)
    for group in [optimizer.defaults] + optimizer.param_groups:
        if group.get("amsgrad"):
            # _optimizer_attributes.py:67-71
            raise ValueError("Only non-amsgrad Adam/AdamW optimizers are supported.")
    if getattr(optimizer, "use_tf_variant", False) and type_name not in ("RMSPROP",
                                                                         "RMSPROP_CENTERED"):
        raise ValueError("use_tf_variant is only available with RMSProp optimizers.")
    if getattr(optimizer, "accum_type", torch.float32) == torch.float16 and \
            not getattr(optimizer, "use_combined_accum", False):
        # _optimizer_attributes.py:133-152
        if not is_compiled:
            options._unfreeze()
            options.Training.setMeanAccumulationAndReplicationReductionStrategy(
                enums.MeanReductionStrategy.Running)
            options._freeze()
        elif options.Training.meanAccumulationAndReplicationReductionStrategy != \
                enums.MeanReductionStrategy.Running:
            raise ValueError("Invalid optimizer: the new optimizer would "
                             "require changing options.Training."
                             "meanAccumulationAndReplicationReductionStrategy to "
                             "poptorch.MeanReductionStrategy.Running but the "
                             "executable is already compiled.")
    auto_loss_scaling = options._Popart.options.get("automaticLossScalingSettings.enabled",
                                                    False)
    if variable_attrs and auto_loss_scaling:
        variable_attrs.markAsVariable("loss_scaling")  # _optimizer_attributes.py:157-159
    wd_const = 1e-2 if type_name == "ADAMW" else 0.0
    evaluators = {
        "lr": lambda v: False,
        "weight_decay": lambda v: v == wd_const,
        "momentum": lambda v: v == 0.0,
        "velocity_scaling": lambda v: v == 1.0,
        "dampening": lambda v: v == 0.0,
        "eps": lambda v: v == 1e-08,
        "max_weight_norm": lambda v: v == 65500.0,
        "alpha": lambda v: True,
        "nesterov": lambda v: True,
        "betas": lambda v: True,
    }
    group_defaults = {"velocity_scaling": 1.0}

    def read(params, name):
        value = params.get(name, group_defaults.get(name))
        if value is None:
            return None
        if variable_attrs:
            is_const = variable_attrs.isConstant(name)
        else:
            is_const = evaluators[name](value)
        return (tuple(value) if isinstance(value, (list, tuple)) else value, is_const)

    group_vars = [v for v in opt_class._group_vars if v in evaluators]

    def group_dict(params):
        out = {}
        for name in group_vars:
            pair = read(params, name)
            if pair is not None:
                out[name] = pair
        return out

    defaults = group_dict(optimizer.defaults)
    loss_scaling = getattr(optimizer, "loss_scaling", 1.0)
    defaults["loss_scaling"] = (loss_scaling, variable_attrs.isConstant("loss_scaling")
                                if variable_attrs else
                                (loss_scaling == 1.0 and not auto_loss_scaling))
    return {"optimizer_type": type_name, "defaults": defaults,
            "groups": [group_dict(g) for g in optimizer.param_groups]}


def _valid_replacement(old, new):
    """PopART Optimizer::validReplacement (willow/src/optimizer.cpp:35-55) and
    OptimizerValue::validReplacement (willow/src/optimizervalue.cpp:25-37), applied when
    PopTorch pushes a changed optimizer to a compiled executable (updateOptimizers)."""
    if old["optimizer_type"] != new["optimizer_type"]:
        raise _cpp_error(f"Can not replace optimizer of type {old['optimizer_type']} with new "
                         f"optimizer of type {new['optimizer_type']}",
                         "willow/src/optimizer.cpp:50", kind="popart_exception")
    pairs = [(old["defaults"], new["defaults"])] + list(zip(old["groups"], new["groups"]))
    for before, after in pairs:
        for name, (value, is_const) in before.items():
            if name not in after:
                continue
            value2, is_const2 = after[name]
            if is_const != is_const2:
                raise _cpp_error("Can not replace a constant value with a non constant value.",
                                 "willow/src/optimizervalue.cpp:30", kind="popart_exception")
            if is_const and value != value2:
                raise _cpp_error("Values are constant but do not match.",
                                 "willow/src/optimizervalue.cpp:34", kind="popart_exception")


def _variable_names(dict_optimizer):
    return sorted(name for name, (_, is_const) in dict_optimizer["defaults"].items()
                  if not is_const)


def _sgd_variant(dict_optimizer, optimizer):
    """PopART SGD::createOp (willow/src/sgd.cpp:152-155 hasMomentum, 356-425): SGD0 when the
    momentum is constant and 0, else SGD1 (Combined: use_combined_accum=True) or SGD2
    (Separate, PopTorch's default) - _optimizer_attributes.py:316-320."""
    if not isinstance(optimizer, torch.optim.SGD):
        return None
    variants = []
    for group in dict_optimizer["groups"] or [dict_optimizer["defaults"]]:
        value, is_const = group.get("momentum", (0.0, True))
        has_momentum = (not is_const) or value != 0.0
        if not has_momentum:
            variants.append("SGD0")
        else:
            variants.append("SGD1" if dict_optimizer["optimizer_type"] == "SGD1" else "SGD2")
    return variants[0] if len(set(variants)) == 1 else variants


# PopART's reserved prefixes for optimizer state tensors (willow/include/popart/tensornames.hpp
# :367-426). The double names "ipu_state" entries <prefix><parameter name>; the exact names per
# PopART variant are not reproduced.
_STATE_PREFIX = {"momentum_buffer": "Accl___", "exp_avg": "Accl1___", "exp_avg_sq": "Accl2___",
                 "square_avg": "Accl2___", "grad_avg": "Accl3___", "step": "Step___",
                 "max_exp_avg_sq": "Accum___"}


# ------------------------------------------------------------------------------- losses

# The aten ops PopTorch's dispatcher intercepts as losses "so that we can mark the loss tensor
# (see `IsLoss`); otherwise, the op will get decomposed by PyTorch"
# (poptorch/source/dispatch_tracer/RegisterOptionalAtenOps.cpp.inc:34-35, 111, 118-131); each
# one's handler ends in createIdentityloss (popart_canonicalization/LossOps.cpp:141 for
# nll_loss_forward / nll_loss2d_forward, registered at 637-639; AtenHandlers.gen.cpp for
# mse_loss, l1_loss, ...). An op torch decomposes above the IPU dispatch key (a composite such
# as cross_entropy_loss) is never seen whole: only its parts are.
_ATEN_LOSS_OPS = frozenset((
    "nll_loss_forward", "nll_loss2d_forward", "binary_cross_entropy_with_logits",
    "cosine_embedding_loss", "ctc_loss", "hinge_embedding_loss", "kl_div", "l1_loss",
    "margin_ranking_loss", "poisson_nll_loss", "soft_margin_loss", "triplet_margin_loss",
    "mse_loss", "smooth_l1_loss"))


class _LossTracer(TorchDispatchMode):
    """The identity losses of one training forward pass, and the one PopART trains.

    Python's dispatch mode sees the aten ops below autograd, as PopTorch's dispatcher does at
    the IPU key: the outputs of ``_ATEN_LOSS_OPS`` and of ``poptorch.identity_loss`` are the
    graph's ``popart::identityloss`` nodes. RemoveSurplusIdentityLosses.cpp:47-107 drops every
    one used by another (traverseUseDef, 20-45) and requires exactly one left; only
    identityloss nodes are losses (Compiler.cpp:157-161, 141), and that one is the loss the
    TrainingSession differentiates (Compiler.cpp:783-785). Whatever the forward computes
    outside it (a term added after the identity loss) is returned but gets no gradient."""

    def __enter__(self):
        self.losses = []
        ops._IDENTITY_LOSSES[0] = self.losses
        return super().__enter__()

    def __exit__(self, *exc):
        ops._IDENTITY_LOSSES[0] = None
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in _ATEN_LOSS_OPS:
            self.losses.append(_flatten(out, [])[0])
        return out

    def final_loss(self):
        def feeds(loss, other):
            # traverseUseDef: ``loss`` is used, directly or not, by ``other``.
            seen, stack = set(), [other.grad_fn]
            while stack:
                fn = stack.pop()
                if fn is None or fn in seen:
                    continue
                if fn is loss.grad_fn:
                    return True
                seen.add(fn)
                stack.extend(next_fn for next_fn, _ in fn.next_functions)
            return False

        if not self.losses:
            raise _cpp_error("Couldn't find a loss in graph!",
                             "poptorch/source/RemoveSurplusIdentityLosses.cpp:103")
        independent = [loss for loss in self.losses
                       if loss.grad_fn is None or
                       not any(feeds(loss, other) for other in self.losses if other is not loss)]
        if len(independent) != 1:
            raise _cpp_error("Multiple independent losses found in graph. Graph must have one "
                             "final loss. Wrap final graph loss in poptorch.identity_loss.",
                             "poptorch/source/RemoveSurplusIdentityLosses.cpp:104")
        return independent[0]


# ------------------------------------------------------------------------------- arguments


def _flatten(obj, out):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            _flatten(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _flatten(x, out)
    return out


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(x, fn) for x in obj)
    if isinstance(obj, list):
        return [_map_tensors(x, fn) for x in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


_INPUTS_END = ("\nThis error occurred because the inputs passed at runtime"
               " don't match the inputs used to compile the model.\n"
               "To recompile the model for the new inputs create a new "
               "inferenceModel / trainingModel wrapper or call destroy() on "
               "the curent one and try again.")  # _args_parser.py:59-64


def _signature(model):
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def _bind(sig, args, kwargs):
    """_args_parser.py:213-298: the forward's parameters with the defaults filled in."""
    if sig is None:
        return [(f"*args[{i}]", a) for i, a in enumerate(args)] + sorted(kwargs.items())
    params = list(sig.parameters.values())
    variadic = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)
    assert variadic or len(args) + len(kwargs) <= len(params), (
        "Too many arguments provided: expected %s (%d) but got %d") % (
            [p.name for p in params], len(params), len(args) + len(kwargs))
    if not variadic:
        for k in kwargs:
            assert k in sig.parameters, (f"{k} is not a valid parameter."
                                         f"Allowed values are {list(sig.parameters)}")
    bound = []
    args = list(args)
    for i, p in enumerate(params):
        if p.kind == p.VAR_KEYWORD:
            used = [q.name for q in params[:i]]
            bound += [(k, v) for k, v in kwargs.items() if k not in used]
        elif p.kind == p.VAR_POSITIONAL:
            bound += [(f"*{p.name}[{j}]", a) for j, a in enumerate(args[i:])]
            args = args[:i]
        elif i < len(args):
            assert p.name not in kwargs, "Parameter %s was passed more than once" % p.name
            bound.append((p.name, args[i]))
        elif p.name in kwargs:
            bound.append((p.name, kwargs[p.name]))
        else:
            if p.default is inspect.Parameter.empty:
                raise createPoptorchError(f"Mandatory parameter {p.name} missing")
            bound.append((p.name, p.default))
    return bound


def _validate(name, compiled, given):
    """_args_parser.py:58-144 (validateInputs)."""
    if isinstance(compiled, torch.Tensor) or isinstance(given, torch.Tensor):
        if type(compiled) is not type(given) and not (isinstance(compiled, torch.Tensor) and
                                                     isinstance(given, torch.Tensor)):
            raise createPoptorchError(f"Type mismatch for {name}: expected {type(compiled)} "
                                      f"but got {type(given)}.{_INPUTS_END}")
        if compiled.dtype != given.dtype:
            raise createPoptorchError(f"Data type mismatch for {name}: expected "
                                      f"{compiled.dtype} but got {given.dtype}.{_INPUTS_END}")
        if compiled.shape != given.shape:
            raise createPoptorchError(f"Shape mismatch for {name}: expected {compiled.shape} "
                                      f"but got {given.shape}.{_INPUTS_END}")
    elif isinstance(compiled, (list, tuple)):
        if not isinstance(given, (list, tuple)):
            raise createPoptorchError(f"Type mismatch for {name}: expected {type(compiled)} "
                                      f"but got {type(given)}.{_INPUTS_END}")
        if len(compiled) != len(given):
            raise createPoptorchError(f"Length mismatch for {name}: expected {len(compiled)} "
                                      f"elements but got {len(given)}.{_INPUTS_END}")
        for i, (c, g) in enumerate(zip(compiled, given)):
            _validate(f"{name}[{i}]", c, g)
    elif type(compiled) is not type(given):
        raise createPoptorchError(f"Type mismatch for {name}: expected {type(compiled)} but "
                                  f"got {type(given)}.{_INPUTS_END}")
    elif compiled != given:
        raise createPoptorchError(f"Value mismatch for {name}: expected {compiled} but got "
                                  f"{given}.{_INPUTS_END}")


# ------------------------------------------------------------------------------- executor


class PoplarExecutor:
    """_poplar_executor.py:130-1586."""

    def __init__(self, model, options, training, poptorch_version, optimizer=None,
                 user_model=None):
        # _poplar_executor.py:147-156: the options given are frozen, the executor works on an
        # unfrozen clone which it freezes again (243).
        if options:
            if not isinstance(options, Options):
                raise createPoptorchError("Invalid type: 'options' is of "
                                          f"type {type(options)} (Expected poptorch.Options)")
            options._freeze()
            options = options.clone()
        else:
            options = Options()
        self._user_model = user_model or model
        if training:
            self._attribute_tracker = True  # OptimizerAttrTracker (164-166)
            if options.defaultOutputMode():
                options.outputMode(enums.OutputMode.Final)  # 167-170
            if not optimizer:
                optimizer = optim.SGD(self._user_model.parameters(), lr=0.01)  # 171-172
        else:
            if options.defaultOutputMode():
                options.outputMode(enums.OutputMode.All)  # 174-176
            if options.Training.gradient_accumulation != 1:
                # 178-194; the default execution strategy is PipelinedExecution (options.py
                # :1169), hence the second sentence.
                err_msg = ("You must set "
                           "poptorch.Options().Training.gradientAccumulation to 1 "
                           "or leave it as its default value (1) when running a "
                           "poptorch.inferenceModel().")
                if options._execution_strategy == "PipelinedExecution":
                    err_msg += (" Use poptorch.Options().deviceIterations "
                                "to process a sufficient number of batches "
                                "each run for pipelined execution instead.")
                raise createPoptorchError(err_msg)
            assert not optimizer, "Optimizer should be None for inference"
        self._model = model
        self._host_weights_version = 0
        self._poptorch_version = poptorch_version
        self._executable = None
        self._options = options
        self._signature = _signature(model)
        self._executable_inputs = None
        self._optimizer = optimizer
        self._ipu_optimizer_is_dirty = False
        self._host_rng_state_is_dirty = False
        self._cached_rng_state = None
        if self._options.exists("random_seed"):
            self._cached_rng_state = [self._options.random_seed]
        self._dict_optimizer = {}
        self._device_dict_optimizer = None  # what PopART holds (double)
        self._training = training
        self._dirty_host_weights = False
        self._is_attached = False
        self._ipus_held = 0
        self._compiled_modes = None
        self._device_opt_state = collections.defaultdict(dict)  # the optimizer state "on the IPU"
        self._synthetic = None
        self.record = None
        if optimizer:
            self.setOptimizer(optimizer)  # 241-242
        self._options._freeze()  # 243
        self._model_training_flag = model.training
        if self._training:
            # 245-373: the user's model becomes a PoptorchModel (a subclass of its class)
            parent = weakref.ref(self)

            class PoptorchModel(type(self._user_model)):
                def copyWeightsToHostIfNeeded(self):
                    p = parent()
                    if p is not None:
                        return p.copyWeightsToHostIfNeeded()
                    return False

                @property
                def _host_weights_version(self):
                    # 267-273 (__getattribute__): the training executor's version, which an
                    # inference model of the same weights compares with its own (1250-1262).
                    p = parent()
                    return None if p is None else p._host_weights_version

                def destroy(self):
                    p = parent()
                    if p is not None:
                        p.destroy()

            PoptorchModel.__name__ = "Poptorch%s" % type(self._user_model).__name__
            self._user_model.__class__ = PoptorchModel
            _WRAPPER_TYPES.add(PoptorchModel)
        self.calls = 0
        self.samples = 0
        self.record = {"training": training, "options": options._summary(),
                       "model_mode_at_wrap": "train" if model.training else "eval",
                       "calls": 0, "samples": 0, "optimizer": None, "set_optimizer_lrs": [],
                       "copy_weights_to_host": 0, "copy_weights_to_device": 0, "detach": 0,
                       "attach": 0, "input_batch_sizes": []}
        if optimizer is not None:
            info = {"class": type(optimizer).__name__,
                    "lr": optimizer.param_groups[0]["lr"],
                    "loss_scaling": getattr(optimizer, "loss_scaling", 1.0),
                    "variable": _variable_names(self._dict_optimizer)}
            variant = _sgd_variant(self._dict_optimizer, optimizer)
            if variant is not None:
                info["sgd_variant"] = variant
            self.record["optimizer"] = info
        LOG["executors"].append(self.record)
        LOG["options"].append(options._summary())

    # ---------------------------------------------------------------- optimizer state

    def _update_optimizer_if_needed(self):
        # 385-391 (+ PopART's replacement checks, see _valid_replacement)
        if not self.isCompiled():
            raise createPoptorchError(NO_EXECUTABLE_ERR)
        if self._ipu_optimizer_is_dirty:
            if self._device_dict_optimizer is not None:
                _valid_replacement(self._device_dict_optimizer, self._dict_optimizer)
            self._device_dict_optimizer = self._dict_optimizer
            self._ipu_optimizer_is_dirty = False

    def _param_names(self):
        return {id(p): n for n, p in self._model.named_parameters()}

    def _read_device_optimizer_state(self):
        """poptorch.cpp:959-990 (readOptimizerState): {"ipu_state": {id: tensor},
        "ipu_param": {id: tensor}}."""
        names = self._param_names()
        state = {}
        for p, per_param in self._device_opt_state.items():
            name = names.get(id(p), str(id(p)))
            for key, value in per_param.items():
                if value is None:
                    continue
                prefix = _STATE_PREFIX.get(key, key + "___")
                state[prefix + name] = (value.detach().clone() if isinstance(value, torch.Tensor)
                                        else torch.tensor(value))
        params = {}
        for name, (value, _) in (self._device_dict_optimizer or {}).get("defaults",
                                                                          {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                params[name + "___default___"] = torch.tensor(float(value))
        return {"ipu_state": state, "ipu_param": params}

    def _write_device_optimizer_state(self, state_dict):
        """poptorch.cpp:992-1030 (writeOptimizerState)."""
        ipu_state = state_dict.get("ipu_state") or {}
        self._device_opt_state = collections.defaultdict(dict)
        for group in self._optimizer.param_groups:
            for p in group["params"]:
                name = self._param_names().get(id(p), str(id(p)))
                for key, prefix in _STATE_PREFIX.items():
                    if prefix + name in ipu_state:
                        value = ipu_state[prefix + name]
                        if key == "step" and isinstance(self._optimizer, optim.LAMB):
                            value = int(value)
                        elif isinstance(value, torch.Tensor):
                            value = value.clone()
                        self._device_opt_state[p][key] = value

    def _read_optim_state_dict_if_needed(self):
        # 393-412
        if not isinstance(self._optimizer, optim.Optimizer):
            return
        if self._optimizer.host_state_is_dirty:
            if not self.isCompiled():
                raise createPoptorchError(NO_EXECUTABLE_ERR)
            assert not self._ipu_optimizer_is_dirty, (
                "Both host and ipu states cannot be dirty at the same time.")
            self._optimizer.set_state_dict({
                **self._read_device_optimizer_state(),
                **torch.optim.Optimizer.state_dict(self._optimizer)
            })
            self._optimizer.ipu_state_is_dirty = False

    def _on_device_attach(self):
        # 414-432
        self._copy_weights_to_device()
        if self._optimizer:
            self._update_optimizer_if_needed()
        if self._optimizer and isinstance(self._optimizer, optim.Optimizer):
            if self._optimizer.has_state():
                self._optimizer.ipu_state_is_dirty = True
                self._write_optim_state_dict_if_needed()
            else:
                self._optimizer.host_state_is_dirty = True
                self._optimizer.ipu_state_is_dirty = False

    def _get_optim_state_dict(self):
        # 434-437: what optimizer.state_dict() is once a training model holds the optimizer
        assert isinstance(self._optimizer, optim.Optimizer)
        self._read_optim_state_dict_if_needed()
        return self._optimizer.get_state_dict()

    def _write_optim_state_dict_if_needed(self):
        # 439-456
        if not self.isCompiled():
            raise createPoptorchError(NO_EXECUTABLE_ERR)
        if isinstance(self._optimizer, optim.Optimizer) and self._optimizer.ipu_state_is_dirty:
            assert not self._optimizer.host_state_is_dirty, (
                "Both host and ipu states cannot be dirty at the same time.")
            if self._optimizer.has_state():
                self.copyWeightsToHostIfNeeded()
                self._write_device_optimizer_state(self._optimizer.state_dict())
            self._optimizer.ipu_state_is_dirty = False

    def setOptimizer(self, optimizer):
        """631-669."""
        if self.isCompiled() and optimizer != self._optimizer:
            if self._optimizer and isinstance(self._optimizer, optim.Optimizer):
                self._read_optim_state_dict_if_needed()
                self._optimizer.state_dict = self._optimizer.get_state_dict
            if isinstance(optimizer, optim.Optimizer):
                optimizer.ipu_state_is_dirty = True
        if isinstance(optimizer, optim.Optimizer):
            optimizer.state_dict = MethodType(PoplarExecutor._get_optim_state_dict, self)
        self._optimizer = optimizer
        # An inference model has no _attribute_tracker: __getattr__ sends the lookup to the
        # user's model, which raises AttributeError (658-660 -> 480-481).
        _ = self._attribute_tracker
        dict_optimizer = _convert_optimizer(optimizer, self._options, self.isCompiled())
        if dict_optimizer != self._dict_optimizer:
            self._dict_optimizer = dict_optimizer
            self._ipu_optimizer_is_dirty = True
        # (A new optimizer object does not reset the state on the IPU: PopART keeps its
        # optimizer state tensors unless the new optimizer has a state to write, 439-456.)
        if self.record is not None:
            self.record["set_optimizer_lrs"].append(optimizer.param_groups[0]["lr"])
        if self.isAttachedToDevice():
            self._update_optimizer_if_needed()
            self._write_optim_state_dict_if_needed()

    # ---------------------------------------------------------------- weights

    def copyWeightsToHostIfNeeded(self) -> bool:
        # 543-552
        if self._dirty_host_weights:
            self._copy_weights_to_host()
            return True
        return False

    def _copy_weights_to_host(self):
        if not self.isCompiled():
            raise createPoptorchError(NO_EXECUTABLE_ERR)
        self._dirty_host_weights = False
        self._host_weights_version += 1

    def copyWeightsToHost(self) -> None:
        """555-573: raises poptorch.Error(NO_EXECUTABLE_ERR) before the first compilation.

        The double also refuses it on an executable detached from its device. UNVERIFIED: of
        this, only "PopTorch has no check" is in the PopTorch repository (Compiler.cpp
        :1106-1131 goes straight to PopART's Session::weightsToHost); the rest reads PopART
        (not in it), so the refusal is the double's caution, not PopTorch's behaviour. PopART's
        Devicex::run (willow/src/popx/devicex.cpp:241-250, sdk-release-3.4) finds no
        engine loaded and loads it again onto the detached device
        (loadEngineAndConnectStreams, 1307-1330) without writing the weights to it: at best a
        Poplar error, at worst the device's memory copied over the host's weights. Its
        detachFromDevice already brought the weights to the host (1553-1569), so nothing
        needs it; the message below is the double's."""
        if self.isCompiled() and not self._is_attached:
            raise createPoptorchError(
                "poptorch double: copyWeightsToHost() on an executable detached from its device "
                "(detachFromDevice() already copied its weights to the host); attach it first")
        self._copy_weights_to_host()
        self.record["copy_weights_to_host"] += 1

    def _copy_weights_to_device(self):
        if not self.isCompiled():
            raise createPoptorchError(NO_EXECUTABLE_ERR)
        self._dirty_host_weights = False
        if self._optimizer:
            self._optimizer.state_dict()  # 589-590: syncs the optimizer state to the host

    def copyWeightsToDevice(self) -> None:
        """577-598."""
        self._copy_weights_to_device()
        self.record["copy_weights_to_device"] += 1

    def load_state_dict(self, state_dict, strict: bool = True):
        # 458-474
        out = self._user_model.load_state_dict(state_dict, strict)
        if self.isAttachedToDevice():
            self.copyWeightsToDevice()
        return out

    # ---------------------------------------------------------------- device

    def isAttachedToDevice(self) -> bool:
        # 1539-1546
        if not self.isCompiled():
            return False
        return self._is_attached

    def isCompiled(self) -> bool:
        # 1548-1551
        return bool(self._executable)

    def _attach_ipus(self):
        if _uses_ipu_model(self._options):
            return
        num = _num_ipus(self._options)
        _acquire(num)
        self._ipus_held = num

    def _release_ipus(self):
        IPUS_IN_USE[0] -= self._ipus_held
        self._ipus_held = 0

    def detachFromDevice(self) -> None:
        # 1553-1569
        if not self.isCompiled():
            raise createPoptorchError(NO_EXECUTABLE_ERR)
        if not self._is_attached:
            raise createPoptorchError("Device is not attached")
        _ = self.rng_state
        if self._training:
            self.copyWeightsToHostIfNeeded()
            self._read_optim_state_dict_if_needed()
        self._release_ipus()
        self._is_attached = False
        self.record["detach"] += 1

    def attachToDevice(self) -> None:
        # 1571-1586
        if not self.isCompiled():
            raise createPoptorchError(NO_EXECUTABLE_ERR)
        assert self._options.connection_type != enums.ConnectionType.Never, (
            "Trying to attach to an offline device (ConnectionType.Never)")
        if self._is_attached:
            raise createPoptorchError("Device is already attached")
        self._attach_ipus()
        self._is_attached = True
        self.record["attach"] += 1
        self._on_device_attach()

    def destroy(self) -> None:
        # 1482-1501: nothing at all if never compiled (a training model stays wrapped!)
        if not self.isCompiled():
            return
        if self._training:
            self.copyWeightsToHostIfNeeded()
            self._optimizer.state_dict()
        self._executable = None
        self._release_ipus()  # the executable owned the device
        if not self._training:
            return
        if not _is_wrapped(self._user_model):
            raise createPoptorchError("model was never wrapped")
        _unwrap(self._user_model)

    @property
    def rng_state(self) -> List[int]:
        # 1122-1133: refreshed only after a run (1285); before one, what __init__ cached
        # (224-226: [random_seed], or None without one). [seed, calls] stands in for
        # getRandomSeed + getRngState.
        if not self.isCompiled():
            raise createPoptorchError(NO_EXECUTABLE_ERR)
        if self._host_rng_state_is_dirty:
            self._host_rng_state_is_dirty = False
            seed = self._options._values.get("random_seed", 0)
            self._cached_rng_state = [seed, self.calls]
        return self._cached_rng_state

    # ---------------------------------------------------------------- misc API

    @property
    def model(self):
        return self._user_model  # 511-514

    @property
    def options(self) -> Options:
        return self._options

    def __repr__(self):
        return repr(self._user_model)

    def __getattr__(self, attr):
        # 480-509: everything else is the user's model's
        if attr in ("_user_model", "__setstate__", "__getstate__"):
            raise AttributeError(attr)
        return getattr(self._user_model, attr)

    # ---------------------------------------------------------------- compile / run

    def _per_call(self):
        opts = self._options
        input_group_count = opts.replication_factor // opts.input_group_size
        return (opts.device_iterations * input_group_count *
                opts.Training.gradient_accumulation)

    def _check_batch_dims(self, bound):
        # _narrow_tensor, 1503-1537 (an assertion, before anything is traced or attached)
        opts = self._options
        per_call = self._per_call()
        for tensor in _flatten([v for _, v in bound], []):
            b_size = 1 if not tensor.size() else tensor.size()[0]
            assert b_size % per_call == 0, (
                "Invalid batch dimension: In the input %s, the batch "
                "dimension (%d) must be a multiple of "
                "Options.deviceIterations(%d) * "
                "(Options.replicationFactor(%d) / "
                "Options.inputReplicaGrouping.input_group_size(%d)) * "
                "Options.Training.gradientAccumulation(%d) = %d "
                "because it is used to calculate the batch size which will "
                "be executed on the device in any given iteration. For a "
                "full explanation see the batching semantics page of the "
                "documentation.") % (tensor.shape, b_size, opts.device_iterations,
                                     opts.replication_factor, opts.input_group_size,
                                     opts.Training.gradient_accumulation, per_call)

    def _compile(self, bound):
        # 947-1004 (+ _preprocessGraph 1006-1024, _compileWithDispatch 694-944)
        self._check_batch_dims(bound)
        for _, value in bound:
            for t in _flatten(value, []):
                if t.requires_grad:
                    warn("Input tensor has requires_grad=True set. This tensor will be detached "
                         "because backward pass via inputs is not supported.")  # 1011-1020
        self._executable_inputs = [(n, _map_tensors(v, lambda t: t.detach().clone()))
                                   for n, v in bound]
        # Double-only: the shapes compiled for, by the forward's parameter names.
        self.record["input_shapes"] = {n: [list(t.shape) for t in _flatten(v, [])]
                                       for n, v in bound}
        use_model = _uses_ipu_model(self._options)
        if use_model:
            if self._options.connection_type == enums.ConnectionType.Never:
                raise _cpp_error("ConnectionType.Never / poptorch.Options.useOfflineIpuTarget "
                                 "not supported for the IPU model",
                                 "popart_compiler/source/CompilerImpl.cpp:653")
            if self._options._popart.options.get("enableEngineCaching"):
                warn("enableExecutableCaching doesn't work with the IPU model")  # 641-643
            if self._options.replication_factor > 1:
                # Nothing in PopTorch's Python refuses this; the IPU Model device is created
                # with numIPUs = replicas (CompilerImpl.cpp:644-657) and the compilation of the
                # replicated graph fails in PopART/Poplar ("Replication is not supported on
                # IPU Model targets": PopART docs/popart/performance.rst:83; PopTorch's own
                # docs/user_guide/device_iterations.py:5-7 skips replication without hardware).
                # The exact Poplar message is not in the sources: the text below is the
                # double's.
                raise _cpp_error(
                    "Replication is not supported on IPU Model targets "
                    f"(replicationFactor({self._options.replication_factor}) with "
                    "useIpuModel(True))", "popart_compiler/source/CompilerImpl.cpp:657",
                    kind="poplar_error")
        if self._options.output_mode == enums.OutputMode.EveryN:
            # PopART DataFlow::isValidAnchorReturnPeriod (willow/src/dataflow.cpp:218-231)
            period, steps = self._options.output_return_period, self._options.device_iterations
            if period > steps:
                raise _cpp_error("Return period must be <= to the number of batches per step",
                                 "willow/src/dataflow.cpp:222", kind="popart_exception")
            if steps % period != 0:
                raise _cpp_error("Return period must be a factor of the number of batches "
                                 "per step", "willow/src/dataflow.cpp:227",
                                 kind="popart_exception")
        self._compiled_modes = None  # taken at the first forward (the trace)
        if self._options.connection_type != enums.ConnectionType.Never:
            # Always: attached when the device is created; OnDemand: at
            # loadEngineAndConnectStreams (992-993). Both before the first run.
            self._attach_ipus()
            self._executable = True
            self._is_attached = True
        else:
            self._executable = True  # offline compilation: no device
            self._is_attached = False
        self._synthetic = self._options._popart.options.get("syntheticDataMode", 0) or 0
        if self._is_attached:
            self._on_device_attach()  # 1003-1004

    def compile(self, *args, **kwargs) -> None:
        # 1026-1043
        bound = _bind(self._signature, args, kwargs)
        if self._executable is not None:
            warn("Call to compile() ignored: the executable is already compiled")
        else:
            self._compile(bound)

    def __call__(self, *args, **kwargs):
        """1223-1306."""
        assert self._options.connection_type != enums.ConnectionType.Never, (
            "Trying to run a model on an offline device "
            "(ConnectionType.Never): use model.compile(inputs) instead of"
            " model(inputs)")
        bound = _bind(self._signature, args, kwargs)
        first = not self.isCompiled()
        if first:
            self._compile(bound)
        if not self._is_attached:
            self.attachToDevice()
        if not self._training:
            hook = getattr(self._user_model, "copyWeightsToHostIfNeeded", None)
            if callable(hook):
                hook()  # 1250-1262: a training model of the same weights syncs first
                # 1255-1262: weights the training model brought to the host since this
                # executable last had them are copied to its device ("Implicit
                # copyWeightsToDevice()"). The double computes with the host weights either
                # way; the copy is recorded.
                version = self._user_model._host_weights_version
                if self._host_weights_version != version:
                    self.copyWeightsToDevice()
                    self._host_weights_version = version
        compiled = self._executable_inputs
        if len(compiled) != len(bound):
            raise createPoptorchError("Number of positional arguments mismatch: expected "
                                      f"{len(compiled)} arguments but got {len(bound)}."
                                      f"{_INPUTS_END}")
        for (name, c), (_, g) in zip(compiled, bound):
            _validate(name, c, g)  # 1264
        self._write_optim_state_dict_if_needed()  # 1268
        output = self._execute(bound, trace=first)
        self._host_rng_state_is_dirty = True  # 1285
        if self._training:
            self._dirty_host_weights = True  # 1286-1287
        if self._optimizer and isinstance(self._optimizer, optim.Optimizer):
            self._optimizer.host_state_is_dirty = True  # 1289-1292
        return output

    # -- the double's execution of the compiled graph
    def _micro_inputs(self, bound):
        opts = self._options
        D = opts.device_iterations
        A = opts.Training.gradient_accumulation
        R = opts.replication_factor
        G = R // opts.input_group_size
        per_call = D * G * A

        def split(t):
            if t.dim() == 0:
                return None
            micro = t.shape[0] // per_call
            # host layout: [device iteration][accumulation][replica (input group)][micro-batch]
            return t.reshape(D, A, G, micro, *t.shape[1:])

        synthetic = self._synthetic
        steps = []
        for d in range(D):
            for a in range(A):
                for r in range(R):
                    if opts.input_cgt == enums.CommGroupType.Orthogonal:
                        g = r % G
                    else:
                        g = r // opts.input_group_size

                    def pick(t, d=d, a=a, g=g):
                        s = split(t)
                        if s is None:
                            return t
                        micro = s[d, a, g]
                        if synthetic:
                            return self._synthetic_like(micro)
                        return micro

                    steps.append(((d, a, r), [(n, _map_tensors(v, pick)) for n, v in bound]))
        return steps, D, A, R

    def _synthetic_like(self, micro):
        """PopART Ir (willow/src/ir.cpp:2447-2480 at sdk/poplar/3.4.0): with synthetic data the
        input streams are not read; each input tensor is initialised ONCE, at compilation, with
        zeros (Zeros=1) or N(0,1) draws from a default-seeded std::mt19937 (RandomNormal=2)
        converted to the input's type - the same data at every step and call. The double draws
        from torch.Generator(5489) (not bit-identical) and, for integer inputs, uses zeros (the
        real truncated normals include negatives, which CPU ops such as nll_loss reject while
        the IPU does not check)."""
        cache = self.__dict__.setdefault("_synthetic_cache", {})
        key = (tuple(micro.shape), micro.dtype)
        if key not in cache:
            if self._synthetic == 2 and micro.dtype.is_floating_point:
                gen = torch.Generator().manual_seed(5489)
                cache[key] = torch.randn(micro.shape, generator=gen).to(micro.dtype)
            else:
                cache[key] = torch.zeros(micro.shape, dtype=micro.dtype)
        return cache[key]

    def _run_model(self, inputs):
        args, kwargs = [], {}
        params = self._signature.parameters if self._signature is not None else {}
        for name, value in inputs:
            p = params.get(name)
            if p is not None and p.kind == p.KEYWORD_ONLY:
                kwargs[name] = value
            elif p is None and not name.startswith("*"):
                kwargs[name] = value
            else:
                args.append(value)
        return self._model(*args, **kwargs)

    def _execute(self, bound, trace):
        steps, D, A, R = self._micro_inputs(bound)
        self.calls += 1
        n = _flatten([v for _, v in bound], [])
        batch = n[0].shape[0] if n and n[0].dim() else 1
        self.record["calls"] += 1
        self.record["samples"] += batch
        if batch not in self.record["input_batch_sizes"]:
            self.record["input_batch_sizes"].append(batch)
        modules = list(self._model.modules())
        user_modes = [m.training for m in modules]
        if self._compiled_modes is None:
            # The graph is traced at the first call with the modes the modules have then; the
            # top-level flag is the wrap-time copy's (__init__.py:667-676, 710: copy.copy).
            self._compiled_modes = [m.training for m in modules]
        ops._RUNNING[0] = self
        _IPU_CONTEXT[0] = True
        try:
            for m, mode in zip(modules, self._compiled_modes):
                m.training = mode
            if self._training:
                results = self._train(steps, D, A, R, trace)
            else:
                with torch.no_grad():
                    before = self._versions() if trace else None
                    results = []
                    for _, inputs in steps:
                        results.append(self._run_model(inputs))
                        if before is not None:
                            self._check_buffer_broadcast(before)
                            before = None
        finally:
            active = ops._ACTIVE_MULTICONV[0]
            if active is not None:  # a scope left open by an error
                if active._hook is not None:
                    active._hook.remove()
                    active._hook = None
                ops._ACTIVE_MULTICONV[0] = None
            ops._RUNNING[0] = None
            _IPU_CONTEXT[0] = False
            for m, mode in zip(modules, user_modes):
                m.training = mode
        return self._select(results, D * A, R)

    def _versions(self):
        return {n: t._version for n, t in
                list(self._model.named_parameters()) + list(self._model.named_buffers())}

    def _check_buffer_broadcast(self, before):
        """InplaceOps.cpp:224-233 via LowerToPopartFactories.cpp:41-43: with replication
        (replication_factor > input_group_size, SessionOptions.cpp:468-471) and
        broadcastBuffers (default True), a graph that updates a parameter or buffer in place
        (BatchNorm's num_batches_tracked += 1 in training) fails to compile."""
        opts = self._options
        if not (opts.replication_factor > opts.input_group_size and opts.broadcast_buffers):
            return
        for name, t in list(self._model.named_parameters()) + list(self._model.named_buffers()):
            if t._version != before.get(name, t._version):
                raise _cpp_error(
                    "PopTorch does not support broadcasting buffers. If your "
                    "model is able to tolerate buffers becoming out of sync "
                    "between replicas, you can disable buffer broadcasting using "
                    "poptorch.Options.broadcastBuffers(False).",
                    "poptorch/source/InplaceOps.cpp:228")

    def _train(self, steps, D, A, R, trace):
        optimizer = self._optimizer
        results = []
        host_state = optimizer.state
        i = 0
        for d in range(D):
            optimizer.zero_grad(set_to_none=True)
            for a in range(A):
                for r in range(R):
                    _, inputs = steps[i]
                    i += 1
                    before = self._versions() if trace and i == 1 else None
                    returned = self.__dict__.get("_loss_is_returned", False)
                    if returned:
                        out = self._run_model(inputs)
                        loss = out[-1] if isinstance(out, (tuple, list)) else out
                    else:
                        with _LossTracer() as tracer:
                            out = self._run_model(inputs)
                        loss = tracer.final_loss()
                        if self.calls == 1:
                            # PopTorch traces once (the first call): when its loss is what
                            # forward returns, later steps skip the (slow) dispatch mode.
                            last = out[-1] if isinstance(out, (tuple, list)) else out
                            self._loss_is_returned = last is loss
                    if before is not None:
                        self._check_buffer_broadcast(before)
                    if loss.dim():
                        # reduction "none" on a tensor: the double seeds every element's
                        # gradient with 1 (PopART's identityloss is not in these sources:
                        # unverified).
                        loss = loss.sum()
                    # Gradients reduced with Mean over replicas and accumulation
                    # (accumulation_and_replication_reduction_type default Mean,
                    # options.py:210-214)
                    if opts_mean(self._options):
                        (loss / (A * R)).backward()
                    else:
                        loss.backward()
                    results.append(_map_tensors(out, lambda t: t.detach()))
            if self._options.Distributed.numProcesses > 1:
                _reduce_across_processes(optimizer, opts_mean(self._options))
            # One optimizer step per device iteration, with the state kept "on the IPU".
            optimizer.state = self._device_opt_state
            try:
                optimizer.step()
            finally:
                self._device_opt_state = optimizer.state
                optimizer.state = host_state
        return results

    def _select(self, results, iterations, replicas):
        """Output shapes per output mode: PoplarExecutable.cpp:114-124 and
        Compiler.cpp:1310-1336 (popartBatchDimForAnchor): All -> replicas x device iterations
        x accumulation rows per output, EveryN -> that / N (every N-th device iteration),
        Final and Sum -> one per replica; a factor of 1 leaves the output as is (a scalar loss
        stays a scalar), otherwise scalars become 1-D. Long outputs come back as int32 and double as float32
        (_poplar_executor.py:865-874)."""
        opts = self._options
        mode = enums.OutputMode(opts.output_mode)
        flat = [_flatten(r, []) for r in results]
        n_out = len(flat[0])
        chosen_per_output = []
        for k in range(n_out):
            per_step = [[flat[s * replicas + r][k] for r in range(replicas)]
                        for s in range(iterations)]
            if mode == enums.OutputMode.All:
                chosen = [t for step in per_step for t in step]
            elif mode == enums.OutputMode.EveryN:
                # PopART: "Copy program runs at the end of every N batches" (batches = device
                # iterations), with every accumulation micro-batch of those
                # (willow/src/popx/irlowering.cpp:3184-3197, dataflow.cpp:204-207).
                period = opts.output_return_period
                accumulation = opts.Training.gradient_accumulation
                chosen = [t for s, step in enumerate(per_step)
                          if (s // accumulation + 1) % period == 0 for t in step]
            elif mode == enums.OutputMode.Final:
                chosen = per_step[-1]
            elif mode == enums.OutputMode.Sum:
                chosen = [sum(per_step[s][r] for s in range(iterations))
                          for r in range(replicas)]
            else:
                raise AssertionError("An output mode must be picked before serialisation")
            if len(chosen) == 1:
                out = chosen[0]
            else:
                out = torch.cat([t.reshape(1) if t.dim() == 0 else t for t in chosen])
            if out.dtype == torch.long:
                out = out.int()
            elif out.dtype == torch.double:
                out = out.float()
            out = out.detach().clone()
            out.backward = _backward_error
            chosen_per_output.append(out)
        it = iter(chosen_per_output)
        return _map_tensors(results[0], lambda _: next(it))


def opts_mean(options):
    return options.Training.accumulation_and_replication_reduction_type != \
        enums.ReductionType.Sum


def _backward_error(*args, **kwargs):
    # _poplar_executor.py:1308-1321
    raise createPoptorchError(
        "backward() cannot be called explicitly on "
        "outputs of a PopTorch model. If you're using a trainingModel, "
        "the backwards pass is performed automatically when invoking "
        "the model. If you're using an inferenceModel, you should use "
        "a trainingModel instead.")


def trainingModel(model, options: Optional[Options] = None, optimizer=None) -> PoplarExecutor:
    """__init__.py:660-717."""
    if isinstance(model, PoplarExecutor):
        model = model._user_model
    if _is_wrapped(model):
        raise _RuntimeError("Model has already been wrapped in "
                            "'poptorch.trainingModel'. Call model.destroy() "
                            "on the model to unwrap before wrapping again.")
    maybe_wrapped_model = copy.copy(model)  # a shallow copy: its own `training` flag
    return PoplarExecutor(model=maybe_wrapped_model, options=options, training=True,
                          optimizer=optimizer, user_model=model, poptorch_version=__version__)


def inferenceModel(model, options: Optional[Options] = None) -> PoplarExecutor:
    """__init__.py:720-746."""
    if isinstance(model, PoplarExecutor):
        model = model._user_model
    return PoplarExecutor(model=copy.copy(model), options=options, training=False,
                          poptorch_version=__version__)


def _reduce_across_processes(optimizer, mean):
    """Distributed replicated graphs (PopRun instances): popart_compiler/source/Compiler.cpp
    :655-666 sets enableDistributedReplicatedGraphs when numProcesses > 1, with
    globalReplicationFactor = processes x local replicas, so the gradient reduction spans
    every replica of every process (Mean: over all of them). The IPUs do it over their links;
    the double does it over torch.distributed (the group the Horovod double's init() made)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise createPoptorchError(
            "poptorch double: numProcesses > 1 needs torch.distributed (hvd.init()) to reduce "
            "gradients across processes")
    size = dist.get_world_size()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                if mean:
                    p.grad /= size
