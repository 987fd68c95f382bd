"""HardwareProfile: the rates the planner predicts with — measured once and cached, or given.

``HardwareProfile.detect(device)`` returns the cached measurement for this machine and device when there is
one (``~/.cache/ratel/hardware.json``, keyed by device name and host), otherwise measures (a few seconds:
a matrix product, pinned copies each way, torch's fused CPU AdamW) and caches the result. Profiles can also
be given by hand, e.g. ``HardwareProfile.h100()`` carries the figures measured on the project's H100 machine.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("ratel.hardware")
CACHE = Path(os.environ.get("RATEL_CACHE_DIR", Path.home() / ".cache" / "ratel")) / "hardware.json"


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    gpu_tflops: float              # dense matrix rate in the compute dtype, TFLOP/s
    h2d_gbps: float                # pinned host -> GPU, GB/s
    d2h_gbps: float                # GPU -> pinned host, GB/s
    ssd_read_gbps: float
    ssd_write_gbps: float
    cpu_adam_gparams: float        # CPU AdamW, billions of parameters per second
    host_bytes: int                # host memory available to Ratel
    gpu_bytes: int                 # GPU memory of the device
    matmul_efficiency: float = 0.6  # fraction of the matrix rate a transformer layer reaches
    hbm_gbps: float = 3000.0        # device memory bandwidth: the cost of recomputing element-wise ops
    min_offload_bytes: int = 1 << 20  # below this a PCIe round trip costs more in latency than the bytes free

    @classmethod
    def h100(cls) -> "HardwareProfile":
        """The project's H100 80GB machine (measured 2026-11: bf16 GEMM 790 TFLOP/s, PCIe 55/52 GB/s)."""
        return cls(name="NVIDIA H100 80GB HBM3", gpu_tflops=790.0, h2d_gbps=55.0, d2h_gbps=52.0,
                   ssd_read_gbps=1.5, ssd_write_gbps=2.0, cpu_adam_gparams=3.9, host_bytes=128 << 30,
                   gpu_bytes=80 << 30)

    @classmethod
    def cpu(cls) -> "HardwareProfile":
        """A nominal CPU-only machine: the 'GPU tier' is another host buffer."""
        return cls(name="cpu", gpu_tflops=0.2, h2d_gbps=10.0, d2h_gbps=10.0, ssd_read_gbps=1.0,
                   ssd_write_gbps=1.0, cpu_adam_gparams=0.5, host_bytes=_host_memory(),
                   gpu_bytes=_host_memory(), min_offload_bytes=0, hbm_gbps=20.0)

    @classmethod
    def detect(cls, device: str | torch.device, measure: bool = True) -> "HardwareProfile":
        device = torch.device(device)
        if device.type != "cuda":
            return cls.cpu()
        key = f"{platform.node()}|{torch.cuda.get_device_name(device)}"
        cached = _load_cache().get(key)
        fields = {f.name for f in dataclasses.fields(cls)}
        if cached and fields >= set(cached):
            return cls(**cached)
        if not measure:
            return dataclasses.replace(cls.h100(), name=torch.cuda.get_device_name(device),
                                       gpu_bytes=torch.cuda.get_device_properties(device).total_memory,
                                       host_bytes=_host_memory())
        profile = measure_cuda(device)
        data = _load_cache()
        data[key] = dataclasses.asdict(profile)
        try:
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            CACHE.write_text(json.dumps(data, indent=1, sort_keys=True))
        except OSError as exc:  # a read-only home must not stop training
            log.warning("could not cache the hardware profile at %s: %s", CACHE, exc)
        return profile


def _host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 << 30


def _load_cache() -> dict:
    try:
        return json.loads(CACHE.read_text())
    except (OSError, ValueError):
        return {}


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
    host = dev = other = None   # free the 1.5 GiB before the optimizer measurement

    # The CPU AdamW the runtime runs: bf16 gradients in, the bf16 copy out (native kernel where it is faster).
    from ratel.runtime.cpu_adam import adamw_step
    numel = 128 << 20
    p, m, v = torch.randn(numel), torch.zeros(numel), torch.zeros(numel)
    g, out = torch.randn(numel).bfloat16(), torch.empty(numel, dtype=torch.bfloat16)
    best = float("inf")
    for step in range(1, 6):   # the best of five: the first pays page faults, later ones meet a warm cache
        t0 = time.perf_counter()
        adamw_step(p, g, m, v, step, lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, out=out)
        best = min(best, time.perf_counter() - t0)
    adam = numel / best / 1e9
    props = torch.cuda.get_device_properties(device)
    return HardwareProfile(name=props.name, gpu_tflops=tflops, h2d_gbps=h2d, d2h_gbps=d2h, ssd_read_gbps=1.5,
                           ssd_write_gbps=2.0, cpu_adam_gparams=adam, host_bytes=_host_memory(),
                           gpu_bytes=props.total_memory, hbm_gbps=hbm)
