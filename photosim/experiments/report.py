"""Result tables on disk and over repeats: atomic CSV writes and mean / std / 95% CI summaries.

Files are replaced atomically by :mod:`photosim._files` (temp file in the same folder, fsync,
``os.replace``) so a crash leaves either the old or the new version, never half a file.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from scipy import stats

from photosim._files import write_text_atomic
from photosim.errors import PhotosimError

__all__ = ["PERCENT_COLUMNS", "ci95_half_width", "column_name", "in_percent", "summarize", "write_csv_atomic"]

# Accuracy is percent in every table, CSV and plot photosim writes (as `run` prints it): the runners' rows hold
# fractions (0-1) under the plain names, and the tables rename and scale them at their edge. Drops (differences of
# two percentages) are percentage points.
PERCENT_COLUMNS = {"top1": "top1_pct", "top5": "top5_pct", "float_top1": "float_top1_pct",
                   "fake_quant_top1": "fake_quant_top1_pct", "ideal_top1": "ideal_top1_pct",
                   "drop_vs_float": "drop_vs_float_pts", "drop_vs_ideal": "drop_vs_ideal_pts",
                   "agreement": "agreement_pct", "agreement_drop": "agreement_drop_pts",  # sensitivity rankings
                   "test_top1": "test_top1_pct", "test_drop": "test_drop_pts"}


def write_csv_atomic(frame: pd.DataFrame, path: str | Path) -> None:
    """Write ``frame`` (without its index) as CSV, replacing ``path`` atomically."""
    write_text_atomic(path, frame.to_csv(index=False))


def ci95_half_width(std: pd.Series, n: pd.Series) -> pd.Series:
    """Half width of the two-sided 95% Student-t interval of a mean; NaN below two samples."""
    dof = (n - 1).where(n > 1)
    return pd.Series(stats.t.ppf(0.975, dof), index=std.index) * std / n.map(math.sqrt)


def summarize(frame: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    """One row per group of ``by``: ``n`` and ``<metric>_mean``, ``_std``, ``_ci95`` for each metric.

    Missing values in ``by`` form their own groups; groups keep their order of first appearance.
    """
    missing = [c for c in [*by, *metrics] if c not in frame.columns]
    if missing:
        raise PhotosimError(
            f"column(s) {', '.join(map(repr, missing))} not in the table; available: {', '.join(map(str, frame))}."
        )
    grouped = frame.groupby(by, dropna=False, sort=False)
    out = grouped.size().rename("n").to_frame()
    for metric in metrics:
        values = grouped[metric]
        mean, std, count = values.mean(), values.std(ddof=1), values.count()
        out[f"{metric}_mean"] = mean
        out[f"{metric}_std"] = std
        out[f"{metric}_ci95"] = ci95_half_width(std, count)
    return out.reset_index()


def in_percent(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its accuracy columns in percent (PERCENT_COLUMNS): fractions under the plain names (runner
    rows, results.csv files of earlier photosim versions) are scaled by 100 and renamed, in place of the column."""
    old = [c for c, new in PERCENT_COLUMNS.items()
           if c in frame and new not in frame and pd.api.types.is_numeric_dtype(frame[c])]
    if not old:
        return frame
    frame = frame.copy()
    for column in old:
        frame[column] = frame[column] * 100
    return frame.rename(columns={c: PERCENT_COLUMNS[c] for c in old})


def column_name(name: str, frame: pd.DataFrame) -> str:
    """The column of ``frame`` that ``name`` means: itself, or the percent column of an accuracy given by its plain
    name (``top1`` -> ``top1_pct``)."""
    if name not in frame and PERCENT_COLUMNS.get(name) in frame:
        return PERCENT_COLUMNS[name]
    return name
