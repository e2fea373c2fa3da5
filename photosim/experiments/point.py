"""One sweep point's settings: the schema every point is validated against, and which of its fields
determine the quantized model (points that agree on them share one quantization)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from photosim._config import MAX_REPEATS, OptionalSections, StrictModel
from photosim.frontend.qconfig import QuantSpec
from photosim.hardware.config import HardwareConfig

# json_schema_extra of a field whose value changes the quantized model: MODEL_KEYS lists the fields marked so
DETERMINES_MODEL: dict[str, Any] = {"determines_model": True}


class FinetuneSection(StrictModel):
    """Hardware-aware fine-tuning of the point's PTQ model under its own hardware config before the engine judges
    it (photosim.finetune, docs/finetune.md); the defaults are those of ``photosim finetune``."""

    epochs: int = Field(ge=1, description="Passes over the training data.")
    lr: float = Field(gt=0, description="Peak learning rate (cosine schedule to 0).")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="adamw, or sgd with momentum 0.9.")
    labels: bool = Field(True, description="Train on the train split with its labels (distillation + cross-"
                                           "entropy); false: on the calibration split, the float model teaching.")
    seed: int = Field(0, ge=0, description="Seed of the data order and the training noise (the point's own seed "
                                           "draws the chips, so points differing in it judge one fine-tuned model).")
    batch_size: int = Field(64, ge=1, description="Images per training step.")
    temperature: float = Field(2.0, gt=0, description="Distillation temperature.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay of the optimizer.")


class BaseSection(OptionalSections):
    """The validated settings of one point; a sweep's axes change them by dotted key before validation."""

    optional_sections: ClassVar[tuple[str, ...]] = ("finetune",)  # a point without it hashes as before it existed

    model: str = Field("digits-resnet", description="Built-in name, torchvision:NAME or path/file.py:NAME.",
                       json_schema_extra=DETERMINES_MODEL)
    weights: str | None = Field(None, description="state_dict file (relative to the working directory).",
                                json_schema_extra=DETERMINES_MODEL)
    num_classes: int | None = Field(None, ge=1, description="Number of classes of a torchvision model.",
                                    json_schema_extra=DETERMINES_MODEL)
    cifar_stem: bool = Field(False, description="3x3 stride-1 stem for a torchvision ResNet on 32x32 inputs.",
                             json_schema_extra=DETERMINES_MODEL)
    data: str = Field("digits", description="digits, mnist, fashion-mnist, cifar10, imagefolder:PATH or synthetic.",
                      json_schema_extra=DETERMINES_MODEL)
    data_root: str | None = Field(None, description="Folder holding torchvision datasets.",
                                  json_schema_extra=DETERMINES_MODEL)
    download: bool = Field(False, description="Download a torchvision dataset when missing.",
                           json_schema_extra=DETERMINES_MODEL)
    limit: int | None = Field(None, ge=1, description="Evaluate on the first N test images only.")
    quant: QuantSpec = Field(default_factory=QuantSpec, description="Quantization settings (keys of QuantSpec).",
                             json_schema_extra=DETERMINES_MODEL)
    hw: HardwareConfig = Field(default_factory=HardwareConfig,
                               description="Hardware settings (keys of HardwareConfig).")
    repeats: int = Field(1, ge=1, le=MAX_REPEATS, description="Repeated evaluations (noise draws) per point.")
    seed: int = Field(0, ge=0, description="Base seed of the point's random draws.")
    batch_size: int = Field(256, ge=1, description="Images per batch.")
    device: str = Field("cpu", description="Torch device of the simulation (cpu, cuda, cuda:1, ...).")
    finetune: FinetuneSection | None = Field(None, description="Fine-tune the PTQ model under ``hw`` before it "
                                                               "is judged (keys of FinetuneSection); none: PTQ.")


MODEL_KEYS = tuple(name for name, field in BaseSection.model_fields.items()
                   if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("determines_model"))
