"""A test double of Graphcore's ``popdist`` (the PopRun/PopDist Python API of the Poplar SDK),
as Graphcore's own training scripts use it. popdist's source is not public; what is modelled
comes from its documented API and from how it behaves where the public code shows it:

- docs.graphcore.ai, poprun-user-guide, "PopDist Python API" (api_python.html):
  ``isPopdistEnvSet()``, ``init()``, ``getNumTotalReplicas()``, ``getNumLocalReplicas()``
  (1 when unset), ``getReplicaIndexOffset()``, ``getNumIpusPerReplica()`` (default 1),
  ``getInstanceIndex()`` in [0, getNumInstances()), ``getNumInstances()``,
  ``getDeviceId(ipusPerReplica=0)``, ``execute_on_instances(instances, func, *args, **kw)``.
- The environment poprun gives each instance (a poprun debug log of the mpirun line:
  POPDIST_NUM_TOTAL_REPLICAS, POPDIST_NUM_LOCAL_REPLICAS, POPDIST_REPLICA_INDEX_OFFSET,
  POPDIST_NUM_IPUS_PER_REPLICA, POPDIST_LOCAL_INSTANCE_INDEX). The instance index and count
  are not variables of their own there: as in Graphcore's scripts they follow from the
  replicas (offset // local, total // local).
- graphcore/examples v3.4.0 vision/cnns/pytorch/utils/distributed.py:11-28 (detection with
  ``isPopdistEnvSet()``, then ``popdist.init()``, then Horovod's ``hvd.init()``).
"""
import os

_INITIALISED = [False]


def isPopdistEnvSet():
    return "POPDIST_NUM_TOTAL_REPLICAS" in os.environ


def init():
    _INITIALISED[0] = True


def getNumTotalReplicas():
    return int(os.environ.get("POPDIST_NUM_TOTAL_REPLICAS", "1"))


def getNumLocalReplicas():
    return int(os.environ.get("POPDIST_NUM_LOCAL_REPLICAS", "1"))


def getReplicaIndexOffset():
    return int(os.environ.get("POPDIST_REPLICA_INDEX_OFFSET", "0"))


def getNumIpusPerReplica():
    return int(os.environ.get("POPDIST_NUM_IPUS_PER_REPLICA", "1"))


def getInstanceIndex():
    return getReplicaIndexOffset() // getNumLocalReplicas()


def getNumInstances():
    return getNumTotalReplicas() // getNumLocalReplicas()


def getDeviceId(ipusPerReplica=0):
    return getInstanceIndex()


def execute_on_instances(instances, func, *args, **kwargs):
    if getInstanceIndex() in set(instances):
        return func(*args, **kwargs)
    return None
