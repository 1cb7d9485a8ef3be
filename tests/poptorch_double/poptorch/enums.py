"""The enums of poptorch/python/enums.py that octconv-exp uses (same names and values)."""
import enum


class OutputMode(enum.IntEnum):
    All = 0
    Final = 1
    EveryN = 2
    Sum = 3
    Default = 4


class DataLoaderMode(enum.IntEnum):
    Sync = 0
    Async = 1
    AsyncRebatched = 2


class MultiConvPlanType(enum.IntEnum):
    Parallel = 0
    Serial = 1


class ConnectionType(enum.IntEnum):
    Always = 0
    OnDemand = 1
    Never = 2


class SyntheticDataMode(enum.IntEnum):
    Off = 0
    Zeros = 1
    RandomNormal = 2
