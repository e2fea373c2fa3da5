"""Hardware-aware fine-tuning: PTQ result -> learned quantizers trained with the chip's effects in the forward
pass and knowledge distillation from the float model -> an ordinary integer model, judged by the engine.

The trainable graph and the export are photosim.frontend.finetune; this module derives each layer's hardware
surrogate from the hardware plan (the units and settings the engine uses, a photonics section's link budget
included), runs the training (AdamW or SGD, cosine schedule, seeded, a checkpoint per epoch) and compares PTQ
and fine-tuned models on the integer engine. The method and its surrogates: docs/finetune.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from photosim._config import load_config
from photosim._files import atomic_path
from photosim._progress import progress_options
from photosim.engine.executor import check_device
from photosim.errors import PhotosimError
from photosim.experiments.accuracy import evaluate
from photosim.experiments.workflow import calibrate_adc_ranges, run_hardware
from photosim.frontend.finetune import LayerNoise, TrainableGraph, export
from photosim.frontend.ptq import quantize
from photosim.frontend.qconfig import QuantSpec
from photosim.hardware.adc import adc_step
from photosim.hardware.config import HardwareConfig, load_hardware
from photosim.hardware.plan import HardwarePlan, HardwareSpec
from photosim.hardware.readout import tile_length
from photosim.ir.format import QuantizedModel
from photosim.ir.ops import OPS
from photosim.ir.ranges import max_int
from photosim.ir.summary import dot_length, operand_max

OPTIMIZERS = ("adamw", "sgd")
CHECKPOINT_NAME = "finetune-last.pt"
CHECKPOINT_VERSION = 2  # 2: learning-rate restarts and the start loss
DIVERGED_FACTOR, DIVERGED_MARGIN = 3.0, 1.0  # an epoch's mean loss above 3x the start loss and 1 more: diverged
LR_BACKOFF, MAX_LR_RESTARTS = 4.0, 3  # a diverged run restarts from the PTQ start at lr / 4, at most 3 times
CURVE_COLUMNS = ("epoch", "loss", "kd_loss", "ce_loss", "train_top1", "val_top1", "lr", "seconds")


def hardware_surrogates(qmodel: QuantizedModel, hw: HardwareSpec, calibration: Any = None
                        ) -> tuple[dict[str, LayerNoise], list[dict[str, str]]]:
    """Each conv / linear's LayerNoise under ``hw`` (engine units), and how each effect present is modelled:
    rows of ``effect``, ``modelled`` (exact, surrogate or not modelled) and ``how``. Custom noise is refused:
    the training graph cannot differentiate the user's function."""
    plan = HardwarePlan.resolve(qmodel, hw)
    custom = sorted({s.noise.custom.function for s in plan.layers.values() if s.noise.custom.on})
    if custom:
        raise PhotosimError(f"custom noise {', '.join(custom)} cannot be modelled in the training graph (photosim "
                            "cannot differentiate your function nor derive a surrogate for it); fine-tune under a "
                            "config without noise.custom (e.g. output noise of the same std) and judge the result "
                            "with `photosim run --hw` on the custom config.")
    ranges = {}
    if plan.calibrated_adc:
        if calibration is None:
            raise PhotosimError("the hardware config uses a calibrated ADC range; give calibration data.")
        ranges = calibrate_adc_ranges(qmodel, plan, calibration)
    noise: dict[str, LayerNoise] = {}
    seen: dict[str, tuple[str, str]] = {}
    for node in qmodel.nodes:
        settings = plan.layers[node.name]
        if not OPS[node.op].weighted or settings.is_ideal:
            continue
        k = dot_length(node)
        tile = tile_length(k, settings.tile)
        x_max, w_max = operand_max(node)
        fs = float(tile * x_max * w_max)
        adc = settings.adc
        step, limit = (1.0 if settings.is_random else None), None  # the ideal readout rounds noisy values
        if adc.bits is not None:
            limit = fs if adc.range == "full" else ranges[node.name] if adc.range == "calibrated" else adc.range * fs
            step = adc_step(limit, adc.bits)
            seen["adc rounding"] = ("surrogate", "additive noise of one ADC step per tile (uniform, variance "
                                    "step^2/12), summed over the T tiles (Gaussian of variance T step^2/12 when T > 1)")
            seen["adc clipping"] = ("surrogate" if any(_tiles(n, plan) > 1 for n in qmodel.nodes
                                                       if OPS[n.op].weighted) else "exact",
                                    "clamp of the accumulated tiles at +-T * range (exact for one tile; a calibrated "
                                    "range is the one measured on the PTQ model, in product units)")
        elif step is not None:
            seen["ideal readout rounding"] = ("surrogate", "additive noise of one integer product per tile")
        out, shot = settings.noise.output.resolved_sigma, settings.noise.shot.sigma
        if out:
            seen["output noise"] = ("exact", "additive Gaussian noise of std sigma * FS per tile, sigma * FS * "
                                    "sqrt(T) on the accumulator (the same law, other draws), resampled each step")
        if shot:
            seen["shot noise"] = ("surrogate", "Gaussian of variance sigma^2 * FS * sum_k |x_k w_k|, an upper bound "
                                  "of sigma^2 * FS * sum_t |p_t|")
        photocurrent, rin = settings.noise.photocurrent, settings.noise.rin
        if photocurrent.on:
            seen["photocurrent shot noise"] = ("exact", "Gaussian of variance sigma^2 * FS * sum_k |x_k| Wmax (light: "
                                               "inputs) or sum_k |x_k w_k| (products) on the accumulator: the sum "
                                               "over tiles of the engine's law, other draws")
        if rin.on:
            seen["intensity noise (RIN)"] = (
                "exact" if rin.lasers == "independent" else "surrogate",
                "Gaussian of variance sigma^2 * sum_k (x_k w_k)^2 on the accumulator (independent lasers: the law "
                "summed over tiles)" if rin.lasers == "independent" else
                "Gaussian of variance sigma^2 * acc^2 / T (one laser: the tiles' sum of p_t^2 taken as equal tiles)")
        for section in ("mesh", "drift", "dac", "detector"):
            if getattr(settings, section) is not None:
                seen[section] = ("not modelled", "not in the training graph; the engine's judgement shows its effect")
        weight = []
        for name in ("weight_static", "weight_read"):
            effect = getattr(settings.noise, name)
            if effect.on:
                weight.append((effect.kind, effect.sigma))
                seen[name.replace("_", " ") + " noise"] = (
                    "surrogate", f"{effect.kind} error on the weight codes, drawn anew every step for the whole "
                    "batch (the engine: " + ("once per chip" if name == "weight_static" else "per sample") + ")")
        acc = settings.accumulator
        acc_limit = None
        if acc.overflow == "saturate":
            acc_limit = float(max_int(acc.bits, signed=True))
            seen["accumulator saturation"] = ("surrogate", "one clamp of the final sum (the engine clamps after "
                                              "every addition)")
        elif acc.overflow == "wrap":
            seen["accumulator wrap-around"] = ("not modelled", "not differentiable; the engine's judgement shows "
                                               "its effect")
        if settings.photonics is not None:
            seen["photonics link budget"] = ("exact", "the output, photocurrent, RIN and static weight sigmas the "
                                             "link budget derives (photosim.hardware.photonics)")
        noise[node.name] = LayerNoise(math.ceil(k / tile), fs, w_max, out, shot, tuple(weight), step, limit,
                                      acc_limit, (photocurrent.sigma, photocurrent.light), (rin.sigma, rin.lasers))
    if any(s.requant != "float" for s in plan.layers.values()):
        seen["requantization mode"] = ("not modelled", "the graph requantizes in float (fixedpoint / pytorch "
                                       "differ by at most one output step)")
    if any(s.accumulator.bias_at == "start" and s.adc.bits for s in plan.layers.values()):
        seen["bias rounded to ADC steps"] = ("not modelled", "the bias is on its integer grid (s_in * s_w)")
    return noise, [{"effect": k, "modelled": v[0], "how": v[1]} for k, v in seen.items()]


