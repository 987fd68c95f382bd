"""The fine-tuning job on a real GPU: ``ratel train`` on a Llama larger than the GPU budget, with optimizer
states partly on SSD, stopped by SIGTERM mid-way and resumed, in one run on one card.

1. The disk's raw write rate (O_DIRECT, 64 MiB blocks) and its buffered rate (write + fsync), in the folder
   the checkpoints go to: the rates the checkpoint write is compared with.
2. A model folder as a user has one: config.json and bf16 safetensors weights (random, made on the GPU);
   data: the Python standard library's own sources as plain text (every machine has them), byte-level.
3. The host budget is the plan's host total less ``--spill``, so that much of the optimizer states lives in
   swap files on the disk.
4. ``python -m ratel train`` in a child process capped with ``set_per_process_memory_fraction`` (standing in
   for a smaller card), sent SIGTERM after update ``--stop-at``: it saves a checkpoint and exits; then
   ``--resume`` continues to ``--steps`` and saves the last checkpoint.

Reports step time, loss at the start and end, checkpoint write time, size and rate against the raw rate, the
start-up of the fresh and of the resumed run (process start to the first update), peak GPU memory reserved
and host RSS. Prints a Markdown table; ``--results FILE`` appends it there.

    python benchmarks/finetune_job.py --work /tmp/job [--layers 20 --hidden 2560 --steps 200 --stop-at 100]
"""
from __future__ import annotations

import argparse
import datetime
import json
import mmap
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

from resume_startup import drop_caches      # this folder: the page cache emptied before each start

GiB = 1 << 30
START = time.perf_counter()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"      # the CPU only to try the script end to end


