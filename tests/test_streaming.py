"""octconv_exp.data.streaming: image folders decoded by DataLoader workers, batch for batch what the
in-memory path (load_image_folder, split_validation, channel_stats, BatchLoader) gives."""
import os

import numpy as np
import pytest
import torch

from octconv_exp.data.datasets import BatchLoader, ImageSet, derived_seed, split_validation
from octconv_exp.data.loading import load_image_folder
from octconv_exp.errors import ConfigError, UserError
from octconv_exp.data.imagefolder import ImageFileFolder, decode_augmented
from octconv_exp.data.streaming import (FileSet, StreamingLoader, choose_in_memory,
                                   crop_params, decoded_bytes, file_stats,
                                   scan_image_folder, split_files, stats_sample)

MEAN, STD = (0.45, 0.5, 0.55), (0.2, 0.25, 0.3)
#: (class, relative path, (width, height), mode): 41 training images (a last global batch of
#: 1 with batch 5 x 2 ranks), of several sizes, a nested folder, greyscale and JPEG files.
TRAIN_SIZES = [(40, 40), (24, 30), (64, 48), (32, 32), (50, 20)]


def _write(path, size, rng, mode="RGB"):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    w, h = size
    arr = rng.randint(0, 256, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if mode == "L":
        img = img.convert("L")
    img.save(path)


def write_folder(root):
    rng = np.random.RandomState(0)
    layout = {"train": {"ant": 14, "bee": 14, "cat": 13}, "test": {"ant": 5, "bee": 5, "cat": 5}}
    k = 0
    for split, classes in layout.items():
        for name, n in classes.items():
            for j in range(n):
                sub = "nested/deeper" if (name == "bee" and j >= 10) else ""
                ext = ".jpg" if j == 3 else ".png"
                path = os.path.join(root, split, name, sub, f"{j:03d}{ext}")
                _write(path, TRAIN_SIZES[k % len(TRAIN_SIZES)], rng, "L" if j == 5 else "RGB")
                k += 1
    # Skipped as load_image_folder skips them: hidden files and folders, other extensions.
    _write(os.path.join(root, "train", "ant", ".hidden.png"), (8, 8), rng)
    _write(os.path.join(root, "train", "bee", ".cache", "x.png"), (8, 8), rng)
    with open(os.path.join(root, "train", "cat", "notes.txt"), "w") as f:
        f.write("not an image")
    os.makedirs(os.path.join(root, "train", ".git"))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(str(tmp_path_factory.mktemp("streaming")))


@pytest.fixture(scope="module")
def train(folder):
    """(FileSet, ImageSet) of the training folder."""
    path = os.path.join(folder, "train")
    return scan_image_folder(path), load_image_folder(path)


def batches_of(loader, passes=1):
    return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(passes)]


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for pass_got, pass_want in zip(got, want):
        assert len(pass_got) == len(pass_want)
        for (x, y), (xw, yw) in zip(pass_got, pass_want):
            assert x.dtype == xw.dtype and x.shape == xw.shape
            assert torch.equal(x, xw) and torch.equal(y, yw)
            assert x.stride() == xw.stride()


# ------------------------------------------------------------------------------- scanning


