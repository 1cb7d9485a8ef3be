"""Hostile inputs, round three (issue 25): a signal at start-up never ends in a trained run,
a full disk during torch.save is one line with the record written, and an unusable MLflow
store is one line naming logger.mlflow.tracking_uri."""
import errno
import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import REPO, SYNTHETIC_64_BATCH_8_ONE_EPOCH, file_sha256, read_metrics, run_cli
from octconv_exp.records import outputs
from octconv_exp.records.outputs import OutputError, save_torch_atomic
from octconv_exp.training.stopping import StopNow, StopRequest

# --- 8: a signal at start-up ---------------------------------------------------------------

def test_a_signal_before_the_run_ends_the_process_even_where_it_lands_in_code_that_swallows_it():
    """Python and Hydra starting up: the signal may land in an import half done, or in code
    that catches BaseException. The process must still end there (one line, 130), not go on."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {REPO!r})
        import run
        signal.signal(signal.SIGINT, run._stopped_outside_a_run)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
        except BaseException:
            pass  # what an import or a library's "except BaseException" did with it
        print("went on")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert res.returncode == 130, res.stderr[-2000:]
    assert "went on" not in res.stdout
    assert res.stderr == ("error: interrupted by SIGINT outside a run; no run's outputs were "
                          "lost\n")


def test_a_stop_swallowed_at_start_up_stops_the_run_before_training():
    with StopRequest() as stop:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
        except StopNow:
            pass  # swallowed on the way (an import it interrupted, an except BaseException)
        assert stop.raised is not None
        with pytest.raises(StopNow) as stopped:
            stop.set_phase("polled", "during training")
        assert stopped.value.phase == "at start-up" and stopped.value.exit_code == 130
        assert stop.mode == "immediate"  # never went on to train
        stop.set_phase("closing", "")  # the way out of a stopped run stays open


def test_a_signal_during_training_still_lets_training_finish_its_step():
    """The check above is for a swallowed stop only: a first signal while training is polled,
    and the phases after it (evaluation, finishing) go on as before."""
    with StopRequest() as stop:
        stop.set_phase("polled", "during training")
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            pass
        assert stop() and stop.raised is None
        stop.set_phase("immediate", "during evaluation, after training had finished")
        stop.set_phase("finishing", "while writing the finished run's outputs")


def test_a_rank_that_stops_for_another_ranks_signal_takes_its_own_first_signal_as_a_first():
    """Data-parallel: rank 1 got SIGTERM, rank 0 stops with it (adopted at the agreed step).
    When rank 1 exits, torchrun sends rank 0 SIGTERM: rank 0's first signal of its own, which
    must let it finish writing the checkpoint, not stop it at once as a second signal (what
    the 2-rank signal test saw once ranks exited faster)."""
    with StopRequest() as stop:
        stop.set_phase("polled", "during training")
        stop.adopt(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher's
        for _ in range(1000):
            pass
        assert stop() and stop.raised is None and stop.signal == signal.SIGTERM
        with pytest.raises(StopNow) as stopped:  # a second one of its own still stops at once
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
        assert stopped.value.phase == "(a second signal) during training"


@pytest.mark.slow
def test_sigint_at_any_moment_of_start_up_never_ends_in_a_trained_run(tmp_path):
    """Issue 25 #8: SIGINT 0.5-0.65 s after start trained to completion and exited 0 (or
    printed an ImportError traceback). At every delay: 130, one line, no completed record."""
    signalled = 0
    for delay in (0.2, 0.35, 0.5, 0.55, 0.6, 0.65, 0.8, 1.0, 1.5, 2.5):
        run_dir = tmp_path / f"run-{delay}"
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, "run.py"),
                                 *SYNTHETIC_64_BATCH_8_ONE_EPOCH,
                                 f"hydra.run.dir={run_dir}"], cwd=str(tmp_path),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        if proc.poll() is not None:
            proc.communicate()
            continue  # it finished before the signal was sent: not a case of this test
        proc.send_signal(signal.SIGINT)
        signalled += 1
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 130, (delay, err[-3000:])
        assert err.count("\n") == 1 and "interrupted by SIGINT" in err, (delay, err[-3000:])
        if (run_dir / "metrics.json").exists():
            assert read_metrics(run_dir)["status"] == "interrupted", delay
        assert not (run_dir / "model.pt").exists(), delay
    assert signalled >= 5


# --- 17: a full disk or a file size limit while torch.save writes ---------------------------

class _DiskWithRoom(io.RawIOBase):
    """A file on a disk with ``room`` bytes left: writes are cut short there, then ENOSPC
    (what a full disk does; torch's writer then swallows the error)."""

    def __init__(self, fd, room):
        self.fd, self.room = fd, room

    def writable(self):
        return True

    def fileno(self):
        return self.fd

    def write(self, data):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        written = os.write(self.fd, bytes(data[:self.room]))
        self.room -= written
        return written

    def close(self):
        if not self.closed:
            os.close(self.fd)
        super().close()


def _disk_with_room(monkeypatch, room):
    """Every file atomic_write opens is on a disk with ``room`` bytes left."""
    monkeypatch.setattr(outputs.os, "fdopen",
                        lambda fd, mode="r": io.BufferedWriter(_DiskWithRoom(fd, room)))


@pytest.mark.parametrize("room", [0, 100, 50_000])
def test_torch_save_on_a_full_disk_names_the_file_and_the_reason(tmp_path, monkeypatch, room):
    """torch's zip writer swallows the ENOSPC of a write and raises `RuntimeError: [enforce
    fail at inline_container.cc:...] unexpected pos ...`: the reason must still reach the
    user, and the previous file must stay as it was."""
    path = tmp_path / "last.pt"
    save_torch_atomic(str(path), {"w": torch.arange(4.0)})
    before = file_sha256(path)
    _disk_with_room(monkeypatch, room)
    with pytest.raises(OutputError) as failed:
        save_torch_atomic(str(path), {"w": torch.zeros(200_000)})
    assert str(failed.value) == (f"cannot write {path}: no space left on device; the previous "
                                 "version, if any, is intact")
    assert file_sha256(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left


def test_torch_writer_short_of_bytes_without_an_os_error_is_still_a_failed_write(tmp_path):
    """The zip writer's own words, where no OSError reached it: one line, not a traceback."""
    def write(f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    with pytest.raises(OutputError, match="took fewer bytes than were written"):
        outputs.atomic_write(str(tmp_path / "model.pt"), write)


@pytest.mark.slow
@pytest.mark.parametrize("limit", [20_000, 60_000])
def test_a_file_size_limit_during_a_checkpoint_is_one_line_and_a_record(tmp_path, limit):
    """Issue 25 #17: `ulimit -f` during torch.save gave 47 lines and no metrics.json. The
    checkpoint (78 kB) does not fit, metrics.json (2 kB) does."""
    run_dir = tmp_path / "run"
    res = run_cli(*SYNTHETIC_64_BATCH_8_ONE_EPOCH, f"hydra.run.dir={run_dir}",
                  cwd=str(tmp_path), file_size_limit=limit)
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr == (f"error: cannot write {run_dir}/checkpoints/last.pt: file too large; "
                          "the previous version, if any, is intact\n")
    m = read_metrics(run_dir)
    assert m["status"] == "failed" and m["error"] in res.stderr
    assert m["epochs_completed"] == 1 and m["test_accuracy"] is None
    assert os.listdir(run_dir / "checkpoints") == []  # no partial checkpoint, no temp file


# --- 18: unusable MLflow stores ------------------------------------------------------------

def _damaged_database(path):
    import sqlite3

    with sqlite3.connect(str(path)) as db:
        db.execute("create table t (a)")
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"\xff" * 50 + data[150:])  # its first page's header


@pytest.mark.slow
@pytest.mark.parametrize("store, says", [
    ("foo://bar", "the tracking store cannot be used (UnsupportedModelRegistryStoreURIException"),
    ("sqlite:///{tmp}/notes.db", "the tracking store cannot be used (DatabaseError: "),
    ("sqlite:///{tmp}/damaged.db", "the tracking store cannot be used (DatabaseError: "),
    ("sqlite:///{tmp}/missing/mlruns.db", "the folder {tmp}/missing does not exist"),
])
def test_an_unusable_mlflow_store_is_one_line_naming_the_setting(tmp_path, store, says):
    """Issue 25 #18: 56-111 lines and no metrics.json, or (a missing folder) a store created
    where none was meant. One line naming logger.mlflow.tracking_uri, exit 2, before
    training, and the run's record says why."""
    (tmp_path / "notes.db").write_text("not a database\n" * 50)
    _damaged_database(tmp_path / "damaged.db")
    before = file_sha256(tmp_path / "damaged.db")
    uri = store.format(tmp=tmp_path)
    run_dir = tmp_path / "run"
    res = run_cli(*SYNTHETIC_64_BATCH_8_ONE_EPOCH, "logger=mlflow",
                  f"logger.mlflow.tracking_uri={uri}", f"hydra.run.dir={run_dir}",
                  cwd=str(tmp_path))
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.count("\n") == 1, res.stderr[-3000:]
    assert res.stderr.startswith(f"error: logger.mlflow.tracking_uri={uri}: "
                                 f"{says.format(tmp=tmp_path)}"), res.stderr
    assert "Epoch 1" not in res.stdout + res.stderr  # before training
    m = read_metrics(run_dir)
    assert m["status"] == "failed" and m["error"] in res.stderr and m["epochs_completed"] == 0
    assert not (tmp_path / "missing").exists()
    assert file_sha256(tmp_path / "damaged.db") == before


@pytest.mark.slow
def test_a_corrupt_mlflow_run_note_is_one_line_not_a_new_mlflow_run(tmp_path):
    """Issue 25 #18: a corrupt mlflow_run.json silently started a new MLflow run on resume.
    Each corrupt note in turn, on the same interrupted run (its run dir and MLflow store put
    back as the interruption left them before each)."""
    import shutil

    import mlflow

    work, pristine = tmp_path / "work", tmp_path / "pristine"
    work.mkdir()
    run_dir = work / "run"
    res = run_cli(*SYNTHETIC_64_BATCH_8_ONE_EPOCH, "trainer.epochs=2", "logger=mlflow",
                  f"hydra.run.dir={run_dir}", cwd=str(work),
                  env={"OCTCONV_EXP_SIGNAL_AT": "step:10"})
    assert res.returncode == 130, res.stderr[-3000:]
    shutil.copytree(work, pristine)
    note_path = run_dir / "mlflow_run.json"
    for note in (b"{not json", b"\xff\xfe", b"[]", b'{"run_id": 7}'):
        shutil.rmtree(work)
        shutil.copytree(pristine, work)
        note_path.write_bytes(note)
        res = run_cli("resume=true", f"hydra.run.dir={run_dir}", cwd=str(work))
        assert res.returncode == 2, res.stderr[-3000:]
        assert res.stderr.count("\n") == 1, res.stderr[-3000:]
        assert res.stderr.startswith(f"error: {note_path}: not a readable note of this run's "
                                     "MLflow run"), res.stderr
        assert note_path.read_bytes() == note  # not replaced by a new run's
        mlflow.set_tracking_uri(f"sqlite:///{work}/mlruns.db")
        assert len(mlflow.search_runs(experiment_names=["octconv-exp"])) == 1