def disk_rates(folder: Path, size: int = 8 * GiB, block: int = 64 << 20) -> tuple[float, float]:
    """(raw O_DIRECT write rate, buffered write + fsync rate) in bytes/s, writing ``size`` bytes into ``folder``."""
    buffer = mmap.mmap(-1, block)          # page-aligned, as O_DIRECT wants
    buffer.write(os.urandom(1 << 20) * (block >> 20))
    rates = []
    for flags in (os.O_DIRECT, 0):
        path = folder / "rate.bin"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o600)
        except OSError:         # a file system without O_DIRECT (tmpfs)
            rates.append(float("nan"))
            continue
        start = time.perf_counter()
        for _ in range(size // block):
            os.write(fd, buffer)
        os.fsync(fd)
        rates.append(size / (time.perf_counter() - start))
        os.close(fd)
        path.unlink()
    return rates[0], rates[1]


def python_sources(path: Path, limit: int) -> int:
    """The standard library's .py files as one text file of about ``limit`` bytes; returns its size."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    size = 0
    with open(path, "w", encoding="utf-8") as out:
        for file in sorted(lib.rglob("*.py")):
            if "test" in file.parts or size >= limit:
                continue
            try:
                text = file.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            out.write(text + "\n\n")
            size += len(text.encode()) + 2
    return size


def write_model(folder: Path, args) -> int:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                         dtype="bfloat16")
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    tensors = {}
    for name, p in model.named_parameters():
        t = torch.empty(p.shape, dtype=torch.bfloat16, device=device)
        t.normal_(0.0, 0.02, generator=g) if p.ndim >= 2 else t.fill_(1.0)
        tensors[name] = t.cpu()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() for t in tensors.values())


def host_budget(args, model_dir: Path, swap: Path) -> int:
    """The plan's host total with every state in host memory, less ``--spill``."""
    import ratel
    from ratel.tools.presets import build_model, resolve

    model = build_model(resolve(str(model_dir)), torch.bfloat16)
    ids = torch.zeros(args.batch, args.seq, dtype=torch.long)
    plan = ratel.explain(model, ratel.Budget(gpu=args.budget, host="1TiB", ssd_dir=str(swap)), (ids,),
                         device=DEVICE, accumulate=args.accumulate, max_grad_norm=1.0)
    return plan.memory.host_total - int(float(args.spill.removesuffix("GiB")) * GiB)   # 0: every state on the host


def child(argv: list[str], cap: int) -> int:
    """One ``ratel train`` process under the GPU cap; prints its peaks as the last line."""
    if DEVICE == "cuda":
        torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    from ratel.cli import main
    code = main(argv + ["--device", DEVICE])
    peak = {"max_memory_reserved": torch.cuda.max_memory_reserved() if DEVICE == "cuda" else 0,
            "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    print("PEAKS " + json.dumps(peak), flush=True)
    return code


def _startups(metrics: Path) -> list[dict]:
    if not metrics.exists():
        return []
    return [r for r in _records(metrics) if "startup_seconds" in r]


def _records(metrics: Path) -> list[dict]:
    out = []
    for line in metrics.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:      # a line being written
            pass
    return out


def run_train(argv: list[str], cap: int, log: Path, stop_at: int | None, metrics: Path, deadline: float) -> dict:
    """Run ``ratel train``; SIGTERM after update ``stop_at``, or at ``deadline`` (perf_counter) at the latest."""
    start = time.perf_counter()
    with open(log, "a") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(cap), *argv], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        first_update = None
        starts_before = len(_startups(metrics))
        while proc.poll() is None:
            time.sleep(0.2)
            if metrics.exists():
                records = _records(metrics)
                steps = [r["step"] for r in records if "loss" in r]
                # A resumed run keeps the fresh run's start-up record (update 0) and adds its own.
                if first_update is None and len(_startups(metrics)) > starts_before:
                    first_update = time.perf_counter() - start
                if os.environ.get("OUT"):
                    shutil.copy(metrics, Path(os.environ["OUT"]) / "metrics.jsonl")
                if (stop_at is not None and steps and steps[-1] >= stop_at) or time.perf_counter() > deadline:
                    proc.send_signal(signal.SIGTERM)
                    stop_at, deadline = None, float("inf")
        wall = time.perf_counter() - start
    peaks = {}
    for line in log.read_text().splitlines():
        if line.startswith("PEAKS "):
            peaks = json.loads(line[6:])
    return {"code": proc.returncode, "wall": wall, "to_first_update": first_update, **peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/ratel-job", help="folder on the disk under test")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000, help="Llama-2's (the data is byte-level: 257 used)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--stop-at", type=int, default=80)
    parser.add_argument("--cap", default="24GiB", help="GPU memory the process may take")
    parser.add_argument("--budget", default="23GiB", help="Ratel's GPU budget")
    parser.add_argument("--spill", default="0.25GiB", help="optimizer states pushed to the SSD by the host budget")
    parser.add_argument("--data-bytes", type=int, default=4_000_000)
    parser.add_argument("--rate-bytes", type=int, default=8 * GiB)
    parser.add_argument("--results", help="append the table to this file")
    parser.add_argument("--deadline", type=float, default=float("inf"),
                        help="seconds after the start at which a run still going is stopped (SIGTERM: it saves)")
    args = parser.parse_args()

    from ratel.ir.budget import parse_bytes
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    raw, buffered = disk_rates(work, args.rate_bytes)
    free = shutil.disk_usage(work).free
    print(f"disk: raw O_DIRECT write {raw / 1e9:.2f} GB/s, buffered + fsync {buffered / 1e9:.2f} GB/s, "
          f"{free / GiB:.1f} GiB free", flush=True)
    data = work / "stdlib.txt"
    data_size = python_sources(data, args.data_bytes)
    n_params = write_model(work / "model", args)
    swap = work / "swap"
    swap.mkdir()
    host = host_budget(args, work / "model", swap)
    print(f"model: Llama {args.layers} x {args.hidden}, {n_params / 1e9:.2f} B parameters; data {data_size / 1e6:.1f} "
          f"MB; host budget {host / GiB:.1f} GiB", flush=True)

    out = work / "run"
    argv = ["train", "--model", str(work / "model"), "--data", str(data), "--out", str(out), "--seq", str(args.seq),
            "--batch", str(args.batch), "--accumulate", str(args.accumulate), "--steps", str(args.steps),
            "--lr", "3e-4", "--warmup", "10", "--weight-decay", "0.1", "--eval-every", "50", "--eval-batches", "4",
            "--eval-fraction", "0.01", "--save-every", "0", "--keep", "1", "--budget", args.budget,
            "--host", str(host), "--ssd-dir", str(swap), "--no-progress", "--no-tensorboard"]
    cap = parse_bytes(args.cap)
    log = Path(os.environ.get("OUT", work)) / "finetune_job.log"
    metrics = out / "metrics.jsonl"
    deadline = START + args.deadline
    cold = drop_caches()
    fresh = run_train(argv, cap, log, args.stop_at, metrics, deadline)
    print(f"fresh run: exit {fresh['code']}, {fresh['wall']:.0f} s", flush=True)
    cold = drop_caches() and cold
    resumed = run_train(argv + ["--resume"], cap, log, None, metrics, deadline)
    print(f"resumed run: exit {resumed['code']}, {resumed['wall']:.0f} s", flush=True)

    records = _records(metrics)
    ssd_bytes = next((r.get("ssd_bytes", 0) for r in records if "startup_seconds" in r), 0)
    updates = [r for r in records if "loss" in r]
    saves = [r for r in records if "checkpoint_seconds" in r]
    starts = [r for r in records if "startup_seconds" in r]
    steady = [r["seconds"] for r in updates[5:]]
    losses = [r["loss"] for r in updates]
    evals = [(r["step"], r["eval_loss"]) for r in updates if "eval_loss" in r]
    for r in saves:
        r["rate"] = r["checkpoint_bytes"] / r["checkpoint_seconds"]
    card = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "CPU (no GPU: not a performance figure)"
    rows = [
        ("card", f"{card}, process capped at {args.cap}, Ratel budget {args.budget}; host {os.cpu_count()} cores"),
        ("model", f"Llama {args.layers} layers x {args.hidden} (ffn {args.intermediate}), vocab {args.vocab} untied, "
                  f"{n_params / 1e9:.2f} B parameters, bf16 (16 B/param of training state = "
                  f"{16 * n_params / GiB:.1f} GiB)"),
        ("run", f"{args.steps} updates of {args.batch} x {args.seq} tokens (x{args.accumulate}), clipping 1.0, "
                f"warm-up + cosine; SIGTERM after update {args.stop_at}, then --resume"),
        ("optimizer states on SSD", f"{ssd_bytes / GiB:.2f} GiB (host budget {host / GiB:.1f} GiB = the plan's host total "
                                    f"less {args.spill})"),
        ("updates done", f"{len(updates)} of {args.steps} (exit codes {fresh['code']}, {resumed['code']}; 143: stopped "
                         "by SIGTERM after saving)"),
        ("time per update", f"median {statistics.median(steady):.2f} s (min {min(steady):.2f}, max {max(steady):.2f})"),
        ("loss", f"{losses[0]:.3f} at update 1 -> {statistics.mean(losses[-10:]):.3f} (mean of the last 10); "
                 f"held-out {', '.join(f'{s}: {v:.3f}' for s, v in evals)}"),
        ("disk write rate (same run)", f"raw O_DIRECT {raw / 1e9:.2f} GB/s, buffered + fsync {buffered / 1e9:.2f} GB/s"),
    ]
    for i, r in enumerate(saves):
        rows.append((f"checkpoint {i + 1} (update {r['step']})",
                     f"{r['checkpoint_bytes'] / 1e9:.1f} GB in {r['checkpoint_seconds']:.1f} s = "
                     f"{r['rate'] / 1e9:.2f} GB/s = **{r['rate'] / raw:.2f}x raw**"))
    if len(starts) == 2:
        a, b = starts[0]["startup_seconds"], starts[1]["startup_seconds"]
        rows.append((f"start-up in train() (fresh / resumed; page cache {'dropped' if cold else 'NOT dropped'} before each)", f"{a:.1f} s / {b:.1f} s = **{b / a:.2f}x**"))
    if fresh["to_first_update"] and resumed["to_first_update"]:
        a, b = fresh["to_first_update"], resumed["to_first_update"]
        rows.append(("process start to first update (fresh / resumed)", f"{a:.1f} s / {b:.1f} s = **{b / a:.2f}x**"))
    rows.append(("peaks (fresh / resumed)",
                 f"max_memory_reserved {fresh.get('max_memory_reserved', 0) / GiB:.2f} / "
                 f"{resumed.get('max_memory_reserved', 0) / GiB:.2f} GiB; host RSS "
                 f"{fresh.get('max_rss', 0) / GiB:.1f} / {resumed.get('max_rss', 0) / GiB:.1f} GiB"))
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    text = (f"\n## Fine-tuning job: `ratel train`, SIGTERM and resume ({datetime.date.today()}, "
            f"benchmarks/finetune_job.py)\n\n{table}\n")
    print(text, flush=True)
    if args.results:
        with open(args.results, "a") as f:
            f.write(text)
    if os.environ.get("OUT"):
        shutil.copy(metrics, Path(os.environ["OUT"]) / "metrics.jsonl")
        (Path(os.environ["OUT"]) / "finetune_job.md").write_text(text)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[3:], int(sys.argv[2])))
    main()
