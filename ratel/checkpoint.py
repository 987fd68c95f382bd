"""Checkpoints: everything a run needs to continue exactly, written so that a crash never loses the last one.

A checkpoint is a folder::

    config.json, generation_config.json   the Hugging Face config (models that have one)
    model.safetensors                     the weights in the compute dtype, under the model's names
      (or model-00001-of-0000N.safetensors + model.safetensors.index.json past ``max_shard_size``)
                                          so ``AutoModelForCausalLM.from_pretrained(folder)`` loads it
    optimizer.safetensors                 per trainable parameter: fp32 master (unless the weights are fp32),
      (or optimizer-0000i-of-0000N...)    exp_avg, exp_avg_sq
    trainer_state.json                    update count, param-group hyper-parameters, LR scheduler state, RNG
                                          states, the caller's own state (e.g. the data position), the model's
                                          parameter list (a checkpoint of another model is refused)
    ratel_checkpoint.json                 the manifest, written last: every file's size and checksums

It is written into a hidden sibling folder, flushed to the disk file by file, the manifest last, and only
then renamed into place (an older checkpoint of that name is moved aside first and deleted after). A crash
at any moment leaves a complete checkpoint: the old one, or the new one under its hidden name, which
``resolve`` finds. Optimizer states that live on SSD stream from their swap files a group at a time.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ratel.errors import RatelError
from ratel.ir import canonical_parameter_names, format_bytes
from ratel.ir.budget import parse_bytes
from ratel.runtime.tensor_files import CheckpointError, ShardedWriter, TensorSet, hash_pool

log = logging.getLogger("ratel")

FORMAT = "ratel-checkpoint/1"
MANIFEST = "ratel_checkpoint.json"
STATE = "trainer_state.json"

__all__ = ["CheckpointError", "Checkpoint", "latest", "open_checkpoint", "resolve", "save"]


@dataclass
class Checkpoint:
    """A complete checkpoint, its manifest checked against the model it is to resume."""

    folder: Path
    manifest: dict
    state: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def tensors(self) -> TensorSet:
        files = {name: entry for name, entry in self.manifest["files"].items() if name.endswith(".safetensors")}
        return TensorSet(self.folder, files, hash_pool())


@dataclass(frozen=True)
class Resumed:
    """What ``engine.resumed`` tells a resumed run: the step it continues from, the state passed to
    ``engine.save(state=...)``, and the LR scheduler's state (``engine.restore_scheduler`` loads it)."""

    step: int
    state: Any
    scheduler: dict | None
    folder: Path


# ---------------------------------------------------------------------- saving
def save(engine, path, *, scheduler=None, state: Any = None, max_shard_size: int | str = "5GB",
         extra_files: dict[str, bytes] | None = None, progress: bool = True) -> Path:
    """Write ``engine``'s checkpoint to the folder ``path`` (see the module docstring); returns it.
    ``extra_files`` (name -> bytes, e.g. the tokenizer's files) are written into it and checksummed too."""
    for name in extra_files or {}:
        if Path(name).name != name or name.startswith(".") or name in (MANIFEST, STATE, "config.json"):
            raise RatelError(f"engine.save(extra_files=): {name!r} is not a plain file name the checkpoint leaves free")
    store = engine._store
    if store is None:
        raise RatelError("nothing to save yet: compile with example_inputs or run a step first")
    optimizer = engine._optimizer
    if optimizer.micro:
        raise RatelError(f"engine.save() in the middle of an accumulation cycle ({optimizer.micro} of "
                         f"{optimizer.accumulate} micro-batches done): call engine.step() first, then save")
    optimizer.wait_all()
    # Before any byte is written: a state that cannot be saved is refused at once, not after the tensors.
    trainer_state = _trainer_state(engine, scheduler, state)
    ranks = engine._ranks
    if ranks is not None:
        # Each rank holds current states only in its slice: every rank takes part in gathering them group by
        # group, and rank 0 writes the checkpoint alone, one that loads on any number of ranks.
        if ranks.rank != 0:
            store.write_checkpoint(_Discard(), _Discard(), progress=False)
            if not ranks.all_agree(True):
                raise RatelError(f"rank {ranks.rank}: rank 0 failed to write the checkpoint {path} (its error says why)")
            return Path(path).absolute()
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f".{path.name}.partial-{os.getpid()}-{time.time_ns()}"
    partial.mkdir(mode=0o700)
    start = time.perf_counter()
    pool = hash_pool()
    weights = states = None
    told_ranks = ranks is None
    try:
        weight_entries, state_entries = store.checkpoint_entries()
        buffers = [(name, value.detach().cpu().contiguous()) for name, value in _buffers(engine)]
        shard = parse_bytes(max_shard_size)
        weights = ShardedWriter(partial, "model", weight_entries + [(n, b.dtype, tuple(b.shape)) for n, b in buffers],
                                pool, shard, metadata={"format": "pt"})
        states = ShardedWriter(partial, "optimizer", state_entries, pool, shard, metadata={"format": "ratel"})
        store.write_checkpoint(weights, states, progress=progress)
        for name, value in buffers:
            weights.put(name, value)
        files = {**weights.finish(), **states.finish()}
        if len(weights.shards) > 1:
            _write_json(partial / "model.safetensors.index.json",
                        {"metadata": {"total_size": weights.total_size}, "weight_map": weights.weight_map}, files)
        _write_hf_config(engine.model, partial, files)
        for name, data in sorted((extra_files or {}).items()):
            _write_bytes(partial / name, data, files)
        _write_json(partial / STATE, trainer_state, files)
        _write_json(partial / MANIFEST, {"format": FORMAT, "step": trainer_state["step"], "files": files}, None)
        _fsync_dir(partial)
        _replace(partial, path)
        told_ranks = ranks is None or ranks.all_agree(True)
    except BaseException:
        if not told_ranks:
            ranks.all_agree(False)
        for writer in (weights, states):
            if writer is not None:
                writer.abort()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        pool.shutdown(wait=True)
    _remove_stale(path)
    size = sum(entry["bytes"] for entry in files.values())
    seconds = time.perf_counter() - start
    log.info("ratel: saved %s (%s in %.1f s, %s/s)", path, format_bytes(size), seconds, format_bytes(int(size / seconds)))
    return path


