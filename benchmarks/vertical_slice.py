"""Vertical slice on a real GPU: a model larger than the GPU budget trains within it.

Prints, for a Llama-shaped model created on the meta device: its parameter bytes, the budget (the smallest
the planner accepts, below the parameters), the planned and the measured peak GPU memory
(torch.cuda.max_memory_allocated), and the step time next to GPU-resident PyTorch (bf16 model, fp32
master weights and fused AdamW, all on the GPU) measured in the same run. Appends the table to
benchmarks/RESULTS.md.

    python benchmarks/vertical_slice.py [--layers 22 --hidden 2048 --batch 4 --seq 1024 --steps 5]
"""
from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import torch

import ratel
from ratel.ir import format_bytes


def llama(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv,
                      max_position_embeddings=args.seq)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.train()


def time_steps(step, n: int) -> float:
    step()                                    # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"))
    args = p.parse_args()
    card = torch.cuda.get_device_name()
    ids = torch.randint(0, 32000, (args.batch, args.seq), device="cuda")
    tokens = args.batch * args.seq

    # GPU-resident PyTorch baseline: everything on the GPU, no recompute.
    model = llama(args, "cuda")
    n_params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    masters = [p.detach().float().requires_grad_() for p in model.parameters()]
    opt = torch.optim.AdamW(masters, lr=1e-5, fused=True)

    def baseline_step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        for m, q in zip(masters, model.parameters()):
            m.grad = q.grad.float()
            q.grad = None
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for m, q in zip(masters, model.parameters()):
                q.copy_(m)

    torch.cuda.reset_peak_memory_stats()
    baseline = time_steps(baseline_step, args.steps)
    baseline_peak = torch.cuda.max_memory_allocated()
    del model, masters, opt
    torch.cuda.empty_cache()

    meta_model = llama(args, "meta")
    # The smallest budget the planner accepts: the peak of its most frugal plan (every unit recomputed, every
    # group streamed).
    budget = ratel.explain(meta_model, "1TiB", (ids,), activations="recompute", resident=False).memory.gpu_peak
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = ratel.compile(meta_model, budget=budget, optimizer=ratel.AdamW(lr=1e-5), example_inputs=(ids,))
    plan_kind = ", ".join(sorted({u.mode for u in engine.plan.activations.units}))
    setup = time.perf_counter() - t0

    def ratel_step():
        engine.backward(engine(ids, labels=ids).loss)
        engine.step()

    step_time = time_steps(ratel_step, args.steps)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    plan = engine.plan
    predicted = plan.times.total
    engine.close()

    rows = [
        ("model", f"Llama {args.layers}L h={args.hidden} ({n_params / 1e9:.2f}B params, bf16), batch {args.batch} x seq {args.seq}"),
        ("parameter bytes", format_bytes(param_bytes)),
        ("GPU budget (smallest accepted)", format_bytes(budget)),
        ("activation plan (auto)", plan_kind),
        ("planned peak", format_bytes(plan.memory.gpu_peak)),
        ("measured peak (max_memory_allocated)", f"{format_bytes(peak)} ({peak / budget:.1%} of budget)"),
        ("GPU-resident PyTorch peak", format_bytes(baseline_peak)),
        ("Ratel step", f"{step_time * 1e3:.0f} ms ({tokens / step_time:,.0f} tok/s); predicted {predicted * 1e3:.0f} ms"),
        ("GPU-resident PyTorch step", f"{baseline * 1e3:.0f} ms ({tokens / baseline:,.0f} tok/s)"),
        ("Ratel / GPU-resident time", f"{step_time / baseline:.2f}x"),
        ("compile + materialise", f"{setup:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\nVertical slice on {card}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print("within budget:", peak <= budget)
    with Path(args.results).open("a") as f:
        f.write(f"\n## Vertical slice: training within a GPU budget smaller than the model "
                f"({datetime.date.today()}, {card})\n\n| | |\n|---|---|\n")
        for k, v in rows:
            f.write(f"| {k} | {v} |\n")


if __name__ == "__main__":
    main()
