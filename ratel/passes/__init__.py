"""Ratel's compiler passes. ``PIPELINE`` is the order they run in; README.md states their invariants."""
from ratel.passes.annotate_shapes import annotate_shapes
from ratel.passes.build_lifetimes import build_lifetimes
from ratel.passes.canonicalize_graph import canonicalize_graph
from ratel.passes.estimate_costs import estimate_costs
from ratel.passes.insert_releases import insert_releases
from ratel.passes.insert_transfers import insert_transfers
from ratel.passes.manager import PassContext, PassManager, PassResult, check_pipeline, graph_pass
from ratel.passes.outline_units import outline_units
from ratel.passes.plan_activations import plan_activations
from ratel.passes.plan_placement import plan_placement
from ratel.passes.verify_plan import check_plan_invariants, verify_plan

PIPELINE = [
    canonicalize_graph,
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


__all__ = ["PIPELINE", "PassContext", "PassManager", "PassResult", "check_pipeline", "default_pass_manager",
           "graph_pass"]
