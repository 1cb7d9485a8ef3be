"""The run lifecycle's endings and the Backend interface (issue 28): every way a run ends is
one Ending whose outcome, line and exit status the CLI uses; what is recorded follows it."""
import json
import signal

import pytest
from conftest import compose_config

from octconv_exp.backends.base import Backend
from octconv_exp.errors import Diverged, UserError
from octconv_exp.training.runner import Outcome, RunLifecycle
from octconv_exp.training.stopping import StopNow, StopRequest


def lifecycle(tmp_path, sweep_job=False):
    cfg = compose_config("dataset=synthetic")
    return RunLifecycle(cfg, str(tmp_path), stop=StopRequest(), sweep_job=sweep_job)


def recorded(tmp_path):
    with open(tmp_path / "metrics.json") as f:
        return json.load(f)


def test_a_stop_is_interrupted_with_128_plus_the_signal_and_recorded(tmp_path):
    ending = lifecycle(tmp_path).ending_of(StopNow(signal.SIGTERM, "at start-up"))
    assert ending.outcome is Outcome.INTERRUPTED and ending.exit_code == 128 + signal.SIGTERM
    assert ending.message.startswith("interrupted by SIGTERM at start-up; no checkpoint")
    assert recorded(tmp_path)["status"] == "interrupted"


def test_divergence_and_user_errors_are_one_line_exit_2_and_recorded(tmp_path):
    ending = lifecycle(tmp_path).ending_of(Diverged(2, 7, float("nan")))
    assert (ending.outcome, ending.exit_code, ending.bug) == (Outcome.DIVERGED, 2, None)
    assert recorded(tmp_path)["status"] == "diverged"
    ending = lifecycle(tmp_path).ending_of(UserError("dataset.root=x: no such folder"))
    assert (ending.outcome, ending.message) == (Outcome.FAILED, "dataset.root=x: no such folder")
    assert recorded(tmp_path)["error"] == "dataset.root=x: no such folder"


def test_a_file_system_refusal_names_the_file(tmp_path):
    ending = lifecycle(tmp_path).ending_of(PermissionError(13, "Permission denied", "/x/y"))
    assert (ending.outcome, ending.message) == (Outcome.FAILED, "permission denied: /x/y")


def test_a_programming_error_keeps_its_traceback_in_a_single_run_and_is_recorded_in_a_sweep(
        tmp_path):
    try:
        {}["missing"]
    except KeyError as exc:
        bug = exc
    single = lifecycle(tmp_path / "single").ending_of(bug)
    assert single.outcome is Outcome.FAILED and single.bug is bug
    assert not (tmp_path / "single" / "metrics.json").exists()  # raised again, not recorded
    (tmp_path / "job").mkdir()
    job = lifecycle(tmp_path / "job", sweep_job=True).ending_of(bug)
    assert job.bug is None and job.message == "KeyError: 'missing'"
    assert recorded(tmp_path / "job")["status"] == "failed"


def test_a_backend_declares_every_hook_and_may_leave_the_optional_ones_out():
    class Incomplete(Backend):
        def build_model(self, num_classes):
            return None

    with pytest.raises(TypeError):
        Incomplete()

    from octconv_exp.backends.ipu import IpuBackend
    from octconv_exp.backends.native import NativeBackend

    assert issubclass(NativeBackend, Backend) and issubclass(IpuBackend, Backend)
    assert NativeBackend.resumes_inside_epoch and not IpuBackend.resumes_inside_epoch
    assert Backend.device_errors == () and Backend.synthetic_data is False
