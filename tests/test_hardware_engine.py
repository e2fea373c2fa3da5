"""The photonic engine model inside the integer engine: each effect alone against an analytic expectation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ModelBuilder, qp

from photosim.engine.executor import Engine, simulate_codes
from photosim.errors import PhotosimError
from photosim.experiments.workflow import calibrate_adc_ranges
from photosim.frontend.data import load_dataset
from photosim.frontend.models import list_models, load_model
from photosim.frontend.ptq import quantize
from photosim.hardware.config import load_hardware


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    return {split: torch.stack([x for x, _ in load_dataset("digits", split)]) for split in ("calibration", "test")}


@pytest.fixture(scope="module")
def shipped(digits) -> dict[str, object]:
    return {m.name: quantize(load_model(m.name).module, digits["calibration"]) for m in list_models()}


def _codes(qm, x, hw, **kwargs) -> torch.Tensor:
    return Engine(qm, hw, **kwargs).codes(x)


OFF_CONFIGS = [
    {"tile": 16},
    {"tile": 7, "accumulator": {"bits": 48, "overflow": "wrap"}},
    {"noise": {"output": {"sigma": 0.0}, "shot": {"sigma": 0.0}, "weight_static": {"sigma": 0.0}}},
    {"layers": [{"match": "*", "tile": 3}]},
]


@pytest.mark.parametrize("name", [m.name for m in list_models()])
@pytest.mark.parametrize("hw", OFF_CONFIGS)
def test_every_effect_off_is_the_ideal_engine(shipped, digits, name, hw) -> None:
    qm = shipped[name]
    assert torch.equal(_codes(qm, digits["test"], hw), _codes(qm, digits["test"], None))


def test_wide_enough_accumulator_and_adc_are_ideal_bit_for_bit(shipped, digits) -> None:
    qm, x = shipped["digits-resnet"], digits["test"]
    hw = {"tile": 32, "adc": {"bits": 32}, "accumulator": {"bits": 40, "overflow": "saturate"}}
    engine = Engine(qm, hw)
    assert engine.analog and all(layer.step == 1.0 for layer in engine.analog.values())  # the path is exercised
    assert torch.equal(engine.codes(x), _codes(qm, x, None))


def test_tile_at_least_k_is_no_tiling(shipped, digits) -> None:
    qm, x = shipped["digits-cnn"], digits["test"][:64]
    noisy = {"adc": {"bits": 10}, "noise": {"output": {"sigma": 0.002}}, "accumulator": {"bits": 20,
                                                                                          "overflow": "saturate"}}
    assert torch.equal(_codes(qm, x, {**noisy, "tile": 100_000}), _codes(qm, x, noisy))


def _overflow_model(w_row: list[int], bias: int) -> object:
    """One linear output: sum of 4 products (x codes 0..255, zero point 0) plus bias, output = accumulator."""
    m = ModelBuilder((4,), qp(1.0, 0, 8))
    m.linear("fc", "x", qp(1.0, 0, 16, signed=True), torch.tensor([w_row], dtype=torch.int8),
             torch.tensor([bias]), 1.0)
    return m.build()


@pytest.mark.parametrize("overflow", ["wrap", "saturate", "none"])
def test_accumulator_overflow_on_hand_built_weights(overflow: str) -> None:
    qm = _overflow_model([100, 100, -100, -100], bias=-50)
    x = torch.tensor([[200.0, 200.0, 255.0, 0.0]])  # tiles of 1: +20000, +20000, -25500, 0
    codes = simulate_codes(qm, x, {"tile": 1, "accumulator": {"bits": 16, "overflow": overflow, "bias_at": "start"}})
    exact = -50 + 20000 + 20000 - 25500
    expected = {
        "none": exact,
        "wrap": (exact + 2**15) % 2**16 - 2**15,  # = exact: the wrap is undone by the negative tile
        "saturate": max(-(2**15), min(2**15 - 1, -50 + 20000 + 20000)) - 25500,  # rail at 32767, then -25500
    }[overflow]
    assert int(codes[0, 0]) == expected


def _linear_probe(k: int, o: int, x_code: int, w_code: int) -> object:
    m = ModelBuilder((k,), qp(1.0, 0, 8))
    m.linear("fc", "x", qp(1.0, 0, 16, signed=True), torch.full((o, k), w_code, dtype=torch.int8),
             torch.zeros(o, dtype=torch.int64), 1.0)
    return m.build(), torch.full((1, k), float(x_code))


def _analog_error(qm, x, hw, samples: int, **kwargs) -> torch.Tensor:
    """Hardware minus exact accumulators of the probe's linear layer, over ``samples`` inferences."""
    engine = Engine(qm, hw, **kwargs)
    layer = engine.analog["fc"]
    codes = qm.input_q.quantize(x).expand(samples, -1)
    exact = codes.double() @ qm.tensors["fc.weight"].double().T  # (samples, O), exact below 2^53
    return layer.linear_acc(codes, torch.arange(samples)).double() * layer.step - exact


def test_output_noise_std_is_sigma_times_full_scale() -> None:
    qm, x = _linear_probe(k=64, o=256, x_code=100, w_code=3)
    sigma, tile = 1e-3, 16
    err = _analog_error(qm, x, {"tile": tile, "noise": {"output": {"sigma": sigma}}}, samples=200)
    full_scale = tile * 255 * 128
    tiles = 64 // tile
    expected = math.sqrt(tiles * (sigma * full_scale) ** 2 + tiles / 12)  # + rounding to integers per tile
    assert abs(err.std().item() / expected - 1) < 0.03
    assert abs(err.mean().item()) < 0.05 * expected


