"""End-to-end steps shared by the CLI and the Python API: model + data -> integer model -> accuracies."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from photosim._config import MAX_REPEATS, load_config
from photosim._files import require_file
from photosim._imports import load_object
from photosim.engine.analog import AnalogLayer, LayerStats
from photosim.engine.executor import Engine, check_device
from photosim.engine.torch_requant import resolve_cpu_family
from photosim.errors import PhotosimError
from photosim.experiments.accuracy import EvalResult, accuracy, evaluate
from photosim.experiments.budget import budget_table, energy_totals
from photosim.experiments.point import MODEL_KEYS, BaseSection, FinetuneSection
from photosim.frontend.capture import capture
from photosim.frontend.data import calibration_batches, load_dataset
from photosim.frontend.models import LoadedModel, list_models, load_model
from photosim.frontend.ptq import quantize
from photosim.frontend.qconfig import QuantSpec
from photosim.hardware.config import HardwareConfig, LayerHardware, load_hardware
from photosim.hardware.noise import enob, snr_db
from photosim.hardware.plan import HardwarePlan, HardwareSpec
from photosim.ir.fakequant import fake_quant_forward
from photosim.ir.format import QuantizedModel, file_sha256
from photosim.ir.summary import worst_case_acc_bits


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


def rebuildable(spec: str) -> bool:
    """Whether a model spec read from a file may be rebuilt: a built-in, torchvision: or hf: name (library code),
    never user code."""
    return spec in {m.name for m in list_models()} or spec.startswith(("torchvision:", "hf:"))


def source_model(qmodel: QuantizedModel) -> nn.Module | None:
    """The float model an integer file was quantized from, when its provenance allows rebuilding it safely.

    Only built-in, ``torchvision:`` and ``hf:`` models are rebuilt (with recorded weights whose file still has the
    recorded sha256): a file never makes photosim import or run code, so ``file.py:NAME`` sources and
    import-torch scripts give None; pass the model on the command line instead (``--float-model``).
    """
    prov = qmodel.provenance
    spec, weights, classes = prov.get("model"), prov.get("weights"), prov.get("num_classes")
    if "source" in prov or not isinstance(spec, str) or not rebuildable(spec) or not _recorded_weights(prov):
        return None
    if classes is not None and not isinstance(classes, int):
        return None
    try:
        return load_model(spec, None if weights == "builtin" else weights, classes,
                          bool(prov.get("cifar_stem"))).module
    except PhotosimError:
        return None


def _recorded_weights(prov: dict[str, Any]) -> bool:
    """The provenance's weights are the shipped ones, none, or a file that still has the recorded sha256."""
    weights = prov.get("weights")
    if weights in (None, "builtin"):
        return True
    if not isinstance(weights, str) or not Path(weights).is_file():
        return False
    require_file(weights, "weights file named in the model file's provenance", "give the float model with "
                 "--float-model (and --weights) instead")
    return file_sha256(weights) == prov.get("weights_sha256")


def float_accuracy(module: nn.Module, test: Any, batch_size: int = 256, progress: bool = False) -> EvalResult:
    """Top-1 (and top-5) accuracy of the float model."""
    return accuracy(module, test, batch_size=batch_size, progress=progress, description="float model")


def fake_quant_accuracy(qmodel: QuantizedModel, test: Any, batch_size: int = 256,
                        progress: bool = False) -> EvalResult:
    """Accuracy of the fake-quantized float reference of ``qmodel``."""
    return accuracy(lambda x: fake_quant_forward(qmodel, x), test, batch_size=batch_size, progress=progress,
                    description="fake-quant reference")


