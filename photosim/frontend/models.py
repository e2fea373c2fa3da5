"""Model loading: built-in digits models, torchvision architectures and user files, plus weights.

A model spec is a built-in name (``digits-cnn``), ``torchvision:NAME``, ``hf:CLASS`` (a transformers model class
from its default config, photosim.frontend.hf) or ``path/to/file.py:NAME``;
every loaded module comes back in eval mode with what is known about its input shape and provenance.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from photosim._files import require_file
from photosim._imports import call_object
from photosim.errors import PhotosimError
from photosim.frontend.hf import build as build_hf
from photosim.ir.format import file_sha256

WEIGHTS_DIR = Path(__file__).with_name("weights")
MAX_KEYS_SHOWN = 10


@dataclass(frozen=True)
class ModelInfo:
    """A built-in model: its factory and the facts ``photosim models`` shows."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    float_accuracy: float
    description: str
    factory: Callable[[], nn.Module] = field(repr=False, compare=False)

    @property
    def weights_path(self) -> Path:
        """The shipped ``state_dict`` file (package data)."""
        return WEIGHTS_DIR / f"{self.name}.pt"

    def num_parameters(self) -> int:
        """Number of trainable and frozen parameters (buffers excluded)."""
        return sum(p.numel() for p in self.factory().parameters())


@dataclass
class LoadedModel:
    """A module ready for quantization, with its spec and weights provenance."""

    module: nn.Module
    spec: str
    input_shape: tuple[int, ...] | None
    num_classes: int | None
    weights: str | None
    weights_sha256: str | None
    info: ModelInfo | None


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    name: str, input_shape: tuple[int, int, int], num_classes: int, float_accuracy: float, description: str
) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Class/factory decorator adding a built-in model to the registry (names are unique)."""
    if name in _REGISTRY:
        raise ValueError(f"built-in model {name!r} is registered twice")
    if not 0.0 <= float_accuracy <= 1.0:
        raise ValueError(f"float_accuracy of {name!r} must lie in [0, 1], got {float_accuracy}")

    def decorator(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        _REGISTRY[name] = ModelInfo(name, input_shape, num_classes, float_accuracy, description, factory)
        return factory

    return decorator


def list_models() -> list[ModelInfo]:
    """All built-in models, sorted by name."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


