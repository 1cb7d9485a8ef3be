"""Data-parallel runs: one run as N ranks with DistributedDataParallel, started by the engines
users already run. ``torchrun --nproc_per_node=N run.py ...`` (torch.distributed's launcher,
multi-node through its c10d rendezvous) and the submitit launcher's tasks
(``hydra.launcher.tasks_per_node``/``nodes``: SLURM, or submitit's local executor) give each
rank its environment; this module turns it into a process group (gloo on CPU, NCCL on CUDA
with one GPU per local rank), and provides what the runner needs from it:

- every rank trains on its shard of each global batch (``data.shard_of``) with the model
  wrapped in DDP, which averages the gradients; ``trainer.sync_batchnorm`` makes BatchNorm
  use the statistics of the global batch (torch's ``nn.SyncBatchNorm`` on CUDA; on CPU, which
  torch's refuses, :class:`SyncBatchNorm` below, the same computation over gloo);
- evaluation is sharded (each rank a contiguous part of the set) and summed;
- rank 0 alone writes the run's outputs (:func:`is_writer`);
- a stop request (SIGINT/SIGTERM on any rank) is agreed after every step (:func:`any_rank`),
  so all ranks stop at the same step and rank 0 writes one checkpoint;
- collectives time out after ``distributed.timeout_s``: a rank that died ends the others with
  one line (:func:`peer_failure`), not a hang.
"""
import datetime
import gc
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Optional

from ..errors import UserError

log = logging.getLogger("octconv_exp")

