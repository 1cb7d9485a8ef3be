"""The tests' fork server (tests/forkserver.py) gives a program what ``python ARGV`` would:
the same exit code, output, argv, cwd, environment and sys.path, and it falls back to a real
subprocess where a fork could differ."""
import os
import signal
import subprocess
import textwrap
import time

import pytest

import conftest
from conftest import FORK_SERVER, REPO, command_env, run_cli, run_python

#: OCTCONV_EXP_TEST_FORKSERVER=0 make test: every command a fresh process, no server to test.
pytestmark = pytest.mark.skipif(os.environ.get("OCTCONV_EXP_TEST_FORKSERVER", "1") == "0",
                                reason="the fork server is off (OCTCONV_EXP_TEST_FORKSERVER=0)")

PROBE = textwrap.dedent("""
    import json, os, sys
    print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0],
                      "probe": os.environ.get("OCTCONV_EXP_PROBE"),
                      "pythonpath": [p for p in sys.path if p.endswith("extra")],
                      "main": __name__}))
    sys.stderr.write("to stderr\\n")
    how = sys.argv[1]
    if how == "exit3":
        sys.exit(3)
    if how == "message":
        sys.exit("a message")
    if how == "raise":
        raise ValueError("boom")
    if how == "ctrl-c":
        raise KeyboardInterrupt
    if how == "sigterm":
        import signal
        os.kill(os.getpid(), signal.SIGTERM)
    if how == "sleep":
        import time
        time.sleep(60)
""")


def served_env(env=None):
    full = command_env(env)
    assert FORK_SERVER.refusal(full) is None, FORK_SERVER.refusal(full)
    return full


def both_ways(monkeypatch, *argv, **kwargs):
    """The same command through the server and as a plain subprocess."""
    served_env(kwargs.get("env"))
    served = run_python(*argv, **kwargs)
    monkeypatch.setenv("OCTCONV_EXP_TEST_FORKSERVER", "0")
    plain = run_python(*argv, **kwargs)
    monkeypatch.delenv("OCTCONV_EXP_TEST_FORKSERVER")
    return served, plain


@pytest.mark.parametrize("how,code", [("exit3", 3), ("message", 1), ("raise", 1), ("ok", 0),
                                      ("ctrl-c", -signal.SIGINT), ("sigterm", -signal.SIGTERM)])
def test_a_served_program_ends_as_a_plain_one(tmp_path, monkeypatch, how, code):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    extra = tmp_path / "extra"
    extra.mkdir()
    served, plain = both_ways(monkeypatch, str(script), how, cwd=tmp_path,
                              env={"OCTCONV_EXP_PROBE": "x", "PYTHONPATH": str(extra)})
    assert FORK_SERVER.proc is not None and FORK_SERVER.proc.poll() is None  # it was served
    assert served.returncode == plain.returncode == code
    assert served.stdout == plain.stdout
    first = served.stdout.splitlines()[0]
    assert '"probe": "x"' in first and f'"cwd": "{tmp_path}"' in first
    assert f'"path0": "{tmp_path}"' in first and str(extra) in first and '"__main__"' in first
    # the traceback or message that a plain interpreter prints, line for line
    assert served.stderr.splitlines()[0] == "to stderr"
    assert served.stderr.splitlines()[-1:] == plain.stderr.splitlines()[-1:]


def test_python_dash_m_is_served_like_the_interpreter(tmp_path, monkeypatch):
    served, plain = both_ways(monkeypatch, "-m", "octconv_exp.validate", "--no-such-flag")
    assert served.returncode == plain.returncode == 2
    assert served.stderr == plain.stderr and served.stdout == plain.stdout


def test_a_refused_run_py_command_reads_the_same_both_ways(tmp_path, monkeypatch):
    served, plain = both_ways(monkeypatch, os.path.join(REPO, "run.py"), "conv=bogus",
                              f"hydra.run.dir={tmp_path / 'run'}")
    assert served.returncode == plain.returncode == 2
    assert served.stderr == plain.stderr and served.stdout == plain.stdout


