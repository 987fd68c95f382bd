"""The LM head and its loss on their own: Ratel's chunked linear + cross-entropy with the vocabulary padded for
the products (as on CUDA), the same unpadded, and eager PyTorch's ``F.cross_entropy(F.linear(h, w).float())``.

Why: on the H100 (benchmarks/RESULTS.md, 2026-12-05) the 3.6B GPT's head took 155 ms forward and 372 ms
backward at batch 16 x 2048 (vocabulary 50257): 28 % of the step, at about 100 TFLOPS where the blocks ran at
~600. A vocabulary of 50257 gives every product odd-length rows, which the tensor cores' wide loads cannot
take. Each variant runs forward and backward (loss, then the hidden states' and the weight's gradients) on
the same inputs; the table gives the median time, TFLOPS counted as the unchunked head does (6 x rows x
hidden x vocabulary: forward, and the two products of backward; the chunked backward's third product, the
logits again, is not counted), and the largest difference of the loss and gradients from eager's.

    python benchmarks/head_loss.py [--rows 32768] [--hidden 4096] [--vocab 50257] [--append-results]

``--smoke`` runs it on the CPU at a tiny size (the test runs that).
"""
from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from ratel.ir.losses import MEAN, chunk_rows_for, linear_cross_entropy
from ratel.tools.bench import _time, largest_difference, publish

CHUNK_BYTES = 256 << 20      # the pass's default chunk (PassContext.head_chunk_bytes)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=16 * 2047)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                   help="also time eager PyTorch (its fp32 logits: rows x vocabulary x 12 bytes and more)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--append-results", action="store_true")
    p.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"))
    args = p.parse_args(argv)
    if args.smoke:
        args.rows, args.hidden, args.vocab, args.steps = 600, 32, 257, 2
    return args


def variants(args, device):
    """name -> function of (h, w, t) -> loss."""
    chunk = chunk_rows_for(args.vocab, CHUNK_BYTES if not args.smoke else 64 * 4 * args.vocab)
    out = {}
    if args.eager:      # first: the reference the others' differences are taken from
        out["eager PyTorch"] = lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t)
    for name, align in (("chunked, unpadded", 1), ("chunked, vocabulary padded to 64", 64)):
        out[name] = lambda h, w, t, align=align: linear_cross_entropy(h, w, None, t, -100, MEAN, chunk, None, align)
    return out, chunk


def main(argv=None) -> str:
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    h = (torch.randn(args.rows, args.hidden, device=device, generator=gen) * 1.0).to(dtype).requires_grad_()
    w = (torch.randn(args.vocab, args.hidden, device=device, generator=gen) * 0.02).to(dtype).requires_grad_()
    t = torch.randint(0, args.vocab, (args.rows,), device=device, generator=gen)
    found, chunk = variants(args, device)
    results, reference = [], None
    for name, loss_of in found.items():
        def step():
            loss = loss_of(h, w, t)
            grads = torch.autograd.grad(loss, (h, w))
            return loss, grads

        timing = _time(step, args.steps, device)
        loss, grads = step()
        values = (loss.float(), *(g.float() for g in grads))
        if reference is None:
            reference = values
        diff = largest_difference(values, reference)
        results.append((name, timing, diff))
        del loss, grads, values
    flops = 6 * args.rows * args.hidden * args.vocab
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"## The LM head and its loss alone ({datetime.date.today()}, {card})", "",
             f"`benchmarks/head_loss.py`: {args.rows} rows, hidden {args.hidden}, vocabulary {args.vocab}, "
             f"{dtype}, chunks of {chunk} rows; forward and backward, median of {args.steps} after warm-ups.", "",
             "| variant | time | TFLOPS (6 rows hidden vocab) | time / first row's | largest difference from the first "
             "row |",
             "|---|---|---|---|---|"]
    first = results[0][1].median
    for name, timing, diff in results:
        lines.append(f"| {name} | {timing.median * 1e3:.1f} ms ({timing.low * 1e3:.1f}-{timing.high * 1e3:.1f}) | "
                     f"{flops / timing.median / 1e12:.1f} | {timing.median / first:.2f} | {diff:.1e} |")
    text = "\n".join(lines) + "\n"
    publish(text, args.results if args.append_results else None)
    return text


if __name__ == "__main__":
    main()
