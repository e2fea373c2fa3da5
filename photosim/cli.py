"""The `photosim` command line: a thin typer layer over the Python API.

Exit codes: 0 success, 2 bad input (a one-paragraph message, no traceback), 1 internal error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from photosim._config import load_config, with_overrides
from photosim._files import Paths, check_outputs, reject_directory, spec_file
from photosim.errors import PhotosimError

app = typer.Typer(
    help="Quantize PyTorch models to integers and measure their accuracy on simulated photonic hardware.",
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)
# markup off: file names, model specs and messages are user text, and "[/x]" must print as itself
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)
F = TypeVar("F", bound=Callable[..., Any])

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Built-in name, torchvision:NAME or path/file.py:NAME.")]
WeightsOpt = Annotated[
    Path | None, typer.Option(help="state_dict file (or checkpoint with 'state_dict'/'model') to load.")
]
NumClassesOpt = Annotated[int | None, typer.Option(help="Number of classes of a torchvision model.")]
CifarStemOpt = Annotated[bool, typer.Option(help="Give a torchvision ResNet the 3x3 stride-1 stem for 32x32 inputs.")]
DataOpt = Annotated[
    str, typer.Option(help="digits, mnist, fashion-mnist, cifar10, imagefolder:PATH or synthetic.")
]
DataRootOpt = Annotated[str | None, typer.Option(help="Folder holding torchvision datasets.")]
DownloadOpt = Annotated[bool, typer.Option(help="Download a torchvision dataset when missing.")]
LimitOpt = Annotated[int | None, typer.Option(help="Evaluate on the first N test images only.")]
ConfigOpt = Annotated[Path | None, typer.Option(help="Quantization YAML (keys of QuantSpec); flags override it.")]
WBitsOpt = Annotated[int | None, typer.Option(help="Weight bits, 2..16 (default 8).")]
ABitsOpt = Annotated[int | None, typer.Option(help="Activation bits, 2..16 (default 8).")]
BiasBitsOpt = Annotated[int | None, typer.Option(help="Integer bias bits, 8..64 (default 32).")]
ObserverOpt = Annotated[str | None, typer.Option(help="Activation observer: minmax, percentile or mse.")]
PercentileOpt = Annotated[float | None, typer.Option(help="Percentile for --observer percentile (e.g. 99.99).")]
PerTensorOpt = Annotated[bool, typer.Option(help="One weight scale per tensor instead of per output channel.")]
CalibOpt = Annotated[int | None, typer.Option(help="Calibration images (default 512).")]
PtqOpt = Annotated[str | None, typer.Option(
    help="Error-correcting PTQ algorithms, comma-separated: equalize, bias_correction and one of gptq, gpfq; "
         "or auto (the combination agreeing best with the float model on calibration data). See docs/ptq.md.")]
ActivationRangeOpt = Annotated[str | None, typer.Option(
    help="Activations that can be negative: affine (zero point, the default) or symmetric.")]
OutputBitsOpt = Annotated[int | None, typer.Option(help="Least activation bits of the graph output (default 8).")]
BatchOpt = Annotated[int, typer.Option(min=1, help="Images per batch (bounds memory).")]


def handles_errors(command: F) -> F:
    """Turn PhotosimError into a one-paragraph message on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PhotosimError as exc:
            err_console.print(Text.assemble(("error:", "bold red"), f" {exc}"), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def preflight(outputs: Paths, inputs: Paths) -> None:
    """Before any work: input files are not folders, outputs are writable and overwrite no input."""
    for flag, path in inputs.items():
        if path is not None:
            reject_directory(path, flag)
    check_outputs(outputs, inputs)


def model_inputs(model: str | None, weights: Path | None, config: Path | None = None) -> dict[str, Path | None]:
    """The files a model (and quantization) is read from, keyed by their flag."""
    return {"--model": spec_file(model), "--weights": weights, "--config": config}


def _quant_spec(config: Path | None, per_tensor: bool, **flags: Any) -> Any:
    """The QuantSpec of ``--config`` with the given flags (QuantSpec keys; None: not given) replacing its keys."""
    from photosim.frontend.qconfig import QuantSpec

    return with_overrides(load_config(QuantSpec, config), weight_granularity="per_tensor" if per_tensor else None,
                          **flags)


def print_table(title: str, frame: pd.DataFrame) -> None:
    """Render a DataFrame as a rich table (floats to 4 significant digits)."""
    table = Table(title=title, title_justify="left")
    for col in frame.columns:
        table.add_column(str(col), justify="right" if pd.api.types.is_numeric_dtype(frame[col]) else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*("" if v is None or (isinstance(v, float) and pd.isna(v)) else
                        f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    console.print(table)


def _percent(result: Any) -> str:
    return f"{100 * result.top1:.2f}%"


@app.command()
@handles_errors
def models() -> None:
    """List the built-in models with input shape, parameters and float accuracy."""
    from photosim.frontend.models import list_models

    frame = pd.DataFrame([
        {"name": m.name, "input": "x".join(map(str, m.input_shape)), "classes": m.num_classes,
         "parameters": m.num_parameters(), "float accuracy": f"{100 * m.float_accuracy:.2f}%",
         "description": m.description}
        for m in list_models()
    ])
    print_table("built-in models (digits test split)", frame)


@app.command("eval")
@handles_errors
def eval_float(
    model: ModelOpt = "digits-resnet", weights: WeightsOpt = None, num_classes: NumClassesOpt = None,
    cifar_stem: CifarStemOpt = False, data: DataOpt = "digits", data_root: DataRootOpt = None,
    download: DownloadOpt = False, limit: LimitOpt = None, batch_size: BatchOpt = 256,
) -> None:
    """Float accuracy of a model on the test split."""
    from photosim.experiments.workflow import DataSpec, float_accuracy
    from photosim.frontend.models import load_model

    preflight({}, model_inputs(model, weights))
    loaded = load_model(model, weights, num_classes, cifar_stem)
    test = DataSpec(data, data_root, download, limit).split("test", loaded.input_shape)
    result = float_accuracy(loaded.module, test, batch_size, progress=True)
    console.print(f"{model} on {data} test ({result.n} images): float top-1 {_percent(result)}")


@app.command("quantize")
@handles_errors
def quantize_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="Integer model file to write (.safetensors).")],
    model: ModelOpt = "digits-resnet", weights: WeightsOpt = None, num_classes: NumClassesOpt = None,
    cifar_stem: CifarStemOpt = False, data: DataOpt = "digits", data_root: DataRootOpt = None,
    download: DownloadOpt = False, limit: LimitOpt = None, config: ConfigOpt = None, w_bits: WBitsOpt = None,
    a_bits: ABitsOpt = None, bias_bits: BiasBitsOpt = None, observer: ObserverOpt = None,
    percentile: PercentileOpt = None, per_tensor: PerTensorOpt = False, calib_samples: CalibOpt = None,
    ptq: PtqOpt = None, activation_range: ActivationRangeOpt = None, output_bits: OutputBitsOpt = None,
    batch_size: BatchOpt = 256,
) -> None:
    """Post-training quantization to an integer model file; prints float and fake-quant test accuracy."""
    from photosim._files import save_model_atomic
    from photosim.experiments.workflow import DataSpec, fake_quant_accuracy, float_accuracy, quantize_loaded
    from photosim.frontend.models import load_model

    preflight({"--output": output}, model_inputs(model, weights, config))
    spec = _quant_spec(config, per_tensor, w_bits=w_bits, a_bits=a_bits, bias_bits=bias_bits,
                        observer=observer, percentile=percentile, calibration_samples=calib_samples, ptq=ptq,
                        activation_range=activation_range, output_bits=output_bits)
    loaded = load_model(model, weights, num_classes, cifar_stem)
    data_spec = DataSpec(data, data_root, download, limit)
    qmodel = quantize_loaded(loaded, data_spec, spec, num_classes=num_classes, cifar_stem=cifar_stem, progress=True)
    save_model_atomic(qmodel, output)
    test = data_spec.split("test", loaded.input_shape)
    flt = float_accuracy(loaded.module, test, batch_size, progress=True)
    fq = fake_quant_accuracy(qmodel, test, batch_size, progress=True)
    console.print(f"wrote {output} (W{spec.w_bits}A{spec.a_bits}, {len(qmodel.nodes)} nodes)")
    console.print(f"test top-1 on {data} ({flt.n} images): float {_percent(flt)}, fake-quant {_percent(fq)} "
                  f"(drop {100 * (flt.top1 - fq.top1):.2f} points)")


