"""Every config composes and validates; every bad value is refused with one line naming it."""
import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import REPO
from octconv_exp.cli import preflight as cli
from octconv_exp.config.schema import ConfigError, validate
from octconv_exp.errors import USER_ERROR_EXIT

CONF = os.path.join(REPO, "conf")
GROUPS = ("conv", "optimizer", "scheduler", "dataset", "ipu", "model")
USER_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "user_code")


def options(group):
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF, group)) if f.endswith(".yaml"))


@pytest.fixture
def composer():
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        yield lambda *overrides: compose(config_name="config", overrides=list(overrides))
    GlobalHydra.instance().clear()


def test_defaults_match_the_seed(composer):
    cfg = composer()
    assert cfg.conv.mode == "vanilla"
    assert cfg.alpha == 0.5 and cfg.expansion == 1
    assert (cfg.trainer.batch_size, cfg.trainer.test_batch_size, cfg.trainer.epochs) == (8, 80, 10)
    assert cfg.ipu.device_iterations == 50
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.lr == 0.05
    assert cfg.optimizer.momentum == 0.0
    assert cfg.dataset.name == "cifar10" and cfg.dataset.root == "data"
    assert list(cfg.dataset.mean) == [0.4914, 0.4822, 0.4465]
    assert list(cfg.dataset.std) == [0.2470, 0.2435, 0.2616]
    assert cfg.profile_dir is None and cfg.ipu.cache_dir is None


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes_and_validates(composer, group, tmp_path):
    found = options(group)
    assert len(found) >= (3 if group != "ipu" else 1)
    for option in found:
        extra = [f"dataset.root={tmp_path}"] if (group, option) == ("dataset", "image_folder") else []
        if (group, option) == ("optimizer", "lamb"):
            extra.append("device=ipu")  # LAMB exists only in poptorch.optim
        if (group, option) == ("dataset", "custom"):
            extra.append("dataset._target_=my_research.Stripes")
        cfg = composer(f"{group}={option}", *extra)
        validate(cfg, check_environment=False)
        if group == "conv":
            assert cfg.conv.mode == option
        if group in ("optimizer", "scheduler", "dataset", "model"):
            assert cfg[group].name == option


def test_seed_command_lines_compose(composer, tmp_path):
    cfg = composer("conv=octave", "alpha=0.8")
    assert (cfg.conv.mode, cfg.alpha) == ("octave", 0.8)
    cfg = composer("conv=multi-octave", "optimizer=adam", "optimizer.lr=0.001", "trainer.epochs=3")
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 0.001
    assert cfg.trainer.epochs == 3
    cfg = composer("dataset=image_folder", f"dataset.root={tmp_path}")
    validate(cfg)


@pytest.mark.parametrize("overrides, key", [
    (["alpha=1.0"], "alpha"),
    (["alpha=-0.1"], "alpha"),
    (["conv=octave", "alpha=0.97"], "alpha"),      # 16 channels -> 0 high-frequency channels
    (["conv=octave", "alpha=0.95", "expansion=1"], "alpha"),
    (["conv=multi-octave", "alpha=0.97"], "alpha"),
    (["trainer.batch_size=0"], "trainer.batch_size"),
    (["trainer.test_batch_size=-8"], "trainer.test_batch_size"),
    (["trainer.epochs=0"], "trainer.epochs"),
    (["optimizer.lr=0"], "optimizer.lr"),
    (["optimizer=adam", "optimizer.lr=-1e-3"], "optimizer.lr"),
    (["expansion=0"], "expansion"),
    (["device=tpu"], "device"),
    (["conv.mode=dense"], "conv.mode"),
    (["ipu.device_iterations=0"], "ipu.device_iterations"),
    (["ipu.output_mode=everything"], "ipu.output_mode"),
    (["conv=multi-octave", "conv.multi_conv.plan_type=sideways"], "conv.multi_conv.plan_type"),
    (["conv=multi-octave", "conv.multi_conv.available_memory_proportions=[0.5,0.5]"],
     "conv.multi_conv.available_memory_proportions"),
    (["conv=multi-octave", "conv.multi_conv.partials_types=[double]"],
     "conv.multi_conv.partials_types"),
    (["dataset=image_folder", "dataset.root=/no/such/folder"], "dataset.root"),
    (["dataset=image_folder"], "dataset.root"),
    (["dataset=cifar10", "dataset.download=false", "dataset.root=/no/such/folder"], "dataset.root"),
    (["dataset.std=[0.2,0.0,0.2]"], "dataset.std"),
    (["speed.compile=sometimes"], "speed.compile"),
    (["speed.channels_last=maybe"], "speed.channels_last"),
    (["speed.malloc=sometimes"], "speed.malloc"),
    (["speed.malloc=true", "device=cuda"], "speed.malloc"),
])
def test_bad_values_name_the_key(composer, overrides, key):
    cfg = composer(*overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.key == key
    assert str(info.value).startswith(key)


def test_alpha_split_depends_on_expansion(composer):
    # alpha 0.95 leaves int(0.05 * 16) = 0 high channels at expansion 1, but 1 at expansion 2.
    validate(composer("conv=octave", "alpha=0.95", "expansion=2"))
    validate(composer("conv=vanilla", "alpha=0.97"))  # vanilla ignores alpha
    validate(composer("conv=octave", "alpha=0"))


def test_device_cuda_without_cuda(composer):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="no CUDA device"):
        validate(composer("device=cuda"))


