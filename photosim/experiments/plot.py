"""Figures: sweep results (accuracy vs each swept axis, or any x / y / hue view of a results CSV) and
per-layer bar charts.

Each sweep marker is the mean over repeats with its 95% CI as error bar; the float baseline (``float_<y>``
when the table has it) is drawn dashed. Figures are rendered with the Agg backend straight to the file, in the
format its suffix names (PLOT_FORMATS), without pyplot, so plotting never touches the caller's matplotlib state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from photosim._files import atomic_path, require_file
from photosim.errors import PhotosimError
from photosim.experiments.report import summarize

PLOT_FORMATS = sorted(set(FigureCanvasAgg.get_supported_filetypes()) - {"pgf"})  # pgf needs a LaTeX installation


def plot_format(path: str | Path) -> str:
    """The format a plot at ``path`` is written in, named by its suffix; a missing or unknown one is refused (a
    PNG written to ``plot.xyz`` would be a file nothing opens by its name)."""
    suffix = Path(path).suffix.lower().removeprefix(".")
    if suffix not in PLOT_FORMATS:
        problem = f"its suffix .{suffix} is no image format" if suffix else "it has no suffix naming a format"
        raise PhotosimError(f"cannot write a plot to {str(path)!r}: {problem}; end the file name with one of "
                            f"{', '.join('.' + f for f in PLOT_FORMATS)} (what matplotlib writes), or give an "
                            "existing folder for the default name.")
    return suffix


def _check_columns(frame: pd.DataFrame, x: str, y: str, hue: Sequence[str]) -> None:
    """Every named column exists and y is numeric, else an error listing the columns."""
    missing = [c for c in [x, y, *hue] if c not in frame.columns]
    if missing:
        raise PhotosimError(f"no column {', '.join(map(repr, missing))} in the results; available: "
                            f"{', '.join(map(str, frame.columns))}.")
    if not pd.api.types.is_numeric_dtype(frame[y]):
        numeric = [str(c) for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
        raise PhotosimError(f"--y {y!r} is not a numeric column; numeric columns: {', '.join(numeric)}.")


def _text(value: object) -> str:
    return "None" if pd.isna(value) else str(value)


def pareto_front(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower x, higher y), in increasing x."""
    front, best = [], -np.inf
    for i in sorted(range(len(xs)), key=lambda i: (xs[i], -ys[i])):
        if ys[i] > best:
            front.append(i)
            best = ys[i]
    return front


def draw(frame: pd.DataFrame, x: str, y: str, hue: Sequence[str], out: str | Path, *, xlabel: str | None = None,
         title: str | None = None, pareto: bool = False, log_x: bool = False) -> Path:
    """Plot mean ``y`` (95% CI bars) against ``x``, one line per combination of the ``hue`` columns; save it.

    ``pareto`` marks the points of the front (lowest x for the highest mean y, e.g. energy against accuracy)
    over all lines; ``log_x`` draws x on a log scale (both need a numeric x)."""
    _check_columns(frame, x, y, hue)
    baseline = f"float_{y}" if f"float_{y}" in frame and pd.api.types.is_numeric_dtype(frame[f"float_{y}"]) else None
    table = summarize(frame, [*hue, x], [y] + ([baseline] if baseline else []))
    numeric_x = pd.api.types.is_numeric_dtype(table[x]) and not table[x].isna().any()
    categories = {label: i for i, label in enumerate(dict.fromkeys(map(_text, frame[x])))}
    ax = _axes(6.4)
    levels = []
    groups = table.groupby(list(hue), sort=False, dropna=False) if hue else [((), table)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        group = group.sort_values(x) if numeric_x else group.iloc[np.argsort([categories[_text(v)] for v in group[x]])]
        xs = group[x] if numeric_x else [categories[_text(v)] for v in group[x]]
        line = ax.errorbar(xs, group[f"{y}_mean"], yerr=group[f"{y}_ci95"].fillna(0), marker="o", capsize=3,
                           label=", ".join(f"{h}={_text(v)}" for h, v in zip(hue, key)) or None)
        if baseline:
            levels.append((line.lines[0].get_color(), float(group[f"{baseline}_mean"].mean())))
    _draw_baselines(ax, levels, baseline)
    if (pareto or log_x) and not numeric_x:
        raise PhotosimError(f"--pareto and --log-x need a numeric x column; {x!r} is not.")
    if pareto:
        front = table.iloc[pareto_front(list(table[x]), list(table[f"{y}_mean"]))]
        ax.plot(front[x], front[f"{y}_mean"], color="black", linestyle=":", marker="*", markersize=12,
                drawstyle="steps-post", label="Pareto front", zorder=3)
    if log_x:
        ax.set_xscale("log")
    elif not numeric_x:
        ax.set_xticks(range(len(categories)), list(categories), rotation=30 if len(categories) > 4 else 0)
        ax.set_xlim(-0.5, len(categories) - 0.5)
    if numeric_x and not log_x and table[x].nunique() <= 12:
        ax.set_xticks(sorted(table[x].unique()))
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(f"{y} (mean, 95% CI)")
    ax.set_title(title or f"{y} vs {x}" + (f" by {', '.join(hue)}" if hue else ""), fontsize="medium")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="x-small")
    return _save(ax, out)