def _tiles(node: Any, plan: HardwarePlan) -> int:
    k = dot_length(node)
    return math.ceil(k / tile_length(k, plan.layers[node.name].tile))


def _dataset(data: Any, what: str) -> Dataset:
    """A Dataset from a Dataset, a DataLoader, a tensor of inputs or an (inputs, labels) pair."""
    if isinstance(data, DataLoader):
        return data.dataset
    if isinstance(data, torch.Tensor):
        return TensorDataset(data)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return TensorDataset(*data)
    if isinstance(data, Dataset):
        return data
    raise PhotosimError(f"{what}: give a Dataset, a DataLoader, a tensor of inputs or an (inputs, labels) pair, "
                        f"not {type(data).__name__}.")


def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _digest(module: nn.Module) -> str:
    """sha256 of a model's parameters and buffers (names, shapes, values): the teacher's identity."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _qmodel_digest(qmodel: QuantizedModel) -> str:
    h = hashlib.sha256()
    for name in sorted(qmodel.tensors):
        h.update(name.encode())
        h.update(qmodel.tensors[name].cpu().contiguous().numpy().tobytes())
    h.update(json.dumps([[n.name, n.op, n.inputs, repr(n.output_q)] for n in qmodel.nodes]).encode())
    return h.hexdigest()


def check_settings(epochs: int, lr: float, optimizer: str, batch_size: int = 64, temperature: float = 2.0) -> None:
    """Refuse bad training settings, naming them."""
    if optimizer not in OPTIMIZERS:
        raise PhotosimError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}.")
    if not (isinstance(epochs, int) and epochs > 0):
        raise PhotosimError(f"epochs must be a positive integer, got {epochs!r}.")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise PhotosimError(f"the learning rate must be a positive number, got {lr!r}.")
    if batch_size < 1:
        raise PhotosimError(f"batch size must be positive, got {batch_size!r}.")
    if not temperature > 0:
        raise PhotosimError(f"the distillation temperature must be positive, got {temperature!r}.")


def finetune(model: nn.Module, train_data: Any, quant_spec: QuantSpec | dict | str | Path | None = None,
             hw: HardwareSpec = None, *, epochs: int, lr: float, optimizer: str = "adamw", labels: bool = True,
             seed: int = 0, device: str = "cpu", progress: bool = False, batch_size: int = 64,
             temperature: float = 2.0, weight_decay: float = 0.0, calibration_data: Any = None,
             validation_data: Any = None, ptq_model: QuantizedModel | None = None,
             checkpoint_dir: str | Path | None = None, resume: bool = False,
             provenance: dict[str, Any] | None = None) -> QuantizedModel:
    """Hardware-aware fine-tuning of ``model`` from its PTQ result; returns the fine-tuned integer model.

    Args:
        model: the float model (the teacher; also quantized with ``quant_spec`` unless ``ptq_model`` is given).
        train_data: training inputs (Dataset, DataLoader, tensor or (x, y)); with ``labels`` their labels add a
            cross-entropy term to the distillation loss, else only the float model's outputs teach.
        quant_spec: QuantSpec, dict or YAML path (its ``ptq`` algorithms included); calibrated on
            ``calibration_data`` (default: ``train_data``).
        hw: the hardware the model will run on (config, dict, YAML path or preset name); its effects enter the
            forward pass (docs/finetune.md says which exactly and which by a surrogate); custom noise is refused.
        epochs, lr, optimizer: passes over ``train_data``, peak learning rate (cosine schedule to 0), ``adamw``
            or ``sgd`` (momentum 0.9).
        seed: seeds the data order and every noise draw: the same seed gives the same model.
        validation_data: labelled data scored after each epoch on the training graph (noise included, one fixed
            draw), for the curve only; nothing is selected on it.
        checkpoint_dir, resume: a checkpoint after every epoch; ``resume`` continues from it, refused when it
            was written for another model, quantization, hardware or training settings.

    The training curve (per epoch: loss, train and validation top-1) and the effects table are in
    ``result.provenance["finetune"]``. Judge the result on the engine with ``photosim.run_hardware``.

    Example:
        >>> tuned = photosim.finetune(loaded.module, photosim.load_dataset("digits", "train"), {"w_bits": 6,
        ...     "a_bits": 6}, {"tile": 32, "adc": {"bits": 8}, "noise": {"output": {"sigma": 0.005}}},
        ...     epochs=10, lr=1e-3)
    """
    check_settings(epochs, lr, optimizer, batch_size, temperature)
    torch_device = check_device(device)
    spec = load_config(QuantSpec, quant_spec)
    hw_config = hw if isinstance(hw, HardwarePlan) else load_hardware(hw)
    train = _dataset(train_data, "train_data")
    calibration = train if calibration_data is None else calibration_data
    if ptq_model is None:
        ptq_model = quantize(model, calibration, spec, progress=progress, provenance=provenance)
    noise, effects = hardware_surrogates(ptq_model, hw_config, calibration)
    teacher = model.eval().to(torch_device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    settings = {"epochs": epochs, "lr": lr, "optimizer": optimizer, "labels": labels, "seed": seed,
                "batch_size": batch_size, "temperature": temperature, "weight_decay": weight_decay}
    hw_dump = hw_config.config.model_dump(mode="json") if isinstance(hw_config, HardwarePlan) else \
        hw_config.model_dump(mode="json")
    fingerprint = {"model": _digest(teacher), "ptq model": _qmodel_digest(ptq_model),
                   "quantization": spec.model_dump(mode="json"), "hardware": hw_dump, "training settings": settings}
    checkpoint = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
    if resume and checkpoint is None:
        raise PhotosimError("resume needs a checkpoint folder (--checkpoint-dir).")
    validation = None if validation_data is None else _dataset(validation_data, "validation_data")
    run = _Training(teacher, train, validation, labels, temperature, batch_size, seed, torch_device,
                    fingerprint, checkpoint, progress)
    while True:
        graph = TrainableGraph(ptq_model, noise).to(torch_device)
        if not any(p.requires_grad for p in graph.parameters()):
            raise PhotosimError("the model has no conv or linear layer and no activation to quantize: nothing to "
                                "fine-tune.")
        try:
            curve = run.train(graph, optimizer, lr, weight_decay, epochs, resume)
            break
        except _Diverged as diverged:
            run.restarts.append({"lr": diverged.lr, "epoch": diverged.epoch, "loss": diverged.loss,
                                 "start_loss": diverged.start})
            if len(run.restarts) > MAX_LR_RESTARTS:
                raise PhotosimError(
                    f"fine-tuning diverged {len(run.restarts)} times (last at lr {diverged.lr:g}: loss "
                    f"{diverged.loss:.3g} in epoch {diverged.epoch} against {diverged.start:.3g} at the start); "
                    "lower --lr, or check the model and data.") from None
            lr = diverged.lr / LR_BACKOFF
            resume = False  # the restart begins at the PTQ start
    graph = graph.cpu()
    prov = dict(ptq_model.provenance)
    prov["finetune"] = {**settings, "effects": effects, "curve": curve, "lr_restarts": run.restarts,
                        "lr_used": settings["lr"] / LR_BACKOFF ** len(run.restarts),
                        "method": "LSQ + distillation, hardware surrogates (docs/finetune.md)"}
    return export(graph, prov)


class _Diverged(Exception):
    """Training loss far above the loss of the PTQ start: the learning rate is too large for this model."""

    def __init__(self, lr: float, epoch: int, loss: float, start: float) -> None:
        super().__init__(f"lr {lr}, epoch {epoch}: loss {loss} against {start} at the start")
        self.lr, self.epoch, self.loss, self.start = lr, epoch, loss, start


@dataclass
class _Training:
    """One fine-tuning's fixed parts (teacher, data, settings, checkpoint); ``train`` runs it at one learning rate."""

    teacher: nn.Module
    train_data: Dataset
    validation: Dataset | None
    labels: bool
    temperature: float
    batch_size: int
    seed: int
    device: torch.device
    fingerprint: dict[str, Any]
    checkpoint: Path | None
    progress: bool
    restarts: list[dict[str, float]] = field(default_factory=list)  # diverged runs before this one

    def train(self, graph: TrainableGraph, optimizer: str, lr: float, weight_decay: float, epochs: int,
              resume: bool) -> list[dict[str, Any]]:
        """Train ``graph`` in place at peak learning rate ``lr`` (a resumed checkpoint's own) -> the curve; raises
        _Diverged when an epoch's mean loss exceeds both 3 times and 1 more than the loss of the first batch, taken
        before any step (label-free distillation starts near 0)."""
        opt = _optimizer(graph, optimizer, lr, weight_decay)
        order = torch.Generator().manual_seed(self.seed)
        graph.generator = torch.Generator(device=self.device).manual_seed(self.seed + 1)
        loader = DataLoader(self.train_data, batch_size=self.batch_size, shuffle=True, generator=order,
                            drop_last=False)
        steps = epochs * len(loader)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
        curve: list[dict[str, Any]] = []
        start_epoch, start_loss = 0, math.nan
        if resume:
            assert self.checkpoint is not None
            start_epoch, curve, self.restarts, start_loss = _load_checkpoint(
                self.checkpoint, self.fingerprint, graph, opt, schedule, order, graph.generator)
            lr = schedule.base_lrs[0]
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                   TimeRemainingColumn())
        with Progress(*columns, **progress_options(self.progress)) as bar:
            task = bar.add_task("fine-tuning", total=steps, completed=start_epoch * len(loader), loss=math.nan)
            for epoch in range(start_epoch, epochs):
                began = time.perf_counter()
                bar.update(task, description=f"fine-tuning at lr {lr:g}, epoch {epoch + 1}/{epochs}")
                row = _epoch(graph, self.teacher, loader, opt, schedule, self.labels, self.temperature, self.device,
                             lambda loss: bar.update(task, advance=1, loss=loss))
                start_loss = row.pop("first_loss") if math.isnan(start_loss) else start_loss
                if not row["loss"] <= max(DIVERGED_FACTOR * start_loss, start_loss + DIVERGED_MARGIN):  # NaN too
                    raise _Diverged(lr, epoch + 1, row["loss"], start_loss)
                row["val_top1"] = math.nan if self.validation is None else _score(
                    graph, self.teacher, self.validation, self.batch_size, self.device, self.seed)
                row.update(epoch=epoch + 1, lr=schedule.get_last_lr()[0], seconds=time.perf_counter() - began)
                curve.append({k: row[k] for k in CURVE_COLUMNS})
                if self.checkpoint is not None:
                    _save_checkpoint(self.checkpoint, self.fingerprint, epoch + 1, curve, self.restarts, start_loss,
                                     graph, opt, schedule, order, graph.generator)
        return curve


