"""The hardware model's configuration: requantization, tiles, ADC, accumulator, analog noise, per-layer
overrides. Every field is documented where it is defined; ``photosim.simulate(..., hw=...)`` and
``--hw FILE.yaml`` take the same structure.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from photosim._config import (
    LayerOverride,
    OptionalSections,
    PerLayer,
    StrictModel,
    load_config,
    override_model,
    with_settings,
)
from photosim.errors import PhotosimError
from photosim.hardware.drift import DriftConfig
from photosim.hardware.mesh import MeshConfig
from photosim.hardware.noise import sigma_from_enob, sigma_from_snr_db
from photosim.hardware.photonic_config import PhotonicsConfig


class NoiseEffect(StrictModel):
    """One analog noise effect. The fields of NoiseConfig are the list of effects (declared once, there): each
    effect class says which random stream it draws from and what it acts on; the engine, the RNG streams and the
    randomness test read that list."""

    stream: ClassVar[int]  # Philox stream number; fixed forever (a new effect takes a new number: old seeds keep
    # their numbers)
    acts_on: ClassVar[Literal["tile", "weight", "custom"]]  # tile values, weights, or the user's function
    per_chip: ClassVar[bool] = False  # drawn once per simulated chip (else anew for every inference)
    dumped_when_off: ClassVar[bool] = True  # False for effects added after results were hashed: a config without
    # them dumps (and a sweep point hashes) as before they existed

    @property
    def signal(self) -> TileSignal | None:
        """The per-tile optical quantity a tile effect's variance follows, besides the tile value (None: none)."""
        return None

    @property
    def strength(self) -> float:
        """The effect's sigma (0: off)."""
        return float(getattr(self, "sigma", 0.0) or 0.0)

    @property
    def on(self) -> bool:
        """True when the effect draws noise."""
        return bool(self.strength)


