"""Image classification data: verified sources, in-memory or lazy splits, seeded batches.

Dataset ids (``check_vision_dataset`` validates them without loading anything):
  * ``fashion-mnist``: the embedded default, the full standard 60k/10k split of Zalando's
    Fashion-MNIST (MIT) from the pinned Debian package ``dataset-fashion-mnist``, fetched with
    ``apt-get download`` (no root) and unpacked with ``dpkg-deb -x`` into the cache
    (research/offline-assets.md section 3.1). ``$QBENCH_FASHION_MNIST_DIR`` may name a directory
    that already holds the four ``.gz`` files; their checksums are verified either way.
  * ``torchvision-cifar10:<root>`` / ``torchvision-cifar100:<root>``: torchvision's CIFAR python
    batches under ``<root>`` (``download=False``; torchvision checks their md5s), held in memory.
  * ``imagefolder:<root>[?crop=224&resize=256]``: an ImageNet-layout tree ``<root>/train/<class>/``
    and ``<root>/val/<class>/``, decoded lazily (shorter side resized to ``resize``, centre crop
    ``crop``), since it cannot sit in memory.

Every split is an ``ImageSet`` of uint8 images (N, C, H, W) and int64 labels; ``batches`` converts
one batch at a time to normalised float, so an epoch costs one index and one cast per batch.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch
from torch.utils.data import DataLoader, Dataset

from suite.assets import DebPackage, cache_dir, fetch_deb_files, verify_deb_files
from suite.errors import ConfigError, DataError

FASHION_DEB = DebPackage(
    package="dataset-fashion-mnist",
    version="0.0~git20200523.55506a9-1",
    sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
    member_dir="usr/share/datasets/fashion-mnist",
    files=(  # sha256 of each member, computed from the verified .deb
        ("train-images-idx3-ubyte.gz",
         "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"),
        ("train-labels-idx1-ubyte.gz",
         "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"),
        ("t10k-images-idx3-ubyte.gz",
         "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
        ("t10k-labels-idx1-ubyte.gz",
         "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"),
    ),
)
FASHION_FILES = dict(FASHION_DEB.files)
FASHION_ENV = "QBENCH_FASHION_MNIST_DIR"
FASHION_MANUAL = (f"apt-get download {FASHION_DEB.package} && dpkg-deb -x "
                  f"{FASHION_DEB.package}_*.deb DIR && export {FASHION_ENV}=DIR/"
                  f"{FASHION_DEB.member_dir}")
# Channel statistics of the training splits (the usual published constants; Fashion-MNIST's
# were recomputed from the verified train split: 0.2860 / 0.3530).
FASHION_STATS = ((0.2860,), (0.3530,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
BUILTIN = {"fashion-mnist": "Fashion-MNIST, full 60k/10k split (Debian dataset-fashion-mnist)"}
PREFIXES = {
    "torchvision-cifar10:": "CIFAR-10 python batches under <root> (torchvision layout)",
    "torchvision-cifar100:": "CIFAR-100 python batches under <root> (torchvision layout)",
    "imagefolder:": "<root>/train and <root>/val class folders, lazily decoded [?crop=&resize=]",
}
_FOLDER_KEYS = ("crop", "resize")
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, eq=False)
class ImageSet:
    """One split: uint8 images ``x`` (N, C, H, W) and int64 labels ``y`` (N,) held in memory,
    or a lazily loaded ``dataset`` whose item ``i`` is ``(uint8 (C, H, W) tensor, int label)``.
    """

    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    dataset: Dataset | None = None

    def __post_init__(self) -> None:
        if self.dataset is not None:
            if self.x is not None or self.y is not None:
                raise DataError("ImageSet: give either x/y tensors or a dataset, not both")
            return
        if self.x is None or self.y is None or self.x.dtype != torch.uint8 or self.x.ndim != 4:
            raise DataError("ImageSet: x must be a uint8 (N, C, H, W) tensor and y given")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise DataError(f"ImageSet: y must be int64 ({self.x.shape[0]},), got "
                            f"{self.y.dtype} {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return len(self.dataset) if self.dataset is not None else int(self.x.shape[0])

    @property
    def in_memory(self) -> bool:
        """True when the split is held as tensors (fast indexing, no decoding)."""
        return self.dataset is None

    @property
    def item_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image (decodes the first item of a lazy split)."""
        if self.dataset is None:
            return tuple(self.x.shape[1:])
        return tuple(self.dataset[0][0].shape)

    def subset(self, indices: torch.Tensor | range) -> ImageSet:
        """The examples at ``indices`` (in memory: a copy; lazy: a ``torch.utils.data.Subset``)."""
        idx = torch.as_tensor(list(indices) if isinstance(indices, range) else indices)
        if self.dataset is None:
            return ImageSet(self.x[idx].clone(), self.y[idx].clone())
        return ImageSet(dataset=torch.utils.data.Subset(self.dataset, idx.tolist()))


