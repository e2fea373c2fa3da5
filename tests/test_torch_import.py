"""PyTorch-quantized models imported with from_torch reproduce PyTorch's integer outputs under `requant: pytorch`.

Kernel tests drive the `pytorch` mode and PyTorch's quantized ops on the same integer inputs, with biases and
codes chosen where the candidate float32 formulas disagree (so a wrong formula cannot pass by luck). Model
tests convert float models with prepare_fx / convert_fx and compare every node's codes with PyTorch's.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from torch import fx, nn
from torch.ao.quantization import (
    MinMaxObserver,
    QConfig,
    QConfigMapping,
    default_observer,
    default_qconfig,
    get_default_qconfig_mapping,
)
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from photosim.engine import kernels, torch_requant
from photosim.engine.executor import node_outputs, simulate, simulate_codes
from photosim.engine.requant import REQUANT_MODES, RequantParams, fma_f32
from photosim.engine.torch_requant import pytorch_kernel, quantize_val
from photosim.errors import PhotosimError
from photosim.frontend.torch_import import from_torch, import_torch
from photosim.ir.format import Node, QParams, load
from photosim.ir.ops import OPS

MODE = REQUANT_MODES["pytorch"]
HW = {"requant": "pytorch"}
QCONFIGS: dict[str, Callable[[], QConfigMapping]] = {
    "x86": lambda: get_default_qconfig_mapping("x86"),
    "fbgemm": lambda: get_default_qconfig_mapping("fbgemm"),
    "per_tensor": lambda: QConfigMapping().set_global(default_qconfig),
    # activations over the whole uint8 range: FBGEMM's saturating int16 pair sums then matter
    "full_range": lambda: QConfigMapping().set_global(QConfig(
        activation=MinMaxObserver.with_args(dtype=torch.quint8, reduce_range=False),
        weight=MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric))),
}


@pytest.fixture(autouse=True)
def x86_engine() -> Iterator[None]:
    """PyTorch's default engine on x86, set explicitly; thread count restored after each test."""
    engine, threads = torch.backends.quantized.engine, torch.get_num_threads()
    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)  # quantized tensor creation deprecation notices
        yield
    torch.backends.quantized.engine = engine
    torch.set_num_threads(threads)


def q8(scale: float, zero_point: int, relu: bool = False) -> QParams:
    return QParams(scale, zero_point, 8, False, zero_point if relu else 0, 255)


def quint8(codes: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return torch._make_per_tensor_quantized_tensor(codes.to(torch.uint8), scale, zero_point)


# -- fma, clamp bounds, dispatch ----------------------------------------------------------------------------------

def _exact_f32(value: Fraction) -> float:
    """Round a rational to float32, half to even, by comparing the float32 neighbours exactly."""
    guess = np.float32(float(value))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    return float(min(candidates, key=lambda c: (abs(Fraction(float(c)) - value), int(c.view(np.int32)) & 1)))


def test_fma_f32_rounds_once_even_where_float64_would_round_twice() -> None:
    # 8532557 * 16494175 = 2^47 + 147: a*b = 2^-24 + 147 * 2^-71, just above the float32 tie at 1 + 2^-24;
    # a float64 sum loses the 147 * 2^-71 and lands on the tie (-> 1.0), the exact result rounds up.
    a, b, c = torch.tensor([8532557 * 2.0**-47]), torch.tensor([16494175 * 2.0**-24]), torch.tensor([1.0])
    assert (a.double() * b.double() + c.double()).float().item() == 1.0
    assert fma_f32(a, b, c).item() == 1.0 + 2.0**-23
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(2000, generator=g) * 10.0 ** torch.randint(-6, 6, (2000,), generator=g) for _ in range(3))
    got = fma_f32(a, b, c)
    for i in range(0, 2000, 7):
        exact = Fraction(a[i].item()) * Fraction(b[i].item()) + Fraction(c[i].item())
        assert got[i].item() == _exact_f32(exact)


def test_clamp_bounds_match_quantized_relu6_and_hardtanh_near_ties() -> None:
    g = np.random.default_rng(0)
    for _ in range(300):
        z = int(g.integers(0, 40))
        scale = float(np.float32(6.0 / (int(g.integers(20, 200)) + 0.5 + g.normal(0, 1e-6))))
        q = quint8(torch.arange(256), scale, z)
        for fn, lo, hi in ((F.relu6, 0.0, 6.0), (lambda t: F.hardtanh(t, 0.5, 3.0), 0.5, 3.0)):
            expected = torch.arange(256).clamp(quantize_val(lo, q8(scale, z)), quantize_val(hi, q8(scale, z)))
            assert torch.equal(fn(q).int_repr().long(), expected)


