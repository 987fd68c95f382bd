"""Checked lanes: on a CPU, run the runtime's copies as CUDA streams may, and check that each is ordered.

On a CPU every copy is done when ``Lanes.copy`` returns and every kernel when its call returns, so a copy the
runtime forgot to order against the compute lane gives the right numbers there and the wrong ones on a GPU
(the nan of the first resident-groups run on the H200 was of that family: benchmarks/RESULTS.md). With
``RATEL_CHECK_STREAMS=1`` a CPU run's lanes find such mistakes in two ways:

  deferral   a copy on the H2D or D2H lane runs only when something needs it: the compute lane or a thread
             waits for its event (``wait``, ``wait_compute``, ``synchronize``, ``query``), or a later copy
             waits for it; the copies of one lane run in the order issued, as on a stream. A consumer that
             does not wait reads bytes not copied yet; a producer that changes a copy's source before the
             copy ran sends the new bytes. Either way training no longer equals PyTorch.
  ordering   inside ``ComputeAccesses`` (a dispatch mode on the training thread), every kernel's reads and
             writes are stamped with a compute clock, kept per storage across frees (the caching allocator
             hands a freed block to the compute stream again at once, its queued kernels still using it).
             Each copy lane knows the compute clock its waits reached: events of the compute lane carry the
             clock they were recorded at; a lane that waits for one, or a copy issued ``after`` it, reaches
             it. A copy to the device side (H2D) that overwrites memory a kernel touched later than its lane
             reached, or a copy from it (D2H) that reads memory a kernel wrote later, could run beside that
             kernel on a GPU: ``UnorderedCopy`` is raised, naming the copy and the kernel.

The CPU optimizer's worker stamps its kernels on the same clock (``joining``): its updates of groups resident
on the GPU are compute-stream work there. What neither check sees: order between a copy lane and host
threads (the optimizer writing weights a pending fetch reads), which only deferral's wrong numbers show.
"""
from __future__ import annotations

import collections
import contextlib
import os
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ratel.ir.layout import span_bytes

CHECK_ENV = "RATEL_CHECK_STREAMS"


def checking() -> bool:
    """Whether CPU lanes run checked (``RATEL_CHECK_STREAMS`` set, and not to 0)."""
    return os.environ.get(CHECK_ENV, "") not in ("", "0")


class UnorderedCopy(RuntimeError):
    """A copy lane's work is not ordered after the compute it must follow (a bug of the runtime)."""


_state = threading.local()     # .in_copy: a deferred copy runs on this thread
# The ComputeAccesses of the training thread, if one is active. Read from every thread: an event another thread
# records on the compute lane (the optimizer's updates of resident groups) follows all compute issued so far.
_active: "ComputeAccesses | None" = None


def _compute_clock() -> int:
    return _active.clock if _active is not None else 0


def joining():
    """For a thread the runtime starts (the CPU optimizer's worker), taken on the thread that starts it: a
    context that stamps the new thread's kernels on the training thread's clock, when one is active."""
    return ComputeAccesses(joins=_active) if _active is not None else contextlib.nullcontext()


class DeferredLane:
    """A CPU stand-in for a CUDA stream: its queue of copies, each with the events it waits for."""

    def __init__(self, name: str, lock: threading.RLock):
        self.name = name
        self.lock = lock            # one for the three lanes: a copy runs on whichever thread needs it first
        self.queue: collections.deque = collections.deque()   # (number, events waited for, work)
        self.issued = 0
        self.done = 0
        self.reached = 0            # the compute clock this lane's waits reached (ordering)
        self._waits: list = []      # events the lane's next copy waits for (``wait_event``)

    @property
    def compute(self) -> bool:
        return self.name == "compute"

    def wait_event(self, event) -> None:
        """As ``torch.cuda.Stream.wait_event``: the compute lane waits at once (it runs as issued); a copy
        lane's next copies run after the event's work."""
        if event is None:
            return
        if self.compute:
            event.synchronize()
            return
        with self.lock:
            self._waits.append(event)
            self.reached = max(self.reached, event.clock)

    def put(self, work, after) -> "DeferredEvent":
        with self.lock:
            waits, self._waits = self._waits + ([after] if after is not None else []), []
            if after is not None:
                self.reached = max(self.reached, after.clock)
            self.issued += 1
            self.queue.append((self.issued, waits, work))
            return DeferredEvent(self, self.issued, self.reached)

    def run_until(self, number: int) -> None:
        with self.lock:
            while self.done < number:
                _, waits, work = self.queue.popleft()
                for event in waits:
                    event.synchronize()
                outer, _state.in_copy = getattr(_state, "in_copy", False), True
                try:
                    work()
                finally:
                    _state.in_copy = outer
                self.done += 1


