"""Two source trees of Ratel timed step by step in turn on one machine: an A/B that machine drift cannot bias.

Why: issue #14 asks that the data-parallel code cost a single rank nothing (within 2 %), and the lent GPUs
drift more than that: on one H100 the same tree's B=8 step measured 1.346 s and 1.521 s ten minutes apart,
and two instances of the same card differ by ~15 % (benchmarks/RESULTS.md). Timing the trees in separate
processes one after another measures the drift as much as the trees. Here each tree runs in a process of its
own (its own ``PYTHONPATH``, its own ``RATEL_CACHE_DIR``), both compiled and warmed up before the first timed
step, and the parent has them take single training steps in turn, in the order A B B A A B B A ... (so that
a drift within a round cancels): each timed step of one tree has a neighbour of the other taken seconds
apart (``--gap`` seconds apart: an update's OpenMP team spins for a while after its work, on the cores the
next step needs). The result is the ratio of B's median step to A's, and the mean of the per-round ratios with its 95 %
interval (normal approximation), which says whether a difference of 2 % was resolved.

Both processes share the card, each capped at ``--cap`` (two 24 GiB caps fit an 80 GiB card), and the host:
each holds its pinned buffers while the other steps (3.6B at B=8: 40-56 GiB each; use B=4 on a 128 GiB host
if both plans keep that much). Only one of them runs at a time.

    python benchmarks/ab_trees.py --trees runs/tree_before . [--layers 16 --batch 8 --rounds 10]

A tree is a folder with the ``ratel`` package (its native modules built: ``python setup.py build_ext
--inplace`` there). A tree from history, made here and carried to the GPU machine (``runs/`` is ignored)::

    git worktree add --detach /tmp/before 0e2d9ab && mkdir -p runs/tree_before \
        && cp -r /tmp/before/{ratel,csrc,setup.py} runs/tree_before/ && git worktree remove --force /tmp/before

``--smoke`` runs the same on the CPU with a tiny GPT (the test runs that).
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trees", nargs=2, default=[".", "."], metavar=("A", "B"), help="the two source trees")
    p.add_argument("--labels", nargs=2, default=None, help="names for the table (default: the paths)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cap", default="24GiB", help="GPU memory each process may use; Ratel's budget is 1 GiB less")
    p.add_argument("--resident", action=argparse.BooleanOptionalAction, default=False,
                   help="let the trees keep groups on the GPU (a tree without resident groups ignores it)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each tree before the first round")
    p.add_argument("--rounds", type=int, default=10, help="rounds of A B B A: 2 timed steps of each a round")
    p.add_argument("--gap", type=float, default=0.5,
                   help="seconds between two steps: the last step's OpenMP threads stop spinning first")
    p.add_argument("--smoke", action="store_true", help="a tiny GPT on the CPU")
    p.add_argument("--append-results", action="store_true")
    p.add_argument("--results", default=str(HERE.parent / "RESULTS.md"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.heads, args.vocab, args.seq, args.batch = 2, 64, 4, 256, 32, 2
        args.rounds, args.warmup = min(args.rounds, 3), 1
    return args


# ---------------------------------------------------------------------------------------------------------
# A tree's process: compile, warm up, then one step per "step" line read, its seconds written back
# ---------------------------------------------------------------------------------------------------------

def worker(args) -> None:
    import torch

    import ratel
    from ratel.models import GPT, GPTConfig

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    budget = ratel.parse_bytes(args.cap) - (1 << 30) if device.type == "cuda" else 64 << 20
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(ratel.parse_bytes(args.cap)
                                                   / torch.cuda.get_device_properties(device).total_memory)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads, d_model=args.hidden,
                              max_seq_len=args.seq, tie_embeddings=False)).to(dtype).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    options = dict(budget=budget, optimizer=ratel.AdamW(lr=1e-5), example_inputs=(ids,), device=device,
                   progress=False)
    if "resident" in inspect.signature(ratel.compile).parameters:
        options["resident"] = None if args.resident else False
    torch.manual_seed(0)        # the same initial weights in both trees: their losses say they train alike
    engine = ratel.compile(model, **options)
    losses = []

    def step() -> float:
        sync()
        start = time.perf_counter()
        loss = engine(ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        sync()
        seconds = time.perf_counter() - start
        losses.append(loss.item())
        return seconds

    for _ in range(args.warmup):
        step()
    print("READY " + json.dumps({"predicted": engine.plan.times.total, "ratel": str(Path(ratel.__file__).parent)}),
          flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        print(f"DONE {step()!r}", flush=True)
    print("LOSSES " + json.dumps(losses), flush=True)
    engine.close()


# ---------------------------------------------------------------------------------------------------------
# The parent: two workers, steps in turn
# ---------------------------------------------------------------------------------------------------------

class Tree:
    def __init__(self, path: str, argv: list[str], cache: str):
        self.path = str(Path(path).resolve())
        env = {**os.environ, "PYTHONPATH": self.path, "RATEL_CACHE_DIR": cache, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, str(HERE), *argv, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=self.path)
        self.times: list[float] = []
        self.info: dict = {}
        self.losses: list[float] = []

    def expect(self, tag: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return line[len(tag) + 1:].strip()
            print(f"  [{Path(self.path).name}] {line.rstrip()}", flush=True)
        raise RuntimeError(f"the worker of {self.path} ended (exit code {self.proc.wait()}) before '{tag}'")

    def step(self, gap: float) -> float:
        time.sleep(gap)
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        seconds = float(self.expect("DONE"))
        self.times.append(seconds)
        return seconds

    def finish(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.losses = json.loads(self.expect("LOSSES"))
        self.proc.wait(timeout=120)


def run(args, argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="ratel-ab-") as tmp:
        trees = []
        try:
            # One after the other: both compiling at once would time each one's units beside the other's.
            for i, path in enumerate(args.trees):
                tree = Tree(path, argv, str(Path(tmp) / f"cache{i}"))
                tree.info = json.loads(tree.expect("READY"))
                trees.append(tree)
            a, b = trees
            ratios = []
            for _ in range(args.rounds):
                first_a, first_b, second_b, second_a = (tree.step(args.gap) for tree in (a, b, b, a))
                ratios.append((first_b + second_b) / (first_a + second_a))
            for tree in trees:
                tree.finish()
        finally:
            for tree in trees:
                if tree.proc.poll() is None:
                    tree.proc.kill()
    mean = statistics.fmean(ratios)
    half = 1.96 * statistics.stdev(ratios) / math.sqrt(len(ratios)) if len(ratios) > 1 else math.inf
    return {"trees": [t.path for t in trees], "medians": [statistics.median(t.times) for t in trees],
            "ranges": [[min(t.times), max(t.times)] for t in trees], "predicted": [t.info["predicted"] for t in trees],
            "packages": [t.info["ratel"] for t in trees], "losses": [t.losses for t in trees], "ratios": ratios,
            "ratio_mean": mean, "ratio_interval": [mean - half, mean + half]}


def table(result: dict, args) -> str:
    import torch
    card = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "CPU"
    labels = args.labels or result["trees"]
    med_a, med_b = result["medians"]
    low, high = result["ratio_interval"]
    groups = "groups resident as planned" if args.resident else "every group streamed"
    lines = [f"## Two trees in turn, step by step ({datetime.date.today()}, {card})", "",
             f"`benchmarks/ab_trees.py`: GPT {args.layers}L h={args.hidden} vocab {args.vocab}, batch {args.batch} x "
             f"{args.seq}, cap {args.cap}, {groups}; {args.warmup} warm-up steps each, then {args.rounds} rounds "
             f"of A B B A, {args.gap} s between steps.", "",
             "| tree | median step (range) | predicted |", "|---|---|---|"]
    for label, median, (lo, hi), predicted in zip(labels, result["medians"], result["ranges"], result["predicted"]):
        lines.append(f"| {label} | {median:.3f} s ({lo:.3f}-{hi:.3f}) | {predicted:.3f} s |")
    lines += ["", f"B / A: medians {med_b / med_a:.3f}; per round {result['ratio_mean']:.3f} "
                  f"(95 % interval {low:.3f}-{high:.3f})."]
    a, b = result["losses"]
    differ = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if differ is not None:
        # Full precision: trees that sum in another order differ in the last bits, which 6 digits hide.
        largest = max(abs(x - y) / max(abs(x), abs(y), 1e-30) for x, y in zip(a, b))
        agreement = (f"first differ at step {differ}: {a[differ]!r} against {b[differ]!r}; largest relative "
                     f"difference {largest:.1e}.")
    else:
        agreement = "equal in both trees." if len(a) == len(b) else "step counts differ."
    lines.append(f"Losses over {len(a)} steps: {agreement}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    result = run(args, [a for a in argv if a != "--append-results"])
    from ratel.tools.bench import publish     # here, not at the top: a worker imports its own tree's ratel
    publish(table(result, args), args.results if args.append_results else None)
    return result


if __name__ == "__main__":
    main()
