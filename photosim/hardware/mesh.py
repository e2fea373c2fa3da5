"""A coherent core as it is built: each weight block programmed into two Clements MZI meshes and a column of
attenuators (SVD), with phase, splitter and loss errors applied to the devices and the matrix they realise.

Sources: Reck et al., PRL 73, 58 (1994) (any unitary as a mesh of 2x2 couplers); Clements et al., Optica 3, 1460
(2016) (the rectangular mesh of N(N-1)/2 MZIs in N columns and its nulling algorithm); Shen et al., Nat. Photonics
11, 441 (2017) (W = U S V^T as two meshes and attenuators); Bandyopadhyay et al., Optica 8, 1247 (2021) (splitter
angle errors pi/4 + alpha). Formulas, the error model and how the engine uses the hook: docs/mesh.md.

Conventions: an MZI on modes (m, m+1) is ``B(a_out) diag(e^{i theta}, 1) B(a_in) diag(e^{i phi}, 1)``, B(a) the
coupler ``[[cos(pi/4 + a), i sin(pi/4 + a)], [i sin(pi/4 + a), cos(pi/4 + a)]]``; MZIs are listed in the order
light crosses them; every tensor is float64 / complex128 with a leading batch dimension (one mesh per block).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from pydantic import Field

from photosim._config import StrictModel
from photosim.errors import PhotosimError
from photosim.hardware.units import db_loss

MAX_MESH_PORTS = 256  # 32640 MZIs per mesh, 513 columns per core: 51 dB at an MZI loss of 0.1 dB
SQRT_HALF = math.sqrt(0.5)  # cos and sin of pi/4: an ideal 50:50 coupler
DRAWS_PER_MZI = 5  # standard normals per MZI: theta, phi, input splitter, output splitter, loss


class MeshConfig(StrictModel):
    """Static (per-chip) errors and losses of the MZI meshes of a coherent core; every default is ideal.

    Errors act on the devices (phases, couplers, losses); the engine sees their effect on the realised weights."""

    phase_error_rad: float = Field(
        0.0, ge=0, le=math.pi, strict=True,
        description="rms error of every phase shifter (each MZI's theta and phi, each output phase, each "
                    "attenuator), rad, drawn independently per shifter once per chip: one number for every static "
                    "cause (fabrication, calibration, DAC step, thermal crosstalk). 0 to pi: an error of rms pi is "
                    "already nearly uniform around the circle, larger values add nothing.")
    splitter_error_rad: float = Field(
        0.0, ge=0, le=math.pi / 4, strict=True,
        description="rms error alpha of each nominally 50:50 coupler's splitting angle pi/4 + alpha, rad, per chip "
                    "(Bandyopadhyay et al., Optica 8, 1247, 2021): it couples sin^2(pi/4 + alpha) = (1 + sin 2 alpha)"
                    " / 2 of the power across, so alpha is to first order the deviation of the power splitting "
                    "ratio from 1/2 (0.01: a 51:49 coupler). At most pi/4, where a coupler crosses all its light.")
    mzi_loss_db: float = Field(
        0.0, ge=0, le=3, strict=True,
        description="Insertion loss of one MZI, dB, at most 3 (an MZI losing half its light is broken). Every "
                    "path crosses every column (idle waveguides beside a column's MZIs are taken to carry "
                    "loss-matched dummies), so the loss is uniform: it scales the signal (a power penalty for the "
                    "link budget, mesh_transmission) and is no weight error.")
    mzi_loss_error_db: float = Field(
        0.0, ge=0, le=3, strict=True,
        description="rms deviation of each MZI's insertion loss from mzi_loss_db, dB, per chip, at most 3: uneven "
                    "losses make the mesh non-unitary, a weight error.")
    ideal_attenuators: bool = Field(
        True, strict=True,
        description="true: the SVD's diagonal S is set exactly; false: each attenuator is an MZI (one input, one "
                    "output port kept) with the phase, splitter and loss errors above.")


@dataclass(frozen=True)
class MeshLayout:
    """Where the MZIs of an N-port Clements mesh sit: top mode of each MZI (light order) and the columns."""

    ports: int
    modes: tuple[int, ...]  # MZI k couples modes (modes[k], modes[k] + 1)
    columns: tuple[tuple[int, ...], ...]  # MZI indices per column (columns in light order, MZIs by mode)

    @property
    def depth(self) -> int:
        """Columns of MZIs one path crosses: N for N >= 3 (Clements), 1 for two ports, 0 for one."""
        return len(self.columns)


@dataclass(frozen=True)
class MeshPhases:
    """Programmed phases of a batch of meshes: MZI phases in light order, then the output phase screen."""

    theta: torch.Tensor  # (B, M) internal phase of each MZI, rad, in [0, pi]
    phi: torch.Tensor  # (B, M) external (input) phase of each MZI, rad
    output: torch.Tensor  # (B, N) phase on each output port, rad


@dataclass(frozen=True)
class MziDeviations:
    """Per-chip deviations of a batch of MZIs from their programmed values (rad, rad, rad, rad, dB)."""

    theta: torch.Tensor  # (B, M) each
    phi: torch.Tensor
    split_in: torch.Tensor
    split_out: torch.Tensor
    loss_db: torch.Tensor

    @classmethod
    def drawn(cls, cfg: MeshConfig, normals: torch.Tensor) -> MziDeviations:
        """Scale standard normals (B, M, DRAWS_PER_MZI) by the config's rms errors."""
        sigmas = (cfg.phase_error_rad, cfg.phase_error_rad, cfg.splitter_error_rad, cfg.splitter_error_rad,
                  cfg.mzi_loss_error_db)
        return cls(*(normals[..., i] * s for i, s in enumerate(sigmas)))


