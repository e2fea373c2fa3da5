"""Engine throughput and peak memory against float32 PyTorch eval; the same as ``photosim bench``.

    python benchmarks/bench_engine.py --json bench.json          # CIFAR-style ResNet-18, batch 128
    python benchmarks/bench_engine.py --quick                    # smoke test (CI)

The logic lives in photosim/experiments/bench.py, which ships with the package.
"""

import sys

from photosim.cli import app

if __name__ == "__main__":
    app(["bench", *sys.argv[1:]], prog_name="bench_engine.py")
