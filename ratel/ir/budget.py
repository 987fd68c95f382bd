"""Budget: the memory Ratel may use on each tier, as the user gives it ("24GiB", bytes, a Budget)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ratel.ir.hardware import HardwareProfile

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(value: int | float | str | None, what: str = "budget") -> int | None:
    """Bytes from an int or a string such as "24GiB", "512 MiB", "1.5e9", "80GB"."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"{what}={value!r}: must be a positive number of bytes, e.g. 24GiB")
        return int(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if match and match.group(2).lower() in _UNITS:
            result = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
            if result > 0:
                return result
    raise ValueError(f"{what}={value!r}: give bytes as an int or a string such as '24GiB', '512MiB' or '80GB'")


@dataclass(frozen=True)
class Budget:
    """Memory Ratel may use on each tier. ``gpu`` is required; the others default to what the machine has."""

    gpu: int | str
    host: int | str | None = None
    ssd: int | str | None = None
    ssd_dir: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "gpu", parse_bytes(self.gpu, "Budget.gpu"))
        object.__setattr__(self, "host", parse_bytes(self.host, "Budget.host"))
        object.__setattr__(self, "ssd", parse_bytes(self.ssd, "Budget.ssd"))

    def resolved(self, hardware: HardwareProfile) -> "Budget":
        host = self.host if self.host is not None else int(hardware.host_bytes * 0.9)
        return Budget(gpu=self.gpu, host=host, ssd=self.ssd, ssd_dir=self.ssd_dir)


def ssd_dirs(ssd_dir) -> list[str]:
    """``Budget.ssd_dir`` as a list of directories: one path, a list, or a comma-separated string (one per SSD;
    swap files are striped across them)."""
    if isinstance(ssd_dir, (list, tuple)):
        return [str(d) for d in ssd_dir]
    return [d for d in str(ssd_dir).split(",") if d]
