"""Questions over finished results: the cheapest configuration that keeps accuracy within a drop of float.

``cheapest`` reads a sweep's results.csv (or its table), averages each point over its repeats (mean and 95% CI,
as summary.csv does) and returns the point with the lowest mean ``cost`` (any numeric column: energy per
inference, ADC bits, laser power, weight bits...) whose mean top-1 drop against float is at most ``max_drop``
points (``confident``: whose 95% upper bound is). Accuracy is percent, drops are percentage points
(report.PERCENT_COLUMNS). ``photosim best`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from photosim.errors import PhotosimError
from photosim.experiments.plot import independent_columns, read_results, setting_columns
from photosim.experiments.report import column_name, in_percent, summarize

ACCURACY, DROP = "top1_pct", "drop_vs_float_pts"


@dataclass(frozen=True)
class Cheapest:
    """The answer of :func:`cheapest`: the chosen point and every point that qualified, cheapest first.

    ``candidates`` has one row per qualifying point: its swept settings (``settings``), ``n`` (repeats) and
    ``<metric>_mean`` / ``_std`` / ``_ci95`` of top1_pct, drop_vs_float_pts and the cost column."""

    cost: str
    max_drop: float
    confident: bool
    candidates: pd.DataFrame
    settings: list[str]
    points: int  # points considered (with a cost value)

    @property
    def best(self) -> pd.Series:
        """The cheapest qualifying point (ties: the more accurate)."""
        return self.candidates.iloc[0]

    def describe(self) -> str:
        """One sentence: the point, its cost and its accuracy with 95% CIs."""
        b = self.best
        return (f"{_label(b, self.settings)}: {self.cost} {_mean_ci(b, self.cost, '.4g')}, top-1 "
                f"{_mean_ci(b, ACCURACY, '.2f')} %, {_mean_ci(b, DROP, '.2f')} points below float "
                f"(n = {int(b['n'])}); {len(self.candidates)} of {self.points} points keep top-1 within "
                f"{self.max_drop:g} point(s) of float{' at 95% confidence' if self.confident else ''}.")


def _mean_ci(row: pd.Series, metric: str, fmt: str) -> str:
    mean, ci = row[f"{metric}_mean"], row[f"{metric}_ci95"]
    return format(mean, fmt) + ("" if pd.isna(ci) or ci == 0 else f" ± {format(ci, fmt)}")


def _label(row: pd.Series, settings: list[str]) -> str:
    parts = " ".join(f"{c}={row[c]}" for c in settings)
    if "point" in row:
        return f"point {row['point']}" + (f" ({parts})" if parts else "")
    return parts or "the only point"


def point_table(results: pd.DataFrame, metrics: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """One row per point (by ``point_hash``, ``point`` or its settings): the settings that vary between points,
    ``n`` and mean / std / 95% CI of ``metrics``; and the names of those settings."""
    key = next((c for c in ("point_hash", "point") if c in results), None)
    settings = setting_columns(results)
    varying = independent_columns(results, [c for c in settings if results[c].nunique(dropna=False) > 1])
    by = [key] if key else varying or settings[:1]
    if not by:  # no way to tell points apart: the whole table is one point
        results, by = results.assign(point=0), ["point"]
    table = summarize(results, by, metrics)
    ids = [c for c in ("point",) if c in results and c not in by]
    first = results.drop_duplicates(by)[[*by, *ids, *(c for c in varying if c not in by)]]
    return first.merge(table, on=by), varying


def cheapest(results: pd.DataFrame | str | Path, cost: str = "energy_per_inference_J", max_drop: float = 1.0, *,
             confident: bool = False) -> Cheapest:
    """The point with the lowest mean ``cost`` whose mean top-1 drop against float is at most ``max_drop``
    percentage points (``confident``: whose 95% upper bound is; a point of one repeat has no bound and counts
    by its mean). ``results`` is a results.csv path or its table (accuracy as fractions or in percent).

    Example:
        >>> answer = cheapest("runs/energy/results.csv", cost="energy_per_inference_J", max_drop=1)
        >>> answer.best["energy_per_inference_J_mean"], answer.best["top1_pct_ci95"]
    """
    where = str(results) if isinstance(results, (str, Path)) else "the results"
    frame = read_results(results) if isinstance(results, (str, Path)) else in_percent(results)
    if not np.isfinite(max_drop):
        raise PhotosimError(f"--max-drop must be a finite number of points, got {max_drop}.")
    numeric = [str(c) for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])
               and c not in ("point", "repeat")]
    cost = column_name(cost, frame)
    if cost not in frame or cost not in numeric:
        problem = "is not a numeric column" if cost in frame else "is no column"
        raise PhotosimError(f"--cost {cost!r} {problem} of {where}; rank by one of {', '.join(numeric)}. Energy "
                            "columns (energy_per_inference_J, energy_per_mac_J, laser_J, ...) are there when the "
                            "points' hardware has a photonics section.")
    if DROP not in frame:
        if ACCURACY in frame and f"float_{ACCURACY}" in frame:
            frame = frame.assign(**{DROP: frame[f"float_{ACCURACY}"] - frame[ACCURACY]})
        else:
            raise PhotosimError(f"{where} has no top-1 accuracy against float (columns top1_pct and "
                                "float_top1_pct, or drop_vs_float_pts); give the results.csv of a sweep.")
    frame = frame[frame[DROP].notna()]
    metrics = list(dict.fromkeys([ACCURACY, DROP, cost] if ACCURACY in frame else [DROP, cost]))
    table, settings = point_table(frame[frame[cost].notna()], metrics)
    if table.empty:
        raise PhotosimError(f"no point of {where} has both a {cost} value and a drop against float (a float "
                            "baseline); choose another --cost.")
    drop = table[f"{DROP}_mean"] + (table[f"{DROP}_ci95"].fillna(0) if confident else 0)
    keep = table[drop <= max_drop]
    if keep.empty:
        closest = table.iloc[int(np.argmin(drop.to_numpy()))]
        bound = " (upper 95% bound)" if confident else ""
        raise PhotosimError(
            f"none of the {len(table)} points of {where} keeps top-1 within {max_drop:g} point(s) of float"
            f"{bound}: the smallest drop is {_mean_ci(closest, DROP, '.2f')} points, at "
            f"{_label(closest, settings)}. Allow a larger --max-drop, or run points closer to float "
            "(more bits, less noise).")
    order = keep.assign(_cost=keep[f"{cost}_mean"], _acc=-keep[f"{DROP}_mean"]).sort_values(["_cost", "_acc"],
                                                                                             kind="stable")
    candidates = order.drop(columns=["_cost", "_acc"]).reset_index(drop=True)
    return Cheapest(cost, float(max_drop), confident, candidates, settings, len(table))
