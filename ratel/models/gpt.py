"""A reference decoder-only GPT: pre-LN blocks, causal scaled_dot_product_attention, tied or untied head.

Small enough to read in one sitting, shaped like the models people fine-tune, and free of any library but
torch, so that Ratel's tests and benchmarks have a model whose every line they control.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: Optional[int] = None        # default 4 * d_model
    max_seq_len: int = 256
    dropout: float = 0.0
    tie_embeddings: bool = True
    bias: bool = True

    @classmethod
    def gpt_13b(cls, **overrides) -> "GPTConfig":
        """The layer shape of 13B models (h=5120, 40 heads, 40 layers)."""
        base = dict(vocab_size=32000, n_layer=40, n_head=40, d_model=5120, max_seq_len=2048, bias=False)
        base.update(overrides)
        return cls(**base)

    def num_parameters(self) -> int:
        d, f = self.d_model, self.d_ff or 4 * self.d_model
        per_block = 4 * d * d + 2 * d * f + (4 * d + d + f + 4 * d if self.bias else 2 * d)
        emb = self.vocab_size * d + self.max_seq_len * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.n_layer * per_block + emb + head + (2 * d if self.bias else d)


class GPTOutput(NamedTuple):
    loss: Optional[torch.Tensor]
    logits: torch.Tensor


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(b, s, d)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d_ff = cfg.d_ff or 4 * cfg.d_model
        self.up = nn.Linear(cfg.d_model, d_ff, bias=cfg.bias)
        self.down = nn.Linear(d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init; also how Ratel initialises a model created on the meta device."""
        for module in self.modules():
            self.init_module(module)

    def init_module(self, module: nn.Module) -> None:
        std = 0.02
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> GPTOutput:
        b, s = input_ids.shape
        positions = torch.arange(s, device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return GPTOutput(loss, logits)
