"""A fast, deterministic stand-in for ``photosim.workflow.run_point``.

A module-level function (not a lambda) so spawned worker processes and Ray actors can import it.
Accuracy falls with fewer bits and with fixed-point requantization, plus seeded per-repeat noise; the
``built_cache`` metric is 1 on the row of the point that filled the cache for its (model, quant) pair.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

FLOAT_TOP1 = 0.97


def fake_run_point(point: dict[str, Any], cache: dict[Any, Any]) -> list[dict[str, Any]]:
    """Rows of one point: top1 etc. from its bits, requant mode, seed and repeat number."""
    key = json.dumps([point["model"], point["quant"].model_dump(mode="json")], sort_keys=True)
    built = key not in cache
    cache.setdefault(key, True)
    time.sleep(0.003)
    w_bits, a_bits = point["quant"].w_bits, point["quant"].a_bits
    penalty = 0.003 if point["hw"].requant == "fixedpoint" else 0.0
    ideal = FLOAT_TOP1 - 0.02 * (8 - w_bits) - 0.01 * (8 - a_bits) - (0.01 if point["model"] == "digits-cnn" else 0)
    rows = []
    for repeat in range(point["repeats"]):
        rng = random.Random(f"{point['seed']}/{repeat}/{key}/{penalty}")
        top1 = ideal - penalty + rng.gauss(0, 0.004)
        rows.append({"repeat": repeat, "top1": top1, "float_top1": FLOAT_TOP1, "ideal_top1": ideal,
                     "drop_vs_float": FLOAT_TOP1 - top1, "drop_vs_ideal": ideal - top1, "overflow_rate": 0.0,
                     "built_cache": int(built and repeat == 0)})
    return rows


def sleeping_run_point(point: dict[str, Any], cache: dict[Any, Any]) -> list[dict[str, Any]]:
    """Record this worker's pid in the folder $PHOTOSIM_TEST_PIDS, then run for ten minutes: a point still
    running when its sweep is killed."""
    Path(os.environ["PHOTOSIM_TEST_PIDS"], str(os.getpid())).touch()
    time.sleep(600)
    return []
