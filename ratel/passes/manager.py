"""The PassManager: runs the pipeline list, verifies between passes, dumps each pass, names failures.

A pass is a function ``(gm, ctx) -> PassResult`` decorated with ``@graph_pass(requires=..., ensures=...)``.
``requires``/``ensures`` are symbolic facts ("meta:ratel.tensor", "analysis:Lifetimes", "graph:outlined");
``check_pipeline`` proves at build time that each pass's requirements are ensured by an earlier pass, so an
ordering mistake fails when the pipeline is declared, not halfway through a compile. While a pass runs, the
manager checks that the declarations are true: every analysis the pass reads (``ctx.get``) is in its
``requires``, and after it every "analysis:X" it ensures exists and every "meta:key" it ensures is on some
node. Dumps after the schedule exists end with the whole schedule, forward and backward.

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
from ratel.ir import format_bytes
from ratel.ir.printer import format_graph

log = logging.getLogger("ratel.passes")


@dataclass(frozen=True)
class PassResult:
    gm: fx.GraphModule
    modified: bool
    analysis: Any = None       # a frozen dataclass (or a tuple of them), stored in ctx under its type


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
    ranks: int = 1                              # data-parallel ranks: updates wait for the exchange of gradients
    # plan_resident_groups: whether to weigh keeping groups on the GPU (None: for a CUDA target only — on the
    # CPU the "GPU" update would run on the cores the CPU optimizer has); a tuple of group names fixes the set
    # (an engine's later input shapes keep its first plan's)
    resident: bool | None = None
    resident_groups: tuple[str, ...] | None = None
    keep_logits: bool = False                   # chunk_head_loss: still return the logits a chunked loss needs not
    head_chunk_bytes: int = 256 << 20           # chunk_head_loss: fp32 logits of one chunk of rows
    # estimate_costs: time each distinct unit on the device (passes/time_units.py.timing_mode). None:
    # RATEL_MEASURE_UNITS when set, else on CUDA only; "cached": the same, reading the cache but running
    # nothing (ratel.explain); never for a device this machine lacks.
    measure_units: bool | str | None = None
    debug: bool = field(default_factory=lambda: os.environ.get("RATEL_DEBUG", "") not in ("", "0"))
    dump_dir: Path | None = field(default_factory=lambda: Path(os.environ["RATEL_DUMP_DIR"])
                                  if os.environ.get("RATEL_DUMP_DIR") else None)
    analyses: dict[type, Any] = field(default_factory=dict)
    records: list[PassRecord] = field(default_factory=list)
    reads: set[str] | None = field(default=None, repr=False)   # analyses read by the running pass

    def get(self, kind: type):
        if self.reads is not None:
            self.reads.add(f"analysis:{kind.__name__}")
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


def check_declarations(p: PassFn, gm: fx.GraphModule, ctx: PassContext, reads: set[str]) -> None:
    """The pass read only what it requires, and produced what it ensures."""
    undeclared = sorted(reads - set(p.requires) - set(p.ensures))
    if undeclared:
        raise RatelError(f"pass {p.__name__} reads {undeclared} without declaring them in requires=")
    present = {f"analysis:{kind.__name__}" for kind in ctx.analyses}
    keys = {f"meta:{key}" for module in gm.modules() if isinstance(module, fx.GraphModule)
            for node in module.graph.nodes for key in node.meta}   # unit graphs included
    for fact in p.ensures:
        if (fact.startswith("analysis:") and fact not in present) or (fact.startswith("meta:") and fact not in keys):
            raise RatelError(f"pass {p.__name__} ensures {fact} but did not produce it")


def format_schedule(ctx: PassContext) -> str:
    """The whole schedule (forward and backward) once insert_transfers made it, one transfer a line."""
    schedule = next((a for kind, a in ctx.analyses.items() if kind.__name__ == "Schedule"), None)
    if schedule is None:
        return ""
    lines = ["", "# schedule: step stage kind subject bytes src->dst needed_by [slot] (dynamic: who issues it)"]
    for t in schedule.transfers:
        where = f"{t.src or '-'}->{t.dst or '-'}"
        slot = f" slot={t.slot}" if t.slot is not None else ""
        owner = f"  # dynamic: {t.kind.spec.dynamic}" if t.kind.dynamic else ""
        lines.append(f"#   {t.step:3d} {t.kind.stage.name.lower():6s} {t.kind} {t.subject} {format_bytes(t.nbytes)} "
                     f"{where} needed_by={t.needed_by}{slot}{owner}")
    return "\n".join(lines) + "\n"


class PassManager:
    def __init__(self, pipeline: Sequence[PassFn], verifiers: Sequence[Callable[[fx.GraphModule, PassContext], None]] = (),
                 given: Sequence[str] = ("meta:ratel.unit",)):
        check_pipeline(pipeline, given)
        self.pipeline = list(pipeline)
        self.verifiers = list(verifiers)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        previous_dump = format_graph(gm) if ctx.dump_dir else None
        if ctx.dump_dir:
            ctx.dump_dir.mkdir(parents=True, exist_ok=True)
            (ctx.dump_dir / "000_traced.py").write_text(previous_dump)
        for index, p in enumerate(self.pipeline, start=1):
            name = p.__name__
            start = time.perf_counter()
            try:
                ctx.reads = set()
                try:
                    result = p(gm, ctx)
                finally:
                    reads, ctx.reads = ctx.reads, None
                if not isinstance(result, PassResult):
                    raise RatelError(f"pass {name} returned {type(result).__name__}, not a PassResult")
                gm = result.gm
                produced = result.analysis if isinstance(result.analysis, tuple) else (result.analysis,)
                for analysis in produced:
                    if analysis is not None:
                        ctx.analyses[type(analysis)] = analysis
                check_declarations(p, gm, ctx, reads)
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
                text = format_graph(gm) + format_schedule(ctx)
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
