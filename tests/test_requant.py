"""Requant modes: float rounding ties, gemmlowp fixed point vs a Python big-int model of the reference formulas."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from conftest import make_conv_net, qp
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from photosim.engine.executor import Engine, execution_plan
from photosim.engine.requant import (
    REQUANT_MODES,
    RequantParams,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)
from photosim.errors import PhotosimError

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
FLOAT, FIXED = REQUANT_MODES["float"], REQUANT_MODES["fixedpoint"]


# -- the reference formulas (docs/integer-semantics.md, TFLite quantization_util.cc), in Python ints ---------------

def c_div(a: int, b: int) -> int:
    """C integer division: truncates toward zero."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def ref_quantize_multiplier(m: float) -> tuple[int, int]:
    if m == 0:
        return 0, 0
    mantissa, shift = math.frexp(m)
    q = math.floor(mantissa * 2**31 + 0.5)  # TfLiteRound of a positive value
    if q == 2**31:
        q, shift = q // 2, shift + 1
    return (0, 0) if shift < -31 else (q, shift)


def ref_srdhm(a: int, b: int) -> int:
    if a == b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    return c_div(ab + (2**30 if ab >= 0 else 1 - 2**30), 2**31)


def ref_rdbpot(x: int, e: int) -> int:
    mask = (1 << e) - 1
    return (x >> e) + int((x & mask) > (mask >> 1) + int(x < 0))


def ref_mbqm(x: int, q: int, shift: int) -> int:
    shifted = min(max(x * 2 ** max(shift, 0), INT32_MIN), INT32_MAX)
    return ref_rdbpot(ref_srdhm(shifted, q), max(-shift, 0))


def t(v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int64)


def params(input_scale: float, weight_scale: torch.Tensor, out: object, bias: torch.Tensor | None = None,
           node: str = "layer") -> RequantParams:
    o = weight_scale.numel()
    return RequantParams(input_scale, weight_scale.double(), out, torch.zeros(o, dtype=torch.int64) if bias is None
                         else bias, None, o > 1, "fbgemm", node)


# -- float mode ------------------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(k=st.integers(-2000, 2000), j=st.integers(1, 20), z=st.integers(-100, 100))
def test_float_requant_ties_round_to_even(k: int, j: int, z: int) -> None:
    acc = (2 * k + 1) * 2 ** (j - 1)  # acc * 2^-j = k + 0.5 exactly
    out = qp(1.0, z, 16, signed=True)
    got = FLOAT.requantize(torch.tensor([[acc]]), params(2.0**-j, torch.tensor([1.0]), out))
    expected = k if k % 2 == 0 else k + 1
    assert int(got) == expected + z


# -- fixed point building blocks ----------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(m=st.one_of(st.floats(1e-12, 1e4), st.just(1 - 2.0**-40), st.just(2.0**-33), st.just(0.5)))
def test_quantize_multiplier_matches_tflite(m: float) -> None:
    q, shift = quantize_multiplier(torch.tensor([m], dtype=torch.float64))
    assert (int(q), int(shift)) == ref_quantize_multiplier(m)


@settings(max_examples=500, deadline=None)
@given(a=st.integers(INT32_MIN, INT32_MAX), b=st.integers(INT32_MIN, INT32_MAX), e=st.integers(0, 31))
def test_srdhm_and_rdbpot_match_reference(a: int, b: int, e: int) -> None:
    assert int(saturating_rounding_doubling_high_mul(t(a), t(b))) == ref_srdhm(a, b)
    assert int(rounding_divide_by_pot(t(a), t(e))) == ref_rdbpot(a, e)


def test_srdhm_saturates_and_rdbpot_rounds_ties_away_from_zero() -> None:
    assert int(saturating_rounding_doubling_high_mul(t(INT32_MIN), t(INT32_MIN))) == INT32_MAX
    got = rounding_divide_by_pot(torch.tensor([5, -5, 6, -6, 7, -7]), t(1))
    assert got.tolist() == [3, -3, 3, -3, 4, -4]