def test_scan_has_load_image_folders_order_and_decodes_byte_identically(folder, train):
    from torchvision.datasets import DatasetFolder, ImageFolder

    files, data = train
    assert len(files) == len(data) == 41
    assert files.classes == data.classes == ["ant", "bee", "cat"]
    assert torch.equal(files.labels, data.labels) and files.labels.dtype == torch.int64
    assert any(os.sep + os.path.join("nested", "deeper") + os.sep in p for p, _ in files.samples)
    assert not any(os.path.basename(p).startswith(".") or ".cache" in p or p.endswith(".txt")
                   for p, _ in files.samples)
    ds = files.dataset()
    assert isinstance(ds, ImageFolder) and isinstance(ds, DatasetFolder)
    assert ds.samples == files.samples and ds.classes == files.classes
    decoded = torch.stack([ds[i][0] for i in range(len(ds))])
    assert decoded.dtype == torch.uint8 and decoded.shape == (41, 3, 32, 32)
    assert torch.equal(decoded, data.images)
    assert [ds[i][1] for i in range(len(ds))] == data.labels.tolist()
    # The test split, with the training classes, and another image size.
    test_path = os.path.join(folder, "test")
    tf = scan_image_folder(test_path, classes=files.classes, image_size=20)
    td = load_image_folder(test_path, classes=files.classes, image_size=20)
    assert torch.equal(tf.labels, td.labels) and tf.image_size == 20
    assert torch.equal(torch.stack([tf.dataset()[i][0] for i in range(len(tf))]), td.images)


def _error(fn, *args, **kwargs):
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("case", ["missing", "no classes", "no images", "empty class",
                                  "empty classes", "unknown classes"])
def test_scan_refuses_what_load_image_folder_refuses_in_its_words(tmp_path, case):
    rng = np.random.RandomState(1)
    root = str(tmp_path / "f")
    classes = None
    if case != "missing":
        os.makedirs(root)
    if case in ("no images", "empty class", "empty classes"):
        for name in ("a", "b", "c"):
            os.makedirs(os.path.join(root, name))
        with open(os.path.join(root, "a", "readme.txt"), "w") as f:
            f.write("x")
        if case != "no images":
            _write(os.path.join(root, "a", "0.png"), (8, 8), rng)
        if case == "empty class":
            _write(os.path.join(root, "b", "0.png"), (8, 8), rng)
    if case == "unknown classes":
        _write(os.path.join(root, "zebra", "0.png"), (8, 8), rng)
        classes = ["ant"]
    want = _error(load_image_folder, root, classes=classes)
    assert _error(scan_image_folder, root, classes=classes) == want


def test_empty_test_class_is_the_same_warning(tmp_path, capsys):
    rng = np.random.RandomState(2)
    root = str(tmp_path)
    _write(os.path.join(root, "a", "0.png"), (8, 8), rng)
    os.makedirs(os.path.join(root, "b"))
    files = scan_image_folder(root, classes=["a", "b"])
    got = capsys.readouterr().err
    data = load_image_folder(root, classes=["a", "b"])
    want = capsys.readouterr().err
    assert got == want and "warning: test class folder without images" in got
    assert torch.equal(files.labels, data.labels) and files.classes == ["a", "b"]


# ------------------------------------------------------------------------------- split, stats


@pytest.mark.parametrize("val_size", [0, 7, 0.25])
def test_split_files_holds_out_what_split_validation_does(train, val_size):
    files, data = train
    rest, val = split_files(files, val_size, seed=5)
    rest_d, val_d = split_validation(data, val_size, 5)
    assert torch.equal(rest.labels, rest_d.labels)
    assert torch.equal(torch.stack([rest.dataset()[i][0] for i in range(len(rest))]), rest_d.images)
    if val_size == 0:
        assert val is None and val_d is None and rest is files
        return
    assert len(val) == len(val_d) == (7 if val_size == 7 else 10)
    assert torch.equal(val.labels, val_d.labels)
    assert torch.equal(torch.stack([val.dataset()[i][0] for i in range(len(val))]), val_d.images)
    assert sorted(rest.samples + val.samples) == sorted(files.samples)
    assert _error(split_files, files, 41, 0) == _error(split_validation, data, 41, 0)