@pytest.mark.parametrize("argv, needle", [
    (["conv=foo"], "conv=foo: not an option of config group 'conv'; choose one of: multi-octave, octave, vanilla"),
    (["optimizer=nope"], "optimizer=nope: not an option"),
    (["dataset=imagenet"], "dataset=imagenet: not an option"),
    (["alpha=abc"], "alpha: Value 'abc' of type 'str' could not be converted to Float"),
    (["expansion=1.5"], "expansion: Value '1.5'"),
    (["trainer.epoch=3"], "trainer.epoch: Key 'epoch' not in 'TrainerConfig'"),
    (["alpha=1.5"], "alpha=1.5: must be a number in [0, 1)"),
    (["-m", "conv=octave", "alpha=0.25,0.99"], "alpha=0.99"),   # a bad sweep value, before any job
    (["-m", "conv=octave,bogus"], "conv=bogus: not an option"),
    (["hydra/launcher=nope"], "Could not find 'hydra/launcher/nope'"),
    # A key that moved: its new place, found in the composed config or in a group option.
    (["logger=mlflow", "logger.tracking_uri=x"],
     "logger.tracking_uri: Key 'tracking_uri' is not in struct; did you mean "
     "logger.mlflow.tracking_uri?"),
    (["logger.tracking_uri=x"], "did you mean logger.mlflow.tracking_uri (with logger=mlflow)?"),
    (["+trainer.nonsense=1"], "it is not a setting octconv-exp reads (docs/configuration.md)"),
    (["--config-dir", "/nonexistent/presets", "alpha=0.25"], "--config-dir /nonexistent/presets: "
     "not a directory"),
])
def test_preflight_one_line_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        cli.preflight(argv)
    assert info.value.code == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert needle in err
    assert "Traceback" not in err


