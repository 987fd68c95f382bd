"""Tests of the NVMe swapper (ratel.runtime.swapper + csrc/swapper): data round-trips byte for byte on every
path, and every failure surfaces as the right exception naming the file and the offset.

Faults come from the C++ hook ``ratel._swapper.inject_fault``; where the real condition is cheap to make
(a missing directory, /sys, a file truncated behind our back, a tiny tmpfs or a ramfs mounted in a user
namespace) it is tested for real too.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from helpers import subprocess_env
from ratel.runtime import swapper as swapper_mod
from ratel.runtime.swapper import (ALIGNMENT, BufferInUseError, IOHandle, SwapFile, SwapIOError, Swapper,
                                   aligned_empty, uring_available)

_native = pytest.importorskip("ratel._swapper")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KiB, MiB = 1 << 10, 1 << 20
BACKENDS = ["threads"] + (["uring"] if uring_available()[0] else [])


@pytest.fixture(autouse=True)
def _no_leftover_faults():
    _native.clear_faults()
    yield
    _native.clear_faults()


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def direct_io_supported(path) -> bool:
    """Whether the file system under `path` takes O_DIRECT (CI may put tmp_path on an old tmpfs)."""
    probe = os.path.join(path, ".direct-probe")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600))
        return True
    except OSError:
        return False
    finally:
        if os.path.exists(probe):
            os.unlink(probe)


def make_dirs(tmp_path, n):
    dirs = [tmp_path / f"ssd{i}" for i in range(n)]
    for d in dirs:
        d.mkdir()
    return [str(d) for d in dirs]


def random_bytes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


def misaligned(n: int, shift: int) -> torch.Tensor:
    """A uint8 tensor of n bytes whose address is `shift` bytes past a 4096 boundary."""
    return aligned_empty(n + shift)[shift:]


def assert_names_location(exc: SwapIOError, path: str, offset: int) -> None:
    assert exc.filename == path
    assert exc.offset == offset
    assert path in str(exc) and f"offset {offset}" in str(exc)


# ---- round trips ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ndirs", [1, 3])
@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("direct", [True, False])
def test_round_trip_every_path(tmp_path, backend, direct, checksum, ndirs):
    dirs = make_dirs(tmp_path, ndirs)
    direct_expected = direct and direct_io_supported(dirs[0])
    nbytes = 3 * MiB + 12345
    with Swapper(dirs, block_size=64 * KiB, queue_depth=8, backend=backend, checksum=checksum, direct=direct,
                 stripe_size=128 * KiB) as sw:
        assert sw.backend == backend
        f = sw.file("model/unit3.states", nbytes)
        assert f.direct == direct_expected and len(f.paths) == ndirs
        data = random_bytes(nbytes, seed=1)
        src = aligned_empty(nbytes)
        src.copy_(data)
        sw.write(f, 0, src).wait()
        # Overwrite an unaligned middle range from an unaligned buffer, then read everything back.
        patch = random_bytes(200_001, seed=2)
        sw.write(f, 777_777, patch.clone()).wait()
        data[777_777:777_777 + patch.numel()] = patch
        out = misaligned(nbytes, 8)
        sw.read(f, 0, out).wait()
        assert torch.equal(out, data)
        part = misaligned(300_000, 1)
        sw.read(f, 123_457, part).wait()
        assert torch.equal(part, data[123_457:423_457])
        stats = sw.stats()
        assert stats["failed_requests"] == 0
        assert (stats["direct_bytes"] > 0) == direct_expected
        if checksum:
            assert stats["checksum_verified"] > 0
        if ndirs > 1:  # striped: every directory holds a part of the data
            assert all(os.path.getsize(p) > 0 for p in f.paths)


def test_typed_tensors_round_trip(tmp_path, backend):
    with Swapper(make_dirs(tmp_path, 1), backend=backend) as sw:
        x = torch.randn(1000, 37, dtype=torch.float32)
        y = torch.randn(513, dtype=torch.bfloat16)
        f = sw.file("typed", x.nbytes + y.nbytes)
        sw.write(f, 0, x)
        sw.write(f, x.nbytes, y)
        sw.wait_all()
        x2, y2 = torch.empty_like(x), torch.empty_like(y)
        sw.read(f, 0, x2).wait()
        sw.read(f, x.nbytes, y2).wait()
        assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize("offset", [0, 1, 4095, 4096, 4097, 12345])
@pytest.mark.parametrize("length", [1, 511, 4096, 4097, MiB + 3])
def test_odd_sizes_offsets_and_addresses(tmp_path, offset, length):
    """Unaligned heads and tails must change exactly the requested bytes and nothing around them."""
    nbytes = 2 * MiB + 4099  # odd file size too
    with Swapper(make_dirs(tmp_path, 2), block_size=256 * KiB, queue_depth=4) as sw:
        f = sw.file("odd", nbytes)
        background = random_bytes(nbytes, seed=3)
        sw.write(f, 0, background.clone()).wait()
        for shift in (0, 1, 64):
            data = random_bytes(length, seed=4 + shift)
            buf = misaligned(length, shift)
            buf.copy_(data)
            sw.write(f, offset, buf).wait()
            background[offset:offset + length] = data
            back = misaligned(length, 3 * shift % 4096)
            sw.read(f, offset, back).wait()
            assert torch.equal(back, data)
        whole = aligned_empty(nbytes)
        sw.read(f, 0, whole).wait()
        assert torch.equal(whole, background)


def test_packed_odd_tensors_written_concurrently(tmp_path, backend):
    """Tensors packed back to back share pages; concurrent writes to neighbours must not clobber each
    other (a read-modify-write of shared blocks would)."""
    sizes = [4093, 1, 77, 8191, 4096, 5000, 3, 12289] * 20
    nbytes = sum(sizes)
    with Swapper(make_dirs(tmp_path, 1), block_size=64 * KiB, queue_depth=16, backend=backend) as sw:
        f = sw.file("packed", nbytes)
        expect = random_bytes(nbytes, seed=5)
        handles, off = [], 0
        for n in sizes:
            handles.append(sw.write(f, off, expect[off:off + n].clone()))
            off += n
        for h in handles:
            h.wait()
        out = aligned_empty(nbytes)
        sw.read(f, 0, out).wait()
        assert torch.equal(out, expect)


def test_many_concurrent_requests(tmp_path, backend):
    n_requests = 400
    g = torch.Generator().manual_seed(6)
    lengths = torch.randint(1, 40_000, (n_requests,), generator=g).tolist()
    offsets, pos = [], 0
    for n in lengths:
        pos += int(torch.randint(0, 5000, (1,), generator=g))  # gaps, and unaligned starts
        offsets.append(pos)
        pos += n
    with Swapper(make_dirs(tmp_path, 2), block_size=16 * KiB, queue_depth=32, backend=backend,
                 checksum=True) as sw:
        f = sw.file("many", pos)
        bufs = [random_bytes(n, seed=100 + i) for i, n in enumerate(lengths)]
        writes = [sw.write(f, o, b) for o, b in zip(offsets, bufs)]
        for h in reversed(writes):
            h.wait()
        outs = [torch.empty(n, dtype=torch.uint8) for n in lengths]
        reads = [sw.read(f, o, b) for o, b in zip(offsets, outs)]
        order = torch.randperm(n_requests, generator=g).tolist()
        for i in order:
            reads[i].wait()
        assert all(h.done() for h in reads)
        for b, o in zip(bufs, outs):
            assert torch.equal(b, o)
        assert sw.stats()["requests"] == 2 * n_requests


def test_completion_order_independent_of_submission(tmp_path, backend):
    """A stalled earlier request must not hold back later ones."""
    with Swapper(make_dirs(tmp_path, 1), block_size=64 * KiB, queue_depth=4, backend=backend) as sw:
        f = sw.file("order", MiB)
        data = random_bytes(MiB, seed=7)
        sw.write(f, 0, data).wait()
        first_buf, second_buf = torch.empty(4096, dtype=torch.uint8), torch.empty(4096, dtype=torch.uint8)
        _native.inject_fault("read", None, delay=1.0)  # the next read syscall stalls for a second
        first = sw.read(f, 0, first_buf)
        second = sw.read(f, 8192, second_buf)
        second.wait(timeout=0.9)
        assert not first.done()
        first.wait()
        assert torch.equal(first_buf, data[:4096]) and torch.equal(second_buf, data[8192:12288])


def test_wait_releases_the_gil_and_times_out(tmp_path, backend):
    with Swapper(make_dirs(tmp_path, 1), backend=backend) as sw:
        f = sw.file("gil", 4096)
        counter = [0]
        stop = threading.Event()

        def spin():
            while not stop.is_set():
                counter[0] += 1

        _native.inject_fault("write", None, delay=0.5)
        h = sw.write(f, 0, torch.zeros(4096, dtype=torch.uint8))
        with pytest.raises(TimeoutError):
            h.wait(timeout=0.01)
        t = threading.Thread(target=spin)
        t.start()
        before = counter[0]
        h.wait()
        stop.set()
        t.join()
        assert counter[0] > before  # the other Python thread ran while this one waited in C++
        assert h.done()


def test_zero_length_request(tmp_path):
    with Swapper(make_dirs(tmp_path, 1)) as sw:
        f = sw.file("empty", 0)
        h = sw.read(f, 0, torch.empty(0, dtype=torch.uint8))
        assert h.done()
        h.wait()


# ---- buffers in flight ------------------------------------------------------------------------------------

def test_buffer_in_flight_is_refused(tmp_path, backend):
    with Swapper(make_dirs(tmp_path, 1), backend=backend) as sw:
        f = sw.file("inflight", 2 * MiB)
        buf = aligned_empty(MiB)
        _native.inject_fault("read", None, delay=0.5)
        h = sw.read(f, 0, buf)
        with pytest.raises(BufferInUseError, match="still in flight"):
            sw.write(f, MiB, buf[4096:8192])  # overlaps the middle
        with pytest.raises(BufferInUseError):
            sw.read(f, MiB, buf)
        other = aligned_empty(4096)
        sw.write(f, MiB, other).wait()  # a different buffer is fine meanwhile
        h.wait()
        sw.write(f, MiB, buf).wait()  # and the buffer is free again once its request is done
        # A done request never waited for does not block its buffer either.
        h2 = sw.read(f, 0, buf)
        while not h2.done():
            time.sleep(0.001)
        sw.read(f, 0, buf).wait()


def test_handle_keeps_buffer_alive(tmp_path, backend):
    with Swapper(make_dirs(tmp_path, 1), backend=backend) as sw:
        f = sw.file("alive", MiB)
        sw.write(f, 0, random_bytes(MiB, seed=8)).wait()
        _native.inject_fault("read", None, delay=0.2)
        h = sw.read(f, 0, torch.empty(MiB, dtype=torch.uint8))  # nobody else holds this tensor
        del h
        sw.wait_all()  # the kernel wrote into memory that was still owned; no crash, no error


# ---- injected errors --------------------------------------------------------------------------------------

def test_enospc_on_write_fails_only_that_request(tmp_path, backend):
    dirs = make_dirs(tmp_path, 1)
    with Swapper(dirs, block_size=64 * KiB, queue_depth=1, backend=backend) as sw:
        f = sw.file("full", MiB)
        good1, bad, good2 = (random_bytes(256 * KiB, seed=s) for s in (9, 10, 11))
        h1 = sw.write(f, 0, good1)
        h1.wait()
        # queue_depth 1 issues chunks in order: the third 64 KiB chunk of the next request fails.
        _native.inject_fault("write", errno.ENOSPC, after=2)
        h2 = sw.write(f, 256 * KiB, bad)
        h3 = sw.write(f, 512 * KiB, good2)
        with pytest.raises(SwapIOError) as info:
            h2.wait()
        exc = info.value
        assert isinstance(exc, OSError) and exc.errno == errno.ENOSPC
        assert_names_location(exc, f.paths[0], 256 * KiB + 2 * 64 * KiB)
        assert exc.swap_file == "full" and exc.op == "write"
        h3.wait()
        out = torch.empty(256 * KiB, dtype=torch.uint8)
        sw.read(f, 512 * KiB, out).wait()
        assert torch.equal(out, good2)
        sw.read(f, 0, out).wait()
        assert torch.equal(out, good1)
        # The failed chunk's bytes are unknown: reading them fails instead of returning them...
        with pytest.raises(SwapIOError) as info:
            sw.read(f, 256 * KiB, out).wait()
        assert info.value.errno == errno.EIO and "earlier write" in str(info.value)
        assert_names_location(info.value, f.paths[0], 256 * KiB + 2 * 64 * KiB)
        # ... until they are written successfully again.
        sw.write(f, 256 * KiB, bad).wait()
        sw.read(f, 256 * KiB, out).wait()
        assert torch.equal(out, bad)


def test_eio_on_read_names_file_and_offset(tmp_path, backend):
    dirs = make_dirs(tmp_path, 2)
    with Swapper(dirs, block_size=64 * KiB, queue_depth=1, backend=backend, stripe_size=64 * KiB) as sw:
        f = sw.file("eio", MiB)
        data = random_bytes(MiB, seed=12)
        sw.write(f, 0, data).wait()
        _native.inject_fault("read", errno.EIO, after=3)  # 4th chunk: stripe unit 3 -> part 1, offset 64K
        out = torch.empty(MiB, dtype=torch.uint8)
        with pytest.raises(SwapIOError) as info:
            sw.read(f, 0, out).wait()
        assert info.value.errno == errno.EIO
        assert_names_location(info.value, f.paths[1], 64 * KiB)
        assert info.value.logical_offset == 3 * 64 * KiB
        sw.read(f, 0, out).wait()  # a transient EIO does not poison anything
        assert torch.equal(out, data)


def test_short_read_injected(tmp_path, backend):
    with Swapper(make_dirs(tmp_path, 1), block_size=64 * KiB, queue_depth=1, backend=backend) as sw:
        f = sw.file("short", 256 * KiB)
        data = random_bytes(256 * KiB, seed=13)
        sw.write(f, 0, data).wait()
        out = torch.empty(256 * KiB, dtype=torch.uint8)
        _native.inject_fault("read", 0, after=1)  # the kernel returns 0 bytes: end of file
        with pytest.raises(SwapIOError) as info:
            sw.read(f, 0, out).wait()
        assert info.value.errno == errno.ENODATA and "short read" in str(info.value)
        assert_names_location(info.value, f.paths[0], 64 * KiB)
        # A partial transfer (half, then the rest) is resumed, not an error.
        _native.inject_fault("read", 0, count=3, partial=True)
        out.zero_()
        sw.read(f, 0, out).wait()
        assert torch.equal(out, data)
        assert sw.stats()["resumed_partial"] >= 3


def test_short_write_injected(tmp_path, backend):
    with Swapper(make_dirs(tmp_path, 1), block_size=64 * KiB, queue_depth=1, backend=backend) as sw:
        f = sw.file("shortw", 128 * KiB)
        _native.inject_fault("write", 0)
        with pytest.raises(SwapIOError) as info:
            sw.write(f, 0, torch.ones(128 * KiB, dtype=torch.uint8)).wait()
        assert info.value.errno == errno.EIO and "short write" in str(info.value)
        assert_names_location(info.value, f.paths[0], 0)


def test_unobserved_errors_surface_in_wait_all_and_close(tmp_path, backend):
    sw = Swapper(make_dirs(tmp_path, 1), queue_depth=1, backend=backend)
    f = sw.file("unseen", 64 * KiB)
    _native.inject_fault("write", errno.EIO)
    sw.write(f, 0, torch.zeros(4096, dtype=torch.uint8))  # handle dropped: nobody waits for it
    with pytest.raises(SwapIOError) as info:
        sw.wait_all()
    assert info.value.errno == errno.EIO
    sw.wait_all()  # reported once
    _native.inject_fault("write", errno.EIO)
    sw.write(f, 0, torch.zeros(4096, dtype=torch.uint8))
    with pytest.raises(SwapIOError):
        sw.close()
    assert not os.path.exists(f.paths[0])  # close still cleaned up


# ---- real error conditions --------------------------------------------------------------------------------

def test_short_read_real_truncated_file(tmp_path, backend):
    with Swapper(make_dirs(tmp_path, 1), block_size=64 * KiB, backend=backend) as sw:
        f = sw.file("trunc", 256 * KiB)
        sw.write(f, 0, random_bytes(256 * KiB, seed=14)).wait()
        os.truncate(f.paths[0], 100 * KiB)  # someone truncates the file behind the swapper's back
        out = torch.empty(64 * KiB, dtype=torch.uint8)
        with pytest.raises(SwapIOError) as info:
            sw.read(f, 128 * KiB, out).wait()
        assert info.value.errno == errno.ENODATA
        assert_names_location(info.value, f.paths[0], 128 * KiB)


def test_read_or_write_past_the_end(tmp_path):
    with Swapper(make_dirs(tmp_path, 1)) as sw:
        f = sw.file("end", 10_000)
        with pytest.raises(SwapIOError) as info:
            sw.read(f, 9_000, torch.empty(2_000, dtype=torch.uint8))
        assert info.value.errno == errno.ENODATA
        assert_names_location(info.value, f.paths[0], 9_000)
        with pytest.raises(SwapIOError) as info:
            sw.write(f, 10_000, torch.empty(1, dtype=torch.uint8))
        assert info.value.errno == errno.EFBIG


def test_missing_directory(tmp_path):
    missing = str(tmp_path / "no" / "such" / "dir")
    with pytest.raises(SwapIOError) as info:
        Swapper([missing])
    assert info.value.errno == errno.ENOENT and info.value.filename == missing
    assert missing in str(info.value)


def test_unwritable_directory():
    # Tests may run as root, for whom chmod does not make a directory read-only; /sys refuses everyone.
    if not os.path.isdir("/sys"):
        pytest.skip("no /sys")
    with pytest.raises(SwapIOError) as info:
        Swapper(["/sys"])
    assert info.value.errno in (errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOENT)
    assert info.value.filename == "/sys" and "/sys" in str(info.value)


def test_checksum_detects_corruption_on_disk(tmp_path, backend):
    with Swapper(make_dirs(tmp_path, 1), block_size=64 * KiB, backend=backend, checksum=True) as sw:
        f = sw.file("crc", 256 * KiB)
        sw.write(f, 0, random_bytes(256 * KiB, seed=15)).wait()
        fd = os.open(f.paths[0], os.O_WRONLY)  # flip bytes in the third block behind the swapper's back
        try:
            os.pwrite(fd, b"\xff\x00\xff", 2 * 64 * KiB + 1000)
            os.fsync(fd)
        finally:
            os.close(fd)
        out = aligned_empty(256 * KiB)
        with pytest.raises(SwapIOError) as info:
            sw.read(f, 0, out).wait()
        assert info.value.errno == errno.EIO and "checksum mismatch" in str(info.value)
        assert_names_location(info.value, f.paths[0], 2 * 64 * KiB)
        sw.read(f, 0, out[:2 * 64 * KiB]).wait()  # the intact blocks still read fine


def test_no_o_direct_falls_back_with_warning(tmp_path, backend):
    # The file system refuses O_DIRECT at open (EINVAL), as ramfs and old tmpfs do.
    dirs = make_dirs(tmp_path, 1)
    if not direct_io_supported(dirs[0]):
        pytest.skip("tmp_path itself has no O_DIRECT: every other test takes the fallback for real")
    with Swapper(dirs, backend=backend) as sw:
        _native.inject_fault("open", errno.EINVAL)  # the O_DIRECT open of the next file
        with pytest.warns(RuntimeWarning, match="O_DIRECT"):
            f = sw.file("buffered", 100_000)
        assert not f.direct
        data = random_bytes(100_000, seed=16)
        sw.write(f, 0, data).wait()
        out = torch.empty(100_000, dtype=torch.uint8)
        sw.read(f, 0, out).wait()
        assert torch.equal(out, data)
        assert sw.stats()["direct_bytes"] == 0


def test_open_failure_is_swap_io_error(tmp_path):
    with Swapper(make_dirs(tmp_path, 1)) as sw:
        _native.inject_fault("open", errno.EMFILE)
        with pytest.raises(SwapIOError) as info:
            sw.file("nofd", 4096)
        assert info.value.errno == errno.EMFILE and info.value.filename.endswith("nofd.swap")


_NAMESPACE_SCRIPT = textwrap.dedent("""
    import errno, json, sys, warnings, torch
    from ratel.runtime.swapper import Swapper, SwapIOError
    tiny, ram, ro = sys.argv[1:4]
    out = {}
    with Swapper([tiny]) as sw:                      # 1 MiB tmpfs: a 4 MiB swap file cannot fit
        try:
            sw.file("big", 4 << 20)
        except SwapIOError as e:
            out["enospc"] = [e.errno, e.filename, e.offset, str(e)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Swapper([ram]) as sw:                   # ramfs has no O_DIRECT
            f = sw.file("r", 100_003)
            data = torch.randint(0, 256, (100_003,), dtype=torch.uint8)
            sw.write(f, 0, data).wait()
            back = torch.empty_like(data)
            sw.read(f, 0, back).wait()
            out["ramfs"] = [bool(torch.equal(data, back)), f.direct, [str(w.message) for w in caught]]
    try:
        Swapper([ro])                                # a read-only mount
    except SwapIOError as e:
        out["readonly"] = [e.errno, e.filename]
    print("RESULT" + json.dumps(out))
""")


def test_real_conditions_in_a_user_namespace(tmp_path):
    """A real full disk, a real file system without O_DIRECT and a real read-only mount, made without
    root privileges in a private mount namespace; skipped where user namespaces are not allowed."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare not installed")
    tiny, ram, ro = (tmp_path / n for n in ("tiny", "ram", "ro"))
    for d in (tiny, ram, ro):
        d.mkdir()
    shell = (f"mount -t tmpfs -o size=1m none {tiny} && mount -t ramfs none {ram} && "
             f"mount -t tmpfs -o ro,size=1m none {ro} && exec {sys.executable} -c \"$0\" {tiny} {ram} {ro}")
    env = subprocess_env(REPO)
    try:
        proc = subprocess.run(["unshare", "-Urm", "sh", "-c", shell, _NAMESPACE_SCRIPT], capture_output=True,
                              text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("namespace script hung")
    if "RESULT" not in proc.stdout:
        if "Traceback" in proc.stderr:  # the namespace worked; the swapper did not
            pytest.fail(proc.stderr)
        pytest.skip(f"cannot mount in a user namespace here: {proc.stderr.strip()[-200:]}")
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    err, filename, offset, message = result["enospc"]
    assert err == errno.ENOSPC and filename == str(tiny / "big.swap") and offset == 0
    assert filename in message and "offset 0" in message
    assert not (tiny / "big.swap").exists()  # no half-made file left to be "reused"
    equal, direct, warns = result["ramfs"]
    assert equal and not direct and any("O_DIRECT" in w for w in warns)
    assert result["readonly"] == [errno.EROFS, str(ro)]


# ---- files: names, reuse, removal -------------------------------------------------------------------------

@pytest.mark.parametrize("ndirs", [1, 2])
def test_stable_names_reused_across_instances(tmp_path, backend, ndirs):
    dirs = make_dirs(tmp_path, ndirs)
    name, nbytes = "model-1a2b/layers.3.adam", 300_001
    data = random_bytes(nbytes, seed=17)
    sw = Swapper(dirs, backend=backend)
    f = sw.file(name, nbytes)
    assert not f.reused
    assert all(p.startswith(d + os.sep + "model-1a2b" + os.sep) for p, d in zip(f.paths, dirs))
    sw.write(f, 0, data).wait()
    sw.close(remove=False)
    assert all(os.path.exists(p) for p in f.paths)

    with Swapper(dirs, backend=backend) as sw2:
        g = sw2.file(name, nbytes)
        assert g.reused and g.paths == f.paths
        out = torch.empty(nbytes, dtype=torch.uint8)
        sw2.read(g, 0, out).wait()
        assert torch.equal(out, data)
        assert sw2.file(name, nbytes) is g
        with pytest.raises(ValueError):
            sw2.file(name, nbytes + 1)
    assert not any(os.path.exists(p) for p in f.paths)
    assert not any(os.path.exists(os.path.join(d, "model-1a2b")) for d in dirs)  # emptied dirs go too
    assert all(os.path.isdir(d) for d in dirs)  # the swap directories themselves stay


def test_wrong_size_file_is_recreated_not_reused(tmp_path):
    dirs = make_dirs(tmp_path, 1)
    with Swapper(dirs) as sw:
        f = sw.file("resize", 10 * MiB)
        sw.close(remove=False)
    with Swapper(dirs) as sw:
        g = sw.file("resize", 5 * MiB)
        assert not g.reused and os.path.getsize(g.paths[0]) == 5 * MiB
    assert not os.path.exists(f.paths[0])


def test_stripe_geometry_is_part_of_the_name(tmp_path):
    dirs = make_dirs(tmp_path, 2)
    with Swapper(dirs, block_size=MiB, stripe_size=MiB) as a, Swapper(dirs, block_size=MiB, stripe_size=2 * MiB) as b:
        assert set(a.file("x", MiB).paths).isdisjoint(b.file("x", MiB).paths)


def test_close_removes_by_default_and_context_manager(tmp_path, backend):
    dirs = make_dirs(tmp_path, 2)
    with Swapper(dirs, backend=backend) as sw:
        f = sw.file("a/b/c", 123_456)
        sw.write(f, 0, torch.ones(123_456, dtype=torch.uint8))
    assert not any(os.path.exists(p) for p in f.paths)
    assert sorted(os.listdir(dirs[0])) == [] and sorted(os.listdir(dirs[1])) == []
    with pytest.raises(RuntimeError, match="closed"):
        sw.read(f, 0, torch.empty(1, dtype=torch.uint8))


def test_close_waits_for_requests_in_flight(tmp_path, backend):
    sw = Swapper(make_dirs(tmp_path, 1), backend=backend)
    f = sw.file("drain", MiB)
    _native.inject_fault("write", None, delay=0.3)
    h = sw.write(f, 0, torch.ones(MiB, dtype=torch.uint8))
    sw.close()
    assert h.done()
    h.wait()


def test_dropped_swapper_drains_before_freeing(tmp_path, backend):
    dirs = make_dirs(tmp_path, 1)
    sw = Swapper(dirs, backend=backend)
    f = sw.file("dropped", MiB)
    _native.inject_fault("read", None, delay=0.2)
    sw.read(f, 0, torch.empty(MiB, dtype=torch.uint8))
    del sw, f  # the kernel is still writing into that tensor: the swapper must wait before it goes
    import gc
    gc.collect()
    assert os.listdir(dirs[0]) == []  # files go as with close()


@pytest.mark.parametrize("bad", ["", "/abs", "a/../b", "a//b", "./a", "a/"])
def test_bad_names_refused(tmp_path, bad):
    with Swapper(make_dirs(tmp_path, 1)) as sw:
        with pytest.raises(ValueError):
            sw.file(bad, 10)


# ---- configuration and helpers ----------------------------------------------------------------------------

def test_auto_backend_falls_back_when_io_uring_is_forbidden(tmp_path, monkeypatch):
    monkeypatch.setattr(swapper_mod._native, "uring_available", lambda: (False, "io_uring_setup: EPERM"))
    monkeypatch.delenv("RATEL_SWAPPER_BACKEND", raising=False)
    dirs = make_dirs(tmp_path, 1)
    with Swapper(dirs) as sw:
        assert sw.backend == "threads" and "EPERM" in sw.stats()["backend_note"]
    with pytest.raises(RuntimeError, match="io_uring"):
        Swapper(dirs, backend="uring")


@pytest.mark.skipif("uring" not in BACKENDS, reason="io_uring unavailable here")
def test_io_uring_breaking_mid_run_degrades_to_blocking_io(tmp_path, capfd):
    with Swapper(make_dirs(tmp_path, 1), block_size=64 * KiB, backend="uring") as sw:
        f = sw.file("degrade", MiB)
        data = random_bytes(MiB, seed=18)
        sw.write(f, 0, data).wait()
        _native.inject_fault("uring_enter", errno.EPERM)  # e.g. a seccomp policy applied under us
        out = torch.empty(MiB, dtype=torch.uint8)
        sw.read(f, 0, out).wait()
        assert torch.equal(out, data)
        sw.write(f, 0, data.flip(0)).wait()
        sw.read(f, 0, out).wait()
        assert torch.equal(out, data.flip(0))
        assert sw.stats()["backend_degraded"]
    assert "io_uring_enter failed" in capfd.readouterr().err


def test_auto_prefers_io_uring_where_it_works(tmp_path, monkeypatch):
    monkeypatch.delenv("RATEL_SWAPPER_BACKEND", raising=False)
    dirs = make_dirs(tmp_path, 1)
    with Swapper(dirs) as sw:
        assert sw.backend == ("uring" if uring_available()[0] else "threads")
    with Swapper(dirs, checksum=True) as sw:  # hashing every block wants many threads, not one ring thread
        assert sw.backend == "threads"
    monkeypatch.setenv("RATEL_SWAPPER_BACKEND", "threads")
    with Swapper(dirs) as sw:
        assert sw.backend == "threads"


def test_bad_configuration(tmp_path):
    dirs = make_dirs(tmp_path, 1)
    with pytest.raises(ValueError):
        Swapper(dirs, block_size=1000)
    with pytest.raises(ValueError):
        Swapper(dirs, block_size=MiB, stripe_size=MiB + 4096)
    with pytest.raises(ValueError):
        Swapper(dirs, backend="libaio")
    with pytest.raises(ValueError):
        Swapper(dirs + dirs)
    with Swapper(dirs) as sw:
        f = sw.file("cfg", 4096)
        with pytest.raises(ValueError, match="contiguous"):
            sw.write(f, 0, torch.zeros(64, 64, dtype=torch.uint8).t())
        with pytest.raises(TypeError):
            sw.write(f, 0, bytearray(10))


def test_aligned_empty():
    for n in (0, 1, 4095, 4096, 12345):
        t = aligned_empty(n)
        assert t.dtype == torch.uint8 and t.numel() == n and t.data_ptr() % ALIGNMENT == 0
    assert aligned_empty(10, alignment=64).data_ptr() % 64 == 0
    with pytest.raises(ValueError):
        aligned_empty(10, alignment=3)


def test_hash64_is_xxh64():
    assert _native.hash64(b"") == 0xEF46DB3751D8E999
    assert _native.hash64(b"abc") == 0x44BC2CF5AD770999


def test_public_types():
    assert issubclass(SwapIOError, OSError)
    e = SwapIOError(errno.EIO, "Input/output error", "/x/y.swap", 4096, op="read", swap_file="y",
                    logical_offset=8192)
    assert e.errno == errno.EIO and e.filename == "/x/y.swap" and e.offset == 4096
    assert "/x/y.swap" in str(e) and "offset 4096" in str(e) and "logical offset 8192" in str(e)
    import pickle
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.errno, e2.filename, e2.offset, e2.logical_offset) == (e.errno, e.filename, 4096, 8192)
    assert SwapFile and IOHandle
