"""Checked lanes (ratel/runtime/checked_lanes.py): on the CPU, copies run as late as a stream may run them and
each is checked to follow the compute it must, so the races a GPU shows as wrong numbers fail here too."""
import contextlib

import pytest
import torch

import ratel
from helpers import (VOCAB, assert_trained_alike, batches, host_minimum, make_model, no_decay_groups, resident_budget,
                     train_like_pytorch)
from ratel.engine import _close_open_engines
from ratel.runtime import checked_lanes, memory
from ratel.runtime.checked_lanes import ComputeAccesses, UnorderedCopy
from ratel.runtime.memory import Lanes

CPU = torch.device("cpu")


@pytest.fixture
def checked(monkeypatch):
    monkeypatch.setenv(checked_lanes.CHECK_ENV, "1")
    with ComputeAccesses() as accesses:
        yield accesses
        # Tests that raise mid-training by design leave their engine open; closed here, not by the GC later.
        _close_open_engines()


# ---------------------------------------------------------------------------------------------- deferral
def test_a_copy_runs_only_when_its_event_is_waited_for(checked):
    lanes = Lanes(CPU)
    dst, src = torch.zeros(4), torch.arange(4.0)
    done = lanes.copy(dst, src, lanes.h2d, after=lanes.event())
    assert torch.equal(dst, torch.zeros(4))          # not yet: nothing needed it
    lanes.wait_compute(done)
    assert torch.equal(dst, src)


def test_copies_of_a_lane_run_in_order_and_after_the_events_they_wait_for():
    compute, h2d, d2h = checked_lanes.make_lanes()
    host, device, back, nine = torch.arange(3.0), torch.zeros(3), torch.zeros(3), torch.full((3,), 9.0)
    made = checked_lanes.record(compute)     # (ordered after the kernels that made them, when stamped)
    fetched = checked_lanes.copy(device, host, h2d, made, contextlib.nullcontext(), "in")
    checked_lanes.copy(back, device, d2h, fetched, contextlib.nullcontext(), "out")     # reads what came in
    later = checked_lanes.copy(host, nine, d2h, None, contextlib.nullcontext(), "later")
    later.synchronize()     # runs the lane's first copy first, and before it the H2D copy that one waits for
    assert torch.equal(back, torch.arange(3.0)) and torch.equal(host, torch.full((3,), 9.0))


# ---------------------------------------------------------------------------------------------- ordering
def test_an_h2d_copy_into_memory_compute_used_after_the_lanes_last_wait_is_refused(checked):
    lanes = Lanes(CPU)
    device = torch.zeros(256)
    _ = device * 2                                  # a kernel reads it
    ordered = lanes.event()                         # compute up to here
    lanes.copy(device, torch.ones(256), lanes.h2d, after=ordered)      # ordered after that kernel: fine
    device[:8].add_(1)                              # its first bytes used again, after that event
    with pytest.raises(UnorderedCopy, match=r"H2D copy \(params x\).*aten.add_"):
        lanes.copy(device[:8], torch.ones(8), lanes.h2d, span=(None, "h2d", "params x", 0))
    lanes.copy(device[128:], torch.ones(128), lanes.h2d)               # bytes no kernel touched since: fine


def test_a_d2h_copy_of_memory_compute_wrote_after_the_lanes_last_wait_is_refused(checked):
    lanes = Lanes(CPU)
    grad = torch.zeros(64)
    ordered = lanes.event()
    grad.add_(3)                                    # the backward writes the gradient after the event
    with pytest.raises(UnorderedCopy, match="D2H copy .* last wrote"):
        lanes.copy(torch.empty(64), grad, lanes.d2h, after=ordered)
    lanes.copy(torch.empty(64), grad, lanes.d2h, after=lanes.event())  # taken after the write: fine


def test_what_compute_did_with_memory_is_kept_by_address_not_by_tensor(checked):
    """The caching allocator gives a block freed by the host to the compute stream at once, its kernels maybe
    still queued: an H2D copy into the block's next tensor must wait for them. ``Lanes.landing`` makes the
    lane wait for compute so far."""
    lanes = Lanes(CPU)
    old = torch.zeros(128)
    again = torch.empty(0).set_(old.untyped_storage(), 0, (128,), (1,))     # the same bytes, another tensor
    _ = old * 2
    del old
    with pytest.raises(UnorderedCopy, match="aten.mul"):
        lanes.copy(again, torch.ones(128), lanes.h2d)
    lanes.landing(4)
    lanes.copy(again, torch.ones(128), lanes.h2d)