def _conv_node(c: int, o: int, k: int, groups: int, stride: int = 1, padding: int | None = None) -> Node:
    padding = k // 2 if padding is None else padding
    return Node("c", "conv2d", ["x"], [q8(1.0, 0)], q8(1.0, 0), {
        "in_channels": c, "out_channels": o, "kernel": [k, k], "stride": [stride] * 2, "padding": [padding] * 2,
        "dilation": [1, 1], "groups": groups})


def test_pytorch_kernel_follows_fbgemm_depthwise_fast_path() -> None:
    avx2 = functools.partial(pytorch_kernel, cpu="avx2")
    assert avx2(_conv_node(16, 16, 3, 16)) == "fbgemm-depthwise"
    assert avx2(_conv_node(16, 32, 5, 16, stride=2)) == "fbgemm-depthwise"
    assert avx2(_conv_node(12, 12, 3, 12)) == "fbgemm"  # groups not a multiple of 8
    assert avx2(_conv_node(16, 16, 3, 16, padding=0)) == "fbgemm"  # not 'same' padding
    assert avx2(_conv_node(16, 16, 9, 16)) == "fbgemm"
    assert avx2(_conv_node(16, 16, 7, 16)) == ("fbgemm-depthwise" if torch_requant.TORCH_2_14 else "fbgemm")
    assert avx2(_conv_node(8, 8, 3, 1)) == "fbgemm"
    assert pytorch_kernel(_conv_node(104, 104, 3, 104), cpu="avx512-vnni") == "fbgemm-depthwise"  # groups > 100
    assert pytorch_kernel(_conv_node(16, 16, 3, 16), "fbgemm", cpu="amx") == "fbgemm-depthwise"


@pytest.mark.parametrize(("cpu", "node", "kernel"), [
    ("avx512-vnni", _conv_node(8, 12, 3, 1), "onednn-sequential-scales"),
    ("avx512-vnni", _conv_node(16, 16, 3, 16), "onednn-sequential-scales"),
    ("amx", _conv_node(8, 12, 3, 1), "onednn-product-scale"),  # brgemm convolution
    ("amx", _conv_node(16, 16, 3, 4), "onednn-product-scale"),  # grouped
    ("amx", _conv_node(16, 32, 5, 16, stride=2), "onednn-product-scale"),  # two outputs per group
    ("amx", _conv_node(16, 16, 3, 16), "onednn-sequential-scales"),  # depthwise kernel
    ("amx", _conv_node(12, 12, 3, 12), "onednn-sequential-scales"),
])
def test_pytorch_kernel_on_vnni_cpus_picks_onednn_and_its_scale_order(cpu: str, node: Node, kernel: str) -> None:
    assert pytorch_kernel(node, cpu=cpu) == kernel
    assert pytorch_kernel(node, "onednn", cpu="avx2") == "onednn-product-scale"


def test_onednn_scale_orders_follow_their_float32_formulas() -> None:
    """Sequential: ``((acc * src) * wei + bias) * (1/dst) + z``; product: ``(acc * (src * wei) + bias) ...``,
    in numpy float32, with src, wei and 1/dst as PyTorch hands them to oneDNN (reciprocals of reciprocals)."""
    f32 = np.float32
    acc = np.arange(-36000, 36000, dtype=np.int64)  # every accumulator whose code lands inside [0, 255]
    # scales found by a seeded search for a case where the two orders round one accumulator differently
    s_in, s_w, s_out = 0.022307701408863068, 0.0063020652160048485, 0.05994419753551483
    z_out, bias = 111, f32(0.9616706967353821)
    src, dst = f32(1) / f32(1.0 / s_in), f32(1) / f32(1.0 / s_out)
    p = RequantParams(s_in, torch.tensor([f32(s_w)]).double(), q8(s_out, z_out), torch.zeros(1, dtype=torch.int64),
                      torch.tensor([bias]), True, "onednn-sequential-scales", "n")
    x = acc.astype(f32)
    expected = {
        "onednn-sequential-scales": ((x * src) * f32(s_w) + bias) * (f32(1) / dst) + f32(z_out),
        "onednn-product-scale": (x * (src * f32(s_w)) + bias) * (f32(1) / dst) + f32(z_out),
    }
    results = {}
    for kernel, y in expected.items():
        results[kernel] = MODE.requantize(torch.from_numpy(acc)[:, None], replace(p, kernel=kernel))[:, 0]
        assert np.array_equal(results[kernel].numpy(), np.clip(np.rint(y), 0, 255).astype(np.int32)), kernel
    assert not torch.equal(*results.values()), "the two orders agree on every input: the test cannot tell them apart"


