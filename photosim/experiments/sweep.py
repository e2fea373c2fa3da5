"""Sweeps: one YAML file of base settings and axes -> validated points -> resumable results on disk.

A sweep file has a ``base`` section (one point's settings) and axes that vary it: ``grid`` (cartesian
product over dotted keys such as ``quant.w_bits`` or ``hw.noise.output.sigma``), ``zip`` (lists varied
together) and named ``variants`` (hand-written overrides). Points are ``variants x zip x grid``; an axis
or variant value is merged at its key by ``photosim._config.merge_settings`` (it replaces the value there;
setting ``sigma`` drops a ``snr_db`` or ``enob`` of the base). ``quant`` and ``hw`` may name a preset or YAML
file instead of a mapping, as ``--quant`` and ``--hw`` do: in ``base``, as a value of an axis over the whole
section, or in a variant (whose axes may then set keys inside it: variants are merged first, axes last). Every
point is validated before anything runs, into a typed ``BaseSection``. An empty file is refused; a file with only
``base`` is one point. A point with a ``finetune`` section (point.FinetuneSection) judges its PTQ model fine-tuned
under its own hardware (workflow.run_point); a point without one hashes as before that section existed.

A sweep file is a program: a custom noise function it names runs that code, as a Python script would.

A results directory holds ``sweep.json`` (the hashes of the sweep and of its base, and its config),
``points.jsonl`` (the durable log: one line per finished point, appended and fsynced), ``results.csv`` and
``summary.csv`` (rebuilt atomically from the log when a run ends or is interrupted; accuracy in percent, drops
in points: report.PERCENT_COLUMNS), the default plots and ``.lock`` (held while a run writes, naming its
process). Points are keyed by a hash of their complete configuration, so running the same sweep again skips
the finished ones, and so does a grown, shrunk or reordered grid (or new variants): every point whose settings
are unchanged is reused. What makes a directory another sweep's is its ``base`` (complete settings, presets
resolved): a changed base is refused without ``force``. ``sweep.json`` records the plots before they are
drawn; with ``force`` another sweep's recorded files are replaced, and a file this sweep would write that no
manifest records (a user's ``results.csv`` in a folder that was never a sweep's) stops the run instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar, TypeVar

import pandas as pd
from pydantic import BaseModel, Field, ValidationError, create_model, model_validator
from pydantic.fields import FieldInfo
from rich import progress as bars

from photosim._config import (
    OptionalSections,
    StrictModel,
    describe_validation_error,
    dotted,
    load_config,
    merge_settings,
    section_models,
    validation_problems,
)
from photosim._files import make_output_dir, write_text_atomic
from photosim._progress import progress_options
from photosim._version import __version__
from photosim.errors import PhotosimError
from photosim.experiments.executors import Group, Runner, check_executor, execute
from photosim.experiments.point import MODEL_KEYS, BaseSection
from photosim.experiments.report import PERCENT_COLUMNS, in_percent, summarize, write_csv_atomic
from photosim.frontend.qconfig import QuantSpec
from photosim.hardware.config import HardwareConfig

MANIFEST, LOG, RESULTS, SUMMARY, LOCK = "sweep.json", "points.jsonl", "results.csv", "summary.csv", ".lock"
ModelT = TypeVar("ModelT", bound=BaseModel)
PLOT_NAME = re.compile(r"[\w.-]+_vs_[\w.-]+\.png")  # the default plots' file names (experiments/plot.py)
SECTIONS: dict[str, type[StrictModel]] = {"quant": QuantSpec, "hw": HardwareConfig}  # a point's nested configs


def _written_field(name: str, field: FieldInfo) -> tuple[Any, FieldInfo]:
    """A field of BaseSection as a sweep file's ``base`` holds it: a nested config stays a dict (the axes set its
    keys before the point is validated) or names a preset or YAML file, as ``--quant`` and ``--hw`` do; an
    optional section (``finetune``) stays a dict or None."""
    if name in BaseSection.optional_sections:
        return dict[str, Any] | None, Field(None, description=field.description)
    if name not in SECTIONS:
        return field.annotation, field
    kind = SECTIONS[name].preset_kind
    return dict[str, Any] | str, Field(default_factory=dict, description=f"{field.description} A {kind} preset name "
                                                                             "or YAML file works too.")


class _WrittenSections(OptionalSections):
    """The optional sections of a written ``base``: those of a point."""

    optional_sections: ClassVar[tuple[str, ...]] = BaseSection.optional_sections


WrittenBase = create_model(
    "WrittenBase", __base__=_WrittenSections, __doc__="A sweep file's `base`: one point's settings as written.",
    **{name: _written_field(name, field) for name, field in BaseSection.model_fields.items()})


class SweepConfig(StrictModel):
    """A sweep file: base settings, axes and variants (see the module docstring and experiments/)."""

    name: str | None = Field(None, description="Title of the sweep (figures, summary table).")
    description: str = Field("", description="What the sweep answers.")
    base: WrittenBase = Field(default_factory=WrittenBase,  # type: ignore[valid-type]
                              description="Settings shared by every point.")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Cartesian product over dotted keys.")
    zip: dict[str, list[Any]] = Field(default_factory=dict, description="Equal-length lists varied together.")
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Named overrides by dotted key.")

    @model_validator(mode="after")
    def _has_points(self) -> SweepConfig:
        """Refuse a file without ``base`` and without axes (e.g. an empty one): it would run one default point."""
        if "base" not in self.model_fields_set and not (self.grid or self.zip or self.variants):
            raise ValueError("a sweep needs a `base` section (one point) or axes (grid, zip, variants); "
                             "this one sets none")
        return self

    @property
    def axes(self) -> list[list[str]]:
        """The swept axes: the zip group (its keys move together), then each grid key."""
        return ([list(self.zip)] if self.zip else []) + [[key] for key in self.grid]


@dataclass(frozen=True)
class Point:
    """One expanded point: what its axes set, and its complete validated settings."""

    index: int
    variant: str | None
    settings: dict[str, Any]
    config: BaseSection
    hash: str

    @property
    def label(self) -> str:
        """Short human description: variant and axis values."""
        return point_label(self.variant, self.settings)


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file and its expanded points."""

    config: SweepConfig
    points: list[Point]
    source: str

    @property
    def hash(self) -> str:
        """Identity of the sweep's points (base, axes, variants; not its name or description)."""
        return config_hash(self.config.model_dump(mode="json", exclude={"name", "description"}))

    @property
    def base_hash(self) -> str:
        """Identity of the experiment a results directory holds: the base's complete settings (base_identity)."""
        return config_hash(base_identity(self.config.base))

    def select(self, variants: Sequence[str] | None) -> list[Point]:
        """The points of the named variants (all points when None)."""
        if not variants:
            return self.points
        unknown = sorted(set(variants) - set(self.config.variants))
        if unknown:
            raise PhotosimError(f"{self.source}: no variant {', '.join(map(repr, unknown))}; the file defines "
                                f"{', '.join(self.config.variants) or 'no variants'}.")
        return [p for p in self.points if p.variant in variants]