@dataclass
class HardwareRun:
    """Accuracy and diagnostics of the simulated hardware, one entry per Monte Carlo repeat."""

    repeats: list[dict[str, Any]]  # repeat, top1, top5, overflow_rate, adc_clip_rate, snr_db (worst layer),
    # the run_settings columns, and with a photonics section the energy columns of
    # photosim.experiments.budget.energy_totals
    layers: pd.DataFrame  # one row per (repeat, analog layer)

    def summary(self, metrics: Sequence[str] = ("top1", "top5")) -> pd.DataFrame:
        """Mean, std and 95% CI half-width (Student t) over the repeats of each metric: one row with ``n`` and
        ``<metric>_mean``, ``_std``, ``_ci95`` (fractions, like the per-repeat values; std and CI are NaN for
        one repeat). A metric that is missing or None in every repeat (top5 under 5 classes) is left out.

        Example:
            >>> run = run_hardware(qmodel, test, "photonic-8bit", calibration=calib, repeats=5)
            >>> row = run.summary().iloc[0]; row["top1_mean"], row["top1_ci95"]
        """
        from photosim.experiments.report import summarize

        frame = pd.DataFrame(self.repeats).assign(run="hardware")
        kept = [m for m in metrics if m in frame and frame[m].notna().any()]
        unknown = [m for m in metrics if m not in frame]
        if unknown:
            raise PhotosimError(f"no metric {', '.join(map(repr, unknown))} in the repeats; numeric columns: "
                                f"{', '.join(c for c in frame if pd.api.types.is_numeric_dtype(frame[c]))}.")
        frame[kept] = frame[kept].astype(float)
        return summarize(frame, ["run"], kept).drop(columns="run")


def _layer_rows(engine: Engine, repeat: int) -> list[dict[str, Any]]:
    """Per-layer diagnostics of one repeat (docs/hardware.md, Diagnostics; snr_db_budget: docs/photonics.md), with
    the backend that ran the layer and why the faster ones declined it."""
    rows = []
    for name, layer in engine.analog.items():
        node, st, readout, settings = engine.model.node(name), layer.stats, layer.readout, engine.settings[name]
        snr = snr_db(st.signal_power, st.error_power) if layer.diagnostics else math.nan
        snr_fs = full_scale_snr_db(st, layer) if layer.diagnostics else math.nan
        row = {
            "repeat": repeat, "layer": name, "tile": layer.tile, "tiles": layer.tiles,
            "full_scale": layer.full_scale, "output_sigma": readout.tile_noise.get("output", 0.0),
            "adc_bits": layer.adc_bits, **adc_range_columns(settings, readout), "adc_step": layer.step,
            "overflow_rate": st.overflowed / max(st.outputs, 1), "adc_clip_rate": st.clipped / max(st.tile_values, 1),
            "detector_saturation_rate": st.saturated / max(st.tile_values, 1),
            "snr_db": snr, "snr_fs_db": snr_fs, "enob": enob(snr_fs),
            "acc_bits_worst_case": worst_case_acc_bits(node.input_q[0].bits, node.w_bits or node.input_q[1].bits,
                                                       readout.k),  # a matmul's "weights" are its second input
            "acc_bits_observed": math.ceil(math.log2(st.max_abs_acc + 1)) + 1,
            "acc_bits": readout.acc_bits,
            **engine.backends[name].as_row(),
        }
        if settings.photonics is not None:
            row["snr_db_budget"] = budget_snr_db(st.signal_power / max(st.outputs, 1), layer)
        rows.append(row)
    return rows


def adc_range_mode(settings: LayerHardware) -> str:
    """A layer's ADC range as reported: ``full``, ``calibrated`` or ``fraction`` (of full scale); ``ideal``
    without ADC bits (the readout keeps the exact integer sums)."""
    if settings.adc.bits is None:
        return "ideal"
    return settings.adc.range if isinstance(settings.adc.range, str) else "fraction"


def adc_range_columns(settings: LayerHardware, readout: Any) -> dict[str, Any]:
    """``adc_range`` (adc_range_mode), the +-range the ADC digitizes in product units (``adc_range_value``) and
    as a fraction of the tile's full scale FS (``adc_range_fraction``: 1 for ``full``, the measured range / FS
    for ``calibrated``); NaN without an ADC."""
    mode = adc_range_mode(settings)
    if mode == "ideal":
        return {"adc_range": mode, "adc_range_value": math.nan, "adc_range_fraction": math.nan}
    value = readout.full_scale if readout.adc_range is None else float(readout.adc_range)
    return {"adc_range": mode, "adc_range_value": value, "adc_range_fraction": value / readout.full_scale}


def adc_range_summary(modes: Sequence[str]) -> str:
    """The ADC ranges of a model's layers in one word: the distinct modes in order, joined by ``+``."""
    return "+".join(dict.fromkeys(modes)) or "ideal"


def full_scale_snr_db(stats: LayerStats, layer: AnalogLayer) -> float:
    """The measured error referred to one tile's full scale, as ``enob`` and the link budget define SNR:
    10 log10(FS^2 / error power per tile value), the error of an output shared by its T tiles."""
    per_tile = stats.error_power / max(stats.outputs, 1) / layer.tiles
    return snr_db(layer.full_scale ** 2, per_tile)


