"""Which of torchvision's classifiers photosim captures (and so quantizes and runs), and why the others are refused.

Builds every classification model of ``torchvision.models`` with random weights and captures it on one synthetic
image of its own size (299 for Inception, 224 otherwise); prints the count and each refusal's first words.
Takes a few minutes and a few GB of memory on a CPU (the largest RegNets and ViTs are built in full).

    python experiments/torchvision_zoo.py
"""

from __future__ import annotations

import torch
import torchvision

from photosim.errors import PhotosimError
from photosim.frontend.capture import capture


def main() -> None:
    names = torchvision.models.list_models(module=torchvision.models)
    refused = {}
    for name in names:
        size = 299 if name.startswith("inception") else 224
        extra = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
        try:
            capture(torchvision.models.get_model(name, weights=None, **extra).eval(), torch.randn(1, 3, size, size))
        except PhotosimError as exc:
            refused[name] = str(exc)[:200]
    print(f"{len(names) - len(refused)} of {len(names)} classifiers capture")
    for name, reason in refused.items():
        print(f"- {name}: {reason}")


if __name__ == "__main__":
    main()
