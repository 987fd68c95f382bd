"""The CPU optimizer: AdamW per parameter group, run on a worker thread while backward goes on.

When a group's gradient is complete (after the backward of its lowest user unit) the runtime copies it to
pinned host memory and submits the group here with the copy's event. The worker waits for that copy,
updates the fp32 master and Adam states with the same arithmetic as ``torch.optim.AdamW``, and writes the
compute copy (bf16 for bf16 models) that the next forward streams to the GPU. ``wait(group)`` blocks until
a group's update is done: the next forward never reads a stale weight.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch

from ratel.ir import ParamGroup
from ratel.runtime.cpu_adam import adamw_step

log = logging.getLogger("ratel.runtime")


@dataclass
class AdamW:
    """AdamW hyper-parameters, as ``torch.optim.AdamW`` takes them (decoupled weight decay)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2

    def __post_init__(self):
        if not self.lr >= 0:
            raise ValueError(f"AdamW(lr={self.lr}): the learning rate must be >= 0")
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise ValueError(f"AdamW(betas={self.betas}): each beta must be in [0, 1)")
        if not self.eps >= 0:
            raise ValueError(f"AdamW(eps={self.eps}): eps must be >= 0")


def adamw_update(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 step: torch.Tensor, cfg: AdamW, out: torch.Tensor | None = None, num_threads: int | None = None) -> str:
    """One AdamW step on flat fp32 buffers (``step`` already incremented); ``out`` gets the rounded copy.

    Runs the native one-pass kernel where it was measured faster than torch's fused CPU AdamW, else torch's
    (``ratel.runtime.cpu_adam``); both give the same bits as ``torch.optim.AdamW(fused=True)``.
    """
    return adamw_step(master, grad, exp_avg, exp_avg_sq, int(step.item()), lr=cfg.lr, beta1=cfg.betas[0],
                      beta2=cfg.betas[1], eps=cfg.eps, weight_decay=cfg.weight_decay, out=out,
                      num_threads=num_threads)


class CPUOptimizer:
    """A worker thread applying AdamW to groups as their gradients land in host memory."""

    def __init__(self, store, cfg: AdamW, ssd=None):
        self.store = store
        self.ssd = ssd
        self.cfg = cfg
        self._queue: queue.Queue = queue.Queue()
        self._done = {g.index: threading.Event() for g in store.groups}
        for event in self._done.values():
            event.set()
        self._error: BaseException | None = None
        # OpenMP thread counts are per calling thread: take the training thread's, not the worker's default.
        self.threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._work, name="ratel-cpu-adamw", daemon=True)
        self._thread.start()

    def begin_step(self) -> None:
        """A forward starts: read the SSD-resident states of the first groups to be updated."""
        if self.ssd is not None:
            self._queue.put("begin")

    def submit(self, group: ParamGroup, copied, recorder=None, step: int = -1) -> None:
        """Update ``group`` once the event ``copied`` (its gradient's D2H copy) has completed."""
        self._raise_pending()
        self._done[group.index].clear()
        self._queue.put((group, copied, recorder, step))

    def wait(self, group_index: int) -> None:
        self._done[group_index].wait()
        self._raise_pending()

    def wait_all(self) -> None:
        for event in self._done.values():
            event.wait()
        self._raise_pending()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"the CPU optimizer failed ({type(error).__name__}): {error}") from error

    def _work(self) -> None:
        torch.set_num_threads(self.threads)
        while True:
            item = self._queue.get()
            if item is None:
                return
            if item == "begin":
                try:
                    self.ssd.begin_step()
                except BaseException as exc:  # noqa: BLE001 - surfaced on the training thread
                    self._error = exc
                continue
            group, copied, recorder, step = item
            try:
                if copied is not None:
                    copied.synchronize()
                start = time.perf_counter()
                self._update(group)
                if recorder is not None:
                    recorder.cpu_span("optimizer", f"adamw {group.name}", step, start, time.perf_counter(),
                                      group.numel * 4)
            except BaseException as exc:  # noqa: BLE001 - surfaced on the training thread
                self._error = exc
            finally:
                self._done[group.index].set()

    def _update(self, group: ParamGroup) -> None:
        s = self.store
        i = group.index
        out = s.compute.get(i) if group.dtype != torch.float32 else None
        slot = None
        if s.params_on_ssd(group):
            slot, out = s.ssd_params.write_buffer(group)
        if s.on_ssd(group):
            master, exp_avg, exp_avg_sq = self.ssd.acquire(group)
            master = s.master[i] if master is None else master
        else:
            master, exp_avg, exp_avg_sq = s.master[i], s.exp_avg[i], s.exp_avg_sq[i]
        s.steps[i] += 1
        adamw_update(master, s.grad_staging[i], exp_avg, exp_avg_sq, s.steps[i], self.cfg, out=out,
                     num_threads=self.threads)
        if s.on_ssd(group):
            self.ssd.release(group)
        if slot is not None:
            s.ssd_params.commit_write(group, slot)
