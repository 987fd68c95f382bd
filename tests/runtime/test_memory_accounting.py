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
