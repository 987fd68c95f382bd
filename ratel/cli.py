"""``python -m ratel``: fine-tune a model, plan a model without running it, or benchmark training throughput.

    python -m ratel train --model path/to/model --data train.jsonl --out runs/ft --seq 1024 --batch 4
        fine-tunes with checkpoints every --save-every updates; --resume continues (ratel/tools/train.py)

    python -m ratel plan --model gpt-175b --budget 24GiB --batch 16 --seq 2048 --host 4TiB
        prints the plan summary (memory per tier and unit, time per lane and step) and writes
        memory.png and timeline.png into --out; nothing is allocated, the model is built on meta
    python -m ratel bench --layers 24 --hidden 2048 --heads 16 --batch 8 --seq 1024 --steps 5
        Ratel against GPU-resident PyTorch on the reference GPT: step time, tokens/s, model TFLOPS

``--model`` takes a preset (``python -m ratel plan --list``), a config.json, a model folder or a cached
Hugging Face name. Exit status: 0 done, 2 the budget cannot hold the plan (the message says what it needs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ratel.errors import BudgetError, RatelError


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="print the plan summary of a model and write its plots (nothing runs)",
                       description="Plan a model for training under a budget and show where every byte and "
                                   "second goes. The model is built on the meta device: nothing is allocated.")
    p.add_argument("--model", help="preset, config.json, model folder or cached Hugging Face name")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    p.add_argument("--budget", default="24GiB", help="GPU memory budget (default 24GiB)")
    p.add_argument("--host", help="host memory budget (default 90%% of the target's host memory)")
    p.add_argument("--ssd", help="SSD budget")
    p.add_argument("--ssd-dir", help="SSD folder(s) for optimizer states that do not fit in host memory")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--seq", type=int, default=2048, help="sequence length (default 2048)")
    p.add_argument("--dtype", default="bf16", help="compute dtype: bf16 (default), fp16, fp32")
    p.add_argument("--device", default="cuda", help="device the plan is for (default cuda, whether or not this "
                                                     "machine has one)")
    p.add_argument("--hardware", default="auto", choices=("auto", "h100", "cpu"),
                   help="profile that predicts times: auto (this machine's GPU if any, else h100 for cuda), "
                        "h100, cpu")
    p.add_argument("--depth", type=int, default=2, help="GPU parameter ring slots (default 2)")
    p.add_argument("--accumulate", type=int, default=1,
                   help="micro-batches per update: plans their fp32 gradient sums in host memory (default 1)")
    p.add_argument("--max-grad-norm", type=float, default=None,
                   help="plan global-norm clipping: every update runs after the backward (default: none)")
    p.add_argument("--no-resident", action="store_true",
                   help="keep no parameter group on the GPU (compile's resident=False): every layer streams")
    p.add_argument("--out", default="runs/plan", help="folder for memory.png and timeline.png (default runs/plan)")
    p.add_argument("--no-plots", action="store_true", help="print the summary only")


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="training throughput of Ratel against GPU-resident PyTorch",
                       description="Time training steps of the reference GPT with Ratel and with plain PyTorch "
                                   "(everything on the device) in the same run.")
    p.add_argument("--layers", type=int, default=12, help="transformer blocks (default 12)")
    p.add_argument("--hidden", type=int, default=768, help="model width (default 768)")
    p.add_argument("--heads", type=int, default=12, help="attention heads (default 12)")
    p.add_argument("--vocab", type=int, default=50304, help="vocabulary size (default 50304)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq", type=int, default=1024, help="sequence length (default 1024)")
    p.add_argument("--budget", help="GPU budget (default: the smallest the planner accepts)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up (default 5)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda, cpu")
    p.add_argument("--dtype", help="bf16 (default on cuda), fp16, fp32 (default on cpu)")
    p.add_argument("--no-baseline", action="store_true", help="skip GPU-resident PyTorch")
    p.add_argument("--out", help="folder for summary.txt and the plots of a recorded step")


def _train_parser(sub) -> None:
    from ratel.tools.train import add_arguments
    p = sub.add_parser("train", help="fine-tune a causal LM on local data, with checkpoints and --resume",
                       description="Fine-tune a Hugging Face causal LM (or a preset) on local data under a GPU "
                                   "budget. Checkpoints are Hugging Face folders with the optimizer state beside; "
                                   "SIGTERM/SIGINT save one and stop; --resume continues exactly.")
    add_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ratel",
                                     description="Fine-tune a model (train), plan a model without running it "
                                                 "(plan), or benchmark training throughput (bench). "
                                                 "'python -m ratel train --help' shows the options of one command.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _plan_parser(sub)
    _bench_parser(sub)
    return parser


def _hardware(choice: str, device):
    from ratel.ir.hardware import HardwareProfile
    if choice == "h100":
        return HardwareProfile.h100()
    if choice == "cpu":
        return HardwareProfile.cpu()
    return None   # explain's default for the device


def cmd_plan(args, out=sys.stdout) -> int:
    import torch

    from ratel.ir.budget import Budget, ssd_dirs
    from ratel.tools.bench import model_flops
    from ratel.tools.explain import explain, target_device, target_hardware
    from ratel.tools.presets import build_model, describe_preset, parse_dtype, preset_names, resolve
    from ratel.tools.summary import plan_summary

    if args.list:
        for name in preset_names():
            print(f"{name:<12} {describe_preset(name)}", file=out)
        return 0
    if not args.model:
        raise RatelError("plan needs --model (a preset, a config.json, a model folder; --list shows the presets)")
    spec = resolve(args.model)
    if spec.max_seq_len is not None and args.seq > spec.max_seq_len:
        raise RatelError(f"--seq {args.seq} is longer than {spec.name}'s {spec.max_seq_len} learned positions")
    dtype = parse_dtype(args.dtype)
    model = build_model(spec, dtype)
    device = target_device(args.device)
    hardware = target_hardware(device, _hardware(args.hardware, device))
    budget = Budget(gpu=args.budget, host=args.host, ssd=args.ssd, ssd_dir=args.ssd_dir)
    if args.ssd_dir:
        for d in ssd_dirs(args.ssd_dir):
            if not Path(d).is_dir():   # planning for another machine is fine; saying nothing is not
                print(f"note: --ssd-dir {d} is not a folder on this machine: the plan assumes it exists (and has "
                      "the space) where training runs; compile refuses it if it does not", file=out)
    ids = torch.zeros(args.batch, args.seq, dtype=torch.long)
    n_params = sum(p.numel() for p in model.parameters())
    count = f"{n_params / 1e9:.2f} B" if n_params >= 1e9 else f"{n_params / 1e6:.2f} M"
    print(f"{spec.name}: {spec.describe()} ({count} parameters, {args.dtype}); batch {args.batch} "
          f"x seq {args.seq}; predicted with the {hardware.name} profile", file=out)
    try:
        plan = explain(model, budget, (ids,), hardware=hardware, device=device, depth=args.depth,
                       accumulate=args.accumulate, max_grad_norm=args.max_grad_norm,
                       resident=False if args.no_resident else None)
    except BudgetError as exc:
        print(f"\nThe plan does not fit: {exc}\n(on the command line: --budget is the GPU budget; --host, --ssd "
              "and --ssd-dir set the other tiers)", file=out)
        return 2
    print(plan_summary(plan), file=out)
    tokens = args.batch * args.seq
    flops = model_flops(n_params, spec.layers, spec.hidden, args.batch, args.seq)
    if plan.times.total:
        print(f"Predicted throughput: {tokens / plan.times.total:,.0f} tokens/s, "
              f"{flops / plan.times.total / 1e12:,.1f} model TFLOPS", file=out)
    if not args.no_plots:
        from ratel.tools.plots import save_plots
        paths = save_plots(plan, Path(args.out))
        print("Wrote " + ", ".join(str(p) for p in paths), file=out)
    return 0


def cmd_bench(args, out=sys.stdout) -> int:
    from ratel.tools.bench import run_bench
    from ratel.tools.presets import parse_dtype

    run_bench(args.layers, args.hidden, args.heads, args.batch, args.seq, vocab=args.vocab, budget=args.budget,
              steps=args.steps, device=args.device, dtype=parse_dtype(args.dtype) if args.dtype else None,
              baseline=not args.no_baseline, out=args.out, log=lambda line: print(line, file=out, flush=True))
    return 0


def cmd_train(args, out=sys.stdout) -> int:
    from ratel.tools.train import config_from_args, train

    result = train(config_from_args(args), say=lambda line: print(line, file=out, flush=True))
    return 0 if result.stopped_by is None else 128 + result.stopped_by


def main(argv: list[str] | None = None, out=None) -> int:
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    try:
        return {"plan": cmd_plan, "bench": cmd_bench, "train": cmd_train}[args.command](args, out)
    except (RatelError, ValueError) as exc:
        print(f"ratel {args.command}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, BudgetError) else 1


__all__ = ["build_parser", "main"]
