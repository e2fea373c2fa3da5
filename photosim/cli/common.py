"""What every command shares: the typer app, consoles, option types, error handling (exit 2), output preflight,
tables."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import pandas as pd
import typer
from rich.console import Console, ConsoleDimensions
from rich.table import Table
from rich.text import Text

from photosim._config import load_config, resolve_preset, with_overrides
from photosim._files import Paths, check_outputs, reject_directory, reject_special, spec_file
from photosim.errors import PhotosimError

app = typer.Typer(
    help="Quantize PyTorch models to integers and measure their accuracy on simulated photonic hardware.",
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)
PLAIN_WIDTH = 4096  # the layout width of output that is not a terminal: no line of photosim's reaches it


class PlainWhenPiped(Console):
    """A rich console that, writing to anything but a terminal (a pipe, a file, a test runner), lays out for
    PLAIN_WIDTH columns (and ignores $COLUMNS): tables and lines keep every name and number whole instead of
    cutting them to "features…" at 80 columns. On a terminal it is rich's console, at the terminal's width."""

    @property
    def size(self) -> ConsoleDimensions:
        if not self.is_terminal:
            return ConsoleDimensions(PLAIN_WIDTH, 25)
        return super().size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


# markup off: file names, model specs and messages are user text, and "[/x]" must print as itself
console = PlainWhenPiped(markup=False)
err_console = PlainWhenPiped(stderr=True, markup=False)
F = TypeVar("F", bound=Callable[..., Any])

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Built-in name, torchvision:NAME or path/file.py:NAME.")]
WeightsOpt = Annotated[
    Path | None, typer.Option(help="state_dict file (or checkpoint with 'state_dict'/'model') to load.")
]
NumClassesOpt = Annotated[int | None, typer.Option(help="Number of classes of a torchvision model.")]
CifarStemOpt = Annotated[bool, typer.Option(help="Give a torchvision ResNet the 3x3 stride-1 stem for 32x32 inputs.")]
SYNTHETIC_WARNING = ("warning: --data synthetic draws random inputs with random labels, so every accuracy below "
                     "(float, quantized, hardware) is chance level and its drops are noise; use it to time or "
                     "test the pipeline, not to judge a model (photosim data lists the real datasets).")


def _warn_synthetic(value: str) -> str:
    """--data's callback: warn once that synthetic accuracies mean nothing."""
    if value == "synthetic":
        err_console.print(SYNTHETIC_WARNING, soft_wrap=True, highlight=False)
    return value


DataOpt = Annotated[
    str, typer.Option(callback=_warn_synthetic, help="digits, mnist, fashion-mnist, cifar10, imagefolder:PATH or "
                      "synthetic (random labels: accuracy is meaningless); `photosim data` says which images "
                      "form each split.")
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
    help="Error-correcting PTQ algorithms, comma-separated: equalize, smoothquant, bias_correction and one of "
         "gptq, gpfq, adaround, qdrop; or auto (the combination agreeing best with the float model on calibration "
         "data). See docs/ptq.md.")]
ActivationRangeOpt = Annotated[str | None, typer.Option(
    help="Activations that can be negative: affine (zero point, the default) or symmetric.")]
OutputBitsOpt = Annotated[int | None, typer.Option(help="Least activation bits of the graph output (default 8).")]
BatchOpt = Annotated[int, typer.Option(min=1, help="Images per batch (bounds memory).")]


