"""Datasets: digits splits, limits, synthetic data, torchvision and image-folder errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from photosim.errors import PhotosimError
from photosim.frontend.data import SPLITS, dataset_names, load_dataset, make_loader

DIGITS_SIZES = {"train": 1257, "calibration": 180, "test": 360}


@pytest.mark.parametrize("split", SPLITS)
def test_digits_split_sizes_and_items(split: str) -> None:
    dataset = load_dataset("digits", split)
    assert len(dataset) == DIGITS_SIZES[split]
    x, y = dataset[0]
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8)
    assert isinstance(y, int) and 0 <= y < 10
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_digits_splits_disjoint_and_deterministic() -> None:
    indices = {split: load_dataset("digits", split).indices for split in SPLITS}
    sets = {split: set(idx) for split, idx in indices.items()}
    assert sum(len(s) for s in sets.values()) == 1797
    assert len(set.union(*sets.values())) == 1797
    assert indices == {split: load_dataset("digits", split, seed=7).indices for split in SPLITS}


def test_limit_takes_first_items() -> None:
    full = load_dataset("digits", "test")
    limited = load_dataset("digits", "test", limit=10)
    assert len(limited) == 10
    assert all(torch.equal(limited[i][0], full[i][0]) for i in range(10))
    assert len(load_dataset("digits", "test", limit=10_000)) == 360
    with pytest.raises(PhotosimError, match="limit"):
        load_dataset("digits", "test", limit=0)


def test_synthetic_reproducible_and_per_split() -> None:
    a = load_dataset("synthetic", "calibration", input_shape=(3, 4, 4), seed=1)
    b = load_dataset("synthetic", "calibration", input_shape=(3, 4, 4), seed=1)
    assert len(a) == 1024 and a[0][0].shape == (3, 4, 4) and isinstance(a[0][1], int)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    other_split = load_dataset("synthetic", "test", input_shape=(3, 4, 4), seed=1)
    other_seed = load_dataset("synthetic", "calibration", input_shape=(3, 4, 4), seed=2)
    assert not torch.equal(a.tensors[0], other_split.tensors[0])
    assert not torch.equal(a.tensors[0], other_seed.tensors[0])
    assert set(a.tensors[1].tolist()) <= set(range(10))


def test_synthetic_needs_input_shape() -> None:
    with pytest.raises(PhotosimError, match="known input shape"):
        load_dataset("synthetic", "test")


def test_mnist_missing_files_says_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(PhotosimError, match="--download") as info:
        load_dataset("mnist", "test", root=tmp_path)
    assert str(tmp_path) in str(info.value) and "--data-root" in str(info.value)


def test_data_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHOTOSIM_DATA", str(tmp_path))
    with pytest.raises(PhotosimError, match=str(tmp_path)):
        load_dataset("cifar10", "calibration")


@pytest.mark.parametrize(
    ("name", "split", "message"),
    [
        ("digits", "val", "unknown split"),
        ("emnist", "test", "unknown dataset.*imagefolder:PATH"),
        ("imagefolder", "test", "needs a folder"),
        ("digits:x", "test", "unknown dataset"),
        ("imagefolder:/no/such/folder", "test", "does not exist"),
    ],
)
def test_bad_requests(name: str, split: str, message: str) -> None:
    with pytest.raises(PhotosimError, match=message):
        load_dataset(name, split)


def test_imagefolder_single_folder_split(tmp_path: Path) -> None:
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(10):
            Image.new("RGB", (12, 10), color=(i * 20, 0, 0)).save(tmp_path / label / f"{i}.png")
    sizes = {
        split: len(load_dataset(f"imagefolder:{tmp_path}", split, input_shape=(3, 8, 8))) for split in SPLITS
    }
    assert sizes == {"train": 16, "calibration": 2, "test": 2}
    x, y = load_dataset(f"imagefolder:{tmp_path}", "test", input_shape=(3, 8, 8))[0]
    assert x.shape == (3, 8, 8) and y in (0, 1)


def test_dataset_names_and_loader() -> None:
    assert {"digits", "mnist", "fashion-mnist", "cifar10", "imagefolder", "synthetic"} <= set(dataset_names())
    dataset = load_dataset("digits", "calibration")
    first = next(iter(make_loader(dataset, batch_size=64, shuffle=True, seed=3)))[1]
    assert torch.equal(first, next(iter(make_loader(dataset, batch_size=64, shuffle=True, seed=3)))[1])
    assert first.shape == (64,)
    with pytest.raises(PhotosimError, match="batch size"):
        make_loader(load_dataset("digits", "test"), batch_size=0)
