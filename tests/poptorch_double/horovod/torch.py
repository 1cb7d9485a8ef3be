"""``horovod.torch``'s API as Graphcore's scripts call it: init, rank, size, local_rank,
allreduce(tensor, op=Sum|Average|Max|Min), allgather_object, broadcast_object (Horovod's
torch API: horovod/torch/mpi_ops.py, functions.py)."""
import os

import torch.distributed as dist


class _Op:
    def __init__(self, name):
        self.name = name


Sum, Average, Max, Min = _Op("Sum"), _Op("Average"), _Op("Max"), _Op("Min")


def init():
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="env://", rank=rank(), world_size=size())


def rank():
    return int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))


def size():
    return int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))


def local_rank():
    return int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", rank()))


def allreduce(tensor, average=None, name=None, op=None):
    op = op or (Average if average is None or average else Sum)
    out = tensor.detach().clone()
    if op is Max:
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    elif op is Min:
        dist.all_reduce(out, op=dist.ReduceOp.MIN)
    else:
        dist.all_reduce(out)
        if op is Average:
            out = out / size()
    return out


def allgather_object(obj, name=None):
    out = [None] * size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, root_rank=0, name=None):
    box = [obj]
    dist.broadcast_object_list(box, src=root_rank)
    return box[0]
