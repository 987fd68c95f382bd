"""What a new input shape costs: the time an engine takes to plan a batch of a sequence length it has not
seen (trace + passes + program assembly; the step itself not counted), on a 2-layer and a 40-layer GPT
compiled for the CPU.

For each model: compile at 2 x 16, then one call at 2 x 20 (the second shape: the engine exports the model
once with symbolic sizes), then the new shapes 2 x (17, 23, 31, 12, 29, 9, 26): median and range. The same
shapes again with every shape exported statically (the engine without its trace cache, as before the
symbolic capture) for comparison. Appends the table to RESULTS.md.

    python benchmarks/replan.py [--layers 2,40 --no-append]
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path

import torch

import ratel
from ratel.models import GPT, GPTConfig

LENGTHS = (17, 23, 31, 12, 29, 9, 26)


def plan_seconds(engine, seq: int) -> float:
    ids = torch.randint(0, 128, (2, seq))
    start = time.perf_counter()
    engine._program((ids,), {"labels": ids})
    return time.perf_counter() - start


def measure(layers: int, symbolic: bool) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=128, n_layer=layers, n_head=4, d_model=64, max_seq_len=256))
    ids = torch.randint(0, 128, (2, 16))
    start = time.perf_counter()
    engine = ratel.compile(model, budget="1GiB", optimizer=ratel.AdamW(lr=1e-3), example_inputs=(ids,),
                           device="cpu", progress=False)
    compiled = time.perf_counter() - start
    if not symbolic:
        engine._traces = None
    second = plan_seconds(engine, 20)
    times = [plan_seconds(engine, seq) for seq in LENGTHS]
    kept = len(engine._programs)
    engine.close()
    return {"layers": layers, "symbolic": symbolic, "compile": compiled, "second": second,
            "median": statistics.median(times), "low": min(times), "high": max(times), "kept": kept}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="2,40", help="comma-separated layer counts (default 2,40)")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args()
    rows = []
    for layers in [int(x) for x in args.layers.split(",")]:
        for symbolic in (True, False):
            r = measure(layers, symbolic)
            rows.append(r)
            print(f"{layers:3d} layers, {'symbolic capture' if r['symbolic'] else 'static export per shape'}: "
                  f"compile {r['compile']:.2f} s, second shape {r['second']:.2f} s, new shape median "
                  f"{r['median']:.3f} s ({r['low']:.3f}-{r['high']:.3f}), programs kept {r['kept']}", flush=True)
    if args.no_append:
        return
    lines = [f"\n## A new input shape: re-planning time ({datetime.date.today()}, {os.cpu_count()}-core CPU VM, "
             f"torch {torch.__version__})\n",
             f"GPT h=64, 4 heads, vocabulary 128, device=\"cpu\", batch 2; compiled at seq 16, then seq 20 (the "
             f"second shape), then seq {', '.join(map(str, LENGTHS))}: the time of `engine._program` (trace, "
             f"passes, program; no step). `benchmarks/replan.py`.\n",
             "| layers | graphs of new shapes | compile | second shape | new shape: median (range) | programs kept |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        how = "from the symbolic capture" if r["symbolic"] else "static export each"
        lines.append(f"| {r['layers']} | {how} | {r['compile']:.2f} s | {r['second']:.2f} s | "
                     f"{r['median']:.3f} s ({r['low']:.3f}-{r['high']:.3f}) | {r['kept']} |")
    with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
