"""End-to-end steps shared by the CLI and the Python API: model + data -> integer model -> accuracies."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from photosim.data import load_dataset
from photosim.errors import PhotosimError
from photosim.evaluate import EvalResult, accuracy
from photosim.fakequant import fake_quant_forward
from photosim.format import QuantizedModel, file_sha256
from photosim.models import LoadedModel, load_model
from photosim.qconfig import QuantSpec
from photosim.quantize import quantize


@dataclass(frozen=True)
class DataSpec:
    """Which dataset to read and how (the --data, --data-root, --download, --limit options)."""

    name: str = "digits"
    root: str | None = None
    download: bool = False
    limit: int | None = None

    def split(self, split: str, input_shape: tuple[int, ...] | None, seed: int = 0) -> Dataset:
        limit = self.limit if split == "test" else None  # --limit subsets the evaluation, not calibration
        return load_dataset(self.name, split, root=self.root, download=self.download, limit=limit,
                            input_shape=input_shape, seed=seed)


def model_provenance(loaded: LoadedModel, data: DataSpec, num_classes: int | None, cifar_stem: bool) -> dict:
    """Facts recorded in the integer file so `photosim run` can rebuild the float model."""
    return {
        "model": loaded.spec,
        "weights": loaded.weights,
        "weights_sha256": loaded.weights_sha256,
        "num_classes": num_classes,
        "cifar_stem": cifar_stem,
        "calibration": {"data": data.name, "split": "calibration"},
    }


def quantize_loaded(loaded: LoadedModel, data: DataSpec, spec: QuantSpec, *, num_classes: int | None = None,
                    cifar_stem: bool = False, progress: bool = False) -> QuantizedModel:
    """PTQ of a loaded model on the calibration split of ``data``."""
    calibration = data.split("calibration", loaded.input_shape)
    return quantize(loaded.module, calibration, spec, progress=progress,
                    provenance=model_provenance(loaded, data, num_classes, cifar_stem))


def source_model(qmodel: QuantizedModel) -> nn.Module | None:
    """The float model an integer file was quantized from, when its provenance allows rebuilding it."""
    prov = qmodel.provenance
    spec = prov.get("model")
    if not spec:
        return None
    weights = prov.get("weights")
    if weights not in (None, "builtin") and (
        not Path(weights).is_file() or file_sha256(weights) != prov.get("weights_sha256")
    ):
        return None
    try:
        return load_model(spec, None if weights == "builtin" else weights, prov.get("num_classes"),
                          bool(prov.get("cifar_stem"))).module
    except PhotosimError:
        return None


def float_accuracy(module: nn.Module, test: Any, batch_size: int = 256, progress: bool = False) -> EvalResult:
    """Top-1 (and top-5) accuracy of the float model."""
    return accuracy(module, test, batch_size=batch_size, progress=progress, description="float model")


def fake_quant_accuracy(qmodel: QuantizedModel, test: Any, batch_size: int = 256,
                        progress: bool = False) -> EvalResult:
    """Accuracy of the fake-quantized float reference of ``qmodel``."""
    return accuracy(lambda x: fake_quant_forward(qmodel, x), test, batch_size=batch_size, progress=progress,
                    description="fake-quant reference")
