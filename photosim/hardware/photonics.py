"""The link budget of an optical core: from milliwatts to the engine's noise settings, in SI units.

Pure functions, one physical law each, then ``link_budget`` that chains them for one tile of length L and
``with_link_budget`` that writes the result into a layer's ``noise`` settings, so the engine's kernels stay
as they are. Every noise term is a current standard deviation at the receiver, divided by the full-scale
signal current: a fraction of the tile's full scale FS, the unit of ``noise.output.sigma``.

Shot noise follows the total photocurrent on both photodiodes of the pair. In a balanced weight bank that
current does not depend on the weights, only on the sum of the input powers, so its input-dependent part becomes
the engine's ``photocurrent`` effect (light = sum |x| Wmax per tile) and its constant part (extinction leakage,
the local oscillator, dark current) output noise; RIN becomes the ``rin`` effect, carried by the signal.
``noise_law: worst-case`` takes both at full-scale light as signal-independent output noise instead (exact for
full-scale inputs, an upper bound otherwise). Formulas and sources: docs/photonics.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from photosim.errors import PhotosimError
from photosim.hardware.config import IntensityNoise, LayerHardware, OutputNoise, PhotocurrentNoise, StaticWeightNoise
from photosim.hardware.mesh import MeshConfig, svd_depth
from photosim.hardware.photonic_config import DEFAULT_LOAD_OHM, PhotonicsConfig
from photosim.hardware.units import GHZ, K_B, MW, NA, PA, Q_E, db_loss

MAX_SIGMA = 1e6  # tile noise beyond a million full scales: no signal is left, and the readout's numbers overflow


def splitting_loss_db(fan_out: int, excess_db: float) -> float:
    """Loss of a 1:fan_out power split, dB: the ideal 10 log10(fan_out) plus excess per 1:2 stage."""
    return 10.0 * math.log10(fan_out) + excess_db * math.ceil(math.log2(fan_out))


def path_loss_db(cfg: PhotonicsConfig, tile: int, mesh: MeshConfig | None = None) -> float:
    """Laser to detector, dB: coupling + waveguide + the devices + the fan-out split. The devices are L of
    device_loss_db each, or with an MZI mesh the columns of its SVD core, svd_depth(L) of mzi_loss_db each
    (loss growing with the mesh's depth, docs/mesh.md)."""
    devices = cfg.device_loss_db * tile if mesh is None else svd_depth(tile) * mesh.mzi_loss_db
    return cfg.coupling_loss_db + cfg.waveguide_loss_db + devices + splitting_loss_db(cfg.fan_out,
                                                                                       cfg.splitter_excess_db)


def lo_path_loss_db(cfg: PhotonicsConfig) -> float:
    """Local oscillator laser to detector pair, dB: coupling + waveguide + the excess of its 1:fan_out split (the
    ideal split is in its power, given per pair); it passes no input or weight device."""
    return cfg.coupling_loss_db + cfg.waveguide_loss_db + cfg.splitter_excess_db * math.ceil(math.log2(cfg.fan_out))


def weight_swing(cfg: PhotonicsConfig) -> float:
    """Fraction of a channel's light a full-scale signed weight moves: 1 for a device that steers it between the two
    photodiodes; (1 - 10^(-ER/10)) / 2 for an attenuator of extinction ratio ER read against a reference."""
    if cfg.weight_extinction_ratio_db is None:
        return 1.0
    return (1.0 - db_loss(cfg.weight_extinction_ratio_db)) / 2.0


def leakage(ratio_db: float | None) -> float:
    """Power that leaks where none should go, as a fraction: 10^(-ratio/10) (0 when None). An extinction ratio
    of 25 dB lets a zero input transmit 10^-2.5 of the full power; a crosstalk of -25 dB is a ratio of 25 dB."""
    return 0.0 if ratio_db is None else db_loss(ratio_db)


def shot_variance(current_a: float, dark_a: float, bandwidth_hz: float) -> float:
    """Shot noise current variance, A^2: 2 q (I + I_dark) B."""
    return 2.0 * Q_E * (current_a + dark_a) * bandwidth_hz


def thermal_variance(temperature_k: float, bandwidth_hz: float, load_ohm: float) -> float:
    """Johnson noise current variance of a load resistance, A^2: 4 k T B / R_L."""
    return 4.0 * K_B * temperature_k * bandwidth_hz / load_ohm


def tia_variance(noise_a_rthz: float, bandwidth_hz: float) -> float:
    """TIA input-referred noise current variance, A^2: i_n^2 B."""
    return noise_a_rthz ** 2 * bandwidth_hz


def rin_variance(rin_db_hz: float | None, current_a: float, bandwidth_hz: float) -> float:
    """Laser intensity noise current variance, A^2: RIN I^2 B with RIN = 10^(dB/10) per Hz (0 when off)."""
    return 0.0 if rin_db_hz is None else 10.0 ** (rin_db_hz / 10.0) * current_a ** 2 * bandwidth_hz


def device_step_error(bits: int | None) -> float:
    """rms error of a weight device with 2^bits levels over +-Wmax, fraction of Wmax: step / sqrt(12)."""
    return 0.0 if bits is None else 2.0 / (2 ** bits - 1) / math.sqrt(12.0)


def crosstalk_error(coupling: float) -> float:
    """rms weight error from two neighbours each leaking ``coupling`` of a full-scale weight: sqrt(2) c."""
    return math.sqrt(2.0) * coupling


def bandwidth_hz(cfg: PhotonicsConfig) -> float:
    """Receiver noise bandwidth, Hz: bandwidth_ghz, else half the clock (integration over one symbol)."""
    return (cfg.bandwidth_ghz or cfg.clock_ghz / 2.0) * GHZ


@dataclass(frozen=True)
class LinkBudget:
    """Powers, currents and noise terms of one full-scale tile; sigmas are fractions of the tile's FS."""

    loss_db: float  # laser to detector
    detector_power_w: float  # per channel at the detector, input at full scale
    signal_current_a: float  # full-scale swing of the balanced (signed) current
    total_current_a: float  # both photodiodes together, full-scale input (sets the shot noise)
    offset_fs: float  # zero-input current (largest, all weights at Wmax), fraction of FS; calibrated out
    sigma_shot: float  # at full-scale light: sqrt(sigma_photocurrent^2 + sigma_shot_floor^2)
    sigma_thermal: float
    sigma_rin: float  # at a full-scale signal from one laser
    sigma_weight: float  # additive weight error, fraction of Wmax
    sigma_photocurrent: float  # the input-dependent shot noise: std = this * sqrt(FS * light) (noise.photocurrent)
    sigma_shot_floor: float  # the constant shot noise (leakage, local oscillator, dark current), fraction of FS
    sigma_intensity: float  # relative std of the signal light, sqrt(RIN B) (halved for a homodyne field; noise.rin)

    @property
    def sigma_output(self) -> float:
        """Signal-independent tile noise, fraction of FS: the analog terms in quadrature."""
        return math.sqrt(self.sigma_shot ** 2 + self.sigma_thermal ** 2 + self.sigma_rin ** 2)


def link_budget(cfg: PhotonicsConfig, tile: int, layer: str | None = None, mesh: MeshConfig | None = None
                ) -> LinkBudget:
    """The link budget of a tile of ``tile`` channels (docs/photonics.md, section Link budget), through ``mesh``
    when the core is an MZI mesh; a budget that
    leaves the range of floating-point numbers (no light left at the detector, noise beyond MAX_SIGMA full scales)
    is a PhotosimError naming ``layer`` and the settings that cause it, as are settings no core can have."""
    cfg.check(f"layer {layer!r}" if layer else "a layer")
    try:
        budget = _link_budget(cfg, tile, mesh)
    except (ZeroDivisionError, OverflowError):
        budget = None
    if budget is None or not all(math.isfinite(v) for v in (budget.detector_power_w, budget.offset_fs,
                                                           budget.sigma_output, budget.sigma_weight)) \
            or budget.sigma_output > MAX_SIGMA:
        where = f"layer {layer!r}" if layer else "a layer"
        raise PhotosimError(
            f"the link budget of {where} (tiles of L={tile} channels) leaves the range photosim can compute: "
            f"{path_loss_db(cfg, tile, mesh):.4g} dB from laser to detector leave "
            f"{cfg.laser_power_mw * db_loss(path_loss_db(cfg, tile, mesh)):.3g} mW of the {cfg.laser_power_mw:g} mW "
            f"per channel, so the noise would exceed {MAX_SIGMA:g} times the tile's full scale or not be a finite "
            "number: no signal is left. Raise laser_power_mw or lower the losses (coupling_loss_db, waveguide_loss_db, "
            "device_loss_db times L, fan_out), or shorten the tile; docs/photonics.md gives every formula.")
    return budget


def _link_budget(cfg: PhotonicsConfig, tile: int, mesh: MeshConfig | None) -> LinkBudget:
    """The link budget's formulas, unchecked (link_budget checks the result)."""
    b, r = bandwidth_hz(cfg), cfg.responsivity_a_per_w
    loss = path_loss_db(cfg, tile, mesh)
    p_det = cfg.laser_power_mw * MW * db_loss(loss)
    leak = leakage(cfg.extinction_ratio_db)
    if cfg.architecture == "incoherent":  # weights split each channel's power between the two photodiodes
        swing_fraction = 1.0 - leak
        signal, total = r * tile * p_det * swing_fraction * weight_swing(cfg), r * tile * p_det
        varying = total * swing_fraction  # follows the inputs; the leaked rest does not
        intensity = math.sqrt(rin_variance(cfg.rin_db_hz, 1.0, b))  # each channel's current: its own laser's RIN
    else:  # homodyne: 2 R sqrt(P_LO P_sig) of a coherent sum of L fields; field leakage is sqrt(leak)
        swing_fraction = 1.0 - math.sqrt(leak)
        p_lo = cfg.lo_power_mw * MW * db_loss(lo_path_loss_db(cfg))
        signal, total = 2.0 * r * math.sqrt(p_lo * tile * p_det) * swing_fraction, r * (p_lo + tile * p_det)
        varying = r * tile * p_det  # the signal light (an upper bound: sum |x| Xmax >= sum x^2); the LO is constant
        intensity = math.sqrt(rin_variance(cfg.rin_db_hz, 1.0, b)) / 2.0  # the field moves half the intensity
    dark = 2.0 * cfg.dark_current_na * NA
    receiver = (tia_variance(cfg.tia_noise_pa_rthz * PA, b) if cfg.tia_noise_pa_rthz is not None
                else thermal_variance(cfg.temperature_k, b, cfg.load_ohm or DEFAULT_LOAD_OHM))
    weight = math.sqrt(device_step_error(cfg.weight_bits) ** 2 + cfg.programming_error ** 2
                       + crosstalk_error(leakage(None if cfg.wdm_crosstalk_db is None else -cfg.wdm_crosstalk_db))
                       ** 2
                       + crosstalk_error(cfg.thermal_crosstalk) ** 2)
    return LinkBudget(
        loss_db=loss, detector_power_w=p_det, signal_current_a=signal, total_current_a=total,
        offset_fs=(1.0 - swing_fraction) / swing_fraction,
        sigma_shot=math.sqrt(shot_variance(total, dark, b)) / signal,
        sigma_thermal=math.sqrt(receiver) / signal,
        sigma_rin=math.sqrt(rin_variance(cfg.rin_db_hz, signal, b)) / signal,
        sigma_weight=weight,
        sigma_photocurrent=math.sqrt(shot_variance(varying, 0.0, b)) / signal,
        sigma_shot_floor=math.sqrt(shot_variance(total - varying, dark, b)) / signal,
        sigma_intensity=intensity,
    )


def with_link_budget(hw: LayerHardware, tile: int, layer: str | None = None) -> LayerHardware:
    """``hw`` with its noise set from its photonics section for tiles of ``tile`` channels (of ``layer``, named in
    errors); unchanged without one. ``noise_law: signal``: the constant terms as noise.output, the input-dependent
    shot noise as noise.photocurrent and RIN as noise.rin (one laser per input of a WDM bank, one shared laser
    for a coherent core); ``worst-case``: all of them at full scale as noise.output. The weight error is
    noise.weight_static (additive) either way."""
    cfg = hw.photonics
    if cfg is None:
        return hw
    budget = link_budget(cfg, tile, layer, hw.mesh)
    update: dict[str, object] = {"weight_static": StaticWeightNoise(sigma=budget.sigma_weight, kind="additive")}
    if cfg.noise_law == "worst-case":
        update["output"] = OutputNoise(sigma=budget.sigma_output)
    else:
        update["output"] = OutputNoise(sigma=math.hypot(budget.sigma_shot_floor, budget.sigma_thermal))
        update["photocurrent"] = PhotocurrentNoise(sigma=budget.sigma_photocurrent, light="inputs")
        lasers = "independent" if cfg.architecture == "incoherent" else "common"
        update["rin"] = IntensityNoise(sigma=budget.sigma_intensity, lasers=lasers)
    return hw.model_copy(update={"noise": hw.noise.model_copy(update=update)})