#: Environment a launcher gives each rank (torchrun; what we map submitit's tasks to).
TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: The launch time and process id every rank names its run dir with (config.yaml's
#: ``${octconv_exp.now:...}`` and ``${octconv_exp.pid:}``): rank 0's, agreed at start-up.
#: Environment variables on purpose, not an internal channel: the values cross from rank 0's
#: process to the others, and Hydra's resolvers (sweep.py), which no argument reaches, read them.
LAUNCH_TIME_ENV = "OCTCONV_EXP_LAUNCH_TIME"
LAUNCH_PID_ENV = "OCTCONV_EXP_LAUNCH_PID"
_STORE_KEY = "octconv_exp/launch"


@dataclass
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: Optional[str] = None  # gloo | nccl; None: a single process
    launcher: Optional[str] = None  # torchrun | submitit

    @property
    def active(self):
        return self.world_size > 1


#: This process's place in the run (a single process until :func:`setup` joins a group).
WORLD = World()
_STORE = None  # the rendezvous store of :func:`agree_on_launch`, reused by the process group


def is_writer():
    """Does this process write the run's outputs? Rank 0 only (a single process: yes)."""
    return WORLD.rank == 0


def launched_rank(env=None):
    """The rank torchrun or a submitit task gives this process, or its PopRun instance index
    (0 when none does)."""
    env = os.environ if env is None else env
    found = torchrun_env(env) or submitit_env(env)
    if found:
        return int(found["RANK"])
    instance = poprun_instance(env)
    return instance[0] if instance else 0


def poprun_instance(env=None):
    """``(instance index, instances)`` when poprun started this process as one of several
    instances (its POPDIST_* variables: the index and count follow from the replicas, as
    popdist's getInstanceIndex/getNumInstances give them), else None."""
    env = os.environ if env is None else env
    if "POPDIST_NUM_TOTAL_REPLICAS" not in env:
        return None
    total = int(env["POPDIST_NUM_TOTAL_REPLICAS"])
    local = int(env.get("POPDIST_NUM_LOCAL_REPLICAS", "1") or 1)
    if total // local <= 1:
        return None
    return int(env.get("POPDIST_REPLICA_INDEX_OFFSET", "0")) // local, total // local


def torchrun_env(env=None):
    """torchrun's variables when this process is one of several ranks, else None."""
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1") or 1) <= 1 or not all(k in env for k in TORCHRUN_KEYS):
        return None
    return {k: env[k] for k in TORCHRUN_KEYS}


def submitit_env(env=None):
    """A submitit task of a job with several tasks (``hydra.launcher.tasks_per_node`` x
    ``nodes``), as torchrun's variables: the rank and local rank submitit gives the task, the
    first host of the job's nodes as the rendezvous address (SLURM_JOB_NODELIST, parsed by
    submitit), and a port derived from the job id (MASTER_PORT, when set, wins). None when not
    in such a task."""
    env = os.environ if env is None else env
    executor = env.get("SUBMITIT_EXECUTOR")
    if not executor:
        return None
    try:
        import submitit  # optional: only the submitit launchers need it
    except ImportError:
        return None
    saved = dict(os.environ)
    try:
        if env is not os.environ:
            os.environ.clear()
            os.environ.update(env)
        job = submitit.JobEnvironment()
        if job.num_tasks <= 1:
            return None
        hosts = list(job.hostnames)
        # The local executor runs every task on this machine.
        master = "127.0.0.1" if executor == "local" else hosts[0]
        digits = "".join(ch for ch in str(job.job_id) if ch.isdigit()) or "0"
        port = env.get("MASTER_PORT") or str(20000 + int(digits[-9:]) % 20000)
        return {"RANK": str(job.global_rank), "WORLD_SIZE": str(job.num_tasks),
                "LOCAL_RANK": str(job.local_rank), "MASTER_ADDR": env.get("MASTER_ADDR", master),
                "MASTER_PORT": port}
    finally:
        if env is not os.environ:
            os.environ.clear()
            os.environ.update(saved)


def agree_on_launch(argv, timeout_s=600):
    """Under torchrun, before Hydra names the run dir: every rank takes rank 0's launch time
    and process id, so ``hydra.run.dir``'s default names one dir for all of them. Returns the
    argv each rank runs with: ranks other than 0 write no Hydra record (rank 0 writes it).
    A single process: argv unchanged."""
    global _STORE
    env = torchrun_env()
    if env is None:
        return agree_under_poprun(argv)
    import torch.distributed as dist  # deferred: loads torch; imported before torch at start-up

    if any(a in ("-m", "--multirun") for a in argv):
        raise UserError("-m under torchrun: a sweep's jobs run one after another, each as a "
                        "data-parallel job with the submitit launcher (hydra/launcher="
                        "submitit_slurm hydra.launcher.tasks_per_node=N), or run torchrun once "
                        "per configuration")
    rank = int(env["RANK"])
    store, _, _ = next(dist.rendezvous("env://", timeout=datetime.timedelta(seconds=timeout_s)))
    _STORE = store
    if rank == 0:
        store.set(_STORE_KEY, json.dumps({"time": time.time(), "pid": os.getpid()}))
    launch = json.loads(store.get(_STORE_KEY).decode())
    os.environ[LAUNCH_TIME_ENV] = repr(launch["time"])
    os.environ[LAUNCH_PID_ENV] = str(launch["pid"])
    return argv_of_rank(argv, rank)


def argv_of_rank(argv, rank):
    """What a rank runs: rank 0 the command as given; the others without a Hydra record of
    their own (rank 0 writes .hydra/ in the shared run dir)."""
    if rank == 0:
        return argv
    return [a for a in argv if not a.startswith(("hydra.output_subdir=", "++hydra.output_subdir="))] \
        + ["hydra.output_subdir=null"]


def agree_under_poprun(argv):
    """Under poprun with several instances: each instance runs the same command, and nothing
    shared names one run dir for all of them before Hydra does, so the command must name it."""
    instance = poprun_instance()
    if instance is None:
        return argv
    if any(a in ("-m", "--multirun") for a in argv):
        raise UserError("-m under poprun: run one poprun per configuration")
    if not any(a.split("=", 1)[0].lstrip("+") == "hydra.run.dir" for a in argv):
        raise UserError(f"poprun with {instance[1]} instances: name the run dir the instances "
                        "share with hydra.run.dir=PATH (on a file system they all see)")
    return argv_of_rank(argv, instance[0])


def join_poprun(instance, instances, local_instance=0):
    """This PopRun instance joins the others (Horovod, as Graphcore's scripts combine results
    across instances: graphcore/examples vision/cnns/pytorch/utils/distributed.py)."""
    global WORLD
    try:
        import horovod.torch as hvd  # optional: Horovod only under PopRun
    except ImportError:
        raise UserError(f"poprun with {instances} instances: combining loss and accuracy across "
                        "instances needs Horovod (Graphcore's build ships with the Poplar SDK: "
                        "pip install horovod from the SDK's wheels)") from None
    hvd.init()
    WORLD = World(rank=instance, local_rank=local_instance, world_size=instances,
                  backend="horovod", launcher="poprun")
    if instance != 0:
        quiet_this_rank()


def _hvd():
    import horovod.torch as hvd  # optional: Horovod only under PopRun

    return hvd


def backend_for(cfg, device):
    """gloo on CPU, NCCL on CUDA (``distributed.backend=auto``), or the one configured."""
    setting = str(cfg.distributed.backend)
    if device == "ipu":
        raise UserError(f"device=ipu under {WORLD.launcher or 'torchrun'}: IPU pods run "
                        "data-parallel through PopRun (poprun --num-instances I --num-replicas "
                        "R python run.py device=ipu ...), not torch.distributed")
    if setting == "auto":
        return "nccl" if device.startswith("cuda") else "gloo"
    if setting == "nccl" and not device.startswith("cuda"):
        raise UserError(f"distributed.backend=nccl needs CUDA and this run is on device={device}; "
                        "use distributed.backend=gloo (or auto) on CPU")
    return setting


def setup(cfg, device):
    """Join the process group the launcher set up (a single process: nothing); returns
    this rank's device ("cuda:<local rank>" on CUDA)."""
    global WORLD
    env = torchrun_env()
    launcher = "torchrun"
    if env is None:
        env = submitit_env()
        launcher = "submitit"
        if env is not None:
            os.environ.update(env)  # torch's env:// rendezvous reads them
    if env is None:
        return device
    import torch  # deferred: loads torch; imported before torch at start-up
    import torch.distributed as dist  # deferred: loads torch; imported before torch at start-up

    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    backend = backend_for(cfg, device)
    if device.startswith("cuda"):
        if local >= torch.cuda.device_count():
            raise UserError(f"{launcher}: local rank {local} needs GPU {local} and this node "
                            f"has {torch.cuda.device_count()}; start at most one rank per GPU")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(cfg.distributed.timeout_s))
        if _STORE is not None:
            dist.init_process_group(backend, store=_STORE, rank=rank, world_size=world,
                                    timeout=timeout)
        else:
            dist.init_process_group(backend, init_method="env://", rank=rank,
                                    world_size=world, timeout=timeout)
    WORLD = World(rank=rank, local_rank=local, world_size=world, backend=backend,
                  launcher=launcher)
    if rank != 0:
        quiet_this_rank()
    return device


