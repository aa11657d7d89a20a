"""Vision datasets: IDX parsing and checksums, the apt fetch path, CIFAR and ImageFolder fixtures
in torchvision's exact on-disk formats, and the seeded batch iterator."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import pickle
import stat
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from suite import assets
from suite.errors import ConfigError, DataError
from suite.vision import datasets as vd
from suite.vision.datasets import (
    FASHION_FILES,
    ImageSet,
    batches,
    check_vision_dataset,
    load_vision,
    pad_crop_flip,
    read_idx,
)


def write_idx(path: Path, array: np.ndarray, magic: int) -> Path:
    """Gzipped IDX file: big-endian magic, dims, then uint8 payload."""
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))
    return path


def test_read_idx_images_and_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    x = read_idx(write_idx(tmp_path / "i.gz", imgs, 2051), 2051)
    y = read_idx(write_idx(tmp_path / "l.gz", np.array([3, 0, 9]), 2049), 2049)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0], torch.from_numpy(imgs))
    assert y.tolist() == [3, 0, 9] and y.dtype == torch.int64


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    labels = write_idx(tmp_path / "l.gz", np.arange(5), 2049)
    with pytest.raises(DataError, match="magic 2051"):
        read_idx(labels, 2051)
    raw = gzip.decompress(labels.read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-1]))
    with pytest.raises(DataError, match="payload"):
        read_idx(tmp_path / "short.gz", 2049)
    (tmp_path / "plain").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="gzip"):
        read_idx(tmp_path / "plain", 2049)


def _fake_fashion_dir(path: Path, n_train: int = 6, n_test: int = 4) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(path / f"{prefix}-images-idx3-ubyte.gz", np.zeros((n, 28, 28)), 2051)
        write_idx(path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10, 2049)
    return path


def test_env_dir_with_wrong_checksums_is_refused(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vd.FASHION_ENV, str(_fake_fashion_dir(tmp_path / "fm")))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*expected sha256"):
        vd.fashion_mnist_dir()
    os.remove(tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz")
    monkeypatch.setattr(vd, "FASHION_DEB", dataclasses.replace(
        vd.FASHION_DEB, files=(("t10k-labels-idx1-ubyte.gz", "0" * 64),)))
    with pytest.raises(DataError, match="is missing"):
        vd.fashion_mnist_dir()


def test_wrong_shapes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="expected 60000 x 1 x 28 x 28"):
        vd.load_fashion_mnist(_fake_fashion_dir(tmp_path / "fm"))


def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(vd.FASHION_ENV, raising=False)
    return tmp_path / "cache"


def test_missing_apt_names_the_manual_command(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _cache(tmp_path, monkeypatch)
    monkeypatch.setattr(assets.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match=r"apt-get download dataset-fashion-mnist && dpkg-deb -x"):
        vd.fashion_mnist_dir()


def test_failing_apt_get_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = _cache(tmp_path, monkeypatch)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("apt-get", "dpkg-deb"):
        script = bin_dir / tool
        script.write_text("#!/bin/sh\necho 'E: Unable to locate package' >&2\nexit 100\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(DataError, match="Unable to locate package.*by hand"):
        vd.fashion_mnist_dir()
    assert not (cache / "datasets" / "fashion-mnist").exists()
    assert list((cache / "debs").iterdir()) == []  # the temp dir is gone


def test_verified_cache_is_used_without_apt(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cache = _cache(tmp_path, monkeypatch)
    target = cache / "datasets" / "fashion-mnist"
    target.mkdir(parents=True)
    (target / "verified.json").write_text(json.dumps(FASHION_FILES))
    monkeypatch.setattr(assets.shutil, "which", lambda name: None)
    assert vd.fashion_mnist_dir() == target


def test_check_vision_dataset() -> None:
    for ok in ("fashion-mnist", "torchvision-cifar10:/d", "torchvision-cifar100:/d",
               "imagefolder:/d", "imagefolder:/d?crop=64&resize=72"):
        check_vision_dataset(ok, "dataset")
    for bad in ("cifar10", "imagefolder:", 3, "torchvision-cifar10:"):
        with pytest.raises(ConfigError, match="dataset: unknown vision dataset.*fashion-mnist"):
            check_vision_dataset(bad, "dataset")
    with pytest.raises(ConfigError, match="crop=<int>, resize=<int>"):
        check_vision_dataset("imagefolder:/d?size=3", "x.dataset")


# --- CIFAR in torchvision's python-pickle layout --------------------------------------------------


def _pickle(path: Path, obj: dict) -> str:
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=2)
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_fake_cifar10(root: Path, per_batch: int, monkeypatch: pytest.MonkeyPatch) -> dict:
    """``root/cifar-10-batches-py`` with five train batches, a test batch and batches.meta; the
    class's md5 table is pointed at these files (torchvision verifies md5s on load)."""
    from torchvision.datasets import CIFAR10

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = {}
    train_list, test_list = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)  # (n, 3*32*32) R,G,B planes
        labels = rng.integers(0, 10, per_batch).tolist()
        rows[name] = (data, labels)
        md5 = _pickle(folder / name, {"batch_label": name, "data": data, "labels": labels})
        (test_list if name == "test_batch" else train_list).append([name, md5])
    meta_md5 = _pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    monkeypatch.setattr(CIFAR10, "train_list", train_list)
    monkeypatch.setattr(CIFAR10, "test_list", test_list)
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": meta_md5})
    return rows