def _optimizer(graph: TrainableGraph, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in graph.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _epoch(graph: TrainableGraph, teacher: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer,
           schedule: Any, labels: bool, temperature: float, device: torch.device,
           advance: Callable[[float], None]) -> dict[str, float]:
    """One pass over the training data: distillation (KL on softened logits, times T^2) plus cross-entropy with
    labels; top-1 against the labels, else agreement with the float model."""
    graph.train()
    graph.noisy = True
    totals = {"loss": 0.0, "kd_loss": 0.0, "ce_loss": 0.0}
    correct = n = 0
    first_loss = math.nan
    for batch in loader:
        x, y = _split(batch)
        if labels and y is None:
            raise PhotosimError("the training data has no labels; fine-tune without labels (labels=False, "
                                "--no-labels) to learn from the float model alone.")
        x = x.to(device).float()
        with torch.no_grad():
            target = teacher(x).float()
        logits = graph(x)
        kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), F.log_softmax(target / temperature, dim=1),
                      reduction="batchmean", log_target=True) * temperature ** 2
        ce = F.cross_entropy(logits, y.to(device)) if labels else torch.zeros((), device=device)
        loss = kd + ce
        first_loss = float(loss.detach()) if math.isnan(first_loss) else first_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        size = len(x)
        for key, value in (("loss", loss), ("kd_loss", kd), ("ce_loss", ce)):
            totals[key] += float(value.detach()) * size
        reference = y.to(device) if labels else target.argmax(1)
        correct += int((logits.detach().argmax(1) == reference).sum())
        n += size
        advance(float(loss.detach()))
    return {**{k: v / max(n, 1) for k, v in totals.items()}, "train_top1": correct / max(n, 1),
            "first_loss": first_loss}


