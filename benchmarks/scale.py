"""Batch sizes a 24 GiB card could not train before: the 3.6B GPT at batch 16, 32 and 64 x 2048.

One process, one card capped with ``set_per_process_memory_fraction`` (default 24 GiB), Ratel's budget 1 GiB
below the cap, default settings (automatic plan, the LM head and loss over token chunks, expandable
segments). For each batch: the plan's GPU peak and predicted step, or the budget error with the minimum it
names; the measured median step after one warm-up, model TFLOPS, ``max_memory_reserved`` and
``max_memory_allocated`` against the cap, and host RSS. Appends its table to benchmarks/RESULTS.md.

    python benchmarks/scale.py [--layers 16 --hidden 4096 --heads 32 --vocab 50257 --seq 2048 --batches 16 32 64]
"""
from __future__ import annotations

import argparse
import datetime
import gc
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

import ratel
from ratel.errors import BudgetError
from ratel.ir import format_bytes
from ratel.models import GPT, GPTConfig
from ratel.tools.bench import model_flops, publish
from training_semantics import write_random_weights   # a script beside this one


def run(meta_model, cfg, batch, seq, budget, weights, steps, resident=None) -> dict:
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(batch)).cuda()
    try:
        plan = ratel.explain(meta_model, budget, (ids,), resident=resident)
    except BudgetError as e:
        return {"batch": batch, "refused": f"needs {format_bytes(e.needed)} of GPU"}
    torch.cuda.reset_peak_memory_stats()
    engine = ratel.compile(meta_model, budget=budget, optimizer=ratel.AdamW(lr=1e-5), example_inputs=(ids,),
                           weights=str(weights), progress=False, resident=resident)
    times, losses = [], []
    for step in range(steps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = engine(ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        losses.append(loss.item())
        if step:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    n = sum(p.numel() for p in meta_model.parameters())
    out = {"batch": batch, "step": step_s, "range": (min(times), max(times)), "predicted": plan.times.total,
           "planned_peak": plan.memory.gpu_peak, "reserved": torch.cuda.max_memory_reserved(),
           "allocated": torch.cuda.max_memory_allocated(), "host_planned": plan.memory.host_total,
           "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "losses": losses,
           "tflops": model_flops(n, cfg.n_layer, cfg.d_model, batch, seq) / step_s / 1e12}
    engine.close()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--cap", default="24GiB", help="GPU memory the process may use (stands in for a smaller card)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--host", default=None, help="Ratel's host budget (default: 90%% of this machine's memory)")
    p.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"))
    p.add_argument("--no-resident", action="store_true",
                   help="stream every group (compile's resident=False): the path before plan_resident_groups")
    args = p.parse_args()
    card = torch.cuda.get_device_name()
    cap = ratel.parse_bytes(args.cap)
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    budget = ratel.Budget(gpu=cap - (1 << 30), host=args.host) if args.host else cap - (1 << 30)
    cfg = GPTConfig(vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads, d_model=args.hidden,
                    max_seq_len=args.seq, tie_embeddings=False, dropout=0.0)
    with torch.device("meta"):
        meta_model = GPT(cfg).to(torch.bfloat16).train()
    n = sum(q.numel() for q in meta_model.parameters())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.safetensors"
        write_random_weights(meta_model, weights)
        for batch in args.batches:
            row = run(meta_model, cfg, batch, args.seq, budget, weights, args.steps,
                      resident=False if args.no_resident else None)
            print(row, flush=True)
            rows.append(row)
    lines = [f"\n## Scale: batch sizes under a {args.cap} cap ({datetime.date.today()}, {card})\n",
             f"GPT {args.layers}L h={args.hidden} vocab {args.vocab} untied ({n / 1e9:.2f}B, bf16), seq {args.seq}, "
             f"process capped at {args.cap}, Ratel budget {format_bytes(cap - (1 << 30))} GPU"
             + (f", {args.host} host" if args.host else "")
             + (", every group streamed (--no-resident) " if args.no_resident else ", default settings ")
             + "(`benchmarks/scale.py`). Median of the timed steps after one warm-up; model TFLOPS = "
             "(6 N tokens + 12 L h s^2 B) / step.\n",
             "| batch | step (range) | predicted | model TFLOPS | planned GPU peak | max reserved | max allocated "
             "| planned host | host RSS |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['batch']} | refused: {r['refused']} | | | | | | | |")
            continue
        lines.append(f"| {r['batch']} | {r['step']:.2f} s ({r['range'][0]:.2f}-{r['range'][1]:.2f}) | "
                     f"{r['predicted']:.2f} s | {r['tflops']:.0f} | {format_bytes(r['planned_peak'])} | "
                     f"{format_bytes(r['reserved'])} | {format_bytes(r['allocated'])} | "
                     f"{format_bytes(r['host_planned'])} | {format_bytes(r['rss'])} |")
    publish("\n".join(lines) + "\n", args.results)


if __name__ == "__main__":
    main()
