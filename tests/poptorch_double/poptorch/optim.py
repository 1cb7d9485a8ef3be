"""poptorch.optim as in PopTorch 3.4 (optim.py at sdk/poptorch/3.4.0).

Real signatures (every optional argument defaults to None, optim.py:196-211, 328-345, 446-464,
572-588, 685-697), ``_parseArgs`` (optim.py:50-64: every argument passed explicitly, i.e. not
None, is *variable* on the IPU; the others are constant, and are left out of the torch
constructor so torch's defaults apply), ``VariableAttributes`` (optim.py:10-47), the IPU state
dict rules of ``Optimizer`` (optim.py:67-105) and LAMB's real (host) ``step`` (optim.py:767-818).

The double computes with the torch optimizer underneath; the executor keeps the per-weight
state "on the device" (see _poplar_executor.py), so ``state_dict()["state"]`` is what torch's
host state is under real PopTorch: empty, with the device state under "ipu_state".
"""
import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch


class VariableAttributes:
    """optim.py:10-47."""

    def __init__(self, variable_attributes: List[str], allowed_attributes: List[str]) -> None:
        self._variable_attributes = variable_attributes
        self._allowed_attributes = allowed_attributes

    def isConstant(self, attr: str) -> bool:
        return attr not in self._variable_attributes

    def markAsConstant(self, attr: str) -> None:
        assert attr in self._allowed_attributes, (
            f"Unknown attribute {attr},"
            f" allowed values: {self._allowed_attributes}")
        self._variable_attributes = [a for a in self._variable_attributes if a != attr]

    def markAsVariable(self, attr: str) -> None:
        assert attr in self._allowed_attributes, (
            f"Unknown attribute {attr},"
            f" allowed values: {self._allowed_attributes}")
        self._variable_attributes.append(attr)


def _parseArgs(all_args: Dict[str, Any], child_attrs: Optional[List[str]] = None):
    """optim.py:50-64: the non-None arguments are the variable ones ("params" included, as in
    the real one); the parent (torch) constructor only gets those."""
    child_attrs = child_attrs or []
    args = all_args.copy()
    del args["self"]
    not_const = [k for k, v in args.items() if v is not None]
    parent_args = {k: v for k, v in args.items() if k in not_const and k not in child_attrs}
    return parent_args, not_const


class Optimizer:
    """optim.py:67-105."""

    def __init__(self):
        self._state_dict = {"ipu_state": None, "ipu_param": None}
        # If True then the state needs to be uploaded to the IPU.
        self.ipu_state_is_dirty = False
        # Once the optimizer has been used on the IPU its state on the host will become dirty.
        self.host_state_is_dirty = False

    def state_dict(self):
        # optim.py:78-79 (a training PoplarExecutor replaces it on the instance with its own
        # reader, _poplar_executor.py:651-655)
        return self.get_state_dict()

    def load_state_dict(self, state):
        # optim.py:81-84: torch's part first (so it is loaded even when the next line refuses
        # the dict), then the IPU part.
        torch.optim.Optimizer.load_state_dict(self, state)
        self.set_state_dict(state)

    def get_state_dict(self):
        # optim.py:87-90: {ipu_state, ipu_param, **torch's state dict}
        return {**self._state_dict, **torch.optim.Optimizer.state_dict(self)}

    def set_state_dict(self, state):
        # optim.py:92-101
        if not state:
            raise RuntimeError("Cannot load optimizer state dictionary because it is empty.")
        if not ("ipu_state" in state and "ipu_param" in state):
            raise RuntimeError("Only IPU optimizer states can be loaded onto the IPU.")
        self._state_dict = state
        self.ipu_state_is_dirty = True
        self.host_state_is_dirty = False

    def has_state(self):
        # optim.py:103-105
        return (self._state_dict.get("ipu_state") is not None
                and self._state_dict.get("ipu_param") is not None)

    def _ipu_getstate(self, state):
        # The tail of every __getstate__ (optim.py:301-304 etc.)
        state["variable_attrs"] = self.variable_attrs
        state["loss_scaling"] = self.loss_scaling
        state["_state_dict"] = self._state_dict
        state["ipu_state_is_dirty"] = self.has_state()
        state["host_state_is_dirty"] = False
        return state


