"""File safety: atomic writes with the user's permissions, and checks of outputs and inputs before any work.

Outputs are replaced atomically (temp file in the same folder, fsync, ``os.replace``), so a crash or a full
disk leaves the old or the new version, never half a file. New files get ``0o666 & ~umask`` like any
program's; a replaced file keeps its mode. Commands check every output before they start computing: it
must be a writable file path (not a folder, not in a missing folder, not a device, not a symlink loop), and no
output may be an input of the same command. Inputs are checked before they are read: a regular file, not under
/proc or /sys (whose sizes say nothing about their content), at most MAX_INPUT_BYTES.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from photosim.errors import PhotosimError

Paths = Mapping[str, "str | Path | None"]
MAX_INPUT_BYTES = 16 << 30  # largest file photosim reads or hashes (weights, model files, results)
PSEUDO_FILESYSTEMS = (Path("/proc"), Path("/sys"))  # kernel files: "regular" files whose size is not their content


def _umask() -> int:
    """The process umask (reading it means setting it; set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """Permission bits for ``path``: those of the file it replaces, else what ``open`` would give a new file."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC, raised by Python (OSError) or reported inside another library's error text (safetensors)."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return f"os error {errno.ENOSPC}" in str(exc)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside ``path`` for the caller to write; on success it replaces ``path`` in one step.

    A symlink is written through, as ``open`` would. A full disk becomes one PhotosimError naming the folder;
    the old ``path`` and other outputs are kept.
    """
    path = Path(os.path.realpath(path))
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _mode_for(path))
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        if _disk_full(exc):
            raise PhotosimError(f"no space left on {path.parent.resolve()}; {path.name} was not written (the "
                                "files written before it are kept). Free some space and run again.") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: readers see the old or the new file, never a mix."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


def save_model_atomic(qmodel: Any, path: str | Path) -> None:
    """Write an integer model file (``QuantizedModel.save``) atomically, with the user's permissions."""
    with atomic_path(path) as tmp:
        qmodel.save(tmp)


def reject_directory(path: str | Path, what: str) -> None:
    """A folder given where a file is expected: say so (rather than "does not exist")."""
    if Path(path).is_dir():
        raise PhotosimError(f"{what} {str(path)!r} is a directory, not a file; give a file path.")


def reject_special(path: str | Path, what: str) -> None:
    """An existing ``path`` that is not a regular file, or lies under /proc or /sys: refuse it before reading (a
    pipe or device can block forever, /proc/self/pagemap claims hundreds of GB)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise PhotosimError(f"{what} {str(path)!r} is not a regular file (a device or a pipe); give a file.")
    real = Path(os.path.realpath(path))
    system = next((root for root in PSEUDO_FILESYSTEMS if real.is_relative_to(root)), None)
    if system is not None:
        raise PhotosimError(f"{what} {str(path)!r} is a kernel file under {system}, not data; give a file.")


def require_file(path: str | Path, what: str, hint: str, limit: int = MAX_INPUT_BYTES) -> None:
    """``path`` must be an existing regular file of at most ``limit`` bytes, outside /proc and /sys, checked
    before anything reads it; ``hint`` says how to fix the message's culprit."""
    reject_directory(path, what)
    reject_special(path, what)
    if not Path(path).is_file():
        raise PhotosimError(f"{what} {str(path)!r} does not exist; {hint}.")
    size = Path(path).stat().st_size
    if size > limit:
        raise PhotosimError(f"{what} {str(path)!r} is {size / 2**30:.1f} GiB, over photosim's limit of "
                            f"{limit / 2**30:g} GiB for a file it reads; {hint}.")


def check_writable(path: str | Path, what: str) -> None:
    """Refuse an output path that cannot be written, before any work; leaves nothing behind.

    The folder must exist and accept a new file (probed with a temp file, which also catches read-only
    mounts and /proc as root); an existing ``path`` must be a regular file, not a folder or a device.
    """
    path = Path(path)
    reject_symlink_loop(path, what)
    folder = Path(os.path.realpath(path)).parent
    if path.is_dir():
        raise PhotosimError(f"{what} {str(path)!r} is a directory; give a file path inside it.")
    if path.exists() and not path.is_file():
        raise PhotosimError(f"{what} {str(path)!r} is not a regular file (a device or pipe); give a file path.")
    if not folder.is_dir():
        raise PhotosimError(f"{what} {str(path)!r}: folder {str(path.parent)!r} does not exist; create it first.")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".probe")
    except OSError as exc:
        raise PhotosimError(f"{what} {str(path)!r} cannot be written: folder {str(path.parent)!r} refuses new files "
                            f"({exc.strerror}); choose another folder.") from None
    os.close(fd)
    os.unlink(probe)


def reject_symlink_loop(path: Path, what: str) -> None:
    """A symlink that leads back to itself (or too deep): refuse it, as nothing can be written through it."""
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PhotosimError(f"{what} {str(path)!r} is a symlink loop (it leads back to itself); give a file "
                                "path, or fix the link.") from None


def make_output_dir(path: str | Path, what: str) -> None:
    """Create (when missing) an output folder and check it holds new files, before any work; refuse an existing
    file, a symlink loop, a kernel folder (/proc, /sys), or a folder that cannot be created or refuses a probe
    file (read-only, immutable, not ours)."""
    path = Path(path)
    reject_symlink_loop(path, what)
    if path.exists() and not path.is_dir():
        raise PhotosimError(f"{what} {str(path)!r} is a file, not a folder; give a folder (it is created when "
                            "missing).")
    real = Path(os.path.realpath(path))
    if any(real.is_relative_to(root) for root in PSEUDO_FILESYSTEMS):
        raise PhotosimError(f"{what} {str(path)!r} lies in a kernel folder ({real}); choose a folder on a disk.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".photosim.", suffix=".probe")
    except OSError as exc:
        raise PhotosimError(f"{what} {str(path)!r} cannot hold new files ({exc.strerror}); choose another "
                            "folder.") from None
    os.close(fd)
    os.unlink(probe)


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same inode when both exist, else the same resolved path."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_outputs(outputs: Paths, inputs: Paths) -> None:
    """Preflight of a command's outputs (``{"--report": path}``): each writable, none an input or another output.

    Inputs that are not files (a preset name, a missing path) cannot be overwritten and are skipped.
    """
    named = {flag: Path(p) for flag, p in outputs.items() if p is not None}
    for flag, path in named.items():
        check_writable(path, flag)
    sources = {flag: Path(p) for flag, p in inputs.items() if p is not None and Path(p).is_file()}
    seen: dict[str, Path] = {}
    for flag, path in named.items():
        for other, source in [*sources.items(), *seen.items()]:
            if _same_file(path, source):
                role = "an input" if other in sources else "another output"
                raise PhotosimError(f"{flag} {str(path)!r} is the same file as {other} {str(source)!r} ({role}); "
                                    "writing it would destroy that file. Give a different output path.")
        seen[flag] = path


def spec_file(spec: str | None) -> Path | None:
    """The Python file of a ``path/to/file.py:NAME`` spec (an input of the command), else None."""
    source = (spec or "").rpartition(":")[0]
    return Path(source) if source.endswith(".py") else None
