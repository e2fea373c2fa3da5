"""The photonic link budget and energy model against hand calculations in SI units, their limits, and the link
budget's predicted SNR against the SNR the engine measures."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ModelBuilder, qp
from typer.testing import CliRunner

from photosim.cli import app
from photosim.engine.executor import simulate_codes
from photosim.experiments.budget import budget_table, energy_totals
from photosim.experiments.workflow import run_hardware
from photosim.frontend.data import load_dataset
from photosim.frontend.models import load_model
from photosim.frontend.ptq import quantize
from photosim.hardware.config import load_hardware
from photosim.hardware.energy import LayerCounts, layer_energy, walden_adc_energy
from photosim.hardware.mesh import MeshConfig
from photosim.hardware.photonic_config import PhotonicsConfig
from photosim.hardware.photonics import link_budget, path_loss_db, with_link_budget
from photosim.hardware.units import Q_E
from photosim.ir.summary import output_shapes

Q, KB = 1.602176634e-19, 1.380649e-23
# 1 mW per channel, no loss, ideal modulator, 1 A/W, no dark current, 2 GHz clock (B = 1 GHz), 1 kohm at 300 K
PLAIN = {"laser_power_mw": 1.0, "coupling_loss_db": 0, "waveguide_loss_db": 0, "device_loss_db": 0, "fan_out": 1,
         "splitter_excess_db": 0, "extinction_ratio_db": None, "responsivity_a_per_w": 1.0, "dark_current_na": 0,
         "clock_ghz": 2.0, "temperature_k": 300.0, "load_ohm": 1000.0}


def test_incoherent_link_budget_by_hand() -> None:
    b = link_budget(PhotonicsConfig(**PLAIN, rin_db_hz=-150), tile=10)
    signal = 10 * 1e-3 * 1.0  # L channels of 1 mW on 1 A/W: 10 mA full-scale swing and total current
    assert b.signal_current_a == pytest.approx(signal) and b.total_current_a == pytest.approx(signal)
    assert b.sigma_shot == pytest.approx(math.sqrt(2 * Q * 0.01 * 1e9) / 0.01)  # 1.790e-4 of FS
    assert b.sigma_thermal == pytest.approx(math.sqrt(4 * KB * 300 * 1e9 / 1000) / 0.01)  # 1.287e-5
    assert b.sigma_rin == pytest.approx(math.sqrt(1e-15 * 1e9))  # RIN I^2 B / I^2 = 1e-6 -> 1e-3
    assert b.sigma_shot == pytest.approx(1.7900711e-4, rel=1e-6)
    assert b.sigma_output == pytest.approx(math.sqrt(b.sigma_shot ** 2 + b.sigma_thermal ** 2 + 1e-6))
    assert b.offset_fs == 0.0  # no extinction leakage -> no offset


def test_losses_dark_current_tia_and_extinction_by_hand() -> None:
    cfg = PhotonicsConfig(**{**PLAIN, "coupling_loss_db": 3, "waveguide_loss_db": 1, "device_loss_db": 0.1,
                             "fan_out": 4, "splitter_excess_db": 0.5, "extinction_ratio_db": 20,
                             "dark_current_na": 100, "load_ohm": None, "tia_noise_pa_rthz": 10})
    assert path_loss_db(cfg, 10) == pytest.approx(3 + 1 + 10 * 0.1 + 10 * math.log10(4) + 2 * 0.5)
    b = link_budget(cfg, 10)
    p_det = 1e-3 * 10 ** (-path_loss_db(cfg, 10) / 10)
    assert b.detector_power_w == pytest.approx(p_det)
    assert b.signal_current_a == pytest.approx(10 * p_det * 0.99)  # ER 20 dB: 1% of the light is always on
    assert b.total_current_a == pytest.approx(10 * p_det)
    assert b.offset_fs == pytest.approx(0.01 / 0.99)
    assert b.sigma_shot == pytest.approx(math.sqrt(2 * Q * (10 * p_det + 2 * 100e-9) * 1e9) / (9.9 * p_det))
    assert b.sigma_thermal == pytest.approx(10e-12 * math.sqrt(1e9) / (9.9 * p_det))


def test_coherent_homodyne_by_hand() -> None:
    b = link_budget(PhotonicsConfig(**PLAIN, architecture="coherent", lo_power_mw=1.0), tile=10)
    signal = 2 * math.sqrt(1e-3 * 10 * 1e-3)  # 2 R sqrt(P_LO * L P_det) = 6.325 mA
    assert b.signal_current_a == pytest.approx(signal)
    assert b.total_current_a == pytest.approx(1e-3 + 10e-3)  # LO + signal on the two photodiodes
    assert b.sigma_shot == pytest.approx(math.sqrt(2 * Q * 0.011 * 1e9) / signal)


def test_weight_errors_add_in_quadrature() -> None:
    cfg = PhotonicsConfig(weight_bits=4, programming_error=0.01, wdm_crosstalk_db=-20, thermal_crosstalk=0.02)
    step = 2 / 15 / math.sqrt(12)  # 16 levels over +-Wmax
    assert link_budget(cfg, 8).sigma_weight == pytest.approx(
        math.sqrt(step ** 2 + 0.01 ** 2 + 2 * 0.01 ** 2 + 2 * 0.02 ** 2))


def test_link_budget_becomes_the_noise_settings() -> None:
    """Signal law: the input-dependent shot noise is noise.photocurrent, sqrt(2 q B I_fs) / I_fs with I_fs = R L P
    (16 mA here), RIN is noise.rin at sqrt(RIN B) per laser, the rest (thermal; no leakage or dark current here)
    noise.output; the worst-case law puts all of them at full scale into noise.output."""
    photonics = {**PLAIN, "programming_error": 0.01, "rin_db_hz": -150}
    hw = load_hardware({"tile": 16, "photonics": photonics}).for_layer("fc")
    budget, physical = link_budget(hw.photonics, 16), with_link_budget(hw, 16)
    current, bandwidth = 16 * 1e-3, 1e9
    assert physical.noise.photocurrent.sigma == pytest.approx(math.sqrt(2 * Q_E * bandwidth * current) / current)
    assert physical.noise.photocurrent.light == "inputs"
    assert physical.noise.photocurrent.sigma == pytest.approx(budget.sigma_shot)  # no constant light: all of it
    assert (physical.noise.rin.sigma, physical.noise.rin.lasers) == (pytest.approx(math.sqrt(1e-15 * bandwidth)),
                                                                      "independent")
    assert physical.noise.output.sigma == pytest.approx(budget.sigma_thermal)
    assert (physical.noise.weight_static.sigma, physical.noise.weight_static.kind) == (0.01, "additive")
    worst = with_link_budget(load_hardware({"tile": 16, "photonics": {**photonics, "noise_law": "worst-case"}})
                             .for_layer("fc"), 16)
    assert worst.noise.output.sigma == pytest.approx(budget.sigma_output)
    assert not worst.noise.photocurrent.on and not worst.noise.rin.on
    assert with_link_budget(load_hardware({}).for_layer("fc"), 16).noise.output.sigma is None


def _conv_model() -> object:
    """One conv 2 -> 4 channels, 3x3 kernel, on 2x6x6 codes: 16 positions, K = 18."""
    m = ModelBuilder((2, 6, 6), qp(1.0, 0, 8))
    m.conv("conv", "x", qp(1.0, 0, 16, signed=True), torch.ones(4, 2, 3, 3, dtype=torch.int8),
           torch.zeros(4, dtype=torch.int64), 1.0)
    return m.build()


def test_energy_against_a_hand_count() -> None:
    energy = {"modulator_pj": 1.0, "adc_fom_fj": 10.0, "weight_hold_mw": 1.0, "weight_write_pj": 2.0,
              "accumulate_pj": 0.1, "requant_pj": 0.5}
    hw = load_hardware({"tile": 8, "adc": {"bits": 6}, "photonics": {
        "laser_power_mw": 2.0, "wall_plug_efficiency": 0.5, "clock_ghz": 1.0, "fan_out": 3, "batch_size": 4,
        "energy": energy}})
    row = budget_table(_conv_model(), hw).iloc[0]
    # T = ceil(18 / 8) = 3 tiles, ceil(4 / 3) = 2 row groups: 16 * 3 * 2 = 96 cycles of 1 ns
    cycles, outputs, adc_conversions = 96, 16 * 4, 16 * 4 * 3
    assert (row["cycles"], row["input_conversions"], row["adc_conversions"], row["macs"]) == (
        cycles, cycles * 8, adc_conversions, outputs * 18)
    laser = cycles * 8 * 2e-3 / 0.5 * 1e-9  # 8 channels of 2 mW at 50% wall-plug efficiency
    modulators = cycles * 8 * 1e-12
    weights = cycles * 8 * 3 * 1e-3 * 1e-9  # 24 devices held while computing
    weight_load = 4 * 18 * 2e-12 / 4  # 72 written once per batch of 4 (no settling time: no hold while loading)
    adc = adc_conversions * 10e-15 * 2 ** 6
    digital = adc_conversions * 0.1e-12 + outputs * 0.5e-12
    for column, value in (("laser_J", laser), ("modulators_J", modulators), ("weights_J", weights),
                          ("weight_load_J", weight_load), ("adc_J", adc), ("digital_J", digital)):
        assert row[column] == pytest.approx(value), column
    total = laser + modulators + weights + weight_load + adc + digital
    totals = energy_totals(budget_table(_conv_model(), hw))
    assert totals["energy_per_inference_J"] == pytest.approx(total)
    assert totals["energy_per_mac_J"] == pytest.approx(total / (outputs * 18))


def test_energy_formulas() -> None:
    assert walden_adc_energy(10e-15, 8) == pytest.approx(2.56e-12)
    counts = LayerCounts.of(positions=1, groups=1, out_per_group=10, k=100, tile=100, fan_out=10)
    assert (counts.cycles, counts.adc_conversions, counts.macs) == (1, 10, 1000)
    coherent = PhotonicsConfig(architecture="coherent", laser_power_mw=1, lo_power_mw=2, wall_plug_efficiency=1,
                               clock_ghz=1, fan_out=10)
    assert layer_energy(coherent, counts, 8).laser == pytest.approx((100 * 1e-3 + 10 * 2e-3) * 1e-9)


@pytest.fixture(scope="module")
def digits_cnn() -> tuple[object, torch.Tensor]:
    data = {s: torch.stack([x for x, _ in load_dataset("digits", s)]) for s in ("calibration", "test")}
    return quantize(load_model("digits-cnn").module, data["calibration"]), data["test"]


def test_infinite_power_is_the_ideal_engine_bit_for_bit(digits_cnn) -> None:
    qm, x = digits_cnn
    unbounded = PhotonicsConfig.model_construct(**{**PhotonicsConfig().model_dump(), "laser_power_mw": 1e15,
                                                   "extinction_ratio_db": None})  # past the schema's physical watt
    budget = link_budget(unbounded, 16)
    assert budget.sigma_weight == 0 and 0 < budget.sigma_output < 1e-9
    hw = {"tile": 16, "noise": {"output": {"sigma": budget.sigma_output}}}  # what with_link_budget sets
    assert torch.equal(simulate_codes(qm, x, hw), simulate_codes(qm, x))


def test_predicted_snr_matches_the_measured_snr(digits_cnn) -> None:
    qm, x = digits_cnn
    test = (x[:120], torch.zeros(120, dtype=torch.int64))
    run = run_hardware(qm, test, {"tile": 32, "photonics": {"laser_power_mw": 0.3}})
    layers = run.layers
    assert len(layers) >= 3 and (layers["output_sigma"] > 1e-3).all()
    ratio = 10 ** ((layers["snr_db"] - layers["snr_db_budget"]) / 10)  # measured / predicted SNR
    assert ((ratio - 1).abs() < 0.10).all(), layers[["layer", "snr_db", "snr_db_budget"]]
    assert run.repeats[0]["energy_per_inference_J"] > 0
    totals = energy_totals(budget_table(qm, {"tile": 32, "photonics": {"laser_power_mw": 0.3}}))
    assert {"latency_per_batch_s", "inferences_per_s", "TOPS", "TOPS_per_W"} <= set(totals)
    assert {key: run.repeats[0][key] for key in totals} == totals  # the run's rows carry the model's totals


@pytest.mark.parametrize("photonics, culprit", [
    ({"laser_power_mw": -1}, "photonics.laser_power_mw"),
    ({"wall_plug_efficiency": 1.5}, "photonics.wall_plug_efficiency"),
    ({"architecture": "quantum"}, "photonics.architecture"),
    ({"load_ohm": 50, "tia_noise_pa_rthz": 5}, "tia_noise_pa_rthz"),
    ({"energy": {"adc_fom_fj": -1}}, "photonics.energy.adc_fom_fj"),
    ({"responsivity_a_per_w": 5}, "responsivity_a_per_w 5 exceeds the quantum limit"),  # 1.25 A/W at 1550 nm
    ({"rin_db_hz": -10}, "photonics.rin_db_hz"),
    ({"programming_error": 5}, "photonics.programming_error"),
    ({"lo_power_mw": 1}, "lo_power_mw is an option of the coherent architecture only"),
    ({"architecture": "coherent"}, "a coherent core needs photonics.lo_power_mw"),
    ({"energy": {"weight_reuse": 1000}}, "photonics.batch_size"),
])
def test_bad_physical_input_exits_2_naming_it(tmp_path, photonics, culprit) -> None:
    model = tmp_path / "conv.safetensors"
    _conv_model().save(model)
    hw = tmp_path / "hw.yaml"
    hw.write_text(f"photonics: {photonics}\n")
    result = CliRunner().invoke(app, ["budget", str(model), "--hw", str(hw)])
    assert result.exit_code == 2 and culprit in result.output, result.output


def test_budget_command_writes_the_report(tmp_path) -> None:
    model, report = tmp_path / "conv.safetensors", tmp_path / "budget.csv"
    _conv_model().save(model)
    hw = tmp_path / "hw.yaml"
    hw.write_text("tile: 8\nadc: {bits: 6}\nphotonics: {laser_power_mw: 2}\n")
    result = CliRunner().invoke(app, ["budget", str(model), "--hw", str(hw), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "energy per inference" in result.output and report.read_text().startswith("layer,architecture")
    hw.write_text("tile: 8\n")
    assert CliRunner().invoke(app, ["budget", str(model), "--hw", str(hw)]).exit_code == 2


def test_noise_beside_photonics_is_refused() -> None:
    with pytest.raises(Exception, match="noise.output"):
        load_hardware({"noise": {"output": {"sigma": 0.01}}, "photonics": {}})


def test_pareto_front_keeps_the_undominated_points() -> None:
    from photosim.experiments.plot import pareto_front

    xs, ys = [1.0, 2.0, 3.0, 4.0, 2.5], [0.5, 0.9, 0.8, 0.95, 0.9]
    assert pareto_front(xs, ys) == [0, 1, 3]


PRESETS = ("microring-weight-bank", "pcm-tensor-core", "coherent-homodyne", "shot-noise-limited")


@pytest.mark.parametrize("name", PRESETS)
def test_photonic_presets_cite_sources_and_give_a_budget(name) -> None:
    from photosim._config import PRESETS_DIR

    text = (PRESETS_DIR / "hw" / f"{name}.yaml").read_text()
    assert "Physical Review X" in text or "Nature" in text or "Scientific Reports" in text
    table = budget_table(_conv_model(), load_hardware(name))
    assert len(table) == 1 and table["energy_per_inference_J"].iloc[0] > 0


def test_energy_experiment_variants_are_the_presets() -> None:
    """experiments/energy.yaml names two presets in its variants; its grid sets the laser power inside them."""
    from pathlib import Path

    from photosim.experiments.sweep import load_sweep

    sweep = load_sweep(Path(__file__).parents[1] / "experiments" / "energy.yaml")
    assert {name: overrides for name, overrides in sweep.config.variants.items()} == {
        name: {"hw": name} for name in ("microring-weight-bank", "coherent-homodyne")}
    for point in sweep.points:
        preset = load_hardware(point.variant).model_dump()
        preset["photonics"]["laser_power_mw"] = point.settings["hw.photonics.laser_power_mw"]
        assert point.config.hw.model_dump() == preset


def test_the_worked_example_of_the_docs() -> None:
    """docs/photonics.md, Worked example: microring-weight-bank on digits-resnet's fc (K = 32, 10 outputs, L = 16)."""
    cfg = load_hardware("microring-weight-bank").photonics
    b = link_budget(cfg, 16)
    assert (round(b.loss_db, 3), round(b.detector_power_w * 1e6, 2)) == (15.741, 26.66)
    assert (round(b.total_current_a * 1e6, 2), round(b.signal_current_a * 1e6, 2)) == (426.58, 425.23)
    assert [round(s, 6) for s in (b.sigma_shot, b.sigma_thermal, b.sigma_rin, b.sigma_output)] == [
        0.001944, 0.000677, 0.001257, 0.002412]
    assert round(b.sigma_weight, 6) == 0.002297
    assert [round(s, 7) for s in (b.sigma_photocurrent, b.sigma_shot_floor, b.sigma_intensity)] == [
        0.0019411, 0.0001101, 0.0012574]
    signal_law = with_link_budget(load_hardware("microring-weight-bank").for_layer("fc"), 16).noise
    assert round(signal_law.output.sigma, 7) == 0.0006858
    energy = layer_energy(cfg, LayerCounts.of(positions=1, groups=1, out_per_group=10, k=32, tile=16, fan_out=16), 8)
    assert [round(x * 1e12, 1) for x in (energy.laser, energy.modulators, energy.weights, energy.adc,
                                         energy.digital)] == [32.0, 32.0, 51.2, 102.4, 6.0]
    # 2 loads of 256 rings held 5 us each and 320 writes of 1 pJ, shared by a batch of 256
    assert energy.weight_load == pytest.approx((256 * 1e-3 * 2 * 5e-6 + 320 * 1e-12) / 256)
    assert energy.total * 1e12 == pytest.approx(223.6 + 10001.25)


