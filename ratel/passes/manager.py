"""The PassManager: runs the pipeline list, verifies between passes, dumps each pass, names failures.

A pass is a function ``(gm, ctx) -> PassResult`` decorated with ``@graph_pass(requires=..., ensures=...)``.
``requires``/``ensures`` are symbolic facts ("meta:ratel.tensor", "analysis:Lifetimes", "graph:outlined");
``check_pipeline`` proves at build time that each pass's requirements are ensured by an earlier pass, so an
ordering mistake fails when the pipeline is declared, not halfway through a compile.

Debug mode (``RATEL_DEBUG=1`` or ``PassContext.debug``) lints the graph and runs the plan invariants after
every pass. ``RATEL_DUMP_DIR`` writes ``NNN_<pass>.py`` after every pass whose printed graph changed.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from ratel.errors import BudgetError, NodeError, PassError, PlanViolation, RatelError

log = logging.getLogger("ratel.passes")


@dataclass(frozen=True)
class PassResult:
    gm: fx.GraphModule
    modified: bool
    analysis: Any = None       # a frozen dataclass, stored in ctx under its type


@dataclass(frozen=True)
class PassRecord:
    """Provenance of one pass run: what ran, how long, whether it changed the graph."""

    index: int
    name: str
    seconds: float
    modified: bool


@dataclass
class PassContext:
    """What passes read besides the graph: the trace, the budget, the hardware, and earlier analyses."""

    traced: Any                                 # ratel.trace.TracedModel
    budget: Any                                 # ratel.api.Budget
    hardware: Any                               # ratel.hardware.HardwareProfile
    compute_dtype: torch.dtype
    device: str
    depth: int = 2                              # GPU parameter ring slots
    activation_policy: str = "auto"             # plan_activations: auto | recompute | keep | host | ssd
    accumulate: int = 1                         # micro-batches per update: > 1 plans fp32 gradient sums on host
    clip: bool = False                          # global-norm clipping: every update waits for the whole gradient
    debug: bool = field(default_factory=lambda: os.environ.get("RATEL_DEBUG", "") not in ("", "0"))
    dump_dir: Path | None = field(default_factory=lambda: Path(os.environ["RATEL_DUMP_DIR"])
                                  if os.environ.get("RATEL_DUMP_DIR") else None)
    analyses: dict[type, Any] = field(default_factory=dict)
    records: list[PassRecord] = field(default_factory=list)

    def get(self, kind: type):
        try:
            return self.analyses[kind]
        except KeyError:
            raise RatelError(f"analysis {kind.__name__} has not run; the pipeline must compute it first") from None


PassFn = Callable[[fx.GraphModule, PassContext], PassResult]


def graph_pass(*, requires: Sequence[str] = (), ensures: Sequence[str] = ()):
    """Declare a pass and the facts it needs and provides."""

    def wrap(fn: PassFn) -> PassFn:
        fn.requires = tuple(requires)
        fn.ensures = tuple(ensures)
        fn.pass_name = fn.__name__
        return fn

    return wrap


def check_pipeline(pipeline: Sequence[PassFn], given: Sequence[str] = ()) -> None:
    """Fail now if a pass needs a fact that no earlier pass ensures."""
    facts = set(given)
    for index, p in enumerate(pipeline):
        missing = [r for r in getattr(p, "requires", ()) if r not in facts]
        if missing:
            raise RatelError(f"pipeline order: pass #{index} {p.__name__} requires {missing}, which no earlier "
                             f"pass ensures (earlier: {[q.__name__ for q in pipeline[:index]]})")
        facts.update(getattr(p, "ensures", ()))


class PassManager:
    def __init__(self, pipeline: Sequence[PassFn], verifiers: Sequence[Callable[[fx.GraphModule, PassContext], None]] = (),
                 given: Sequence[str] = ("meta:ratel.unit",)):
        check_pipeline(pipeline, given)
        self.pipeline = list(pipeline)
        self.verifiers = list(verifiers)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        from ratel.tools.printer import format_graph

        previous_dump = format_graph(gm) if ctx.dump_dir else None
        if ctx.dump_dir:
            ctx.dump_dir.mkdir(parents=True, exist_ok=True)
            (ctx.dump_dir / "000_traced.py").write_text(previous_dump)
        for index, p in enumerate(self.pipeline, start=1):
            name = p.__name__
            start = time.perf_counter()
            try:
                result = p(gm, ctx)
                if not isinstance(result, PassResult):
                    raise RatelError(f"pass {name} returned {type(result).__name__}, not a PassResult")
                gm = result.gm
                if result.analysis is not None:
                    ctx.analyses[type(result.analysis)] = result.analysis
                if ctx.debug:
                    gm.graph.lint()
                    for verify in self.verifiers:
                        verify(gm, ctx)
            except (PassError, BudgetError, PlanViolation) as exc:
                # Typed errors stay catchable by type; the note says where in the pipeline they arose.
                exc.add_note(f"(raised in pass #{index} {name})")
                raise
            except Exception as exc:  # noqa: BLE001 - named and re-raised
                raise self._wrap(exc, index, name) from exc
            seconds = time.perf_counter() - start
            ctx.records.append(PassRecord(index, name, seconds, result.modified))
            log.debug("pass %02d %s: %.3fs%s", index, name, seconds, " (modified)" if result.modified else "")
            if ctx.dump_dir:
                text = format_graph(gm)
                if text != previous_dump:
                    (ctx.dump_dir / f"{index:03d}_{name}.py").write_text(text)
                    previous_dump = text
        return gm

    def _wrap(self, exc: Exception, index: int, name: str) -> PassError:
        before = [p.__name__ for p in self.pipeline[: index - 1]]
        node = getattr(exc, "node", None)
        detail = f"{type(exc).__name__}: {exc}"
        if node is not None and not isinstance(exc, NodeError):
            detail += f"\n  node: {node.format_node()}"
        return PassError(f"pass #{index} {name} failed (after passes {before}):\n  {detail}",
                         pass_name=name, node=getattr(node, "name", None))
