"""Checkpoints: a resumed run equals the uninterrupted one, a crash during a save leaves a complete checkpoint,
the weights load with transformers, and a bad checkpoint is refused naming its file."""
from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ratel
import checkpoint_run as run
from helpers import batches, make_model, subprocess_env, train_steps
from ratel.checkpoint import MANIFEST, CheckpointError

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    engine, scheduler = run.build(tmp_path_factory.mktemp("swap"))
    assert set(engine._resources.ssd.groups) == {g.index for g in engine.plan.groups}   # every state on SSD
    losses = run.train(engine, scheduler, 0, run.STEPS)
    state = engine.state_dict()
    engine.close()
    return losses, state


def resume_and_finish(folder: Path, swap: Path):
    engine, scheduler = run.build(swap, resume=folder)
    start = engine.resumed.step
    assert engine.resumed.state == {"next_step": start}
    losses = run.train(engine, scheduler, start, run.STEPS)
    state = engine.state_dict()
    engine.close()
    return start, losses, state


def assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_equals_the_uninterrupted_run(uninterrupted, tmp_path):
    losses, final = uninterrupted
    engine, scheduler = run.build(tmp_path / "swap")
    first = run.train(engine, scheduler, 0, 3, save=lambda step: tmp_path / "ckpt" if step == 3 else None)
    engine.close()
    start, rest, state = resume_and_finish(tmp_path / "ckpt", tmp_path / "swap")
    assert start == 3
    assert first + rest == losses          # bitwise: same states, same RNG, same learning rates
    assert_equal_states(state, final)


def test_resume_across_tiers_is_exact(uninterrupted, tmp_path):
    # Saved with every state on SSD, resumed with all of them in host memory (another budget), and back.
    losses, final = uninterrupted
    engine, scheduler = run.build(tmp_path / "swap")
    run.train(engine, scheduler, 0, 2, save=lambda step: tmp_path / "a" if step == 2 else None)
    engine.close()
    engine, scheduler = run.build(tmp_path / "swap", resume=tmp_path / "a", ssd=False)
    assert not engine._resources.ssd
    middle = run.train(engine, scheduler, 2, 4, save=lambda step: tmp_path / "b" if step == 4 else None)
    engine.close()
    start, rest, state = resume_and_finish(tmp_path / "b", tmp_path / "swap")
    assert middle + rest == losses[2 * run.ACCUMULATE:]
    assert_equal_states(state, final)


@pytest.mark.parametrize("point, expected_step", [
    ("tensor:3", 2),           # inside the weights file
    ("ssd:2", 2),              # mid-way through streaming the SSD-resident states
    ("manifest", 2),           # every file written, the manifest not yet
    ("rename", 4),             # the old checkpoint moved aside, the new one complete under its hidden name
])
def test_a_save_killed_at_any_point_resumes_from_the_last_complete_checkpoint(point, expected_step, uninterrupted,
                                                                              tmp_path):
    losses, final = uninterrupted
    proc = subprocess.run([sys.executable, str(HERE / "checkpoint_run.py"), str(tmp_path), point],
                          capture_output=True, text=True, timeout=600,
                          env=subprocess_env(HERE.parent))
    assert proc.returncode == -9, proc.stderr[-3000:]
    start, rest, state = resume_and_finish(tmp_path / "ckpt", tmp_path / "swap")
    assert start == expected_step
    assert rest == losses[start * run.ACCUMULATE:]
    assert_equal_states(state, final)
    # The next save cleans up what the killed one left.
    engine, scheduler = run.build(tmp_path / "swap", resume=tmp_path / "ckpt")
    engine.save(tmp_path / "ckpt")
    engine.close()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt")] == []


def hf_roundtrip(kind: str, dtype, tmp_path: Path, **save_kwargs):
    from transformers import AutoModelForCausalLM
    model = make_model(kind, layers=2, dtype=dtype)
    data = batches(3)
    engine = ratel.compile(model, "1GiB", optimizer=ratel.AdamW(lr=1e-2), example_inputs=(data[0][0],), device="cpu",
                           progress=False)
    for ids, labels in data:
        engine.backward(engine(ids, labels=labels).loss)
        engine.step()
    engine.save(tmp_path / "ckpt", **save_kwargs)
    probe = data[0][0]
    with torch.no_grad():
        ours = engine(probe).logits
    engine.close()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.dtype == dtype
    with torch.no_grad():
        theirs = loaded(probe).logits
    return ours, theirs


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_saved_weights_load_with_from_pretrained_and_give_ratels_logits(kind, tmp_path):
    ours, theirs = hf_roundtrip(kind, torch.float32, tmp_path)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_sharded_bf16_weights_load_with_from_pretrained(tmp_path):
    ours, theirs = hf_roundtrip("gpt2", torch.bfloat16, tmp_path, max_shard_size="64KiB")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "model.safetensors.index.json" in files and "model-00001-of-" in " ".join(files)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f for f in files if f.startswith("model-")}
    torch.testing.assert_close(theirs.float(), ours.float(), rtol=0, atol=0.05)


@pytest.fixture
def saved(tmp_path):
    engine, scheduler = run.build(tmp_path / "swap", ssd=False)
    run.train(engine, scheduler, 0, 1, save=lambda step: tmp_path / "ckpt")
    engine.close()
    return tmp_path / "ckpt"


def test_files_are_private(saved):
    assert stat.S_IMODE(saved.stat().st_mode) == 0o700
    for f in saved.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f.name


