"""The SSD lane: a read channel and a write channel, each in submission order, a request only after what it
depends on, errors to the waiter.

Device-free: a scripted swapper whose requests finish when the test says, so every ordering is forced, not
hoped for; and one real swap file for the data path.
"""
import threading

import pytest
import torch

from ratel.ir import ParamGroup, layout
from ratel.runtime.recorder import Recorder
from ratel.runtime.ssd import SsdParams, SsdStates
from ratel.runtime.ssd_lane import Request, SsdLane, StagingRing
from ratel.runtime.swapper import Swapper, SwapIOError, aligned_empty


class Handle:
    def __init__(self, gate, error=None):
        self.gate, self.error = gate, error

    def wait(self):
        assert self.gate.wait(10), "a request never finished"
        if self.error is not None:
            raise self.error


class File:
    def __init__(self, name):
        self.name = name


class ScriptedSwapper:
    """Each request waits for its gate (open unless the test holds it); records the order issued."""

    def __init__(self):
        self.log, self.gates, self.errors = [], {}, {}
        self.issued = threading.Condition()

    def gate(self, name):
        return self.gates.setdefault(name, threading.Event())

    def _do(self, op, file):
        with self.issued:
            self.log.append(f"{op} {file.name}")
            self.issued.notify_all()
        gate = self.gates.get(f"{op} {file.name}", self.gates.get(file.name))    # one direction, or both
        if gate is None:
            gate = threading.Event()
            gate.set()
        return Handle(gate, self.errors.get(file.name))

    def file(self, name, nbytes):
        return File(name)

    def read(self, file, offset, tensor):
        return self._do("read", file)

    def write(self, file, offset, tensor):
        return self._do("write", file)

    def wait_issued(self, n):
        with self.issued:
            assert self.issued.wait_for(lambda: len(self.log) >= n, 10)


def span():
    return [(0, torch.empty(8, dtype=torch.uint8))]


@pytest.fixture
def lane():
    swapper = ScriptedSwapper()
    lane = SsdLane(swapper)
    yield lane
    for gate in swapper.gates.values():
        gate.set()
    lane.close()


def test_reads_never_queue_behind_writes_and_each_direction_keeps_its_order(lane):
    sw = lane.swapper
    sw.gate("busy")                                   # a long write-back holds the write channel
    busy = lane.write(File("busy"), span())
    sw.wait_issued(1)
    w1, r1, w2, r2 = (lane.write(File("w1"), span()), lane.read(File("r1"), span()), lane.write(File("w2"), span()),
                      lane.read(File("r2"), span()))
    r2.wait()                                         # both reads done while the write is still in flight
    assert r1.done.is_set() and not busy.done.is_set() and not w1.done.is_set()
    sw.gates["busy"].set()
    for r in (busy, w1, w2):
        r.wait()
    assert [e for e in sw.log if e.startswith("read")] == ["read r1", "read r2"]
    assert [e for e in sw.log if e.startswith("write")] == ["write busy", "write w1", "write w2"]


def test_a_read_waits_for_the_write_back_of_its_slot(lane):
    sw = lane.swapper
    sw.gate("old")                                    # the slot's write-back is slow
    write_back = lane.write(File("old"), span())
    read = lane.read(File("new"), span(), after=[write_back])     # same slot: must not start before it
    other = lane.read(File("other"), span())                      # another slot: passes it
    other.wait()
    assert not read.done.is_set() and "read new" not in sw.log
    sw.gates["old"].set()
    read.wait()
    assert sw.log.index("write old") < sw.log.index("read new")


class GpuCopy:
    """Stands in for a CUDA event: done when the test says."""

    def __init__(self):
        self.finished = False

    def query(self):
        return self.finished


def test_a_request_behind_a_gpu_copy_lets_ready_ones_pass_then_runs(lane):
    sw = lane.swapper
    copy = GpuCopy()
    blocked = lane.read(File("after-copy"), span(), after=[copy])
    ready = lane.read(File("ready"), span())          # same channel, submitted later, passes it
    ready.wait()
    assert sw.log == ["read ready"] and not blocked.done.is_set()
    copy.finished = True
    blocked.wait()
    assert sw.log == ["read ready", "read after-copy"]


