"""HardwareProfile: the rates the planner predicts with, for the machine a plan is made for.

A profile is data: measured on this machine by ``ratel.runtime.calibrate.detect`` (cached per host and
device), or given by hand for a machine one plans for from elsewhere (``HardwareProfile.h100()`` carries
the figures of the project's H100 machine), so a plan made on a laptop for a GPU server does not depend on
the laptop.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    gpu_tflops: float              # dense matrix rate in the compute dtype, TFLOP/s
    h2d_gbps: float                # pinned host -> GPU, GB/s
    d2h_gbps: float                # GPU -> pinned host, GB/s
    ssd_read_gbps: float           # the SSD, one direction at a time, GB/s
    ssd_write_gbps: float
    cpu_adam_gparams: float        # CPU AdamW, billions of parameters per second
    host_bytes: int                # host memory available to Ratel
    matmul_efficiency: float = 0.6  # fraction of the matrix rate a transformer layer reaches
    hbm_gbps: float = 3000.0        # device memory bandwidth: the cost of recomputing element-wise ops
    min_offload_bytes: int = 1 << 20  # below this a PCIe round trip costs more in latency than the bytes free
    # The CPU AdamW kernel the target runs: "native" (ratel._adam, reads low-precision gradients as they are)
    # or "torch" (torch's fused AdamW, which needs an fp32 copy of the largest gradient: planned host memory).
    cpu_adam_kernel: str = "native"
    # Bytes read plus bytes written per second while the SSD lane's read and write channels run side by side
    # (many disks move more so than one direction alone, and less than the two rates added).
    ssd_both_gbps: float = 2.0
    # Data-parallel ranks' exchange of gradients and weights through host memory (gloo), GB/s each rank sends:
    # measured by ratel.compile when it runs under torchrun (Ranks.measure_gbps); a loopback guess otherwise.
    ranks_gbps: float = 5.0
    # Host DRAM is shared by the PCIe copies (DMA) and the CPU AdamW, so while both run each is slower than
    # alone (on the lent H100 host: 34 GB/s against 55 and 3.9 Gparams/s against 4.77). Measured side by side
    # by calibrate on CUDA targets; 0: not measured, each priced at its own rate alone.
    h2d_shared_gbps: float = 0.0          # host -> GPU while the CPU AdamW runs
    cpu_adam_shared_gparams: float = 0.0  # the CPU AdamW while host -> GPU copies run

    @property
    def shares_host_dram(self) -> bool:
        return self.h2d_shared_gbps > 0 and self.cpu_adam_shared_gparams > 0

    @property
    def torch_cpu_adam(self) -> bool:
        return self.cpu_adam_kernel == "torch"

    @classmethod
    def h100(cls) -> "HardwareProfile":
        """The project's H100 80GB machine (measured 2026-11: bf16 GEMM 790 TFLOP/s, PCIe 55/52 GB/s); the disk
        figures are the lent H200 host's (benchmarks/RESULTS.md, "The SSD lane": 1 GiB O_DIRECT requests, read
        1.74-1.76, write 2.60-2.61, both at once 1.90-2.11 GB/s)."""
        return cls(name="NVIDIA H100 80GB HBM3", gpu_tflops=790.0, h2d_gbps=55.0, d2h_gbps=52.0,
                   ssd_read_gbps=1.75, ssd_write_gbps=2.6, ssd_both_gbps=2.0, cpu_adam_gparams=3.9,
                   host_bytes=128 << 30)

    @classmethod
    def cpu(cls, cpu_adam_kernel: str = "native") -> "HardwareProfile":
        """A nominal CPU-only machine: the 'GPU tier' is another host buffer."""
        return cls(name="cpu", gpu_tflops=0.2, h2d_gbps=10.0, d2h_gbps=10.0, ssd_read_gbps=1.0,
                   ssd_write_gbps=1.0, ssd_both_gbps=1.0, cpu_adam_gparams=0.5, host_bytes=host_memory(), min_offload_bytes=0,
                   hbm_gbps=20.0, cpu_adam_kernel=cpu_adam_kernel)


def cache_dir() -> Path:
    """Where what was measured on this machine is kept (the hardware profile, unit times):
    ``$RATEL_CACHE_DIR``, else ``~/.cache/ratel``. Read at each call, so a test or a job can point it
    elsewhere."""
    return Path(os.environ.get("RATEL_CACHE_DIR", Path.home() / ".cache" / "ratel"))


def cpu_model() -> str:
    """The CPU's 'model name' from /proc/cpuinfo (what a measurement on this host is labelled with)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def host_memory() -> int:
    """Host memory available now (MemAvailable), or 16 GiB where the kernel does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 << 30