class _Discard:
    """The writers of ranks other than 0: they gather states for rank 0 and keep nothing."""

    def put(self, name: str, tensor: torch.Tensor) -> None:
        pass

    def wait_hashes(self) -> None:
        pass


def _buffers(engine) -> list[tuple[str, torch.Tensor]]:
    """Persistent buffers, as ``model.state_dict()`` has them (tied duplicates once)."""
    state = engine.state_dict_buffers()
    return sorted(state.items())


def _trainer_state(engine, scheduler, state: Any) -> dict:
    model = engine.model
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    steps = {int(t.item()) for t in engine._store.steps.values()}
    if len(steps) > 1:
        raise RatelError(f"parameter groups have done different numbers of updates {sorted(steps)} (a Ratel bug)")
    rng = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
           "python": random.getstate()}      # JSON writes its tuples as lists; restore_rng turns them back
    if engine.device.type == "cuda":
        rng["cuda"] = base64.b64encode(torch.cuda.get_rng_state(engine.device).numpy().tobytes()).decode()
    out = {"format": FORMAT, "step": engine.global_step, "optimizer_step": steps.pop() if steps else 0,
           "param_groups": groups, "scheduler": scheduler.state_dict() if scheduler is not None else None,
           "state": state, "rng": rng, "model": {"class": type(model).__name__, "parameters": _parameter_list(model)},
           "accumulate": engine.accumulate, "max_grad_norm": engine.max_grad_norm, "world_size": engine.world_size,
           "time": time.time()}
    try:
        json.dumps(out)
    except TypeError as exc:
        raise RatelError(f"engine.save(): the scheduler state or state= is not JSON-serialisable ({exc}); pass "
                         "plain numbers, strings, lists and dicts") from exc
    return out


def _parameter_list(model: nn.Module) -> list[list]:
    """[name, shape, dtype, trainable] of every parameter (tied ones once), as the checkpoint records them."""
    canonical = canonical_parameter_names(model)
    return [[name, list(p.shape), str(p.dtype).removeprefix("torch."), bool(p.requires_grad)]
            for name, p in model.named_parameters() if canonical[name] == name]


def _write_hf_config(model: nn.Module, folder: Path, files: dict) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return
    config = copy.deepcopy(config)       # save_pretrained's additions stay off the user's model
    config.architectures = [type(model).__name__]
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) == 1:
        config.dtype = dtypes.pop()
    _write_bytes(folder / "config.json", config.to_json_string(use_diff=True).encode(), files)
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "to_json_string"):
        _write_bytes(folder / "generation_config.json", generation.to_json_string(use_diff=True).encode(), files)


def _write_json(path: Path, value: dict, files: dict | None) -> None:
    _write_bytes(path, json.dumps(value, indent=1).encode(), files)