def quiet_this_rank():
    """Ranks other than 0 leave the log file to rank 0 and print warnings and errors only."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    logging.getLogger("octconv_exp").setLevel(logging.WARNING)


def teardown():
    """Leave the process group (at the end of a run, however it ended).

    After ``destroy_process_group`` a garbage collection frees what still referenced the gloo
    group (the DDP wrapper the backend just let go of): left to the interpreter's
    finalization, its worker threads can end the process with SIGABRT ("terminate called
    without an active exception"), which CI saw on a rank of a finished 2-rank run (pytorch
    PR 179291 describes the mechanism)."""
    global WORLD
    if WORLD.active and WORLD.backend != "horovod":
        import torch.distributed as dist  # deferred: loads torch; imported before torch at start-up

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group: nothing left to release
                pass
        gc.collect()
    WORLD = World()


def peer_failure(exc):
    """A failed collective (a rank died, or timed out) as one line."""
    # gloo prefixes its source file ("[.../pair.cc:545] Read error ...")
    first = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(exc).split()))
    first = first.split(". This is typically")[0][:300]
    return UserError(f"rank {WORLD.rank} of {WORLD.world_size}: a collective operation failed "
                     f"(another rank stopped or distributed.timeout_s passed): {first}")


def is_collective_failure(exc):
    """Did a collective fail (a rank that died, a timeout), rather than our own code? (torch
    2.0 raises RuntimeError; newer torch DistBackendError, a RuntimeError.)"""
    text = str(exc)
    return (type(exc).__name__ == "DistBackendError"
            or any(mark in text for mark in ("Connection", "connection", "gloo", "Gloo", "NCCL",
                                              "timed out", "Timed out", "Broken pipe", "peer",
                                              "ProcessGroup", "transport", "Socket", "socket")))


def _all_reduce(values, dtype, maximum=False):
    """``values`` summed (or their maximum) over the ranks, as a host tensor. NCCL reduces
    tensors on this rank's GPU only; gloo and Horovod host tensors."""
    import torch  # deferred: loads torch; imported before torch at start-up

    t = torch.tensor(values, dtype=dtype)
    if WORLD.backend == "horovod":
        hvd = _hvd()
        return hvd.allreduce(t, op=hvd.Max if maximum else hvd.Sum)
    import torch.distributed as dist  # deferred: loads torch; imported before torch at start-up

    if WORLD.backend == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX if maximum else dist.ReduceOp.SUM)
    return t.cpu()


def all_reduce_sum(values):
    """Sum a list of numbers over the ranks (float64; exact for counts below 2**53)."""
    if not WORLD.active:
        return list(values)
    import torch  # deferred: loads torch; imported before torch at start-up

    return _all_reduce([float(v) for v in values], torch.float64).tolist()


def max_over_ranks(value):
    """The largest of every rank's integer ``value`` (e.g. the signal a rank received, 0
    for none), on every rank: one small all-reduce."""
    if not WORLD.active:
        return int(value)
    import torch  # deferred: loads torch; imported before torch at start-up

    return int(_all_reduce([int(value)], torch.int64, maximum=True)[0])


