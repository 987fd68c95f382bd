"""Model presets for the CLI: a name, a JSON config or a Hugging Face config, built on the ``meta`` device.

    resolve("gpt-175b")                 a ratel.models.GPTConfig (GPT-3 175B's shape)
    resolve("llama-7b")                 a transformers LlamaConfig (Llama-2 7B's shape)
    resolve("path/to/config.json")      a HF config (it has "model_type") or GPTConfig fields (n_layer, ...)
    resolve("path/to/model_dir")        the folder's config.json
    resolve("org/name")                 a HF hub name, read from the local cache only (no download)
    build_model(spec, torch.bfloat16)   the model on the meta device: shapes only, no memory

Presets name shapes, not weights: Ratel plans from shapes, so a 70B model is built in a second or two.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ratel.errors import RatelError
from ratel.models import GPT, GPTConfig

# GPT presets: GPT-2/GPT-3 shapes (vocab padded to a multiple of 64, as is usual for throughput).
GPT_PRESETS: dict[str, dict[str, Any]] = {
    "gpt-tiny": dict(vocab_size=256, n_layer=4, n_head=4, d_model=128, max_seq_len=256),
    "gpt-124m": dict(vocab_size=50304, n_layer=12, n_head=12, d_model=768, max_seq_len=1024),
    "gpt-1.3b": dict(vocab_size=50304, n_layer=24, n_head=16, d_model=2048, max_seq_len=2048),
    "gpt-13b": dict(vocab_size=50304, n_layer=40, n_head=40, d_model=5120, max_seq_len=2048),
    "gpt-175b": dict(vocab_size=50304, n_layer=96, n_head=96, d_model=12288, max_seq_len=2048),
}
# Llama presets: Llama-2 shapes (transformers' LlamaConfig field names).
LLAMA_PRESETS: dict[str, dict[str, Any]] = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8),
}
_LLAMA_COMMON = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0)


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model description: where it came from, and the config to build it from."""

    name: str
    family: str          # "gpt" (ratel.models.GPT) or "hf" (a transformers causal LM)
    config: Any          # GPTConfig or a transformers PretrainedConfig

    @property
    def layers(self) -> int:
        return self.config.n_layer if self.family == "gpt" else self.config.num_hidden_layers

    @property
    def hidden(self) -> int:
        return self.config.d_model if self.family == "gpt" else self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_seq_len(self) -> int | None:
        """A hard limit on the sequence length (learned positions), or None (rotary positions)."""
        return self.config.max_seq_len if self.family == "gpt" else None

    def describe(self) -> str:
        if self.family == "gpt":
            c = self.config
            return (f"GPT: {c.n_layer} layers, d_model {c.d_model}, {c.n_head} heads, vocab {c.vocab_size}, "
                    f"max seq {c.max_seq_len}")
        c = self.config
        heads = getattr(c, "num_attention_heads", "?")
        return (f"{type(c).__name__.removesuffix('Config')} ({c.model_type}): {self.layers} layers, hidden "
                f"{self.hidden}, {heads} heads, vocab {self.vocab_size}")


def preset_names() -> list[str]:
    return list(GPT_PRESETS) + list(LLAMA_PRESETS)


def describe_preset(name: str) -> str:
    """A preset's one-line description without building its config (``plan --list`` imports no transformers)."""
    if name in GPT_PRESETS:
        return resolve(name).describe()
    c = {**_LLAMA_COMMON, **LLAMA_PRESETS[name]}
    return (f"Llama (llama): {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
            f"{c['num_attention_heads']} heads, vocab {c['vocab_size']}")


def _llama(fields: dict[str, Any]):
    from transformers import LlamaConfig
    return LlamaConfig(**{**_LLAMA_COMMON, **fields})


def _from_json(path: Path, name: str) -> ModelSpec:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RatelError(f"cannot read the model config {path}: {exc}") from exc
    if "model_type" in data:
        from transformers import AutoConfig
        return ModelSpec(name, "hf", AutoConfig.from_pretrained(str(path.parent if path.name == "config.json"
                                                                    else path)))
    fields = {f for f in GPTConfig.__dataclass_fields__}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise RatelError(f"{path}: neither a Hugging Face config (no 'model_type') nor GPTConfig fields "
                         f"(unknown: {', '.join(unknown)}; GPTConfig has {', '.join(sorted(fields))})")
    return ModelSpec(name, "gpt", GPTConfig(**data))


def resolve(model: str) -> ModelSpec:
    """A preset name, a JSON file, a model folder, or a cached Hugging Face hub name -> ModelSpec."""
    key = model.strip().lower()
    if key in GPT_PRESETS:
        return ModelSpec(key, "gpt", GPTConfig(**GPT_PRESETS[key]))
    if key in LLAMA_PRESETS:
        return ModelSpec(key, "hf", _llama(LLAMA_PRESETS[key]))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RatelError(f"{path} is a folder without config.json: give a Hugging Face model folder or a "
                             "config file")
        return _from_json(path / "config.json", model)
    if path.is_file():
        return _from_json(path, model)
    if "/" in model and not model.startswith((".", "/")):
        try:
            from transformers import AutoConfig
            # NOTE: local_files_only: planning must not depend on the network; a name works once cached.
            return ModelSpec(model, "hf", AutoConfig.from_pretrained(model, local_files_only=True))
        except (OSError, ValueError) as exc:
            raise RatelError(f"model {model!r}: not in the local Hugging Face cache ({exc.__class__.__name__}); "
                             "give a path to its config.json or model folder, or a preset: "
                             + ", ".join(preset_names())) from exc
    raise RatelError(f"unknown model {model!r}: give a preset ({', '.join(preset_names())}), a config.json, a "
                     "model folder or a cached Hugging Face name")


def build_model(spec: ModelSpec, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "meta",
                train: bool = True) -> nn.Module:
    """The model for ``spec`` on ``device`` (default meta: no memory) in ``dtype``."""
    with torch.device(device):
        if spec.family == "gpt":
            model = GPT(spec.config)
        else:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_config(spec.config)
    return model.to(dtype).train(train)


def parse_dtype(name: str) -> torch.dtype:
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "f16": torch.float16, "fp32": torch.float32, "float32": torch.float32, "f32": torch.float32}
    try:
        return table[name.lower()]
    except KeyError:
        raise RatelError(f"dtype {name!r}: use bf16, fp16 or fp32") from None


__all__ = ["GPT_PRESETS", "LLAMA_PRESETS", "ModelSpec", "build_model", "parse_dtype", "preset_names", "resolve"]
