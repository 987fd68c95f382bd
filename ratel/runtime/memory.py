"""Host and device memory for the runtime: one pinned pool taken at start, and the stream/event helpers.

Pinning is slow (``pin_memory=True`` runs at ~2 GiB/s, ``cudaHostRegister`` of touched memory at ~9 GiB/s
on the project's H100 machine) and allocating pinned memory on the fly forces synchronisation (PEERS.md
#10), so the runtime pins once: ``PinnedPool`` allocates one host buffer, registers it with CUDA, and hands
out aligned views. On a CPU-only run the "GPU tier" is another host buffer and nothing is pinned.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import tempfile
import warnings

import torch

from ratel.ir.layout import PAGE, round_up
from ratel.runtime import checked_lanes

log = logging.getLogger("ratel.runtime")
ALIGN = PAGE   # page alignment: also what O_DIRECT needs for the SSD tier


def expandable_segments() -> bool:
    """Make the CUDA caching allocator grow segments in place (``expandable_segments:True``) unless the user
    configured it (``PYTORCH_CUDA_ALLOC_CONF`` / ``PYTORCH_ALLOC_CONF`` naming it); returns whether it is on.

    Why: the plan counts tensor bytes, and with fixed-size segments a step whose tensors fit can still fail
    on reserved-but-unusable memory (3.6B GPT, batch 16 x 2048 under a 24 GiB cap: 7.3 GiB reserved and not
    allocated, CUDA OOM). Segments that grow and shrink in place keep what is reserved close to what is
    allocated, so a plan that fits runs. New segments take the setting, so it holds even when CUDA is
    already in use."""
    conf = ",".join(os.environ.get(k, "") for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"))
    if "expandable_segments" in conf:
        return "expandable_segments:true" in conf.replace(" ", "").lower()
    with warnings.catch_warnings():   # torch 2.11 warns that this spelling will move; it is the one measured
        warnings.simplefilter("ignore", FutureWarning)
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    return True


def return_freed_host_memory() -> bool:
    """Give the heap memory freed so far back to the operating system (glibc's ``malloc_trim``); False where
    there is no glibc. Why: an engine frees gigabytes of medium-sized host buffers when it closes, and glibc
    keeps much of it in its arenas: on a 2-core CPU three compile/step/close cycles of a 0.2B model left 1.2 GiB
    more resident with no tensor alive (0.36 GiB after a trim), and on the H200 a process that trained a second
    engine after closing a first was killed for memory its plan did not count."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


def _take_cuda_error() -> None:
    """Clear the error a failed CUDA runtime call left as the thread's last error: torch would report it at its
    next kernel launch, from an unrelated line (torch binds no cudaGetLastError; a launch's check takes it)."""
    try:
        torch.zeros(1, device="cuda")
    except RuntimeError:
        pass


def _host_register(address: int, nbytes: int) -> int:
    """``cudaHostRegister``: 0, or the CUDA error, with CUDA's last error cleared (``_take_cuda_error``)."""
    err = int(torch.cuda.cudart().cudaHostRegister(address, nbytes, 0))
    if err != 0:
        _take_cuda_error()
    return err


class PinnedPool:
    """A bump allocator over one host buffer, pinned (page-locked) for CUDA when a GPU is in use."""

    def __init__(self, nbytes: int, pin: bool):
        self.capacity = max(int(nbytes), ALIGN)
        self._raw = torch.empty(self.capacity + ALIGN, dtype=torch.uint8)
        skew = (-self._raw.data_ptr()) % ALIGN
        self.buffer = self._raw[skew: skew + self.capacity]
        self.used = 0
        self.pinned = False
        if pin and nbytes > 0:
            self.buffer.zero_()   # touch the pages first: registering touched memory is ~4x faster
            err = _host_register(self.buffer.data_ptr(), self.capacity)
            if err != 0:
                raise RuntimeError(f"cudaHostRegister of {self.capacity} bytes failed with CUDA error {err}; "
                                   "lower Budget(host=...) or check the memlock limit (ulimit -l)")
            self.pinned = True

    def take(self, nbytes: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """An aligned view of ``nbytes`` bytes, typed as ``dtype`` (flat)."""
        start = round_up(self.used, ALIGN)
        end = start + int(nbytes)
        if end > self.capacity:
            raise MemoryError(f"pinned pool exhausted: {end} > {self.capacity} bytes (the plan under-counted host "
                              "memory; please report this)")
        self.used = end
        return self.buffer[start:end].view(dtype)

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self.pinned = False
        self.buffer = self._raw = None

    def __del__(self):
        # A pool dropped without close() gave its memory back to malloc still registered with CUDA: the next
        # buffer malloc placed over those addresses failed to register (error 712, "already mapped").
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: CUDA may be gone already
            pass


class SharedPool(PinnedPool):
    """A PinnedPool every data-parallel rank of this host maps: one host copy of what they all hold alike
    (the compute copies of the weights), in a file of shared memory that rank 0 creates (0600, in /dev/shm) and
    removes once all have mapped it, so nothing is left behind. Each rank pins its own mapping."""

    def __init__(self, nbytes: int, pin: bool, ranks):
        self.capacity = max(round_up(int(nbytes), PAGE), ALIGN)
        path = None
        if ranks.rank == 0:
            folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
            fd, path = tempfile.mkstemp(prefix="ratel-weights-", dir=folder)   # 0600
            os.ftruncate(fd, self.capacity)
            os.close(fd)
        path = ranks.from_rank0(path)
        try:
            self._raw = torch.from_file(path, shared=True, size=self.capacity, dtype=torch.uint8)
        finally:
            ranks.barrier()
            if ranks.rank == 0:
                os.unlink(path)
        self.buffer = self._raw       # a mapping is page-aligned
        self.used = 0
        self.pinned = False
        if pin and nbytes > 0:
            err = _host_register(self.buffer.data_ptr(), self.capacity)
            if err != 0:
                raise RuntimeError(f"cudaHostRegister of {self.capacity} bytes of shared memory failed with CUDA "
                                   f"error {err}; check the memlock limit (ulimit -l) and /dev/shm's size")
            self.pinned = True


class Lanes:
    """The compute, host-to-device and device-to-host lanes: CUDA streams, or plain calls on CPU (deferred
    and checked with ``RATEL_CHECK_STREAMS=1``: ``ratel.runtime.checked_lanes``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.checked = not self.cuda and checked_lanes.checking()
        if self.cuda:
            self.compute = torch.cuda.current_stream(device)
            self.h2d = torch.cuda.Stream(device)
            self.d2h = torch.cuda.Stream(device)
        elif self.checked:
            self.compute, self.h2d, self.d2h = checked_lanes.make_lanes()
        else:
            self.compute = self.h2d = self.d2h = None

    def event(self, stream=None):
        """Record an event on ``stream`` (default: compute); None on CPU, where every copy is already done
        (with checked lanes, an event of the deferred lane)."""
        if self.checked:
            return checked_lanes.record(stream if stream is not None else self.compute)
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream or torch.cuda.current_stream(self.device))
        return event

    @staticmethod
    def wait(stream, event) -> None:
        if event is not None:
            stream.wait_event(event)

    def wait_compute(self, event) -> None:
        if event is None:
            return
        if self.checked:
            event.synchronize()
        else:
            torch.cuda.current_stream(self.device).wait_event(event)

    def landing(self, nbytes: int) -> torch.Tensor:
        """A device buffer of ``nbytes`` bytes for a copy on the H2D lane that the compute lane then reads.

        The caching allocator hands a block out again as soon as the host frees it, which is safe only for
        the compute stream, whose kernels queued before the free may still use it: an H2D copy into it would
        race them, the fetched bytes and those kernels' writes overwriting each other, silently (on a CPU,
        where every copy is immediate, nothing shows). So the H2D lane first waits for the compute lane to
        reach this point. That costs no overlap the plan counts on: the simulator starts a copy issued at a
        step once the GPU begins that step, and the copy still runs beside that step's kernels. (Taking the
        buffer from the H2D stream's own blocks instead would keep a second pool of blocks the compute stream
        cannot reuse, more memory than the plan counts.) Freed before the compute lane waited for the copy,
        the block is not reused before the copy is done: ``copy`` marks it used by the H2D stream."""
        flat = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if self.cuda or self.checked:
            self.h2d.wait_event(self.event())
        return flat

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream, after=None, span=None):
        """``dst.copy_(src)`` on ``stream`` after ``after`` (an event); returns the completion event.

        ``span``: ``(recorder, lane, label, step)`` to time the copy itself (not the wait before it).
        """
        timed = span[0].span(*span[1:], stream=stream, nbytes=dst.numel() * dst.element_size()) \
            if span is not None and span[0] is not None else contextlib.nullcontext()
        if self.checked and stream is not self.compute:
            return checked_lanes.copy(dst, src, stream, after, timed, span[2] if span is not None else "")
        if not self.cuda:
            with timed:
                dst.copy_(src)
            return None
        with torch.cuda.stream(stream):
            if after is not None:
                stream.wait_event(after)
            with timed:
                dst.copy_(src, non_blocking=True)
            for t in (dst, src):
                if t.device.type == "cuda":
                    t.record_stream(stream)
            done = torch.cuda.Event()
            done.record(stream)
        return done
