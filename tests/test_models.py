"""Model loading: built-ins and their shipped weights, torchvision specs, user files, weights files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from photosim.errors import PhotosimError
from photosim.frontend.data import load_dataset, make_loader
from photosim.frontend.models import ModelInfo, list_models, load_model, register_model
from photosim.ir.format import file_sha256

BUILTINS = list_models()
USER_MODEL = """
import torch
from torch import nn


class Net(nn.Module):
    input_shape = (1, 4, 4)

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(torch.flatten(x, 1))


def make_net():
    return Net()


def not_a_module():
    return 42
"""


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_model.py"
    path.write_text(USER_MODEL)
    return path


@pytest.mark.parametrize("info", BUILTINS, ids=lambda info: info.name)
def test_builtin_reaches_recorded_accuracy(info: ModelInfo) -> None:
    loaded = load_model(info.name)
    assert not loaded.module.training
    assert loaded.weights == "builtin"
    assert loaded.weights_sha256 == file_sha256(info.weights_path)
    assert loaded.input_shape == info.input_shape and loaded.num_classes == info.num_classes
    x, y = next(iter(make_loader(load_dataset("digits", "test"), batch_size=10_000)))
    with torch.no_grad():
        accuracy = (loaded.module(x).argmax(dim=1) == y).sum().item() / len(y)
    assert accuracy == pytest.approx(info.float_accuracy, abs=1e-9)
    assert accuracy >= 0.95


@pytest.mark.parametrize("info", BUILTINS, ids=lambda info: info.name)
def test_builtin_is_fx_traceable(info: ModelInfo) -> None:
    module = load_model(info.name).module
    traced = torch.fx.symbolic_trace(module)
    x = torch.rand(3, *info.input_shape)
    torch.testing.assert_close(traced(x), module(x))
    assert info.num_parameters() > 0


def test_register_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="digits-cnn"):
        register_model("digits-cnn", (1, 8, 8), 10, 0.5, "dup")


def test_builtin_rejects_other_class_count() -> None:
    with pytest.raises(PhotosimError, match="10 classes"):
        load_model("digits-cnn", num_classes=5)


def test_torchvision_cifar_stem() -> None:
    loaded = load_model("torchvision:resnet18", num_classes=10, cifar_stem=True)
    assert loaded.module.conv1.kernel_size == (3, 3) and loaded.module.conv1.stride == (1, 1)
    assert isinstance(loaded.module.maxpool, nn.Identity)
    assert loaded.input_shape == (3, 32, 32) and loaded.num_classes == 10
    with torch.no_grad():
        assert loaded.module(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_torchvision_unknown_name_suggests() -> None:
    with pytest.raises(PhotosimError, match="resnet18"):
        load_model("torchvision:resnet19")


def test_cifar_stem_needs_resnet() -> None:
    with pytest.raises(PhotosimError, match="conv1"):
        load_model("torchvision:mobilenet_v2", cifar_stem=True)


def test_unknown_spec_lists_forms() -> None:
    with pytest.raises(PhotosimError, match="digits-cnn.*torchvision:NAME.*file.py:NAME"):
        load_model("lenet")


@pytest.mark.parametrize("name", ["Net", "make_net"])
def test_user_file_class_or_factory(user_file: Path, name: str) -> None:
    loaded = load_model(f"{user_file}:{name}")
    assert isinstance(loaded.module.fc, nn.Linear) and not loaded.module.training
    assert loaded.input_shape == (1, 4, 4)


@pytest.mark.parametrize(
    ("attr", "message"), [("not_a_module", "not a torch.nn.Module"), ("missing", "defines no 'missing'")]
)
def test_user_file_bad_attribute(user_file: Path, attr: str, message: str) -> None:
    with pytest.raises(PhotosimError, match=message):
        load_model(f"{user_file}:{attr}")


def test_user_file_missing_or_broken(tmp_path: Path) -> None:
    with pytest.raises(PhotosimError, match="does not exist"):
        load_model(f"{tmp_path / 'nope.py'}:Net")
    broken = tmp_path / "broken.py"
    broken.write_text("raise ImportError('no such thing')\n")
    with pytest.raises(PhotosimError, match="no such thing"):
        load_model(f"{broken}:Net")


def test_weights_missing_and_unexpected_keys(tmp_path: Path) -> None:
    state = load_model("digits-cnn").module.state_dict()
    state["extra.weight"] = state.pop("fc2.weight")
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(PhotosimError, match=r"missing keys \[fc2.weight\].*unexpected keys \[extra.weight\]"):
        load_model("digits-cnn", weights=path)


def test_weights_long_key_lists_truncated(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save(load_model("digits-resnet").module.state_dict(), path)
    with pytest.raises(PhotosimError, match=r"and \d+ more"):
        load_model("digits-cnn", weights=path)


def test_weights_shape_mismatch(tmp_path: Path) -> None:
    state = load_model("digits-cnn").module.state_dict()
    state["fc2.bias"] = torch.zeros(7)
    path = tmp_path / "shape.pt"
    torch.save({"model": state}, path)
    with pytest.raises(PhotosimError, match="size mismatch for fc2.bias"):
        load_model("digits-cnn", weights=path)


def test_weights_checkpoint_dict_and_data_parallel_prefix(tmp_path: Path) -> None:
    reference = load_model("digits-cnn").module
    state = {f"module.{key}": value for key, value in reference.state_dict().items()}
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    loaded = load_model("digits-cnn", weights=path)
    assert loaded.weights == str(path) and loaded.weights_sha256 == file_sha256(path)
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(loaded.module(x), reference(x))


def test_weights_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(PhotosimError, match="cannot read weights file"):
        load_model("digits-cnn", weights=path)
    with pytest.raises(PhotosimError, match="does not exist"):
        load_model("digits-cnn", weights=tmp_path / "absent.pt")