class OutputNoise(NoiseEffect):
    """Additive Gaussian noise on every tile value, std = sigma * FS; give one of sigma, snr_db, enob.

    Validation turns snr_db or enob into the ``sigma`` they mean, so every reader uses ``sigma``; a dump
    keeps the form that was given (``sigma`` is written as None beside snr_db or enob).
    """

    stream: ClassVar[int] = 3
    acts_on: ClassVar[Literal["tile"]] = "tile"
    exclusive: ClassVar[tuple[tuple[str, ...], ...]] = (("sigma", "snr_db", "enob"),)
    sigma: float | None = Field(None, ge=0, description="Noise std as a fraction of the tile's full scale FS.")
    snr_db: float | None = Field(None, description="SNR at full scale, 20 log10(FS / std), in dB.")
    enob: float | None = Field(None, gt=0, description="Effective bits at full scale: the noise of an ideal ENOB-bit "
                                                        "quantizer over +-FS (SNR = 6.02 ENOB + 4.77 dB).")

    @model_validator(mode="after")
    def _to_sigma(self) -> OutputNoise:
        """Convert snr_db or enob to sigma once, here."""
        if self.snr_db is not None:
            object.__setattr__(self, "sigma", sigma_from_snr_db(self.snr_db))
        elif self.enob is not None:
            object.__setattr__(self, "sigma", sigma_from_enob(self.enob))
        return self

    @model_serializer(mode="wrap")
    def _as_given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Write sigma as None when it was derived, so a dump validates back (one of the three is given)."""
        data = handler(self)
        if "sigma" in data and (self.snr_db is not None or self.enob is not None):
            data["sigma"] = None
        return data

    @property
    def resolved_sigma(self) -> float:
        """The sigma used (0 when the noise is off)."""
        return self.sigma or 0.0


class ShotNoise(NoiseEffect):
    """Signal-dependent Gaussian noise on every tile value, std = sigma * sqrt(|p| * FS)."""

    stream: ClassVar[int] = 4
    acts_on: ClassVar[Literal["tile"]] = "tile"
    sigma: float = Field(0.0, ge=0, description="Shot-noise coefficient (0: off).")


TileSignal = Literal["input_light", "product_light", "product_power"]  # sum |x| Wmax, sum |x w|, sum (x w)^2 per tile


class PhotocurrentNoise(NoiseEffect):
    """Shot noise of each tile's real photocurrent: std = sigma * sqrt(FS * light), ``light`` the tile's detected
    light in product units (docs/hardware.md, Signal-dependent noise)."""

    stream: ClassVar[int] = 6
    acts_on: ClassVar[Literal["tile"]] = "tile"
    dumped_when_off: ClassVar[bool] = False
    sigma: float = Field(0.0, ge=0, description="Shot-noise coefficient: std = sigma * sqrt(FS * light) (0: off).")
    light: Literal["inputs", "products"] = Field(
        "inputs", description="inputs: light = sum |x_i| Wmax (weights split each input's light between the two "
                              "photodiodes of a balanced pair, so the total does not depend on them); products: "
                              "light = sum |x_i w_i| (weights attenuate the light).")

    @property
    def signal(self) -> TileSignal:
        return "input_light" if self.light == "inputs" else "product_light"


class IntensityNoise(NoiseEffect):
    """Laser relative intensity noise carried by the signal: std = sigma * sqrt(sum (x_i w_i)^2) with one laser per
    input (independent), sigma * |p| with one shared laser (common); sigma = sqrt(RIN * bandwidth)."""

    stream: ClassVar[int] = 7
    acts_on: ClassVar[Literal["tile"]] = "tile"
    dumped_when_off: ClassVar[bool] = False
    sigma: float = Field(0.0, ge=0, description="sqrt(RIN * bandwidth), the relative std of the light (0: off).")
    lasers: Literal["independent", "common"] = Field(
        "independent", description="independent: one laser per input (variance sum (x_i w_i)^2, a 1/L share of the "
                                   "full-scale variance); common: one laser feeds all inputs (variance p^2).")

    @property
    def signal(self) -> TileSignal | None:
        return "product_power" if self.lasers == "independent" else None


class WeightNoise(NoiseEffect):
    """Weight error: multiplicative w (1 + sigma e) or additive w + sigma Wmax e, e ~ N(0, 1)."""

    acts_on: ClassVar[Literal["weight"]] = "weight"
    sigma: float = Field(0.0, ge=0, description="Relative (multiplicative) or full-scale (additive) std; 0: off.")
    kind: Literal["multiplicative", "additive"] = Field("multiplicative", description="Form of the error.")


class StaticWeightNoise(WeightNoise):
    """Programming / fabrication error: drawn once per simulated chip (the repeat), the same for every inference."""

    stream: ClassVar[int] = 1
    per_chip: ClassVar[bool] = True


class ReadWeightNoise(WeightNoise):
    """Weight read error: drawn anew for every inference (sample)."""

    stream: ClassVar[int] = 2


class CustomNoise(NoiseEffect):
    """A user noise model: ``module:function`` or ``path/file.py:function``, called on tile values."""

    stream: ClassVar[int] = 5
    acts_on: ClassVar[Literal["custom"]] = "custom"
    function: str | None = Field(None, description="f(p, context) -> perturbed p; None: off.")

    @property
    def on(self) -> bool:
        """True when a function is given."""
        return self.function is not None


class NoiseConfig(StrictModel):
    """Analog noise effects, each with its own seeded stream; all off by default. Its fields are the list of
    effects (NOISE_EFFECTS): adding an effect is adding a field of a NoiseEffect class."""

    output: OutputNoise = Field(default_factory=OutputNoise, description="Thermal / detector noise.")
    shot: ShotNoise = Field(default_factory=ShotNoise, description="Shot noise.")
    weight_static: StaticWeightNoise = Field(default_factory=StaticWeightNoise,
                                             description="Programming / fabrication error, fixed per simulated chip.")
    weight_read: ReadWeightNoise = Field(default_factory=ReadWeightNoise,
                                         description="Weight error drawn per inference.")
    custom: CustomNoise = Field(default_factory=CustomNoise, description="User noise model.")
    photocurrent: PhotocurrentNoise = Field(default_factory=PhotocurrentNoise,
                                            description="Shot noise of each tile's real photocurrent.")
    rin: IntensityNoise = Field(default_factory=IntensityNoise, description="Laser intensity noise on the signal.")

    def effects(self) -> dict[str, NoiseEffect]:
        """Effect name -> its settings, in declaration order."""
        return {name: getattr(self, name) for name in NOISE_EFFECTS}

    @model_serializer(mode="wrap")
    def _without_new_effects_off(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave out the effects marked ``dumped_when_off = False`` while they are off and at their defaults (a
        per-layer override without a noise section serializes None through here)."""
        data = handler(self)
        if self is None:
            return data
        for name, effect in self.effects().items():
            if not effect.dumped_when_off and name in data and effect == type(effect)():
                del data[name]
        return data


