"""Shared machinery of the validated configs: load from object, dict, YAML file or preset name; readable errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from photosim.errors import PhotosimError

ConfigT = TypeVar("ConfigT", bound=BaseModel)
PRESETS_DIR = Path(__file__).with_name("configs")  # shipped presets: configs/<kind>/<name>.yaml


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    preset_kind: ClassVar[str | None] = None  # folder of PRESETS_DIR whose files name configs of this class


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
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {key!r}")
        else:
            parts.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return f"{source}: " + "; ".join(parts) + "."


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a missing file or bad syntax is a PhotosimError."""
    path = Path(path)
    if not path.is_file():
        raise PhotosimError(f"config file {path} does not exist.")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PhotosimError(f"{path} is not valid YAML: {exc}") from None


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
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise PhotosimError(describe_validation_error(exc, name)) from None


def with_overrides(config: ConfigT, **overrides: Any) -> ConfigT:
    """A validated copy of ``config`` with the non-None keyword values replacing its fields."""
    changes = {k: v for k, v in overrides.items() if v is not None}
    if not changes:
        return config
    merged = config.model_dump() | changes
    try:
        return type(config).model_validate(merged)
    except ValidationError as exc:
        raise PhotosimError(describe_validation_error(exc, "command-line options")) from None
