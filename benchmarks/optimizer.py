"""CPU AdamW throughput: Ratel's native kernel against torch's fused CPU AdamW, in the same process.

The question (the native kernel in csrc/adam is kept only if it wins): for one unit's flat buffers, how many
parameters per second does each path update? Timed paths, all on the same buffers and threads:

  (a) torch_fused_fp32  torch._fused_adamw_ on fp32 gradients, nothing else (torch's best case)
  (b) torch_full        the torch backend of adamw_step: bf16 grad -> grad.float() -> _fused_adamw_ -> out.copy_
  (b') torch_full_prealloc  same, but converting into a preallocated fp32 buffer (no page faults)
  (c) native_full       ratel._adam doing (b)'s whole job in one pass
  (d) native_fp32       ratel._adam on fp32 gradients without the bf16 copy, i.e. (a)'s job
  (c') native_full_cached_stores  (c) with ordinary stores for the bf16 copy instead of streaming ones

The update is memory bound: per parameter (c) moves 28 bytes (2 B grad + 12 B state in, 12 B state + 2 B copy
out); (b) moves 40 bytes in three passes. On the GPU machine PCIe copies compete for the same memory, so with
CUDA present the full paths are timed again while a thread keeps H2D and D2H copies of pinned memory busy.

Run (from the repository root, after `pip install --no-build-isolation -e .`):

    python benchmarks/optimizer.py                   # size picked from cores and memory, appends RESULTS.md
    python benchmarks/optimizer.py --numel 256M --repeats 10
    python benchmarks/optimizer.py --no-record       # print only

Each repeat times every path once, round robin, so drift of a shared machine hits all paths alike; the
table gives the median (and best) over repeats.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ratel.runtime import cpu_adam  # noqa: E402

HYPER = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

# Bytes each path moves per parameter, counting what it must read and write (not read-for-ownership).
BYTES_PER_PARAM = {
    "torch_fused_fp32": 4 + 12 + 12,
    "torch_full": (2 + 4) + (4 + 12 + 12) + (4 + 2),
    "torch_full_prealloc": (2 + 4) + (4 + 12 + 12) + (4 + 2),
    "native_full": 2 + 12 + 12 + 2,
    "native_fp32": 4 + 12 + 12,
    "native_full_cached_stores": 2 + 12 + 12 + 2,
}


def parse_count(text: str) -> int:
    """'256M' -> 268435456, '1G' -> 2**30, '5000' -> 5000."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (try 64M or 1G)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2).lower()]
    return int(match.group(1)) * scale


