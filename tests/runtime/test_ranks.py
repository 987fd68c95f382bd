"""Data parallel (ratel/runtime/ranks.py): gloo ranks under torchrun on the CPU train as one process does on
the same global batch — accumulation, clipping, per-group weight decay — and a checkpoint written by one
number of ranks resumes on another."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ratel
from ratel.runtime.ranks import Ranks

sys.path.insert(0, os.path.dirname(__file__))
import ranks_run as run  # noqa: E402
from helpers import make_model, no_decay_groups, subprocess_env  # noqa: E402

WORKER = Path(run.__file__)
# Ranks sum gradients in another order than one process's backward: fp32 rounding (losses and norms agree to
# ~1e-6), which Adam amplifies where a gradient is near zero: 2.5e-5 at most in 12 layers after 4 steps of
# lr 2e-3. A wrong slice or a stale state moves weights by about lr per step.
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def torchrun(ranks: int, out: Path, *args: str) -> dict:
    env = subprocess_env(Path(ratel.__file__).parents[1], OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                           str(WORKER), str(out), *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    return torch.load(out / "result.pt", weights_only=True)


@functools.lru_cache
def pytorch_reference(steps: int = run.STEPS, layers: int = 2, last_micro: int | None = None, clip: bool = True):
    """Plain PyTorch on the whole global batch, as a user writes it: loss / k per micro-batch,
    clip_grad_norm_, torch.optim.AdamW(fused=True) with per-group weight decay."""
    model = make_model("llama", layers=layers)
    opt = torch.optim.AdamW(no_decay_groups(model, 0.1), lr=run.LR, fused=True)
    losses, norms, states = [], [], []
    for step in range(steps):
        for micro in range(run.micro_batches(step, steps, last_micro)):
            ids, labels = run.DATA[step * run.ACCUMULATE + micro]
            loss = model(ids, labels=labels).loss / run.ACCUMULATE
            loss.backward()
            losses.append(loss.item())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), run.MAX_NORM)) if clip else None)
        opt.step()
        opt.zero_grad()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    moments = {f"{kind}/{name}": opt.state[p][kind].clone() for name, p in model.named_parameters()
               for kind in ("exp_avg", "exp_avg_sq")}
    return losses, norms, states, moments


def assert_same_training(result: dict, reference, start: int = 0) -> None:
    losses, norms, states, _ = reference
    assert len(result["losses"]) == len(losses) - start * run.ACCUMULATE
    assert result["losses"] == pytest.approx(losses[start * run.ACCUMULATE:], rel=1e-5)
    if norms[0] is None:        # a run without clipping
        assert all(n is None for n in result["norms"])
    else:
        assert result["norms"] == pytest.approx(norms[start:], rel=1e-5)
        assert max(norms) > run.MAX_NORM, "the run must clip for the test to say anything about clipping"
    final = states[-1]
    assert set(result["state"]) == set(final)
    for name, value in final.items():
        torch.testing.assert_close(result["state"][name], value, **TOLERANCE, msg=name)


def test_a_slice_per_rank_covers_each_element_once():
    for world in (1, 2, 3, 4, 7):
        for numel in (0, 1, 2, 5, 6, 1000, 1001):
            ranks = Ranks(rank=0, world=world, local_world=world)
            covered = [i for r in range(world) for i in range(*ranks.shard(numel, r))]
            assert covered == list(range(numel))


def test_two_ranks_equal_one_process_and_their_checkpoint_resumes_on_one_and_on_three(tmp_path):
    reference = pytorch_reference()
    two = torchrun(2, tmp_path / "two", "--save-at", "2")
    assert two["world_size"] == two["plan_ranks"] == 2
    assert "ranks' exchange" in two["summary"]       # the plan prices the exchange before each update
    # Each rank keeps Adam moments for its half of the elements, and its host memory stays within the plan
    assert two["states_held"] == sum(-(-numel // 2) for numel in two["group_numels"])
    assert two["host_bytes"] <= two["host_planned"]
    assert two["shared_weights"]        # one copy of the weights in shared memory for the host's ranks
    assert_same_training(two, reference)
    checkpoint = tmp_path / "two" / "checkpoint"

    # One process, no torchrun: the checkpoint holds every rank's slice of the Adam states.
    engine = run.build(resume=checkpoint)
    assert engine.world_size == 1 and engine.resumed.step == 2
    losses, norms = run.train(engine, 2, run.STEPS)
    assert_same_training({"losses": losses, "norms": norms, "state": engine.state_dict()}, reference, start=2)
    engine.close()

    # ratel.compile starts torch.distributed itself here
    three = torchrun(3, tmp_path / "three", "--resume", str(checkpoint), "--init-by-ratel")
    assert three["world_size"] == 3
    assert_same_training(three, reference, start=2)


def test_a_step_after_fewer_micro_batches_than_accumulate_averages_what_the_ranks_summed(tmp_path):
    result = torchrun(2, tmp_path / "partial", "--last-micro", "1")
    assert len(result["losses"]) == (run.STEPS - 1) * run.ACCUMULATE + 1
    assert_same_training(result, pytorch_reference(last_micro=1))


def test_three_ranks_with_every_optimizer_state_on_ssd_equal_one_process(tmp_path):
    result = torchrun(3, tmp_path / "ssd", "--ssd", "--layers", "12", "--save-at", str(run.STEPS))
    assert result["ssd_bytes"] > 0
    reference = pytorch_reference(layers=12)
    assert_same_training(result, reference)
    # The checkpoint gathered each rank's slice of the Adam moments from its swap files
    saved = {}
    for file in (tmp_path / "ssd" / "checkpoint").glob("optimizer*.safetensors"):
        saved.update(load_file(file))
    moments = reference[3]
    assert set(moments) <= set(saved)
    for name, value in moments.items():
        torch.testing.assert_close(saved[name], value, **TOLERANCE, msg=name)
    # each rank swaps to files of its own
    assert [name.rsplit("-", 1)[1] for name in result["swap_folders"]] == ["rank0", "rank1", "rank2"]


@pytest.mark.parametrize("last_micro,clip", [(None, True), (1, True), (None, False)],
                         ids=["whole cycles", "a last step after fewer micro-batches", "no clipping"])
def test_two_ranks_with_groups_resident_on_the_gpu_equal_one_process(tmp_path, last_micro, clip):
    """The first two groups on the "GPU" of every rank, whole: their gradients averaged among the ranks (on the
    GPUs' group), every rank updating them alike; the other groups as before. Accumulation and clipping on."""
    extra = ("--last-micro", str(last_micro)) if last_micro else ("--save-at", "2")
    extra += () if clip else ("--no-clip",)
    result = torchrun(2, tmp_path / "resident", "--resident", *extra)
    assert len(result["on_gpu"]) == 2 and result["streamed"]
    reference = pytorch_reference(last_micro=last_micro, clip=clip)
    assert_same_training(result, reference)
    if last_micro or not clip:
        return
    # Their checkpoint resumes in one process, every group streamed.
    engine = run.build(resume=tmp_path / "resident" / "checkpoint")
    assert not any(engine.plan.placement.on_gpu(g.name) for g in engine.plan.groups)
    losses, norms = run.train(engine, 2, run.STEPS)
    assert_same_training({"losses": losses, "norms": norms, "state": engine.state_dict()}, reference, start=2)
    engine.close()
