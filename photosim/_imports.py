"""Load user code named as ``path/to/file.py:NAME`` or ``package.module:NAME`` (models, noise, importers).

This runs the user's code, by design. A relative file path must lie inside the current folder and an
absolute one is taken as the user's own; a module name must be importable (installed or on sys.path).
Model files never reach this module: `photosim run` rebuilds float models from built-in and torchvision: names.

A file is imported as ``python file.py`` would run it: its own folder goes first on sys.path, so it imports
the modules beside it. Each user file's folder is remembered, so that an exception raised in the user's code
(here or later, e.g. in a model's forward or a noise function) can be reported with the user's file and line
(``user_code_location``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import sysconfig
import traceback
from pathlib import Path
from typing import Any

from photosim._files import require_file
from photosim.errors import PhotosimError


def import_file(path: Path) -> Any:
    """Import a Python file as a fresh module (registered in sys.modules so dataclasses etc. work)."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"photosim_user_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise PhotosimError(f"cannot import {str(path)!r} as a Python module; give a .py file.")
    user_module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = user_module
    folder = str(path.resolve().parent)
    _USER_FOLDERS.add(Path(folder))
    if folder not in sys.path:
        sys.path.insert(0, folder)  # as `python file.py` does: the file imports the modules beside it
    try:
        module_spec.loader.exec_module(user_module)
    except Exception as exc:
        del sys.modules[module_name]
        where = user_code_location(exc)
        raise PhotosimError(f"importing {str(path)!r} failed ({type(exc).__name__}: {exc})"
                            f"{f' {where}' if where else ''}; fix the file.") from exc
    return user_module


_USER_FOLDERS: set[Path] = set()  # folders of the user files and modules imported here (resolved)
_OWN_FOLDERS = tuple(Path(p).resolve() for p in {Path(__file__).parent, sysconfig.get_paths()["purelib"],
                                                  sysconfig.get_paths()["stdlib"]})


def _user_file(filename: str) -> bool:
    """True for a file in the folder of user code imported here (photosim, the standard library and installed
    packages excluded, even inside such a folder)."""
    path = Path(filename)
    if not path.is_absolute() or path.suffix != ".py":
        return False
    path = path.resolve()
    if any(path.is_relative_to(own) for own in _OWN_FOLDERS) or {"site-packages", "dist-packages"} & set(path.parts):
        return False
    return any(path.is_relative_to(folder) for folder in _USER_FOLDERS)


def user_code_location(exc: BaseException) -> str | None:
    """``at FILE, line N: CODE``: the innermost frame in user code of ``exc``'s traceback or of the exceptions
    it was raised from (a SyntaxError: its own file and line); None when the user's code is not involved."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, SyntaxError) and current.filename and _user_file(current.filename):
            return f"at {current.filename}, line {current.lineno}: {(current.text or '').strip()}"
        frames = [f for f in traceback.extract_tb(current.__traceback__) if _user_file(f.filename)]
        if frames:
            frame = frames[-1]
            return f"at {frame.filename}, line {frame.lineno}" + (f": {frame.line.strip()}" if frame.line else "")
        current = current.__cause__ or current.__context__
    return None


def _check_own_file(path: Path, spec: str, what: str) -> None:
    """A relative ``.py`` path must stay inside the current folder (after symlinks), so that a name written in
    a file someone sent cannot reach code elsewhere; an absolute path is the user's own choice."""
    if path.is_absolute():
        return
    cwd = Path.cwd().resolve()
    if not path.resolve().is_relative_to(cwd):
        raise PhotosimError(
            f"{what} {spec!r} names {str(path)!r}, which lies outside the current folder {str(cwd)!r}; photosim "
            "imports relative .py paths only from inside the current folder. Give the file's absolute path if "
            "you mean to run it."
        )


def import_extra(module: str, extra: str, purpose: str, alternative: str = "") -> Any:
    """Import ``module`` of one of photosim's optional extras, or say how to install the extra (a PhotosimError:
    exit 2). ``purpose`` names what needs it; ``alternative`` (optional) says how to do without."""
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] != package:
            raise  # the package is there, and something it imports is broken
        raise PhotosimError(f"{purpose} needs the Python package {package!r}, which is not installed; install "
                            f"photosim's {extra} extra: pip install 'photosim[{extra}]'"
                            + (f" ({alternative})." if alternative else ".")) from None


def load_object(spec: str, what: str) -> Any:
    """The object ``NAME`` of ``path/to/file.py:NAME`` or ``package.module:NAME``; ``what`` names it in errors."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise PhotosimError(f"{what} {spec!r} must be written path/to/file.py:NAME or package.module:NAME.")
    if source.endswith(".py"):
        path = Path(source)
        require_file(path, f"{what} file", f"check the path in {spec!r}")
        _check_own_file(path, spec, what)
        module = import_file(path)
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as exc:
            raise PhotosimError(f"{what} {spec!r}: cannot import module {source!r} ({exc}).") from None
        if getattr(module, "__file__", None):
            _USER_FOLDERS.add(Path(module.__file__).resolve().parent)
    obj = getattr(module, name, None)
    if obj is None:
        raise PhotosimError(f"{what} {spec!r}: {source!r} defines no {name!r}.")
    return obj


def call_object(spec: str, what: str, needs: str) -> Any:
    """Load ``spec`` with :func:`load_object` and call it with no arguments; ``needs`` says what it must return.

    A failure inside the user's code becomes a PhotosimError naming the spec (the traceback is chained).
    """
    function = load_object(spec, what)
    if not callable(function):
        raise PhotosimError(f"{what} {spec!r} is not callable; name a class or function that returns {needs}.")
    try:
        return function()
    except Exception as exc:
        where = user_code_location(exc)
        raise PhotosimError(
            f"calling {spec} failed ({type(exc).__name__}: {exc}){f' {where}' if where else ''}; it must return "
            f"{needs} when called with no arguments."
        ) from exc
