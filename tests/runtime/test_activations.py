import pytest
import torch

from ratel.runtime.activations import ActivationStore
from ratel.runtime.memory import ALIGN, Lanes, PinnedPool


def _store(nbytes=1 << 20):
    return ActivationStore(Lanes(torch.device("cpu")), PinnedPool(nbytes, pin=False), torch.device("cpu"))


def test_offload_and_fetch_round_trip_keeps_values_and_strides():
    store = _store()
    base = torch.randn(4, 6, 8)
    views = {"contiguous": base, "transposed": base.transpose(1, 2), "sliced": base[:, 2:5], "scalar": base[0, 0, :1]}
    for name, value in views.items():
        store.offload(name, value)
    for copy in store._host.values():     # the copies out are done (compute never writes a value before)
        if copy.saved is not None:
            copy.saved.synchronize()
    base.zero_()   # the host copy must not alias the original
    for name, value in views.items():
        fetched = store.get(name)
        assert fetched.shape == value.shape and fetched.stride() == value.stride()
    assert not torch.equal(store.get("contiguous"), base)


def test_values_are_exact_after_round_trip():
    store = _store()
    value = torch.randn(3, 5, dtype=torch.bfloat16).t()
    expected = value.clone()
    store.offload("x", value)
    store.release("x")       # dropping the device copy does not drop the host copy
    assert torch.equal(store.get("x"), expected)


def test_kept_values_are_returned_as_is_and_released():
    store = _store()
    value = torch.randn(2)
    store.keep("k", value)
    assert store.get("k") is value
    store.release("k")
    assert "k" not in store._kept


def test_buffers_are_reused_across_steps():
    pool = PinnedPool(1 << 16, pin=False)
    store = ActivationStore(Lanes(torch.device("cpu")), pool, torch.device("cpu"))
    store.offload("x", torch.randn(100))
    used = pool.used
    store.clear()
    store.offload("x", torch.randn(100))
    assert pool.used == used


def test_pool_views_are_aligned_and_exhaustion_is_an_error():
    pool = PinnedPool(3 * ALIGN, pin=False)
    a = pool.take(10)
    b = pool.take(ALIGN + 1)
    assert a.data_ptr() % ALIGN == 0 and b.data_ptr() % ALIGN == 0
    try:
        pool.take(ALIGN)
    except MemoryError as exc:
        assert "pinned pool exhausted" in str(exc)
    else:
        raise AssertionError("the pool handed out more than it holds")


# ---------------------------------------------------------------- on CUDA: the lanes' streams and the allocator
def _busy_compute(cycles: int = 300_000_000) -> None:
    """Hold the compute stream for a while (~0.15 s), so that what is queued after this runs late."""
    torch.cuda._sleep(cycles)


def _cuda_store():
    device = torch.device("cuda")
    return ActivationStore(Lanes(device), PinnedPool(1 << 24, pin=True), device)


@pytest.mark.gpu
def test_a_fetched_value_is_not_overwritten_by_compute_work_queued_on_memory_freed_before_the_fetch():
    store = _cuda_store()
    expected = torch.randn(1 << 20, device="cuda")
    store.offload("x", expected)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    scratch = torch.empty(1 << 20, device="cuda")     # the same bytes as the value: the block the fetch would get
    _busy_compute()
    scratch.fill_(7.0)          # queued; runs after the H2D copy below would be done
    del scratch                 # freed on the host while its fill is still queued
    store.fetch("x")
    assert torch.equal(store.get("x"), expected)


@pytest.mark.gpu
def test_memory_of_a_fetched_value_is_not_fetched_into_while_compute_work_still_reads_it():
    store = _cuda_store()
    first, second = torch.randn(1 << 20, device="cuda"), torch.randn(1 << 20, device="cuda")
    store.offload("first", first)
    store.offload("second", second)
    torch.cuda.synchronize()
    value = store.get("first")
    _busy_compute()
    read_late = value * 1.0     # queued behind the sleep
    del value
    store.release("first")      # the host lets go while the read is still queued
    store.fetch("second")       # the same size: it could land in the first value's memory
    assert torch.equal(read_late, first)
    assert torch.equal(store.get("second"), second)
