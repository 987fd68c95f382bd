"""One data-parallel training run, started by the rank tests under torchrun (gloo, CPU)::

    torchrun --standalone --nproc-per-node N ranks_run.py OUT --steps S [--resume CKPT] [--save-at K] [--ssd]

Each rank trains a small Llama on its share of a global batch of ``ROWS`` rows per micro-batch (``ACCUMULATE``
micro-batches per update, the loss divided by k, clipping at ``MAX_NORM`` unless ``--no-clip``, per-group
weight decay). Rank 0
writes OUT/result.pt: the mean loss over the ranks of every micro-batch, the gradient norms and the final
``state_dict()``. ``--save-at K`` checkpoints into OUT/checkpoint after update K; ``--ssd`` puts every
optimizer state on SSD (give ``--layers 12``: with a third of each group's states per rank, fewer layers' states take
less host memory than the SSD staging buffers, and the planner keeps them on the host) (a folder per run under OUT). ``--init-by-ratel`` leaves the process group to
``ratel.compile``. ``--resident`` keeps the first two groups on the "GPU" (plan_resident_groups, asked for on
the CPU): whole on every rank, their gradients averaged among the ranks before each rank's update.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ratel  # noqa: E402
from ratel.runtime import checked_lanes  # noqa: E402
from helpers import batches, host_minimum, make_model, no_decay_groups  # noqa: E402

ROWS = 6            # divides by 1, 2 and 3 ranks
ACCUMULATE = 2
MAX_NORM = 0.5
LR = 2e-3
STEPS = 4
DATA = batches(STEPS * ACCUMULATE, batch=ROWS)


def build(resume=None, ssd_dir: Path | None = None, layers: int = 2, resident: bool | None = None,
          clip: bool = True):
    model = make_model("llama", layers=layers)
    if dist.is_initialized() and dist.get_rank() != 0:
        with torch.no_grad():     # another start on each rank: training must take rank 0's, as DDP does
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    ids = DATA[0][0]
    budget = ratel.Budget(gpu="1GiB", host="1TiB")
    if ssd_dir is not None:
        ssd_dir.mkdir(parents=True, exist_ok=True)
        # Budget.host is the host's, shared by its ranks
        ranks = dist.get_world_size() if dist.is_initialized() else 1
        host = host_minimum(model, _share(ids), ACCUMULATE, clip=True, ranks=ranks) * ranks
        budget = ratel.Budget(gpu="1GiB", host=host, ssd_dir=str(ssd_dir))
    if resident:
        from ratel.ir.layout import device_state_bytes
        streaming = ratel.explain(model, budget, (_share(ids),), device="cpu", accumulate=ACCUMULATE,
                                  max_grad_norm=MAX_NORM if clip else None, resident=False)
        first = sorted(streaming.groups, key=lambda g: (g.update_unit, g.index))[:2]
        gpu = streaming.memory.gpu_peak + sum(device_state_bytes(g, ACCUMULATE) + 4 * g.numel for g in first)
        budget = ratel.Budget(gpu=gpu, host=budget.host, ssd_dir=budget.ssd_dir)
    opt = torch.optim.AdamW(no_decay_groups(model, 0.1), lr=LR)
    return ratel.compile(model, budget=budget, optimizer=opt, example_inputs=(_share(ids),), device="cpu",
                         progress=False, accumulate=ACCUMULATE, max_grad_norm=MAX_NORM if clip else None,
                         resume=resume, resident=resident)


def _share(rows: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global micro-batch (all of them with one process)."""
    if not dist.is_initialized():
        return rows
    n, r = dist.get_world_size(), dist.get_rank()
    per = rows.shape[0] // n
    return rows[r * per:(r + 1) * per]


def micro_batches(step: int, stop: int, last_micro: int | None) -> int:
    """Micro-batches of an update: ``last_micro`` for the last one when given (an epoch's partial end)."""
    return last_micro if last_micro is not None and step == stop - 1 else ACCUMULATE


def train(engine, start: int, stop: int, save_at: int | None = None, folder: Path | None = None,
          last_micro: int | None = None):
    losses, norms = [], []
    for step in range(start, stop):
        for micro in range(micro_batches(step, stop, last_micro)):
            ids, labels = DATA[step * ACCUMULATE + micro]
            loss = engine(_share(ids), labels=_share(labels)).loss / ACCUMULATE
            engine.backward(loss)
            mean = loss.detach().clone()
            if dist.is_initialized():     # a user's own collective, on the default group, between Ratel's
                dist.all_reduce(mean)
                mean /= dist.get_world_size()
            losses.append(float(mean))
        engine.step()
        norms.append(engine.grad_norm)
        if save_at is not None and step + 1 == save_at:
            engine.save(folder, state={"next_step": step + 1})
    return losses, norms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--resume", type=Path)
    parser.add_argument("--save-at", type=int)
    parser.add_argument("--ssd", action="store_true")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--resident", action="store_true", help="keep the first two groups on the 'GPU'")
    parser.add_argument("--no-clip", action="store_true", help="no max_grad_norm: updates run as gradients land")
    parser.add_argument("--last-micro", type=int, help="micro-batches of the last update (step() after fewer)")
    parser.add_argument("--init-by-ratel", action="store_true",
                        help="leave torch.distributed to ratel.compile (the example batch is then the global one)")
    args = parser.parse_args()
    if not args.init_by_ratel:
        dist.init_process_group("gloo")
    args.out.mkdir(parents=True, exist_ok=True)
    engine = build(args.resume, args.out / "ssd" if args.ssd else None, args.layers,
                   resident=True if args.resident else None, clip=not args.no_clip)
    start = engine.resumed.step if engine.resumed is not None else 0
    losses, norms = train(engine, start, args.steps, args.save_at, args.out / "checkpoint", args.last_micro)
    # Listed before state_dict(), a collective: no rank can have closed its engine (removing its swap folder) yet.
    swap_folders = sorted(p.name for p in (args.out / "ssd").glob("*")) if args.ssd else []
    state = engine.state_dict()
    if engine.rank == 0:
        torch.save({"losses": losses, "norms": norms, "state": state, "world_size": engine.world_size,
                    "ssd_bytes": engine.plan.memory.ssd_total, "plan_ranks": engine.plan.ranks,
                    "summary": ratel.summary(engine.plan), "host_bytes": engine.host_bytes_allocated(),
                    "host_planned": engine.plan.memory.host_total,
                    "states_held": sum(t.numel() for t in engine._store.exp_avg.values()),
                    "group_numels": [g.numel for g in engine.plan.groups if g.trainable],
                    "shared_weights": engine._resources.shared_pool is not None,
                    "swap_folders": swap_folders,
                    "on_gpu": [g.name for g in engine.plan.groups if engine.plan.placement.on_gpu(g.name)],
                    "streamed": [g.name for g in engine.plan.groups if not engine.plan.placement.on_gpu(g.name)]},
                   args.out / "result.pt")
    engine.close()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    if checked_lanes.checking():      # each rank's kernels stamped for the copy lanes' checks, as in the tests
        with checked_lanes.ComputeAccesses():
            main()
    else:
        main()
