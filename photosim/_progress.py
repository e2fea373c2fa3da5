"""Where progress bars go: stderr, and only on a terminal.

A rich progress bar on a console that is not a terminal cannot redraw itself: a transient one leaves a blank
line behind when it stops (five of them before ``photosim run``'s first output when piped), a lasting one its
last frame cut to 80 columns. So bars are drawn on stderr (stdout keeps the results) and only when stderr is a
terminal; piped or redirected, they are off.
"""

from __future__ import annotations

from rich.console import Console


def progress_console() -> Console:
    """The console progress bars draw on: stderr, looked up when called (so a redirected stderr is seen)."""
    return Console(stderr=True)


def progress_options(wanted: bool) -> dict:
    """Keyword arguments for rich's ``Progress`` / ``track``: stderr's console, transient, and disabled unless
    ``wanted`` and stderr is a terminal."""
    console = progress_console()
    return {"console": console, "transient": True, "disable": not (wanted and console.is_terminal)}
