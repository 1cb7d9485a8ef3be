"""Documented promises that no other test guarded (issue 27): the one-line errors of
docs/reliability.md for unknown keys, optimizer and scheduler arguments, memory, broken
interpolations and seeds; the thread share a parallel launcher gives each job; and the sweep
pre-check over more combinations than it tries exhaustively."""
import types

import pytest

from octconv_exp.cli import outcome
from octconv_exp.cli import preflight as cli
from octconv_exp.config import schema as config_module
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
    # ... added without a value (???): the same line, not OmegaConf's MissingMandatoryValue
    (["+trainer.epoch=???"], "error: trainer.epoch=???: did you mean trainer.epochs?\n"),
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
    # 192 MiB = 0.1875 GiB, shown as 0.2 (a wrong unit would show 0.1 or 0.4)
    monkeypatch.setattr(config_module, "_available_memory", lambda: 3 * 2**26)
    code, err = preflight_error(["expansion=40"], capsys)
    assert code == USER_ERROR_EXIT and "and 0.2 GiB is available" in err, err
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
    monkeypatch.setattr(cli.os, "cpu_count", lambda: cores)
    fake = types.SimpleNamespace(get=lambda: types.SimpleNamespace(launcher=_Launcher(launcher)))
    monkeypatch.setattr(outcome, "HydraConfig", fake)
    cfg = types.SimpleNamespace(get=lambda key: None)
    assert outcome.launcher_threads(cfg) == expected
    # threads= given: the config decides, whatever the launcher
    given = types.SimpleNamespace(get={"threads": 5}.get, threads=5)
    assert outcome.launcher_threads(given) == 5


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


def test_a_parallel_jobs_share_when_the_launcher_leaves_things_out(monkeypatch):
    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    submitit = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    cfg = types.SimpleNamespace(get=lambda key: None)

    def threads(cores, launcher):
        monkeypatch.setattr(cli.os, "cpu_count", lambda: cores)
        node = _Launcher(launcher)
        monkeypatch.setattr(outcome, "HydraConfig", types.SimpleNamespace(
            get=lambda: types.SimpleNamespace(launcher=node)))
        return outcome.launcher_threads(cfg)

    # joblib's n_jobs unset, null or 0: a job per core, as joblib itself runs them
    assert threads(8, {"_target_": joblib}) == 1
    assert threads(8, {"_target_": joblib, "n_jobs": None}) == 1
    assert threads(8, {"_target_": joblib, "n_jobs": 0}) == 1
    # os.cpu_count() may not know (None): one core is assumed, not a crash, even for one job
    assert threads(None, {"_target_": joblib, "n_jobs": 1}) == 1
    assert threads(None, {"_target_": joblib, "n_jobs": 2}) == 1
    # submitit without cpus_per_task: torch's own default, not a guess
    assert threads(8, {"_target_": submitit}) is None
    assert threads(8, {"_target_": submitit, "cpus_per_task": 4}) == 4


def test_a_single_run_outside_a_launcher_keeps_torchs_default_threads():
    # No Hydra run is active here: HydraConfig.get() raises ValueError.
    assert outcome.launcher_threads(types.SimpleNamespace(get=lambda key: None)) is None
    assert outcome.launcher_threads(types.SimpleNamespace(get={"threads": 3}.get, threads=3)) == 3


def _scheduler(**node):
    return config_module.OmegaConf.create(node)


