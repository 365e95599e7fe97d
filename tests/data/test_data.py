"""Tests of eagan.data: the real loaders on fake data in the real formats, and batch sources."""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from PIL import Image
from sklearn.datasets import load_digits
from torch import Tensor

import eagan.data.cifar10
from eagan.data import (DeviceBatchSource, ImageSet, LoaderBatchSource, find_image_files,
                        load_images, make_batch_source)
from eagan.errors import UserError
from tests.fakedata import (CIFAR10_CLASSES, make_image_set, tiny_imagenet_wnids, write_cifar10,
                            write_image_folder, write_tiny_imagenet)
from tests.launch import descendants

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to resolve a host or open a connection fails, as on an offline machine."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


# --- CIFAR-10 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("split, n", [("train", 64), ("test", 32)])
def test_cifar10_shapes_labels_classes(tmp_path: Path, split: str, n: int) -> None:
    write_cifar10(tmp_path, n_train=64, n_test=32)
    data = load_images("cifar10", tmp_path, split, 32, download=False)
    assert data.images.shape == (n, 3, 32, 32) and data.images.dtype == torch.uint8
    torch.testing.assert_close(data.labels, torch.arange(n) % 10)
    assert data.num_classes == 10 and data.class_names == CIFAR10_CLASSES


def test_cifar10_pixels_round_trip(tmp_path: Path) -> None:
    # Read the second training batch with the recipe of the CIFAR-10 web page (pickle with
    # encoding="bytes", rows of 3072 bytes) and find its first image at index 13 (64 = 13 * 4 + 12).
    folder = write_cifar10(tmp_path, n_train=64)
    with open(folder / "data_batch_2", "rb") as f:
        written = pickle.load(f, encoding="bytes")
    data = load_images("cifar10", tmp_path, "train", 32, download=False)
    expected = torch.from_numpy(written[b"data"][0].reshape(3, 32, 32))
    torch.testing.assert_close(data.images[13], expected, rtol=0, atol=0)
    assert data.labels[13] == written[b"labels"][0] == 13 % 10


def test_cifar10_fakes_read_by_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torchvision refuses files whose md5 is not the official one; with that check bypassed, its
    # own reader must see exactly what ours sees, which shows the fakes have the official format.
    write_cifar10(tmp_path, n_train=20, n_test=10)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity",
                        lambda path, md5=None: os.path.isfile(path))
    for train, split in [(True, "train"), (False, "test")]:
        reference = torchvision.datasets.CIFAR10(str(tmp_path), train=train)
        ours = load_images("cifar10", tmp_path, split, 32, download=False)
        torch.testing.assert_close(ours.images.permute(0, 2, 3, 1),
                                   torch.from_numpy(reference.data), rtol=0, atol=0)
        assert ours.labels.tolist() == reference.targets
        assert ours.class_names == reference.classes


@pytest.mark.parametrize("layout", ["archive", "batches_folder_as_root"])
def test_cifar10_other_layouts(tmp_path: Path, layout: str) -> None:
    folder = write_cifar10(tmp_path / "written", n_train=10, n_test=5)
    expected = load_images("cifar10", tmp_path / "written", "test", 32, download=False)
    if layout == "archive":
        root = tmp_path / "root"
        root.mkdir()
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
    else:
        root = folder
    got = load_images("cifar10", root, "test", 32, download=False)
    torch.testing.assert_close(got.images, expected.images, rtol=0, atol=0)


def test_cifar10_resized(tmp_path: Path) -> None:
    write_cifar10(tmp_path, n_train=10, n_test=5)
    assert load_images("cifar10", tmp_path, "test", 16, download=False).images.shape == \
        (5, 3, 16, 16)


@pytest.mark.parametrize("download", [True, False])
def test_cifar10_offline_without_files(tmp_path: Path, no_network: None, download: bool) -> None:
    root = tmp_path / "cifar"
    with pytest.raises(UserError, match="cifar-10-python.tar.gz") as raised:
        load_images("cifar10", root, "train", 32, download=download)
    assert str(root) in str(raised.value) and "cifar-10-batches-py" in str(raised.value)
    assert "\n" not in str(raised.value)
    assert not (root / "cifar-10-python.tar.gz").exists()


