"""The PTQ table of docs/ptq.md: every built-in model x bit width x PTQ algorithm, top-1 on the digits test split.

Regenerate it from the repository root (a minute or two per model on one core)::

    python experiments/ptq_table.py            # prints the markdown table
    python experiments/ptq_table.py --bits 4 3 4/8 --threads 1   # W=A widths, or W/A pairs
    python experiments/ptq_table.py --models digits-cnn --rows none qdrop auto   # some models and rows

Each row quantizes on the calibration split (labels never used) and scores the integer engine
(``requant: float``) on the test split. ``symmetric`` is the quantization before issue 14 (signed-symmetric
activations, logits at the activation bit width); the other rows use the defaults (affine ranges, 8-bit
logits) with the algorithms named; ``auto`` names the combination it chose. The time is the CPU time of
``quantize`` (one thread: the wall time on an idle core, but not inflated by other processes).
"""

from __future__ import annotations

import argparse
import time

import torch

from photosim.experiments.accuracy import evaluate
from photosim.frontend.data import load_dataset
from photosim.frontend.models import list_models, load_model
from photosim.frontend.ptq import quantize

ROWS = {  # row label -> QuantSpec keys added to the bit widths
    "symmetric (before issue 14)": {"activation_range": "symmetric", "output_bits": None},
    "none": {},
    "bias_correction": {"ptq": "bias_correction"},
    "equalize": {"ptq": "equalize"},
    "gptq": {"ptq": "gptq"},
    "gpfq": {"ptq": "gpfq"},
    "equalize,gptq,bias_correction": {"ptq": "equalize,gptq,bias_correction"},
    "equalize,gpfq,bias_correction": {"ptq": "equalize,gpfq,bias_correction"},
    "adaround": {"ptq": "adaround"},
    "qdrop": {"ptq": "qdrop"},
    "adaround,bias_correction": {"ptq": "adaround,bias_correction"},
    "qdrop,bias_correction": {"ptq": "qdrop,bias_correction"},
    "equalize,adaround,bias_correction": {"ptq": "equalize,adaround,bias_correction"},
    "equalize,qdrop,bias_correction": {"ptq": "equalize,qdrop,bias_correction"},
    "auto": {"ptq": "auto"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", nargs="+", default=["4", "3", "4/8"],
                        help="W=A bit widths or W/A pairs (default 4 3 4/8).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1).")
    parser.add_argument("--models", nargs="+", default=[info.name for info in list_models()],
                        help="built-in models (default all).")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW",
                        help=f"rows (default all: {', '.join(ROWS)}).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    calibration = torch.stack([x for x, _ in load_dataset("digits", "calibration")])
    test = load_dataset("digits", "test")
    models = [info for info in list_models() if info.name in args.models]
    header = ["model", "float", "bits", "algorithm", "top-1 %", "quantize CPU s"]
    print("| " + " | ".join(header) + " |\n|" + "|".join("---" if i < 4 else "--:" for i in range(len(header))) + "|")
    for info in models:
        module = load_model(info.name).module
        for bits in args.bits:
            w_bits, _, a_bits = bits.partition("/")
            w_bits, a_bits = int(w_bits), int(a_bits or w_bits)
            for row in args.rows:
                start = time.process_time()
                qmodel = quantize(module, calibration, {"w_bits": w_bits, "a_bits": a_bits, **ROWS[row]})
                seconds = time.process_time() - start
                top1 = evaluate(qmodel, test, {"requant": "float"}).top1
                chosen = qmodel.provenance.get("ptq_selection", {}).get("chosen")
                name = f"auto ({chosen})" if chosen else row
                print(f"| {info.name} | {100 * info.float_accuracy:.2f} | W{w_bits}A{a_bits} | {name} "
                      f"| {100 * top1:.2f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
