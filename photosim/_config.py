"""Shared machinery of the validated configs: load from object, dict, YAML file (photosim._yaml) or preset name;
readable errors; one way to merge settings (dotted keys, exclusive groups) used by CLI flags, per-layer
overrides and sweep axes."""

from __future__ import annotations

import copy
import functools
import typing
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    create_model,
    model_serializer,
    model_validator,
)
from pydantic.fields import FieldInfo

from photosim._yaml import read_yaml
from photosim.errors import PhotosimError

ConfigT = TypeVar("ConfigT", bound=BaseModel)
PRESETS_DIR = Path(__file__).with_name("configs")  # shipped presets: configs/<kind>/<name>.yaml
MAX_REPEATS = 10_000  # Monte Carlo chips of one run: far more than a 95% CI needs; each keeps its result rows


class StrictModel(BaseModel):
    """Base of every config: unknown keys and non-finite numbers are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    preset_kind: ClassVar[str | None] = None  # folder of PRESETS_DIR whose files name configs of this class
    exclusive: ClassVar[tuple[tuple[str, ...], ...]] = ()  # groups of keys of which one may be given

    @model_validator(mode="before")
    @classmethod
    def _one_of_each_group(cls, data: Any) -> Any:
        """Refuse two keys of one exclusive group given together (merges drop the others instead)."""
        for group in cls.exclusive if isinstance(data, dict) else ():
            given = [k for k in group if data.get(k) is not None]
            if len(given) > 1:
                raise ValueError(f"give one of {', '.join(group[:-1])} or {group[-1]}, not {' and '.join(given)}")
        return data


class OptionalSections(StrictModel):
    """A config whose ``optional_sections`` are left out of its dumps while they are None, so a config without them
    dumps (and a sweep point hashes) exactly as before they existed; a missing key validates back to None."""

    optional_sections: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_unset_sections(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The default dump without the optional sections that are None."""
        return {k: v for k, v in handler(self).items() if not (k in self.optional_sections and v is None)}


def section_models(models: list[type[BaseModel]], name: str) -> list[type[BaseModel]]:
    """The config classes that field ``name`` of ``models`` holds (``X``, ``X | None``, a union, a list of X)."""
    return [c for model in models if name in model.model_fields
            for c in _model_classes(model.model_fields[name].annotation)]


def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    """The config classes an annotation names, however nested in unions and lists."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [c for arg in typing.get_args(annotation) for c in _model_classes(arg)]


def merge_settings(model: type[BaseModel], base: Mapping[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` (settings of ``model``) with each dotted-key update set in order.

    The one merge rule of photosim: an update replaces the value at its key, creating sections on the way,
    and setting one key of an exclusive group (``sigma`` / ``snr_db`` / ``enob``) drops the group's other
    keys, so the later setting wins.
    """
    merged = copy.deepcopy(dict(base))
    for key, value in updates.items():
        *sections, leaf = key.split(".")
        node, models = merged, [model]
        for section in sections:
            if not isinstance(node.get(section), dict):
                node[section] = {}
            node, models = node[section], section_models(models, section)
        for group in (g for m in models for g in getattr(m, "exclusive", ()) if leaf in g):
            for other in set(group) - {leaf}:
                node.pop(other, None)
        node[leaf] = copy.deepcopy(value)
    return merged


