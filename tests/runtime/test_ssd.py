"""The SSD tier: optimizer states on real files, equal results, stable names, errors that surface."""
import copy
import errno
import os

import pytest
import torch

import ratel
from helpers import (batches, host_minimum, make_model, max_relative_difference, mixed_precision_reference,
                     subprocess_env, train_seeded)
from ratel.ir import Tier
from ratel.ir.layout import host_usage
from ratel.runtime.calibrate import cpu_adam_kernel


train = train_seeded


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_states_on_ssd_train_exactly_like_pytorch_adamw(kind, tmp_path):
    model = make_model(kind, layers=4)
    reference = copy.deepcopy(model)
    data = batches(6)
    host = host_minimum(model, data[0][0])
    budget = ratel.Budget(gpu="1GiB", host=host, ssd_dir=str(tmp_path))
    engine = ratel.compile(model, budget=budget, optimizer=ratel.AdamW(lr=1e-3, weight_decay=0.1),
                           example_inputs=(data[0][0],), device="cpu", progress=False)
    tiers = dict(engine.plan.placement.optimizer_tier)
    assert sum(t == Tier.SSD for t in tiers.values()) >= len(tiers) - 1
    assert engine.plan.memory.host_total <= host
    ours = train(engine, data)
    assert engine.host_bytes_allocated() <= host
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    for step, (ids, labels) in enumerate(data):
        loss = reference(ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert ours[step] == pytest.approx(loss.item(), rel=1e-6)
    worst, name = max_relative_difference(engine.state_dict(), reference)
    engine.close()
    assert worst < 1e-5, name


@pytest.mark.parametrize("piece", [None, 3000], ids=["whole groups", "pieces of 3000"])
def test_bf16_masters_on_ssd_equal_mixed_precision_pytorch(tmp_path, monkeypatch, piece):
    if piece is not None:
        from ratel.ir import layout
        monkeypatch.setattr(layout, "SSD_PIECE_NUMEL", piece)
    # The reference GPT: its exported graph runs the very ops eager runs. (transformers' Llama on the CPU
    # takes sdpa's enable_gqa path in eager but repeat_kv in the exported graph: the same function, rounded
    # differently in bf16.)
    model = make_model("gpt_untied", layers=3, dtype=torch.bfloat16)
    data = batches(4)
    expected, masters = mixed_precision_reference(model, data, 1e-3, 0.1)
    host = host_minimum(model, data[0][0])
    engine = ratel.compile(model, budget=ratel.Budget(gpu="1GiB", host=host, ssd_dir=str(tmp_path)),
                           optimizer=ratel.AdamW(lr=1e-3, weight_decay=0.1), example_inputs=(data[0][0],),
                           device="cpu", progress=False)
    assert any(t == Tier.SSD for _, t in engine.plan.placement.optimizer_tier)
    assert train(engine, data) == expected
    state = engine.state_dict()
    engine.close()
    for name, master in masters.items():
        assert torch.equal(state[name], master.detach()), name


def _swap_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_swap_files_have_stable_names_are_reused_and_removed(tmp_path):
    model = make_model("gpt", layers=3)
    data = batches(2)
    host = host_minimum(model, data[0][0])
    budget = ratel.Budget(gpu="1GiB", host=host, ssd_dir=str(tmp_path))
    first = ratel.compile(model, budget=budget, example_inputs=(data[0][0],), device="cpu", progress=False,
                          keep_swap_files=True)
    train(first, data)
    names = _swap_files(tmp_path)
    assert names and all(n.startswith("GPT-") and n.endswith(".adam.swap") for n in names)
    first.close()
    assert _swap_files(tmp_path) == names            # kept on request
    second = ratel.compile(model, budget=budget, example_inputs=(data[0][0],), device="cpu", progress=False)
    assert _swap_files(tmp_path) == names            # same model, same files
    train(second, data)
    second.close()
    assert _swap_files(tmp_path) == []               # removed by default


def test_an_io_error_surfaces_and_never_yields_silent_weights(tmp_path):
    from ratel import _swapper
    model = make_model("gpt", layers=3)
    data = batches(3)
    host = host_minimum(model, data[0][0])
    engine = ratel.compile(model, budget=ratel.Budget(gpu="1GiB", host=host, ssd_dir=str(tmp_path)),
                           example_inputs=(data[0][0],), device="cpu", progress=False)
    train(engine, data[:1])
    _swapper.inject_fault("write", errno.EIO, after=0, count=1000)
    try:
        with pytest.raises(Exception) as info:
            train(engine, data[1:])
            engine.state_dict()
    finally:
        _swapper.clear_faults()
    chain, error = [], info.value
    while error is not None:
        chain.append(error)
        error = error.__cause__
    io = [e for e in chain if isinstance(e, OSError)]
    assert io and io[0].errno == errno.EIO and ".adam" in str(io[0]) and "offset" in str(io[0])
    assert "Input/output error" in str(info.value)
    try:   # close reports write-backs that failed and nobody has seen yet; it frees everything regardless
        engine.close()
    except OSError as exc:
        assert exc.errno == errno.EIO
    assert not any(files for _, _, files in os.walk(tmp_path))


def test_no_ssd_dir_names_what_to_change():
    model = make_model("gpt", layers=3)
    ids = batches(1)[0][0]
    host = host_minimum(model, ids)
    with pytest.raises(ratel.BudgetError, match="ssd_dir") as info:
        ratel.compile(model, budget=ratel.Budget(gpu="1GiB", host=host), example_inputs=(ids,), device="cpu")
    assert info.value.tier == "host" and info.value.needed > host


def test_ssd_budget_is_enforced(tmp_path):
    model = make_model("gpt", layers=3)
    ids = batches(1)[0][0]
    host = host_minimum(model, ids)
    with pytest.raises(ratel.BudgetError) as info:
        ratel.compile(model, budget=ratel.Budget(gpu="1GiB", host=host, ssd=4096, ssd_dir=str(tmp_path)),
                      example_inputs=(ids,), device="cpu")
    assert info.value.tier == "ssd"


def test_parameters_on_ssd_when_host_memory_is_shorter_still(tmp_path):
    """Host memory below even the all-states-on-SSD minimum: the compute copies go to SSD as well (read back
    before every fetch), and training still equals plain PyTorch mixed precision bit for bit."""
    from ratel.passes.plan_placement import param_tiers
    model = make_model("gpt_untied", layers=12, dtype=torch.bfloat16)   # many groups: staging < copies
    data = batches(4)
    expected, masters = mixed_precision_reference(model, data, 1e-3, 0.1)
    probe = ratel.compile(model, budget=ratel.Budget(gpu="1GiB", host="1TiB"), example_inputs=(data[0][0],),
                          device="cpu", progress=False)
    plan = probe.plan
    probe.close()
    states = {g.name: Tier.SSD for g in plan.groups if g.trainable}
    everything = param_tiers(plan.groups, states, plan.placement.activations,
                             ratel.Budget(gpu="1GiB", host=1, ssd_dir=str(tmp_path)), (cpu_adam_kernel() == "torch"))
    host = sum(b for _, b in host_usage(plan.groups, states, plan.placement.activations, (cpu_adam_kernel() == "torch"), everything))
    engine = ratel.compile(model, budget=ratel.Budget(gpu="1GiB", host=host, ssd_dir=str(tmp_path)),
                           optimizer=ratel.AdamW(lr=1e-3, weight_decay=0.1), example_inputs=(data[0][0],),
                           device="cpu", progress=False)
    on_ssd = [name for name, tier in engine.plan.placement.param_tier if tier == Tier.SSD]
    assert on_ssd, "no parameter group was placed on SSD"
    assert any(n.endswith(".param.swap") for _, _, fs in os.walk(tmp_path) for n in fs)
    assert train(engine, data) == expected
    assert engine.host_bytes_allocated() <= host
    state = engine.state_dict()
    engine.close()
    for name, master in masters.items():
        assert torch.equal(state[name], master.detach()), name


@pytest.mark.parametrize("kind", ["gpt", "llama"])
@pytest.mark.parametrize("accumulate,max_norm", [(2, None), (1, 0.05), (3, 0.05)],
                         ids=["accumulate", "clip", "accumulate_and_clip"])
def test_accumulation_and_clipping_with_states_on_ssd_equal_pytorch(kind, accumulate, max_norm, tmp_path):
    from helpers import assert_trained_alike, train_like_pytorch
    model = make_model(kind, layers=4, dropout=0.1)
    data = batches(4 * accumulate)
    probe = ratel.compile(model, budget=ratel.Budget(gpu="1GiB", host="1TiB"), example_inputs=(data[0][0],),
                          device="cpu", progress=False)
    plan = probe.plan
    probe.close()
    states = {g.name: Tier.SSD for g in plan.groups if g.trainable}
    host = sum(b for _, b in host_usage(plan.groups, states, plan.placement.activations, (cpu_adam_kernel() == "torch"),
                                        accumulate=accumulate, clip=max_norm is not None))
    result = train_like_pytorch(model, data, accumulate=accumulate, max_grad_norm=max_norm,
                                budget=ratel.Budget(gpu="1GiB", host=host, ssd_dir=str(tmp_path)))
    engine = result["engine"]
    tiers = dict(engine.plan.placement.optimizer_tier)
    assert sum(t == Tier.SSD for t in tiers.values()) >= len(tiers) - 1
    assert engine.host_bytes_allocated() <= host
    assert_trained_alike(result)
    engine.close()


def test_clipping_with_parameters_on_ssd_equals_the_host_tier_bit_for_bit(tmp_path):
    """bf16 compute copies and states on SSD, clipping and accumulation: the same bits as all on the host."""
    from ratel.passes.plan_placement import param_tiers
    model = make_model("gpt_untied", layers=12, dtype=torch.bfloat16)
    data = batches(6)

    def run(budget):
        engine = ratel.compile(copy.deepcopy(model), budget=budget, optimizer=ratel.AdamW(lr=1e-3, weight_decay=0.1),
                               example_inputs=(data[0][0],), device="cpu", progress=False, accumulate=2,
                               max_grad_norm=0.05)
        losses, norms = [], []
        for step, (ids, labels) in enumerate(data):
            torch.manual_seed(1000 + step)
            loss = engine(ids, labels=labels).loss
            engine.backward(loss / 2)
            losses.append(loss.item())
            if step % 2 == 1:
                engine.step()
                norms.append(engine.grad_norm)
        return engine, losses, norms

    host_engine, host_losses, host_norms = run(ratel.Budget(gpu="1GiB", host="1TiB"))
    plan = host_engine.plan
    states = {g.name: Tier.SSD for g in plan.groups if g.trainable}
    everything = param_tiers(plan.groups, states, plan.placement.activations,
                             ratel.Budget(gpu="1GiB", host=1, ssd_dir=str(tmp_path)), (cpu_adam_kernel() == "torch"), 2)
    host = sum(b for _, b in host_usage(plan.groups, states, plan.placement.activations, (cpu_adam_kernel() == "torch"),
                                        everything, accumulate=2))
    ssd_engine, ssd_losses, ssd_norms = run(ratel.Budget(gpu="1GiB", host=host, ssd_dir=str(tmp_path)))
    assert any(t == Tier.SSD for _, t in ssd_engine.plan.placement.param_tier)
    assert ssd_losses == host_losses and ssd_norms == host_norms
    assert all(n > 0.05 for n in host_norms)
    ours, theirs = ssd_engine.state_dict(), host_engine.state_dict()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    ssd_engine.close()
    host_engine.close()


def test_an_ssd_folder_too_small_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    model = make_model("gpt", layers=4)
    ids = batches(1)[0][0]
    host = host_minimum(model, ids)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - 4096, 4096))
    with pytest.raises(ratel.BudgetError) as info:
        ratel.compile(model, budget=ratel.Budget(gpu="1GiB", host=host, ssd_dir=str(tmp_path)),
                      example_inputs=(ids,), device="cpu", progress=False)
    message = str(info.value)
    assert info.value.tier == "ssd" and "on SSD" in message and "4.00 KiB free" in message
    assert not any(files for _, _, files in os.walk(tmp_path)), "nothing may be written before the refusal"


