"""Data-parallel runs: torchrun ranks (gloo on CPU), submitit tasks, the sharded loader, and
the bad input around them. The end-to-end tests start real ranks on this machine."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import (REPO, SYNTHETIC_128_CHANNELS_FIRST, compose_config,
                      only_error_line, read_metrics, read_state_dict, run_cli, run_python,
                      served_ranks, served_ranks_env)
from octconv_exp.backends import distributed
from octconv_exp.data.datasets import BatchLoader, make_synthetic
from octconv_exp.errors import UserError
from octconv_exp.sweeps.gpus import GpuClaim


def torchrun(*args, ranks=2, env=None, timeout=300):
    """``torchrun --standalone --nproc_per_node=ranks run.py args``. The agent is served by
    the fork server (its imports are torch's), and so is each rank: torchrun starts
    ``python -S forkclient.py -u run.py args`` (``--no-python``) where it would start
    ``python -u run.py args``, and the client hands the rank to the server (or becomes it,
    where the server may not run it)."""
    return run_python("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                      *served_ranks(), os.path.join(REPO, "run.py"), *args, cwd=REPO,
                      env=dict(env or {}, **served_ranks_env()), timeout=timeout)


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a
               if a[k].is_floating_point())


# --------------------------------------------------------------------------------------------
# The sharded loader and evaluation split (fast)
@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("drop_last", [True, False])
def test_two_ranks_at_batch_b_see_exactly_what_one_process_at_2b_sees(augment, drop_last):
    data = make_synthetic(103, seed=1)
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, seed=3, augment=augment,
              augment_seed=7, drop_last=drop_last)
    one = BatchLoader(data, 10, **kw)
    ranks = [BatchLoader(data, 5, rank=r, world_size=2, **kw) for r in range(2)]
    for _ in range(2):  # a second pass: the shared generator moves on alike
        whole, parts = list(one), [list(r) for r in ranks]
        assert len(whole) == len(parts[0]) == len(parts[1]) == (10 if drop_last else 11)
        for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts):
            assert torch.equal(torch.cat([y0, y1]), y)
            assert torch.equal(torch.cat([x0, x1]), x)
    if not drop_last:  # the last global batch (3 images) is split 2 + 1
        assert [len(p[-1][1]) for p in parts] == [2, 1]


def test_a_resumed_rank_skips_the_same_global_batches():
    data = make_synthetic(64, seed=2)
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, seed=5, rank=1, world_size=2)
    full = list(BatchLoader(data, 8, **kw))
    resumed = BatchLoader(data, 8, **kw)
    state = resumed.state_dict()
    resumed.resume_pass(state["generator"], skip=2, epoch=1)
    rest = list(resumed)
    assert len(rest) == len(full) - 2
    for (x, y), (x2, y2) in zip(full[2:], rest):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_each_image_is_evaluated_by_exactly_one_rank():
    data = make_synthetic(101, seed=3)
    parts = [data.part(r, 4) for r in range(4)]
    assert [len(p) for p in parts] == [26, 25, 25, 25]
    assert torch.equal(torch.cat([p.labels for p in parts]), data.labels)
    assert torch.equal(torch.cat([p.images for p in parts]), data.images)
    assert data.part(0, 1) is data


# --------------------------------------------------------------------------------------------
# The launchers' environments (fast)
def test_torchrun_environment_is_read_only_for_several_ranks():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29500"}
    assert distributed.torchrun_env(env) == env
    assert distributed.launched_rank(env) == 1
    assert distributed.torchrun_env(dict(env, WORLD_SIZE="1")) is None
    assert distributed.torchrun_env({"RANK": "0"}) is None
    assert distributed.launched_rank({}) == 0


def test_a_slurm_task_of_a_multi_task_job_maps_to_torchrun_variables():
    """What the submitit launcher's tasks see on a SLURM cluster (hydra.launcher.nodes=2
    tasks_per_node=4): rank and local rank from SLURM, the first node of the job's node list
    as the rendezvous address, a port derived from the job id."""
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "6",
             "SLURM_LOCALID": "2", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    env = distributed.submitit_env(slurm)
    assert env == {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(20000 + 4242 % 20000)}
    assert distributed.submitit_env(dict(slurm, MASTER_PORT="1234"))["MASTER_PORT"] == "1234"
    assert distributed.submitit_env(dict(slurm, SLURM_NTASKS="1")) is None  # one task: no DDP
    assert distributed.submitit_env({k: v for k, v in slurm.items()
                                     if k != "SUBMITIT_EXECUTOR"}) is None
    assert "SLURM_PROCID" not in os.environ  # the mapping read the given env, not ours


def test_the_slurm_launcher_composes_a_multi_gpu_multi_node_job():
    cfg = compose_config("hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2",
                         "hydra.launcher.tasks_per_node=4", "hydra.launcher.gpus_per_node=4",
                         "trainer.sync_batchnorm=true")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=os.path.join(REPO, "conf")):
        full = compose(config_name="config", return_hydra_config=True,
                       overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2",
                                  "hydra.launcher.tasks_per_node=4",
                                  "hydra.launcher.gpus_per_node=4"])
    GlobalHydra.instance().clear()
    launcher = full.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert cfg.trainer.sync_batchnorm is True and cfg.distributed.backend == "auto"


def test_every_rank_names_the_same_run_dir_from_rank_0s_launch():
    """${octconv_exp.now:} and ${octconv_exp.pid:} (config.yaml's run dir) read rank 0's
    launch time and pid once torchrun's ranks agreed on them."""
    code = ("import os, sys\nsys.path.insert(0, %r)\nimport octconv_exp.config.schema\n"
            "from hydra import compose, initialize_config_dir\n"
            "with initialize_config_dir(version_base='1.3', config_dir=os.path.join(%r, 'conf')):\n"
            "    print(compose(config_name='config', return_hydra_config=True).hydra.run.dir)\n"
            % (REPO, REPO))
    env = dict(os.environ, OCTCONV_EXP_LAUNCH_TIME="1796042173.5", OCTCONV_EXP_LAUNCH_PID="4321")
    dirs = {subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           check=True).stdout.strip() for _ in range(2)}
    import datetime

    stamp = datetime.datetime.fromtimestamp(1796042173.5).strftime("%Y-%m-%d/%H-%M-%S")
    assert dirs == {f"outputs/{stamp}_4321"}


