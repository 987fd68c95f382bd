"""Activation placement on a real GPU: Ratel's automatic plan against fixed policies, over batch sizes.

The reference GPT at 13B layer shape (h=5120, 40 heads, seq 2048, vocabulary 32000, bf16; fewer layers than
13B so its optimizer states fit the machine's host memory), under a GPU budget (default 24 GiB). For each
batch size, one engine trains with:
  recompute   only unit inputs checkpointed, every unit recomputed in backward;
  auto        Ratel's plan: every saved tensor kept, swapped to host or recomputed, by predicted step time;
  keep        nothing recomputed, everything kept on the GPU (where it fits the budget).
Prints model TFLOPS (docs/architecture.md: 6·N·tokens + 12·L·h·s² per sequence, recompute not counted), the measured
GPU peak, what the automatic plan decided and how it compares, and appends the table to RESULTS.md.

    python benchmarks/activations.py [--layers 4 --batches 1,2,4,8,16 --budget 24GiB --steps 3]
"""
from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import torch

import ratel
from ratel.ir import Tier, format_bytes
from ratel.models import GPT, GPTConfig
from ratel.tools.bench import publish


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--budget", default="24GiB")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="each policy is timed this many times, interleaved")
    p.add_argument("--profile-dir", default=None, help="write a profiled step's timeline for each policy at the "
                                                         "largest batch here (PNG)")
    p.add_argument("--policies", default="recompute,auto,keep")
    p.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"))
    args = p.parse_args()
    card = torch.cuda.get_device_name()
    cfg = GPTConfig.gpt_13b(n_layer=args.layers, max_seq_len=args.seq, tie_embeddings=False)
    with torch.device("meta"):
        model = GPT(cfg).to(torch.bfloat16).train()
    n_params = sum(q.numel() for q in model.parameters())
    batches = [int(b) for b in args.batches.split(",")]
    policies = args.policies.split(",")
    hardware = ratel.detect_hardware("cuda")
    print(f"{card}: GPT {args.layers}L h={cfg.d_model} ({n_params / 1e9:.2f}B params, bf16), seq {args.seq}, "
          f"budget {args.budget}; hardware {hardware.gpu_tflops:.0f} TFLOP/s, H2D {hardware.h2d_gbps:.0f} GB/s, "
          f"CPU AdamW {hardware.cpu_adam_gparams:.1f} G/s", flush=True)
    first = torch.randint(0, cfg.vocab_size, (batches[0], args.seq), device="cuda")
    t0 = time.perf_counter()
    engine = ratel.compile(model, budget=args.budget, optimizer=ratel.AdamW(lr=1e-5), example_inputs=(first,),
                           hardware=hardware, activations="recompute")
    print(f"compile + materialise: {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for batch in batches:
        ids = torch.randint(0, cfg.vocab_size, (batch, args.seq), device="cuda")
        tokens = batch * args.seq
        flops = 6 * n_params * tokens + 12 * args.layers * cfg.d_model * args.seq ** 2 * batch
        row = {"batch": batch}
        best: dict[str, float] = {}
        for _ in range(args.rounds):       # interleaved rounds: drift in the machine hits every policy alike
            for policy in policies:
                if policy in row and row[policy][0] == "does not fit":
                    continue
                engine.activations = policy
                try:
                    engine.backward(engine(ids, labels=ids).loss)   # plans this shape, warms up
                    engine.step()
                except ratel.BudgetError as exc:
                    row[policy] = ("does not fit", f"needs {format_bytes(exc.needed)}")
                    continue
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                for _ in range(args.steps):
                    engine.backward(engine(ids, labels=ids).loss)
                    engine.step()
                torch.cuda.synchronize()
                seconds = (time.perf_counter() - start) / args.steps
                peak = torch.cuda.max_memory_allocated()
                if seconds >= best.get(policy, float("inf")):
                    continue
                best[policy] = seconds
                plan = engine.plan
                acts = plan.activations
                mix = ""
                if policy == "auto":
                    kept = sum(u.bytes_on(Tier.GPU) for u in acts.units)
                    host = sum(u.bytes_on(Tier.HOST) for u in acts.units)
                    redo = sum(u.bytes_on(None) for u in acts.units)
                    mix = (f"kept {format_bytes(kept)}, host {format_bytes(host)}, recomputed {format_bytes(redo)}"
                           if any(u.mode == "saved" for u in acts.units) else "recompute every unit")
                row[policy] = (f"{flops / seconds / 1e12:.0f}", f"{seconds * 1e3:.0f} ms, peak {format_bytes(peak)}"
                               f" ({peak / plan.budget_gpu:.0%}), predicted {plan.times.total * 1e3:.0f} ms", mix,
                               flops / seconds / 1e12)
        for policy in policies:
            if policy in row and len(row[policy]) > 3:
                print(f"batch {batch:3d} {policy:9s} {row[policy][0]:>6s} TFLOPS  {row[policy][1]}  {row[policy][2]}",
                      flush=True)
        if args.profile_dir and batch == batches[-1]:
            from ratel.tools.plots import plot_timeline
            Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
            for policy in policies:
                if policy in row and len(row[policy]) > 3:
                    engine.activations = policy
                    engine.backward(engine(ids, labels=ids).loss)
                    engine.step()
                    engine.profile = True
                    engine.backward(engine(ids, labels=ids).loss)
                    engine.step()
                    engine.profile = False
                    plot_timeline(engine.plan, engine.last_step, Path(args.profile_dir) / f"timeline_b{batch}_{policy}.png")
                    print(ratel.summary(engine.plan, engine.last_step), file=open(Path(args.profile_dir) /
                                                                            f"summary_b{batch}_{policy}.txt", "w"))
        rows.append(row)
    engine.close()

    lines = [f"\n## Activation placement: automatic plan vs fixed policies ({datetime.date.today()}, {card})\n",
             f"GPT {args.layers} layers at 13B layer shape (h={cfg.d_model}, {cfg.n_head} heads, seq {args.seq}, "
             f"vocab {cfg.vocab_size}, {n_params / 1e9:.2f}B params, bf16), GPU budget {args.budget}, "
             f"best of {args.rounds} interleaved rounds of {args.steps} timed steps after a warm-up. Model TFLOPS = (6·N·tokens + 12·L·h·s²·batch) / step "
             "time; recompute is not counted.\n",
             "| batch | " + " | ".join(f"{p} TFLOPS" for p in policies) + " | auto / best fixed | auto / keep | "
             "automatic plan | details |",
             "|---" * (len(policies) + 5) + "|"]
    for row in rows:
        cells = [str(row["batch"])]
        values = {}
        for policy in policies:
            entry = row.get(policy)
            cells.append(entry[0] if entry else "-")
            if entry and len(entry) > 3:
                values[policy] = entry[3]
        fixed = [v for k, v in values.items() if k != "auto"]
        auto = values.get("auto")
        cells.append(f"{auto / max(fixed):.2f}" if auto and fixed else "-")
        cells.append(f"{auto / values['keep']:.2f}" if auto and "keep" in values else "keep does not fit")
        cells.append(row.get("auto", ("", "", ""))[2] if "auto" in row and len(row["auto"]) > 2 else "-")
        cells.append("; ".join(f"{k}: {row[k][1]}" for k in policies if k in row))
        lines.append("| " + " | ".join(cells) + " |")
    publish("\n".join(lines) + "\n", args.results)


if __name__ == "__main__":
    main()
