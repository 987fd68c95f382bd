"""What clipping and gradient accumulation cost, on a real GPU, against the same run without them.

One process, one card, the GPU capped (``set_per_process_memory_fraction``) to stand in for a smaller one:

  1. GPU-resident PyTorch, uncapped: forward + backward of the whole bf16 model (no optimizer): the bound a
     non-final micro-batch of accumulation is compared with;
  2. Ratel, plain: forward, backward, step (AdamW on the CPU during backward);
  3. Ratel with ``max_grad_norm``: every update waits for the global norm, then runs in forward order;
  4. Ratel with ``accumulate=k``: the time of each micro-batch (start to start) and of the whole update.

Weights are random, written once to a safetensors file and read by every engine (initialising a meta model
on the CPU is slow; the values do not matter for timing). Median of ``--steps`` timed updates after one
warm-up. Appends its table to benchmarks/RESULTS.md.

    python benchmarks/training_semantics.py [--layers 16 --hidden 4096 --heads 32 --batch 8 --seq 2048 --cap 24GiB]
"""
from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

import ratel
from ratel.ir import format_bytes
from ratel.models import GPT, GPTConfig


def sync():
    torch.cuda.synchronize()


def write_random_weights(model, path: Path) -> None:
    from safetensors.torch import save_file
    g = torch.Generator(device="cuda").manual_seed(0)
    tensors = {}
    for name, p in model.named_parameters():
        t = torch.empty(p.shape, dtype=p.dtype, device="cuda")
        if p.ndim >= 2:
            t.normal_(0.0, 0.02, generator=g)
        else:
            t.fill_(1.0 if name.endswith("weight") else 0.0)
        tensors[name] = t.cpu()
    save_file(tensors, str(path))