@dataclass(frozen=True, eq=False)
class VisionData:
    """A dataset ready for training: both splits, normalisation constants and provenance."""

    dataset_id: str
    train: ImageSet
    test: ImageSet
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str
    note: str

    @property
    def in_channels(self) -> int:
        """Channels of one image (1 for Fashion-MNIST, 3 for CIFAR/ImageNet)."""
        return self.train.item_shape[0]


def vision_dataset_ids() -> list[str]:
    """Built-in ids and the accepted ``<prefix>:<root>`` forms, for listings and errors."""
    return [*BUILTIN, *(f"{p}<root>" for p in PREFIXES)]


def check_vision_dataset(dataset_id: Any, where: str) -> None:
    """Validate an id's syntax without loading anything (ConfigError naming ``where``)."""
    if isinstance(dataset_id, str) and dataset_id in BUILTIN:
        return
    prefix = _prefix_of(dataset_id)
    if prefix is None or not dataset_id[len(prefix):].split("?")[0]:
        raise ConfigError(f"{where}: unknown vision dataset {dataset_id!r}; accepted: "
                          f"{', '.join(vision_dataset_ids())}")
    if prefix == "imagefolder:":
        _folder_options(dataset_id, where)


def _prefix_of(dataset_id: Any) -> str | None:
    if not isinstance(dataset_id, str):
        return None
    return next((p for p in PREFIXES if dataset_id.startswith(p)), None)


def _folder_options(dataset_id: str, where: str) -> tuple[str, int, int]:
    """Parse ``imagefolder:<root>[?crop=&resize=]`` into (root, crop, resize)."""
    root, _, query = dataset_id[len("imagefolder:"):].partition("?")
    opts = dict(parse_qsl(query, keep_blank_values=True))
    bad = sorted(set(opts) - set(_FOLDER_KEYS))
    if bad or not all(v.isdigit() and int(v) > 0 for v in opts.values()):
        raise ConfigError(f"{where}: bad imagefolder option(s) in {dataset_id!r}; accepted: "
                          f"crop=<int>, resize=<int> (positive)")
    crop = int(opts.get("crop", 224))
    return root, crop, int(opts.get("resize", max(crop, round(crop * 256 / 224))))


@lru_cache(maxsize=4)
def load_vision(dataset_id: str) -> VisionData:
    """Load (and on first use fetch and verify) a dataset; cached in-process.

    Raises:
        ConfigError: the id is malformed.
        DataError: the data is missing, its checksums do not match, or its shape is wrong.
    """
    check_vision_dataset(dataset_id, "dataset")
    if dataset_id == "fashion-mnist":
        return load_fashion_mnist(fashion_mnist_dir())
    prefix = _prefix_of(dataset_id)
    if prefix == "imagefolder:":
        return _load_imagefolder(dataset_id)
    return _load_cifar(dataset_id, 100 if prefix == "torchvision-cifar100:" else 10)


# --- Fashion-MNIST ------------------------------------------------------------------------------


