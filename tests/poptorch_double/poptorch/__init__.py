"""A test double of ``poptorch`` for machines without IPUs (put on sys.path by the tests only).

It enforces the parts of the real API (graphcore/poptorch, python/) that octconv-exp relies
on, with the real names, signatures and semantics, and computes on the CPU:

- ``Options``: the setters used here, type checks, frozen once a DataLoader or a model uses
  them (``_freeze``), ``clone``; the attributes ``device_iterations``, ``replication_factor``,
  ``Training.gradient_accumulation``, ``output_mode``.
- ``DataLoader(options, dataset, batch_size, shuffle, num_workers, drop_last,
  persistent_workers, auto_distributed_partitioning, mode, async_options,
  rebatched_worker_size, **kwargs)``: batches of the combined size
  batch_size x device_iterations x replicas x gradient_accumulation; Async mode refuses
  drop_last=False (the AsynchronousDataAccessor needs rebatching for that).
- ``trainingModel`` / ``inferenceModel`` -> ``PoplarExecutor``: the combined batch must be a
  multiple of device_iterations x replicas x gradient_accumulation and keeps the shape it was
  compiled with; it is split into micro-batches (one per replica and accumulation step), with
  one optimizer step per device iteration (gradients averaged over replicas and accumulation
  steps); outputs follow the output mode (training default Final: the last micro-batch of
  every replica; inference default All); inference refuses gradient accumulation; a model is
  wrapped for training only once; the IPUs a model attaches to stay taken until
  ``detachFromDevice()``; the train/eval mode is the one the model had when it was wrapped.
- ``MultiConv``: the option setters with PopTorch's checks, no nesting, and per-convolution
  option lists of length 1 or exactly the number of convolutions run inside the scope.

Everything the code under test asks of PopTorch is recorded in ``LOG`` and, when the
environment variable ``POPTORCH_DOUBLE_LOG`` names a file, written there as JSON at exit.
Environment: ``POPTORCH_DOUBLE_IPUS`` (default 0) is the number of physical IPUs the machine
pretends to have; the IPU Model (``useIpuModel(True)``) always has enough.
"""
import atexit
import copy
import json
import os

import torch

from . import optim
from .enums import (ConnectionType, DataLoaderMode, MultiConvPlanType, OutputMode,
                    SyntheticDataMode)

__version__ = "3.3.0+double"

LOG = {"options": [], "dataloaders": [], "executors": [], "multiconv": [], "events": []}


def _write_log():
    path = os.environ.get("POPTORCH_DOUBLE_LOG")
    if path:
        with open(path, "w") as f:
            json.dump(LOG, f, indent=1, default=str)


atexit.register(_write_log)


class PoptorchError(RuntimeError):
    pass


def ipuHardwareIsAvailable(num_ipus=1):
    return int(os.environ.get("POPTORCH_DOUBLE_IPUS", "0")) >= num_ipus


# ------------------------------------------------------------------------------- options


class _OptionsDict:
    def __init__(self, **values):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_frozen", False)

    def set(self, **kwargs):
        if self._frozen:
            raise PoptorchError("Options are frozen: they can't be modified once a DataLoader "
                                "or a model has used them. Use options.clone().")
        for key, value in kwargs.items():
            if key not in self._values:
                raise ValueError(f"Invalid option {key}")
            self._values[key] = value

    def createOrSet(self, **kwargs):
        if self._frozen:
            raise PoptorchError("Options are frozen")
        self._values.update(kwargs)

    def exists(self, name):
        return name in self._values

    def __getattr__(self, name):
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        raise AttributeError(name)

    def __setattr__(self, name, value):
        raise AttributeError("Use the setters to change options")


class _TrainingOptions(_OptionsDict):
    def __init__(self):
        super().__init__(gradient_accumulation=1)

    def gradientAccumulation(self, gradient_accumulation: int):
        if not isinstance(gradient_accumulation, int) or gradient_accumulation < 1:
            raise ValueError("gradientAccumulation must be a positive integer")
        self.set(gradient_accumulation=gradient_accumulation)
        return self


class _DistributedOptions(_OptionsDict):
    def __init__(self):
        super().__init__(num_distributed_processes=1, distributed_process_id=0)

    @property
    def numProcesses(self):
        return self.num_distributed_processes

    @property
    def processId(self):
        return self.distributed_process_id


