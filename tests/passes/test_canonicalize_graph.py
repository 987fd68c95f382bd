import torch

from pipeline_util import assert_matches_golden, golden_text, run_program, run_until
from ratel.models import GPT, GPTConfig


def test_golden_before_after():
    assert_matches_golden(None)
    assert_matches_golden("canonicalize_graph")
    assert "_assert_tensor_metadata" not in golden_text("canonicalize_graph")


def test_matches_eager():
    gm, ctx, model, inputs = run_until("canonicalize_graph")
    loss, logits = run_program(gm, ctx, model, inputs)
    expected = model(*inputs[:1], labels=inputs[1])
    assert torch.equal(loss, expected.loss) and torch.equal(logits, expected.logits)


def test_meta_trace_is_retargeted_to_the_run_device():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16))
    gm, ctx, _, _ = run_until("canonicalize_graph", model=model)
    for node in gm.graph.nodes:
        for value in list(node.args) + list(node.kwargs.values()):
            assert value != torch.device("meta"), node.format_node()
    assert any(node.kwargs.get("device") == torch.device("cpu") for node in gm.graph.nodes)