def test_an_error_reaches_the_waiter_once_and_a_lost_write_reaches_flush(lane):
    sw = lane.swapper
    sw.errors["bad-read"] = SwapIOError(5, "Input/output error", "bad-read", 0)
    sw.errors["bad-write"] = SwapIOError(28, "No space left on device", "bad-write", 0)
    read = lane.read(File("bad-read"), span())
    with pytest.raises(SwapIOError, match="Input/output"):
        read.wait()
    read.wait()                                      # seen once: not raised again
    lane.write(File("bad-write"), span())
    lane.write(File("fine"), span())
    with pytest.raises(SwapIOError, match="No space"):
        lane.flush()
    lane.flush()


def test_the_ring_prefers_an_empty_slot_then_a_settled_one_then_the_oldest():
    ring = StagingRing([torch.empty(1) for _ in range(3)])
    a, b, c = ring.claim("a"), ring.claim("b"), ring.claim("c")
    assert len({id(a), id(b), id(c)}) == 3
    with pytest.raises(RuntimeError, match="in use"):
        ring.claim("d")
    for slot in (a, b, c):
        slot.in_use = False
    assert ring.claim("d") is a                      # all hold data, all settled: the oldest claim
    ring.slots[2].holds = None
    ring.slots[2].in_use = False
    assert ring.claim("e") is ring.slots[2]          # one holds nothing
    for slot in ring.slots:
        slot.in_use = False
    ring.slots[1].io = Request("write", File("pending"), span(), ())     # oldest claim, but still writing
    assert ring.claim("f") is ring.slots[0]


def test_real_files_round_trip_through_the_lane(tmp_path):
    with Swapper(dirs=[str(tmp_path)]) as swapper:
        lane = SsdLane(swapper)
        f = lane.file("x/a.bin", 1 << 20)
        out = aligned_empty(1 << 20)
        out.copy_(torch.randint(0, 255, (1 << 20,), dtype=torch.uint8))
        written = lane.write(f, [(0, out)])
        back = aligned_empty(1 << 20)
        lane.read(f, [(0, back)], after=[written]).wait()
        lane.close()
        assert torch.equal(back, out)
        assert list(lane.issued) == [("write", "x/a.bin"), ("read", "x/a.bin")]


def test_a_profiled_step_records_each_request_on_its_channel_under_the_step_that_submitted_it(lane):
    swapper = lane.swapper
    swapper.gate("earlier")                                           # held: still writing when recording begins
    earlier = lane.write(File("earlier"), span())                    # submitted before the recording
    swapper.wait_issued(1)
    recorder = Recorder(torch.device("cpu"), num_steps=4)
    lane.recorder, lane.step = recorder, 2
    read = lane.read(File("a"), [(0, torch.empty(24, dtype=torch.uint8)), (24, torch.empty(8, dtype=torch.uint8))])
    lane.step = 3
    written = lane.write(File("b"), span())
    read.wait()
    swapper.gates["earlier"].set()       # the write channel takes one request at a time: b waits for it
    earlier.wait()
    written.wait()
    lane.recorder = None
    lane.read(File("unrecorded"), span()).wait()
    spans = {s.label: s for s in recorder.finish().spans}
    assert set(spans) == {"read a", "write b", "write earlier"}
    assert (spans["read a"].lane, spans["read a"].step, spans["read a"].nbytes) == ("ssd_read", 2, 32)
    assert (spans["write b"].lane, spans["write b"].step, spans["write b"].nbytes) == ("ssd_write", 3, 8)
    assert (spans["write earlier"].step, spans["write earlier"].start) == (-1, 0.0)    # clipped to the recording
    assert all(s.start <= s.end for s in spans.values())