def _check_accum_types(*types):
    # optim.py:274-280 etc.
    supported = [torch.float16, torch.float32]
    for t in types:
        assert t in supported, ("Accumulation types must be either torch.float32"
                                " or torch.float16")


class SGD(Optimizer, torch.optim.SGD):
    """optim.py:108-305. PopART picks the SGD variant per weight when compiling (PopART
    willow/src/sgd.cpp:152-155, 356-425 at sdk/poplar/3.4.0): momentum *constant* and 0 ->
    SGD0 (no optimizer state; with or without gradient accumulation); otherwise
    ``use_combined_accum=True`` -> SGD1 (one combined accumulator/velocity tensor per weight,
    SGDAccumulatorAndMomentum::Combined) and the default ``use_combined_accum=False`` -> SGD2
    (separate accumulator and velocity per weight). PopTorch maps use_combined_accum to
    _OptimizerType.SGD1/SGD2 (_optimizer_attributes.py:316-320). Passing ``momentum=0.0``
    explicitly makes momentum *variable* (_parseArgs), so PopART cannot use SGD0."""
    _child_vars = ["loss_scaling"]
    _child_only = _child_vars + ["velocity_scaling", "use_combined_accum", "accum_type",
                                 "velocity_accum_type", "max_grad_norm"]
    _group_vars = ["lr", "momentum", "dampening", "weight_decay", "nesterov",
                   "velocity_scaling"]

    def __init__(self,
                 params: Iterable,
                 lr: float,
                 momentum: Optional[float] = None,
                 dampening: Optional[float] = None,
                 weight_decay: Optional[float] = None,
                 nesterov: Optional[bool] = None,
                 maximize: Optional[bool] = None,
                 foreach: Optional[bool] = None,
                 differentiable: Optional[bool] = None,
                 loss_scaling: Optional[float] = None,
                 velocity_scaling: Optional[float] = None,
                 use_combined_accum: Optional[bool] = None,
                 accum_type: Optional[torch.dtype] = None,
                 velocity_accum_type: Optional[torch.dtype] = None,
                 max_grad_norm: Optional[float] = None) -> None:
        # pylint: disable=unused-argument
        parent_args, variables = _parseArgs(locals(), SGD._child_only)
        Optimizer.__init__(self)
        torch.optim.SGD.__init__(self, **parent_args)
        if loss_scaling is None:
            loss_scaling = 1.0
        if use_combined_accum is None:
            use_combined_accum = False
        self.use_combined_accum = use_combined_accum
        if accum_type is None:
            accum_type = torch.float32
        if velocity_accum_type is None:
            velocity_accum_type = torch.float32
        # Loss scaling is global: an attribute of the optimizer, not of its groups (250).
        self.loss_scaling = loss_scaling
        if velocity_scaling is None:
            velocity_scaling = 1.0
        if use_combined_accum:
            self.defaults["velocity_scaling"] = velocity_scaling
            for group in self.param_groups:
                group.setdefault("velocity_scaling", velocity_scaling)
        _check_accum_types(accum_type, velocity_accum_type)
        self.accum_type = accum_type
        self.velocity_accum_type = velocity_accum_type
        if max_grad_norm is None:
            max_grad_norm = float("Inf")
        self.max_grad_norm = max_grad_norm
        self.variable_attrs = VariableAttributes(variables,
                                                 list(self.defaults) + SGD._child_vars)

    def __getstate__(self) -> Dict[str, Any]:
        state = torch.optim.SGD.__getstate__(self)
        state["use_combined_accum"] = self.use_combined_accum
        state["accum_type"] = self.accum_type
        state["velocity_accum_type"] = self.velocity_accum_type
        state["max_grad_norm"] = self.max_grad_norm
        return self._ipu_getstate(state)