# --------------------------------------------------------------------------------------------
# Bad input (fast)
def test_nccl_needs_cuda_and_ipus_need_poprun():
    cfg = compose_config("distributed.backend=nccl")
    with pytest.raises(UserError, match="distributed.backend=nccl needs CUDA"):
        distributed.backend_for(cfg, "cpu")
    assert distributed.backend_for(cfg, "cuda:0") == "nccl"
    auto = compose_config()
    assert distributed.backend_for(auto, "cpu") == "gloo"
    assert distributed.backend_for(auto, "cuda:1") == "nccl"
    with pytest.raises(UserError, match="PopRun"):
        distributed.backend_for(auto, "ipu")


@pytest.mark.slow
def test_bad_distributed_values_are_refused_in_one_line():
    result = run_cli("dataset=synthetic", "distributed.backend=mpi")
    assert result.returncode == 2
    assert only_error_line(result.stderr).startswith("error: distributed.backend")
    result = run_cli("dataset=synthetic", "distributed.timeout_s=0")
    assert result.returncode == 2
    assert only_error_line(result.stderr).startswith("error: distributed.timeout_s=0")


def test_sync_batchnorm_is_refused_on_ipus(tmp_path, poptorch):
    from octconv_exp.training.runner import run_experiment

    cfg = compose_config("dataset=synthetic", "device=ipu", "trainer.sync_batchnorm=true")
    with pytest.raises(UserError, match="trainer.sync_batchnorm=true: not on IPUs"):
        run_experiment(cfg, str(tmp_path))


def test_more_ranks_than_images_to_share_is_refused(monkeypatch):
    from octconv_exp.data.datasets import DataBundle
    from octconv_exp.training.runner import check_batches, check_ranks

    monkeypatch.setattr(distributed, "WORLD", distributed.World(rank=0, world_size=4))
    data = DataBundle(train=make_synthetic(66), test=make_synthetic(3), mean=(0,) * 3,
                      std=(1,) * 3)
    cfg = compose_config("dataset=synthetic", "trainer.batch_size=8", "trainer.drop_last=false")
    with pytest.raises(UserError, match="the last training batch has 2 images, fewer than"):
        check_ranks(cfg, data)
    data.train = make_synthetic(64)
    with pytest.raises(UserError, match="the test set has 3 images, fewer than the ranks"):
        check_ranks(cfg, data)
    cfg = compose_config("dataset=synthetic", "trainer.batch_size=20")
    with pytest.raises(UserError, match=r"per rank x 4 ranks is larger than the training set"):
        check_batches(cfg, 64)


