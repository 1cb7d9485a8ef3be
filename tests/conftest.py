import csv
import hashlib
import importlib
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile

#: The thread limits joblib gives each loky worker unless the parent's environment has them
#: (joblib/_parallel_backends.py, ParallelBackendBase._prepare_worker_env: cpu_count() //
#: n_jobs, and TBB's ENABLE_IPC=1), set here as the session's OMP_NUM_THREADS (make test's
#: TEST_THREADS) before anything is imported: a joblib sweep's workers then have the
#: session's environment, and the fork server can run them (ForkServer.spawn's
#: ``python_children``). The libraries these name are not used here, or (numpy's OpenBLAS)
#: already follow OMP_NUM_THREADS.
if os.environ.get("OMP_NUM_THREADS"):
    for _name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                  "VECLIB_MAXIMUM_THREADS", "NUMBA_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ.setdefault(_name, os.environ["OMP_NUM_THREADS"])
    os.environ.setdefault("ENABLE_IPC", "1")

import numpy as np  # noqa: E402
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
#: The test double of poptorch (PopTorch 3.4's behaviour, from its source).
DOUBLE = os.path.join(REPO, "tests", "poptorch_double")

from octconv_exp.data.datasets import make_synthetic  # noqa: E402

import forkserver  # noqa: E402  (tests/forkserver.py)

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]


#: run.py started from a process that has its libraries imported already (tests/forkserver.py):
#: the same program in a process of its own, without 6 of a small run's 10 seconds of imports.
FORK_SERVER = forkserver.ForkServer(os.environ)


def run_cli(*args, cwd=None, timeout=600, env=None, fresh=False, file_size_limit=None):
    """``python run.py ARGS``, as a process of its own; returns the CompletedProcess (text mode).
    ``fresh``: a new interpreter, never the fork server (a test of what run.py does before
    torch is imported). ``file_size_limit``: bytes, as ``ulimit -f`` (:func:`run_python`)."""
    return run_python(os.path.join(REPO, "run.py"), *args, cwd=cwd, timeout=timeout, env=env,
                      fresh=fresh, file_size_limit=file_size_limit)


#: The sweep report's figures in the sweeps the tests start, unless a test names
#: ``report.format`` itself: PNG only. Its PDFs cost 2 of the report's 3.3 CPU-s for a
#: 3-job sweep here (matplotlib subsets the font into each with fontTools), and the report's
#: PDFs have tests of their own (test_report_paper; compare.pdf: test_compare).
SWEEP_FIGURES = "report.format=[png]"
#: Each run's confusion-matrix figure in the runs the tests start, unless a test names
#: ``report.confusion_format`` itself: none. Drawing it is about a third of a small run's CPU
#: here (0.3-0.4 s), and the figure has tests of its own (test_evaluation).
CONFUSION_FIGURES = "report.confusion_format=[]"
#: Hydra's flags that print and run no job: nothing is added to such a command line.
_PRINT_ONLY_FLAGS = ("--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i",
                     "--shell-completion", "-sc")


def with_test_figures(argv):
    """``argv`` (``python ARGV``) where it runs run.py (directly or through torchrun), with
    :data:`CONFUSION_FIGURES` added unless it names ``report.confusion_format``, and, a sweep
    (``-m``/``--multirun``), with :data:`SWEEP_FIGURES` added unless it names
    ``report.format``: the same program, with overrides a user could type."""
    argv = list(argv)
    script = next((i for i, a in enumerate(argv) if os.path.basename(a) == "run.py"), None)
    if script is None or any(a in _PRINT_ONLY_FLAGS for a in argv[script + 1:]):
        return argv
    named = [a.lstrip("+~").split("=")[0] for a in argv[script + 1:]]
    if ("-m" in argv[script + 1:] or "--multirun" in argv[script + 1:]) \
            and "report.format" not in named:
        argv.append(SWEEP_FIGURES)
    if "report.confusion_format" not in named:
        argv.append(CONFUSION_FIGURES)
    return argv


def starts_python(argv):
    """Whether ``python ARGV`` starts Python programs of its own that the fork server can run
    (forkserver.ForkServer.spawn's ``python_children``): a joblib sweep's loky workers, a
    submitit_local sweep's controller and tasks."""
    return "hydra/launcher=joblib" in argv or "hydra/launcher=submitit_local" in argv


