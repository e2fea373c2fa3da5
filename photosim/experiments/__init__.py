"""Measuring accuracy: runs, Monte Carlo repeats, sweeps and their executors, reports, plots, benchmarks."""