def test_cifar10_download_then_extract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Stands in for torchvision's download_url: checks what it is asked for and "downloads" a
    # tarball of fake batches, which the loader must then extract and read.
    source = write_cifar10(tmp_path / "server", n_train=10, n_test=5)
    requests = []

    def fake_download(url: str, root: str, filename: str, md5: str) -> None:
        requests.append((url, filename, md5))
        with tarfile.open(Path(root) / filename, "w:gz") as tar:
            tar.add(source, arcname="cifar-10-batches-py")

    monkeypatch.setattr(eagan.data.cifar10, "download_url", fake_download)
    data = load_images("cifar10", tmp_path / "root", "test", 32, download=True)
    assert data.images.shape == (5, 3, 32, 32)
    assert requests == [(torchvision.datasets.CIFAR10.url, "cifar-10-python.tar.gz",
                         torchvision.datasets.CIFAR10.tgz_md5)]
    load_images("cifar10", tmp_path / "root", "test", 32, download=True)
    assert len(requests) == 1  # extracted files are used, not downloaded again


def test_cifar10_incomplete_folder(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(UserError, match="data_batch_3"):
        load_images("cifar10", tmp_path, "train", 32, download=False)
    load_images("cifar10", tmp_path, "test", 32, download=False)  # the test split is complete


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo unpickled code ran",))


@pytest.mark.parametrize("content, reason", [
    (b"not a pickle at all", "is not a CIFAR-10 pickle"),
    (pickle.dumps({"data": _RunsCode()}, protocol=2), "unexpected object"),
    (pickle.dumps({"data": np.zeros((2, 5), np.uint8), "labels": [0, 1]}), "shape"),
])
def test_cifar10_bad_batch_file(tmp_path: Path, content: bytes, reason: str) -> None:
    folder = write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(UserError, match=reason) as raised:
        load_images("cifar10", tmp_path, "test", 32, download=False)
    assert "test_batch" in str(raised.value)


# --- Tiny-ImageNet -----------------------------------------------------------------------------

@pytest.mark.parametrize("parent", [True, False])
def test_tiny_imagenet_train_val(tmp_path: Path, parent: bool) -> None:
    base = write_tiny_imagenet(tmp_path, n_classes=3, n_train_per_class=4, n_val=7)
    root = tmp_path if parent else base
    wnids = tiny_imagenet_wnids(3)
    assert wnids != sorted(wnids)  # so ids from sorting would fail below

    train = load_images("tiny_imagenet", root, "train", 64)
    assert train.images.shape == (12, 3, 64, 64)
    assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert train.class_names == wnids and train.num_classes == 3
    # The greyscale JPEG comes back as RGB with three equal channels, pixel for pixel.
    grey = np.array(Image.open(base / "train" / wnids[0] / "images" / f"{wnids[0]}_0.JPEG"))
    assert grey.ndim == 2
    for channel in range(3):
        torch.testing.assert_close(train.images[0, channel], torch.from_numpy(grey),
                                   rtol=0, atol=0)
    first_of_class_1 = np.array(Image.open(base / "train" / wnids[1] / "images" /
                                           f"{wnids[1]}_0.JPEG"))
    torch.testing.assert_close(train.images[4], torch.from_numpy(first_of_class_1).permute(2, 0, 1),
                               rtol=0, atol=0)

    val = load_images("tiny_imagenet", root, "val", 64)
    assert val.images.shape == (7, 3, 64, 64)
    assert val.labels.tolist() == [j % 3 for j in range(7)]


def test_tiny_imagenet_val_labels_follow_annotations(tmp_path: Path) -> None:
    base = write_tiny_imagenet(tmp_path, n_classes=3, n_val=3)
    wnids = tiny_imagenet_wnids(3)
    (base / "val" / "val_annotations.txt").write_text(
        f"val_0.JPEG\t{wnids[2]}\t0\t0\t9\t9\nval_1.JPEG\t{wnids[2]}\t0\t0\t9\t9\n"
        f"val_2.JPEG\t{wnids[0]}\t0\t0\t9\t9\n")
    assert load_images("tiny_imagenet", tmp_path, "val", 64).labels.tolist() == [2, 2, 0]


def test_tiny_imagenet_resized(tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path, n_classes=2, n_train_per_class=2)
    assert load_images("tiny_imagenet", tmp_path, "train", 32).images.shape == (4, 3, 32, 32)


def test_tiny_imagenet_missing(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="tiny-imagenet-200.zip") as raised:
        load_images("tiny_imagenet", tmp_path / "nowhere", "train", 64)
    assert str(tmp_path / "nowhere") in str(raised.value)


def test_tiny_imagenet_unknown_wnid_in_annotations(tmp_path: Path) -> None:
    base = write_tiny_imagenet(tmp_path)
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn00000000\t0\t0\t9\t9\n")
    with pytest.raises(UserError, match="val_annotations.txt line 1"):
        load_images("tiny_imagenet", tmp_path, "val", 64)


def test_tiny_imagenet_class_without_images(tmp_path: Path) -> None:
    base = write_tiny_imagenet(tmp_path, n_classes=2)
    wnid = tiny_imagenet_wnids(2)[1]
    shutil.rmtree(base / "train" / wnid / "images")
    with pytest.raises(UserError, match=wnid):
        load_images("tiny_imagenet", tmp_path, "train", 64)


# --- image folders -----------------------------------------------------------------------------

def test_folder_conditional(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["dogs", "cats"], n_per_class=3, size=16)
    data = load_images("folder", tmp_path, "train", 16)
    assert data.class_names == ["cats", "dogs"] and data.num_classes == 2  # sorted by name
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    written = np.array(Image.open(tmp_path / "dogs" / "img_00002.png"))
    torch.testing.assert_close(data.images[5], torch.from_numpy(written).permute(2, 0, 1),
                               rtol=0, atol=0)


def test_folder_unconditional(tmp_path: Path) -> None:
    write_image_folder(tmp_path, None, n_per_class=5, size=16)
    data = load_images("folder", tmp_path, "train", 8)
    assert data.images.shape == (5, 3, 8, 8)
    assert data.num_classes == 0 and data.class_names == [] and data.labels.tolist() == [0] * 5


@pytest.mark.parametrize("width, height", [(40, 20), (20, 40), (10, 10)])
def test_folder_center_crop_then_resize(tmp_path: Path, width: int, height: int) -> None:
    # Blue in the central square, red outside it: cropping keeps only blue.
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[...] = (255, 0, 0)
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    pixels[top:top + side, left:left + side] = (0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "odd.png")
    write_image_folder(tmp_path, None, n_per_class=1, size=24)  # mixed sizes in one folder
    data = load_images("folder", tmp_path, "train", 10)
    assert data.images.shape == (2, 3, 10, 10)
    blue = torch.tensor([0, 0, 255], dtype=torch.uint8)[:, None, None].expand(3, 10, 10)
    torch.testing.assert_close(data.images[1], blue, rtol=0, atol=0)  # img_00000 < odd


def _no_images(root: Path) -> None:
    root.mkdir()
    (root / "notes.txt").write_text("not an image")


def _empty_class(root: Path) -> None:
    write_image_folder(root, ["a"], 2, 8)
    (root / "b").mkdir()


def _corrupt_image(root: Path) -> None:
    write_image_folder(root, ["a"], 2, 8)
    (root / "a" / "img_00001.png").write_bytes(b"\x89PNG truncated")


def _loose_and_classes(root: Path) -> None:
    write_image_folder(root, ["a"], 2, 8)
    write_image_folder(root, None, 1, 8)


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "image folder .*images does not exist"),
    (_no_images, "image folder .*images holds no images"),
    (_empty_class, "class folder .*b holds no images"),
    (_corrupt_image, "cannot read image .*img_00001.png"),
    (_loose_and_classes, "mixes class sub-folders with loose images such as img_00000.png"),
])
def test_folder_errors(tmp_path: Path, make, message: str) -> None:
    root = tmp_path / "images"
    make(root)
    with pytest.raises(UserError, match=message) as raised:
        load_images("folder", root, "train", 8)
    assert "\n" not in str(raised.value)