def cpu_model() -> str:
    """'model name' from /proc/cpuinfo, with family/model numbers (VMs often mask the name)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown CPU"
    name = fields.get("model name", platform.processor() or "unknown CPU")
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 << 30


def default_numel() -> int:
    """256M parameters (a 7B model's largest units are ~200M) on a big machine; smaller where a default
    run would take minutes or not fit: the buffers and the torch path's temporaries take ~36 B/param."""
    cores = os.cpu_count() or 1
    numel = 256 << 20 if cores >= 8 else 64 << 20
    while numel > (1 << 20) and 36 * numel > host_memory_bytes() // 3:
        numel //= 2
    return numel


class PcieLoad:
    """Keeps pinned-memory H2D and D2H copies running on their own streams, as the runtime's prefetch and
    gradient offload do while the optimizer works."""

    def __init__(self, nbytes: int = 256 << 20):
        self.host_src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.host_dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.dev_dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        self.dev_src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        self.h2d, self.d2h = torch.cuda.Stream(), torch.cuda.Stream()
        self.bytes_moved = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            with torch.cuda.stream(self.h2d):
                self.dev_dst.copy_(self.host_src, non_blocking=True)
            with torch.cuda.stream(self.d2h):
                self.host_dst.copy_(self.dev_src, non_blocking=True)
            self.h2d.synchronize()  # releases the GIL while waiting
            self.d2h.synchronize()
            self.bytes_moved += 2 * self.host_src.numel()

    def __enter__(self):
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.gbytes_per_s = self.bytes_moved / (time.perf_counter() - self._start) / 1e9


class Buffers:
    """One unit's flat buffers. State values are realistic (m ~ grad, v ~ grad^2) so no path hits the
    slow paths of subnormals or NaNs."""

    def __init__(self, numel: int):
        gen = torch.Generator().manual_seed(0)
        self.master = torch.randn(numel, generator=gen) * 0.02
        self.grad_bf16 = (torch.randn(numel, generator=gen) * 1e-3).to(torch.bfloat16)
        self.grad_fp32 = self.grad_bf16.float()
        self.grad_scratch = torch.empty(numel)  # torch_full_prealloc's conversion target
        self.exp_avg = self.grad_fp32 * 0.1
        self.exp_avg_sq = self.grad_fp32.square() * 1e-3
        self.out = torch.empty(numel, dtype=torch.bfloat16)
        self.step = 10  # past the first steps; the values of the constants do not change the cost


def make_paths(buf: Buffers, threads: int, isa: str) -> dict:
    step_tensor = torch.tensor(float(buf.step))

    def torch_fused(grad):
        torch._fused_adamw_([buf.master], [grad], [buf.exp_avg], [buf.exp_avg_sq], [], [step_tensor],
                            amsgrad=False, maximize=False, **HYPER)

    def torch_full_prealloc():
        buf.grad_scratch.copy_(buf.grad_bf16)
        torch_fused(buf.grad_scratch)
        buf.out.copy_(buf.master)

    def adam(grad, out, backend):
        cpu_adam.adamw_step(buf.master, grad, buf.exp_avg, buf.exp_avg_sq, buf.step, out=out, backend=backend,
                            num_threads=threads, isa=isa, **HYPER)

    paths = {
        "torch_fused_fp32": lambda: torch_fused(buf.grad_fp32),
        "torch_full": lambda: adam(buf.grad_bf16, buf.out, "torch"),
        "torch_full_prealloc": torch_full_prealloc,
    }
    if cpu_adam.native_available():
        paths["native_full"] = lambda: adam(buf.grad_bf16, buf.out, "native")
        paths["native_fp32"] = lambda: adam(buf.grad_fp32, None, "native")

        def native_full_cached_stores():
            # Ablation: the bf16 copy through ordinary stores instead of streaming ones (see csrc/adam).
            cpu_adam._native.adamw_step(
                buf.master.data_ptr(), buf.grad_bf16.data_ptr(), "bfloat16", buf.exp_avg.data_ptr(),
                buf.exp_avg_sq.data_ptr(), buf.master.numel(), buf.step, HYPER["lr"], HYPER["beta1"],
                HYPER["beta2"], HYPER["eps"], HYPER["weight_decay"], 1.0, buf.out.data_ptr(), "bfloat16",
                threads, isa, stream_out=0)

        paths["native_full_cached_stores"] = native_full_cached_stores
    return paths


def time_paths(paths: dict, repeats: int) -> dict[str, list[float]]:
    for fn in paths.values():  # warm-up: first-touch page faults, thread pools, frequency ramp
        fn()
    times = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def check_equal(numel: int, threads: int, isa: str) -> str:
    """Native against the torch path on the same inputs: how many elements differ, and by how many ulp."""
    if not cpu_adam.native_available():
        return "native not built"
    n = min(numel, 1 << 20) + 7  # odd on purpose: covers the vector tail
    gen = torch.Generator().manual_seed(1)
    master = torch.randn(n, generator=gen)
    grad = (torch.randn(n, generator=gen) * 1e-3).to(torch.bfloat16)
    states = {}
    for backend in ("native", "torch"):
        m, v, p = torch.zeros(n), torch.zeros(n), master.clone()
        out = torch.empty(n, dtype=torch.bfloat16)
        for step in range(1, 4):
            cpu_adam.adamw_step(p, grad, m, v, step, out=out, backend=backend, num_threads=threads,
                                isa=isa, **HYPER)
        states[backend] = (p, m, v, out)
    body = n - n % 16  # torch's vector loop; its scalar tail rounds exp_avg_sq differently (1 ulp a step)
    body_equal = all(torch.equal(a[:body], b[:body]) for a, b in zip(states["native"][:3], states["torch"][:3]))
    tail_ulp = max(int((a[body:].view(torch.int32) - b[body:].view(torch.int32)).abs().max())
                   for a, b in zip(states["native"][:3], states["torch"][:3]))
    out_exact = torch.equal(states["native"][3], states["native"][0].to(torch.bfloat16))
    verdict = ("bitwise equal" if body_equal else "DIFFERENT") + f" (torch's {n - body}-element scalar tail: " \
              f"max {tail_ulp} ulp)"
    return f"{verdict}; bf16 copy {'==' if out_exact else '!='} master.to(bf16)"


def summarize(times: dict[str, list[float]], numel: int) -> dict[str, dict]:
    rows = {}
    for name, samples in times.items():
        median = statistics.median(samples)
        rows[name] = {
            "gparams": numel / median / 1e9,
            "best_gparams": numel / min(samples) / 1e9,
            "gbytes": numel * BYTES_PER_PARAM[name] / median / 1e9,
            "ms": median * 1e3,
        }
    return rows


def markdown_table(rows: dict[str, dict], references: dict[str, tuple[str, ...]]) -> list[str]:
    lines = ["| path | Gparams/s (median) | best | ms/step | GB/s moved | speed-up |",
             "|---|---:|---:|---:|---:|---|"]
    for name, row in rows.items():
        ratios = ", ".join(f"{row['gparams'] / rows[ref]['gparams']:.2f}x {ref}"
                           for ref in references.get(name, ()) if ref in rows)
        lines.append(f"| {name} | {row['gparams']:.2f} | {row['best_gparams']:.2f} | {row['ms']:.1f} | "
                     f"{row['gbytes']:.0f} | {ratios} |")
    return lines


# What each path is compared with: the same job done by torch.
REFERENCES = {
    "torch_full_prealloc": ("torch_full",),
    "native_full": ("torch_full", "torch_full_prealloc"),
    "native_fp32": ("torch_fused_fp32",),
    "native_full_cached_stores": ("torch_full", "native_full"),
}


def parse_threads(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"not a thread count or list: {text!r} (try 16 or 4,8,16)")
    return counts


def measure(buf: Buffers, numel: int, threads: int, args) -> list[str]:
    """Markdown lines for one thread count: the quiet table, then the table under PCIe load if CUDA is here."""
    torch.set_num_threads(threads)  # the torch paths use torch's pool: both sides get the same count
    paths = make_paths(buf, threads, args.isa)
    lines = [f"Threads: {threads}", ""] + markdown_table(summarize(time_paths(paths, args.repeats), numel),
                                                          REFERENCES)
    if torch.cuda.is_available() and not args.no_pcie:
        full = {name: paths[name] for name in ("torch_full", "torch_full_prealloc", "native_full",
                                               "native_full_cached_stores") if name in paths}
        try:
            with PcieLoad() as load:
                loaded = summarize(time_paths(full, args.repeats), numel)
            lines += ["", f"Threads: {threads}, under PCIe load (H2D + D2H of pinned memory, "
                          f"{load.gbytes_per_s:.1f} GB/s during the timing):", ""]
            lines += markdown_table(loaded, REFERENCES)
        except Exception as error:  # the quiet numbers stay valid without this extra
            lines += ["", f"PCIe-load run failed: {type(error).__name__}: {error}"]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=parse_count, default=None,
                        help="parameters per buffer, e.g. 256M (default: picked from cores and memory)")
    parser.add_argument("--threads", type=parse_threads, default=None,
                        help="thread count or comma-separated sweep, e.g. 4,8,16 (default: torch.get_num_threads())")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--isa", default="auto", help="native ISA: auto, avx512, avx2 or scalar")
    parser.add_argument("--no-pcie", action="store_true", help="skip the runs under PCIe copy load")
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS.name}")
    parser.add_argument("--machine", default=None, help="machine name for RESULTS.md (default: CPU model)")
    args = parser.parse_args(argv)

    numel = args.numel or default_numel()
    thread_counts = args.threads or [torch.get_num_threads()]
    features = cpu_flags()
    native_isa = None
    if cpu_adam.native_available():
        native_isa = cpu_adam.native_isa() if args.isa == "auto" else args.isa
    header = {
        "CPU": cpu_model(),
        "cores (os.cpu_count)": os.cpu_count(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "params per buffer": f"{numel:,} ({numel * 4 / 2**30:.2f} GiB fp32)",
        "torch": torch.__version__,
        "CPU AVX-512 / AVX512-BF16": f"{'avx512f' in features} / {'avx512_bf16' in features}",
        "native kernel": f"ratel._adam, ISA {native_isa} (AVX512-BF16 instructions: not used, see csrc/adam)"
                         if native_isa else "not built",
        "auto backend picks": cpu_adam._auto_backend(),
    }
    for key, value in header.items():
        print(f"{key:>28}: {value}")

    start = time.perf_counter()
    buf = Buffers(numel)
    sections = []
    for threads in thread_counts:
        section = measure(buf, numel, threads, args) + [""]
        print("\n" + "\n".join(section), flush=True)
        sections += section
    correctness = check_equal(numel, thread_counts[-1], args.isa)
    elapsed = time.perf_counter() - start

    print(f"native vs torch (3 steps, bf16 grads): {correctness}")
    print(f"benchmark took {elapsed:.0f} s")

    if not args.no_record:
        machine = args.machine or cpu_model()
        command = shlex.join(["python", "benchmarks/optimizer.py"] + list(sys.argv[1:] if argv is None else argv))
        lines = [f"## CPU AdamW ({datetime.date.today().isoformat()}, {machine})", ""]
        lines += [f"- {key}: {value}" for key, value in header.items()]
        lines += [f"- repeats: {args.repeats} (median shown; every repeat runs each path once, round robin)",
                  f"- native vs torch after 3 steps: {correctness}",
                  "- GB/s moved: the bytes a path must read and write per parameter (28 for native and for "
                  "torch's fused kernel alone, 40 for the torch path with conversions) times its rate",
                  f"- command: `{command}`", ""]
        lines += sections
        new_file = not RESULTS.exists()
        with RESULTS.open("a") as f:
            if new_file:
                f.write("# Benchmark results\n\nAppended by the scripts in benchmarks/; newest last.\n")
            f.write("\n" + "\n".join(lines).rstrip() + "\n")
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
