"""Datasets for calibration and evaluation, by name, each with train / calibration / test splits.

Splits are fixed (seeded, independent of the run's seed) so that calibration never overlaps test and
results are comparable across runs; only ``synthetic`` data depends on ``seed``. Which images form each split
and how they are preprocessed: :func:`describe_datasets` (``photosim data``), the indices: :func:`split_indices`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from photosim.errors import PhotosimError

SPLITS = ("train", "calibration", "test")
SPLIT_SEED = 0
CALIBRATION_SIZE = 1000
DIGITS_TEST_SIZE = 360
DIGITS_CALIBRATION_SIZE = 180
SYNTHETIC_SIZE = 1024
SYNTHETIC_CLASSES = 10
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetRequest:
    """What a loader gets: the split plus every option of ``load_dataset``."""

    split: str
    path: str | None
    root: Path
    download: bool
    input_shape: tuple[int, ...] | None
    seed: int


@dataclass(frozen=True)
class _Entry:
    loader: Callable[[DatasetRequest], Dataset]
    takes_path: bool


_REGISTRY: dict[str, _Entry] = {}


def register_dataset(
    name: str, takes_path: bool = False
) -> Callable[[Callable[[DatasetRequest], Dataset]], Callable[[DatasetRequest], Dataset]]:
    """Decorator adding a loader under ``name`` (``name:PATH`` in specs when ``takes_path``)."""
    if name in _REGISTRY:
        raise ValueError(f"dataset {name!r} is registered twice")

    def decorator(loader: Callable[[DatasetRequest], Dataset]) -> Callable[[DatasetRequest], Dataset]:
        _REGISTRY[name] = _Entry(loader, takes_path)
        return loader

    return decorator


def dataset_names() -> list[str]:
    """Registered dataset names, sorted (``imagefolder`` is used as ``imagefolder:PATH``)."""
    return sorted(_REGISTRY)


def load_dataset(
    name: str,
    split: str,
    *,
    root: str | Path | None = None,
    download: bool = False,
    limit: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
) -> Dataset:
    """One split of a dataset whose items are ``(x: float32 tensor (C, H, W), y: int)``.

    ``limit`` keeps the first N items; ``root`` defaults to ``$PHOTOSIM_DATA`` or ``~/.cache/photosim/data``.
    """
    if split not in SPLITS:
        raise PhotosimError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    if limit is not None and limit <= 0:
        raise PhotosimError(f"the sample limit must be a positive integer, got {limit}; drop it to use all.")
    base, sep, path = name.partition(":")
    entry = _REGISTRY.get(base)
    if entry is None or (sep and not entry.takes_path):
        raise PhotosimError(f"unknown dataset {name!r}; use one of {', '.join(_usage_names())}.")
    if entry.takes_path and not path:
        raise PhotosimError(f"dataset {name!r} needs a folder: write {base}:PATH.")
    request = DatasetRequest(split, path or None, _data_root(root), download, input_shape, seed)
    dataset = entry.loader(request)
    if limit is None or limit >= len(dataset):
        return dataset
    if isinstance(dataset, Subset):
        return Subset(dataset.dataset, list(dataset.indices[:limit]))
    return Subset(dataset, range(limit))


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A single-process DataLoader; shuffling draws from a generator seeded by ``seed``."""
    if batch_size <= 0:
        raise PhotosimError(f"batch size must be a positive integer, got {batch_size}.")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0)


def _usage_names() -> list[str]:
    """Names as written in a spec (``imagefolder:PATH``)."""
    return [f"{name}:PATH" if _REGISTRY[name].takes_path else name for name in dataset_names()]


