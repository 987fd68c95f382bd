import importlib

import pytest
import torch

from pipeline_util import assert_matches_golden, run_until
from ratel.ir import CostModel
from ratel.passes.estimate_costs import PeakMemory


def test_golden_before_after():
    assert_matches_golden("estimate_costs")


def test_flops_follow_the_documented_formula():
    gm, ctx, model, _ = run_until("estimate_costs")
    costs = ctx.get(CostModel)
    b, s, d, heads, ff = 2, 8, 32, 2, 128
    # qkv, proj, up, down matmuls + attention (causal not halved), per block
    block = 2 * b * s * (d * 3 * d + d * d + d * ff + ff * d) + 4 * b * s * s * d
    assert costs.units[1].fwd_flops == block and costs.units[2].fwd_flops == block
    assert costs.units[1].bwd_flops == 2 * block
    assert costs.units[0].fwd_flops == 0                       # embeddings are lookups
    # The LM head: the returned logits' product, then the loss's over the positions it reads (all but the
    # last), whose backward computes the logits again before its two products.
    head = costs.units[-1]
    assert head.fwd_flops == 2 * b * s * d * 64 + 2 * b * (s - 1) * d * 64
    assert head.bwd_flops == 2 * (2 * b * s * d * 64) + 3 * (2 * b * (s - 1) * d * 64)
    _, ctx, _, _ = run_until("estimate_costs", keep_logits=False)
    assert ctx.get(CostModel).units[-1].fwd_flops == 2 * b * (s - 1) * d * 64


def test_unit_memory_matches_a_real_run():
    gm, ctx, model, inputs = run_until("estimate_costs")
    cost = ctx.get(CostModel).units[1]
    block = model.blocks[0]
    x = torch.randn(2, 8, 32, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in block.parameters()]
    assert cost.output_bytes == x.numel() * 4
    # All parameter gradients exist at the end of the backward; autograd held the saved tensors before.
    assert cost.bwd_workspace >= max(cost.saved_bytes, sum(p.numel() * 4 for p in params))
    assert cost.fwd_workspace < cost.bwd_workspace
    # The fake-tensor measurement equals the same measurement on real tensors.
    from torch.multiprocessing.reductions import StorageWeakRef
    sub = gm.unit_blocks_0
    with PeakMemory([StorageWeakRef(t.untyped_storage()) for t in [x, *params]]) as tracker:
        out = sub(x, *params)
        torch.autograd.backward([o for o in out], [torch.ones_like(o) for o in out], inputs=[x, *params])
    assert tracker.peak == cost.bwd_workspace


def test_peak_memory_tracker_on_a_synthetic_chain():
    x = torch.randn(1024)   # 4 KiB, preexisting: not counted
    from torch.multiprocessing.reductions import StorageWeakRef
    with PeakMemory([StorageWeakRef(x.untyped_storage())]) as tracker:
        a = x * 2           # 4 KiB live
        b = a * 2           # 8 KiB live at peak (a and b)
        del a
        c = b * 2           # a freed: b and c live, 8 KiB
        del b, c
    assert tracker.peak == 8192


def test_frozen_parameters_are_profiled_as_the_runtime_runs_them():
    """Autograd saves less when a weight needs no gradient; the profile must list exactly what it saves."""
    from ratel.ir import META_UNIT_CALL
    from ratel.passes.estimate_costs import profile_unit
    gm, ctx, model, _ = run_until("estimate_costs")
    node = next(n for n in gm.graph.nodes if META_UNIT_CALL in n.meta and n.meta[META_UNIT_CALL].unit == 1)
    call = node.meta[META_UNIT_CALL]
    sub = getattr(gm, call.module)
    frozen = profile_unit(sub, call, "cpu", trainable=frozenset())
    trained = profile_unit(sub, call, "cpu")
    assert len(frozen.packs) < len(trained.packs)
    x = torch.randn(2, 8, 32, requires_grad=True)
    params = [p.detach().clone() for p in model.blocks[0].parameters()]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sub(x, *params)
    assert len(saved) == len(frozen.packs)