def test_states_move_in_pieces_and_train_exactly_like_whole_groups_in_host_memory(tmp_path, monkeypatch):
    """Pieces smaller than a group (and crossing its weight-decay segments) stage a few pieces, not groups:
    the updates, a checkpoint written and resumed through them, equal the host tier's bit for bit."""
    import checkpoint_run as run
    from ratel.ir import layout
    monkeypatch.setattr(layout, "SSD_PIECE_NUMEL", 5000)
    engine, scheduler = run.build(tmp_path / "host", ssd=False)
    expected = run.train(engine, scheduler, 0, run.STEPS)
    expected_state = engine.state_dict()
    engine.close()

    engine, scheduler = run.build(tmp_path / "swap")
    ssd = engine._resources.ssd
    assert set(ssd.groups) == {g.index for g in engine.plan.groups}
    assert max(len(ssd.piece_ranges(g)) for g in ssd.groups.values()) >= 5
    staging = dict(engine.plan.memory.host_bytes)["SSD staging buffers"]
    assert staging == 3 * (layout.page(5000 * 8) + layout.PAGE) and len(ssd.buffers) == 3   # fp32: moments
    first = run.train(engine, scheduler, 0, 3, save=lambda step: tmp_path / "ckpt" if step == 3 else None)
    engine.close()
    engine, scheduler = run.build(tmp_path / "swap", resume=tmp_path / "ckpt")
    rest = run.train(engine, scheduler, 3, run.STEPS)
    state = engine.state_dict()
    engine.close()
    assert first + rest == expected
    for name, value in expected_state.items():
        assert torch.equal(state[name], value), name


