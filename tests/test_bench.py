"""The benchmark as a smoke test (nothing timed), and every fast path against the exact one, bit for bit."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import make_conv_net
from test_kernels import conv_inputs, random_case, reference_conv_acc
from typer.testing import CliRunner

from photosim import engine as engine_module
from photosim import onednn
from photosim.bench import CONFIGS, BenchSettings, run_benchmark
from photosim.cli import app
from photosim.engine import Engine
from photosim.format import QParams
from photosim.hardware import analog
from photosim.hardware.accumulator import accumulate
from photosim.requant import REQUANT_MODES, RequantParams

needs_onednn = pytest.mark.skipif(not onednn.limb_bits(), reason="oneDNN int8 convolutions are unavailable")
TILED = CONFIGS[2].hw


def test_quick_benchmark_reports_every_configuration(tmp_path) -> None:
    out = tmp_path / "bench.json"
    result = run_benchmark(BenchSettings.quick(model="digits-cnn", memory=False), json_path=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    names = [row["name"] for row in result["configs"]]
    assert names == ["float eval", *(c.name for c in CONFIGS)]
    assert all(row["images_per_s"] > 0 and row["ratio"] > 0 for row in result["configs"])
    assert result["machine"]["threads"] == 2 and result["diagnostics"] is False


def test_peak_memory_is_measured_in_subprocesses() -> None:
    result = run_benchmark(BenchSettings.quick(model="digits-cnn"), configs=CONFIGS[3:4])
    float_row, row = result["configs"]
    assert float_row["peak_rss_mib"] > 0 and row["peak_rss_mib"] > 0
    assert row["peak_over_float_mib"] == pytest.approx(row["peak_rss_mib"] - float_row["peak_rss_mib"])


def test_bench_command_prints_the_table() -> None:
    result = CliRunner().invoke(app, ["bench", "--quick", "--model", "digits-cnn", "--no-memory"])
    assert result.exit_code == 0, result.output
    assert "digits-cnn, batch 8" in result.output and "W12A12" in result.output


# -- oneDNN convolutions against the int64 reference ------------------------------------------------


def _onednn_acc(x: torch.Tensor, w: torch.Tensor, case: dict) -> torch.Tensor | None:
    p = (case["stride"],) * 2, (case["padding"],) * 2, (case["dilation"],) * 2
    conv = onednn.prepare_conv(w, (case["qmin"] - case["z"], case["qmax"] - case["z"]), *p, case["groups"])
    return None if conv is None else onednn.conv_acc(x, case["z"], conv)


@needs_onednn
@pytest.mark.parametrize("limb", [7, 8])
def test_onednn_convs_match_the_int64_reference(monkeypatch: pytest.MonkeyPatch, limb: int) -> None:
    """Random convs (2-16 bits, zero points, groups, stride, dilation, padding), 7-bit limbs forced too."""
    if limb == 8 and onednn.limb_bits() != 8:
        pytest.skip("this CPU adds u8*s8 pairs in saturating int16: 8-bit limbs are not exact here")
    monkeypatch.setattr(onednn, "limb_bits", lambda: limb)
    used = 0
    for seed in range(80):
        case = random_case(seed)
        x, w = conv_inputs(case, seed)
        acc = _onednn_acc(x, w, case)
        if acc is not None:
            used += 1
            expected = reference_conv_acc(x, case["z"], w, case["stride"], case["padding"], case["dilation"],
                                          case["groups"])
            assert torch.equal(acc.to(torch.int64), expected), case
    assert used > 40


@needs_onednn
@pytest.mark.parametrize(("a_bits", "w_bits", "signed"), [(8, 8, False), (8, 8, True), (12, 8, False),
                                                          (8, 12, False), (4, 4, False)])
@pytest.mark.parametrize("w_code", ["min", "max"])
def test_onednn_worst_case_operands(a_bits: int, w_bits: int, signed: bool, w_code: str) -> None:
    """Every input at the far end of its range times every weight at an extreme: int16 pairs would saturate."""
    lo, hi = QParams.storage_range(a_bits, signed)
    wlo, whi = QParams.storage_range(w_bits, True)
    case = dict(z=0, qmin=lo, qmax=hi, stride=1, padding=1, dilation=1, groups=1)
    x = torch.full((2, 16, 5, 5), lo if signed else hi, dtype=torch.int32)
    w = torch.full((3, 16, 3, 3), wlo if w_code == "min" else whi, dtype=torch.int16)
    acc = _onednn_acc(x, w, case)
    assert acc is not None
    assert torch.equal(acc.to(torch.int64), reference_conv_acc(x, 0, w, 1, 1, 1, 1))


@needs_onednn
def test_onednn_results_at_2_to_24_fall_back_to_the_exact_path() -> None:
    """12-bit inputs at 4095 times -128 over K = 1152: a 7-bit limb's float32 results pass 2^24."""
    case = dict(z=0, qmin=0, qmax=4095, stride=1, padding=0, dilation=1, groups=1)
    x = torch.full((1, 128, 3, 3), 4095, dtype=torch.int32)
    w = torch.full((2, 128, 3, 3), -128, dtype=torch.int8)
    assert _onednn_acc(x, w, case) is None
    m_x = torch.full((1, 128, 3, 3), 1, dtype=torch.int32)  # small values: the same layer stays on oneDNN
    assert torch.equal(_onednn_acc(m_x, w, case).to(torch.int64), reference_conv_acc(m_x, 0, w, 1, 0, 1, 1))


