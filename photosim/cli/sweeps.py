"""Commands over many runs: sweeps, plots of their results, and the engine benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from photosim._files import spec_file
from photosim.cli.common import (
    ModelOpt,
    app,
    console,
    err_console,
    handles_errors,
    plural,
    preflight,
    print_table,
)
from photosim.errors import PhotosimError


@app.command()
@handles_errors
def sweep(
    file: Annotated[Path, typer.Argument(help="Sweep YAML: base settings plus grid / zip / variants (experiments/).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Results directory (default runs/<file name>).")
    ] = None,
    executor: Annotated[str, typer.Option(help="Where points run: local (processes) or ray.")] = "local",
    workers: Annotated[
        int | None, typer.Option(help="Parallel workers (default: 1 locally, every cluster CPU with Ray).")
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Address of a running Ray cluster (default: start a local one).")
    ] = None,
    variant: Annotated[list[str] | None, typer.Option("--variant", help="Run only this variant (repeatable).")] = None,
    force: Annotated[bool, typer.Option(help="Replace the results of a different sweep in the directory.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Validate and list the points without running anything.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar with ETA.")] = True,
) -> None:
    """Run a sweep file into results.csv, summary.csv and plots; run it again to resume after a crash.

    A sweep file is a program: a custom noise function it names (hw.noise.custom.function) runs that code
    with your permissions, as a Python script would. Run only sweep files you would run as scripts.

    An empty file is refused; a file with only `base` is one point. --dry-run makes every check of a real
    run. While a run writes into a directory, a second run into it is refused; --force deletes only the
    files the directory's sweep.json records as photosim's, and a file photosim would write that it does not
    record (a folder that was never a sweep's: every such file) stops the run, even with --force.
    """
    from photosim.experiments.sweep import load_sweep, run_sweep, runnable_points, summary_view

    plan = load_sweep(file)
    selected = runnable_points(plan, variant, executor, workers, address)
    if dry_run:
        print_table(f"{plural(len(selected), 'point')} of {file}", pd.DataFrame([
            {"point": p.index, **({"variant": p.variant} if p.variant else {}), **p.settings, "hash": p.hash}
            for p in selected
        ]))
        return
    out_dir = output or Path("runs") / file.stem
    try:
        result = run_sweep(plan, out_dir, executor=executor, workers=workers, address=address, force=force,
                           progress=progress, variants=variant)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: the finished points are saved in {out_dir}; run the same command again "
                          "to finish the rest.")
        raise typer.Exit(130) from None
    print_table(f"{plan.config.name or file.stem}: mean over repeats", summary_view(result.summary, plan))
    console.print(f"ran {plural(result.ran, 'point')}, {result.skipped} already finished; wrote "
                  f"{out_dir}/results.csv, summary.csv and {plural(len(result.plots), 'plot')}")


@app.command()
@handles_errors
def plot(
    results: Annotated[Path, typer.Argument(help="results.csv written by photosim sweep.")],
    x: Annotated[str, typer.Option(help="Column on the x axis, e.g. quant.w_bits.")],
    y: Annotated[str, typer.Option(help="Numeric column, averaged over repeats with 95% CI bars (accuracy in "
                                        "percent: top1_pct, drop_vs_float_pts; top1 means top1_pct).")] = "top1_pct",
    hue: Annotated[list[str] | None, typer.Option(help="Column splitting the data into lines (repeatable).")] = None,
    where: Annotated[list[str] | None, typer.Option(
        "--where", help="Keep only the rows where COLUMN has VALUE, as COLUMN=VALUE (repeatable): fixes a swept "
                        "setting the plot does not show.")] = None,
    others: Annotated[str, typer.Option(
        help="Swept settings neither on x, hue nor fixed by --where: facet (one panel per value) or pool (average "
             "over them, with a note naming them).")] = "facet",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Plot file to write (its suffix names the format: png, "
                                                         "pdf, svg, ...), or an existing folder for the default "
                                                         "name <y>_vs_<x>.png (default: beside the CSV).")
    ] = None,
    pareto: Annotated[bool, typer.Option(help="Mark the Pareto front: lowest x for the highest y (e.g. --x "
                                              "energy_per_inference_J).")] = False,
    xscale: Annotated[str, typer.Option(help="x axis scale: auto (log when the x values are positive and "
                                             "log-spaced, e.g. 0.0003..0.03), linear or log.")] = "auto",
    log_x: Annotated[bool, typer.Option(help="Same as --xscale log.")] = False,
) -> None:
    """Plot any view of a sweep's results.csv: mean y vs x, one line per hue value, float baseline dashed.

    Accuracy is in percent and drops in percentage points. A swept setting the plot neither shows nor fixes is
    never averaged silently: one panel per value (--others facet), or pooled with a note (--others pool).
    """
    from photosim.experiments.plot import plot_format, plot_path, plot_results

    fixed = {}
    for item in where or []:
        column, sep, value = item.partition("=")
        if not sep or not column:
            raise PhotosimError(f"--where {item!r}: write COLUMN=VALUE, e.g. --where hw.adc.bits=6.")
        fixed[column] = value
    path = plot_path(results, x, y, hue, output)
    preflight({"--output": path}, {"RESULTS": results})
    fmt = plot_format(path)
    written = plot_results(results, x, y, hue, output, pareto=pareto, log_x=log_x, xscale=xscale, others=others,
                           where=fixed, note=console.print)
    console.print(f"wrote {written} ({fmt.upper()})")


@app.command()
@handles_errors
def best(
    results: Annotated[Path, typer.Argument(help="results.csv written by photosim sweep.")],
    cost: Annotated[str, typer.Option(help="Numeric column to minimise: energy_per_inference_J, energy_per_mac_J, "
                                           "laser_J, hw.adc.bits, quant.w_bits, hw.photonics.laser_power_mw, "
                                           "...")] = "energy_per_inference_J",
    max_drop: Annotated[float, typer.Option(help="Largest top-1 drop against float, in percentage points (mean "
                                                 "over repeats).")] = 1.0,
    confident: Annotated[bool, typer.Option(help="Require the upper 95% bound of the drop, not its mean, within "
                                                 "--max-drop.")] = False,
    top: Annotated[int, typer.Option(min=1, help="Qualifying points listed, cheapest first.")] = 5,
) -> None:
    """The cheapest configuration (lowest mean --cost) that keeps top-1 within --max-drop points of float.

    Each point is averaged over its repeats (mean and 95% CI, as summary.csv). Exit 2 for an unknown or
    non-numeric cost column, or when no point qualifies (the message names the closest one).
    """
    from photosim.experiments.query import ACCURACY, DROP, cheapest

    preflight({}, {"RESULTS": results})
    answer = cheapest(results, cost=cost, max_drop=max_drop, confident=confident)
    console.print(f"cheapest by {answer.cost}: {answer.describe()}")
    metrics = [m for m in (answer.cost, ACCURACY, DROP) if f"{m}_mean" in answer.candidates]
    columns = [c for c in ("point", *answer.settings) if c in answer.candidates]
    table = answer.candidates.head(top)[[*columns, "n"]].copy()
    for metric in metrics:
        fmt = ".2f" if metric in (ACCURACY, DROP) else ".4g"
        table[f"{metric} (95% CI)"] = [format(m, fmt) + ("" if pd.isna(c) else f" ± {format(c, fmt)}")
                                      for m, c in zip(answer.candidates[f"{metric}_mean"].head(top),
                                                      answer.candidates[f"{metric}_ci95"].head(top))]
    print_table(f"{min(top, len(answer.candidates))} of {plural(len(answer.candidates), 'qualifying point')}, "
                "cheapest first (top1 in %, drop in points)", table)


@app.command()
@handles_errors
def bench(
    model: ModelOpt = "torchvision:resnet18",
    batch: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 128,
    runs: Annotated[int, typer.Option(min=1, help="Timed rounds after one warm-up round; the median counts.")] = 3,
    quick: Annotated[bool, typer.Option(help="Smoke test: batch 8, one round (overrides --batch and --runs).")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    threads: Annotated[int, typer.Option(min=1, help="torch intra-op threads.")] = 2,
    memory: Annotated[bool, typer.Option(help="Measure peak memory, one subprocess per configuration.")] = True,
) -> None:
    """Images/s and peak memory of the engine configurations against float32 PyTorch eval of the same model."""
    from photosim.engine.executor import check_device
    from photosim.experiments.bench import BenchSettings, results_table, run_benchmark

    preflight({"--json": json_path}, {"--model": spec_file(model)})
    check_device(device)
    options = {"model": model, "device": device, "threads": threads, "memory": memory}
    settings = BenchSettings.quick(**options) if quick else BenchSettings(batch=batch, runs=runs, **options)
    result = run_benchmark(settings, json_path=json_path, progress=lambda line: err_console.print(line))
    m = result["machine"]
    print_table(f"{settings.model}, batch {settings.batch}, median of {settings.runs} round(s); {m['cpu']}, "
                f"{m['cores']} cores, {m['threads']} threads, torch {m['torch']} ({m['cpu_capability']})"
                f"{'; ' + m['gpu'] if 'gpu' in m else ''}; engine as run and sweep use it (diagnostics on)",
                results_table(result))
    if json_path:
        console.print(f"wrote {json_path}")
