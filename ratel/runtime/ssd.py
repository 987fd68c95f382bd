"""SSD tier for optimizer states and parameter compute copies, on the SSD lane (``runtime/ssd_lane.py``).

A group whose states live on SSD keeps ``[master | exp_avg | exp_avg_sq]`` (fp32; no master when the group
computes in fp32, whose master is its compute copy in host memory) in the swap file
``<ssd_dir>/<model key>/<group>.adam``; a group whose compute copy lives on SSD keeps it in ``<group>.param``.
The name derives from the model's class and parameter shapes, so a run of the same model reuses the same
files, step after step; ``close`` removes them unless kept.

States move in pieces of a group (``ir/layout.ssd_state_pieces``): the optimizer thread calls ``begin_step``
(read the first pieces while the forward runs), ``acquire(g, piece)`` (wait for the piece's states; views into
its staging slot), ``release(g, piece)`` (queue the write-back, read the next piece in the Plan's order).
Every I/O error surfaces on the waiting thread as ``SwapIOError`` naming file and offset.
"""
from __future__ import annotations

import contextlib
import hashlib

import torch
from torch import nn

from ratel.errors import RatelError
from ratel.ir import ParamGroup, TransferKind
from ratel.ir.layout import (SSD_PARAM_BUFFERS, ssd_piece_bytes, ssd_staging_bytes, ssd_staging_slots,
                             ssd_state_bytes, ssd_state_pieces)
from ratel.runtime.ssd_lane import SsdLane, StagingRing
from ratel.runtime.swapper import aligned_empty


def model_key(model: nn.Module) -> str:
    """A stable folder name for a model's swap files: its class and the names and shapes of its parameters."""
    digest = hashlib.sha1()
    for name, p in model.named_parameters():
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return f"{type(model).__name__}-{digest.hexdigest()[:12]}"


def _file_name(key: str, group: ParamGroup, suffix: str) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in group.name)
    return f"{key}/{group.index:04d}-{safe}.{suffix}"