def test_preflight_accepts_good_sweeps(capsys):
    cli.preflight(["-m", "conv=vanilla,octave,multi-octave", "alpha=0.125,0.25,0.5,0.75",
                   "dataset=synthetic"])
    cli.preflight(["--cfg", "job", "conv=octave"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("preset", options("experiment"))
def test_every_experiment_preset_composes(composer, preset):
    cfg = composer(f"experiment={preset}")
    validate(cfg, check_environment=False)


def test_presets_carry_their_sweeps():
    from hydra import compose, initialize_config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        params = {p: compose("config", overrides=[f"experiment={p}"],
                             return_hydra_config=True).hydra.sweeper.params
                  for p in ("smoke", "alpha_sweep", "paper_alphas", "seed_repeats")}
    GlobalHydra.instance().clear()
    assert params["alpha_sweep"]["conv"] == "vanilla,octave,multi-octave"
    assert params["paper_alphas"]["alpha"] == "0,0.125,0.25,0.5,0.75"
    assert params["seed_repeats"]["seed"] == "0,1,2"
    assert "conv" in params["smoke"]


def write_presets(folder, **presets):
    """folder/experiment/<name>.yaml for each preset (a global package, like ours)."""
    os.makedirs(os.path.join(folder, "experiment"), exist_ok=True)
    for name, body in presets.items():
        with open(os.path.join(folder, "experiment", name + ".yaml"), "w") as f:
            f.write("# @package _global_\n" + body)
    return str(folder)


TINY = "defaults:\n  - override /dataset: synthetic\ntrainer:\n  epochs: 1\n"


@pytest.mark.parametrize("how", ["--config-dir", "hydra.searchpath"])
def test_preflight_finds_your_presets_where_hydra_does(how, tmp_path, capsys):
    mine = write_presets(tmp_path / "my_experiments", my_sweep=TINY + "hydra:\n  sweeper:\n"
                         "    params:\n      alpha: 0.25,0.5\n      conv: octave\n")
    flag = (["--config-dir", mine] if how == "--config-dir"
            else [f"hydra.searchpath=[file://{mine}]"])
    # Before: "Cannot find primary config 'config'" / "not an option of config group".
    cli.preflight(["-m"] + flag + ["experiment=my_sweep"])
    cli.preflight(flag + ["experiment=my_sweep"])
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit):  # ours are still there, and still checked
        cli.preflight(flag + ["experiment=nope"])
    err = capsys.readouterr().err
    assert "experiment=nope: not an option of config group 'experiment'" in err
    assert "my_sweep" in err and "alpha_sweep" in err


@pytest.mark.parametrize("params, needle", [
    ("alpha: 0.25,0.97\n      conv: octave", "alpha=0.97: splits a 16-channel layer"),
    # A search space: each choice, and both ends of a range, before the sampler picks any.
    ("conv: choice(octave, multi-octave)\n      alpha: choice(0.25, 0.97)",
     "alpha=0.97: splits"),
    ("conv: octave\n      alpha: interval(0.1, 0.99)", "alpha=0.99: splits"),
    ("conv: octave\n      alpha: 0.25\n      expansion: range(0, 2)", "expansion=0: must be"),
])
def test_preflight_checks_every_value_of_a_presets_sweep(params, needle, tmp_path, capsys):
    search = "  - override /search: optuna\n" if "(" in params else ""
    mine = write_presets(tmp_path, bad=TINY.replace("synthetic\n", "synthetic\n" + search)
                         + f"hydra:\n  sweeper:\n    params:\n      {params}\n")
    cli.preflight(["--config-dir", mine, "experiment=bad"])  # one run: the sweep is not used
    with pytest.raises(SystemExit) as info:
        cli.preflight(["-m", "--config-dir", mine, "experiment=bad"])
    assert info.value.code == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "hydra.sweeper.params" in err, err


def test_preflight_takes_the_command_lines_sweep_over_the_presets(tmp_path, capsys):
    octave = TINY.replace("synthetic\n", "synthetic\n  - override /conv: octave\n")
    mine = write_presets(tmp_path, bad=octave + "hydra:\n  sweeper:\n    params:\n"
                         "      alpha: 0.25,0.97\n")
    cli.preflight(["-m", "--config-dir", mine, "experiment=bad", "alpha=0.25,0.5"])
    search = write_presets(tmp_path / "s", s=octave.replace("octave\n", "octave\n  - "
                           "override /search: optuna\n", 1))
    cli.preflight(["-m", "--config-dir", search, "experiment=s", "alpha=interval(0.1,0.5)"])
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit):
        cli.preflight(["-m", "--config-dir", search, "experiment=s", "alpha=interval(0.1,0.99)"])
    assert "alpha=0.99: splits" in capsys.readouterr().err