def small_groups(indices):
    return [ParamGroup(i, f"g{i}", ("w",), ((8,),), (0,), 8, torch.bfloat16, (i,), True) for i in indices]


def written_states(lane):
    """Groups g1 and g2 of 8 bf16 elements each, their states on SSD (model key "m") written as at compile."""
    groups = small_groups((1, 2))
    states = SsdStates(lane, groups, "m", order=(1, 2))
    for g in groups:
        states.initialize(g, torch.zeros(8))
    return groups, states


def test_optimizer_states_read_the_next_piece_into_a_settled_slot_not_behind_the_write_back(lane, monkeypatch):
    """Three staging slots: one updated, one read ahead, one free. After the states are written at compile
    (outside any step) every slot is free again, so the read that follows a piece's release goes into a settled
    slot at once; it used to go behind the write-back (one slot kept a stale claim)."""
    monkeypatch.setattr(layout, "SSD_PIECE_NUMEL", 4)
    groups, states = written_states(lane)
    assert len(states.ring.slots) == 3
    swapper = lane.swapper
    states.begin_step()
    states.acquire(groups[0], 0)
    swapper.gate("write m/0001-g1.adam")          # the write-back of g1's first piece does not finish
    states.release(groups[0], 0)
    states.acquire(groups[0], 1)                  # read at the start of the step
    states.release(groups[0], 1)
    with swapper.issued:
        assert swapper.issued.wait_for(lambda: "read m/0002-g2.adam" in swapper.log, 10), swapper.log
    swapper.gates["write m/0001-g1.adam"].set()
    states.abandon_step()
    states.flush()


def test_a_read_of_optimizer_states_never_passes_their_write_back(lane):
    """A skipped step leaves its read-ahead slots settled; the next step reads the first piece again, into one of
    them, while that piece's write-back from the step before still runs in another slot: the read waits for it."""
    groups, states = written_states(lane)
    assert len(states.ring.slots) == 2
    swapper = lane.swapper
    states.begin_step()                           # reads g1
    states.acquire(groups[0], 0)
    swapper.gate("write m/0001-g1.adam")          # g1's write-back does not finish
    states.release(groups[0], 0)                  # writes g1, reads g2 into the other slot
    states.acquire(groups[1], 0)
    states.abandon_step()                         # the step is skipped: g2 is not written back
    states.begin_step()                           # g1 again
    write_back = next(s.io for s in states.ring.slots if s.io.op == "write")
    read = states._read[(1, 0)].io
    assert read.op == "read" and write_back in read.after and not read.ready()
    swapper.gates["write m/0001-g1.adam"].set()
    read.wait()
    assert swapper.log.index("read m/0001-g1.adam", swapper.log.index("write m/0001-g1.adam")) > 0
    states.abandon_step()
    states.flush()


class Pool:
    def take(self, nbytes):
        return torch.empty(nbytes, dtype=torch.uint8)


def test_a_read_of_a_parameter_copy_never_passes_its_write_back(lane):
    """A group's new compute copy is written from a slot that every other slot's use then forces the ring to
    hand to another group; read again, the copy goes into another slot and must wait for its write."""
    groups = small_groups(range(6))
    params = SsdParams(lane, groups, "m", Pool())
    assert len(params.ring.slots) == 4
    swapper = lane.swapper
    slot, view = params.write_buffer(groups[0])
    swapper.gate("write m/0000-g0.param")          # g0's new copy is still being written
    params.commit_write(groups[0], slot)
    written = slot.io
    for g in groups[1:4]:
        params.acquire(g)                           # three slots in use
    params.read_ahead(groups[4])                    # the last one: g0's, behind its write
    params.release(groups[1], None)                 # a settled slot again
    read = params.read_ahead(groups[0]).io          # g0 is no longer in the ring: read from its file
    assert read.op == "read" and written in read.after and not read.ready()
    swapper.gates["write m/0000-g0.param"].set()
    read.wait()
    for g in (groups[0], *groups[2:5]):
        params.release(g, None)
    params.flush()