def gather(obj):
    """Every rank's ``obj`` as a list indexed by rank (a single process: ``[obj]``)."""
    if not WORLD.active:
        return [obj]
    if WORLD.backend == "horovod":
        return list(_hvd().allgather_object(obj))
    import torch.distributed as dist  # deferred: loads torch; imported before torch at start-up

    out = [None] * WORLD.world_size
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------------------
# SyncBatchNorm on CPU
def _sync_batch_norm_module():
    import torch  # deferred: loads torch; imported before torch at start-up
    import torch.distributed as dist  # deferred: loads torch; imported before torch at start-up
    from torch import nn  # deferred: loads torch; imported before torch at start-up

    class AllReduceSum(torch.autograd.Function):
        """A sum over the ranks whose backward is the sum of the ranks' gradients (what
        torch.distributed.nn.functional.all_reduce does; that one warns as deprecated on
        the newest torch and its replacement is private)."""

        @staticmethod
        def forward(ctx, t):
            t = t.clone()
            dist.all_reduce(t)
            return t

        @staticmethod
        def backward(ctx, grad):
            grad = grad.clone()
            dist.all_reduce(grad)
            return grad

    class dist_fn:  # noqa: N801 - reads as the module it stands in for
        all_reduce = AllReduceSum.apply

    class SyncBatchNorm(nn.BatchNorm2d):
        """BatchNorm over the global batch, on CPU tensors (torch's ``nn.SyncBatchNorm``
        refuses them: "SyncBatchNorm expected input tensor to be on GPU"). The mean and the
        variance are sums all-reduced by ``AllReduceSum``, whose backward all-reduces their
        gradients, so every rank's inputs get the gradient of
        the whole batch's loss, as torch's sync_batch_norm backward gives them. Running
        statistics are updated as nn.BatchNorm2d does, with the global count (unbiased
        variance). Outside training, or in a single process, it is nn.BatchNorm2d."""

        def forward(self, x):
            if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
                return super().forward(x)
            c = x.shape[1]
            count = torch.tensor([x.numel() // c], dtype=x.dtype, device=x.device)
            sums = dist_fn.all_reduce(torch.cat([x.sum(dim=(0, 2, 3)), count]))
            n = sums[c]
            mean = sums[:c] / n
            centred = x - mean.view(1, c, 1, 1)
            var = dist_fn.all_reduce((centred * centred).sum(dim=(0, 2, 3))) / n
            out = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
            if self.affine:
                out = out * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
            if self.track_running_stats:
                with torch.no_grad():
                    self.num_batches_tracked.add_(1)
                    momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                                else self.momentum)
                    unbiased = var * (n / (n - 1)) if float(n) > 1 else var
                    self.running_mean.mul_(1 - momentum).add_(mean.detach() * momentum)
                    self.running_var.mul_(1 - momentum).add_(unbiased.detach() * momentum)
            return out

    return SyncBatchNorm


_SYNC_BN = None


def cpu_sync_batchnorm_class():
    global _SYNC_BN
    if _SYNC_BN is None:
        _SYNC_BN = _sync_batch_norm_module()
    return _SYNC_BN


def convert_sync_batchnorm(model, device):
    """Every BatchNorm2d (the per-frequency ones of octave layers too) made synchronous:
    torch's on CUDA, :class:`SyncBatchNorm` on CPU. Parameters and buffers are kept (the
    state dict's keys do not change)."""
    import torch  # deferred: loads torch; imported before torch at start-up
    from torch import nn  # deferred: loads torch; imported before torch at start-up

    if str(device).startswith("cuda"):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    cls = cpu_sync_batchnorm_class()

    def convert(module):
        if isinstance(module, nn.BatchNorm2d) and not isinstance(module, cls):
            new = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats)
            with torch.no_grad():
                if module.affine:
                    new.weight = module.weight
                    new.bias = module.bias
                if module.track_running_stats:
                    new.running_mean = module.running_mean
                    new.running_var = module.running_var
                    new.num_batches_tracked = module.num_batches_tracked
            new.train(module.training)
            return new
        for name, child in module.named_children():
            module.add_module(name, convert(child))
        return module

    return convert(model)


def wrap(model, device):
    """The model as DDP trains it (the model itself keeps the weights: checkpoints and
    evaluation read it directly)."""
    from torch.nn.parallel import (
        DistributedDataParallel,  # deferred: loads torch; imported before torch at start-up
    )

    if str(device).startswith("cuda"):
        index = int(str(device).split(":")[1])
        return DistributedDataParallel(model, device_ids=[index], output_device=index)
    return DistributedDataParallel(model)