NOISE_EFFECTS: dict[str, type[NoiseEffect]] = {name: field.annotation  # type: ignore[misc]
                                               for name, field in NoiseConfig.model_fields.items()}


class ADCConfig(StrictModel):
    """Per-tile ADC: round to nearest, clip at the range, count clips."""

    bits: int | None = Field(None, ge=2, le=32, description="ADC bits; None: ideal readout (integer grid).")
    range: Literal["full", "calibrated"] | float = Field(
        "full", description="+-FS (`full`), a fraction of FS (e.g. 0.25), or `calibrated` (per layer percentile)."
    )
    percentile: float = Field(99.99, gt=50, le=100, description="Percentile of |tile value| for `calibrated`.")

    @field_validator("range")
    @classmethod
    def _positive_fraction(cls, value: Any) -> Any:
        if isinstance(value, float) and not 0 < value <= 1:
            raise ValueError("a range fraction must lie in (0, 1]")
        return value


class AccumulatorConfig(StrictModel):
    """The digital accumulator that adds the digitized tile values (and the bias)."""

    bits: int = Field(32, ge=2, le=64, description="Accumulator width (two's complement).")
    overflow: Literal["wrap", "saturate", "none"] = Field(
        "none", description="wrap (two's complement), saturate (clamp after every addition) or none (exact)."
    )
    bias_at: Literal["start", "end"] = Field("start", description="Bias added first or last.")


ModulatorTransfer = Literal["linear", "sin2", "sin"]  # photosim.hardware.noise.MODULATOR_TRANSFERS registers each


class DACConfig(StrictModel):
    """The input side of an optical core: the DAC that converts each operand code ``x - z_in`` and the modulator
    that puts it on the light (docs/hardware.md, step 1). At its defaults the inputs are exact."""

    enob: float | None = Field(
        None, gt=0, le=32,
        description="Effective bits of the input conversion over the input range R (the span, in codes, of x - z_in "
                    "that the input clamp allows): every operand value gets Gaussian noise of std R / (2^enob "
                    "sqrt(12)) codes, drawn per inference and per operand element (each cycle re-modulates). "
                    "null: no noise.")
    transfer: ModulatorTransfer = Field(
        "linear",
        description="The modulator's response to a linear drive, u = |x - z_in| / Xmax in [0, 1], sign kept: linear "
                    "(out = x); sin2, an intensity Mach-Zehnder modulator biased at null and driven up to V_pi "
                    "(out = Xmax sin^2(pi u / 2), incoherent cores); sin, a field Mach-Zehnder modulator (out = "
                    "Xmax sin(pi u / 2), coherent cores).")

    @property
    def on(self) -> bool:
        """True when the optical inputs differ from the codes (noise or a nonlinear transfer)."""
        return self.enob is not None or self.transfer != "linear"


class DetectorConfig(StrictModel):
    """The photodetector and its transimpedance amplifier, whose output saturates (docs/hardware.md, step 5)."""

    saturation: float = Field(
        1.0, gt=0,
        description="Fraction of the tile's full scale FS at which the detector / TIA output saturates: tile values "
                    "(after the analog noise) are clamped to +-saturation * FS before the ADC and counted in the "
                    "layer's `saturated` statistic.")


# The engine's requantization modes (photosim.engine.requant.REQUANT_MODES registers them; a test keeps the two
# equal): named here so that the configuration does not depend on the engine.
RequantMode = Literal["float", "fixedpoint", "pytorch", "onnxruntime"]
REQUANT_KEYS = ("requant", "pytorch_cpu")  # the settings that decide how a layer rounds


WEIGHT_MODELS: dict[str, int] = {"mesh": 8, "drift": 9}  # per-chip weight realisations -> Philox stream number
# (after the noise effects' 1-7; fixed forever, like theirs)
INPUT_MODELS: dict[str, int] = {"dac": 10}  # per-inference input conversion (DACConfig.enob) -> Philox stream number


