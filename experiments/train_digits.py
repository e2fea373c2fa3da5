"""Train the built-in digits models and write the weights shipped in ``photosim/frontend/weights``.

Reproduce the shipped files (byte-identical, CPU, single thread) from the repository root with::

    pip install -e .
    python experiments/train_digits.py --seed 0 --epochs 60

Each model trains with Adam on the digits train split (1257 images) and is scored on the test split
(360 images); the printed accuracies are the ``float_accuracy`` values recorded in
``photosim/frontend/models.py``. Float results depend on the SIMD kernels a CPU runs, so the script pins
PyTorch's and oneDNN's kernels to AVX2 (the shipped files came from an AVX2 machine): on any x86 CPU with
AVX2 it rewrites the same bytes.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch import nn

from photosim.frontend.data import load_dataset, make_loader
from photosim.frontend.models import list_models, load_model

BATCH_SIZE = 32
LEARNING_RATE = 3e-3
# Read by PyTorch and oneDNN at their first kernel dispatch, so setting them before any computation is enough.
PINNED_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def train(module: nn.Module, epochs: int, seed: int) -> None:
    """Cross-entropy training with Adam on the digits train split, shuffled by a seeded generator."""
    loader = make_loader(load_dataset("digits", "train"), BATCH_SIZE, shuffle=True, seed=seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=LEARNING_RATE)
    loss_fn = nn.CrossEntropyLoss()
    module.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(module(x), y).backward()
            optimizer.step()
    module.eval()


def evaluate(module: nn.Module) -> float:
    """Top-1 accuracy on the digits test split, in one batch (as the tests recompute it)."""
    x, y = next(iter(make_loader(load_dataset("digits", "test"), batch_size=10_000)))
    with torch.no_grad():
        return (module(x).argmax(dim=1) == y).sum().item() / len(y)


def main() -> None:
    """Train every built-in model, save its state_dict, reload it and print its test accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and shuffling")
    parser.add_argument("--epochs", type=int, default=60, help="training epochs per model")
    parser.add_argument("--out", type=Path, default=Path("photosim/frontend/weights"), help="output folder")
    parser.add_argument("--models", nargs="*", default=None, help="built-in names to train (default: all)")
    args = parser.parse_args()

    os.environ.update(PINNED_KERNELS)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    for info in list_models():
        if args.models and info.name not in args.models:
            continue
        start = time.perf_counter()
        torch.manual_seed(args.seed)
        module = info.factory()
        train(module, args.epochs, args.seed)
        path = args.out / f"{info.name}.pt"
        torch.save(module.state_dict(), path)
        accuracy = evaluate(load_model(info.name, weights=path).module)
        print(f"{info.name}: test accuracy {accuracy!r} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
