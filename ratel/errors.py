"""Errors Ratel raises. Each says what went wrong and what to change."""
from __future__ import annotations


class RatelError(Exception):
    """Base class of every error Ratel raises on purpose."""


class TraceError(RatelError):
    """The model could not be captured as a graph; the message names the module and the source line."""


class BudgetError(RatelError):
    """A memory budget is too small for the plan; ``needed`` is the minimum in bytes for ``tier``."""

    def __init__(self, message: str, *, tier: str, needed: int, budget: int):
        super().__init__(message)
        self.tier = tier
        self.needed = needed
        self.budget = budget


class PassError(RatelError):
    """A compiler pass failed; the message names the pass, the passes before it and the node."""

    def __init__(self, message: str, *, pass_name: str, node: str | None = None):
        super().__init__(message)
        self.pass_name = pass_name
        self.node = node


class NodeError(RatelError):
    """Raised inside a pass about one node; the PassManager adds the pass name."""

    def __init__(self, node, message: str):
        self.node = node
        detail = f"{message}\n  node: {node.format_node()}"
        meta = {k: v for k, v in node.meta.items() if k.startswith("ratel.") or k == "stack_trace"}
        if meta:
            detail += f"\n  meta: {meta}"
        super().__init__(detail)


class PlanViolation(RatelError):
    """An invariant of the plan does not hold (use before fetch, use after release, ...)."""