def test_an_mzi_mesh_loses_light_with_its_depth() -> None:
    """With hw.mesh the devices on the path are the SVD core's columns: 2 * 8 + 1 = 17 for 8 ports (two Clements
    meshes of depth 8 and the attenuators), 0.1 dB each, instead of L devices of device_loss_db."""
    cfg = PhotonicsConfig(**{**PLAIN, "device_loss_db": 0.5, "coupling_loss_db": 1.0}, architecture="coherent",
                          lo_power_mw=1.0)
    mesh = MeshConfig(mzi_loss_db=0.1)
    assert path_loss_db(cfg, 8) == pytest.approx(1.0 + 8 * 0.5)
    assert path_loss_db(cfg, 8, mesh) == pytest.approx(1.0 + 17 * 0.1)
    hw = load_hardware({"tile": 8, "mesh": {"mzi_loss_db": 0.1}, "photonics": cfg.model_dump()}).for_layer("fc")
    assert link_budget(cfg, 8, mesh=mesh).loss_db == pytest.approx(2.7)
    assert with_link_budget(hw, 8).noise.photocurrent.sigma == pytest.approx(link_budget(cfg, 8, mesh=mesh)
                                                                            .sigma_photocurrent)


def test_a_matmul_of_two_activations_loads_its_operand_for_every_input() -> None:
    """Attention's Q K^T and A V on the optical core: the second operand is an activation, written into the bank
    for every inference (its load time and energy are not shared by the batch, as a weight bank's are)."""
    calibration = torch.stack([x for x, _ in load_dataset("digits", "calibration")])[:16]
    qm = quantize(load_model("digits-vit").module, calibration)
    energy = {"weight_write_pj": 2.0, "weight_hold_mw": 0.0}
    hw = {"tile": 4, "photonics": {"laser_power_mw": 1.0, "fan_out": 8, "batch_size": 16, "cores": 1,
                                   "weight_load_us": 1.0, "energy": energy}}
    table = budget_table(qm, hw).set_index("layer")
    matmuls = [n for n in qm.nodes if n.op == "matmul"]
    assert len(matmuls) == 4 and all(n.name in table.index for n in matmuls)  # 2 blocks x (Q K^T, A V)
    shapes = output_shapes(qm)
    for node in matmuls:
        row = table.loc[node.name]
        *lead, m, p = shapes[node.name]
        k = shapes[node.inputs[0]][-1]
        groups = math.prod(lead)
        loads = groups * math.ceil(k / 4) * math.ceil(p / 8)
        assert (row["macs"], row["weight_writes"], row["loads"]) == (groups * m * p * k, groups * p * k, loads)
        assert row["load_time_s"] == pytest.approx(16 * loads * 1e-6)  # every inference of the batch of 16
        assert row["weight_load_J"] == pytest.approx(groups * p * k * 2e-12)  # per inference, not / 16
    linear = table.loc[next(n.name for n in qm.nodes if n.op == "linear")]
    assert linear["load_time_s"] == pytest.approx(linear["loads"] * 1e-6)  # once per batch
    assert linear["weight_load_J"] == pytest.approx(linear["weight_writes"] * 2e-12 / 16)
