"""Commands that ask which layers need the bits: per-layer sensitivity and the mixed-precision search."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from photosim._config import MAX_REPEATS
from photosim.cli.common import (
    ABitsOpt,
    BatchOpt,
    BiasBitsOpt,
    CalibOpt,
    CifarStemOpt,
    ConfigOpt,
    DataOpt,
    DataRootOpt,
    DownloadOpt,
    LimitOpt,
    MetricOpt,
    ModelOpt,
    NumClassesOpt,
    ObserverOpt,
    PercentileOpt,
    PerTensorOpt,
    TestOpt,
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
def sensitivity(
    model: ModelOpt = "digits-resnet", weights: WeightsOpt = None, num_classes: NumClassesOpt = None,
    cifar_stem: CifarStemOpt = False, data: DataOpt = "digits", data_root: DataRootOpt = None,
    download: DownloadOpt = False, limit: LimitOpt = None, config: ConfigOpt = None, w_bits: WBitsOpt = None,
    a_bits: ABitsOpt = None, bias_bits: BiasBitsOpt = None, observer: ObserverOpt = None,
    percentile: PercentileOpt = None, per_tensor: PerTensorOpt = False, calib_samples: CalibOpt = None,
    bits: Annotated[int | None, typer.Option(help="Bits given to the probed layer, 2..16 (see --bits-of).")] = None,
    bits_of: Annotated[str, typer.Option(help="What --bits narrows: both, weights or activations.")] = "both",
    hw: Annotated[Path | None, typer.Option(
        "--hw", help="Hardware YAML or preset given to the probed layer alone (the others stay ideal).")] = None,
    metric: MetricOpt = "agreement", test: TestOpt = False,
    repeats: Annotated[int, typer.Option(min=1, max=MAX_REPEATS, help="Monte Carlo repeats when --hw is noisy.")] = 1,
    seed: Annotated[int, typer.Option(min=0, help="Seed of every noise stream.")] = 0,
    batch_size: BatchOpt = 256,
    report: Annotated[Path | None, typer.Option(help="Write the ranking as CSV.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a bar chart of the drops (PNG).")] = None,
) -> None:
    """Rank layers by the fidelity lost when only that layer is narrowed (--bits) or gets the hardware (--hw).

    The base configuration is --config and the quantization flags (default W8A8); the drops are against it,
    on the calibration images, label-free; --test adds test-split accuracy.
    """
    from photosim.experiments.plot import plot_format
    from photosim.experiments.report import in_percent, write_csv_atomic
    from photosim.experiments.sensitivity import layer_sensitivity, plot_sensitivity
    from photosim.experiments.workflow import DataSpec
    from photosim.frontend.models import load_model

    preflight({"--report": report, "--plot": plot}, {"--hw": hw, **model_inputs(model, weights, config)})
    if plot:
        plot_format(plot)  # an unknown format is refused before the work
    parts = {"both": ("w_bits", "a_bits"), "weights": ("w_bits",), "activations": ("a_bits",)}
    if bits_of not in parts:
        raise PhotosimError(f"--bits-of must be both, weights or activations, not {bits_of!r}.")
    probe = {key: bits for key in parts[bits_of]}
    spec = quant_spec(config, per_tensor, w_bits=w_bits, a_bits=a_bits, bias_bits=bias_bits, observer=observer,
                       percentile=percentile, calibration_samples=calib_samples)
    loaded = load_model(model, weights, num_classes, cifar_stem)
    data_spec = DataSpec(data, data_root, download, limit)
    result = layer_sensitivity(
        loaded.module, data_spec.split("calibration", loaded.input_shape), spec, **probe, hw=hw, metric=metric,
        test=data_spec.split("test", loaded.input_shape) if test else None, repeats=repeats, seed=seed,
        batch_size=batch_size, progress=True)
    what = " and ".join(filter(None, [bits and f"{'/'.join(parts[bits_of])} = {bits}", hw and f"hardware {hw}"]))
    base = result.base
    console.print(f"{model} W{spec.w_bits}A{spec.a_bits}, each layer alone with {what}; base: agreement "
                  f"{100 * base.agreement:.2f}%, output SNR {base.snr_db:.1f} dB"
                  + (f", test top-1 {100 * base.test_top1:.2f}%" if base.test_top1 is not None else ""))
    print_table(f"layers by {metric} drop (agreement and test top-1 drops in points, SNR loss in dB)",
                _sensitivity_view(result.layers))
    if report:
        write_csv_atomic(in_percent(result.layers), report)
    if plot:
        console.print(f"wrote {plot_sensitivity(result, metric, plot, title=f'{model}: each layer alone with {what}')}")


def _sensitivity_view(table: pd.DataFrame) -> pd.DataFrame:
    """The printed columns of a sensitivity ranking: drops in points and dB (the CSV has every column)."""
    columns = ["rank", "layer", "op", "macs", "w_bits", "a_bits", "agreement_drop", "snr_loss_db"]
    view = table[columns + (["test_drop"] if "test_drop" in table else [])].copy()
    view["w_bits"] = [("" if pd.isna(b) else str(b)) for b in view["w_bits"]]
    view["agreement_drop"] *= 100
    if "test_drop" in view:
        view["test_drop"] *= 100
    return view


@app.command("mixed-precision")
@handles_errors
def mixed_precision(
    output: Annotated[Path, typer.Option("--output", "-o", help="Quantization YAML to write (use it with --config).")],
    target: Annotated[float, typer.Option(help="Top-1 agreement with the float model to keep on the calibration "
                                               "images, a fraction in (0, 1].")] = 0.99,
    choices: Annotated[str, typer.Option(help="Comma-separated bit widths a layer may take.")] = "8,6,5,4,3",
    model: ModelOpt = "digits-resnet", weights: WeightsOpt = None, num_classes: NumClassesOpt = None,
    cifar_stem: CifarStemOpt = False, data: DataOpt = "digits", data_root: DataRootOpt = None,
    download: DownloadOpt = False, limit: LimitOpt = None, config: ConfigOpt = None, bias_bits: BiasBitsOpt = None,
    observer: ObserverOpt = None, percentile: PercentileOpt = None, per_tensor: PerTensorOpt = False,
    calib_samples: CalibOpt = None, test: TestOpt = False,
) -> None:
    """Choose per-layer weight and activation bits that keep --target agreement at the fewest bits per MAC.

    Greedy on layer sensitivity (label-free, calibration images); writes an ordinary quantization YAML with
    per-layer overrides. --config gives the other settings (observers, ...); --test reports test accuracy.
    """
    from photosim._files import write_text_atomic
    from photosim.experiments.mixed_precision import search_mixed_precision
    from photosim.experiments.workflow import DataSpec
    from photosim.frontend.models import load_model
    from photosim.ir.summary import bits_per_mac, layer_table

    preflight({"--output": output}, model_inputs(model, weights, config))
    try:
        widths = tuple(int(part) for part in choices.split(","))
    except ValueError:
        raise PhotosimError(f"--choices must be comma-separated integers such as 8,6,4,3, not {choices!r}.") from None
    spec = quant_spec(config, per_tensor, bias_bits=bias_bits, observer=observer, percentile=percentile,
                       calibration_samples=calib_samples)
    loaded = load_model(model, weights, num_classes, cifar_stem)
    data_spec = DataSpec(data, data_root, download, limit)
    result = search_mixed_precision(loaded.module, data_spec.split("calibration", loaded.input_shape), target, spec,
                                    choices=widths, test=data_spec.split("test", loaded.input_shape) if test else None,
                                    progress=True)
    write_text_atomic(output, result.yaml())
    table = layer_table(result.qmodel)
    print_table("chosen bits (in: input activation bits)", table[table["macs"] > 0][
        ["layer", "op", "macs", "in_bits", "w_bits", "a_bits"]])
    w, a = bits_per_mac(result.qmodel)
    console.print(f"agreement {100 * result.score.agreement:.2f}% (target {100 * target:.2f}%) at {w:.2f} weight and "
                  f"{a:.2f} input bits per MAC (from {result.base_cost:.2f}); {plural(result.trials, 'trial')}"
                  + (f"; test top-1 {100 * result.score.test_top1:.2f}% (at {max(widths)} bits "
                     f"{100 * result.base.test_top1:.2f}%)" if result.score.test_top1 is not None else ""))
    console.print(f"wrote {output}; use it with `photosim quantize --model {model} --config {output} -o m.safetensors`")
