"""A run dir is enough to reuse its model: what model.pt and checkpoints record for inference
(normalisation, classes, input shape, how to build the model), evaluation and resume with the
recorded normalisation, octconv_exp.load_model without Hydra, and configs read from a
checkpoint that name code to run."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, SYNTHETIC_200_ONE_EPOCH, read_metrics, run_cli, write_image_folder
from octconv_exp.data.datasets import SYNTHETIC_CLASSES, make_synthetic
from octconv_exp.data.loading import load_data
from octconv_exp.errors import UserError
from octconv_exp.config.targets import check_saved_targets

USER_CODE = os.path.join(REPO, "tests", "user_code")

# ------------------------------------------------------------------------------ fast


def test_importing_the_package_stays_light_and_load_model_is_exported():
    code = ("import sys, octconv_exp; light = 'torch' not in sys.modules; "
            "f = octconv_exp.load_model; print(light, f.__module__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "octconv_exp.deploy.inference"]


def test_torchvision_is_imported_only_by_what_reads_cifar_or_streams_a_folder():
    """Importing torchvision imports torch._dynamo on torch 2.1+ (seconds of every fresh
    process: a torchrun rank, a joblib worker, load_model): the run, its data loading, the
    validator and load_model leave it out; the streamed folder's dataset brings it.
    matplotlib (0.3 s) likewise: a run and the sweep report's callback, which every run and
    launcher worker loads, import it only to draw a figure."""
    code = ("import sys\n"
            "import octconv_exp.training.runner, octconv_exp.data.loading, octconv_exp.cli.validate\n"
            "import octconv_exp.deploy.inference, octconv_exp.backends.native\n"
            "import octconv_exp.cli.outcome, octconv_exp.reports.report\n"
            "print('torchvision' in sys.modules, 'matplotlib' in sys.modules)\n"
            "import octconv_exp.data.imagefolder\n"
            "print('torchvision' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "True"]


def test_load_data_uses_given_statistics_and_refuses_other_classes():
    node = OmegaConf.create({"name": "synthetic", "train_size": 50, "test_size": 20, "seed": 0,
                             "val_size": 0, "mean": None, "std": None})
    computed = load_data(node)
    given = load_data(node, stats=((0.1, 0.2, 0.3), (0.5, 0.6, 0.7)),
                      classes=list(SYNTHETIC_CLASSES))
    assert computed.mean != given.mean
    assert (given.mean, given.std) == ((0.1, 0.2, 0.3), (0.5, 0.6, 0.7))
    renamed = ["cat"] + list(SYNTHETIC_CLASSES[1:])
    with pytest.raises(UserError, match="new: disk-checker; missing: cat"):
        load_data(node, classes=renamed)
    with pytest.raises(UserError, match="same classes in another order"):
        load_data(node, classes=list(reversed(SYNTHETIC_CLASSES)))


def _saved(**nodes):
    config = {"model": {"_target_": "octconv_exp.models.octave.ClassificationModel", "name": "seed_cnn"},
              "optimizer": {"name": "sgd", "_target_": "torch.optim.SGD", "lr": 0.05},
              "scheduler": {"name": "none"}, "dataset": {"name": "synthetic"}}
    config.update(nodes)
    return config


def check(config, explicit=(), command=None):
    check_saved_targets(OmegaConf.create(config), OmegaConf.create(command or _saved()),
                        {"config": config}, list(explicit), "x.pt", "resume=true")


@pytest.mark.parametrize("nodes", [
    {},
    {"model": {"_target_": "octconv_exp.models.resnet.ResNetCifar", "name": "resnet_cifar", "depth": 8}},
    {"optimizer": {"name": "adam", "_target_": "torch.optim.Adam", "lr": 0.001}},
    {"scheduler": {"name": "multistep", "_target_": "octconv_exp.training.schedules.WarmupMultiStepLR",
                   "milestones": [1]}},
    {"scheduler": {"name": "step", "_target_": "torch.optim.lr_scheduler.StepLR",
                   "step_size": 1}},
])
def test_the_packages_own_targets_are_taken_from_a_checkpoint(nodes):
    check(_saved(**nodes))


@pytest.mark.parametrize("key, nodes", [
    ("model._target_=os.system", {"model": {"_target_": "os.system", "command": "true"}}),
    # in the package, but not a model
    ("model._target_=octconv_exp.records.outputs.write_json_atomic",
     {"model": {"_target_": "octconv_exp.records.outputs.write_json_atomic", "path": "/tmp/x"}}),
    # a torch.optim prefix that Hydra's attribute walk turns into torch.load
    ("optimizer._target_=torch.optim.sgd.torch.load",
     {"optimizer": {"name": "sgd", "_target_": "torch.optim.sgd.torch.load", "f": "x"}}),
    ("scheduler._target_=pathlib.Path.touch",
     {"scheduler": {"name": "step", "_target_": "pathlib.Path.touch", "self": "x"}}),
    ("scheduler.step_size._target_=os.system",
     {"scheduler": {"name": "step", "_target_": "torch.optim.lr_scheduler.StepLR",
                    "step_size": {"_target_": "os.system", "command": "true"}}}),
    ("dataset._target_=my_research.Stripes", {"dataset": {"_target_": "my_research.Stripes"}}),
])
def test_other_targets_from_a_checkpoint_are_refused_naming_how_to_allow_them(key, nodes):
    with pytest.raises(UserError) as info:
        check(_saved(**nodes))
    message = str(info.value)
    assert f"names {key} in its config" in message and f"({key})" in message
    assert "\n" not in message


def test_a_target_this_command_names_is_allowed():
    saved = _saved(model={"_target_": "my_research.TinyNet", "name": "tiny"})
    check(saved, explicit=["model._target_"], command=saved)
    check(saved, explicit=["model"], command=saved)
    with pytest.raises(UserError):  # set by the command, to something else
        check(saved, explicit=["model._target_"],
              command=_saved(model={"_target_": "my_research.DropNet"}))
    with pytest.raises(UserError):  # the command sets another key of the node only
        check(saved, explicit=["model.hidden"], command=saved)


def test_the_resume_command_a_run_prints_names_the_users_own_classes():
    from octconv_exp.training.resume import resume_hint

    own = _saved(model={"_target_": "my_research.TinyNet", "name": "tiny"},
                 dataset={"_target_": "my_research.Stripes", "name": "custom"})
    assert resume_hint("/r", OmegaConf.create(own)).endswith(
        """resume=true 'hydra.run.dir="/r"' model._target_=my_research.TinyNet """
        "dataset._target_=my_research.Stripes")
    assert resume_hint("/r", OmegaConf.create(_saved())).endswith(
        """resume=true 'hydra.run.dir="/r"'""")


# ------------------------------------------------------------------------------ end to end

LOAD_AND_PREDICT = r"""
import json, sys
import torch
import octconv_exp
from octconv_exp.data.datasets import make_synthetic

