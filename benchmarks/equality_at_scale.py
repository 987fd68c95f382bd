"""Ratel against plain PyTorch on a GPT of the benchmarks' shapes, on the GPU: the losses of each step, side
by side. Why: the GPU tests compare small models (seq 32, vocabulary 128: the LM head's loss is not chunked,
no unit is recomputed from stored values), and on 2026-12-05 the 3.6B GPT's streamed rows of
``throughput.py`` went to nan within two updates at lr 1e-5 while resident groups hit a device-side assert
(benchmarks/RESULTS.md). This says whether PyTorch does the same on the same weights and batch.

Each mode runs in its own process (an assert poisons the CUDA context), capped at ``--cap``:

  ref        the bf16 model on the GPU, uncapped, fp32 master weights and torch's fused AdamW on the GPU
  streamed   Ratel, ``resident=False``
  resident   Ratel, groups kept on the GPU as planned
  recompute  Ratel, ``activations="recompute"``, resident as planned

``--check-targets`` prints, at every forward and backward of the chunked head loss, the range of the targets
and whether its input is finite (a synchronising check; for finding a corrupted value, not for timing).
``CUDA_LAUNCH_BLOCKING=1`` in the environment serialises the streams: a run that is right only with it has a
race.

    python benchmarks/equality_at_scale.py --layers 4 --batch 8 --modes ref streamed resident
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

MODES = ("ref", "streamed", "resident", "recompute")


def check_targets() -> None:
    import ratel.ir.losses as losses
    forward, backward = losses._LinearCrossEntropy.forward, losses._LinearCrossEntropy.backward

    def real(t):
        return type(t) is torch.Tensor and t.device.type != "meta"      # not while tracing (fake tensors)

    def checked_forward(ctx, hidden, weight, bias, target, *rest):
        if real(target):
            print(f"head loss forward: targets {int(target.min())}..{int(target.max())} of {weight.shape[0]}, "
                  f"input finite {bool(hidden.isfinite().all())}", flush=True)
        return forward(ctx, hidden, weight, bias, target, *rest)

    def checked_backward(ctx, grad):
        saved = ctx.saved_tensors
        if real(saved[3]):
            print(f"head loss backward: targets {int(saved[3].min())}..{int(saved[3].max())} of "
                  f"{saved[1].shape[0]}", flush=True)
        return backward(ctx, grad)

    losses._LinearCrossEntropy.forward = staticmethod(checked_forward)
    losses._LinearCrossEntropy.backward = staticmethod(checked_backward)


def run_mode(args) -> None:
    import ratel
    from ratel.models import GPT, GPTConfig
    from ratel.tools.bench import mixed_precision_step
    if args.check_targets:
        check_targets()
    cfg = GPTConfig(vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads, d_model=args.hidden,
                    max_seq_len=args.seq, tie_embeddings=False, dropout=0.0)
    cuda = args.device == "cuda"
    torch.manual_seed(0)
    with torch.device(args.device):
        model = GPT(cfg).to(torch.bfloat16).train()      # the same weights in every process
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(args.device)
    start = time.perf_counter()
    losses = []
    if args.mode == "ref":
        step = mixed_precision_step(model, lr=args.lr, weight_decay=0.0)
        for _ in range(args.steps):
            losses.append(step(ids, ids).item())
    else:
        if cuda:
            torch.cuda.set_per_process_memory_fraction(ratel.parse_bytes(args.cap) /
                                                       torch.cuda.get_device_properties(0).total_memory)
        model = model.cpu()
        # (on the CPU the plan keeps groups "on the GPU" only when asked: it tests the path there)
        kwargs = {"resident": False if args.mode == "streamed" else (None if cuda else True)}
        if args.mode == "recompute":
            kwargs["activations"] = "recompute"
        engine = ratel.compile(model, budget=ratel.parse_bytes(args.cap) - (1 << 30),
                               optimizer=ratel.AdamW(lr=args.lr, weight_decay=0.0), example_inputs=(ids,),
                               example_kwargs={"labels": ids}, device=args.device, progress=False, **kwargs)
        print(f"[{args.mode}] groups on the GPU: {engine.plan.placement.gpu_groups}", flush=True)
        for _ in range(args.steps):
            loss = engine(ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        engine.close()
    print(f"[{args.mode}] losses {' '.join(repr(x) for x in losses)} ({time.perf_counter() - start:.0f} s)",
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--cap", default="24GiB", help="GPU memory each Ratel process may use; its budget is 1 GiB less")
    p.add_argument("--device", default="cuda", help="cpu: the same comparison on the CPU (tests the script)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)     # one mode, in this process
    p.add_argument("--check-targets", action="store_true")
    p.add_argument("--row-timeout", type=int, default=120)
    args = p.parse_args()
    if args.mode is not None:
        return run_mode(args)
    for mode in args.modes:
        try:
            done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], timeout=args.row_timeout)
            if done.returncode != 0:
                print(f"[{mode}] failed with exit code {done.returncode}", flush=True)
        except subprocess.TimeoutExpired:
            print(f"[{mode}] timed out after {args.row_timeout} s", flush=True)


if __name__ == "__main__":
    main()