def _attention_block_costs(device, batch, seq):
    """GPT-2 (HF, sdpa with its boolean mask and attention dropout): the first block's measured cost."""
    import ratel
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=8, n_positions=seq,
                                       bos_token_id=0, eos_token_id=0)).to(torch.bfloat16).train()
    ids = torch.randint(0, 128, (batch, seq))
    plan = ratel.explain(model, "1TiB", (ids,), device=device, activations="keep")
    return plan.costs.units[1]   # embed, the first block, ...


def test_a_plan_for_cuda_made_without_a_gpu_measures_attention_as_cuda_runs_it():
    """The CPU's attention kernel under dropout materialises batch x heads x seq² scores; CUDA's fused
    kernels (what the plan is for) keep a float per query row. A plan for CUDA made on this CPU must not
    count the scores — they were 16 GiB per block of a GPT-3-sized GPT-2 at 8 x 1024 and refused the plan."""
    from ratel.passes.estimate_costs import workspace_bound
    batch, heads, seq = 2, 8, 512
    scores = batch * heads * seq * seq * 2                 # one bf16 score tensor: 8 MiB
    on_cpu = _attention_block_costs("cpu", batch, seq)
    for_cuda = _attention_block_costs("cuda", batch, seq)
    assert on_cpu.saved_bytes > 3 * scores                 # float scores, their softmax, the dropout mask, ...
    assert for_cuda.saved_bytes < scores                   # q, k, v, the output, the row log-sum-exp, the mask
    assert on_cpu.bwd_workspace > 3 * scores
    assert for_cuda.bwd_workspace < workspace_bound(scores, "cuda")


@pytest.mark.parametrize("kind", ["gpt", "gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])       # without dropout the CPU's flash kernel, with it math
def test_units_measured_on_meta_tensors_equal_fake_cpu_tensors(kind, dtype, dropout, monkeypatch):
    """Units for the CPU run on meta tensors (five times cheaper at a new shape) with the CPU's attention
    kernel and layer-norm statistics: every figure and every saved tensor equals the fake-CPU measurement."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    import ratel
    from helpers import batches, make_model
    estimate = importlib.import_module("ratel.passes.estimate_costs")
    measured = []
    profile = estimate.profile_unit

    def both(sub, call, device, trainable=None):
        on_meta = profile(sub, call, device, trainable)
        with FakeTensorMode(allow_non_fake_inputs=True):
            on_fake = estimate._measure(sub, call, "cpu", trainable)
        measured.append((call.module, on_meta, on_fake))
        return on_meta
    monkeypatch.setattr(estimate, "profile_unit", both)
    model = make_model(kind, dropout=dropout, layers=2, dtype=dtype)
    ratel.explain(model, "1TiB", (batches(1, batch=2, seq=24)[0][0],), device="cpu", activations="keep")
    assert len(measured) >= 3
    for name, on_meta, on_fake in measured:
        assert on_meta == on_fake, name


def test_a_plan_for_cuda_counts_the_head_weight_padded_as_cuda_pads_it(monkeypatch):
    """On CUDA the chunked head loss pads its products' vocabulary to a multiple of 64 (ir/losses.vocab_align):
    a plan for CUDA measured on meta tensors (no GPU here) must count the padded weight and logits, which
    meta tensors alone would not pad."""
    import ratel
    from ratel.ir.hardware import HardwareProfile
    from ratel.models import GPT, GPTConfig

    def head_cost():
        with torch.device("meta"):
            model = GPT(GPTConfig(vocab_size=1000, n_layer=1, n_head=4, d_model=256, max_seq_len=4096,
                                  tie_embeddings=False)).to(torch.bfloat16)
        ids = torch.zeros(8, 4096, dtype=torch.long, device="meta")     # 32760 rows: more than a quarter chunk
        plan = ratel.explain(model, "8GiB", (ids,), device="cuda", hardware=HardwareProfile.h100())
        return plan.costs.units[-1]

    padded = head_cost()
    monkeypatch.setattr(importlib.import_module("ratel.passes.estimate_costs"), "vocab_align", lambda device: 1)
    unpadded = head_cost()
    weight = 24 * 256 * 2                 # 1000 rows padded to 1024, bf16
    assert padded.fwd_workspace >= unpadded.fwd_workspace + weight
    assert padded.bwd_workspace >= unpadded.bwd_workspace + weight
