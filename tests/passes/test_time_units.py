"""time_units: distinct units timed once on the device the plan is for, cached per machine, used by the
simulator; never for a device this machine lacks, nor by ratel.explain. On the CPU (the target timed here)."""
import json
import logging
import os

import pytest
import torch

import ratel
from pipeline_util import run_until, tiny_inputs, tiny_model
from ratel.ir import META_UNIT_CALL, CostModel
from ratel.models import GPT, GPTConfig
from ratel.passes import time_units
from ratel.passes.estimate_costs import structure_key


@pytest.fixture
def timing(monkeypatch, tmp_path):
    """Measuring on, an empty cache of its own, and a count of the units actually run."""
    monkeypatch.setenv(time_units.MEASURE_ENV, "1")
    monkeypatch.setenv("RATEL_CACHE_DIR", str(tmp_path))
    calls = []
    real = time_units.time_unit

    def counted(sub, call, device, trainable):
        calls.append(call.name)
        return real(sub, call, device, trainable)

    monkeypatch.setattr(time_units, "time_unit", counted)
    return calls


def _model(d_model=64, seq=16, layers=3):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=128, n_layer=layers, n_head=4, d_model=d_model, max_seq_len=seq)).train()


def test_the_cpu_target_is_not_timed_by_default_and_a_missing_device_never(monkeypatch):
    mode = time_units.timing_mode
    monkeypatch.delenv(time_units.MEASURE_ENV, raising=False)
    assert mode(None, "cpu") == "off" and mode("cached", "cpu") == "off"
    assert mode(True, "cpu") == "measure"
    monkeypatch.setenv(time_units.MEASURE_ENV, "1")
    assert mode(None, "cpu") == "measure" and mode("cached", "cpu") == "cached"
    assert mode(False, "cpu") == "off"            # the caller's word over the environment
    monkeypatch.setenv(time_units.MEASURE_ENV, "0")
    assert mode(None, "cpu") == "off" and mode("cached", "cpu") == "off"
    assert mode(True, "meta") == "off"
    if not torch.cuda.is_available():             # a CUDA plan made on a CPU-only machine
        assert mode(True, "cuda:0") == "off"
        monkeypatch.delenv(time_units.MEASURE_ENV)
        assert mode(None, "cuda:0") == "off" and mode("cached", "cuda:0") == "off"


def test_signature_is_the_same_in_every_process_and_differs_by_shape_and_training():
    gm_a, _, _, _ = run_until("outline_units")
    gm_b, _, _, _ = run_until("outline_units", batch=4)
    head_a, head_b = (getattr(gm, [n.meta[META_UNIT_CALL] for n in gm.graph.nodes
                                   if META_UNIT_CALL in n.meta][-1].module) for gm in (gm_a, gm_b))
    key = structure_key(head_a)
    assert "0x" in repr(key)            # the loss is a Python function: its repr carries an address
    assert " at 0x" not in time_units._ADDRESS.sub("", repr(key))
    assert time_units.signature(key, (True,)) == time_units.signature(key, (True,))
    assert time_units.signature(key, (True,)) != time_units.signature(key, (False,))
    assert time_units.signature(key, (True,)) != time_units.signature(structure_key(head_b), (True,))


def test_distinct_units_are_timed_once_and_cached_for_the_next_compile(timing, tmp_path):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    engine = ratel.compile(_model(), budget="1GiB", example_inputs=(ids,), device="cpu", progress=False)
    units = engine.plan.costs.units
    engine.close()
    # embed, one block for the three, head
    assert timing == ["embed", "blocks.0", "head"]
    assert all(c.measured and c.fwd_seconds > 0 and c.grad_fwd_seconds > 0 and c.bwd_seconds > 0 for c in units)
    blocks = {(c.fwd_seconds, c.grad_fwd_seconds, c.bwd_seconds) for c in units[1:-1]}
    assert len(blocks) == 1             # the blocks share one measurement
    cached = json.loads((tmp_path / time_units.CACHE_NAME).read_text())
    assert len(cached) == 3 and all(set(v) == {"fwd", "grad_fwd", "bwd"} for v in cached.values())

    engine = ratel.compile(_model(), budget="1GiB", example_inputs=(ids,), device="cpu", progress=False)
    again = engine.plan.costs.units
    engine.close()
    assert timing == ["embed", "blocks.0", "head"]       # nothing run again
    assert [(c.fwd_seconds, c.bwd_seconds) for c in again] == [(c.fwd_seconds, c.bwd_seconds) for c in units]
    # A new shape is new units: timed, once each.
    engine = ratel.compile(_model(), budget="1GiB", example_inputs=(ids[:1],), device="cpu", progress=False)
    engine.close()
    assert timing[3:] == ["embed", "blocks.0", "head"]


def test_timing_leaves_the_callers_random_streams_as_they_were(timing):
    model = GPT(GPTConfig(vocab_size=128, n_layer=2, n_head=4, d_model=64, max_seq_len=16, dropout=0.1)).train()
    ids = torch.zeros(2, 16, dtype=torch.long)
    torch.manual_seed(123)
    engine = ratel.compile(model, budget="1GiB", example_inputs=(ids,), device="cpu", progress=False)
    after = torch.rand(4)
    engine.close()
    assert timing
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(4))


def test_a_unit_too_large_to_materialise_keeps_the_flop_price(timing, monkeypatch, caplog):
    monkeypatch.setattr(time_units, "room", lambda device, budget: 0)
    with caplog.at_level(logging.INFO, logger="ratel.passes"):
        _, ctx, _, _ = run_until("estimate_costs")
    assert timing == []
    assert not any(c.measured for c in ctx.get(CostModel).units)
    assert "not timed" in caplog.text and "priced from FLOPs" in caplog.text


