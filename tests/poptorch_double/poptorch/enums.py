"""The enums of PopTorch 3.4 (python/enums.py at tag sdk/poptorch/3.4.0), every one of them, with
the real names and values.

Citations in this package: "enums.py:NN" etc. are files under python/ of graphcore/poptorch at
tag sdk/poptorch/3.4.0 (local mirror: /work/.mirror/graphcore+poptorch/repo); C++ files are named
by their path in that repository; "PopART ..." files are graphcore/popart at sdk/poplar/3.4.0.

Note: there is no ``SyntheticDataMode`` in PopTorch: it is ``popart.SyntheticDataMode``
(willow/include/popart/sessionoptions.hpp:255-266, Off=0, Zeros=1, RandomNormal=2,
RandomUniform=3) and PopTorch takes it as a plain int (``Options.enableSyntheticData`` sets 2,
options.py:1763-1779; ``opts._Popart.set("syntheticDataMode", int)``).
"""
import enum


class MeanReductionStrategy(enum.IntEnum):  # enums.py:5-23
    Running = 0
    Post = 1
    PostAndLoss = 2


class DataLoaderMode(enum.IntEnum):  # enums.py:26-43
    Sync = 0
    Async = 1
    AsyncRebatched = 2


class SharingStrategy(enum.IntEnum):  # enums.py:46-62
    SharedMemory = 0
    FileSystem = 1
    Fork = 2
    ForkServer = 3


class OutputMode(enum.IntEnum):  # enums.py:65-78 (Final is 0, All is 2)
    Final = 0
    EveryN = 1
    All = 2
    Sum = 3
    Default = 4


class ConnectionType(enum.IntEnum):  # enums.py:81-91
    Always = 0
    OnDemand = 1
    Never = 2


class HalfFloatCastingBehavior(enum.IntEnum):  # enums.py:94-102
    FloatDowncastToHalf = 0
    HalfUpcastToFloat = 1
    Default = 2


class ReductionType(enum.IntEnum):  # enums.py:105-113
    Sum = 0
    Mean = 1
    NoReduction = 2


class SyncPattern(enum.IntEnum):  # enums.py:116-129
    Full = 0
    SinglePipeline = 1
    ReplicaAndLadder = 2


class MatMulSerializationMode(enum.Enum):  # enums.py:132-138
    InputChannels = "input_channels"
    ReducingDim = "reducing_dim"
    OutputChannels = "output_channels"
    Disabled = "none"


class Liveness(enum.IntEnum):  # enums.py:141-156
    AlwaysLive = 0
    OffChipAfterFwd = 1
    OffChipAfterFwdNoOverlap = 2
    OffChipAfterEachPhase = 3


class OverlapMode(enum.Enum):  # enums.py:159-172
    NoOverlap = "no_overlap"
    OverlapAccumulationLoop = "overlap_accumulation_loop"
    OverlapDeviceIterationLoop = "overlap_device_iteration_loop"


class AutoStage(enum.IntEnum):  # enums.py:175-220
    SameAsIpu = 0
    AutoIncrement = 1


class MultiConvPlanType(enum.IntEnum):  # enums.py:223-231
    Parallel = 0
    Serial = 1


class CommGroupType(enum.IntEnum):  # enums.py:234-260
    All = 0
    Consecutive = 1
    Orthogonal = 2
    NoGrouping = 3


class VariableRetrievalMode(enum.IntEnum):  # enums.py:263-273
    OnePerGroup = 0
    AllReplicas = 2


__all__ = ["MeanReductionStrategy", "DataLoaderMode", "SharingStrategy", "OutputMode",
           "ConnectionType", "HalfFloatCastingBehavior", "ReductionType", "SyncPattern",
           "MatMulSerializationMode", "Liveness", "OverlapMode", "AutoStage",
           "MultiConvPlanType", "CommGroupType", "VariableRetrievalMode"]
