"""poptorch.Options as in PopTorch 3.4 (options.py, _options_impl.py at sdk/poptorch/3.4.0).

Modelled: the ``OptionsDict`` rules (only declared options, type-checked ``set``, ``createOrSet``,
frozen once used, ``clone`` unfrozen), the setters octconv-exp and the brief need, and the
environment variables the constructors read. Not modelled: Precision, TensorLocations, Jit,
execution strategies (the default ``PipelinedExecution`` is assumed where it matters).
"""
import copy
import json
import os
from typing import Any, Dict, Optional

import torch

from . import enums
from ._errors import _AttributeError
from ._log import warn


class OptionsDict:
    """_options_impl.py:48-188, line for line where it matters."""

    def __init__(self, **default_values):
        self._warnings = {}
        self._warnings_disabled = set()
        self._is_frozen = False
        # _values must be the last attribute set in the __init__ (_options_impl.py:67-68)
        self._values = default_values

    def set(self, **kwargs):
        # _options_impl.py:70-80: the option must exist and keep its type (AssertionError).
        self.checkIsFrozen()
        for option, value in kwargs.items():
            assert self.exists(option), ("Invalid option %s, valid options"
                                         " are %s") % (option, self._values.keys())
            assert isinstance(
                value, type(self._values[option])
            ), "Unexpected type %s for option %s. Expected %s" % (
                type(value), option, type(self._values[option]))
            self._values[option] = value

    def createOrSet(self, **kwargs):
        # _options_impl.py:82-88: a new option takes any type; an existing one is set().
        self.checkIsFrozen()
        for option, value in kwargs.items():
            if option in self._values:
                self.set(**{option: value})
            else:
                self._values[option] = value

    def exists(self, option):
        return option in self._values

    def deleteIfExists(self, option):
        if self.exists(option):
            del self._values[option]

    def _hasattr(self, option):
        if option == "__class__":
            return True
        if option.startswith("_"):
            return option in self.__getstate__().keys()
        return self.exists(option)

    def _changeFreezeState(self, new_state):
        # _options_impl.py:105-113: freezes the nested OptionsDicts and _PopartOptions too.
        self._is_frozen = new_state
        for _, value in self.__dict__.items():
            if isinstance(value, OptionsDict):
                if value._hasattr('_is_frozen'):
                    value._is_frozen = new_state
            else:
                if hasattr(value, '_is_frozen'):
                    value._is_frozen = new_state

    def _freeze(self):
        self._changeFreezeState(True)

    def _unfreeze(self):
        self._changeFreezeState(False)

    def checkIsFrozen(self, option=None):
        # _options_impl.py:121-125: AttributeError("Can't modify frozen Options").
        if self._hasattr('_is_frozen'):
            if option != '_is_frozen' and self._is_frozen:
                raise _AttributeError("Can't modify frozen Options")

    def __deepcopy__(self, memory):
        # _options_impl.py:127-135: copies come out unfrozen.
        opts_class = self.__class__
        copied_options = opts_class.__new__(opts_class)
        memory[id(self)] = copied_options
        for key, val in self.__dict__.items():
            if key == '_is_frozen':
                val = False
            object.__setattr__(copied_options, key, copy.deepcopy(val, memory))
        return copied_options

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __setattr__(self, option, value):
        # _options_impl.py:143-156: ``opts.device_iterations = 3`` is a type-checked set();
        # a new private attribute after __init__ is refused.
        self.checkIsFrozen(option)
        if option.startswith("_"):
            if self._hasattr('_values') and not self._hasattr(option):
                raise AttributeError(
                    f"Invalid private attribute {option}. "
                    f"Valid attributes: {list(self.__dict__.keys())}")
            super().__setattr__(option, value)
        else:
            self.set(**{option: value})

    def __getattr__(self, option):
        # _options_impl.py:158-163
        if not self._hasattr(option):
            raise AttributeError(f"Invalid attribute {option}.")
        if option.startswith("_"):
            return self.__getstate__()[option]
        return self._values[option]

    def update(self, other):
        assert not set(self._values.keys()).intersection(
            other), "Can't merge dictionaries, they have some keys in common"
        other.update(self._values)
        return other

    def toDict(self):
        return self.update({})

    def __call__(self, option):
        return getattr(self, option)

    def __repr__(self):
        return (f"{type(self).__name__}(" + ", ".join(
            f"{k}={v.__repr__()}" for k, v in self._values.items()) + ")")