def _score(graph: TrainableGraph, teacher: nn.Module, data: Dataset, batch_size: int, device: torch.device,
           seed: int) -> float:
    """Top-1 of the training graph (noise on, one fixed draw) on labelled data; agreement with the float model
    when the data has no labels."""
    graph.eval()
    saved = graph.generator
    graph.generator = torch.Generator(device=device).manual_seed(seed + 2)
    correct = n = 0
    with torch.no_grad():
        for batch in DataLoader(data, batch_size=batch_size):
            x, y = _split(batch)
            x = x.to(device).float()
            reference = teacher(x).argmax(1) if y is None else y.to(device)
            correct += int((graph(x).argmax(1) == reference).sum())
            n += len(x)
    graph.generator = saved
    return correct / max(n, 1)


def _save_checkpoint(path: Path, fingerprint: dict, epoch: int, curve: list, restarts: list, start_loss: float,
                     graph: TrainableGraph, opt: torch.optim.Optimizer, schedule: Any, order: torch.Generator,
                     noise: torch.Generator) -> None:
    """Write the checkpoint atomically: an interrupted run keeps the previous epoch's."""
    state = {"version": CHECKPOINT_VERSION, "fingerprint": json.dumps(fingerprint, sort_keys=True), "epoch": epoch,
             "curve": json.dumps(curve), "restarts": json.dumps(restarts), "start_loss": start_loss,
             "graph": graph.state_dict(), "optimizer": opt.state_dict(),
             "schedule": schedule.state_dict(), "order": order.get_state(), "noise": noise.get_state()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def _load_checkpoint(path: Path, fingerprint: dict, graph: TrainableGraph, opt: torch.optim.Optimizer,
                     schedule: Any, order: torch.Generator, noise: torch.Generator) -> tuple[int, list, list, float]:
    """Restore a checkpoint of this very fine-tuning (its learning rate, restarts included) -> epoch, curve,
    restarts, start loss; refuse one of another model, config or settings by name."""
    if not path.is_file():
        raise PhotosimError(f"no checkpoint to resume at {str(path)!r}; run without --resume to start.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = json.loads(state["fingerprint"])
    except Exception as exc:  # noqa: BLE001 - any unreadable file is refused the same way
        raise PhotosimError(f"{str(path)!r} is not a photosim fine-tuning checkpoint ({type(exc).__name__}); "
                            "remove it or choose another --checkpoint-dir.") from None
    if state.get("version") != CHECKPOINT_VERSION:
        raise PhotosimError(f"{str(path)!r} was written by another checkpoint version; start again without "
                            "--resume.")
    differ = [key for key in fingerprint if json.loads(json.dumps(fingerprint[key], sort_keys=True))
              != saved.get(key)]
    if differ:
        details = []
        if "training settings" in differ:
            now, then = fingerprint["training settings"], saved.get("training settings", {})
            details = [f"{k} {then.get(k)!r} -> {now[k]!r}" for k in now if then.get(k) != now[k]]
        raise PhotosimError(f"the checkpoint {str(path)!r} was written for another {', '.join(differ)}"
                            + (f" ({'; '.join(details)})" if details else "") + "; resuming would mix two "
                            "fine-tunings. Resume with the original settings, or start again in another "
                            "--checkpoint-dir.")
    graph.load_state_dict(state["graph"])
    opt.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    order.set_state(state["order"])
    noise.set_state(state["noise"])
    return int(state["epoch"]), json.loads(state["curve"]), json.loads(state["restarts"]), float(state["start_loss"])


def judge(models: dict[str, QuantizedModel], test: Any, hw: HardwareConfig, *, calibration: Any = None,
          repeats: int = 10, seed: int = 0, batch_size: int = 256, device: str = "cpu",
          progress: bool = False) -> pd.DataFrame:
    """The engine's verdict on each model (name -> model): ideal integer top-1 and the hardware's top-1 over
    ``repeats`` simulated chips (mean, std, 95% CI; percent)."""
    rows = []
    for name, qmodel in models.items():
        ideal = evaluate(qmodel, test, hw.ideal(), batch_size=batch_size, device=device, progress=progress)
        run = run_hardware(qmodel, test, hw, calibration=calibration, repeats=repeats, seed=seed,
                           batch_size=batch_size, device=device, progress=progress)
        s = run.summary(["top1"]).iloc[0]
        rows.append({"model": name, "ideal_top1": 100 * ideal.top1, "hardware_top1": 100 * s["top1_mean"],
                     "std": 100 * s["top1_std"], "ci95": 100 * s["top1_ci95"], "repeats": int(s["n"])})
    return pd.DataFrame(rows)
