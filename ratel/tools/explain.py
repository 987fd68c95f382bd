"""``ratel.explain``: the Plan for a model, budget and machine, without running or allocating anything.

It is ``ratel.compile`` stopped before the parameter store: the model is captured with torch.export and the
pass pipeline plans it, exactly as the Engine would plan its first call (same keyword defaults, same
budget resolution), so the Plan it returns is the one ``compile`` would execute. Nothing is materialised:
a model created on the ``meta`` device stays there, and the passes measure memory on fake tensors, so a
175B plan is made on a laptop CPU in seconds.

The target need not be this machine: ``device="cuda"`` (the default) plans for a GPU with the hardware
profile given, or, with none given, this machine's cached GPU profile when it has a GPU and the project's
H100 figures otherwise.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from ratel.ir import Plan, format_bytes
from ratel.ir.budget import Budget
from ratel.ir.hardware import HardwareProfile
from ratel.passes import plan_call, resident_choice
from ratel.runtime.calibrate import detect
from ratel.trace import call_kwargs, default_kwargs

log = logging.getLogger("ratel.tools")


def target_device(device: str | torch.device) -> torch.device:
    """``cuda`` -> ``cuda:N`` as ``compile`` names it (``cuda:0`` when planning for a GPU this machine lacks)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        device = torch.device("cuda", index)
    return device


def target_hardware(device: torch.device, hardware: HardwareProfile | None) -> HardwareProfile:
    """The profile predictions are made with. Never measures: explaining must not run anything."""
    if hardware is not None:
        return hardware
    if device.type != "cuda" or torch.cuda.is_available():
        return detect(device, measure=False)
    return HardwareProfile.h100()


def call_arguments(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None) -> dict[str, Any]:
    """The keyword arguments of a training call, completed and ordered exactly as ``compile`` does."""
    return call_kwargs(model, default_kwargs(model, example_inputs, example_kwargs))


def explain(model: nn.Module, budget, example_inputs, example_kwargs: dict | None = None, *,
            hardware: HardwareProfile | None = None, device: str | torch.device = "cuda", depth: int = 2,
            activations: str = "auto", accumulate: int = 1, max_grad_norm: float | None = None,
            keep_logits: bool = False, resident=None) -> Plan:
    """Plan ``model`` for training under ``budget`` and return the Plan; nothing runs, nothing is allocated.

    model           an nn.Module, on the meta device (nothing is materialised) or the CPU
    budget          GPU bytes ("24GiB", an int) or a ``ratel.Budget``; the host budget defaults to 90% of
                    the target's host memory, as in ``compile``
    example_inputs  the positional inputs of one training call (a tensor or a tuple; any device: only shapes
                    and dtypes are read). ``labels`` defaults to the first input for models that take labels.
    hardware        the profile times are predicted with (default: see the module docstring)
    device          the device the plan is for (default "cuda", whether or not this machine has one)
    activations     the activation policy, as in ``compile`` ("auto", "recompute", "keep", "host", "ssd")
    accumulate, max_grad_norm   as in ``compile``: accumulation buffers in host memory, updates after the norm
    keep_logits     as in ``compile``: plan the logits as an output too
    resident        as in ``compile``

    Raises ``BudgetError`` (with the minimum needed) when the budget cannot hold the plan, as ``compile`` does.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ratel.explain expects an nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    device = target_device(device)
    hardware = target_hardware(device, hardware)
    budget = (budget if isinstance(budget, Budget) else Budget(gpu=budget)).resolved(hardware)
    kwargs = call_arguments(model, example_inputs, example_kwargs)
    start = time.perf_counter()
    resident, resident_groups = resident_choice(resident)
    _, _, plan = plan_call(model, example_inputs, kwargs, budget, hardware, device, training=model.training,
                           depth=depth, activations=activations, accumulate=accumulate,
                           clip=max_grad_norm is not None, keep_logits=keep_logits,
                           resident=resident, resident_groups=resident_groups,
                           # Runs nothing, but prices units with the times compile measured and cached, so
                           # the plan explained is the one compile executes once these shapes were timed.
                           measure_units="cached")
    log.info("explained %s for %s in %.1f s: GPU peak %s of %s, host %s, predicted step %.3g s",
             type(model).__name__, device, time.perf_counter() - start, format_bytes(plan.memory.gpu_peak),
             format_bytes(plan.budget_gpu), format_bytes(plan.memory.host_total), plan.times.total)
    return plan


__all__ = ["explain"]