# --- digits and argument errors ----------------------------------------------------------------

def test_digits_split_and_pixels() -> None:
    train = load_images("digits", "unused", "train", 32)
    test = load_images("digits", "unused", "test", 32)
    assert train.images.shape == (1437, 3, 32, 32) and test.images.shape == (360, 3, 32, 32)
    assert train.num_classes == 10 and train.class_names == [str(d) for d in range(10)]
    # Together the two splits hold every image of the set: per-class counts add up.
    target = torch.from_numpy(load_digits().target)
    torch.testing.assert_close(torch.bincount(train.labels, minlength=10) +
                               torch.bincount(test.labels, minlength=10),
                               torch.bincount(target, minlength=10))
    native = load_images("digits", "unused", "train", 8)  # no resize at the native size
    assert native.images.max() == 255
    torch.testing.assert_close(native.images[:, 0], native.images[:, 2], rtol=0, atol=0)


@pytest.mark.parametrize("dataset, split, image_size, message", [
    ("mnist", "train", 32, "unknown dataset 'mnist'; expected one of cifar10, tiny_imagenet"),
    ("cifar10", "val", 32, "unknown split 'val' .*expected one of train, test"),
    ("tiny_imagenet", "test", 64, "expected one of train, val"),
    ("folder", "test", 32, "expected one of train$"),
    ("digits", "train", 0, "image_size must be a positive integer"),
])
def test_bad_arguments(tmp_path: Path, dataset: str, split: str, image_size: int,
                       message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_images(dataset, tmp_path, split, image_size)


def test_find_image_files_refuses_array_datasets(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="use load_images"):
        find_image_files("cifar10", tmp_path, "train")


# --- batch sources -----------------------------------------------------------------------------

N_INDEXED = 40


def indexed_set(n: int = N_INDEXED, size: int = 8) -> ImageSet:
    """Image i: red = i everywhere, green a left-to-right ramp (shows flips), blue = 255 - i."""
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    images[:, 0] = torch.arange(n, dtype=torch.uint8)[:, None, None]
    images[:, 1] = (torch.arange(size) * (255 // (size - 1))).to(torch.uint8)
    images[:, 2] = 255 - images[:, 0]
    return ImageSet(images, torch.arange(n) % 4, 4, ["a", "b", "c", "d"], "indexed")


def indices_and_flips(x: Tensor) -> tuple[Tensor, Tensor]:
    """Recover each image's index and whether it was flipped from an indexed_set batch."""
    index = ((x[:, 0, 0, 0] + 1) * 127.5).round().long()
    return index, x[:, 1, 0, 0] > x[:, 1, 0, -1]



@pytest.mark.parametrize("device", DEVICES)
def test_batches_are_scaled_images(device: str) -> None:
    data = indexed_set()
    source = make_batch_source(data, 16, seed=0, device=device, hflip=False)
    x, y = source.next()
    assert x.shape == (16, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.device.type == y.device.type == device
    index, flipped = indices_and_flips(x)
    assert not flipped.any()
    torch.testing.assert_close(x.cpu(), data.images[index.cpu()].float() / 127.5 - 1,
                               rtol=0, atol=0)
    torch.testing.assert_close(y.cpu(), data.labels[index.cpu()])
    assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("batch_size", [8, 12, 40, 64])
def test_every_epoch_covers_each_image_once(batch_size: int) -> None:
    source = make_batch_source(indexed_set(), batch_size, seed=1, device="cpu")
    steps = -(-3 * N_INDEXED // batch_size)
    stream = torch.cat([indices_and_flips(source.next()[0])[0] for _ in range(steps)])
    epochs = stream[:3 * N_INDEXED].view(3, N_INDEXED)
    for epoch in epochs:
        assert epoch.sort().values.tolist() == list(range(N_INDEXED))
    assert not torch.equal(epochs[0], epochs[1])  # a new permutation every epoch
    assert source.epoch == (steps * batch_size - 1) // N_INDEXED


def test_flips_mirror_about_half_the_images() -> None:
    data = indexed_set()
    source = make_batch_source(data, 64, seed=2, device="cpu")
    flips = []
    for _ in range(100):
        x, _ = source.next()
        index, flipped = indices_and_flips(x)
        expected = data.images[index].float() / 127.5 - 1
        expected[flipped] = expected[flipped].flip(3)
        torch.testing.assert_close(x, expected, rtol=0, atol=0)
        flips.append(flipped)
    # 6400 fair coin flips: the fraction has standard deviation 0.5 / 80 = 0.00625; 0.025 is 4 sd.
    assert torch.cat(flips).float().mean().item() == pytest.approx(0.5, abs=0.025)


def indexed_folder(tmp_path: Path) -> Path:
    """indexed_set written as PNG files, image i in class folder c<i % 4>."""
    folder = tmp_path / "indexed"
    if not folder.exists():
        for i, image in enumerate(indexed_set().images):
            (folder / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(
                folder / f"c{i % 4}" / f"{i:03d}.png")
    return folder


def make_source(kind: str, tmp_path: Path, batch_size: int, seed: int, **kwargs):
    """"device": indexed_set in memory; "folder": indexed_folder loaded into memory; "loader",
    "loader_workers": indexed_folder decoded by a DataLoader without or with worker processes."""
    if kind == "device":
        return DeviceBatchSource(indexed_set(), batch_size, seed, "cpu", **kwargs)
    if kind == "folder":
        data = load_images("folder", indexed_folder(tmp_path), "train", 8)
        return DeviceBatchSource(data, batch_size, seed, "cpu", **kwargs)
    files = find_image_files("folder", indexed_folder(tmp_path), "train")
    workers = 2 if kind == "loader_workers" else 0
    return LoaderBatchSource(files, 8, batch_size, seed, "cpu", num_workers=workers, **kwargs)


KINDS = ["device", "loader", "loader_workers"]


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_resumes_exactly(tmp_path: Path, kind: str) -> None:
    source = make_source(kind, tmp_path, 12, seed=3)
    for _ in range(3):
        source.next()
    torch.save(source.state_dict(), tmp_path / "state.pt")
    expected = [source.next() for _ in range(8)]  # 36 -> 132 images: crosses 3 epoch ends
    resumed = make_source(kind, tmp_path, 12, seed=99)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for (x, y), (x_expected, y_expected) in zip([resumed.next() for _ in range(8)], expected):
        torch.testing.assert_close(x, x_expected, rtol=0, atol=0)
        torch.testing.assert_close(y, y_expected, rtol=0, atol=0)
    # Rewinding a running source (its workers have read ahead) replays the same batches.
    source.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for x_expected, _ in expected[:3]:
        torch.testing.assert_close(source.next()[0], x_expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["device", "loader"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_split_the_global_batch(tmp_path: Path, kind: str, world_size: int) -> None:
    single = make_source(kind, tmp_path, 12, seed=4)
    ranks = [make_source(kind, tmp_path, 12 // world_size, seed=4, rank=r, world_size=world_size)
             for r in range(world_size)]
    for _ in range(7):
        x, y = single.next()
        parts = [rank.next() for rank in ranks]
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), x, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([p[1] for p in parts]), y, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["loader", "loader_workers"])
def test_loader_gives_the_device_batches(tmp_path: Path, kind: str) -> None:
    device = make_source("folder", tmp_path, 7, seed=5)
    loader = make_source(kind, tmp_path, 7, seed=5)
    for _ in range(12):
        (x, y), (x_loader, y_loader) = device.next(), loader.next()
        torch.testing.assert_close(x_loader, x, rtol=0, atol=0)
        torch.testing.assert_close(y_loader, y, rtol=0, atol=0)
    loader.close()  # a closed source starts new workers where its stream stands
    torch.testing.assert_close(loader.next()[0], device.next()[0], rtol=0, atol=0)


def test_loader_reports_a_corrupt_file_in_one_line(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["a"], n_per_class=4, size=8)
    (tmp_path / "a" / "img_00002.png").write_bytes(b"\x89PNG broken")
    before = descendants(os.getpid())
    source = LoaderBatchSource(find_image_files("folder", tmp_path, "train"), 8, 4, 0, "cpu",
                               num_workers=2)
    with pytest.raises(UserError, match=r"^cannot read image .*img_00002.png") as raised:
        source.next()
    assert "\n" not in str(raised.value)
    # close() ends the workers now; left to the garbage collector, whose order of finalizers
    # is arbitrary, they took 10 s to end on queues already closed.
    source.close()
    assert descendants(os.getpid()) == before


def test_state_of_another_dataset_is_refused() -> None:
    state = make_batch_source(make_image_set(30, num_classes=3), 4, 0, "cpu").state_dict()
    with pytest.raises(UserError, match="30 images but the dataset has 40"):
        make_batch_source(indexed_set(), 4, 0, "cpu").load_state_dict(state)


@pytest.mark.parametrize("batch_size, rank, world_size", [(0, 0, 1), (4, 2, 2), (4, -1, 2)])
def test_bad_batching_arguments(batch_size: int, rank: int, world_size: int) -> None:
    with pytest.raises(ValueError, match="rank < world_size"):
        make_batch_source(indexed_set(), batch_size, 0, "cpu", rank=rank, world_size=world_size)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches(tmp_path: Path) -> None:
    data = make_image_set(50, num_classes=5, size=16)
    write_image_folder(tmp_path, ["a", "b"], n_per_class=10, size=16)
    files = find_image_files("folder", tmp_path, "train")
    pairs = [(make_batch_source(data, 8, 0, "cpu"), make_batch_source(data, 8, 0, "cuda")),
             (LoaderBatchSource(files, 16, 8, 0, "cpu", num_workers=0),
              LoaderBatchSource(files, 16, 8, 0, "cuda", num_workers=2))]  # pinned memory
    for cpu, cuda in pairs:
        for _ in range(5):
            (x, y), (x_cuda, y_cuda) = cpu.next(), cuda.next()
            assert x_cuda.is_cuda and y_cuda.is_cuda
            torch.testing.assert_close(x_cuda.cpu(), x, rtol=0, atol=0)
            torch.testing.assert_close(y_cuda.cpu(), y, rtol=0, atol=0)