class Adam(Optimizer, torch.optim.Adam):
    """optim.py:308-420."""
    _child_vars = ["loss_scaling"]
    _child_only = _child_vars + ["accum_type", "first_order_momentum_accum_type",
                                 "second_order_momentum_accum_type", "max_grad_norm"]
    _group_vars = ["lr", "betas", "eps", "weight_decay", "amsgrad"]

    def __init__(self,
                 params: Iterable,
                 lr: Optional[float] = None,
                 betas: Optional[Tuple[float, float]] = None,
                 eps: Optional[float] = None,
                 weight_decay: Optional[float] = None,
                 amsgrad: Optional[bool] = None,
                 foreach: Optional[bool] = None,
                 maximize: Optional[bool] = None,
                 capturable: Optional[bool] = None,
                 differentiable: Optional[bool] = None,
                 fused: Optional[bool] = None,
                 loss_scaling: Optional[float] = None,
                 accum_type: Optional[torch.dtype] = None,
                 first_order_momentum_accum_type: Optional[torch.dtype] = None,
                 second_order_momentum_accum_type: Optional[torch.dtype] = None,
                 max_grad_norm: Optional[float] = None) -> None:
        # pylint: disable=unused-argument
        parent_args, variables = _parseArgs(locals(), Adam._child_only)
        Optimizer.__init__(self)
        torch.optim.Adam.__init__(self, **parent_args)
        self.loss_scaling = 1.0 if loss_scaling is None else loss_scaling
        accum_type = accum_type or torch.float32
        first_order_momentum_accum_type = first_order_momentum_accum_type or torch.float32
        second_order_momentum_accum_type = second_order_momentum_accum_type or torch.float32
        _check_accum_types(accum_type, first_order_momentum_accum_type,
                           second_order_momentum_accum_type)
        self.accum_type = accum_type
        self.first_order_momentum_accum_type = first_order_momentum_accum_type
        self.second_order_momentum_accum_type = second_order_momentum_accum_type
        self.max_grad_norm = float("Inf") if max_grad_norm is None else max_grad_norm
        self.variable_attrs = VariableAttributes(variables,
                                                 list(self.defaults) + Adam._child_vars)

    def __getstate__(self) -> Dict[str, Any]:
        state = torch.optim.Adam.__getstate__(self)
        for key in ("accum_type", "first_order_momentum_accum_type",
                    "second_order_momentum_accum_type", "max_grad_norm"):
            state[key] = getattr(self, key)
        return self._ipu_getstate(state)


