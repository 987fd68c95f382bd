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

from ratel.passes.pipeline import PIPELINE, default_pass_manager, plan_call, plan_program, resident_choice

__all__ = ["PIPELINE", "PassContext", "PassManager", "PassResult", "annotate_shapes", "build_lifetimes",
           "canonicalize_graph", "check_pipeline", "check_plan_invariants", "default_pass_manager", "estimate_costs",
           "graph_pass", "insert_releases", "insert_transfers", "outline_units", "plan_activations", "plan_call",
           "plan_placement", "plan_program", "resident_choice", "verify_plan"]
