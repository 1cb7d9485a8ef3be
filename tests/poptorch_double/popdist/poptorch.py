"""``popdist.poptorch.Options``: a ``poptorch.Options`` set up for this instance.

Modelled from graphcore/poptorch sdk/poptorch/3.4.0 tests/popdist_test.py:15-41 (after
construction, ``useIpuId``, ``replicationFactor``, ``Distributed.disable``,
``Distributed.setEnvVarNames`` and ``Distributed.configureProcessId`` raise RuntimeError
"Cannot call `X` with popdist.poptorch.Options"), :52-55 (outside poprun: processId 0,
numProcesses 1), docs/user_guide/experimental.rst:15-17 (replicationFactor is the number of
*local* replicas) and graphcore/examples v3.4.0 vision/cnns/pytorch/train/train.py:291-299
(``popdist.poptorch.Options(ipus_per_replica=...)``, no replicationFactor call after it).
"""
import poptorch

import popdist


def _refused(name):
    def refused(self, *args, **kwargs):
        raise RuntimeError(f"Cannot call `{name}` with popdist.poptorch.Options")
    return refused


class PopdistDistributedOptions(type(poptorch.Options().Distributed)):
    """Options.Distributed of a popdist Options: its process id is poprun's."""

    disable = _refused("Distributed.disable")
    setEnvVarNames = _refused("Distributed.setEnvVarNames")
    configureProcessId = _refused("Distributed.configureProcessId")


class Options(poptorch.Options):
    def __init__(self, ipus_per_replica=None):
        super().__init__()
        poptorch.Options.replicationFactor(self, popdist.getNumLocalReplicas())
        distributed = self.Distributed
        distributed.configureProcessId(popdist.getInstanceIndex(), popdist.getNumInstances())
        object.__setattr__(distributed, "__class__", PopdistDistributedOptions)

    replicationFactor = _refused("replicationFactor")
    useIpuId = _refused("useIpuId")