def budget_snr_db(signal_power: float, layer: AnalogLayer) -> float:
    """The SNR the link budget predicts for a layer whose mean exact accumulator^2 is ``signal_power``: each of
    the T tiles adds output noise (sigma FS)^2 and rounding step^2 / 12, and the signal-dependent effects their
    laws' variance at the layer's real light and signal (weight error and clipping excluded)."""
    tile_noise = (layer.readout.tile_noise.get("output", 0.0) * layer.full_scale) ** 2 + layer.step ** 2 / 12.0
    signal_dependent = layer.stats.signal_noise_power / max(layer.stats.outputs, 1)
    return snr_db(signal_power, layer.tiles * tile_noise + signal_dependent)


def calibrate_adc_ranges(qmodel: QuantizedModel, hw: HardwareSpec, data: Any, *, samples: int = 512,
                         batch_size: int = 256, device: str | torch.device = "cpu", seed: int = 0,
                         repeat: int = 0) -> dict[str, float]:
    """+-range (product units) of every layer with ``adc.range: calibrated``: the ``adc.percentile`` of
    |tile value| over up to ``samples`` calibration inputs (tensor, Dataset, DataLoader or batches)."""
    engine = Engine(qmodel, hw, device=device, seed=seed, repeat=repeat, calibrate_adc=True, diagnostics=False)
    if not engine.analog:
        return {}
    first = 0
    for x in calibration_batches(data, samples):
        for chunk in x.split(batch_size):
            engine.codes(chunk, first)
            first += len(chunk)
    adc = {name: engine.settings[name].adc for name in engine.analog}
    return {name: layer.calibration.clip_range("percentile", adc[name].percentile, adc[name].bits, signed=False)[1]
            for name, layer in engine.analog.items() if layer.calibration is not None}


def chip_engine(qmodel: QuantizedModel, hw: HardwarePlan, calibration: Any, *, seed: int, repeat: int,
                batch_size: int = 256, device: str = "cpu", adc_samples: int = 512, **engine_options: Any) -> Engine:
    """The engine of one simulated chip; layers with a calibrated ADC get their ranges measured on up to
    ``adc_samples`` inputs of ``calibration`` (noise-free tile values of this chip)."""
    ranges = {}
    if hw.calibrated_adc:
        if calibration is None:
            raise PhotosimError("the hardware config uses a calibrated ADC range; give calibration data.")
        ranges = calibrate_adc_ranges(qmodel, hw, calibration, samples=adc_samples, batch_size=batch_size,
                                      device=device, seed=seed, repeat=repeat)
    return Engine(qmodel, hw, device=device, seed=seed, repeat=repeat, adc_ranges=ranges, **engine_options)


def run_hardware(qmodel: QuantizedModel, test: Any, hw: HardwareSpec = None, *, calibration: Any = None,
                 repeats: int = 1, seed: int = 0, batch_size: int = 256, device: str = "cpu", progress: bool = False,
                 backend: Sequence[str] = ()) -> HardwareRun:
    """Monte Carlo over ``repeats`` simulated chips: each draws new static weight error and inference noise.
    ``backend``: required execution backends (photosim.engine.backends).

    Layers with a calibrated ADC get their ranges from ``calibration`` (per chip, noise-free tile values).
    Without any randomness the hardware is deterministic, so it is simulated once and the result repeated
    (at most MAX_REPEATS rows per layer, refused above that before any work).
    """
    if not 1 <= repeats <= MAX_REPEATS:
        raise PhotosimError(f"repeats must be between 1 and {MAX_REPEATS:,}, got {repeats:,}: every repeat is a "
                            "simulated chip with its own rows of results; a 95% CI needs far fewer.")
    plan = HardwarePlan.resolve(qmodel, hw)
    energy = energy_totals(budget_table(qmodel, plan))
    runs = plan.chips(repeats)
    results, layers = [], []
    for repeat in range(runs):
        engine = chip_engine(qmodel, plan, calibration, seed=seed, repeat=repeat, batch_size=batch_size, device=device,
                             backend=backend)
        result = accuracy(engine, test, batch_size=batch_size, progress=progress,
                          description=f"hardware, repeat {repeat + 1}/{runs}")
        rows = _layer_rows(engine, repeat)
        layers.extend(rows)
        stats = [layer.stats for layer in engine.analog.values()]
        results.append({
            "repeat": repeat, "top1": result.top1, "top5": result.top5,
            "overflow_rate": sum(s.overflowed for s in stats) / max(sum(s.outputs for s in stats), 1),
            "adc_clip_rate": sum(s.clipped for s in stats) / max(sum(s.tile_values for s in stats), 1),
            "snr_db": min((r["snr_db"] for r in rows), default=math.inf), **energy,
            **run_settings(plan, engine, batch_size),
        })
    results += [dict(results[0], repeat=r) for r in range(runs, repeats)]
    layers += [dict(row, repeat=r) for r in range(runs, repeats) for row in layers if row["repeat"] == 0]
    return HardwareRun(results, pd.DataFrame(layers))