def mzi(theta: torch.Tensor, phi: torch.Tensor, split_in: torch.Tensor | None = None,
        split_out: torch.Tensor | None = None) -> torch.Tensor:
    """(..., 2, 2) MZI B(split_out) diag(e^{i theta}, 1) B(split_in) diag(e^{i phi}, 1), multiplied out (ideal
    couplers if None); ideal, it is ``i e^{i theta/2} [[e^{i phi} sin(theta/2), cos(theta/2)], [e^{i phi}
    cos(theta/2), -sin(theta/2)]]``: theta sets the splitting, phi the relative phase of the inputs."""
    c1, s1 = _coupler(split_in)
    c2, s2 = _coupler(split_out)
    inner, outer = torch.polar(torch.ones_like(theta), theta), torch.polar(torch.ones_like(phi), phi)
    return torch.stack([torch.stack([outer * (inner * (c1 * c2) - s1 * s2), 1j * (inner * (s1 * c2) + c1 * s2)], -1),
                        torch.stack([1j * outer * (inner * (c1 * s2) + s1 * c2), c1 * c2 - inner * (s1 * s2)], -1)],
                       -2)


def _coupler(alpha: torch.Tensor | None) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """cos and sin of a coupler's splitting angle pi/4 + alpha; plain numbers for an ideal 50:50 coupler (None)."""
    if alpha is None:
        return SQRT_HALF, SQRT_HALF
    return torch.cos(math.pi / 4 + alpha), torch.sin(math.pi / 4 + alpha)


