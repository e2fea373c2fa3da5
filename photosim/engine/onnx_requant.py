"""The ``onnxruntime`` requant mode: ONNX Runtime's CPU execution provider (MLAS kernels), bit for bit.

Scales are float32 (an ONNX file stores them so), products and quotients are float32 operations, rounding is
``cvtps2dq``'s round half to even; docs/integer-semantics.md (*onnxruntime mode*) derives every formula from the
MLAS sources named in the docstrings, and tests/test_onnx_requant.py checks each against ``onnxruntime``'s own
kernels. The int32 arithmetic of MLAS wraps where photosim's exact sums would not: layers whose accumulator
leaves int32 are refused, as in the ``fixedpoint`` mode.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from photosim.engine.requant import INT32_MIN, RequantParams, channel_view, fma_f32, register_requant
from photosim.errors import PhotosimError
from photosim.ir.containers import in_container, shift_to
from photosim.ir.format import QParams, QuantizedModel

INT32_LIMIT = float(1 << 31)  # cvtps2dq turns a float32 outside [-2^31, 2^31) into INT32_MIN ("integer indefinite")


def f32(value: float | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """A value rounded once to float32, as a tensor: how ONNX Runtime holds every scale."""
    return torch.as_tensor(value, device=device).to(torch.float32)


def round_f32(y: torch.Tensor) -> torch.Tensor:
    """``_mm_cvtps_epi32`` under the default MXCSR: float32 -> int64 rounding half to even, with values outside
    int32 becoming INT32_MIN as the instruction makes them."""
    return torch.where(y.abs() >= INT32_LIMIT, INT32_MIN, torch.round(y)).to(torch.int64)


def mlas_multiplier(input_scale: float, weight_scale: torch.Tensor, output_scale: float) -> torch.Tensor:
    """QLinearConv's ``ComputeOutputScale`` (and QGemm's): ``f32(f32(s_in * s_w) / s_out)`` per output channel."""
    device = weight_scale.device
    return f32(input_scale, device) * weight_scale.float() / f32(output_scale, device)


def quantize_linear(x: torch.Tensor, q: QParams) -> torch.Tensor:
    """ONNX Runtime's QuantizeLinear (MLAS ``MlasQuantizeLinear``): ``rne(f32(x / s)) + z``, then the codes' clamp.

    It divides where PyTorch's ``quantize_per_tensor`` (photosim's graph input) multiplies by a float32 reciprocal;
    the two differ on a few inputs in a million. Returns int32 codes."""
    y = x.float() / f32(q.scale, x.device)
    return (round_f32(y) + q.zero_point).clamp(q.qmin, q.qmax).to(torch.int32)


def _check_int32(acc: torch.Tensor, node: str) -> None:
    if acc.numel() and (float(acc.min()) < INT32_MIN or float(acc.max()) >= INT32_LIMIT):
        raise PhotosimError(
            f"node {node!r}: accumulator values span [{int(acc.min())}, {int(acc.max())}], outside int32, where "
            "ONNX Runtime's MLAS kernels wrap around; the onnxruntime requant mode does not follow them there. "
            "Simulate with `--requant float`, or quantize this layer with fewer bits."
        )


class OnnxRuntimeRequant:
    """ONNX Runtime's CPU kernels: QLinearConv / QGemm requantization, QLinearAdd, QLinearGlobalAveragePool."""

    name = "onnxruntime"
    integer_bias = True  # QLinearConv and QGemm add the int32 bias to the int32 accumulator
    float_accumulators = True
    # ONNX Runtime's QLinearAveragePool sums dequantized float32 values window by window, which exact integer sums
    # cannot reproduce; the others have no QLinear kernel followed here (photosim's export refuses them too)
    unsupported = frozenset({"avgpool2d", "concat", "mul", "mean", "table", "layer_norm", "matmul", "scale",
                             "softmax", "constant", "l2_normalize"})
    max_bits = 8  # ONNX Runtime's quantized CPU kernels take int8 / uint8 codes

    def requantize(self, acc: torch.Tensor, p: RequantParams) -> torch.Tensor:
        """``MlasRequantizeOutput`` (mlas/lib/quantize.cpp): ``rne(f32(f32(acc + b) * M)) + z_out``, clamped."""
        _check_int32(acc, p.node)
        multiplier = channel_view(mlas_multiplier(p.input_scale, p.weight_scale, p.output.scale), acc)
        y = acc.float() * multiplier
        return (round_f32(y) + p.output.zero_point).clamp(p.output.qmin, p.output.qmax).to(torch.int32)

    def add(self, a: torch.Tensor, b: torch.Tensor, qa: QParams, qb: QParams, out: QParams) -> torch.Tensor:
        """``MlasQLinearAddKernelAvx2Helper`` (mlas/lib/intrinsics/avx2/qladd_avx2.cpp): the zero points folded into
        one float32 constant (its inner ``r_a z_a + r_b z_b`` contracted to an FMA by the compiler), then two FMAs
        per element, ``t = fma(a, r_a, fma(b, r_b, c))``, rounded half to even. An input held in the other 8-bit
        container than the output is moved to the output's first (photosim.ir.containers), as the export writes it:
        the kernel takes one type."""
        device = a.device
        a, b = a + shift_to(qa, out.signed), b + shift_to(qb, out.signed)
        qa, qb = in_container(qa, out.signed), in_container(qb, out.signed)
        ratio_a = f32(qa.scale, device) / f32(out.scale, device)
        ratio_b = f32(qb.scale, device) / f32(out.scale, device)
        inner = fma_f32(ratio_a, f32(qa.zero_point, device), ratio_b * f32(qb.zero_point, device))
        fixed = f32(out.zero_point, device) - inner
        shape = torch.broadcast_shapes(a.shape, b.shape)
        t = fma_f32(b.float().expand(shape), ratio_b.expand(shape), fixed.expand(shape))
        t = fma_f32(a.float().expand(shape), ratio_a.expand(shape), t)
        return round_f32(t).clamp(out.qmin, out.qmax).to(torch.int32)

    def average(self, sums: torch.Tensor, counts: torch.Tensor, qin: QParams, out: QParams) -> torch.Tensor:
        """``MlasQLinearGlobalAveragePool`` (mlas/lib/qlgavgpool.cpp): the exact sum of ``x - z_in`` times
        ``f32(s_in / f32(s_out * f32(D)))``, rounded half to even."""
        device = sums.device
        scale = f32(qin.scale, device) / (f32(out.scale, device) * counts.to(device, torch.float32))
        y = sums.float() * scale
        return (round_f32(y) + out.zero_point).clamp(out.qmin, out.qmax).to(torch.int32)


