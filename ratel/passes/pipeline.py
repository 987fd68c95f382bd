"""The planning entry: ``PIPELINE`` (the passes in order) and ``plan_call``, the one function that turns a
model and one call's inputs into a rewritten program and its Plan. ``ratel.compile`` (for every new input
shape) and ``ratel.explain`` both plan through it, so the plan explained is the plan executed."""
from __future__ import annotations

import torch
from torch import nn

from ratel.ir import HeadLoss, Plan
from ratel.ir.budget import Budget
from ratel.ir.hardware import HardwareProfile
from ratel.passes.annotate_shapes import annotate_shapes
from ratel.passes.build_lifetimes import build_lifetimes
from ratel.passes.canonicalize_graph import canonicalize_graph
from ratel.passes.chunk_head_loss import chunk_head_loss
from ratel.passes.estimate_costs import estimate_costs
from ratel.passes.insert_releases import insert_releases
from ratel.passes.insert_transfers import insert_transfers
from ratel.passes.manager import PassContext, PassManager
from ratel.passes.outline_units import outline_units
from ratel.passes.plan_activations import plan_activations
from ratel.passes.plan_placement import plan_placement
from ratel.passes.verify_plan import check_plan_invariants, verify_plan
from ratel.trace import TracedModel, trace_model

PIPELINE = [
    canonicalize_graph,
    chunk_head_loss,
    annotate_shapes,
    outline_units,
    estimate_costs,
    build_lifetimes,
    plan_placement,
    plan_activations,
    insert_transfers,
    insert_releases,
    verify_plan,
]


def default_pass_manager() -> PassManager:
    return PassManager(PIPELINE, verifiers=[check_plan_invariants])


def compute_dtype_of(traced: TracedModel) -> torch.dtype:
    """The dtype most parameter elements have: what the GPU computes in."""
    dtypes = {p.dtype for p in traced.param_info}
    if not dtypes:
        return torch.float32
    return max(dtypes, key=lambda d: sum(p.numel for p in traced.param_info if p.dtype == d))


def plan_program(traced: TracedModel, budget: Budget, hardware: HardwareProfile, device: torch.device,
                 depth: int = 2, activations: str = "auto", accumulate: int = 1, clip: bool = False,
                 keep_logits: bool = False):
    """Run the pass pipeline on a traced model; returns the rewritten GraphModule and its Plan."""
    ctx = PassContext(traced=traced, budget=budget, hardware=hardware, compute_dtype=compute_dtype_of(traced),
                      device=str(device), depth=depth, activation_policy=activations, accumulate=accumulate,
                      clip=clip, keep_logits=keep_logits)
    gm = default_pass_manager().run(traced.gm, ctx)
    gm.meta["ratel.out_spec"] = traced.out_spec
    gm.meta["ratel.dropped_outputs"] = ctx.get(HeadLoss).dropped_outputs
    return gm, ctx.get(Plan)


def plan_call(model: nn.Module, args: tuple, kwargs: dict, budget: Budget, hardware: HardwareProfile,
              device: torch.device, *, training: bool = True, depth: int = 2, activations: str = "auto",
              accumulate: int = 1, clip: bool = False, keep_logits: bool = False):
    """Trace ``model(*args, **kwargs)`` in train (or eval) mode and plan it: (traced, gm, plan)."""
    was_training = model.training
    model.train(training)
    try:
        traced = trace_model(model, args, kwargs)
    finally:
        model.train(was_training)
    gm, plan = plan_program(traced, budget, hardware, device, depth, activations, accumulate=accumulate, clip=clip,
                            keep_logits=keep_logits)
    return traced, gm, plan