def flip_byte(path: Path, offset_from_end: int) -> None:
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        byte = f.read(1)
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_corrupt_tensor_is_refused_naming_its_file(saved, tmp_path):
    flip_byte(saved / "optimizer.safetensors", 100)
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors.*checksum"):
        run.build(tmp_path / "swap", resume=saved, ssd=False)


def test_a_truncated_file_is_refused_naming_it(saved, tmp_path):
    with open(saved / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, os.SEEK_END) - 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        run.build(tmp_path / "swap", resume=saved, ssd=False)


def test_a_changed_trainer_state_is_refused(saved, tmp_path):
    flip_byte(saved / "trainer_state.json", 5)
    with pytest.raises(CheckpointError, match=r"trainer_state\.json.*checksum"):
        run.build(tmp_path / "swap", resume=saved, ssd=False)


def test_an_incomplete_checkpoint_is_refused(saved, tmp_path):
    (saved / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        run.build(tmp_path / "swap", resume=saved, ssd=False)


def test_a_checkpoint_of_another_model_is_refused(saved):
    other = make_model("llama", layers=5)
    with pytest.raises(CheckpointError, match=r"trainer_state\.json.*another model.*layers\.4.*is not in it"):
        ratel.compile(other, "1GiB", example_inputs=(run.DATA[0][0],), device="cpu", progress=False, resume=saved)
    fewer = make_model("llama", layers=3)
    with pytest.raises(CheckpointError, match=r"another model.*parameters the model lacks.*layers\.3"):
        ratel.compile(fewer, "1GiB", example_inputs=(run.DATA[0][0],), device="cpu", progress=False, resume=saved)
    frozen = make_model("llama", layers=4)
    frozen.model.embed_tokens.weight.requires_grad_(False)
    with pytest.raises(CheckpointError, match="embed_tokens.*trainable"):
        ratel.compile(frozen, "1GiB", example_inputs=(run.DATA[0][0],), device="cpu", progress=False, resume=saved)


def test_save_in_the_middle_of_an_accumulation_cycle_is_refused(tmp_path):
    engine, scheduler = run.build(tmp_path / "swap", ssd=False)
    ids, labels = run.DATA[0]
    engine.backward(engine(ids, labels=labels).loss)
    with pytest.raises(ratel.RatelError, match="accumulation cycle"):
        engine.save(tmp_path / "ckpt")
    engine.close()
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.glob(".ckpt*"))


def test_parameters_on_ssd_and_frozen_blocks_save_and_resume_exactly(tmp_path):
    """bf16 compute copies on SSD (host memory below even the all-states-on-SSD minimum), two frozen blocks:
    the checkpoint reads their copies from the swap files, and the resumed run equals the uninterrupted one."""
    from safetensors import safe_open
    from ratel.ir import Tier
    from ratel.ir.layout import host_usage
    from ratel.passes.plan_placement import param_tiers
    from ratel.runtime.calibrate import cpu_adam_kernel

    model = make_model("gpt_untied", layers=12, dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        if name.startswith(("blocks.0.", "blocks.1.")):
            p.requires_grad_(False)
    data = batches(4)
    probe = ratel.compile(model, budget=ratel.Budget(gpu="1GiB", host="1TiB"), example_inputs=(data[0][0],),
                          device="cpu", progress=False)
    plan = probe.plan
    probe.close()
    torch_adam = cpu_adam_kernel() == "torch"
    states = {g.name: Tier.SSD for g in plan.groups if g.trainable}
    everything = param_tiers(plan.groups, states, plan.placement.activations,
                             ratel.Budget(gpu="1GiB", host=1, ssd_dir=str(tmp_path)), torch_adam)
    host = sum(b for _, b in host_usage(plan.groups, states, plan.placement.activations, torch_adam, everything))
    (tmp_path / "swap").mkdir()
    budget = ratel.Budget(gpu="1GiB", host=host, ssd_dir=str(tmp_path / "swap"))

    def build(resume=None):
        return ratel.compile(copy.deepcopy(model), budget=budget, optimizer=ratel.AdamW(lr=1e-3, weight_decay=0.1),
                             example_inputs=(data[0][0],), device="cpu", progress=False, resume=resume)

    engine = build()
    on_ssd = {name for name, tier in engine.plan.placement.param_tier if tier == Tier.SSD}
    frozen = {g.name for g in engine.plan.groups if not g.trainable}
    assert on_ssd & frozen and on_ssd - frozen, "want frozen and trainable compute copies on SSD"
    whole = train_steps(engine, data)
    final = engine.state_dict()
    engine.close()
    engine = build()
    first = train_steps(engine, data[:2])
    saved = engine.state_dict()
    engine.save(tmp_path / "ckpt")
    engine.close()
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
        for name in f.keys():         # the bf16 weights: frozen values, and the rounding of trained masters
            assert torch.equal(f.get_tensor(name), saved[name].to(torch.bfloat16)), name
    engine = build(resume=tmp_path / "ckpt")
    rest = train_steps(engine, data[2:])
    state = engine.state_dict()
    engine.close()
    assert first + rest == whole
    assert_equal_states(state, final)


def test_a_state_json_cannot_hold_is_refused_before_anything_is_written(tmp_path):
    engine, scheduler = run.build(tmp_path / "swap", ssd=False)
    run.train(engine, scheduler, 0, 1)
    with pytest.raises(ratel.RatelError, match="not JSON-serialisable"):
        engine.save(tmp_path / "ckpt", state={"sampler": object()})
    engine.close()
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.glob(".ckpt*"))