_ENDS_OPEN = """
import os, sys, ratel
from helpers import batches, host_minimum, make_model, train_steps
model, data = make_model("gpt", layers=3), batches(2)
engine = ratel.compile(model, budget=ratel.Budget(gpu="1GiB", host=host_minimum(model, data[0][0]),
                       ssd_dir=sys.argv[1]), example_inputs=(data[0][0],), device="cpu", progress=False)
train_steps(engine, data)
print("swap files while open:", sum(len(files) for _, _, files in os.walk(sys.argv[1])))
"""


def test_a_script_that_ends_without_close_leaves_no_swap_files(tmp_path):
    """Swap files hold gigabytes per billion parameters: a script that never calls close() must not leave them
    in the user's ssd_dir (they were, before engines were closed at exit)."""
    import subprocess
    import sys
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = subprocess_env(os.path.dirname(tests), tests)
    proc = subprocess.run([sys.executable, "-c", _ENDS_OPEN, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split("swap files while open:")[1]) > 0
    assert not any(files for _, _, files in os.walk(tmp_path))


def test_a_profiled_step_shows_what_the_ssd_lane_moved_and_when(tmp_path):
    model = make_model("gpt", layers=3)
    data = batches(2)
    host = host_minimum(model, data[0][0])
    engine = ratel.compile(model, budget=ratel.Budget(gpu="1GiB", host=host, ssd_dir=str(tmp_path)),
                           example_inputs=(data[0][0],), device="cpu", progress=False)
    swapper, lane = engine._resources.swapper, engine._resources.lane
    train(engine, data[:1])
    lane.flush()                  # the first step's write-backs, queued on the lane too, are all done
    swapper.wait_all()
    before = swapper.stats()
    engine.profile = True
    train(engine, data[1:])
    record = engine.last_step
    lane.flush()
    swapper.wait_all()
    after = swapper.stats()
    plan = engine.plan
    summary = ratel.summary(plan, record)
    engine.close()
    reads = [s for s in record.spans if s.lane == "ssd_read"]
    writes = [s for s in record.spans if s.lane == "ssd_write"]
    # Every read of the step is done before step() returns: all of them are in the record, each under a step.
    assert sum(s.nbytes for s in reads) == after["bytes_read"] - before["bytes_read"] > 0
    assert all(0 <= s.step < len(plan.steps) for s in reads)
    # Write-backs still in flight when step() returned are not; those recorded are this step's.
    assert 0 < sum(s.nbytes for s in writes) <= after["bytes_written"] - before["bytes_written"]
    assert all(0 <= s.start <= s.end for s in reads + writes)
    line = next(x for x in summary.splitlines() if x.strip().startswith("SSD measured"))
    assert "GB/s while busy" in line and "idle" in line


@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_host_updates_run_while_an_ssd_group_waits_for_its_states_and_results_stay_exact(tmp_path, monkeypatch,
                                                                                        max_norm):
    """The later layers' states on SSD (their gradients come first), the earlier ones in host memory: while an
    SSD group waits for a piece still being read (every read held 20 ms here), the worker updates host groups
    queued behind it (or, clipping, later in the pass after the backward), so the step need not end with them
    after the disk. The order of independent updates changes nothing: losses and weights are PyTorch's."""
    from ratel import _swapper
    from ratel.ir import layout
    from ratel.runtime.optimizer import CPUOptimizer
    monkeypatch.setattr(layout, "SSD_PIECE_NUMEL", 5000)     # staging smaller than the states it saves
    model = make_model("gpt", layers=4)
    reference = copy.deepcopy(model)
    data = batches(4)
    probe = ratel.explain(model, ratel.Budget(gpu="1GiB", host="1TiB", ssd_dir=str(tmp_path)), (data[0][0],),
                          device="cpu")
    trainable = [g for g in probe.groups if g.trainable]
    late = {g.name for g in sorted(trainable, key=lambda g: -g.update_unit)[:len(trainable) // 2]}
    tiers = {g.name: Tier.SSD if g.name in late else Tier.HOST for g in trainable}
    host = sum(b for _, b in host_usage(probe.groups, tiers, probe.placement.activations,
                                        cpu_adam_kernel() == "torch"))
    engine = ratel.compile(model, budget=ratel.Budget(gpu="1GiB", host=host, ssd_dir=str(tmp_path)),
                           optimizer=ratel.AdamW(lr=1e-3, weight_decay=0.1), example_inputs=(data[0][0],),
                           device="cpu", progress=False, max_grad_norm=max_norm)
    on_ssd = {name for name, tier in engine.plan.placement.optimizer_tier if tier == Tier.SSD}
    assert on_ssd and on_ssd != {g.name for g in trainable}
    events = []
    update = CPUOptimizer._update

    def logged(self, group, grad, grad_scale):
        events.append(("begin", group.name))
        update(self, group, grad, grad_scale)
        events.append(("end", group.name))
    monkeypatch.setattr(CPUOptimizer, "_update", logged)
    _swapper.inject_fault("read", None, after=0, count=10**6, delay=0.02)
    try:
        ours = train(engine, data)
    finally:
        _swapper.clear_faults()
    worst, name = max_relative_difference(engine.state_dict(), reference_trained(reference, data, ours, max_norm))
    engine.close()
    assert worst < 1e-5, name
    open_ssd, nested = set(), []
    for kind, group in events:           # host updates begun while an SSD group's update was under way
        if group in on_ssd:
            (open_ssd.add if kind == "begin" else open_ssd.discard)(group)
        elif kind == "begin" and open_ssd:
            nested.append(group)
    assert nested, events


def reference_trained(model, data, losses, max_norm=None):
    """``model`` trained on ``data`` by PyTorch's AdamW (lr 1e-3, weight decay 0.1), the gradient clipped to
    ``max_norm`` if given; each loss as ``losses``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    for step, (ids, labels) in enumerate(data):
        loss = model(ids, labels=labels).loss
        loss.backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        opt.zero_grad()
        assert losses[step] == pytest.approx(loss.item(), rel=1e-6)
    return model
