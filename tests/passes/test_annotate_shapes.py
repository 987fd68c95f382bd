import torch
import torch.fx as fx

from pipeline_util import assert_matches_golden, run_program, run_until
from ratel.ir import META_TENSOR
from ratel.passes.annotate_shapes import annotate_shapes


def test_golden_before_after():
    assert_matches_golden("annotate_shapes")


def test_matches_eager():
    gm, ctx, model, inputs = run_until("annotate_shapes")
    loss, _ = run_program(gm, ctx, model, inputs)
    assert torch.equal(loss, model(inputs[0], labels=inputs[1]).loss)


def test_views_resolve_to_their_base_on_a_synthetic_graph():
    def f(x):
        y = x * 2            # fresh storage
        t = y.transpose(0, 1)  # view of y
        a, b = y.split(2, dim=1)   # views of y
        z = t.contiguous()   # a copy: fresh storage
        return z + a.sum() + b.sum()

    gm = torch.export.export(_Wrap(f), (torch.randn(4, 4),), strict=False).graph_module
    annotate_shapes(gm, None)
    metas = {n.name: n.meta[META_TENSOR] for n in gm.graph.nodes if META_TENSOR in n.meta}
    mul = next(n for n in metas if n.startswith("mul"))
    transpose = next(n for n in metas if n.startswith("transpose"))
    clone = next(n for n in metas if n.startswith("clone") or n.startswith("contiguous"))
    assert metas[mul].nbytes == 64 and metas[mul].base == mul
    assert metas[transpose].nbytes == 0 and metas[transpose].base == mul and metas[transpose].is_view
    getitems = [n for n in metas if n.startswith("getitem")]
    assert getitems and all(metas[g].base == mul for g in getitems)
    assert metas[clone].nbytes == 64 and metas[clone].base == clone
    assert metas[mul].short() == "f32[4, 4]"


class _Wrap(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)
