"""The per-chip weight models (hw.mesh, hw.drift) in the engine: off or error-free they give the ideal codes bit for
bit; on, each chip draws its own realisation from its own stream, the same in every run and at every time."""

from __future__ import annotations

import pytest
import torch
from conftest import analog_layer

from photosim.engine import kernels
from photosim.engine.analog import WEIGHT_REALISATIONS
from photosim.errors import PhotosimError
from photosim.hardware import rng
from photosim.hardware.config import WEIGHT_MODELS, HardwareConfig
from photosim.hardware.drift import realised_weights, ring_weight_change

X_MAX, W_MAX, TILE = 255, 128, 8
W = torch.randint(-W_MAX, W_MAX, (6, 20), generator=torch.Generator().manual_seed(3))
X = torch.randint(0, X_MAX + 1, (5, 20), generator=torch.Generator().manual_seed(4))


def _layer(hw: dict, repeat: int = 0, index: int = 3):
    weights = kernels.prepare_weights(W, 1, kernels.MatmulPlan("float64", chunk=20))
    return analog_layer({"tile": TILE, **hw}, weights, None, x_max=X_MAX, w_max=W_MAX, repeat=repeat, index=index)


def _codes(hw: dict) -> torch.Tensor:
    return _layer(hw).linear_acc(X, torch.arange(len(X)))


def test_the_engine_knows_every_weight_model() -> None:
    assert set(WEIGHT_REALISATIONS) == set(WEIGHT_MODELS)


@pytest.mark.parametrize("hw", [{"mesh": {}}, {"drift": {"time_s": 3600, "ring": {}}},
                                {"drift": {"time_s": 0, "pcm": {"programming_noise_scale": 0, "read_noise_scale": 0}}}])
def test_error_free_models_give_the_ideal_codes(hw: dict) -> None:
    """An ideal mesh reconstructs the weights to round-off (and the readout rounds them away); rings that have not
    moved and PCM read at programming time without noise realise the codes exactly."""
    assert torch.equal(_codes(hw), (X @ W.T))


def test_a_warmer_chip_moves_every_ring_weight_by_the_lorentzian_law() -> None:
    """A uniform temperature offset shifts every resonance alike: the engine's chip weights are the codes moved by
    ring_weight_change at dlambda = shift_nm_per_k * dT, with no random draw involved."""
    hw = {"drift": {"time_s": 10.0, "ring": {"temperature_offset_k": 0.2, "shift_nm_per_k": 0.075, "fwhm_nm": 0.2}}}
    chip = _layer(hw).chip_matrix[0].T  # (O, K)
    w = W.double()
    expected = w + W_MAX * ring_weight_change(w / W_MAX, torch.full_like(w, 0.2 * 0.075), 0.2)
    assert torch.allclose(chip, expected, rtol=0, atol=1e-9)
    assert (chip - w).abs().max() > 5  # 0.2 K already moves weights by many codes


def test_each_chip_and_layer_draws_its_own_errors_the_same_every_time() -> None:
    hw = {"mesh": {"phase_error_rad": 0.02}}
    first = _layer(hw).chip_matrix
    assert torch.equal(first, _layer(hw).chip_matrix)  # the same chip in every run
    assert not torch.equal(first, _layer(hw, repeat=1).chip_matrix)  # another chip
    assert not torch.equal(first, _layer(hw, index=4).chip_matrix)  # another layer
    error = (first[0].T - W.double()).pow(2).mean().sqrt() / W_MAX
    assert 0.002 < error < 0.1  # 0.02 rad on 8-port meshes: about 1-3% of Wmax


def test_every_time_of_a_sweep_sees_the_same_chip() -> None:
    """The engine draws a chip's drift from the stream (seed, repeat, drift, layer), whatever the time: its weights
    at each time are the hook's with that one generator (the path itself: tests/test_drift.py)."""
    for time_s in (100.0, 400.0):
        hw = {"drift": {"time_s": time_s, "ring": {"random_walk_k_per_rts": 0.01}}}
        cfg = HardwareConfig.model_validate(hw).drift
        expected = realised_weights(W.double(), W_MAX, TILE, cfg, rng.chip_generator(0, 0, "drift", 3))
        assert torch.equal(_layer(hw).chip_matrix[0].T, expected)


def test_a_mesh_needs_a_coherent_core() -> None:
    with pytest.raises(ValueError, match="coherent"):
        HardwareConfig.model_validate({"mesh": {}, "photonics": {"architecture": "incoherent"}})
    assert "mesh" not in HardwareConfig().model_dump() and "drift" not in HardwareConfig().model_dump()


def test_meshes_larger_than_the_largest_are_refused_by_name() -> None:
    weights = kernels.prepare_weights(torch.ones(2, 300, dtype=torch.int64), 1, kernels.MatmulPlan("float64", 300))
    layer = analog_layer({"mesh": {}}, weights, None, x_max=X_MAX, w_max=W_MAX)
    with pytest.raises(PhotosimError, match="hw.tile"):
        _ = layer.chip_matrix
