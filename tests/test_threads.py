"""A run's CPU threads: the OpenMP wait policy run.py sets, and metrics.json's thread record."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_cli
from octconv_exp.backends import threads


def test_the_wait_policy_is_passive_on_a_busy_machine_unless_the_environment_sets_one():
    busy, idle = (1.0, 2), (0.99, 2)
    value, why = threads.wait_policy_decision({}, False, *busy)
    assert value == "PASSIVE" and why.startswith("PASSIVE: set by run.py: the machine was busy")
    assert "load average 1.00 >= 1.0 on 2 cores" in why
    value, why = threads.wait_policy_decision({}, False, 7.5, 64)
    assert value == "PASSIVE"
    # idle (or no load average to go by): libgomp's default, which an idle machine runs fastest
    for load in (idle, (0.0, 64), (None, 2)):
        value, why = threads.wait_policy_decision({}, False, *load)
        assert value is None and why.startswith("unset: libgomp's default")
    # the user's choice, either way they can make it, stays, busy or not
    for env in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"},
                {"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": "1"}):
        value, why = threads.wait_policy_decision(env, False, *busy)
        assert value is None and "from the environment" in why
    # set to an empty string: as unset, for OpenMP and for us
    assert threads.wait_policy_decision({"OMP_WAIT_POLICY": ""}, False, *busy)[0] == "PASSIVE"
    # once torch (and its OpenMP runtime) is loaded, setting it would only mislead the record
    value, why = threads.wait_policy_decision({}, True, *busy)
    assert value is None and "torch was loaded" in why


def test_apply_wait_policy_sets_only_an_unset_environment_of_a_busy_machine():
    env = {}
    why = threads.apply_wait_policy(env, torch_loaded=False, load_and_cores=(3.0, 2))
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"} and why.startswith("PASSIVE")
    assert threads._wait_policy == {"decision": why, "load": 3.0, "cores": 2}
    env = {}
    threads.apply_wait_policy(env, torch_loaded=False, load_and_cores=(0.2, 2))
    assert env == {}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    threads.apply_wait_policy(env, torch_loaded=False, load_and_cores=(3.0, 2))
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {}
    threads.apply_wait_policy(env, torch_loaded=True, load_and_cores=(3.0, 2))
    assert env == {}
    threads._wait_policy.update(decision=None, load=None, cores=None)


def test_machine_load_reads_the_load_average_and_the_cores_of_this_process():
    load, cores = threads.machine_load()
    assert load == pytest.approx(os.getloadavg()[0], abs=1.0) and load >= 0
    assert cores == len(os.sched_getaffinity(0))


def test_threads_null_takes_the_cores_a_busy_machine_left_free(monkeypatch):
    assert threads.busy_machine_threads(None, 2) is None
    assert threads.busy_machine_threads(0.99, 2) is None  # idle: torch's default
    assert threads.busy_machine_threads(1.0, 2) == 1
    assert threads.busy_machine_threads(13.2, 2) == 1  # at least one
    assert threads.busy_machine_threads(8.0, 64) == 56
    assert threads.busy_machine_threads(1.4, 4) == 3  # 2.6 free: rounded
    # resolve_threads: the config's, then the launcher's share, then the start's load
    monkeypatch.setitem(threads._wait_policy, "load", 13.2)
    monkeypatch.setitem(threads._wait_policy, "cores", 2)
    assert threads.resolve_threads(2, None, environ={}) == (2, "threads=2: the config's")
    n, why = threads.resolve_threads(None, 3, environ={})
    assert n == 3 and why.startswith("3: this job's share")
    n, why = threads.resolve_threads(None, None, environ={})
    assert n == 1 and why == ("1: threads=null on a busy machine: the cores left free by the "
                              "load at the start (load average 13.20 on 2 cores)")
    # the user's OMP_NUM_THREADS is a thread count too: torch's default follows it
    assert threads.resolve_threads(None, None, environ={"OMP_NUM_THREADS": "2"}) == (
        None, "torch's default (threads=null; OMP_NUM_THREADS=2)")
    monkeypatch.setitem(threads._wait_policy, "load", 0.3)
    assert threads.resolve_threads(None, None, environ={}) == (
        None, "torch's default (threads=null)")
    # a run not started by run.py (no start load): torch's default
    monkeypatch.setitem(threads._wait_policy, "load", None)
    assert threads.resolve_threads(None, None, environ={})[0] is None


def test_the_thread_record_names_counts_environment_and_decisions(monkeypatch):
    monkeypatch.setitem(threads._wait_policy, "decision", None)
    env = {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE", "PATH": "/bin"}
    record = threads.thread_record("threads=3: the config's", environ=env)
    assert record["torch_threads"] == torch.get_num_threads()
    assert record["interop_threads"] == torch.get_num_interop_threads()
    assert record["env"] == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE",
                             "GOMP_SPINCOUNT": None, "MKL_NUM_THREADS": None}
    assert record["threads_decision"] == "threads=3: the config's"
    # a process run.py did not start records the policy as it found it
    assert record["wait_policy_decision"] == "OMP_WAIT_POLICY=PASSIVE: from the environment"
    monkeypatch.setitem(threads._wait_policy, "decision", "PASSIVE: set by run.py (...)")
    assert threads.thread_record("x", environ={})["wait_policy_decision"] == (
        "PASSIVE: set by run.py (...)")


def test_the_module_does_not_load_torch():
    """run.py imports it to set the wait policy before torch (and OpenMP) is loaded."""
    code = ("import sys; import octconv_exp.backends.threads; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@pytest.mark.slow
@pytest.mark.sdk
def test_metrics_json_records_the_threads_a_run_used(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    env = {"MKL_NUM_THREADS": "1"}
    done = run_cli("dataset=synthetic", "dataset.train_size=32", "dataset.test_size=16",
                   "trainer.epochs=1", "trainer.batch_size=16", "trainer.progress_bar=false",
                   "trainer.checkpoint=false", "trainer.save_model=false", "threads=1",
                   f"hydra.run.dir={run_dir}", env=env, fresh=True)  # run.py before torch loads
    assert done.returncode == 0, done.stderr
    m = json.loads((run_dir / "metrics.json").read_text())
    record = m["threads"]
    assert record["torch_threads"] == m["torch_threads"] == 1
    assert record["interop_threads"] >= 1
    assert record["threads_decision"] == "threads=1: the config's"
    # run.py decided before torch loaded, by the machine's load then, and the run's
    # environment shows what it decided
    why = record["wait_policy_decision"]
    if why.startswith("PASSIVE: set by run.py: the machine was busy"):
        assert record["env"]["OMP_WAIT_POLICY"] == "PASSIVE"
    else:
        assert why.startswith("unset: libgomp's default (spin, then sleep): the machine was idle")
        assert record["env"]["OMP_WAIT_POLICY"] is None
    assert record["env"]["MKL_NUM_THREADS"] == "1"
    assert record["env"]["GOMP_SPINCOUNT"] is None
    assert set(record["env"]) == set(threads.THREAD_ENV)
