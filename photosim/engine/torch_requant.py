"""The ``pytorch`` requant mode: PyTorch's x86 CPU quantized kernels (FBGEMM, oneDNN), bit for bit.

Each kernel's float32 evaluation order is written out in its docstring, found from the kernel sources
and confirmed against torch's quantized ops (tests/test_torch_import.py). float32 steps are float32
tensor ops; fused multiply-adds are emulated exactly. Results match a PyTorch run with the same batch,
``torch.get_num_threads()`` and CPU family (``CPU_FAMILIES``: which kernels PyTorch picks, and oneDNN's
order of scale multiplications, depend on it); the family defaults to this machine's and can be set to
reproduce another (the ``pytorch_cpu`` hardware setting).

FBGEMM's saturating int16 sums of uint8 x int8 pairs are formed by photosim.engine.fbgemm, which the
engine calls where PyTorch's kernel would saturate. Not modeled: adds and average pools whose input is
still NCHW (the graph input), which PyTorch computes with other formulas, and 4-D concatenations along a
dimension other than channels (PyTorch takes its generic path there; ``rescale`` sees one input, not the dim).
"""

from __future__ import annotations

import math

import torch

from photosim.engine.requant import RequantParams, channel_view, fma_f32, real_bias, register_requant
from photosim.ir.format import Node, QParams

GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE: TensorIterator splits larger loops over threads
ONEDNN_MAX_GROUPS = 100  # under the x86 engine, convs with more groups run in FBGEMM
# oneDNN kernels differ in how they apply the source and weight scales: one after the other, or their product.
KERNELS = ("fbgemm", "fbgemm-depthwise", "onednn-sequential-scales", "onednn-product-scale")
# x86 CPU families whose PyTorch kernels differ: AVX2 without VNNI (every conv in FBGEMM under the x86
# engine), AVX512 with VNNI (e.g. AMD Zen 4), and Intel CPUs with AMX tiles (oneDNN's brgemm kernels).
CPU_FAMILIES = ("avx2", "avx512-vnni", "amx")
# FBGEMM's depthwise kernel changed with the FBGEMM that torch 2.14 ships (seen against torch 2.11 and 2.14):
# it keeps the per-tensor bias multiply and add separate, and it takes 7x7 kernels too.
TORCH_2_14 = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 14)
DEPTHWISE_BIAS_UNFUSED = TORCH_2_14
DEPTHWISE_KERNELS = ((3, 3), (5, 5), (7, 7)) if TORCH_2_14 else ((3, 3), (5, 5))
QADD_VECTOR_STEP = 64  # 2 * Vectorized<quint8>::size() of the AVX2 kernel, which AVX512 CPUs run too
# Vectorized<float>::size() of qcat_nhwc_kernel's AVX2 build (AVX512 CPUs run it too: REGISTER_DISPATCH): its
# vectorised loops cover each input's channels in whole blocks of 8, the scalar loop the rest
QCAT_VECTOR_STEP = 8