class _PopartOptions:
    def __init__(self):
        self.options = {}
        self.frozen = False

    def set(self, key, value):
        if self.frozen:
            raise PoptorchError("Options are frozen")
        self.options[key] = value
        return self


class Options(_OptionsDict):
    def __init__(self):
        super().__init__(replication_factor=1, device_iterations=1, output_mode=OutputMode.Default,
                         output_return_period=1, use_model=False, available_memory_proportion={},
                         connection_type=ConnectionType.Always.value)
        object.__setattr__(self, "_training", _TrainingOptions())
        object.__setattr__(self, "_distributed", _DistributedOptions())
        object.__setattr__(self, "_popart", _PopartOptions())

    @property
    def Training(self):
        return self._training

    @property
    def Distributed(self):
        return self._distributed

    @property
    def _Popart(self):
        return self._popart

    def _freeze(self):
        object.__setattr__(self, "_frozen", True)
        object.__setattr__(self._training, "_frozen", True)
        self._popart.frozen = True

    def clone(self):
        new = copy.deepcopy(self)
        object.__setattr__(new, "_frozen", False)
        object.__setattr__(new._training, "_frozen", False)
        new._popart.frozen = False
        return new

    def deviceIterations(self, device_iterations: int):
        if not isinstance(device_iterations, int) or device_iterations < 1:
            raise ValueError("deviceIterations must be a positive integer")
        self.set(device_iterations=device_iterations)
        return self

    def replicationFactor(self, replication_factor: int):
        if not isinstance(replication_factor, int) or replication_factor < 1:
            raise ValueError("replicationFactor must be a positive integer")
        self.set(replication_factor=replication_factor)
        return self

    def randomSeed(self, random_seed: int):
        assert isinstance(random_seed, int)
        torch.manual_seed(random_seed)
        self.createOrSet(random_seed=random_seed)
        return self

    def enableExecutableCaching(self, path: str):
        if path is None:
            self._Popart.set("enableEngineCaching", False)
        else:
            if not isinstance(path, str):
                raise TypeError("enableExecutableCaching expects a str path")
            self._Popart.set("cachePath", path)
            self._Popart.set("enableEngineCaching", True)
        return self

    def useIpuModel(self, use_model: bool):
        if not isinstance(use_model, bool):
            raise TypeError("useIpuModel expects a bool")
        self.createOrSet(use_model=use_model)
        return self

    def outputMode(self, output_mode, output_return_period=None):
        assert isinstance(output_mode, OutputMode)
        if output_mode == OutputMode.EveryN:
            assert output_return_period and output_return_period > 0
        self.set(output_mode=output_mode, output_return_period=output_return_period or 1)
        return self

    def defaultOutputMode(self):
        return self.output_mode == OutputMode.Default

    def setAvailableMemoryProportion(self, available_memory_proportion):
        actual = {}
        for key, mem in available_memory_proportion.items():
            assert key.startswith("IPU"), ("Available memory proportions are expected to be in "
                                           "a dictionary of {\"IPU0\": 0.5}")
            actual[int(key[3:])] = mem
        self.createOrSet(available_memory_proportion=actual)
        return self

    def enableSyntheticData(self, enabled: bool):
        self._Popart.set("syntheticDataMode", 2 if enabled else 0)
        return self

    def anchorMode(self, *args, **kwargs):
        raise AttributeError("anchorMode was removed from PopTorch: use outputMode")

    def _summary(self):
        return {"device_iterations": self.device_iterations,
                "replication_factor": self.replication_factor,
                "gradient_accumulation": self.Training.gradient_accumulation,
                "output_mode": OutputMode(self.output_mode).name,
                "use_model": self.use_model,
                "random_seed": self._values.get("random_seed"),
                "available_memory_proportion": dict(self.available_memory_proportion),
                "popart": dict(self._popart.options)}


# ------------------------------------------------------------------------------- data


