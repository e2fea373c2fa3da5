"""A real-size noisy run: 10,000 synthetic CIFAR-size images through the tile configuration of `photosim bench`
(CIFAR ResNet-18, random weights, W8A8, tile 64, 8-bit ADC, output noise, 16-bit saturating accumulator), or
another of its configurations (``--config``: its position in photosim.experiments.bench.CONFIGS, 0 = ideal).

Prints the seconds the run takes on the first device given, and how far the other devices agree with it on the
first ``--compare`` samples, then node by node on ``--node-compare`` of them: the noise is a pure function of
seed, layer and sample index and every device computes it bit for bit, so the codes must be equal; the first
node that differs while its inputs agree is where two devices' arithmetic parts (a noisy run spreads one changed
code to many: docs/performance.md). Pseudo-devices, all on the CPU: ``cpu-torch`` runs every layer on the torch
backend (the reference), ``cpu-triton`` every analog layer on the CUDA tile kernel under the Triton interpreter
(the GPU's arithmetic, 4 to 8 minutes per image of ResNet-18; not with ``cuda`` in the same run), ``cpu-float``
takes float32 tile sums instead of ``torch._int_mm``, and ``cpu-nudged`` moves every noise value by about one unit
in the last place.

    python experiments/noisy_run.py --devices cuda cpu cpu-torch cpu-float --images 10000 --compare 512
    python experiments/noisy_run.py --devices cpu-torch cpu-triton --images 2 --compare 2 --node-compare 2
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from unittest import mock

import torch

from photosim.engine import kernels
from photosim.experiments.bench import CONFIGS, BenchConfig, build_model, synthetic
from photosim.experiments.workflow import chip_engine
from photosim.frontend.ptq import quantize
from photosim.hardware.plan import HardwarePlan

TILED = 2  # the position of the tile configuration in CONFIGS
CPU_FLOAT_GEMMS, CPU_NUDGED, CPU_TORCH, CPU_TRITON = "cpu-float", "cpu-nudged", "cpu-torch", "cpu-triton"
CPU_BACKENDS = {CPU_TORCH: ["torch"], CPU_TRITON: ["fused-triton"]}  # pseudo-device -> the backends it requires


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
    parser.add_argument("--node-compare", type=int, default=32,
                        help="images whose every node's codes are compared across devices (0: none)")
    parser.add_argument("--config", type=int, default=TILED, choices=range(len(CONFIGS)),
                        help="which of photosim bench's configurations (default: the tile one)")
    args = parser.parse_args()
    if CPU_TRITON in args.devices:
        if any(d.startswith("cuda") for d in args.devices):
            raise SystemExit("cpu-triton interprets the Triton kernels, cuda compiles them: run them separately.")
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel modules are imported, at the first launch
    torch.set_num_threads(args.threads)
    config = CONFIGS[args.config]
    print(f"{config.name}: {config.hw}")
    model, shape = build_model("torchvision:resnet18")
    qmodel = quantize(model, synthetic(shape, 128, 2), {"w_bits": config.bits, "a_bits": config.bits})
    outputs, nodes = {}, {}
    probe = synthetic(shape, args.node_compare, seed=10_000)  # the first images of the run
    for i, device in enumerate(args.devices):
        engine = make_engine(qmodel, config, device)
        engine.codes(synthetic(shape, 2, 0), 0)  # warm-up: compiles the kernels
        images = args.images if i == 0 else args.compare
        codes, seconds = run(engine, images, args.batch, shape, device)
        outputs[device] = codes[: args.compare]
        print(f"{device}: {images} images in {seconds:.1f} s ({images / seconds:.1f} images/s), "
              f"batch {args.batch}, {torch.get_num_threads()} CPU threads")
        if len(args.devices) > 1 and args.node_compare:
            nodes[device] = engine.node_outputs(probe, 0)
    first, *others = args.devices
    for device in others:
        a, b = outputs[first], outputs[device]
        print(f"{first} vs {device} on {len(a)} images: {100 * (a == b).float().mean():.3f}% of output codes "
              f"equal, top-1 equal on {100 * (a.argmax(1) == b.argmax(1)).float().mean():.2f}% of images")
        if nodes:
            compare_nodes(qmodel, nodes[first], nodes[device], f"{first} vs {device}")


def make_engine(qmodel: object, config: BenchConfig, device: str) -> object:
    """The engine of one chip on ``device``. CPU variants: ``cpu-torch`` and ``cpu-triton`` require the torch and
    the fused-triton backends; ``cpu-float`` takes float32 tile sums instead of ``torch._int_mm`` (whose oneDNN
    kernel differs by CPU: AMX, VNNI), a check of the CPU reference itself; ``cpu-nudged`` multiplies the
    output-noise sigma by 1 + 2^-23, moving each noise value by about one float32 unit in the last place: how far
    a last-bit difference spreads."""
    hw = copy.deepcopy(config.hw)
    if device == CPU_NUDGED:
        if "output" not in (hw or {}).get("noise", {}):
            raise SystemExit("cpu-nudged needs a configuration with output noise (--config 1 or 2)")
        hw["noise"]["output"]["sigma"] *= 1 + 2.0 ** -23
    plan = HardwarePlan.resolve(qmodel, hw)
    if device in CPU_BACKENDS:
        return chip_engine(qmodel, plan, None, seed=0, repeat=0, device="cpu", backend=CPU_BACKENDS[device])
    if device != CPU_FLOAT_GEMMS:
        return chip_engine(qmodel, plan, None, seed=0, repeat=0, device="cpu" if device == CPU_NUDGED else device)
    with mock.patch.object(kernels, "int_mm_is_faster", lambda device_type: False):  # read when layers are planned
        return chip_engine(qmodel, plan, None, seed=0, repeat=0, device="cpu")


def compare_nodes(qmodel: object, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], label: str) -> None:
    """The nodes whose codes differ, in graph order, with their share of equal codes: the first one whose inputs
    agree is where the devices part, the later ones show how a difference spreads."""
    differing = [node for node in qmodel.nodes if not torch.equal(a[node.name], b[node.name])]
    print(f"{label}, node by node on {len(a[qmodel.input_name])} images: {len(differing)} of {len(qmodel.nodes)} "
          "nodes differ" + (" (op, % of codes equal):" if differing else ""))
    for node in differing:
        equal = (a[node.name] == b[node.name]).float().mean().item()
        inputs_equal = all(torch.equal(a[name], b[name]) for name in node.inputs)
        note = "  <- its inputs were equal" if inputs_equal else ""
        print(f"  {node.name:32s} {node.op:18s} {100 * equal:9.4f}{note}")

if __name__ == "__main__":
    main()