def dotted(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections -> ``{"adc.bits": 8, ...}``: the leaves a nested settings dict sets."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _given(model: BaseModel, data: dict[str, Any]) -> dict[str, Any]:
    """The part of a dump of ``model`` that was given on input (recursively), not filled from defaults."""
    kept = {}
    for key, value in data.items():
        if key in model.model_fields_set:
            section = getattr(model, key)
            kept[key] = _given(section, value) if isinstance(section, BaseModel) and isinstance(value, dict) else value
    return kept


class LayerOverride(StrictModel):
    """Settings for the layers whose name matches ``match``; the keys it sets replace the global ones."""

    layer_settings: ClassVar[type[StrictModel]]  # the settings class override_model made this class from
    match: str = Field(description="fnmatch glob on the layer name (module path, e.g. conv1, layer4.*, fc).")

    @model_serializer(mode="wrap")
    def _as_given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Dump only what the entry sets, so a dumped override validates back to the same override."""
        return _given(self, handler(self))

    def settings(self) -> dict[str, Any]:
        """What this entry sets, by dotted key (``adc.bits``)."""
        return dotted(self.model_dump(exclude={"match"}))

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle by settings class and content: no module names the class override_model made (sweep points go
        to worker processes with their configs)."""
        return _override, (self.layer_settings, self.model_dump())


def _override(settings: type[StrictModel], data: dict[str, Any]) -> LayerOverride:
    """The override of ``settings`` that sets ``data`` (unpickling)."""
    return override_model(settings).model_validate(data)


def exact_glob(name: str) -> str:
    """The ``match`` glob that matches ``name`` and nothing else (``*``, ``?`` and ``[`` in brackets)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@functools.cache
def override_model(settings: type[StrictModel]) -> type[LayerOverride]:
    """The per-layer override class of ``settings``: ``match`` plus each setting, all optional (one per class)."""
    fields: dict[str, Any] = {name: (info.annotation, FieldInfo.merge_field_infos(info, default=None,
                                                                                   default_factory=None))
                              for name, info in settings.model_fields.items()}
    model = create_model(f"{settings.__name__}Override", __base__=LayerOverride, __doc__=LayerOverride.__doc__,
                         **fields)
    model.layer_settings = settings
    return model


class PerLayer:
    """Mixin of a config whose ``layers`` (a list of LayerOverride) override its ``layer_settings`` by glob."""

    layer_settings: ClassVar[type[StrictModel]]

    def for_layer(self, name: str) -> Any:
        """Effective settings of one layer: the global values, then every matching override in order."""
        values = typing.cast(BaseModel, self).model_dump(include=set(self.layer_settings.model_fields))
        for override in self.layers:  # type: ignore[attr-defined]
            if fnmatchcase(name, override.match):
                values = merge_settings(self.layer_settings, values, override.settings())
        return validated(self.layer_settings, values, f"the settings of layer {name!r} (global values with its "
                                                        "per-layer overrides)")

    def unmatched_overrides(self, names: list[str]) -> list[str]:
        """Globs in ``layers`` that match no layer name (almost always a typo)."""
        return [o.match for o in self.layers if not any(fnmatchcase(n, o.match) for n in names)]  # type: ignore[attr-defined]


def preset_names(kind: str) -> list[str]:
    """The shipped presets of one kind (``hw``, ``quant``), by name."""
    return sorted(p.stem for p in (PRESETS_DIR / kind).glob("*.yaml"))


def resolve_preset(source: str | Path, kind: str | None) -> Path:
    """A YAML path as given, or the shipped preset it names (a bare name such as ``photonic-8bit``)."""
    path = Path(source)
    if path.exists() or kind is None or path.suffix or len(path.parts) != 1:
        return path
    preset = PRESETS_DIR / kind / f"{path.name}.yaml"
    if not preset.is_file():
        raise PhotosimError(f"{str(source)!r} is neither a file nor a shipped {kind} preset; presets: "
                            f"{', '.join(preset_names(kind))}.")
    return preset


def describe_validation_error(exc: ValidationError, source: str) -> str:
    """One paragraph naming each bad key (dotted path) with what is allowed."""
    return f"{source}: {validation_problems(exc)}."


def validation_problems(exc: ValidationError) -> str:
    """Each bad key (dotted path) with what is allowed, separated by semicolons."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {key!r}")
        else:
            parts.append(f"{key}: {err['msg']} (got {_short(err.get('input'))})")
    return "; ".join(parts)


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters so a message stays one readable paragraph."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def load_config(cls: type[ConfigT], source: ConfigT | dict[str, Any] | str | Path | None) -> ConfigT:
    """Build a validated ``cls`` from an instance, a plain dict, a YAML path, or None (defaults)."""
    if isinstance(source, cls):
        return source
    name = cls.__name__
    if source is None:
        data: Any = {}
    elif isinstance(source, (str, Path)):
        data, name = read_yaml(resolve_preset(source, getattr(cls, "preset_kind", None))), str(source)
    else:
        data = source
    if not isinstance(data, dict):
        raise PhotosimError(f"{name}: expected a mapping of keys to values, got {type(data).__name__}.")
    return validated(cls, data, name)


def validated(cls: type[ConfigT], data: dict[str, Any], source: str) -> ConfigT:
    """``cls`` validated from ``data``; a bad key is a PhotosimError naming ``source`` and the key."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise PhotosimError(describe_validation_error(exc, source)) from None


def with_settings(config: ConfigT, updates: Mapping[str, Any], source: str) -> ConfigT:
    """A validated copy of ``config`` with the non-None dotted-key ``updates`` merged (``merge_settings``)."""
    changes = {k: v for k, v in updates.items() if v is not None}
    if not changes:
        return config
    return validated(type(config), merge_settings(type(config), config.model_dump(), changes), source)


def with_layer_overrides(config: ConfigT, settings: Mapping[str, Mapping[str, Any]], source: str) -> ConfigT:
    """A validated copy of a per-layer config with one override per named layer appended (so they win), each
    matching that exact name: ``{"conv1": {"w_bits": 4}}`` adds ``{match: conv1, w_bits: 4}``."""
    data = config.model_dump()
    data["layers"] = [*data["layers"], *({"match": exact_glob(name), **values} for name, values in settings.items())]
    return validated(type(config), data, source)


def with_overrides(config: ConfigT, **overrides: Any) -> ConfigT:
    """A validated copy of ``config`` with the non-None keyword values replacing its fields (CLI flags)."""
    return with_settings(config, overrides, "command-line options")
