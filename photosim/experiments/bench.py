"""Throughput and memory of the integer engine against float32 PyTorch eval (``photosim bench``).

One model (by default a CIFAR-style ResNet-18 with random weights and calibrated BatchNorm statistics),
synthetic inputs, PTQ at the bits of each configuration. Throughput is timed in one process with float
eval and every engine configuration interleaved (warm-up rounds, then the median of several rounds), so
that a busy machine slows all of them alike; peak memory is measured in a fresh subprocess per
configuration, so that one configuration's peak cannot mask another's. docs/performance.md has the
figures and the machine they were measured on.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from photosim._files import write_text_atomic

CIFAR_CLASSES = 10
BN_BATCHES, BN_BATCH = 2, 32  # train-mode passes that give BatchNorm realistic running statistics
MEMORY_WORKERS = 2  # memory subprocesses running at once


@dataclass(frozen=True)
class BenchConfig:
    """One engine configuration and the throughput the project aims for, as a ratio to float eval: on a CPU
    with 2 threads and on a GPU at batch 1024."""

    name: str
    bits: int  # weight and activation bits of the PTQ
    hw: dict[str, Any] | None  # hardware config (None: the ideal integer engine)
    cpu_target: float
    gpu_target: float

    def target(self, device: torch.device) -> float:
        """The target ratio on this kind of device."""
        return self.gpu_target if device.type == "cuda" else self.cpu_target


CONFIGS = (
    BenchConfig("ideal integer W8A8", 8, None, 1.5, 1.0),
    BenchConfig("W8A8 + output noise (no tiling)", 8, {"noise": {"output": {"sigma": 0.01}}}, 1.0, 0.7),
    BenchConfig("W8A8 tile 64, 8-bit ADC, noise, 16-bit sat. acc.", 8,
                {"tile": 64, "adc": {"bits": 8, "range": "full"}, "noise": {"output": {"sigma": 0.01}},
                 "accumulator": {"bits": 16, "overflow": "saturate"}}, 0.3, 0.3),
    BenchConfig("ideal integer W4A4", 4, None, 2.0, 1.0),
    BenchConfig("ideal integer W12A12", 12, None, 0.7, 0.5),
)


@dataclass(frozen=True)
class BenchSettings:
    """What to run: the model spec, batch size, timing rounds, device and intra-op threads."""

    model: str = "torchvision:resnet18"
    batch: int = 128
    runs: int = 3  # timed rounds (the median is reported)
    warmup: int = 1  # untimed rounds first
    device: str = "cpu"
    threads: int = 2
    memory: bool = True  # measure peak memory in subprocesses
    calibration: int = 128  # PTQ calibration images
    seed: int = 0

    @classmethod
    def quick(cls, **overrides: Any) -> BenchSettings:
        """A smoke-test setting: small batches, one round (its figures mean nothing)."""
        return cls(**{"batch": 8, "runs": 1, "calibration": 16, **overrides})


def build_model(spec: str, seed: int = 0, calibrate_bn: bool = True) -> tuple[nn.Module, tuple[int, ...]]:
    """The float model (torchvision: 10 classes; ResNets with the CIFAR stem on 32x32, other architectures at their
    own input size) in eval mode and its per-sample input shape.

    ``calibrate_bn`` measures the BatchNorm statistics on random data, so that activations are distributed
    as in a trained net rather than growing layer after layer.
    """
    from photosim.frontend.models import load_model

    torchvision = spec.startswith("torchvision:")
    cifar_stem = torchvision and spec.removeprefix("torchvision:").startswith(("resnet", "resnext", "wide_resnet"))
    torch.manual_seed(seed)
    loaded = load_model(spec, None, CIFAR_CLASSES if torchvision else None, cifar_stem=cifar_stem)
    model, shape = loaded.module, tuple(loaded.input_shape)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms and calibrate_bn:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the passes below
        model.train()
        with torch.no_grad():
            for i in range(BN_BATCHES):
                model(synthetic(shape, BN_BATCH, seed + 100 + i))
    return model.eval(), shape


def synthetic(shape: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    """``n`` standard-normal inputs (what normalised images look like to the first layer)."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _float_predictor(model: nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    model = model.to(device)

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x.to(device, non_blocking=x.is_pinned())).cpu()

    return predict


def _engine_predictor(qmodel: Any, config: BenchConfig, device: torch.device) -> Callable[[torch.Tensor], Any]:
    """The engine as `photosim run` and `photosim sweep` use it: one simulated chip (chip_engine) with the SNR
    and overflow diagnostics on, a batch numbered from sample 0."""
    from photosim.experiments.workflow import chip_engine
    from photosim.hardware.plan import HardwarePlan

    engine = chip_engine(qmodel, HardwarePlan.resolve(qmodel, config.hw), None, seed=0, repeat=0, device=str(device))
    return lambda x: engine(x, 0)