def _write_bytes(path: Path, data: bytes, files: dict | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if files is not None:
        files[path.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(partial: Path, path: Path) -> None:
    """Move the complete ``partial`` folder to ``path``; an existing checkpoint there is moved aside first
    (so one complete checkpoint exists at every moment) and removed after."""
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}-{time.time_ns()}"
        os.rename(path, old)
    os.rename(partial, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _siblings(path: Path) -> list[Path]:
    """Hidden folders that saves of ``path`` left: interrupted (partial) or moved aside (old)."""
    return sorted(path.parent.glob(f".{path.name}.partial-*")) + sorted(path.parent.glob(f".{path.name}.old-*"))


def _remove_stale(path: Path) -> None:
    for folder in _siblings(path):
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------- loading
def resolve(path) -> Path:
    """The complete checkpoint to load for ``path``: the folder itself, or, when a save was interrupted
    between moving the old one aside and renaming the new one, the most recent complete hidden sibling."""
    path = Path(path).absolute()
    if (path / MANIFEST).is_file():
        return path
    complete = [f for f in _siblings(path) if (f / MANIFEST).is_file()]
    if complete:
        best = max(complete, key=lambda f: (_read_manifest(f).get("step", -1), f.stat().st_mtime))
        log.warning("ratel: %s is incomplete or missing (a save was interrupted); using the complete copy %s",
                    path, best)
        return best
    if path.is_dir():
        raise CheckpointError(f"{path} has no {MANIFEST}: the checkpoint is incomplete (a save did not finish); "
                              "resume from an earlier one")
    raise CheckpointError(f"no checkpoint at {path}: give the folder engine.save() wrote")


def latest(folder) -> Path | None:
    """The complete checkpoint with the highest step among ``folder/checkpoint-*`` (``ratel train``'s
    layout), or None."""
    folder = Path(folder)
    found = []
    for candidate in folder.glob("checkpoint-*"):
        try:
            found.append((_read_manifest(resolve(candidate)).get("step", -1), candidate))
        except CheckpointError:
            continue
    return max(found)[1] if found else None


def _read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / MANIFEST}: unreadable ({exc}); the checkpoint is corrupt") from exc
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{folder / MANIFEST}: format {manifest.get('format')!r}, this Ratel reads {FORMAT!r}")
    return manifest


def open_checkpoint(path, model: nn.Module) -> Checkpoint:
    """The checkpoint at ``path``, checked: its manifest and trainer state intact, its files present with
    their sizes, and its parameters those of ``model`` (names, shapes, dtypes, which are trainable)."""
    folder = resolve(path)
    manifest = _read_manifest(folder)
    for name, entry in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing; the checkpoint is incomplete, resume from an earlier one")
        if file.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, the manifest says {entry['bytes']}: the "
                                  "file is truncated or was changed; resume from an earlier checkpoint")
        if isinstance(entry["sha256"], str) and hashlib.sha256(file.read_bytes()).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{file}: its checksum does not match the manifest: the file is corrupt")
    state = json.loads((folder / STATE).read_text())
    _check_model(state, model, folder / STATE)
    return Checkpoint(folder, manifest, state)


def _check_model(state: dict, model: nn.Module, file: Path) -> None:
    ours = _parameter_list(model)
    saved = state["model"]["parameters"]
    if ours == saved:
        return
    theirs = {entry[0]: entry for entry in saved}
    for entry in ours:
        other = theirs.get(entry[0])
        if other != entry:
            what = ("is not in it" if other is None else
                    f"is saved as shape {other[1]} {other[2]} trainable={other[3]}, the model has shape {entry[1]} "
                    f"{entry[2]} trainable={entry[3]}")
            raise CheckpointError(f"{file}: the checkpoint is of another model ({state['model']['class']}): parameter "
                                  f"{entry[0]} {what}. Resume with the model (and requires_grad settings) it was "
                                  "saved from")
    extra = sorted(set(theirs) - {e[0] for e in ours})
    raise CheckpointError(f"{file}: the checkpoint is of another model: it has parameters the model lacks "
                          f"(first: {extra[0] if extra else '?'})")


def restore_rng(state: dict, device: torch.device) -> None:
    """The random number generators as they were when the checkpoint was saved."""
    rng = state["rng"]
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(rng["torch"])), dtype=torch.uint8))
    random.setstate(_as_tuple(rng["python"]))
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(rng["cuda"])), dtype=torch.uint8),
                                 device)


def _as_tuple(value):
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    return value
