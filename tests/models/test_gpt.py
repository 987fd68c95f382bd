import pytest
import torch

from ratel.models import GPT, GPTConfig


@pytest.mark.parametrize("tie,bias", [(True, True), (False, True), (True, False)])
def test_parameter_count_formula(tie, bias):
    cfg = GPTConfig(vocab_size=100, n_layer=3, n_head=4, d_model=32, max_seq_len=16, tie_embeddings=tie, bias=bias)
    model = GPT(cfg)
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())


def test_forward_shapes_loss_and_tying():
    cfg = GPTConfig(vocab_size=50, n_layer=2, n_head=2, d_model=16, max_seq_len=8)
    model = GPT(cfg)
    ids = torch.randint(0, 50, (3, 8))
    out = model(ids, labels=ids)
    assert out.logits.shape == (3, 8, 50)
    assert out.loss.ndim == 0 and 3.0 < out.loss.item() < 5.0   # about log(50) at init
    assert model.lm_head.weight is model.wte.weight
    assert model(ids).loss is None