def test_shot_noise_follows_the_square_root_law() -> None:
    qm, x = _linear_probe(k=32, o=256, x_code=200, w_code=5)
    sigma = 0.01
    err = _analog_error(qm, x, {"noise": {"shot": {"sigma": sigma}}}, samples=200)
    p, full_scale = 32 * 200 * 5, 32 * 255 * 128
    assert abs(err.std().item() / (sigma * math.sqrt(p * full_scale)) - 1) < 0.03


def test_snr_and_enob_give_the_equivalent_sigma() -> None:
    hw = load_hardware({"noise": {"output": {"snr_db": 40}}, "layers": [{"match": "fc", "noise": {
        "output": {"enob": 6}}}]})
    assert hw.for_layer("conv").noise.output.resolved_sigma == pytest.approx(0.01)
    assert hw.for_layer("fc").noise.output.resolved_sigma == pytest.approx(1 / (math.sqrt(3) * 2 ** 6))


def test_static_noise_is_per_chip_read_noise_per_inference(shipped, digits) -> None:
    qm = shipped["digits-cnn"]
    same = digits["test"][:1].expand(16, -1, -1, -1)  # one image, inferred 16 times
    static = {"noise": {"weight_static": {"sigma": 0.3}}}
    chip0 = _codes(qm, same, static, repeat=0)
    assert (chip0 == chip0[0]).all()  # identical across inferences of one chip
    assert not torch.equal(chip0, _codes(qm, same, static, repeat=1))  # another chip, another error
    read = _codes(qm, same, {"noise": {"weight_read": {"sigma": 0.3}}})
    assert not (read == read[0]).all()  # drawn again for every inference


def test_seeds_reproduce_and_batching_does_not_matter(shipped, digits) -> None:
    qm, x = shipped["digits-resnet"], digits["test"][:64]
    hw = {"tile": 32, "adc": {"bits": 8}, "noise": {"output": {"sigma": 0.003}, "shot": {"sigma": 0.001},
                                                    "weight_read": {"sigma": 0.05}, "weight_static": {"sigma": 0.05}}}
    runs = {bs: simulate_codes(qm, x, hw, batch_size=bs, seed=3) for bs in (1, 7, 64)}
    assert torch.equal(runs[1], runs[7]) and torch.equal(runs[7], runs[64])
    assert torch.equal(runs[64], simulate_codes(qm, x, hw, seed=3))
    assert not torch.equal(runs[64], simulate_codes(qm, x, hw, seed=4))


def test_calibrated_adc_range_is_the_percentile_of_tile_values() -> None:
    qm, x = _linear_probe(k=40, o=3, x_code=10, w_code=2)
    xs = torch.arange(1, 41, dtype=torch.float32)[:, None].expand(40, 40) / 255.0 * 10  # codes 0..10ish
    ranges = calibrate_adc_ranges(qm, {"tile": 8, "adc": {"bits": 6, "range": "calibrated", "percentile": 100}},
                                  xs)
    codes = qm.input_q.quantize(xs).double()
    tile_sums = codes.view(40, 5, 8).sum(-1) * 2  # every weight is 2
    assert ranges == {"fc": pytest.approx(float(tile_sums.abs().max()))}


def test_adc_clips_are_counted() -> None:
    qm, x = _linear_probe(k=8, o=2, x_code=255, w_code=127)
    engine = Engine(qm, {"adc": {"bits": 4, "range": 0.5}})
    engine.codes(x)
    stats = engine.analog["fc"].stats
    assert stats.clipped == stats.tile_values == 2  # both tiles sit at 0.99 FS, above the 0.5 FS range


@pytest.mark.parametrize(
    ("hw", "culprit"),
    [({"tiles": 4}, "unknown key 'tiles'"), ({"noise": {"output": {"sigma": -0.1}}}, "noise.output.sigma"),
     ({"adc": {"bits": 0}}, "adc.bits"), ({"accumulator": {"overflow": "clip"}}, "accumulator.overflow"),
     ({"noise": {"output": {"sigma": 0.1, "snr_db": 20}}}, "one of sigma, snr_db or enob"),
     ({"requant": "magic"}, "requant: Input should be .float.")],
)
def test_bad_hardware_configs_name_the_key(hw, culprit) -> None:
    with pytest.raises(PhotosimError, match=culprit):
        load_hardware(hw)


def test_unmatched_layer_override_is_an_error(shipped) -> None:
    with pytest.raises(PhotosimError, match="match no layer"):
        Engine(shipped["digits-cnn"], {"layers": [{"match": "conv9", "tile": 4}]})


def test_calibrated_adc_without_ranges_is_an_error(shipped) -> None:
    with pytest.raises(PhotosimError, match="calibrated ADC range"):
        Engine(shipped["digits-cnn"], {"adc": {"bits": 8, "range": "calibrated"}})


def test_custom_noise_function_gets_tile_values_and_context(tmp_path) -> None:
    module = tmp_path / "my_noise.py"
    module.write_text(
        "def half(p, context):\n"
        "    assert context['layer'] == 'fc' and context['tile'] == 8 and context['normal']().shape == p.shape\n"
        "    return p * 0.5\n"
    )
    qm, x = _linear_probe(k=16, o=4, x_code=100, w_code=3)
    err = _analog_error(qm, x, {"tile": 8, "noise": {"custom": {"function": f"{module}:half"}}}, samples=2)
    exact = 16 * 100 * 3
    assert torch.equal(err, torch.full_like(err, -exact / 2))  # two tiles of 2400 halved, each an integer
