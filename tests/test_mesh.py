"""The Clements MZI mesh and the SVD core against independent references: products of coupler and phase-shifter
matrices (numpy), random unitaries (scipy), hand counts of Clements' rectangle, first-order error laws, and the
closed-form extinction of an MZI with imperfect couplers."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy.stats import unitary_group

from photosim.errors import PhotosimError
from photosim.hardware.mesh import (
    DRAWS_PER_MZI,
    MAX_MESH_PORTS,
    MeshConfig,
    MeshPhases,
    MziDeviations,
    attenuators,
    clements_decompose,
    clements_layout,
    draws_per_block,
    mesh_matrix,
    mesh_transmission,
    mzi,
    program_weights,
    realise,
    realised_core,
    realised_weights,
    svd_core,
)


def unitaries(ports: int, count: int, seed: int) -> torch.Tensor:
    """(count, N, N) Haar-random unitaries from scipy (a random phase for one port)."""
    if ports == 1:
        return torch.polar(torch.ones(count, 1, 1, dtype=torch.float64), torch.linspace(-3, 3, count)[:, None, None]
                           .double())
    return torch.from_numpy(unitary_group.rvs(ports, size=count, random_state=seed)).reshape(count, ports, ports)


def coupler_np(alpha: float) -> np.ndarray:
    """A directional coupler of splitting angle pi/4 + alpha, written out by hand."""
    c, s = math.cos(math.pi / 4 + alpha), math.sin(math.pi / 4 + alpha)
    return np.array([[c, 1j * s], [1j * s, c]])


def codes(shape: tuple[int, int], w_max: int, seed: int) -> torch.Tensor:
    """Random integer weight codes in [-w_max, w_max], float64."""
    return torch.randint(-w_max, w_max + 1, shape, generator=torch.Generator().manual_seed(seed)).double()


def test_mzi_is_two_couplers_and_two_phase_shifters() -> None:
    rng = np.random.default_rng(0)
    theta, phi, a_in, a_out = rng.uniform(-4, 4, 4)
    reference = (coupler_np(a_out) @ np.diag([np.exp(1j * theta), 1]) @ coupler_np(a_in)
                 @ np.diag([np.exp(1j * phi), 1]))
    t = mzi(*(torch.tensor(v) for v in (theta, phi, a_in, a_out)))
    np.testing.assert_allclose(t.numpy(), reference, rtol=0, atol=1e-15)
    s, c = math.sin(theta / 2), math.cos(theta / 2)  # the ideal closed form of the docstring
    ideal = 1j * np.exp(1j * theta / 2) * np.array([[np.exp(1j * phi) * s, c], [np.exp(1j * phi) * c, -s]])
    np.testing.assert_allclose(mzi(torch.tensor(theta), torch.tensor(phi)).numpy(), ideal, rtol=0, atol=1e-15)


@pytest.mark.parametrize("ports", range(1, 17))
def test_clements_reconstructs_random_unitaries_exactly(ports: int) -> None:
    u = unitaries(ports, 4, seed=ports)
    phases = clements_decompose(u)
    assert phases.theta.shape == phases.phi.shape == (4, ports * (ports - 1) // 2)
    assert phases.output.shape == (4, ports)
    assert bool(((phases.theta >= 0) & (phases.theta <= math.pi)).all())
    assert (mesh_matrix(phases) - u).abs().max().item() < 1e-10  # measured: below 3e-15 for N <= 16


def test_clements_layout_is_the_rectangle() -> None:
    """N(N-1)/2 MZIs in N columns, alternately on mode pairs (0,1),(2,3),... and (1,2),(3,4),... (Clements Fig. 1)."""
    assert (clements_layout(1).depth, clements_layout(2).depth) == (0, 1)  # one port: no MZI; two: one MZI
    for ports in range(3, 17):
        layout = clements_layout(ports)
        assert len(layout.modes) == ports * (ports - 1) // 2
        assert layout.depth == ports
        for c, column in enumerate(layout.columns):
            assert [layout.modes[i] for i in column] == list(range(c % 2, ports - 1, 2))


def squared_error(ports: int, cfg: MeshConfig, draws: int = 2000) -> float:
    """Mean over random unitaries of ||mesh with errors - mesh||_F^2, errors drawn as the core draws them."""
    u, phases = decomposed(ports, draws)
    count = ports * (ports - 1) // 2
    g = torch.Generator().manual_seed(ports)
    dev = MziDeviations.drawn(cfg, torch.randn(draws, count, DRAWS_PER_MZI, generator=g, dtype=torch.float64))
    output = torch.randn(draws, ports, generator=g, dtype=torch.float64) * cfg.phase_error_rad
    return float((mesh_matrix(phases, dev, output) - u).abs().pow(2).sum((1, 2)).mean())


@functools.cache
def decomposed(ports: int, draws: int) -> tuple[torch.Tensor, MeshPhases]:
    """Random unitaries and their Clements phases for squared_error (drawn and decomposed once per size)."""
    u = unitaries(ports, draws, seed=100 + ports)
    return u, clements_decompose(u)


@pytest.mark.parametrize("ports", [2, 6])
def test_errors_grow_with_the_device_count_to_first_order(ports: int) -> None:
    """Each error enters between unitaries, so E||dU||^2 = sum over devices of ||dM/dx||^2 sigma^2: 1 per phase
    shifter (N^2 of them: two per MZI, one per output), 2 per coupler (2 per MZI), 2 (ln 10 / 20)^2 per MZI's dB."""
    mzis = ports * (ports - 1) // 2
    sigma = 1e-4
    assert squared_error(ports, MeshConfig(phase_error_rad=sigma)) / sigma ** 2 == pytest.approx(ports ** 2, rel=0.1)
    assert squared_error(ports, MeshConfig(splitter_error_rad=sigma)) / sigma ** 2 == pytest.approx(4 * mzis,
                                                                                                    rel=0.1)
    assert squared_error(ports, MeshConfig(mzi_loss_error_db=sigma)) / sigma ** 2 == pytest.approx(
        2 * mzis * (math.log(10) / 20) ** 2, rel=0.1)


