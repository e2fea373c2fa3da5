"""The GPU check in one command: the gpu-marked tests, `photosim bench --device cuda`, the profiles and the
cross-device comparison, each a subprocess with a time limit, written to one report (report.md and report.json in
``--out``). A step that fails or runs out of time is reported and the next one runs.

    python experiments/gpu_check.py --out gpu-check [--quick]

The cross-device steps compare the CUDA engine's output codes with the CPU engine's: ideal W8A8 must agree on every
code, the noisy tile run of the bench on at least 99.9% of them (photosim draws the same noise on every device).
``--quick`` shrinks every step (small batches, few images) to try the script itself, on a CPU too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TAIL_CHARS = 6000


@dataclass
class Step:
    """One command of the check and what it printed."""

    name: str
    command: list[str]
    timeout_s: int
    rc: int | None = None
    seconds: float = 0.0
    output: str = ""


def steps(out: Path, quick: bool, device: str) -> list[Step]:
    """The commands of the check, in order."""
    py = sys.executable
    batch, images, compare, runs = ("16", "32", "16", "1") if quick else ("1024", "10000", "512", "3")
    noisy = [py, str(HERE / "noisy_run.py"), "--devices", device, "cpu", "cpu-torch", "cpu-float", "--images", images,
             "--compare", compare, "--batch", "512" if not quick else batch, "--threads", str(os.cpu_count() or 2)]
    profile = [py, str(HERE / "gpu_profile.py"), "--device", device, "--batch", batch, "--runs", runs]
    implicit = [Step("profile ideal W8A8, cuda-implicit", [*profile, "--config", "0", "--backend", "cuda-implicit",
                                                           "cuda-ideal"], 300)] if device.startswith("cuda") else []
    return [
        Step("environment", [py, "-c", ENVIRONMENT], 120),
        Step("gpu tests", [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"], 900),
        Step("bench", [py, "-m", "photosim", "bench", "--device", device, "--batch", batch, "--runs", runs,
                       "--no-memory", "--threads", "2", "--json", str(out / "bench.json")], 900),
        Step("profile ideal W8A8", [*profile, "--config", "0"], 300),
        *implicit,  # a CUDA backend: not in a --device cpu smoke run
        Step("profile output noise", [*profile, "--config", "1"], 300),
        Step("profile tile, ADC, noise, saturating accumulator", [*profile, "--config", "2"], 300),
        Step("cross-device, ideal W8A8 (all codes equal)", [*noisy, "--config", "0"], 900),
        Step("cross-device, noisy tile run (>= 99.9% of codes equal)", [*noisy, "--config", "2"], 900),
    ]


ENVIRONMENT = """
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__)
print("cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))
for name in ("triton", "numpy", "numba", "pydantic"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:
        print(name, "cannot be imported:", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
from photosim.engine.backends import numba_problem
print("CPU readout:", numba_problem() or "fused-cpu (numba)")
"""


def run_step(step: Step) -> None:
    """Run one step, keeping the tail of its output, its exit code (None: out of time) and its seconds."""
    start = time.perf_counter()
    try:
        done = subprocess.run(step.command, capture_output=True, text=True, timeout=step.timeout_s, check=False)
        step.rc, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        text += f"\n(stopped after {step.timeout_s} s)"
    step.seconds = time.perf_counter() - start
    step.output = text[-TAIL_CHARS:]


def agreement(step: Step) -> float | None:
    """The percentage of equal output codes a cross-device step printed, if it did."""
    found = re.findall(r"([0-9.]+)% of output codes equal", step.output)
    return float(found[-1]) if found else None


def write_report(out: Path, done: list[Step]) -> Path:
    """report.md (each step's command, exit code, seconds and output tail) and report.json beside it."""
    lines = ["# photosim GPU check", ""]
    for step in done:
        status = "out of time" if step.rc is None else f"exit {step.rc}"
        lines += [f"## {step.name}: {status}, {step.seconds:.0f} s", "", f"`{' '.join(step.command[:12])}`", "",
                  "```", step.output.rstrip(), "```", ""]
    summary = {step.name: agreement(step) for step in done if step.name.startswith("cross-device")}
    lines += ["## Cross-device agreement (% of output codes equal)", ""]
    lines += [f"- {name}: {value if value is not None else 'not measured'}" for name, value in summary.items()]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps({"steps": [asdict(s) for s in done], "agreement": summary},
                                                indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny batches: try the script itself")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    done = []
    for step in steps(args.out, args.quick, args.device):
        print(f"== {step.name}", flush=True)
        run_step(step)
        done.append(step)
        print(f"   {'out of time' if step.rc is None else f'exit {step.rc}'} after {step.seconds:.0f} s", flush=True)
        write_report(args.out, done)  # after every step: a machine taken back mid-check keeps what ran
    print(f"wrote {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
