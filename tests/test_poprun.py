"""IPU pods through PopRun: instances started by poprun (their POPDIST_* environment), on the
PopTorch double extended with popdist and Horovod (tests/poptorch_double: popdist/,
horovod/; the double reduces gradients across processes as distributed replicated graphs do)."""
import os
import socket

import pytest

from conftest import (DOUBLE, IPU_SYNTHETIC_192, REPO, compose_config, popen_python, read_metrics,
                      read_state_dict)
from octconv_exp.backends import distributed
from octconv_exp.errors import UserError

def poprun_env(instance, instances, local=1, port=None):
    """What poprun --num-instances I --num-replicas I*local gives instance ``instance`` (and
    mpirun's rank/size, which Horovod reads)."""
    env = {"POPDIST_NUM_TOTAL_REPLICAS": str(instances * local),
           "POPDIST_NUM_LOCAL_REPLICAS": str(local),
           "POPDIST_REPLICA_INDEX_OFFSET": str(instance * local),
           "POPDIST_NUM_IPUS_PER_REPLICA": "1", "POPDIST_LOCAL_INSTANCE_INDEX": str(instance),
           "OMPI_COMM_WORLD_RANK": str(instance), "OMPI_COMM_WORLD_SIZE": str(instances)}
    if port is not None:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, env, ipus):
    """run.py on the double, on a machine with ``ipus`` IPUs."""
    return popen_python(os.path.join(REPO, "run.py"), *args, cwd=REPO,
                        env=dict(env, PYTHONPATH=DOUBLE, POPTORCH_DOUBLE_IPUS=str(ipus)))


def test_popdist_options_refuse_what_poprun_set(poptorch, monkeypatch):
    """The double's popdist.poptorch.Options: replication factor = local replicas, process id =
    instance, and the calls poptorch's tests/popdist_test.py:15-41 show refused."""
    for key, value in poprun_env(1, 2, local=2).items():
        monkeypatch.setenv(key, value)
    import popdist.poptorch

    opts = popdist.poptorch.Options(ipus_per_replica=1)
    assert (opts.replication_factor, opts.Distributed.processId,
            opts.Distributed.numProcesses) == (2, 1, 2)
    for call in (lambda: opts.replicationFactor(2), lambda: opts.useIpuId(0),
                 lambda: opts.Distributed.disable(),
                 lambda: opts.Distributed.configureProcessId(0, 1),
                 lambda: opts.Distributed.setEnvVarNames("A", "B")):
        with pytest.raises(RuntimeError, match="with popdist.poptorch.Options"):
            call()


def test_the_instance_layout_and_ipu_replicas_are_checked_together(poptorch, monkeypatch,
                                                                   tmp_path):
    from octconv_exp.training.runner import run_experiment

    for key, value in poprun_env(0, 1, local=2).items():  # one instance of 2 replicas
        monkeypatch.setenv(key, value)
    cfg = compose_config(*IPU_SYNTHETIC_192, "ipu.replicas=1", "ipu.use_ipu_model=true")
    with pytest.raises(UserError, match=r"ipu.replicas=1: under poprun each instance runs the "
                                        r"replicas poprun gives it, here 2 .*set ipu.replicas=2"):
        run_experiment(cfg, str(tmp_path / "run"))


def test_an_instance_takes_its_share_of_every_global_combined_batch():
    from octconv_exp.backends.ipu import InstanceShardSampler, SeededEpochSampler

    order = list(SeededEpochSampler(50, 3))
    shares = [list(InstanceShardSampler(SeededEpochSampler(50, 3), 8, i, 3)) for i in range(3)]
    assert [len(s) for s in shares] == [16, 16, 16]  # 2 global batches of 24; 2 left over
    for b in range(2):
        whole = order[b * 24:(b + 1) * 24]
        assert sum((s[b * 8:(b + 1) * 8] for s in shares), []) == whole


def test_several_instances_need_a_named_run_dir(monkeypatch):
    for key, value in poprun_env(0, 2).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match="poprun with 2 instances: name the run dir"):
        distributed.agree_on_launch(["device=ipu"])
    assert distributed.agree_on_launch(["device=ipu", "hydra.run.dir=/x"]) == [
        "device=ipu", "hydra.run.dir=/x"]
    assert distributed.launched_rank() == 0
    monkeypatch.setenv("POPDIST_REPLICA_INDEX_OFFSET", "1")
    assert distributed.agree_on_launch(["hydra.run.dir=/x"])[-1] == "hydra.output_subdir=null"
    assert distributed.launched_rank() == 1


@pytest.mark.slow
@pytest.mark.sdk
def test_two_instances_train_as_one_instance_of_two_replicas(tmp_path):
    """poprun --num-instances 2 --num-replicas 2: each instance trains on its half of every
    global batch and the gradients are reduced over both (on the double, over gloo); the
    result equals one instance running both replicas. Instance 0 alone writes the record;
    the test set is evaluated once, split over the instances."""
    shared = str(tmp_path / "poprun")
    port = free_port()
    procs = [launch([*IPU_SYNTHETIC_192, f"hydra.run.dir={shared}"], poprun_env(i, 2, port=port),
                    ipus=1)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    one = str(tmp_path / "one")
    ref = launch([*IPU_SYNTHETIC_192, "ipu.replicas=2", f"hydra.run.dir={one}"], {}, ipus=2)
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]

    (m2, w2), (m1, w1) = ((read_metrics(d), read_state_dict(d)) for d in (shared, one))
    assert (m2["world_size"], m1["world_size"]) == (2, 1)
    assert m2["test_samples"] == m1["test_samples"] == 61
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-4)
    assert m2["train_accuracy"] == pytest.approx(m1["train_accuracy"])
    # The trained parameters. (Not the BatchNorm running statistics: with replicas > 1 each
    # replica keeps its own, broadcastBuffers(False); the double runs a process's replicas
    # one after the other on one module, so its statistics are not per replica. For the same
    # reason each instance evaluates its part of the test set with statistics of its own, and
    # the test accuracies may differ by a few images.)
    worst = max(((w2[k].double() - w1[k].double()).abs().max().item(), k) for k in w1
                if w1[k].is_floating_point() and "running_" not in k)
    assert worst[0] < 1e-4, worst
    with open(os.path.join(shared, "run.log")) as f:
        log = f.read()
    assert "PopRun: instance 0 of 2" in log and "instance 1 of 2" not in log