# ---------------------------------------------------------------------------------------------- training
def _train(policy: str = "recompute", resident: bool = False, ssd_dir=None, states_on_ssd: bool = False,
           **kwargs):
    """Ratel beside PyTorch on a 6-layer Llama whose parameters stream (the GPU budget is the plan's peak)."""
    model = make_model("llama", layers=6)
    accumulate = kwargs.get("accumulate", 1)
    data = batches(3 * accumulate, batch=2, seq=16)
    ids = data[0][0]
    clip = {"max_grad_norm": kwargs["max_grad_norm"]} if "max_grad_norm" in kwargs else {}
    host = host_minimum(model, ids, accumulate=accumulate, clip=bool(clip)) if states_on_ssd else None
    if resident:
        gpu = resident_budget(model, ids, 2, accumulate, **clip)
    else:
        probe = ratel.explain(model, ratel.Budget(gpu="1TiB", ssd_dir=ssd_dir), (ids,), device="cpu",
                              activations=policy, resident=False, accumulate=accumulate, **clip)
        gpu = probe.memory.gpu_peak
    budget = ratel.Budget(gpu=gpu, host=host, ssd_dir=ssd_dir)
    return train_like_pytorch(model, data, groups=lambda m: no_decay_groups(m, 0.1), budget=budget,
                              activations=policy, resident=resident, **kwargs)


CASES = {
    "saved values on the host, clipping, accumulation": dict(policy="host", max_grad_norm=0.05, accumulate=2),
    "saved values on SSD": dict(policy="ssd", ssd=True),
    "the automatic plan": dict(policy="auto"),
    "groups resident on the device, clipping": dict(resident=True, max_grad_norm=0.05),
    "optimizer states on SSD, clipping": dict(states_on_ssd=True, ssd=True, max_grad_norm=0.05),
}


@pytest.mark.parametrize("case", CASES)
def test_training_with_checked_lanes_equals_pytorch(case, checked, tmp_path):
    kwargs = dict(CASES[case])
    if kwargs.pop("ssd", False):
        kwargs["ssd_dir"] = str(tmp_path)
    result = _train(**kwargs)
    engine = result["engine"]
    if kwargs.get("resident"):
        assert any(engine.plan.placement.on_gpu(g.name) for g in engine.plan.groups)
    if kwargs.get("ssd_dir"):
        assert engine.plan.memory.ssd_total > 0, "the case must move something through the SSD lane"
    assert_trained_alike(result)
    engine.close()


def test_a_consumer_that_does_not_wait_reads_a_copy_not_yet_made(checked, monkeypatch):
    monkeypatch.setattr(memory.Lanes, "wait_compute", lambda self, event: None)
    # Wrong numbers, or the loss's targets read before they came back: out of range, as the H200's
    # "index out of bounds" (the engine left open is closed at exit).
    with pytest.raises((AssertionError, IndexError)):
        assert_trained_alike(_train("host"))


@pytest.mark.parametrize("copy_of,lane", [("params", "H2D"), ("grads", "D2H")],
                         ids=["a fetch before its slot is free", "a gradient's copy out before the backward wrote it"])
def test_a_copy_issued_without_the_event_it_must_wait_for_is_refused(checked, monkeypatch, copy_of, lane):
    copy = memory.Lanes.copy

    def unordered(self, dst, src, stream, after=None, span=None):
        at_once = span is not None and span[2].startswith(copy_of)
        return copy(self, dst, src, stream, None if at_once else after, span)
    monkeypatch.setattr(memory.Lanes, "copy", unordered)
    with pytest.raises(UnorderedCopy, match=rf"{lane} copy \({copy_of}"):
        _train()


def test_a_write_back_not_ordered_after_the_update_on_the_optimizers_thread_is_refused(checked, monkeypatch):
    """With clipping, groups resident on the device are updated on the optimizer's thread, on the compute
    stream of a GPU; their new weights' copy to the host must follow that update."""
    copy = memory.Lanes.copy

    def write_back_at_once(self, dst, src, stream, after=None, span=None):
        unordered = span is not None and span[2].startswith("write back")
        return copy(self, dst, src, stream, None if unordered else after, span)
    monkeypatch.setattr(memory.Lanes, "copy", write_back_at_once)
    with pytest.raises(RuntimeError, match=r"D2H copy \(write back .*_fused_adamw_"):
        _train(resident=True, max_grad_norm=0.05)


@pytest.mark.parametrize("forget_slot_events", [False, True], ids=["as built", "slot events per program"])
def test_a_new_input_shape_fetches_after_the_kernels_of_the_shape_before_it(checked, forget_slot_events):
    """Every program streams through one ring: a new shape's first fetch into a slot must wait for the last
    kernels of the shape before it, here an inference forward (the events were per program once)."""
    model = make_model("llama", layers=6)
    ids = batches(1, batch=2, seq=16)[0][0]
    plan = ratel.explain(model, "1TiB", (ids,), device="cpu", activations="recompute", resident=False)
    engine = ratel.compile(model, budget=plan.memory.gpu_peak * 2, optimizer=ratel.AdamW(lr=1e-3),
                           example_inputs=(ids,), device="cpu", progress=False)
    engine.backward(engine(ids, labels=ids).loss)
    engine.step()
    with torch.no_grad():
        engine(ids)
    if forget_slot_events:
        engine._store.slot_free.clear()
    longer = torch.randint(0, VOCAB, (2, 24))
    with pytest.raises(UnorderedCopy, match=r"H2D copy \(params") if forget_slot_events else contextlib.nullcontext():
        engine.backward(engine(longer, labels=longer).loss)
        engine.step()
    engine.close()
