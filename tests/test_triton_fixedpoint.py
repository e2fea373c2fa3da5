"""The ``fixedpoint`` Triton epilogue and add (photosim.engine.triton_requant) against FixedPointRequant, bit for bit.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (the ``fused`` fixture of
tests/test_gpu_engine.py sets TRITON_INTERPRET=1 and re-imports the Triton modules); with one they run compiled on
CUDA tensors, and the ``gpu`` test checks a large block there.
"""

from __future__ import annotations

from fractions import Fraction
from types import ModuleType

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from photosim.engine.requant import (
    INT32_MAX,
    INT32_MIN,
    FixedPointRequant,
    RequantParams,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
)
from photosim.ir.format import QParams
from tests.conftest import qp
from tests.test_gpu_engine import CUDA, DEVICE, fused  # noqa: F401  (fused: the fixture)

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def trq(fused: ModuleType) -> ModuleType:  # noqa: F811
    """photosim.engine.triton_requant as ``fused`` imported it (interpreted without a GPU)."""
    return fused.triton_requant


FIXED = FixedPointRequant()
RAW = qp(1.0, 0, 32, signed=True)  # codes = the int32 result of MultiplyByQuantizedMultiplier itself


def _params(multiplier: torch.Tensor, out_q: QParams) -> RequantParams:
    """A layer whose ``s_in * s_w / s_out`` is ``multiplier`` (O,): s_in = s_out = 1."""
    o = multiplier.numel()
    return RequantParams(1.0, multiplier.double(), out_q, torch.zeros(o, dtype=torch.int64), None, o > 1, "fbgemm")


def _rows(trq: ModuleType, acc: torch.Tensor, shift: torch.Tensor, q: torch.Tensor, exponent: torch.Tensor,
          out_q: QParams) -> torch.Tensor:
    """The fixedpoint epilogue on DEVICE: (rows, O + padding) accumulators -> (rows, O) codes, on the CPU."""
    out = torch.empty(acc.shape[0], shift.numel(), dtype=torch.int32, device=DEVICE)
    trq.requantize_rows_fixedpoint(acc.to(DEVICE), shift.to(DEVICE), q.to(DEVICE), exponent.to(DEVICE), out_q, out)
    return out.cpu()


def _expected(x: torch.Tensor, q: torch.Tensor, exponent: torch.Tensor, out_q: QParams) -> torch.Tensor:
    """requant.py's MultiplyByQuantizedMultiplier with raw (q, exponent), + z_out, clamp: the torch path."""
    y = multiply_by_quantized_multiplier(x.to(torch.int64), q, exponent) + out_q.zero_point
    return y.clamp(out_q.qmin, out_q.qmax).to(torch.int32)


def test_ties_after_the_shift_round_half_away_from_zero(trq: ModuleType) -> None:
    # M = 2^-k (q = 2^30, exponent 1 - k): SRDHM halves the even acc exactly, RDBPOT rounds (2j+1)/2 away from 0
    ks = torch.arange(2, 32)
    j = torch.tensor([0, 1, 2, 5, -1, -2, -3, -6])
    acc = ((2 * j[:, None] + 1) << (ks[None, :] - 1)).clamp(INT32_MIN, INT32_MAX)  # (8, 30)
    q, exponent = quantize_multiplier(2.0 ** -ks.double())
    assert q.eq(1 << 30).all() and exponent.equal(1 - ks)
    got = _rows(trq, acc.to(torch.int32), torch.zeros(30, dtype=torch.int64), q, exponent, RAW)
    for (r, c), code in zip(torch.cartesian_prod(torch.arange(8), torch.arange(30)).tolist(), got.flatten().tolist()):
        real = Fraction(int(acc[r, c]), 2 ** int(ks[c]))
        away = int(abs(real) + Fraction(1, 2)) * (1 if real >= 0 else -1)  # round half away from zero
        assert code == away, (int(acc[r, c]), int(ks[c]))