RUN_SETTINGS = ("torch_version", "pytorch_cpu_family", "torch_threads", "samples_per_pass",
                "adc_range")  # run_settings' keys


def run_settings(plan: HardwarePlan, engine: Engine, batch_size: int) -> dict[str, Any]:
    """What the codes of ``requant: pytorch`` depend on besides the model and config (docs/integer-semantics.md),
    recorded in every row: torch version, the CPU family pytorch_cpu resolves to, threads, and the samples the
    engine takes per pass (its chunking of each batch); and the ADC range the layers use (``adc_range``: full,
    calibrated, fraction or ideal, ``+``-joined when layers differ; per layer values: the layer rows)."""
    families = sorted({resolve_cpu_family(settings.pytorch_cpu) for settings in plan.layers.values()})
    return {"torch_version": torch.__version__, "pytorch_cpu_family": "+".join(families),
            "torch_threads": torch.get_num_threads(),
            "samples_per_pass": min(batch_size, engine.sub_batch or batch_size),
            "adc_range": adc_range_summary([adc_range_mode(engine.settings[name]) for name in engine.analog])}


@dataclass
class Baselines:
    """Accuracies the hardware is compared against."""

    float: EvalResult | None
    fake_quant: EvalResult
    ideal: EvalResult  # the ideal integer engine with the same requantization mode


def baselines(qmodel: QuantizedModel, test: Any, hw: HardwareConfig, float_model: nn.Module | None, *,
              batch_size: int = 256, device: str = "cpu", progress: bool = False,
              backend: Sequence[str] = ()) -> Baselines:
    """Float (when the source model is known), fake-quant and ideal-integer accuracy, the ideal engine rounding as
    ``hw`` does (HardwareConfig.ideal: requant and pytorch_cpu); ``backend``: required execution backends, see
    photosim.engine.backends."""
    return Baselines(
        float=None if float_model is None else float_accuracy(float_model, test, batch_size, progress),
        fake_quant=fake_quant_accuracy(qmodel, test, batch_size, progress),
        ideal=evaluate(qmodel, test, hw.ideal(), batch_size=batch_size, device=device, progress=progress,
                       backend=backend),
    )


def comparison_rows(base: Baselines, run: HardwareRun) -> list[dict[str, Any]]:
    """One row per repeat: hardware accuracy, the baselines and the drops against them."""
    flt = base.float.top1 if base.float else math.nan
    return [{**r, "float_top1": flt, "fake_quant_top1": base.fake_quant.top1, "ideal_top1": base.ideal.top1,
             "drop_vs_float": flt - r["top1"], "drop_vs_ideal": base.ideal.top1 - r["top1"]} for r in run.repeats]


