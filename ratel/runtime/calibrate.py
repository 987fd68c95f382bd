"""Measuring this machine: the HardwareProfile (ratel/ir/hardware.py) a plan executed here is made with.

``detect(device)`` returns the cached measurement for this machine and device when there is one
(``~/.cache/ratel/hardware.json``, keyed by host, device name and the CPU AdamW's threads), otherwise measures
(a few seconds: a matrix product, pinned copies each way, the CPU AdamW) and caches the result. Profiles can also
be given by hand, e.g. ``HardwareProfile.h100()`` carries the figures measured on the project's H100 machine.
The CPU AdamW kernel is always this process's (``cpu_adam_kernel``): it decides the host memory planned.
``with_disk(profile, ssd_dir)`` adds the SSD folders' rates, measured once per file system (on a GPU machine;
the CPU profile keeps its nominal figures unless ``RATEL_MEASURE_DISK=1``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import platform
import shutil
import threading
import time

import torch

from ratel.ir.budget import ssd_dirs
from ratel.ir.hardware import HardwareProfile, cache_dir, host_memory
from ratel.runtime.cpu_adam import _auto_backend, adamw_step, optimizer_threads

log = logging.getLogger("ratel.runtime")
CACHE = cache_dir() / "hardware.json"   # unit times (passes/time_units.py) are kept beside it


def detect(device: str | torch.device, measure: bool = True) -> HardwareProfile:
    """The profile of this machine for ``device``: cached, or measured now (``measure=False``: the H100
    figures under this GPU's name instead of measuring)."""
    device = torch.device(device)
    kernel = cpu_adam_kernel()
    if device.type != "cuda":
        return HardwareProfile.cpu(cpu_adam_kernel=kernel)
    # The CPU AdamW's rate is measured on the threads it gets beside training (optimizer_threads, from this
    # process's torch threads): a profile measured by a process with fewer (the test suite caps torch at 4)
    # priced a 16-core host's update at a fifth of its speed in every later plan.
    key = f"{platform.node()}|{torch.cuda.get_device_name(device)}|adamw threads {optimizer_threads()}"
    cached = _load_cache().get(key)
    fields = {f.name for f in dataclasses.fields(HardwareProfile)}
    if cached and fields == set(cached):    # a profile cached before the profile gained a field is measured again
        return dataclasses.replace(HardwareProfile(**cached), cpu_adam_kernel=kernel)
    if not measure:
        return dataclasses.replace(HardwareProfile.h100(), name=torch.cuda.get_device_name(device),
                                   host_bytes=host_memory(), cpu_adam_kernel=kernel)
    # Measuring draws random numbers: the caller's seed must give the same model whether or not this
    # machine was measured before (a meta-device model is initialised after planning, from these streams).
    with torch.random.fork_rng(devices=[device.index if device.index is not None else torch.cuda.current_device()]):
        profile = measure_cuda(device)
    data = _load_cache()
    data[key] = dataclasses.asdict(profile)
    _save_cache(data)
    return profile


def this_machine(profile: HardwareProfile) -> HardwareProfile:
    """``profile`` with what this process will run: the CPU AdamW kernel it has (a plan executed here must
    price the host memory of the kernel that runs)."""
    return dataclasses.replace(profile, cpu_adam_kernel=cpu_adam_kernel())


def cpu_adam_kernel() -> str:
    return "torch" if _auto_backend() == "torch" else "native"


def _load_cache() -> dict:
    try:
        return json.loads(CACHE.read_text())
    except (OSError, ValueError):
        return {}


DISK_PROBE_BYTES = 256 << 20        # with_disk's requests, as the runtime's SSD pieces are a few hundred MiB
DISK_PROBE_REQUESTS = 8             # ... one after another, two in flight


def measure_disk(dirs: list[str], nbytes: int = DISK_PROBE_BYTES, requests: int = 1,
                 repeats: int = 3) -> dict[str, float]:
    """Bytes per second of the SSD folders ``dirs`` (striped, as the swap files are), O_DIRECT through the
    swapper: writes alone, reads alone, and reads beside writes to another file (their bytes together). Each
    way ``requests`` requests of ``nbytes`` one after another, two in flight (as the runtime's SSD lane keeps
    them; more than one measures what the disk sustains rather than a burst), over files written once first
    (swap files are written over). The median of ``repeats`` each; the probe files are removed."""
    import statistics
    import tempfile

    from ratel.runtime.swapper import Swapper, aligned_empty

    in_flight = min(requests, 2)
    into = [aligned_empty(nbytes) for _ in range(in_flight)]
    out = [aligned_empty(nbytes) for _ in range(in_flight)]
    for b in out:
        b.random_(0, 255)
    probe = os.path.basename(tempfile.mkdtemp(prefix=".ratel-disk-probe-", dir=dirs[0]))
    try:
        with Swapper(dirs=dirs) as swapper:
            files = [swapper.file(f"{probe}/probe{i}.bin", requests * nbytes) for i in range(2)]

            def run(submit) -> float:
                start, pending = time.perf_counter(), []
                for i in range(requests):
                    pending.append(submit(i))
                    if len(pending) == 2:
                        for handle in pending.pop(0):
                            handle.wait()
                for handles in pending:
                    for handle in handles:
                        handle.wait()
                return time.perf_counter() - start

            def write(f, i):
                return [swapper.write(f, i * nbytes, out[i % 2])]

            def read(i):
                return [swapper.read(files[0], i * nbytes, into[i % 2])]

            for f in files:
                run(lambda i: write(f, i))                 # allocate the extents once

            def timed(submit) -> float:
                return statistics.median(run(submit) for _ in range(repeats))

            total = requests * nbytes
            rates = {"write": total / timed(lambda i: write(files[0], i)), "read": total / timed(read),
                     "both": 2 * total / timed(lambda i: read(i) + write(files[1], i))}
    finally:
        for d in dirs:
            shutil.rmtree(os.path.join(d, probe), ignore_errors=True)
    return rates


def with_disk(profile: HardwareProfile, ssd_dir, measure: bool | None = None) -> HardwareProfile:
    """``profile`` with the SSD rates of the folders ``ssd_dir`` (``Budget.ssd_dir``), measured once per host and
    file system(s) and cached beside the hardware profile. ``measure`` None: ``RATEL_MEASURE_DISK`` when set,
    else when the profile is a GPU's (on the CPU the nominal figures keep plans the same on every machine)."""
    if measure is None:
        env = os.environ.get("RATEL_MEASURE_DISK")
        measure = env not in ("", "0") if env is not None else profile.name != "cpu"
    dirs = ssd_dirs(ssd_dir) if ssd_dir else []
    if not measure or not dirs or not all(os.path.isdir(d) for d in dirs):
        return profile
    key = f"{platform.node()}|disk|" + ",".join(str(os.stat(d).st_dev) for d in dirs)
    data = _load_cache()
    rates = data.get(key)
    if not (isinstance(rates, dict) and {"read", "write", "both"} <= set(rates)):
        log.info("ratel: measuring the SSD folder(s) %s (once for this file system)", ", ".join(dirs))
        # A stream of 2 GiB each way, not one request: a step moves tens of GB, and one 256 MiB burst per way
        # priced the same H100 host's disk at 2.87 GB/s on one machine and 2.46 on the next (2026-12-06; the
        # SSD row predicted at 1.15x its measured step; the 1 GiB and 8 GiB probes of that run measured 2.91 and 2.78).
        rates = measure_disk(dirs, DISK_PROBE_BYTES, requests=DISK_PROBE_REQUESTS, repeats=1)
        data[key] = rates
        _save_cache(data)
    return dataclasses.replace(profile, ssd_read_gbps=rates["read"] / 1e9, ssd_write_gbps=rates["write"] / 1e9,
                               ssd_both_gbps=rates["both"] / 1e9)


def _save_cache(data: dict) -> None:
    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        CACHE.write_text(json.dumps(data, indent=1, sort_keys=True))
    except OSError as exc:  # a read-only home must not stop training
        log.warning("could not cache the hardware profile at %s: %s", CACHE, exc)


def measure_cuda(device: torch.device) -> HardwareProfile:
    """A few seconds of microbenchmarks on ``device``."""
    torch.cuda.synchronize(device)
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    reps = 10
    for _ in range(reps):
        a @ b
    end.record()
    end.synchronize()
    tflops = 2 * n ** 3 * reps / (start.elapsed_time(end) / 1e3) / 1e12
    del a, b

    size = 512 << 20
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(size, dtype=torch.uint8, device=device)

    def rate(copy) -> float:
        copy()
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(4):
            copy()
        torch.cuda.synchronize(device)
        return 4 * size / (time.perf_counter() - t0) / 1e9

    h2d = rate(lambda: dev.copy_(host, non_blocking=True))
    d2h = rate(lambda: host.copy_(dev, non_blocking=True))
    other = torch.empty_like(dev)
    hbm = 2 * rate(lambda: other.copy_(dev))   # bytes read plus bytes written
    other = None

    # The CPU AdamW the runtime runs: bf16 gradients in, the bf16 copy out (native kernel where it is faster),
    # on the threads it gets beside training.
    numel = 128 << 20
    p, m, v = torch.randn(numel), torch.zeros(numel), torch.zeros(numel)
    g, out = torch.randn(numel).bfloat16(), torch.empty(numel, dtype=torch.bfloat16)
    update = functools.partial(adamw_step, p, g, m, v, lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8,
                               weight_decay=0.0, out=out, num_threads=optimizer_threads())
    best = float("inf")
    for step in range(1, 6):   # the best of five: the first pays page faults, later ones meet a warm cache
        t0 = time.perf_counter()
        update(step)
        best = min(best, time.perf_counter() - t0)
    adam = numel / best / 1e9
    copies = max(4, math.ceil(4 * best * h2d * 1e9 / size))    # copying for about four updates' time
    h2d_shared, adam_shared = side_by_side(lambda: dev.copy_(host, non_blocking=True), size, copies, update,
                                           numel, device)
    host = dev = None
    props = torch.cuda.get_device_properties(device)
    # The disk is measured where the user's ssd_dir is known (with_disk); until then, the H200 host's figures.
    disk = HardwareProfile.h100()
    return HardwareProfile(name=props.name, gpu_tflops=tflops, h2d_gbps=h2d, d2h_gbps=d2h,
                           ssd_read_gbps=disk.ssd_read_gbps, ssd_write_gbps=disk.ssd_write_gbps,
                           ssd_both_gbps=disk.ssd_both_gbps, cpu_adam_gparams=adam, host_bytes=host_memory(),
                           hbm_gbps=hbm, cpu_adam_kernel=cpu_adam_kernel(), h2d_shared_gbps=h2d_shared,
                           cpu_adam_shared_gparams=adam_shared)


def side_by_side(copy, nbytes: int, copies: int, update, numel: int, device=None) -> tuple[float, float]:
    """(copy GB/s, update Gparams/s) while ``copies`` copies of ``nbytes`` (``copy()`` queues one) and the CPU
    update (``update(step)``, ``numel`` parameters, on a thread of its own as the runtime's optimizer runs)
    run at once: both draw on host DRAM. The update's rate is its fastest step that ran wholly beside the
    copies, as the rate alone is its fastest step; (0, 0), meaning not measured, when none did."""
    steps: list[tuple[float, float]] = []
    done = threading.Event()

    def updates():
        step = 100
        while not done.is_set():
            t0 = time.perf_counter()
            update(step)
            steps.append((t0, time.perf_counter()))
            step += 1

    worker = threading.Thread(target=updates, name="ratel-calibrate-adamw", daemon=True)
    worker.start()
    try:
        while not steps and worker.is_alive():   # the update is in its stride before the copies start
            time.sleep(0.001)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(copies):
            copy()
        synchronize(device)
        end = time.perf_counter()
    finally:
        done.set()
        worker.join()
    beside = [b - a for a, b in steps if a >= start and b <= end]
    if not beside:
        return 0.0, 0.0
    return copies * nbytes / (end - start) / 1e9, numel / min(beside) / 1e9


def synchronize(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
