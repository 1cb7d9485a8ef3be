"""A test double of Horovod (``horovod.torch``), which Graphcore's scripts use to combine
results across PopRun instances (graphcore/examples v3.4.0 vision/cnns/pytorch/
utils/distributed.py:31-47, utils/metrics.py:54-55). Its collectives run over torch.distributed
gloo, whose rendezvous the test gives (MASTER_ADDR, MASTER_PORT; rank and size from
OMPI_COMM_WORLD_RANK / OMPI_COMM_WORLD_SIZE, which mpirun sets for each instance)."""
