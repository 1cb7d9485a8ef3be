"""Documented promises that no other test guarded (issue 27): the one-line errors of
docs/reliability.md for unknown keys, optimizer and scheduler arguments, memory, broken
interpolations and seeds; the thread share a parallel launcher gives each job; and the sweep
pre-check over more combinations than it tries exhaustively."""
import types

import pytest

from octconv_exp import cli
from octconv_exp import config as config_module
from octconv_exp.errors import USER_ERROR_EXIT


def preflight_error(argv, capsys):
    """The whole of what run.py's pre-check prints for argv, and its exit status."""
    with pytest.raises(SystemExit) as exc:
        cli.preflight(list(argv) + ["dataset=synthetic"])
    err = capsys.readouterr().err
    return exc.value.code, err


def assert_one_line(err):
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("error: ") and "Traceback" not in err


@pytest.mark.parametrize("argv, line", [
    # a misspelt key of the schema: the closest real key
    (["+trainer.epoch=3"], "error: trainer.epoch=3: did you mean trainer.epochs?\n"),
    # an added key that no part of the schema has
    (["+foo=1"], "error: foo=1: it is not a setting octconv-exp reads (docs/configuration.md)"),
    # an argument the optimizer's signature does not take
    (["optimizer=adam", "+optimizer.beta=0.9"],
     "error: optimizer.beta=0.9: Adam takes no argument 'beta'; did you mean optimizer.betas? "
     "it takes lr, betas, eps, weight_decay"),
    # scheduler arguments: the range check, then what the scheduler class itself refuses
    (["scheduler=step", "scheduler.step_size=0"],
     "error: scheduler.step_size=0: must be an integer >= 1\n"),
    (["scheduler=multistep", "+scheduler.milestone=3"],
     "error: scheduler=multistep=milestones=[5, 8], gamma=0.1, warmup_epochs=0, "
     "warmup_factor=0.1, milestone=3: WarmupMultiStepLR refuses them: "),
    # a broken ${...}: the key and what is missing
    (["trainer.epochs=${trainer.nope}"],
     "error: trainer.epochs: Interpolation key 'trainer.nope' not found\n"),
    # torch seeds are 64-bit
    (["seed=9223372036854775808"],
     "error: seed=9223372036854775808: must be an integer in [0, 9223372036854775807]"),
])
def test_documented_one_line_errors(argv, line, capsys):
    code, err = preflight_error(argv, capsys)
    assert code == USER_ERROR_EXIT
    assert_one_line(err)
    assert err.startswith(line), err


def test_the_largest_seed_is_accepted(capsys):
    cli.preflight(["seed=9223372036854775807", "dataset=synthetic", "--cfg", "job"])
    cli.preflight(["seed=9223372036854775807", "dataset=synthetic",
                   "hydra.run.dir=/nonexistent-octconv-exp-test/x"])
    assert capsys.readouterr().err == ""


def test_a_model_larger_than_host_memory_is_refused_before_it_is_built(capsys, monkeypatch):
    # expansion 1000: about 8.6e9 parameters, 16 bytes each with SGD's state, counted on the
    # meta device; the machine's real MemAvailable decides (24 GiB here).
    code, err = preflight_error(["expansion=1000"], capsys)
    assert code == USER_ERROR_EXIT
    assert_one_line(err)
    assert err.startswith("error: expansion=1000: needs at least 137.4 GiB for weights, "
                          "gradients and optimizer state, and ")
    assert "GiB is available; use a smaller expansion" in err
    # The same rule against a smaller machine: expansion 40 needs about 0.3 GiB.
    monkeypatch.setattr(config_module, "_available_memory", lambda: 2**27)  # 128 MiB
    code, err = preflight_error(["expansion=40"], capsys)
    assert code == USER_ERROR_EXIT and "and 0.1 GiB is available" in err, err
    monkeypatch.setattr(config_module, "_available_memory", lambda: 2**30)
    cli.preflight(["expansion=40", "dataset=synthetic", "hydra.run.dir=/nonexistent-x/y"])
    assert capsys.readouterr().err == ""


class _Launcher(dict):
    """A Hydra launcher node as launcher_threads reads it (``get`` and attributes)."""

    def __getattr__(self, name):
        return self[name]


@pytest.mark.parametrize("cores, launcher, expected", [
    (8, {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
         "n_jobs": 4}, 2),
    (8, {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
         "n_jobs": 3}, 2),
    (8, {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
         "n_jobs": -1}, 1),  # a job per core
    (8, {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
         "n_jobs": 16}, 1),  # more jobs than cores: still one thread each
    (2, {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
         "n_jobs": 1}, 2),
    (8, {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
         "cpus_per_task": 3}, 3),
    (8, {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, None),
])
def test_a_parallel_jobs_share_of_the_cores(cores, launcher, expected, monkeypatch):
    from hydra.core import hydra_config

    monkeypatch.setattr(cli.os, "cpu_count", lambda: cores)
    fake = types.SimpleNamespace(get=lambda: types.SimpleNamespace(launcher=_Launcher(launcher)))
    monkeypatch.setattr(hydra_config, "HydraConfig", fake)
    cfg = types.SimpleNamespace(get=lambda key: None)
    assert cli.launcher_threads(cfg) == expected
    # threads= given: the config decides, whatever the launcher
    given = types.SimpleNamespace(get=lambda key: 5, threads=5)
    assert cli.launcher_threads(given) == 5


def test_a_sweep_of_more_than_256_combinations_is_checked_one_value_at_a_time():
    sweeps = ["alpha=0.1,0.2,0.3,0.4,0.5,0.6,0.7", "seed=" + ",".join(map(str, range(8))),
              "expansion=1,2,3,4,5", "conv=octave"]
    combos = cli._override_combinations(sweeps)
    assert 7 * 8 * 5 > cli.MAX_PREFLIGHT_COMBINATIONS
    # one combination per value (the first value of every other sweep), not 280
    assert len(combos) == 7 + 8 + 5 + 1
    for key, values in (("alpha", 7), ("seed", 8), ("expansion", 5)):
        seen = {c for combo in combos for c in combo if c.startswith(key + "=")}
        assert len(seen) == values, key
    assert all(combo[3] == "conv=octave" and len(combo) == 4 for combo in combos)
    small = cli._override_combinations(["alpha=0.1,0.2", "seed=0,1,2"])
    assert len(small) == 6 and len({tuple(c) for c in small}) == 6  # the full product


def test_a_bad_value_deep_in_a_large_sweep_is_refused_before_any_job(capsys):
    # 7 x 8 x 5 = 280 combinations: the bad alpha is the last value of its sweep.
    argv = ["-m", "conv=octave", "seed=" + ",".join(map(str, range(8))),
            "expansion=1,2,3,4,5", "alpha=0.1,0.2,0.3,0.4,0.5,0.6,1.5"]
    code, err = preflight_error(argv, capsys)
    assert code == USER_ERROR_EXIT
    assert_one_line(err)
    assert err.startswith("error: alpha=1.5: "), err