def _data_root(root: str | Path | None) -> Path:
    """The explicit root, else ``$PHOTOSIM_DATA``, else ``~/.cache/photosim/data``."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get("PHOTOSIM_DATA") or Path.home() / ".cache" / "photosim" / "data").expanduser()


def _permutation(n: int) -> np.ndarray:
    """The fixed permutation every split is cut from (same on every run and machine)."""
    return np.random.default_rng(SPLIT_SEED).permutation(n)


class _IntLabelTensorDataset(TensorDataset):
    """A TensorDataset of (x, y) pairs that returns labels as Python ints, like torchvision datasets."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = super().__getitem__(index)
        return x, int(y)


@register_dataset("digits")
def _digits(request: DatasetRequest) -> Dataset:
    """sklearn's bundled 8x8 digits (1797 images), pixels scaled to [0, 1]; test 360, calibration 180."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    full = _IntLabelTensorDataset(images, torch.tensor(digits.target, dtype=torch.int64))
    order = _permutation(len(full)).tolist()
    cut = {
        "test": order[:DIGITS_TEST_SIZE],
        "calibration": order[DIGITS_TEST_SIZE : DIGITS_TEST_SIZE + DIGITS_CALIBRATION_SIZE],
        "train": order[DIGITS_TEST_SIZE + DIGITS_CALIBRATION_SIZE :],
    }
    return Subset(full, cut[request.split])


@dataclass(frozen=True)
class _TorchvisionSpec:
    cls_name: str
    folder: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


_TORCHVISION_DATASETS = {
    "mnist": _TorchvisionSpec("MNIST", "MNIST/raw", (0.1307,), (0.3081,)),
    "fashion-mnist": _TorchvisionSpec("FashionMNIST", "FashionMNIST/raw", (0.2860,), (0.3530,)),
    "cifar10": _TorchvisionSpec(
        "CIFAR10", "cifar-10-batches-py", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
}


def _split_off_calibration(train: Dataset, split: str) -> Subset:
    """Calibration: a fixed random 1000 images of a training set; train: the rest."""
    order = _permutation(len(train)).tolist()
    return Subset(train, order[:CALIBRATION_SIZE] if split == "calibration" else order[CALIBRATION_SIZE:])


def _load_torchvision(name: str, request: DatasetRequest) -> Dataset:
    """An official train/test set; calibration is a fixed 1000-image subset of train, train the rest."""
    from torchvision import datasets, transforms

    spec = _TORCHVISION_DATASETS[name]
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])
    train = request.split != "test"
    try:
        dataset = getattr(datasets, spec.cls_name)(
            str(request.root), train=train, download=request.download, transform=transform
        )
    except (RuntimeError, OSError) as exc:
        raise PhotosimError(
            f"dataset {name!r} not found or unreadable under {str(request.root / spec.folder)!r} ({exc}); "
            "pass --download to fetch it (needs internet), or --data-root DIR pointing at a folder that "
            f"already holds {spec.folder}/ (the default root is $PHOTOSIM_DATA or ~/.cache/photosim/data)."
        ) from exc
    if not train:
        return dataset
    return _split_off_calibration(dataset, request.split)


for _name in _TORCHVISION_DATASETS:
    register_dataset(_name)(partial(_load_torchvision, _name))


@register_dataset("imagefolder", takes_path=True)
def _imagefolder(request: DatasetRequest) -> Dataset:
    """Class-per-subfolder images: PATH/train + PATH/val (or test), else a fixed 80/10/10 split of PATH."""
    folder = Path(request.path or "").expanduser()
    if not folder.is_dir():
        raise PhotosimError(
            f"image folder {str(folder)!r} does not exist; give imagefolder:PATH with one subfolder of "
            "images per class (or train/ and val/ subfolders laid out that way)."
        )
    transform = _imagefolder_transform(request.input_shape)
    held_out = next((folder / sub for sub in ("val", "test") if (folder / sub).is_dir()), None)
    if (folder / "train").is_dir() and held_out is not None:
        if request.split == "test":
            return _shuffled(_image_folder(held_out, transform))
        return _split_off_calibration(_image_folder(folder / "train", transform), request.split)
    full = _image_folder(folder, transform)
    order = _permutation(len(full)).tolist()
    tenth = len(full) // 10
    cut = {"test": order[:tenth], "calibration": order[tenth : 2 * tenth], "train": order[2 * tenth :]}
    return Subset(full, cut[request.split])


def _imagefolder_transform(input_shape: tuple[int, ...] | None) -> Callable:
    """Resize (shorter side) and center-crop to the model's H x W, then ImageNet normalization."""
    from torchvision import transforms

    steps: list[Callable] = []
    if input_shape is not None:
        if len(input_shape) != 3 or input_shape[0] != 3:
            raise PhotosimError(
                f"imagefolder gives RGB images (3, H, W) but the model expects {tuple(input_shape)}; use a "
                "model with 3 input channels or another dataset."
            )
        steps += [transforms.Resize(min(input_shape[1:])), transforms.CenterCrop(tuple(input_shape[1:]))]
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


