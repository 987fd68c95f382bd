"""ratel.explain: the Plan without running or allocating anything — a 175B model on a CPU in seconds."""
import resource
import time

import pytest
import torch

import ratel
from ratel.ir.hardware import HardwareProfile
from ratel.models import GPT, GPTConfig


def _tiny(device="cpu"):
    torch.manual_seed(0)
    with torch.device(device):
        return GPT(GPTConfig(vocab_size=128, n_layer=3, n_head=2, d_model=32, max_seq_len=32)).train()


def test_explain_gives_the_plan_compile_executes():
    ids = torch.randint(0, 128, (2, 16))
    # The host budget is given: by default it is 90% of the memory available now, which moves.
    budget = ratel.Budget(gpu="1GiB", host="8GiB")
    plan = ratel.explain(_tiny("meta"), budget, (ids,), device="cpu")
    engine = ratel.compile(_tiny(), budget=budget, example_inputs=(ids,), device="cpu", progress=False)
    try:
        assert ratel.summary(plan) == ratel.summary(engine.plan)
        assert plan.transfers == engine.plan.transfers and plan.memory == engine.plan.memory
    finally:
        engine.close()


def test_budget_as_string_int_or_budget_and_too_small_refused():
    ids = torch.zeros(2, 16, dtype=torch.long)
    model = _tiny("meta")
    a = ratel.explain(model, "1GiB", ids, device="cpu")
    b = ratel.explain(model, 1 << 30, (ids,), device="cpu")
    c = ratel.explain(model, ratel.Budget(gpu="1GiB", host="8GiB"), (ids,), device="cpu")
    assert a.budget_gpu == b.budget_gpu == c.budget_gpu == 1 << 30 and c.budget_host == 8 << 30
    # Below the most frugal plan's peak (every unit recomputed, blocks in halves) nothing fits; the error
    # names that minimum, and the minimum plans.
    with pytest.raises(ratel.BudgetError) as info:
        ratel.explain(model, 1, (ids,), device="cpu")
    frugal = info.value.needed
    with pytest.raises(ratel.BudgetError) as info:
        ratel.explain(model, frugal - 1, (ids,), device="cpu")
    assert info.value.needed == frugal
    assert ratel.explain(model, frugal, (ids,), device="cpu").memory.gpu_peak <= frugal


def test_a_cuda_target_defaults_to_the_h100_profile_without_a_gpu(monkeypatch):
    from ratel.tools.explain import target_device, target_hardware
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device = target_device("cuda")
    assert str(device) == "cuda:0"
    assert target_hardware(device, None) == HardwareProfile.h100()
    assert target_hardware(torch.device("cpu"), None).name == "cpu"
    given = HardwareProfile.h100()
    assert target_hardware(device, given) is given


def test_explain_a_175b_model_on_the_meta_device_in_seconds():
    cfg = GPTConfig(vocab_size=50304, n_layer=96, n_head=96, d_model=12288, max_seq_len=2048)
    with torch.device("meta"):
        model = GPT(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    plan = ratel.explain(model, ratel.Budget(gpu="80GiB", host="4TiB"), torch.zeros(1, 2048, dtype=torch.long),
                         hardware=HardwareProfile.h100(), device="cuda")
    seconds = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before

    assert seconds < 30, f"explain took {seconds:.1f} s"
    # Nothing was materialised: the model is still on meta, and the process grew by a sliver of 350 GB.
    assert all(p.is_meta for p in model.parameters())
    assert grown < 3 << 30, f"peak RSS grew by {grown / 2**30:.1f} GiB"
    assert n == pytest.approx(175e9, rel=0.01)
    assert len(plan.units) == 98 and len(plan.steps) == 196
    assert sum(g.nbytes for g in plan.groups) == 2 * n                         # bf16 parameters, each once
    ring = plan.placement.depth * plan.placement.slot_bytes
    assert ring < 0.1 * 2 * n                                                   # streamed, not resident
    assert plan.memory.gpu_peak <= plan.budget_gpu
    assert plan.memory.host_total > 12 * n                                      # fp32 master + Adam states
    assert plan.costs.total_fwd_flops == pytest.approx(2 * n * 2048, rel=0.2)   # ~2·N·tokens forward
    assert 1 < plan.times.total < 3600
    text = ratel.summary(plan)
    assert "blocks.0..94" in text or "blocks.1..94" in text                    # repeated blocks merge
    assert len(text.splitlines()) < 80