# -- requantize vs quantized conv / linear ------------------------------------------------------------------------

def _accumulators(module: nn.Module, xq: torch.Tensor) -> torch.Tensor:
    """Exact int64 ``sum (x - z_in) * w`` (float64 sums of small integers are exact)."""
    x = xq.int_repr().double() - xq.q_zero_point()
    w = module.weight().int_repr().double()
    if isinstance(module, nnq.Conv2d):
        acc = F.conv2d(x, w, None, module.stride, module.padding, module.dilation, module.groups)
    else:
        acc = x @ w.t()
    return acc.round().long()


def _alternative(p: RequantParams) -> RequantParams:
    """The formula a careless emulation would use instead: the test shows it differs on these inputs."""
    if p.kernel.startswith("onednn"):
        other = "onednn-product-scale" if p.kernel == "onednn-sequential-scales" else "onednn-sequential-scales"
        return replace(p, kernel=other)
    if p.per_channel:
        return replace(p, per_channel=False)
    if torch_requant.DEPTHWISE_BIAS_UNFUSED:  # the depthwise and GEMM epilogues differ only then
        return replace(p, kernel="fbgemm" if p.kernel == "fbgemm-depthwise" else "fbgemm-depthwise")
    return replace(p, per_channel=True)


def _adversarial_bias(acc: torch.Tensor, p: RequantParams, g: torch.Generator, candidates: int = 256) -> torch.Tensor:
    """Per output channel, a float bias for which `p` and its alternative disagree.

    Each candidate puts one position's ``y = (acc + bias / (s_in * s_w)) * M`` within a few float32 ulps of a
    rounding tie inside the output range, where the float32 evaluation order decides the code.
    """
    per_channel = acc.transpose(0, 1).reshape(acc.shape[1], -1)  # (O, positions)
    lo, hi = p.output.qmin - p.output.zero_point, p.output.qmax - p.output.zero_point
    chosen = []
    for o, rows in enumerate(per_channel):
        ats = p.input_scale * float(p.weight_scale[o])
        anchor = rows[torch.randint(0, len(rows), (candidates,), generator=g)].double()
        tie = torch.randint(lo, hi, (candidates,), generator=g) + 0.5
        jitter = 1 + (torch.rand(candidates, generator=g, dtype=torch.float64) * 2 - 1) * 2.0**-21
        bias = ((tie * p.output.scale / ats - anchor) * ats * jitter).float()
        trial = replace(p, weight_scale=p.weight_scale[o].expand(candidates), bias_float=bias,
                        bias=torch.zeros(candidates, dtype=torch.int64))
        anchor_acc = anchor.long()[None, :]  # candidate i evaluated at its own anchor
        disagree = MODE.requantize(anchor_acc, trial) != MODE.requantize(anchor_acc, _alternative(trial))
        chosen.append(bias[disagree[0].int().argmax()])
    return torch.stack(chosen)