@app.command()
@handles_errors
def inspect(path: Annotated[Path, typer.Argument(help="Integer model file.")]) -> None:
    """Per-layer table of an integer model: op, shapes, bits, scales, MACs, worst-case accumulator bits."""
    from photosim.ir.format import load
    from photosim.ir.summary import layer_table

    reject_directory(path, "model file")
    qmodel = load(path)
    q = qmodel.input_q
    console.print(f"{path}: input {'x'.join(map(str, qmodel.input_shape))}, {q.bits}-bit "
                  f"{'signed' if q.signed else 'unsigned'} (scale {q.scale:.4g}, zero point {q.zero_point}); "
                  f"source {qmodel.provenance.get('model', qmodel.provenance.get('source', 'unknown'))}")
    table = layer_table(qmodel)
    compact = pd.DataFrame({
        "layer": table["layer"], "op": table["op"],
        "shape in -> out": table["input_shape"] + " -> " + table["output_shape"],
        "bits in/w/out": [f"{i}/{'-' if pd.isna(w) else int(w)}/{o}"
                          for i, w, o in zip(table["in_bits"], table["w_bits"], table["a_bits"])],
        "out scale": table["output_scale"], "out zp": table["output_zero_point"],
        "w scale": table["weight_scale"].fillna(""), "MACs": table["macs"],
        "acc bits (+bias)": ["" if pd.isna(a) else f"{int(a)} ({int(b)})"
                             for a, b in zip(table["acc_bits"], table["acc_bits_with_bias"])],
    })
    print_table("layers (acc bits: worst case from bit widths, see docs/format.md)", compact)
    console.print(f"total MACs per sample: {int(table['macs'].sum()):,}")


