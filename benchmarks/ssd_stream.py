"""The optimizer states' SSD stream alone, against the disk measured in the same run: no GPU, no model.

A step of an SSD-bound plan is, on the disk, the states of every SSD group read piece by piece in update order
and each piece written back once updated (``runtime/ssd.py``). This runs exactly that code (``SsdStates`` on
an ``SsdLane``: the staging ring, the read and write channels, the native CPU AdamW on each piece) over
synthetic groups, and reports the bytes it moved per second beside the disk's own rate with reads and writes
side by side (``calibrate.measure_disk``, two requests in flight), over a grid of swapper block sizes and
queue depths, staging slots and piece sizes. It says whether a training step's SSD time is the disk's or the
runtime's, in a minute instead of a 45 s step.

    python benchmarks/ssd_stream.py --dir /tmp/ratel-ssd --gib 8 --depths 4,8,16 --slots 3,6
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shutil
import tempfile
import time

import torch

import ratel
from ratel.ir import ParamGroup
from ratel.ir import layout
from ratel.runtime.calibrate import measure_disk
from ratel.runtime.cpu_adam import adamw_step
from ratel.runtime.ssd import SsdStates
from ratel.runtime.ssd_lane import SsdLane
from ratel.runtime.swapper import Swapper
from ratel.tools.bench import publish
from ssd_lane import roofline      # a script beside this one

STATE_BYTES = 12    # fp32 master, exp_avg and exp_avg_sq of a bf16 parameter


def groups_of(total_bytes: int, group_numel: int) -> list[ParamGroup]:
    count = max(1, total_bytes // (group_numel * STATE_BYTES))
    return [ParamGroup(i, f"g{i}", (f"p{i}",), ((group_numel,),), (0,), group_numel, torch.bfloat16, (i,), True)
            for i in range(count)]


@contextlib.contextmanager
def staging(slots: int, piece_numel: int):
    """The ring's slot count and piece size for this measurement (the runtime's constants, restored after)."""
    saved = layout.SSD_STAGING_BUFFERS, layout.SSD_PIECE_NUMEL
    layout.SSD_STAGING_BUFFERS, layout.SSD_PIECE_NUMEL = slots, piece_numel
    try:
        yield
    finally:
        layout.SSD_STAGING_BUFFERS, layout.SSD_PIECE_NUMEL = saved


def stream(folder: str, groups: list[ParamGroup], steps: int, block: int, depth: int, threads: int,
           read_back: bool = False) -> dict:
    """Bytes per second of ``steps`` optimizer steps over ``groups``' states on SSD (after one untimed), every
    piece's gradient the same values; ``read_back``: also each group's master at the end."""
    numel = max(g.numel for g in groups)
    grad = torch.randn(numel, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    out = torch.empty(numel, dtype=torch.bfloat16)
    with Swapper(dirs=[folder], block_size=block, queue_depth=depth) as swapper:
        lane = SsdLane(swapper)
        try:
            states = SsdStates(lane, groups, "stream", tuple(g.index for g in groups))
            for g in groups:
                states.initialize(g, torch.zeros(g.numel))
            times = []
            for step in range(1, steps + 2):
                start = time.perf_counter()
                states.begin_step()
                for g in groups:
                    for piece, (lo, hi) in enumerate(states.piece_ranges(g)):
                        master, m, v = states.acquire(g, piece)
                        adamw_step(master, grad[lo:hi], m, v, step, lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8,
                                   weight_decay=0.0, out=out[lo:hi], num_threads=threads)
                        states.release(g, piece)
                states.flush()
                times.append(time.perf_counter() - start)
            moved = 2 * sum(layout.ssd_piece_bytes(g, g.numel) for g in groups)
            out = {"seconds": times[1:], "both": moved / min(times[1:]), "moved": moved,
                   "bytes_read": swapper.stats()["bytes_read"]}
            if read_back:
                out["masters"] = [states.read_master(g) for g in groups]
            return out
        finally:
            lane.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True, help="a folder on the SSD")
    p.add_argument("--gib", type=float, default=8.0, help="GiB of optimizer states on the SSD, each way per step")
    p.add_argument("--group-mib", type=float, default=2400, help="MiB of states per group")
    p.add_argument("--blocks", default="16MiB", help="swapper block sizes, comma-separated")
    p.add_argument("--depths", default="4", help="swapper queue depths, comma-separated")
    p.add_argument("--slots", default=str(layout.SSD_STAGING_BUFFERS), help="staging slots, comma-separated")
    p.add_argument("--pieces", default=str(layout.SSD_PIECE_NUMEL), help="elements per piece, comma-separated")
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration (the best is kept)")
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="CPU AdamW threads")
    p.add_argument("--append-results", action="store_true")
    p.add_argument("--results", default="benchmarks/RESULTS.md")
    args = p.parse_args()

    folder = tempfile.mkdtemp(prefix="ratel-ssd-stream-", dir=args.dir)
    os.chmod(folder, 0o700)
    try:
        group_numel = int(args.group_mib * 2**20) // STATE_BYTES
        groups = groups_of(int(args.gib * 2**30), group_numel)
        state_bytes = sum(layout.ssd_state_bytes(g) for g in groups)
        rows = []
        probe = measure_disk([folder], 1 << 30)
        for block in [ratel.parse_bytes(b) for b in args.blocks.split(",")]:
            for depth in [int(d) for d in args.depths.split(",")]:
                for slots in [int(s) for s in args.slots.split(",")]:
                    for piece in [int(n) for n in args.pieces.split(",")]:
                        with staging(slots, piece):
                            r = stream(folder, groups, args.steps, block, depth, args.threads)
                        rows.append((block, depth, slots, piece, r))
                        print(f"block {block >> 20} MiB, depth {depth}, {slots} slots, piece "
                              f"{piece * STATE_BYTES >> 20} MiB: "
                              f"{r['both'] / 1e9:.2f} GB/s both ways ({', '.join(f'{s:.2f}' for s in r['seconds'])} s)",
                              flush=True)
        after = measure_disk([folder], 1 << 30)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    disk = {k: max(probe[k], after[k]) for k in probe}
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    lines = [f"## The optimizer states' SSD stream alone ({datetime.date.today()}, {card} host)", "",
             f"`benchmarks/ssd_stream.py`: {len(groups)} groups of {args.group_mib:.0f} MiB of states "
             f"({state_bytes / 1e9:.2f} GB each way per step), bf16 groups (master, m, v in fp32), the native "
             f"CPU AdamW on {args.threads} threads; the best of {args.steps} timed steps after one. Disk, 1 GiB "
             f"O_DIRECT requests through the default swapper, the better of before and after the grid: read "
             f"{disk['read'] / 1e9:.2f}, write {disk['write'] / 1e9:.2f}, both at once {disk['both'] / 1e9:.2f} GB/s "
             f"(before: {probe['both'] / 1e9:.2f}, after: {after['both'] / 1e9:.2f}). Stream roofline = "
             f"max(read / read rate, write / write rate, both / both-at-once rate).", "",
             "| swapper block | queue depth | staging slots | piece | stream, both ways | step (s) | roofline / step |",
             "|---|---|---|---|---|---|---|"]
    for block, depth, slots, piece, r in rows:
        roof = roofline(r["moved"] / 2, r["moved"] / 2, disk)
        lines.append(f"| {block >> 20} MiB | {depth} | {slots} | "
                     f"{piece * STATE_BYTES >> 20} MiB | {r['both'] / 1e9:.2f} GB/s | "
                     f"{', '.join(f'{s:.2f}' for s in r['seconds'])} | {roof / min(r['seconds']):.2f} |")
    publish("\n".join(lines) + "\n", args.results if args.append_results else None)


if __name__ == "__main__":
    main()