LAYERS = {  # name -> (in, out, kernel, groups, stride); kernel 0 = linear
    "linear": (40, 24, 0, 1, 1),
    "conv": (8, 12, 3, 1, 1),
    "grouped": (16, 16, 3, 4, 1),
    "depthwise": (16, 16, 3, 16, 1),
    "depthwise_x2_5x5_s2": (16, 32, 5, 16, 2),
    "depthwise_odd_groups": (12, 12, 3, 12, 1),
    "depthwise_104_groups": (104, 104, 3, 104, 1),
}


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
@pytest.mark.parametrize("relu", [False, True], ids=["", "relu"])
@pytest.mark.parametrize("qengine", ["x86", "fbgemm"])
def test_requantize_matches_quantized_conv_and_linear(layer: str, per_channel: bool, relu: bool,
                                                      qengine: str) -> None:
    torch.backends.quantized.engine = qengine
    c, o, k, groups, stride = LAYERS[layer]
    g = torch.Generator().manual_seed(list(LAYERS).index(layer) * 4 + 2 * per_channel + relu)
    s_in, z_in, s_out, z_out = 0.02, 9, 0.05, 40 if relu else 120
    if k == 0:
        module = (nniq.LinearReLU if relu else nnq.Linear)(c, o)
        codes = torch.randint(0, 128, (64, c), generator=g)
        node = Node("l", "linear", ["x"], [q8(s_in, z_in)], q8(s_out, z_out), {"in_features": c, "out_features": o})
    else:
        module = (nniq.ConvReLU2d if relu else nnq.Conv2d)(c, o, k, stride=stride, padding=k // 2, groups=groups)
        codes = torch.randint(0, 128, (2, c, 7, 7), generator=g)  # < 128: no int16 saturation in FBGEMM
        node = _conv_node(c, o, k, groups, stride)
    w = torch.randn(module.weight().shape, generator=g)
    if per_channel:
        scales = (w.abs().flatten(1).amax(1) / 127.5).double()
        wq = torch.quantize_per_channel(w, scales, torch.zeros(o, dtype=torch.long), 0, torch.qint8)
        w_scale = wq.q_per_channel_scales()
    else:
        wq = torch.quantize_per_tensor(w, float(w.abs().max() / 127.5), 0, torch.qint8)
        w_scale = torch.full((o,), wq.q_scale(), dtype=torch.float64)
    module.set_weight_bias(wq, None)
    module.scale, module.zero_point = s_out, z_out
    xq = quint8(codes, s_in, z_in)
    acc = _accumulators(module, xq)
    p = RequantParams(s_in, w_scale.float().double(), q8(s_out, z_out, relu), torch.zeros(o, dtype=torch.int64),
                      None, per_channel, pytorch_kernel(node, qengine), node.name)
    p = replace(p, bias_float=_adversarial_bias(acc, p, g))
    module.set_weight_bias(wq, p.bias_float)
    ours = MODE.requantize(acc, p)
    assert (ours != MODE.requantize(acc, _alternative(p))).any(), "the inputs do not discriminate the formulas"
    theirs = module(xq).int_repr().int()
    assert torch.equal(ours, theirs), f"{int((ours != theirs).sum())} of {ours.numel()} codes differ"


def test_requantize_without_float_bias_uses_the_integer_bias() -> None:
    p = RequantParams(0.5, torch.tensor([0.25]).double(), q8(1.0, 3), torch.tensor([6]), None, True, "fbgemm", "n")
    assert MODE.requantize(torch.tensor([[4]]), p).tolist() == [[round((4 + 6) * 0.125) + 3]]


# -- add and average vs quantized add / pools ---------------------------------------------------------------------

def _body_and_tail(monkeypatch: pytest.MonkeyPatch, a: torch.Tensor, b: torch.Tensor, qa: QParams, qb: QParams,
                   out: QParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The mode's add with every element forced into the vectorised body, then into the scalar tail."""
    results = []
    for body in (True, False):
        monkeypatch.setattr(torch_requant, "vectorised_mask", lambda shape, device, body=body: torch.full(
            shape, body, device=device))
        results.append(MODE.add(a, b, qa, qb, out))
    monkeypatch.undo()
    return results[0], results[1]


@pytest.mark.parametrize("shape", [(147,), (1, 3, 7, 7), (70001,), (2, 16, 33, 33)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("relu", [False, True], ids=["add", "add_relu"])
def test_add_matches_quantized_add_body_and_tail(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...],
                                                 threads: int, relu: bool) -> None:
    torch.set_num_threads(threads)
    qa, qb, out = q8(0.0731, 117), q8(0.0413, 91), q8(0.0912, 60, relu)
    grid_a, grid_b = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    body, tail = _body_and_tail(monkeypatch, grid_a, grid_b, qa, qb, out)
    pairs = (body != tail).nonzero()
    assert len(pairs) > 0, "these scales never separate the body and tail formulas"
    g = torch.Generator().manual_seed(len(shape) * threads)
    a, b = torch.randint(0, 256, shape, generator=g), torch.randint(0, 256, shape, generator=g)
    planted = torch.rand(shape, generator=g) < 0.3  # many elements whose result depends on body vs tail
    pick = pairs[torch.randint(0, len(pairs), shape, generator=g)]
    a, b = torch.where(planted, pick[..., 0], a), torch.where(planted, pick[..., 1], b)
    ta, tb = quint8(a, qa.scale, qa.zero_point), quint8(b, qb.scale, qb.zero_point)
    if len(shape) == 4:  # quantized convs write channels_last; the add walks memory in that order
        ta, tb = (t.contiguous(memory_format=torch.channels_last) for t in (ta, tb))
    op = torch.ops.quantized.add_relu if relu else torch.ops.quantized.add
    one_at_a_time = len(shape) == 4  # dim 0 indexes samples, which the mode adds as PyTorch at batch size 1
    pieces = zip(ta.split(1), tb.split(1)) if one_at_a_time else [(ta, tb)]
    theirs = torch.cat([op(x, y, out.scale, out.zero_point).int_repr().int() for x, y in pieces])
    ours = MODE.add(a, b, qa, qb, out)
    assert torch.equal(ours, theirs), f"{int((ours != theirs).sum())} of {ours.numel()} codes differ"


@pytest.mark.parametrize("rank", [4, 3], ids=["nhwc_kernel", "generic_path"])
def test_concat_matches_quantized_cat_body_and_tail(rank: int) -> None:
    """Every code of inputs with 13 channels (one 8-channel vector block, 5 scalar) and 4 (all scalar) under
    scales that separate the two formulas, plus an input already at the output's scale (copied)."""
    qa, qb, out = q8(0.0731, 117), q8(0.0413, 91), q8(0.1462, 60)
    grid = torch.arange(256).view(1, 1, 256, 1)
    inputs = [(grid.expand(2, 13, 256, 1), qa), (grid.expand(2, 4, 256, 1), qb), (grid.expand(2, 3, 256, 1), out)]
    if rank == 3:
        inputs = [(codes.flatten(2), q) for codes, q in inputs]
    tensors = [quint8(codes, q.scale, q.zero_point) for codes, q in inputs]
    if rank == 4:  # quantized convs write channels_last, which sends a channel concat to qcat_nhwc_kernel
        tensors = [t.contiguous(memory_format=torch.channels_last) for t in tensors]
    theirs = torch.ops.quantized.cat(tensors, 1, out.scale, out.zero_point).int_repr().int()
    ours = torch.cat([MODE.rescale(codes, q, out) for codes, q in inputs], 1)
    assert torch.equal(ours, theirs), f"{int((ours != theirs).sum())} of {ours.numel()} codes differ"
    wide = grid.expand(2, 13, 256, 1)
    differ = int((MODE.rescale(wide, qa, out) != MODE.rescale(wide.flatten(2), qa, out).view(wide.shape)).sum())
    assert differ > 0, "these scales never separate the vectorised and scalar formulas"


@pytest.mark.parametrize("relu", [False, True], ids=["mul", "mul_relu"])
def test_mul_matches_quantized_mul_on_every_code_pair(relu: bool) -> None:
    """All 256 x 256 code pairs, broadcast (N, C, H, 1) x (N, C, 1, W), channels_last as quantized convs write,
    under an output scale that float64 arithmetic would requantize differently."""
    qa, qb = q8(0.0731, 117), q8(0.0413, 91)
    out = q8(2 * qa.scale * qb.scale, 60, relu)
    a = torch.arange(256).view(1, 1, 256, 1).expand(2, 3, 256, 1)
    b = torch.arange(256).view(1, 1, 1, 256).expand(2, 3, 1, 256)
    ta, tb = (quint8(c, q.scale, q.zero_point).contiguous(memory_format=torch.channels_last)
              for c, q in ((a, qa), (b, qb)))
    op = torch.ops.quantized.mul_relu if relu else torch.ops.quantized.mul
    theirs = op(ta, tb, out.scale, out.zero_point).int_repr().int()
    products = (a - qa.zero_point) * (b - qb.zero_point)
    ours = MODE.requantize_products(products, qa, qb, out)
    assert torch.equal(ours, theirs), f"{int((ours != theirs).sum())} of {ours.numel()} codes differ"
    in_float64 = REQUANT_MODES["float"].requantize_products(products, qa, qb, out)
    assert int((in_float64 != theirs).sum()) > 0, "this output scale never separates float32 from float64"


POOLS = {
    "avg3_s2_p1": lambda t: F.avg_pool2d(t, 3, 2, 1),
    "avg3_s2_p1_ceil_nopad": lambda t: F.avg_pool2d(t, 3, 2, 1, ceil_mode=True, count_include_pad=False),
    "avg2_divisor3": lambda t: F.avg_pool2d(t, 2, divisor_override=3),
    "adaptive_3x2": lambda t: F.adaptive_avg_pool2d(t, (3, 2)),
    "global": lambda t: F.adaptive_avg_pool2d(t, 1),
}


def _pool_sums(name: str, codes: torch.Tensor, z: int) -> tuple[torch.Tensor, torch.Tensor]:
    if name.startswith("avg3"):
        return kernels.avg_pool2d_sums(codes, z, (3, 3), (2, 2), (1, 1), "ceil" in name, "nopad" not in name, None)
    if name == "avg2_divisor3":
        return kernels.avg_pool2d_sums(codes, z, (2, 2), (2, 2), (0, 0), False, True, 3)
    return kernels.adaptive_avg_pool2d_sums(codes, z, (1, 1) if name == "global" else (3, 2))


@pytest.mark.parametrize("pool", list(POOLS))
def test_average_matches_quantized_pools_on_channels_last(pool: str) -> None:
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 256, (3, 21, 9, 10), generator=g)  # 21 channels: vector blocks and scalar tail
    q = q8(0.037, 101)
    tq = quint8(codes, q.scale, q.zero_point).contiguous(memory_format=torch.channels_last)
    theirs = POOLS[pool](tq).int_repr().int()
    sums, counts = _pool_sums(pool, codes, q.zero_point)
    assert torch.equal(MODE.average(sums, counts, q, q), theirs)


def test_average_vector_and_scalar_channel_formulas_agree_when_scales_match() -> None:
    """PyTorch's NHWC pools multiply by m = f32(1/D) in vector blocks and by f32(1/f32(1/m)) on leftover
    channels; with s_out == s_in (always, for quantized pools) the two are the same number."""
    d = torch.arange(1, 1 << 16, dtype=torch.float32)
    m = 1.0 / d
    assert torch.equal(1.0 / (1.0 / m), m)


# -- converted models, end to end ---------------------------------------------------------------------------------

class Conv(nn.Module):
    def __init__(self, relu: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))


class Linear(nn.Module):
    def __init__(self, relu: bool):
        super().__init__()
        self.fc = nn.Linear(48, 16)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(torch.flatten(x, 1))
        return F.relu(y) if self.relu else y


class Reshape(nn.Module):
    """A per-sample reshape that is not a flatten (photosim's reshape op), then a flatten into a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).reshape(x.size(0), 16, 16)
        return self.fc(torch.flatten(y, 1))


class Add(nn.Module):
    def __init__(self, relu: bool):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        y = x + self.conv2(x)
        return F.relu(y) if self.relu else y


class Concat(nn.Module):
    """Two branches concatenated along channels (19 + 8: whole 8-channel blocks and a scalar tail), then a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Conv2d(3, 19, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(27, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.left(x), F.relu(self.right(x))], 1))


