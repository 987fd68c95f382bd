"""The SSD lane: every SSD read and write of a run — optimizer states, parameter compute copies and saved
activations — goes through one queue, each through a slot of a staging ring of pinned buffers.

The disk is one lane of the Plan (``TransferKind.lane == "ssd"``), with two channels: one thread issues the
reads, one the writes, each one request at a time in the order submitted, which is the Plan's (the schedule
executor and the owners of the dynamic kinds submit as the Plan orders them). Reads and writes run side by
side because the disk moves more with both (measured on the H200 machine's disk, ``benchmarks/ssd_lane.py``)
and because a read — what someone is about to wait for — must never queue behind a write-back, which only
has to finish before its slot is reused. A request runs once what it depends on is done: the last I/O on its
slot (a read never overwrites a write-back still in flight), the GPU copy that last read the slot (a CUDA
event, polled: a channel never sits on one while another of its requests is ready), and for a read the last
write to the same place of the same file, from whichever slot (a read never returns what is still being
written). Each request is large enough to keep its direction busy alone.

A ``Slot`` is one staging buffer and what it holds; a ``StagingRing`` hands out slots, preferring one that holds
nothing, then one whose I/O is done, then the one used longest ago. The three SSD tiers
(``runtime/ssd.py``: states, parameters; ``runtime/saved.py``: saved activations) are rings on this lane.

Errors: a failed request keeps its ``SwapIOError``; the first to wait on it (the reader, the next user of its
slot, ``flush``) raises it on their own thread.

Profiling: while a step is recorded (``engine.profile``), the program's runtime sets ``recorder`` and ``step``;
each request then becomes a span of lane ``ssd_read`` or ``ssd_write`` from the moment its channel issues it
to its end, attributed to the timeline step that submitted it (a request submitted before the recording began,
such as the last step's write-backs, counts under no step).
"""
from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

POLL_SECONDS = 0.0002     # how often the lane looks again when every queued request waits on a GPU copy


def _wait_all(waits) -> None:
    """Call every wait; then raise the first error (each is settled before any error leaves)."""
    first = None
    for wait in waits:
        try:
            wait()
        except BaseException as exc:  # noqa: BLE001 - raised once all are settled
            first = first or exc
    if first is not None:
        raise first


def _settled(dependency) -> bool:
    if dependency is None:
        return True
    if isinstance(dependency, Request):
        return dependency.done.is_set()
    return dependency.query()       # a CUDA event


class Request:
    """One read or write of ``spans`` (file offset, host tensor) of one swap file."""

    __slots__ = ("op", "file", "spans", "after", "done", "error", "_reported", "recorder", "step")

    def __init__(self, op: str, file, spans, after, recorder=None, step: int = -1):
        self.op = op
        self.file = file
        self.spans = tuple(spans)
        self.after = tuple(d for d in after if d is not None)
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._reported = False
        self.recorder = recorder      # the profiled step's Recorder when it was submitted, and its timeline step
        self.step = step

    @property
    def nbytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for _, tensor in self.spans)

    def ready(self) -> bool:
        return all(_settled(d) for d in self.after)

    def wait(self) -> None:
        """Wait until done; raise its I/O error (once: a later wait on the same request returns)."""
        self.done.wait()
        if self.error is not None and not self._reported:
            self._reported = True
            raise self.error

    def __repr__(self) -> str:
        return f"Request({self.op} {self.file.name}, {len(self.spans)} spans, done={self.done.is_set()})"