def test_a_sweep_under_torchrun_is_refused(monkeypatch):
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match="-m under torchrun"):
        distributed.agree_on_launch(["-m", "alpha=0.25,0.5"])


# --------------------------------------------------------------------------------------------
# End to end: real ranks
@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """An uninterrupted 2-rank run, batch 16 per rank, with synchronised BatchNorm."""
    run_dir = str(tmp_path_factory.mktemp("ddp") / "two")
    result = torchrun(*SYNTHETIC_128_CHANNELS_FIRST, "trainer.batch_size=16",
                      "trainer.sync_batchnorm=true", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.sdk
def test_two_ranks_with_sync_batchnorm_train_as_one_process_at_twice_the_batch(
        two_rank_run, tmp_path):
    one = str(tmp_path / "one")
    result = run_cli(*SYNTHETIC_128_CHANNELS_FIRST, "trainer.batch_size=32", f"hydra.run.dir={one}",
                     env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    # 2e-7 measured
    assert max_difference(read_state_dict(two_rank_run), read_state_dict(one)) < 1e-6
    m2, m1 = read_metrics(two_rank_run), read_metrics(one)
    assert (m2["world_size"], m2["global_batch_size"], m1["world_size"]) == (2, 32, 1)
    assert m2["test_samples"] == m1["test_samples"] == 101  # each test image once
    assert m2["test_accuracy"] == pytest.approx(m1["test_accuracy"])
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-5)
    assert m2["train_accuracy"] == pytest.approx(m1["train_accuracy"])
    # Rank 0 alone wrote the record: one log, no second Hydra record.
    with open(os.path.join(two_rank_run, "run.log")) as f:
        log = f.read()
    assert "rank 0 of 2 (torchrun, gloo)" in log and "rank 1 of 2" not in log
    # Without synchronised BatchNorm each rank normalises its 16 images: not the same model.
    plain = str(tmp_path / "plain")
    result = torchrun(*SYNTHETIC_128_CHANNELS_FIRST, "trainer.batch_size=16",
                      f"hydra.run.dir={plain}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert max_difference(read_state_dict(plain), read_state_dict(one)) > 1e-3


@pytest.mark.slow
def test_two_ranks_sum_one_confusion_matrix_of_the_whole_test_set(two_rank_run, tmp_path):
    """Each rank counts its part of the 101 test images; the matrix rank 0 writes is the one
    a single process counts evaluating the same model.pt (each image once, none twice)."""
    import csv

    def matrix(run_dir):
        with open(os.path.join(run_dir, "confusion_matrix.csv"), newline="") as f:
            return [[int(v) for v in row[1:]] for row in list(csv.reader(f))[1:]]

    both = matrix(two_rank_run)
    m = read_metrics(two_rank_run)
    assert sum(map(sum, both)) == m["test_samples"] == 101
    assert 100.0 * sum(both[k][k] for k in range(10)) / 101 == m["test_accuracy"]
    one = str(tmp_path / "one")
    result = run_cli("train=false", f"ckpt_path={two_rank_run}", f"hydra.run.dir={one}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert matrix(one) == both
    assert read_metrics(one)["test_per_class_accuracy"] == m["test_per_class_accuracy"]
    assert read_metrics(one)["test_top5_accuracy"] == m["test_top5_accuracy"]
    assert read_metrics(one)["test_loss"] == pytest.approx(m["test_loss"], rel=1e-6)


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_all_at_one_step_and_resume_is_exact(two_rank_run, tmp_path):
    run_dir = str(tmp_path / "stopped")
    result = torchrun(*SYNTHETIC_128_CHANNELS_FIRST, "trainer.batch_size=16",
                      "trainer.sync_batchnorm=true", f"hydra.run.dir={run_dir}",
                      env={"OCTCONV_EXP_SIGNAL_AT": "step:3", "OCTCONV_EXP_SIGNAL_RANK": "1",
                           "OCTCONV_EXP_SIGNAL": "SIGTERM"})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]  # rank 0 says it for both
    assert "interrupted by SIGTERM at epoch 1, step 3" in errors[0]
    assert "continue with: torchrun --nproc_per_node=2" in errors[0]
    assert read_metrics(run_dir)["status"] == "interrupted"
    state = torch.load(os.path.join(run_dir, "checkpoints", "last.pt"), weights_only=False)
    assert state["world_size"] == 2 and [r["progress"]["steps"] for r in state["ranks"]] == [3, 3]
    # One rank cannot continue an epoch two ranks split.
    refused = run_cli("resume=true", f"hydra.run.dir={run_dir}")
    assert refused.returncode == 2 and "written inside an epoch by 2 rank(s)" in refused.stderr
    result = torchrun("resume=true", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert max_difference(read_state_dict(run_dir), read_state_dict(two_rank_run)) == 0.0
    assert read_metrics(run_dir)["train_loss"] == read_metrics(two_rank_run)["train_loss"]


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_run_with_one_line(tmp_path):
    run_dir = str(tmp_path / "killed")
    result = torchrun(*SYNTHETIC_128_CHANNELS_FIRST, "trainer.batch_size=16",
                      f"hydra.run.dir={run_dir}", "distributed.timeout_s=60",
                      env={"OCTCONV_EXP_SIGNAL_AT": "step:2", "OCTCONV_EXP_SIGNAL_RANK": "1",
                           "OCTCONV_EXP_SIGNAL": "SIGKILL"}, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 0 of 2: a collective"), \
        result.stderr[-3000:]
    assert read_metrics(run_dir)["status"] == "failed"


@pytest.mark.slow
def test_the_submitit_launcher_runs_a_job_as_ranks(tmp_path):
    """hydra.launcher.tasks_per_node=2 (submitit's local executor here; SLURM's the same way
    through its environment): one job, two ranks, one record."""
    sweep = str(tmp_path / "sweep")
    result = run_cli("-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                     *SYNTHETIC_128_CHANNELS_FIRST, "trainer.epochs=1", "trainer.batch_size=16",
                     "trainer.sync_batchnorm=true", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    (job,) = [os.path.join(root) for root, _, files in os.walk(sweep) if "metrics.json" in files]
    m = read_metrics(job)
    assert (m["status"], m["world_size"], m["test_samples"]) == ("completed", 2, 101)
    with open(os.path.join(job, "run.log")) as f:
        assert "rank 0 of 2 (submitit, gloo)" in f.read()


# --------------------------------------------------------------------------------------------
# One GPU per job in a parallel sweep (the GPU count faked: there is no GPU here)
HOLD_A_GPU = """
import sys, time
sys.path.insert(0, {repo!r})
from octconv_exp.sweeps.gpus import GpuClaim
claim = GpuClaim({sweep!r}, int(sys.argv[1]))
print(claim.acquire(int(sys.argv[2])), flush=True)
time.sleep(60)
"""


def test_parallel_jobs_each_take_a_gpu_of_their_own_and_a_dead_job_frees_it(tmp_path):
    code = HOLD_A_GPU.format(repo=REPO, sweep=str(tmp_path))

    def job(num, gpus=2):
        p = subprocess.Popen([sys.executable, "-c", code, str(num), str(gpus)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return p, p.stdout.readline().strip()

    running = []
    try:
        first, gpu_a = job(0)
        running.append(first)
        second, gpu_b = job(2)  # job 2 would prefer GPU 0, which job 0 holds
        running.append(second)
        assert (gpu_a, gpu_b) == ("cuda:0", "cuda:1")
        third, gpu_c = job(5)  # both taken: shares job 5 % 2 = GPU 1, with a warning
        running.append(third)
        assert gpu_c == "cuda:1"
        first.kill()
        first.wait()
        fourth, gpu_d = job(7)  # job 0 died: its GPU is free again
        running.append(fourth)
        assert gpu_d == "cuda:0"
        assert GpuClaim(str(tmp_path), 3).acquire(1) == "cuda"  # one GPU: nothing to share out
    finally:
        for p in running:
            p.kill()
            p.wait()
    third.stderr.close()
    assert sorted(os.listdir(tmp_path / ".gpus")) == ["0.lock", "1.lock"]
