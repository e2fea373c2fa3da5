"""Brevitas' PTQ recipes side by side with photosim's ``--ptq auto`` on the built-in digits models (docs/ptq.md).

Brevitas is not a photosim dependency; run this where it is installed, from the repository root (tested with
Brevitas 0.13.4, torch 2.14.1 and accelerate 1.10.1, which its learned-round code imports; accelerate 1.16
fails in ``remove_hook_from_module`` on Brevitas' quantizer injectors)::

    pip install brevitas==0.13.4 accelerate==1.10.1
    python experiments/brevitas_table.py          # the tables of docs/ptq.md (about 6 CPU minutes)
    python experiments/brevitas_table.py --models digits-cnn --bits 3 --recipes "fx asym: equalize,gptq,bias_corr"

Each recipe follows Brevitas' ImageNet PTQ example (``brevitas_examples/imagenet_classification/ptq/
ptq_evaluate.py``) and calls its helpers: the float model is traced and its BatchNorms merged
(``preprocess_for_quantize``, with the example's 20 graph-equalization iterations where the recipe says so),
quantized with per-channel symmetric weights (absmax), per-tensor activations (99.999th percentile;
``sym``, the example's default, unsigned after ReLU, or ``asym``), int32 biases, by the ``fx`` backend (the
default: every tensor quantized, the logits included) or the ``layerwise`` one (only the inputs and weights of
conv / linear layers; its 8-bit first / last layers are those with 3 input channels or 1000 outputs, which
no digits model has), then calibrated on the 180 calibration images (labels
never read: the loader carries zeros), its weights rounded by GPTQ / GPFQ / Qronos / learned round where the
recipe says so, its biases corrected, and scored on the 360 test images with Brevitas' fake-quant model.
photosim's figures are read from the integer-engine table of docs/ptq.md (``experiments/ptq_table.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import re
import sys
import time
import warnings
from argparse import Namespace
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from photosim.frontend.data import load_dataset
from photosim.frontend.models import load_model

try:
    import brevitas
    from brevitas.export.inference import quant_inference_mode
    from brevitas.graph.quantize import preprocess_for_quantize
    from brevitas_examples.common.learned_round import learned_round_trainer
    from brevitas_examples.imagenet_classification.ptq import ptq_common
    from brevitas_examples.imagenet_classification.ptq.learned_round_utils import apply_learned_round
except ImportError as error:
    sys.exit(f"experiments/brevitas_table.py needs Brevitas and accelerate ({error}); they are not photosim "
             "dependencies: pip install brevitas==0.13.4 accelerate==1.10.1")

MODELS = ("digits-cnn", "digits-resnet", "digits-mobilenet")  # the models issue 20 sets its PTQ target on
CALIBRATION_BATCH = 64  # the example's --batch-size-calibration
LEARNED_ROUND_ITERATIONS = 1000  # the example's --learned-round-iters, per layer
ptq_common.tqdm = learned_round_trainer.tqdm = partial(tqdm, disable=True)  # a progress bar for every pass
warnings.filterwarnings("ignore")  # as ptq_evaluate.py does: Brevitas warns on every trace and quantizer


@dataclass(frozen=True)
class Recipe:
    """One Brevitas PTQ configuration: the example's switches, in the order its script applies them."""

    backend: str = "fx"
    act_quant_type: str = "sym"
    graph_equalization: bool = True
    act_equalization: bool = False
    gptq: bool = False
    gpfq: bool = False
    qronos: bool = False
    learned_round: bool = False
    bias_correction: bool = True


