"""One small training run, shared by the checkpoint tests and the process they kill (``python
checkpoint_run.py FOLDER KILL_AT``): a Llama with dropout, per-group weight decay, accumulation, clipping, a
warm-up + cosine LR schedule and every optimizer state on SSD (the host budget leaves none in host memory)."""
from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))

import ratel  # noqa: E402
from helpers import batches, host_minimum, make_model, no_decay_groups  # noqa: E402

STEPS = 6
ACCUMULATE = 2
DATA = batches(STEPS * ACCUMULATE)


def build(ssd_dir: Path, resume=None, ssd: bool = True):
    model = make_model("llama", dropout=0.1, layers=4)
    ids = DATA[0][0]
    host = host_minimum(model, ids, ACCUMULATE) if ssd else "1TiB"
    ssd_dir.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(no_decay_groups(model, 0.1), lr=2e-3)
    engine = ratel.compile(model, budget=ratel.Budget(gpu="1GiB", host=host, ssd_dir=str(ssd_dir)), optimizer=opt,
                           example_inputs=(ids,), device="cpu", progress=False, accumulate=ACCUMULATE,
                           max_grad_norm=0.5, resume=resume)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        engine.optimizer, lambda s: min(1.0, (s + 1) / 2) * 0.5 * (1 + math.cos(math.pi * s / STEPS)))
    if resume is not None:
        engine.restore_scheduler(scheduler)
    return engine, scheduler


def train(engine, scheduler, start: int, stop: int, save=None) -> list[float]:
    """Steps start..stop-1; ``save(step)`` may return a folder to checkpoint into after a step."""
    losses = []
    for step in range(start, stop):
        for micro in range(ACCUMULATE):
            torch.manual_seed(100 * step + micro)   # the data order is the step's; dropout draws from the RNG
            ids, labels = DATA[step * ACCUMULATE + micro]
            loss = engine(ids, labels=labels).loss / ACCUMULATE
            engine.backward(loss)
            losses.append(loss.item())
        engine.step()
        scheduler.step()
        folder = save(step + 1) if save is not None else None
        if folder is not None:
            engine.save(folder, scheduler=scheduler, state={"next_step": step + 1})
    return losses


def kill_at(point: str) -> None:
    """SIGKILL this process at ``point`` of the next save: the n-th tensor written ("tensor:n"), the n-th SSD
    group whose states are read out ("ssd:n"), before the manifest ("manifest"), or between moving the old
    checkpoint aside and renaming the new one into place ("rename")."""
    import ratel.checkpoint as checkpoint
    from ratel.runtime import ssd, tensor_files

    def die(*_):
        os.kill(os.getpid(), signal.SIGKILL)

    kind, _, n = point.partition(":")
    count = [0]

    def counting(original):
        def wrapper(*args, **kwargs):
            count[0] += 1
            if count[0] == int(n):
                die()
            return original(*args, **kwargs)
        return wrapper

    if kind == "tensor":
        tensor_files.TensorWriter.put = counting(tensor_files.TensorWriter.put)
    elif kind == "ssd":
        ssd.SsdStates.read_group = counting(ssd.SsdStates.read_group)
    elif kind == "manifest":
        original = checkpoint._write_json

        def before_manifest(path, value, files):
            if path.name == checkpoint.MANIFEST:
                die()
            return original(path, value, files)
        checkpoint._write_json = before_manifest
    elif kind == "rename":
        original_rename = os.rename

        def rename(src, dst):
            original_rename(src, dst)
            if ".old-" in str(dst):
                die()
        checkpoint.os.rename = rename


if __name__ == "__main__":
    folder, point = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(min(torch.get_num_threads(), 4))     # as conftest: the same arithmetic as the test
    engine, scheduler = build(folder / "swap")
    train(engine, scheduler, 0, 2, save=lambda step: folder / "ckpt" if step == 2 else None)
    kill_at(point)
    train(engine, scheduler, 2, 4, save=lambda step: folder / "ckpt" if step == 4 else None)
    engine.close()
