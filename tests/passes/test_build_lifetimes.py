import torch

from pipeline_util import assert_matches_golden, run_until
from ratel.ir import Lifetimes, Unit
from ratel.passes.build_lifetimes import group_parameters
from ratel.trace import ParamInfo


def test_golden_graph_unchanged():
    assert_matches_golden("build_lifetimes")


def test_lifetime_graph_of_the_tiny_gpt():
    gm, ctx, _, _ = run_until("build_lifetimes")
    lifetimes = ctx.get(Lifetimes)
    assert [s.label(ctx.traced.units) for s in lifetimes.steps] == [
        "fwd embed", "fwd blocks.0", "fwd blocks.1", "fwd head", "bwd head", "bwd blocks.1", "bwd blocks.0",
        "bwd embed"]
    tied = lifetimes.get("param:embed+head")
    assert (tied.first, tied.last) == (0, 7)
    grad = lifetimes.get("grad:embed+head")
    assert (grad.first, grad.last) == (4, 7)     # partial at bwd head, complete at bwd embed
    act = lifetimes.get("act:add_2")             # blocks.0 -> blocks.1
    assert (act.first, act.last) == (1, 5)
    for record in lifetimes.records:
        assert 0 <= record.first <= record.last < len(lifetimes.steps)
    assert act.makes == (1,) and act.reads == (2, 5)   # made in fwd blocks.0, read by fwd and bwd blocks.1


def test_grouping_on_synthetic_units():
    infos = {
        "emb": ParamInfo("emb", (10, 4), torch.bfloat16, True),
        "pos": ParamInfo("pos", (8, 4), torch.bfloat16, True),
        "w1": ParamInfo("w1", (4, 4), torch.bfloat16, True),
        "n1": ParamInfo("n1", (4,), torch.float32, True),
        "frozen": ParamInfo("frozen", (4, 4), torch.bfloat16, False),
        "norm": ParamInfo("norm", (4,), torch.bfloat16, True),
    }
    traced = type("T", (), {"param": lambda self, n: infos[n]})()
    units = (Unit(0, "embed", "pre", ("emb", "pos"), ()), Unit(1, "b0", "block", ("w1", "n1", "frozen"), ()),
             Unit(2, "head", "post", ("norm", "emb"), ()))
    groups = group_parameters(traced, units)
    by_params = {g.params: g for g in groups}
    assert by_params[("emb",)].users == (0, 2) and by_params[("emb",)].update_unit == 0
    assert by_params[("pos",)].users == (0,)
    assert by_params[("w1",)].dtype == torch.bfloat16 and by_params[("n1",)].dtype == torch.float32
    assert not by_params[("frozen",)].trainable
    assert sorted(p for g in groups for p in g.params) == sorted(infos)
    for g in groups:
        assert g.offsets[0] == 0 and g.numel == sum(infos[p].numel for p in g.params)
    assert [g.index for g in groups] == list(range(len(groups)))
