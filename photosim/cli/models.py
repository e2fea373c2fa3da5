"""Commands on models and integer files: list, evaluate, quantize, inspect, import from PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from photosim._files import reject_directory, spec_file
from photosim.cli.common import (
    ABitsOpt,
    ActivationRangeOpt,
    BackendOpt,
    BatchOpt,
    BiasBitsOpt,
    CalibOpt,
    CifarStemOpt,
    ConfigOpt,
    DataOpt,
    DataRootOpt,
    DownloadOpt,
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
    percent,
    preflight,
    print_table,
    quant_spec,
)
from photosim.errors import PhotosimError


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


@app.command()
@handles_errors
def data(
    name: Annotated[str | None, typer.Argument(
        help="Only this dataset (digits, mnist, ..., imagefolder:PATH).")] = None,
    split: Annotated[str | None, typer.Option(help="With --indices: train, calibration or test.")] = None,
    indices: Annotated[bool, typer.Option(
        help="Print the indices of NAME's --split images in its source set (digits: rows of sklearn's "
             "load_digits(); torchvision sets: the official train or test set), one line, comma-separated.")] = False,
    data_root: DataRootOpt = None,
) -> None:
    """Which images form each split (train, calibration, test) of each dataset, and their preprocessing.

    Calibration never overlaps test; the cut is fixed (seed 0) on every machine. A model you trained yourself
    must not have seen photosim's test images: --indices lists them.
    """
    from photosim.frontend.data import SPLITS, describe_datasets, split_indices

    if indices:
        if name is None or split is None:
            raise PhotosimError("--indices needs a dataset and a split: photosim data digits --split test --indices.")
        if split not in SPLITS:
            raise PhotosimError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")
        console.print(",".join(map(str, split_indices(name, split, root=data_root))), soft_wrap=True)
        return
    rows = describe_datasets()
    if name is not None:
        base = name.partition(":")[0]
        rows = [r for r in rows if r["dataset"].partition(":")[0] == base]
        if not rows:
            names = sorted({r["dataset"] for r in describe_datasets()})
            raise PhotosimError(f"unknown dataset {name!r}; use one of {', '.join(names)}.")
    frame = pd.DataFrame(rows)
    print_table("dataset splits (--data; --limit N keeps the first N test images)", frame.drop(columns="preprocessing"))
    for dataset, text in dict(zip(frame["dataset"], frame["preprocessing"])).items():
        console.print(f"{dataset} preprocessing: {text}", soft_wrap=True)


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
    console.print(f"{model} on {data} test ({result.n} images): float top-1 {percent(result)}")


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
    spec = quant_spec(config, per_tensor, w_bits=w_bits, a_bits=a_bits, bias_bits=bias_bits,
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
    console.print(f"test top-1 on {data} ({flt.n} images): float {percent(flt)}, fake-quant {percent(fq)} "
                  f"(drop {100 * (flt.top1 - fq.top1):.2f} points)")


@app.command()
@handles_errors
def inspect(
    path: Annotated[Path, typer.Argument(help="Integer model file.")],
    hw: Annotated[Path | None, typer.Option(
        "--hw", help="Also show how each conv/linear would run under this hardware YAML or preset: its settings, "
                     "the execution backend chosen for --device and why faster ones decline it.")] = None,
    device: Annotated[str, typer.Option(help="Device the execution plan is for (cpu, cuda).")] = "cpu",
    backend: BackendOpt = None,
) -> None:
    """Per-layer table of an integer model: op, shapes, bits, scales, MACs, worst-case accumulator bits; with --hw
    the execution plan (backend per layer)."""
    from photosim.engine.executor import execution_plan
    from photosim.hardware.config import load_hardware
    from photosim.ir.format import load
    from photosim.ir.summary import layer_table

    reject_directory(path, "model file")
    preflight({}, {"MODEL_FILE": path, "--hw": hw})
    qmodel = load(path)
    plan = None if hw is None else execution_plan(qmodel, load_hardware(hw), device=device, backend=backend or ())
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
    if plan is not None:
        print_table(f"execution on {device} under {hw} (declined: faster backends and why)",
                    pd.DataFrame(plan).fillna(""))


@app.command("import-torch")
@handles_errors
def import_torch_cmd(
    spec: Annotated[str, typer.Argument(help="path/to/script.py:function returning (converted GraphModule, "
                                             "input shape): a convert_fx or torchao convert_pt2e result.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Integer model file to write.")],
) -> None:
    """Convert a PyTorch quantize_fx model (convert_fx output) or a torchao PT2E model (convert_pt2e output) into a
    photosim integer model file."""
    from photosim.frontend.torch_import import import_torch

    preflight({"--output": output}, {"SPEC": spec_file(spec)})
    qmodel = import_torch(spec, output)
    console.print(f"wrote {output} ({len(qmodel.nodes)} nodes); simulate it with `photosim run {output} "
                  "--requant pytorch`")
