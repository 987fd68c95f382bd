"""Run the pass pipeline on a tiny reference GPT, stopping after any pass, and compare with goldens."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ratel.ir.budget import Budget
from ratel.ir.hardware import HardwareProfile
from ratel.ir import META_UNIT_CALL
from ratel.models import GPT, GPTConfig
from ratel.passes import PIPELINE, PassContext, PassManager, check_plan_invariants
from ratel.runtime.eager import EagerRuntime
from ratel.ir.printer import format_graph
from ratel.passes.manager import format_schedule
from ratel.trace import trace_model

GOLDEN = Path(__file__).parent / "golden"
NAMES = [p.__name__ for p in PIPELINE]


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16)).train()


def tiny_inputs(batch=2, seq=8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (batch, seq), generator=g)
    return ids, torch.randint(0, 64, (batch, seq), generator=g)


def run_until(name: str | None, model=None, dump_dir=None, budget="1GiB", activations="auto", batch=2, seq=8,
              keep_logits=True, resident=None, resident_groups=None):
    """Trace the tiny model and run the pipeline up to and including pass ``name`` (None: trace only). The
    logits are kept by default, so that every pass's program can be compared with eager on them too."""
    model = model or tiny_model()
    ids, labels = tiny_inputs(batch, seq)
    traced = trace_model(model, (ids,), {"labels": labels})
    ctx = PassContext(traced=traced, budget=Budget(gpu=budget, host="64GiB"), hardware=HardwareProfile.cpu(),
                      compute_dtype=torch.float32, device="cpu", debug=True, dump_dir=dump_dir,
                      activation_policy=activations, keep_logits=keep_logits, resident=resident,
                      resident_groups=resident_groups)
    count = 0 if name is None else NAMES.index(name) + 1
    gm = PassManager(PIPELINE[:count], verifiers=[check_plan_invariants]).run(traced.gm, ctx) if count else traced.gm
    return gm, ctx, model, (ids, labels)


def run_program(gm, ctx, model, inputs):
    """Execute the graph as it stands after any pass; returns (loss, logits)."""
    ids, labels = inputs
    params = {p.name: model.get_parameter(p.name).detach() for p in ctx.traced.param_info}
    buffers = dict(model.named_buffers())
    if any(META_UNIT_CALL in n.meta for n in gm.graph.nodes):
        return gm(EagerRuntime(gm, params, buffers), ids, labels)
    placeholder_values = {**{ph: params[name] for ph, name in ctx.traced.params},
                          **{ph: buffers[name] for ph, name in ctx.traced.buffers},
                          "input_ids": ids, "labels": labels}
    args = [placeholder_values[n.name] for n in gm.graph.nodes if n.op == "placeholder"]
    return gm(*args)


def golden_text(name: str) -> str:
    """The dump after pass ``name`` (or the traced graph for None), as golden/NNN_<name>.py holds it."""
    index = 0 if name is None else NAMES.index(name) + 1
    return (GOLDEN / f"{index:03d}_{name or 'traced'}.py").read_text()


def assert_matches_golden(name: str | None) -> None:
    gm, ctx, *_ = run_until(name)
    text = format_graph(gm) + format_schedule(ctx)     # the dump RATEL_DUMP_DIR writes after the pass
    index = 0 if name is None else NAMES.index(name) + 1
    path = GOLDEN / f"{index:03d}_{name or 'traced'}.py"
    if os.environ.get("RATEL_UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} changed; rerun with RATEL_UPDATE_GOLDEN=1 if intended"
