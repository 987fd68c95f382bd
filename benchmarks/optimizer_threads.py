"""The CPU AdamW's threads beside training: the main job's model and batch, step time against thread count.

The update runs on a thread of its own while the backward goes on; its OpenMP team and the training thread
share the host's cores. This times training steps of the main job's model (examples/finetune.py: a 4-layer
Llama, h=128, byte vocabulary, batch 8 x 128, the smallest GPU budget accepted) with the optimizer on every
thread torch has and on one fewer (``RATEL_OPTIMIZER_THREADS``), alternating in one process, and appends the
table to benchmarks/RESULTS.md with ``--append-results``. Losses are printed: the thread count must not
change a bit of them.

    python benchmarks/optimizer_threads.py [--steps 20] [--rounds 2] [--device cpu|cuda] [--append-results]
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from pathlib import Path

import torch

import ratel
from ratel.ir.hardware import cpu_model
from ratel.runtime.cpu_adam import THREADS_ENV
from ratel.tools.bench import WARMUP_STEPS, _time, publish   # warm-ups, then the median of synchronised steps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from finetune import CONFIG  # noqa: E402 - the main job's model, from the script beside it


def _model():
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**CONFIG)).train()


def _run(threads: int, device: torch.device, steps: int, ids: torch.Tensor) -> tuple[float, list[float]]:
    os.environ[THREADS_ENV] = str(threads)
    model = _model()
    try:
        ratel.explain(model, 1, (ids,), device=device, activations="recompute")
        raise AssertionError("a 1-byte budget was accepted")
    except ratel.BudgetError as error:
        budget = error.needed
    engine = ratel.compile(model, budget=budget, optimizer=ratel.AdamW(lr=3e-3), example_inputs=(ids,),
                           device=device, progress=False)
    losses = []

    def step():
        loss = engine(ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())

    timing = _time(step, steps, device)
    engine.close()
    return timing.median, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--append-results", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    ids = torch.randint(0, CONFIG["vocab_size"], (8, 128), generator=torch.Generator().manual_seed(0))
    every = torch.get_num_threads()
    counts = sorted({every, max(1, every - 1)}, reverse=True)
    steps: dict[int, list[float]] = {n: [] for n in counts}
    losses: dict[int, list[float]] = {}
    for _ in range(args.rounds):
        for n in counts:
            step, losses[n] = _run(n, device, args.steps, ids)
            steps[n].append(step)
    os.environ.pop(THREADS_ENV, None)
    base = statistics.median(steps[every])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    lines = [f"## CPU AdamW threads beside training: the main job's model ({datetime.date.today()}, "
             f"{cpu_model()}, {os.cpu_count()} cores, {where}, torch {torch.__version__})", "",
             f"`benchmarks/optimizer_threads.py --steps {args.steps} --rounds {args.rounds} --device {args.device}`: "
             f"4-layer Llama h=128 (examples/finetune.py), batch 8 x 128, smallest GPU budget accepted; median "
             f"step of {args.steps} after {WARMUP_STEPS} warm-ups, each round's median shown; "
             f"training thread: {every} threads.",
             "", "| optimizer threads | step (per round) | / every thread | losses equal to every thread's |",
             "|---|---|---|---|"]
    for n in counts:
        per_round = ", ".join(f"{s * 1e3:.1f}" for s in steps[n])
        lines.append(f"| {n} | {per_round} ms | {statistics.median(steps[n]) / base:.2f} | "
                     f"{'yes' if losses[n] == losses[every] else 'NO'} |")
    publish("\n".join(lines) + "\n", Path(__file__).with_name("RESULTS.md") if args.append_results else None)


if __name__ == "__main__":
    main()
