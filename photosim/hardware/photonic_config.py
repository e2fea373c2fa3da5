"""The physical description of an optical dot-product core (the ``photonics:`` section of a hardware config).

A photonic designer knows milliwatts, decibels, amperes per watt and picojoules, not a noise sigma relative
to a tile's full scale. This section holds those quantities; ``photosim.hardware.photonics`` turns them into
the engine's ``noise`` settings (the link budget) and ``photosim.hardware.energy`` into joules, seconds and
TOPS (bank loads, batch size, cores). Units are in every field's name and description; docs/photonics.md gives
every formula.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from photosim._config import StrictModel
from photosim.errors import PhotosimError
from photosim.hardware.units import C_LIGHT, H_PLANCK, Q_E

DEFAULT_LOAD_OHM = 1000.0  # receiver when neither load_ohm nor tia_noise_pa_rthz is given
MIN_POWER_MW, MAX_POWER_MW = 1e-9, 1000.0  # optical power per channel: a picowatt to a watt
MAX_FAN_OUT = 65536  # outputs sharing one input vector: a 16-stage splitter tree
MAX_CORES = 65536  # banks on one chip: 65,536 banks of 16 x 16 are 16.8 million devices, more than any chip holds
MAX_BATCH = 1 << 24  # inferences per bank load: 17 s per batch at a million inferences/s, past any useful latency
MIN_WAVELENGTH_NM, MAX_WAVELENGTH_NM = 400.0, 2000.0  # visible (silicon nitride cores) to the 2 um band
MAX_RIN_DB_HZ = -100.0  # noisier light fluctuates by over 30% rms in the GHz bands cores detect (docs/photonics.md)
MAX_WEIGHT_ERROR = 0.5  # rms, fraction of Wmax: a weight drawn at random over +-Wmax has rms 0.577 Wmax


def quantum_limit_responsivity(wavelength_nm: float) -> float:
    """The largest responsivity without gain, A/W: one electron per photon, q lambda / (h c)."""
    return Q_E * wavelength_nm * 1e-9 / (H_PLANCK * C_LIGHT)


class PhotonicEnergy(StrictModel):
    """Energy of the electronics around the optical core; every default is an assumption (docs/photonics.md).

    Numbers are strict: a boolean is not a number here (YAML ``true`` would otherwise read as 1)."""

    modulator_pj: float = Field(1.0, ge=0, strict=True, description="DAC + modulator driver energy per input "
                                                                    "conversion, pJ.")
    adc_fom_fj: float = Field(10.0, ge=0, strict=True, description="ADC Walden figure of merit, fJ per "
                                                                   "conversion-step (energy per conversion = FOM * "
                                                                   "2^bits).")
    weight_hold_mw: float = Field(0.0, ge=0, strict=True, description="Static power per weight device of a bank "
                                                                      "while it settles and computes (thermal "
                                                                      "tuning), mW; 0 for non-volatile devices.")
    weight_write_pj: float = Field(0.0, ge=0, strict=True, description="Energy to program one weight device at a "
                                                                       "bank load (heater or phase DAC update, PCM "
                                                                       "write pulses), pJ.")
    accumulate_pj: float = Field(0.05, ge=0, strict=True, description="Digital addition of one ADC code into the "
                                                                      "accumulator, pJ.")
    requant_pj: float = Field(0.5, ge=0, strict=True, description="Requantization of one output (multiply, shift, "
                                                                  "clamp), pJ.")

    @model_validator(mode="before")
    @classmethod
    def _weight_reuse_moved(cls, data: Any) -> Any:
        """Refuse the old ``weight_reuse`` by name: its meaning (inferences per weight load) is photonics.batch_size."""
        if isinstance(data, dict) and "weight_reuse" in data:
            raise ValueError("weight_reuse is now photonics.batch_size (inferences that share one bank load, which "
                             "also sets throughput and latency): move the value there, out of energy")
        return data


class PhotonicsConfig(StrictModel):
    """Lasers, losses, modulators, detectors and weight devices of one optical core (per layer overridable).

    ``incoherent``: a WDM weight bank, one wavelength per input, each weight splitting its channel's power
    between the two photodiodes of a balanced pair (signed weights). ``coherent``: inputs as field amplitudes
    summed coherently (MZI mesh or free-space fan-in) and read by balanced homodyne detection against a local
    oscillator (LO). Every number is bounded by what a physical core can have (each description says why) and
    strict: a boolean is not a number here; what depends on two keys (responsivity and wavelength, options of one
    architecture) is checked by ``check`` on a layer's resolved settings.
    """

    exclusive: ClassVar[tuple[tuple[str, ...], ...]] = (("load_ohm", "tia_noise_pa_rthz"),)
    architecture: Literal["incoherent", "coherent"] = Field(
        "incoherent", description="incoherent (WDM weight bank, balanced detection) or coherent (MZI / homodyne).")
    laser_power_mw: float = Field(
        1.0, ge=MIN_POWER_MW, le=MAX_POWER_MW, strict=True,
        description=f"Optical power per input channel at the laser, mW, {MIN_POWER_MW:g} to {MAX_POWER_MW:g}: below "
                    "a picowatt (one photon per ~100 ns at 1550 nm) no receiver resolves a symbol, above a watt "
                    "silicon waveguides absorb it (two-photon absorption) and facets burn.")
    lo_power_mw: float | None = Field(
        None, ge=MIN_POWER_MW, le=MAX_POWER_MW, strict=True,
        description="coherent only (and required there): local oscillator laser power per detector pair, mW (same "
                    "range); it reaches the pair through coupling, waveguide and splitter excess loss.")
    noise_law: Literal["signal", "worst-case"] = Field(
        "signal", description="signal: shot noise from each tile's real light and RIN carried by its real signal "
                              "(noise.photocurrent, noise.rin); worst-case: both taken at full-scale light as "
                              "signal-independent output noise (an upper bound).")
    wavelength_nm: float = Field(
        1550.0, ge=MIN_WAVELENGTH_NM, le=MAX_WAVELENGTH_NM, strict=True,
        description=f"Optical wavelength, nm, {MIN_WAVELENGTH_NM:g} to {MAX_WAVELENGTH_NM:g} (silicon nitride cores "
                    "in the visible to the 2 um band); bounds the responsivity at q lambda / (h c).")
    wall_plug_efficiency: float = Field(0.2, gt=0, le=1, strict=True,
                                        description="Laser optical / electrical power, (0, 1].")
    coupling_loss_db: float = Field(1.5, ge=0, le=60, strict=True,
                                    description="Laser-to-chip coupling loss, dB, at most 60 (a millionth of the "
                                                "light; no working link loses more).")
    waveguide_loss_db: float = Field(1.0, ge=0, le=100, strict=True,
                                     description="Total propagation loss, laser to detector, dB, at most 100.")
    device_loss_db: float = Field(0.05, ge=0, le=10, strict=True,
                                  description="Insertion loss per device a channel passes (L devices per tile: rings "
                                              "on the bus), dB, at most 10; with an MZI mesh (hw.mesh) the mesh's "
                                              "columns and mzi_loss_db replace it.")
    fan_out: int = Field(16, ge=1, le=MAX_FAN_OUT, strict=True,
                         description=f"Outputs computed at once from one input vector (its power is split this many "
                                     f"ways, 10 log10(fan_out) dB), count, at most {MAX_FAN_OUT} (a 16-stage "
                                     "splitter tree already loses 48 dB).")
    splitter_excess_db: float = Field(0.1, ge=0, le=10, strict=True,
                                      description="Excess loss per 1:2 splitter stage of the fan-out (ceil(log2 "
                                                  "fan_out) stages), dB, at most 10.")
    extinction_ratio_db: float | None = Field(
        25.0, ge=1, le=100, strict=True,
        description="Modulator extinction ratio (max / min transmitted power), dB, 1 to 100 (below 1 dB a zero "
                    "input transmits over 79% of the light: no signal swing is left); null: ideal (a zero input "
                    "carries no light).")
    responsivity_a_per_w: float = Field(
        1.0, gt=0, strict=True,
        description="Photodiode responsivity, A/W, at most q lambda / (h c) = lambda / 1.24 um A/W at wavelength_nm "
                    "(one electron per photon: 1.25 A/W at 1550 nm; avalanche gain is not modelled, its excess noise "
                    "would have to be).")
    dark_current_na: float = Field(10.0, ge=0, le=1e6, strict=True,
                                   description="Dark current per photodiode, nA, at most 1e6 (1 mA).")
    clock_ghz: float = Field(10.0, gt=0, le=1000, strict=True,
                             description="Input vectors per second per core (symbol rate), GHz, at most 1000 (1 THz).")
    bandwidth_ghz: float | None = Field(None, gt=0, le=1000, strict=True,
                                        description="Receiver noise bandwidth, GHz, at most 1000; null: clock_ghz / 2 "
                                                    "(integrate over one symbol).")
    temperature_k: float = Field(300.0, gt=0, le=1000, strict=True,
                                 description="Receiver temperature, K, at most 1000 (semiconductor receivers stop "
                                             "working far below).")
    load_ohm: float | None = Field(None, ge=1, le=1e9, strict=True,
                                   description="Load resistance of the pair (thermal noise 4kTB/R), ohm, 1 to 1e9; "
                                               f"give this or tia_noise_pa_rthz (neither: {DEFAULT_LOAD_OHM:g} ohm).")
    tia_noise_pa_rthz: float | None = Field(None, ge=0, le=1e6, strict=True,
                                            description="TIA input-referred current noise density, pA/sqrt(Hz), at "
                                                        "most 1e6; replaces load_ohm.")
    rin_db_hz: float | None = Field(
        None, le=MAX_RIN_DB_HZ, strict=True,
        description=f"Laser relative intensity noise, dB/Hz, at most {MAX_RIN_DB_HZ:g}: noisier light fluctuates by "
                    "over 30% rms across 1 GHz, and no source cores use is that noisy; null: off.")
    wdm_crosstalk_db: float | None = Field(
        None, le=-3, strict=True,
        description="incoherent only: power coupled into a neighbouring wavelength channel, dB (e.g. -25), at most -3 "
                    "(half the power: the channels are no longer told apart); null: off.")
    thermal_crosstalk: float = Field(
        0.0, ge=0, le=MAX_WEIGHT_ERROR, strict=True,
        description=f"Fraction of a neighbouring device's weight that leaks into a weight through heat, at most "
                    f"{MAX_WEIGHT_ERROR:g} (beyond, neighbours are not set apart).")
    weight_bits: int | None = Field(None, ge=1, le=32, strict=True,
                                    description="Resolution of a weight device, bits (uniform error of one device "
                                                "step); null: exact.")
    programming_error: float = Field(
        0.0, ge=0, le=MAX_WEIGHT_ERROR, strict=True,
        description=f"Weight programming error, rms as a fraction of the largest weight Wmax, at most "
                    f"{MAX_WEIGHT_ERROR:g} (a weight drawn at random over +-Wmax has rms 0.577 Wmax: an error that "
                    "large leaves no information).")
    weight_extinction_ratio_db: float | None = Field(
        None, gt=0, le=60, strict=True,
        description="incoherent only: on/off transmission ratio of a weight device that attenuates its channel and is "
                    "read single-ended against a reference (PCM cell), dB, at most 60; its signed weight swings "
                    "(1 - 10^(-ER/10)) / 2 of the light, not all of it as a device steering the light between the two "
                    "photodiodes does. null: a steering device (microring add-drop, MZI).")
    batch_size: int = Field(
        1, ge=1, le=MAX_BATCH, strict=True,
        description=f"Inferences that share one bank load: each load computes the whole batch before the next, so "
                    f"load time and energy are shared by this many inferences, count, at most {MAX_BATCH:,}.")
    cores: int = Field(1, ge=1, le=MAX_CORES, strict=True,
                       description=f"Identical cores (banks of L x fan_out weight devices) working in parallel, each "
                                   f"on its own bank loads, count, at most {MAX_CORES:,}.")
    weight_load_us: float = Field(
        0.0, ge=0, le=1e6, strict=True,
        description="Time to load a bank before it computes (thermal settling, PCM write-and-verify, phase "
                    "settling), us, at most 1e6 (1 s); every device of the bank loads in parallel.")
    device_area_um2: float | None = Field(
        None, gt=0, le=1e8, strict=True,
        description="Chip area per weight device with its share of waveguides, detectors and drivers, um^2, at most "
                    "1e8 (1 cm^2); null: no TOPS/mm^2.")
    energy: PhotonicEnergy = Field(default_factory=PhotonicEnergy, description="Electronics energy.")

    def problems(self) -> list[str]:
        """What these settings claim that no core of their architecture can have (empty when consistent): checked
        on a layer's resolved settings, as a per-layer override alone may set one key of a pair."""
        found = []
        limit = quantum_limit_responsivity(self.wavelength_nm)
        if self.responsivity_a_per_w > limit:
            found.append(f"photonics.responsivity_a_per_w {self.responsivity_a_per_w:g} exceeds the quantum limit "
                         f"q lambda / (h c) = {limit:.4g} A/W at wavelength_nm {self.wavelength_nm:g} (one electron "
                         "per photon)")
        coherent = self.architecture == "coherent"
        other, keys = ("incoherent", ("wdm_crosstalk_db", "weight_extinction_ratio_db")) if coherent else (
            "coherent", ("lo_power_mw",))
        found += [f"photonics.{key} is an option of the {other} architecture only, not of this {self.architecture} core"
                  for key in keys if getattr(self, key) is not None]
        if coherent and self.lo_power_mw is None:
            found.append("a coherent core needs photonics.lo_power_mw, the local oscillator's power per detector pair")
        return found

    def check(self, where: str) -> None:
        """Raise a PhotosimError naming ``where`` and every entry of ``problems``."""
        found = self.problems()
        if found:
            raise PhotosimError(f"the photonics settings of {where} are not physical: {'; '.join(found)}. Fix these "
                                "keys (docs/photonics.md gives every bound and why).")
