"""NVMe swapper: asynchronous O_DIRECT reads and writes between host buffers and swap files on SSD.

This is the Python face of ``ratel._swapper`` (csrc/swapper); the SSD tier of the runtime moves tensors
through it::

    with Swapper(dirs=["/mnt/nvme0/ratel", "/mnt/nvme1/ratel"]) as sw:
        f = sw.file("model-1a2b/layers.3.adam", nbytes)     # stable name: reused by the next run
        buf = aligned_empty(nbytes)                           # page-aligned: the fast O_DIRECT path
        sw.write(f, 0, buf).wait()
        h = sw.read(f, 0, buf)                                # returns at once
        ...                                                   # overlap with compute
        h.wait()                                              # raises SwapIOError on failure

Backends
--------
``"uring"``: one thread owns an io_uring (raw syscalls, no liburing) and keeps up to ``queue_depth`` chunks
in the kernel. ``"threads"``: ``queue_depth`` workers issue blocking pread/pwrite. Containers often forbid
io_uring (seccomp: EPERM/ENOSYS), so ``"auto"`` takes io_uring only after a real round trip through a ring
succeeds in this process, and threads otherwise; with ``checksum=True`` it prefers threads, which hash blocks
on many cores instead of the ring's one. The choice and the default block size and queue depth come from
``benchmarks/swapper.py`` (see ``csrc/swapper/README.md``); ``RATEL_SWAPPER_BACKEND`` overrides ``"auto"``.

Request lifecycle
-----------------
1. ``read``/``write`` check the buffer (contiguous CPU tensor) and range, refuse a buffer that overlaps
   one still in flight (:class:`BufferInUseError`: silently waiting could deadlock a pipeline, and two
   requests racing on one buffer are a bug in the caller), and pass the raw address to C++. The
   :class:`IOHandle` keeps the tensor alive until the request is done.
2. C++ splits the request on the block grid of the logical file (``block_size`` bytes; a stripe unit is a
   whole number of blocks), maps each chunk to its stripe (unit ``i`` lives in ``dirs[i % len(dirs)]``),
   and issues the chunks in parallel. Inside a chunk the 4096-aligned middle goes O_DIRECT (through an
   aligned bounce buffer if the caller's address is not aligned); an unaligned head or tail goes through
   the page cache, which merges sub-page writes safely under its page lock. So any offset, length and
   address work, and aligned ones take the fast path.
3. Completion runs on the backend's threads without the GIL; ``wait`` sleeps in C++ with the GIL
   released. Completion order does not follow submission order.

Error model
-----------
Every I/O failure is a :class:`SwapIOError` (an ``OSError``) with ``errno``, ``filename`` (the part file
on disk) and ``offset`` (in that file), plus the swap file's name and logical offset; its message names
both. A failed chunk fails its request (``wait`` raises; other requests are unaffected); a request that
fails in several chunks reports the lowest offset. Causes:

* ``ENOSPC``, ``EIO``, ... as returned by the kernel. Swap files are preallocated, so a full disk is
  normally caught by :meth:`Swapper.file`, before any data is at stake.
* ``ENODATA``: a short read (the part file ends before the requested range, e.g. truncated behind our
  back), or a read past the end of the swap file (raised at submission; a write there is ``EFBIG``).
* ``EIO`` "checksum mismatch" with ``checksum=True``: every block written whole gets an XXH64 kept in
  memory and is verified when read back whole. Blocks only partly written, or written by an earlier
  process, cannot be verified.
* ``EIO`` on reading a range whose last write failed: the failed chunk's bytes are poisoned until
  rewritten successfully, so half-written data is never returned as if it were good (in every mode, not
  only with checksums).
* A swap directory that is missing or not writable fails the constructor. A file system without
  O_DIRECT (``open`` fails with EINVAL: ramfs, tmpfs before Linux 6.6, some FUSE) falls back to buffered
  I/O with a ``RuntimeWarning``; ``direct=False`` asks for buffered I/O outright.

Errors of requests nobody waited for are not lost: :meth:`Swapper.wait_all` (and ``close``) raise the first
one. Fault injection for tests lives in C++: ``ratel._swapper.inject_fault(op, errno, after, count, partial,
delay)`` (see csrc/swapper/README.md).
"""
from __future__ import annotations

