"""speed.malloc (octconv_exp/backends/allocator.py): the decision, the mallopt calls, and their effect on a
real training loop's page faults."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from octconv_exp.backends import allocator
from octconv_exp.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeLibc:
    """glibc's mallopt: returns 1 on success, 0 for an option it refuses (malloc/malloc.c)."""

    def __init__(self, refuse=()):
        self.calls = []
        self.refuse = set(refuse)

    def mallopt(self, option, value):
        self.calls.append((option, value))
        return 0 if option in self.refuse else 1


@pytest.fixture
def untuned(monkeypatch):
    monkeypatch.setitem(allocator._tuned, "by", None)


def _lookup(libc, why=None):
    return lambda: (libc, why)


def test_the_decision(untuned):
    libc = FakeLibc()
    assert allocator.decide("auto", "cpu", _lookup(libc))[::2] == (True, "auto: on (CPU, glibc)")
    assert allocator.decide("True", "cpu", _lookup(libc))[::2] == (True, "speed.malloc=true")
    assert allocator.decide("false", "cpu", _lookup(libc))[::2] == (False, "speed.malloc=false")
    assert allocator.decide("auto", "cuda", _lookup(libc))[::2] == (False, "auto: off on cuda")
    off = allocator.decide("auto", "cpu", _lookup(None, "the C library is not glibc"))
    assert off[::2] == (False, "auto: off: the C library is not glibc")
    with pytest.raises(ConfigError, match="speed.malloc=true: applies to CPU runs"):
        allocator.decide("true", "cuda", _lookup(libc))
    with pytest.raises(ConfigError, match="needs glibc's malloc: not Linux"):
        allocator.decide("true", "cpu", _lookup(None, "not Linux (darwin)"))
    assert not libc.calls  # deciding sets nothing


def test_apply_sets_the_three_thresholds_once_per_process(untuned):
    libc = FakeLibc()
    first = allocator.apply("auto", "cpu", _lookup(libc))
    assert first == ("on: auto: on (CPU, glibc): mmap threshold 32 MiB, trim threshold 1 GiB, "
                     "top pad 64 MiB")
    assert libc.calls == [(-3, 32 << 20), (-1, 1 << 30), (-2, 64 << 20)]
    # a second run in the same process (a sweep's basic launcher): already set
    assert allocator.apply("true", "cpu", _lookup(libc)).startswith("on: speed.malloc=true")
    assert len(libc.calls) == 3
    # a later run that turns it off cannot undo it, and says so
    assert allocator.apply("false", "cpu", _lookup(libc)) == (
        "speed.malloc=false (malloc stays tuned: an earlier run in this process set it)")


def test_off_sets_nothing_and_a_refused_option_is_an_error(untuned):
    libc = FakeLibc()
    assert allocator.apply("false", "cpu", _lookup(libc)) == "off: speed.malloc=false"
    assert allocator.apply("auto", "cuda", _lookup(libc)) == "off: auto: off on cuda"
    assert not libc.calls
    with pytest.raises(RuntimeError, match="refused options"):
        allocator.apply("auto", "cpu", _lookup(FakeLibc(refuse={-1})))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc: Linux only")
def test_this_process_has_glibc_malloc():
    libc, why = allocator.glibc_malloc()
    assert why is None and libc is not None


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("gcc") is None,
                    reason="needs Linux and gcc to build a preloaded malloc")
def test_a_preloaded_malloc_turns_auto_off(tmp_path):
    # the way jemalloc or tcmalloc arrive: LD_PRELOAD of a library that defines malloc
    src = tmp_path / "mymalloc.c"
    src.write_text("#include <stddef.h>\nextern void *__libc_malloc(size_t);\n"
                   "void *malloc(size_t n) { return __libc_malloc(n); }\n")
    lib = tmp_path / "libmymalloc.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    code = ("from octconv_exp.backends import allocator; "
            "print(allocator.apply('auto', 'cpu'))")
    env = dict(os.environ, LD_PRELOAD=str(lib))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "off: auto: off: malloc is not glibc's (another allocator is preloaded)")


PAGE_FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from octconv_exp.backends import allocator
    from octconv_exp.models.octave import ClassificationModel
    print(allocator.apply(sys.argv[1], "cpu"))
    torch.manual_seed(0)
    model = ClassificationModel("vanilla", 0.5, 2).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,))
    def step():
        opt.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        opt.step()
    for _ in range(4):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(6):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 6 * 4096 / 2**20)
""")


@pytest.mark.skipif(allocator.glibc_malloc()[0] is None, reason="glibc malloc only")
def test_tuned_malloc_takes_a_training_steps_tensors_without_page_faults():
    """Measured here with glibc's defaults: 6.6-48 MiB of fresh pages per step of this loop
    (its largest tensors are 8 MiB); tuned, 0-1.4 MiB."""
    per_step = {}
    for setting in ("false", "auto"):
        done = subprocess.run([sys.executable, "-c", PAGE_FAULTS, setting], cwd=REPO,
                              capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert done.returncode == 0, done.stderr
        decision, mib = done.stdout.split("\n")[:2]
        assert decision.startswith("on: " if setting == "auto" else "off: ")
        per_step[setting] = float(mib)
    assert per_step["auto"] < 3.0, per_step
