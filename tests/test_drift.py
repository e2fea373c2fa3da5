"""Drifting weights (photosim.hardware.drift) against closed forms: the ring's Lorentzian, PCM's power law and
noise statistics (aihwkit's PCMLikeNoiseModel), the random walk, the recalibration period, and the hook."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from photosim._config import load_config
from photosim.errors import PhotosimError
from photosim.hardware.drift import (
    DriftConfig,
    PcmDrift,
    RingDrift,
    detuning_for_weight,
    drift_exponent_moments,
    drop_transmission,
    effective_age_s,
    pcm_drift,
    realised_weights,
    ring_temperature_change_k,
    weight_for_detuning,
)

W_MAX = 127.0
FWHM = 0.2  # nm, with 0.075 nm/K: the example ring


def codes(shape: tuple[int, int] = (64, 96), seed: int = 0) -> torch.Tensor:
    """Random integer weight codes in [-W_MAX, W_MAX] as float64."""
    return torch.randint(-127, 128, shape, generator=torch.Generator().manual_seed(seed)).double()


def realise(w: torch.Tensor, cfg: DriftConfig, seed: int = 0, w_max: float = W_MAX) -> torch.Tensor:
    """The hook on one chip drawn from ``seed``."""
    return realised_weights(w, w_max, 16, cfg, torch.Generator().manual_seed(seed))


def full_scale_pcm(**settings: object) -> DriftConfig:
    """A PCM chip with every weight at +W_MAX (devices at Gmax), on settings given by keyword."""
    return DriftConfig.model_validate({"time_s": settings.pop("time_s", 0.0), "pcm": settings})


def test_lorentzian_hand_values() -> None:
    detuning = torch.tensor([0.0, FWHM / 2, FWHM, math.inf], dtype=torch.float64)
    assert torch.allclose(drop_transmission(detuning, FWHM), torch.tensor([1.0, 0.5, 0.2, 0.0], dtype=torch.float64),
                          rtol=0, atol=1e-15)
    assert torch.allclose(weight_for_detuning(detuning, FWHM), torch.tensor([1.0, 0.0, -0.6, -1.0],
                                                                            dtype=torch.float64), rtol=0, atol=1e-15)


def test_detuning_for_weight_inverts_the_lorentzian() -> None:
    weight = torch.linspace(-0.999, 1.0, 2001, dtype=torch.float64)
    detuning = detuning_for_weight(weight, FWHM)
    assert (detuning >= 0).all()
    assert torch.allclose(weight_for_detuning(detuning, FWHM), weight, rtol=0, atol=1e-12)
    assert detuning_for_weight(torch.tensor([-1.0, 0.0], dtype=torch.float64), FWHM).tolist() == [math.inf, FWHM / 2]


@pytest.mark.parametrize(("code", "shift_nm", "expected"), [
    (W_MAX, FWHM / 2, 0.0),  # on resonance, moved half a linewidth: half the light drops
    (0.0, FWHM / 2, -0.6 * W_MAX),  # from delta = FWHM/2 to FWHM: T_drop 1/5
    (0.0, -FWHM / 2, W_MAX),  # back onto resonance
    (0.0, -FWHM, 0.0),  # through resonance to the mirror detuning -FWHM/2
    (-W_MAX, 1.0, -W_MAX),  # parked infinitely far: no shift reaches it
])
def test_a_temperature_shift_moves_the_weight_along_the_lorentzian(code: float, shift_nm: float,
                                                                   expected: float) -> None:
    cfg = DriftConfig(ring=RingDrift(shift_nm_per_k=0.075, fwhm_nm=FWHM, temperature_offset_k=shift_nm / 0.075))
    realised = realise(torch.tensor([[code]], dtype=torch.float64), cfg)
    assert realised.item() == pytest.approx(expected, abs=1e-12)


def test_one_kelvin_spans_most_of_the_weight_range() -> None:
    """0.075 nm/K on a 0.2 nm ring: 1 K moves the most sensitive weight by 0.88 Wmax (the issue's claim)."""
    w = torch.arange(-126, 128, dtype=torch.float64)[None, :]  # -127 is parked at infinite detuning
    cfg = DriftConfig(ring=RingDrift(shift_nm_per_k=0.075, fwhm_nm=FWHM, temperature_offset_k=1.0))
    change = (realise(w, cfg) - w).numpy()[0] / W_MAX
    u = w.numpy()[0] / W_MAX
    x = np.sqrt((1 - u) / (1 + u))  # 2 delta / FWHM, numpy closed form
    np.testing.assert_allclose(change, 2 / (1 + (x + 0.75) ** 2) - 1 - u, rtol=0, atol=1e-12)
    x_dense = np.linspace(0, 3, 300001)
    largest = np.max(2 / (1 + x_dense ** 2) - 2 / (1 + (x_dense + 0.75) ** 2))
    assert abs(change).max() == pytest.approx(largest, abs=2e-3)
    assert largest == pytest.approx(0.885, abs=1e-3)


def test_steepest_slope_is_three_root_three_over_four_per_half_linewidth() -> None:
    """dw/d(2 delta/FWHM) peaks at 3 sqrt(3) / 4 where w = 1/2: 0.974 Wmax per kelvin for the issue's ring."""
    cfg = DriftConfig(ring=RingDrift(shift_nm_per_k=0.075, fwhm_nm=FWHM, temperature_offset_k=1e-6))
    change = realise(torch.tensor([[1.0]], dtype=torch.float64), cfg, w_max=2.0).item() - 1.0
    slope_per_k = 3 * math.sqrt(3) / 4 * 2 / FWHM * 0.075 * 2.0
    assert change == pytest.approx(-slope_per_k * 1e-6, rel=1e-5)
    assert slope_per_k / 2.0 == pytest.approx(0.974, abs=1e-3)


@pytest.mark.parametrize("cfg", [
    DriftConfig(),
    DriftConfig(time_s=1e6),
    DriftConfig(ring=RingDrift(random_walk_k_per_rts=0.5, per_ring_spread=0.3)),
    DriftConfig(time_s=1e6, ring=RingDrift(shift_nm_per_k=0.0, temperature_offset_k=5.0)),
    DriftConfig(time_s=100.0, recalibration_period_s=50.0, ring=RingDrift(random_walk_k_per_rts=0.5)),
    DriftConfig(pcm=PcmDrift(programming_noise_scale=0.0, read_noise_scale=0.0)),
    DriftConfig(pcm=PcmDrift(programming_noise_scale=0.0, read_noise_scale=0.0, global_drift_compensation=False)),
    DriftConfig(time_s=1e6, pcm=PcmDrift(programming_noise_scale=0.0, read_noise_scale=0.0, drift_scale=0.0)),
], ids=["no-section", "no-section-late", "ring-age-0", "athermal-ring", "ring-just-relocked", "pcm-age-0",
        "pcm-age-0-uncompensated", "pcm-no-drift"])
def test_no_drift_is_the_identity_exactly(cfg: DriftConfig) -> None:
    w = codes()
    assert torch.equal(realise(w, cfg), w)


def test_random_walk_variance_grows_linearly_in_time() -> None:
    ring = RingDrift(random_walk_k_per_rts=0.01)
    generator = torch.Generator().manual_seed(1)
    for age_s in (100.0, 400.0, 1600.0):
        chips = torch.stack([ring_temperature_change_k(ring, 0.0, age_s, torch.Size((1, 1)), generator)
                             for _ in range(4000)])
        assert chips.var().item() == pytest.approx(0.01 ** 2 * age_s, rel=0.1)  # 4000 chips: 2.2% standard error


def test_a_chip_keeps_one_random_walk_path_over_time() -> None:
    """The same chip (generator seed) at 128 s and 512 s is one Brownian path: Cov = rate^2 * 128, correlation
    sqrt(128 / 512) = 0.5; a walk redrawn at every time would be uncorrelated."""
    ring = RingDrift(random_walk_k_per_rts=0.01)

    def walk(seed: int, age_s: float) -> float:
        return ring_temperature_change_k(ring, 0.0, age_s, torch.Size(()), torch.Generator().manual_seed(seed)).item()

    early, late = (torch.tensor([walk(seed, age) for seed in range(3000)]) for age in (128.0, 512.0))
    assert torch.corrcoef(torch.stack([early, late]))[0, 1].item() == pytest.approx(0.5, abs=0.05)
    assert (early * late).mean().item() == pytest.approx(0.01 ** 2 * 128, rel=0.1)


def test_ring_spread_and_lock_residual_have_their_stated_std() -> None:
    ring = RingDrift(temperature_offset_k=2.0, per_ring_spread=0.1)
    spread = ring_temperature_change_k(ring, 0.0, 0.0, torch.Size((200, 200)), torch.Generator().manual_seed(2))
    assert spread.mean().item() == pytest.approx(2.0, abs=0.005)
    assert spread.std().item() == pytest.approx(0.2, rel=0.02)
    residual = ring_temperature_change_k(RingDrift(), 0.003, 0.0, torch.Size((200, 200)),
                                         torch.Generator().manual_seed(3))
    assert residual.mean().item() == pytest.approx(0.0, abs=5e-5)
    assert residual.std().item() == pytest.approx(0.003, rel=0.02)


def test_recalibration_period_wraps_the_age() -> None:
    assert effective_age_s(330.0, 100.0) == 30.0
    assert effective_age_s(300.0, 100.0) == 0.0
    assert effective_age_s(330.0, None) == 330.0
    w = codes()
    for device in ({"ring": {"random_walk_k_per_rts": 0.02, "per_ring_spread": 0.2}}, {"pcm": {}}):
        wrapped = realise(w, DriftConfig.model_validate({"time_s": 330.0, "recalibration_period_s": 100.0, **device}))
        fresh = realise(w, DriftConfig.model_validate({"time_s": 30.0, **device}))
        late = realise(w, DriftConfig.model_validate({"time_s": 330.0, **device}))
        assert torch.equal(wrapped, fresh)
        assert not torch.equal(wrapped, late)


def test_pcm_drift_law_hand_value() -> None:
    g = torch.tensor([1.0, 0.5], dtype=torch.float64)
    drifted = pcm_drift(g, torch.tensor([0.05, 0.1], dtype=torch.float64), 200.0, 20.0)
    assert drifted.tolist() == pytest.approx([10 ** -0.05, 0.5 * 10 ** -0.1], rel=1e-15)


def test_drift_exponent_follows_aihwkit_fit() -> None:
    mean, std = drift_exponent_moments(torch.tensor([1.0, 0.1, 0.0], dtype=torch.float64))
    assert mean.tolist() == pytest.approx([0.049, -0.0155 * math.log(0.1) + 0.0244, 0.1], rel=1e-12)
    assert std.tolist() == pytest.approx([0.008, -0.0125 * math.log(0.1) - 0.0059, 0.045], rel=1e-12)


@pytest.mark.parametrize("age_s", [100.0, 86400.0, 3.15e7])
def test_pcm_mean_conductance_follows_the_power_law(age_s: float) -> None:
    """At Gmax nu ~ N(0.049, 0.008^2): E[(t/t0)^-nu] = exp(-0.049 L + 0.008^2 L^2 / 2), L = ln(t/t0)."""
    w = torch.full((300, 400), W_MAX, dtype=torch.float64)
    cfg = full_scale_pcm(time_s=age_s, programming_noise_scale=0.0, read_noise_scale=0.0,
                         global_drift_compensation=False)
    log_ratio = math.log((age_s + 20.0) / 20.0)
    expected = math.exp(-0.049 * log_ratio + 0.008 ** 2 * log_ratio ** 2 / 2)
    assert (realise(w, cfg) / W_MAX).mean().item() == pytest.approx(expected, rel=1e-3)


def test_pcm_programming_noise_matches_the_clamped_normal_closed_forms() -> None:
    """At Gmax: G+ ~ N(1, s1^2), G- = max(0, s0 e); at zero both are max(0, s0 e): var s0^2 (1 - 1/pi)."""
    s0, s1 = 0.26348 / 25, (0.26348 + 1.9650 - 1.1731) / 25
    cfg = full_scale_pcm(read_noise_scale=0.0, global_drift_compensation=False)
    full = realise(torch.full((400, 500), W_MAX, dtype=torch.float64), cfg) / W_MAX
    assert full.mean().item() == pytest.approx(1 - s0 / math.sqrt(2 * math.pi), abs=3e-4)
    assert full.var().item() == pytest.approx(s1 ** 2 + s0 ** 2 * (0.5 - 0.5 / math.pi), rel=0.02)
    zero = realise(torch.zeros((400, 500), dtype=torch.float64), cfg) / W_MAX
    assert zero.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert zero.var().item() == pytest.approx(s0 ** 2 * (1 - 1 / math.pi), rel=0.02)


@pytest.mark.parametrize("age_s", [0.0, 3600.0])
def test_pcm_read_noise_matches_the_accumulated_one_over_f_law(age_s: float) -> None:
    """At Gmax the read noise is 0.0088 sqrt(ln((t + t_read) / (2 t_read))) of the conductance, t = age + t0."""
    cfg = full_scale_pcm(time_s=age_s, programming_noise_scale=0.0, drift_scale=0.0, global_drift_compensation=False)
    read = realise(torch.full((300, 400), W_MAX, dtype=torch.float64), cfg) / W_MAX
    t = age_s + 20.0
    assert read.mean().item() == pytest.approx(1.0, abs=5e-4)
    assert read.std().item() == pytest.approx(0.0088 * math.sqrt(math.log((t + 250e-9) / 500e-9)), rel=0.02)


def test_global_drift_compensation_restores_the_mean_magnitude() -> None:
    w = codes((200, 300))
    settings = {"time_s": 1e6, "pcm": {"programming_noise_scale": 0.0, "read_noise_scale": 0.0}}
    compensated = realise(w, DriftConfig.model_validate(settings))
    settings["pcm"]["global_drift_compensation"] = False
    drifted = realise(w, DriftConfig.model_validate(settings))
    assert compensated.abs().mean().item() == pytest.approx(w.abs().mean().item(), rel=1e-12)
    assert drifted.abs().mean().item() < 0.6 * w.abs().mean().item()  # nu ~ 0.05-0.1 over ln(5e4) ~ 10.8
    assert (compensated - w).pow(2).mean() < 0.1 * (drifted - w).pow(2).mean()


def test_global_drift_compensation_references_the_programmed_weights() -> None:
    """aihwkit reads its reference right after programming: at age 0 without read noise the factor is 1."""
    w = codes()
    pcm = {"read_noise_scale": 0.0}
    compensated = realise(w, DriftConfig.model_validate({"pcm": pcm}))
    programmed = realise(w, DriftConfig.model_validate({"pcm": {**pcm, "global_drift_compensation": False}}))
    assert not torch.equal(programmed, w)
    assert torch.equal(compensated, programmed)


@pytest.mark.parametrize("settings", [
    {"time_s": 500.0, "lock_residual_k": 0.01, "ring": {"random_walk_k_per_rts": 0.01, "per_ring_spread": 0.2}},
    {"time_s": 500.0, "pcm": {}},
])
def test_one_generator_state_is_one_chip(settings: dict) -> None:
    w, cfg = codes(), DriftConfig.model_validate(settings)
    assert torch.equal(realise(w, cfg, seed=7), realise(w, cfg, seed=7))
    assert not torch.equal(realise(w, cfg, seed=7), realise(w, cfg, seed=8))


def test_a_chip_keeps_its_draws_along_the_time_axis() -> None:
    """Drift only: a PCM device's weight decays monotonically with age (the same nu at every time)."""
    w = torch.full((50, 60), W_MAX, dtype=torch.float64)
    ages = [full_scale_pcm(time_s=t, programming_noise_scale=0.0, read_noise_scale=0.0,
                           global_drift_compensation=False) for t in (10.0, 1e3, 1e5)]
    earlier, middle, later = (realise(w, cfg, seed=4) for cfg in ages)
    assert (middle < earlier).all() and (later < middle).all()


def test_config_refuses_what_no_chip_has() -> None:
    with pytest.raises(ValidationError, match="not ring and pcm"):
        DriftConfig.model_validate({"ring": {}, "pcm": {}})
    with pytest.raises(ValidationError, match="lock_residual_k"):
        DriftConfig(lock_residual_k=0.01, pcm=PcmDrift())
    with pytest.raises(PhotosimError, match="ring.fwhm_nm"):
        load_config(DriftConfig, {"ring": {"fwhm_nm": 0.0}})
    with pytest.raises(PhotosimError, match="time_s"):
        load_config(DriftConfig, {"time_s": True})