class LayerHardware(OptionalSections):
    """The settings that apply to one layer (the global ones, or after per-layer overrides)."""

    optional_sections: ClassVar[tuple[str, ...]] = ("photonics", "mesh", "drift", "dac", "detector")

    requant: RequantMode = Field("float", description="Requantization mode: float, fixedpoint, pytorch or onnxruntime.")
    pytorch_cpu: Literal["auto", "avx2", "avx512-vnni", "amx"] = Field(
        "auto", description="CPU family whose PyTorch kernels `requant: pytorch` reproduces (auto: this machine's)."
    )
    tile: int | None = Field(None, ge=1, description="Dot-product length L of one optical core; None: one tile.")
    adc: ADCConfig = Field(default_factory=ADCConfig, description="Per-tile ADC.")
    accumulator: AccumulatorConfig = Field(default_factory=AccumulatorConfig, description="Digital accumulator.")
    noise: NoiseConfig = Field(default_factory=NoiseConfig, description="Analog noise.")
    photonics: PhotonicsConfig | None = Field(
        None, description="Physical description of the optical core; its link budget sets noise.output and "
                          "noise.weight_static (docs/photonics.md). null: noise as given.")
    mesh: MeshConfig | None = Field(
        None, description="A coherent core's weights as MZI meshes (Clements) with phase, splitter and loss errors, "
                          "drawn per chip (docs/mesh.md). null: independent weights.")
    drift: DriftConfig | None = Field(
        None, description="Weights that drift in time (microring temperature, PCM conductance) and their "
                          "recalibration, drawn per chip (docs/drift.md). null: no drift.")
    dac: DACConfig | None = Field(
        None, description="The input DACs and modulators: effective bits and transfer (docs/hardware.md, step 1). "
                          "null: exact inputs.")
    detector: DetectorConfig | None = Field(
        None, description="Photodetector / TIA saturation before the ADC (docs/hardware.md, step 5). null: none.")

    @model_validator(mode="after")
    def _noise_from_one_place(self) -> LayerHardware:
        """Refuse noise.output or noise.weight_static beside photonics, whose link budget derives them."""
        if self.photonics is not None:
            given = [key for key, on in (("noise.output", self.noise.output.resolved_sigma),
                                         ("noise.weight_static", self.noise.weight_static.sigma)) if on]
            if given:
                raise ValueError(f"{' and '.join(given)} cannot be given beside photonics, whose link budget "
                                 "derives them; remove one of them")
        if self.mesh is not None and self.photonics is not None and self.photonics.architecture != "coherent":
            raise ValueError("mesh describes the MZI meshes of a coherent core, but photonics.architecture is "
                             f"{self.photonics.architecture!r}; set it to coherent or remove mesh")
        return self

    def weight_models(self) -> dict[str, MeshConfig | DriftConfig]:
        """The per-chip models of how programmed weights are realised, in the order they apply: mesh, drift."""
        return {name: getattr(self, name) for name in WEIGHT_MODELS if getattr(self, name) is not None}

    @property
    def is_random(self) -> bool:
        """True when any noise effect is on (results then depend on the seed and repeat); a photonic core always
        has noise (finite power), meshes and drift are drawn per chip, DAC noise per inference."""
        return (any(effect.on for effect in self.noise.effects().values()) or self.photonics is not None
                or bool(self.weight_models()) or (self.dac is not None and self.dac.enob is not None))

    @property
    def calibrated_adc(self) -> bool:
        """True when the layer's ADC range is measured on calibration data."""
        return self.adc.bits is not None and self.adc.range == "calibrated"

    @property
    def is_ideal(self) -> bool:
        """True when the layer computes exactly what the ideal integer engine computes."""
        return (self.adc.bits is None and self.accumulator.overflow == "none" and not self.is_random
                and (self.dac is None or not self.dac.on) and self.detector is None)


HardwareOverride: type[LayerOverride] = override_model(LayerHardware)