import bisect
import copy
import errno as errnos
import os
import threading
import warnings

import torch

from ratel.ir.layout import PAGE, ceil_div, round_up

try:
    from ratel import _swapper as _native
except ImportError:  # not built: aligned_empty and the error types still work
    _native = None

__all__ = ["Swapper", "SwapFile", "IOHandle", "SwapIOError", "BufferInUseError", "aligned_empty",
           "uring_available", "ALIGNMENT", "BACKENDS"]

# O_DIRECT alignment of offsets, lengths and addresses (covers 512e and 4Kn drives).
ALIGNMENT = PAGE
assert _native is None or _native.ALIGNMENT == ALIGNMENT
BACKENDS = ("auto", "uring", "threads")

# Defaults measured with benchmarks/swapper.py; numbers in csrc/swapper/README.md and benchmarks/RESULTS.md.
# NOTE: the stripe size is part of a striped file's name, so changing DEFAULT_STRIPE_SIZE makes the next
# run create new files instead of reusing (and misreading) the old layout.
# On the H100 machine's virtual disk, 16 MiB blocks with 4 in flight did best (io_uring: 105 % of raw dd
# writes, 99 % of reads); deeper queues of small blocks read at ~83 % (benchmarks/RESULTS.md, 2026-11-27).
DEFAULT_BLOCK_SIZE = 16 << 20
DEFAULT_QUEUE_DEPTH = {"uring": 4, "threads": 4}
DEFAULT_STRIPE_SIZE = 1 << 20
# "auto" tries these in order. Both backends reach the disk's limit at the default block size and queue depth,
# within noise (dev VM, README); io_uring does it with one thread instead of queue_depth and less CPU per GB at
# small blocks, so it goes first. With checksum=True every block is hashed on the backend's threads: the ring
# has one, the pool has queue_depth, so threads go first (dev VM: 2.5 vs 1.9-2.1 GB/s write with checksums).
_AUTO_ORDER = ("uring", "threads")
_AUTO_ORDER_CHECKSUM = ("threads", "uring")

# A timeout=None wait sleeps in C++ in slices of this many seconds, so that Ctrl-C still gets through.
_WAIT_SLICE_S = 0.25


class SwapIOError(OSError):
    """An I/O failure of the swapper, naming the file on disk and the offset in it.

    ``errno``, ``strerror`` and ``filename`` are the usual ``OSError`` fields; ``offset`` is the byte offset
    in ``filename``; ``swap_file`` and ``logical_offset`` locate it in the logical swap file; ``op`` is
    ``"read"``, ``"write"`` or what was being done (``"open"``, ``"preallocate"``).
    """

    def __init__(self, errno: int, strerror: str, filename: str | None = None, offset: int | None = None, *,
                 op: str | None = None, swap_file: str | None = None, logical_offset: int | None = None):
        super().__init__(errno, strerror, filename)
        self.offset = offset
        self.op = op
        self.swap_file = swap_file
        self.logical_offset = logical_offset

    def __str__(self) -> str:
        text = f"[Errno {self.errno}] {self.strerror}"
        where = []
        if self.op:
            where.append(self.op)
        if self.offset is not None:
            where.append(f"at offset {self.offset}")
        if self.filename is not None:
            where.append(f"of '{self.filename}'" if self.offset is not None else f"'{self.filename}'")
        if where:
            text += ": " + " ".join(where)
        if self.swap_file is not None:
            text += f" (swap file '{self.swap_file}'"
            if self.logical_offset is not None:
                text += f", logical offset {self.logical_offset}"
            text += ")"
        return text

    def __reduce__(self):
        return (_rebuild_error, (self.errno, self.strerror, self.filename, self.offset, self.op,
                                 self.swap_file, self.logical_offset))


def _rebuild_error(errno, strerror, filename, offset, op, swap_file, logical_offset):
    return SwapIOError(errno, strerror, filename, offset, op=op, swap_file=swap_file,
                       logical_offset=logical_offset)