@needs_onednn
def test_strided_pointwise_convs_avoid_the_racy_kernel() -> None:
    """oneDNN's strided 1x1 int8 kernel sums wrongly with 2 threads for 8 or 24 input channels (about one run
    in three of this case); photosim subsamples the input and runs a stride-1 conv instead."""
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    case = dict(z=0, qmin=0, qmax=255, stride=2, padding=0, dilation=1, groups=1)
    w = torch.randint(-128, 128, (16, 8, 1, 1), generator=g, dtype=torch.int8)
    for _ in range(20):
        x = torch.randint(0, 256, (16, 8, 12, 12), generator=g, dtype=torch.int32)
        assert torch.equal(_onednn_acc(x, w, case).to(torch.int64), reference_conv_acc(x, 0, w, 2, 0, 1, 1))


def test_weight_limbs_rebuild_the_weights() -> None:
    w = torch.tensor([-32768, -32767, -129, -128, -1, 0, 1, 127, 128, 255, 32639, 32640, 32767])
    limbs = onednn.weight_limbs(w)
    assert all(limb.dtype == torch.int8 for limb, _ in limbs)
    assert torch.equal(sum(limb.to(torch.int64) << shift for limb, shift in limbs), w)


# -- the engine with its fast paths against the engine without them -------------------------------------


def _without_fast_paths(monkeypatch: pytest.MonkeyPatch, float64_tiles: bool) -> None:
    """Engines built after this use the im2col matmul paths only, in one sub-batch, float64 tile sums if asked."""
    monkeypatch.setattr(onednn, "prepare_conv", lambda *args, **kwargs: None)
    monkeypatch.setattr(engine_module, "SUB_BATCH_ELEMENTS", 1 << 40)
    if float64_tiles:
        monkeypatch.setattr(analog, "FLOAT32_EXACT", 0)


@pytest.mark.parametrize(("bits", "requant", "hw"), [
    (8, "float", None), (8, "fixedpoint", None), (8, "pytorch", None), (4, "float", None), (12, "float", None),
    (8, "float", {"adc": {"bits": 8}, "tile": 16, "accumulator": {"bits": 16, "overflow": "saturate"}}),
    (8, "float", {"adc": {"bits": 6}, "accumulator": {"bits": 12, "overflow": "wrap"}}),
    (8, "float", {"noise": {"output": {"sigma": 0.01}, "shot": {"sigma": 0.003}}}),
    (8, "fixedpoint", {"noise": {"output": {"sigma": 0.02}}, "adc": {"bits": 8}}),
])
def test_engine_fast_paths_give_the_exact_paths_codes(monkeypatch: pytest.MonkeyPatch, bits: int, requant: str,
                                                      hw: dict | None) -> None:
    """Every node's codes: oneDNN convs, sub-batches, in-place float requant, float32 tile sums against the
    im2col matmul paths in one batch. Noisy tile values are float32 either way (the noise draws are per sample,
    so the same); without noise the float32 tile sums are checked against float64 ones."""
    model = make_conv_net(seed=bits, w_bits=bits, a_bits=bits)
    x = torch.rand(9, 3, 12, 12, generator=torch.Generator().manual_seed(bits))
    config = {**(hw or {}), "requant": requant}
    monkeypatch.setattr(engine_module, "SUB_BATCH_ELEMENTS", 2 * 8 * 12 * 12)  # sub-batches of 2 samples
    fast = Engine(model, config, seed=5).node_outputs(x)
    _without_fast_paths(monkeypatch, float64_tiles="noise" not in config)
    exact = Engine(model, config, seed=5).node_outputs(x)
    assert fast.keys() == exact.keys()
    for name in fast:
        assert torch.equal(fast[name], exact[name]), name


