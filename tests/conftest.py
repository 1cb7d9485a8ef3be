import importlib
import os
import pickle
import subprocess
import sys
import tempfile

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
#: The test double of poptorch (PopTorch 3.4's behaviour, from its source).
DOUBLE = os.path.join(REPO, "tests", "poptorch_double")

from octconv_exp.data import make_synthetic  # noqa: E402

import forkserver  # noqa: E402  (tests/forkserver.py)

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]


#: run.py started from a process that has its libraries imported already (tests/forkserver.py):
#: the same program in a process of its own, without 6 of a small run's 10 seconds of imports.
FORK_SERVER = forkserver.ForkServer(os.environ)


def run_cli(*args, cwd=None, timeout=600, env=None):
    """``python run.py ARGS``, as a process of its own; returns the CompletedProcess (text mode)."""
    return run_python(os.path.join(REPO, "run.py"), *args, cwd=cwd, timeout=timeout, env=env)


def run_python(*argv, cwd=None, timeout=600, env=None):
    """``python ARGV`` (``run.py ARGS``, ``-m octconv_exp.validate ...``) as a process of its
    own, HYDRA_FULL_ERROR unset; returns the CompletedProcess (text mode). Through the fork
    server where that is the same program (forkserver.ForkServer.usable), else a plain
    subprocess."""
    full_env = dict(os.environ)
    full_env.pop("HYDRA_FULL_ERROR", None)
    full_env.update(env or {})
    cmd = [sys.executable, *argv]
    cwd = str(cwd or REPO)
    if FORK_SERVER.usable(full_env) and FORK_SERVER.lock.acquire(blocking=False):
        FORK_SERVER.lock.release()
        with tempfile.TemporaryDirectory(prefix="run_python-") as tmp:
            out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
            code = FORK_SERVER.run(list(argv), cwd, full_env, timeout, out, err)
            with open(out, errors="replace") as f_out, open(err, errors="replace") as f_err:
                return subprocess.CompletedProcess(cmd, code, f_out.read(), f_err.read())
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def pytest_sessionfinish(session, exitstatus):
    FORK_SERVER.close()


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

    import octconv_exp.config  # noqa: F401 (registers the schemas the configs name)

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


def start_joblib_sweep(sweep_dir, timeout):
    """A 3-job joblib sweep (2 at a time, in a session of its own) whose first two jobs have
    begun training: the process, for a test to signal."""
    import time

    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "run.py"), "-m", "hydra/launcher=joblib",
         "hydra.launcher.n_jobs=2", "conv=vanilla,octave,multi-octave", "dataset=synthetic",
         "dataset.train_size=4000", "dataset.test_size=100", "trainer.epochs=1",
         "trainer.progress_bar=false", f"hydra.sweep.dir={sweep_dir}"], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + timeout
    logs = [sweep_dir / c / "seed=0" / "run.log" for c in ("conv=vanilla", "conv=octave")]
    while not all(p.exists() and "Training: epochs" in p.read_text() for p in logs):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    return proc