class DataLoader(torch.utils.data.DataLoader):
    def __init__(self, options, dataset, batch_size=1, shuffle=False, num_workers=0,
                 drop_last=True, persistent_workers=None, auto_distributed_partitioning=True,
                 mode=DataLoaderMode.Sync, async_options=None, rebatched_worker_size=None,
                 **kwargs):
        assert isinstance(options, Options)
        assert isinstance(mode, DataLoaderMode)
        options._freeze()
        self._combined_batch_size = (batch_size * options.device_iterations
                                     * options.replication_factor
                                     * options.Training.gradient_accumulation)
        self._options = options
        if mode == DataLoaderMode.Async and not drop_last and self._combined_batch_size > 1:
            raise AssertionError("The 'drop_last=False' option from the DataLoader only works if "
                                 "'rebatched_size' is specified too.")
        LOG["dataloaders"].append({"batch_size": batch_size, "combined": self._combined_batch_size,
                                   "shuffle": shuffle, "drop_last": drop_last,
                                   "num_workers": num_workers, "mode": mode.name,
                                   "dataset_size": len(dataset)})
        # The double loads in the main process: its dataset is in memory already.
        super().__init__(dataset, batch_size=self._combined_batch_size, shuffle=shuffle,
                         num_workers=0, drop_last=drop_last, **kwargs)

    @property
    def combinedBatchSize(self):
        return self._combined_batch_size

    @property
    def options(self):
        return self._options

    def terminate(self):
        LOG["events"].append("dataloader.terminate")


class AsynchronousDataAccessor:
    def __init__(self, dataset, buffer_size=3, miss_sleep_time_in_ms=0.1, load_indefinitely=True,
                 early_preload=False, sharing_strategy=None, rebatched_size=None):
        if isinstance(dataset, DataLoader) and not dataset.drop_last and rebatched_size is None:
            assert dataset.combinedBatchSize in (None, 1), (
                "The 'drop_last=False' option from the DataLoader only works if "
                "'rebatched_size' is specified too.")
        self._dataset = dataset

    def __len__(self):
        return len(self._dataset)

    def __iter__(self):
        return iter(self._dataset)

    def terminate(self):
        pass


# ------------------------------------------------------------------------------- models

_IPUS_IN_USE = [0]


def _available_ipus(options):
    if options.use_model:
        return 1 << 20
    return int(os.environ.get("POPTORCH_DOUBLE_IPUS", "0"))


