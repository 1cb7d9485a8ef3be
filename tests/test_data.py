"""Data sets: synthetic, the torchvision CIFAR-10 path on a generated fixture, image folders."""
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from omegaconf import OmegaConf

from conftest import write_cifar_fixture
from octconv_exp.data.datasets import CIFAR10_MEAN, CIFAR10_STD, BatchLoader, ImageSet, load_cifar10, make_synthetic
from octconv_exp.data.loading import load_data, load_image_folder
from octconv_exp.errors import UserError


def test_synthetic_is_deterministic_balanced_and_cifar_shaped():
    a = make_synthetic(1000, seed=4)
    b = make_synthetic(1000, seed=4)
    assert a.images.shape == (1000, 3, 32, 32) and a.images.dtype == torch.uint8
    assert a.labels.dtype == torch.int64
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.bincount(a.labels).tolist() == [100] * 10
    assert len(a.classes) == 10
    assert not torch.equal(make_synthetic(1000, seed=5).images, a.images)
    test = make_synthetic(1000, seed=4, split="test")
    assert not torch.equal(test.images, a.images)  # train and test are different draws
    assert a.images.float().std() > 20  # not a blank image set


def test_synthetic_texture_is_invisible_after_2x2_pooling():
    """The two textures of a shape differ at full resolution but not after the 2x2 average
    pooling that makes the low-frequency octave: both frequency bands matter."""
    data = make_synthetic(4000, seed=0)
    x = data.images.float()

    def column_energy(imgs):  # mean squared difference between horizontal neighbours
        return (imgs[..., 1:] - imgs[..., :-1]).pow(2).mean().item()

    for shape in range(5):
        # Checkerboard pixels alternate along rows and columns, stripes only between rows.
        checker, stripes = x[data.labels == 2 * shape], x[data.labels == 2 * shape + 1]
        full_c, full_s = column_energy(checker), column_energy(stripes)
        assert full_c > 1.05 * full_s
        pooled_c = column_energy(F.avg_pool2d(checker, 2))
        pooled_s = column_energy(F.avg_pool2d(stripes, 2))
        assert abs(pooled_c - pooled_s) < 0.03 * pooled_s