def _image_folder(folder: Path, transform: Callable) -> Dataset:
    """torchvision's ImageFolder, with a PhotosimError when the folder holds no class images."""
    from torchvision import datasets

    try:
        return datasets.ImageFolder(str(folder), transform=transform)
    except OSError as exc:
        raise PhotosimError(
            f"no usable images in {str(folder)!r} ({exc}); it needs one subfolder per class holding "
            ".jpg/.png/... files."
        ) from exc


def _shuffled(dataset: Dataset) -> Subset:
    """The dataset in a fixed random order, so that a ``limit`` sees every class, not just the first."""
    return Subset(dataset, _permutation(len(dataset)).tolist())


@register_dataset("synthetic")
def _synthetic(request: DatasetRequest) -> Dataset:
    """Standard-normal inputs of the model's shape and uniform labels; reproducible from (seed, split)."""
    if request.input_shape is None:
        raise PhotosimError(
            "--data synthetic needs a model with a known input shape; use a built-in or torchvision model, "
            "or give the file model an input_shape attribute such as (3, 32, 32)."
        )
    if request.seed < 0:
        raise PhotosimError(f"the seed must be a non-negative integer, got {request.seed}.")
    state = np.random.SeedSequence([request.seed, SPLITS.index(request.split)]).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(state))
    x = torch.randn((SYNTHETIC_SIZE, *request.input_shape), generator=generator)
    y = torch.randint(0, SYNTHETIC_CLASSES, (SYNTHETIC_SIZE,), generator=generator)
    return _IntLabelTensorDataset(x, y)