register_requant(OnnxRuntimeRequant())


def onnxruntime_codes(proto: Any, codes_tensor: str, inputs: torch.Tensor,
                      session_config: dict[str, str] | None = None) -> torch.Tensor:
    """Run an ONNX model (a ModelProto) on ONNX Runtime's CPU execution provider and return the integer codes of its
    tensor ``codes_tensor`` as int64; a model whose batch dimension is fixed runs one sample at a time.
    ``session_config``: session config entries (e.g. ``{"session.qdqisint8allowed": "1"}``)."""
    from photosim.ir.onnx_export import load_extra

    ort = load_extra("onnxruntime")
    graph = proto.graph
    if codes_tensor not in {o.name for o in graph.output}:
        proto = type(proto).FromString(proto.SerializeToString())
        proto.graph.output.append(load_extra("onnx").helper.make_empty_tensor_value_info(codes_tensor))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    step = feed.shape[0] if isinstance(feed.shape[0], int) else len(inputs)
    parts = [session.run([codes_tensor], {feed.name: inputs[i:i + step].numpy()})[0]
             for i in range(0, len(inputs), max(step, 1))]
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


def agreement(qmodel: QuantizedModel, proto: Any, codes_tensor: str, offset: int, samples: int,
              seed: int = 0) -> tuple[int, int]:
    """(equal, total) output codes of photosim's onnxruntime mode and ONNX Runtime on ``samples`` random inputs
    spread over the input quantization's range (seeded). ``offset`` is what the ONNX file adds to the output codes
    (photosim.ir.containers). A file whose input QuantizeLinear divides by the scale (``provenance.input_quantization``
    of an imported model) has photosim quantize the inputs as ONNX Runtime does; photosim's export quantizes as
    photosim does."""
    from photosim.engine.executor import Engine

    q = qmodel.input_q
    generator = torch.Generator().manual_seed(seed)
    low, high = q.scale * (q.qmin - q.zero_point), q.scale * (q.qmax - q.zero_point)
    x = torch.rand((samples, *qmodel.input_shape), generator=generator) * (high - low) + low
    engine = Engine(qmodel, {"requant": "onnxruntime"})
    if qmodel.provenance.get("input_quantization") == "division":
        ours = engine.run(quantize_linear(x, q))[qmodel.output].long()
    else:
        ours = engine.codes(x).long()
    theirs = onnxruntime_codes(proto, codes_tensor, x) - offset
    return int((theirs.view_as(ours) == ours).sum()), ours.numel()
