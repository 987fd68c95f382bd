"""The host's work per unit: Ratel's step on a model whose kernels take almost no time, against eager PyTorch.

A GPT of many thin layers (h=64, seq 32, batch 1) leaves each step to Python and the dispatcher: what Ratel
adds per unit (the schedule, the autograd Function per unit, saved-tensor hooks, copies issued) is the
difference from the eager step of the same model, divided by the units. Why measure it: the planner prices
a unit by its kernels only, so where a unit's kernels take less than this, the host bounds the step and the
prediction is short (issue #11: a GPT with h=1024, seq 512 on the H200 ran its units at half the predicted
rate). Same run, same process: eager PyTorch + torch.optim.AdamW first, then Ratel under each activation
policy (AdamW on the CPU thread, as always).

    python benchmarks/host_overhead.py [--layers 16] [--device cpu|cuda] [--append-results]
"""
from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

import torch

import ratel
from ratel.ir.hardware import cpu_model
from ratel.models import GPT, GPTConfig
from ratel.tools.bench import WARMUP_STEPS, _time, publish   # warm-ups, then the median of synchronised steps

POLICIES = ("recompute", "auto", "keep", "host")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--append-results", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    config = GPTConfig(vocab_size=256, n_layer=args.layers, n_head=4, d_model=64, max_seq_len=32, tie_embeddings=False)
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)

    torch.manual_seed(0)
    model = GPT(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def eager_step():
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    eager = _time(eager_step, args.steps, device).median
    rows = []
    for policy in POLICIES:
        torch.manual_seed(0)
        engine = ratel.compile(GPT(config), budget="1GiB", optimizer=ratel.AdamW(lr=1e-5), example_inputs=(ids,),
                               device=device, progress=False, activations=policy)
        units = len(engine.plan.units)
        saved = sum(engine.plan.activations.of(u.index).mode == "saved" for u in engine.plan.units)

        def ratel_step():
            loss = engine(ids, labels=ids).loss
            engine.backward(loss)
            engine.step()

        step = _time(ratel_step, args.steps, device).median
        engine.close()
        rows.append((policy, units, saved, step, (step - eager) / units))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_model()})"
    lines = [f"## Host work per unit: Ratel against eager PyTorch on a model of tiny kernels "
             f"({datetime.date.today()}, {where}, {torch.get_num_threads()} threads, torch {torch.__version__})",
             "",
             f"`benchmarks/host_overhead.py --layers {args.layers} --device {args.device}`: GPT {args.layers}L h=64 "
             f"seq 32 batch 1, median of {args.steps} steps after {WARMUP_STEPS} warm-ups, "
             f"on {platform.node() or 'this host'}.",
             "",
             "| system | units (saved mode) | step | / eager | added per unit |",
             "|---|---|---|---|---|",
             f"| eager PyTorch + torch.optim.AdamW | | {eager * 1e3:.1f} ms | 1.00 | |"]
    for policy, units, saved, step, per_unit in rows:
        lines.append(f"| Ratel, activations={policy} | {units} ({saved}) | {step * 1e3:.1f} ms | {step / eager:.2f} | "
                     f"{per_unit * 1e3:.2f} ms |")
    publish("\n".join(lines) + "\n", Path(__file__).with_name("RESULTS.md") if args.append_results else None)


if __name__ == "__main__":
    main()