def test_cifar10_fixture_loads_as_uint8_nchw(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    rows = write_fake_cifar10(tmp_path / "c10", 4, monkeypatch)
    data = load_vision(f"torchvision-cifar10:{tmp_path / 'c10'}")
    assert data.train.x.shape == (20, 3, 32, 32) and data.test.x.shape == (4, 3, 32, 32)
    assert data.num_classes == 10 and data.in_channels == 3 and len(data.mean) == 3
    first, labels = rows["data_batch_1"]
    assert torch.equal(data.train.x[0], torch.from_numpy(first[0].reshape(3, 32, 32)))
    assert data.train.y[:4].tolist() == labels
    test, test_labels = rows["test_batch"]
    assert torch.equal(data.test.x[3], torch.from_numpy(test[3].reshape(3, 32, 32)))
    assert data.test.y.tolist() == test_labels and len(data.fingerprint) == 16


def test_cifar100_fixture_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import CIFAR100

    folder = tmp_path / "c100" / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    md5s = {name: _pickle(folder / name, {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                          "fine_labels": list(range(n)),
                                          "coarse_labels": [0] * n})
            for name, n in (("train", 6), ("test", 3))}
    meta = _pickle(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)]})
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5s["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5s["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": meta})
    data = load_vision(f"torchvision-cifar100:{tmp_path / 'c100'}")
    assert data.num_classes == 100 and len(data.train) == 6 and data.test.y.tolist() == [0, 1, 2]


def test_missing_cifar_root_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar-10-batches-py.*download=True"):
        load_vision(f"torchvision-cifar10:{tmp_path / 'nothing'}")


# --- ImageFolder (lazy) ---------------------------------------------------------------------------


def write_fake_imagefolder(root: Path, classes: tuple[str, ...] = ("cat", "dog"),
                           per_class: int = 3) -> Path:
    """``root/{train,val}/<class>/*.png`` of random RGB images of varying sizes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                h, w = 20 + 3 * i, 26 - 2 * i
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                pixels[..., k % 3] = 255  # class k is saturated in channel k
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_imagefolder_is_lazy_and_batches(tmp_path: Path) -> None:
    root = write_fake_imagefolder(tmp_path / "imnet")
    data = load_vision(f"imagefolder:{root}?crop=16&resize=18")
    assert not data.train.in_memory and len(data.train) == 6 and len(data.test) == 6
    assert data.num_classes == 2 and data.train.item_shape == (3, 16, 16)
    got = list(batches(data.train, 4, torch.Generator().manual_seed(0), True, data.mean,
                       data.std, augment=True))
    assert [tuple(x.shape) for x, _ in got] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    assert sorted(torch.cat([y for _, y in got]).tolist()) == [0, 0, 0, 1, 1, 1]
    x, y = next(iter(batches(data.test, 6, None, False, (0.0,) * 3, (1.0,) * 3)))
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.all(x[:3, 0] == 1.0) and torch.all(x[3:, 1] == 1.0)  # saturated channel k
    assert data.fingerprint == load_vision.__wrapped__(f"imagefolder:{root}").fingerprint


def test_imagefolder_class_mismatch(tmp_path: Path) -> None:
    root = write_fake_imagefolder(tmp_path / "imnet")
    (root / "val" / "dog").rename(root / "val" / "wolf")
    with pytest.raises(DataError, match="different class folders"):
        load_vision(f"imagefolder:{root}")
    with pytest.raises(DataError, match="ImageNet layout"):
        load_vision(f"imagefolder:{tmp_path / 'empty'}")


# --- batches ------------------------------------------------------------------------------------


def _split(n: int = 10) -> ImageSet:
    x = torch.arange(n * 2 * 4 * 4).remainder(256).to(torch.uint8).reshape(n, 2, 4, 4)
    return ImageSet(x, torch.arange(n))


def test_batches_order_and_normalisation() -> None:
    split = _split()
    evals = list(batches(split, 4, None, False, (0.5, 0.25), (2.0, 4.0)))
    assert [y.tolist() for _, y in evals] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    x0 = split.x[:4].float() / 255
    assert torch.allclose(evals[0][0][:, 0], (x0[:, 0] - 0.5) / 2.0)
    assert torch.allclose(evals[0][0][:, 1], (x0[:, 1] - 0.25) / 4.0)
    a = [y for _, y in batches(split, 4, torch.Generator().manual_seed(3), True)]
    b = [y for _, y in batches(split, 4, torch.Generator().manual_seed(3), True)]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert sorted(torch.cat(a).tolist()) == list(range(10)) and torch.cat(a).tolist() != list(
        range(10))
    with pytest.raises(ConfigError, match="Generator"):
        next(batches(split, 4, None, True))


def test_augment_is_seeded_crop_and_flip() -> None:
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    a = pad_crop_flip(x, torch.Generator().manual_seed(1))
    b = pad_crop_flip(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape
    flips = pad_crop_flip(x, torch.Generator().manual_seed(2), pad=0)
    same = [torch.equal(f, o) for f, o in zip(flips, x, strict=True)]
    mirrored = [torch.equal(f, o.flip(-1)) for f, o in zip(flips, x, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True)) and 10 < sum(mirrored) < 54
    ones = pad_crop_flip(torch.full((32, 1, 16, 16), 255, dtype=torch.uint8),
                         torch.Generator().manual_seed(4))
    assert (ones == 0).any() and (ones[:, :, 8, 8] == 255).all()  # zero padding, centre kept


def test_image_set_validation_and_subset() -> None:
    with pytest.raises(DataError, match="uint8"):
        ImageSet(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(DataError, match="int64"):
        ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
    sub = _split().subset(range(2, 5))
    assert sub.y.tolist() == [2, 3, 4] and sub.item_shape == (2, 4, 4)


@pytest.mark.slow
def test_real_fashion_mnist_via_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fetch the pinned .deb into a fresh cache, verify it, parse all 70,000 images."""
    _cache(tmp_path, monkeypatch)
    data = load_vision.__wrapped__("fashion-mnist")
    assert data.train.x.shape == (60000, 1, 28, 28) and data.test.x.shape == (10000, 1, 28, 28)
    assert data.train.y.bincount().tolist() == [6000] * 10
    assert data.test.y.bincount().tolist() == [1000] * 10
    assert abs(data.train.x.float().mean().item() / 255 - data.mean[0]) < 1e-3
    t0 = time.perf_counter()
    assert vd.fashion_mnist_dir() == tmp_path / "cache" / "datasets" / "fashion-mnist"
    assert time.perf_counter() - t0 < 1.0  # the sidecar answers, no re-hashing
    monkeypatch.setenv(vd.FASHION_ENV, str(vd.fashion_mnist_dir()))
    assert load_vision.__wrapped__("fashion-mnist").fingerprint == data.fingerprint
