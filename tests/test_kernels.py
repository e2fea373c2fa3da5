"""Integer kernels against independent references: per-tap int64 einsum convs, int64 matmuls, torch pools."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch
import torch.nn.functional as F

from photosim.engine import kernels
from photosim.ir.format import QParams


def reference_conv_acc(x: torch.Tensor, z: int, w: torch.Tensor, stride: int, padding: int, dilation: int,
                       groups: int) -> torch.Tensor:
    """sum (x - z) * w with zero padding: per kernel tap, slice the padded int64 input and einsum per group."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = F.pad(x.long() - z, (padding,) * 4)
    oh = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    ow = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    xg = xp.view(n, groups, cg, *xp.shape[2:])
    wg = w.long().view(groups, o // groups, cg, kh, kw)
    acc = torch.zeros(n, groups, o // groups, oh, ow, dtype=torch.int64)
    for i in range(kh):
        for j in range(kw):
            tap = xg[:, :, :, i * dilation :: stride, j * dilation :: stride][..., :oh, :ow]  # (N, G, Cg, OH, OW)
            acc += torch.einsum("ngchw,goc->ngohw", tap, wg[..., i, j])
    return acc.view(n, o, oh, ow)


def random_codes(shape: tuple[int, ...], lo: int, hi: int, rng: torch.Generator) -> torch.Tensor:
    """Random int32 codes in [lo, hi] with both extremes present."""
    t = torch.randint(lo, hi + 1, shape, generator=rng, dtype=torch.int64)
    flat = t.view(-1)
    flat[0], flat[-1] = lo, hi
    return t.to(torch.int32)


def random_case(seed: int) -> dict:
    """A random conv: bit widths 2..16, signed/unsigned inputs with zero points, groups, stride, dilation."""
    r = random.Random(seed)
    a_bits, w_bits, signed = r.randint(2, 16), r.randint(2, 16), r.random() < 0.5
    lo, hi = QParams.storage_range(a_bits, signed)
    z = r.randint(lo, hi)
    qmin, qmax = sorted((r.randint(lo, hi), r.choice((lo, hi))))
    groups, cg, og = r.choice([(1, r.randint(1, 24), r.randint(1, 9)), (2, 3, 2), (r.randint(2, 12), 1, 1),
                               (r.randint(2, 6), 1, 2)])
    k = r.randint(1, 3)
    return dict(a_bits=a_bits, w_bits=w_bits, z=z, qmin=qmin, qmax=qmax, groups=groups, cin=cg * groups,
                cout=og * groups, k=k, stride=r.randint(1, 2), padding=r.randint(0, k), dilation=r.randint(1, 2),
                n=r.randint(1, 3), size=r.randint(5, 9))


def conv_inputs(case: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = random_codes((case["n"], case["cin"], case["size"], case["size"]), case["qmin"], case["qmax"], g)
    wlo, whi = QParams.storage_range(case["w_bits"], True)
    w = random_codes((case["cout"], case["cin"] // case["groups"], case["k"], case["k"]), wlo, whi, g)
    return x, w.to(torch.int16)


def feasible_paths(k: int, x_range: tuple[int, int], w_bits: int, groups: int) -> list[kernels.MatmulPlan]:
    plans = []
    for path in kernels.MATMUL_PATHS:
        with contextlib.suppress(ValueError):
            plans.append(kernels.plan_matmul(k, x_range, w_bits, groups=groups, force=path))
    return plans


def conv_acc(x: torch.Tensor, w: torch.Tensor, case: dict, plan: kernels.MatmulPlan) -> torch.Tensor:
    weights = kernels.prepare_weights(w, case["groups"], plan)
    p = kernels.pair
    return kernels.conv2d_acc(x, case["z"], weights, p(case["k"]), p(case["stride"]), p(case["padding"]),
                              p(case["dilation"]), case["groups"])


@pytest.mark.parametrize("seed", range(60))
def test_conv_accumulators_match_reference_on_every_path(seed: int) -> None:
    case = random_case(seed)
    x, w = conv_inputs(case, seed)
    expected = reference_conv_acc(x, case["z"], w, case["stride"], case["padding"], case["dilation"], case["groups"])
    x_range = (case["qmin"] - case["z"], case["qmax"] - case["z"])
    k = w[0].numel()
    auto = kernels.plan_matmul(k, x_range, case["w_bits"], groups=case["groups"])
    plans = feasible_paths(k, x_range, case["w_bits"], case["groups"])
    assert {"float64", "int64"} <= {p.path for p in plans}
    for plan in [auto, *plans]:
        assert torch.equal(conv_acc(x, w, case, plan), expected), (case, plan)


@pytest.mark.parametrize("bits", range(2, 17))
def test_worst_case_operands_are_exact_on_every_path(bits: int) -> None:
    """All inputs at the far end of the range, all weights at -2^(b-1): partial sums reach the bound."""
    hi = QParams.storage_range(bits, False)[1]
    k_taps = 600  # long enough that float32 needs several chunks at 8 bits
    x = torch.full((2, k_taps), hi, dtype=torch.int32)
    w = torch.full((3, k_taps), -(1 << (bits - 1)), dtype=torch.int64)
    expected = torch.full((2, 3), k_taps * hi * -(1 << (bits - 1)), dtype=torch.int64)
    for plan in feasible_paths(k_taps, (0, hi), bits, 1):
        acc = kernels.linear_acc(x, 0, kernels.prepare_weights(w, 1, plan))
        assert torch.equal(acc, expected), plan


@pytest.mark.parametrize("seed", range(20))
def test_linear_accumulators_match_int64_matmul(seed: int) -> None:
    case = random_case(seed + 1000)
    g = torch.Generator().manual_seed(seed)
    k = random.Random(seed).randint(1, 700)
    x = random_codes((5, k), case["qmin"], case["qmax"], g)
    wlo, whi = QParams.storage_range(case["w_bits"], True)
    w = random_codes((7, k), wlo, whi, g)
    expected = (x.long() - case["z"]) @ w.long().T
    x_range = (case["qmin"] - case["z"], case["qmax"] - case["z"])
    for plan in [kernels.plan_matmul(k, x_range, case["w_bits"]), *feasible_paths(k, x_range, case["w_bits"], 1)]:
        assert torch.equal(kernels.linear_acc(x, case["z"], kernels.prepare_weights(w, 1, plan)), expected), plan


def test_path_choice_follows_the_worst_case_bound() -> None:
    # 8-bit unsigned inputs (z = 0), 8-bit weights, 3x3x64 conv: 576 * 255 * 128 > 2^24 -> float32 in 2 chunks.
    plan = kernels.plan_matmul(576, (0, 255), 8, force="float32")
    assert plan.chunk == (1 << 24) // (255 * 128)
    # 16-bit: one product already exceeds 2^24; float64 holds K * 2^31 < 2^53.
    assert kernels.plan_matmul(4608, (-32768, 32767), 16).path == "float64"
    with pytest.raises(ValueError):
        kernels.plan_matmul(9, (-32768, 32767), 16, force="float32")
    # int_mm: unsigned 8-bit inputs with a zero point are shifted into int8; 9-bit weights are not eligible.
    assert kernels.plan_matmul(64, (-100, 155), 8, force="int_mm").offset == -100 + 128
    assert kernels.plan_matmul(64, (-100, 27), 8, force="int_mm").offset == 0
    with pytest.raises(ValueError):
        kernels.plan_matmul(64, (-100, 155), 9, force="int_mm")
    with pytest.raises(ValueError):
        kernels.plan_matmul(64, (0, 255), 8, groups=4, force="int_mm")


def pool_cases(seed: int) -> dict:
    r = random.Random(seed)
    k = r.randint(1, 4)
    return dict(kernel=(k, r.randint(1, 4)), stride=(r.randint(1, 3), r.randint(1, 3)),
                padding=(r.randint(0, k // 2), 0), dilation=(r.randint(1, 2), 1), ceil_mode=r.random() < 0.5,
                count_include_pad=r.random() < 0.5, divisor_override=r.choice([None, None, r.randint(1, 7)]))


@pytest.mark.parametrize("seed", range(40))
def test_pools_match_torch_float_pools(seed: int) -> None:
    c = pool_cases(seed)
    g = torch.Generator().manual_seed(seed)
    x = random_codes((2, 3, 9, 8), -300, 40000, g)
    xd = x.double()
    got = kernels.max_pool2d(x, c["kernel"], c["stride"], c["padding"], c["dilation"], c["ceil_mode"])
    ref = F.max_pool2d(xd, c["kernel"], c["stride"], c["padding"], c["dilation"], c["ceil_mode"])
    assert got.dtype == x.dtype and torch.equal(got.double(), ref)

    z = 123
    sums, counts = kernels.avg_pool2d_sums(x, z, c["kernel"], c["stride"], c["padding"], c["ceil_mode"],
                                           c["count_include_pad"], c["divisor_override"])
    ref = F.avg_pool2d(xd - z, c["kernel"], c["stride"], c["padding"], c["ceil_mode"], c["count_include_pad"],
                       c["divisor_override"])
    torch.testing.assert_close(sums.double() / counts, ref, rtol=1e-14, atol=0)
    raw_sums = F.avg_pool2d(xd - z, c["kernel"], c["stride"], c["padding"], c["ceil_mode"], True, 1)
    assert torch.equal(sums.double(), raw_sums)


@pytest.mark.parametrize("out_size", [(1, 1), (2, 3), (3, 3), (4, 5), (9, 8), (5, None)])
def test_adaptive_avg_pool_matches_torch(out_size: tuple[int, int | None]) -> None:
    x = random_codes((2, 3, 9, 8), 0, 65535, torch.Generator().manual_seed(0))
    sums, counts = kernels.adaptive_avg_pool2d_sums(x, 32768, out_size)
    ref = F.adaptive_avg_pool2d(x.double() - 32768, out_size)
    assert sums.shape == ref.shape
    torch.testing.assert_close(sums.double() / counts, ref, rtol=1e-14, atol=0)
    assert torch.equal(sums.double(), torch.round(ref * counts))


def test_conv_sub_batches_do_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    case = random_case(3)
    x, w = conv_inputs(case, 3)
    plan = kernels.plan_matmul(w[0].numel(), (case["qmin"] - case["z"], case["qmax"] - case["z"]), case["w_bits"],
                               groups=case["groups"])
    whole = conv_acc(x, w, case, plan)
    monkeypatch.setattr(kernels, "PATCH_BYTES", 1)  # one sample per im2col block
    assert torch.equal(conv_acc(x, w, case, plan), whole)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("seed", range(12))
def test_cuda_accumulators_match_cpu_reference(seed: int) -> None:
    case = random_case(seed)
    x, w = conv_inputs(case, seed)
    expected = reference_conv_acc(x, case["z"], w, case["stride"], case["padding"], case["dilation"], case["groups"])
    x_range = (case["qmin"] - case["z"], case["qmax"] - case["z"])
    for path in ("int_mm", "float32", "float64", None):
        try:
            plan = kernels.plan_matmul(w[0].numel(), x_range, case["w_bits"], groups=case["groups"], device="cuda",
                                       force=path)
        except ValueError:
            continue
        weights = kernels.prepare_weights(w, case["groups"], plan, "cuda")
        p = kernels.pair
        acc = kernels.conv2d_acc(x.cuda(), case["z"], weights, p(case["k"]), p(case["stride"]), p(case["padding"]),
                                 p(case["dilation"]), case["groups"])
        assert torch.equal(acc.cpu(), expected), plan


@pytest.mark.parametrize("seed", range(12))
def test_int8_paths_on_eight_bit_convs(seed: int) -> None:
    """8-bit layers, the common case: int_mm with its unsigned shift, float32 split over K (K = 64*9 > 514)."""
    r = random.Random(seed)
    signed = r.random() < 0.5
    lo, hi = QParams.storage_range(8, signed)
    case = dict(a_bits=8, w_bits=r.randint(2, 8), z=r.randint(lo, hi), qmin=lo, qmax=hi, groups=1, cin=64,
                cout=r.randint(1, 16), k=3, stride=r.randint(1, 2), padding=r.randint(0, 2), dilation=r.randint(1, 2),
                n=2, size=7)
    x, w = conv_inputs(case, seed)
    expected = reference_conv_acc(x, case["z"], w, case["stride"], case["padding"], case["dilation"], 1)
    x_range = (lo - case["z"], hi - case["z"])
    for path in ("int_mm", "float32"):
        plan = kernels.plan_matmul(w[0].numel(), x_range, case["w_bits"], force=path)
        assert torch.equal(conv_acc(x, w, case, plan), expected), (case, plan)


def test_float64_chunks_add_up_in_int64(monkeypatch: pytest.MonkeyPatch) -> None:
    """K > 2^22 at 16 bits splits float64 matmuls; emulate with a 40-bit mantissa so 600 terms need 2 chunks."""
    monkeypatch.setitem(kernels._MANTISSA_BITS, "float64", 40)
    plan = kernels.plan_matmul(600, (0, 65535), 16, force="float64")
    assert plan.chunk < 600
    x = torch.full((2, 600), 65535, dtype=torch.int32)
    w = torch.full((3, 600), -32768, dtype=torch.int64)
    acc = kernels.linear_acc(x, 0, kernels.prepare_weights(w, 1, plan))
    assert torch.equal(acc, torch.full((2, 3), -600 * 65535 * 32768))
