"""GPU timing probe of the integer engine: images/s against float eval, and its top CUDA kernels.

Builds the benchmark model (photosim.experiments.bench: CIFAR ResNet-18, random weights, calibrated BatchNorm),
quantizes it as ``photosim bench`` does, times float eval, the engine, and the engine with the fused CUDA
path switched off (the torch backend only, for comparison) at one batch size, then profiles one engine batch.
``--config`` picks one of the bench's configurations (its position in photosim.experiments.bench.CONFIGS; the
default 0 is ideal W8A8), whose bits and hardware it takes. ``--backend`` requires backends by name, as the CLI's
``--backend`` does (e.g. ``cuda-implicit cuda-ideal``: the opt-in implicit-GEMM kernel, with cuda-ideal's fused
adds). Finishes in well under a minute on an H100.

    python experiments/gpu_profile.py [--config 0] [--batch 1024] [--device cuda] [--backend NAME ...]
"""

from __future__ import annotations

import argparse
import collections
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from photosim.engine.executor import Engine
from photosim.experiments.bench import CONFIGS, _float_predictor, build_model, synthetic, time_interleaved
from photosim.frontend.ptq import quantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="torchvision:resnet18")
    parser.add_argument("--config", type=int, default=0, choices=range(len(CONFIGS)))
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", nargs="+", default=[], help="backends the layers must run on (default: chosen)")
    args = parser.parse_args()
    device = torch.device(args.device)

    model, shape = build_model(args.model, 0)
    config = CONFIGS[args.config]
    qmodel = quantize(model, synthetic(shape, args.calibration, 2), {"w_bits": config.bits, "a_bits": config.bits})
    engine = Engine(qmodel, config.hw, device=device, backend=args.backend)  # diagnostics on, as in run and bench
    chosen = collections.Counter(choice.backend for choice in engine.backends.values())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model}, {config.name}, batch {args.batch}, {where}: conv/linear layers per backend {dict(chosen)}")
    predictors = {
        "float eval": _float_predictor(model, device),
        "engine": engine,
        "engine, torch kernels": Engine(qmodel, config.hw, device=device, backend=["torch", "fbgemm"]),
    }
    x = synthetic(shape, args.batch, 1)
    times = time_interleaved(predictors, x, args.runs, warmup=2, device=device)
    rates = {name: args.batch / statistics.median(seconds) for name, seconds in times.items()}
    for name, rate in rates.items():
        print(f"{name:>24}: {rate:10.0f} images/s  {rate / rates['float eval']:.3f}x float eval")

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        engine(x)
        if cuda:
            torch.cuda.synchronize(device)
    print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
