"""Figures: sweep results (accuracy vs each swept axis, or any x / y / hue view of a results CSV) and
per-layer bar charts.

Each sweep marker is the mean over repeats with its 95% CI as error bar; the float baseline (``float_<y>``
when the table has it) is drawn dashed. Figures are rendered with the Agg backend straight to the file, in the
format its suffix names (PLOT_FORMATS), without pyplot, so plotting never touches the caller's matplotlib state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from photosim._files import atomic_path, require_file
from photosim.errors import PhotosimError
from photosim.experiments.report import column_name, in_percent, summarize

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


def _check_columns(frame: pd.DataFrame, x: str, y: str | None, hue: Sequence[str]) -> None:
    """Every named column exists and y is numeric, else an error listing the columns."""
    missing = [c for c in [x, *([y] if y else []), *hue] if c not in frame.columns]
    if missing:
        raise PhotosimError(f"no column {', '.join(map(repr, missing))} in the results; available: "
                            f"{', '.join(map(str, frame.columns))}.")
    if y is not None and not pd.api.types.is_numeric_dtype(frame[y]):
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


XSCALES = ("auto", "linear", "log")
OTHERS = ("facet", "pool")  # what a plot does with swept columns it neither shows nor fixes
MAX_PANELS = 12


def setting_columns(frame: pd.DataFrame) -> list[str]:
    """The columns of a results table that are a point's settings (variant, the fields of a point and their dotted
    keys, an axis over a whole section), not what was measured."""
    from photosim.experiments.point import BaseSection

    fields = set(BaseSection.model_fields)
    return [str(c) for c in frame.columns if c in ("variant", "finetuned") or str(c).split(".")[0] in fields]


def pooled_columns(frame: pd.DataFrame, x: str, hue: Sequence[str] = ()) -> list[str]:
    """Settings that take more than one value within some plotted marker (one x value of one hue line): what its
    mean would average over. A setting that moves with x or the hue (a zipped partner, the keys of a preset on x)
    is not pooled."""
    _check_columns(frame, x, None, hue)
    candidates = [c for c in setting_columns(frame) if c not in {x, *hue}]
    if not candidates or frame.empty:
        return []
    grouped = frame.groupby([x, *hue], dropna=False, sort=False)
    return independent_columns(frame, [c for c in candidates if (grouped[c].nunique(dropna=False) > 1).any()],
                               [x, *hue])


def independent_columns(frame: pd.DataFrame, columns: Sequence[str], given: Sequence[str] = ()) -> list[str]:
    """``columns`` less those that the earlier ones (``variant`` first) and ``given`` determine: the settings a
    preset or variant carries along, the partner of a zipped axis."""
    chosen: list[str] = []
    for column in sorted(columns, key=lambda c: c != "variant"):
        known = [*given, *chosen]
        if not known or (frame.groupby(known, dropna=False, sort=False)[column].nunique(dropna=False) > 1).any():
            chosen.append(column)
    return chosen


def choose_xscale(values: Sequence[float] | pd.Series) -> str:
    """``log`` for positive values spread over more than a decade more evenly in log than linearly (0.0003,
    0.001, ..., 0.03; 1, 2, 4, ..., 64), ``symlog`` for such values plus zero, else ``linear``."""
    unique = np.unique(np.asarray(values, dtype=float))
    positive = unique[unique > 0]
    if len(positive) < 3 or (unique < 0).any() or positive[-1] / positive[0] < 20:
        return "linear"

    def unevenness(points: np.ndarray) -> float:
        gaps = np.diff(points)
        return float(gaps.std() / gaps.mean())

    if unevenness(np.log(positive)) >= unevenness(positive):
        return "linear"
    return "symlog" if (unique == 0).any() else "log"


def where_rows(frame: pd.DataFrame, where: Mapping[str, str]) -> pd.DataFrame:
    """The rows whose columns hold the given values (``{"hw.adc.bits": "6"}``; a number matches any way it is
    written, ``None`` matches a missing value)."""
    keep = pd.Series(True, index=frame.index)
    for column, value in where.items():
        _check_columns(frame, column, None, ())
        try:
            number = float(value)
        except ValueError:
            number = None
        cells = frame[column]
        match = cells.map(_text) == value
        if number is not None and pd.api.types.is_numeric_dtype(cells):
            match |= np.isclose(cells.astype(float), number, rtol=1e-12, atol=0)
        if not match.any():
            values = ", ".join(dict.fromkeys(map(_text, cells)))
            raise PhotosimError(f"--where {column}={value} matches no row; {column} takes the values {values}.")
        keep &= match
    if not keep.any():
        raise PhotosimError(f"no row has all of {', '.join(f'{k}={v}' for k, v in where.items())}; fix fewer "
                            "columns.")
    return frame[keep]


def draw(frame: pd.DataFrame, x: str, y: str, hue: Sequence[str], out: str | Path, *, xlabel: str | None = None,
         title: str | None = None, pareto: bool = False, log_x: bool = False, xscale: str = "auto",
         facet: Sequence[str] = ()) -> Path:
    """Plot mean ``y`` (95% CI bars) against ``x``, one line per combination of the ``hue`` columns; save it.

    ``pareto`` marks the points of the front (lowest x for the highest mean y, e.g. energy against accuracy)
    over all lines; ``xscale`` is ``linear``, ``log`` or ``auto`` (log for log-spaced positive x: choose_xscale),
    ``log_x`` the same as ``xscale="log"``; ``facet`` draws one panel per combination of those columns."""
    _check_columns(frame, x, y, [*hue, *facet])
    if xscale not in XSCALES:
        raise PhotosimError(f"unknown x scale {xscale!r}; use one of {', '.join(XSCALES)}.")
    numeric_x = pd.api.types.is_numeric_dtype(frame[x]) and not frame[x].isna().any()
    if (pareto or log_x or xscale == "log") and not numeric_x:
        raise PhotosimError(f"--pareto and a log x scale need a numeric x column; {x!r} is not.")
    if log_x or xscale == "log":
        if (frame[x] <= 0).any():
            raise PhotosimError(f"a log x scale needs positive x values; {x!r} has {frame[x].min():g}. Use "
                                "--xscale linear (or auto: zero then gets a linear stretch).")
        scale = "log"
    else:
        scale = choose_xscale(frame[x]) if xscale == "auto" and numeric_x else "linear"
    panels = list(frame.groupby(list(facet), dropna=False, sort=False)) if facet else [((), frame)]
    if len(panels) > MAX_PANELS:
        raise PhotosimError(f"one panel per value of {', '.join(facet)} would be {len(panels)} panels (at most "
                            f"{MAX_PANELS}); fix some with --where KEY=VALUE, show one with --hue, or average over "
                            "them with --others pool.")
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(6.4, 4.4) if len(panels) == 1 else (4.6 * columns, 3.6 * rows + 0.6),
                 layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(rows, columns, sharey=True, squeeze=False)
    for ax in grid.flat[len(panels):]:
        ax.set_visible(False)
    categories = {label: i for i, label in enumerate(dict.fromkeys(map(_text, frame[x])))}
    for ax, (key, part) in zip(grid.flat, panels):
        _panel(ax, part, x, y, hue, categories, numeric_x, scale, pareto)
        ax.set_xlabel(xlabel or x)
        if facet:
            key = key if isinstance(key, tuple) else (key,)
            ax.set_title(", ".join(f"{f}={_text(v)}" for f, v in zip(facet, key)), fontsize="small")
    for ax in grid[:, 0]:
        ax.set_ylabel(f"{y} (mean, 95% CI)")
    heading = title or f"{y} vs {x}" + (f" by {', '.join(hue)}" if hue else "")
    if facet:
        fig.suptitle(f"{heading}, one panel per {', '.join(facet)}", fontsize="medium")
    else:
        grid[0, 0].set_title(heading, fontsize="medium")
    return _save(grid[0, 0], out)


def _panel(ax: Axes, frame: pd.DataFrame, x: str, y: str, hue: Sequence[str], categories: dict[str, int],
           numeric_x: bool, scale: str, pareto: bool) -> None:
    """One panel of :func:`draw`: the lines, float baselines, Pareto front, x scale and ticks, legend."""
    baseline = f"float_{y}" if f"float_{y}" in frame and pd.api.types.is_numeric_dtype(frame[f"float_{y}"]) else None
    table = summarize(frame, [*hue, x], [y] + ([baseline] if baseline else []))
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
    if pareto:
        front = table.iloc[pareto_front(list(table[x]), list(table[f"{y}_mean"]))]
        ax.plot(front[x], front[f"{y}_mean"], color="black", linestyle=":", marker="*", markersize=12,
                drawstyle="steps-post", label="Pareto front", zorder=3)
    if scale == "symlog":
        ax.set_xscale("symlog", linthresh=float(table[x][table[x] > 0].min()))
    elif scale == "log":
        ax.set_xscale("log")
    if not numeric_x:
        ax.set_xticks(range(len(categories)), list(categories), rotation=30 if len(categories) > 4 else 0)
        ax.set_xlim(-0.5, len(categories) - 0.5)
    elif table[x].nunique() <= 12:  # a tick at each value, labelled in short form, no minor labels
        values = sorted(table[x].unique())
        ax.set_xticks(values, [f"{v:g}" for v in values], rotation=30 if len(values) > 6 else 0)
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="x-small")


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
                  hue: Sequence[str] = (), y: str = "top1_pct") -> list[Path]:
    """``y`` vs each swept axis (its first key; a zip group counts as one axis), the other axes as hue, x on a
    log scale when its values are log-spaced (choose_xscale).

    Hue columns that take a single value in ``results`` are dropped; nothing is drawn without ``y``.
    """
    results = in_percent(results)
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
    """File name of the default plot of ``y`` against ``x`` in a sweep's results directory (``top1_vs_<x>.png``
    for the accuracy: file names stay those of earlier versions)."""
    return f"{y.removesuffix('_pct')}_vs_{x}.png"


def plot_path(csv: str | Path, x: str, y: str = "top1_pct", hue: Sequence[str] | None = None,
              out: str | Path | None = None) -> Path:
    """Where :func:`plot_results` writes: ``out``, or ``<y>_vs_<x>[_by_<hue>].png`` (``top1`` for top1_pct) in the
    folder ``out`` names (beside the CSV without ``out``)."""
    name = f"{y.removesuffix('_pct')}_vs_{x}" + (f"_by_{'_'.join(hue)}" if hue else "") + ".png"
    if out is None:
        return Path(csv).parent / name
    return Path(out) / name if Path(out).is_dir() else Path(out)


def read_results(csv: str | Path) -> pd.DataFrame:
    """A results CSV, accuracy in percent (one of an earlier photosim version converted from fractions)."""
    csv = Path(csv)
    require_file(csv, "results file", "give the results.csv a sweep wrote")
    try:
        frame = pd.read_csv(csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise PhotosimError(f"{csv} is not a readable CSV ({exc}); give the results.csv a sweep wrote.") from None
    return in_percent(frame)


def plot_results(csv: str | Path, x: str, y: str = "top1_pct", hue: Sequence[str] | None = None,
                 out: str | Path | None = None, *, pareto: bool = False, log_x: bool = False, xscale: str = "auto",
                 others: str = "facet", where: Mapping[str, str] | None = None,
                 note: Callable[[str], None] | None = None) -> Path:
    """Any view of a results CSV: mean ``y`` vs ``x`` per ``hue`` combination; returns the plot's path.

    ``out`` is the plot file (its suffix names the format: PLOT_FORMATS), or a folder to write the default name
    ``<y>_vs_<x>[_by_<hue>].png`` into; it defaults to the CSV's folder. ``where`` keeps the rows with the given
    column values. Swept settings the plot neither shows (x, hue) nor fixes (``where``) are never averaged
    silently: ``others="facet"`` draws one panel per combination of them, ``"pool"`` averages over them and
    calls ``note`` with a sentence naming them. Accuracy columns are percent; ``top1`` means ``top1_pct``.
    """
    if others not in OTHERS:
        raise PhotosimError(f"unknown --others {others!r}; use one of {', '.join(OTHERS)}.")
    path = plot_path(csv, x, y, hue, out)
    frame = read_results(csv)
    x, y = column_name(x, frame), column_name(y, frame)
    hue = [column_name(h, frame) for h in hue or []]
    frame = where_rows(frame, where or {})
    pooled = pooled_columns(frame, x, hue)
    if pooled and note is not None:
        shown = "not on x, hue or --where"
        note(f"note: each marker averages over {', '.join(pooled)} ({shown}); --others facet draws one panel per "
             "value instead, --hue or --where KEY=VALUE shows or fixes them." if others == "pool" else
             f"note: one panel per value of {', '.join(pooled)} ({shown}); --hue or --where KEY=VALUE shows or "
             "fixes them, --others pool averages over them.")
    facet = pooled if others == "facet" else []
    return draw(frame, x, y, hue, path, pareto=pareto, log_x=log_x, xscale=xscale, facet=facet)