class AdamW(Optimizer, torch.optim.AdamW):
    """optim.py:423-542."""
    _child_vars = ["loss_scaling"]
    _child_only = _child_vars + ["bias_correction", "accum_type",
                                 "first_order_momentum_accum_type",
                                 "second_order_momentum_accum_type", "max_grad_norm"]
    _group_vars = ["lr", "betas", "weight_decay", "eps", "amsgrad"]

    def __init__(self,
                 params: Iterable,
                 lr: Optional[float] = None,
                 betas: Optional[Tuple[float, float]] = None,
                 eps: Optional[float] = None,
                 weight_decay: Optional[float] = None,
                 amsgrad: Optional[bool] = None,
                 maximize: Optional[bool] = None,
                 foreach: Optional[bool] = None,
                 capturable: Optional[bool] = None,
                 differentiable: Optional[bool] = None,
                 fused: Optional[bool] = None,
                 loss_scaling: Optional[float] = None,
                 bias_correction: Optional[bool] = None,
                 accum_type: Optional[torch.dtype] = None,
                 first_order_momentum_accum_type: Optional[torch.dtype] = None,
                 second_order_momentum_accum_type: Optional[torch.dtype] = None,
                 max_grad_norm: Optional[float] = None) -> None:
        # pylint: disable=unused-argument
        parent_args, variables = _parseArgs(locals(), AdamW._child_only)
        Optimizer.__init__(self)
        torch.optim.AdamW.__init__(self, **parent_args)
        self.loss_scaling = 1.0 if loss_scaling is None else loss_scaling
        self.bias_correction = True if bias_correction is None else bias_correction
        accum_type = accum_type or torch.float32
        first_order_momentum_accum_type = first_order_momentum_accum_type or torch.float32
        second_order_momentum_accum_type = second_order_momentum_accum_type or torch.float32
        _check_accum_types(accum_type, first_order_momentum_accum_type,
                           second_order_momentum_accum_type)
        self.accum_type = accum_type
        self.first_order_momentum_accum_type = first_order_momentum_accum_type
        self.second_order_momentum_accum_type = second_order_momentum_accum_type
        self.max_grad_norm = float("Inf") if max_grad_norm is None else max_grad_norm
        self.variable_attrs = VariableAttributes(variables,
                                                 list(self.defaults) + AdamW._child_vars)

    def __getstate__(self) -> Dict[str, Any]:
        state = torch.optim.AdamW.__getstate__(self)
        for key in ("bias_correction", "accum_type", "first_order_momentum_accum_type",
                    "second_order_momentum_accum_type", "max_grad_norm"):
            state[key] = getattr(self, key)
        return self._ipu_getstate(state)


class RMSprop(Optimizer, torch.optim.RMSprop):
    """optim.py:545-663."""
    _child_vars = ["loss_scaling"]
    _child_only = _child_vars + ["accum_type", "first_order_momentum_accum_type",
                                 "second_order_momentum_accum_type", "use_tf_variant"]
    _group_vars = ["lr", "momentum", "weight_decay", "alpha", "eps", "centered"]

    def __init__(self,
                 params: Iterable,
                 lr: Optional[float] = None,
                 alpha: Optional[float] = None,
                 eps: Optional[float] = None,
                 weight_decay: Optional[float] = None,
                 momentum: Optional[float] = None,
                 centered: Optional[bool] = None,
                 foreach: Optional[bool] = None,
                 maximize: Optional[bool] = None,
                 differentiable: Optional[bool] = None,
                 loss_scaling: Optional[float] = None,
                 accum_type: Optional[torch.dtype] = None,
                 first_order_momentum_accum_type: Optional[torch.dtype] = None,
                 second_order_momentum_accum_type: Optional[torch.dtype] = None,
                 use_tf_variant: Optional[bool] = None) -> None:
        # pylint: disable=unused-argument
        parent_args, variables = _parseArgs(locals(), RMSprop._child_only)
        Optimizer.__init__(self)
        torch.optim.RMSprop.__init__(self, **parent_args)
        self.loss_scaling = 1.0 if loss_scaling is None else loss_scaling
        accum_type = accum_type or torch.float32
        first_order_momentum_accum_type = first_order_momentum_accum_type or torch.float32
        second_order_momentum_accum_type = second_order_momentum_accum_type or torch.float32
        _check_accum_types(accum_type, first_order_momentum_accum_type,
                           second_order_momentum_accum_type)
        self.accum_type = accum_type
        self.first_order_momentum_accum_type = first_order_momentum_accum_type
        self.second_order_momentum_accum_type = second_order_momentum_accum_type
        self.use_tf_variant = False if use_tf_variant is None else use_tf_variant
        self.variable_attrs = VariableAttributes(variables,
                                                 list(self.defaults) + RMSprop._child_vars)

    def __getstate__(self) -> Dict[str, Any]:
        state = torch.optim.RMSprop.__getstate__(self)
        for key in ("accum_type", "first_order_momentum_accum_type",
                    "second_order_momentum_accum_type", "use_tf_variant"):
            state[key] = getattr(self, key)
        return self._ipu_getstate(state)