class _TrainingOptions(OptionsDict):
    """options.py:196-374."""

    def __init__(self, popart_options):
        self._popart_options = popart_options
        super().__init__(gradient_accumulation=1,
                         accumulation_and_replication_reduction_type=enums.ReductionType.Mean,
                         meanAccumulationAndReplicationReductionStrategy=enums.
                         MeanReductionStrategy.Post)

    def gradientAccumulation(self, gradient_accumulation: int):
        # options.py:216-267: only set() (int type check, no range check in Python).
        self.set(gradient_accumulation=gradient_accumulation)
        return self

    def _check_reduction_arg(self, reduction_type, name):
        # options.py:269-276
        incorrect_instance = not isinstance(reduction_type, enums.ReductionType)
        no_red = reduction_type == enums.ReductionType.NoReduction
        if incorrect_instance or no_red:
            raise ValueError(name + " must be set to "
                             "poptorch.ReductionType.Mean or "
                             "poptorch.ReductionType.Sum")

    def accumulationAndReplicationReductionType(self, reduction_type):
        # options.py:278-305
        self._check_reduction_arg(reduction_type, "accumulationAndReplicationReductionType")
        self.set(accumulation_and_replication_reduction_type=reduction_type)
        self._warnings_disabled.add("accumulation_and_replication_reduction_type")
        return self

    def setMeanAccumulationAndReplicationReductionStrategy(self, mean_reduction_strategy):
        # options.py:307-334
        self.set(meanAccumulationAndReplicationReductionStrategy=mean_reduction_strategy)
        return self

    def setAutomaticLossScaling(self, enabled: bool):
        # options.py:336-357
        self._popart_options.set("automaticLossScalingSettings.enabled", enabled)
        return self


class _PopartOptions:
    """options.py:377-446 (not an OptionsDict: any key, frozen with the Options)."""

    def __init__(self) -> None:
        self._is_frozen = False
        self.options = {}
        # options.py:398-399: the two defaults every Options has.
        self.set("instrumentWithHardwareCycleCounter", False)
        self.set("rearrangeAnchorsOnHost", False)

    def __deepcopy__(self, memory):
        # options.py:401-408
        copied_options = _PopartOptions.__new__(_PopartOptions)
        memory[id(self)] = copied_options
        for key, val in self.__dict__.items():
            if key == '_is_frozen':
                val = False
            setattr(copied_options, key, copy.deepcopy(val, memory))
        return copied_options

    def checkIsFrozen(self, option=None):
        # options.py:410-414
        if hasattr(self, '_is_frozen'):
            if option != '_is_frozen' and self._is_frozen:
                raise _AttributeError("Can't modify frozen Options")

    def set(self, key: str, value):
        self.checkIsFrozen()
        self.options[key] = value
        return self

    def setEngineOptions(self, engine_options: Dict[str, str]):
        # options.py:423-426
        self.set('engineOptions', engine_options)
        return self

    def setPatterns(self, patterns: Dict[str, bool], level: int = 2):
        assert isinstance(level, int)
        assert isinstance(patterns, dict)
        self.set("patterns_level", level)
        self.set("patterns", patterns)
        return self

    def __repr__(self):
        body = ", ".join(f"{k}={v.__repr__()}" for k, v in self.options.items())
        return f"{type(self).__name__}({body})"


