"""The largest GPT Ratel trains on this machine with a 24 GiB GPU budget: host and disk as they are.

Host budget = memory available now less a margin (the process, CUDA and the allocator need some), SSD
budget = free space of ``--ssd-dir`` less a margin. From ``--max-layers`` down, the first layer count
(width ``--hidden``) whose plan fits is built on the meta device, initialised one module at a time on the
host (no weights file: the disk is the SSD tier's), and trained for one warm-up and ``--steps`` timed steps.
Reports step time against the plan's prediction, host RSS, the swapper's bytes per step, GPU memory reserved,
and bytes per parameter across host and SSD. Writes ``largest.json`` under ``--out`` after each step (a run
cut short keeps what it measured) and appends its table to benchmarks/RESULTS.md.

    python benchmarks/largest.py --ssd-dir /path/on/nvme [--hidden 5120 --max-layers 40 --batch 8 --seq 1024]
    python benchmarks/largest.py --plan-only ...   # only the layer search (any machine)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import statistics
import time
from pathlib import Path

import torch

import ratel
from ratel.errors import BudgetError
from ratel.ir import Tier, format_bytes
from ratel.ir.hardware import HardwareProfile, host_memory
from ratel.models import GPT, GPTConfig
from ratel.tools.bench import model_flops, publish


def meta_gpt(layers: int, args) -> GPT:
    cfg = GPTConfig(vocab_size=args.vocab, n_layer=layers, n_head=args.hidden // 128, d_model=args.hidden,
                    max_seq_len=args.seq, tie_embeddings=True, dropout=0.0)
    with torch.device("meta"):
        return GPT(cfg).to(torch.bfloat16).train()


def largest_that_plans(args, budget, hardware):
    ids = torch.zeros(args.batch, args.seq, dtype=torch.long, device="meta")
    for layers in range(args.max_layers, 0, -1):
        model = meta_gpt(layers, args)
        try:
            plan = ratel.explain(model, budget, (ids,), hardware=hardware)
        except BudgetError as e:
            print(f"{layers} layers ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B): {e.tier} "
                  f"needs {format_bytes(e.needed)}", flush=True)
            continue
        return layers, model, plan
    raise SystemExit("no layer count plans within this machine's host and disk")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ssd-dir", required=True)
    p.add_argument("--hidden", type=int, default=5120)
    p.add_argument("--max-layers", type=int, default=40)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--cap", default="24GiB", help="GPU memory the process may use (stands in for a smaller card)")
    p.add_argument("--host-margin", default="10GiB", help="host memory left outside Ratel's budget")
    p.add_argument("--ssd-margin", default="2GiB", help="disk space left free")
    p.add_argument("--host", default=None, help="host budget instead of the memory available less the margin")
    p.add_argument("--ssd", default=None, help="SSD budget instead of the free disk less the margin")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--plan-only", action="store_true")
    p.add_argument("--out", default=".")
    p.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"))
    args = p.parse_args()

    os.makedirs(args.ssd_dir, exist_ok=True)
    host = ratel.parse_bytes(args.host) if args.host else host_memory() - ratel.parse_bytes(args.host_margin)
    ssd = (ratel.parse_bytes(args.ssd) if args.ssd
           else shutil.disk_usage(args.ssd_dir).free - ratel.parse_bytes(args.ssd_margin))
    cap = ratel.parse_bytes(args.cap)
    budget = ratel.Budget(gpu=cap - (1 << 30), host=host, ssd=ssd, ssd_dir=args.ssd_dir)
    on_gpu = torch.cuda.is_available()
    hardware = None if on_gpu else HardwareProfile.h100()
    print(f"host budget {format_bytes(host)}, SSD budget {format_bytes(ssd)} in {args.ssd_dir}", flush=True)
    t0 = time.perf_counter()
    layers, model, plan = largest_that_plans(args, budget, hardware)
    n = sum(q.numel() for q in model.parameters())
    row = {"date": str(datetime.date.today()), "card": torch.cuda.get_device_name() if on_gpu else "planned only",
           "layers": layers, "hidden": args.hidden, "params": n, "batch": args.batch, "seq": args.seq,
           "host_budget": host, "ssd_budget": ssd, "predicted": plan.times.total,
           "planned_gpu": plan.memory.gpu_peak, "planned_host": plan.memory.host_total,
           "planned_ssd": plan.memory.ssd_total, "search_s": time.perf_counter() - t0,
           "states_on_ssd": sum(t == Tier.SSD for _, t in plan.placement.optimizer_tier),
           "params_on_ssd": sum(t == Tier.SSD for _, t in plan.placement.param_tier),
           "groups": len(plan.placement.param_tier), "times": []}
    out = Path(args.out) / "largest.json"

    def save():
        out.write_text(json.dumps(row, indent=1))
    save()
    print(ratel.summary(plan), flush=True)
    if args.plan_only:
        return
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).cuda()
    t0 = time.perf_counter()
    engine = ratel.compile(model, budget=budget, optimizer=ratel.AdamW(lr=1e-5), example_inputs=(ids,))
    row["compile_s"] = time.perf_counter() - t0
    row["rss_after_compile"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    save()
    swapper = engine._resources.swapper
    counted = None
    for step in range(args.steps + 1):
        torch.cuda.synchronize()
        if step == 1:
            swapper.wait_all()
            counted = swapper.stats()
        t0 = time.perf_counter()
        loss = engine(ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        row.setdefault("losses", []).append(loss.item())
        (row["times"] if step else row.setdefault("warmup", [])).append(time.perf_counter() - t0)
        row["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        row["reserved"] = torch.cuda.max_memory_reserved()
        save()
        print(f"step {step}: {time.perf_counter() - t0:.1f} s, loss {loss.item():.4f}", flush=True)
    swapper.wait_all()
    if counted is not None and row["times"]:
        now = swapper.stats()
        row["ssd_read"] = (now["bytes_read"] - counted["bytes_read"]) / len(row["times"])
        row["ssd_written"] = (now["bytes_written"] - counted["bytes_written"]) / len(row["times"])
    engine.close()
    row["step"] = statistics.median(row["times"])
    row["tflops"] = model_flops(n, layers, args.hidden, args.batch, args.seq) / row["step"] / 1e12
    save()
    text = (f"\n## The largest model on this machine with a 24 GiB GPU budget ({row['date']}, {row['card']})\n\n"
            f"GPT {layers}L h={args.hidden} vocab {args.vocab} tied ({n / 1e9:.2f}B, bf16), batch {args.batch} x "
            f"{args.seq}, process capped at {args.cap}; host budget = memory available less {args.host_margin} "
            f"({format_bytes(host)}), SSD budget = free disk less {args.ssd_margin} ({format_bytes(ssd)}) "
            f"(`benchmarks/largest.py`). One warm-up, then the median of {len(row['times'])} steps.\n\n"
            "| params | step (range) | predicted | model TFLOPS | states on SSD | planned host / SSD | host RSS "
            "| SSD read / written per step | max reserved | host+SSD bytes per param |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n"
            f"| {n / 1e9:.2f}B | {row['step']:.1f} s ({min(row['times']):.1f}-{max(row['times']):.1f}) | "
            f"{row['predicted']:.1f} s | {row['tflops']:.1f} | {row['states_on_ssd']} of {row['groups']} groups | "
            f"{format_bytes(row['planned_host'])} / {format_bytes(row['planned_ssd'])} | {format_bytes(row['rss'])} | "
            f"{format_bytes(row.get('ssd_read', 0))} / {format_bytes(row.get('ssd_written', 0))} | "
            f"{format_bytes(row['reserved'])} | {(row['planned_host'] + row['planned_ssd']) / n:.1f} |\n")
    publish(text, args.results)


if __name__ == "__main__":
    main()
