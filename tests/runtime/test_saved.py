"""Saved values swapped to host memory come back as they were saved (the engine's tests cover the hooks)."""
import pytest
import torch

from ratel.runtime.memory import Lanes, PinnedPool
from ratel.runtime.saved import SavedActivations, UnitRun


def _saved(device: torch.device) -> SavedActivations:
    return SavedActivations(Lanes(device), PinnedPool(1 << 24, pin=device.type == "cuda"), device)


def _run_with(saved: SavedActivations, values: dict[str, torch.Tensor]) -> UnitRun:
    """A unit run whose forward copied ``values`` out to host memory, as the pack hook does."""
    run = UnitRun(unit=0, call=None, module=None, outputs=(), input_leaves=[], param_leaves=[])
    for key, value in values.items():
        run.stored[key] = saved._copy_out(0, key, value)
    saved.runs[0] = run
    return run


def _as_float(flat: torch.Tensor) -> torch.Tensor:
    return flat.view(torch.float32)


def test_a_value_copied_out_comes_back_with_the_same_bytes():
    saved = _saved(torch.device("cpu"))
    value = torch.randn(1000)
    run = _run_with(saved, {"x": value})
    expected = value.clone()
    if run.stored["x"].saved is not None:
        run.stored["x"].saved.synchronize()     # the copy out is done (compute never writes a value before)
    value.zero_()      # the host copy does not alias the value the forward saw
    saved.fetch(0)
    assert torch.equal(_as_float(saved._device_bytes(run, "x")), expected)


@pytest.mark.gpu
def test_a_fetched_saved_value_is_not_overwritten_by_compute_work_queued_on_memory_freed_before_the_fetch():
    saved = _saved(torch.device("cuda"))
    expected = torch.randn(1 << 20, device="cuda")
    run = _run_with(saved, {"x": expected})
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    scratch = torch.empty(1 << 20, device="cuda")     # the same bytes: the block the fetch would get
    torch.cuda._sleep(300_000_000)
    scratch.fill_(7.0)          # queued; runs after the H2D copy below would be done
    del scratch
    saved.fetch(0)
    assert torch.equal(_as_float(saved._device_bytes(run, "x")), expected)


@pytest.mark.parametrize("policy", ["keep", "auto"])
def test_a_unit_runs_node_by_node_only_when_its_plan_rebuilds_a_value(policy, monkeypatch):
    """The forward of a saved-mode unit goes through the interpreter (~15 us of host work a node, which bound
    the H100's forward at h=2048) only where the backward rebuilds a node's value from its recorded layout;
    both ways train as plain PyTorch does."""
    import ratel
    import ratel.runtime.saved as saved_module
    from helpers import assert_trained_alike, batches, make_model, train_like_pytorch

    interpreted = []
    geometry = saved_module._Geometry

    class Counted(geometry):
        def run(self, *args, **kwargs):
            interpreted.append(self._unit_run.unit)
            return super().run(*args, **kwargs)

    monkeypatch.setattr(saved_module, "_Geometry", Counted)
    model = make_model("gpt", layers=3)
    data = batches(2, batch=4, seq=16)
    budget = "1GiB"
    if policy == "auto":      # halfway from every unit recomputed to all kept: some values rebuilt one by one
        low, high = (ratel.explain(model, "1GiB", (data[0][0],), device="cpu", activations=fixed).memory.gpu_peak
                     for fixed in ("recompute", "keep"))
        budget = (low + high) // 2
    result = train_like_pytorch(model, data, budget=budget, activations=policy)
    acts = result["engine"].plan.activations
    rebuilding = {u.unit for u in acts.units if u.mode == "saved" and any(d.tier is None for d in u.decisions)}
    assert_trained_alike(result)
    result["engine"].close()
    assert set(interpreted) == rebuilding
    assert bool(rebuilding) == (policy == "auto")
