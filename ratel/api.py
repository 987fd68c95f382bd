"""The public face: ``ratel.compile``, and the names a user needs with it (``Budget``, ``Engine``, ``AdamW``).

``compile`` captures the model, plans it for the example inputs (so a budget too small is refused before
any memory is taken), materialises the parameters into host memory and returns an ``Engine``
(ratel/engine.py), which plans again for every new input shape.
"""
from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from ratel.checkpoint import open_checkpoint
from ratel.errors import BudgetError, RatelError
from ratel.engine import Engine
from ratel.ir.budget import Budget, parse_bytes
from ratel.ir.hardware import HardwareProfile
from ratel.runtime.calibrate import detect, this_machine, with_disk
from ratel.runtime.optimizer import AdamW
from ratel.runtime.ranks import Ranks
from ratel.trace import default_kwargs


def _as_budget(budget) -> Budget:
    if isinstance(budget, Budget):
        return budget
    return Budget(gpu=budget)


def compile(model: nn.Module, budget: Budget | int | str, optimizer: AdamW | None = None,
            example_inputs: tuple | None = None, example_kwargs: dict | None = None, *,
            device: str | torch.device | None = None, hardware: HardwareProfile | None = None,
            weights: str | None = None, depth: int = 2, progress: bool = True,
            keep_swap_files: bool = False, activations: str = "auto", accumulate: int = 1,
            max_grad_norm: float | None = None, resume: str | None = None, keep_logits: bool = False,
            resident: bool | list[str] | None = None) -> Engine:
    """Compile ``model`` for training under ``budget``.

    model           an nn.Module with repeated blocks (a ``ratel.models.GPT`` or a transformers causal LM),
                    possibly created on the meta device (its parameters are then initialised — on the GPU
                    when training on one — or read from ``weights``, one module at a time, into host memory)
    budget          GPU bytes ("24GiB") or a ``Budget(gpu=, host=, ssd=, ssd_dir=)``
    optimizer       ``ratel.AdamW(lr=..., weight_decay=...)``, or ``torch.optim.AdamW(param_groups, ...)`` for
                    per-group options; the update runs on the CPU during backward. ``engine.optimizer`` is a
                    ``torch.optim.Optimizer`` for LR schedulers.
    accumulate      micro-batches per update: ``engine.backward(loss)`` k times (the user divides the loss by
                    k, as in PyTorch), then ``engine.step()``; gradients are summed in fp32 host memory
    max_grad_norm   clip the global gradient norm as ``torch.nn.utils.clip_grad_norm_`` does before AdamW;
                    ``engine.grad_norm`` is the norm before clipping; a non-finite norm skips the step
    example_inputs  positional inputs of a training call; with them the plan is made (and a budget too
                    small refused) now. ``labels`` defaults to the first input for models that take labels.
    weights         a local .safetensors file or a folder of them, read by parameter name
    keep_swap_files leave the SSD swap files in place on close (they are named after the model)
    activations     "auto" (plan every saved tensor: keep / host / SSD / recompute), or a fixed policy:
                    "recompute" (checkpoint unit inputs only), "keep", "host", "ssd"
    keep_logits     a loss computed from the LM head's logits is computed over chunks of tokens, never holding
                    them all; the output's ``logits`` are then not computed (using them raises, saying to pass
                    ``keep_logits=True``, which returns them and costs batch x seq x vocabulary on the GPU)
    resident        keep whole parameter groups on the GPU where the budget leaves room and the predicted step
                    is faster (the first units': their gradients arrive last): weights, fp32 master and Adam
                    moments stay there and torch's fused AdamW updates them on the GPU; their new weights are
                    copied back to the model's parameters. None (default): on a GPU; False: every group
                    streams; True: weigh it on the CPU too (where it only tests the path); a list of group
                    names (``ratel.explain(..., resident=False).groups``, whole blocks): exactly those. With several
                    ranks each GPU holds them whole and their gradients are averaged among the GPUs.
    resume          a folder ``engine.save`` wrote: weights, Adam states, update count, param-group
                    hyper-parameters and RNG states are restored, so the following steps equal those of the
                    run that saved it (``engine.resumed`` has its step and state=; ``engine.restore_scheduler``)

    Several GPUs: under ``torchrun --nproc-per-node N`` every rank calls ``compile`` and trains on its own rows
    of each global batch, as with DistributedDataParallel (``torch.distributed`` is initialised here when the
    caller has not; each rank takes GPU ``LOCAL_RANK``). Gradients are averaged over the ranks and each rank's
    CPU AdamW updates 1/N of every parameter group (``ratel.runtime.ranks``). ``Budget.host`` and ``Budget.ssd``
    are per host: its ranks share them. ``engine.save`` and ``engine.state_dict`` are then collectives (every rank
    calls them; rank 0 writes), and a checkpoint resumes on any number of ranks.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ratel.compile expects an nn.Module, got {type(model).__name__}")
    ranks = Ranks.of_environment()
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", _local_gpu(ranks))
    # The plan is executed here: it prices the host memory of this process's CPU AdamW kernel.
    budget = _as_budget(budget)
    if hardware is not None:
        hardware = this_machine(hardware)
    elif ranks is None or ranks.rank == 0:     # (the other ranks take rank 0's, below)
        hardware = with_disk(detect(device), budget.ssd_dir)
    if ranks is not None:       # one measurement for all: ranks that plan alike run the same collectives
        gbps = ranks.measure_gbps()
        hardware = ranks.from_rank0(dataclasses.replace(hardware, ranks_gbps=gbps) if ranks.rank == 0 else None)
    checkpoint = None
    if resume is not None:
        if weights is not None:
            raise RatelError("give weights= or resume=, not both: a checkpoint holds its own weights")
        checkpoint = open_checkpoint(resume, model)
    engine = Engine(model, budget, optimizer, device, hardware, weights=weights,
                    depth=depth, progress=progress, keep_swap_files=keep_swap_files, activations=activations,
                    accumulate=accumulate, max_grad_norm=max_grad_norm, resume=checkpoint, keep_logits=keep_logits,
                    ranks=ranks, resident=resident)
    if example_inputs is not None:
        example_inputs = tuple(example_inputs)
        kwargs = default_kwargs(model, example_inputs, example_kwargs)
        engine._latest, _ = engine._program(tuple(engine._to_device(a) for a in example_inputs),
                                            {k: engine._to_device(v) for k, v in kwargs.items()})
    return engine


def _local_gpu(ranks: Ranks | None) -> int:
    """Under torchrun each rank of a host takes its own GPU (LOCAL_RANK), unless the caller chose one."""
    if ranks is None:
        return torch.cuda.current_device()
    local = int(os.environ.get("LOCAL_RANK", ranks.rank % ranks.local_world))
    torch.cuda.set_device(local)
    return local


__all__ = ["AdamW", "Budget", "BudgetError", "Engine", "compile", "parse_bytes"]