class BufferInUseError(RuntimeError):
    """A request would use host memory that a request still in flight reads or writes."""


def aligned_empty(nbytes: int, alignment: int = ALIGNMENT, *, pin_memory: bool = False) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor of ``nbytes`` whose data_ptr is a multiple of ``alignment``.

    Over-allocates by ``alignment`` and slices; the slice keeps the allocation alive. ``pin_memory=True``
    needs a CUDA build of torch.
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, not {nbytes}")
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two, not {alignment}")
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8, pin_memory=pin_memory)
    shift = -raw.data_ptr() % alignment
    return raw[shift:shift + nbytes]


def uring_available() -> tuple[bool, str]:
    """``(True, "")`` when io_uring works in this process, else ``(False, reason)``."""
    if _native is None:
        return False, "ratel._swapper is not built"
    return _native.uring_available()


def _size_label(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"a swap file name must be a non-empty string, not {name!r}")
    parts = name.split("/")
    if name.startswith("/") or "\0" in name or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad swap file name {name!r}: use relative names like 'model-1a2b/layers.3.adam' "
                         "(no empty, '.' or '..' components, no leading '/')")


def _buffer_of(buf) -> tuple[int, int]:
    if not isinstance(buf, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, not {type(buf).__name__}")
    if buf.device.type != "cpu":
        raise TypeError(f"the swapper moves host memory; got a tensor on {buf.device}")
    if not buf.is_contiguous():
        raise ValueError("the swapper needs a contiguous tensor")
    return buf.data_ptr(), buf.numel() * buf.element_size()


class SwapFile:
    """A logical swap file: ``nbytes`` bytes striped over one part file per swap directory.

    ``paths`` are the part files, ``reused`` tells whether they existed with the right size (their
    content is then whatever an earlier run left), ``direct`` whether every part uses O_DIRECT.
    """

    def __init__(self, swapper: Swapper, name: str, nbytes: int, paths: tuple[str, ...], reused: bool,
                 native):
        self.name = name
        self.nbytes = nbytes
        self.paths = paths
        self.reused = reused
        self.direct = all(native.direct)
        self._swapper = swapper
        self._native = native

    def locate(self, offset: int) -> tuple[str, int]:
        """The part file and the offset in it that hold logical byte ``offset``."""
        stripe, n = self._swapper.stripe_size, len(self.paths)
        unit = offset // stripe
        return self.paths[unit % n], (unit // n) * stripe + offset % stripe

    def __repr__(self) -> str:
        return (f"SwapFile({self.name!r}, nbytes={self.nbytes}, parts={len(self.paths)}, "
                f"reused={self.reused}, direct={self.direct})")


class IOHandle:
    """An asynchronous read or write; keeps its buffer alive until done.

    ``wait`` raises the request's :class:`SwapIOError`, or ``TimeoutError`` if ``timeout`` passes first.
    """

    __slots__ = ("op", "file", "offset", "nbytes", "_swapper", "_req", "_buffer", "_addr", "_error",
                 "_settled", "_observed")

    def __init__(self, swapper: Swapper | None, req, buffer, addr: int, op: str, file: SwapFile,
                 offset: int, nbytes: int):
        self.op = op
        self.file = file
        self.offset = offset
        self.nbytes = nbytes
        self._swapper = swapper
        self._req = req
        self._buffer = buffer
        self._addr = addr
        self._error: SwapIOError | None = None
        self._settled = req is None
        self._observed = False

    def done(self) -> bool:
        return self._req is None or self._req.done()

    def wait(self, timeout: float | None = None) -> None:
        if self._req is not None and not self._req.done():
            if timeout is None:
                while not self._req.wait(_WAIT_SLICE_S):
                    pass
            elif not self._req.wait(max(float(timeout), 0.0)):
                raise TimeoutError(f"{self.op} of {self.nbytes} bytes at offset {self.offset} of swap file "
                                   f"'{self.file.name}' still in flight after {timeout} s")
        error = self.exception()
        if error is not None:
            raise error

    def exception(self) -> SwapIOError | None:
        """The failure once done (None if it succeeded or is still in flight); counts as observed."""
        if not self.done():
            return None
        if not self._settled and self._swapper is not None:
            self._swapper._settle(self)
        self._observed = True
        return self._error

    def __repr__(self) -> str:
        state = "failed" if self._error is not None else "done" if self.done() else "in flight"
        return (f"IOHandle({self.op}, '{self.file.name}', offset={self.offset}, nbytes={self.nbytes}, "
                f"{state})")


class Swapper:
    """Asynchronous reads and writes between host tensors and swap files striped over ``dirs``.

    ``block_size``: bytes per chunk (a multiple of 4096); requests are split into chunks issued in
    parallel. ``queue_depth``: chunks in flight (io_uring) or worker threads. ``stripe_size``: bytes of one
    stripe unit, a multiple of ``block_size``. ``direct=False``: buffered I/O. ``checksum=True``: verify
    every block read back against a hash taken when it was written.
    """

    def __init__(self, dirs, block_size: int | None = None, queue_depth: int | None = None,
                 backend: str = "auto", checksum: bool = False, direct: bool = True,
                 stripe_size: int | None = None):
        if _native is None:
            raise RuntimeError("ratel._swapper is not built: run `pip install --no-build-isolation -e .`")
        self._engine = None  # so that __del__ works whatever fails below
        self._closed = True
        if isinstance(dirs, (str, os.PathLike)):
            dirs = [dirs]
        self.dirs = tuple(os.path.abspath(os.fspath(d)) for d in dirs)
        if not self.dirs:
            raise ValueError("the swapper needs at least one directory")
        if len(set(self.dirs)) != len(self.dirs):
            raise ValueError(f"swap directories repeat: {self.dirs}")
        self.block_size = int(block_size or DEFAULT_BLOCK_SIZE)
        if self.block_size <= 0 or self.block_size % ALIGNMENT:
            raise ValueError(f"block_size must be a positive multiple of {ALIGNMENT}, not {self.block_size}")
        self.stripe_size = int(stripe_size or max(DEFAULT_STRIPE_SIZE, self.block_size))
        if self.stripe_size <= 0 or self.stripe_size % self.block_size:
            raise ValueError(f"stripe_size ({self.stripe_size}) must be a positive multiple of block_size "
                             f"({self.block_size})")
        self.checksum = bool(checksum)
        self.direct = bool(direct)

        self._warned_dirs: set[str] = set()
        for d in self.dirs:
            self._check_dir(d)

        self.backend, self.backend_note = self._resolve_backend(backend, self.checksum)
        self.queue_depth = int(queue_depth or DEFAULT_QUEUE_DEPTH[self.backend])
        if self.queue_depth < 1:
            raise ValueError(f"queue_depth must be >= 1, not {self.queue_depth}")
        try:
            self._engine = _native.Engine(self.backend, self.block_size, self.queue_depth, self.checksum)
        except OSError as e:
            if backend != "auto" or self.backend != "uring":
                raise
            # The probe ring worked but a full-size one did not (e.g. RLIMIT_MEMLOCK on old kernels).
            self.backend, self.backend_note = "threads", f"io_uring ring setup failed: {e}"
            self.queue_depth = int(queue_depth or DEFAULT_QUEUE_DEPTH["threads"])
            self._engine = _native.Engine("threads", self.block_size, self.queue_depth, self.checksum)
        self._closed = False
        self._lock = threading.Lock()
        self._files: dict[str, SwapFile] = {}
        # Requests not yet settled, keyed by buffer start address. Their [addr, addr + nbytes) ranges are
        # pairwise disjoint (an overlapping request is refused), so only the neighbours of a new range in
        # address order can overlap it.
        self._starts: list[int] = []
        self._by_start: dict[int, IOHandle] = {}
        self._prune_at = 256
        self._failed: list[IOHandle] = []  # settled with an error, maybe not yet seen by anyone

    # ---- setup ------------------------------------------------------------------------------------------

    def _check_dir(self, d: str) -> None:
        if not os.path.exists(d):
            raise SwapIOError(errnos.ENOENT, "swap directory does not exist", d, op="open")
        if not os.path.isdir(d):
            raise SwapIOError(errnos.ENOTDIR, "swap directory is not a directory", d, op="open")
        probe = os.path.join(d, f".ratel-probe-{os.getpid()}-{threading.get_ident()}")
        try:
            fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise SwapIOError(e.errno, f"swap directory is not writable ({e.strerror})", d, op="open") from e
        try:
            os.close(fd)
            if self.direct:
                try:
                    os.close(os.open(probe, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC))
                except OSError as e:
                    if e.errno != errnos.EINVAL:
                        raise SwapIOError(e.errno, e.strerror, d, op="open") from e
                    self._warn_buffered(d, stacklevel=4)
        finally:
            os.unlink(probe)

    def _warn_buffered(self, d: str, stacklevel: int) -> None:
        if d not in self._warned_dirs:
            self._warned_dirs.add(d)
            warnings.warn(f"swap directory {d}: the file system does not support O_DIRECT; falling back to "
                          "buffered I/O through the page cache (correct, but it competes for host memory)",
                          RuntimeWarning, stacklevel=stacklevel)

    @staticmethod
    def _resolve_backend(requested: str, checksum: bool) -> tuple[str, str]:
        if requested == "auto":
            requested = os.environ.get("RATEL_SWAPPER_BACKEND", "auto") or "auto"
        requested = {"io_uring": "uring"}.get(requested, requested)
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {requested!r}")
        ok, why = _native.uring_available()
        if requested == "uring" and not ok:
            raise RuntimeError(f"the io_uring backend is not usable here: {why}")
        if requested != "auto":
            return requested, ""
        for name in _AUTO_ORDER_CHECKSUM if checksum else _AUTO_ORDER:
            if name == "uring" and ok:
                return name, ""
            if name == "threads":
                return name, "" if ok else f"io_uring unavailable: {why}"
        raise AssertionError("unreachable")

    # ---- files ------------------------------------------------------------------------------------------

    def _part_paths(self, name: str) -> tuple[str, ...]:
        n = len(self.dirs)
        if n == 1:
            return (os.path.join(self.dirs[0], name + ".swap"),)
        # The stripe geometry is in the name, so a run with other dirs or stripe never misreads old files.
        tag = _size_label(self.stripe_size)
        return tuple(os.path.join(d, f"{name}.{i}of{n}-{tag}.swap") for i, d in enumerate(self.dirs))

    def _part_sizes(self, nbytes: int) -> list[int]:
        # Parts are padded to ALIGNMENT so that the last block can go O_DIRECT too.
        n, stripe = len(self.dirs), self.stripe_size
        padded = round_up(nbytes, ALIGNMENT)
        units = ceil_div(padded, stripe)
        sizes = [0] * n
        if units == 0:
            return sizes
        full = units - 1
        for i in range(n):
            sizes[i] = (full - i + n - 1) // n * stripe if full > i else 0
        sizes[full % n] += padded - full * stripe
        return sizes

    def file(self, name: str, nbytes: int) -> SwapFile:
        """The swap file ``name`` of ``nbytes`` bytes: created and preallocated, or reused if its part
        files exist with the right size. The same name always maps to the same paths."""
        self._check_open()
        _check_name(name)
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, not {nbytes}")
        with self._lock:
            known = self._files.get(name)
            if known is not None:
                if known.nbytes != nbytes:
                    raise ValueError(f"swap file {name!r} is already open with {known.nbytes} bytes, "
                                     f"not {nbytes}")
                return known
            paths = self._part_paths(name)
            sizes = self._part_sizes(nbytes)
            reused = all(os.path.isfile(p) and os.path.getsize(p) == s for p, s in zip(paths, sizes))
            if not reused:
                self._create_parts(paths, sizes)
            try:
                native = self._engine.open_file(name, list(paths), nbytes, self.stripe_size, self.direct)
            except OSError as e:
                raise SwapIOError(e.errno, e.strerror, e.filename, op="open", swap_file=name) from e
            if self.direct:
                for d, path, direct in zip(self.dirs, paths, native.direct):
                    if not direct:
                        self._warn_buffered(d, stacklevel=3)
            f = SwapFile(self, name, nbytes, paths, reused, native)
            self._files[name] = f
            return f

    def _create_parts(self, paths, sizes) -> None:
        created = []
        try:
            for path, size in zip(paths, sizes):
                parent = os.path.dirname(path)
                try:
                    os.makedirs(parent, exist_ok=True)
                except OSError as e:
                    raise SwapIOError(e.errno, e.strerror, parent, op="mkdir") from e
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                except OSError as e:
                    raise SwapIOError(e.errno, e.strerror, path, op="create") from e
                created.append(path)
                try:
                    # Old content has the wrong layout or size: start from an empty file.
                    os.ftruncate(fd, 0)
                    if size:
                        self._preallocate(fd, path, size)
                finally:
                    os.close(fd)
        except BaseException:
            for path in created:  # never leave a file of the wrong size to be "reused" by the next run
                try:
                    os.unlink(path)
                except OSError:
                    pass
            raise

    @staticmethod
    def _preallocate(fd: int, path: str, size: int) -> None:
        # Reserving the space now makes a full disk fail here, naming the file, instead of half-way through
        # a training step; it also keeps later direct writes from allocating extents on the fly.
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as e:
            if e.errno not in (errnos.EOPNOTSUPP, errnos.EINVAL, errnos.ENOSYS):
                raise SwapIOError(e.errno, f"{e.strerror} (reserving {size} bytes)", path, 0,
                                  op="preallocate") from e
        os.ftruncate(fd, size)  # file system cannot preallocate: a sparse file still works

    # ---- I/O --------------------------------------------------------------------------------------------

    def write(self, file: SwapFile, offset: int, tensor: torch.Tensor) -> IOHandle:
        """Starts writing ``tensor``'s bytes to ``file`` at byte ``offset``; do not modify it until done."""
        return self._submit("write", file, offset, tensor)

    def read(self, file: SwapFile, offset: int, tensor: torch.Tensor) -> IOHandle:
        """Starts reading ``tensor.nbytes`` bytes of ``file`` at byte ``offset`` into ``tensor``."""
        return self._submit("read", file, offset, tensor)

    def _submit(self, op: str, file: SwapFile, offset: int, buf) -> IOHandle:
        self._check_open()
        if not isinstance(file, SwapFile) or file._swapper is not self:
            raise ValueError("the file does not belong to this swapper (open it with Swapper.file)")
        addr, nbytes = _buffer_of(buf)
        offset = int(offset)
        if offset < 0 or offset + nbytes > file.nbytes:
            path, physical = file.locate(max(offset, 0))
            err = errnos.ENODATA if op == "read" else errnos.EFBIG
            raise SwapIOError(err, f"{nbytes} bytes at logical offset {offset} are past the end of the "
                                   f"{file.nbytes}-byte swap file", path, physical, op=op,
                              swap_file=file.name, logical_offset=offset)
        if nbytes == 0:
            return IOHandle(None, None, None, addr, op, file, offset, 0)
        with self._lock:
            self._check_overlap(addr, nbytes, op, file, offset)
            req = self._engine.submit(op, file._native, offset, addr, nbytes)
            handle = IOHandle(self, req, buf, addr, op, file, offset, nbytes)
            bisect.insort(self._starts, addr)
            self._by_start[addr] = handle
            if len(self._starts) > self._prune_at:
                self._prune_locked()
        return handle

    def _check_overlap(self, addr: int, nbytes: int, op: str, file: SwapFile, offset: int) -> None:
        end = addr + nbytes
        i = bisect.bisect_right(self._starts, addr)
        candidates = []
        if i > 0:
            candidates.append(self._starts[i - 1])
        while i < len(self._starts) and self._starts[i] < end:
            candidates.append(self._starts[i])
            i += 1
        for start in candidates:
            other = self._by_start[start]
            if start + other.nbytes <= addr:
                continue
            if other.done():
                self._settle_locked(other)
                continue
            raise BufferInUseError(
                f"{op} of {nbytes} bytes at offset {offset} of swap file '{file.name}': its buffer "
                f"[{addr:#x}, +{nbytes}) overlaps the buffer of {other!r}, which is still in flight; "
                "wait() on that request first")

    def _settle(self, handle: IOHandle) -> None:
        with self._lock:
            self._settle_locked(handle)

    def _settle_locked(self, handle: IOHandle) -> None:
        """Moves a done request out of the in-flight registry and turns its failure into SwapIOError."""
        if handle._settled:
            return
        handle._settled = True
        if self._by_start.get(handle._addr) is handle:
            del self._by_start[handle._addr]
            del self._starts[bisect.bisect_left(self._starts, handle._addr)]
        handle._buffer = None
        error = handle._req.error()
        if error is not None:
            err, detail, path, physical, logical = error
            strerror = os.strerror(err) + (f" ({detail})" if detail else "")
            handle._error = SwapIOError(err, strerror, path, physical, op=handle.op,
                                        swap_file=handle.file.name, logical_offset=logical)
            self._failed.append(handle)

    def _prune_locked(self) -> None:
        # Requests nobody waits for would otherwise pin their buffers; amortised O(1) per request.
        for start in list(self._starts):
            handle = self._by_start[start]
            if handle.done():
                self._settle_locked(handle)
        self._failed = [h for h in self._failed if not h._observed]
        self._prune_at = max(256, 2 * len(self._starts))

    def wait_all(self) -> None:
        """Waits for every request; then raises the first failure that no ``wait`` has reported yet."""
        if self._engine is None:
            return
        with self._lock:
            pending = list(self._by_start.values())
        for handle in pending:
            while not handle._req.wait(_WAIT_SLICE_S):
                pass
        self._engine.drain()
        with self._lock:
            for handle in pending:
                self._settle_locked(handle)
            unseen = [h for h in self._failed if not h._observed]
            self._failed.clear()
        if unseen:
            for h in unseen:
                h._observed = True
            error = copy.copy(unseen[0]._error)  # the note below belongs to this report, not to the handle
            if len(unseen) > 1:
                error.add_note(f"{len(unseen) - 1} more request(s) failed: "
                               + "; ".join(str(h._error) for h in unseen[1:4]))
            raise error

    # ---- state ------------------------------------------------------------------------------------------

    def stats(self) -> dict:
        out = {"backend": self.backend, "block_size": self.block_size, "queue_depth": self.queue_depth,
               "stripe_size": self.stripe_size, "checksum": self.checksum, "direct": self.direct,
               "dirs": list(self.dirs), "files": len(self._files), "backend_note": self.backend_note}
        if self._engine is not None:
            out.update(self._engine.stats())
            out["inflight"] = self._engine.inflight()
        return out

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the swapper is closed")

    def close(self, remove: bool = True) -> None:
        """Waits for every request, stops the I/O threads and closes the files; ``remove=True`` deletes
        the swap files (and the directories their names created, once empty). Raises like ``wait_all``."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait_all()
        finally:
            self._engine.close()
            if remove:
                self._remove_files()

    def _remove_files(self) -> None:
        for f in self._files.values():
            for root, path in zip(self.dirs, f.paths):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                parent = os.path.dirname(path)
                while parent != root and parent.startswith(root + os.sep):
                    try:
                        os.rmdir(parent)
                    except OSError:
                        break  # not empty: other files live there
                    parent = os.path.dirname(parent)
        self._files.clear()

    def __enter__(self) -> Swapper:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # Buffers of requests in flight must outlive the kernel's use of them: drain before Python frees
        # anything. Files go as with close() (stale swap files must not pile up run after run).
        if getattr(self, "_closed", True) or self._engine is None:
            return
        try:
            self._closed = True
            self._engine.close()
            self._remove_files()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"Swapper(dirs={list(self.dirs)}, backend={self.backend!r}, block_size={self.block_size}, "
                f"queue_depth={self.queue_depth}, stripe_size={self.stripe_size}, checksum={self.checksum}, "
                f"direct={self.direct}{', closed' if self._closed else ''})")
