"""The compiled CPU readout (photosim.engine.fused_cpu) equals the torch reference path bit for bit: the
accumulators, clip and overflow counts exactly, the signal and error powers to float rounding."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from conftest import analog_layer, box_muller_edge_words

from photosim.engine import analog, kernels
from photosim.engine.backends import BACKENDS

FUSED_CPU = BACKENDS["fused-cpu"]

GROUPS, OUTS = 2, 5  # groups, outputs per group


def _layer(tile: int, tiles: int, hw: dict, bias: bool, dtype: torch.dtype) -> analog.AnalogLayer:
    """A layer of K = tile * tiles inputs over G groups whose plan gives tile values of ``dtype``."""
    x_max, w_max = (8, 128) if dtype == torch.float32 else (1 << 15, 1 << 15)
    plan = kernels.MatmulPlan(str(dtype).removeprefix("torch."), chunk=tile * tiles)
    w = torch.randint(-w_max, w_max, (GROUPS * OUTS, tile * tiles), generator=torch.Generator().manual_seed(1))
    weights = kernels.prepare_weights(w, GROUPS, plan)
    b = torch.randint(-5000, 5000, (GROUPS, OUTS), generator=torch.Generator().manual_seed(2)) if bias else None
    return analog_layer({"tile": tile, **hw}, weights, b, x_max=x_max, w_max=w_max, seed=7, repeat=1,
                        tile_step="fused-cpu")


def _tile_values(layer: analog.AnalogLayer, tiles: int, rows: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Integer tile values (G, T, M, O) over +-1.3 FS: some clip, the accumulator may overflow."""
    fs = int(layer.full_scale)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-fs * 13 // 10, fs * 13 // 10, (GROUPS, tiles, rows, OUTS), generator=g).to(dtype)


def _both(layer: analog.AnalogLayer, p: torch.Tensor, ids: torch.Tensor,
          exact: torch.Tensor | None = None) -> tuple[tuple, tuple]:
    fused, reference = copy.deepcopy(layer), copy.deepcopy(layer)
    assert FUSED_CPU.supports(layer.plan, p.device) is None
    a = fused._readout_fused(p, ids, exact, None)
    b = reference._readout_torch(p, ids, exact)
    return (a, fused.stats), (b, reference.stats)


def _assert_same(got: tuple, want: tuple) -> None:
    (a, sa), (b, sb) = got, want
    assert torch.equal(a, b)
    for name in ("outputs", "overflowed", "tile_values", "clipped", "max_abs_acc"):
        assert getattr(sa, name) == getattr(sb, name), name
    for name in ("signal_power", "error_power"):
        assert getattr(sa, name) == pytest.approx(getattr(sb, name), rel=1e-12, abs=1e-9), name


NOISES = {"none": {}, "output": {"output": {"sigma": 0.02}}, "shot": {"shot": {"sigma": 0.03}},
          "both": {"output": {"sigma": 0.01}, "shot": {"sigma": 0.02}}}
CASES = list(itertools.product(
    [torch.float32, torch.float64],  # tile values' dtype
    NOISES,
    [None, 2, 5, 8, 12],  # ADC bits
    [(12, "wrap", "start"), (10, "saturate", "end"), (9, "none", "start"), (32, "saturate", "start")],
    [True, False],  # bias
    [1, 3],  # tiles
))


@pytest.mark.parametrize(("dtype", "adc", "bits"), [(torch.float32, None, 10), (torch.float64, None, 10),
                                                    (torch.float32, 8, 4)])
def test_a_bias_beyond_a_saturating_accumulator_is_clamped_first(dtype: torch.dtype, adc: int | None,
                                                                 bits: int) -> None:
    """The bias term enters a saturating accumulator first and is clamped there, as accumulate() does."""
    hw = {"adc": {"bits": adc}, "noise": NOISES["output"], "accumulator": {"bits": bits, "overflow": "saturate"}}
    layer = _layer(16, 3, hw, True, dtype)
    assert int(layer._bias_codes(layer.step).abs().max()) > 2 ** (bits - 1)
    _assert_same(*_both(layer, _tile_values(layer, 3, 8, dtype, seed=4), torch.tensor([3, 9])))