def test_file_stats_equal_channel_stats_all_and_sampled(train):
    files, data = train
    mean, std = file_stats(files, sample=10000, workers=2)
    want_mean, want_std = data.channel_stats()
    assert np.allclose(mean, want_mean, rtol=0, atol=1e-9)
    assert np.allclose(std, want_std, rtol=0, atol=1e-9)
    index = stats_sample(len(files), 12, seed=3)
    assert len(index) == 12 and index == sorted(set(index)) and index != list(range(12))
    assert index == stats_sample(len(files), 12, seed=3) != stats_sample(len(files), 12, seed=4)
    part = ImageSet(images=data.images[index], labels=data.labels[index], classes=data.classes)
    mean, std = file_stats(files, sample=12, seed=3, workers=0)
    assert np.allclose(mean, part.channel_stats()[0], rtol=0, atol=1e-9)
    assert np.allclose(std, part.channel_stats()[1], rtol=0, atol=1e-9)
    assert not np.allclose(mean, want_mean, rtol=0, atol=1e-6)


def test_decoded_bytes_and_choose_in_memory():
    assert decoded_bytes(50000, 32) == 50000 * 3 * 32 * 32
    n = 66000  # 66000 * 3 * 32 * 32 bytes = 0.19 GiB
    assert choose_in_memory("auto", n, 32, 4) == (
        True, "decoded size 0.19 GiB <= dataset.max_memory_gb=4: in memory")
    assert choose_in_memory("auto", 1281167, 224, 4) == (
        False, "decoded size 179.61 GiB > dataset.max_memory_gb=4: streamed from disk")
    assert choose_in_memory("auto", n, 32, 0.1)[0] is False
    assert choose_in_memory("auto", 100, 32, 4) == (
        True, "decoded size 0.29 MiB <= dataset.max_memory_gb=4: in memory")
    for setting in (True, "true", "True"):
        in_memory, reason = choose_in_memory(setting, 1281167, 224, 4)
        assert in_memory is True and "179.61 GiB" in reason and "in_memory=true" in reason
    for setting in (False, "false"):
        in_memory, reason = choose_in_memory(setting, 10, 32, 4)
        assert in_memory is False and "in_memory=false" in reason
    with pytest.raises(ConfigError, match="dataset.in_memory=maybe"):
        choose_in_memory("maybe", 10, 32, 4)
    with pytest.raises(ConfigError, match="dataset.max_memory_gb=0"):
        choose_in_memory("auto", 10, 32, 0)


# ------------------------------------------------------------------------------- the loader


def _pair(files, data, **kwargs):
    workers = kwargs.pop("workers", 0)
    return (StreamingLoader(files, mean=MEAN, std=STD, workers=workers, **kwargs),
            BatchLoader(data, mean=MEAN, std=STD, **kwargs))


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [True, False])
def test_loader_batches_equal_batch_loaders(train, drop_last, shuffle):
    files, data = train
    stream, ref = _pair(files, data, batch_size=6, shuffle=shuffle, drop_last=drop_last, seed=11,
                        memory_format=torch.channels_last)
    assert len(stream) == len(ref) == (6 if drop_last else 7)
    assert stream.num_samples == ref.num_samples == 41
    assert (stream.batch_size, stream.rank, stream.world_size, stream.device) == \
        (ref.batch_size, ref.rank, ref.world_size, ref.device)
    got, want = batches_of(stream, 3), batches_of(ref, 3)
    assert_same_batches(got, want)
    assert got[0][0][0].is_contiguous(memory_format=torch.channels_last)
    if shuffle:
        assert not torch.equal(got[0][0][1], got[1][0][1])  # a new order each pass
    assert stream.epoch == ref.epoch == 4
    assert torch.equal(stream.state_dict()["generator"], ref.state_dict()["generator"])


@pytest.mark.parametrize("drop_last", [False, True])
def test_loader_shards_equal_batch_loaders_over_two_ranks(train, drop_last):
    files, data = train
    for rank in (0, 1):
        stream, ref = _pair(files, data, batch_size=5, shuffle=True, drop_last=drop_last,
                            seed=2, rank=rank, world_size=2)
        assert len(stream) == len(ref) == (4 if drop_last else 5)
        got, want = batches_of(stream, 2), batches_of(ref, 2)
        assert_same_batches(got, want)
        if not drop_last:  # 41 = 4 x 10 + 1: rank 1's part of the last global batch is empty
            assert got[0][-1][0].shape[0] == (1 if rank == 0 else 0)


