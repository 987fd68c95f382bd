"""The PassManager: pipeline order checked at build time, failures named, dumps numbered and deterministic."""
import filecmp

import pytest
import torch.fx as fx

from pipeline_util import NAMES, run_until
from ratel.errors import PassError, RatelError
from ratel.passes import PIPELINE, PassManager, PassResult, check_pipeline, graph_pass


def test_pipeline_order_is_checked_when_declared():
    check_pipeline(PIPELINE, given=("meta:ratel.unit",))
    at = NAMES.index("annotate_shapes")
    swapped = [PIPELINE[at]] + PIPELINE[:at] + PIPELINE[at + 1:]
    with pytest.raises(RatelError, match="annotate_shapes requires"):
        PassManager(swapped)


def test_every_pass_declares_what_it_needs_and_provides():
    for p in PIPELINE:
        assert p.requires and p.ensures, p.__name__
        assert p.__doc__ is None or True
        module_doc = __import__(p.__module__, fromlist=["x"]).__doc__
        assert module_doc and "Before / after" in module_doc, f"{p.__module__} docstring lacks stages/before-after"


def test_failure_names_the_pass_the_passes_before_and_the_node():
    @graph_pass(requires=("meta:ratel.unit",), ensures=())
    def explode_on_embedding(gm, ctx):
        for node in gm.graph.nodes:
            if "embedding" in node.name:
                err = ValueError("cannot handle this node")
                err.node = node
                raise err
        return PassResult(gm, False)

    gm, ctx, _, _ = run_until(None)
    manager = PassManager([PIPELINE[0], explode_on_embedding])
    with pytest.raises(PassError) as info:
        manager.run(gm, ctx)
    message = str(info.value)
    assert "pass #2 explode_on_embedding" in message
    assert "canonicalize_graph" in message and "cannot handle this node" in message
    assert "aten.embedding" in message
    assert info.value.pass_name == "explode_on_embedding"


def test_a_pass_must_return_a_pass_result():
    @graph_pass(requires=(), ensures=())
    def forgets_to_return(gm, ctx):
        return None

    gm, ctx, _, _ = run_until(None)
    with pytest.raises(PassError, match="not a PassResult"):
        PassManager([forgets_to_return], given=()).run(gm, ctx)


def test_dumps_are_numbered_per_changing_pass_and_identical_across_runs(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    run_until(NAMES[-1], dump_dir=first)
    run_until(NAMES[-1], dump_dir=second)
    files = sorted(p.name for p in first.iterdir())
    assert files[0] == "000_traced.py"
    transfers = f"{NAMES.index('insert_transfers') + 1:03d}_insert_transfers.py"
    assert "001_canonicalize_graph.py" in files and transfers in files
    assert files == sorted(p.name for p in second.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(first, second, files, shallow=False)
    assert not mismatch and not errors
    text = (first / transfers).read_text()
    assert 'f32[2, 8, 32]' in text and "unit=blocks.0" in text and "slot=1" in text


def test_debug_mode_lints_after_every_pass():
    @graph_pass(requires=(), ensures=())
    def breaks_the_graph(gm, ctx):
        node = next(n for n in gm.graph.nodes if n.op == "call_function")
        node.args = (fx.Node(gm.graph, "dangling", "placeholder", "x", (), {}),) + tuple(node.args[1:])
        return PassResult(gm, True)

    gm, ctx, _, _ = run_until(None)
    ctx.debug = True
    with pytest.raises(PassError, match="breaks_the_graph"):
        PassManager([breaks_the_graph], given=()).run(gm, ctx)


def test_a_pass_reading_an_analysis_it_does_not_require_is_refused():
    from ratel.ir import Lifetimes

    @graph_pass(requires=("meta:ratel.unit",), ensures=("meta:ratel.unit",))
    def peeks_at_lifetimes(gm, ctx):
        ctx.get(Lifetimes)
        return PassResult(gm, False)

    gm, ctx, _, _ = run_until("build_lifetimes")
    with pytest.raises(PassError, match=r"peeks_at_lifetimes reads \['analysis:Lifetimes'\] without declaring"):
        PassManager([peeks_at_lifetimes]).run(gm, ctx)


def test_a_pass_that_does_not_produce_what_it_ensures_is_refused():
    @graph_pass(requires=("meta:ratel.unit",), ensures=("analysis:Schedule",))
    def promises_a_schedule(gm, ctx):
        return PassResult(gm, False)

    gm, ctx, _, _ = run_until(None)
    with pytest.raises(PassError, match="ensures analysis:Schedule but did not produce it"):
        PassManager([promises_a_schedule]).run(gm, ctx)