def check_point(config: BaseSection, where: str, layer_names: dict[str, list[str]]) -> None:
    """The checks of a sweep point that only its run would make otherwise (for ``sweep --dry-run``): the device
    exists, every custom noise function loads and is callable (and no ``finetune`` is asked under one), and the
    hardware's per-layer overrides match layers of the point's model (built without weights or data and traced;
    ``layer_names`` keeps each model's names across points). A model file that declares no input shape leaves the
    overrides to the run."""
    try:
        check_device(config.device)
    except PhotosimError as exc:
        raise PhotosimError(f"{where}: {exc}") from None
    hw = config.hw
    custom = {s.noise.custom.function for s in (hw, *hw.layers) if s.noise is not None} - {None}
    for spec in custom:
        if not callable(load_object(spec, "custom noise")):
            raise PhotosimError(f"{where}: custom noise function {spec!r} is not callable; name a function "
                                "f(p, context) -> perturbed p.")
    if custom and config.finetune is not None:
        raise PhotosimError(f"{where}: custom noise {', '.join(sorted(custom))} cannot be modelled in the fine-tuning "
                            "graph; fine-tune under a config of the same std without noise.custom (e.g. output "
                            "noise), or drop `finetune` from this point.")
    if not hw.layers:
        return
    key = json.dumps([config.model, config.num_classes, config.cifar_stem])
    if key not in layer_names:
        loaded = load_model(config.model, None, config.num_classes, config.cifar_stem)
        shape = loaded.input_shape
        layer_names[key] = [] if shape is None else [n.name for n in capture(loaded.module,
                                                                            torch.zeros(1, *shape)).nodes]
    unmatched = hw.unmatched_overrides(layer_names[key]) if layer_names[key] else []
    if unmatched:
        raise PhotosimError(f"{where}: hardware layer override(s) {unmatched} match no layer of {config.model}; "
                            f"layers: {', '.join(layer_names[key])}.")


def run_point(point: dict[str, Any], cache: dict[str, Any]) -> list[dict[str, Any]]:
    """One sweep point (see photosim.experiments.sweep) -> one row per repeat. ``cache`` keeps, across the
    points of a worker, the quantized model of each MODEL_KEYS combination (the sweep groups points by the
    same keys), its fine-tuned versions per (hw, finetune, device), and the test split and baselines of each
    ``limit``, judged model and requantization (HardwareConfig.ideal)."""
    key = json.dumps({k: point[k] for k in MODEL_KEYS}, sort_keys=True, default=str)
    if key not in cache:
        loaded = load_model(point["model"], point["weights"], point["num_classes"], point["cifar_stem"])
        data = DataSpec(point["data"], point["data_root"], point["download"])
        qmodel = quantize_loaded(loaded, data, load_config(QuantSpec, point["quant"]),
                                 num_classes=point["num_classes"], cifar_stem=point["cifar_stem"])
        cache[key] = {"loaded": loaded, "qmodel": qmodel, "data": data, "tests": {}, "baselines": {}, "tuned": {},
                      "calibration": data.split("calibration", loaded.input_shape)}
    entry = cache[key]
    limit, hw = point["limit"], load_hardware(point["hw"])
    if limit not in entry["tests"]:
        entry["tests"][limit] = replace(entry["data"], limit=limit).split("test", entry["loaded"].input_shape)
    test = entry["tests"][limit]
    judged, qmodel = _judged_model(point, hw, entry)
    rounding = hw.ideal().model_dump_json()
    if (judged, limit, rounding) not in entry["baselines"]:
        entry["baselines"][judged, limit, rounding] = baselines(qmodel, test, hw, entry["loaded"].module,
                                                                batch_size=point["batch_size"], device=point["device"])
    run = run_hardware(qmodel, test, hw, calibration=entry["calibration"], repeats=point["repeats"],
                       seed=point["seed"], batch_size=point["batch_size"], device=point["device"])
    return comparison_rows(entry["baselines"][judged, limit, rounding], run)


def _judged_model(point: dict[str, Any], hw: HardwareConfig, entry: dict[str, Any]) -> tuple[str, QuantizedModel]:
    """The model a point judges and its cache key: the PTQ model (``ptq``) or, with a ``finetune`` section, that
    PTQ model fine-tuned under the point's hardware (photosim.finetune), trained once per (hw, finetune, device)."""
    if point.get("finetune") is None:
        return "ptq", entry["qmodel"]
    from photosim.experiments.finetune import finetune

    settings = FinetuneSection.model_validate(point["finetune"])

    key = json.dumps({"hw": hw.model_dump(mode="json"), "finetune": settings.model_dump(mode="json"),
                      "device": point["device"]}, sort_keys=True)
    if key not in entry["tuned"]:
        loaded, calibration = entry["loaded"], entry["calibration"]
        train = entry["data"].split("train", loaded.input_shape) if settings.labels else calibration
        entry["tuned"][key] = finetune(loaded.module, train, point["quant"], hw, **settings.model_dump(),
                                       device=point["device"], calibration_data=calibration,
                                       ptq_model=entry["qmodel"])
    return key, entry["tuned"][key]
