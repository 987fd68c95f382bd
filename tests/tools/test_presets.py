"""Model presets and configs for the CLI: names, JSON files, HF folders; built on meta."""
import json

import pytest
import torch

from ratel.errors import RatelError
from ratel.models import GPTConfig
from ratel.tools.presets import build_model, preset_names, resolve


def test_every_preset_resolves_and_describes_itself():
    for name in preset_names():
        spec = resolve(name)
        assert spec.layers > 0 and spec.hidden > 0 and spec.describe()


@pytest.mark.parametrize("name,billions", [("gpt-175b", 175.0), ("llama-7b", 6.74), ("llama-70b", 69.0)])
def test_presets_have_the_shapes_they_name(name, billions):
    model = build_model(resolve(name), torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(billions * 1e9, rel=0.02)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())


def test_a_json_of_gpt_fields_or_an_hf_folder(tmp_path):
    path = tmp_path / "gpt.json"
    path.write_text(json.dumps({"vocab_size": 64, "n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 16}))
    spec = resolve(str(path))
    assert spec.family == "gpt" and spec.config == GPTConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32,
                                                             max_seq_len=16)

    from transformers import LlamaConfig
    folder = tmp_path / "llama"
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(folder)
    for where in (folder, folder / "config.json"):
        spec = resolve(str(where))
        assert spec.family == "hf" and spec.layers == 2 and spec.hidden == 32
    model = build_model(spec, torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM" and next(model.parameters()).is_meta


def test_unknown_models_name_what_is_accepted(tmp_path):
    with pytest.raises(RatelError, match="gpt-175b"):
        resolve("gpt-9000b")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": 3}))
    with pytest.raises(RatelError, match="unknown: layers"):
        resolve(str(bad))
    with pytest.raises(RatelError, match="local Hugging Face cache"):
        resolve("no-such-org/no-such-model")


def test_listing_presets_describes_them_as_building_them_does_without_transformers():
    import subprocess
    import sys
    from ratel.tools.presets import describe_preset, preset_names, resolve
    for name in preset_names():
        assert describe_preset(name) == resolve(name).describe()
    code = ("import sys, io; from ratel.cli import main; main(['plan', '--list'], out=io.StringIO()); "
            "print('transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().endswith("False"), result.stdout + result.stderr
