"""Which of torchvision's classifiers photosim captures, and (``--run``) how closely its integer engine follows the
fake-quant reference on each.

Builds every classification model of ``torchvision.models`` with random weights (a ViT's zero-initialised head gets
small random weights, so that its logits are not all equal) and captures it on one synthetic image of its own size
(299 for Inception, 224 otherwise); prints the count and each refusal's first words. Takes a few minutes and a few
GB of memory on a CPU (the largest RegNets and ViTs are built in full).

With ``--run`` each model is also quantized at W8A8 (``--calibration`` synthetic images) and run on
``--images`` synthetic images by the ideal engine and by the fake-quant reference (photosim.ir.fakequant), and
on two images with a hardware config (tile 64, 8-bit ADC, output noise); one CSV row per model (``--csv``):
top-1 agreement, the largest output difference in output steps, seconds. Random weights give near-tied logits,
so a one-step difference can move the arg-max: the agreement is a lower bound of what trained weights give.

    python experiments/torchvision_zoo.py [--run --images 8 --csv zoo.csv] [--models resnet18 vit_b_16]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
import torchvision

import photosim
from photosim.errors import PhotosimError
from photosim.frontend.capture import capture
from photosim.ir.fakequant import fake_quant_forward

HARDWARE = {"tile": 64, "adc": {"bits": 8}, "noise": {"output": {"sigma": 0.001}}}
COLUMNS = ("model", "params_m", "input", "images", "top1_agreement_pct", "max_diff_steps", "hardware_runs",
           "seconds", "error")


def build(name: str) -> tuple[torch.nn.Module, int]:
    """The model with random weights (seeded) in eval mode, and its input size."""
    torch.manual_seed(0)
    extra = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
    model = torchvision.models.get_model(name, weights=None, **extra).eval()
    if name.startswith("vit_"):
        with torch.no_grad():
            model.heads.head.weight.normal_(0, 0.02)  # torchvision starts the head at zero
    return model, 299 if name.startswith("inception") else 224


def run_one(name: str, images: int, calibration: int) -> dict[str, object]:
    """Quantize at W8A8 and compare the ideal engine with the fake-quant reference on synthetic images."""
    began = time.perf_counter()
    model, size = build(name)
    row: dict[str, object] = {"model": name, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                              "input": size, "images": images}
    generator = torch.Generator().manual_seed(1)
    calib = torch.randn(calibration, 3, size, size, generator=generator)
    x = torch.randn(images, 3, size, size, generator=generator)
    try:
        qmodel = photosim.quantize(model, calib, {"w_bits": 8, "a_bits": 8, "calibration_samples": calibration})
        ideal, reference = photosim.simulate(qmodel, x, batch_size=4), fake_quant_forward(qmodel, x)
        step = qmodel.qparams(qmodel.output).scale
        row["top1_agreement_pct"] = 100 * (ideal.argmax(1) == reference.argmax(1)).float().mean().item()
        row["max_diff_steps"] = round(((ideal - reference).abs().max() / step).item(), 2)
        chip = photosim.simulate(qmodel, x[:2], HARDWARE, batch_size=2)
        row["hardware_runs"] = bool(torch.isfinite(chip).all())
    except PhotosimError as exc:
        row["error"] = str(exc)[:300]
    row["seconds"] = round(time.perf_counter() - began, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="quantize and run each model too")
    parser.add_argument("--models", nargs="*", help="these models only (default: all classifiers)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--calibration", type=int, default=4)
    parser.add_argument("--csv", type=Path, default=Path("zoo.csv"))
    args = parser.parse_args()
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    if args.run:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            for name in names:
                row = run_one(name, args.images, args.calibration)
                writer.writerow(row)
                f.flush()
                print(", ".join(f"{k} {row.get(k)}" for k in COLUMNS if row.get(k) is not None), flush=True)
        return
    refused = {}
    for name in names:
        model, size = build(name)
        try:
            capture(model, torch.randn(1, 3, size, size))
        except PhotosimError as exc:
            refused[name] = str(exc)[:200]
    print(f"{len(names) - len(refused)} of {len(names)} classifiers capture")
    for name, reason in refused.items():
        print(f"- {name}: {reason}")


if __name__ == "__main__":
    main()