@settings(max_examples=500, deadline=None)
@given(x=st.integers(-(2**30), 2**30), m=st.floats(2.0**-30, 16.0))
def test_fixed_point_multiply_matches_reference_and_exact_rounding(x: int, m: float) -> None:
    q, shift = ref_quantize_multiplier(m)
    exact = Fraction(x) * Fraction(m)
    assume(abs(x) * 2 ** max(shift, 0) <= INT32_MAX)  # no saturation of the left shift
    got = int(multiply_by_quantized_multiplier(t(x), *quantize_multiplier(torch.tensor(m, dtype=torch.float64))))
    assert got == ref_mbqm(x, q, shift)
    assert abs(got - exact) < 1
    assert abs(got - round(exact)) <= 1


# -- fixed point mode ---------------------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31), per_channel=st.booleans())
def test_fixedpoint_requantize_matches_reference(seed: int, per_channel: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    o = 5 if per_channel else 1
    acc = torch.randint(-(2**24), 2**24, (3, o, 4, 4), generator=g)
    w_scale = (torch.rand(o, generator=g) * 0.02 + 1e-4).float()
    out = qp(0.05 + float(torch.rand((), generator=g)), 7, 8, signed=True)
    got = FIXED.requantize(acc, params(0.013, w_scale, out))
    for c in range(o):
        q, shift = ref_quantize_multiplier(0.013 * float(w_scale[c]) / out.scale)
        expected = [min(max(ref_mbqm(int(a), q, shift) + 7, -128), 127) for a in acc[:, c].flatten().tolist()]
        assert got[:, c].flatten().tolist() == expected


def test_fixedpoint_rejects_accumulators_outside_int32_naming_the_node() -> None:
    acc = torch.tensor([[2**31]])
    with pytest.raises(PhotosimError, match=r"'conv7'.*--requant float"):
        FIXED.requantize(acc, params(0.1, torch.tensor([0.1]), qp(), node="conv7"))


def ref_tflite_add(a: int, b: int, qa, qb, out, left_shift: int) -> int:
    twice = 2 * max(qa.scale, qb.scale)
    total = 0
    for code, q in ((a, qa), (b, qb)):
        total += ref_mbqm((code - q.zero_point) * 2**left_shift, *ref_quantize_multiplier(q.scale / twice))
    raw = ref_mbqm(total, *ref_quantize_multiplier(twice / (2**left_shift * out.scale))) + out.zero_point
    return min(max(raw, out.qmin), out.qmax)


@settings(max_examples=100, deadline=None)
@given(bits=st.sampled_from([4, 8, 12, 16]), sa=st.floats(0.001, 1), sb=st.floats(0.001, 1), so=st.floats(0.001, 2),
       seed=st.integers(0, 2**31))
def test_fixedpoint_add_matches_tflite_and_real_sum(bits: int, sa: float, sb: float, so: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    hi = 2**bits - 1
    qa, qb = qp(sa, hi // 3, bits), qp(sb, hi // 2, bits)
    out = qp(so, hi // 4, bits + 2, signed=True)
    a, b = (torch.randint(0, hi + 1, (64,), generator=g, dtype=torch.int32) for _ in range(2))
    got = FIXED.add(a, b, qa, qb, out).tolist()
    left_shift = 20 if bits <= 8 else 31 - (hi - hi // 3).bit_length()
    for ai, bi, gi in zip(a.tolist(), b.tolist(), got):
        assert gi == ref_tflite_add(ai, bi, qa, qb, out, left_shift)
        real = (Fraction(sa) * (ai - qa.zero_point) + Fraction(sb) * (bi - qb.zero_point)) / Fraction(so)
        if out.qmin < round(real) + out.zero_point < out.qmax:
            assert abs(gi - out.zero_point - round(real)) <= 1


def test_fixedpoint_average_rounds_half_away_from_zero() -> None:
    sums = torch.tensor([[[[5, -5, 7, -7, 2, 0]]]])
    counts = torch.tensor([[[[2, 2, 2, 2, 4, 3]]]])
    q = qp(0.1, 0, 8, signed=True)
    assert FIXED.average(sums, counts, q, q).flatten().tolist() == [3, -3, 4, -4, 1, 0]


@settings(max_examples=200, deadline=None)
@given(codes=st.lists(st.integers(0, 255), min_size=1, max_size=16), z=st.integers(0, 255))
def test_fixedpoint_average_is_tflite_average_pool_on_raw_codes(codes: list[int], z: int) -> None:
    """TFLite sums raw uint8 codes: acc > 0 ? (acc + n/2) / n : (acc - n/2) / n (C division)."""
    n, acc = len(codes), sum(codes)
    expected = c_div(acc + n // 2, n) if acc > 0 else c_div(acc - n // 2, n)
    q = qp(0.1, z, 8)
    got = FIXED.average(torch.tensor([[[[acc - n * z]]]]), torch.tensor([[[[n]]]]), q, q)
    assert int(got) == expected


@settings(max_examples=100, deadline=None)
@given(s=st.integers(-(2**20), 2**20), count=st.integers(1, 64), ratio=st.floats(0.05, 8))
def test_fixedpoint_average_with_rescale_is_within_one_of_exact(s: int, count: int, ratio: float) -> None:
    qin, out = qp(0.1, 0, 16, signed=True), qp(0.1 / ratio, 0, 16, signed=True)
    exact = Fraction(s) * Fraction(qin.scale) / Fraction(out.scale) / count
    assume(abs(exact) < 30000)
    got = int(FIXED.average(torch.tensor([[[[s]]]]), torch.tensor([[[[count]]]]), qin, out))
    assert abs(got - round(exact)) <= 1


# -- the pytorch mode on the analog path and on wide codes ---------------------------------------------------------

def _codes(hw: dict, x: torch.Tensor) -> dict[str, torch.Tensor]:
    qm = make_conv_net()
    return Engine(qm, hw).run(qm.input_q.quantize(x), keep_all=True)


@pytest.mark.parametrize("readout", [{"adc": {"bits": 24}}, {"accumulator": {"overflow": "saturate", "bits": 32}}],
                         ids=["adc-24-bits", "accumulator-32-bits"])
def test_pytorch_mode_on_an_ideal_analog_readout_gives_the_ideal_codes(readout: dict) -> None:
    x = torch.rand(8, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    ideal, analog = _codes({"requant": "pytorch"}, x), _codes({"requant": "pytorch", **readout}, x)
    for name in ("conv1", "dw", "grouped", "fc"):
        assert torch.equal(analog[name], ideal[name]), name


def test_pytorch_mode_adds_the_bias_once_whatever_the_adc_step() -> None:
    """The analog path requantizes accumulators in ADC steps by scaling input_scale by the step; the pytorch mode's
    real-valued bias is the integer bias times the unscaled scales (it was multiplied by the step: 75% of the codes
    of a 16-bit ADC moved, 10% top-1 on digits-cnn). Its codes now move from the ideal ones as the float mode's do."""
    x = torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    adc = {"adc": {"bits": 16}}
    moved = {}
    for mode in ("pytorch", "float"):
        ideal, analog = _codes({"requant": mode}, x), _codes({"requant": mode, **adc}, x)
        moved[mode] = {name: float((analog[name] != ideal[name]).double().mean()) for name in ("conv1", "dw", "fc")}
    for name, fraction in moved["pytorch"].items():
        assert fraction <= 1.5 * moved["float"][name] + 0.01, (name, moved)


@pytest.mark.parametrize(("w_bits", "a_bits", "found"), [(16, 16, "16-bit input, 16-bit output, 16-bit weight"),
                                                         (8, 12, "12-bit input, 12-bit output"),
                                                         (12, 8, "12-bit weight")])
def test_pytorch_mode_refuses_codes_over_8_bits_naming_the_node(w_bits: int, a_bits: int, found: str) -> None:
    """PyTorch's quantized kernels take 8-bit codes: FBGEMM's int16 pair saturation applied to 12- and 16-bit codes
    was an extrapolation of no kernel (W16A16 on avx2: 8.89% instead of 99.17%)."""
    qm = make_conv_net(w_bits=w_bits, a_bits=a_bits)
    for build in (Engine, execution_plan):
        with pytest.raises(PhotosimError, match=f"node 'conv1' \\(conv2d\\) has {found} codes.*at most 8 bits"):
            build(qm, {"requant": "pytorch", "pytorch_cpu": "avx2"})
    Engine(qm, {"requant": "fixedpoint" if w_bits < 16 else "float"})
    Engine(qm, {"requant": "pytorch", "layers": [{"match": "*", "requant": "float"}]})
