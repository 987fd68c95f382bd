"""The planning entry: ``PIPELINE`` (the passes in order) and ``plan_call``, the one function that turns a
model and one call's inputs into a rewritten program and its Plan. ``ratel.compile`` (for every new input
shape) and ``ratel.explain`` both plan through it, so the plan explained is the plan executed."""
from __future__ import annotations

import torch
from torch import nn

from ratel.errors import BudgetError, RatelError
from ratel.ir import HeadLoss, Plan, format_bytes
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
from ratel.passes.plan_resident_groups import plan_resident_groups
from ratel.passes.verify_plan import check_plan_invariants, verify_plan
from ratel.shape_trace import TraceCache
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
    plan_resident_groups,
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
                 keep_logits: bool = False, measure_units: bool | str | None = None, ranks: int = 1,
                 resident: bool | None = None, resident_groups: tuple[str, ...] | None = None):
    """Run the pass pipeline on a traced model; returns the rewritten GraphModule and its Plan.
    ``measure_units``: time each distinct unit on ``device`` (``PassContext.measure_units``);
    ``resident``, ``resident_groups``: groups kept on the GPU (``PassContext.resident``, ``.resident_groups``)."""
    ctx = PassContext(traced=traced, budget=budget, hardware=hardware, compute_dtype=compute_dtype_of(traced),
                      device=str(device), depth=depth, activation_policy=activations, accumulate=accumulate,
                      clip=clip, keep_logits=keep_logits, measure_units=measure_units, ranks=ranks,
                      resident=resident, resident_groups=resident_groups)
    gm = default_pass_manager().run(traced.gm, ctx)
    gm.meta["ratel.out_spec"] = traced.out_spec
    gm.meta["ratel.dropped_outputs"] = ctx.get(HeadLoss).dropped_outputs
    return gm, ctx.get(Plan)


def resident_choice(resident) -> tuple[bool | None, tuple[str, ...] | None]:
    """``compile``'s ``resident`` as (``PassContext.resident``, ``.resident_groups``): None, True or False ask
    plan_resident_groups to weigh groups (or not); a list of group names keeps exactly those on the GPU."""
    if resident is None or isinstance(resident, bool):
        return resident, None
    if isinstance(resident, str) or not all(isinstance(name, str) for name in resident):
        raise RatelError(f"resident={resident!r}: pass None, True, False or a list of parameter group names "
                         "(ratel.explain(...).groups names them)")
    return None, tuple(resident)


def plan_call(model: nn.Module, args: tuple, kwargs: dict, budget: Budget, hardware: HardwareProfile,
              device: torch.device, *, training: bool = True, depth: int = 2, activations: str = "auto",
              accumulate: int = 1, clip: bool = False, keep_logits: bool = False, split_blocks: bool | None = None,
              traces: TraceCache | None = None, measure_units: bool | str | None = None, ranks: int = 1,
              resident: bool | None = None, resident_groups: tuple[str, ...] | None = None):
    """Trace ``model(*args, **kwargs)`` in train (or eval) mode and plan it: (traced, gm, plan).

    ``split_blocks``: None plans whole blocks and, when the GPU budget refuses them, each block cut in two
    units (``trace.block_cut``: attention, then the MLP); True or False asks for one of the two.
    ``traces``: an engine's captures of this model, so a new shape substitutes its sizes into the symbolic
    capture instead of exporting again (``ratel.shape_trace``).
    ``measure_units``: time each distinct unit on ``device`` and predict compute from the times
    (``ratel.passes.time_units``); None: ``RATEL_MEASURE_UNITS`` when set, else on CUDA only, never for a
    device this machine lacks; "cached": the same decision, but only times already cached are used.
    ``ranks``: data-parallel ranks running the plan (their exchange before each update is simulated).
    ``resident``: weigh keeping parameter groups on the GPU, updated there (None: for a CUDA target);
    ``resident_groups``: keep exactly these (a later input shape of an engine passes its first plan's; named by
    the user, they are whole blocks' groups, and blocks are not cut in two)."""
    refused, whole_units = None, 0     # the whole-block plan's refusal, and how many units it had
    if split_blocks is None and resident_groups is not None:
        split_blocks = False     # groups named by the user are those of whole blocks: halves group otherwise
    for split in ([False, True] if split_blocks is None else [split_blocks]):
        was_training = model.training
        model.train(training)
        try:
            traced = (traces.trace(model, args, kwargs, split_blocks=split) if traces is not None
                      else trace_model(model, args, kwargs, split_blocks=split))
        finally:
            model.train(was_training)
        if split and len(traced.units) == whole_units:
            break     # no block could be cut: the first refusal stands
        try:
            gm, plan = plan_program(traced, budget, hardware, device, depth, activations, accumulate=accumulate,
                                    clip=clip, keep_logits=keep_logits, measure_units=measure_units,
                                    ranks=ranks, resident=resident, resident_groups=resident_groups)
            return traced, gm, plan
        except BudgetError as error:
            if error.tier != "gpu" or split or split_blocks is not None:
                if refused is not None and split:
                    raise _refused_both(refused, error) from None
                raise
            refused, whole_units = error, len(traced.units)
    raise refused


def _refused_both(whole: BudgetError, split: BudgetError) -> BudgetError:
    """The GPU budget refused whole blocks and halves: the smaller minimum, naming both choices."""
    best = min(whole, split, key=lambda e: e.needed)
    return BudgetError(f"{split}\nWith whole blocks as units it needs at least {format_bytes(whole.needed)}; with "
                       f"each block cut in two units (attention, then the MLP) {format_bytes(split.needed)}.",
                       tier="gpu", needed=best.needed, budget=split.budget)
