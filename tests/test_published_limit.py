"""A published result reproduced: the shot-noise limit of an optical dot product, SNR = epsilon * N for epsilon
detected photons per multiplication and N products on one detector (Wang et al., Nat. Commun. 13, 123 (2022),
Fig. 1c), against the SNR photosim's engine measures on a shot-noise-limited core (experiments/published_limit.py,
docs/photonics.md "The standard quantum limit").

Tolerance 5% on the SNR: each point averages 64 x 256 = 16,384 independent readouts, so the measured error power
has a relative standard deviation of sqrt(2 / 16384) = 1.1%; the weight code 127 of Wmax = 128 sends 1/256 of each
channel's light to the other photodiode, shot noise without signal, lowering the SNR by 127/128 (0.8%). 5% is
about four standard deviations beyond that bias, and a shot-noise variance off by 20% either way leaves it."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from photosim.hardware import photonics

TOLERANCE = 0.05


def _experiment() -> ModuleType:
    """experiments/published_limit.py as a module (the experiments folder is scripts, not a package)."""
    path = Path(__file__).resolve().parent.parent / "experiments" / "published_limit.py"
    spec = importlib.util.spec_from_file_location("published_limit", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXPERIMENT = _experiment()


def _ratio(length: int, photons: float, seed: int = 0) -> float:
    """photosim's measured SNR over the published epsilon * N."""
    return EXPERIMENT.measured_snr(length, photons, seed=seed) / EXPERIMENT.published_snr(length, photons)


def test_photons_per_multiplication_set_the_laser_power_by_hand() -> None:
    """One photon per multiplication of full-scale products (x = 255, w = 127 of 128) at 1550 nm in a 1 ns symbol:
    P = 1.281578e-19 J / 1 ns / (127 / 128) = 1.29167e-10 W per channel."""
    assert EXPERIMENT.photon_energy_j() == pytest.approx(1.281578e-19, rel=1e-6)
    full = EXPERIMENT.dot_product_input(4).fill_(255)
    assert EXPERIMENT.laser_power_mw(1.0, full) == pytest.approx(1.281578e-19 / 1e-9 * 128 / 127 / 1e-3, rel=1e-6)


@pytest.mark.parametrize("length, photons", [(16, 0.1), (16, 1000.0), (64, 1.0), (256, 0.64), (256, 3.2)])
def test_the_engine_reaches_the_published_shot_noise_limit(length: int, photons: float) -> None:
    """0.64 and 3.2 photons per multiplication are Wang et al.'s 90% and 99% MNIST points (arXiv:2104.13467,
    abstract)."""
    assert abs(_ratio(length, photons, seed=length) - 1.0) < TOLERANCE


@pytest.mark.parametrize("factor", [0.8, 1.25, 2.0])
def test_a_shot_noise_law_off_by_a_factor_fails_the_check(monkeypatch, factor: float) -> None:
    """The check has teeth: scaling the shot-noise variance 2 q I B by ``factor`` moves the SNR out of tolerance."""
    law = photonics.shot_variance
    monkeypatch.setattr(photonics, "shot_variance", lambda current, dark, bandwidth: factor * law(current, dark,
                                                                                                  bandwidth))
    assert abs(_ratio(64, 1.0) - 1.0) > TOLERANCE
