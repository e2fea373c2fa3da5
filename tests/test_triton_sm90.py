"""Every Triton kernel compiles for an H100 / H200 (sm_90) here, without a GPU, and the kernels whose bits must
equal the CPU's have no float fused multiply-add in their code (tests/triton_sm90.py does the compiling)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

SCRIPT = Path(__file__).with_name("triton_sm90.py")
KERNELS = {"tile_step_kernel", "_conv_kernel", "_direct_kernel", "_requant_kernel", "_add_kernel", "_patches_kernel"}


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=1200, env=env,
                         cwd=SCRIPT.parents[1])
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines()]


def test_every_kernel_variant_compiles_for_sm90(compiled: list[dict]) -> None:
    assert {record["kernel"] for record in compiled} == KERNELS
    failed = [f"{r['kernel']} {r['constants']}: {r['error']}" for r in compiled if not r["ok"]]
    assert not failed, "\n".join(failed)
    tile_variants = [r for r in compiled if r["kernel"] == "tile_step_kernel"]
    assert {r["constants"]["CONV"] for r in tile_variants} == {"True", "False"}  # im2col and implicit operands
    assert {r["constants"]["OVERFLOW"] for r in tile_variants} >= {"saturate", "wrap"}


def test_no_fused_multiply_add_where_contraction_is_off(compiled: list[dict]) -> None:
    """FMA off at launch leaves no fma in the PTX, but where tl.dot sums float32 products (the float32 tile plan:
    exact integer products and sums, so its FMAs round nothing; the readout of given tile values has none)."""
    exact = [r for r in compiled if not r["fp_fusion"]]
    assert len(exact) > 20
    float_dots = [r for r in exact if r["kernel"] == "tile_step_kernel" and r["constants"]["INT8"] == "False"
                  and r["constants"]["VALUES"] == "False"]
    assert float_dots and all(r["fma"] > 0 for r in float_dots)  # the check can see an fma
    assert [r for r in exact if r["fma"] and r not in float_dots] == []