@pytest.mark.parametrize(("dtype", "noise", "adc", "acc", "bias", "tiles"), CASES[::5])
def test_fused_readout_equals_the_torch_path(dtype: torch.dtype, noise: str, adc: int | None, acc: tuple,
                                             bias: bool, tiles: int) -> None:
    bits, overflow, bias_at = acc
    hw = {"adc": {"bits": adc}, "noise": NOISES[noise],
          "accumulator": {"bits": bits, "overflow": overflow, "bias_at": bias_at}}
    layer = _layer(16, tiles, hw, bias, dtype)
    ids = torch.tensor([5, 2, 40, 41])  # not starting at 0, not contiguous
    p = _tile_values(layer, tiles, 4 * 3, dtype, seed=tiles)  # P = 3 rows per sample
    _assert_same(*_both(layer, p, ids))


def test_given_exact_and_float64_values_read_in_float32() -> None:
    """The no-tiling path: float64 tile values from the exact conv, float32 noise arithmetic; and an exact tensor
    (weights with error) for the diagnostics."""
    hw = {"adc": {"bits": 6}, "noise": NOISES["both"], "accumulator": {"bits": 12, "overflow": "wrap"}}
    layer = _layer(48, 1, hw, True, torch.float32)
    ids = torch.tensor([9, 3])
    p = _tile_values(layer, 1, 2 * 7, torch.float64, seed=3)
    assert layer.readout.dtype == torch.float32
    _assert_same(*_both(layer, p, ids))
    exact = p.sum(dim=1) + torch.rand(p.shape[0], p.shape[2], p.shape[3], dtype=torch.float64)
    _assert_same(*_both(layer, p, ids, exact))


def test_a_sample_reads_the_same_in_any_batch_and_thread_count() -> None:
    hw = {"adc": {"bits": 8}, "noise": NOISES["both"], "accumulator": {"bits": 10, "overflow": "saturate"}}
    layer = _layer(16, 3, hw, True, torch.float32)
    ids = torch.tensor([11, 4, 7])
    p = _tile_values(layer, 3, 3 * 2, torch.float32, seed=4)  # P = 2
    whole = copy.deepcopy(layer)._readout(p, ids)
    part = copy.deepcopy(layer)._readout(p[:, :, 2:4], ids[1:2])
    assert torch.equal(whole[:, 2:4], part)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(copy.deepcopy(layer)._readout(p, ids), whole)
    finally:
        torch.set_num_threads(threads)


def test_cpu_readout_takes_the_fused_path_except_where_it_cannot() -> None:
    cpu = torch.device("cpu")
    layer = _layer(16, 2, {"noise": NOISES["both"]}, False, torch.float64)
    assert FUSED_CPU.supports(layer.plan, cpu) is None  # float64 shot noise too: both take IEEE square roots
    assert FUSED_CPU.supports(layer.plan, torch.device("meta")) == "runs on the CPU"
    layer = _layer(16, 2, {"noise": {"custom": {"function": "math:fabs"}}}, False, torch.float64)
    assert "custom noise" in FUSED_CPU.supports(layer.plan, cpu)


def test_kernel_normals_are_the_philox_streams() -> None:
    from photosim.engine import fused_cpu
    from photosim.hardware import philox

    key, count = (0xDEADBEEF, 0x01234567), 1 << 16
    out = np.zeros(count, dtype=np.float32)
    fused_cpu._fill_normals(fused_cpu.round_keys(key), np.int64(12345), np.int64(0), np.int64(count // 4), out)
    assert np.array_equal(out, philox.normal(key, torch.tensor([12345]), count)[0].numpy())


def test_kernel_box_muller_equals_philox_at_every_edge() -> None:
    """The compiled radius and angle equal philox.py's on every edge word, the top 256 included (u = 1, radius 0:
    a shift by a negative count there once gave 2.67, one normal in 2^24 wrong)."""
    from photosim.engine import fused_cpu
    from photosim.hardware import philox

    words = box_muller_edge_words()
    radius = torch.tensor([fused_cpu._radius(np.int64(w)) for w in words.tolist()])
    cos_sin = torch.tensor([fused_cpu._cos_sin(np.int64(w)) for w in words.tolist()])
    assert torch.equal(radius, philox.radius(words))
    assert torch.equal(cos_sin, torch.stack(philox.cos_sin(words), dim=1))
    assert radius[-1].item() == 0.0  # w = 2^32 - 1: u = 1