def test_batch_loader_normalises_like_torchvision_and_covers_everything():
    data = make_synthetic(103, seed=1)
    loader = BatchLoader(data, 10, CIFAR10_MEAN, CIFAR10_STD, shuffle=False, drop_last=False)
    assert len(loader) == 11
    batches = list(loader)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (103, 3, 32, 32) and torch.equal(y, data.labels)
    transform = torchvision.transforms.Compose([
        torchvision.transforms.ToTensor(), torchvision.transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    expected = torch.stack([transform(img.permute(1, 2, 0).numpy()) for img in data.images])
    assert torch.allclose(x, expected, atol=1e-5)


def test_batch_loader_shuffles_per_epoch_and_drops_the_tail_only_when_asked():
    data = ImageSet(torch.zeros(25, 3, 32, 32, dtype=torch.uint8), torch.arange(25), ["a"])
    loader = BatchLoader(data, 4, (0, 0, 0), (1, 1, 1), shuffle=True, drop_last=True, seed=3)
    assert len(loader) == 6
    e1 = torch.cat([y for _, y in loader])
    e2 = torch.cat([y for _, y in loader])
    assert len(e1) == 24 and len(set(e1.tolist())) == 24
    assert not torch.equal(e1, e2)
    again = BatchLoader(data, 4, (0, 0, 0), (1, 1, 1), shuffle=True, drop_last=True, seed=3)
    assert torch.equal(torch.cat([y for _, y in again]), e1)  # the seed fixes the order


def test_cifar10_through_torchvision(cifar_root, monkeypatch):
    train = load_cifar10(cifar_root, train=True, download=False, verify_checksums=False)
    test = load_cifar10(cifar_root, train=False, download=False, verify_checksums=False)
    assert train.images.shape == (200, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (60, 3, 32, 32)
    assert train.classes[0] == "airplane" and len(train.classes) == 10
    # torchvision's own CIFAR10, unmodified, reads the same fixture: only the MD5 sums it
    # checks the files against are the fixture's (its integrity check still runs).
    import hashlib

    folder = os.path.join(cifar_root, "cifar-10-batches-py")

    def md5(name):
        with open(os.path.join(folder, name), "rb") as f:
            return hashlib.md5(f.read()).hexdigest()

    tv_class = torchvision.datasets.CIFAR10
    monkeypatch.setattr(tv_class, "train_list", [[n, md5(n)] for n, _ in tv_class.train_list])
    monkeypatch.setattr(tv_class, "test_list", [[n, md5(n)] for n, _ in tv_class.test_list])
    monkeypatch.setattr(tv_class, "meta", dict(tv_class.meta, md5=md5("batches.meta")))
    for ours, split in ((train, True), (test, False)):
        tv = tv_class(cifar_root, train=split, download=False)
        assert len(tv) == len(ours) and ours.classes == tv.classes
        # Channel-first uint8 of what torchvision yields as HxWx3 (PIL images from __getitem__).
        assert torch.equal(ours.images, torch.from_numpy(tv.data).permute(0, 3, 1, 2))
        assert ours.labels.tolist() == list(tv.targets)
        for i in (0, 1, len(tv) - 1):
            image, label = tv[i]
            assert torch.equal(ours.images[i], torch.from_numpy(np.array(image)).permute(2, 0, 1))
            assert ours.labels[i].item() == label
    # And the fixture is what we wrote: the first training image and labels, from the pickle.
    with open(os.path.join(folder, "data_batch_1"), "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    assert torch.equal(train.images[0], torch.from_numpy(entry["data"][0].reshape(3, 32, 32)))
    assert train.labels[:40].tolist() == entry["labels"]


def test_cifar10_checksums_are_verified_by_default(cifar_root):
    with pytest.raises(UserError, match="checksum mismatch"):
        load_cifar10(cifar_root, train=True, download=False)


def test_cifar10_missing_files_suggest_synthetic(tmp_path):
    with pytest.raises(UserError) as info:
        load_cifar10(str(tmp_path), train=True, download=False)
    msg = str(info.value)
    assert str(tmp_path) in msg and "dataset=synthetic" in msg and "data_batch_1" in msg


def test_cifar10_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets.utils, "urlopen", offline, raising=False)
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(UserError, match="could not be downloaded.*dataset=synthetic"):
        load_cifar10(str(tmp_path / "data"), train=True, download=True)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape"])
def test_cifar10_corrupt_batch_file(tmp_path, damage):
    root = write_cifar_fixture(str(tmp_path), train_per_batch=8, test_size=8)
    path = os.path.join(root, "cifar-10-batches-py", "data_batch_3")
    if damage == "truncate":
        with open(path, "rb") as f:
            head = f.read(100)
        with open(path, "wb") as f:
            f.write(head)
    elif damage == "garbage":
        with open(path, "wb") as f:
            f.write(b"this is not a pickle" * 10)
    else:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        entry["data"] = entry["data"][:, :1000]
        with open(path, "wb") as f:
            pickle.dump(entry, f)
    with pytest.raises(UserError, match="corrupt"):
        load_cifar10(root, train=True, download=False, verify_checksums=False)


def test_image_folder(image_folder_root):
    train = load_image_folder(os.path.join(image_folder_root, "train"))
    test = load_image_folder(os.path.join(image_folder_root, "test"), classes=train.classes)
    assert train.classes == ["cats", "dogs", "owls"]
    assert train.images.shape == (36, 3, 32, 32) and test.images.shape == (15, 3, 32, 32)
    assert torch.bincount(train.labels).tolist() == [12, 12, 12]
    cfg = OmegaConf.create({"name": "image_folder", "root": image_folder_root, "mean": None,
                            "std": None})
    bundle = load_data(cfg)
    assert bundle.num_classes == 3
    assert all(0 < m < 1 for m in bundle.mean) and all(s > 0 for s in bundle.std)


def test_image_folder_without_class_subfolders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "img.png").write_bytes(b"")
    with pytest.raises(UserError, match="no class subfolders"):
        load_image_folder(str(tmp_path / "train"))


def test_image_folder_with_an_unreadable_image(tmp_path, image_folder_root):
    root = tmp_path / "imgs"
    shutil.copytree(image_folder_root, root)
    bad = root / "train" / "dogs" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UserError, match="cannot read image .*broken.png"):
        load_image_folder(str(root / "train"))


def test_image_folder_test_classes_must_be_known(tmp_path, image_folder_root):
    root = tmp_path / "imgs"
    shutil.copytree(image_folder_root, root)
    shutil.copytree(root / "test" / "owls", root / "test" / "bats")
    with pytest.raises(UserError, match="bats"):
        load_data(OmegaConf.create({"name": "image_folder", "root": str(root)}))


def test_batch_loader_yields_the_memory_format_asked_for():
    data = make_synthetic(20, seed=1)
    loader = BatchLoader(data, 8, CIFAR10_MEAN, CIFAR10_STD, memory_format=torch.channels_last)
    x, _ = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_image_folder_reads_nested_images_as_torchvision_does(tmp_path, image_folder_root):
    """Images in sub-folders of a class folder belong to that class (torchvision's ImageFolder
    walks them too); hidden files and non-image files are skipped."""
    root = tmp_path / "imgs"
    shutil.copytree(image_folder_root, root)
    nested = root / "train" / "owls" / "2019" / "june"
    nested.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(root / "train" / "cats"))[:3]):
        shutil.copy(root / "train" / "cats" / name, nested / f"n{i}.png")
    (nested / "notes.txt").write_text("not an image")
    (root / "train" / "owls" / ".hidden.png").write_bytes(b"not read")
    train = load_image_folder(str(root / "train"))
    assert train.images.shape == (39, 3, 32, 32)
    assert torch.bincount(train.labels).tolist() == [12, 12, 15]
    torchvision = pytest.importorskip("torchvision")
    # torchvision would read the hidden file (macOS "._" files are like it: junk); we do not.
    (root / "train" / "owls" / ".hidden.png").unlink()
    reference = torchvision.datasets.ImageFolder(str(root / "train"))
    assert len(reference) == 39 and reference.classes == train.classes
    assert [label for _, label in reference.samples] == train.labels.tolist()