@dataclass(frozen=True)
class SweepResult:
    """What ``run_sweep`` did: the tables it wrote, the plots, how many points ran and were skipped."""

    out_dir: Path
    results: pd.DataFrame
    summary: pd.DataFrame
    plots: list[Path]
    ran: int
    skipped: int


def point_label(variant: str | None, settings: dict[str, Any]) -> str:
    """``variant key=value ...``, or ``base`` for the only point of a sweep without axes."""
    parts = [variant] if variant else []
    return " ".join(parts + [f"{k}={v}" for k, v in settings.items()]) or "base"


def config_hash(value: Any) -> str:
    """16 hex digits of the SHA-256 of canonical JSON: equal configurations, equal hashes."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted keys; lists (and empty dicts) become JSON text so every value fits a CSV cell."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (dict, list, tuple)):
            flat[f"{prefix}{key}"] = json.dumps(value)
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_key(key: str, where: str) -> None:
    """Refuse a dotted key that names no setting, listing what is allowed at the level where it goes wrong."""
    models: list[type[BaseModel]] = [BaseSection]
    parts = key.split(".")
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not models:
            raise PhotosimError(f"{where}: key {key!r} goes inside {prefix!r}, which is a single value, not a "
                                f"section; set {prefix!r} itself.")
        fields = {name: field for model in models for name, field in model.model_fields.items()}
        if part not in fields:
            level = f"inside {prefix!r}" if prefix else "at the top level"
            raise PhotosimError(f"{where}: unknown key {key!r}; allowed {level}: {', '.join(fields)}.")
        models = section_models(models, part)


def _check_axes(config: SweepConfig, source: str) -> None:
    """Non-empty axes, equal zip lengths, every key known and set by exactly one axis or variant."""
    for section, axis in (("grid", config.grid), ("zip", config.zip)):
        for key, values in axis.items():
            check_key(key, f"{source}: {section}")
            if not values:
                raise PhotosimError(f"{source}: {section} key {key!r} has no values; give at least one.")
    lengths = {key: len(values) for key, values in config.zip.items()}
    if len(set(lengths.values())) > 1:
        raise PhotosimError(f"{source}: the zip lists must have equal lengths, got "
                            f"{', '.join(f'{k}: {n}' for k, n in lengths.items())}.")
    axis_keys = [*config.zip, *config.grid]
    for a, b in itertools.combinations(axis_keys, 2):
        if a == b or a.startswith(f"{b}.") or b.startswith(f"{a}."):
            raise PhotosimError(f"{source}: axes {a!r} and {b!r} set the same setting; keep one of them.")
    for name, overrides in config.variants.items():
        for key in overrides:
            check_key(key, f"{source}: variant {name!r}")
            # a variant may set a whole section (``hw: PRESET``) inside which an axis sets keys: axes merge last
            clash = next((a for a in axis_keys if a == key or key.startswith(f"{a}.")), None)
            if clash:
                raise PhotosimError(f"{source}: variant {name!r} sets {key!r}, which the axis {clash!r} also "
                                    "sets; remove it from one of them.")


def _combinations(config: SweepConfig) -> Iterator[tuple[str | None, dict[str, Any], dict[str, Any]]]:
    """(variant name, variant overrides, axis values) in order: variants, then zip, then grid (fastest)."""
    zipped = [dict(zip(config.zip, values)) for values in zip(*config.zip.values())] or [{}]
    gridded = [dict(zip(config.grid, values)) for values in itertools.product(*config.grid.values())]
    for name, overrides in config.variants.items() or [(None, {})]:
        for z in zipped:
            for g in gridded:
                yield name, overrides, {**z, **g}


def _base_settings(base: BaseModel) -> dict[str, Any]:
    """The base section as a dict of settings, a nested config named by preset or file replaced by its settings."""
    settings = base.model_dump()
    for name, cls in SECTIONS.items():
        if isinstance(settings[name], str):
            settings[name] = load_config(cls, settings[name]).model_dump()
    return settings


def base_identity(base: BaseModel) -> dict[str, Any]:
    """A sweep's base as what it means: complete settings with defaults filled in and presets resolved (a preset
    named or pasted, a default written out or left out: the same base); the settings as written, presets
    resolved, when the base alone is not a valid point (its axes complete it)."""
    settings = _base_settings(base)
    try:
        return BaseSection.model_validate(settings).model_dump(mode="json")
    except ValidationError:
        return json.loads(json.dumps(settings, default=str))


def _sections_resolved(updates: dict[str, Any], where: str) -> dict[str, Any]:
    """Axis or variant values setting a whole ``quant`` or ``hw`` section: a preset name or YAML file replaced by
    its settings (as in ``base``)."""
    resolved = dict(updates)
    for key, cls in SECTIONS.items():
        if isinstance(resolved.get(key), str):
            try:
                resolved[key] = load_config(cls, resolved[key]).model_dump()
            except PhotosimError as exc:
                raise PhotosimError(f"{where}: {exc}") from None
    return resolved


def load_sweep(source: SweepConfig | dict[str, Any] | str | Path) -> Sweep:
    """Validate a sweep (file, dict or config) and expand it into points; nothing runs."""
    config = load_config(SweepConfig, source)
    where = str(source) if isinstance(source, (str, Path)) else "sweep"
    _check_axes(config, where)
    base = _base_settings(config.base)
    points, seen = [], {}
    for index, (variant, overrides, settings) in enumerate(_combinations(config)):
        label = point_label(variant, settings)
        updates = {**_sections_resolved(overrides, f"{where}: variant {variant!r}"),
                   **_sections_resolved(settings, f"{where}, point {index} ({label})")}
        tree = merge_settings(BaseSection, base, updates)
        try:
            point_config = BaseSection.model_validate(tree)
        except ValidationError as exc:
            raise PhotosimError(describe_validation_error(exc, f"{where}, point {index} ({label})")) from None
        point = Point(index, variant, settings, point_config, config_hash(point_config.model_dump(mode="json")))
        if point.hash in seen:
            raise PhotosimError(f"{where}: points {seen[point.hash].index} ({seen[point.hash].label}) and {index} "
                                f"({point.label}) are the same configuration; remove the duplicate value.")
        seen[point.hash] = point
        points.append(point)
    return Sweep(config, points, where)


def group_points(points: list[Point]) -> list[Group]:
    """Points sharing a quantized model (same MODEL_KEYS), each group in order of first appearance."""
    groups: dict[str, Group] = {}
    for p in points:
        key = config_hash(p.config.model_dump(mode="json", include=set(MODEL_KEYS)))
        groups.setdefault(key, []).append((p.index, dict(p.config)))  # the fields by name, quant and hw typed
    return list(groups.values())


class _Manifest(BaseModel):
    """The keys of ``sweep.json`` that a later run reads back (the others only describe the sweep)."""

    sweep_hash: str
    source: str
    plots: list[str]
    base_hash: str | None = None  # absent in the manifests of photosim versions before grids could grow
    config: dict[str, Any] | None = None


class _LogRecord(BaseModel):
    """One line of ``points.jsonl``: a finished point's hash, parameters and rows."""

    hash: str
    variant: str | None
    params: dict[str, Any]
    rows: list[dict[str, Any]]
    point_wall_s: float


