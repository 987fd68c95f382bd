"""SSD tier for optimizer states: one swap file per group, staged through a small ring of aligned buffers.

A group whose states live on SSD keeps ``[master | exp_avg | exp_avg_sq]`` (fp32; no master when the group
computes in fp32, whose master is its compute copy in host memory) in the swap file
``<ssd_dir>/<model key>/<group>.adam``. The name derives from the model's class and parameter shapes, so a
run of the same model reuses the same files, step after step; ``close`` removes them unless kept.

I/O is ordered by one sequencer thread that runs one request at a time (each is large enough to saturate
the device alone), reads before writes: the read the optimizer waits for never queues behind write-backs,
and a write-back is issued only when no read is waiting, so reads and writes never collide. A staging
buffer holding an updated group is written back before it is reused for another read.

The optimizer thread calls ``begin_step`` (read the first groups while the forward runs), ``acquire(g)``
(wait for g's states; views into its staging buffer), ``release(g)`` (queue the write-back, read the next
group). Every I/O error surfaces on the training thread as ``SwapIOError`` naming file and offset.
"""
from __future__ import annotations

import contextlib
import hashlib
import heapq
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ratel.errors import RatelError
from ratel.ir import ParamGroup, TransferKind
from ratel.ir.layout import SSD_PARAM_BUFFERS, SSD_STAGING_BUFFERS, ssd_state_bytes
from ratel.runtime.swapper import Swapper, aligned_empty


def model_key(model: nn.Module) -> str:
    """A stable folder name for a model's swap files: its class and the names and shapes of its parameters."""
    digest = hashlib.sha1()
    for name, p in model.named_parameters():
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return f"{type(model).__name__}-{digest.hexdigest()[:12]}"


def _file_name(key: str, group: ParamGroup) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in group.name)
    return f"{key}/{group.index:04d}-{safe}.adam"


@dataclass
class _Buffer:
    data: torch.Tensor
    group: int | None = None          # whose states it holds (or is reading / writing)
    ready: threading.Event = field(default_factory=threading.Event)   # the read into it is done
    clean: threading.Event = field(default_factory=threading.Event)   # no write-back pending
    error: BaseException | None = None