def test_tiled_noisy_layers_do_not_depend_on_batching() -> None:
    model = make_conv_net(seed=1)
    x = torch.rand(7, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    whole = Engine(model, TILED, seed=2).codes(x)
    parts = Engine(model, TILED, seed=2)
    assert torch.equal(torch.cat([parts.codes(x[:3]), parts.codes(x[3:])]), whole)


@pytest.mark.parametrize("hw", [TILED, CONFIGS[1].hw])
def test_empty_batch_on_the_photonic_path(hw: dict) -> None:
    assert Engine(make_conv_net(), hw).codes(torch.zeros(0, 3, 12, 12)).shape == (0, 10)


# -- in-place float requant, accumulator sum ---------------------------------------------------------


def test_float_requant_on_float64_accumulators_matches_the_integer_formula() -> None:
    g = torch.Generator().manual_seed(0)
    mode = REQUANT_MODES["float"]
    out = QParams(0.5, 3, 8, False, 3, 255)
    scales = torch.tensor([0.25, 0.125, 0.1, 1 / 3], dtype=torch.float64)
    params = RequantParams(1.0, scales, out, torch.zeros(4, dtype=torch.int64), None, True, "fbgemm")
    acc = torch.randint(-2000, 2000, (5, 4, 6, 6), generator=g)
    acc[0, :, 0, 0] = torch.tensor([2, 4, 10, 6])  # ties after the multiplier
    expected = (torch.round(acc.double() * (scales / 0.5).view(1, -1, 1, 1)) + 3).clamp(3, 255).to(torch.int32)
    assert torch.equal(mode.requantize(acc.double(), params), expected)
    assert torch.equal(mode.requantize(acc, params), expected)
    qa, qb = QParams(0.3, 10, 8, False, 0, 255), QParams(0.7, 0, 8, True, -128, 127)
    a = torch.randint(0, 256, (5, 4, 6, 6), generator=g, dtype=torch.int32)
    b = torch.randint(-128, 128, (5, 4, 6, 6), generator=g, dtype=torch.int32)
    real = (a.double() - 10) * 0.3 + b.double() * 0.7
    assert torch.equal(mode.add(a, b, qa, qb, out), (torch.round(real / 0.5) + 3).clamp(3, 255).to(torch.int32))


@pytest.mark.parametrize("seed", range(5))
def test_accumulator_sum_matches_the_running_accumulator(seed: int) -> None:
    r = random.Random(seed)
    bits, overflow = r.randint(6, 16), r.choice(["wrap", "saturate", "none"])
    hw = analog.LayerHardware.model_validate({"accumulator": {"bits": bits, "overflow": overflow,
                                                              "bias_at": r.choice(["start", "end"])}})
    layer = analog.AnalogLayer("fc", 0, hw, None, None, x_max=1, w_max=1)
    top = r.choice([3, 1 << (bits - 3), 1 << bits])  # safe for the plain sum, or not
    codes = torch.randint(-top, top + 1, (1, 5, 40, 3), generator=torch.Generator().manual_seed(seed))
    bias = torch.randint(-top, top + 1, (1, 1, 3), generator=torch.Generator().manual_seed(seed + 1))
    acc, overflowed = layer._accumulate(codes, bias)
    expected, flags = accumulate(codes.permute(0, 2, 3, 1), bias, bits, overflow, hw.accumulator.bias_at)
    assert torch.equal(acc, expected) and overflowed == int(flags.sum())
