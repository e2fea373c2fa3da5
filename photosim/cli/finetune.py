"""Hardware-aware fine-tuning: a float model + quantization + hardware -> a fine-tuned integer model file, judged
by the engine before (PTQ) and after."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from photosim._config import MAX_REPEATS
from photosim.cli.common import (
    ABitsOpt,
    ActivationRangeOpt,
    AdcRangeOpt,
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
    preflight,
    print_table,
    quant_spec,
)
from photosim.errors import PhotosimError


@app.command()
@handles_errors
def finetune(
    output: Annotated[Path, typer.Option("--output", "-o", help="Fine-tuned integer model file to write.")],
    epochs: Annotated[int, typer.Option(help="Passes over the training data.")],
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule to 0).")],
    model: ModelOpt = "digits-resnet", weights: WeightsOpt = None, num_classes: NumClassesOpt = None,
    cifar_stem: CifarStemOpt = False, data: DataOpt = "digits", data_root: DataRootOpt = None,
    download: DownloadOpt = False, limit: LimitOpt = None, config: ConfigOpt = None, w_bits: WBitsOpt = None,
    a_bits: ABitsOpt = None, bias_bits: BiasBitsOpt = None, observer: ObserverOpt = None,
    percentile: PercentileOpt = None, per_tensor: PerTensorOpt = False, calib_samples: CalibOpt = None,
    ptq: PtqOpt = None, activation_range: ActivationRangeOpt = None, output_bits: OutputBitsOpt = None,
    hw: HwOpt = None,
    noise: Annotated[float | None, typer.Option(help="Output (detector) noise sigma, fraction of full scale.")] = None,
    tile: Annotated[int | None, typer.Option(help="Dot-product length L of one optical core.")] = None,
    adc_bits: Annotated[int | None, typer.Option(help="Per-tile ADC bits (default: none, an ideal readout).")] = None,
    adc_range: AdcRangeOpt = None,
    acc_bits: Annotated[int | None, typer.Option(help="Accumulator bits.")] = None,
    overflow: Annotated[str | None, typer.Option(help="Accumulator overflow: wrap, saturate or none.")] = None,
    optimizer: Annotated[str, typer.Option(help="adamw or sgd (momentum 0.9).")] = "adamw",
    labels: Annotated[bool, typer.Option(
        help="Train on the train split with its labels (distillation + cross-entropy); --no-labels: on the "
             "calibration split with the float model as the only teacher.")] = True,
    temperature: Annotated[float, typer.Option(help="Distillation temperature.")] = 2.0,
    train_batch_size: Annotated[int, typer.Option(min=1, help="Images per training step.")] = 64,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the data order, the training noise and the engine's "
                                               "noise.")] = 0,
    repeats: Annotated[int, typer.Option(min=1, max=MAX_REPEATS, help="Simulated chips judging each model.")] = 10,
    batch_size: BatchOpt = 256,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    report: Annotated[Path | None, typer.Option(help="Write the training curve (per epoch) as CSV.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the training curve as an image (PNG).")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(
        help="Folder for a checkpoint after every epoch (created when missing).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint in --checkpoint-dir.")] = False,
) -> None:
    """Hardware-aware fine-tuning from the PTQ result: learned step sizes (LSQ), distillation from the float
    model, the hardware's noise, ADC and accumulator in the forward pass; writes an integer model file and
    compares PTQ and fine-tuned accuracy on the engine (docs/finetune.md)."""
    from photosim._files import make_output_dir, save_model_atomic
    from photosim.engine.executor import check_device
    from photosim.experiments.finetune import CHECKPOINT_NAME, CURVE_COLUMNS, check_settings, judge
    from photosim.experiments.finetune import finetune as run_finetune
    from photosim.experiments.report import write_csv_atomic
    from photosim.experiments.workflow import DataSpec, float_accuracy, model_provenance, quantize_loaded
    from photosim.frontend.models import load_model
    from photosim.hardware.config import hardware_with_flags, load_hardware

    check_settings(epochs, lr, optimizer, train_batch_size, temperature)
    if resume and checkpoint_dir is None:
        raise PhotosimError("--resume needs --checkpoint-dir, the folder holding the checkpoint.")
    checkpoint = None if checkpoint_dir is None else checkpoint_dir / CHECKPOINT_NAME
    outputs = {"--output": output, "--report": report, "--plot": plot}
    preflight(outputs, {"--hw": hw, **model_inputs(model, weights, config)})
    if checkpoint_dir is not None:
        if checkpoint is not None and checkpoint.exists() and not resume:
            raise PhotosimError(f"{str(checkpoint)!r} exists: add --resume to continue it, or choose another "
                                "--checkpoint-dir (photosim does not overwrite a checkpoint it did not just write).")
        make_output_dir(checkpoint_dir, "--checkpoint-dir")
    check_device(device)
    hw_config = hardware_with_flags(load_hardware(hw), noise=noise, tile=tile, adc_bits=adc_bits,
                                    adc_range=adc_range, acc_bits=acc_bits, overflow=overflow)
    spec = quant_spec(config, per_tensor, w_bits=w_bits, a_bits=a_bits, bias_bits=bias_bits,
                       observer=observer, percentile=percentile, calibration_samples=calib_samples, ptq=ptq,
                       activation_range=activation_range, output_bits=output_bits)
    loaded = load_model(model, weights, num_classes, cifar_stem)
    data_spec = DataSpec(data, data_root, download, limit)
    ptq_model = quantize_loaded(loaded, data_spec, spec, num_classes=num_classes, cifar_stem=cifar_stem,
                                progress=True)
    calibration = data_spec.split("calibration", loaded.input_shape)
    train, validation = (data_spec.split("train", loaded.input_shape), calibration) if labels else \
        (calibration, data_spec.split("train", loaded.input_shape))
    began = time.perf_counter()
    tuned = run_finetune(loaded.module, train, spec, hw_config, epochs=epochs, lr=lr, optimizer=optimizer,
                         labels=labels, seed=seed, device=device, progress=True, batch_size=train_batch_size,
                         temperature=temperature, calibration_data=calibration, validation_data=validation,
                         ptq_model=ptq_model, checkpoint_dir=checkpoint_dir, resume=resume,
                         provenance=model_provenance(loaded, data_spec, num_classes, cifar_stem))
    seconds = time.perf_counter() - began
    save_model_atomic(tuned, output)
    info = tuned.provenance["finetune"]
    curve = pd.DataFrame(info["curve"], columns=list(CURVE_COLUMNS))
    console.print(f"wrote {output}: {model} W{spec.w_bits}A{spec.a_bits} fine-tuned for {epochs} epoch(s) on "
                  f"{data} {'train (labels + distillation)' if labels else 'calibration (distillation only)'} "
                  f"in {seconds:.1f} s")
    for restart in info["lr_restarts"]:
        console.print(f"lr {restart['lr']:g} diverged (epoch {restart['epoch']} loss {restart['loss']:.3g} against "
                      f"{restart['start_loss']:.3g} at the start): restarted from the PTQ model at lr / 4")
    print_table("hardware effects in the training graph", pd.DataFrame(info["effects"], columns=[
        "effect", "modelled", "how"]))
    shown = curve.copy()
    for column in ("train_top1", "val_top1"):
        shown[column] = shown[column] * 100
    print_table("training curve (top-1 in percent on the training graph; validation: "
                + ("calibration split" if labels else "train split") + ")", shown)
    if report:
        write_csv_atomic(shown, report)
    if plot:
        _plot_curve(shown, plot)
    test = data_spec.split("test", loaded.input_shape)
    flt = float_accuracy(loaded.module, test, batch_size, progress=True)
    verdict = judge({"PTQ": ptq_model, "fine-tuned": tuned}, test, hw_config, calibration=calibration,
                    repeats=repeats, seed=seed, batch_size=batch_size, device=device, progress=True)
    verdict["drop_vs_float"] = 100 * flt.top1 - verdict["hardware_top1"]
    console.print(f"the engine's verdict on {data} test ({flt.n:,} images, float {100 * flt.top1:.2f}%), "
                  f"{repeats} simulated chip(s), seed {seed}:")
    print_table("top-1 in percent (hardware: mean over chips, std, 95% CI)", verdict)
    ptq_drop, tuned_drop = verdict["drop_vs_float"].iloc[0], verdict["drop_vs_float"].iloc[1]
    if ptq_drop >= 50.0 / max(flt.n, 1):  # at least half a test image: below that the drop is rounding residue
        console.print(f"recovered {100 * (ptq_drop - tuned_drop) / ptq_drop:.0f}% of the {ptq_drop:.2f} points "
                      "PTQ loses on this hardware")
    else:
        console.print(f"PTQ loses nothing on this hardware; the fine-tuned model's drop is {tuned_drop:.2f} points")


def _plot_curve(curve: pd.DataFrame, path: Path) -> None:
    """Loss and top-1 per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from photosim._files import atomic_path

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(curve["epoch"], curve["loss"], marker="o", label="loss")
    left.plot(curve["epoch"], curve["kd_loss"], marker=".", label="distillation")
    left.set(xlabel="epoch", ylabel="loss")
    left.legend()
    right.plot(curve["epoch"], curve["train_top1"], marker="o", label="train")
    right.plot(curve["epoch"], curve["val_top1"], marker=".", label="validation")
    right.set(xlabel="epoch", ylabel="top-1 (%), training graph")
    right.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
