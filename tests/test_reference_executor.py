"""The spec and the engine agree: tests/reference_executor.py, written from docs/format.md and
docs/integer-semantics.md without photosim's code, matches the engine on every node, bit for bit, in the
``float``, ``fixedpoint`` and ``pytorch`` (every CPU family) modes, on the built-in models and on generated
graphs."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import reference_executor as ref
import torch
from conftest import ModelBuilder, qp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import photosim
from photosim.engine import kernels
from photosim.engine.executor import node_outputs
from photosim.errors import PhotosimError
from photosim.ir.format import QParams, QuantizedModel

TORCH_VERSION = tuple(int(v) for v in torch.__version__.split(".")[:2])
# (mode, CPU family): the pytorch mode once per family (its formulas are float32 arithmetic: any CPU checks any)
RUNS = [("float", None), ("fixedpoint", None)] + [("pytorch", cpu) for cpu in ref.CPU_FAMILIES]
RUN_IDS = [mode if cpu is None else f"{mode}-{cpu}" for mode, cpu in RUNS]


def compare(qm: QuantizedModel, x: torch.Tensor, mode: str, path, cpu: str | None = None) -> int:
    """Run both on ``x``; assert every tensor is equal. Returns the number of tensors compared."""
    qm.save(path)
    model = ref.read(path)
    settings, options = {"requant": mode}, {}
    if mode == "pytorch":
        settings["pytorch_cpu"] = cpu
        options = {"cpu": cpu, "threads": torch.get_num_threads(), "torch_version": TORCH_VERSION}
    try:
        expected = ref.run(model, x.numpy(), mode, **options)
    except OverflowError:  # fixedpoint: an accumulator outside int32 must stop the engine too
        with pytest.raises(PhotosimError, match="outside int32"):
            node_outputs(qm, x, settings)
        return 0
    got = node_outputs(qm, x, settings)
    assert set(got) == set(expected)
    for name, codes in expected.items():
        engine = got[name].numpy()
        assert engine.shape == codes.shape, name
        assert np.array_equal(engine, codes), (
            f"{mode} {cpu}: node {name!r} differs in {int((engine != codes).sum())} of {codes.size} codes; "
            f"first at {np.argwhere(engine != codes)[0].tolist()}")
    return len(expected)


# -- the reference's building blocks on hand-checked values (so that it can fail on its own) ---------

def test_reference_building_blocks():
    assert ref.quantize_multiplier(0.5) == (1 << 30, 0)
    assert ref.quantize_multiplier(1.0) == (1 << 30, 1)
    assert ref.quantize_multiplier(2.0**-40) == (0, 0)
    assert ref.quantize_multiplier(1 - 2.0**-40) == (1 << 30, 1)  # mantissa rounds up to 2^31
    assert ref.rdbpot(np.array([5, -5, 6, -6, 7]), 1).tolist() == [3, -3, 3, -3, 4]  # ties away from zero
    assert ref.srdhm(np.array([3, -3]), 1 << 30).tolist() == [2, -1]  # 1.5 -> 2, -1.5 -> -1: ties toward +inf
    assert ref.mbqm(np.array([-(2**31) + 1, 2**31 - 1]), 1 << 30, 3).tolist() == [-(2**30), 2**30]  # saturated
    assert ref.rne(np.array([0.5, 1.5, -0.5, -2.5])).tolist() == [0, 2, 0, -2]
    # x * f32(1/s) in float32 is not x / s: 0.7 / 0.1 = 6.999999999999999 rounds to 7 either way, but
    # f32(0.35) * f32(10) = 3.5 exactly -> 4 (half to even), while 0.35 / 0.1 = 3.4999999999999996 -> 3.
    assert ref.quantize_input(np.array([0.35]), ref.Q(0.1, 0, 0, 255)).tolist() == [4]
    assert ref.pool_output_size(5, 2, 2, 1, 1, True) == 3 and ref.pool_output_size(4, 2, 2, 1, 1, True) == 3
    assert ref.pool_output_size(4, 3, 3, 1, 1, True) == 2  # the window at padded 6 >= 4 + 1 is dropped


def test_reference_float32_building_blocks():
    f32 = np.float32
    # a * b + c = 1 + 2^-23 + 2^-24 - 2^-70: just below the float32 midpoint, so the FMA rounds down to 1 + 2^-23;
    # the float64 sum drops the 2^-70, lands on the midpoint and (half to even) would round up to 1 + 2^-22
    a, b, c = f32(1 + 2.0**-23), f32(2.0**-24 * (1 - 2.0**-23)), f32(1 + 2.0**-23)
    assert ref.fma(a, b, c).tolist() == 1 + 2.0**-23
    assert f32(float(a) * float(b) + float(c)) == f32(1 + 2.0**-22)
    assert ref.fma_exact(a, b, c) == f32(1 + 2.0**-23)
    rng = np.random.default_rng(0)  # the fast fma against exact rational arithmetic
    a, b = f32(rng.standard_normal(3000)), f32(rng.standard_normal(3000) * 2.0 ** rng.integers(-30, 30, 3000))
    c = np.where(rng.random(3000) < 0.5, -f32(a.astype(np.float64) * b), f32(rng.standard_normal(3000)))
    assert ref.fma(a, b, c).tolist() == [ref.fma_exact(*v) for v in zip(a, b, c)]
    # quantized::add's vectorised body: NHWC order, chunks of ceil(numel / parts), 64-element steps
    body = ref.vectorised((1, 2, 10, 10), threads=4)  # 200 elements, one chunk: the first 192 in NHWC order
    assert body.sum() == 192 and body[0, 1, 9, 5] and not body[0, 0, 9, 6]
    flat = ref.vectorised((100000,), threads=3)  # 3 chunks of 33334 (the last 33332): bodies of 33280, 33280, 33280
    assert flat.sum() == 3 * 33280 and flat[33279] and not flat[33280] and flat[33334] and not flat[99999]
    assert ref.vectorised((100000,), threads=1).sum() == 99968
    assert ref.vectorised((50, 2), threads=8).sum() == 64
    # FBGEMM's pair sums: 255 * 127 * 2 saturates to 32767; an odd last index is alone; z_in * sum(w) comes off
    x, w = np.array([[255, 255, 255]]), np.array([[127, 127, 127], [127, -128, 2]])
    assert ref.pair_sums(x, w, 0).tolist() == [[32767 + 255 * 127, 255 * -1 + 510]]
    assert ref.pair_sums(x, w, 3).tolist() == [[32767 + 255 * 127 - 3 * 381, 255 * -1 + 510 - 3]]


# -- the built-in models ---------------------------------------------------------------------------

@functools.cache
def _digits(split: str) -> torch.Tensor:
    return torch.stack([x for x, _ in photosim.load_dataset("digits", split)])


@functools.cache
def _builtin(name: str, bits: int) -> QuantizedModel:
    return photosim.quantize(photosim.load_model(name).module, _digits("calibration"),
                             {"w_bits": bits, "a_bits": bits})


@pytest.mark.parametrize(("mode", "cpu"), RUNS, ids=RUN_IDS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", ["digits-cnn", "digits-resnet"])
def test_builtin_models(name, bits, mode, cpu, tmp_path):
    x = _digits("test")[:48]
    x = torch.cat([x, x[:8] * 1.7 - 0.1])  # and inputs that the input clamp cuts
    assert compare(_builtin(name, bits), x, mode, tmp_path / "m.safetensors", cpu) > 5


# -- generated graphs ------------------------------------------------------------------------------

def _scale(draw) -> float:
    """Random scales, or powers of two (their multipliers are exact, so requantization hits exact ties)."""
    if draw(st.booleans()):
        return 2.0 ** draw(st.integers(-12, 2))
    return 2.0 ** draw(st.floats(-12, 2))


def _act(draw, *, spread: float | None = None, pt: bool = False) -> QParams:
    """Activation quantization with 2-16 bits, signed or not (``pt``: 8-bit unsigned, what PyTorch's kernels
    take), any zero point, sometimes a narrower clamp."""
    bits = 8 if pt else draw(st.integers(2, 16))
    signed = False if pt else draw(st.booleans())
    lo, hi = QParams.storage_range(bits, signed)
    zp = draw(st.integers(lo, hi))
    qmin, qmax = lo, hi
    if draw(st.integers(0, 3)) == 0:  # a fused ReLU or ReLU6: a clamp range narrower than the storage range
        qmin = draw(st.integers(lo, max(lo, min(zp, hi - 1))))
        qmax = draw(st.integers(max(qmin, (qmin + hi) // 2), hi))
    if spread is None:
        scale = _scale(draw)
    else:  # about a quarter of the code range for values of this real spread, give or take 4x
        scale = spread / max(1, (hi - lo) // 4) * 2.0 ** draw(st.floats(-2, 2))
        if draw(st.integers(0, 3)) == 0:
            scale = 2.0 ** round(math.log2(scale))
    return QParams(scale, zp, bits, signed, qmin, qmax)


def _spread(q: QParams) -> float:
    """A typical magnitude of the real values of a tensor with this quantization."""
    return q.scale * max(1, q.qmax - q.qmin) / 4


def _weights(draw, shape: tuple[int, ...], w_bits: int, g: torch.Generator) -> torch.Tensor:
    hi = (1 << (w_bits - 1)) - 1
    lim = draw(st.sampled_from([1, max(1, hi // 16), hi, hi + 1]))
    w = torch.randint(-lim, min(lim, hi) + 1, shape, generator=g)
    return w.to(torch.int8 if w_bits <= 8 else torch.int16)


def _conv(draw, m: ModelBuilder, name: str, src: str, shape, g, *, same_shape: bool = False, pt: bool = False,
          depthwise: bool = False, channels: int | None = None):
    """A conv2d of ``src``; ``pt``: 8-bit weights and activations, sometimes a float bias; ``depthwise``: in the
    shape of FBGEMM's depthwise fast path; ``channels``: a 1x1 conv to that many channels."""
    c, h, w = shape
    groups = draw(st.sampled_from([d for d in range(1, c + 1) if c % d == 0]))
    out = groups * draw(st.integers(1, 3))
    if same_shape:
        out, kernel, stride, padding, dilation = c, 1, 1, 0, 1
    elif channels is not None:
        out, groups, kernel, stride, padding, dilation = channels, 1, 1, 1, 0, 1
    elif depthwise:
        groups, out, kernel = c, c * draw(st.integers(1, 2)), draw(st.sampled_from([3, 5, 7]))
        stride, padding, dilation = draw(st.integers(1, 2)), (kernel - 1) // 2, 1
    else:
        kernel = draw(st.integers(1, min(3, h, w)))
        stride, padding = draw(st.integers(1, 3)), draw(st.integers(0, 2))
        dilation = draw(st.integers(1, 2))
        if dilation * (kernel - 1) + 1 > min(h, w) + 2 * padding:
            dilation = 1
    w_bits = 8 if pt else draw(st.integers(2, 16))
    weight = _weights(draw, (out, c // groups, kernel, kernel), w_bits, g)
    per_channel = draw(st.booleans())
    wscale = (torch.rand(out, generator=g) + 0.1) / (1 << (w_bits - 1)) if per_channel else _scale(draw) / 64
    q_in = m.qparams(src)
    k_terms = c // groups * kernel * kernel
    w_spread = float(torch.as_tensor(wscale).max()) * max(1.0, float(weight.abs().float().mean()))
    out_q = _act(draw, spread=_spread(q_in) * w_spread * math.sqrt(k_terms), pt=pt)
    bias_bits = draw(st.sampled_from([8, 16, 32, 40]))
    typical_acc = math.sqrt(k_terms) * max(1, q_in.qmax - q_in.qmin) / 4 * max(1.0, float(weight.abs().float().mean()))
    b_hi = int(min(1 << (bias_bits - 1), typical_acc * 2.0 ** draw(st.integers(-4, 2)) + 1))
    bias = torch.randint(-b_hi, b_hi, (out,), generator=g)
    m.conv(name, src, out_q, weight, bias, wscale, stride=stride, padding=padding, dilation=dilation,
           groups=groups, w_bits=w_bits)
    m.nodes[-1].bias_bits = bias_bits
    m.tensors[f"{name}.bias"] = bias.to(torch.int32 if bias_bits <= 32 else torch.int64)
    if pt and draw(st.booleans()):  # imported from PyTorch: the real bias, which need not be a multiple of its step
        m.tensors[f"{name}.bias_float"] = (bias * q_in.scale * torch.as_tensor(wscale, dtype=torch.float64)
                                           * (1 + torch.randn(out, generator=g, dtype=torch.float64) / 8)).float()
    oh, ow = ((s + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1 for s in (h, w))
    return (out, oh, ow)


def _pool_size(size: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil else 0)) // s + 1
    return out - 1 if ceil and (out - 1) * s >= size + p else out


def _windows_have_input(size: int, k: int, s: int, p: int, d: int, ceil: bool) -> bool:
    n = _pool_size(size, k, s, p, d, ceil)
    return n >= 1 and all(any(0 <= i * s - p + u * d < size for u in range(k)) for i in range(n))


@st.composite
def graphs(draw, pt: bool = False):
    """A random graph and inputs; ``pt``: for the pytorch mode (8-bit unsigned activations, 8-bit weights,
    depthwise convs, a quantized engine in the provenance)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shape = (draw(st.integers(1, 4)), draw(st.integers(2, 9)), draw(st.integers(2, 9)))
    m = ModelBuilder(shape, _act(draw, pt=pt), input_name="x")
    src = "x"
    choices = ["conv", "clamp", "add", "maxpool", "avgpool", "adaptive", "reshape"] + (["dwconv"] * 2 if pt else [])
    choices += ["concat", "mul"]
    if not pt:  # the pytorch mode has no rule for mean, table and l2_normalize
        choices += ["mean", "permute", "slice", "table", "roll", "pad", "l2_normalize"]
    ops = draw(st.lists(st.sampled_from(choices), min_size=1, max_size=6))
    for i, op in enumerate(ops):
        name = f"n{i}_{op}"
        c, h, w = shape
        if op == "conv":
            shape = _conv(draw, m, name, src, shape, g, pt=pt)
        elif op == "dwconv":  # FBGEMM's depthwise shape; 104 channels (groups > 100) run in FBGEMM under x86 too
            channels = draw(st.sampled_from([8, 16, 104]))
            if c != channels:
                shape = _conv(draw, m, f"{name}_widen", src, shape, g, pt=pt, channels=channels)
                src = f"{name}_widen"
            shape = _conv(draw, m, name, src, shape, g, pt=pt, depthwise=True)
        elif op == "clamp":
            q = m.qparams(src)
            lo = draw(st.integers(q.qmin, q.qmax))
            m.add(name, "clamp", [src], QParams(q.scale, q.zero_point, q.bits, q.signed, lo,
                                                draw(st.integers(lo, q.qmax))))
        elif op == "add":  # the current tensor plus a 1x1 conv of it: two differently scaled inputs
            other = _conv(draw, m, f"{name}_branch", src, shape, g, same_shape=True, pt=pt)
            if other != shape:
                src, shape = f"{name}_branch", other
                continue
            m.add(name, "add", [src, f"{name}_branch"], _act(draw, spread=_spread(m.qparams(src)), pt=pt))
        elif op in ("maxpool", "avgpool"):
            k = draw(st.integers(1, 3))
            s, p = draw(st.integers(1, 3)), draw(st.integers(0, k // 2))
            d = draw(st.integers(1, 2)) if op == "maxpool" else 1
            ceil = draw(st.booleans())
            if not all(_windows_have_input(n, k, s, p, d, ceil) for n in (h, w)):
                continue
            stride = [s, s]
            if op == "maxpool":
                m.add(name, "maxpool2d", [src], kernel=[k, k], stride=stride, padding=[p, p], dilation=[d, d],
                      ceil_mode=ceil)
            else:
                q_in = m.qparams(src)
                out_q = q_in if draw(st.booleans()) else _act(draw, spread=_spread(q_in), pt=pt)
                m.add(name, "avgpool2d", [src], out_q, kernel=[k, k], stride=stride, padding=[p, p],
                      ceil_mode=ceil, count_include_pad=draw(st.booleans()),
                      divisor_override=draw(st.sampled_from([None, 1, 3, 7])))
            shape = (c, _pool_size(h, k, s, p, d, ceil), _pool_size(w, k, s, p, d, ceil))
        elif op == "adaptive":
            oh, ow = draw(st.integers(1, h + 1)), draw(st.integers(1, w + 1))
            q_in = m.qparams(src)
            out_q = q_in if draw(st.booleans()) else _act(draw, spread=_spread(q_in), pt=pt)
            m.add(name, "adaptive_avgpool2d", [src], out_q, output_size=[oh, ow])
            shape = (c, oh, ow)
        elif op == "reshape":
            new = draw(st.sampled_from([[c, w, h], [c * h, w, 1], [-1, h, w], [c, -1, 1]]))
            m.add(name, "reshape", [src], shape=new)
            shape = np.empty(shape).reshape(new).shape
        elif op in ("concat", "mul"):  # with a 1x1 conv of the current tensor: another quantization
            other = _conv(draw, m, f"{name}_branch", src, shape, g, same_shape=True, pt=pt)
            if other != shape:
                src, shape = f"{name}_branch", other
                continue
            branch = f"{name}_branch"
            if op == "concat":  # pytorch: along channels, the cat PyTorch's channels_last tensors take
                dim = 1 if pt else draw(st.integers(1, 3))
                parts = draw(st.sampled_from([[src, branch], [branch, src, src], [src], [branch, src]]))
                q = m.qparams(parts[0]) if pt and draw(st.booleans()) else _act(
                    draw, spread=max(_spread(m.qparams(p)) for p in parts), pt=pt)
                m.add(name, "concat", parts, q, dim=dim)
                shape = tuple(n * len(parts) if i == dim - 1 else n for i, n in enumerate(shape))
            else:
                if draw(st.booleans()):  # a squeeze-excite gate: (N, C, H, W) * (N, C, 1, 1)
                    gate, q_gate = f"{name}_gate", m.qparams(branch)
                    if pt:  # PyTorch's squeeze: a global average pool (its quantized mean has no rule here)
                        m.add(gate, "adaptive_avgpool2d", [branch], q_gate, output_size=[1, 1])
                    else:
                        m.add(gate, "mean", [branch], dims=[2, 3], keepdim=True)
                    branch = gate
                pair_ = draw(st.sampled_from([[src, branch], [branch, src], [src, src]]))
                spread = _spread(m.qparams(pair_[0])) * _spread(m.qparams(pair_[1]))
                m.add(name, "mul", pair_, _act(draw, spread=spread, pt=pt))
        elif op == "mean":
            dims = draw(st.sampled_from([[1], [2], [3], [2, 3], [1, 3], [1, 2, 3]]))
            keepdim = draw(st.booleans())
            q_in = m.qparams(src)
            out_q = q_in if draw(st.booleans()) else _act(draw, spread=_spread(q_in))
            m.add(name, "mean", [src], out_q, dims=dims, keepdim=keepdim)
            shape = tuple(1 if i + 1 in dims else n for i, n in enumerate(shape))
            if not keepdim:  # back to (C, H, W) for the ops that follow
                m.add(f"{name}_3d", "reshape", [name], shape=list(shape))
                name = f"{name}_3d"
        elif op == "permute":
            perm = draw(st.permutations([1, 2, 3]))
            m.add(name, "permute", [src], dims=[0, *perm])
            shape = tuple(shape[d - 1] for d in perm)
        elif op == "slice":
            dim = draw(st.integers(1, 3))
            start = draw(st.integers(0, shape[dim - 1] - 1))
            stop = draw(st.integers(start + 1, shape[dim - 1]))
            m.add(name, "slice", [src], dim=dim, start=start, stop=stop)
            shape = tuple(stop - start if i == dim - 1 else n for i, n in enumerate(shape))
        elif op == "roll":
            dim = draw(st.integers(1, 3))
            m.add(name, "roll", [src], dim=dim, shift=draw(st.integers(0, shape[dim - 1] - 1)))
        elif op == "pad":  # the fill is the input's zero point (float 0) within its clamp
            dim, before, after = draw(st.integers(1, 3)), draw(st.integers(0, 2)), draw(st.integers(0, 2))
            m.add(name, "pad", [src], dim=dim, before=before, after=after)
            shape = tuple(n + before + after if i == dim - 1 else n for i, n in enumerate(shape))
        elif op == "l2_normalize":  # over the last dimension, values in [-1, 1]
            m.add(name, "l2_normalize", [src], qp(1 / 127, 0, 8, signed=True), eps=draw(st.sampled_from([1e-12, 0.5])))
        elif op == "table":  # random output codes within the output clamp: the stored table is the semantics
            q_in = m.qparams(src)
            out_q = _act(draw)
            m.add(name, "table", [src], out_q, function=draw(st.sampled_from(["sigmoid", "tanh", "gelu"])))
            m.tensors[f"{name}.table"] = torch.randint(out_q.qmin, out_q.qmax + 1, (1 << q_in.bits,), generator=g,
                                                       dtype=torch.int32)
        src = name
    m.add("flat", "flatten", [src], start_dim=1)
    features = math.prod(shape)
    w_bits = 8 if pt else draw(st.integers(2, 16))
    weight = _weights(draw, (draw(st.integers(1, 5)), features), w_bits, g)
    q_in = m.qparams("flat")
    wscale = _scale(draw) / 16
    w_typical = wscale * max(1.0, float(weight.abs().float().mean()))
    m.linear("fc", "flat", _act(draw, spread=_spread(q_in) * w_typical * math.sqrt(features), pt=pt), weight,
             torch.randint(-1000, 1000, (weight.shape[0],), generator=g), wscale, w_bits=w_bits)
    qm = m.build()
    if pt:
        qm.provenance["qengine"] = draw(st.sampled_from(["x86", "x86", "fbgemm", "onednn"]))
    n = draw(st.integers(1, 3))
    q = qm.input_q
    lo, hi = q.scale * (q.qmin - q.zero_point - 2), q.scale * (q.qmax - q.zero_point + 2)
    x = torch.rand((n, *qm.input_shape), generator=g, dtype=torch.float64) * (hi - lo) + lo
    return qm, x.float()


@pytest.fixture(params=[False, True], ids=["float-matmul", "int-matmul"])
def int_mm(request, monkeypatch):
    """The engine picks its exact matmul (int8 ``torch._int_mm`` or chunked float) by timing the CPU: test both."""
    monkeypatch.setattr(kernels, "int_mm_is_faster", lambda device_type: request.param)
    return request.param


@pytest.mark.parametrize("mode", ["float", "fixedpoint"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(case=graphs())
def test_generated_graphs(case, mode, int_mm, tmp_path):
    qm, x = case
    compare(qm, x, mode, tmp_path / "g.safetensors")


@pytest.mark.parametrize("cpu", ref.CPU_FAMILIES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(case=graphs(pt=True))
def test_generated_graphs_pytorch(case, cpu, int_mm, tmp_path):
    qm, x = case
    compare(qm, x, "pytorch", tmp_path / "g.safetensors", cpu)


def test_one_term_dot_products(monkeypatch, tmp_path):
    """K = 1 (one input feature, or a 1x1 conv over one channel per group): torch._int_mm misreads a (1, O)
    weight matrix, so the engine must form these products another way."""
    monkeypatch.setattr(kernels, "int_mm_is_faster", lambda device_type: True)
    m = ModelBuilder((1,), qp(1.0, 0, 8))
    m.linear("fc", "x", qp(0.0625, 0, 16, signed=True), torch.tensor([[1], [-1], [2]], dtype=torch.int8),
             torch.tensor([5, 6, 7]), 0.0625)  # M = 1: the output codes are the accumulators
    assert compare(m.build(), torch.tensor([[1.0], [2.0], [30.0]]), "float", tmp_path / "k1.safetensors") == 2


def test_pool_mean_ties_round_differently_per_mode(tmp_path):
    """A mean exactly half a code above the zero point: float rounds half to even, fixedpoint away from zero."""
    m = ModelBuilder((1, 2, 2), qp(0.5, 3, 4))
    m.add("avg", "adaptive_avgpool2d", ["x"], output_size=[1, 1])
    qm = m.build()
    qm.save(tmp_path / "a.safetensors")
    x = torch.tensor([[[[0.0, 0.5], [0.0, 0.5]]]])  # codes 3, 4, 3, 4: S = 2, D = 4, mean 0.5 above z = 3
    model = ref.read(tmp_path / "a.safetensors")
    assert ref.run(model, x.numpy(), "float")["avg"].tolist() == [[[[3]]]]
    assert ref.run(model, x.numpy(), "fixedpoint")["avg"].tolist() == [[[[4]]]]
    for mode, cpu in RUNS:
        assert compare(qm, x, mode, tmp_path / "b.safetensors", cpu) == 2


def test_fixedpoint_add_left_shift(tmp_path):
    """Three input pairs whose fixedpoint sum depends on TFLite's left shift of 20 (19 gives other codes)."""
    sa, sb, s_out = 0.14486126601696014, 0.3098811209201813, 0.006573496600690947  # sa, sb: float32 values
    m = ModelBuilder((2, 1, 1), qp(1.0, 0, 8))
    for name, weight, scale in (("a", [1, 0], sa), ("b", [0, 1], sb)):  # M = 1: copies of one input channel
        m.conv(name, "x", qp(scale, 0, 8), torch.tensor(weight, dtype=torch.int8).view(1, 2, 1, 1),
               torch.zeros(1), scale)
    m.add("sum", "add", ["a", "b"], qp(s_out, 0, 16))
    qm = m.build()
    x = torch.tensor([[197.0, 58.0], [75.0, 154.0], [164.0, 166.0]]).view(3, 2, 1, 1)
    assert compare(qm, x, "fixedpoint", tmp_path / "add.safetensors") == 4
    codes = ref.run(ref.read(tmp_path / "add.safetensors"), x.numpy(), "fixedpoint")["sum"]
    assert codes.ravel().tolist() == [7075, 8912, 11439]


# -- pytorch mode: float32 details that move a code only now and then, on inputs where they do ------------------

def test_pytorch_add_body_and_tail(tmp_path):
    """quantized::add's scalar tail (the last elements of each thread's chunk, NHWC order) dequantizes with
    one multiply, its vectorised body with an fma: every element here is one where the two give other codes."""
    sa = float(np.float32(0.00625))  # (a - za) * sa = 5 * sa is just off 1.5 / 16: body and tail round apart
    m = ModelBuilder((4, 150, 150), qp(1.0, 0, 8))
    for name, first, scale, zp in (("a", 0, sa, 14), ("b", 2, 0.25, 0)):  # M = 1: copies of two input channels
        weight = torch.zeros(2, 4, 1, 1, dtype=torch.int8)
        weight[0, first], weight[1, first + 1] = 1, 1
        m.conv(name, "x", qp(scale, zp, 8), weight, torch.zeros(2), scale)
    m.add("sum", "add", ["a", "b"], qp(1 / 16, 0, 8))
    qm = m.build()
    qm.provenance["qengine"] = "fbgemm"
    x = torch.zeros(1, 4, 150, 150)
    x[:, :2] = 5.0  # a = 19, a - za = 5; b = 0
    f32 = np.float32
    body, tail = (int(np.rint(v * f32(16))) for v in (ref.fma(f32(sa), f32(19), f32(sa) * f32(-14)), f32(sa) * f32(5)))
    assert body != tail
    pixels = {1: range(22496, 22500), 2: [*range(11232, 11250), *range(22482, 22500)]}  # 45000 elements
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert compare(qm, x, "pytorch", tmp_path / "add.safetensors", "avx512-vnni") == 4
            codes = ref.run(ref.read(tmp_path / "add.safetensors"), x.numpy(), "pytorch", threads=t)["sum"]
            expected = {(0, c, *divmod(p, 150)) for p in pixels[min(t, 2)] for c in (0, 1)}
            assert {tuple(i) for i in np.argwhere(codes == tail).tolist()} == expected
            assert (codes[codes != tail] == body).all()
    finally:
        torch.set_num_threads(threads)