class SsdLane:
    """The SSD tier's executor (see the module docstring)."""

    def __init__(self, swapper):
        self.swapper = swapper
        self._queue: list[tuple[int, Request]] = []       # (order submitted, request)
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._writes: list[Request] = []      # write-backs nobody else may wait on: flush checks them
        self.issued = collections.deque(maxlen=4096)   # (op, file name) in the order each channel began them
        # (file name, first offset) -> the last write there. A read of the same place waits for it: a slot's
        # ring orders a read only after that slot's last I/O, and a piece read into another slot than the one
        # it was written from could otherwise pass its write-back (after a skipped step, or a parameter
        # copy's slot handed to another group).
        self._last_write: dict = {}
        self.recorder = None          # set by the runtime while a step is profiled (module docstring)
        self.step = -1
        self._threads = [threading.Thread(target=self._run, args=(op,), name=f"ratel-ssd-{op}", daemon=True)
                         for op in ("read", "write")]
        for thread in self._threads:
            thread.start()

    def file(self, name: str, nbytes: int):
        return self.swapper.file(name, nbytes)

    def read(self, file, spans, after=()) -> Request:
        return self._submit("read", file, spans, after)

    def write(self, file, spans, after=()) -> Request:
        request = self._submit("write", file, spans, after)
        with self._cond:
            self._writes = [w for w in self._writes if not w.done.is_set() or w.error is not None] + [request]
        return request

    def _submit(self, op: str, file, spans, after) -> Request:
        spans = tuple(spans)
        place = (file.name, spans[0][0]) if spans else None
        with self._cond:
            if self._closed:
                raise RuntimeError("the SSD lane is closed")
            if op == "read":
                after = (*after, self._last_write.get(place))
            request = Request(op, file, spans, after, self.recorder, self.step)
            if op == "write":
                self._last_write[place] = request
            self._queue.append((next(self._seq), request))
            self._cond.notify_all()
        return request

    def _take(self, op: str) -> Request | None:
        """The channel's next request: the first submitted of its direction whose dependencies are done."""
        with self._cond:
            while True:
                mine = [entry for entry in self._queue if entry[1].op == op]
                ready = next((entry for entry in mine if entry[1].ready()), None)
                if ready is not None:
                    self._queue.remove(ready)
                    self.issued.append((op, ready[1].file.name))
                    return ready[1]
                if self._closed and not mine:
                    return None
                self._cond.wait(POLL_SECONDS if mine else None)

    def _run(self, op: str) -> None:
        issue = self.swapper.read if op == "read" else self.swapper.write
        while (request := self._take(op)) is not None:
            start = time.perf_counter()
            try:
                for handle in [issue(request.file, offset, tensor) for offset, tensor in request.spans]:
                    handle.wait()
            except BaseException as exc:  # noqa: BLE001 - raised on the thread that waits for the request
                request.error = exc
            finally:
                self._record(request, start, time.perf_counter())
                request.done.set()
                with self._cond:
                    self._cond.notify_all()      # the other channel may have a request waiting on this one

    def _record(self, request: Request, start: float, end: float) -> None:
        recorder = self.recorder
        if recorder is None:
            return
        step = request.step if request.recorder is recorder else -1
        recorder.cpu_span(f"ssd_{request.op}", f"{request.op} {request.file.name}", step,
                          max(start, recorder.t0), end, request.nbytes)

    def flush(self) -> None:
        """Wait for every write-back submitted so far; raise the first error nobody has seen."""
        with self._cond:
            writes, self._writes = self._writes, []
        _wait_all(request.wait for request in writes)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
        self.flush()


@dataclass(eq=False)
class Slot:
    """One staging buffer: whose data it holds, the last I/O on it, the last GPU copy that read it."""

    data: torch.Tensor
    holds: Any = None                   # key of the data it holds (None: nothing anyone will reuse)
    io: Request | None = None
    read_out: Any = None                # CUDA event of its last copy to the GPU
    in_use: bool = False                # someone reads or fills it now: not to be handed out
    last_claim: int = field(default=-1)

    def dependencies(self) -> tuple:
        """What an I/O into this slot must wait for."""
        return (self.io, self.read_out)

    def settle(self) -> None:
        """Wait (on this thread) until nothing reads or writes the buffer; raise a failed I/O's error."""
        if self.read_out is not None:
            self.read_out.synchronize()
            self.read_out = None
        if self.io is not None:
            self.io.wait()

    def load(self, lane: SsdLane, file, spans) -> Request:
        """Read into this slot once its previous I/O and GPU copy are done."""
        self.io = lane.read(file, spans, after=self.dependencies())
        self.read_out = None      # the read waits for it
        return self.io


class StagingRing:
    """Slots handed out by ``claim`` (see the module docstring for the preference)."""

    def __init__(self, buffers):
        self.slots = [Slot(b) for b in buffers]
        self._claims = itertools.count()
        self.lock = threading.Lock()

    def holding(self, key) -> Slot | None:
        return next((s for s in self.slots if s.holds == key), None)

    def claim(self, key) -> Slot:
        """A slot not in use, now reserved for ``key`` (it holds nothing else any more)."""
        with self.lock:
            free = [s for s in self.slots if not s.in_use]
            if not free:
                raise RuntimeError(f"every SSD staging slot is in use ({[s.holds for s in self.slots]}): plan bug")
            slot = min(free, key=lambda s: (s.holds is not None, s.io is not None and not s.io.done.is_set(),
                                            s.last_claim))
            slot.holds, slot.in_use, slot.last_claim = key, True, next(self._claims)
            return slot

    def settle(self) -> None:
        """Wait for every slot's I/O; raise the first error nobody has seen."""
        _wait_all(slot.settle for slot in self.slots)