def test_an_empty_training_class_folder_is_an_error_and_a_test_one_a_warning(
        tmp_path, image_folder_root, capsys):
    root = tmp_path / "imgs"
    shutil.copytree(image_folder_root, root)
    (root / "train" / "bats").mkdir()
    (root / "train" / "bats" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"class folder without images .*bats"):
        load_image_folder(str(root / "train"))
    shutil.rmtree(root / "train" / "bats")
    (root / "test" / "dogs").rename(root / "test" / "dogs-old")
    (root / "test" / "dogs").mkdir()
    shutil.rmtree(root / "test" / "dogs-old")
    bundle = load_data(OmegaConf.create({"name": "image_folder", "root": str(root)}))
    assert bundle.test.images.shape[0] == 10 and bundle.num_classes == 3
    assert "test class folder without images" in capsys.readouterr().err


def test_an_image_over_the_decompression_bomb_limit_is_named(tmp_path, image_folder_root,
                                                            monkeypatch):
    from PIL import Image
    root = tmp_path / "imgs"
    shutil.copytree(image_folder_root, root)
    Image.new("RGB", (64, 64)).save(root / "train" / "dogs" / "huge.png")
    # The fixture's images are 32x32 or so; a limit below 64x64 makes huge.png a "bomb"
    # without writing a 180-megapixel file.
    for limit in (64 * 64 - 1, (64 * 64) // 2 - 1):   # the warning band and the error band
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(UserError, match=r"image .*huge.png is over Pillow's "
                                            r"decompression-bomb limit"):
            load_image_folder(str(root / "train"))
