"""Compile every Triton kernel of photosim for an H100 / H200 (CUDA sm_90) on a machine without a GPU, and report
each compiled variant as one JSON line: its kernel, whether it compiled, and the float fused multiply-adds in its
PTX. Run by tests/test_triton_sm90.py in a process of its own (TRITON_INTERPRET off, so the kernels are Triton's
compiled JIT functions). The launches are those of the interpreter tests, whose kernel calls are compiled here
instead of run (``JITFunction.run`` is replaced): their outputs are garbage, so their own assertions are ignored.

Triton's bundled ptxas takes the PTX to a cubin, so a kernel that does not compile for the GPU fails here, and a
kernel launched without FMA contraction must show no ``fma`` in its float code (the bit-for-bit claims rest on it).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before Triton is imported: compiled JIT functions
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.interpreter  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTERS = {torch.int8: "*i8", torch.uint8: "*u8", torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64",
            torch.float32: "*fp32", torch.float64: "*fp64", torch.bool: "*i1"}
COMPILED: dict[tuple, dict] = {}


def _argument_type(value: object) -> str:
    """The Triton signature type of a runtime argument."""
    if isinstance(value, torch.Tensor):
        return POINTERS[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def compile_instead(self: JITFunction, *args: object, grid: object, warmup: bool, **kwargs: object) -> None:
    """JITFunction.run replaced: compile this launch's specialization for sm_90 once; run nothing."""
    options = {name: kwargs.pop(name) for name in list(kwargs) if name not in self.arg_names}
    bound = dict(zip(self.arg_names, args), **kwargs)
    signature, constants = {}, {}
    for param in self.params:
        value = bound.get(param.name, param.default)
        if param.is_constexpr or value is None:
            signature[param.name], constants[param.name] = "constexpr", value
        else:
            signature[param.name] = _argument_type(value)
    key = (self.fn.__name__, tuple(signature.values()), tuple(sorted(constants.items(), key=str)),
           tuple(sorted(options.items())))
    if key in COMPILED:
        return
    record = {"kernel": self.fn.__name__, "constants": {k: str(v) for k, v in constants.items()},
              "fp_fusion": options.get("enable_fp_fusion", True), "ok": True, "error": "", "fma": 0}
    try:
        compiled = triton.compile(triton.compiler.ASTSource(self, signature, constants), target=TARGET,
                                  options=options)
        record["fma"] = sum(line.strip().startswith("fma.") for line in compiled.asm["ptx"].splitlines())
    except Exception as exc:  # a compile error is the finding: record it, go on
        record.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip()[:2000]}")
    COMPILED[key] = record


def _ignoring_results(call: object, *args: object) -> None:
    """Run a test helper for its launches; its checks of the (not computed) results do not count."""
    with contextlib.suppress(Exception):
        call(*args)


def launch_everything() -> None:
    """The kernel launches of the interpreter tests: tile step (every readout case, the implicit conv cases, the
    readout of torch's tile values), implicit and direct convs (ungrouped, grouped, depthwise), patches, float and
    fixedpoint epilogues and adds."""
    from tests import test_fused_triton as tile, test_gpu_engine as gpu, test_triton_conv as conv  # noqa: I001
    from tests import test_triton_fixedpoint as fixedpoint
    from photosim.engine import cuda_ideal, kernels, triton_conv, triton_patches, triton_requant

    tile.DEVICE = gpu.DEVICE = conv.DEVICE = fixedpoint.DEVICE = "cpu"
    for case in tile.CASES:
        _ignoring_results(tile.check_against_reference, case)
    for case in tile.CONV_CASES:
        _ignoring_results(tile.test_implicit_conv_equals_im2col_and_torch_path, case)
    for case in tile.VALUES_CASES:  # the readout of torch's tile values (VALUES)
        with pytest.MonkeyPatch.context() as patch:
            _ignoring_results(tile.test_readout_of_torchs_tile_values_equals_torch_path, patch, case)
    for dtype in (torch.int32, torch.float32, torch.float64):  # VALUES with a shift, either working dtype
        for work in (torch.float32, torch.float64):
            _ignoring_results(tile.test_readout_step_equals_the_compiled_cpu_readout, dtype, work)
    for geometry in conv.GEOMETRIES:
        _ignoring_results(conv._check_against_torch, triton_conv, geometry, 8)
    for *geometry, groups in conv.GROUPED_GEOMETRIES:
        _ignoring_results(conv._check_against_torch, triton_conv, tuple(geometry), 8, groups)
    for *geometry, groups in (conv.GEOMETRIES[0] + (1,), conv.GROUPED_GEOMETRIES[0]):  # fixedpoint: GEMM, direct
        x, weight, params = conv._layer_case(tuple(geometry), 8, False, 0, groups)
        matmul = kernels.plan_matmul(weight[0].numel(), (0, 255), 8, force="int_mm")
        layer = triton_conv.ImplicitLayer.prepare(kernels.prepare_weights(weight, groups, matmul), params, "fixedpoint")
        layer.conv(x, 0, *geometry[5:9])
    _ignoring_results(gpu.test_epilogue_rounds_ties_to_even_and_clamps, cuda_ideal)
    for test in (fixedpoint.test_ties_after_the_shift_round_half_away_from_zero,
                 fixedpoint.test_srdhm_saturates_and_extreme_exponents):
        _ignoring_results(test, triton_requant)
    codes = torch.zeros(2, 8, 4, 4, dtype=torch.int32)
    q = fixedpoint.qp(0.5, 3)
    triton_requant.add_codes(codes, codes, q, q, q)
    triton_requant.add_codes_fixedpoint(codes, codes, q, q, q)
    for dtype in (torch.int8, torch.float32):
        triton_patches.patches(codes, 3, 0, (3, 3), (1, 1), (1, 1), (1, 1), dtype, 80)


if __name__ == "__main__":
    triton.runtime.interpreter.InterpretedFunction = JITFunction  # fused_triton's device check: CPU tensors here
    JITFunction.run = compile_instead
    launch_everything()
    for record in COMPILED.values():
        print(json.dumps(record))