class ResultStore:
    """The results directory of one sweep: lock, manifest, append-only point log, CSVs rebuilt from the log.

    Use it as a context manager: the directory's lock is held from construction until exit.
    """

    def __init__(self, out_dir: str | Path, sweep: Sweep, force: bool = False) -> None:
        self.dir, self.sweep = Path(out_dir), sweep
        self.index = {p.hash: p.index for p in sweep.points}
        self._refuse_foreign(force)
        self._created = not self.dir.exists()
        make_output_dir(self.dir, "sweep output -o")
        self._lock = _take_lock(self.dir)
        self.records: dict[str, dict[str, Any]] = {}
        try:
            self._claim(force)
            self.records = self._read_log()
        except BaseException:
            self.close(failed=True)
            raise

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close(failed=kind is not None)

    def close(self, failed: bool = False) -> None:
        """Release the directory's lock; a directory this run created and that holds no finished point after a
        failure (an unreachable cluster, a bad point) is removed, so no empty results folder is left behind."""
        if failed and self._created and not self.records:
            for name in (MANIFEST, LOCK):
                (self.dir / name).unlink(missing_ok=True)
            self._lock.close()
            with contextlib.suppress(OSError):  # something else was written into it meanwhile: keep it
                self.dir.rmdir()
            return
        self._lock.close()

    def _refuse_foreign(self, force: bool) -> None:
        """Refuse a non-empty directory without a manifest (not a sweep's results directory) unless ``force``, and
        even then when it holds a file this sweep would write; checked before the lock is taken, so a refused
        folder is left exactly as it was."""
        if not self.dir.is_dir() or (self.dir / MANIFEST).exists():
            return
        if not force and any(p.name != LOCK for p in self.dir.iterdir()):
            raise PhotosimError(f"{self.dir} is not empty and holds no {MANIFEST}, so it is not a sweep's results "
                                "directory; choose another -o directory or pass --force to write into it anyway.")
        self._refuse_unrecorded(None)

    def _claim(self, force: bool) -> None:
        """Make the directory this sweep's, replacing another sweep's results only with ``force``; refuse (even
        with ``force``) when a file this run would write is there but not recorded as photosim's."""
        old = self._read_manifest()
        other = old is not None and not self._same_base(old)
        if other and not force:
            assert old is not None
            raise PhotosimError(
                f"{self.dir} holds the results of a different sweep ({old.source}): {self._base_change(old)}. A "
                "grown or reordered grid reuses the finished points, but a changed base is another experiment; "
                "choose another -o directory or pass --force to replace them."
            )
        self._refuse_unrecorded(old)
        if other:
            assert old is not None
            self._remove_old_results(old.plots)
        kept = [] if old is None or other else [p for p in old.plots if PLOT_NAME.fullmatch(p)]
        self.write_manifest(list(dict.fromkeys([*self.planned_plots(), *kept])))  # earlier plots stay recorded

    def _same_base(self, old: _Manifest) -> bool:
        """Whether the directory's sweep has this sweep's base (a manifest without a base hash: the one its config
        gives, or the same whole sweep)."""
        if old.sweep_hash == self.sweep.hash:
            return True
        old_base = old.base_hash or _written_base_hash(old.config)
        return old_base == self.sweep.base_hash

    def _base_change(self, old: _Manifest) -> str:
        """What differs between the directory's base and this sweep's: the changed keys when the manifest says."""
        try:
            before = dotted(base_identity(load_config(SweepConfig, old.config).base)) if old.config else None
        except (PhotosimError, ValidationError):
            before = None
        if before is None:
            return f"its base (hash {old.base_hash or old.sweep_hash}) is not this sweep's"
        after = dotted(base_identity(self.sweep.config.base))
        changed = [f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
                   if before.get(k) != after.get(k)]
        return f"its base differs in {'; '.join(changed[:8])}" + (f" and {len(changed) - 8} more" if len(changed) > 8
                                                                     else "")

    def _refuse_unrecorded(self, old: _Manifest | None) -> None:
        """Refuse a directory holding a file this sweep would write that its manifest ``old`` does not record as
        photosim's (every such file when there is no manifest): --force must never replace a user's file that
        merely has one of photosim's names."""
        recorded = set() if old is None else {LOG, RESULTS, SUMMARY, *old.plots}
        foreign = [name for name in [LOG, RESULTS, SUMMARY, *self.planned_plots()]
                   if name not in recorded and ((self.dir / name).exists() or (self.dir / name).is_symlink())]
        if foreign:
            whose = f"its {MANIFEST} does not list them" if old else f"the folder has no {MANIFEST}"
            raise PhotosimError(f"{self.dir} holds {', '.join(foreign)}, which this sweep would write but photosim "
                                f"did not write there ({whose}); --force replaces only files a sweep recorded as "
                                "its own. Move them away or choose another -o directory.")

    def planned_plots(self) -> list[str]:
        """File names of the default plots this sweep writes into the directory (recorded before they exist)."""
        from photosim.experiments.plot import default_plot_name

        return [default_plot_name(axis[0]) for axis in plot_axes(self.sweep.config)]

    def _read_manifest(self) -> _Manifest | None:
        """The directory's sweep.json, if any; a corrupt one is a PhotosimError saying how to recover."""
        path = self.dir / MANIFEST
        if not path.is_file():
            return None
        return _checked_json(path.read_bytes(), _Manifest, str(path),
                             "delete it and the results beside it, or choose another -o directory")

    def _remove_old_results(self, plots: list[str]) -> None:
        """Delete what photosim wrote for the old sweep: its fixed file names and plot-named files, plain files
        directly inside the directory only (never a link, a path with folders, or a name photosim does not use)."""
        for name in [LOG, RESULTS, SUMMARY, *(p for p in plots if PLOT_NAME.fullmatch(p))]:
            path = self.dir / name
            if path.is_file() and not path.is_symlink():
                path.unlink()

    def write_manifest(self, plots: list[str]) -> None:
        """sweep.json: what this directory belongs to, and the plot files (names) photosim writes into it."""
        manifest = {"sweep_hash": self.sweep.hash, "base_hash": self.sweep.base_hash, "source": self.sweep.source,
                    "points": len(self.sweep.points),
                    "photosim_version": __version__, "plots": plots,
                    "config": self.sweep.config.model_dump(mode="json")}
        write_text_atomic(self.dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")

    def _read_log(self) -> dict[str, dict[str, Any]]:
        """Finished points by hash; a torn last line (crash while appending) is cut off."""
        path = self.dir / LOG
        if not path.is_file():
            return {}
        data = path.read_bytes()
        *lines, torn = data.split(b"\n")
        records = {}
        for number, line in enumerate(lines, 1):
            record = _checked_json(line, _LogRecord, f"{path} line {number}",
                                   "delete that line (its point will run again) and run the sweep again").model_dump()
            records[record["hash"]] = record
        if torn:
            with path.open("r+b") as handle:
                handle.truncate(len(data) - len(torn))
        return records

    def add(self, point: Point, rows: list[dict[str, Any]], wall_s: float) -> None:
        """Append one finished point to the log (flushed and fsynced); the CSVs are rebuilt when the run ends."""
        record = {"hash": point.hash, "variant": point.variant, "params": flatten(point.config.model_dump(mode="json")),
                  "rows": [flatten(row) for row in rows], "point_wall_s": wall_s}
        line = json.dumps(record, default=_jsonable) + "\n"
        with (self.dir / LOG).open("ab") as handle:
            handle.write(line.encode())
            handle.flush()
            os.fsync(handle.fileno())
        self.records[point.hash] = json.loads(line)

    def write_tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Rebuild results.csv and summary.csv from the log (atomically); return both tables."""
        results = self.results()
        summary = self.summary(results)
        if not results.empty:
            write_csv_atomic(results, self.dir / RESULTS)
            write_csv_atomic(summary, self.dir / SUMMARY)
        return results, summary

    def results(self) -> pd.DataFrame:
        """One row per (point, repeat), in point order: ids, parameters, runner metrics, point wall time.

        An axis over a whole section (``hw: [PRESET, ...]``, ``hw.noise: [{...}]``) has a column of its own holding
        the value as written (a preset name, or JSON text). In a sweep with ``finetune`` points, a ``finetuned``
        column flags them (their ``finetune.*`` columns hold the settings). Accuracy is in percent and drops in
        points (the log keeps the runner's fractions: report.in_percent converts here)."""
        points = {p.hash: p for p in self.sweep.points}
        finetunes = any(p.config.finetune is not None for p in self.sweep.points)  # a sweep with ``finetune`` points
        rows = []
        for record in sorted((r for r in self.records.values() if r["hash"] in self.index),
                             key=lambda r: self.index[r["hash"]]):
            ids = {"point": self.index[record["hash"]], "point_hash": record["hash"]}
            if self.sweep.config.variants:
                ids["variant"] = record["variant"]
            axes = {k: v if isinstance(v, str) else json.dumps(v)
                    for k, v in points[record["hash"]].settings.items() if k not in record["params"]}
            tuned = {"finetuned": points[record["hash"]].config.finetune is not None} if finetunes else {}
            rows += [{**ids, **axes, **record["params"], **tuned, **row, "point_wall_s": record["point_wall_s"]}
                     for row in record["rows"]]
        return in_percent(pd.DataFrame(rows))

    def summary(self, results: pd.DataFrame) -> pd.DataFrame:
        """One row per point: its parameters, ``n`` and mean / std / 95% CI of every numeric runner metric."""
        if results.empty:
            return results
        from photosim.experiments.workflow import RUN_SETTINGS

        runner_keys = {PERCENT_COLUMNS.get(k, k) for r in self.records.values() for row in r["rows"]
                       for k in row} - {"repeat", *RUN_SETTINGS}
        metrics = [c for c in results if c in runner_keys and pd.api.types.is_numeric_dtype(results[c])]
        fixed = [c for c in results if c not in runner_keys and c != "repeat"]
        per_point = results[fixed].drop_duplicates("point")
        return per_point.merge(summarize(results, ["point"], metrics), on="point")


def _written_base_hash(config: dict[str, Any] | None) -> str | None:
    """The base hash of a sweep config as a manifest recorded it; None when it does not validate any more."""
    if config is None:
        return None
    try:
        return config_hash(base_identity(load_config(SweepConfig, config).base))
    except (PhotosimError, ValidationError):
        return None


def plot_axes(config: SweepConfig) -> list[list[str]]:
    """The x axes of a sweep's default plots: each swept axis, or the variants of a sweep without axes."""
    return config.axes or ([["variant"]] if config.variants else [])


def _checked_json(data: bytes, model: type[ModelT], where: str, fix: str) -> ModelT:
    """``model`` read from JSON text; anything else is a PhotosimError naming ``where`` and the fix."""
    try:
        return model.model_validate(json.loads(data))
    except ValidationError as exc:
        raise PhotosimError(f"{where} is corrupt ({validation_problems(exc)}); {fix}.") from None
    except ValueError:  # not JSON, or not UTF-8
        raise PhotosimError(f"{where} is corrupt (not JSON); {fix}.") from None


def _take_lock(directory: Path) -> IO[str]:
    """Hold ``<directory>/.lock`` for this run (the system drops it when the process ends, even if killed)."""
    import fcntl

    handle = (directory / LOCK).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not written its name yet"
        handle.close()
        raise PhotosimError(f"{directory} is in use by another sweep run ({holder}); wait for it to finish or "
                            "stop it, or choose another -o directory. The lock ends with that process, so "
                            "there is nothing to delete.") from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def _jsonable(value: Any) -> Any:
    """numpy / torch scalars as Python numbers; anything else as text."""
    return value.item() if hasattr(value, "item") else str(value)


def default_runner() -> Runner:
    """The real point runner (imported lazily: it pulls in torch and the engine)."""
    from photosim.experiments.workflow import run_point

    return run_point


def runnable_points(sweep: Sweep, variants: Sequence[str] | None = None, executor: str = "local",
                    workers: int | None = None, address: str | None = None) -> list[Point]:
    """The points a run executes, after every check a run makes before it writes anything (``--dry-run`` too)."""
    selected = sweep.select(variants)
    check_executor(executor, workers, address)
    _preflight(selected)
    return selected


def _preflight(points: list[Point]) -> None:
    """Cheap checks of what the runner would only find later: model and dataset names, weight files, and each
    point's device, custom noise function and hardware overrides (workflow.check_point)."""
    from photosim.experiments.workflow import check_point
    from photosim.frontend.data import dataset_names
    from photosim.frontend.models import list_models

    builtins = {m.name for m in list_models()}
    layer_names: dict[str, list[str]] = {}  # model -> its layer names, traced once
    for p in points:
        c, where = p.config, f"point {p.index} ({p.label})"
        if c.model not in builtins and not c.model.startswith(("torchvision:", "hf:")) and ".py:" not in c.model:
            raise PhotosimError(f"{where}: unknown model {c.model!r}; use a built-in ({', '.join(sorted(builtins))}"
                                "), torchvision:NAME, hf:CLASS or path/to/file.py:NAME.")
        if c.data.partition(":")[0] not in dataset_names():
            raise PhotosimError(f"{where}: unknown dataset {c.data!r}; use one of {', '.join(dataset_names())}.")
        if c.weights is not None and not Path(c.weights).is_file():
            hint = " or run only the variants you have files for (--variant NAME)" if p.variant else ""
            raise PhotosimError(f"{where}: weights file {c.weights!r} does not exist; fix the path{hint}.")
        check_point(c, where, layer_names)


@contextmanager
def _progress(enabled: bool, total: int, skipped: int, out_dir: Path) -> Iterator[Callable[[str], None]]:
    """A rich progress bar with ETA over the points to run; yields ``advance(label)``."""
    if not enabled:
        yield lambda label: None
        return
    options = progress_options(True)
    if skipped:
        options["console"].print(f"resuming {out_dir}: {skipped} point{'s' if skipped != 1 else ''} already "
                                 f"finished, {total} to run")
    columns = (bars.TextColumn("{task.description}"), bars.BarColumn(), bars.MofNCompleteColumn(),
               bars.TimeElapsedColumn(), bars.TextColumn("ETA"), bars.TimeRemainingColumn())
    with bars.Progress(*columns, **options) as bar:
        task = bar.add_task("points", total=total)
        yield lambda label: bar.update(task, advance=1, description=label)


SUMMARY_ENERGY = {"energy_per_inference_J_mean": "J / inference", "energy_per_mac_J_mean": "J / MAC"}


def summary_view(summary: pd.DataFrame, sweep: Sweep) -> pd.DataFrame:
    """A compact table for the terminal: variant, axis values, finetuned (in a sweep with ``finetune`` points),
    n, top-1 % with 95% CI, drop vs float in points, energy per inference and per MAC (with a photonics section),
    time."""
    keys = (["variant"] if sweep.config.variants else []) + [k for axis in sweep.config.axes for k in axis]
    view = summary[[c for c in [*keys, "finetuned", "n"] if c in summary]].copy()
    if "top1_pct_mean" in summary:
        view["top-1 % (95% CI)"] = [f"{m:.2f}" + ("" if pd.isna(c) else f" ± {c:.2f}")
                                    for m, c in zip(summary["top1_pct_mean"], summary["top1_pct_ci95"])]
    if "drop_vs_float_pts_mean" in summary:
        view["drop vs float (points)"] = summary["drop_vs_float_pts_mean"].map(lambda v: f"{v:.2f}")
    for column, title in SUMMARY_ENERGY.items():
        if column in summary and summary[column].notna().any():
            view[title] = summary[column].map(lambda v: f"{v:.3g}")
    if "point_wall_s" in summary:
        view["seconds"] = summary["point_wall_s"]
    return view


def run_sweep(config: Sweep | SweepConfig | dict[str, Any] | str | Path, out_dir: str | Path, *,
              runner: Runner | None = None, executor: str = "local", workers: int | None = None,
              address: str | None = None, force: bool = False, progress: bool = True,
              variants: Sequence[str] | None = None) -> SweepResult:
    """Run the unfinished points of a sweep into ``out_dir``; write results, summary and default plots.

    ``runner(point, cache) -> rows`` defaults to ``photosim.workflow.run_point``; ``variants`` restricts the
    run to the named variants. Interrupting loses at most the running points; running again resumes.
    """
    from photosim.experiments.plot import default_plots

    sweep = config if isinstance(config, Sweep) else load_sweep(config)
    selected = runnable_points(sweep, variants, executor, workers, address)
    with ResultStore(out_dir, sweep, force) as store:
        todo = [p for p in selected if p.hash not in store.records]
        if todo:
            runner = runner or default_runner()
        by_index = {p.index: p for p in todo}
        try:
            with _progress(progress, len(todo), len(selected) - len(todo), store.dir) as advance:
                for index, rows, wall_s in execute(group_points(todo), runner, executor=executor, workers=workers,
                                                   address=address):
                    store.add(by_index[index], rows, wall_s)
                    advance(by_index[index].label)
        finally:
            results, summary = store.write_tables()
        hue = ["variant"] if sweep.config.variants and sweep.config.axes else []
        plots = default_plots(results, plot_axes(sweep.config), store.dir, hue=hue) if not results.empty else []
    return SweepResult(store.dir, results, summary, plots, len(todo), len(selected) - len(todo))
