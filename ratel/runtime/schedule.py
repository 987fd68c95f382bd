"""The schedule executor: the one place the Plan's transfers are issued, in the Plan's order.

The Plan lists every transfer of a step in ``schedule_order`` (by step, then stage: before the step's
compute, during it, after it). The executor walks that list with a cursor:

  * ``run_until(step, stage)`` issues every transfer up to the end of ``stage`` of ``step`` that has not run
    yet: the runtime calls it as a step's compute begins (BEFORE) and after a backward step (AFTER);
  * a forward graph node that carries a transfer (``ratel.prefetch_params``, ``ratel.offload_activation``,
    ``ratel.release_params``) calls ``run_through(kind, ...)``: the transfers before it run first, then it;
    the sweep never runs such a transfer itself (the node has the value it moves);
  * a kind the Plan marks dynamic (``KindSpec.dynamic`` says who decides its moment: the pack hook, the SSD
    states ring, the CPU optimizer) is not issued by the cursor; its owner ``report``s it when it happens,
    and the executor checks that it was planned and comes in the Plan's order for its kind.

Each handler is the tier's own code (the parameter ring, the activation store, the SSD rings, the
gradient flush, the CPU optimizer). ``log`` holds the index of every transfer issued or reported, in the
order it happened, and ``unplanned`` what was reported without being planned (kept, not raised: a worker
thread must not die of a bookkeeping mismatch; tests/runtime/test_schedule.py checks both).
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from ratel.errors import RatelError
from ratel.ir import Plan, Stage, Transfer, TransferKind


def key_of(t: Transfer) -> tuple:
    """What a transfer moves, typed: (unit, group, value)."""
    return (t.unit, t.group, t.value)


class ScheduleExecutor:
    def __init__(self, plan: Plan, handlers: dict[TransferKind, Callable[..., None]],
                 graph_bound: set[int] = frozenset()):
        self.transfers = plan.transfers
        self.handlers = handlers
        static = [k for k in TransferKind if not k.dynamic]
        missing = [k for k in static if k not in handlers and any(t.kind == k for t in self.transfers)]
        if missing:
            raise RatelError(f"the runtime has no executor for planned transfer kinds {missing} (Ratel bug)")
        self.graph_bound = set(graph_bound)
        self.log: list[int] = []
        self._lock = threading.Lock()
        self._static = [i for i, t in enumerate(self.transfers) if not t.kind.dynamic]
        self._dynamic_plan: dict[tuple, list[int]] = {}
        for i, t in enumerate(self.transfers):
            if t.kind.dynamic:
                self._dynamic_plan.setdefault((t.kind, key_of(t)), []).append(i)
        self.begin()

    def begin(self) -> None:
        """A new step: the cursor goes back to the first transfer."""
        with self._lock:
            self._cursor = 0
            self._done: set[int] = set()
            self._dynamic = {k: deque(v) for k, v in self._dynamic_plan.items()}
            self.log = []
            self.unplanned: list[tuple] = []

    # ------------------------------------------------------------------ the cursor
    def _issue(self, i: int, *payload) -> None:
        self._done.add(i)
        with self._lock:
            self.log.append(i)
        self.handlers[self.transfers[i].kind](self.transfers[i], *payload)

    def run_until(self, step: int, stage: Stage) -> None:
        """Issue every transfer not yet run up to the end of ``stage`` of ``step`` (graph-bound ones are the
        graph's to issue)."""
        while self._cursor < len(self._static):
            i = self._static[self._cursor]
            t = self.transfers[i]
            if (t.step, t.kind.stage) > (step, stage):
                return
            self._cursor += 1
            if i not in self._done and i not in self.graph_bound:
                self._issue(i)

    def run_through(self, kind: TransferKind, *payload, unit: int | None = None, value: str | None = None) -> None:
        """A graph node issues its transfer: the planned ones before it run first, then it."""
        for position in range(self._cursor, len(self._static)):
            i = self._static[position]
            t = self.transfers[i]
            if i in self.graph_bound and i not in self._done and t.kind == kind and \
                    (unit is None or t.unit == unit) and (value is None or t.value == value):
                while self._cursor < position:
                    j = self._static[self._cursor]
                    self._cursor += 1
                    if j not in self._done and j not in self.graph_bound:
                        self._issue(j)
                self._issue(i, *payload)
                return
        raise RatelError(f"the graph issues {kind} of unit={unit} value={value}, which the plan does not schedule "
                         "here (plan bug)")

    # ------------------------------------------------------------------ dynamic kinds
    def report(self, kind: TransferKind, *, unit: int | None = None, group: int | None = None,
               value: str | None = None) -> None:
        """A dynamic transfer happened (called by its owner, on any thread)."""
        with self._lock:
            planned = self._dynamic.get((kind, (unit, group, value)))
            if planned:
                self.log.append(planned.popleft())
            else:
                self.unplanned.append((kind, unit, group, value))
