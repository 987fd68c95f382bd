import operator

import torch
import torch.fx as fx

from pipeline_util import assert_matches_golden, run_program, run_until
from ratel.ir import META_TENSOR, META_UNIT, META_UNIT_CALL, Unit
from ratel.passes.annotate_shapes import annotate_shapes
from ratel.passes.outline_units import outline_units
from ratel.ir import ops
from ratel.runtime.eager import EagerRuntime


def test_golden_before_after():
    assert_matches_golden("outline_units")


def test_matches_eager():
    gm, ctx, model, inputs = run_until("outline_units")
    loss, logits = run_program(gm, ctx, model, inputs)
    expected = model(inputs[0], labels=inputs[1])
    assert torch.equal(loss, expected.loss) and torch.equal(logits, expected.logits)


def test_parameters_leave_the_top_level_graph():
    gm, ctx, _, _ = run_until("outline_units")
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["runtime", "input_ids", "labels"]
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ops.run_unit]
    assert [c.args[1] for c in calls] == ["embed", "blocks.0", "blocks.1", "head"]
    head = calls[-1].meta[META_UNIT_CALL]
    assert head.params == ("ln_f.weight", "ln_f.bias", "wte.weight")   # tied head reads the embedding


class _Skip(torch.nn.Module):
    """Three 'units' with a skip connection from the first to the third."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.c = torch.nn.Linear(4, 4)

    def forward(self, x):
        h0 = self.a(x)
        h1 = self.b(h0).relu()
        return self.c(h1) + h0


class _FakeTraced:
    def __init__(self, program, units):
        sig = program.graph_signature
        self.params = tuple((s.arg.name, s.target) for s in sig.input_specs if s.kind.name == "PARAMETER")
        self.buffers = ()
        self.user_inputs = tuple(s.arg.name for s in sig.input_specs if s.kind.name == "USER_INPUT")
        self.units = units


def test_skip_connection_on_a_synthetic_graph():
    model = _Skip()
    x = torch.randn(2, 4)
    program = torch.export.export(model, (x,), strict=False)
    gm = program.graph_module
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        stack = node.meta.get("nn_module_stack", {})
        path = list(stack.values())[-1][0] if stack else "c"
        node.meta[META_UNIT] = {"a": "u0", "b": "u1"}.get(path, "u2")
    annotate_shapes(gm, None)
    units = tuple(Unit(i, f"u{i}", "block", (), ()) for i in range(3))
    ctx = type("Ctx", (), {"traced": _FakeTraced(program, units)})()
    out = outline_units(gm, ctx).gm
    calls = {n.meta[META_UNIT_CALL].name: n.meta[META_UNIT_CALL] for n in out.graph.nodes if META_UNIT_CALL in n.meta}
    h0 = calls["u0"].outputs
    assert len(h0) == 1 and h0[0] in calls["u1"].inputs and h0[0] in calls["u2"].inputs
    for call in calls.values():
        getattr(out, call.module).graph.lint()
    params = dict(model.named_parameters())
    result = out(EagerRuntime(out, {k: v.detach() for k, v in params.items()}, {}), x)
    assert torch.equal(result[0], model(x))
