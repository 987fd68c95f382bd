"""Programs by input shape: the most recently used kept, within a count and within host memory.

Each program (one traced input shape) holds a pinned pool for its activations; the parameters, states and
the GPU ring are shared. The cache keeps programs while their pools fit in ``room`` (the host budget less
what the shared state takes, given by the engine with each new program) and their number stays within
``max_programs``; the least recently used go first. A program is never evicted while it is the one just
added, so one shape always runs.
"""
from __future__ import annotations

from collections import OrderedDict

from ratel.runtime.assemble import Program


class ProgramCache:
    def __init__(self, max_programs: int = 128):
        if max_programs < 1:
            raise ValueError(f"max_programs={max_programs}: keep at least one program")
        self.max_programs = max_programs
        self._programs: OrderedDict[tuple, Program] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._programs)

    def __contains__(self, key) -> bool:
        return key in self._programs

    def get(self, key) -> Program | None:
        program = self._programs.get(key)
        if program is not None:
            self._programs.move_to_end(key)
        return program

    def put(self, key, program: Program, room: int) -> None:
        """Add ``program``; release the least recently used ones beyond the count or the pinned ``room``."""
        self._programs[key] = program
        self._programs.move_to_end(key)
        while len(self._programs) > 1 and (len(self._programs) > self.max_programs or self.pinned_bytes() > room):
            _, old = self._programs.popitem(last=False)
            old.release()
            self.evicted += 1

    def pinned_bytes(self) -> int:
        return sum(p.pinned_bytes for p in self._programs.values())

    def programs(self) -> list[Program]:
        return list(self._programs.values())

    def clear(self) -> list[Program]:
        """Forget every program; returns them, for the caller to release."""
        out = list(self._programs.values())
        self._programs.clear()
        return out
