"""A real-size noisy run: 10,000 synthetic CIFAR-size images through the tile configuration of `photosim bench`
(CIFAR ResNet-18, random weights, W8A8, tile 64, 8-bit ADC, output noise, 16-bit saturating accumulator).

Prints the seconds the run takes on the first device given, and how far the other devices agree with it on the
first ``--compare`` samples (the noise is a pure function of seed, layer and sample index, so every device draws
the same numbers; normals may differ in the last float32 bit on a GPU). The figures of docs/performance.md come
from it::

    python experiments/noisy_run.py --devices cuda cpu --images 10000 --compare 256
"""

from __future__ import annotations

import argparse
import time

import torch

from photosim.experiments.bench import CONFIGS, build_model, synthetic
from photosim.experiments.workflow import chip_engine
from photosim.frontend.ptq import quantize
from photosim.hardware.plan import HardwarePlan

TILED = CONFIGS[2]


def run(engine: object, images: int, batch: int, shape: tuple[int, ...], device: str) -> tuple[torch.Tensor, float]:
    """Output codes of ``images`` synthetic inputs (streamed in batches) and the wall seconds it took."""
    codes = []
    start = time.perf_counter()
    for first in range(0, images, batch):
        x = synthetic(shape, min(batch, images - first), seed=10_000 + first)
        codes.append(engine.codes(x, first))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return torch.cat(codes), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=["cpu"])
    parser.add_argument("--images", type=int, default=10_000, help="images of the timed run on each device")
    parser.add_argument("--compare", type=int, default=512, help="images whose codes are compared across devices")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, shape = build_model("torchvision:resnet18")
    qmodel = quantize(model, synthetic(shape, 128, 2), {"w_bits": TILED.bits, "a_bits": TILED.bits})
    plan = HardwarePlan.resolve(qmodel, TILED.hw)
    outputs = {}
    for i, device in enumerate(args.devices):
        engine = chip_engine(qmodel, plan, None, seed=0, repeat=0, device=device)
        engine.codes(synthetic(shape, 2, 0), 0)  # warm-up: compiles the kernels
        images = args.images if i == 0 else args.compare
        codes, seconds = run(engine, images, args.batch, shape, device)
        outputs[device] = codes[: args.compare]
        print(f"{device}: {images} images in {seconds:.1f} s ({images / seconds:.1f} images/s), "
              f"batch {args.batch}, {torch.get_num_threads()} CPU threads")
    first, *others = args.devices
    for device in others:
        a, b = outputs[first], outputs[device]
        print(f"{first} vs {device} on {len(a)} images: {100 * (a == b).float().mean():.3f}% of output codes "
              f"equal, top-1 equal on {100 * (a.argmax(1) == b.argmax(1)).float().mean():.2f}% of images")


if __name__ == "__main__":
    main()