class HardwareConfig(LayerHardware, PerLayer):
    """The whole engine model: global settings plus per-layer overrides (later entries win).

    Example:
        >>> hw = HardwareConfig.model_validate({"tile": 64, "adc": {"bits": 8}, "noise": {"output": {"sigma": 0.01}},
        ...                                     "layers": [{"match": "conv1", "noise": {"output": {"sigma": 0}}}]})
    """

    preset_kind: ClassVar[str | None] = "hw"
    layer_settings: ClassVar[type[StrictModel]] = LayerHardware
    layers: list[HardwareOverride] = Field(  # type: ignore[valid-type]
        default_factory=list, description="Per-layer overrides by glob.")

    def ideal(self) -> HardwareConfig:
        """The ideal engine with this config's requantization (REQUANT_KEYS, per-layer overrides included): the
        integer baseline the hardware is compared against must round as the hardware does."""
        layers = [{"match": o.match, **{k: getattr(o, k) for k in REQUANT_KEYS if getattr(o, k) is not None}}
                  for o in self.layers]
        return HardwareConfig.model_validate({**{k: getattr(self, k) for k in REQUANT_KEYS},
                                              "layers": [entry for entry in layers if len(entry) > 1]})


def load_hardware(hw: HardwareConfig | dict | str | Path | None) -> HardwareConfig:
    """A validated HardwareConfig from an instance, a plain dict, a YAML path, or None (ideal engine)."""
    return load_config(HardwareConfig, hw)


FLAG_KEYS = {"noise": "noise.output.sigma", "tile": "tile", "adc_bits": "adc.bits", "adc_range": "adc.range",
             "acc_bits": "accumulator.bits", "overflow": "accumulator.overflow",
             "requant": "requant"}  # CLI knob -> the setting it sets
ADC_RANGE_DEFAULT = "full"  # ADCConfig.range's default: +-FS, the worst case (nothing clips)


def parse_adc_range(value: str | float | None) -> Literal["full", "calibrated"] | float | None:
    """``--adc-range``: ``full``, ``calibrated`` or a fraction of full scale in (0, 1] (None: not given)."""
    if value is None or isinstance(value, float):
        return value
    text = str(value).strip().lower()
    if text in ("full", "calibrated"):
        return text  # type: ignore[return-value]
    try:
        fraction = float(text)
    except ValueError:
        fraction = math.nan
    if not 0 < fraction <= 1:  # also NaN
        raise PhotosimError(f"--adc-range {value!r}: give full (+-full scale, the worst case), calibrated (the "
                            "adc.percentile of each layer's tile values on the calibration split) or a fraction "
                            "of full scale in (0, 1], e.g. 0.25.")
    return fraction


def hardware_with_flags(hw: HardwareConfig, **flags: Any) -> HardwareConfig:
    """Apply the CLI's common knobs (noise, tile, adc_bits, adc_range, acc_bits, overflow, requant) over a config.

    ``adc_range`` (``full``, ``calibrated`` or a fraction, as text or a number) applies to an ADC only: given
    while no layer has ADC bits, it is refused rather than ignored."""
    if "adc_range" in flags:
        flags["adc_range"] = parse_adc_range(flags["adc_range"])
    config = with_settings(hw, {FLAG_KEYS[flag]: value for flag, value in flags.items()},
                           "command-line hardware options")
    if flags.get("adc_range") is not None and not has_adc(config):
        raise PhotosimError(f"--adc-range {flags['adc_range']} sets the range of an ADC, but no layer has one "
                            "(adc.bits is unset: the readout is ideal); add --adc-bits N or a --hw preset with "
                            "an ADC.")
    return config


def has_adc(hw: HardwareConfig) -> bool:
    """True when the global settings or a per-layer override give ADC bits."""
    return hw.adc.bits is not None or any(o.adc is not None and o.adc.bits is not None for o in hw.layers)


def describe_adc(adc: ADCConfig) -> str:
    """One phrase for a (resolved) ADC: its bits and range, e.g. ``8-bit, full-scale range (worst case)``."""
    if adc.bits is None:
        return "ideal readout (no ADC)"
    if adc.range == "full":
        return f"{adc.bits}-bit, full-scale range (worst case)"
    if adc.range == "calibrated":
        return f"{adc.bits}-bit, calibrated range ({adc.percentile:g}th percentile of |tile value|)"
    return f"{adc.bits}-bit, range {adc.range:g} of full scale"
