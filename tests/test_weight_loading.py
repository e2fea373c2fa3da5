"""Weight loading, latency, throughput and TOPS/W of photonic cores against hand counts, and the physical checks
on a photonics section (responsivity, options of the other architecture, LO path loss, weight swing)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ModelBuilder, qp
from typer.testing import CliRunner

from photosim.cli import app
from photosim.errors import PhotosimError
from photosim.experiments.budget import budget_table, energy_totals
from photosim.experiments.sweep import load_sweep
from photosim.hardware.config import load_hardware
from photosim.hardware.energy import LayerCounts, layer_energy, layer_schedule
from photosim.hardware.photonic_config import PhotonicsConfig, quantum_limit_responsivity
from photosim.hardware.photonics import link_budget, weight_swing

# tile 8, fan_out 3, 4 cores, batch 10, 2 us per load, 1 GHz, 0.5 mW hold and 2 pJ write per device, 100 um^2 each;
# every other energy off but the laser (1 mW per channel at 50% wall-plug efficiency)
LOADING = {"tile": 8, "photonics": {
    "laser_power_mw": 1.0, "wall_plug_efficiency": 0.5, "clock_ghz": 1.0, "fan_out": 3, "cores": 4, "batch_size": 10,
    "weight_load_us": 2.0, "device_area_um2": 100.0,
    "energy": {"modulator_pj": 0, "adc_fom_fj": 0, "weight_hold_mw": 0.5, "weight_write_pj": 2.0, "accumulate_pj": 0,
               "requant_pj": 0}}}


def _two_convs() -> object:
    """conv 2 -> 4 channels, 3x3, on 2x6x6 (16 positions, K = 18), then a grouped conv 4 -> 4 in 2 groups, 3x3
    (4 positions, K = 18 per group, 2 outputs per group)."""
    m = ModelBuilder((2, 6, 6), qp(1.0, 0, 8))
    m.conv("conv", "x", qp(1.0, 0, 8), torch.ones(4, 2, 3, 3, dtype=torch.int8), torch.zeros(4, dtype=torch.int64),
           1.0)
    m.conv("grouped", "conv", qp(1.0, 0, 8), torch.ones(4, 2, 3, 3, dtype=torch.int8),
           torch.zeros(4, dtype=torch.int64), 1.0, groups=2)
    return m.build()


def test_loads_time_energy_and_tops_against_a_hand_count() -> None:
    table = budget_table(_two_convs(), LOADING).set_index("layer")
    # conv: 1 group * ceil(18 / 8) tiles * ceil(4 / 3) = 6 loads; grouped: 2 groups * 3 tiles * ceil(2 / 3) = 6
    assert list(table["loads"]) == [6, 6] and list(table["weight_writes"]) == [72, 72]
    # 6 loads over 4 cores: 2 rounds of (2 us settling + 10 inferences * P cycles of 1 ns)
    assert table.loc["conv", "latency_per_batch_s"] == pytest.approx(2 * (2e-6 + 10 * 16e-9))
    assert table.loc["grouped", "latency_per_batch_s"] == pytest.approx(2 * (2e-6 + 10 * 4e-9))
    assert table.loc["conv", "load_time_s"] == pytest.approx(4e-6)
    bank_w = 8 * 3 * 0.5e-3  # 24 devices held at 0.5 mW
    load = (72 * 2e-12 + bank_w * 6 * 2e-6) / 10  # writes + holding while 6 loads settle, shared by 10 inferences
    assert table.loc["conv", "weight_load_J"] == pytest.approx(load)
    assert table.loc["conv", "weights_J"] == pytest.approx(bank_w * 96e-9)  # held for 16 * 6 cycles of 1 ns
    assert table.loc["grouped", "weights_J"] == pytest.approx(bank_w * 24e-9)
    laser = 8 * 1e-3 / 0.5 * 120e-9  # 8 channels for 96 + 24 cycles
    energy = laser + bank_w * 120e-9 + 2 * load
    latency, macs = 8.4e-6, 16 * 4 * 18 + 4 * 4 * 18
    totals = energy_totals(budget_table(_two_convs(), LOADING))
    assert totals["energy_per_inference_J"] == pytest.approx(energy)
    assert totals["latency_per_batch_s"] == pytest.approx(latency)
    assert totals["inferences_per_s"] == pytest.approx(10 / latency)
    assert totals["TOPS"] == pytest.approx(2 * macs * 10 / latency / 1e12)
    assert totals["TOPS_per_W"] == pytest.approx(2 * macs / energy / 1e12)
    assert totals["TOPS_per_mm2"] == pytest.approx(totals["TOPS"] / (4 * 8 * 3 * 100e-6))  # 4 banks of 24 devices


def test_a_larger_batch_shares_the_loads() -> None:
    def totals(batch: int) -> dict[str, float]:
        hw = {**LOADING, "photonics": {**LOADING["photonics"], "batch_size": batch}}
        return energy_totals(budget_table(_two_convs(), hw))

    one, many = totals(1), totals(1000)
    assert one["weight_load_J"] == pytest.approx(1000 * many["weight_load_J"])
    assert one["latency_per_batch_s"] == pytest.approx(2 * (2e-6 + 16e-9) + 2 * (2e-6 + 4e-9))
    assert many["inferences_per_s"] > 100 * one["inferences_per_s"]
    assert "TOPS_per_mm2" not in energy_totals(budget_table(_two_convs(), {"photonics": {}}))  # no device area


def test_digits_resnet_needs_149_loads_of_a_16x16_bank() -> None:
    """The numbers of issue 22: digits-resnet's 37,840 weights in 149 loads of a 16 x 16 bank; at 1 to 10 us of
    settling with 1 mW per heater, 38 to 381 uJ and 0.15 to 1.5 ms per batch against 0.33 us of compute."""
    from photosim.frontend.models import load_model

    model = load_model("digits-resnet").module.eval()
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_hook(lambda m, i, out, name=name: shapes.__setitem__(name, (m, out.shape)))
    model(torch.zeros(1, 1, 8, 8))
    counts = []
    for module, out in shapes.values():  # (positions, groups, outputs per group, K) from the float model itself
        if isinstance(module, torch.nn.Linear):
            geometry = (1, 1, module.out_features, module.in_features)
        else:
            g = module.groups
            geometry = (out[2] * out[3], g, module.out_channels // g, module.in_channels // g * math.prod(
                module.kernel_size))
        counts.append(LayerCounts.of(*geometry, tile=min(16, geometry[3]), fan_out=16))
    assert sum(c.loads for c in counts) == 149 and sum(c.weights for c in counts) == 37840
    cfg = PhotonicsConfig(clock_ghz=10.0, energy={"weight_hold_mw": 1.0})
    assert sum(c.cycles for c in counts) / 10e9 == pytest.approx(0.3266e-6)  # 3266 cycles of 0.1 ns
    for settle_us, hold_uj, latency_ms in ((1, 38.03, 0.1493), (10, 380.3, 1.490)):
        slow = cfg.model_copy(update={"weight_load_us": float(settle_us)})
        load = sum(layer_energy(slow, c, 8).weight_load for c in counts)  # conv1's bank holds only L = 9 rows
        assert load * 1e6 == pytest.approx(hold_uj, rel=1e-3)
        assert sum(layer_schedule(slow, c).latency_s for c in counts) * 1e3 == pytest.approx(latency_ms, rel=1e-3)
    assert sum(c.loads * 16 * 16 for c in counts) * 1e-3 * 1e-6 * 1e6 == pytest.approx(38.14, rel=1e-3)  # the issue's


def test_batch_size_is_a_sweep_axis() -> None:
    sweep = load_sweep({"name": "batch", "base": {"hw": "microring-weight-bank"},
                        "grid": {"hw.photonics.batch_size": [1, 256]}})
    model = _two_convs()
    per_inference = [energy_totals(budget_table(model, point.config.hw))["weight_load_J"] for point in sweep.points]
    assert [p.config.hw.photonics.batch_size for p in sweep.points] == [1, 256]
    assert per_inference[0] == pytest.approx(256 * per_inference[1])


def test_batch_size_must_be_one_for_the_model() -> None:
    hw = {"photonics": {"batch_size": 8}, "layers": [{"match": "grouped", "photonics": {"batch_size": 4}}]}
    with pytest.raises(PhotosimError, match="batch_size differs between layers"):
        budget_table(_two_convs(), hw)


def test_budget_prints_throughput(tmp_path) -> None:
    model = tmp_path / "m.safetensors"
    _two_convs().save(model)
    result = CliRunner().invoke(app, ["budget", str(model), "--hw", "microring-weight-bank"])
    assert result.exit_code == 0, result.output
    # L = 16, fan_out 16: conv 2 tiles * 1 row group, grouped 2 groups * 2 tiles * 1 = 6 loads
    assert "batch of 256 on 1 core: 6 bank loads" in result.output and "TOPS/mm2" in result.output


def test_responsivity_is_bounded_by_the_wavelength() -> None:
    assert quantum_limit_responsivity(1550.0) == pytest.approx(1.2502, abs=1e-4)  # q lambda / (h c)
    assert PhotonicsConfig(responsivity_a_per_w=1.25).problems() == []
    assert PhotonicsConfig(responsivity_a_per_w=1.3, wavelength_nm=1650.0).problems() == []
    assert "quantum limit" in PhotonicsConfig(responsivity_a_per_w=1.3).problems()[0]
    with pytest.raises(Exception, match="wavelength_nm"):
        PhotonicsConfig(wavelength_nm=10_000.0)


@pytest.mark.parametrize("settings, problem", [
    ({"lo_power_mw": 1.0}, "lo_power_mw is an option of the coherent architecture only"),
    ({"architecture": "coherent"}, "a coherent core needs photonics.lo_power_mw"),
    ({"architecture": "coherent", "lo_power_mw": 1.0, "wdm_crosstalk_db": -30.0}, "wdm_crosstalk_db is an option"),
    ({"architecture": "coherent", "lo_power_mw": 1.0, "weight_extinction_ratio_db": 4.0}, "weight_extinction_ratio"),
])
def test_options_of_the_other_architecture_are_refused(settings, problem) -> None:
    with pytest.raises(PhotosimError, match=f"layer 'fc'.*{problem}"):
        link_budget(PhotonicsConfig(**settings), 16, "fc")


def test_a_per_layer_override_is_checked_with_the_global_values() -> None:
    hw = {"photonics": {"architecture": "coherent", "lo_power_mw": 1.0},
          "layers": [{"match": "grouped", "photonics": {"lo_power_mw": 0.5}}]}
    assert len(budget_table(_two_convs(), hw)) == 2  # the override alone would be an incoherent core with an LO


def test_lo_path_loss_by_hand() -> None:
    cfg = PhotonicsConfig(architecture="coherent", laser_power_mw=1.0, lo_power_mw=2.0, coupling_loss_db=3.0,
                          waveguide_loss_db=1.0, device_loss_db=0.0, fan_out=4, splitter_excess_db=0.5,
                          extinction_ratio_db=None, responsivity_a_per_w=1.0, dark_current_na=0.0)
    p_det = 1e-3 * 10 ** (-(3 + 1 + 10 * math.log10(4) + 2 * 0.5) / 10)  # per input channel
    p_lo = 2e-3 * 10 ** (-(3 + 1 + 2 * 0.5) / 10)  # coupling, waveguide and the split's excess: 5 dB
    b = link_budget(cfg, 10)
    assert b.signal_current_a == pytest.approx(2 * math.sqrt(p_lo * 10 * p_det))
    assert b.total_current_a == pytest.approx(p_lo + 10 * p_det)


def test_an_attenuating_weight_swings_less_light() -> None:
    plain = {"coupling_loss_db": 0.0, "waveguide_loss_db": 0.0, "device_loss_db": 0.0, "fan_out": 1,
             "extinction_ratio_db": None, "responsivity_a_per_w": 1.0}
    steering = link_budget(PhotonicsConfig(**plain), 10)
    attenuating = link_budget(PhotonicsConfig(**plain, weight_extinction_ratio_db=10.0), 10)
    assert attenuating.signal_current_a == pytest.approx(steering.signal_current_a * (1 - 0.1) / 2)
    assert attenuating.total_current_a == steering.total_current_a
    # pcm-tensor-core: 158.5% switching contrast (transmission ratio 2.585) swings 1 / 3.26 of the balanced +-1
    assert 1 / weight_swing(load_hardware("pcm-tensor-core").photonics) == pytest.approx(3.26, abs=0.01)