def read_idx(path: Path, magic: int) -> torch.Tensor:
    """Parse one gzipped IDX file: images (magic 2051) -> uint8 (N, 1, H, W); labels (2049) ->
    int64 (N,). The header's counts must match the payload (DataError otherwise)."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as e:
        raise DataError(f"{path.name}: not a readable gzip file ({e})") from e
    ndim = 3 if magic == IDX_IMAGES_MAGIC else 1
    header = 4 * (1 + ndim)
    if len(raw) < header or struct.unpack(">I", raw[:4])[0] != magic:
        raise DataError(f"{path.name}: not an IDX file with magic {magic}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = 1
    for d in dims:
        count *= d
    if len(raw) - header != count:
        raise DataError(f"{path.name}: header says {dims} ({count} bytes), payload has "
                        f"{len(raw) - header}")
    flat = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    if magic == IDX_LABELS_MAGIC:
        return flat.to(torch.int64)
    return flat.reshape(dims[0], 1, dims[1], dims[2])  # (N, 1, H, W)


def load_fashion_mnist(directory: Path) -> VisionData:
    """Build ``VisionData`` from a directory of the four verified Fashion-MNIST ``.gz`` files."""
    train = ImageSet(read_idx(directory / "train-images-idx3-ubyte.gz", IDX_IMAGES_MAGIC),
                     read_idx(directory / "train-labels-idx1-ubyte.gz", IDX_LABELS_MAGIC))
    test = ImageSet(read_idx(directory / "t10k-images-idx3-ubyte.gz", IDX_IMAGES_MAGIC),
                    read_idx(directory / "t10k-labels-idx1-ubyte.gz", IDX_LABELS_MAGIC))
    for name, split, n in (("train", train, 60000), ("test", test, 10000)):
        if tuple(split.x.shape) != (n, 1, 28, 28) or int(split.y.max()) != 9:
            raise DataError(f"fashion-mnist {name}: expected {n} x 1 x 28 x 28 with labels "
                            f"0..9, got {tuple(split.x.shape)}; re-fetch with `{FASHION_MANUAL}`")
    return VisionData("fashion-mnist", train, test, 10, *FASHION_STATS,
                      _fingerprint(FASHION_FILES.items()), "standard 60k/10k split")


def fashion_mnist_dir() -> Path:
    """The verified directory of the four ``.gz`` files (``$QBENCH_FASHION_MNIST_DIR``, else the
    cache, fetching the pinned Debian package on first use)."""
    if os.environ.get(FASHION_ENV):
        directory = Path(os.environ[FASHION_ENV])
        verify_deb_files(FASHION_DEB, directory, f"${FASHION_ENV}={directory}")
        return directory
    return fetch_deb_files(FASHION_DEB, cache_dir() / "datasets" / "fashion-mnist")


def _fingerprint(items: Any) -> str:
    """Short hex sha256 over sorted ``(name, checksum)`` pairs of verified source files."""
    h = hashlib.sha256()
    for name, digest in sorted(items):
        h.update(f"{name}:{digest}\n".encode())
    return h.hexdigest()[:16]


# --- paper scale: CIFAR and ImageFolder ---------------------------------------------------------


def _load_cifar(dataset_id: str, n_classes: int) -> VisionData:
    """CIFAR-10/100 through torchvision (``download=False``), converted to uint8 tensors."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR100 if n_classes == 100 else CIFAR10
    root = dataset_id.split(":", 1)[1]
    try:
        sets = [cls(root, train=t, download=False) for t in (True, False)]
    except RuntimeError as e:
        raise DataError(f"{dataset_id}: no verified {cls.base_folder}/ under {root}; fetch it once "
                        f"with torchvision.datasets.{cls.__name__}(root, download=True)") from e
    train, test = (ImageSet(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(),  # NHWC->NCHW
                            torch.tensor(s.targets, dtype=torch.int64)) for s in sets)
    checked = [(name, md5) for name, md5 in [*cls.train_list, *cls.test_list]]
    stats = CIFAR100_STATS if n_classes == 100 else CIFAR10_STATS
    note = f"{len(train)}/{len(test)} split of torchvision's {cls.base_folder}"
    return VisionData(dataset_id, train, test, n_classes, *stats, _fingerprint(checked), note)


