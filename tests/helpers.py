"""Shared test helpers: small models of each family, and a side-by-side run of Ratel and plain PyTorch."""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch

import ratel
from ratel.ir import Tier
from ratel.ir.layout import device_state_bytes, host_usage
from ratel.models import GPT, GPTConfig
from ratel.runtime.calibrate import cpu_adam_kernel

VOCAB = 128


def make_model(kind: str, dropout: float = 0.0, layers: int = 4, dtype=torch.float32, device="cpu"):
    """A small model of each family the vertical slice supports, in train mode, seeded."""
    torch.manual_seed(0)
    with torch.device(device):
        if kind in ("gpt", "gpt_untied", "gpt_nobias"):
            model = GPT(GPTConfig(vocab_size=VOCAB, n_layer=layers, n_head=4, d_model=64, max_seq_len=64,
                                  dropout=dropout, tie_embeddings=kind != "gpt_untied", bias=kind != "gpt_nobias"))
        elif kind == "gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel
            model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=64,
                                               resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                               bos_token_id=0, eos_token_id=0))
        elif kind == "llama":
            from transformers import LlamaConfig, LlamaForCausalLM
            model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=layers, num_attention_heads=4,
                                                 num_key_value_heads=2, max_position_embeddings=64,
                                                 attention_dropout=dropout, bos_token_id=0, eos_token_id=0,
                                                 pad_token_id=0))
        elif kind == "qwen2":
            from transformers import Qwen2Config, Qwen2ForCausalLM
            model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=layers, num_attention_heads=4,
                                                 num_key_value_heads=2, max_position_embeddings=64,
                                                 attention_dropout=dropout, bos_token_id=0, eos_token_id=0,
                                                 pad_token_id=0, tie_word_embeddings=True))
        else:
            raise ValueError(kind)
    return model.to(dtype).train()


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def batches(steps: int, batch: int = 2, seq: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (batch, seq), generator=g), torch.randint(0, VOCAB, (batch, seq), generator=g))
            for _ in range(steps)]


