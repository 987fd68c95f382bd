"""Pinned pools (ratel/runtime/memory.py): host memory registered with CUDA goes back unregistered, however the
pool is dropped, and a failed registration leaves CUDA usable."""
import gc

import pytest
import torch

from ratel.runtime import memory
from ratel.runtime.memory import PinnedPool


class _FakeCudart:
    def __init__(self):
        self.registered: dict[int, int] = {}

    def cudaHostRegister(self, address, nbytes, flags):
        self.registered[address] = nbytes
        return 0

    def cudaHostUnregister(self, address):
        return 0 if self.registered.pop(address, None) is not None else 713


def test_a_pinned_pool_dropped_without_close_is_unregistered_before_its_memory_is_freed(monkeypatch):
    cudart = _FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    pool = PinnedPool(1 << 20, pin=True)
    closed = PinnedPool(1 << 20, pin=True)
    closed.close()
    assert len(cudart.registered) == 1
    del pool, closed
    gc.collect()
    assert cudart.registered == {}, "a dropped pool left its memory registered: malloc may hand it out again"


@pytest.mark.gpu
def test_a_pinned_pool_dropped_without_close_gives_its_registration_back():
    torch.cuda.init()
    pool = PinnedPool(1 << 24, pin=True)
    address = pool.buffer.data_ptr()
    del pool
    gc.collect()
    still_registered = int(torch.cuda.cudart().cudaHostUnregister(address)) == 0
    memory._take_cuda_error()
    assert not still_registered, "the dropped pool's memory was still registered with CUDA"


@pytest.mark.gpu
def test_a_failed_registration_raises_and_leaves_cuda_usable(monkeypatch):
    """cudaHostRegister's error stays CUDA's last error; left there, torch raised it at the next kernel launch
    of an unrelated test ("part or all of the requested memory range is already mapped")."""
    torch.cuda.init()
    held = torch.empty((1 << 24) + memory.ALIGN, dtype=torch.uint8)
    assert int(torch.cuda.cudart().cudaHostRegister(held.data_ptr(), held.numel(), 0)) == 0
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: held)   # the pool lands on registered memory
    try:
        with pytest.raises(RuntimeError, match="cudaHostRegister"):
            PinnedPool(1 << 24, pin=True)
    finally:
        monkeypatch.setattr(torch, "empty", empty)
        torch.cuda.cudart().cudaHostUnregister(held.data_ptr())
    assert torch.ones(4, device="cuda").sum().item() == 4