def test_the_program_still_equals_eager_when_timed(timing):
    from pipeline_util import run_program
    gm, ctx, model, inputs = run_until("verify_plan")
    assert timing and all(c.measured for c in ctx.get(CostModel).units)
    loss, logits = run_program(gm, ctx, model, inputs)
    ids, labels = inputs
    expected = model(ids, labels=labels)
    assert torch.equal(loss, expected.loss) and torch.equal(logits, expected.logits)


def test_explain_never_times_but_reads_what_compile_cached(timing):
    model, (ids, labels) = tiny_model(), tiny_inputs()
    before = ratel.explain(model, "1GiB", (ids,), {"labels": labels}, device="cpu")
    assert timing == [] and not any(c.measured for c in before.costs.units)
    engine = ratel.compile(model, budget="1GiB", example_inputs=(ids,), example_kwargs={"labels": labels},
                           device="cpu", progress=False)
    compiled = engine.plan
    engine.close()
    runs = len(timing)
    assert runs and all(c.measured for c in compiled.costs.units)
    after = ratel.explain(model, "1GiB", (ids,), {"labels": labels}, device="cpu")
    assert len(timing) == runs              # nothing ran: the times compile cached
    assert [c.bwd_seconds for c in after.costs.units] == [c.bwd_seconds for c in compiled.costs.units]
    assert after.times.total == compiled.times.total


def _profiled_compute(engine, ids, steps: int) -> list[float]:
    """The measured compute lane of each of ``steps`` profiled training steps."""
    engine.profile = True
    measured = []
    for _ in range(steps):
        engine.backward(engine(ids, labels=ids).loss)
        engine.step()
        measured.append(sum(s.end - s.start for s in engine.last_step.spans if s.lane == "compute"))
    return measured


def _compute_ratio() -> float:
    """Predicted compute lane / the fastest measured one over profiled steps after the first (which pays
    first-touch costs)."""
    model = _model(d_model=256, seq=128, layers=3)
    ids = torch.randint(0, 128, (4, 128), generator=torch.Generator().manual_seed(0))
    engine = ratel.compile(model, budget="4GiB", example_inputs=(ids,), device="cpu", progress=False)
    measured = _profiled_compute(engine, ids, 5)
    predicted = engine.plan.times.compute
    engine.close()
    print(f"CPU compute lane: predicted {predicted * 1e3:.1f} ms, measured {min(measured[1:]) * 1e3:.1f} ms, "
          f"ratio {predicted / min(measured[1:]):.2f}")
    return predicted / min(measured[1:])


def test_predicted_compute_of_a_cpu_step_is_near_the_measured_one(timing, tmp_path, monkeypatch):
    """The compute lane predicted from the timed units against the compute spans of profiled steps, on a
    model large enough that the kernels, not the runtime's per-unit overhead (0.2-0.5 ms a unit on a
    2-core CPU, outside the unit's kernels), dominate. Quiet, the ratio is 0.8-1.3. A CPU shared with other
    processes stretches kernels by 2-100x for seconds (a two-thread op waits for a descheduled thread), at
    compile or during the steps: a loose bound, measured again with an empty cache up to three times, and
    skipped, saying so, when the machine is oversubscribed."""
    ratios = []
    for attempt in range(3):
        monkeypatch.setenv("RATEL_CACHE_DIR", str(tmp_path / str(attempt)))
        ratios.append(_compute_ratio())
        if 1 / 3 < ratios[-1] < 3:
            break
    if not 1 / 3 < ratios[-1] < 3 and os.getloadavg()[0] > (os.cpu_count() or 1):
        # Seen on the 2-core VM at load 3: an embedding lookup timed at 12 ms (0.04 ms quiet), for seconds.
        pytest.skip(f"the CPU is oversubscribed (load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): "
                    f"timings mean nothing, ratios {ratios}")
    assert 1 / 3 < ratios[-1] < 3, ratios


@pytest.mark.gpu
def test_on_cuda_units_are_timed_by_default_and_predict_the_compute_lane(monkeypatch, tmp_path):
    """On the GPU, with nothing asked: every unit timed, explain then reads the same times, and the compute
    lane predicted from them is near the profiled steps' (the issue: FLOPs at one efficiency were 50 % long
    on the H200)."""
    monkeypatch.delenv(time_units.MEASURE_ENV, raising=False)
    monkeypatch.setenv("RATEL_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    # Large enough that kernels, not the runtime's per-unit work on the host, fill the compute lane: at h=1024,
    # seq 512 the profiled lane was twice the prediction (21.6 ms against 10.7 on the H200).
    model = GPT(GPTConfig(vocab_size=8192, n_layer=4, n_head=16, d_model=2048, max_seq_len=1024)).to(torch.bfloat16)
    ids = torch.randint(0, 8192, (8, 1024), device="cuda")
    engine = ratel.compile(model.train(), budget="16GiB", example_inputs=(ids,), device="cuda", progress=False,
                           resident=False)
    assert all(c.measured for c in engine.plan.costs.units)
    measured = _profiled_compute(engine, ids, 4)
    predicted = engine.plan.times.compute
    explained = ratel.explain(model, "16GiB", (ids,), device="cuda", resident=False)
    engine.close()
    assert all(c.measured for c in explained.costs.units)
    ratio = predicted / min(measured[1:])
    print(f"CUDA compute lane: predicted {predicted * 1e3:.1f} ms, measured {min(measured[1:]) * 1e3:.1f} ms, "
          f"ratio {ratio:.2f}")
    assert 0.7 < ratio < 1.4