def _load_imagefolder(dataset_id: str) -> VisionData:
    """An ImageNet-layout tree, decoded lazily to uint8 (resize shorter side, centre crop)."""
    from torchvision import datasets, transforms

    root, crop, resize = _folder_options(dataset_id, "dataset")
    tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop),
                             transforms.PILToTensor()])
    splits = {}
    for name in ("train", "val"):
        if not (Path(root) / name).is_dir():
            raise DataError(f"{dataset_id}: missing {Path(root) / name}; expected "
                            f"<root>/train/<class>/* and <root>/val/<class>/* (ImageNet layout)")
        splits[name] = datasets.ImageFolder(str(Path(root) / name), transform=tf)
    if splits["train"].classes != splits["val"].classes:
        raise DataError(f"{dataset_id}: train and val have different class folders")
    files = [(os.path.relpath(p, root), str(os.path.getsize(p)))
             for s in splits.values() for p, _ in s.samples]
    note = f"ImageFolder {len(splits['train'])}/{len(splits['val'])}, resize {resize} crop {crop}"
    train, test = ImageSet(dataset=splits["train"]), ImageSet(dataset=splits["val"])
    return VisionData(dataset_id, train, test, len(splits["train"].classes), *IMAGENET_STATS,
                      _fingerprint(files), note)


# --- batches -----------------------------------------------------------------------------------


def batches(split: ImageSet, batch_size: int, generator: torch.Generator | None = None,
            train: bool = False, mean: tuple[float, ...] = (0.0,), std: tuple[float, ...] = (1.0,),
            *, augment: bool = False, num_workers: int = 0) -> Iterator[Batch]:
    """Yield ``(images float (B, C, H, W) normalised, labels int64 (B,))`` over one pass.

    With ``train`` the order is a permutation drawn from ``generator`` (required then), and
    ``augment`` adds a random crop after 4-pixel zero padding plus a horizontal flip (the CIFAR
    recipe of He et al. 2016), drawn from the same generator, so a seed fixes the whole stream.
    Without ``train`` the order is the split's own and nothing is random. Lazy splits are decoded
    by a ``DataLoader`` with ``num_workers`` (augmentation still happens here, seeded).
    """
    if (train or augment) and generator is None:
        raise ConfigError("batches: train=True or augment=True needs a torch.Generator")
    n = len(split)
    order = torch.randperm(n, generator=generator) if train else torch.arange(n)
    index_batches = list(torch.split(order, batch_size))
    m = torch.tensor(mean).view(1, -1, 1, 1)  # (1, C, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    for xb, yb in _uint8_batches(split, index_batches, num_workers):
        if augment:
            xb = pad_crop_flip(xb, generator)
        yield xb.float().div_(255).sub_(m).div_(s), yb


def _uint8_batches(split: ImageSet, index_batches: list[torch.Tensor],
                   num_workers: int) -> Iterator[Batch]:
    if split.in_memory:
        for idx in index_batches:
            yield split.x[idx], split.y[idx]
        return
    sampler = [idx.tolist() for idx in index_batches]
    loader = DataLoader(split.dataset, batch_sampler=sampler, num_workers=num_workers)
    for xb, yb in loader:
        yield xb, torch.as_tensor(yb, dtype=torch.int64)


def pad_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random ``pad``-pixel-padded crop plus horizontal flip of a uint8 batch (B, C, H, W)."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # (B, C, H + 2p, W + 2p), zeros
    off = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator)  # (B, 2): row, col offset
    rows = (off[:, :1] + torch.arange(h)).view(b, 1, h, 1)  # (B, 1, H, 1)
    cols = (off[:, 1:] + torch.arange(w)).view(b, 1, 1, w)  # (B, 1, 1, W)
    bi = torch.arange(b).view(b, 1, 1, 1)
    ci = torch.arange(c).view(1, c, 1, 1)
    out = padded[bi, ci, rows, cols]  # (B, C, H, W)
    flip = torch.rand(b, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out