def command_env(env=None):
    """The environment a command the tests start gets: this process's, HYDRA_FULL_ERROR unset
    (run.py's one-line errors, not Hydra's traceback), updated with ``env``."""
    full_env = dict(os.environ)
    full_env.pop("HYDRA_FULL_ERROR", None)
    full_env.update(env or {})
    return full_env


def _command(argv, cwd, env, fresh=False):
    """``(cmd, cwd, env, refusal)`` of ``python ARGV``: refusal None where the fork server
    runs it (OCTCONV_EXP_TEST_FORKSERVER_LOG: where each refused one is written down)."""
    full_env = command_env(env)
    cwd = str(cwd or REPO)
    refusal = "fresh=True" if fresh else FORK_SERVER.refusal(full_env, argv, cwd)
    if refusal and os.environ.get("OCTCONV_EXP_TEST_FORKSERVER_LOG"):
        with open(os.environ["OCTCONV_EXP_TEST_FORKSERVER_LOG"], "a") as log:
            log.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?')}: {refusal}\n")
    return [sys.executable, *argv], cwd, full_env, refusal


def run_python(*argv, cwd=None, timeout=600, env=None, fresh=False, file_size_limit=None):
    """``python ARGV`` (``run.py ARGS``, ``-m octconv_exp.validate ...``) as a process of its
    own, HYDRA_FULL_ERROR unset; returns the CompletedProcess (text mode). Through the fork
    server where that is the same program (forkserver.ForkServer.usable), else a plain
    subprocess. ``file_size_limit``: bytes, as ``ulimit -f`` sets it
    (forkserver.limit_file_size), in the served child or the subprocess."""
    argv = with_test_figures(argv)
    cmd, cwd, full_env, refusal = _command(argv, cwd, env, fresh)
    if refusal is None:
        with tempfile.TemporaryDirectory(prefix="run_python-") as tmp:
            out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
            code = FORK_SERVER.run(list(argv), cwd, full_env, timeout, out, err,
                                   file_size_limit, starts_python(argv))
            with open(out, errors="replace") as f_out, open(err, errors="replace") as f_err:
                return subprocess.CompletedProcess(cmd, code, f_out.read(), f_err.read())
    limit = None if file_size_limit is None else (
        lambda: forkserver.limit_file_size(file_size_limit))
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env, preexec_fn=limit)


def served_ranks():
    """torchrun's arguments before the script for ranks the fork server runs:
    ``--no-python python -S forkclient.py -u`` (tests/forkclient.py), or none where the
    server is off (OCTCONV_EXP_TEST_FORKSERVER=0)."""
    if os.environ.get("OCTCONV_EXP_TEST_FORKSERVER", "1") == "0":
        return []
    return ["--no-python", sys.executable, "-S", os.path.join(REPO, "tests", "forkclient.py"),
            "-u"]


def served_ranks_env():
    """The environment variable forkclient.py reads (the server started), or none."""
    if os.environ.get("OCTCONV_EXP_TEST_FORKSERVER", "1") == "0":
        return {}
    return FORK_SERVER.client_env()


class ServedProcess:
    """What :func:`popen_python` returns for a program the fork server runs: the parts of
    ``subprocess.Popen`` (text mode, stdout and stderr piped) the tests use. The child leads
    a process group of its own, as ``start_new_session=True`` gives."""

    def __init__(self, cmd, argv, cwd, env):
        self.args = cmd
        self.returncode = None
        self._tmp = tempfile.TemporaryDirectory(prefix="popen_python-")
        self._out = os.path.join(self._tmp.name, "stdout")
        self._err = os.path.join(self._tmp.name, "stderr")
        self.pid = FORK_SERVER.spawn(list(argv), cwd, env, self._out, self._err,
                                     python_children=starts_python(argv))

    def poll(self):
        if self.returncode is None:
            self.returncode = FORK_SERVER.wait_for(self.pid, 0)
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            self.returncode = FORK_SERVER.wait_for(self.pid, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, timeout=None):
        self.wait(timeout)
        with open(self._out, errors="replace") as f_out, open(self._err, errors="replace") as f_err:
            out, err = f_out.read(), f_err.read()
        self._tmp.cleanup()
        return out, err

    def send_signal(self, sig):
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def popen_python(*argv, cwd=None, env=None, start_new_session=False):
    """``subprocess.Popen([python, *ARGV], stdout=PIPE, stderr=PIPE, text=True)`` for a test
    that signals the program or runs it beside another: through the fork server where that
    is the same program (a :class:`ServedProcess`; in a process group of its own, which only a
    test that signals a group tells apart, and such a test asks ``start_new_session``), else
    a real subprocess. HYDRA_FULL_ERROR unset, as :func:`run_python`."""
    argv = with_test_figures(argv)
    cmd, cwd, full_env, refusal = _command(argv, cwd, env)
    if refusal is None:
        return ServedProcess(cmd, argv, cwd, full_env)
    return subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            start_new_session=start_new_session)