@pytest.mark.parametrize("node, key, expected", [
    ({"name": "step", "_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 0},
     "scheduler.step_size", "must be an integer >= 1"),
    ({"name": "step", "_target_": "torch.optim.lr_scheduler.StepLR", "step_size": True},
     "scheduler.step_size", "must be an integer >= 1"),
    ({"name": "step", "_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 2.0},
     "scheduler.step_size", "must be an integer >= 1"),
    ({"name": "cosine", "_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": 0},
     "scheduler.T_max", "must be an integer >= 1"),
    ({"name": "step", "_target_": "torch.optim.lr_scheduler.NoSuchLR", "step_size": 3},
     "scheduler._target_", "cannot be imported: name a torch.optim.lr_scheduler class"),
])
def test_scheduler_arguments_out_of_range_are_refused(node, key, expected):
    with pytest.raises(config_module.ConfigError) as info:
        config_module._check_scheduler(_scheduler(**node), 0.1)
    assert (info.value.key, info.value.expected) == (key, expected)


def test_what_the_scheduler_class_refuses_is_named_with_every_argument_given():
    with pytest.raises(config_module.ConfigError) as info:
        config_module._check_scheduler(_scheduler(
            name="step", _target_="torch.optim.lr_scheduler.StepLR", step_size=3, foo=1), 0.1)
    assert info.value.key == "scheduler=step"
    assert info.value.value == "step_size=3, foo=1"
    assert info.value.expected.startswith("StepLR refuses them: ")
    assert "foo" in info.value.expected
    with pytest.raises(config_module.ConfigError) as info:
        config_module._check_scheduler(_scheduler(
            name="step", _target_="torch.optim.lr_scheduler.StepLR"), 0.1)
    assert info.value.value == "(no arguments)"
    assert "step_size" in info.value.expected  # StepLR's own: a required argument is missing


def test_the_smallest_scheduler_arguments_are_accepted():
    config_module._check_scheduler(_scheduler(
        name="step", _target_="torch.optim.lr_scheduler.StepLR", step_size=1, gamma=0.5), 0.1)
    config_module._check_scheduler(_scheduler(
        name="cosine", _target_="torch.optim.lr_scheduler.CosineAnnealingLR", T_max=1), 0.1)


@pytest.mark.parametrize("value, is_number", [
    (0, True), (-2.5, True), (1e300, True),
    (True, False), (float("inf"), False), (float("-inf"), False), (float("nan"), False),
    ("1", False), (None, False),
])
def test_what_the_checks_count_as_a_number(value, is_number):
    # optimizer.lr=inf would pass "> 0" and train on NaN weights; true is no number either.
    assert config_module._is_number(value) is is_number


@pytest.mark.parametrize("value", [2.5, 3.0, True, "3", None, 0])
def test_an_integer_setting_refuses_what_is_not_an_integer_of_the_range(value):
    with pytest.raises(config_module.ConfigError) as info:
        config_module._require_int("dataset.workers", value, 1, "must be an integer >= 1")
    assert info.value.key == "dataset.workers" and info.value.value is value


def test_an_integer_setting_takes_its_minimum():
    config_module._require_int("dataset.workers", 1, 1, "must be an integer >= 1")
    config_module._require_int("dataset.workers", 2**63 - 1, 0, "must be an integer >= 0")


def _composed(*overrides):
    import os

    from hydra import compose, initialize_config_dir

    from conftest import REPO

    with initialize_config_dir(version_base="1.3", config_dir=os.path.join(REPO, "conf")):
        return compose(config_name="config", overrides=["dataset=synthetic", *overrides])


def test_a_model_as_large_as_the_free_memory_fits_and_one_byte_less_is_refused(monkeypatch):
    cfg = _composed()
    need = config_module.check_model(cfg)
    monkeypatch.setattr(config_module, "_free_gpu_memory", lambda device: None)
    monkeypatch.setattr(config_module, "_available_memory", lambda: need)
    config_module.check_model_fits_in_memory(cfg)
    monkeypatch.setattr(config_module, "_available_memory", lambda: None)  # no /proc/meminfo
    config_module.check_model_fits_in_memory(cfg)
    monkeypatch.setattr(config_module, "_available_memory", lambda: need - 1)
    with pytest.raises(config_module.ConfigError) as info:
        config_module.check_model_fits_in_memory(cfg)
    assert (info.value.key, info.value.value) == ("expansion", 1)
    # On a GPU: the same rule against its free memory, the host's being enough.
    monkeypatch.setattr(config_module, "_available_memory", lambda: 2 * need)
    monkeypatch.setattr(config_module, "_free_gpu_memory", lambda device: need)
    config_module.check_model_fits_in_memory(cfg)
    monkeypatch.setattr(config_module, "_free_gpu_memory", lambda device: need - 1)
    with pytest.raises(config_module.ConfigError, match="of GPU memory .* use a smaller "
                                                        "expansion, or device=cpu"):
        config_module.check_model_fits_in_memory(cfg)


def test_a_model_other_than_the_seeds_is_named_when_it_cannot_fit(monkeypatch):
    cfg = _composed("model=resnet_cifar")
    monkeypatch.setattr(config_module, "_free_gpu_memory", lambda device: None)
    monkeypatch.setattr(config_module, "_available_memory", lambda: 2**20)  # 1 MiB
    with pytest.raises(config_module.ConfigError) as info:
        config_module.check_model_fits_in_memory(cfg)
    assert (info.value.key, info.value.value) == ("model", "resnet_cifar")
    assert info.value.expected.endswith("GiB is available; use a smaller model")


@pytest.mark.parametrize("key, hint", [
    ("nesterov_momentum", "did you mean optimizer.nesterov or optimizer.momentum? "),
    ("zzz", ""),  # nothing close: only the list
])
def test_an_argument_the_optimizer_does_not_take_is_named_with_the_closest_ones(key, hint):
    opt = config_module.OmegaConf.create(
        {"name": "sgd", "_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9, key: 1})
    with pytest.raises(config_module.ConfigError) as info:
        config_module._check_optimizer_arguments(opt)
    assert (info.value.key, info.value.value) == (f"optimizer.{key}", 1)
    assert info.value.expected.startswith(
        f"SGD takes no argument '{key}'; {hint}it takes lr, momentum, dampening, weight_decay, "
        "nesterov, maximize, foreach, differentiable")


# --------------------------------------------- what validate skips without --trust-code (mutants)

@pytest.mark.parametrize("group, choice", [("optimizer", "optimizer=sgd"),
                                           ("scheduler", "scheduler=step")])
def test_an_optimizer_or_schedule_outside_octconv_exp_is_skipped_not_imported(group, choice):
    """``python -m octconv_exp.validate`` without --trust-code neither imports nor runs a
    ``_target_`` outside octconv-exp and torch (a preset could name ``os.system``): it is
    listed as not validated under its key. With the code trusted (a run), the check runs it."""
    from conftest import compose_config

    cfg = compose_config("dataset=synthetic", choice, f"{group}._target_=os.system")
    with config_module.without_config_code() as skipped:
        config_module.validate(cfg, check_environment=False)
    assert skipped == [(f"{group}._target_", "os.system")]
    with pytest.raises(config_module.ConfigError) as exc:  # trusted: inspected and refused
        config_module.validate(cfg, check_environment=False)
    assert "system" in str(exc.value)


def test_a_schedule_that_cannot_be_imported_is_named(capsys):
    code, err = preflight_error(["scheduler=step",
                                 "scheduler._target_=torch.optim.lr_scheduler.NoSuchLR"], capsys)
    assert code == USER_ERROR_EXIT
    assert_one_line(err)
    assert err.startswith("error: scheduler._target_=torch.optim.lr_scheduler.NoSuchLR: cannot "
                          "be imported: name a torch.optim.lr_scheduler class"), err


def test_a_schedule_argument_may_be_an_interpolation(capsys):
    """The schedule is built with its arguments resolved (step_size=${trainer.epochs} is 10,
    not the text of the interpolation)."""
    cli.preflight(["scheduler=step", "scheduler.step_size=${trainer.epochs}", "dataset=synthetic",
                   "hydra.run.dir=/nonexistent-octconv-exp-test/x"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_an_ipu_only_optimizer_is_refused_on_a_cpu_or_gpu_in_one_line(name):
    """LAMB is poptorch.optim's: a CPU/GPU run refuses it, naming what to use instead; the
    others pass (the end-to-end refusal: test_ipu.py's test_lamb_elsewhere_is_refused)."""
    from octconv_exp.backends.checks import check_optimizer_for_device

    check_optimizer_for_device(name)
    with pytest.raises(config_module.ConfigError) as info:
        check_optimizer_for_device("lamb")
    assert str(info.value) == ("optimizer=lamb: is only available on IPUs (poptorch.optim); "
                               "use device=ipu or choose sgd, adam, adamw or rmsprop")