def test_srdhm_saturates_and_extreme_exponents(trq: ModuleType) -> None:
    # raw (q, exponent): INT32_MIN * INT32_MIN saturates to INT32_MAX; exponent -31 (largest right shift), 0, and
    # 31 and 40 (left shift by 31 at most, saturated to int32); q = 0 (a multiplier below 2^-32, flushed)
    acc = torch.tensor([[INT32_MIN, INT32_MAX, -1, 1, 0, 3, -3, 1 << 20, -(1 << 20)]], dtype=torch.int32).T
    q = torch.tensor([INT32_MIN, INT32_MIN, (1 << 31) - 1, 1 << 30, 1 << 30, 0, INT32_MIN])
    exponent = torch.tensor([0, -31, -31, 31, 40, 0, 5])
    below = qp(1.0, -1, 32, signed=True)  # z_out = -1: the saturated INT32_MAX stays apart from 2^31 after the clamp
    got = _rows(trq, acc.expand(-1, 7).contiguous(), torch.zeros(7, dtype=torch.int64), q, exponent, below)
    assert torch.equal(got, _expected(acc.expand(-1, 7), q, exponent, below))
    assert int(got[0, 0]) == INT32_MAX - 1  # the saturation case of SRDHM
    assert got[:, 5].eq(-1).all()  # flushed multiplier
    half = 1 << 30  # x << 31 saturates to INT32_MIN or INT32_MAX unless x = 0, then SRDHM by 2^30 halves it
    assert (got[:, 3] + 1).tolist() == [-half, half, -half, half, 0, half, -half, half, -half]


@pytest.mark.parametrize("out_q", [qp(1.0, 0, 8), qp(1.0, 255, 8), qp(1.0, -128, 8, signed=True),
                                   qp(1.0, 127, 8, signed=True), qp(1.0, 5, 8, qmin=5, qmax=60), RAW])
def test_edges_match_fixedpoint_requant(trq: ModuleType, out_q: QParams) -> None:
    multiplier = torch.tensor([2.0**-33, 2.0**-32, 2.0**-31.5, 3e-7, 0.0123, 0.5, 1 - 2.0**-40, 1.0, 7.3, 2.0**20])
    q, exponent = quantize_multiplier(multiplier)
    assert int(q[0]) == 0 and int(exponent[-1]) == 21 and int(q[6]) == 1 << 30  # flushed; left shift; rounded up
    x = torch.tensor([INT32_MIN, INT32_MIN + 1, INT32_MAX, -(2**20) - 1, -257, -1, 0, 1, 127, 128, 2**20 + 3])
    x = torch.cat((x, torch.randint(INT32_MIN, INT32_MAX, (60,), generator=torch.Generator().manual_seed(3))))
    shift = torch.tensor([0, -5, 7, 2**20, -(2**20), 1, -1, 0, 3, -3])
    acc = x[:, None] - shift  # (71, 10) int64 (some outside int32): acc + shift = x
    expected = FIXED.requantize(x[:, None].expand(-1, 10), _params(multiplier, out_q))
    assert torch.equal(_rows(trq, acc, shift, q, exponent, out_q), expected)
    if out_q is not RAW:  # the clamp is exercised at both ends
        assert expected.min() == out_q.qmin and expected.max() == out_q.qmax


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), per_channel=st.booleans(), z_out=st.integers(-128, 127),
       acc_bits=st.integers(2, 32), log2_m=st.floats(-40, 12), relu=st.booleans(),
       dtype=st.sampled_from(["int32", "int64", "float32", "float64"]))