def handles_errors(command: F) -> F:
    """Turn PhotosimError into a one-paragraph message on stderr and exit code 2; so too any exception raised
    inside the user's own code (a file.py:NAME model, an import script, a custom noise function), each named
    with the user's file and line."""
    from photosim._imports import user_code_location

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PhotosimError as exc:
            message, where = str(exc), user_code_location(exc)
            if where and where not in message:
                message += f" (raised {where})"
            err_console.print(Text.assemble(("error:", "bold red"), f" {message}"), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except Exception as exc:
            where = user_code_location(exc)
            if where is None:
                raise  # photosim's own failure: exit 1 with the traceback
            err_console.print(Text.assemble(("error:", "bold red"), f" your code raised {type(exc).__name__}: {exc} "
                                            f"({where}); fix it there."), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def preflight(outputs: Paths, inputs: Paths) -> None:
    """Before any work: input files are not folders or special files, outputs are writable and overwrite no
    input, including the files the inputs lead to (``indirect_inputs``)."""
    for flag, path in inputs.items():
        if path is not None:
            reject_directory(path, flag)
            reject_special(path, flag)
    check_outputs(outputs, {**inputs, **indirect_inputs(inputs)})


def indirect_inputs(inputs: Paths) -> dict[str, Path]:
    """Files a command reads through its inputs, keyed by a description naming the input: the shipped preset
    a --hw or --config name resolves to, and the weights file a MODEL_FILE's provenance records (``run`` reads
    it for the float baseline)."""
    from photosim.frontend.qconfig import QuantSpec
    from photosim.hardware.config import HardwareConfig

    kinds = {"--hw": HardwareConfig.preset_kind, "--config": QuantSpec.preset_kind}
    found = {}
    for flag, path in inputs.items():
        if path is None:
            continue
        if flag in kinds:
            with contextlib.suppress(PhotosimError):  # neither a file nor a preset: the command says so later
                found[f"the shipped preset of {flag} {str(path)!r}"] = resolve_preset(path, kinds[flag])
        if flag == "MODEL_FILE" and (weights := recorded_weights(Path(path))) is not None:
            found[f"the weights recorded in {flag} {str(path)!r}"] = weights
    return found


def recorded_weights(model_file: Path) -> Path | None:
    """The weights file named in a model file's provenance (read from the header only), else None: no such
    entry, the shipped weights, or not a readable model file (loading it says why)."""
    from safetensors import SafetensorError, safe_open

    from photosim.ir.format import METADATA_KEY, read_json

    if not model_file.is_file():
        return None
    try:
        with safe_open(str(model_file), framework="pt") as handle:
            doc = read_json((handle.metadata() or {}).get(METADATA_KEY, "{}"), str(model_file))
    except (SafetensorError, OSError, ValueError, PhotosimError):
        return None
    provenance = doc.get("provenance") if isinstance(doc, dict) else None
    weights = provenance.get("weights") if isinstance(provenance, dict) else None
    return Path(weights) if isinstance(weights, str) and weights and weights != "builtin" else None


def model_inputs(model: str | None, weights: Path | None, config: Path | None = None) -> dict[str, Path | None]:
    """The files a model (and quantization) is read from, keyed by their flag."""
    return {"--model": spec_file(model), "--weights": weights, "--config": config}


def quant_spec(config: Path | None, per_tensor: bool, **flags: Any) -> Any:
    """The QuantSpec of ``--config`` with the given flags (QuantSpec keys; None: not given) replacing its keys."""
    from photosim.frontend.qconfig import QuantSpec

    return with_overrides(load_config(QuantSpec, config), weight_granularity="per_tensor" if per_tensor else None,
                          **flags)


def print_table(title: str, frame: pd.DataFrame) -> None:
    """Render a DataFrame as a rich table (floats to 4 significant digits)."""
    table = Table(title=title, title_justify="left")
    for col in frame.columns:  # fold, never cut: a narrow terminal wraps a long name rather than ending it in "…"
        table.add_column(str(col), justify="right" if pd.api.types.is_numeric_dtype(frame[col]) else "left",
                         overflow="fold")
    for row in frame.itertuples(index=False):
        table.add_row(*("" if v is None or (isinstance(v, float) and pd.isna(v)) else
                        f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    console.print(table)


def percent(result: Any) -> str:
    return f"{100 * result.top1:.2f}%"


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``1 repeat``, ``2 repeats`` (``many``: an irregular plural)."""
    return f"{count:,} {noun if count == 1 else many or noun + 's'}"


HwOpt = Annotated[Path | None, typer.Option(
    "--hw", help="Hardware YAML file, or a shipped preset by name (photonic-8bit, ...); the flags below override it.")]
BackendOpt = Annotated[list[str] | None, typer.Option(
    "--backend", help="Require an execution backend (repeatable): every layer of a kind it serves runs on it, or the "
                      "command stops naming the layer and the reason. Backends: fbgemm, cuda-implicit (only "
                      "when named), cuda-ideal, fused-triton, onednn, fused-cpu, torch (the reference). Default: "
                      "the fastest that supports each layer.")]
MetricOpt = Annotated[str, typer.Option(help="Rank by agreement (top-1 agreement with the float model on the "
                                            "calibration images) or snr (output SNR vs the float logits).")]
AdcRangeOpt = Annotated[str | None, typer.Option(
    help="ADC range: full (+-the tile's full scale L*Xmax*Wmax: the worst case, nothing clips; the default), "
         "calibrated (the adc.percentile of each layer's |tile values| on the calibration split) or a fraction of "
         "full scale in (0, 1], e.g. 0.25. Needs ADC bits (--adc-bits or --hw).")]
TestOpt = Annotated[bool, typer.Option("--test", help="Also score accuracy on the test split (needs labels).")]