class SqueezeExcite(nn.Module):
    """A squeeze-excite block with a ReLU6 gate (pytorch mode has no rule for sigmoid tables): a broadcasting
    quantized::mul, then a fused mul_relu of two full-size tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Conv2d(12, 12, 1)
        self.gate = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = y * self.gate(self.fc(self.pool(y)))
        return F.relu(z * y)


class Pools(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.avg = nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)
        self.fc = nn.Linear(12 * 3 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv(x), 3, 2, 1)
        x = F.adaptive_avg_pool2d(self.avg(x), (3, 2))
        return self.fc(x.reshape(x.size(0), -1))


class Clamps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3)
        self.relu6 = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu6(self.conv1(x))
        return F.relu(F.hardtanh(self.conv2(x), -0.5, 2.0))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) \
            if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(y + self.down(x))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2))
        self.pool, self.dropout, self.fc = nn.AdaptiveAvgPool2d(1), nn.Dropout(0.2), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(self.layer1(self.stem(x))), 1)))


class Depthwise(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.expand = nn.Conv2d(3, channels, 1)
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.dw(self.expand(x)))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                                 nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv": (lambda: Conv(False), (3, 8, 8)),
    "conv_relu": (lambda: Conv(True), (3, 8, 8)),
    "linear": (lambda: Linear(False), (3, 4, 4)),
    "linear_relu": (lambda: Linear(True), (3, 4, 4)),
    "add": (lambda: Add(False), (3, 8, 8)),
    "add_relu": (lambda: Add(True), (3, 8, 8)),
    "pools": (Pools, (3, 11, 9)),
    "relu6_hardtanh": (Clamps, (3, 8, 8)),
    "resnet": (ResNet, (3, 12, 12)),
    "depthwise_16": (lambda: Depthwise(16), (3, 8, 8)),
    "depthwise_104": (lambda: Depthwise(104), (3, 6, 6)),
    "mlp": (MLP, (3, 4, 4)),
    "reshape": (Reshape, (3, 8, 8)),
    "concat": (Concat, (3, 8, 8)),
    "squeeze_excite": (SqueezeExcite, (3, 8, 8)),
}


def convert(model: nn.Module, qconfig: str, x: torch.Tensor) -> fx.GraphModule:
    """prepare_fx, calibrate on ``x`` itself (no activation beyond the observed range), convert_fx."""
    prepared = prepare_fx(model.eval(), QCONFIGS[qconfig](), (x[:1],))
    with torch.no_grad():
        prepared(x)
    return convert_fx(prepared)


def torch_codes(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every quantized intermediate of the PyTorch model run one sample at a time (the batch size the `pytorch`
    mode reproduces), keyed as from_torch names nodes."""
    runs = [_torch_codes(gm, x[i:i + 1]) for i in range(len(x))]
    return {name: torch.cat([run[name] for run in runs]) for name in runs[0]}