def test_matches_fixedpoint_requant(trq: ModuleType, seed: int, per_channel: bool, z_out: int, acc_bits: int,
                                    log2_m: float, dtype: str, relu: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    rows, o = int(torch.randint(1, 100, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g))
    x = torch.randint(-(2 ** (acc_bits - 1)), 2 ** (acc_bits - 1), (rows, o), generator=g)  # acc + shift
    shift = torch.randint(-(2**12), 2**12, (o,), generator=g)
    acc = torch.cat((x - shift, torch.zeros(rows, 3, dtype=torch.int64)), 1)  # padding columns, ignored
    if dtype != "int64":  # int_mm's int32, or a float matmul's exact integers (float32: 24 bits)
        limit = 2**24 if dtype == "float32" else 2**31
        acc = acc.clamp(-limit, limit - 1).to(getattr(torch, dtype))
        x = acc[:, :o].to(torch.int64) + shift
    spread = torch.rand(o if per_channel else 1, generator=g, dtype=torch.float64).expand(o) * 4 - 2
    multiplier = (2.0 ** (log2_m + spread)).float().double()  # float32 scales, as in the file
    out_q = qp(1.0, z_out, 8, signed=True, qmin=max(z_out, -128) if relu else -128)
    q, exponent = quantize_multiplier(multiplier)
    got = _rows(trq, acc, shift, q, exponent, out_q)
    assert torch.equal(got, FIXED.requantize(x, _params(multiplier, out_q)))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), bits=st.sampled_from([4, 8, 12, 16]), sa=st.floats(0.001, 1),
       sb=st.floats(0.001, 1), so=st.floats(0.001, 2), channels_last=st.booleans())
def test_add_matches_fixedpoint_requant(trq: ModuleType, seed: int, bits: int, sa: float, sb: float, so: float,
                                        channels_last: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    hi = 2**bits - 1
    qa, qb, out_q = qp(sa, hi // 3, bits), qp(sb, hi // 2, bits), qp(so, hi // 4, bits + 2, signed=True)
    a, b = (torch.randint(0, hi + 1, (2, 5, 3, 4), generator=g, dtype=torch.int32) for _ in range(2))
    a[0, 0, 0, :2], b[0, 0, 0, :2] = torch.tensor([0, hi]), torch.tensor([hi, 0])  # the extreme codes
    expected = FIXED.add(a, b, qa, qb, out_q)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    a_dev, b_dev = (t.to(DEVICE).contiguous(memory_format=layout) for t in (a, b))
    out = trq.add_codes_fixedpoint(a_dev, b_dev, qa, qb, out_q)
    assert torch.equal(out.cpu(), expected) and out.is_contiguous(memory_format=layout)
    other = torch.contiguous_format if channels_last else torch.channels_last
    assert trq.add_codes_fixedpoint(a_dev, b_dev.contiguous(memory_format=other), qa, qb, out_q) is None


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_large_block_on_cuda(trq: ModuleType) -> None:
    g = torch.Generator().manual_seed(11)
    rows, o = 50_000, 300
    acc = torch.randint(-(2**30), 2**30, (rows, o + 8), generator=g, dtype=torch.int32)
    shift = torch.randint(-(2**20), 2**20, (o,), generator=g)
    multiplier = (2.0 ** (torch.rand(o, generator=g, dtype=torch.float64) * 50 - 40)).float().double()
    q, exponent = quantize_multiplier(multiplier)
    got = _rows(trq, acc, shift, q, exponent, qp(1.0, 3, 8, signed=True))
    x = acc[:, :o].to(torch.int64) + shift
    assert torch.equal(got, FIXED.requantize(x, _params(multiplier, qp(1.0, 3, 8, signed=True))))
    a, b = (torch.randint(0, 256, (8, 64, 28, 28), generator=g, dtype=torch.int32) for _ in range(2))
    qa, qb, out_q = qp(0.02, 7), qp(0.05, 130), qp(0.04, 3, qmin=3)
    out = trq.add_codes_fixedpoint(a.cuda(), b.cuda(), qa, qb, out_q)
    assert torch.equal(out.cpu(), FIXED.add(a, b, qa, qb, out_q))
