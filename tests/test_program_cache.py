"""The program cache keeps the most recently used programs within a count and within pinned host memory."""
import pytest
import torch

import ratel
from ratel.models import GPT, GPTConfig
from ratel.program_cache import ProgramCache


class FakeProgram:
    def __init__(self, pinned: int):
        self.pinned_bytes = pinned
        self.released = False

    def release(self):
        self.released = True


def test_least_recently_used_programs_go_first_beyond_the_count():
    cache = ProgramCache(max_programs=2)
    a, b, c = FakeProgram(1), FakeProgram(1), FakeProgram(1)
    cache.put("a", a, room=100)
    cache.put("b", b, room=100)
    assert cache.get("a") is a          # a is now the most recent
    cache.put("c", c, room=100)
    assert "b" not in cache and b.released and not a.released and len(cache) == 2


def test_pinned_memory_bounds_the_cache_but_one_program_always_stays():
    cache = ProgramCache(max_programs=10)
    big = [FakeProgram(40) for _ in range(3)]
    for i, p in enumerate(big):
        cache.put(i, p, room=100)
    assert len(cache) == 2 and big[0].released and cache.pinned_bytes() == 80
    huge = FakeProgram(500)
    cache.put("huge", huge, room=100)
    assert cache.programs() == [huge] and not huge.released


def test_an_engine_keeps_a_program_per_shape_and_reuses_it():
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32,
                          max_seq_len=32))
    engine = ratel.compile(model, budget="1GiB", optimizer=ratel.AdamW(lr=1e-3), device="cpu", progress=False)
    for seq in (8, 12, 8, 12, 16):
        ids = torch.randint(0, 64, (2, seq))
        engine.backward(engine(ids, labels=ids).loss)
        engine.step()
    assert len(engine._programs) == 3 and engine._programs.evicted == 0
    engine.close()


def test_at_least_one_program():
    with pytest.raises(ValueError):
        ProgramCache(0)
