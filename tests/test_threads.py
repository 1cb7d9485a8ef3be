"""A run's CPU threads: the OpenMP wait policy run.py sets, and metrics.json's thread record."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_cli
from octconv_exp.backends import threads


def test_the_wait_policy_is_passive_unless_the_environment_says_otherwise():
    value, why = threads.wait_policy_decision({}, torch_loaded=False)
    assert value == "PASSIVE" and why.startswith("PASSIVE: set by run.py")
    # the user's choice, either way they can make it, stays
    for env in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"},
                {"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": "1"}):
        value, why = threads.wait_policy_decision(env, torch_loaded=False)
        assert value is None and "from the environment" in why
    # set to an empty string: as unset, for OpenMP and for us
    assert threads.wait_policy_decision({"OMP_WAIT_POLICY": ""}, False)[0] == "PASSIVE"
    # once torch (and its OpenMP runtime) is loaded, setting it would only mislead the record
    value, why = threads.wait_policy_decision({}, torch_loaded=True)
    assert value is None and "torch was loaded" in why


def test_apply_wait_policy_sets_only_an_unset_environment():
    env = {}
    why = threads.apply_wait_policy(env, torch_loaded=False)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"} and why.startswith("PASSIVE")
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    threads.apply_wait_policy(env, torch_loaded=False)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {}
    threads.apply_wait_policy(env, torch_loaded=True)
    assert env == {}


def test_the_thread_record_names_counts_environment_and_decisions(monkeypatch):
    monkeypatch.setitem(threads._wait_policy, "decision", None)
    env = {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE", "PATH": "/bin"}
    record = threads.thread_record(3, 3, environ=env)
    assert record["torch_threads"] == torch.get_num_threads()
    assert record["interop_threads"] == torch.get_num_interop_threads()
    assert record["env"] == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE",
                             "GOMP_SPINCOUNT": None, "MKL_NUM_THREADS": None}
    assert record["threads_decision"] == "threads=3: the config's"
    # a process run.py did not start records the policy as it found it
    assert record["wait_policy_decision"] == "OMP_WAIT_POLICY=PASSIVE: from the environment"
    assert threads.thread_record(None, 2, environ={})["threads_decision"].startswith(
        "2: this job's share")
    assert threads.thread_record(None, None, environ={})["threads_decision"] == (
        "torch's default (threads=null)")
    monkeypatch.setitem(threads._wait_policy, "decision", "PASSIVE: set by run.py (...)")
    assert threads.thread_record(None, None, environ={})["wait_policy_decision"] == (
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
                   f"hydra.run.dir={run_dir}", env=env)
    assert done.returncode == 0, done.stderr
    m = json.loads((run_dir / "metrics.json").read_text())
    record = m["threads"]
    assert record["torch_threads"] == m["torch_threads"] == 1
    assert record["interop_threads"] >= 1
    assert record["threads_decision"] == "threads=1: the config's"
    # run.py set the policy before torch loaded, and the run's environment shows it
    assert record["wait_policy_decision"].startswith("PASSIVE: set by run.py")
    assert record["env"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert record["env"]["MKL_NUM_THREADS"] == "1"
    assert record["env"]["GOMP_SPINCOUNT"] is None
    assert set(record["env"]) == set(threads.THREAD_ENV)
