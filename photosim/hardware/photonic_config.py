"""The physical description of an optical dot-product core (the ``photonics:`` section of a hardware config).

A photonic designer knows milliwatts, decibels, amperes per watt and picojoules, not a noise sigma relative
to a tile's full scale. This section holds those quantities; ``photosim.hardware.photonics`` turns them into
the engine's ``noise`` settings (the link budget) and ``photosim.hardware.energy`` into joules. Units are in
every field's name and description; docs/photonics.md gives every formula.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from photosim._config import StrictModel

DEFAULT_LOAD_OHM = 1000.0  # receiver when neither load_ohm nor tia_noise_pa_rthz is given
MIN_POWER_MW, MAX_POWER_MW = 1e-9, 1000.0  # optical power per channel: a picowatt to a watt
MAX_FAN_OUT = 65536  # outputs sharing one input vector: a 16-stage splitter tree
MAX_RESPONSIVITY = 1.6  # A/W: the quantum limit (one electron per photon) at 2 um


class PhotonicEnergy(StrictModel):
    """Energy of the electronics around the optical core; every default is an assumption (docs/photonics.md).

    Numbers are strict: a boolean is not a number here (YAML ``true`` would otherwise read as 1)."""

    modulator_pj: float = Field(1.0, ge=0, strict=True, description="DAC + modulator driver energy per input "
                                                                    "conversion, pJ.")
    adc_fom_fj: float = Field(10.0, ge=0, strict=True, description="ADC Walden figure of merit, fJ per "
                                                                   "conversion-step (energy per conversion = FOM * "
                                                                   "2^bits).")
    weight_hold_mw: float = Field(0.0, ge=0, strict=True, description="Static power per weight device while it "
                                                                      "computes (thermal tuning), mW; 0 for "
                                                                      "non-volatile devices.")
    weight_write_pj: float = Field(0.0, ge=0, strict=True, description="Energy to program one weight device, pJ.")
    weight_reuse: int = Field(1, ge=1, strict=True, description="Inferences per weight load (each weight is written "
                                                                "once per this many inferences), count.")
    accumulate_pj: float = Field(0.05, ge=0, strict=True, description="Digital addition of one ADC code into the "
                                                                      "accumulator, pJ.")
    requant_pj: float = Field(0.5, ge=0, strict=True, description="Requantization of one output (multiply, shift, "
                                                                  "clamp), pJ.")


class PhotonicsConfig(StrictModel):
    """Lasers, losses, modulators, detectors and weight devices of one optical core (per layer overridable).

    ``incoherent``: a WDM weight bank, one wavelength per input, each weight splitting its channel's power
    between the two photodiodes of a balanced pair (signed weights). ``coherent``: inputs as field amplitudes
    summed coherently (MZI mesh or free-space fan-in) and read by balanced homodyne detection against a local
    oscillator (LO). Every number is bounded by what a physical core can have (each description says why) and
    strict: a boolean is not a number here.
    """

    exclusive: ClassVar[tuple[tuple[str, ...], ...]] = (("load_ohm", "tia_noise_pa_rthz"),)
    architecture: Literal["incoherent", "coherent"] = Field(
        "incoherent", description="incoherent (WDM weight bank, balanced detection) or coherent (MZI / homodyne).")
    laser_power_mw: float = Field(
        1.0, ge=MIN_POWER_MW, le=MAX_POWER_MW, strict=True,
        description=f"Optical power per input channel at the laser, mW, {MIN_POWER_MW:g} to {MAX_POWER_MW:g}: below "
                    "a picowatt (one photon per ~100 ns at 1550 nm) no receiver resolves a symbol, above a watt "
                    "silicon waveguides absorb it (two-photon absorption) and facets burn.")
    lo_power_mw: float = Field(1.0, ge=MIN_POWER_MW, le=MAX_POWER_MW, strict=True,
                               description="coherent only: LO power at each detector pair, mW (same range).")
    wall_plug_efficiency: float = Field(0.2, gt=0, le=1, strict=True,
                                        description="Laser optical / electrical power, (0, 1].")
    coupling_loss_db: float = Field(1.5, ge=0, le=60, strict=True,
                                    description="Laser-to-chip coupling loss, dB, at most 60 (a millionth of the "
                                                "light; no working link loses more).")
    waveguide_loss_db: float = Field(1.0, ge=0, le=100, strict=True,
                                     description="Total propagation loss, laser to detector, dB, at most 100.")
    device_loss_db: float = Field(0.05, ge=0, le=10, strict=True,
                                  description="Insertion loss per device a channel passes (L devices per tile: rings "
                                              "on the bus or mesh columns), dB, at most 10.")
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
        1.0, gt=0, le=MAX_RESPONSIVITY, strict=True,
        description=f"Photodiode responsivity, A/W, at most {MAX_RESPONSIVITY:g}: one electron per photon gives "
                    "q lambda / (h c) = lambda / 1.24 um A/W, 1.25 A/W at 1550 nm and 1.6 A/W at 2 um, the longest "
                    "wavelength photonic cores use (avalanche gain is not modelled: its excess noise would be).")
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
    rin_db_hz: float | None = Field(None, lt=0, strict=True,
                                    description="Laser relative intensity noise, dB/Hz; null: off.")
    wdm_crosstalk_db: float | None = Field(None, lt=0, strict=True,
                                           description="Power coupled into a neighbouring wavelength channel, dB (e.g. "
                                                       "-25); null: off.")
    thermal_crosstalk: float = Field(0.0, ge=0, le=1, strict=True,
                                     description="Fraction of a neighbouring device's weight that leaks into a weight "
                                                 "through heat, 0..1.")
    weight_bits: int | None = Field(None, ge=1, le=32, strict=True,
                                    description="Resolution of a weight device, bits (uniform error of one device "
                                                "step); null: exact.")
    programming_error: float = Field(0.0, ge=0, le=1, strict=True,
                                     description="Weight programming error, rms as a fraction of the largest weight "
                                                 "Wmax, at most 1 (an error as large as Wmax leaves no weight).")
    energy: PhotonicEnergy = Field(default_factory=PhotonicEnergy, description="Electronics energy.")
