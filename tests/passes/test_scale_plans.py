"""Plans of the scale issue's rows on the meta device (nothing allocated, seconds each): what a 24 GiB card
can train now that the LM head's loss runs over token chunks and blocks too large for the budget are cut in
two units, and what still bounds the rest."""
import pytest
import torch

import ratel
from ratel.errors import BudgetError
from ratel.ir.hardware import HardwareProfile
from ratel.models import GPT, GPTConfig


def plan(layers, hidden, heads, vocab, batch, seq, gpu="24GiB", host="1TiB"):
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=vocab, n_layer=layers, n_head=heads, d_model=hidden, max_seq_len=seq,
                              tie_embeddings=False)).to(torch.bfloat16)
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    return ratel.explain(model, ratel.Budget(gpu=gpu, host=host), (ids,), hardware=HardwareProfile.h100())


@pytest.mark.parametrize("layers,hidden,heads,vocab,batch,seq,cut", [
    (40, 5120, 40, 50304, 64, 1024, False),   # GPT 13B at batch 64 x 1024 (was refused: 63.7 GiB, the head)
    (16, 4096, 32, 50257, 32, 2048, False),   # GPT 3.6B at batch 32 x 2048 (was refused: 42.9 GiB, the head)
    (16, 4096, 32, 50257, 64, 2048, True),    # GPT 3.6B at batch 64 x 2048 (one block's backward: 23.3 GiB)
])
def test_rows_that_now_fit_24_gib(layers, hidden, heads, vocab, batch, seq, cut):
    result = plan(layers, hidden, heads, vocab, batch, seq)
    assert result.memory.gpu_peak <= ratel.parse_bytes("24GiB")
    halves = all(u.name.endswith((":0", ":1")) for u in result.units if u.kind == "block")
    assert halves == cut                    # only the row whose whole blocks do not fit is cut
    # The head's backward holds tokens x hidden and vocabulary x hidden buffers and a few chunks of logits,
    # never tokens x vocabulary in fp32 (the unchunked head needed four times that: 54.7 GiB for the 13B row).
    logits_fp32 = batch * seq * vocab * 4
    assert result.costs.units[-1].bwd_workspace < logits_fp32 / 2


def test_a_row_beyond_halves_is_refused_naming_both_minimums():
    """GPT 3.6B at batch 128 x 2048: even half a block's backward needs more than 24 GiB. The refusal names
    the minimum of each choice and what bounds it."""
    with pytest.raises(BudgetError) as info:
        plan(16, 4096, 32, 50257, 128, 2048)
    message = str(info.value)
    assert info.value.tier == "gpu" and info.value.needed > ratel.parse_bytes("24GiB")
    assert "unit workspace" in message and "bwd blocks." in message
    assert "With whole blocks as units it needs at least" in message


def test_a_175b_gpt_plans_within_24_gib_of_gpu_and_256_gib_of_host(tmp_path):
    """The README's plan: GPT-3's shape at batch 8 x 1024. Gradients stream through a few host slots, so host
    memory holds what the plan chooses (states and copies beyond it on SSD); the SSD bounds the step."""
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50304, n_layer=96, n_head=96, d_model=12288,
                              max_seq_len=2048)).to(torch.bfloat16)
    ids = torch.zeros(8, 1024, dtype=torch.long, device="meta")
    result = ratel.explain(model, ratel.Budget(gpu="24GiB", host="256GiB", ssd_dir=str(tmp_path)), (ids,),
                           hardware=HardwareProfile.h100())
    assert result.memory.gpu_peak <= ratel.parse_bytes("24GiB")
    assert result.memory.host_total <= ratel.parse_bytes("256GiB")
    assert result.memory.ssd_total > ratel.parse_bytes("1TiB")
    assert "gradient staging ring" in dict(result.memory.host_bytes)
    lanes = {s.lane: 0.0 for s in result.times.spans}
    for s in result.times.spans:
        lanes[s.lane] += s.end - s.start
    assert max(lanes, key=lanes.get) == "ssd"
    step_line = next(line for line in str(ratel.summary(result)).splitlines() if "step time" in line)
    assert "SSD" in step_line                 # the summary says what bounds the step


def test_hugging_face_gpt2_at_175b_plans_within_24_gib_of_gpu_and_256_gib_of_host(tmp_path):
    """The same shape as Hugging Face's GPT-2 architecture (its attention takes a boolean mask and dropout,
    tied embeddings): half a block per unit, attention measured as CUDA's fused kernels run it."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_layer=96, n_head=96, n_embd=12288, n_positions=1024, vocab_size=50257)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config).to(torch.bfloat16)
    ids = torch.zeros(8, 1024, dtype=torch.long, device="meta")
    result = ratel.explain(model, ratel.Budget(gpu="24GiB", host="256GiB", ssd_dir=str(tmp_path)), (ids,),
                           hardware=HardwareProfile.h100())
    assert result.memory.gpu_peak <= ratel.parse_bytes("24GiB")
    assert result.memory.host_total <= ratel.parse_bytes("256GiB")
    assert sum(p.numel() for p in model.parameters()) > 174e9
    assert all(u.name.endswith((":0", ":1")) for u in result.units if u.kind == "block")
