"""The plan's GPU memory is an upper bound on what a real step allocates, for every activation policy.

On the CPU the "GPU tier" is plain host tensors, so every allocation the training thread makes during a
step can be counted (``PeakMemory`` over real tensors, storages that existed before the step excluded:
the parameter ring and the pinned pools are allocated once, outside it).
"""
import gc
import warnings

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

import ratel
from helpers import VOCAB, make_model
from ratel.passes.estimate_costs import PeakMemory
from ratel.runtime import checked_lanes

# Checked lanes run a copy only when something needs it, so its buffers live longer than on a stream.
pytestmark = pytest.mark.skipif(checked_lanes.checking(), reason="copies deferred by RATEL_CHECK_STREAMS hold "
                                "their buffers longer than a CUDA stream would")


def measured_step_peak(engine, ids) -> int:
    engine.backward(engine(ids, labels=ids).loss)     # plans and warms up
    engine.step()
    gc.collect()
    with warnings.catch_warnings():   # gc.get_objects() touches deprecated torch.distributed attributes
        warnings.simplefilter("ignore")
        existing = [StorageWeakRef(o.untyped_storage()) for o in gc.get_objects()
                    if isinstance(o, torch.Tensor) and not o.is_meta]
    with PeakMemory(existing) as tracker:
        engine.backward(engine(ids, labels=ids).loss)
        engine.step()
    return tracker.peak


@pytest.mark.parametrize("kind", ["gpt", "llama"])
@pytest.mark.parametrize("policy,mix", [("recompute", None), ("keep", None), ("host", None), ("auto", 0.25),
                                        ("auto", 0.5), ("auto", 0.75)])
def test_planned_gpu_peak_bounds_the_real_step(kind, policy, mix):
    model = make_model(kind, layers=4)
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    budget = "1TiB"
    if mix is not None:
        low = ratel.explain(model, "1TiB", (ids,), device="cpu", activations="recompute").memory.gpu_peak
        high = ratel.explain(model, "1TiB", (ids,), device="cpu", activations="keep").memory.gpu_peak
        budget = int(low + mix * (high - low))
    engine = ratel.compile(model, budget=budget, example_inputs=(ids,), device="cpu", progress=False,
                           activations=policy)
    peak = measured_step_peak(engine, ids)
    plan = engine.plan
    engine.close()
    ring = plan.placement.depth * plan.placement.slot_bytes   # allocated before the step: not in `peak`
    assert peak <= plan.memory.gpu_peak - ring, f"measured {peak} > planned {plan.memory.gpu_peak - ring}"
    assert plan.memory.gpu_peak <= ratel.parse_bytes(budget)


@pytest.mark.parametrize("kind", ["gpt", "llama"])
@pytest.mark.parametrize("keep_logits", [False, True])
def test_planned_gpu_peak_bounds_the_real_step_with_blocks_in_halves_and_a_chunked_head(kind, keep_logits,
                                                                                         monkeypatch):
    """A budget below what whole blocks need: each block runs as two units; the head's loss runs in chunks of
    16 rows (with the logits returned or not). The plan still bounds what the step allocates."""
    import ratel.passes.chunk_head_loss as chunk_head_loss
    monkeypatch.setattr(chunk_head_loss, "chunk_rows_for", lambda vocab, nbytes: 16)
    model = make_model(kind, layers=4)
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    whole = ratel.explain(model, "1TiB", (ids,), device="cpu", activations="recompute").memory.gpu_peak
    budget = int(whole * 0.9)
    engine = ratel.compile(model, budget=budget, example_inputs=(ids,), device="cpu", progress=False,
                           keep_logits=keep_logits)
    assert any(u.name.endswith(":1") for u in engine.plan.units)
    peak = measured_step_peak(engine, ids)
    plan = engine.plan
    engine.close()
    ring = plan.placement.depth * plan.placement.slot_bytes
    assert peak <= plan.memory.gpu_peak - ring, f"measured {peak} > planned {plan.memory.gpu_peak - ring}"
    assert plan.memory.gpu_peak <= budget


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_planned_gpu_peak_bounds_the_real_step_with_groups_resident_on_the_gpu(kind):
    """A budget with room for the first half of the groups: those stay on the "GPU" (allocated once, before the
    step, like the ring), are updated there during the step, and the plan still bounds what the step allocates."""
    from ratel.ir.layout import device_state_bytes
    model = make_model(kind, layers=4)
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    streaming = ratel.explain(model, "1TiB", (ids,), device="cpu", activations="recompute", resident=False)
    order = sorted(streaming.groups, key=lambda g: (g.update_unit, g.index))
    half = order[:len(order) // 2]
    budget = streaming.memory.gpu_peak + sum(device_state_bytes(g) + 4 * g.numel for g in half)
    engine = ratel.compile(model, budget=budget, example_inputs=(ids,), device="cpu", progress=False,
                           activations="recompute", resident=True)
    plan = engine.plan
    on_gpu = [g for g in plan.groups if plan.placement.on_gpu(g.name)]
    assert on_gpu and len(on_gpu) < len(plan.groups)
    peak = measured_step_peak(engine, ids)
    engine.close()
    held = sum(device_state_bytes(g) for g in on_gpu) + plan.placement.depth * plan.placement.slot_bytes
    assert peak <= plan.memory.gpu_peak - held, f"measured {peak} > planned {plan.memory.gpu_peak - held}"
    assert plan.memory.gpu_peak <= budget