class SsdStates:
    """A group's states move in pieces (``ssd_state_pieces``): the staging ring holds a few pieces, read ahead
    in the order updates run and written back as each piece's update is done."""

    def __init__(self, lane: SsdLane, groups: list[ParamGroup], key: str, order: tuple[int, ...]):
        self.lane = lane
        self.groups = {g.index: g for g in groups}
        # The Plan's order of ssd_read_states: the order updates run in (as gradients complete in backward,
        # or in forward order when updates wait for the whole gradient).
        if sorted(order) != sorted(self.groups):
            raise RatelError(f"the plan reads the SSD states of groups {list(order)}, but {sorted(self.groups)} "
                             "live on SSD (plan bug)")
        self.pieces = {g.index: ssd_state_pieces(g) for g in groups}
        self.order = [(g, p) for g in order for p in range(len(self.pieces[g]))]
        self.files = {g.index: lane.file(_file_name(key, g, "adam"), ssd_state_bytes(g)) for g in groups}
        biggest = max(ssd_staging_bytes(g) for g in groups)
        self.ring = StagingRing([aligned_empty(biggest) for _ in range(ssd_staging_slots(groups))])
        self._read: dict = {}         # (group, piece) -> slot holding (or reading) it for this step's update
        self._next = 0                # position in self.order of the next read to issue
        self.schedule = None          # the running program's executor: each read issued is reported to it

    @property
    def buffers(self) -> list[torch.Tensor]:
        return [slot.data for slot in self.ring.slots]

    def piece_ranges(self, group: ParamGroup) -> list[tuple[int, int]]:
        """The element ranges [start, end) of the group's pieces, in order."""
        return [(start, end) for start, end, _ in self.pieces[group.index]]

    def _span(self, group: ParamGroup, piece: int, data: torch.Tensor) -> list:
        start, end, offset = self.pieces[group.index][piece]
        return [(offset, data[: ssd_piece_bytes(group, end - start)])]

    # ------------------------------------------------------------------ layout
    @staticmethod
    def views(group: ParamGroup, numel: int, data: torch.Tensor):
        """(master or None, exp_avg, exp_avg_sq) of ``numel`` elements, as fp32 views of ``data``."""
        flat = data[: ssd_piece_bytes(group, numel)].view(torch.float32)
        if group.dtype == torch.float32:
            return None, flat[:numel], flat[numel: 2 * numel]
        return flat[:numel], flat[numel: 2 * numel], flat[2 * numel: 3 * numel]

    # ------------------------------------------------------------------ initial values and read-out
    def initialize(self, group: ParamGroup, master: torch.Tensor | None) -> None:
        """Write a group's starting states: its master values (if kept on SSD) and zero moments."""
        def fill(start, end, m_master, m, v):
            if m_master is not None:
                m_master.copy_(master[start:end])
            m.zero_()
            v.zero_()
        self._write_pieces(group, fill)

    @contextlib.contextmanager
    def staged(self, group: ParamGroup):
        """Outside a step: (master or None, exp_avg, exp_avg_sq) of the whole group to fill (a host buffer the
        size of the group's states), written to its swap file piece by piece when the block ends."""
        whole = torch.empty(ssd_piece_bytes(group, group.numel), dtype=torch.uint8)
        states = self.views(group, group.numel, whole)
        yield states

        def fill(start, end, *piece_states):
            for into, value in zip(piece_states, states):
                if into is not None:
                    into.copy_(value[start:end])
        self._write_pieces(group, fill)

    def _write_pieces(self, group: ParamGroup, fill) -> None:
        """Outside a step: ``fill(start, end, master or None, exp_avg, exp_avg_sq)`` each piece's views of a
        staging slot, and write them to the group's swap file, a ring of writes in flight (the next piece
        fills while the disk writes the last ones); returns once all are written."""
        self._settle_outside_step()
        for piece, (start, end) in enumerate(self.piece_ranges(group)):
            slot = self.ring.claim((group.index, piece))
            try:
                slot.settle()
                fill(start, end, *self.views(group, end - start, slot.data))
                slot.io = self.lane.write(self.files[group.index], self._span(group, piece, slot.data))
            finally:
                # States are never found again by key, so a slot keeps no claim on them. One left "holding"
                # ranks last in every claim: the ring then worked a slot short, each read waiting for the
                # write-back before it (found in a profiled step: the SSD idle between them).
                slot.in_use, slot.holds = False, None
        self.flush()

    def read_group(self, group: ParamGroup):
        """Outside a step: the group's current (master or None, exp_avg, exp_avg_sq), read piece by piece into
        a host buffer the size of the group's states (waits for pending write-backs)."""
        whole = torch.empty(ssd_piece_bytes(group, group.numel), dtype=torch.uint8)
        out = self.views(group, group.numel, whole)
        for piece, (start, end) in enumerate(self.piece_ranges(group)):
            slot = self._outside_step(group, piece)
            try:
                slot.load(self.lane, self.files[group.index], self._span(group, piece, slot.data)).wait()
                for into, value in zip(out, self.views(group, end - start, slot.data)):
                    if into is not None:
                        into[start:end].copy_(value)
            finally:
                slot.in_use, slot.holds = False, None
        return out

    def read_master(self, group: ParamGroup) -> torch.Tensor:
        """The current fp32 master of a group whose master lives on SSD (waits for pending write-backs)."""
        return self.read_group(group)[0]

    def _settle_outside_step(self) -> None:
        self.flush()
        if self._read:
            raise RuntimeError("SSD states moved outside a step while a step holds staging slots (internal error)")

    def _outside_step(self, group: ParamGroup, piece: int):
        self._settle_outside_step()
        slot = self.ring.claim((group.index, piece))
        slot.settle()
        return slot

    # ------------------------------------------------------------------ the step
    def begin_step(self) -> None:
        """Start reading the first pieces to be updated (while the forward and early backward run)."""
        self.abandon_step()
        self._next = 0
        for _ in range(max(len(self.ring.slots) - 1, 1)):
            self._read_next()

    def abandon_step(self) -> None:
        """Drop the states read ahead for updates that will not run (a skipped step): nothing changed them,
        so nothing is written back."""
        held, self._read = list(self._read.values()), {}
        for slot in held:
            slot.io.done.wait()      # an error of a read nobody uses is not an error of the run
            slot.in_use, slot.holds = False, None

    def acquire(self, group: ParamGroup, piece: int):
        """Wait until the piece's states are in a staging slot; returns (master or None, exp_avg, exp_avg_sq)
        of its elements."""
        key = (group.index, piece)
        if key not in self._read:      # not prefetched (out of order): read it now
            self._next = self.order.index(key)
            self._read_next()
        slot = self._read.get(key)
        if slot is None:
            raise RuntimeError(f"no SSD staging slot free for {group.name} piece {piece}: every slot holds a "
                               "piece not yet updated (internal error)")
        slot.io.wait()
        start, end = self.piece_ranges(group)[piece]
        return self.views(group, end - start, slot.data)

    def ready(self, group: ParamGroup, piece: int) -> bool:
        """Whether the piece's states are read (``acquire`` would not wait)."""
        slot = self._read.get((group.index, piece))
        return slot is not None and slot.io.done.is_set()

    def release(self, group: ParamGroup, piece: int) -> None:
        """The piece's update is done: queue its write-back (reads go first) and read the next piece."""
        slot = self._read.pop((group.index, piece))
        slot.io = self.lane.write(self.files[group.index], self._span(group, piece, slot.data))
        slot.in_use, slot.holds = False, None
        self._read_next()

    def _read_next(self) -> None:
        if self._next >= len(self.order) or len(self._read) >= len(self.ring.slots):
            return
        index, piece = self.order[self._next]
        self._next += 1
        slot = self.ring.claim((index, piece))
        self._read[(index, piece)] = slot
        if self.schedule is not None and piece == 0:
            self.schedule.report(TransferKind.SSD_READ_STATES, group=index)
        slot.load(self.lane, self.files[index], self._span(self.groups[index], piece, slot.data))

    def flush(self) -> None:
        """Wait until every write-back is done; raise the first I/O error."""
        for slot in self.ring.slots:
            if slot.io is not None and slot.io.op == "write":
                slot.io.wait()

    def close(self) -> None:
        self.flush()


