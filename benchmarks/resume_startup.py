"""How long a resumed start takes against a fresh one, with a cold page cache, on this machine.

A fresh start traces, plans and reads the model's weights (safetensors, the compute dtype); a resumed start
traces, plans and reads the whole checkpoint (weights, fp32 masters and Adam moments: 12-14 B/param). Both
are timed from ``ratel.compile`` to the end of the first update, after dropping the page cache (root only;
otherwise it says so). Prints one Markdown row per mode; ``--results FILE`` appends them.

    python benchmarks/resume_startup.py [--layers 12 --hidden 1024 --work /var/tmp/ratel-startup]
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import time
from pathlib import Path

import torch

import ratel
from ratel.ir import format_bytes


def drop_caches() -> bool:
    """Empty the page cache, so that a start reads its weights or checkpoint from the disk (root only)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def build(args, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("meta"):
        return LlamaForCausalLM(config).to(dtype).train()


def first_update(args, device, dtype, **compile_kwargs) -> tuple[float, ratel.Engine]:
    ids = torch.randint(0, 32000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    engine = ratel.compile(build(args, dtype), args.budget, optimizer=ratel.AdamW(lr=1e-4),
                           example_inputs=(ids,), device=device, progress=False, **compile_kwargs)
    engine.backward(engine(ids, labels=ids).loss)
    engine.step()
    return time.perf_counter() - start, engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--budget", default="24GiB")
    parser.add_argument("--work", default="/var/tmp/ratel-startup", help="a folder on the disk under test")
    parser.add_argument("--results", help="append the table to this file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    # The weights a fresh start reads: the model initialised once and saved.
    seconds, engine = first_update(args, device, dtype)
    engine.save(work / "ckpt")
    engine.close()
    shutil.copytree(work / "ckpt", work / "weights", ignore=shutil.ignore_patterns("optimizer*"))
    weights = sum(f.stat().st_size for f in (work / "weights").glob("*.safetensors"))
    whole = sum(f.stat().st_size for f in (work / "ckpt").glob("*.safetensors"))

    cold = drop_caches()
    fresh, engine = first_update(args, device, dtype, weights=str(work / "weights"))
    engine.close()
    cold = drop_caches() and cold
    resumed, engine = first_update(args, device, dtype, resume=str(work / "ckpt"))
    engine.close()
    shutil.rmtree(work, ignore_errors=True)

    where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    n = sum(p.numel() for p in build(args, dtype).parameters())
    text = (f"\n| {datetime.date.today()} | {where} | Llama {args.layers} x {args.hidden}, {n / 1e6:.0f} M, {dtype} | "
            f"{format_bytes(weights)} / {format_bytes(whole)} | {fresh:.1f} s | {resumed:.1f} s | "
            f"**{resumed / fresh:.2f}x** | {'dropped' if cold else 'NOT dropped'} |")
    print("| date | device | model | read: fresh / resumed | fresh start | resumed start | ratio | page cache |")
    print(text.strip())
    if args.results:
        with open(args.results, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