run_dir, n = sys.argv[1], int(sys.argv[2])
model = octconv_exp.load_model(run_dir)
test = make_synthetic(n, seed=0, split="test")
p = model.predict(test.images)
floats = model.scores(test.images.float() / 255)
print(json.dumps({
    "accuracy": 100.0 * (p.indices == test.labels).sum().item() / n,
    "names_match": p.names == [model.class_names[i] for i in p.indices.tolist()],
    "one_image": model.predict(test.images[5]).indices.tolist(),
    "fifth": p.indices[5].item(),
    "float_diff": (floats - model.scores(test.images)).abs().max().item(),
    "training": model.module.training, "classes": model.class_names,
    "mean": model.mean, "std": model.std, "input_shape": list(model.input_shape),
    "path": model.path, "name": model.model_name,
    "hydra_initialised": "hydra.core.global_hydra" in sys.modules
                         and sys.modules["hydra.core.global_hydra"].GlobalHydra.instance()
                         .is_initialized()}))
"""


@pytest.mark.slow
@pytest.mark.sdk
def test_load_model_in_a_fresh_process_predicts_as_the_run_evaluated(tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli(*SYNTHETIC_200_ONE_EPOCH, "conv=octave", "alpha=0.25", f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    out = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, str(run_dir), "60"],
                         cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["accuracy"] == read_metrics(run_dir)["test_accuracy"]
    assert got["names_match"] and got["one_image"] == [got["fifth"]]
    assert got["float_diff"] < 1e-4  # floats in [0, 1] are the same images as their uint8
    assert got["training"] is False and got["hydra_initialised"] is False
    assert (got["classes"], got["input_shape"], got["name"]) == (
        list(SYNTHETIC_CLASSES), [3, 32, 32], "seed_cnn")
    assert got["path"] == str(run_dir / "model.pt")
    # The statistics are the training images' (what the run normalised with).
    mean, std = make_synthetic(200, seed=0, split="train").channel_stats()
    assert got["mean"] == pytest.approx(mean, abs=1e-12)
    assert got["std"] == pytest.approx(std, abs=1e-12)
    # Every file records the same, as plain values, loadable without arbitrary pickles.
    for name in ("model.pt", "checkpoints/last.pt", "checkpoints/best.pt"):
        record = torch.load(run_dir / name, weights_only=True)["inference"]
        assert (record["mean"], record["std"]) == (got["mean"], got["std"]), name
        assert record["model"] == {"_target_": "octconv_exp.models.octave.ClassificationModel",
                                   "name": "seed_cnn"}
        assert (record["conv_mode"], record["alpha"], record["num_classes"]) == (
            "octave", 0.25, 10)


@pytest.mark.slow
def test_evaluation_uses_the_recorded_normalisation_after_the_training_folder_changed(tmp_path):
    """Issue 24's report: 40 images added to one class of the training folder after training
    changed the statistics a re-evaluation computed (and its accuracy), without a word."""
    from PIL import Image

    root = write_image_folder(str(tmp_path / "imgs"), per_class=(12, 10))
    run_dir = tmp_path / "run"
    res = run_cli("dataset=image_folder", f"dataset.root={root}", "trainer.epochs=8",
                  "trainer.batch_size=6", "trainer.progress_bar=false",
                  f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    trained = read_metrics(run_dir)["test_accuracy"]
    for i in range(40):
        Image.new("RGB", (40, 40), (255, 255, 255)).save(
            os.path.join(root, "train", "dogs", f"added{i:02d}.png"))
    res = run_cli("train=false", f"ckpt_path={run_dir}", f"dataset.root={root}",
                  f"hydra.run.dir={tmp_path / 'after'}")
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_metrics(tmp_path / "after")
    assert (m["status"], m["test_samples"], m["test_accuracy"]) == ("evaluated", 30, trained)
    # A model file from before the record: statistics recomputed from today's folder, said
    # in a warning, and here they do change the accuracy (what the record prevents).
    legacy = torch.load(run_dir / "model.pt", weights_only=True)
    del legacy["inference"]
    torch.save(legacy, tmp_path / "legacy.pt")
    res = run_cli("train=false", f"ckpt_path={tmp_path / 'legacy.pt'}", "dataset=image_folder",
                  f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'legacy'}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "records no normalisation statistics" in res.stdout + res.stderr
    assert read_metrics(tmp_path / "legacy")["test_accuracy"] != trained
    # A test folder with a class the model was not trained on is refused in one line.
    shutil.copytree(os.path.join(root, "test", "owls"), os.path.join(root, "test", "bats"))
    res = run_cli("train=false", f"ckpt_path={run_dir}", f"dataset.root={root}",
                  f"hydra.run.dir={tmp_path / 'bats'}")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
    assert "has classes not in the training set: bats" in res.stderr


def _evil(source, target, marker, **nodes):
    """``source`` re-saved with config nodes that name code (plain dicts and strings: it
    still loads with weights_only=True)."""
    state = torch.load(source, weights_only=True)
    for name, node in nodes.items():
        state["config"][name] = node
    torch.save(state, target)
    return target


@pytest.mark.slow
@pytest.mark.sdk
def test_a_checkpoint_config_that_names_code_runs_nothing(tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli(*SYNTHETIC_200_ONE_EPOCH, f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    marker = tmp_path / "pwned"
    command = {"_target_": "os.system", "command": f"touch {marker}"}
    cases = [
        ("train=false", "model.pt", "model._target_=os.system", {"model": command}),
        ("resume=true", "checkpoints/last.pt", "model._target_=os.system", {"model": command}),
        ("resume=true", "checkpoints/last.pt", "optimizer._target_=os.system",
         {"optimizer": dict(command, name="sgd")}),
        ("resume=true", "checkpoints/last.pt", "scheduler.gamma._target_=os.system",
         {"scheduler": {"name": "step", "_target_": "torch.optim.lr_scheduler.StepLR",
                        "step_size": 1, "gamma": command}}),
        ("train=false", "model.pt", "dataset._target_=os.system",
         {"dataset": dict(command, name="custom", seed=0, val_size=0, augment=False,
                          mean=None, std=None)}),
    ]
    for i, (mode, source, key, nodes) in enumerate(cases):
        evil = _evil(run_dir / source, tmp_path / f"evil{i}.pt", marker, **nodes)
        res = run_cli(mode, f"ckpt_path={evil}", f"hydra.run.dir={tmp_path / f'r{i}'}")
        assert res.returncode == 2 and res.stderr.count("\n") == 1, (key, res.stderr[-2000:])
        assert f"{mode}: {evil} names {key} in its config" in res.stderr, res.stderr
        assert f"name it on this command line ({key})" in res.stderr
        assert not marker.exists(), key


@pytest.mark.slow
def test_your_own_model_is_rebuilt_only_when_you_name_it(tmp_path, monkeypatch):
    import octconv_exp

    env = {"PYTHONPATH": USER_CODE}
    run_dir = tmp_path / "run"
    tiny = ["model._target_=my_research.TinyNet", "model.name=tiny", *SYNTHETIC_200_ONE_EPOCH]
    res = run_cli(*tiny, f"hydra.run.dir={run_dir}", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("train=false", f"ckpt_path={run_dir}", f"hydra.run.dir={tmp_path / 'e1'}",
                  env=env)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
    assert "model._target_=my_research.TinyNet" in res.stderr
    res = run_cli("train=false", f"ckpt_path={run_dir}", "model._target_=my_research.TinyNet",
                  f"hydra.run.dir={tmp_path / 'e2'}", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert read_metrics(tmp_path / "e2")["test_accuracy"] == read_metrics(run_dir)["test_accuracy"]
    monkeypatch.syspath_prepend(USER_CODE)
    with pytest.raises(UserError, match=r"trust_target='my_research.TinyNet'"):
        octconv_exp.load_model(run_dir)
    model = octconv_exp.load_model(run_dir, trust_target="my_research.TinyNet")
    test = make_synthetic(60, seed=0, split="test")
    accuracy = 100.0 * (model.predict(test.images).indices == test.labels).sum().item() / 60
    assert accuracy == read_metrics(run_dir)["test_accuracy"]


def test_load_model_refuses_a_file_from_before_the_record(tmp_path):
    from octconv_exp import load_model

    torch.save({"state_dict": {}, "conv": "vanilla", "config": {}}, tmp_path / "old.pt")
    with pytest.raises(UserError, match="records no preprocessing"):
        load_model(tmp_path / "old.pt")