def _torch_codes(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    codes: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            result = super().run_node(n)
            if isinstance(result, torch.Tensor) and result.is_quantized:
                name = str(n.target) if n.op == "call_module" and str(n.target) not in codes else n.name
                codes[name] = result.int_repr().int()
            return result

    with torch.no_grad():
        Recorder(gm).run(x)
    return codes


def assert_bit_exact(gm: fx.GraphModule, shape: tuple[int, ...], x: torch.Tensor) -> None:
    qm = from_torch(gm, shape)
    ours, theirs = node_outputs(qm, x, HW), torch_codes(gm, x)
    compared = [n.name for n in qm.nodes if n.name in theirs]
    assert qm.output in compared
    for name in compared:
        diff = int((ours[name] != theirs[name]).sum())
        assert diff == 0, f"node {name}: {diff} of {theirs[name].numel()} codes differ from PyTorch"
    assert torch.equal(simulate_codes(qm, x, HW), theirs[qm.output])
    with torch.no_grad():
        assert torch.equal(simulate(qm, x, HW).argmax(1), gm(x).argmax(1))


@pytest.mark.parametrize("qconfig", list(QCONFIGS))
@pytest.mark.parametrize("model", list(MODELS))
def test_converted_models_are_bit_exact(model: str, qconfig: str) -> None:
    factory, shape = MODELS[model]
    torch.manual_seed(0)
    x = torch.randn(16, *shape)
    assert_bit_exact(convert(factory(), qconfig, x), shape, x)


def test_the_importer_handles_every_op_of_the_table() -> None:
    """The bit-exact model tests above reach every op: an op added to photosim.ir.ops needs an import pattern,
    except those the `pytorch` mode does not emulate yet (an import could not be bit-exact), the code-moving
    permute, slice, roll and pad, and l2_normalize, which no PyTorch-quantized test model uses yet."""
    imported = set()
    for factory, shape in MODELS.values():
        x = torch.randn(4, *shape)
        imported |= {n.op for n in from_torch(convert(factory(), "x86", x), shape).nodes}
    code_moving = {"permute", "slice", "roll", "pad", "l2_normalize"}
    assert imported == set(OPS) - REQUANT_MODES["pytorch"].unsupported - code_moving


def test_quantized_cat_to_its_own_scale_imports_and_is_bit_exact() -> None:
    """convert_fx's torch.cat shares one quantization (a copy); quantized::cat with its own output scale and zero
    point requantizes both branches (19 channels: vectorised blocks and a scalar tail; which codes separate the
    two formulas is planted in test_concat_matches_quantized_cat_body_and_tail)."""
    torch.manual_seed(3)
    x = torch.randn(8, 3, 8, 8)
    gm = convert(Concat(), "x86", x)
    (cat,) = [n for n in gm.graph.nodes if n.target is torch.cat]
    cat.target, cat.args = torch.ops.quantized.cat, (cat.args[0], 1, 0.0517, 97)
    gm.recompile()
    assert_bit_exact(gm, (3, 8, 8), x)
    concat = next(n for n in from_torch(gm, (3, 8, 8)).nodes if n.op == "concat")
    assert (concat.output_q.scale, concat.output_q.zero_point) == (0.0517, 97)


def test_add_over_32768_elements_split_across_threads_is_bit_exact() -> None:
    torch.manual_seed(1)
    torch.set_num_threads(2)
    x = torch.randn(3, 3, 72, 72)  # 8 * 72 * 72 = 41472 elements a sample: two parallel chunks, each with a tail
    assert_bit_exact(convert(Add(False), "x86", x), (3, 72, 72), x)


def test_pytorch_mode_codes_do_not_depend_on_the_batch_size() -> None:
    """Adds are PyTorch's at batch size 1, so chunking a run differently changes no code (issue: 8,128 codes of a
    1000-sample add moved with batch_size=7)."""
    torch.manual_seed(2)
    x = torch.randn(21, 3, 12, 12)
    qm = from_torch(convert(Add(False), "x86", x), (3, 12, 12))
    whole = simulate_codes(qm, x, HW, batch_size=21)
    for batch_size in (1, 4, 7):
        assert torch.equal(simulate_codes(qm, x, HW, batch_size=batch_size), whole)


def test_imported_model_records_pytorch_numbers_and_survives_save_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    gm = convert(Conv(True), "x86", x)
    qm = from_torch(gm, (3, 8, 8), name="tiny")
    conv = qm.node("conv")
    assert conv.output_q.qmin == conv.output_q.zero_point == gm.conv.zero_point
    assert conv.output_q.scale == gm.conv.scale and qm.input_q.scale == float(gm.conv_input_scale_0)
    assert torch.equal(qm.tensors["conv.weight"], gm.conv.weight().int_repr())
    assert torch.equal(qm.tensors["conv.bias_float"], gm.conv.bias())
    assert qm.tensors["conv.bias"].dtype == torch.int32 and qm.tensors["conv.weight_scale"].dtype == torch.float32
    assert qm.provenance["source"] == "torch.ao.quantization" and qm.provenance["qengine"] == "x86"
    qm.save(tmp_path / "m.safetensors")
    assert torch.equal(simulate_codes(load(tmp_path / "m.safetensors"), x, HW), simulate_codes(qm, x, HW))


# -- errors -------------------------------------------------------------------------------------------------------

class Unsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 4, 3), nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(x))
        return torch.sigmoid(y)


