"""SSD-bound training steps against the disk's own rate, measured in the same run.

Three plans that put the step on the SSD lane, on one GPU capped to stand in for a smaller card:

  states   half of the optimizer states on SSD (host budget = what everything on the host needs, less half
           of the states);
  params   every optimizer state and about half of the parameter copies on SSD;
  saved    every saved activation on SSD (``activations="ssd"``), states on the host.

For each: median step time over ``--steps`` after one warm-up, the plan's predicted step, and the SSD
roofline: the bytes the swapper read and wrote per timed step (its own counters: a parameter copy still in a
staging slot is not read again) over the raw rates of this disk measured first, through the swapper with one
large O_DIRECT request at a time per direction, as the SSD lane issues them: reads alone, writes alone, and
both at once. Roofline = max(read / read rate, written / write rate, (read + written) / rate of both at once). Writes a JSON of
the rows (``--json``); ``--compare A.json B.json`` prints two runs side by side and appends the table to
benchmarks/RESULTS.md.

    python benchmarks/ssd_lane.py --label after --json after.json [--layers 4 --hidden 2048 --batch 2 --seq 1024]
    python benchmarks/ssd_lane.py --compare before.json after.json
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import ratel
from ratel.errors import BudgetError
from ratel.ir import Tier
from ratel.models import GPT, GPTConfig
from ratel.passes.simulate import ssd_bytes_moved
from ratel.runtime.calibrate import measure_disk
from ratel.tools.bench import publish


def roofline(read: float, written: float, disk: dict) -> float:
    return max(read / disk["read"], written / disk["write"], (read + written) / disk["both"])


def write_random_weights(model, path: Path) -> None:
    from safetensors.torch import save_file
    tensors = {}
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        t = torch.empty(p.shape, dtype=torch.float32)
        t.normal_(0.0, 0.02, generator=g) if p.ndim >= 2 else t.fill_(1.0 if name.endswith("weight") else 0.0)
        tensors[name] = t.to(p.dtype)
    save_file(tensors, str(path))


def host_entries(plan, prefix: str) -> list[int]:
    return [b for name, b in plan.memory.host_bytes if name.startswith(prefix)]


def run(meta_model, ids, gpu_budget, host, ssd_dir, weights, steps, activations) -> dict:
    budget = ratel.Budget(gpu=gpu_budget, host=host, ssd_dir=ssd_dir)
    try:
        engine = ratel.compile(meta_model, budget=budget, optimizer=ratel.AdamW(lr=1e-5), example_inputs=(ids,),
                               weights=str(weights), progress=False, activations=activations)
    except BudgetError as e:
        if e.tier != "host":
            raise
        budget = ratel.Budget(gpu=gpu_budget, host=e.needed, ssd_dir=ssd_dir)
        engine = ratel.compile(meta_model, budget=budget, optimizer=ratel.AdamW(lr=1e-5), example_inputs=(ids,),
                               weights=str(weights), progress=False, activations=activations)
    times = []
    swapper = engine._resources.swapper
    for step in range(steps + 1):
        torch.cuda.synchronize()
        if step == 1:
            counted = swapper.stats()
        t0 = time.perf_counter()
        engine.backward(engine(ids, labels=ids).loss)
        engine.step()
        torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
    swapper.wait_all()
    moved = {k: (swapper.stats()[k] - counted[k]) / steps for k in ("bytes_read", "bytes_written")}
    plan = engine.plan
    read, written = ssd_bytes_moved(plan.transfers)
    placement = plan.placement
    out = {"step": statistics.median(times), "range": [min(times), max(times)], "predicted": plan.times.total,
           "planned_read": read, "planned_written": written, "read": moved["bytes_read"],
           "written": moved["bytes_written"], "host": plan.memory.host_total,
           "states_on_ssd": sum(t == Tier.SSD for _, t in placement.optimizer_tier),
           "params_on_ssd": sum(t == Tier.SSD for _, t in placement.param_tier),
           "groups": len(placement.param_tier)}
    engine.close()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return out


def measure(args) -> dict:
    card = torch.cuda.get_device_name()
    cap = ratel.parse_bytes(args.cap)
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    gpu_budget = cap - (1 << 30)
    cfg = GPTConfig(vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads, d_model=args.hidden,
                    max_seq_len=args.seq, tie_embeddings=False, dropout=0.0)
    with torch.device("meta"):
        meta_model = GPT(cfg).to(torch.bfloat16).train()
    n_params = sum(p.numel() for p in meta_model.parameters())
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).cuda()
    Path(args.ssd_dir).mkdir(parents=True, exist_ok=True)
    disk = measure_disk([args.ssd_dir], 1 << 30)
    print(f"raw disk: write {disk['write'] / 1e9:.2f} GB/s, read {disk['read'] / 1e9:.2f} GB/s, both at once "
          f"{disk['both'] / 1e9:.2f} GB/s", flush=True)
    roomy = ratel.explain(meta_model, ratel.Budget(gpu=gpu_budget, host="1TiB", ssd_dir=args.ssd_dir), (ids,))
    states = sum(host_entries(roomy, "fp32 master + adam states:"))
    copies = sum(host_entries(roomy, "compute copy:"))
    configs = {
        "states": (roomy.memory.host_total - states // 2, "auto"),
        "params": (roomy.memory.host_total - states - copies // 2, "auto"),
        "saved": (roomy.memory.host_total * 4, "ssd"),
    }
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.safetensors"
        write_random_weights(meta_model, weights)
        for name, (host, activations) in configs.items():
            row = run(meta_model, ids, gpu_budget, host, args.ssd_dir, weights, args.steps, activations)
            row["roofline"] = roofline(row["read"], row["written"], disk)
            rows[name] = row
            print(f"{name}: step {row['step']:.3f} s (predicted {row['predicted']:.3f} s), SSD read "
                  f"{row['read'] / 1e9:.2f} GB + written {row['written'] / 1e9:.2f} GB, roofline "
                  f"{row['roofline']:.3f} s = {row['roofline'] / row['step']:.2f} of the step", flush=True)
    return {"label": args.label, "card": card, "cap": args.cap, "date": str(datetime.date.today()),
            "model": f"GPT {args.layers}L h={args.hidden} vocab {args.vocab} untied ({n_params / 1e9:.2f}B, bf16), "
                     f"batch {args.batch} x seq {args.seq}",
            "disk": disk, "rows": rows}


def compare(paths: list[str], results: str) -> None:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    first = runs[0]
    lines = [f"\n## The SSD lane: SSD-bound steps against the disk's raw rate ({first['date']}, {first['card']})\n",
             f"{first['model']}, GPU capped at {first['cap']}. Raw disk (1 GiB O_DIRECT requests, one per direction "
             "at a time): " + "; ".join(f"{r['label']}: write {r['disk']['write'] / 1e9:.2f}, read "
                                       f"{r['disk']['read'] / 1e9:.2f}, both at once {r['disk']['both'] / 1e9:.2f} GB/s"
                                       for r in runs)
             + ". Bytes are the swapper's counters per timed step; roofline = max(read / read rate, written / write "
             "rate, both / both-at-once rate). Median of the timed steps after one warm-up.\n",
             "| plan | SSD read + written per step | " + " | ".join(
                 f"{r['label']}: step (range) | {r['label']}: roofline / step" for r in runs) + " | predicted |",
             "|---|---|" + "---|---|" * len(runs) + "---|"]
    for name in first["rows"]:
        row = first["rows"][name]
        cells = [name + f" ({row['states_on_ssd']} state groups, {row['params_on_ssd']} param groups of "
                        f"{row['groups']} on SSD)",
                 " / ".join(f"{r['rows'][name]['read'] / 1e9:.2f} + {r['rows'][name]['written'] / 1e9:.2f} GB" for r in runs)]
        for r in runs:
            x = r["rows"][name]
            cells += [f"{x['step']:.3f} s ({x['range'][0]:.3f}-{x['range'][1]:.3f})", f"{x['roofline'] / x['step']:.2f}"]
        cells.append(" / ".join(f"{r['rows'][name]['predicted']:.3f} s" for r in runs))
        lines.append("| " + " | ".join(cells) + " |")
    publish("\n".join(lines) + "\n", results)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cap", default="24GiB", help="GPU memory the process may use (stands in for a smaller card)")
    p.add_argument("--ssd-dir", default="/tmp/ratel-ssd-bench", help="folder on the SSD for swap files")
    p.add_argument("--label", default="this commit")
    p.add_argument("--json", help="write the measured rows here")
    p.add_argument("--compare", nargs="+", metavar="JSON", help="print runs side by side; append to RESULTS.md")
    p.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"))
    args = p.parse_args()
    if args.compare:
        compare(args.compare, args.results)
        return
    out = measure(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