def _f32(x: float | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """A value rounded to float32, as a tensor (float32 arithmetic stays float32 from there on)."""
    return torch.as_tensor(x, device=device).to(torch.float32)


def detect_cpu_family() -> str:
    """This machine's entry of CPU_FAMILIES, as PyTorch sees it."""
    if torch.cpu._is_amx_tile_supported():
        return "amx"
    return "avx512-vnni" if torch.cpu._is_vnni_supported() else "avx2"


def resolve_cpu_family(cpu: str) -> str:
    """``auto`` -> this machine's family; a named family as it is."""
    if cpu == "auto":
        return detect_cpu_family()
    if cpu not in CPU_FAMILIES:
        raise ValueError(f"unknown CPU family {cpu!r}; expected auto or one of {CPU_FAMILIES}")
    return cpu


def _onednn_kernel(node: Node, cpu: str) -> str:
    """oneDNN's scale order on ``cpu`` (seen against torch's quantized convs): the AVX512-VNNI kernels and AMX's
    depthwise kernel (one input and one output channel per group) apply the scales one after the other; AVX2
    kernels and AMX's brgemm convolutions multiply by their float32 product."""
    a = node.attrs
    depthwise = node.op == "conv2d" and a["in_channels"] == a["groups"] == a["out_channels"]
    if cpu == "avx512-vnni" or (cpu == "amx" and depthwise):
        return "onednn-sequential-scales"
    return "onednn-product-scale"


def pytorch_kernel(node: Node, qengine: str = "x86", cpu: str = "auto") -> str:
    """Which kernel PyTorch runs a conv/linear node in under ``qengine`` on a CPU of family ``cpu``.

    Mirrors ``should_use_onednn_quant`` (x86: oneDNN for convs with groups <= 100 on VNNI CPUs) and
    FBGEMM's ``takeDepthWiseFastPath`` (its depthwise kernel requantizes differently).
    """
    cpu = resolve_cpu_family(cpu)
    if qengine == "onednn":
        return _onednn_kernel(node, cpu)
    if node.op != "conv2d":
        return "fbgemm"
    a = node.attrs
    if qengine == "x86" and cpu != "avx2" and a["groups"] <= ONEDNN_MAX_GROUPS:
        return _onednn_kernel(node, cpu)
    kernel = tuple(a["kernel"])
    depthwise = (
        a["groups"] == a["in_channels"]
        and a["out_channels"] in (a["groups"], 2 * a["groups"])
        and a["groups"] % 8 == 0
        and kernel in DEPTHWISE_KERNELS
        and all(s in (1, 2) for s in a["stride"])
        and all(d == 1 for d in a["dilation"])
        and all(p == (kernel[0] - 1) // 2 for p in a["padding"])
    )
    return "fbgemm-depthwise" if depthwise else "fbgemm"


def quantize_val(value: float, q: QParams) -> int:
    """PyTorch's scalar ``quantize_val`` (used for clamp bounds): ``rne(value * f32(1 / f32(s))) + z``."""
    inv_scale = _f32(1.0) / _f32(q.scale)
    code = int(torch.round(_f32(value) * inv_scale)) + q.zero_point
    return min(max(code, q.qmin), q.qmax)


def _clamp(q: torch.Tensor, out: QParams) -> torch.Tensor:
    """Clamp int64 codes to the output range (a fused ReLU's starts at z_out) as int32."""
    return q.clamp(out.qmin, out.qmax).to(torch.int32)


def _codes(y: torch.Tensor, out: QParams) -> torch.Tensor:
    """Round half to even, add the zero point, clamp."""
    return _clamp(torch.round(y).to(torch.int64) + out.zero_point, out)


def _fbgemm(acc: torch.Tensor, p: RequantParams, bias: torch.Tensor) -> torch.Tensor:
    """FBGEMM's ReQuantizeOutput with a float bias (per-channel: divide; per-tensor: multiply by reciprocal)."""
    ats = _f32(p.input_scale, acc.device) * p.weight_scale.float()  # act_times_w_scale
    multiplier = ats / _f32(p.output.scale, acc.device)
    x = acc.float()
    if p.per_channel:
        x = x + channel_view(bias / ats, acc)
    else:
        reciprocal = channel_view(_f32(1.0, acc.device) / ats, acc)
        bias = channel_view(bias, acc)
        # the GEMM epilogue fuses the multiply and add; the depthwise kernel does too up to torch 2.13 (seen on
        # torch 2.11), while torch 2.14's keeps them separate
        separate = p.kernel == "fbgemm-depthwise" and DEPTHWISE_BIAS_UNFUSED
        x = x + bias * reciprocal if separate else fma_f32(bias, reciprocal, x)
    return _codes(x * channel_view(multiplier, acc), p.output)


def _onednn_scale(scale: float, device: torch.device) -> torch.Tensor:
    """PyTorch hands oneDNN reciprocal scales: ``f32(1 / f32(1 / s))``."""
    return _f32(1.0, device) / _f32(1.0 / scale, device)


def _onednn(acc: torch.Tensor, p: RequantParams, bias: torch.Tensor) -> torch.Tensor:
    """oneDNN's int8 conv: source and weight scales (in the kernel's order, see ``_onednn_kernel``), float bias,
    output scale, zero point added in float."""
    src = _onednn_scale(p.input_scale, acc.device)
    wei = channel_view(p.weight_scale.float(), acc)
    x = acc.float()
    x = x * src * wei if p.kernel == "onednn-sequential-scales" else x * (src * wei)
    x = x + channel_view(bias, acc)
    x = x * (_f32(1.0, acc.device) / _onednn_scale(p.output.scale, acc.device)) + float(p.output.zero_point)
    return _clamp(torch.round(x).to(torch.int64), p.output)


def vectorised_mask(shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Which elements of an elementwise quantized op PyTorch computes in its vectorised body.

    The op walks memory order (NHWC for 4-D: quantized convs write channels_last), split over
    ``min(threads, ceil(numel / GRAIN_SIZE))`` equal chunks (one chunk when single-threaded);
    each chunk runs vectorised in steps of 2 * Vectorized<quint8>::size() and leaves its remainder to the
    scalar tail. The step is 64 on every x86 CPU: ``qadd_stub`` is registered with ``REGISTER_DISPATCH``,
    which gives AVX512 CPUs no kernel of their own, so they run the AVX2 one (aten/src/ATen/native/
    DispatchStub.h, quantized/cpu/kernels/QuantizedOpKernels.cpp). Returns a bool tensor of ``shape``.
    """
    numel = math.prod(shape)
    threads = torch.get_num_threads()
    parts = max(1, min(threads, -(-numel // GRAIN_SIZE)))
    chunk = max(1, -(-numel // parts))
    step = QADD_VECTOR_STEP
    index = torch.arange(numel, device=device)
    start = index // chunk * chunk
    length = (start + chunk).clamp(max=numel) - start
    body = index - start < length // step * step
    if len(shape) == 4:
        n, c, h, w = shape
        return body.view(n, h, w, c).permute(0, 3, 1, 2)
    return body.view(shape)


class PytorchRequant:
    """PyTorch's x86 quantized CPU kernels: float32 bias and scales, round half to even."""

    name = "pytorch"
    integer_bias = False
    float_accumulators = True
    # PyTorch's own quantized kernels for these are not emulated (mean: PyTorch sums dequantized float32 values
    # in a layout-dependent order, except over the innermost dims of a contiguous tensor, which photosim's
    # channels_last activations are not)
    unsupported = frozenset({"mean", "table", "layer_norm", "matmul", "scale", "softmax", "constant",
                             "l2_normalize"})
    # PyTorch's quantized CPU kernels take quint8 / qint8 codes only: no kernel, and no pair saturation, to follow
    # for wider ones
    max_bits = 8

    def requantize(self, acc: torch.Tensor, p: RequantParams) -> torch.Tensor:
        if p.kernel not in KERNELS:
            raise ValueError(f"unknown PyTorch kernel {p.kernel!r} for {p.node!r}; expected one of {KERNELS}")
        kernel = _onednn if p.kernel.startswith("onednn") else _fbgemm
        return kernel(acc, p, real_bias(p).to(acc.device))

    def add(self, a: torch.Tensor, b: torch.Tensor, qa: QParams, qb: QParams, out: QParams) -> torch.Tensor:
        """``quantized::add`` of each sample alone (dim 0 indexes samples; a 1-D tensor is one sample): PyTorch
        at batch size 1, so the codes never depend on how a run batches its inputs. Dequantize both (fma in the
        vectorised body, multiply in the scalar tail), add in float32, multiply by ``f32(1 / s_out)``. A fused
        ReLU is the output clamp at z_out."""
        one = (1, *a.shape[1:]) if a.dim() > 1 else tuple(a.shape)
        body = vectorised_mask(one, a.device).expand(a.shape)
        c = self._dequantize(a, qa, body) + self._dequantize(b, qb, body)
        return _codes(c * (_f32(1.0, a.device) / _f32(out.scale, a.device)), out)

    @staticmethod
    def _dequantize(x: torch.Tensor, q: QParams, body: torch.Tensor) -> torch.Tensor:
        """Codes -> float32 values: ``fma(s, q, f32(s * -z))`` where ``body`` is set (vectorised), else
        ``f32(s * (q - z))`` (the scalar ``dequantize_val``)."""
        scale = _f32(q.scale, x.device)
        tail = scale * (x.to(torch.int64) - q.zero_point).float()
        vectorised = fma_f32(scale.expand(x.shape), x.float(), (scale * -float(q.zero_point)).expand(x.shape))
        return torch.where(body, vectorised, tail)

    def rescale(self, x: torch.Tensor, qin: QParams, out: QParams) -> torch.Tensor:
        """One input of ``quantized::cat`` / ``torch.cat`` (quantized/cpu/TensorShape.cpp). A 4-D input is
        concatenated along channels by qcat_nhwc_kernel (QuantizedOpKernels.cpp): copied when its scale and zero
        point are the output's; else, per pixel, channels in whole blocks of 8 are dequantized with an fma and
        multiplied by ``f32(1 / s_out)`` (computed in double), the rest with ``dequantize_val`` and
        ``quantize_val`` (``f32(1 / f32(s_out))``). Other ranks take the generic path: ``dequantize`` then
        ``quantize_per_tensor``, the scalar formulas on every element. Round half to even, add z_out, clamp."""
        nhwc = x.dim() == 4
        if nhwc and (qin.scale, qin.zero_point) == (out.scale, out.zero_point):
            return x.to(torch.int32)
        device = x.device
        if nhwc:
            channels = x.shape[1]
            body = torch.arange(channels, device=device) < channels // QCAT_VECTOR_STEP * QCAT_VECTOR_STEP
            body = body.view(1, -1, 1, 1).expand(x.shape)
        else:
            body = torch.zeros(x.shape, dtype=torch.bool, device=device)
        inverse = torch.where(body, _f32(1.0 / out.scale, device),
                              _f32(1.0, device) / _f32(out.scale, device))
        return _codes(self._dequantize(x, qin, body) * inverse, out)

    def requantize_products(self, products: torch.Tensor, qa: QParams, qb: QParams, out: QParams,
                            node: str = "") -> torch.Tensor:
        """``quantized::mul`` / ``mul_relu`` (QuantizedOpKernels.cpp qmul_kernel, broadcasting): the int32
        product of ``a - z_a`` and ``b - z_b`` converted to float32 (exact: 8-bit codes) times
        ``m = f32(f32(s_a) * f32(s_b)) * f32(1 / f32(s_out))``, round half to even, add z_out, clamp; the
        vectorised body and the scalar tail agree. A fused ReLU is the output clamp at z_out."""
        device = products.device
        multiplier = _f32(qa.scale, device) * _f32(qb.scale, device) * (_f32(1.0, device) / _f32(out.scale, device))
        return _codes(products.float() * multiplier, out)

    def average(self, sums: torch.Tensor, counts: torch.Tensor, qin: QParams, out: QParams) -> torch.Tensor:
        """Quantized avg_pool2d / adaptive_avg_pool2d on channels_last input:
        ``rne(f32(sum * m)) + z_out`` with ``m = f32(f32(s_in / s_out) / divisor)``."""
        ratio = _f32(qin.scale, sums.device) / _f32(out.scale, sums.device)
        multiplier = ratio / counts.float()
        return _codes(sums.float() * multiplier, out)


register_requant(PytorchRequant())
