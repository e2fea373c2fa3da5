"""The package's structure: cheap import, lazy public API, registries filled where they are defined."""

import subprocess
import sys

import photosim


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sys.modules))"
    return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())


def test_import_photosim_and_the_cli_import_no_heavy_library() -> None:
    for statement in ("import photosim", "import photosim.cli"):
        loaded = _modules_after(statement)
        assert not {"torch", "matplotlib", "ray", "onnx", "onnxruntime", "torchao"} & loaded, statement


def test_every_public_name_resolves_to_its_defining_module() -> None:
    for name in photosim.__all__:
        value = getattr(photosim, name)
        if name != "__version__":
            assert value.__module__ == photosim._EXPORTS[name], name


def test_requant_registry_holds_every_builtin_mode_on_its_own() -> None:
    loaded = _modules_after("from photosim.engine.requant import REQUANT_MODES; print(*REQUANT_MODES, file=sys.stderr)")
    assert {"photosim.engine.torch_requant", "photosim.engine.onnx_requant"} <= loaded
    from photosim.engine.requant import REQUANT_MODES

    assert set(REQUANT_MODES) == {"float", "fixedpoint", "pytorch", "onnxruntime"}
    for module in ("torch_requant", "onnx_requant"):  # each mode's module imports first without a cycle
        assert f"photosim.engine.{module}" in _modules_after(f"import photosim.engine.{module}")


def test_no_module_is_shadowed_by_a_function_of_the_same_name() -> None:
    import importlib
    import pkgutil

    for info in pkgutil.walk_packages(photosim.__path__, "photosim."):
        module = importlib.import_module(info.name)
        parent, _, leaf = info.name.rpartition(".")
        assert getattr(importlib.import_module(parent), leaf, module) is module, info.name