class SsdStates:
    def __init__(self, swapper: Swapper, groups: list[ParamGroup], key: str, order: tuple[int, ...]):
        self.swapper = swapper
        self.groups = {g.index: g for g in groups}
        # The Plan's order of ssd_read_states: the order updates run in (as gradients complete in backward,
        # or in forward order when updates wait for the whole gradient).
        self.order = list(order)
        if sorted(self.order) != sorted(self.groups):
            raise RatelError(f"the plan reads the SSD states of groups {self.order}, but {sorted(self.groups)} live "
                             "on SSD (plan bug)")
        self.files = {g.index: swapper.file(_file_name(key, g), ssd_state_bytes(g)) for g in groups}
        biggest = max(ssd_state_bytes(g) for g in groups)
        self.buffers = [_Buffer(aligned_empty(biggest)) for _ in range(min(SSD_STAGING_BUFFERS, len(groups)))]
        for b in self.buffers:
            b.clean.set()
        self._where: dict[int, _Buffer] = {}      # group -> buffer holding (or reading) its states
        self._next = 0                            # position in self.order of the next read to issue
        self._lock = threading.Condition()
        self._queue: list = []                    # (priority, seq, kind, buffer, group)
        self._seq = itertools.count()
        self._closed = False
        self.schedule = None      # the running program's executor: each read issued is reported to it
        self._thread = threading.Thread(target=self._sequence, name="ratel-ssd", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ layout
    def views(self, group: ParamGroup, data: torch.Tensor):
        """(master or None, exp_avg, exp_avg_sq) as fp32 views of a staging buffer."""
        n = group.numel
        flat = data[: ssd_state_bytes(group)].view(torch.float32)
        if group.dtype == torch.float32:
            return None, flat[:n], flat[n: 2 * n]
        return flat[:n], flat[n: 2 * n], flat[2 * n: 3 * n]

    # ------------------------------------------------------------------ initial values and read-out
    def initialize(self, group: ParamGroup, master: torch.Tensor | None) -> None:
        """Write a group's starting states: its master values (if kept on SSD) and zero moments."""
        with self.staged(group) as (m_master, m, v):
            if m_master is not None:
                m_master.copy_(master)
            m.zero_()
            v.zero_()

    @contextlib.contextmanager
    def staged(self, group: ParamGroup):
        """Outside a step: (master or None, exp_avg, exp_avg_sq) views of a staging buffer to fill; written
        to the group's swap file when the block ends."""
        buf = self._free_buffer_sync()
        yield self.views(group, buf.data)
        self.swapper.write(self.files[group.index], 0, buf.data[: ssd_state_bytes(group)]).wait()

    def read_group(self, group: ParamGroup):
        """Outside a step: the group's current (master or None, exp_avg, exp_avg_sq), as views of a staging
        buffer valid until the next call (waits for pending write-backs)."""
        buf = self._free_buffer_sync()
        self.swapper.read(self.files[group.index], 0, buf.data[: ssd_state_bytes(group)]).wait()
        return self.views(group, buf.data)

    def read_master(self, group: ParamGroup) -> torch.Tensor:
        """The current fp32 master of a group whose master lives on SSD (waits for pending write-backs)."""
        return self.read_group(group)[0].clone()

    def _free_buffer_sync(self) -> _Buffer:
        self.flush()
        with self._lock:
            busy = set(map(id, self._where.values()))
            for b in self.buffers:
                if id(b) not in busy:
                    return b
        raise RuntimeError("no free SSD staging buffer outside a step (internal error)")

    # ------------------------------------------------------------------ the step
    def begin_step(self) -> None:
        """Start reading the first groups to be updated (while the forward and early backward run)."""
        self.abandon_step()
        with self._lock:
            self._next = 0
        for _ in range(len(self.buffers) - 1 if len(self.buffers) > 1 else 1):
            self._read_next()

    def abandon_step(self) -> None:
        """Drop the states read ahead for updates that will not run (a skipped step): nothing changed them,
        so nothing is written back."""
        with self._lock:
            held = list(self._where.values())
            self._where.clear()
        for buf in held:
            buf.ready.wait()
            buf.error = None

    def acquire(self, group: ParamGroup):
        """Wait until the group's states are in a staging buffer; returns (master or None, exp_avg, exp_avg_sq)."""
        with self._lock:
            if group.index not in self._where:      # not prefetched (out of order): read it now
                self._next = self.order.index(group.index)
        if group.index not in self._where:
            self._read_next()
        buf = self._where.get(group.index)
        if buf is None:
            raise RuntimeError(f"no SSD staging buffer free for {group.name}: every buffer holds a group not yet "
                               "updated (internal error)")
        buf.ready.wait()
        if buf.error is not None:
            error, buf.error = buf.error, None
            raise error
        return self.views(group, buf.data)

    def release(self, group: ParamGroup) -> None:
        """The update is done: write the states back (after waiting reads) and read the next group."""
        buf = self._where.pop(group.index)
        buf.clean.clear()
        self._submit(1, "write", buf, group.index)
        self._read_next()

    def _read_next(self) -> None:
        with self._lock:
            if self._next >= len(self.order):
                return
            index = self.order[self._next]
            self._next += 1
            held = set(map(id, self._where.values()))
            candidates = [b for b in self.buffers if id(b) not in held]
            # Prefer a buffer with no write-back pending; else the sequencer writes it back first.
            buf = next((b for b in candidates if b.clean.is_set()), candidates[0] if candidates else None)
            if buf is None:
                self._next -= 1
                return
            buf.ready.clear()
            self._where[index] = buf
        if self.schedule is not None:
            self.schedule.report(TransferKind.SSD_READ_STATES, group=index)
        self._submit(0, "read", buf, index)

    # ------------------------------------------------------------------ the sequencer
    def _submit(self, priority: int, kind: str, buf: _Buffer, group: int) -> None:
        with self._lock:
            heapq.heappush(self._queue, (priority, next(self._seq), kind, buf, group))
            self._lock.notify()

    def _sequence(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if not self._queue:
                    return
                priority, seq, kind, buf, group = heapq.heappop(self._queue)
                if kind == "read" and not buf.clean.is_set():
                    # The buffer still holds another group's update: write that back first.
                    pending = next(e for e in self._queue if e[2] == "write" and e[3] is buf)
                    self._queue.remove(pending)
                    heapq.heapify(self._queue)
                    heapq.heappush(self._queue, (priority, seq, kind, buf, group))
                    priority, seq, kind, buf, group = pending
            g = self.groups[group]
            span = buf.data[: ssd_state_bytes(g)]
            try:
                if kind == "read":
                    self.swapper.read(self.files[group], 0, span).wait()
                else:
                    self.swapper.write(self.files[group], 0, span).wait()
            except BaseException as exc:  # noqa: BLE001 - delivered to whoever waits on this buffer
                buf.error = exc
            finally:
                (buf.ready if kind == "read" else buf.clean).set()

    def flush(self) -> None:
        """Wait until every write-back is done; raise the first I/O error."""
        for b in self.buffers:
            b.clean.wait()
            if b.error is not None:
                error, b.error = b.error, None
                raise error

    def close(self) -> None:
        try:
            self.flush()
        finally:
            with self._lock:
                self._closed = True
                self._lock.notify()
            self._thread.join()


class SsdParams:
    """Parameter compute copies on SSD: each group in a swap file, read into a ring of pinned buffers ahead
    of its fetch to the GPU, and written back from the ring after its optimizer update.

    A buffer keeps the last data it read or wrote, so a group fetched again soon (the last unit's forward
    and backward) or just updated is not read again. A buffer is reused only once the copy to the GPU or the
    write that uses it is done, and never while a fetch still needs its data.
    """

    def __init__(self, swapper, groups: list[ParamGroup], key: str, pool):
        self.swapper = swapper
        self.groups = {g.index: g for g in groups}
        self.files = {g.index: swapper.file(_file_name(key, g).replace(".adam", ".param"), g.nbytes) for g in groups}
        size = max(g.nbytes for g in groups)
        self.buffers = [pool.take(size) for _ in range(SSD_PARAM_BUFFERS)]
        self.holds: list[int | None] = [None] * len(self.buffers)   # whose current data a buffer has
        self.pending: list[Any] = [None] * len(self.buffers)        # read / write handle or copy event
        self.needed: list[bool] = [False] * len(self.buffers)      # a fetch is waiting for this data
        self._lock = threading.Lock()

    def _view(self, i: int, group: ParamGroup) -> torch.Tensor:
        return self.buffers[i][: group.nbytes].view(group.dtype)

    @staticmethod
    def _settle(pending) -> None:
        if pending is None:
            return
        if hasattr(pending, "synchronize"):
            pending.synchronize()
        else:
            pending.wait()

    def _claim(self) -> int:
        """A buffer no fetch needs, waiting for whatever still uses it; it then holds nothing."""
        with self._lock:
            free = [i for i in range(len(self.buffers)) if not self.needed[i]]
            if not free:
                raise RuntimeError(f"every SSD parameter buffer is awaiting a fetch (plan bug): holds {self.holds}, "
                                   f"needed {self.needed}")
            # Prefer a buffer holding nothing, then one whose data is oldest in the ring order.
            i = next((j for j in free if self.holds[j] is None), free[0])
            pending, self.pending[i] = self.pending[i], None
            self.holds[i] = None
            self.needed[i] = True      # reserved while we wait
        self._settle(pending)
        return i

    def _holding(self, index: int) -> int | None:
        for i, holder in enumerate(self.holds):
            if holder == index:
                return i
        return None

    def read_ahead(self, group: ParamGroup) -> None:
        with self._lock:
            i = self._holding(group.index)
            if i is not None:
                self.needed[i] = True
                return
        i = self._claim()
        handle = self.swapper.read(self.files[group.index], 0, self.buffers[i][: group.nbytes])
        with self._lock:
            self.holds[i] = group.index
            self.pending[i] = handle

    def acquire(self, group: ParamGroup) -> torch.Tensor:
        """The group's compute copy in a pinned buffer (read now if it was not read ahead)."""
        with self._lock:
            i = self._holding(group.index)
            if i is not None:
                self.needed[i] = True
        if i is None:
            self.read_ahead(group)
            with self._lock:
                i = self._holding(group.index)
        pending = self.pending[i]
        if pending is not None and not hasattr(pending, "synchronize"):
            pending.wait()             # a read (or a write: then the data is already there) must be done
        return self._view(i, group)

    def release(self, group: ParamGroup, copied) -> None:
        """The copy to the GPU is issued: the buffer may be reused once ``copied`` (an event) completes."""
        with self._lock:
            i = self._holding(group.index)
            self.needed[i] = False
            if copied is not None:
                self.pending[i] = copied

    def write_buffer(self, group: ParamGroup) -> tuple[int, torch.Tensor]:
        """A buffer for the group's new compute copy (older copies of it in the ring are dropped)."""
        with self._lock:
            for j, holder in enumerate(self.holds):
                if holder == group.index and not self.needed[j]:
                    self.holds[j] = None
        i = self._claim()
        return i, self._view(i, group)

    def commit_write(self, group: ParamGroup, i: int) -> None:
        handle = self.swapper.write(self.files[group.index], 0, self.buffers[i][: group.nbytes])
        with self._lock:
            self.holds[i] = group.index
            self.pending[i] = handle
            self.needed[i] = False

    def initialize(self, group: ParamGroup, values: torch.Tensor) -> None:
        i, view = self.write_buffer(group)
        view.copy_(values)
        self.commit_write(group, i)
        self._settle(self.pending[i])

    def flush(self) -> None:
        for i in range(len(self.buffers)):
            pending = self.pending[i]
            if pending is not None and not hasattr(pending, "synchronize"):
                pending.wait()