def describe_datasets() -> list[dict[str, str]]:
    """Which images form each split of each built-in dataset, and their preprocessing: one row per (dataset,
    split) with ``dataset``, ``split``, ``images`` (the count, or how it is found) and ``which`` (how the split is
    cut), and one ``preprocessing`` text per dataset. ``photosim data`` prints it; README's data section says
    the same. The exact indices: :func:`split_indices`."""
    perm = f"numpy.random.default_rng({SPLIT_SEED}).permutation(N)"
    digits_pre = "pixel values 0..16 divided by 16 (range [0, 1]), shape 1x8x8, no mean/std normalization"
    rows = [
        ("digits", "test", str(DIGITS_TEST_SIZE), f"sklearn.datasets.load_digits() (N = 1797, bundled: no download) "
         f"in the order of {perm}: positions 0..{DIGITS_TEST_SIZE - 1}", digits_pre),
        ("digits", "calibration", str(DIGITS_CALIBRATION_SIZE), f"the same order, positions {DIGITS_TEST_SIZE}.."
         f"{DIGITS_TEST_SIZE + DIGITS_CALIBRATION_SIZE - 1}", digits_pre),
        ("digits", "train", str(1797 - DIGITS_TEST_SIZE - DIGITS_CALIBRATION_SIZE), "the same order, positions "
         f"{DIGITS_TEST_SIZE + DIGITS_CALIBRATION_SIZE}..1796 (the built-in models were trained on these only)",
         digits_pre),
    ]
    sizes = {"mnist": (60_000, 10_000), "fashion-mnist": (60_000, 10_000), "cifar10": (50_000, 10_000)}
    for name, spec in _TORCHVISION_DATASETS.items():
        train_n, test_n = sizes[name]
        pre = (f"torchvision ToTensor (range [0, 1]) then Normalize(mean={spec.mean}, std={spec.std}); "
               f"{'1x28x28' if name != 'cifar10' else '3x32x32'}, no resizing")
        rows += [
            (name, "test", f"{test_n:,}", f"the official {spec.cls_name} test set, in its file order", pre),
            (name, "calibration", f"{CALIBRATION_SIZE:,}", f"the official train set (N = {train_n:,}) in the order "
             f"of {perm}: positions 0..{CALIBRATION_SIZE - 1}", pre),
            (name, "train", f"{train_n - CALIBRATION_SIZE:,}", "the rest of the official train set", pre),
        ]
    folder_pre = ("resize the shorter side to the model's min(H, W), center-crop to H x W, ToTensor, ImageNet "
                  f"Normalize(mean={IMAGENET_MEAN}, std={IMAGENET_STD}); RGB only")
    rows += [
        ("imagefolder:PATH", "test", "N/10 or |val|", f"with PATH/train and PATH/val (or test): all of val/ in the "
         f"order of {perm}; otherwise the first N // 10 of PATH's N images in that order", folder_pre),
        ("imagefolder:PATH", "calibration", "N/10 or 1,000", f"with train/: the first {CALIBRATION_SIZE:,} of "
         "train/ in that order; otherwise the next N // 10 of PATH", folder_pre),
        ("imagefolder:PATH", "train", "the rest", "the remaining images of train/ (or of PATH)", folder_pre),
        ("synthetic", "each", f"{SYNTHETIC_SIZE:,}", "standard-normal inputs of the model's shape with uniform "
         f"random labels 0..{SYNTHETIC_CLASSES - 1}, drawn from (seed, split): the labels are random, so any "
         "accuracy is chance level and meaningless", "none"),
    ]
    keys = ("dataset", "split", "images", "which", "preprocessing")
    return [dict(zip(keys, row)) for row in rows]


def split_indices(name: str, split: str, *, root: str | Path | None = None, download: bool = False) -> list[int]:
    """The indices, into the dataset's source set, of the images that form ``split`` (in the split's order):
    for ``digits`` the rows of ``sklearn.datasets.load_digits()``, for mnist / fashion-mnist / cifar10 the
    official train set (calibration, train) or test set (test), for ``imagefolder`` the images as torchvision's
    ImageFolder lists them. Use them to keep your own training images out of photosim's test split."""
    if name.partition(":")[0] == "synthetic":
        raise PhotosimError("synthetic data has no source images: it is drawn at random (with random labels).")
    dataset = load_dataset(name, split, root=root, download=download, input_shape=None)
    if isinstance(dataset, Subset):
        return [int(i) for i in dataset.indices]
    return list(range(len(dataset)))


CALIBRATION_BATCH = 128


def calibration_batches(data: Any, samples: int) -> list[torch.Tensor]:
    """Up to ``samples`` inputs as a list of batches, from a tensor, Dataset, DataLoader or iterable."""
    if isinstance(data, torch.Tensor):
        return list(data[:samples].split(CALIBRATION_BATCH))
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = torch.utils.data.DataLoader(data, batch_size=CALIBRATION_BATCH)
    batches, seen = [], 0
    for item in data:
        x = item[0] if isinstance(item, (tuple, list)) else item
        batches.append(x[: samples - seen])
        seen += len(batches[-1])
        if seen >= samples:
            break
    if not batches:
        raise PhotosimError("the calibration data is empty; give at least one input batch.")
    return batches
