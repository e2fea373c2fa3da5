"""Top-1 / top-5 accuracy of any batch predictor (float model, fake-quant reference, integer engine)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset

from photosim._progress import progress_options
from photosim.engine.executor import Engine
from photosim.errors import PhotosimError
from photosim.hardware.plan import HardwareSpec
from photosim.ir.format import QuantizedModel

TOP5_MIN_CLASSES = 6  # top-5 of five or fewer classes is always 100%


@dataclass(frozen=True)
class EvalResult:
    """Accuracy as fractions in [0, 1]; ``top5`` is None when the predictor has five classes or fewer."""

    top1: float
    top5: float | None
    n: int


def _tensor_pair_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterator[tuple[Any, Any]]:
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


def _batches(data: Any, batch_size: int, pin_memory: bool = False) -> tuple[Iterable[tuple[Any, Any]], int | None]:
    """(x, y) batches and the sample count (None if unknown) of a DataLoader, Dataset or (x, y) tensor pair; a
    Dataset's batches in pinned memory when ``pin_memory`` (they then reach a GPU without blocking the host)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if len(x) != len(y):
            raise PhotosimError(f"inputs and labels differ in length ({len(x)} vs {len(y)}); pass matching tensors.")
        return _tensor_pair_batches(x, y, batch_size), len(x)
    if isinstance(data, DataLoader):
        dataset = data.dataset
        return data, len(dataset) if hasattr(dataset, "__len__") else None
    if isinstance(data, Dataset):
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, pin_memory=pin_memory)
        return loader, len(data) if hasattr(data, "__len__") else None
    raise PhotosimError(
        f"cannot evaluate on a {type(data).__name__}; pass a torch Dataset or DataLoader of (x, y) pairs, "
        "or an (inputs, labels) tensor pair."
    )


def accuracy(predict: Callable[[torch.Tensor], torch.Tensor], data: Any, *, batch_size: int = 256,
             progress: bool = False, description: str = "") -> EvalResult:
    """Top-1 and top-5 accuracy of ``predict`` (inputs (B, ...) -> scores (B, classes)) over ``data``.

    An :class:`Engine` is told the index of each batch's first sample, which keys its noise: a pass over the
    data draws the same numbers whatever the batch size.

    Example:
        >>> accuracy(model, (x, y), batch_size=128).top1
    """
    on_gpu = isinstance(predict, Engine) and predict.device.type == "cuda"
    batches, total = _batches(data, batch_size, pin_memory=on_gpu)
    correct1 = correct5 = n = 0
    classes = 0
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  **progress_options(progress)) as bar:
        task = bar.add_task(description or "evaluating", total=total)
        for x, y in batches:
            with torch.no_grad():
                scores = (predict(x, n) if isinstance(predict, Engine) else predict(x)).cpu()  # (B, classes)
            y = torch.as_tensor(y).cpu()
            classes = scores.shape[1]
            correct1 += int((scores.argmax(dim=1) == y).sum())
            if classes >= TOP5_MIN_CLASSES:
                correct5 += int((scores.topk(5, dim=1).indices == y[:, None]).any(dim=1).sum())
            n += len(y)
            bar.advance(task, len(y))
    if n == 0:
        raise PhotosimError("the evaluation data holds no samples; check the dataset path and --limit.")
    return EvalResult(correct1 / n, correct5 / n if classes >= TOP5_MIN_CLASSES else None, n)


def evaluate(qmodel: QuantizedModel, data: Any, hw: HardwareSpec = None, *, batch_size: int = 256,
             device: str | torch.device = "cpu", progress: bool = False, **engine_options: Any) -> EvalResult:
    """Top-1 / top-5 accuracy of the simulated integer model over a Dataset, DataLoader or (x, y) pair."""
    engine = Engine(qmodel, hw, device=device, **engine_options)
    return accuracy(engine, data, batch_size=batch_size, progress=progress,
                    description=f"integer engine ({engine.hw.requant})")
