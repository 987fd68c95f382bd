import pytest
import torch

import ratel
from helpers import batches, make_model
from ratel.errors import RatelError


def test_ring_views_alias_the_slot_and_state_dict_round_trips():
    model = make_model("gpt_untied")
    engine = ratel.compile(model, budget="1GiB", example_inputs=(batches(1)[0][0],), device="cpu", progress=False)
    store = engine._store
    plan = engine.plan
    views = store.unit_views(1, 0)
    for name, view in views.items():
        assert view.untyped_storage().data_ptr() == store.ring[0].untyped_storage().data_ptr()
        assert tuple(view.shape) == tuple(model.get_parameter(name).shape)
    assert set(views) == set(plan.units[1].params)
    state = engine.state_dict()
    for name, p in model.named_parameters():
        assert torch.equal(state[name], p.detach()), name
    engine.close()


def test_a_source_of_the_wrong_shape_is_refused(tmp_path):
    from safetensors.torch import save_file
    model = make_model("gpt")
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tensors["wpe.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    with pytest.raises(RatelError, match="wpe.weight"):
        ratel.compile(model, budget="1GiB", weights=tmp_path, example_inputs=(batches(1)[0][0],), device="cpu",
                      progress=False)


@pytest.mark.parametrize("accumulate,max_norm", [(1, None), (2, None), (2, 0.05)])
def test_gradients_streamed_through_a_ring_train_like_pytorch_with_a_slow_optimizer(accumulate, max_norm,
                                                                                  monkeypatch):
    """Eight blocks: the gradients pass through a ring of a few host slots instead of a buffer per group. An
    optimizer slowed down makes the backward wait for free slots; the result is still PyTorch's."""
    import time

    import ratel.runtime.optimizer as optimizer_module
    from helpers import assert_trained_alike, train_like_pytorch

    update = optimizer_module.adamw_update
    from ratel.ir.layout import grad_ring_slots
    from ratel.runtime.param_store import GradientRing
    take, waited = GradientRing.take, []

    def slow(*args, **kwargs):
        if accumulate == 1:
            # Held until the backward asked for a slot and found none (at most 2 s): a fixed sleep was not slow
            # enough on a loaded 2-core machine, where the backward itself crawled (CI, 2026-12-05).
            deadline = time.monotonic() + 2.0
            while not any(waited) and time.monotonic() < deadline:
                time.sleep(0.001)
        else:       # accumulation frees each slot as its gradient is summed: nothing to wait for
            time.sleep(0.01)
        return update(*args, **kwargs)

    monkeypatch.setattr(optimizer_module, "adamw_update", slow)

    def watched(self, group, nbytes):
        waited.append(not self.free)          # no slot free: the flush waits for the optimizer
        return take(self, group, nbytes)

    monkeypatch.setattr(GradientRing, "take", watched)
    model = make_model("gpt", layers=8, dropout=0.1)
    result = train_like_pytorch(model, batches(3 * accumulate), accumulate=accumulate, max_grad_norm=max_norm)
    engine = result["engine"]
    usage = dict(engine.plan.memory.host_bytes)
    assert "gradient staging ring" in usage and not any(k.startswith("gradient staging:") for k in usage)
    ring, slots = engine._store.grad_ring, grad_ring_slots(engine.plan.groups, accumulate, max_norm is not None)
    assert slots < sum(g.trainable for g in engine.plan.groups)
    assert engine.host_bytes_allocated() <= engine.plan.memory.host_total
    assert_trained_alike(result)
    assert not ring.holding and len(ring.free) == slots       # every slot given back
    if accumulate == 1:
        assert any(waited)                                     # the slow updates did hold the backward back
    engine.close()


def test_clipping_without_accumulation_keeps_a_buffer_per_group():
    """Updates after the whole backward need every gradient at once: no ring then."""
    model = make_model("gpt", layers=8)
    ids = batches(1)[0][0]
    plain = ratel.explain(model, "1GiB", (ids,), device="cpu")
    clipped = ratel.explain(model, "1GiB", (ids,), device="cpu", max_grad_norm=1.0)
    assert "gradient staging ring" in dict(plain.memory.host_bytes)
    staging = [k for k, _ in clipped.memory.host_bytes if k.startswith("gradient staging:")]
    assert len(staging) == sum(g.trainable for g in clipped.groups)
    assert plain.memory.host_total < clipped.memory.host_total