def _mixed(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two lines (..., N) that 2x2 transfer matrices t (..., 2, 2) make of the lines a and b."""
    return t[..., 0, 0, None] * a + t[..., 0, 1, None] * b, t[..., 1, 0, None] * a + t[..., 1, 1, None] * b


def _nulling_steps(ports: int) -> Iterator[tuple[bool, int, int]]:
    """Clements' order of nulling the lower triangle: (from the right?, row, column) of each element zeroed.

    Anti-diagonal k (from the bottom left) is nulled from the right for even k (an MZI on columns c, c+1), from
    the left for odd k (an MZI on rows r-1, r) (Clements et al. 2016, their Fig. 3 and algorithm)."""
    for k, start in enumerate(range(ports - 2, -1, -1)):
        order = reversed(range(ports - 1 - start)) if k % 2 == 0 else range(ports - 1 - start)
        for j in order:
            yield k % 2 == 0, start + j + 1, j


@functools.cache
def clements_layout(ports: int) -> MeshLayout:
    """The MZIs of an N-port Clements mesh in light order (right nullings, then left ones reversed), in columns:
    each MZI in the earliest column after the last MZI on either of its modes."""
    right = [col for from_right, _, col in _nulling_steps(ports) if from_right]
    left = [row - 1 for from_right, row, _ in _nulling_steps(ports) if not from_right]
    modes = tuple(right + left[::-1])
    busy_until = [0] * ports  # per mode: the first column free of MZIs on it
    columns: list[list[int]] = []
    for index, m in enumerate(modes):
        column = max(busy_until[m], busy_until[m + 1])
        columns.extend([] for _ in range(column + 1 - len(columns)))
        columns[column].append(index)
        busy_until[m] = busy_until[m + 1] = column + 1
    return MeshLayout(ports, modes, tuple(tuple(sorted(c, key=modes.__getitem__)) for c in columns))


def clements_decompose(unitary: torch.Tensor) -> MeshPhases:
    """Phases of the Clements meshes that realise a batch of unitaries (B, N, N): N(N-1)/2 MZIs and N output phases.

    Nulls the lower triangle with MZIs from the right (U M^-1) and the left (M U), leaving a diagonal D; each
    left MZI is then moved through D (``M^-1 D = D' M'``, same theta) so all MZIs precede the output phases."""
    u = unitary.to(torch.complex128).clone()
    right: list[tuple[torch.Tensor, torch.Tensor]] = []
    left: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for from_right, row, col in _nulling_steps(u.shape[-1]):
        if from_right:  # zero u[row, col] with an MZI on columns (col, col+1): u <- u M^-1
            v0, v1 = u[:, row, col], u[:, row, col + 1]
            theta = 2 * torch.atan2(v1.abs(), v0.abs())
            phi = math.pi + v0.angle() - v1.angle()
            u[:, :, col], u[:, :, col + 1] = _mixed(u[:, :, col], u[:, :, col + 1], mzi(theta, phi).conj())
            right.append((theta, phi))
        else:  # zero u[row, col] with an MZI on rows (row-1, row): u <- M u
            x, y = u[:, row - 1, col], u[:, row, col]
            theta = 2 * torch.atan2(x.abs(), y.abs())
            phi = y.angle() - x.angle()
            u[:, row - 1], u[:, row] = _mixed(u[:, row - 1], u[:, row], mzi(theta, phi))
            left.append((row - 1, theta, phi))
    d = torch.diagonal(u, dim1=-2, dim2=-1).clone()  # (B, N), |d| = 1
    moved = []
    for m, theta, phi in reversed(left):  # M(theta, phi)^-1 diag(d0, d1) = diag(d0', d1') M(theta, phi')
        d0, d1 = d[:, m], d[:, m + 1]
        moved.append((theta, (d0 * d1.conj()).angle()))
        one = torch.ones_like(theta)
        d[:, m], d[:, m + 1] = -d1 * torch.polar(one, -theta - phi), -d1 * torch.polar(one, -theta)
    phases = right + moved
    empty = torch.zeros(u.shape[0], 0, dtype=torch.float64)
    theta = torch.stack([t for t, _ in phases], 1) if phases else empty
    phi = torch.stack([p for _, p in phases], 1) if phases else empty
    return MeshPhases(theta, phi, d.angle())


def mesh_matrix(phases: MeshPhases, deviations: MziDeviations | None = None,
                output_error_rad: torch.Tensor | None = None, mzi_loss_db: float = 0.0,
                light: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N, N) matrix of a batch of Clements meshes with the given phases, device deviations and loss, times
    ``light`` (B, N, N) when given (the mesh applied to it, one column at a time).

    Every column attenuates every path by ``mzi_loss_db`` (idle waveguides carry matched dummies), so the ideal
    mesh is ``10^(-depth * mzi_loss_db / 20)`` times a unitary; ``deviations.loss_db`` adds to single MZIs."""
    batch, ports = phases.output.shape
    layout = clements_layout(ports)
    if deviations is None:
        t = mzi(phases.theta, phases.phi)  # (B, M, 2, 2)
    else:
        t = mzi(phases.theta + deviations.theta, phases.phi + deviations.phi, deviations.split_in,
                deviations.split_out) * (10.0 ** (-deviations.loss_db / 20.0))[..., None, None]
    x = torch.eye(ports, dtype=torch.complex128).repeat(batch, 1, 1) if light is None else light.clone()
    x *= 10.0 ** (-layout.depth * mzi_loss_db / 20)
    for column in layout.columns:  # a column's MZIs sit on modes (m, m+1), m = first, first + 2, ...
        first = layout.modes[column[0]]
        top, bottom = slice(first, first + 2 * len(column), 2), slice(first + 1, first + 2 * len(column), 2)
        x[:, top], x[:, bottom] = _mixed(x[:, top], x[:, bottom], t[:, list(column)])  # rows (B, C, N)
    out = phases.output if output_error_rad is None else phases.output + output_error_rad
    return torch.polar(torch.ones_like(out), out)[..., None] * x


def svd_depth(ports: int) -> int:
    """MZI columns the light of an SVD core crosses: the input mesh, the attenuators, the output mesh."""
    return 2 * clements_layout(ports).depth + 1


def mesh_transmission(cfg: MeshConfig, ports: int) -> float:
    """Power transmission of an N-port SVD core without errors: 10^(-svd_depth * mzi_loss_db / 10).

    It is uniform, so it scales the signal and is no weight error: the link budget adds ``svd_depth *
    mzi_loss_db`` dB to the path loss, and ``realised_weights`` divides it out."""
    return db_loss(svd_depth(ports) * cfg.mzi_loss_db)


@dataclass(frozen=True)
class SvdCore:
    """A batch of real blocks W = scale * U diag(transmission) V^T as programmed: V^T mesh, attenuators, U mesh."""

    scale: torch.Tensor  # (B,) largest singular value, restored electronically after detection
    input_mesh: MeshPhases  # V^T
    transmission: torch.Tensor  # (B, N) singular values / scale, in [0, 1]
    output_mesh: MeshPhases  # U


def svd_core(blocks: torch.Tensor) -> SvdCore:
    """Program a batch of real (B, N, N) blocks: SVD, S normalised so the largest singular value is 1 (an
    attenuator fully open), each orthogonal factor as a Clements mesh (Shen et al. 2017)."""
    u, s, vt = torch.linalg.svd(blocks.to(torch.float64))
    scale = s[:, 0]
    transmission = s / torch.where(scale > 0, scale, 1.0)[:, None]
    return SvdCore(scale, clements_decompose(vt), transmission, clements_decompose(u))


def attenuators(transmission: torch.Tensor, cfg: MeshConfig, normals: torch.Tensor) -> torch.Tensor:
    """(B, N) field transmission of the attenuator column: exact when ideal, else one MZI per port, top port in
    and out, programmed to theta = 2 asin(t) and phi = -theta/2 - pi/2 (real transmission t), with errors."""
    if cfg.ideal_attenuators:
        return transmission.to(torch.complex128)
    theta = 2 * torch.asin(transmission.clamp(0.0, 1.0))
    dev = MziDeviations.drawn(cfg, normals)
    t = mzi(theta + dev.theta, -theta / 2 - math.pi / 2 + dev.phi, dev.split_in, dev.split_out)[..., 0, 0]
    return t * 10.0 ** (-dev.loss_db / 20.0)


def draws_per_block(ports: int) -> int:
    """Standard normals one block draws: per mesh 5 per MZI and one per output phase, 5 per attenuator."""
    return 2 * (DRAWS_PER_MZI * ports * (ports - 1) // 2 + ports) + DRAWS_PER_MZI * ports


def realised_core(core: SvdCore, cfg: MeshConfig, normals: torch.Tensor) -> torch.Tensor:
    """(B, N, N) complex matrix the chip realises, scale restored, uniform loss included: errors from
    ``normals`` (B, draws_per_block(N)) in a fixed order (input mesh, output mesh, attenuators), whatever the
    config, so chips drawn with the same generator differ only in the error sizes."""
    batch, ports = core.transmission.shape
    count = ports * (ports - 1) // 2
    per_mesh = DRAWS_PER_MZI * count + ports

    def crossed(mesh: MeshPhases, e: torch.Tensor, light: torch.Tensor | None) -> torch.Tensor:
        """``light`` through one mesh whose errors are the normals ``e`` (B, per_mesh)."""
        dev = MziDeviations.drawn(cfg, e[:, :DRAWS_PER_MZI * count].reshape(batch, count, DRAWS_PER_MZI))
        return mesh_matrix(mesh, dev, e[:, DRAWS_PER_MZI * count:] * cfg.phase_error_rad, cfg.mzi_loss_db, light)

    att = attenuators(core.transmission, cfg, normals[:, 2 * per_mesh:].reshape(batch, ports, DRAWS_PER_MZI))
    att = att * 10.0 ** (-cfg.mzi_loss_db / 20)  # (B, N) one more column of MZIs
    inner = att[..., None] * crossed(core.input_mesh, normals[:, :per_mesh], None)
    return core.scale[:, None, None] * crossed(core.output_mesh, normals[:, per_mesh:2 * per_mesh], inner)


@dataclass(frozen=True)
class ProgrammedWeights:
    """One layer's weights as programmed into SVD cores: the same for every chip, so computed once per layer."""

    shape: tuple[int, int]  # (O, K) of the layer's weight codes
    core: SvdCore  # one core per block of ``tile`` outputs x ``tile`` inputs, output block major


def program_weights(w: torch.Tensor, w_max: float, tile: int) -> ProgrammedWeights:
    """Cut the codes ``w`` (O, K) in [-w_max, w_max] into zero-padded ``tile`` x ``tile`` blocks and program each
    into a ``tile``-port SVD core."""
    if not 1 <= tile <= MAX_MESH_PORTS:
        raise PhotosimError(f"a coherent MZI mesh of {tile} ports (the tile length): photosim builds meshes of 1 to "
                            f"{MAX_MESH_PORTS} ports; set hw.tile to at most {MAX_MESH_PORTS}.")
    w = w.to(torch.float64)
    if w.numel() and w.abs().max() > w_max:
        raise PhotosimError(f"weight codes up to {w.abs().max().item():g} exceed w_max = {w_max:g}: a mesh realises "
                            "codes of the layer's weight range only; quantize the weights to that range.")
    (o, k), rows, cols = w.shape, -(-w.shape[0] // tile), -(-w.shape[1] // tile)
    padded = torch.zeros(rows * tile, cols * tile, dtype=torch.float64)
    padded[:o, :k] = w
    blocks = padded.reshape(rows, tile, cols, tile).transpose(1, 2).reshape(rows * cols, tile, tile)
    return ProgrammedWeights((o, k), svd_core(blocks))


def realise(programmed: ProgrammedWeights, cfg: MeshConfig, generator: torch.Generator) -> torch.Tensor:
    """The (O, K) weight codes one chip realises, errors drawn from ``generator``, uniform loss divided out."""
    (o, k), core = programmed.shape, programmed.core
    batch, tile = core.transmission.shape
    normals = torch.randn(batch, draws_per_block(tile), generator=generator, dtype=torch.float64)
    field = realised_core(core, cfg, normals).real / math.sqrt(mesh_transmission(cfg, tile))  # homodyne: in phase
    rows, cols = -(-o // tile), -(-k // tile)
    return field.reshape(rows, cols, tile, tile).transpose(1, 2).reshape(rows * tile, cols * tile)[:o, :k]


def realised_weights(w: torch.Tensor, w_max: float, tile: int, cfg: MeshConfig,
                     generator: torch.Generator) -> torch.Tensor:
    """The weight codes (O, K) one chip realises for the codes ``w`` (O, K) in [-w_max, w_max]: error only.

    Blocks of ``tile`` outputs x ``tile`` inputs (the last ones zero-padded) each run on a ``tile``-port SVD core;
    the homodyne receiver reads the in-phase part of the output field (the engine's real weight) and divides by
    the core's uniform field transmission, which ``mesh_transmission`` reports for the link budget. Errors are
    drawn from ``generator`` (same state, same chip); with all errors 0 the result is ``w`` to round-off. A
    caller realising many chips of one layer programs once (``program_weights``) and calls ``realise``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> realised_weights(torch.tensor([[3.0, -1.0]]), 7, 2, MeshConfig(phase_error_rad=0.01), g).shape
        torch.Size([1, 2])
    """
    return realise(program_weights(w, w_max, tile), cfg, generator)