def draw_bars(labels: Sequence[str], values: Sequence[float], ylabel: str, out: str | Path, *,
              title: str | None = None) -> Path:
    """One bar per label (in the given order, labels slanted when many), saved at ``out`` (format by suffix)."""
    ax = _axes(max(6.4, 0.45 * len(labels) + 2))
    ax.bar(range(len(labels)), values, color="tab:blue")
    ax.set_xticks(range(len(labels)), list(labels), rotation=45 if len(labels) > 4 else 0,
                  ha="right" if len(labels) > 4 else "center", fontsize="small")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize="medium")
    ax.grid(axis="y", alpha=0.3)
    return _save(ax, out)


def _axes(width: float) -> Axes:
    """The axes of a new Agg figure ``width`` inches wide (4.4 high), outside pyplot's state."""
    fig = Figure(figsize=(width, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    return fig.subplots()


def _save(ax: Axes, out: str | Path) -> Path:
    """Write the axes' figure at 150 dpi at ``out``, atomically, in the format its suffix names."""
    out = Path(out)
    fmt = plot_format(out)
    with atomic_path(out) as tmp:
        ax.figure.savefig(tmp, dpi=150, format=fmt)
    return out


def _draw_baselines(ax: Axes, levels: list[tuple[str, float]], name: str | None) -> None:
    """One dashed line when every curve shares its float baseline, else one per curve in its color."""
    values = [v for _, v in levels if not np.isnan(v)]
    if not values:
        return
    if np.allclose(values, values[0]):
        ax.axhline(values[0], color="black", linestyle="--", linewidth=1, label=f"float baseline ({name})")
        return
    for i, (color, value) in enumerate(levels):
        label = f"float baselines ({name}, dashed)" if i == 0 else None
        ax.axhline(value, color=color, linestyle="--", linewidth=1, label=label)


def default_plots(results: pd.DataFrame, axes: list[list[str]], out_dir: str | Path, *,
                  hue: Sequence[str] = (), y: str = "top1") -> list[Path]:
    """``y`` vs each swept axis (its first key; a zip group counts as one axis), the other axes as hue.

    Hue columns that take a single value in ``results`` are dropped; nothing is drawn without ``y``.
    """
    if y not in results:
        return []
    paths = []
    for axis in axes:
        x = axis[0]
        others = [*hue, *(other[0] for other in axes if other is not axis)]
        varying = [h for h in others if results[h].nunique(dropna=False) > 1]
        xlabel = x if len(axis) == 1 else f"{x} (zipped with {', '.join(axis[1:])})"
        paths.append(draw(results, x, y, varying, Path(out_dir) / default_plot_name(x, y), xlabel=xlabel))
    return paths


def default_plot_name(x: str, y: str = "top1") -> str:
    """File name of the default plot of ``y`` against ``x`` in a sweep's results directory."""
    return f"{y}_vs_{x}.png"


def plot_path(csv: str | Path, x: str, y: str = "top1", hue: Sequence[str] | None = None,
              out: str | Path | None = None) -> Path:
    """Where :func:`plot_results` writes: ``out``, or ``<y>_vs_<x>[_by_<hue>].png`` in the folder ``out``
    names (beside the CSV without ``out``)."""
    name = f"{y}_vs_{x}" + (f"_by_{'_'.join(hue)}" if hue else "") + ".png"
    if out is None:
        return Path(csv).parent / name
    return Path(out) / name if Path(out).is_dir() else Path(out)


def plot_results(csv: str | Path, x: str, y: str = "top1", hue: Sequence[str] | None = None,
                 out: str | Path | None = None, *, pareto: bool = False, log_x: bool = False) -> Path:
    """Any view of a results CSV: mean ``y`` vs ``x`` per ``hue`` combination; returns the plot's path.

    ``out`` is the plot file (its suffix names the format: PLOT_FORMATS), or a folder to write the default name
    ``<y>_vs_<x>[_by_<hue>].png`` into; it defaults to the CSV's folder.
    """
    csv = Path(csv)
    require_file(csv, "results file", "give the results.csv a sweep wrote")
    try:
        frame = pd.read_csv(csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise PhotosimError(f"{csv} is not a readable CSV ({exc}); give the results.csv a sweep wrote.") from None
    hue = list(hue or [])
    return draw(frame, x, y, hue, plot_path(csv, x, y, hue, out), pareto=pareto, log_x=log_x)
