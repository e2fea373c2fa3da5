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


class PhotonicEnergy(StrictModel):
    """Energy of the electronics around the optical core; every default is an assumption (docs/photonics.md)."""

    modulator_pj: float = Field(1.0, ge=0, description="DAC + modulator driver energy per input conversion, pJ.")
    adc_fom_fj: float = Field(10.0, ge=0, description="ADC Walden figure of merit, fJ per conversion-step "
                                                       "(energy per conversion = FOM * 2^bits).")
    weight_hold_mw: float = Field(0.0, ge=0, description="Static power per weight device while it computes "
                                                         "(thermal tuning), mW; 0 for non-volatile devices.")
    weight_write_pj: float = Field(0.0, ge=0, description="Energy to program one weight device, pJ.")
    weight_reuse: int = Field(1, ge=1, description="Inferences per weight load (each weight is written once per "
                                                   "this many inferences), count.")
    accumulate_pj: float = Field(0.05, ge=0, description="Digital addition of one ADC code into the accumulator, pJ.")
    requant_pj: float = Field(0.5, ge=0, description="Requantization of one output (multiply, shift, clamp), pJ.")


class PhotonicsConfig(StrictModel):
    """Lasers, losses, modulators, detectors and weight devices of one optical core (per layer overridable).

    ``incoherent``: a WDM weight bank, one wavelength per input, each weight splitting its channel's power
    between the two photodiodes of a balanced pair (signed weights). ``coherent``: inputs as field amplitudes
    summed coherently (MZI mesh or free-space fan-in) and read by balanced homodyne detection against a local
    oscillator (LO).
    """

    exclusive: ClassVar[tuple[tuple[str, ...], ...]] = (("load_ohm", "tia_noise_pa_rthz"),)
    architecture: Literal["incoherent", "coherent"] = Field(
        "incoherent", description="incoherent (WDM weight bank, balanced detection) or coherent (MZI / homodyne).")
    laser_power_mw: float = Field(1.0, gt=0, description="Optical power per input channel at the laser, mW.")
    lo_power_mw: float = Field(1.0, gt=0, description="coherent only: LO power at each detector pair, mW.")
    wall_plug_efficiency: float = Field(0.2, gt=0, le=1, description="Laser optical / electrical power, (0, 1].")
    coupling_loss_db: float = Field(1.5, ge=0, description="Laser-to-chip coupling loss, dB.")
    waveguide_loss_db: float = Field(1.0, ge=0, description="Total propagation loss, laser to detector, dB.")
    device_loss_db: float = Field(0.05, ge=0, description="Insertion loss per device a channel passes "
                                                          "(L devices per tile: rings on the bus or mesh columns), dB.")
    fan_out: int = Field(16, ge=1, description="Outputs computed at once from one input vector (its power is split "
                                               "this many ways, 10 log10(fan_out) dB), count.")
    splitter_excess_db: float = Field(0.1, ge=0, description="Excess loss per 1:2 splitter stage of the fan-out "
                                                             "(ceil(log2 fan_out) stages), dB.")
    extinction_ratio_db: float | None = Field(
        25.0, gt=0, description="Modulator extinction ratio (max / min transmitted power), dB; null: ideal (a zero "
                                "input carries no light).")
    responsivity_a_per_w: float = Field(1.0, gt=0, description="Photodiode responsivity, A/W.")
    dark_current_na: float = Field(10.0, ge=0, description="Dark current per photodiode, nA.")
    clock_ghz: float = Field(10.0, gt=0, description="Input vectors per second per core (symbol rate), GHz.")
    bandwidth_ghz: float | None = Field(None, gt=0, description="Receiver noise bandwidth, GHz; null: clock_ghz / 2 "
                                                                "(integrate over one symbol).")
    temperature_k: float = Field(300.0, gt=0, description="Receiver temperature, K.")
    load_ohm: float | None = Field(None, gt=0, description="Load resistance of the pair (thermal noise 4kTB/R), ohm; "
                                                           f"give this or tia_noise_pa_rthz (neither: "
                                                           f"{DEFAULT_LOAD_OHM:g} ohm).")
    tia_noise_pa_rthz: float | None = Field(None, ge=0, description="TIA input-referred current noise density, "
                                                                    "pA/sqrt(Hz); replaces load_ohm.")
    rin_db_hz: float | None = Field(None, lt=0, description="Laser relative intensity noise, dB/Hz; null: off.")
    wdm_crosstalk_db: float | None = Field(None, lt=0, description="Power coupled into a neighbouring wavelength "
                                                                   "channel, dB (e.g. -25); null: off.")
    thermal_crosstalk: float = Field(0.0, ge=0, le=1, description="Fraction of a neighbouring device's weight that "
                                                                  "leaks into a weight through heat, 0..1.")
    weight_bits: int | None = Field(None, ge=1, le=32, description="Resolution of a weight device, bits (uniform "
                                                                   "error of one device step); null: exact.")
    programming_error: float = Field(0.0, ge=0, description="Weight programming error, rms as a fraction of the "
                                                            "largest weight Wmax.")
    energy: PhotonicEnergy = Field(default_factory=PhotonicEnergy, description="Electronics energy.")