def _timed(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn(x)
    _sync(device)
    return time.perf_counter() - start


def time_interleaved(predictors: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor, runs: int, warmup: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Seconds per batch of every predictor over ``runs`` rounds (after ``warmup``), each round running them
    all one after the other."""
    times: dict[str, list[float]] = {name: [] for name in predictors}
    for round_ in range(warmup + runs):
        for name, fn in predictors.items():
            seconds = _timed(fn, x, device)
            if round_ >= warmup:
                times[name].append(seconds)
    return times


def _peak_rss_mib() -> float:
    """Peak resident memory of this process (since the last reset_peak_rss) in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB elsewhere


def _reset_peak_rss() -> None:
    """Restart the peak-RSS count from the current RSS (Linux; elsewhere the peak covers the whole process)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def memory_child(request: str) -> None:
    """Subprocess entry: set up one configuration, reset the peak, run one batch, print peaks as JSON."""
    job = json.loads(request)
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    if job["qmodel"] is None:
        model, shape = build_model(job["model"], job["seed"], calibrate_bn=False)  # same memory either way
        predict = _float_predictor(model, device)
    else:
        from photosim.ir.format import load

        qmodel = load(job["qmodel"])
        shape = tuple(qmodel.input_shape)
        predict = _engine_predictor(qmodel, BenchConfig(**job["config"]), device)
    x = synthetic(shape, job["batch"], job["seed"] + 1)
    _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    predict(x)
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    print(json.dumps({"peak_rss_mib": _peak_rss_mib(), "gpu_peak_mib": gpu}))


def _child_peaks(settings: BenchSettings, qmodel_file: str | None, config: BenchConfig | None) -> dict[str, Any]:
    job = {**asdict(settings), "qmodel": qmodel_file, "config": None if config is None else asdict(config)}
    code = "import sys; from photosim.experiments.bench import memory_child; memory_child(sys.argv[1])"
    out = subprocess.run([sys.executable, "-c", code, json.dumps(job)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine(device: torch.device) -> dict[str, Any]:
    """Where the figures come from: CPU, cores, torch build, threads, GPU."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_benchmark(settings: BenchSettings = BenchSettings(), configs: tuple[BenchConfig, ...] = CONFIGS,
                  json_path: str | Path | None = None, progress: Callable[[str], None] = lambda _: None
                  ) -> dict[str, Any]:
    """Time float eval and every configuration; measure peak memory; return (and write) the results.

    Example:
        >>> result = run_benchmark(BenchSettings.quick())
        >>> [(row["name"], row["ratio"]) for row in result["configs"]]
    """
    from photosim.engine.executor import check_device
    from photosim.frontend.ptq import quantize

    torch.set_num_threads(settings.threads)
    device = check_device(settings.device)
    model, shape = build_model(settings.model, settings.seed)
    calibration = synthetic(shape, settings.calibration, settings.seed + 2)
    progress(f"quantizing {settings.model} at {sorted({c.bits for c in configs})} bits")
    qmodels = {bits: quantize(model, calibration, {"w_bits": bits, "a_bits": bits})
               for bits in sorted({c.bits for c in configs})}
    predictors = {"float eval": _float_predictor(model, device)}
    predictors.update({c.name: _engine_predictor(qmodels[c.bits], c, device) for c in configs})
    x = synthetic(shape, settings.batch, settings.seed + 1)
    if device.type == "cuda":
        x = x.pin_memory()  # as a DataLoader with pin_memory=True gives it: copied to the GPU without blocking
    progress(f"timing {len(predictors)} predictors, batch {settings.batch}, {settings.warmup} warm-up + "
             f"{settings.runs} rounds")
    times = time_interleaved(predictors, x, settings.runs, settings.warmup, device)
    peaks: dict[str, dict[str, Any]] = {}
    if settings.memory:
        progress("peak memory, one subprocess per configuration")
        with tempfile.TemporaryDirectory() as tmp:
            files = {}
            for bits, qm in qmodels.items():
                files[bits] = str(Path(tmp) / f"w{bits}.safetensors")
                qm.save(files[bits])
            jobs = {"float eval": (None, None), **{c.name: (files[c.bits], c) for c in configs}}
            with ThreadPoolExecutor(MEMORY_WORKERS) as pool:  # peaks are per process: running two at once is fine
                peaks = dict(zip(jobs, pool.map(lambda job: _child_peaks(settings, *job), jobs.values())))
    float_rate = settings.batch / statistics.median(times["float eval"])
    float_peak = peaks.get("float eval", {}).get("peak_rss_mib")
    rows = []
    for name in predictors:
        config = next((c for c in configs if c.name == name), None)
        rate = settings.batch / statistics.median(times[name])
        peak = peaks.get(name, {})
        rows.append({
            "name": name, "bits": 32 if config is None else config.bits, "hw": None if config is None else config.hw,
            "images_per_s": rate, "ratio": rate / float_rate,
            "target": None if config is None else config.target(device),
            "met": None if config is None else rate / float_rate >= config.target(device),
            "peak_rss_mib": peak.get("peak_rss_mib"), "gpu_peak_mib": peak.get("gpu_peak_mib"),
            "peak_over_float_mib": None if not peak else peak["peak_rss_mib"] - float_peak,
            "seconds": times[name],
        })
    result = {"machine": machine(device), "settings": asdict(settings), "diagnostics": True, "configs": rows}
    if json_path is not None:
        write_text_atomic(json_path, json.dumps(result, indent=2))
    return result


def results_table(result: dict[str, Any]) -> pd.DataFrame:
    """The benchmark as a table: images/s, ratio to float eval, target, peak memory."""
    return pd.DataFrame([{
        "configuration": row["name"], "images/s": row["images_per_s"], "x float eval": row["ratio"],
        "target": row["target"], "met": {True: "yes", False: "no", None: ""}[row["met"]],
        "peak RSS MiB": row["peak_rss_mib"], "over float MiB": row["peak_over_float_mib"],
    } for row in result["configs"]])