ALGORITHMS = {  # label -> switches; "equalize,bias_corr" is the example's default configuration
    "calibration only": Recipe(graph_equalization=False, bias_correction=False),
    "bias_corr": Recipe(graph_equalization=False),
    "equalize,bias_corr": Recipe(),
    "equalize,act_equalize,bias_corr": Recipe(act_equalization=True),
    "equalize,gptq,bias_corr": Recipe(gptq=True),
    "equalize,gpfq,bias_corr": Recipe(gpfq=True),
    "equalize,qronos,bias_corr": Recipe(qronos=True),
    "equalize,learned_round,bias_corr": Recipe(learned_round=True),
}
RECIPES = {  # "backend act-type: algorithms" -> recipe; the example allows learned round on layerwise only
    f"{backend} {act}: {label}": replace(recipe, backend=backend, act_quant_type=act)
    for backend in ("fx", "layerwise") for act in ("sym", "asym") for label, recipe in ALGORITHMS.items()
    if backend == "layerwise" or not recipe.learned_round
}


def batches(images: torch.Tensor, labels: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split images and labels into the (images, labels) minibatches the example's helpers iterate over."""
    return list(zip(images.split(size), labels.split(size)))


def quantize_with_brevitas(float_model: torch.nn.Module, recipe: Recipe, bits: int,
                           calibration: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.nn.Module:
    """Quantize a copy of ``float_model`` at W``bits``A``bits`` the way ptq_evaluate.py does for ``recipe``."""
    model = preprocess_for_quantize(copy.deepcopy(float_model).eval(),
                                    equalize_iters=20 if recipe.graph_equalization else 0,
                                    equalize_merge_bias=True, merge_bn=True)
    if recipe.act_equalization:
        ptq_common.apply_act_equalization(model, calibration, layerwise=recipe.backend == "layerwise")
    model = ptq_common.quantize_model(
        model, backend=recipe.backend, weight_bit_width=bits, act_bit_width=bits, bias_bit_width=32,
        weight_quant_granularity="per_channel", act_quant_percentile=99.999, act_quant_type=recipe.act_quant_type,
        scale_factor_type="float_scale", quant_format="int", layerwise_first_last_bit_width=8)
    with torch.no_grad():
        model(calibration[0][0])  # the example's first forward pass initialises the scale factors
    ptq_common.calibrate(calibration, model)
    if recipe.gpfq:
        ptq_common.apply_gpfq(calibration, model, act_order=False)
    if recipe.gptq:
        ptq_common.apply_gptq(calibration, model, act_order=False, create_weight_orig=True)
    if recipe.qronos:
        ptq_common.apply_qronos(model, calibration, act_order=False)
    if recipe.learned_round:
        apply_learned_round(model, calibration, Namespace(
            learned_round="hard_sigmoid", learned_round_mode="layerwise", learned_round_loss="regularised_mse",
            learned_round_iters=LEARNED_ROUND_ITERATIONS, learned_round_lr=1e-3, learned_round_lr_scheduler=None,
            learned_round_batch_size=1))
    if recipe.bias_correction:
        ptq_common.apply_bias_correction(calibration, model)
    return model


def fake_quant_top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 of Brevitas' fake-quant model in its inference mode, as the example's validation runs it."""
    with torch.no_grad(), quant_inference_mode(model):
        model(images[:1])  # the example's reference input, which switches the quantizers to inference
        return (model(images).argmax(1) == labels).float().mean().item()


def photosim_rows(table: Path) -> dict[tuple[str, str], dict[str, float]]:
    """The (model, bits) -> {algorithm: top-1 %} rows of the results table in docs/ptq.md."""
    row = re.compile(r"^\| (digits-\S+) \| [\d.]+ \| (W\dA\d) \| ([^|]+) \| ([\d.]+) \| [\d.]+ \|$")
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for line in table.read_text().splitlines():
        if match := row.match(line):
            model, bits, algorithm, top1 = match.groups()
            rows.setdefault((model, bits), {})[algorithm.strip()] = float(top1)
    return rows


def best_recipe(top1: dict[str, float], backend: str = "") -> str:
    """The highest top-1 among the recipes of ``backend`` (all when empty), as "top-1 (recipe)"; first on ties."""
    scores = [(value, recipe) for recipe, value in top1.items() if recipe.startswith(backend)]
    value, recipe = max(scores, key=lambda item: item[0], default=(None, None))
    return "-" if recipe is None else f"{value:.2f} ({recipe})"


def comparison_row(name: str, bits: str, top1: dict[str, float], photosim: dict[str, float]) -> str:
    """One line of the side-by-side table: Brevitas' best recipes, photosim's auto and best rows, the verdict."""
    brevitas_best = max(top1.values())
    auto = next(((label, value) for label, value in photosim.items() if label.startswith("auto")), None)
    best = max(photosim.items(), key=lambda item: item[1], default=None)
    auto_text = f"{auto[1]:.2f} ({auto[0].removeprefix('auto (').removesuffix(')')})" if auto else "-"
    best_text = f"{best[1]:.2f} ({best[0]})" if best else "-"
    verdict = "-" if auto is None else ("met" if auto[1] >= brevitas_best - 1.0 else "not met")
    return (f"| {name} | {bits} | {best_recipe(top1)} | {best_recipe(top1, 'fx ')} | {auto_text} | {best_text} "
            f"| {verdict} |")


def main() -> None:
    """Run every recipe on every model and bit width; print the per-recipe and the side-by-side tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="built-in models (default: three).")
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3], help="W=A bit widths (default 4 3).")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES), metavar="RECIPE",
                        help=f"recipes (default all: {'; '.join(RECIPES)}).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1).")
    parser.add_argument("--ptq-doc", type=Path, default=Path("docs/ptq.md"),
                        help="where photosim's table is read from (default docs/ptq.md).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    calibration_images = torch.stack([x for x, _ in load_dataset("digits", "calibration")])
    calibration = batches(calibration_images, torch.zeros(len(calibration_images)), CALIBRATION_BATCH)
    test = load_dataset("digits", "test")
    test_images, test_labels = torch.stack([x for x, _ in test]), torch.tensor([y for _, y in test])
    columns = [(name, f"W{bits}A{bits}", bits) for name in args.models for bits in args.bits]
    top1: dict[tuple[str, str], dict[str, float]] = {column[:2]: {} for column in columns}
    seconds = dict.fromkeys(args.recipes, 0.0)
    for name, bits_label, bits in columns:
        float_model = load_model(name).module.eval()
        for recipe in args.recipes:
            torch.manual_seed(0)  # learned round draws its minibatches from the global generator
            start = time.process_time()
            with contextlib.redirect_stdout(sys.stderr):  # learned round prints its losses
                model = quantize_with_brevitas(float_model, RECIPES[recipe], bits, calibration)
            seconds[recipe] += time.process_time() - start
            top1[name, bits_label][recipe] = 100 * fake_quant_top1(model, test_images, test_labels)
            print(f"{name} {bits_label} {recipe}: {top1[name, bits_label][recipe]:.2f}", file=sys.stderr, flush=True)
    print(f"Brevitas {brevitas.__version__}, torch {torch.__version__}; top-1 % of the fake-quant model\n")
    print("| recipe | " + " | ".join(f"{name} {bits}" for name, bits, _ in columns) + " | CPU s |")
    print("|---|" + "--:|" * (len(columns) + 1))
    for recipe in args.recipes:
        cells = " | ".join(f"{top1[name, bits][recipe]:.2f}" for name, bits, _ in columns)
        print(f"| {recipe} | {cells} | {seconds[recipe]:.1f} |")
    photosim = photosim_rows(args.ptq_doc)
    print("\n| model | bits | best Brevitas (recipe) | best Brevitas fx | photosim auto | photosim best row "
          "| auto within 1 point of the best |\n|---|---|---|---|---|---|---|")
    for name, bits, _ in columns:
        print(comparison_row(name, bits, top1[name, bits], photosim.get((name, bits), {})))


if __name__ == "__main__":
    main()