class PoplarExecutor:
    def __init__(self, model, options, training, optimizer=None):
        if options is not None and not isinstance(options, Options):
            raise PoptorchError(f"Invalid type: 'options' is of type {type(options)} "
                                "(Expected poptorch.Options)")
        if options is None:
            options = Options()
        else:
            options._freeze()
            options = options.clone()
        if training:
            if options.defaultOutputMode():
                options.outputMode(OutputMode.Final)
            if optimizer is None:
                optimizer = optim.SGD(model.parameters(), lr=0.01)
            if not isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW,
                                          torch.optim.RMSprop, optim.Optimizer)):
                raise PoptorchError(f"Unsupported optimizer {type(optimizer).__name__}")
        else:
            if options.defaultOutputMode():
                options.outputMode(OutputMode.All)
            if options.Training.gradient_accumulation != 1:
                raise PoptorchError("You must set poptorch.Options().Training.gradientAccumulation "
                                    "to 1 or leave it as its default value (1) when running a "
                                    "poptorch.inferenceModel().")
            assert not optimizer, "Optimizer should be None for inference"
        options._freeze()
        self._options = options
        self._model = model
        self._training = training
        self._model_training_flag = model.training  # PopTorch copies the mode at wrap time
        self._optimizer = optimizer
        self._compiled_shapes = None
        self._attached = False
        self.calls = 0
        self.samples = 0
        self.record = {"training": training, "options": options._summary(),
                       "model_mode_at_wrap": "train" if model.training else "eval",
                       "calls": 0, "samples": 0, "optimizer": None, "set_optimizer_lrs": [],
                       "copy_weights_to_host": 0, "detach": 0, "input_batch_sizes": []}
        if optimizer is not None:
            self.record["optimizer"] = {"class": type(optimizer).__name__,
                                        "lr": optimizer.param_groups[0]["lr"],
                                        "loss_scaling": optimizer.param_groups[0].get("loss_scaling")}
        LOG["executors"].append(self.record)
        LOG["options"].append(options._summary())

    # -- device management
    def isAttachedToDevice(self):
        return self._attached

    def attachToDevice(self):
        if self._attached:
            raise PoptorchError("Already attached to a device")
        needed = self._options.replication_factor
        if _IPUS_IN_USE[0] + needed > _available_ipus(self._options):
            raise PoptorchError(f"Failed to acquire {needed} IPU(s): "
                                f"{_IPUS_IN_USE[0]} already in use")
        _IPUS_IN_USE[0] += needed
        self._attached = True

    def detachFromDevice(self):
        if self._compiled_shapes is None:
            raise PoptorchError("Model has not been compiled or has been destroyed.")
        if not self._attached:
            raise PoptorchError("Device is not attached")
        _IPUS_IN_USE[0] -= self._options.replication_factor
        self._attached = False
        self.record["detach"] += 1

    def destroy(self):
        if self._attached:
            self.detachFromDevice()
        self._compiled_shapes = None

    def isCompiled(self):
        return self._compiled_shapes is not None

    def copyWeightsToHost(self):
        if self._compiled_shapes is None:
            raise PoptorchError("Model has not been compiled or has been destroyed.")
        self.record["copy_weights_to_host"] += 1

    def copyWeightsToDevice(self):
        if self._compiled_shapes is None:
            raise PoptorchError("Model has not been compiled or has been destroyed.")

    def setOptimizer(self, optimizer):
        if not self._training:
            raise PoptorchError("setOptimizer is only for training models")
        self._optimizer = optimizer
        self.record["set_optimizer_lrs"].append(optimizer.param_groups[0]["lr"])

    @property
    def model(self):
        return self._model

    @property
    def options(self):
        return self._options

    def __getattr__(self, attr):
        return getattr(self._model, attr)

    # -- execution
    def __call__(self, *args):
        opts = self._options
        if any(not isinstance(a, torch.Tensor) for a in args):
            raise TypeError("All forward function arguments must be Tensors")
        if any(a.requires_grad for a in args):
            raise PoptorchError("Input tensor has requires_grad=True")
        D = opts.device_iterations
        R = opts.replication_factor
        A = opts.Training.gradient_accumulation
        per_call = D * R * A
        shapes = [tuple(a.shape) for a in args]
        for shape in shapes:
            if shape[0] % per_call:
                raise AssertionError(
                    f"Invalid batch dimension: In the input {shape}, the batch dimension "
                    f"({shape[0]}) must be a multiple of Options.deviceIterations({D}) * "
                    f"Options.replicationFactor({R}) * Options.Training.gradientAccumulation({A})"
                    f" = {per_call}")
        if self._compiled_shapes is None:
            self._compiled_shapes = shapes  # "compilation" for these input shapes
        elif shapes != self._compiled_shapes:
            raise PoptorchError(f"The model was compiled for inputs of shapes "
                                f"{self._compiled_shapes} and is now called with {shapes}")
        if not self._attached:
            self.attachToDevice()
        self.calls += 1
        self.record["calls"] += 1
        self.record["samples"] += shapes[0][0]
        if shapes[0][0] not in self.record["input_batch_sizes"]:
            self.record["input_batch_sizes"].append(shapes[0][0])
        micro = shapes[0][0] // per_call
        # Batch layout: [device iteration][accumulation step][replica][micro-batch].
        split = [a.reshape(D, A, R, micro, *a.shape[1:]) for a in args]
        was_training = self._model.training
        self._model.train(self._model_training_flag)
        try:
            if self._training:
                outputs, losses = self._train(split, D, A, R)
            else:
                with torch.no_grad():
                    outputs = [self._model(*[s[d, 0, r] for s in split])
                               for d in range(D) for r in range(R)]
                losses = None
        finally:
            self._model.train(was_training)
        return self._select(outputs, losses, D * A, R)

    def _train(self, split, D, A, R):
        outputs, losses = [], []
        for d in range(D):
            self._optimizer.zero_grad(set_to_none=True)
            for a in range(A):
                for r in range(R):
                    out, loss = self._model(*[s[d, a, r] for s in split])
                    (loss / (A * R)).backward()  # Mean reduction over replicas and accumulation
                    outputs.append(out.detach())
                    losses.append(loss.detach())
            self._optimizer.step()  # one optimizer step per device iteration
        return outputs, losses

    def _select(self, outputs, losses, iterations, replicas):
        mode = OutputMode(self._options.output_mode)

        def pick(items, is_loss):
            groups = [items[i * replicas:(i + 1) * replicas] for i in range(iterations)]
            if mode == OutputMode.Final:
                chosen = groups[-1]
            elif mode == OutputMode.All:
                chosen = [t for g in groups for t in g]
            elif mode == OutputMode.Sum:
                chosen = [sum(g[r] for g in groups) for r in range(replicas)]
            else:
                raise PoptorchError(f"Output mode {mode.name} not supported by the double")
            if is_loss:
                stacked = torch.stack(chosen)
                return stacked[0] if stacked.numel() == 1 else stacked
            return torch.cat(chosen)

        if losses is None:
            return pick(outputs, False)
        return pick(outputs, False), pick(losses, True)