def test_preflight_names_a_presets_typo_and_where_it_is(tmp_path, capsys):
    mine = write_presets(tmp_path, typo="trainer:\n  epoch: 3\n")
    with pytest.raises(SystemExit):
        cli.preflight(["--config-dir", mine, "experiment=typo"])
    assert capsys.readouterr().err == ("error: trainer.epoch: Key 'epoch' not in 'TrainerConfig'; "
                                       "did you mean trainer.epochs? (set in experiment/typo)\n")


def test_preflight_names_a_binary_preset(tmp_path, capsys):
    write_presets(tmp_path)
    (tmp_path / "experiment" / "blob.yaml").write_bytes(b"\xff\xfe\x00\x81binary")
    with pytest.raises(SystemExit) as info:
        cli.preflight(["--config-dir", str(tmp_path), "experiment=blob"])
    err = capsys.readouterr().err
    assert info.value.code == USER_ERROR_EXIT and err.count("\n") == 1
    assert f"{tmp_path}/experiment/blob.yaml: not a YAML text file (not UTF-8" in err


@pytest.mark.slow
def test_a_sweep_of_your_own_preset_runs_from_your_folder(tmp_path):
    import json

    from conftest import run_cli

    mine = write_presets(tmp_path / "my_experiments", tiny=(
        "defaults:\n  - override /dataset: synthetic\n  - override /conv: octave\n"
        "dataset:\n  train_size: 64\n  test_size: 32\ntrainer:\n  epochs: 1\n  batch_size: 16\n"
        "  progress_bar: false\ndevice: cpu\nhydra:\n  sweeper:\n    params:\n"
        "      alpha: 0.25,0.5\n"))
    res = run_cli("-m", "--config-dir", mine, "experiment=tiny",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert res.returncode == 0, res.stderr[-3000:]
    for alpha in (0.25, 0.5):
        with open(tmp_path / "sweep" / f"alpha={alpha}" / "seed=0" / "metrics.json") as f:
            done = json.load(f)
        assert done["status"] == "completed" and done["test_samples"] == 32


def test_preflights_composition_tells_hydra_the_mode(tmp_path, monkeypatch):
    """Hydra's main composes a command line's whole config once more only to read hydra.mode
    (Hydra.get_mode); run.py hands it the mode preflight composed instead, for exactly that
    config name and those overrides; a sweep, or any other call, composes as Hydra does."""
    from hydra._internal.hydra import Hydra
    from hydra.types import RunMode

    mine = write_presets(tmp_path, swept=TINY + "hydra:\n  mode: MULTIRUN\n")
    launch = cli.preflight(["--config-dir", mine, "experiment=swept", "alpha=0.25"])
    assert launch.composed_mode == ("config", ("experiment=swept", "alpha=0.25"),
                                    RunMode.MULTIRUN)
    assert cli.preflight(["alpha=0.25"]).composed_mode[2] is None  # Hydra's default
    assert cli.preflight(["-m", "alpha=0.25,0.5"]).composed_mode is None
    composed = []
    monkeypatch.setattr(Hydra, "compose_config", lambda self, **kw: composed.append(kw))
    original, hydra = Hydra.get_mode, Hydra.__new__(Hydra)
    with launch.hydra_mode_known():
        for attempt in ([], ["hydra.output_subdir=.hydra/attempts/1-2"]):  # run.py's own
            assert hydra.get_mode(config_name="config",
                                  overrides=["experiment=swept", "alpha=0.25"] + attempt
                                  ) == RunMode.MULTIRUN
        assert composed == []
        for name, overrides in (("other", ["experiment=swept", "alpha=0.25"]),
                                ("config", ["experiment=swept", "alpha=0.5"])):
            hydra.get_mode(config_name=name, overrides=overrides)  # composes (patched)
            assert composed[-1]["config_name"] == name
            assert composed[-1]["overrides"] == overrides
    assert Hydra.get_mode is original


@pytest.mark.slow
def test_a_preset_that_sets_multirun_sweeps_without_dash_m(tmp_path):
    """hydra.mode: MULTIRUN in a preset makes a plain command line a sweep, as in Hydra (the
    mode read from preflight's composition, not composed again)."""
    from conftest import SYNTHETIC_32_NO_SAVES, run_cli

    mine = write_presets(tmp_path / "mine", swept="hydra:\n  mode: MULTIRUN\n")
    res = run_cli("--config-dir", mine, "experiment=swept", *SYNTHETIC_32_NO_SAVES,
                  f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = list((tmp_path / "sweep").glob("*/seed=0/metrics.json"))
    assert len(jobs) == 1 and "experiment=swept" in str(jobs[0]), os.listdir(tmp_path)
    assert not os.path.exists(tmp_path / "run")


def test_hydras_second_composition_is_a_copy_of_preflights(tmp_path, monkeypatch):
    """run.py composes its command line in preflight, and Hydra's main composes it again (with
    hydra.mode=RUN added when the config leaves the mode unset): within compositions_reused
    the second is a copy of the first, equal to what Hydra itself composes; other inputs (a
    working directory, an environment, other overrides) compose anew."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from octconv_exp.config import presets

    def loader():
        return ConfigLoaderImpl(config_search_path=presets.search_path())

    def compose(overrides):
        return loader().load_configuration("config", list(overrides), RunMode.RUN)

    line = ["conv=octave", "alpha=0.25", f"hydra.run.dir={tmp_path}"]
    with_mode = line + ["hydra.mode=RUN"]
    expected = {tuple(o): OmegaConf.to_yaml(compose(o)) for o in (line, with_mode)}
    assert "mode: RUN" in expected[tuple(with_mode)]
    composed = []
    impl = ConfigLoaderImpl._load_configuration_impl
    monkeypatch.setattr(ConfigLoaderImpl, "_load_configuration_impl",
                        lambda self, **kw: composed.append(kw["overrides"]) or impl(self, **kw))
    with presets.compositions_reused():
        compose(line).seed = 7  # a change to one copy is in no other
        for overrides in (line, with_mode, line):
            copy = compose(overrides)
            assert OmegaConf.to_yaml(copy) == expected[tuple(overrides)]
            copy.seed = 7
        assert composed == [line]
        for _ in range(2):  # the first composition only is kept
            compose(line + ["seed=1"])
        with monkeypatch.context() as m:
            m.setenv("OCTCONV_EXP_SOMETHING", "1")
            compose(line)
        with monkeypatch.context() as m:
            m.chdir(tmp_path)
            compose(line)
        assert composed == [line] + [line + ["seed=1"]] * 2 + [line, line]
        compose(line)
        assert len(composed) == 5
        patched = ConfigLoaderImpl.load_configuration
        with presets.compositions_reused():  # preflight's within run.py's: run.py's
            assert ConfigLoaderImpl.load_configuration is patched
        assert ConfigLoaderImpl.load_configuration is patched
    compose(line)  # and outside it, as Hydra does
    assert len(composed) == 6
    assert ConfigLoaderImpl.load_configuration.__module__.startswith("hydra.")


def test_compositions_read_each_config_file_once(monkeypatch):
    """Within compositions_reused (validate's hundreds of compositions, a sweep's jobs) each
    YAML file is parsed once and every composition is still what Hydra composes alone."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.file_config_source import FileConfigSource
    from hydra._internal.core_plugins.importlib_resources_config_source import (
        ImportlibResourcesConfigSource,
    )
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from octconv_exp.config import presets

    def compose(overrides):
        loader = ConfigLoaderImpl(config_search_path=presets.search_path())
        return OmegaConf.to_yaml(loader.load_configuration("config", overrides, RunMode.RUN))

    lines = [["conv=octave", "alpha=0.25"], ["conv=vanilla", "optimizer=adam"],
             ["conv=octave", "alpha=0.5", "experiment=smoke"], ["conv=octave", "alpha=0.25"]]
    expected = [compose(line) for line in lines]
    reads = []
    for source in (FileConfigSource, ImportlibResourcesConfigSource):  # conf/, Hydra's own
        monkeypatch.setattr(source, "load_config", lambda self, config_path, read=source
                            .load_config: reads.append(config_path) or read(self, config_path))
    with presets.compositions_reused():
        assert [compose(line) for line in lines] == expected
    assert {"config", "conv/octave", "hydra/output/default"} <= set(reads), sorted(reads)
    assert len(reads) == len(set(reads)), sorted(reads)
    compose(lines[0])
    assert reads.count("config") == 2  # outside it, read again


#: Override lists as a sweep's jobs and a search's choices give them: plain values beside
#: group choices, a value Hydra refuses, a key no config has, keys that overlap, a list index,
#: a +key, a dict, an interpolation, a preset's own values overridden.
TASK_LINES = [
    ["conv=octave", "alpha=0.25"], ["conv=octave", "alpha=0.5"], ["alpha=0.75", "conv=octave"],
    ["conv=octave", "alpha=0.25", "expansion=2", "trainer.epochs=3"],
    ["conv=vanilla", "optimizer=adam", "optimizer.lr=0.01"],
    ["conv=vanilla", "optimizer=adam", "optimizer.lr=0.5"],
    ["experiment=alpha_search", "alpha=0.625", "expansion=1", "dataset=synthetic"],
    ["experiment=smoke", "trainer.epochs=2"], ["experiment=smoke", "trainer.epochs=4"],
    ["conv=octave", "alpha=abc"], ["conv=octave", "alpah=0.25"],
    ["conv=octave", "trainer.epochs=2", "trainer={epochs: 5}"],
    ["conv=octave", "trainer={epochs: 5}", "trainer.epochs=2"],
    ["conv=octave", "+trainer.extra=1", "seed=3"], ["conv=octave", "seed=${trainer.epochs}"],
    ["conv=octave", "~alpha", "seed=4"], ["conv=octave", "alpha=0.25", "alpha=0.5"],
    ["dataset=synthetic", "dataset.train_size=64", "dataset.test_size=32"],
    ["dataset=synthetic", "dataset.train_size=65", "dataset.test_size=32"],
    ["hydra.sweep.dir=/tmp/x", "conv=octave", "alpha=0.125"], ["nope=1", "alpha=0.5"],
]


def test_task_configs_are_what_hydra_composes_whole(monkeypatch):
    """A sweep's values applied to a copy of one composition (preflight's and validate's
    TaskConfigs) give what Hydra composes for each whole override list: the same config,
    struct flag and types, or the same error, word for word; each structure is composed
    once, and a list whose plain values overlap another override is composed whole."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from omegaconf import OmegaConf

    from octconv_exp.config import presets

    def outcome(compose):
        try:
            cfg = compose()
        except Exception as exc:  # noqa: BLE001 - the error is what is compared
            return ("error", type(exc).__name__, str(exc))
        return (OmegaConf.to_yaml(cfg), OmegaConf.is_struct(cfg),
                type(cfg.trainer).__name__, OmegaConf.get_type(cfg, "trainer").__name__)

    with presets.hydra_like_run():
        expected = [outcome(lambda line=line: compose(config_name="config", overrides=line))
                    for line in TASK_LINES]
        composed = []
        impl = ConfigLoaderImpl._load_configuration_impl
        monkeypatch.setattr(ConfigLoaderImpl, "_load_configuration_impl",
                            lambda self, **kw: composed.append(kw["overrides"]) or impl(self, **kw))
        configs = presets.TaskConfigs("config")
        got = [outcome(lambda line=line: configs.compose(line)) for line in TASK_LINES]
        again = outcome(lambda: configs.compose(TASK_LINES[1]))
    for line, want, have in zip(TASK_LINES, expected, got):
        assert have == want, line
    assert again == expected[1]
    assert sum(want[0] == "error" for want in expected) == 3  # alpha=abc, alpah, nope
    # One composition for conv=octave with any alpha (and once more for expansion+epochs),
    # one for optimizer=adam, ... : fewer than the lists, and the overlapping ones whole.
    assert ["conv=octave"] in composed and ["conv=vanilla", "optimizer=adam"] in composed
    assert composed.count(["conv=octave"]) == 1
    assert ["conv=octave", "trainer.epochs=2", "trainer={epochs: 5}"] in composed
    assert ["conv=octave", "alpha=0.25", "alpha=0.5"] in composed
    assert len(composed) < len(TASK_LINES) - 6, composed