def test_the_servers_copy_of_the_package_is_only_for_programs_that_would_import_it(
        tmp_path, monkeypatch):
    """The server imports octconv_exp too: a program that does not find it on its own path
    fails to import it as a plain interpreter does, and one that finds another copy (a clone
    elsewhere) is not served."""
    script = tmp_path / "imports.py"
    script.write_text("import sys\nprint('octconv_exp' in sys.modules)\nimport octconv_exp\n")
    served, plain = both_ways(monkeypatch, str(script), cwd=tmp_path)
    assert FORK_SERVER.proc is not None and FORK_SERVER.proc.poll() is None  # it was served
    assert served.returncode == plain.returncode == 1
    assert served.stdout == plain.stdout == "False\n"
    assert served.stderr.splitlines()[-1] == plain.stderr.splitlines()[-1] == (
        "ModuleNotFoundError: No module named 'octconv_exp'")
    # Its own run.py imports the package, from this repository: served, and it is there.
    assert FORK_SERVER.refusal(command_env(), [os.path.join(REPO, "run.py")], REPO) is None
    clone = tmp_path / "clone"
    (clone / "octconv_exp").mkdir(parents=True)
    (clone / "octconv_exp" / "__init__.py").write_text("")
    for argv, cwd in (([str(clone / "run.py")], REPO), (["-m", "octconv_exp.validate"], clone)):
        assert FORK_SERVER.refusal(command_env(), argv, str(cwd)) == (
            f"octconv_exp there is {clone / 'octconv_exp'}, not the server's "
            f"{os.path.join(REPO, 'octconv_exp')}")
    elsewhere = command_env({"PYTHONPATH": str(clone)})
    assert FORK_SERVER.refusal(elsewhere, ["-m", "octconv_exp.validate"], str(tmp_path))


def test_a_served_program_has_a_process_group_of_its_own(tmp_path):
    script = tmp_path / "group.py"
    script.write_text("import os, signal\nos.killpg(os.getpgrp(), signal.SIGTERM)\n")
    served_env()  # a plain subprocess would share this process group: pytest's own
    res = run_python(str(script))
    assert res.returncode == -signal.SIGTERM
    assert FORK_SERVER.proc.poll() is None  # the server is not in that group