class _DistributedOptions(OptionsDict):
    """options.py:449-512: the constructor reads OMPI_COMM_WORLD_SIZE / OMPI_COMM_WORLD_RANK
    (setEnvVarNames, options.py:466, 475-490), so under mpirun every Options is distributed."""

    def __init__(self) -> None:
        self._gcd_mappings = {}
        super().__init__(num_distributed_processes=1, distributed_process_id=0,
                         ipuof_configs={})
        self.setEnvVarNames("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")

    def disable(self):
        self.set(num_distributed_processes=1, distributed_process_id=0)
        return self

    def setEnvVarNames(self, var_num_processes: str, var_process_id: str):
        return self.configureProcessId(int(os.environ.get(var_process_id, "0")),
                                       int(os.environ.get(var_num_processes, "1")))

    def configureProcessId(self, process_id: int, num_processes: int):
        self.set(distributed_process_id=process_id)
        self.set(num_distributed_processes=num_processes)
        return self

    @property
    def processId(self) -> int:
        return self.distributed_process_id

    @property
    def numProcesses(self) -> int:
        return self.num_distributed_processes


class Options(OptionsDict):
    """options.py:1146-1912."""

    def __init__(self) -> None:
        # options.py:1162-1198 (the Jit/Precision/TensorLocations groups are not modelled).
        self._popart = _PopartOptions()
        self._training = _TrainingOptions(self._popart)
        self._distributed = _DistributedOptions()
        # options.py:1169: the default execution strategy is PipelinedExecution() (it decides
        # the wording of an error in PoplarExecutor.__init__, _poplar_executor.py:185-192).
        self._execution_strategy = "PipelinedExecution"
        self._relax_optimizer_checks = False  # relaxOptimizerAttributesChecks(False), 1176
        self._show_compilation_progress_bar = True  # showCompilationProgressBar(True), 1177
        self._module_namescope_enabled = True
        super().__init__(replication_factor=1,
                         input_group_size=1,
                         input_cgt=enums.CommGroupType.Consecutive,
                         broadcast_buffers=True,
                         device_iterations=1,
                         log_dir=".",
                         max_repeat_logs=4,
                         auto_round_num_ipus=False,
                         anchored_tensors={},
                         output_mode=enums.OutputMode.Default.value,
                         output_return_period=1,
                         connection_type=enums.ConnectionType.Always.value,
                         sync_pattern=enums.SyncPattern.Full.value,
                         available_memory_proportion={})
        # options.py:1193-1198: POPTORCH_CACHE_DIR and POPTORCH_DEFAULT_OPTIONS apply to every
        # new Options.
        path = os.environ.get("POPTORCH_CACHE_DIR", "")
        if path:
            self.enableExecutableCaching(path)
        self.from_json(os.environ.get("POPTORCH_DEFAULT_OPTIONS", r"{}"))

    def from_json(self, string: str):
        """options.py:1200-1238."""

        def string_to_enum(value):
            try:
                enum_type, enum_value = value.split(".")
            except ValueError:
                return value
            try:
                return getattr(getattr(enums, enum_type), enum_value)
            except AttributeError:
                return value

        values_dict = json.loads(string)
        for option, v in values_dict.items():
            active_obj = self
            for attribute in option.split("."):
                active_obj = getattr(active_obj, attribute)
            if isinstance(v, str) and "." in v:
                v = string_to_enum(v)
            if isinstance(v, list):
                active_obj(*v)
            else:
                active_obj(v)
        return self

    def showCompilationProgressBar(self, show: bool = True):
        self._show_compilation_progress_bar = show
        return self

    def relaxOptimizerAttributesChecks(self, relax: bool = True):
        # options.py:1316-1334
        self._relax_optimizer_checks = relax
        return self

    @property
    def Distributed(self) -> _DistributedOptions:
        return self._distributed

    @property
    def Training(self) -> _TrainingOptions:
        return self._training

    @property
    def _Popart(self) -> _PopartOptions:
        return self._popart

    def autoRoundNumIPUs(self, auto_round_num_ipus: bool = True):
        # options.py:1381-1394
        self.set(auto_round_num_ipus=auto_round_num_ipus)
        return self

    def deviceIterations(self, device_iterations: int):
        # options.py:1396-1406: only set() (int type check; 0 or -1 pass in Python).
        self.set(device_iterations=device_iterations)
        return self

    def setAvailableMemoryProportion(self, available_memory_proportion: Dict[str, float]):
        # options.py:1426-1457
        actual_memory = {}
        for key, mem in available_memory_proportion.items():
            assert key.startswith("IPU"), (
                "Available memory proportions are expected"
                " to be in a dictionary of {\"IPU0\": 0.5}"
                " where the 0 in IPU is the index of the"
                " IPU. Invalid key: %s" % key)
            ipu_id = int(key[3:])
            actual_memory[ipu_id] = mem
        self.createOrSet(available_memory_proportion=actual_memory)
        return self

    def replicationFactor(self, replication_factor: int):
        # options.py:1459-1472: only set(). (IPU Model + replication fails at compile time,
        # not here: see PoplarExecutor._compile.)
        self.set(replication_factor=replication_factor)
        return self

    def inputReplicaGrouping(self, input_group_size: int, input_group_type):
        # options.py:1474-1506
        if input_group_type == enums.CommGroupType.NoGrouping:
            input_group_size = 1
            input_group_type = enums.CommGroupType.Consecutive
        if input_group_type == enums.CommGroupType.All:
            raise ValueError('input_group_type cannot be All')
        if self.replication_factor < input_group_size:
            raise ValueError('input_group_size cannot be larger than replication_factor')
        if (self.replication_factor % input_group_size) != 0:
            raise ValueError('input_group_size must be a factor of replication_factor')
        self.set(input_group_size=input_group_size)
        self.set(input_cgt=input_group_type)
        return self

    def broadcastBuffers(self, broadcast_buffers: bool = True):
        # options.py:1508-1516
        self.set(broadcast_buffers=broadcast_buffers)
        return self

    def logDir(self, log_dir: str):
        self.set(log_dir=log_dir)
        return self

    def modelName(self, name: str):
        self.createOrSet(model_name=name)
        return self

    def enableExecutableCaching(self, path: str):
        # options.py:1552-1565 (no type check: a non-str path fails later in C++).
        if path is None:
            self._Popart.set("enableEngineCaching", False)
        else:
            self._Popart.set("cachePath", path)
            self._Popart.set("enableEngineCaching", True)
        return self

    def useIpuModel(self, use_model: bool):
        # options.py:1567-1582: createOrSet, so the first call takes any type. Unset, the C++
        # falls back to POPTORCH_IPU_MODEL (popart_compiler/source/CompilerImpl.cpp:462-476).
        self.createOrSet(use_model=use_model)
        return self

    def connectionType(self, connection_type):
        # options.py:1584-1603
        assert isinstance(connection_type, enums.ConnectionType)
        self.set(connection_type=connection_type.value)
        return self

    def syncPattern(self, sync_pattern):
        # options.py:1605-1631
        assert isinstance(sync_pattern, enums.SyncPattern)
        self.set(sync_pattern=sync_pattern.value)
        return self

    def useIpuId(self, ipu_id: int):
        assert isinstance(ipu_id, int)
        self.createOrSet(ipu_id=ipu_id)
        return self

    def useOfflineIpuTarget(self, ipu_version: int = 2):
        # options.py:1656-1667
        self.connectionType(enums.ConnectionType.Never)
        self.createOrSet(ipu_version=ipu_version)
        return self

    def outputMode(self, output_mode, output_return_period: Optional[int] = None):
        # options.py:1692-1728: stored as the enum's int value.
        assert isinstance(output_mode, enums.OutputMode)
        if output_mode == enums.OutputMode.EveryN:
            assert output_return_period and output_return_period > 0, (
                "EveryN"
                " anchor must have output_return_period set to valid"
                " positive integer")
        self.set(output_mode=output_mode.value,
                 output_return_period=output_return_period or 1)
        return self

    def defaultOutputMode(self) -> bool:
        # options.py:1730-1738
        return self.output_mode == enums.OutputMode.Default

    def randomSeed(self, random_seed: int):
        # options.py:1740-1749: asserts an int, and reseeds the HOST: torch.manual_seed(seed)
        # at options.py:1747, as a side effect of setting the IPU's seed.
        assert isinstance(random_seed, int)
        torch.manual_seed(random_seed)
        self.createOrSet(random_seed=random_seed)
        return self

    def enableStableNorm(self, enabled: bool):
        self._Popart.set("enableStableNorm", enabled)
        return self

    def enableSyntheticData(self, enabled: bool):
        # options.py:1763-1779: popart.SyntheticDataMode 2 (RandomNormal) or 0 (Off).
        mode = 2 if enabled else 0
        self._Popart.set("syntheticDataMode", mode)
        return self

    def logCycleCount(self, log_cycle_count: bool):
        # options.py:1781-1795
        self._Popart.set("instrumentWithHardwareCycleCounter", log_cycle_count)
        return self

    def enableProfiling(self, profile_dir: Optional[str] = None):
        """options.py:1797-1840, as is: warns if POPLAR_ENGINE_OPTIONS mentions
        debug.allowOutOfMemory / autoReport.directory / autoReport.all (the environment wins
        over these engine options in Poplar), then sets engineOptions
        {debug.allowOutOfMemory: "true", autoReport.directory: profile_dir or ".",
        autoReport.all: "true"} on top of the engineOptions already set. It never changes the
        environment variable. (As in the real one, the existing engineOptions dict is updated
        in place before the frozen check of setEngineOptions.)"""
        env_engine_opts = os.getenv('POPLAR_ENGINE_OPTIONS', default='')
        env_override = ('debug.allowOutOfMemory' in env_engine_opts) or \
                       ('autoReport.directory' in env_engine_opts) or \
                       ('autoReport.all' in env_engine_opts)
        if env_override:
            warn('Profiling setting overridden by environment variable. '
                 'Check content of POPLAR_ENGINE_OPTIONS.')
        opts = self._popart.options.get('engineOptions', {})
        opts['debug.allowOutOfMemory'] = 'true'
        opts['autoReport.directory'] = profile_dir or '.'
        opts['autoReport.all'] = 'true'
        self._popart.setEngineOptions(opts)
        return self

    def disableModuleNamescope(self):
        self._module_namescope_enabled = False
        return self

    def updatableNamedBuffers(self, buffers):
        self._Popart.set('updatableNamedBuffers', buffers)
        return self

    def toDict(self) -> Dict[str, Any]:
        # options.py:1871-1893 (partially): an output mode must have been picked.
        assert not self.defaultOutputMode(), "An output mode must be picked before serialisation"
        out = dict(self._popart.options)
        out = self.update(out)
        out = self._training.update(out)
        out = self._distributed.update(out)
        return out

    def clone(self) -> "Options":
        # options.py:1895-1898: an unfrozen deep copy.
        return copy.deepcopy(self)

    # -- double only: what LOG["options"] and the executor records hold
    def _summary(self):
        return {"device_iterations": self.device_iterations,
                "replication_factor": self.replication_factor,
                "gradient_accumulation": self.Training.gradient_accumulation,
                "output_mode": enums.OutputMode(self.output_mode).name,
                "use_model": self._values.get("use_model", False),
                "random_seed": self._values.get("random_seed"),
                "available_memory_proportion": dict(self.available_memory_proportion),
                "popart": copy.deepcopy(self._popart.options)}