class LAMB(Optimizer, torch.optim.Optimizer):
    """optim.py:666-837: a torch.optim.Optimizer (not Adam/AdamW) with the real host step."""
    _child_vars = ["loss_scaling"]
    _child_only = _child_vars + ["bias_correction", "accum_type",
                                 "first_order_momentum_accum_type",
                                 "second_order_momentum_accum_type"]
    _group_vars = ["lr", "weight_decay", "betas", "eps", "max_weight_norm"]

    def __init__(self,
                 params: Iterable,
                 lr: Optional[float] = None,
                 betas: Tuple[float, float] = None,
                 eps: Optional[float] = None,
                 weight_decay: Optional[float] = None,
                 bias_correction: Optional[bool] = None,
                 loss_scaling: Optional[float] = None,
                 max_weight_norm: Optional[float] = None,
                 accum_type: Optional[torch.dtype] = None,
                 first_order_momentum_accum_type: Optional[torch.dtype] = None,
                 second_order_momentum_accum_type: Optional[torch.dtype] = None) -> None:
        # pylint: disable=unused-argument
        _, variables = _parseArgs(locals(), [])
        # optim.py:719-738: LAMB's own defaults.
        max_weight_norm = 65500.0 if max_weight_norm is None else max_weight_norm
        lr = 1e-3 if lr is None else lr
        betas = (0.9, 0.999) if betas is None else betas
        eps = 1e-8 if eps is None else eps
        weight_decay = 1e-2 if weight_decay is None else weight_decay
        bias_correction = True if bias_correction is None else bias_correction
        loss_scaling = 1.0 if loss_scaling is None else loss_scaling
        accum_type = accum_type or torch.float32
        first_order_momentum_accum_type = first_order_momentum_accum_type or torch.float32
        second_order_momentum_accum_type = second_order_momentum_accum_type or torch.float32
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        max_weight_norm=max_weight_norm)
        Optimizer.__init__(self)
        torch.optim.Optimizer.__init__(self, params, defaults)
        _check_accum_types(accum_type, first_order_momentum_accum_type,
                           second_order_momentum_accum_type)
        self.bias_correction = bias_correction
        self.loss_scaling = loss_scaling
        self.max_weight_norm = max_weight_norm
        self.accum_type = accum_type
        self.first_order_momentum_accum_type = first_order_momentum_accum_type
        self.second_order_momentum_accum_type = second_order_momentum_accum_type
        self.variable_attrs = VariableAttributes(variables,
                                                 list(self.defaults) + LAMB._child_vars)

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None) -> Optional[float]:
        # optim.py:767-818, as is.
        loss = None
        if closure is not None:
            loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.data
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                beta1, beta2 = group["betas"]
                if self.bias_correction:
                    bias_correction1 = 1 - beta1**state["step"]
                    bias_correction2 = 1 - beta2**state["step"]
                else:
                    bias_correction1 = 1
                    bias_correction2 = 1
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
                upd = ((exp_avg / bias_correction1) / denom) + group["weight_decay"] * p.data
                r1 = p.data.pow(2).sum().sqrt()
                r2 = upd.pow(2).sum().sqrt()
                r1_ = r1.clamp(max=self.max_weight_norm)
                if r1_ == 0 or r2 == 0:
                    trust = 1.0
                else:
                    trust = r1_ / r2
                p.data.add_(upd, alpha=-group['lr'] * float(trust))
        return loss

    def __getstate__(self) -> Dict[str, Any]:
        state = torch.optim.Optimizer.__getstate__(self)
        for key in ("bias_correction", "accum_type", "first_order_momentum_accum_type",
                    "second_order_momentum_accum_type"):
            state[key] = getattr(self, key)
        return self._ipu_getstate(state)


__all__ = ["VariableAttributes", "Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "LAMB"]