def _is_wrapped(model):
    return getattr(type(model), "_poptorch_wrapped", False)


def trainingModel(model, options=None, optimizer=None):
    if isinstance(model, PoplarExecutor) or _is_wrapped(model):
        raise PoptorchError("Model has already been wrapped in 'poptorch.trainingModel'. Call "
                            "model.destroy() on the model to unwrap it before wrapping it again.")
    executor = PoplarExecutor(model, options, training=True, optimizer=optimizer)
    wrapper = type("Poptorch" + type(model).__name__, (type(model),), {"_poptorch_wrapped": True})
    model.__class__ = wrapper
    return executor


def inferenceModel(model, options=None):
    if isinstance(model, PoplarExecutor):
        raise PoptorchError("inferenceModel expects a torch.nn.Module")
    return PoplarExecutor(model, options, training=False)


# ------------------------------------------------------------------------------- ops

_ACTIVE_MULTICONV = [None]


class MultiConv:
    def __init__(self):
        self._available_memory_proportions = None
        self._partials_types = None
        self._plan_type = None
        self._per_conv_reserved_tiles = None
        self._cycle_back_off = None
        self._enable_conv_ditherings = None
        self._convs = 0
        self._hook = None

    @staticmethod
    def _validatePerConvProperty(name, value, expected_scalar_type):
        if value is None:
            return value
        if isinstance(value, expected_scalar_type):
            return (value,)
        if isinstance(value, (list, tuple)) and len(value) > 0 and all(
                isinstance(x, expected_scalar_type) for x in value):
            return value
        raise AssertionError(f"Invalid {name}!")

    def availableMemoryProportions(self, value):
        self._available_memory_proportions = self._validatePerConvProperty(
            "available memory proportion", value, float)
        return self

    def partialsTypes(self, value):
        def encode(dtype):
            if dtype in (torch.float, torch.float32):
                return 0
            if dtype in (torch.half, torch.float16):
                return 1
            raise ValueError("Invalid partials types. Expecting torch.float or torch.half")

        if isinstance(value, (list, tuple)):
            self._partials_types = [encode(v) for v in value]
        else:
            self._partials_types = (encode(value),)
        return self

    def enableConvDithering(self, value):
        if isinstance(value, bool):
            value = (value,)
        self._enable_conv_ditherings = value
        return self

    def planType(self, value):
        if value is not None and not isinstance(value, MultiConvPlanType):
            raise AssertionError("Invalid plan type!")
        self._plan_type = value
        return self

    def perConvReservedTiles(self, value):
        assert isinstance(value, int)
        self._per_conv_reserved_tiles = value
        return self

    def cycleBackOff(self, value):
        assert isinstance(value, float)
        self._cycle_back_off = value
        return self

    def __enter__(self):
        if _ACTIVE_MULTICONV[0] is not None:
            raise PoptorchError("Nested poptorch.MultiConv is not supported")
        _ACTIVE_MULTICONV[0] = self
        self._convs = 0

        def count(module, inputs, output):
            if isinstance(module, torch.nn.Conv2d):
                self._convs += 1

        self._hook = torch.nn.modules.module.register_module_forward_hook(count)

    def __exit__(self, exc_type, exc, tb):
        self._hook.remove()
        _ACTIVE_MULTICONV[0] = None
        if exc_type is not None:
            return False
        for name, values in (("availableMemoryProportions", self._available_memory_proportions),
                             ("partialsTypes", self._partials_types),
                             ("enableConvDithering", self._enable_conv_ditherings)):
            if values is not None and len(values) not in (1, self._convs):
                raise PoptorchError(f"MultiConv.{name}: {len(values)} values given for "
                                    f"{self._convs} convolutions (expected 1 or {self._convs})")
        record = {"convs": self._convs,
                  "plan_type": None if self._plan_type is None else self._plan_type.name,
                  "available_memory_proportions": None if self._available_memory_proportions is None
                  else list(self._available_memory_proportions),
                  "partials_types": None if self._partials_types is None else list(self._partials_types),
                  "per_conv_reserved_tiles": self._per_conv_reserved_tiles,
                  "cycle_back_off": self._cycle_back_off}
        if record not in LOG["multiconv"]:
            LOG["multiconv"].append(record)
        return False
