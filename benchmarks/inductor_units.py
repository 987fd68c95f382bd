"""One transformer block, eager against ``torch.compile``: is a compiled unit faster, and is it exact?

Issue #11 asks to try Inductor on each unit's forward and backward and keep it where it is measured faster
and exact. Before wiring it into the runtime, this answers both for the 3.6B GPT's block (h=4096, 32 heads,
seq 2048, bf16): the block of ``ratel.models.GPT`` timed as Ratel runs a unit, forward without autograd (a
recomputed unit's first pass), and forward with autograd then backward against a fixed output gradient;
eager first, then the same block compiled (``--backend``, default inductor). The compiled block's output and
gradients (input and every parameter) are compared with eager's: bitwise equal or not, and the largest
difference relative to the largest value. Median of ``--steps`` after warm-ups (compiling is not timed).

    python benchmarks/inductor_units.py [--batch 8] [--append-results]

``--smoke`` runs a tiny block on the CPU with the ``aot_eager`` backend (no code generation: the test runs
that); on a GPU machine the defaults measure what the issue asks.
"""
from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import torch

from ratel.models.gpt import Block, GPTConfig
from ratel.tools.bench import _time, largest_difference, publish   # warm-ups, then the median of synchronised steps


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--backend", default=None, help="torch.compile's backend (default inductor; aot_eager with --smoke)")
    p.add_argument("--mode", default=None, help="torch.compile's mode (e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--append-results", action="store_true")
    p.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"))
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.heads, args.seq, args.batch, args.steps, args.warmup = 64, 4, 32, 2, 2, 1
    args.backend = args.backend or ("aot_eager" if args.smoke else "inductor")
    return args


def measure(block: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor, args, device) -> dict:
    """Times of ``block`` (forward without autograd; forward and backward) and its output and gradients."""
    params = [p for p in block.parameters()]

    def forward():
        with torch.no_grad():
            return block(x)

    def train():
        leaf = x.detach().requires_grad_()
        out = block(leaf)
        grads = torch.autograd.grad(out, [leaf, *params], grad_out)
        return out, grads

    result = {"forward": _time(forward, args.steps, device, args.warmup).median,
              "train": _time(train, args.steps, device, args.warmup).median}
    out, grads = train()
    result["values"] = [out.detach(), *grads]
    return result


def compare(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[bool, float]:
    bitwise = all(torch.equal(a, b) for a, b in zip(ours, reference))
    return bitwise, largest_difference(ours, reference)


def main(argv=None) -> str:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, n_layer=1, n_head=args.heads, d_model=args.hidden, max_seq_len=args.seq)
    block = Block(cfg).to(device=device, dtype=dtype).train()
    x = torch.randn(args.batch, args.seq, args.hidden, device=device, dtype=dtype)
    grad_out = torch.randn_like(x) * 1e-3
    eager = measure(block, x, grad_out, args, device)
    compiled_block = torch.compile(block, backend=args.backend, mode=args.mode)
    start = time.perf_counter()
    compiled_block(x).backward(grad_out)          # compile forward and backward once, untimed
    block.zero_grad(set_to_none=True)
    compile_s = time.perf_counter() - start
    compiled = measure(compiled_block, x, grad_out, args, device)
    bitwise, worst = compare(compiled["values"], eager["values"])
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    flops = 2 * sum(p.numel() for p in block.parameters() if p.dim() == 2) * args.batch * args.seq \
        + 4 * args.batch * args.seq * args.seq * args.hidden        # matrices, then attention's two products
    lines = [f"## One block eager against torch.compile ({datetime.date.today()}, {card})", "",
             f"`benchmarks/inductor_units.py`: GPT block h={args.hidden}, {args.heads} heads, batch {args.batch} x "
             f"{args.seq}, {str(dtype).replace('torch.', '')}, backend {args.backend}"
             f"{', mode ' + args.mode if args.mode else ''} (compiling took {compile_s:.1f} s, not timed); "
             f"median of {args.steps} after {args.warmup} warm-ups.", "",
             "| | forward, no autograd | forward + backward | TFLOPS (forward + backward, 3x forward FLOPs) |",
             "|---|---|---|---|"]
    for name, r in (("eager", eager), (f"torch.compile ({args.backend})", compiled)):
        lines.append(f"| {name} | {r['forward'] * 1e3:.2f} ms | {r['train'] * 1e3:.2f} ms | "
                     f"{3 * flops / r['train'] / 1e12:.1f} |")
    lines += ["", f"Compiled / eager: forward {compiled['forward'] / eager['forward']:.3f}, forward + backward "
                  f"{compiled['train'] / eager['train']:.3f}. Output and gradients "
                  f"{'bitwise equal to eager' if bitwise else 'not bitwise equal to eager'}; largest difference "
                  f"{worst:.1e} of the largest value."]
    text = "\n".join(lines) + "\n"
    publish(text, args.results if args.append_results else None)
    return text


if __name__ == "__main__":
    main()
