"""One sweep point's settings: the schema every point is validated against, and which of its keys
determine the quantized model (points that agree on them share one quantization)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from photosim._config import StrictModel

MODEL_KEYS = ("model", "weights", "num_classes", "cifar_stem", "data", "data_root", "download", "quant")


class BaseSection(StrictModel):
    """The settings of one point; the axes change them by dotted key."""

    model: str = Field("digits-resnet", description="Built-in name, torchvision:NAME or path/file.py:NAME.")
    weights: str | None = Field(None, description="state_dict file (relative to the working directory).")
    num_classes: int | None = Field(None, ge=1, description="Number of classes of a torchvision model.")
    cifar_stem: bool = Field(False, description="3x3 stride-1 stem for a torchvision ResNet on 32x32 inputs.")
    data: str = Field("digits", description="digits, mnist, fashion-mnist, cifar10, imagefolder:PATH or synthetic.")
    data_root: str | None = Field(None, description="Folder holding torchvision datasets.")
    download: bool = Field(False, description="Download a torchvision dataset when missing.")
    limit: int | None = Field(None, ge=1, description="Evaluate on the first N test images only.")
    quant: dict[str, Any] = Field(default_factory=dict, description="Quantization settings (keys of QuantSpec).")
    hw: dict[str, Any] = Field(default_factory=dict, description="Hardware settings (keys of HardwareConfig).")
    repeats: int = Field(1, ge=1, description="Repeated evaluations (noise draws) per point.")
    seed: int = Field(0, ge=0, description="Base seed of the point's random draws.")
    batch_size: int = Field(256, ge=1, description="Images per batch.")
    device: str = Field("cpu", description="Torch device of the simulation (cpu, cuda, cuda:1, ...).")