@register_model(
    "digits-cnn",
    input_shape=(1, 8, 8),
    num_classes=10,
    float_accuracy=0.9833333333333333,
    description="LeNet-style CNN (2 conv + 2 linear) for the 8x8 sklearn digits",
)
class DigitsCNN(nn.Module):
    """Two 3x3 conv/ReLU/max-pool stages and a two-layer classifier for 1x8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc2(self.relu3(self.fc1(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, a residual add (1x1 conv+BN shortcut when resizing), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


@register_model(
    "digits-resnet",
    input_shape=(1, 8, 8),
    num_classes=10,
    float_accuracy=0.9944444444444445,
    description="small ResNet (stem + 3 basic blocks, BatchNorm, residual adds) for the 8x8 sklearn digits",
)
class DigitsResNet(nn.Module):
    """Conv+BN stem, three basic blocks (16->16->32->32, one stride-2), global average pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, stride=2))
        self.layer3 = nn.Sequential(BasicBlock(32, 32))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class DepthwiseSeparable(nn.Module):
    """MobileNet block: depthwise 3x3 conv+BN+ReLU (optionally strided), then pointwise 1x1 conv+BN+ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels,
                                   bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.depthwise(x)))
        return self.relu2(self.bn2(self.pointwise(x)))


@register_model(
    "digits-mobilenet",
    input_shape=(1, 8, 8),
    num_classes=10,
    float_accuracy=0.9722222222222222,
    description="MobileNet-style CNN (1-channel stem, 3 depthwise-separable blocks) for the 8x8 sklearn digits",
)
class DigitsMobileNet(nn.Module):
    """Conv+BN stem, three depthwise-separable blocks (16->32->64->64, one stride-2), global average pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.block1 = DepthwiseSeparable(16, 32)
        self.block2 = DepthwiseSeparable(32, 64, stride=2)
        self.block3 = DepthwiseSeparable(64, 64)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.block3(self.block2(self.block1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excite: global average, a SiLU bottleneck of 1x1 convs, a hard-sigmoid gate multiplying x."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.act = nn.SiLU()
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean([2, 3], keepdim=True)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


class MBConv(nn.Module):
    """MobileNetV3 / EfficientNet block: 1x1 expand, depthwise 3x3 (optionally strided), squeeze-excite, 1x1
    project (each conv with BN; hardswish after the first two), residual add when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, expand: int, stride: int = 1) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.expand = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                    nn.Hardswish())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.Hardswish())
        self.se = SqueezeExcite(hidden, max(4, hidden // 4))
        self.project = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


@register_model(
    "digits-mbconv",
    input_shape=(1, 8, 8),
    num_classes=10,
    float_accuracy=0.9888888888888889,
    description="mobile CNN of today's ops: an Inception-style concat stem (SiLU), MBConv blocks with hardswish "
                "and squeeze-excite, mean pooling, for the 8x8 sklearn digits",
)
class DigitsMBConv(nn.Module):
    """Two stem branches (1x1 and 3x3 conv, BN, SiLU) concatenated, three MBConv blocks (16->24 strided,
    24->24 residual, 24->32), a channel mean and a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.branch1 = nn.Sequential(nn.Conv2d(1, 8, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        self.branch3 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        self.block1 = MBConv(16, 24, expand=2, stride=2)
        self.block2 = MBConv(24, 24, expand=2)
        self.block3 = MBConv(24, 32, expand=2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.branch1(x), self.branch3(x)], dim=1)
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(x.mean([2, 3]))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: LayerNorm, multi-head self-attention, residual; LayerNorm, GELU MLP,
    residual."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


@register_model(
    "digits-vit",
    input_shape=(1, 8, 8),
    num_classes=10,
    float_accuracy=0.9638888888888889,
    description="vision transformer: 2x2 patch embedding, class token, position embedding, 2 pre-norm blocks of "
                "4-head self-attention and a GELU MLP, for the 8x8 sklearn digits",
)
class DigitsViT(nn.Module):
    """16 patches of 2x2 embedded to 32 channels (a strided conv), a class token and learned position
    embeddings, two pre-norm encoder blocks, a final LayerNorm and a linear head on the class token."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, 2, stride=2)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, 2 * dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)  # (N, 16, dim) patch tokens
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        return self.head(self.norm(self.blocks(x))[:, 0])


def load_model(
    spec: str, weights: str | Path | None = None, num_classes: int | None = None, cifar_stem: bool = False
) -> LoadedModel:
    """Build the model named by ``spec``, load ``weights`` (a state_dict file) if given, set eval mode.

    ``num_classes`` and ``cifar_stem`` shape ``torchvision:`` models; a built-in accepts only its own
    class count.
    """
    if cifar_stem and not spec.startswith("torchvision:"):
        raise PhotosimError(
            f"--cifar-stem only applies to torchvision: models, not to {spec!r}; drop the flag or use a "
            "torchvision ResNet such as torchvision:resnet18."
        )
    if num_classes is not None and num_classes < 1:
        raise PhotosimError(f"--num-classes must be a positive integer, got {num_classes}.")
    if spec in _REGISTRY:
        loaded = _load_builtin(_REGISTRY[spec], num_classes, shipped_weights=weights is None)
    elif spec.startswith("torchvision:"):
        loaded = _load_torchvision(spec, num_classes, cifar_stem)
    elif spec.startswith("hf:"):
        module, input_shape = build_hf(spec.removeprefix("hf:"), num_classes)
        loaded = LoadedModel(module=module, spec=spec, input_shape=input_shape, num_classes=num_classes, weights=None,
                             weights_sha256=None, info=None)
    elif ".py" in spec:
        loaded = _load_user_file(spec, num_classes)
    else:
        raise PhotosimError(
            f"unknown model {spec!r}; use a built-in ({', '.join(sorted(_REGISTRY))}), "
            "torchvision:NAME (e.g. torchvision:resnet18), hf:CLASS (e.g. hf:ViTForImageClassification) or "
            "path/to/file.py:NAME (a class or factory "
            "returning an nn.Module); `photosim models` lists the built-ins."
        )
    if weights is not None:
        loaded.weights = str(weights)
        loaded.weights_sha256 = load_weights(loaded.module, weights)
    loaded.module.eval()
    return loaded


def load_weights(module: nn.Module, path: str | Path) -> str:
    """Load a state_dict (or a checkpoint holding one) from ``path`` into ``module``; return its sha256.

    Keys and shapes must match exactly: a half-loaded model would silently give meaningless accuracies.
    """
    path = Path(path)
    require_file(path, "weights file", "check the --weights path")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PhotosimError(
            f"cannot read weights file {str(path)!r} ({type(exc).__name__}: {exc}); it must be written by "
            "torch.save(model.state_dict(), path) or be a checkpoint dict holding one under 'state_dict' "
            "or 'model' (plain tensors, loadable with weights_only=True)."
        ) from exc
    state_dict = _strip_data_parallel_prefix(_extract_state_dict(checkpoint, path))
    expected = module.state_dict().keys()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        mismatch = ", ".join(f"{kind} keys {_short_list(keys)}" for kind, keys in
                             (("missing", missing), ("unexpected", unexpected)) if keys)
        raise PhotosimError(
            f"weights file {str(path)!r} does not match the model: {mismatch}; check that it was saved from the "
            "same architecture (and --num-classes / --cifar-stem)."
        )
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise PhotosimError(
            f"weights file {str(path)!r} does not fit the model ({' '.join(str(exc).split())}); check that "
            "it was saved from the same architecture (and --num-classes / --cifar-stem)."
        ) from exc
    return file_sha256(path)


def _extract_state_dict(checkpoint: Any, path: Path) -> Mapping[str, torch.Tensor]:
    """The state_dict itself, or the one under a checkpoint's ``state_dict`` / ``model`` key."""
    if isinstance(checkpoint, Mapping):
        if all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
            return checkpoint
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), Mapping):
                return checkpoint[key]
    raise PhotosimError(
        f"weights file {str(path)!r} holds a {type(checkpoint).__name__}, not a state_dict; save it with "
        "torch.save(model.state_dict(), path) or as a dict with the state_dict under 'state_dict' or 'model'."
    )


def _strip_data_parallel_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that (Distributed)DataParallel adds, when every key carries it."""
    prefix = "module."
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix) :]: value for key, value in state_dict.items()}
    return dict(state_dict)


def _short_list(keys: list[str]) -> str:
    """Keys as a readable list, truncated after MAX_KEYS_SHOWN with a count of the rest."""
    if len(keys) <= MAX_KEYS_SHOWN:
        return "[" + ", ".join(keys) + "]"
    return "[" + ", ".join(keys[:MAX_KEYS_SHOWN]) + f", ... and {len(keys) - MAX_KEYS_SHOWN} more]"


def _load_builtin(info: ModelInfo, num_classes: int | None, shipped_weights: bool) -> LoadedModel:
    """A built-in model, with its shipped weights unless the caller loads its own."""
    if num_classes is not None and num_classes != info.num_classes:
        raise PhotosimError(
            f"built-in model {info.name!r} has {info.num_classes} classes, not {num_classes}; drop "
            "--num-classes or use a torchvision: or file model."
        )
    module = info.factory()
    if shipped_weights:
        module.load_state_dict(torch.load(info.weights_path, map_location="cpu", weights_only=True))
    return LoadedModel(
        module=module,
        spec=info.name,
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        weights="builtin" if shipped_weights else None,
        weights_sha256=file_sha256(info.weights_path) if shipped_weights else None,
        info=info,
    )


def _load_torchvision(spec: str, num_classes: int | None, cifar_stem: bool) -> LoadedModel:
    """A randomly initialised torchvision architecture, optionally with a CIFAR (32x32) stem."""
    import torchvision

    name = spec.removeprefix("torchvision:")
    available = torchvision.models.list_models()
    if name not in available:
        similar = difflib.get_close_matches(name, available, n=5, cutoff=0.5) or available[:5]
        raise PhotosimError(
            f"torchvision has no model {name!r}; similar names: {', '.join(similar)}. Use one of "
            "torchvision.models.list_models(), e.g. torchvision:resnet18."
        )
    classes = num_classes or 1000
    try:
        module = torchvision.models.get_model(name, weights=None, num_classes=classes)
    except (TypeError, ValueError) as exc:
        raise PhotosimError(
            f"cannot build torchvision model {name!r} with num_classes={classes} ({exc}); pick another "
            "architecture or --num-classes."
        ) from exc
    if cifar_stem:
        _replace_stem(module, name)
    return LoadedModel(
        module=module,
        spec=spec,
        input_shape=(3, 32, 32) if cifar_stem else (3, 224, 224),
        num_classes=classes,
        weights=None,
        weights_sha256=None,
        info=None,
    )


def _replace_stem(module: nn.Module, name: str) -> None:
    """Swap a ResNet's 7x7/2 conv1 and max-pool for a 3x3/1 conv, the usual stem for 32x32 inputs."""
    conv1 = getattr(module, "conv1", None)
    if not isinstance(conv1, nn.Conv2d) or not hasattr(module, "maxpool"):
        raise PhotosimError(
            f"--cifar-stem needs a ResNet-style model with conv1 and maxpool layers, and torchvision:{name} "
            "has none; drop --cifar-stem or use e.g. torchvision:resnet18."
        )
    module.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
    module.maxpool = nn.Identity()


def _load_user_file(spec: str, num_classes: int | None) -> LoadedModel:
    """A module built by calling ``NAME`` (a class or factory, no arguments) from a Python file."""
    file_part, _, attr = spec.rpartition(":")
    if not file_part.endswith(".py"):
        raise PhotosimError(
            f"model spec {spec!r} must be path/to/file.py:NAME, naming the class or factory in the file "
            "that builds the nn.Module."
        )
    module = call_object(spec, "model", "an nn.Module")
    if not isinstance(module, nn.Module):
        raise PhotosimError(
            f"{attr}() from {file_part!r} returned a {type(module).__name__}, not a torch.nn.Module; make "
            "it return the model."
        )
    return LoadedModel(
        module=module,
        spec=spec,
        input_shape=_declared_input_shape(module, spec),
        num_classes=num_classes,
        weights=None,
        weights_sha256=None,
        info=None,
    )


def _declared_input_shape(module: nn.Module, spec: str) -> tuple[int, ...] | None:
    """The module's ``input_shape`` attribute (C, H, W) if it declares one."""
    shape = getattr(module, "input_shape", None)
    if shape is None:
        return None
    if not isinstance(shape, (tuple, list)) or not all(isinstance(d, int) and d > 0 for d in shape):
        raise PhotosimError(
            f"model {spec!r} declares input_shape={shape!r}; it must be a tuple of positive ints such as "
            "(3, 32, 32)."
        )
    return tuple(shape)