def test_resume_pass_mid_epoch_equals_batch_loader_and_the_uninterrupted_pass(train):
    files, data = train
    kwargs = dict(batch_size=4, shuffle=True, drop_last=False, seed=7)
    stream, ref = _pair(files, data, **kwargs)
    batches_of(stream), batches_of(ref)  # epoch 1
    it = iter(stream)
    first = [next(it), next(it)]  # epoch 2, interrupted after two batches
    state = stream.state_dict(inside_pass=True)
    next(iter(ref))
    ref_state = ref.state_dict(inside_pass=True)
    assert state["epoch"] == ref_state["epoch"] == 2
    assert torch.equal(state["generator"], ref_state["generator"])
    uninterrupted = batches_of(_pair(files, data, **kwargs)[0], 2)[1]
    assert_same_batches([first], [uninterrupted[:2]])
    fresh, fresh_ref = _pair(files, data, **kwargs)
    fresh.resume_pass(state["generator"], skip=2, epoch=state["epoch"])
    fresh_ref.resume_pass(ref_state["generator"], skip=2, epoch=ref_state["epoch"])
    assert len(fresh) == len(fresh_ref) == 9
    rest = batches_of(fresh)
    assert_same_batches(rest, batches_of(fresh_ref))
    assert_same_batches(rest, [uninterrupted[2:]])
    assert len(fresh) == 11 and fresh.epoch == 3  # the next pass is whole again


