"""Accumulator, ADC and noise laws against hand-computed values and analytic statistics."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from photosim.hardware.accumulator import accumulate, wrap
from photosim.hardware.adc import adc_step, digitize
from photosim.hardware.noise import (
    additive_weight_noise,
    enob,
    multiplicative_weight_noise,
    output_noise,
    shot_noise,
    sigma_from_enob,
    sigma_from_snr_db,
    snr_db,
)
from photosim.hardware.rng import normal, normal_per_sample


def _python_saturating_sum(terms: list[int], bits: int) -> int:
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    acc = 0
    for t in terms:
        acc = min(max(acc + t, lo), hi)
    return acc


def test_saturate_and_wrap_on_hand_built_overflow() -> None:
    tiles = torch.tensor([[100, 100, -150], [10, 20, 30], [-128, -1, 5]])
    acc, flag = accumulate(tiles, None, 8, "saturate")
    assert acc.tolist() == [-23, 60, -123]  # 100 -> 127 (rail) -> -23
    assert flag.tolist() == [True, False, True]
    acc, flag = accumulate(tiles, None, 8, "wrap")
    assert acc.tolist() == [50, 60, -124]  # 200 wraps to -56, then -206 wraps back to 50 = exact sum
    acc, _ = accumulate(tiles, torch.tensor([5, 5, 5]), 8, "saturate", bias_at="end")
    assert acc.tolist() == [-18, 65, -118]
    acc, _ = accumulate(tiles, torch.tensor([100, 100, 100]), 8, "saturate", bias_at="start")
    assert acc.tolist() == [-23, 127, -24]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(-3000, 3000), min_size=4, max_size=4), min_size=1, max_size=6),
       st.integers(4, 14), st.sampled_from(["start", "end"]), st.integers(-500, 500))
def test_accumulator_modes_match_python_reference(rows: list[list[int]], bits: int, bias_at: str, b: int) -> None:
    tiles = torch.tensor(rows, dtype=torch.int64)
    bias = torch.full((len(rows),), b, dtype=torch.int64)
    for mode in ("wrap", "saturate", "none"):
        acc, _ = accumulate(tiles, bias, bits, mode, bias_at)
        for row, got in zip(rows, acc.tolist()):
            terms = [b] + row if bias_at == "start" else row + [b]
            if mode == "wrap":
                expected = (sum(terms) + 2 ** (bits - 1)) % 2**bits - 2 ** (bits - 1)
            elif mode == "saturate":
                expected = _python_saturating_sum(terms, bits)
            else:
                expected = sum(terms)
            assert got == expected


def test_wrap_is_twos_complement() -> None:
    x = torch.tensor([127, 128, 255, 256, -129, -128])
    assert wrap(x, 8).tolist() == [127, -128, -1, 0, 127, -128]


def test_adc_rounds_clips_and_counts() -> None:
    step = adc_step(1270.0, 8)  # 127 codes over +-1270 -> step 10
    assert step == 10.0
    codes, clipped = digitize(torch.tensor([14.0, 15.0, 25.0, -1264.0, 1276.0, 5000.0]), step, 8)
    assert codes.tolist() == [1, 2, 2, -126, 127, 127]  # half to even at 1.5 and 2.5
    assert clipped.tolist() == [False, False, False, False, True, True]
    assert adc_step(100.0, 12) == 1.0  # finer than one product: the integer grid itself
    ideal, clipped = digitize(torch.tensor([3.0, -70000.0]), 1.0, None)
    assert ideal.tolist() == [3, -70000] and not clipped.any()


def test_output_and_shot_noise_statistics() -> None:
    e = normal((400_000,), seed=1, repeat=0, stream="output", layer=0)
    p = torch.full((400_000,), 300.0, dtype=torch.float64)
    fs = 10_000.0
    out = output_noise(p, 0.01, fs, e) - p
    assert abs(out.std().item() / (0.01 * fs) - 1) < 0.01 and abs(out.mean().item()) < 0.5
    shot = shot_noise(p, 0.02, fs, e) - p
    assert abs(shot.std().item() / (0.02 * math.sqrt(300.0 * fs)) - 1) < 0.01


def test_weight_noise_laws() -> None:
    e = normal((200_000,), seed=2, repeat=0, stream="weight_static", layer=0)
    w = torch.full((200_000,), 50.0, dtype=torch.float64)
    mult = multiplicative_weight_noise(w, 0.05, 127.0, e)
    assert abs((mult / w - 1).std().item() / 0.05 - 1) < 0.01
    add = additive_weight_noise(w, 0.05, 127.0, e) - w
    assert abs(add.std().item() / (0.05 * 127.0) - 1) < 0.01


def test_snr_and_enob_conversions() -> None:
    assert sigma_from_snr_db(40.0) == 0.01
    assert math.isclose(sigma_from_enob(6.0), 1 / (math.sqrt(3) * 2 ** 6))
    assert math.isclose(enob(snr_db(1.0, sigma_from_enob(7.25) ** 2)), 7.25)


@settings(max_examples=8, deadline=None)
@given(st.integers(3, 12))
def test_an_ideal_adc_reports_its_bits(bits: int) -> None:
    """The rounding error of the N-bit ADC on values spread over +-FS, referred to FS^2, gives N effective bits
    (less the one code a symmetric narrow range gives up: log2(1 - 2^(1-N)))."""
    full_scale = 2.0 ** 20
    p = (torch.rand(200_000, generator=torch.Generator().manual_seed(bits), dtype=torch.float64) * 2 - 1) * full_scale
    step = adc_step(full_scale, bits)
    codes, _ = digitize(p, step, bits)
    error_power = ((codes * step - p) ** 2).mean().item()
    measured = enob(snr_db(full_scale ** 2, error_power))
    assert abs(measured - (bits + math.log2(1 - 2.0 ** (1 - bits)))) < 0.01


def test_streams_are_per_sample_and_seeded() -> None:
    ids = torch.tensor([3, 4, 5])
    a = normal_per_sample((2, 2), ids, seed=0, repeat=0, stream="output", layer=1)
    b = normal_per_sample((2, 2), torch.tensor([5]), seed=0, repeat=0, stream="output", layer=1)
    assert torch.equal(a[2], b[0])  # sample 5 gets the same noise in any batch position
    c = normal_per_sample((2, 2), ids, seed=1, repeat=0, stream="output", layer=1)
    d = normal_per_sample((2, 2), ids, seed=0, repeat=1, stream="output", layer=1)
    e = normal_per_sample((2, 2), ids, seed=0, repeat=0, stream="shot", layer=1)
    assert not torch.equal(a, c) and not torch.equal(a, d) and not torch.equal(a, e)