HwOpt = Annotated[Path | None, typer.Option(
    "--hw", help="Hardware YAML file, or a shipped preset by name (photonic-8bit, ...); the flags below override it.")]
MetricOpt = Annotated[str, typer.Option(help="Rank by agreement (top-1 agreement with the float model on the "
                                            "calibration images) or snr (output SNR vs the float logits).")]
TestOpt = Annotated[bool, typer.Option("--test", help="Also score accuracy on the test split (needs labels).")]


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
    repeats: Annotated[int, typer.Option(min=1, help="Monte Carlo repeats when --hw is noisy.")] = 1,
    seed: Annotated[int, typer.Option(min=0, help="Seed of every noise stream.")] = 0,
    batch_size: BatchOpt = 256,
    report: Annotated[Path | None, typer.Option(help="Write the ranking as CSV.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a bar chart of the drops (PNG).")] = None,
) -> None:
    """Rank layers by the fidelity lost when only that layer is narrowed (--bits) or gets the hardware (--hw).

    The base configuration is --config and the quantization flags (default W8A8); the drops are against it,
    on the calibration images, label-free; --test adds test-split accuracy.
    """
    from photosim.experiments.report import write_csv_atomic
    from photosim.experiments.sensitivity import layer_sensitivity, plot_sensitivity
    from photosim.experiments.workflow import DataSpec
    from photosim.frontend.models import load_model

    preflight({"--report": report, "--plot": plot}, {"--hw": hw, **model_inputs(model, weights, config)})
    parts = {"both": ("w_bits", "a_bits"), "weights": ("w_bits",), "activations": ("a_bits",)}
    if bits_of not in parts:
        raise PhotosimError(f"--bits-of must be both, weights or activations, not {bits_of!r}.")
    probe = {key: bits for key in parts[bits_of]}
    spec = _quant_spec(config, per_tensor, w_bits=w_bits, a_bits=a_bits, bias_bits=bias_bits, observer=observer,
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
        write_csv_atomic(result.layers, report)
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
    spec = _quant_spec(config, per_tensor, bias_bits=bias_bits, observer=observer, percentile=percentile,
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
                  f"{a:.2f} input bits per MAC (from {result.base_cost:.2f}); {result.trials} trial(s)"
                  + (f"; test top-1 {100 * result.score.test_top1:.2f}% (at {max(widths)} bits "
                     f"{100 * result.base.test_top1:.2f}%)" if result.score.test_top1 is not None else ""))
    console.print(f"wrote {output}; use it with `photosim quantize --model {model} --config {output} -o m.safetensors`")


@app.command()
@handles_errors
def run(
    model_file: Annotated[Path | None, typer.Argument(help="Integer model file; omit to quantize --model.")] = None,
    model: ModelOpt = "digits-resnet", weights: WeightsOpt = None, num_classes: NumClassesOpt = None,
    cifar_stem: CifarStemOpt = False, data: DataOpt = "digits", data_root: DataRootOpt = None,
    download: DownloadOpt = False, limit: LimitOpt = None, config: ConfigOpt = None, w_bits: WBitsOpt = None,
    a_bits: ABitsOpt = None, bias_bits: BiasBitsOpt = None, observer: ObserverOpt = None,
    percentile: PercentileOpt = None, per_tensor: PerTensorOpt = False, calib_samples: CalibOpt = None,
    ptq: PtqOpt = None, activation_range: ActivationRangeOpt = None, output_bits: OutputBitsOpt = None,
    hw: HwOpt = None,
    requant: Annotated[str | None, typer.Option(help="Requantization: float, fixedpoint or pytorch.")] = None,
    noise: Annotated[float | None, typer.Option(help="Output (detector) noise sigma, fraction of full scale.")] = None,
    tile: Annotated[int | None, typer.Option(help="Dot-product length L of one optical core.")] = None,
    adc_bits: Annotated[int | None, typer.Option(help="Per-tile ADC bits.")] = None,
    acc_bits: Annotated[int | None, typer.Option(help="Accumulator bits.")] = None,
    overflow: Annotated[str | None, typer.Option(help="Accumulator overflow: wrap, saturate or none.")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Monte Carlo repeats (simulated chips).")] = 1,
    seed: Annotated[int, typer.Option(min=0, help="Seed of every noise stream.")] = 0,
    batch_size: BatchOpt = 256,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    report: Annotated[Path | None, typer.Option(help="Write the accuracy table as CSV.")] = None,
    layer_report: Annotated[Path | None, typer.Option(help="Write the per-layer diagnostics as CSV.")] = None,
    float_model: Annotated[str | None, typer.Option(
        help="Float model of MODEL_FILE for the float baseline (same forms as --model; --weights, --num-classes "
             "and --cifar-stem apply to it). Without it only built-in and torchvision: sources are rebuilt.")] = None,
) -> None:
    """Accuracy of an integer model on the ideal integer engine and on simulated hardware.

    With no arguments: the demo (digits-resnet, 8 bits, digits test split). A model file never runs code:
    its float baseline is rebuilt only from built-in and torchvision: names, or from --float-model.
    """
    from photosim.engine.executor import check_device
    from photosim.experiments.report import write_csv_atomic
    from photosim.experiments.workflow import (
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
    preflight({"--report": report, "--layer-report": layer_report},
              {"MODEL_FILE": model_file, "--hw": hw, "--float-model": spec_file(float_model),
               **model_inputs(model, weights, config)})
    check_device(device)
    hw_config = hardware_with_flags(load_hardware(hw), requant=requant, noise=noise, tile=tile, adc_bits=adc_bits,
                                    acc_bits=acc_bits, overflow=overflow)
    data_spec = DataSpec(data, data_root, download, limit)
    if model_file is not None:
        qmodel = load(model_file)
        float_module = _file_float_model(qmodel, float_model, weights, num_classes, cifar_stem)
        source = str(model_file)
    else:
        spec = _quant_spec(config, per_tensor, w_bits=w_bits, a_bits=a_bits, bias_bits=bias_bits,
                           observer=observer, percentile=percentile, calibration_samples=calib_samples, ptq=ptq,
                           activation_range=activation_range, output_bits=output_bits)
        loaded = load_model(model, weights, num_classes, cifar_stem)
        qmodel = quantize_loaded(loaded, data_spec, spec, num_classes=num_classes, cifar_stem=cifar_stem,
                                 progress=True)
        float_module, source = loaded.module, f"{model} W{spec.w_bits}A{spec.a_bits}"
    test = data_spec.split("test", qmodel.input_shape)
    calibration = data_spec.split("calibration", qmodel.input_shape)
    base = baselines(qmodel, test, hw_config.requant, float_module, batch_size=batch_size, device=device,
                     progress=True)
    hw_run = run_hardware(qmodel, test, hw_config, calibration=calibration, repeats=repeats, seed=seed,
                          batch_size=batch_size, device=device, progress=True)
    table = accuracy_table(base, hw_run, comparison_rows(base, hw_run), hw_config.requant)
    console.print(f"{source} on {data} test ({base.fake_quant.n} images), {repeats} repeat(s), seed {seed}")
    if float_module is None:
        console.print(f"float baseline skipped: {source} was not quantized from a built-in or torchvision: model "
                      "with its recorded weights, and photosim never runs code named in a model file; give "
                      "--float-model path.py:Net --weights w.pt to compare with the float model.")
    _print_sigmas(hw_run.layers)
    print_table("accuracy (top-1; drops in points)", table)
    if not hw_run.layers.empty:
        mean = hw_run.layers.drop(columns="repeat").groupby("layer", sort=False).mean().reset_index()
        columns = ["layer", "overflow_rate", "adc_clip_rate", "snr_db", "snr_db_budget", "enob", "acc_bits_worst_case",
                   "acc_bits_observed"]
        print_table("per layer, mean over repeats", mean[[c for c in columns if c in mean]])
    if report:
        write_csv_atomic(table, report)
    if layer_report:
        write_csv_atomic(hw_run.layers, layer_report)


def _file_float_model(qmodel: Any, spec: str | None, weights: Path | None, num_classes: int | None,
                      cifar_stem: bool) -> Any:
    """The float baseline of a model file: ``--float-model`` when given, else what its provenance safely allows."""
    from photosim.experiments.workflow import source_model
    from photosim.frontend.models import load_model

    if spec is None:
        return source_model(qmodel)
    return load_model(spec, weights, num_classes, cifar_stem).module


def accuracy_table(base: Any, hw_run: Any, rows: list[dict[str, Any]], requant: str) -> pd.DataFrame:
    """The run table: one row per stage with top-1 (mean, std, 95% CI over repeats) and the drops."""
    from photosim.experiments.report import summarize

    flt = base.float.top1 if base.float else float("nan")
    stages = [("float", base.float), ("fake-quant", base.fake_quant), (f"integer ({requant})", base.ideal)]
    table = [{"stage": name, "top1": r.top1, "std": None, "ci95": None, "drop_vs_float": flt - r.top1,
              "drop_vs_ideal": base.ideal.top1 - r.top1} for name, r in stages if r is not None]
    if not hw_run.layers.empty:
        frame = pd.DataFrame(rows).assign(stage="hardware")
        s = summarize(frame, ["stage"], ["top1", "drop_vs_float", "drop_vs_ideal"]).iloc[0]
        energy = {k: rows[0][k] for k in ("energy_per_inference_J", "energy_per_mac_J") if k in rows[0]}
        table.append({"stage": f"hardware ({int(s['n'])} repeats)", "top1": s["top1_mean"], "std": s["top1_std"],
                      "ci95": s["top1_ci95"], "drop_vs_float": s["drop_vs_float_mean"],
                      "drop_vs_ideal": s["drop_vs_ideal_mean"], **energy})
    frame = pd.DataFrame(table)
    percent = ["top1", "std", "ci95", "drop_vs_float", "drop_vs_ideal"]
    frame[percent] = frame[percent].astype(float) * 100
    return frame


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
    source, and energy per MAC and per inference (formulas: docs/photonics.md)."""
    from photosim.experiments.budget import budget_table, energy_totals
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
             "snr_db": "SNR dB", "enob": "ENOB", "dominant_noise": "dominant", "energy_per_mac_J": "J/MAC",
             "energy_per_inference_J": "J/inference"}
    print_table("link budget per layer (noise std as a fraction of the tile's full scale, full-scale inputs; "
                "all columns: --report)", table[list(shown)].rename(columns=shown))
    totals = energy_totals(table)
    console.print(f"energy per inference {totals['energy_per_inference_J']:.4g} J ("
                  + ", ".join(f"{name.removesuffix('_J')} {totals[name]:.3g}" for name in
                              ("laser_J", "modulators_J", "weights_J", "adc_J", "digital_J"))
                  + f"), per MAC {totals['energy_per_mac_J']:.4g} J")
    if report:
        write_csv_atomic(table, report)
        console.print(f"wrote {report}")


@app.command("import-torch")
@handles_errors
def import_torch_cmd(
    spec: Annotated[str, typer.Argument(help="path/to/script.py:function returning (converted GraphModule, "
                                             "input shape).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Integer model file to write.")],
) -> None:
    """Convert a PyTorch quantize_fx model (convert_fx output) into a photosim integer model file."""
    from photosim.frontend.torch_import import import_torch

    preflight({"--output": output}, {"SPEC": spec_file(spec)})
    qmodel = import_torch(spec, output)
    console.print(f"wrote {output} ({len(qmodel.nodes)} nodes); simulate it with `photosim run {output} "
                  "--requant pytorch`")


def main() -> None:
    """Console-script entry point."""
    app()


@app.command()
@handles_errors
def sweep(
    file: Annotated[Path, typer.Argument(help="Sweep YAML: base settings plus grid / zip / variants (experiments/).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Results directory (default runs/<file name>).")
    ] = None,
    executor: Annotated[str, typer.Option(help="Where points run: local (processes) or ray.")] = "local",
    workers: Annotated[
        int | None, typer.Option(help="Parallel workers (default: 1 locally, every cluster CPU with Ray).")
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Address of a running Ray cluster (default: start a local one).")
    ] = None,
    variant: Annotated[list[str] | None, typer.Option("--variant", help="Run only this variant (repeatable).")] = None,
    force: Annotated[bool, typer.Option(help="Replace the results of a different sweep in the directory.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Validate and list the points without running anything.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar with ETA.")] = True,
) -> None:
    """Run a sweep file into results.csv, summary.csv and plots; run it again to resume after a crash.

    A sweep file is a program: a custom noise function it names (hw.noise.custom.function) runs that code
    with your permissions, as a Python script would. Run only sweep files you would run as scripts.

    An empty file is refused; a file with only `base` is one point. --dry-run makes every check of a real
    run. While a run writes into a directory, a second run into it is refused; --force deletes only the
    files photosim wrote there.
    """
    from photosim.experiments.sweep import load_sweep, run_sweep, runnable_points, summary_view

    plan = load_sweep(file)
    selected = runnable_points(plan, variant, executor, workers, address)
    if dry_run:
        print_table(f"{len(selected)} point(s) of {file}", pd.DataFrame([
            {"point": p.index, **({"variant": p.variant} if p.variant else {}), **p.settings, "hash": p.hash}
            for p in selected
        ]))
        return
    out_dir = output or Path("runs") / file.stem
    try:
        result = run_sweep(plan, out_dir, executor=executor, workers=workers, address=address, force=force,
                           progress=progress, variants=variant)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: the finished points are saved in {out_dir}; run the same command again "
                          "to finish the rest.")
        raise typer.Exit(130) from None
    print_table(f"{plan.config.name or file.stem}: mean over repeats", summary_view(result.summary, plan))
    console.print(f"ran {result.ran} point(s), {result.skipped} already finished; wrote {out_dir}/results.csv, "
                  f"summary.csv and {len(result.plots)} plot(s)")


@app.command()
@handles_errors
def plot(
    results: Annotated[Path, typer.Argument(help="results.csv written by photosim sweep.")],
    x: Annotated[str, typer.Option(help="Column on the x axis, e.g. quant.w_bits.")],
    y: Annotated[str, typer.Option(help="Numeric column, averaged over repeats with 95% CI bars.")] = "top1",
    hue: Annotated[list[str] | None, typer.Option(help="Column splitting the data into lines (repeatable).")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="PNG to write, or a folder for the default name "
                                                         "<y>_vs_<x>.png (default: beside the CSV).")
    ] = None,
    pareto: Annotated[bool, typer.Option(help="Mark the Pareto front: lowest x for the highest y (e.g. --x "
                                              "energy_per_inference_J).")] = False,
    log_x: Annotated[bool, typer.Option(help="Log scale on the x axis.")] = False,
) -> None:
    """Plot any view of a sweep's results.csv: mean y vs x, one line per hue value, float baseline dashed."""
    from photosim.experiments.plot import plot_path, plot_results

    preflight({"--output": plot_path(results, x, y, hue, output)}, {"RESULTS": results})
    console.print(f"wrote {plot_results(results, x, y, hue, output, pareto=pareto, log_x=log_x)}")


@app.command()
@handles_errors
def bench(
    model: ModelOpt = "torchvision:resnet18",
    batch: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 128,
    runs: Annotated[int, typer.Option(min=1, help="Timed rounds after one warm-up round; the median counts.")] = 3,
    quick: Annotated[bool, typer.Option(help="Smoke test: batch 8, one round (overrides --batch and --runs).")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    threads: Annotated[int, typer.Option(min=1, help="torch intra-op threads.")] = 2,
    memory: Annotated[bool, typer.Option(help="Measure peak memory, one subprocess per configuration.")] = True,
) -> None:
    """Images/s and peak memory of the engine configurations against float32 PyTorch eval of the same model."""
    from photosim.engine.executor import check_device
    from photosim.experiments.bench import BenchSettings, results_table, run_benchmark

    preflight({"--json": json_path}, {"--model": spec_file(model)})
    check_device(device)
    options = {"model": model, "device": device, "threads": threads, "memory": memory}
    settings = BenchSettings.quick(**options) if quick else BenchSettings(batch=batch, runs=runs, **options)
    result = run_benchmark(settings, json_path=json_path, progress=lambda line: err_console.print(line))
    m = result["machine"]
    print_table(f"{settings.model}, batch {settings.batch}, median of {settings.runs} round(s); {m['cpu']}, "
                f"{m['cores']} cores, {m['threads']} threads, torch {m['torch']} ({m['cpu_capability']}); "
                "engine diagnostics off", results_table(result))
    if json_path:
        console.print(f"wrote {json_path}")