def test_two_workers_same_batches_one_pool_global_rng_untouched(train):
    files, data = train
    stream, ref = _pair(files, data, batch_size=8, shuffle=True, drop_last=False, seed=3,
                        workers=2)
    rng = torch.get_rng_state()
    got = batches_of(stream, 3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same_batches(got, batches_of(ref, 3))
    # A pass left after two batches (its prefetched batches are dropped), then a whole one.
    for loader in (stream, ref):
        it = iter(loader)
        next(it), next(it)
    assert_same_batches(batches_of(stream), batches_of(ref))
    assert stream.pools_started == 1
    assert stream._dataloader.persistent_workers and stream._dataloader.num_workers == 2
    stream.close()


def test_unreadable_file_is_one_line_user_error_naming_it(tmp_path):
    from octconv_exp.data.datasets import _read_image

    rng = np.random.RandomState(3)
    root = str(tmp_path)
    for j in range(4):
        _write(os.path.join(root, "a", f"{j}.png"), (10, 10), rng)
    bad = os.path.join(root, "a", "2.png")
    with open(bad, "wb") as f:
        f.write(b"not a png at all")
    want = _error(_read_image, bad, 32)
    assert bad in want and "\n" not in want
    files = scan_image_folder(root)  # nothing decoded yet
    for workers in (0, 2):
        for augment in (False, True):
            loader = StreamingLoader(files, 2, MEAN, STD, workers=workers, augment=augment)
            assert _error(lambda: [b for b in loader]) == want
            loader.close()
        assert _error(file_stats, files, workers=workers) == want


# ------------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("size", [(32, 32), (30, 200), (200, 30), (1, 500), (500, 1), (7, 9)])
def test_crop_params_are_torchvisions_with_an_explicit_generator(size):
    from torchvision.transforms import RandomResizedCrop

    h, w = size
    img = torch.zeros(3, h, w)
    for seed in range(20):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            want = RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
        assert crop_params(h, w, torch.Generator().manual_seed(seed)) == tuple(want)


def test_augmented_batches_same_for_any_workers_ranks_and_resume(train):
    files, _ = train
    kwargs = dict(batch_size=6, mean=MEAN, std=STD, shuffle=True, drop_last=False, seed=4,
                  augment=True, augment_seed=9)
    zero = batches_of(StreamingLoader(files, workers=0, **kwargs), 2)
    two = StreamingLoader(files, workers=2, **kwargs)
    assert_same_batches(batches_of(two, 2), zero)
    two.close()
    plain = batches_of(StreamingLoader(files, workers=0, **dict(kwargs, augment=False)), 1)[0]
    assert zero[0][0][0].shape == (6, 3, 32, 32)
    assert torch.equal(zero[0][0][1], plain[0][1])  # the same order, the labels unchanged
    assert not torch.equal(zero[0][0][0], plain[0][0])  # the images augmented
    # Each image is decode_augmented's with the seed of (augment_seed, epoch, position).
    order = torch.randperm(41, generator=torch.Generator().manual_seed(4))
    pos = 6 + 2  # second batch, third image, first pass
    path = files.samples[int(order[pos])][0]
    image = decode_augmented(path, 32, derived_seed("augment", 9, 1, pos))
    norm = StreamingLoader(files, workers=0, **kwargs).normalise
    assert torch.equal(zero[0][1][0][2:3], norm(image.unsqueeze(0)))
    # Epoch 2 augments differently from epoch 1 (same image, other seed).
    assert not torch.equal(decode_augmented(path, 32, derived_seed("augment", 9, 2, pos)), image)
    # Two ranks at batch 3 see, together, what one process at batch 6 sees.
    ranks = [batches_of(StreamingLoader(files, workers=0, rank=r, world_size=2,
                                        **dict(kwargs, batch_size=3)), 2) for r in (0, 1)]
    for p in range(2):
        for b, (x, y) in enumerate(zero[p]):
            assert torch.equal(torch.cat([ranks[0][p][b][0], ranks[1][p][b][0]]), x)
            assert torch.equal(torch.cat([ranks[0][p][b][1], ranks[1][p][b][1]]), y)
    # A pass resumed after 3 batches augments its remaining batches as the whole pass did.
    first = StreamingLoader(files, workers=0, **kwargs)
    batches_of(first)
    resumed = StreamingLoader(files, workers=0, **kwargs)
    resumed.resume_pass(first.state_dict()["generator"], skip=3, epoch=2)
    assert_same_batches(batches_of(resumed), [zero[1][3:]])


def test_filesets_and_loaders_are_picklable_for_spawned_workers(train):
    import pickle

    files, _ = train
    ds = pickle.loads(pickle.dumps(files.dataset(augment=True, augment_seed=1)))
    assert isinstance(ds, ImageFileFolder) and ds.samples == files.samples and ds.augment
    assert isinstance(pickle.loads(pickle.dumps(files)), FileSet)


def test_part_is_image_sets_part(train):
    files, data = train
    assert files.part(0, 1) is files
    for rank in range(3):
        got, want = files.part(rank, 3), data.part(rank, 3)
        assert torch.equal(got.labels, want.labels)
        assert torch.equal(torch.stack([got.dataset()[i][0] for i in range(len(got))]), want.images)


# --------------------------------------------------------------------------------------------
# dataset.in_memory through the run
def test_auto_streams_a_folder_over_max_memory_gb_and_says_so(tmp_path, caplog):
    import logging

    from conftest import compose_config, write_image_folder
    from octconv_exp.data.loading import load_data

    root = write_image_folder(str(tmp_path / "folder"), per_class=(8, 3), size=32)
    caplog.set_level(logging.INFO, logger="octconv_exp")
    small = compose_config("dataset=image_folder", f"dataset.root={root}",
                           "dataset.max_memory_gb=0.00005", "dataset.workers=0")
    streamed = load_data(small.dataset)
    assert streamed.streamed and isinstance(streamed.train, FileSet)
    assert streamed.image_shape == (3, 32, 32)
    assert "decoded size 0.10 MiB > dataset.max_memory_gb=5e-05: streamed from disk" in caplog.text
    held = load_data(compose_config("dataset=image_folder", f"dataset.root={root}").dataset)
    assert not held.streamed and isinstance(held.train, ImageSet)
    # Same statistics either way (all 24 training images are read).
    assert np.allclose(streamed.mean, held.mean, atol=1e-9)
    assert np.allclose(streamed.std, held.std, atol=1e-9)


@pytest.mark.slow
def test_bad_streaming_settings_are_one_line(tmp_path):
    from conftest import only_error_line, run_cli, write_image_folder

    from conftest import compose_config
    from octconv_exp.config.schema import validate

    root = write_image_folder(str(tmp_path / "folder"), per_class=(4, 2), size=32)
    # The command line: one line, exit status 2 (the validation's ConfigError, as below).
    result = run_cli("dataset=image_folder", f"dataset.root={root}", "dataset.in_memory=maybe")
    assert result.returncode == 2, result.stderr
    assert only_error_line(result.stderr).startswith("error: dataset.in_memory=maybe: "
                                                     "expected true, false or auto")
    for override, key in (("dataset.max_memory_gb=-1", "dataset.max_memory_gb"),
                          ("dataset.workers=-2", "dataset.workers")):
        with pytest.raises(ConfigError) as caught:
            validate(compose_config("dataset=image_folder", f"dataset.root={root}", override))
        assert str(caught.value).startswith(key), caught.value


def test_a_streamed_folder_is_refused_on_ipus(tmp_path, poptorch):
    from conftest import compose_config, write_image_folder
    from octconv_exp.training.runner import run_experiment

    root = write_image_folder(str(tmp_path / "folder"), per_class=(4, 2), size=32)
    cfg = compose_config("dataset=image_folder", f"dataset.root={root}", "device=ipu",
                         "ipu.use_ipu_model=true", "dataset.in_memory=false", "dataset.workers=0")
    with pytest.raises(UserError, match="device=ipu reads an image folder in memory"):
        run_experiment(cfg, str(tmp_path / "run"))


@pytest.mark.slow
def test_a_folder_streamed_and_in_memory_trains_alike_and_resumes_exactly(tmp_path):
    """1,000 PNGs, augmentation off, the same seed: streamed with 2 workers and held in
    memory, the runs see the same batches in the same order (the same weights, to the bit);
    a streamed run stopped inside an epoch resumes to the same end."""
    from conftest import read_metrics, read_state_dict, run_cli, write_image_folder

    root = write_image_folder(str(tmp_path / "folder"), classes=tuple(f"c{i}" for i in range(10)),
                              per_class=(100, 20), size=32)
    common = ["dataset=image_folder", f"dataset.root={root}", "trainer.epochs=2",
              "trainer.batch_size=32", "trainer.progress_bar=false", "dataset.val_size=100"]
    dirs = {}
    for name, extra, env in (("memory", ["dataset.in_memory=true"], {}),
                             ("streamed", ["dataset.in_memory=false"], {}),
                             ("stopped", ["dataset.in_memory=false"],
                              {"OCTCONV_EXP_SIGNAL_AT": "step:40"})):
        dirs[name] = str(tmp_path / name)
        result = run_cli(*common, *extra, f"hydra.run.dir={dirs[name]}", env=env)
        assert result.returncode == (130 if env else 0), result.stderr[-2000:]
    result = run_cli("resume=true", f"hydra.run.dir={dirs['stopped']}")  # root from the record
    assert result.returncode == 0, result.stderr[-2000:]
    with open(os.path.join(dirs["streamed"], "run.log")) as f:
        assert "dataset.in_memory=false: streamed from disk" in f.read()

    def outcome(d):
        m = read_metrics(d)
        return read_state_dict(d), {k: m[k] for k in ("train_loss", "train_accuracy",
                                                      "val_accuracy", "test_accuracy",
                                                      "test_samples")}

    reference, numbers = outcome(dirs["memory"])
    assert numbers["test_samples"] == 200
    for name in ("streamed", "stopped"):
        state, other = outcome(dirs[name])
        assert other == numbers
        assert all(torch.equal(state[k], reference[k]) for k in reference)