def test_unsupported_ops_are_all_named() -> None:
    x = torch.randn(4, 3, 6, 6)
    with pytest.raises(PhotosimError, match=r"act \(call_module Hardswish\).*sigmoid \(call_function sigmoid\)"):
        from_torch(convert(Unsupported(), "x86", x), (3, 6, 6))


def test_asymmetric_weights_are_refused() -> None:
    model = Conv(False)
    with torch.no_grad():
        model.conv.weight.add_(0.5)  # all-positive weights: an affine observer picks a non-zero zero point
    qconfig = QConfig(activation=default_observer,
                      weight=MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_affine))
    prepared = prepare_fx(model.eval(), QConfigMapping().set_global(qconfig), (torch.randn(1, 3, 8, 8),))
    prepared(torch.randn(4, 3, 8, 8))
    with pytest.raises(PhotosimError, match="'conv': weight zero points .* are not 0"):
        from_torch(convert_fx(prepared), (3, 8, 8))


def test_bad_arguments_are_reported() -> None:
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(PhotosimError, match="GraphModule"):
        from_torch(Conv(False), (3, 8, 8))  # type: ignore[arg-type]
    with pytest.raises(PhotosimError, match="failed at node .*per-sample input shape"):
        from_torch(convert(Conv(False), "x86", x), (8, 8))


SCRIPT = """
import torch
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(4, 3, 6, 6)
    prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (x,))
    prepared(x)
    return convert_fx(prepared), (3, 6, 6)


def not_a_tuple():
    return build()[0]
"""


def test_import_torch_runs_a_script_and_saves(tmp_path: Path) -> None:
    script = tmp_path / "build_q.py"
    script.write_text(SCRIPT)
    out = tmp_path / "q.safetensors"
    qm = import_torch(f"{script}:build", out)
    assert [n.op for n in load(out).nodes] == [n.op for n in qm.nodes] == ["conv2d"]
    with pytest.raises(PhotosimError, match=r"must return \(graph_module, input_shape\)"):
        import_torch(f"{script}:not_a_tuple", out)
    with pytest.raises(PhotosimError, match="defines no 'missing'"):
        import_torch(f"{script}:missing", out)
    with pytest.raises(PhotosimError, match="does not exist"):
        import_torch(f"{tmp_path / 'nope.py'}:build", out)