def test_an_attenuator_with_imperfect_couplers_cannot_block() -> None:
    """Set to 0, an MZI leaks |t| = |sin(a_in + a_out)| of the field (its couplers do not cancel)."""
    normals = torch.randn(3, 4, DRAWS_PER_MZI, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cfg = MeshConfig(splitter_error_rad=0.05, ideal_attenuators=False)
    leak = attenuators(torch.zeros(3, 4, dtype=torch.float64), cfg, normals).abs()
    expected = torch.sin(0.05 * (normals[..., 2] + normals[..., 3])).abs()
    torch.testing.assert_close(leak, expected, rtol=0, atol=1e-15)
    assert attenuators(torch.zeros(3, 4, dtype=torch.float64), MeshConfig(), normals).abs().max() == 0


@pytest.mark.parametrize(("shape", "tile", "w_max"), [((37, 50), 16, 127), ((5, 3), 8, 7), ((16, 16), 16, 2047),
                                                      ((3, 40), 1, 127)])
@pytest.mark.parametrize("cfg", [MeshConfig(), MeshConfig(mzi_loss_db=0.5, ideal_attenuators=False)])
def test_without_errors_the_chip_realises_the_codes(shape: tuple[int, int], tile: int, w_max: int,
                                                    cfg: MeshConfig) -> None:
    w = codes(shape, w_max, seed=tile)
    realised = realised_weights(w, w_max, tile, cfg, torch.Generator().manual_seed(0))
    assert realised.shape == w.shape and realised.dtype == torch.float64
    assert (realised - w).abs().max().item() < 1e-9  # measured: 2e-12 at w_max 127, 2e-10 at 32767


def test_the_realised_matrix_carries_the_loss_of_its_depth() -> None:
    """Uniform loss: power 10^(-depth * loss / 10) with depth = 2 N + 1 columns (two meshes, the attenuators)."""
    cfg = MeshConfig(mzi_loss_db=0.2)
    assert mesh_transmission(cfg, 16) == pytest.approx(10 ** (-(2 * 16 + 1) * 0.2 / 10), rel=1e-12)
    assert mesh_transmission(cfg, 2) == pytest.approx(10 ** (-3 * 0.2 / 10), rel=1e-12)  # one MZI per mesh
    u = unitaries(8, 2, seed=8)
    lossy = mesh_matrix(clements_decompose(u), mzi_loss_db=0.2)
    gram = lossy.mH @ lossy
    torch.testing.assert_close(gram, 10 ** (-8 * 0.2 / 10) * torch.eye(8, dtype=torch.complex128).expand(2, 8, 8))
    blocks = codes((3 * 16, 16), 127, seed=1).reshape(3, 16, 16)
    realised = realised_core(svd_core(blocks), cfg, torch.zeros(3, draws_per_block(16), dtype=torch.float64))
    torch.testing.assert_close(realised.real, blocks * math.sqrt(mesh_transmission(cfg, 16)), rtol=0, atol=1e-10)


def test_a_chip_is_its_generator_state() -> None:
    w = codes((20, 30), 127, seed=5)
    cfg = MeshConfig(phase_error_rad=0.01, splitter_error_rad=0.01, mzi_loss_error_db=0.05, ideal_attenuators=False)
    first, again, other = (realised_weights(w, 127, 8, cfg, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 0.1 and (first - w).abs().max() > 0.1


def test_each_block_is_its_own_core() -> None:
    """Changing the codes of one block changes only that block's realisation (same chip)."""
    w = codes((32, 40), 127, seed=6)
    cfg = MeshConfig(phase_error_rad=0.01)
    changed = w.clone()
    changed[:16, 16:32] = codes((16, 16), 127, seed=7)
    a, b = (realised_weights(x, 127, 16, cfg, torch.Generator().manual_seed(3)) for x in (w, changed))
    outside = torch.ones_like(w, dtype=torch.bool)
    outside[:16, 16:32] = False
    assert torch.equal(a[outside], b[outside])
    assert (a[:16, 16:32] - b[:16, 16:32]).abs().min() > 0


def test_small_errors_act_linearly_on_the_weights() -> None:
    """First order: the same chip with twice the phase error has twice the weight error."""
    w = codes((24, 24), 127, seed=8)
    program = program_weights(w, 127, 8)
    rms = [float((realise(program, MeshConfig(phase_error_rad=s), torch.Generator().manual_seed(4)) - w)
                 .pow(2).mean().sqrt()) for s in (1e-5, 2e-5)]
    assert rms[1] / rms[0] == pytest.approx(2.0, rel=1e-3)
    assert 1e-4 < rms[0] < 1e-1  # a 1e-5 rad error moves codes of 127 by about 1e-3


def test_unbuildable_requests_are_refused() -> None:
    g = torch.Generator()
    with pytest.raises(PhotosimError, match="hw.tile"):
        realised_weights(torch.zeros(2, 2), 7, MAX_MESH_PORTS + 1, MeshConfig(), g)
    with pytest.raises(PhotosimError, match="w_max"):
        realised_weights(torch.tensor([[9.0]]), 7, 4, MeshConfig(), g)
    for bad in ({"phase_error_rad": -0.1}, {"splitter_error_rad": 1.0}, {"mzi_loss_db": True}, {"loss": 1}):
        with pytest.raises(ValidationError):
            MeshConfig(**bad)
