"""``engine.optimizer``: the ``torch.optim.Optimizer`` users and LR schedulers drive.

Ratel runs AdamW itself (on the CPU, during backward), so this object holds no state and computes nothing:
it carries the param groups — each with ``lr``, ``betas``, ``eps``, ``weight_decay`` — that the next update
reads, and ``step()`` is ``engine.step()``. So ``torch.optim.lr_scheduler.*(engine.optimizer, ...)`` and
per-group options (no weight decay on norms and biases, as the Hugging Face Trainer sets them up) work
as in PyTorch.

A user may pass ``optimizer=torch.optim.AdamW(param_groups, ...)`` (or ``torch.optim.Adam`` without weight
decay, the same update) to ``ratel.compile``; its groups are taken over as they are. ``ratel.AdamW(...)``
gives one group of every trainable parameter.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ratel.errors import RatelError
from ratel.runtime.optimizer import AdamW, Hyper
from ratel.ir import canonical_parameter_names

_HYPER_KEYS = ("lr", "betas", "eps", "weight_decay")


class EngineOptimizer(torch.optim.Optimizer):
    """The param groups of a Ratel engine; ``step()`` is ``engine.step()``, ``zero_grad()`` does nothing
    (gradients never land on the model's parameters)."""

    def __init__(self, param_groups: list[dict], defaults: dict, engine_step):
        self._engine_step = engine_step
        super().__init__(param_groups, defaults)

    def step(self, closure=None):
        if closure is not None:
            raise RatelError("engine.optimizer.step(closure) is not supported: compute the loss with the engine, "
                             "call engine.backward(loss), then engine.step()")
        self._engine_step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def hypers(self) -> list[Hyper]:
        """What the next update runs with, one entry per param group."""
        return [Hyper.of(g) for g in self.param_groups]

    def state_dict(self):
        raise RatelError("Ratel keeps the Adam states itself (in host memory or on SSD), so engine.optimizer has "
                         "no state_dict; save the fp32 masters with engine.state_dict()")

    def load_state_dict(self, state_dict):
        raise RatelError("engine.optimizer cannot load a torch optimizer state: Ratel keeps the Adam states "
                         "itself; start from weights with ratel.compile(..., weights=path)")


def build_param_groups(model: nn.Module, optimizer) -> tuple[list[dict], dict, dict[str, int]]:
    """(param groups, defaults, canonical parameter name -> group index) from ``ratel.AdamW`` or a torch
    AdamW. Every trainable parameter must be in exactly one group: one missing would silently never train."""
    canonical = canonical_parameter_names(model)
    name_of = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        name_of.setdefault(id(p), canonical[name])
    trainable = {canonical[n] for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise RatelError("the model has no parameter with requires_grad=True: there is nothing to train")

    if optimizer is None or isinstance(optimizer, AdamW):
        cfg = optimizer or AdamW()
        defaults = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
        params = [p for n, p in model.named_parameters() if p.requires_grad]
        return [{"params": params, **defaults}], defaults, {name_of[id(p)]: 0 for p in params}

    if not isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam)):
        raise RatelError(f"optimizer={type(optimizer).__name__}: Ratel runs AdamW on the CPU; pass ratel.AdamW(...) "
                         "or torch.optim.AdamW(param_groups, ...)")
    decoupled = isinstance(optimizer, torch.optim.AdamW) or optimizer.defaults.get("decoupled_weight_decay", False)
    groups, group_of = [], {}
    for index, group in enumerate(optimizer.param_groups):
        for flag in ("amsgrad", "maximize"):
            if group.get(flag):
                raise RatelError(f"optimizer param group {index} sets {flag}=True, which Ratel's AdamW does not "
                                 f"implement: use {flag}=False")
        if not decoupled and group["weight_decay"] != 0:
            raise RatelError("torch.optim.Adam with weight_decay adds an L2 term to the gradient, which Ratel does "
                             "not implement: use torch.optim.AdamW (decoupled weight decay) or weight_decay=0")
        lr = group["lr"]
        entry = {"params": list(group["params"]), "lr": float(lr.item() if isinstance(lr, torch.Tensor) else lr),
                 "betas": tuple(float(b) for b in group["betas"]), "eps": float(group["eps"]),
                 "weight_decay": float(group["weight_decay"])}
        for key, value in group.items():
            if key not in entry and key not in ("amsgrad", "maximize", "foreach", "fused", "capturable",
                                                "differentiable", "decoupled_weight_decay"):
                entry[key] = value          # e.g. initial_lr from a scheduler already attached
        for p in entry["params"]:
            if id(p) not in name_of:
                raise RatelError(f"optimizer param group {index} holds a tensor of shape {tuple(p.shape)} that is not "
                                 "a parameter of the model given to ratel.compile")
            name = name_of[id(p)]
            if name in group_of:
                raise RatelError(f"parameter {name} is in two optimizer param groups")
            group_of[name] = index
        groups.append(entry)
    missing = sorted(trainable - set(group_of))
    if missing:
        raise RatelError(f"{len(missing)} trainable parameters are in no optimizer param group (first: {missing[0]}): "
                         "add them to a group, or set requires_grad=False on them")
    group_of = {name: g for name, g in group_of.items() if name in trainable}   # frozen ones are never updated
    defaults = {k: optimizer.defaults[k] for k in _HYPER_KEYS}
    return groups, defaults, group_of


def segments_of(groups, group_of: dict[str, int]) -> dict[int, tuple[tuple[int, int, int], ...]]:
    """For every trainable flat group: runs of consecutive parameters that share a user param group."""
    out = {}
    for g in groups:
        if not g.trainable:
            continue
        runs: list[list[int]] = []
        for name, shape, offset in zip(g.params, g.shapes, g.offsets):
            end, h = offset + math.prod(shape), group_of[name]
            if runs and runs[-1][2] == h and runs[-1][1] == offset:
                runs[-1][1] = end
            else:
                runs.append([offset, end, h])
        out[g.index] = tuple(tuple(r) for r in runs)
    return out


def norm_order(model: nn.Module, groups) -> tuple[tuple[int, int, tuple[int, ...]], ...]:
    """(group, offset, shape) of each trainable parameter in ``model.parameters()`` order: the order in which
    ``clip_grad_norm_(model.parameters())`` stacks the per-parameter norms."""
    canonical = canonical_parameter_names(model)
    where = {name: (g.index, offset, shape) for g in groups if g.trainable
             for name, shape, offset in zip(g.params, g.shapes, g.offsets)}
    return tuple(where[canonical[n]] for n, p in model.named_parameters() if p.requires_grad and canonical[n] in where)
