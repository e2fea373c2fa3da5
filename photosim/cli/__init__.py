"""The `photosim` command line: a thin typer layer over the Python API, one module per kind of command.

Exit codes: 0 success, 2 bad input (a one-paragraph message, no traceback), 1 internal error.
"""

# isort: off
# each module registers its commands on the app, in this order in --help: the pipeline's order
from photosim.cli import models, interop, finetune, analysis, runs, sweeps  # noqa: F401
# isort: on
from photosim.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app()
