"""The package's layers import only downwards along the data's path, and each list is declared once.

A module's imports (top-level and inside functions) are read from its source: hardware/ (configuration and physics)
must load without the engine, the engine without the front end or the experiments, and so on.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args

import pytest

import photosim
from photosim.engine.requant import REQUANT_MODES
from photosim.hardware import noise, rng
from photosim.hardware.config import (
    INPUT_MODELS,
    NOISE_EFFECTS,
    WEIGHT_MODELS,
    LayerHardware,
    NoiseConfig,
    RequantMode,
)

PACKAGE = Path(photosim.__file__).parent
FORBIDDEN = {  # package -> the packages it must never import
    "ir": {"hardware", "engine", "frontend", "experiments", "cli"},
    "hardware": {"engine", "frontend", "experiments", "cli"},
    "engine": {"frontend", "experiments", "cli"},
    "frontend": {"hardware", "experiments", "cli"},
    "experiments": {"cli"},
}


def imported_packages(path: Path) -> set[str]:
    """The photosim subpackages a module imports anywhere in its source (photosim.X.y -> X)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "photosim":
                names.update(f"photosim.{alias.name}" for alias in node.names)
    return {name.split(".")[1] for name in names if name.startswith("photosim.")}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_downwards(package: str) -> None:
    modules = sorted((PACKAGE / package).rglob("*.py"))
    assert modules
    wrong = {str(m.relative_to(PACKAGE)): sorted(imported_packages(m) & FORBIDDEN[package]) for m in modules}
    assert not {m: p for m, p in wrong.items() if p}


def test_the_reader_sees_what_it_checks(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("import torch\nfrom photosim.engine import kernels\n\ndef f():\n"
                      "    from photosim import frontend\n    import photosim.cli.common\n")
    assert imported_packages(source) == {"engine", "frontend", "cli"}


def test_the_config_names_the_engines_requant_modes() -> None:
    """hardware/config.py names the modes (it may not import the engine); they are the registered ones."""
    assert set(get_args(RequantMode)) == set(REQUANT_MODES)


def test_noise_effects_are_declared_once() -> None:
    """NoiseConfig's fields are the effects: each has its own stream, a law for what it acts on, and the RNG
    streams and the randomness test derive from them."""
    assert list(NOISE_EFFECTS) == list(NoiseConfig.model_fields)
    streams = [effect.stream for effect in NOISE_EFFECTS.values()] + [*WEIGHT_MODELS.values(), *INPUT_MODELS.values()]
    assert len(set(streams)) == len(streams)
    assert {**dict(zip(NOISE_EFFECTS, streams)), **WEIGHT_MODELS, **INPUT_MODELS} == rng.STREAMS
    for name, effect in NOISE_EFFECTS.items():
        if effect.acts_on == "tile":
            assert name in noise.TILE_NOISE
        on = {"function": "m:f"} if effect.acts_on == "custom" else {"sigma": 0.1}
        hw = LayerHardware.model_validate({"noise": {name: on}})
        assert hw.is_random and not hw.is_ideal, name
    weight_kinds = {kind for e in NOISE_EFFECTS.values() if e.acts_on == "weight"
                    for kind in get_args(e.model_fields["kind"].annotation)}
    assert weight_kinds == set(noise.WEIGHT_NOISE)
