"""Data parallel on one host: the same GPT trained by 1, 2, 4 ranks (``torchrun``), each rank's GPU capped alike.

Issue #14's measurement: throughput of the 3.6B GPT (and, with ``--layers``, of the largest model that fits
the host) on N GPUs against one GPU, measured in the same run. Each configuration runs in its own
``torchrun --standalone --nproc-per-node N`` (a crash or a timeout ends that row only). Every rank trains
``--batch`` rows per micro-batch (the global batch is N x batch, as with DistributedDataParallel), with
Ratel's budget ``--cap`` - 1 GiB of GPU per rank (``set_per_process_memory_fraction``) and ``--host`` for
the host (its ranks share it). Steps: ``--warmup`` untimed, then the median of ``--steps``. Model TFLOPS =
(6 N tokens + 12 L h s^2 B) / step over the global batch; the speed-up is against the one-rank row.

    python benchmarks/ranks.py --ranks 1 2 4 [--layers 16 --batch 4 --append-results]

``--smoke`` runs the same logic on the CPU (gloo ranks, a tiny GPT) in well under a minute; it is what the
test runs. Rows go to ``<out>/rows.jsonl``, the table to ``<out>/table.md`` (``--out``: $OUT when set).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SMOKE = dict(layers=2, hidden=64, heads=4, vocab=256, seq=32, batch=2, ranks=[1, 2], steps=2, cap="2GiB",
             row_timeout=240)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="ranks per run (one GPU each)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4, help="rows per rank per step")
    p.add_argument("--cap", default="24GiB", help="GPU memory each rank's process may use")
    p.add_argument("--host", default=None, help="host budget of the whole host (default: 90%% of its memory)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--no-resident", action="store_true", help="stream every group (compile's resident=False)")
    p.add_argument("--row-timeout", type=float, default=560)
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "ranks"))
    p.add_argument("--append-results", action="store_true")
    p.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"))
    p.add_argument("--smoke", action="store_true", help="a tiny GPT on CPU ranks (gloo): tests the script")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)   # inside torchrun: one rank
    args = p.parse_args(argv)
    if args.smoke:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for key, value in SMOKE.items():
            if f"--{key.replace('_', '-')}" not in given:
                setattr(args, key, value)
    return args


def gpt(args):
    from ratel.models import GPT, GPTConfig
    config = GPTConfig(vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads, d_model=args.hidden,
                       max_seq_len=args.seq, tie_embeddings=False, dropout=0.0)
    with torch.device("meta"):
        return GPT(config).to(torch.float32 if args.smoke else torch.bfloat16).train()


def worker(args) -> None:
    """One rank: compile (which joins the job), train, write this rank's figures."""
    import ratel
    from ratel.tools.bench import model_flops
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        total = torch.cuda.get_device_properties(local).total_memory
        torch.cuda.set_per_process_memory_fraction(ratel.parse_bytes(args.cap) / total, local)
    model = gpt(args)
    n = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(int(os.environ.get("RANK", 0)))
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    budget = ratel.Budget(gpu=ratel.parse_bytes(args.cap) - (1 << 30), host=args.host)
    engine = ratel.compile(model, budget=budget, optimizer=ratel.AdamW(lr=1e-5), example_inputs=(ids,),
                           device=device, progress=False, resident=False if args.no_resident else None)
    if device == "cuda":
        ids = ids.cuda()
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = engine(ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        if device == "cuda":
            torch.cuda.synchronize()
        losses.append(loss.item())
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    world, rank = engine.world_size, engine.rank
    plan = engine.plan
    row = {"ranks": world, "rank": rank, "batch": args.batch, "global_batch": args.batch * world,
           "step": statistics.median(times), "range": [min(times), max(times)], "predicted": plan.times.total,
           "params": n, "layers": args.layers, "losses": losses,
           "tflops": model_flops(n, args.layers, args.hidden, args.batch * world, args.seq) / statistics.median(times)
           / 1e12, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "on_gpu": sum(plan.placement.on_gpu(g.name) for g in plan.groups), "groups": len(plan.groups),
           "card": torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke: gloo ranks)"}
    engine.close()
    Path(args.out, f"ranks{world}-rank{rank}.json").write_text(json.dumps(row))


def run(args, argv: list[str]) -> list[dict]:
    """One torchrun per entry of ``--ranks``; rows merged over each run's ranks (host RSS summed)."""
    Path(args.out).mkdir(parents=True, exist_ok=True)
    forwarded = [a for a in argv if a != "--append-results"]
    rows = []
    for world in args.ranks:
        for old in Path(args.out).glob(f"ranks{world}-rank*.json"):
            old.unlink()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        if args.smoke:
            env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               str(Path(__file__).resolve()), "--worker", *forwarded, "--out", args.out]
        print(f"== {world} rank(s): {' '.join(cmd[2:5])}", flush=True)
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.row_timeout)
            status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode}): {done.stderr[-400:]}"
        except subprocess.TimeoutExpired:
            status = f"timed out after {args.row_timeout:.0f} s"
        parts = [json.loads(p.read_text()) for p in sorted(Path(args.out).glob(f"ranks{world}-rank*.json"))]
        if status != "ok" or len(parts) != world:
            rows.append({"ranks": world, "batch": args.batch, "status": status if status != "ok" else
                         f"{len(parts)} of {world} ranks reported"})
            print(rows[-1], flush=True)
            continue
        row = dict(parts[0], status="ok", step=max(p["step"] for p in parts),
                   rss=sum(p["rss"] for p in parts))
        row["tflops"] = parts[0]["tflops"] * parts[0]["step"] / row["step"]
        rows.append(row)
        print({k: row[k] for k in ("ranks", "global_batch", "step", "tflops")}, flush=True)
    with open(Path(args.out) / "rows.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def table(rows: list[dict], args) -> str:
    base = next((r for r in rows if r.get("status") == "ok" and r["ranks"] == 1), None)
    card = next((r["card"] for r in rows if r.get("card")), "no card recorded")
    n = next((r["params"] for r in rows if r.get("params")), 0)
    lines = [f"\n## Data parallel on one host: 1 to {max(args.ranks)} ranks ({datetime.date.today()}, {card})\n",
             f"GPT {args.layers}L h={args.hidden} vocab {args.vocab} untied ({n / 1e9:.2f}B), seq {args.seq}, "
             f"{args.batch} rows per rank, each rank's process capped at {args.cap} (Ratel's budget 1 GiB "
             f"below){', every group streamed' if args.no_resident else ''}; `benchmarks/ranks.py`, one torchrun "
             "per row, median of the timed steps (the slowest rank's). Model TFLOPS over the global batch.\n",
             "| ranks | global batch | step (range) | model TFLOPS | speed-up vs 1 rank | predicted step | "
             "groups on each GPU | host RSS (all ranks) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['ranks']} | | {r['status']} | | | | | |")
            continue
        speedup = f"{r['tflops'] / base['tflops']:.2f}x" if base else ""
        lines.append(f"| {r['ranks']} | {r['global_batch']} | {r['step']:.3f} s ({r['range'][0]:.3f}-"
                     f"{r['range'][1]:.3f}) | {r['tflops']:.3g} | {speedup} | {r['predicted']:.3f} s | "
                     f"{r['on_gpu']} of {r['groups']} | {r['rss'] / 2**30:.1f} GiB |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    rows = run(args, argv)
    text = table(rows, args)
    print(text)
    Path(args.out, "table.md").write_text(text)
    if args.append_results:
        with open(args.results, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
