"""Swapper throughput against raw O_DIRECT on the same file system, over a grid of block sizes and queue depths.

    python benchmarks/swapper.py --dir /mnt/nvme/ratel-bench [--dir /mnt/nvme1/ratel-bench] [--size 4GiB] [--quick]

Raw figure: the best of a few ``dd`` runs (bs 8M and 64M, ``oflag=direct`` / ``iflag=direct``, writing over an
existing file with ``conv=notrunc``; 1 stream, and 4 or 16 concurrent streams on disjoint parts of the file), all
directories at once when striping. Swapper figure: the same
bytes as ``--request`` sized requests (64 MiB: a typical unit of optimizer state), all submitted at once from
one page-aligned buffer, then waited for, writing over an existing swap file and reading it back with
O_DIRECT, so the page cache never helps either side. GB/s are 10^9 bytes per second, as dd prints them.
The raw figure is measured before and after the grid and the better one is used (disks drift). Extra rows
show the default configuration with checksum=True and with a buffer that is not page-aligned (bounce copies).
The goal is >= 95 % of raw in both directions. Results are printed and appended to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ratel.runtime.swapper import (ALIGNMENT, DEFAULT_BLOCK_SIZE, DEFAULT_QUEUE_DEPTH, Swapper,  # noqa: E402
                                   aligned_empty, uring_available)
from ratel.ir.hardware import cpu_model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (try 1GiB, 512MiB, 4096)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def fmt_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


# ---- machine ------------------------------------------------------------------------------------------



def mount_of(path: str) -> tuple[str, str, str]:
    """(file system type, device, mount point) of the mount holding ``path``, from /proc/mounts."""
    path = os.path.realpath(path)
    best = ("?", "?", "")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[2]):
                best = (fstype, dev, mnt)
    return best


def describe_machine(dirs) -> dict:
    mounts = [mount_of(d) for d in dirs]
    virtual = [dev for _, dev, _ in mounts if re.match(r"/dev/(vd|xvd)", dev)]
    return {
        "note": (f"{', '.join(sorted(set(virtual)))} is a virtual disk: its bandwidth can drift between runs and "
                 "the host may cache it, so treat ratios above 100 % as 'at the disk's limit'") if virtual else "",
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "fs": ", ".join(f"{d}: {t} on {dev}" for d, (t, dev, _) in zip(dirs, mounts)),
        "short": f"{cpu_model()}, {mounts[0][0]} on {mounts[0][1]}",
    }


# ---- raw baseline -------------------------------------------------------------------------------------

def run_dd_parallel(args_per_dir) -> float | None:
    """Runs one dd per directory at once; returns aggregate bytes/s, or None if dd failed."""
    procs = []
    t0 = time.perf_counter()
    for args in args_per_dir:
        procs.append(subprocess.Popen(["dd", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    total = 0
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            return None
        m = re.search(r"^(\d+) bytes", err, re.M)
        total += int(m.group(1)) if m else 0
    elapsed = time.perf_counter() - t0
    return total / elapsed if total else None


def raw_python(paths, part_size: int, write: bool, bs: int = 8 * MiB) -> float:
    """Fallback raw figure: one O_DIRECT pread/pwrite loop per file, files one after another."""
    buf = aligned_empty(bs)
    mv = memoryview(buf.numpy())
    total = 0
    t0 = time.perf_counter()
    for path in paths:
        try:
            fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        except OSError:
            fd = os.open(path, os.O_RDWR)
        try:
            for off in range(0, part_size, bs):
                n = os.pwrite(fd, mv, off) if write else os.preadv(fd, [mv], off)
                total += n
        finally:
            os.close(fd)
    return total / (time.perf_counter() - t0)


# (dd block size, concurrent dd streams per directory on disjoint parts of the file). One synchronous dd
# keeps one request in flight; NVMe (and virtual disks) may need several to reach their bandwidth.
RAW_CONFIGS = ((8 * MiB, 1), (64 * MiB, 1), (8 * MiB, 4), (8 * MiB, 16))


def measure_raw(dirs, size: int, repeats: int) -> dict:
    """Best of dd over RAW_CONFIGS, every directory at once."""
    part = size // len(dirs)
    paths = [os.path.join(d, "raw-baseline.bin") for d in dirs]
    best = {"write": 0.0, "read": 0.0}
    how = {"write": "", "read": ""}
    have_dd = shutil.which("dd") is not None
    if have_dd:  # lay the file down first: every measured write then overwrites allocated blocks
        run_dd_parallel([["if=/dev/zero", f"of={p}", f"bs={MiB}", f"count={part // MiB}", "oflag=direct"]
                         for p in paths])
    for bs, streams in RAW_CONFIGS:
        count = part // bs // streams
        if count == 0:
            continue
        for _ in range(repeats):
            for op in ("write", "read"):
                rate = None
                if have_dd:
                    args = []
                    for p in paths:
                        for k in range(streams):
                            if op == "write":
                                args.append(["if=/dev/zero", f"of={p}", f"bs={bs}", f"count={count}",
                                             f"seek={k * count}", "oflag=direct", "conv=notrunc"])
                            else:
                                args.append([f"if={p}", "of=/dev/null", f"bs={bs}", f"count={count}",
                                             f"skip={k * count}", "iflag=direct"])
                    rate = run_dd_parallel(args)
                    tag = f"dd bs={bs // MiB}M direct, {streams} stream{'s' if streams > 1 else ''}"
                if rate is None:
                    rate = raw_python(paths, part, op == "write")
                    tag = "python pread/pwrite loop (dd failed or missing)"
                if rate > best[op]:
                    best[op], how[op] = rate, tag
    for p in paths:
        os.unlink(p)
    return {"write": best["write"], "read": best["read"], "how": how}


# ---- swapper ------------------------------------------------------------------------------------------

def fill_pattern(buf: torch.Tensor) -> None:
    words = buf.view(torch.int64)
    torch.arange(words.numel(), out=words)
    words.mul_(0x9E3779B97F4A7C15 & 0x7FFFFFFFFFFFFFFF)


def run_swapper(dirs, size: int, request: int, backend: str, block: int, depth: int, stripe: int,
                buf: torch.Tensor, repeats: int, checksum: bool = False) -> dict:
    best = {"write": 0.0, "read": 0.0, "write_cpu": 0.0, "read_cpu": 0.0}
    with Swapper(dirs, block_size=block, queue_depth=depth, backend=backend, stripe_size=stripe,
                 checksum=checksum) as sw:
        f = sw.file("bench/data", size)
        for _ in range(repeats):
            for op in ("write", "read"):
                submit = sw.write if op == "write" else sw.read
                c0, t0 = time.process_time(), time.perf_counter()
                handles = [submit(f, off, buf[off:off + request]) for off in range(0, size, request)]
                for h in handles:
                    h.wait()
                elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
                rate = size / elapsed
                if rate > best[op]:
                    best[op], best[op + "_cpu"] = rate, cpu / (size / 1e9)
        sw.close(remove=False)  # the next configuration overwrites the same file
        direct = f.direct
    best["direct"] = direct
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", action="append", required=True,
                    help="directory on the file system to measure; repeat to stripe over several SSDs")
    ap.add_argument("--size", type=parse_size, default=parse_size("2GiB"),
                    help="bytes moved per measurement (default 2GiB); make it larger than the drive's cache")
    ap.add_argument("--request", type=parse_size, default=64 * MiB, help="bytes per request (default 64MiB)")
    ap.add_argument("--quick", action="store_true", help="small grid, one repeat")
    ap.add_argument("--backends", default=None, help="comma-separated subset of uring,threads")
    ap.add_argument("--block-sizes", default=None, help="comma-separated, e.g. 256KiB,1MiB,4MiB")
    ap.add_argument("--queue-depths", default=None, help="comma-separated, e.g. 8,32")
    ap.add_argument("--repeats", type=int, default=None, help="best of N (default 2, --quick 1)")
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"), help="markdown file to append to")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to --results")
    args = ap.parse_args()

    dirs = [os.path.abspath(d) for d in args.dir]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    request = args.request
    if request % ALIGNMENT or args.size % request:
        ap.error("--size must be a multiple of --request, and --request of 4096")
    if args.size % len(dirs):
        ap.error("--size must divide evenly over the directories")
    repeats = args.repeats or (1 if args.quick else 2)
    blocks = ([parse_size(b) for b in args.block_sizes.split(",")] if args.block_sizes
              else [MiB, 4 * MiB] if args.quick else [256 << 10, MiB, 4 * MiB, 16 * MiB])
    depths = ([int(q) for q in args.queue_depths.split(",")] if args.queue_depths
              else [8, 32] if args.quick else [4, 8, 16, 32, 64])
    ok, why = uring_available()
    backends = args.backends.split(",") if args.backends else ["uring", "threads"]
    if "uring" in backends and not ok:
        print(f"io_uring unavailable here ({why}); measuring threads only")
        backends = [b for b in backends if b != "uring"]
    stripe = max(blocks)

    machine = describe_machine(dirs)
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, kernel {machine['kernel']}")
    print(f"file system: {machine['fs']}")
    if machine["note"]:
        print(f"note: {machine['note']}")
    print(f"size {fmt_size(args.size)}, requests of {fmt_size(request)}, stripe {fmt_size(stripe)}, "
          f"best of {repeats}")

    raw = measure_raw(dirs, args.size, max(repeats, 2))
    print(f"raw: write {raw['write'] / 1e9:.2f} GB/s ({raw['how']['write']}), "
          f"read {raw['read'] / 1e9:.2f} GB/s ({raw['how']['read']})")

    buf = aligned_empty(args.size)
    fill_pattern(buf)
    # Lay the swap file down once, so that every configuration overwrites allocated blocks as dd does.
    with Swapper(dirs, backend=backends[0], block_size=min(blocks), stripe_size=stripe) as sw:
        f = sw.file("bench/data", args.size)
        for off in range(0, args.size, request):
            sw.write(f, off, buf[off:off + request])
        sw.wait_all()
        sw.close(remove=False)

    rows = []
    header = (f"{'backend':18} {'block':>8} {'qd':>4} {'write GB/s':>10} {'w/raw':>6} {'w cpu s/GB':>10} "
              f"{'read GB/s':>9} {'r/raw':>6} {'r cpu s/GB':>10}")
    print(header)

    def measure(label, backend, block, depth, buffer, checksum=False):
        r = run_swapper(dirs, args.size, request, backend, block, depth, stripe, buffer, repeats, checksum)
        row = [label, block, depth, r["write"], 0.0, r["write_cpu"], r["read"], 0.0, r["read_cpu"], r["direct"]]
        rows.append(row)
        print(f"{label:18} {fmt_size(block):>8} {depth:>4} {r['write'] / 1e9:>10.2f} "
              f"{r['write'] / raw['write']:>6.0%} {r['write_cpu']:>10.2f} {r['read'] / 1e9:>9.2f} "
              f"{r['read'] / raw['read']:>6.0%} {r['read_cpu']:>10.2f}"
              + ("" if r["direct"] else "  (buffered: no O_DIRECT)"), flush=True)

    for backend in backends:
        for block in blocks:
            for depth in depths:
                measure(backend, backend, block, depth, buf)
    # What the runtime pays for the safety options, at the default block size and queue depth.
    unaligned = aligned_empty(args.size + 64)[64:]
    unaligned.copy_(buf)
    for backend in backends:
        block, depth = DEFAULT_BLOCK_SIZE, DEFAULT_QUEUE_DEPTH[backend]
        measure(f"{backend} checksum", backend, block, depth, buf, checksum=True)
        measure(f"{backend} unaligned", backend, block, depth, unaligned)
    buf.copy_(unaligned)
    del unaligned

    # The disk may drift during the run (virtual disks especially): the raw figure is the best of both ends.
    again = measure_raw(dirs, args.size, max(repeats, 2))
    for op in ("write", "read"):
        if again[op] > raw[op]:
            raw[op], raw["how"][op] = again[op], again["how"][op] + " (after the grid)"
    print(f"raw after the grid: write {again['write'] / 1e9:.2f} GB/s, read {again['read'] / 1e9:.2f} GB/s; "
          f"ratios below use the better of both ends")
    for row in rows:
        row[4], row[7] = row[3] / raw["write"], row[6] / raw["read"]

    # Check the data survived the whole grid (the last configuration wrote, then read into buf).
    expect = aligned_empty(args.size)
    fill_pattern(expect)
    assert torch.equal(buf, expect), "swapper read back different bytes"

    for d in dirs:
        for root, _, files in os.walk(os.path.join(d, "bench"), topdown=False):
            for name in files:
                os.unlink(os.path.join(root, name))
            os.rmdir(root)

    best = {}
    for row in rows:
        if " " in row[0]:
            continue  # checksum / unaligned rows are not candidates for the defaults
        score = min(row[4], row[7])
        if row[0] not in best or score > best[row[0]][0]:
            best[row[0]] = (score, row)
    print()
    print(f"raw: write {raw['write'] / 1e9:.2f} GB/s, read {raw['read'] / 1e9:.2f} GB/s")
    for backend, (score, row) in best.items():
        print(f"best {backend}: block {fmt_size(row[1])}, qd {row[2]}: write {row[4]:.0%} of raw, "
              f"read {row[7]:.0%} of raw")

    if not args.no_record:
        record(args, machine, dirs, raw, rows, best, request, stripe, repeats)
    return 0


def record(args, machine, dirs, raw, rows, best, request, stripe, repeats) -> None:
    today = datetime.date.today().isoformat()
    lines = [f"## Swapper ({today}, {machine['short']})", "",
             f"- machine: {machine['cpu']}, {machine['cores']} cores, kernel {machine['kernel']}",
             f"- file system: {machine['fs']}",
             *([f"- note: {machine['note']}"] if machine["note"] else []),
             f"- command: `python benchmarks/swapper.py {' '.join(sys.argv[1:])}`",
             f"- {fmt_size(args.size)} per measurement as {fmt_size(request)} requests all in flight, stripe "
             f"{fmt_size(stripe)}, best of {repeats}; GB/s = 1e9 B/s",
             f"- raw O_DIRECT: write {raw['write'] / 1e9:.2f} GB/s ({raw['how']['write']}), "
             f"read {raw['read'] / 1e9:.2f} GB/s ({raw['how']['read']})", "",
             "| backend | block | queue depth | write GB/s | write / raw | read GB/s | read / raw | CPU s/GB w / r |",
             "|---|---|---|---|---|---|---|---|"]
    for backend, block, depth, w, wr, wc, r, rr, rc, direct in rows:
        mark = "" if direct else " (buffered)"
        lines.append(f"| {backend}{mark} | {fmt_size(block)} | {depth} | {w / 1e9:.2f} | {wr:.0%} | "
                     f"{r / 1e9:.2f} | {rr:.0%} | {wc:.2f} / {rc:.2f} |")
    lines.append("")
    for backend, (score, row) in best.items():
        lines.append(f"Best {backend}: block {fmt_size(row[1])}, queue depth {row[2]} "
                     f"(write {row[4]:.0%}, read {row[7]:.0%} of raw).")
    lines.append("")
    new = not os.path.exists(args.results)
    with open(args.results, "a") as f:
        if new:
            f.write("# Benchmark results\n\n")
        f.write("\n".join(lines) + "\n")
    print(f"appended to {args.results}")


if __name__ == "__main__":
    sys.exit(main())
