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