def test_a_timeout_kills_the_served_program(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_python(str(script), "sleep", timeout=2)
    assert time.monotonic() - started < 30
    assert run_python(str(script), "exit3").returncode == 3  # the server carries on


def test_what_a_fork_cannot_give_goes_to_a_real_subprocess(tmp_path, monkeypatch):
    env = dict(FORK_SERVER.env)
    assert FORK_SERVER.usable(env)
    # read at run time: the project's hooks, launchers, PopTorch, MLflow
    for key in ("OCTCONV_EXP_SIGNAL_AT", "RANK", "POPTORCH_DOUBLE_IPUS", "MLFLOW_TRACKING_URI"):
        assert FORK_SERVER.usable(dict(env, **{key: "1"}))
    # read while torch is imported: a fork would keep the server's value
    for key in ("OMP_NUM_THREADS", "TORCH_SHOW_CPP_STACKTRACES", "LD_PRELOAD"):
        assert not FORK_SERVER.usable(dict(env, **{key: "7"}))
    no_threads = {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}
    if "OMP_NUM_THREADS" in env:
        assert not FORK_SERVER.usable(no_threads)
    # a PYTHONPATH entry that shadows an imported library, or customises start-up
    for name in ("torch", "sitecustomize.py"):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        (folder / name).mkdir() if "." not in name else (folder / name).write_text("")
        assert not FORK_SERVER.usable(dict(env, PYTHONPATH=str(folder)))
    assert FORK_SERVER.usable(dict(env, PYTHONPATH=os.path.join(REPO, "tests", "user_code")))
    monkeypatch.setenv("OCTCONV_EXP_TEST_FORKSERVER", "0")
    assert not FORK_SERVER.usable(env)


@pytest.mark.slow
@pytest.mark.sdk
def test_the_fork_server_runs_run_py_to_the_same_record(tmp_path, monkeypatch):
    """A whole small run through the server writes what a plain ``python run.py`` writes."""
    args = ["dataset=synthetic", "dataset.train_size=64", "dataset.test_size=32",
            "trainer.epochs=1", "trainer.batch_size=16", "trainer.progress_bar=false"]
    served = run_cli(*args, f"hydra.run.dir={tmp_path / 'served'}")
    monkeypatch.setenv("OCTCONV_EXP_TEST_FORKSERVER", "0")
    plain = run_cli(*args, f"hydra.run.dir={tmp_path / 'plain'}")
    assert served.returncode == plain.returncode == 0, served.stderr + plain.stderr
    import json

    a = json.loads((tmp_path / "served" / "metrics.json").read_text())
    b = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    for key in ("test_accuracy", "train_loss", "params", "flops_per_image", "torch_threads"):
        assert a.get(key) == b.get(key), key
    assert conftest.FORK_SERVER.modules >= {"torch", "hydra"}


def test_served_programs_run_at_the_same_time_and_take_signals(tmp_path):
    """popen_python: two served programs at once (each waits for the other's file), and one
    that a test signals ends as a plain one would."""
    from conftest import ServedProcess, popen_python

    script = tmp_path / "meet.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time
        mine, theirs = sys.argv[1], sys.argv[2]
        open(mine, "w").close()
        deadline = time.time() + 30
        while not os.path.exists(theirs):
            assert time.time() < deadline, "alone"
            time.sleep(0.05)
        print("met", os.getpid())
    """))
    served_env()
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    procs = [popen_python(str(script), a, b), popen_python(str(script), b, a)]
    assert all(isinstance(p, ServedProcess) for p in procs)
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [out for out, _ in outs] == [f"met {p.pid}\n" for p in procs]
    sleeper = tmp_path / "probe.py"
    sleeper.write_text(PROBE)
    proc = popen_python(str(sleeper), "sleep")
    assert proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM and '"argv"' in out and err == "to stderr\n"
    assert FORK_SERVER.proc.poll() is None


def test_a_program_another_program_starts_is_served_through_the_client(tmp_path):
    """forkclient.py (torchrun's ranks): the program gets the client's streams, cwd, argv and
    environment, and ``-u``; the client ends as the program ends (exit status, or the signal
    that killed it); a signal to the client reaches the program; a killed client takes the
    program with it; a refused environment runs the program fresh in the client's place."""
    import json

    from conftest import served_ranks, served_ranks_env

    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent("""
        import os, signal, sys
        print('served' if 'torch' in sys.modules else 'fresh')
        print(sys.stdout.write_through, os.getpid())

        def told(signum, frame):
            print("told", signum)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

        signal.signal(signal.SIGTERM, told)
    """) + PROBE)
    client = served_ranks()[1:]  # python -S forkclient.py -u
    env = served_env(dict(served_ranks_env(), OCTCONV_EXP_PROBE="rank 1"))

    def start(how, env=env):
        return subprocess.Popen([*client, str(probe), how], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    for how, code in (("exit3", 3), ("raise", 1), ("sigterm", -signal.SIGTERM)):  # its own
        proc = start(how)
        out, err = proc.communicate(timeout=60)
        lines = out.splitlines()
        assert proc.returncode == code and lines[0] == "served", (out, err)
        assert lines[1].split()[0] == "True"  # python -u
        seen = json.loads(lines[2])
        assert seen["argv"] == [str(probe), how] and seen["probe"] == "rank 1"
        assert seen["cwd"] == str(tmp_path) and seen["main"] == "__main__"
        assert err.startswith("to stderr\n")
    # A signal to the client is the program's; a killed client kills the program.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = start("sleep")
        assert proc.stdout.readline() == "served\n"
        program = int(proc.stdout.readline().split()[1])
        assert program != proc.pid and json.loads(proc.stdout.readline())["argv"][1] == "sleep"
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == -sig
        assert rest == ("told 15\n" if sig == signal.SIGTERM else "")
        deadline = time.time() + 10
        while program in children_of_server():  # the server reaps it once it ends
            assert time.time() < deadline, "the program outlived its client"
            time.sleep(0.05)
    # What the server may not run (an environment it was not started with): run fresh.
    proc = start("exit3", env=dict(env, OCTCONV_EXP_PROBE_NOT_RUN_TIME="1", LD_BIND_NOW="1"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3 and out.splitlines()[0] == "fresh"
    assert out.splitlines()[1] == f"True {proc.pid}"  # python -u, in the client's place


def children_of_server():
    """The pids of the fork server's children."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == FORK_SERVER.proc.pid:
            found.append(int(entry))
    return found


def test_a_served_program_that_starts_python_has_the_server_run_it(tmp_path):
    """``python_children`` (a joblib sweep: loky's workers): a served program's
    ``sys.executable`` is forkclient.py. A program it starts as loky starts a worker
    (``[sys.executable, "-m", MODULE, ...]`` with a pipe in ``pass_fds``) is forked by the server
    and gets that pipe at the same descriptor number; killed (SIGKILL), the program its parent
    waits for ends killed by SIGKILL too; what the server does not run (``python -c``) runs
    fresh in the client's place."""
    import json
    import sys

    (tmp_path / "worker.py").write_text(textwrap.dedent("""
        import os, sys, time
        fd = int(sys.argv[1])
        os.write(fd, (" ".join(["served" if "torch" in sys.modules else "fresh",
                                str(os.getpid())]) + "\\n").encode())
        if sys.argv[2] == "sleep":
            time.sleep(60)
        sys.exit(5)
    """))
    (tmp_path / "parent.py").write_text(textwrap.dedent("""
        import json, os, signal, subprocess, sys
        report = {"executable": sys.executable}
        for how in ("exit", "kill"):
            r, w = os.pipe()
            proc = subprocess.Popen([sys.executable, "-m", "worker", str(w), how],
                                    pass_fds=[w], cwd=os.path.dirname(os.path.abspath(__file__)))
            os.close(w)
            said = os.fdopen(r).readline().split()
            if how == "kill":
                os.kill(int(said[1]), signal.SIGKILL)
            report[how] = [said[0], int(said[1]) != proc.pid, proc.wait()]
        report["-c"] = subprocess.run([sys.executable, "-c", "import sys; print('torch' in "
                                       "sys.modules)"], capture_output=True, text=True).stdout
        print(json.dumps(report))
    """))
    out, err = tmp_path / "out", tmp_path / "err"
    env = served_env(command_env())
    code = FORK_SERVER.run([str(tmp_path / "parent.py")], str(tmp_path), env, 120, str(out),
                           str(err), python_children=True)
    assert code == 0, err.read_text()
    report = json.loads(out.read_text())
    assert report["executable"] != sys.executable
    assert report["exit"] == ["served", True, 5]
    assert report["kill"] == ["served", True, -signal.SIGKILL]
    assert report["-c"] == "False\n"


def test_cuda_visible_devices_may_differ_only_where_the_server_has_not_loaded_the_driver():
    """The CUDA driver reads CUDA_VISIBLE_DEVICES when it loads (submitit sets it for its
    tasks): a server whose imports loaded libcuda.so must refuse a program that sets it."""
    import forkserver

    base = command_env()
    env = dict(base, CUDA_VISIBLE_DEVICES="")
    assert forkserver.env_refusal(env, base, set(), driver_loaded=False) is None
    assert "CUDA_VISIBLE_DEVICES" in forkserver.env_refusal(env, base, set(), driver_loaded=True)
    assert "CUDA_VISIBLE_DEVICES" in forkserver.env_refusal(env, base, set())  # by default
    import ctypes.util

    FORK_SERVER.client_env()  # started: it says whether it loaded the driver
    if ctypes.util.find_library("cuda") is None:  # no driver on this machine
        assert FORK_SERVER.driver_loaded is False
