"""Recorder: what a real step did, lane by lane, to set beside the plan (``engine.profile = True``).

GPU work is timed with CUDA events recorded on the stream that does it (compute, H2D, D2H), so recording
adds no synchronisation until the step ends; CPU work (the optimizer worker, copies on a CPU-only run) with
``time.perf_counter``. The GPU memory peak of each timeline step is read from the caching allocator when
the next step begins: allocations are accounted when they are enqueued, so host-side order attributes them
correctly. ``finish()`` synchronises once and returns a ``StepRecord``.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import torch

from ratel.ir import Span, StepRecord


class Recorder:
    def __init__(self, device: torch.device, num_steps: int):
        self.cuda = device.type == "cuda"
        self.device = device
        self.num_steps = num_steps
        self._lock = threading.Lock()
        self._gpu: list[tuple[str, str, int, int, object, object]] = []
        self._cpu: list[Span] = []
        self._peaks = [0] * num_steps
        self._current = -1
        self.t0 = time.perf_counter()
        self._base = None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
            self._base = torch.cuda.Event(enable_timing=True)
            self._base.record(torch.cuda.current_stream(device))

    # ------------------------------------------------------------------ steps and memory
    def enter_step(self, step: int) -> None:
        """Close the memory window of the current timeline step and open ``step``'s."""
        if step == self._current:
            return
        self._close_window()
        self._current = step

    def _close_window(self) -> None:
        if self.cuda and 0 <= self._current < self.num_steps:
            peak = torch.cuda.max_memory_allocated(self.device)
            self._peaks[self._current] = max(self._peaks[self._current], peak)
            torch.cuda.reset_peak_memory_stats(self.device)

    # ------------------------------------------------------------------ spans
    @contextmanager
    def span(self, lane: str, label: str, step: int, stream=None, nbytes: int = 0):
        """Time the work issued inside the block on ``stream`` (the current stream by default)."""
        if self.cuda:
            stream = stream or torch.cuda.current_stream(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            try:
                yield
            finally:
                end.record(stream)
                with self._lock:
                    self._gpu.append((lane, label, step, nbytes, start, end))
        else:
            start = time.perf_counter()
            try:
                yield
            finally:
                self.cpu_span(lane, label, step, start, time.perf_counter(), nbytes)

    def cpu_span(self, lane: str, label: str, step: int, start: float, end: float, nbytes: int = 0) -> None:
        """A span measured with ``time.perf_counter`` (any thread)."""
        with self._lock:
            self._cpu.append(Span(lane, label, start - self.t0, end - self.t0, step, nbytes))

    # ------------------------------------------------------------------ result
    def finish(self) -> StepRecord:
        wall = time.perf_counter() - self.t0
        self._close_window()
        spans = list(self._cpu)
        if self.cuda:
            torch.cuda.synchronize(self.device)
            for lane, label, step, nbytes, start, end in self._gpu:
                spans.append(Span(lane, label, self._base.elapsed_time(start) / 1e3,
                                  self._base.elapsed_time(end) / 1e3, step, nbytes))
        spans.sort(key=lambda s: (s.start, s.lane, s.label))
        return StepRecord(spans=tuple(spans), gpu_peak_by_step=tuple(self._peaks), gpu_peak=max(self._peaks, default=0),
                          wall=wall)