def pytest_sessionfinish(session, exitstatus):
    FORK_SERVER.close()


def _cpu_seconds():
    """(this process, its reaped children, the fork server's ended children): user + system
    CPU seconds so far."""
    import resource

    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                          resource.RUSAGE_CHILDREN))
    return (own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime,
            FORK_SERVER.served_cpu)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """OCTCONV_EXP_TEST_CPU_LOG=PATH: a line per test (setup and teardown included) with the
    CPU seconds it took in this process, in fresh subprocesses it waited for, and in the runs
    the fork server ran for it (docs/development.md: where the suite's time goes)."""
    path = os.environ.get("OCTCONV_EXP_TEST_CPU_LOG")
    before = _cpu_seconds() if path else None
    yield
    if path:
        spent = [after - start for after, start in zip(_cpu_seconds(), before)]
        with open(path, "a") as log:
            log.write(json.dumps({"test": item.nodeid, "self": round(spent[0], 2),
                                  "fresh": round(spent[1], 2), "served": round(spent[2], 2),
                                  "python": sys.version.split()[0]}) + "\n")


def write_cifar_fixture(root, train_per_batch=40, test_size=60, seed=0):
    """A tiny CIFAR-10 in torchvision's on-disk format (python pickles), with learnable
    synthetic images, so the real torchvision loading code can be exercised offline."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)

    def dump(name, images, labels):
        entry = {"batch_label": name, "labels": [int(v) for v in labels],
                 "data": images.reshape(len(labels), -1).numpy().astype(np.uint8),
                 "filenames": [f"{name}_{i}.png" for i in range(len(labels))]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f)

    train = make_synthetic(5 * train_per_batch, seed=seed, split="train")
    for b in range(5):
        sl = slice(b * train_per_batch, (b + 1) * train_per_batch)
        dump(f"data_batch_{b + 1}", train.images[sl], train.labels[sl])
    test = make_synthetic(test_size, seed=seed, split="test")
    dump("test_batch", test.images, test.labels)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_cases_per_batch": train_per_batch,
                     "num_vis": 3072}, f)
    return root


def write_image_folder(root, classes=("cats", "dogs", "owls"), per_class=(12, 5), size=40):
    """root/train/<class>/*.png and root/test/<class>/*.png, of another size than 32x32."""
    from PIL import Image

    data = make_synthetic(len(classes) * 2 * sum(per_class), seed=3)
    i = 0
    for split, n in zip(("train", "test"), per_class):
        for k, name in enumerate(classes):
            d = os.path.join(root, split, name)
            os.makedirs(d, exist_ok=True)
            label = 2 * k if len(classes) <= 5 else k % 10  # synthetic has 10 classes
            picked = (data.labels == label).nonzero().squeeze(1)
            for j in range(n):
                arr = data.images[picked[i % len(picked)]].permute(1, 2, 0).numpy()
                i += 1
                img = Image.fromarray(arr).resize((size, size))
                if j % 4 == 3:
                    img = img.convert("L")  # greyscale files are converted to RGB
                img.save(os.path.join(d, f"{j:03d}.png"))
    return root


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    return write_cifar_fixture(str(tmp_path_factory.mktemp("cifar")))


@pytest.fixture(scope="session")
def image_folder_root(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("images")))


@pytest.fixture
def poptorch(monkeypatch):
    """The double, importable as `poptorch` for this test only (tests/test_ipu.py, tests/test_poptorch_double.py)."""
    monkeypatch.syspath_prepend(DOUBLE)
    for name in [m for m in sys.modules if m == "poptorch" or m.startswith("poptorch.")]:
        monkeypatch.delitem(sys.modules, name)
    for var in ("POPTORCH_DOUBLE_TORCH_VERSION", "POPTORCH_IPU_MODEL", "POPTORCH_CACHE_DIR",
                "POPTORCH_DEFAULT_OPTIONS", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                "POPTORCH_DOUBLE_WORKER_SEED"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("POPTORCH_DOUBLE_IPUS", "0")
    module = importlib.import_module("poptorch")
    for key in module.LOG:
        module.LOG[key].clear()
    module._IPUS_IN_USE[0] = 0
    yield module
    for name in [m for m in sys.modules if m == "poptorch" or m.startswith("poptorch.")]:
        sys.modules.pop(name, None)


def compose_config(*overrides):
    """The composed primary config for these overrides (conf/config.yaml), as run.py sees it."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import octconv_exp.config.schema  # noqa: F401 (registers the schemas the configs name)

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=os.path.join(REPO, "conf")):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


#: Lines other programs print on stderr that are not the run's own (none seen so far: a
#: banner added here must name the library that prints it).
THIRD_PARTY_STDERR = ()


def only_error_line(stderr):
    """The one line a refused command prints: asserts that stderr holds nothing else (no
    traceback above it, no second message) and returns that line."""
    lines = [line for line in stderr.splitlines()
             if line.strip() and not line.startswith(THIRD_PARTY_STDERR)]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


def start_joblib_sweep(sweep_dir, timeout, training=("conv=vanilla", "conv=octave"),
                       sweep=None):
    """``run.py SWEEP`` (by default :data:`JOBLIB_SWEEP`, 2 jobs at a time), in a session of
    its own, once the jobs named in ``training`` are held inside their epoch, after their second
    step (the OCTCONV_EXP_PAUSE_AT test hook: each worker's first job): the process, for a test
    to signal. A stop request ends the hold; :func:`release_joblib_sweep` lets the jobs go on."""
    import time

    proc = popen_python(os.path.join(REPO, "run.py"), *(sweep or JOBLIB_SWEEP),
                        f"hydra.sweep.dir={sweep_dir}", cwd=REPO,
                        env={"OCTCONV_EXP_PAUSE_AT": "step:2",
                             "OCTCONV_EXP_PAUSE_UNTIL": f"{sweep_dir}.release"},
                        start_new_session=True)
    deadline = time.time() + timeout
    logs = [sweep_dir / c / "seed=0" / "run.log" for c in training]
    while not all(p.exists() and "Paused after step 2" in p.read_text() for p in logs):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    return proc


def release_joblib_sweep(sweep_dir):
    """Let the jobs :func:`start_joblib_sweep` holds go on (and the next ones pass)."""
    with open(f"{sweep_dir}.release", "w"):
        pass


# --------------------------------------------------------------------------------------------
# What a run leaves, read back: one reader per file, for every test file.


def read_metrics(run_dir):
    """A run's metrics.json, as a dict."""
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)


def read_csv(path):
    """The rows of a CSV file (summary.csv, epochs.csv) as dicts of strings."""
    with open(path) as f:
        return list(csv.DictReader(f))


def read_epochs(run_dir):
    """A run's epochs.csv: one dict of strings an epoch."""
    return read_csv(os.path.join(run_dir, "epochs.csv"))


def read_state_dict(run_dir):
    """The weights in a run's model.pt, on the CPU."""
    import torch

    return torch.load(os.path.join(run_dir, "model.pt"), map_location="cpu",
                      weights_only=False)["state_dict"]


def optuna_study(sweep_dir, name="alpha_search"):
    """A search's study, read back through Optuna's own API from the sweep's optuna.db."""
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir}/optuna.db")


def file_sha256(path):
    """The SHA-256 of a file's bytes, to show a refused command left it as it was."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def snapshot(root, skip=(".sweep.lock",)):
    """Every file below ``root`` with its bytes: what a refused command must leave as it was
    (the sweep's lock aside: a refused command takes it while it checks, and it names the
    process holding it)."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if name in skip:
                continue
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


# --------------------------------------------------------------------------------------------
# Small runs' overrides, all on the synthetic data set. Each is named after what sets it apart
# (training images first; the other sizes and settings below); tests add their own on top.

#: 64 training, 32 test images, 8 a batch, the configured epochs.
SYNTHETIC_64_BATCH_8 = ["dataset=synthetic", "dataset.train_size=64", "dataset.test_size=32",
                        "trainer.batch_size=8", "trainer.progress_bar=false"]
#: :data:`SYNTHETIC_64_BATCH_8` for one epoch.
SYNTHETIC_64_BATCH_8_ONE_EPOCH = [*SYNTHETIC_64_BATCH_8, "trainer.epochs=1"]
#: 64 training, 32 test images, one epoch of batches of 16.
SYNTHETIC_64_ONE_EPOCH = ["dataset=synthetic", "dataset.train_size=64", "dataset.test_size=32",
                          "trainer.epochs=1", "trainer.batch_size=16",
                          "trainer.progress_bar=false"]
#: 64 training images, 16 of them held out for validation, 32 test; two epochs of batches of 16.
SYNTHETIC_64_VAL_16 = ["dataset=synthetic", "dataset.train_size=64",
                                  "dataset.test_size=32", "dataset.val_size=16",
                                  "trainer.epochs=2", "trainer.batch_size=16",
                                  "trainer.progress_bar=false"]
#: 32 training, 16 test images, one batch of 16 an epoch, no model.pt and no checkpoints.
SYNTHETIC_32_NO_SAVES = ["dataset=synthetic", "dataset.train_size=32", "dataset.test_size=16",
                         "trainer.epochs=1", "trainer.batch_size=16", "trainer.progress_bar=false",
                         "trainer.save_model=false", "trainer.checkpoint=false"]
#: :data:`SYNTHETIC_32_NO_SAVES` for two epochs.
SYNTHETIC_32_TWO_EPOCHS_NO_SAVES = [
    "dataset=synthetic", "dataset.train_size=32", "dataset.test_size=16", "trainer.epochs=2",
    "trainer.batch_size=16", "trainer.progress_bar=false", "trainer.save_model=false",
    "trainer.checkpoint=false"]
#: 96 training, 53 test images (tested 20 at a time: a last batch of 13), one epoch of batches
#: of 16.
SYNTHETIC_96_TEST_53_ONE_EPOCH = ["dataset=synthetic", "dataset.train_size=96",
                                  "dataset.test_size=53", "trainer.epochs=1",
                                  "trainer.batch_size=16", "trainer.test_batch_size=20",
                                  "trainer.progress_bar=false"]
#: 96 training, 32 test images, batches of 16, the configured epochs.
SYNTHETIC_96 = ["dataset=synthetic", "dataset.train_size=96", "dataset.test_size=32",
                "trainer.batch_size=16", "trainer.progress_bar=false"]
#: 96 training images, 40 of them held out for validation, 32 test; two epochs of batches of 16.
SYNTHETIC_96_VAL_40 = ["dataset=synthetic", "dataset.train_size=96",
                                  "dataset.test_size=32", "dataset.val_size=40",
                                  "trainer.epochs=2", "trainer.batch_size=16",
                                  "trainer.progress_bar=false"]
#: 128 training, 101 test images, two epochs, multi-octave, channels-first (two ranks of 16: 4
#: steps an epoch). In channels_last, oneDNN's convolutions round differently at batch 16 and
#: 32 (measured: weights 1e-3 apart after 4 steps at lr 0.05, 1e-7 apart channels-first), which
#: would hide what comparing two ranks at batch b with one process at 2b is about.
SYNTHETIC_128_CHANNELS_FIRST = [
    "dataset=synthetic", "dataset.train_size=128", "dataset.test_size=101", "trainer.epochs=2",
    "trainer.progress_bar=false", "conv=multi-octave", "speed.channels_last=false"]
#: 160 training, 60 test images, one epoch at the configured batch size.
SYNTHETIC_160_ONE_EPOCH = ["dataset=synthetic", "dataset.train_size=160",
                           "dataset.test_size=60", "trainer.epochs=1",
                           "trainer.progress_bar=false"]
#: experiment=alpha_search under -m on 160 training, 60 test images, one epoch of batches of
#: 16 a trial; the tests add hydra.sweeper.n_trials.
ALPHA_SEARCH_160 = ["-m", "experiment=alpha_search", "dataset=synthetic",
                              "dataset.train_size=160", "dataset.test_size=60",
                              "trainer.epochs=1", "trainer.batch_size=16",
                              "trainer.progress_bar=false"]
#: On the PopTorch double (device=ipu, one device iteration): 192 training, 61 test images, two
#: epochs of batches of 8, multi-octave.
IPU_SYNTHETIC_192 = ["device=ipu", "ipu.device_iterations=1", "dataset=synthetic",
                                  "dataset.train_size=192", "dataset.test_size=61",
                                  "trainer.epochs=2", "trainer.batch_size=8",
                                  "trainer.progress_bar=false", "conv=multi-octave"]
#: 200 training, 60 test images, one epoch of batches of 16.
SYNTHETIC_200_ONE_EPOCH = ["dataset=synthetic", "dataset.train_size=200",
                           "dataset.test_size=60", "trainer.batch_size=16", "trainer.epochs=1",
                           "trainer.progress_bar=false"]
#: 200 training, 50 test images, two epochs at the configured batch size.
SYNTHETIC_200_TWO_EPOCHS = ["dataset=synthetic", "dataset.train_size=200",
                            "dataset.test_size=50", "trainer.epochs=2",
                            "trainer.progress_bar=false"]
#: 400 training, 200 test images, one epoch of batches of 16.
SYNTHETIC_400_ONE_EPOCH = ["dataset=synthetic", "dataset.train_size=400",
                           "dataset.test_size=200", "trainer.epochs=1", "trainer.batch_size=16",
                           "trainer.progress_bar=false"]
#: 600 training, 100 test images, batches of 8 (tested 50 at a time), on the CPU, the
#: configured epochs.
SYNTHETIC_600_CPU = ["dataset=synthetic", "dataset.train_size=600", "dataset.test_size=100",
                     "trainer.batch_size=8", "trainer.test_batch_size=50",
                     "trainer.progress_bar=false", "device=cpu"]
#: For the IPU backend (the tests add device=ipu): 960 training, 437 test images, two epochs of
#: batches of 8 (tested 10 at a time), no loader worker processes.
SYNTHETIC_960_FOR_IPU = ["dataset=synthetic", "dataset.train_size=960", "dataset.test_size=437",
                         "trainer.epochs=2", "trainer.batch_size=8",
                         "trainer.test_batch_size=10", "trainer.progress_bar=false",
                         "ipu.num_workers=0"]
#: 1200 training, 300 test images, batches of 8 (150 steps an epoch), octave at alpha 0.25,
#: the configured epochs.
SYNTHETIC_1200_OCTAVE = ["dataset=synthetic", "dataset.train_size=1200",
                                 "dataset.test_size=300", "trainer.batch_size=8",
                                 "trainer.progress_bar=false", "conv=octave", "alpha=0.25"]
#: 2000 training, 500 test images, two epochs of batches of 16: enough to learn the data.
SYNTHETIC_2000 = ["dataset=synthetic", "dataset.train_size=2000",
                             "dataset.test_size=500", "trainer.epochs=2",
                             "trainer.batch_size=16", "trainer.progress_bar=false"]
#: A joblib sweep of the 3 conv modes, 2 jobs at a time, one epoch of 400 training images (50
#: steps) each, its report's figures PNG only and no confusion-matrix figure
#: (:data:`SWEEP_FIGURES`, :data:`CONFUSION_FIGURES`, named: its resume line shows them);
#: :func:`start_joblib_sweep` holds its first jobs inside the epoch.
JOBLIB_SWEEP = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                "conv=vanilla,octave,multi-octave", "dataset=synthetic", "dataset.train_size=400",
                "dataset.test_size=100", "trainer.epochs=1", "trainer.progress_bar=false",
                SWEEP_FIGURES, CONFUSION_FIGURES]