class DeferredEvent:
    """The end of one deferred copy, or (``lane`` None) of compute up to ``clock``, done when recorded."""

    def __init__(self, lane: DeferredLane | None, number: int, clock: int):
        self.lane = lane
        self.number = number
        self.clock = clock      # the compute clock whoever waits for this event reaches

    def synchronize(self) -> None:
        if self.lane is not None:
            self.lane.run_until(self.number)

    def query(self) -> bool:
        self.synchronize()      # observed: it runs now, as late as it can
        return True


def make_lanes() -> tuple:
    """(compute, h2d, d2h) deferred lanes sharing one lock."""
    lock = threading.RLock()
    return tuple(DeferredLane(name, lock) for name in ("compute", "h2d", "d2h"))


def record(lane: DeferredLane) -> DeferredEvent:
    """An event of ``lane`` now: the compute lane's is done and carries the compute clock."""
    if lane.compute:
        return DeferredEvent(None, 0, _compute_clock())
    return DeferredEvent(lane, lane.issued, lane.reached)


def copy(dst: torch.Tensor, src: torch.Tensor, lane: DeferredLane, after, timed, label: str) -> DeferredEvent:
    """``dst.copy_(src)`` on a deferred copy lane, checked against the compute that came before it."""
    accesses = _active
    if accesses is not None:
        reached = max(lane.reached, after.clock if after is not None else 0)
        named = f" ({label})" if label else ""
        if lane.name == "h2d":
            accesses.check(dst, reached, writes_only=False, what=f"the H2D copy{named} into device memory")
        else:
            accesses.check(src, reached, writes_only=True, what=f"the D2H copy{named} out of device memory")

    def work():
        with timed:
            dst.copy_(src)
    return lane.put(work, after)


def _extent(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(storage address, first byte, byte after the last) a CPU tensor covers; None for others."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type != "cpu" or t.is_sparse:
        return None     # fake and meta tensors (tracing), subclasses: no memory of their own here
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    base = storage.data_ptr()
    if base == 0 or t.numel() == 0:
        return None
    first = t.storage_offset() * t.element_size()
    return base, first, first + span_bytes(t)


class _Ledger:
    """The compute clock and, per storage address, each byte range's last access, write and kernel."""

    def __init__(self):
        self.clock = 0
        self.ranges: dict[int, dict[tuple[int, int], list]] = {}    # address -> (first, end) -> [access, write, op]
        self.lock = threading.Lock()


class ComputeAccesses(TorchDispatchMode):
    """Stamps every kernel the training thread runs with a compute clock and keeps, per storage address,
    which byte ranges it read and wrote at which clock (kept across frees: an address handed out again is
    the compute stream's block, its old kernels maybe still queued). ``check`` is the copy lanes' question.
    ``joins``: another thread's kernels that a GPU would queue on the same compute stream (the optimizer's
    updates of groups resident on the GPU), stamped on the same clock.

    Factory kernels (``empty`` and kin) are not accesses, nor are views; copies of deferred lanes that run on
    this thread are the copy lanes', not compute."""

    _FACTORIES = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like"}

    def __init__(self, joins: "ComputeAccesses | None" = None):
        super().__init__()
        self.ledger = joins.ledger if joins is not None else _Ledger()
        self._joined = joins is not None

    @property
    def clock(self) -> int:
        return self.ledger.clock

    def __enter__(self):
        global _active
        if not self._joined:
            self._outer, _active = _active, self
        return super().__enter__()

    def __exit__(self, *exc):
        global _active
        if not self._joined:
            _active = self._outer
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(_state, "in_copy", False) or func.is_view or func.__name__.split(".")[0] in self._FACTORIES:
            return out
        written = set()
        for i, argument in enumerate(func._schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(argument.name)
                written.update(id(t) for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor))
        reads = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        writes = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        name = str(func)
        with self.ledger.lock:
            self.ledger.clock += 1
            for t in reads:
                self._stamp(t, id(t) in written, name)
            for t in writes:
                self._stamp(t, True, name)
        return out

    def _stamp(self, t: torch.Tensor, wrote: bool, op: str) -> None:
        extent = _extent(t)
        if extent is None:
            return
        base, first, end = extent
        entry = self.ledger.ranges.setdefault(base, {}).setdefault((first, end), [0, 0, ""])
        entry[0] = self.ledger.clock
        entry[2] = op
        if wrote:
            entry[1] = self.ledger.clock

    def check(self, t: torch.Tensor, reached: int, writes_only: bool, what: str) -> None:
        extent = _extent(t)
        if extent is None:
            return
        base, first, end = extent
        with self.ledger.lock:
            entries = list(self.ledger.ranges.get(base, {}).items())
        for (a, b), (accessed, wrote, op) in entries:
            clock = wrote if writes_only else accessed
            if a < end and first < b and clock > reached:
                kind = "wrote" if writes_only else "used"
                raise UnorderedCopy(
                    f"{what} is not ordered after the compute kernel that last {kind} that memory ({op}, at compute "
                    f"clock {clock}; the copy's lane waited for clock {reached} only): on a GPU they could run "
                    "side by side. The copy must wait for an event of the compute lane recorded after that kernel")