def run_side_by_side(kind: str, steps: int = 10, dropout: float = 0.0, fused_reference: bool = True,
                     budget=None, lr: float = 1e-3, weight_decay: float = 0.1, layers: int = 4, **compile_kwargs):
    """Train a model with Ratel and a copy with plain PyTorch + torch.optim.AdamW on the same data and RNG.

    Returns (ratel losses, reference losses, ratel state_dict, reference model, engine).
    """
    model = make_model(kind, dropout, layers=layers)
    reference = copy.deepcopy(model)
    data = batches(steps)
    if budget is None:
        budget = minimum_budget(model, data[0][0])
    engine = ratel.compile(model, budget=budget, optimizer=ratel.AdamW(lr=lr, weight_decay=weight_decay),
                           example_inputs=(data[0][0],), device="cpu", progress=False, **compile_kwargs)
    opt = torch.optim.AdamW(reference.parameters(), lr=lr, weight_decay=weight_decay,
                            fused=True if fused_reference else None)
    ours, theirs = [], []
    for step, (ids, labels) in enumerate(data):
        torch.manual_seed(1000 + step)
        loss = reference(ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        theirs.append(loss.item())
        torch.manual_seed(1000 + step)
        loss = engine(ids, labels=labels).loss
        engine.backward(loss)
        engine.step()
        ours.append(loss.item())
    return ours, theirs, engine.state_dict(), reference, engine


def minimum_budget(model, ids) -> int:
    """The smallest GPU budget Ratel accepts for this model and batch, as a refusal names it: the peak of its
    most frugal plan (every unit recomputed from its checkpointed inputs, blocks cut in two where that needs
    less)."""
    try:
        ratel.explain(model, 1, (ids,), device="cpu")
    except ratel.BudgetError as error:
        return error.needed
    raise AssertionError("a 1-byte GPU budget was accepted")


def max_relative_difference(state: dict, reference) -> tuple[float, str]:
    """Largest per-tensor ||ours - theirs|| / ||theirs|| over the reference's parameters."""
    worst, name = 0.0, ""
    for n, p in reference.named_parameters():
        diff = ((state[n] - p.detach()).norm() / p.detach().norm().clamp_min(1e-30)).item()
        if diff > worst:
            worst, name = diff, n
    return worst, name


def mixed_precision_reference(model_bf16, data, lr, weight_decay, device="cpu", on_device: frozenset = frozenset()):
    """Plain PyTorch mixed precision: the bf16 model on ``device``, fp32 master weights and
    torch.optim.AdamW(fused) on the CPU, the bf16 copy refreshed from the masters after every step.
    ``on_device``: names of parameters whose masters live on ``device`` instead, stepped there by a second
    fused AdamW (what Ratel does with groups resident on the GPU: torch's CUDA kernel rounds unlike its CPU
    one by an ulp, and a parameter whose true gradient is zero, as the attention key bias's, turns such
    differences into full steps of Adam).

    Returns the losses and the final fp32 masters by parameter name."""
    ref = copy.deepcopy(model_bf16).to(device)
    names = [n for n, _ in ref.named_parameters()]
    params = list(ref.parameters())
    masters = [p.detach().float().to(device if n in on_device else "cpu").requires_grad_()
               for n, p in zip(names, params)]
    optimizers = [torch.optim.AdamW(chosen, lr=lr, weight_decay=weight_decay, fused=True)
                  for chosen in ([m for m in masters if m.device.type == "cpu"],
                                 [m for m in masters if m.device.type != "cpu"]) if chosen]
    losses = []
    for step, (ids, labels) in enumerate(data):
        torch.manual_seed(1000 + step)
        loss = ref(ids.to(device), labels=labels.to(device)).loss
        loss.backward()
        for m, p in zip(masters, params):
            m.grad, p.grad = p.grad.float().to(m.device), None
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            for m, p in zip(masters, params):
                p.copy_(m)
        losses.append(loss.item())
    return losses, dict(zip(names, masters))



def no_decay_groups(model, weight_decay: float) -> list[dict]:
    """Hugging Face Trainer's param groups: weight decay on matrices, none on biases and norm weights."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train_like_pytorch(model, data, *, accumulate: int = 1, max_grad_norm=None, lr: float = 1e-3,
                       weight_decay: float = 0.1, groups=None, scheduler=None, budget="1GiB", poison=(),
                       **compile_kwargs):
    """Train ``model`` with Ratel and a copy with plain PyTorch as a user writes the loop: ``accumulate``
    micro-batches (loss divided by k) per update, ``clip_grad_norm_`` when ``max_grad_norm`` is set (a
    non-finite norm skips the step), ``torch.optim.AdamW(fused=True)`` on ``groups(model)`` (default: every
    trainable parameter) and ``scheduler(optimizer)`` stepped after each update. ``poison``: updates whose
    first loss is multiplied by inf. ``data`` holds ``accumulate`` micro-batches per update.

    Returns a dict: losses / ref_losses (per micro-batch), norms / ref_norms (per update), the engine and the
    reference model."""
    reference = copy.deepcopy(model)

    def optimizer_for(m, fused):
        params = groups(m) if groups is not None else [p for p in m.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)

    engine = ratel.compile(model, budget=budget, optimizer=optimizer_for(model, None), example_inputs=(data[0][0],),
                           device="cpu", progress=False, accumulate=accumulate, max_grad_norm=max_grad_norm,
                           **compile_kwargs)
    opt = optimizer_for(reference, True)
    ref_sched = scheduler(opt) if scheduler else None
    our_sched = scheduler(engine.optimizer) if scheduler else None
    out = {"losses": [], "ref_losses": [], "norms": [], "ref_norms": [], "lrs": [], "ref_lrs": [],
           "engine": engine, "reference": reference}
    updates = len(data) // accumulate
    for u in range(updates):
        for m in range(accumulate):
            ids, labels = data[u * accumulate + m]
            scale = float("inf") if (u in poison and m == 0) else 1.0
            torch.manual_seed(1000 + u * accumulate + m)
            loss = reference(ids, labels=labels).loss
            (loss * scale / accumulate).backward()
            out["ref_losses"].append(loss.item())
            torch.manual_seed(1000 + u * accumulate + m)
            loss = engine(ids, labels=labels).loss
            engine.backward(loss * scale / accumulate)
            out["losses"].append(loss.item())
        if max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.requires_grad],
                                                  max_grad_norm)
            out["ref_norms"].append(norm.item())
            if torch.isfinite(norm):
                opt.step()
        else:
            opt.step()
        opt.zero_grad()
        out["ref_lrs"].append(opt.param_groups[0]["lr"])
        out["lrs"].append(engine.optimizer.param_groups[0]["lr"])
        engine.step()
        if max_grad_norm is not None:
            out["norms"].append(engine.grad_norm)
        if scheduler:
            ref_sched.step()
            our_sched.step()
    return out


def assert_trained_alike(result, rel: float = 1e-5) -> None:
    """Losses, parameters and gradient norms of ``train_like_pytorch`` within ``rel`` of PyTorch's."""
    for i, (a, b) in enumerate(zip(result["losses"], result["ref_losses"])):
        assert a == pytest.approx(b, rel=rel), f"micro-batch {i}: loss {a} vs {b}"
    for i, (a, b) in enumerate(zip(result["norms"], result["ref_norms"])):
        if math.isfinite(b):
            assert a == pytest.approx(b, rel=rel), f"update {i}: grad norm {a} vs {b}"
        else:
            assert not math.isfinite(a)
    worst, name = max_relative_difference(result["engine"].state_dict(), result["reference"])
    assert worst < rel, f"{name} differs by {worst:.2e}"


def host_minimum(model, ids, accumulate: int = 1, device: str = "cpu", gpu: str = "1GiB", clip: bool = False,
                 ranks: int = 1) -> int:
    """The host budget that leaves every optimizer state to the SSD (of each of ``ranks`` data-parallel ranks)."""
    probe = ratel.compile(model, budget=ratel.Budget(gpu=gpu, host="1TiB"), example_inputs=(ids,),
                          device=device, progress=False)
    plan = probe.plan
    probe.close()
    tiers = {g.name: Tier.SSD for g in plan.groups if g.trainable}
    return sum(b for _, b in host_usage(plan.groups, tiers, plan.placement.activations, (cpu_adam_kernel() == "torch"),
                                        accumulate=accumulate, clip=clip, ranks=ranks))


def resident_budget(model, ids, groups: int, accumulate: int = 1, **kwargs) -> int:
    """A GPU budget that holds the streaming plan and the first ``groups`` candidates resident, no more."""
    streaming = ratel.explain(model, "1GiB", (ids,), device="cpu", resident=False, activations="recompute",
                              accumulate=accumulate, **kwargs)
    order = sorted(streaming.groups, key=lambda g: (g.update_unit, g.index))
    extra = sum(device_state_bytes(g, accumulate) for g in order[:groups])
    scratch = max(g.numel * 4 for g in order[:groups])
    return streaming.memory.gpu_peak + extra + scratch + 4096


def subprocess_env(*folders, **variables: str) -> dict:
    """This process's environment for a script run in a subprocess: ``folders`` first on PYTHONPATH (the
    repository, to import ratel; the tests, to import these helpers), and ``variables`` set."""
    path = os.pathsep.join([*map(str, folders), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **variables}


def first_groups(model, ids, k: int, device: str = "cuda") -> list[str]:
    """The names of the first ``k`` groups the planner would weigh keeping on the GPU (the first units')."""
    return first_groups_and_parameters(model, ids, k, device)[0]


def first_groups_and_parameters(model, ids, k: int, device: str = "cuda") -> tuple[list[str], frozenset]:
    """``first_groups`` and the names of their parameters, from one plan."""
    groups = ratel.explain(model, "1TiB", (ids,), device=device, resident=False).groups
    first = sorted(groups, key=lambda g: (g.update_unit, g.index))[:k]
    return [g.name for g in first], frozenset(name for g in first for name in g.params)


def train_seeded(engine, data) -> list[float]:
    """One update per (ids, labels) batch, the RNG seeded as ``mixed_precision_reference`` seeds it; the losses."""
    losses = []
    for step, (ids, labels) in enumerate(data):
        torch.manual_seed(1000 + step)
        loss = engine(ids, labels=labels).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def train_steps(engine, data) -> list[float]:
    """One update per (ids, labels) batch; the losses."""
    losses = []
    for ids, labels in data:
        loss = engine(ids, labels=labels).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses
