"""ActivationStore: unit-boundary activations between their forward production and their backward use.

A value the plan keeps on the GPU is held by reference. A value checkpointed to host is copied on the D2H
lane into a pinned buffer of its own (taken once from the pool and reused every step, since the plan fixes
every size), then fetched back on the H2D lane one step before the backward that reads it. Copies keep the
value's strides, so the recomputed forward sees exactly what the forward saw.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ratel.ir.layout import span_bytes, span_elems
from ratel.runtime.memory import Lanes, PinnedPool


@dataclass
class _HostCopy:
    host: torch.Tensor          # flat pinned bytes
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    saved: Any                  # event: the D2H copy is done


class ActivationStore:
    def __init__(self, lanes: Lanes, pool: PinnedPool | None, device: torch.device):
        self.lanes = lanes
        self.pool = pool
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}
        self._host: dict[str, _HostCopy] = {}
        self._kept: dict[str, Any] = {}
        self._fetched: dict[str, tuple[torch.Tensor, Any]] = {}
        self.recorder = None     # set by the runtime while a step is profiled
        self.step = -1

    def keep(self, name: str, value) -> None:
        self._kept[name] = value

    def offload(self, name: str, value: torch.Tensor) -> None:
        nbytes = span_bytes(value)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self.pool.take(nbytes) if self.pool is not None else torch.empty(nbytes, dtype=torch.uint8)
            self._buffers[name] = buffer
        host = buffer[:nbytes]
        src = value.as_strided((span_elems(value),), (1,), value.storage_offset()).view(torch.uint8) \
            if value.numel() else value.reshape(-1).view(torch.uint8)
        saved = self.lanes.copy(host, src, self.lanes.d2h, after=self.lanes.event(),
                                span=(self.recorder, "d2h", f"activation {name}", self.step))
        self._host[name] = _HostCopy(host, tuple(value.shape), tuple(value.stride()), value.dtype, saved)

    def fetch(self, name: str) -> None:
        """Start copying a checkpointed value back to the device (H2D lane)."""
        if name in self._fetched or name in self._kept:
            return
        copy = self._host[name]
        flat = self.lanes.landing(copy.host.numel())
        ready = self.lanes.copy(flat, copy.host, self.lanes.h2d, after=copy.saved,
                                span=(self.recorder, "h2d", f"activation {name}", self.step))
        elems = copy.host.numel() // copy.dtype.itemsize
        value = flat.view(copy.dtype)[:elems].as_strided(copy.shape, copy.stride)
        self._fetched[name] = (value, ready)

    def get(self, name: str):
        if name in self._kept:
            return self._kept[name]
        if name not in self._fetched:
            self.fetch(name)
        value, ready = self._fetched[name]
        self.lanes.wait_compute(ready)
        return value

    def release(self, name: str) -> None:
        self._kept.pop(name, None)
        self._fetched.pop(name, None)

    def clear(self) -> None:
        """Forget this step's values (host buffers stay, to be reused)."""
        self._kept.clear()
        self._fetched.clear()
        self._host.clear()