def resident_fwd_bwd(cfg, ids, steps: int) -> float:
    """Median forward + backward of the whole model on the GPU, uncapped, no optimizer."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GPT(cfg).to(torch.bfloat16).train()
    times = []
    for i in range(steps + 1):
        sync()
        t0 = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        sync()
        times.append(time.perf_counter() - t0)
        for p in model.parameters():
            p.grad = None
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return statistics.median(times[1:])


def run_ratel(meta_model, ids, budget, weights: Path, steps: int, **kwargs) -> dict:
    engine = ratel.compile(meta_model, budget=budget, optimizer=ratel.AdamW(lr=1e-5, weight_decay=0.1),
                           example_inputs=(ids,), weights=str(weights), progress=False, **kwargs)
    k = kwargs.get("accumulate", 1)
    torch.cuda.reset_peak_memory_stats()
    updates, micro, norms = [], [], []
    for u in range(steps + 1):
        sync()
        starts = []
        for m in range(k):
            starts.append(time.perf_counter())
            engine.backward(engine(ids, labels=ids).loss / k)
        engine.step()
        sync()
        end = time.perf_counter()
        if u > 0:                                     # the first update is the warm-up
            updates.append(end - starts[0])
            micro.extend(b - a for a, b in zip(starts, starts[1:]))   # the non-final micro-batches
            if engine.grad_norm is not None:
                norms.append(engine.grad_norm)
    out = {"update": statistics.median(updates), "spread": (min(updates), max(updates)),
           "micro": statistics.median(micro) if micro else None, "predicted": engine.plan.times.total,
           "reserved": torch.cuda.max_memory_reserved(), "allocated": torch.cuda.max_memory_allocated(),
           "host": engine.plan.memory.host_total, "norms": norms, "plan": engine.plan}
    engine.close()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--accumulate", type=int, default=4)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--cap", default="24GiB", help="GPU memory the process may use (stands in for a smaller card)")
    p.add_argument("--budget", default=None, help="Ratel's GPU budget (default: the cap less 1 GiB of headroom)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"))
    args = p.parse_args()
    card = torch.cuda.get_device_name()
    cap = ratel.parse_bytes(args.cap)
    budget = ratel.parse_bytes(args.budget) if args.budget else cap - (1 << 30)
    cfg = GPTConfig(vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads, d_model=args.hidden,
                    max_seq_len=args.seq, tie_embeddings=False, dropout=0.0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.device("meta"):
        meta_model = GPT(cfg).to(torch.bfloat16).train()
    n_params = sum(q.numel() for q in meta_model.parameters())

    resident = resident_fwd_bwd(cfg, ids, args.steps)
    print(f"GPU-resident forward+backward (uncapped): {resident * 1e3:.0f} ms", flush=True)

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap / total)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.safetensors"
        t0 = time.perf_counter()
        write_random_weights(meta_model, weights)
        print(f"wrote random weights in {time.perf_counter() - t0:.1f} s", flush=True)
        plain = run_ratel(meta_model, ids, budget, weights, args.steps)
        print(f"plain: {plain['update'] * 1e3:.0f} ms", flush=True)
        clip = run_ratel(meta_model, ids, budget, weights, args.steps, max_grad_norm=args.max_grad_norm)
        print(f"clip: {clip['update'] * 1e3:.0f} ms", flush=True)
        acc = run_ratel(meta_model, ids, budget, weights, args.steps, accumulate=args.accumulate)
        print(f"accumulate: {acc['update'] * 1e3:.0f} ms per update, {acc['micro'] * 1e3:.0f} ms per micro-batch",
              flush=True)

    def ms(s):
        return f"{s * 1e3:,.0f} ms"

    def spread(r):
        return f"{ms(r['spread'][0])}-{ms(r['spread'][1])}"

    k = args.accumulate
    triggered = sum(n > args.max_grad_norm for n in clip["norms"])
    rows = [
        ("model", f"GPT {args.layers}L h={args.hidden} vocab {args.vocab} untied ({n_params / 1e9:.2f}B, bf16), "
                  f"batch {args.batch} x seq {args.seq}"),
        ("GPU cap / Ratel budget", f"{format_bytes(cap)} / {format_bytes(budget)}"),
        ("GPU-resident fwd+bwd, uncapped (no optimizer)", ms(resident)),
        ("Ratel step, plain", f"{ms(plain['update'])} (range {spread(plain)}; predicted {ms(plain['predicted'])})"),
        (f"Ratel step, max_grad_norm={args.max_grad_norm}",
         f"{ms(clip['update'])} (range {spread(clip)}; predicted {ms(clip['predicted'])}); clipped "
         f"{triggered}/{len(clip['norms'])} steps"),
        ("clipping cost", f"{clip['update'] / plain['update'] - 1:+.1%} of the plain step (goal <= +5 %)"),
        (f"Ratel update, accumulate={k}", f"{ms(acc['update'])} for {k} micro-batches (range {spread(acc)}; "
                                          f"{acc['update'] / (k * plain['update']):.2f}x of {k} plain steps)"),
        (f"non-final micro-batch (median of {k - 1} per update)",
         f"{ms(acc['micro'])} = {acc['micro'] / resident:.2f}x GPU-resident fwd+bwd (goal <= 1.1x)"),
        ("max_memory_reserved (plain / clip / accumulate)",
         " / ".join(format_bytes(r["reserved"]) for r in (plain, clip, acc))),
        ("planned host memory (plain / accumulate)", f"{format_bytes(plain['host'])} / {format_bytes(acc['host'])}"),
    ]
    width = max(len(a) for a, _ in rows)
    print(f"\nClipping and accumulation on {card}")
    for a, b in rows:
        print(f"  {a:<{width}}  {b}")
    with Path(args.results).open("a") as f:
        f.write(f"\n## Clipping and gradient accumulation: cost against the same run without them "
                f"({datetime.date.today()}, {card})\n\n| | |\n|---|---|\n")
        for a, b in rows:
            f.write(f"| {a} | {b} |\n")


if __name__ == "__main__":
    main()
