"""Running an integer model: accuracy on the ideal engine and on simulated hardware, and the link budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer

from photosim._config import MAX_REPEATS
from photosim._files import spec_file
from photosim.cli.common import (
    ABitsOpt,
    ActivationRangeOpt,
    AdcRangeOpt,
    BackendOpt,
    BatchOpt,
    BiasBitsOpt,
    CalibOpt,
    CifarStemOpt,
    ConfigOpt,
    DataOpt,
    DataRootOpt,
    DownloadOpt,
    HwOpt,
    LimitOpt,
    ModelOpt,
    NumClassesOpt,
    ObserverOpt,
    OutputBitsOpt,
    PercentileOpt,
    PerTensorOpt,
    PtqOpt,
    WBitsOpt,
    WeightsOpt,
    app,
    console,
    handles_errors,
    model_inputs,
    plural,
    preflight,
    print_table,
    quant_spec,
)
from photosim.errors import PhotosimError


@app.command()
@handles_errors
def run(
    ctx: typer.Context,
    model_file: Annotated[Path | None, typer.Argument(help="Integer model file; omit to quantize --model.")] = None,
    model: ModelOpt = "digits-resnet", weights: WeightsOpt = None, num_classes: NumClassesOpt = None,
    cifar_stem: CifarStemOpt = False, data: DataOpt = "digits", data_root: DataRootOpt = None,
    download: DownloadOpt = False, limit: LimitOpt = None, config: ConfigOpt = None, w_bits: WBitsOpt = None,
    a_bits: ABitsOpt = None, bias_bits: BiasBitsOpt = None, observer: ObserverOpt = None,
    percentile: PercentileOpt = None, per_tensor: PerTensorOpt = False, calib_samples: CalibOpt = None,
    ptq: PtqOpt = None, activation_range: ActivationRangeOpt = None, output_bits: OutputBitsOpt = None,
    hw: HwOpt = None,
    requant: Annotated[str | None, typer.Option(
        help="Requantization: float, fixedpoint, pytorch or onnxruntime.")] = None,
    noise: Annotated[float | None, typer.Option(help="Output (detector) noise sigma, fraction of full scale.")] = None,
    tile: Annotated[int | None, typer.Option(help="Dot-product length L of one optical core.")] = None,
    adc_bits: Annotated[int | None, typer.Option(help="Per-tile ADC bits (default: none, an ideal readout).")] = None,
    adc_range: AdcRangeOpt = None,
    acc_bits: Annotated[int | None, typer.Option(help="Accumulator bits.")] = None,
    overflow: Annotated[str | None, typer.Option(help="Accumulator overflow: wrap, saturate or none.")] = None,
    repeats: Annotated[int, typer.Option(min=1, max=MAX_REPEATS, help="Monte Carlo repeats (simulated chips).")] = 1,
    seed: Annotated[int, typer.Option(min=0, help="Seed of every noise stream.")] = 0,
    batch_size: BatchOpt = 256,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    backend: BackendOpt = None,
    report: Annotated[Path | None, typer.Option(help="Write the accuracy table as CSV.")] = None,
    layer_report: Annotated[Path | None, typer.Option(
        help="Write the per-layer diagnostics as CSV (with the backend that ran each layer).")] = None,
    float_model: Annotated[str | None, typer.Option(
        help="Float model of MODEL_FILE for the float baseline (same forms as --model; --weights, --num-classes "
             "and --cifar-stem apply to it). Without it only built-in and torchvision: sources are rebuilt.")] = None,
) -> None:
    """Accuracy of an integer model on the ideal integer engine and on simulated hardware.

    With no arguments: the demo (digits-resnet, 8 bits, digits test split). A model file never runs code:
    its float baseline is rebuilt only from built-in and torchvision: names, or from --float-model.
    """
    from photosim.engine.backends import check_names
    from photosim.engine.executor import check_device
    from photosim.experiments.report import write_csv_atomic
    from photosim.experiments.workflow import (
        RUN_SETTINGS,
        DataSpec,
        baselines,
        comparison_rows,
        quantize_loaded,
        run_hardware,
    )
    from photosim.frontend.models import load_model
    from photosim.hardware.config import hardware_with_flags, load_hardware
    from photosim.ir.format import load

    if float_model is not None and model_file is None:
        raise PhotosimError(f"--float-model {float_model!r} needs a model file (photosim run FILE --float-model "
                            "...); without one, --model is quantized and is itself the float baseline.")
    if model_file is not None:
        _refuse_quantization_flags(ctx, model_file, float_model is not None)
    preflight({"--report": report, "--layer-report": layer_report},
              {"MODEL_FILE": model_file, "--hw": hw, "--float-model": spec_file(float_model),
               **model_inputs(model, weights, config)})
    check_device(device)
    check_names(backend or [])
    hw_config = hardware_with_flags(load_hardware(hw), requant=requant, noise=noise, tile=tile, adc_bits=adc_bits,
                                    adc_range=adc_range, acc_bits=acc_bits, overflow=overflow)
    data_spec = DataSpec(data, data_root, download, limit)
    if model_file is not None:
        qmodel = load(model_file)
        float_module = _file_float_model(qmodel, float_model, weights, num_classes, cifar_stem)
        source = str(model_file)
    else:
        spec = quant_spec(config, per_tensor, w_bits=w_bits, a_bits=a_bits, bias_bits=bias_bits,
                           observer=observer, percentile=percentile, calibration_samples=calib_samples, ptq=ptq,
                           activation_range=activation_range, output_bits=output_bits)
        loaded = load_model(model, weights, num_classes, cifar_stem)
        qmodel = quantize_loaded(loaded, data_spec, spec, num_classes=num_classes, cifar_stem=cifar_stem,
                                 progress=True)
        float_module, source = loaded.module, f"{model} W{spec.w_bits}A{spec.a_bits}"
    test = data_spec.split("test", qmodel.input_shape)
    calibration = data_spec.split("calibration", qmodel.input_shape)
    base = baselines(qmodel, test, hw_config, float_module, batch_size=batch_size, device=device,
                     progress=True, backend=backend or ())
    hw_run = run_hardware(qmodel, test, hw_config, calibration=calibration, repeats=repeats, seed=seed,
                          batch_size=batch_size, device=device, progress=True, backend=backend or ())
    table = accuracy_table(base, hw_run, comparison_rows(base, hw_run), hw_config.requant, batch_size)
    console.print(f"{source} on {data} test ({plural(base.fake_quant.n, 'image')}), {plural(repeats, 'repeat')}, "
                  f"seed {seed}; ADC: {adc_header(hw_config, hw_run.layers)}")
    if float_module is None:
        console.print(f"float baseline skipped: {source} was not quantized from a built-in or torchvision: model "
                      "with its recorded weights, and photosim never runs code named in a model file; give "
                      "--float-model path.py:Net --weights w.pt to compare with the float model.")
    _print_sigmas(hw_run.layers)
    print_table("accuracy (top-1; drops in points)", table.drop(columns=["batch_size", *RUN_SETTINGS]))
    if not hw_run.layers.empty:
        grouped = hw_run.layers.drop(columns="repeat").groupby("layer", sort=False)
        first = grouped[[c for c in ("adc_bits", "adc_range", "backend") if c in hw_run.layers]].first()
        mean = grouped.mean(numeric_only=True).drop(columns=list(first), errors="ignore").join(first).reset_index()
        columns = ["layer", "adc_bits", "adc_range", "adc_range_fraction", "overflow_rate", "adc_clip_rate", "snr_db",
                   "snr_db_budget", "snr_fs_db", "enob", "acc_bits_worst_case", "acc_bits_observed", "backend"]
        print_table("per layer, mean over repeats", mean[[c for c in columns if c in mean]])
    if report:
        write_csv_atomic(table, report)
    if layer_report:
        write_csv_atomic(hw_run.layers, layer_report)


QUANTIZATION_FLAGS = {"model": "--model", "config": "--config", "w_bits": "--w-bits", "a_bits": "--a-bits",
                      "bias_bits": "--bias-bits", "observer": "--observer", "percentile": "--percentile",
                      "per_tensor": "--per-tensor", "calib_samples": "--calib-samples", "ptq": "--ptq",
                      "activation_range": "--activation-range", "output_bits": "--output-bits"}  # quantize --model
FLOAT_MODEL_FLAGS = {"weights": "--weights", "num_classes": "--num-classes", "cifar_stem": "--cifar-stem"}


def _refuse_quantization_flags(ctx: typer.Context, model_file: Path, float_model: bool) -> None:
    """Refuse, by name, the flags given with MODEL_FILE that only shape a model ``run`` quantizes itself (and
    without --float-model those of the float model), instead of ignoring them."""
    given = [flag for name, flag in {**QUANTIZATION_FLAGS, **({} if float_model else FLOAT_MODEL_FLAGS)}.items()
             if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"]  # typer's own click
    if given:
        raise PhotosimError(f"{', '.join(given)} do(es) not apply to MODEL_FILE {str(model_file)!r}: the file is "
                            "already quantized, so the quantization flags (and without --float-model, --weights, "
                            "--num-classes and --cifar-stem) would be ignored. Drop them, quantize again with "
                            "`photosim quantize`, or give --float-model for the float baseline's flags.")


def _file_float_model(qmodel: Any, spec: str | None, weights: Path | None, num_classes: int | None,
                      cifar_stem: bool) -> Any:
    """The float baseline of a model file: ``--float-model`` when given, else what its provenance safely allows."""
    from photosim.experiments.workflow import source_model
    from photosim.frontend.models import load_model

    if spec is None:
        return source_model(qmodel)
    return load_model(spec, weights, num_classes, cifar_stem).module


def accuracy_table(base: Any, hw_run: Any, rows: list[dict[str, Any]], requant: str, batch_size: int) -> pd.DataFrame:
    """The run table: one row per stage with top-1 (mean, std, 95% CI over repeats) and the drops, each row with
    the settings the integer codes depend on (batch size and photosim.experiments.workflow.run_settings)."""
    from photosim.experiments.report import summarize
    from photosim.experiments.workflow import RUN_SETTINGS

    flt = base.float.top1 if base.float else float("nan")
    stages = [("float", base.float), ("fake-quant", base.fake_quant), (f"integer ({requant})", base.ideal)]
    table = [{"stage": name, "top1": r.top1, "std": None, "ci95": None, "drop_vs_float": flt - r.top1,
              "drop_vs_ideal": base.ideal.top1 - r.top1} for name, r in stages if r is not None]
    if not hw_run.layers.empty:
        frame = pd.DataFrame(rows).assign(stage="hardware")
        s = summarize(frame, ["stage"], ["top1", "drop_vs_float", "drop_vs_ideal"]).iloc[0]
        energy = {k: rows[0][k] for k in ("energy_per_inference_J", "energy_per_mac_J") if k in rows[0]}
        table.append({"stage": f"hardware ({plural(int(s['n']), 'repeat')})", "top1": s["top1_mean"],
                      "std": s["top1_std"], "ci95": s["top1_ci95"], "drop_vs_float": s["drop_vs_float_mean"],
                      "drop_vs_ideal": s["drop_vs_ideal_mean"], **energy})
    frame = pd.DataFrame(table).assign(batch_size=batch_size, **{k: hw_run.repeats[0][k] for k in RUN_SETTINGS})
    percent = ["top1", "std", "ci95", "drop_vs_float", "drop_vs_ideal"]
    frame[percent] = frame[percent].astype(float) * 100
    return frame


def adc_header(hw: Any, layers: pd.DataFrame) -> str:
    """The ADC the run simulated, for the header line: bits and range of the global settings, with the modes of
    layers whose overrides differ, and how to change it."""
    from photosim.hardware.config import ADC_RANGE_DEFAULT, describe_adc

    text = describe_adc(hw.adc)
    modes = list(dict.fromkeys(layers["adc_range"])) if not layers.empty and "adc_range" in layers else []
    if hw.layers and len(modes) > 1:
        text += f" (per-layer overrides: ranges {', '.join(modes)})"
    if hw.adc.bits is not None and hw.adc.range == ADC_RANGE_DEFAULT:
        text += "; --adc-range calibrated or a fraction of full scale narrows it"
    return text


def _print_sigmas(layers: pd.DataFrame) -> None:
    """Show the output-noise sigma each layer uses (it may have been given as snr_db or enob)."""
    if layers.empty or not (layers["output_sigma"] > 0).any():
        return
    sigmas = layers.groupby("layer", sort=False)["output_sigma"].first()
    console.print("output noise sigma used: " + ", ".join(f"{k} {v:.3g}" for k, v in sigmas.items()))


@app.command()
@handles_errors
def budget(
    model_file: Annotated[Path, typer.Argument(help="Integer model file (photosim quantize).")],
    hw: Annotated[Path, typer.Option("--hw", help="Hardware YAML with a photonics section, or a preset by name.")],
    report: Annotated[Path | None, typer.Option(help="Write the full per-layer table as CSV.")] = None,
) -> None:
    """Per layer: optical powers, each noise term, SNR and effective bits at full scale, the dominant noise
    source, bank loads, time per batch, and energy per MAC and per inference; then the model's totals, latency,
    throughput, TOPS and TOPS/W at photonics.batch_size (formulas: docs/photonics.md)."""
    from photosim.experiments.budget import ENERGY_PARTS, budget_table, energy_totals
    from photosim.experiments.report import write_csv_atomic
    from photosim.hardware.config import load_hardware
    from photosim.ir.format import load

    preflight({"--report": report}, {"MODEL_FILE": model_file, "--hw": hw})
    hw_config = load_hardware(hw)
    table = budget_table(load(model_file), hw_config)
    if table.empty:
        raise PhotosimError(f"{hw}: no layer has a photonics section, so there is no link budget; add one "
                            "(docs/photonics.md) or use a photonic preset.")
    shown = {"layer": "layer", "tile": "L", "detector_power_mW": "P_det mW", "sigma_shot": "shot",
             "sigma_thermal": "thermal", "sigma_rin": "RIN", "sigma_adc": "ADC", "sigma_weight": "weight",
             "snr_db": "SNR dB", "enob": "ENOB", "dominant_noise": "dominant", "loads": "loads",
             "latency_per_batch_s": "s/batch", "energy_per_mac_J": "J/MAC", "energy_per_inference_J": "J/inference"}
    print_table("link budget per layer (noise std as a fraction of the tile's full scale, full-scale inputs; "
                "all columns: --report)", table[list(shown)].rename(columns=shown))
    totals, first = energy_totals(table), table.iloc[0]
    console.print(f"energy per inference {totals['energy_per_inference_J']:.4g} J ("
                  + ", ".join(f"{name.removesuffix('_J')} {totals[name]:.3g}" for name in ENERGY_PARTS)
                  + f"), per MAC {totals['energy_per_mac_J']:.4g} J")
    area = f", {totals['TOPS_per_mm2']:.4g} TOPS/mm2" if "TOPS_per_mm2" in totals else ""
    console.print(f"batch of {first['batch_size']} on {plural(int(first['cores']), 'core')}: "
                  f"{plural(int(table['loads'].sum()), 'bank load')}, {totals['latency_per_batch_s']:.4g} s per batch, "
                  f"{totals['inferences_per_s']:.4g} inferences/s, {totals['TOPS']:.4g} TOPS, "
                  f"{totals['TOPS_per_W']:.4g} TOPS/W{area}")
    if report:
        write_csv_atomic(table, report)
        console.print(f"wrote {report}")