class SsdParams:
    """Parameter compute copies on SSD: each group in a swap file, read into a staging ring ahead of its fetch to
    the GPU, and written back from the ring after its optimizer update.

    A slot keeps the last data it read or wrote, so a group fetched again soon (the last unit's forward and
    backward) or just updated is not read again. A slot is reused only once the GPU copy or the write that
    uses it is done (the lane orders the read after them), and never while a fetch still needs its data.
    The training thread reads and fetches; the optimizer thread fills slots with updated copies.
    """

    def __init__(self, lane: SsdLane, groups: list[ParamGroup], key: str, pool):
        self.lane = lane
        self.groups = {g.index: g for g in groups}
        self.files = {g.index: lane.file(_file_name(key, g, "param"), g.nbytes) for g in groups}
        size = max(g.nbytes for g in groups)
        self.ring = StagingRing([pool.take(size) for _ in range(SSD_PARAM_BUFFERS)])

    def _span(self, group: ParamGroup, slot) -> list:
        return [(0, slot.data[: group.nbytes])]

    def _view(self, slot, group: ParamGroup) -> torch.Tensor:
        return slot.data[: group.nbytes].view(group.dtype)

    def read_ahead(self, group: ParamGroup):
        """Start reading the group's copy into a slot (nothing to do if a slot still holds it)."""
        with self.ring.lock:
            slot = self.ring.holding(group.index)
            if slot is not None:
                slot.in_use = True
                return slot
        slot = self.ring.claim(group.index)
        slot.load(self.lane, self.files[group.index], self._span(group, slot))
        return slot

    def acquire(self, group: ParamGroup) -> torch.Tensor:
        """The group's compute copy in a pinned slot (read now if it was not read ahead)."""
        slot = self.read_ahead(group)
        if slot.io is not None and slot.io.op == "read":
            slot.io.wait()          # after a write-back the data is already in the slot
        return self._view(slot, group)

    def release(self, group: ParamGroup, copied) -> None:
        """The copy to the GPU is issued: the slot may be reused once ``copied`` (an event) completes."""
        with self.ring.lock:
            slot = self.ring.holding(group.index)
            slot.in_use = False
            if copied is not None:
                slot.read_out = copied

    def write_buffer(self, group: ParamGroup):
        """A slot for the group's new compute copy, free to fill (older copies of it in the ring are dropped)."""
        with self.ring.lock:
            for slot in self.ring.slots:
                if slot.holds == group.index and not slot.in_use:
                    slot.holds = None
        slot = self.ring.claim(group.index)
        slot.settle()
        return slot, self._view(slot, group)

    def commit_write(self, group: ParamGroup, slot) -> None:
        slot.io = self.lane.write(self.files[group.index], self._span(group, slot))
        with self.ring.lock:
            slot.in_use = False

    def initialize(self, group: ParamGroup, values: torch.Tensor) -> None:
        slot, view = self.write_buffer(group)
        view.copy_(values)
        self.commit_write(group, slot)
        slot.io.wait()

    def flush(self) -> None:
        for slot in self.ring.slots:
            if slot.io is not None:
                slot.io.wait()
