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
    preflight,
    print_table,
)


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
        print_table(f"{len(selected)} point(s) of {file}", pd.DataFrame([
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
    console.print(f"ran {result.ran} point(s), {result.skipped} already finished; wrote {out_dir}/results.csv, "
                  f"summary.csv and {len(result.plots)} plot(s)")


@app.command()
@handles_errors
def plot(
    results: Annotated[Path, typer.Argument(help="results.csv written by photosim sweep.")],
    x: Annotated[str, typer.Option(help="Column on the x axis, e.g. quant.w_bits.")],
    y: Annotated[str, typer.Option(help="Numeric column, averaged over repeats with 95% CI bars.")] = "top1",
    hue: Annotated[list[str] | None, typer.Option(help="Column splitting the data into lines (repeatable).")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Plot file to write (its suffix names the format: png, "
                                                         "pdf, svg, ...), or an existing folder for the default "
                                                         "name <y>_vs_<x>.png (default: beside the CSV).")
    ] = None,
    pareto: Annotated[bool, typer.Option(help="Mark the Pareto front: lowest x for the highest y (e.g. --x "
                                              "energy_per_inference_J).")] = False,
    log_x: Annotated[bool, typer.Option(help="Log scale on the x axis.")] = False,
) -> None:
    """Plot any view of a sweep's results.csv: mean y vs x, one line per hue value, float baseline dashed."""
    from photosim.experiments.plot import plot_format, plot_path, plot_results

    path = plot_path(results, x, y, hue, output)
    preflight({"--output": path}, {"RESULTS": results})
    fmt = plot_format(path)
    console.print(f"wrote {plot_results(results, x, y, hue, output, pareto=pareto, log_x=log_x)} ({fmt.upper()})")


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
