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

__all__ = ["ci95_half_width", "summarize", "write_csv_atomic"]


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
