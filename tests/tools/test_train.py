"""``ratel train``: a fine-tuning run equals the same loop in plain PyTorch, stops cleanly on SIGTERM with a
checkpoint, resumes to the uninterrupted run's result, and leaves a model folder transformers loads."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import subprocess_env
from ratel.cli import main
from ratel.errors import RatelError
from ratel.data import Batches, load_examples, load_tokenizer, pack, split
from ratel.tools.train import TrainConfig, decay_groups, train, trained_tokens, warmup_cosine

HERE = Path(__file__).parent
WORDS = ["the", "cat", "sat", "on", "mat", "question", "answer", "is", "a", "dog", "what", "where"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama saved as Hugging Face saves it (config.json, model.safetensors) with a word tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("model")
    vocab = {token: i for i, token in enumerate(["[UNK]", "<s>", "</s>"] + WORDS)}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>", bos_token="<s>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Documents and prompt/completion pairs (the loss only on completions)."""
    rng = torch.Generator().manual_seed(3)

    def sentence(n: int) -> str:
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=rng))

    records = []
    for i in range(60):
        if i % 3 == 0:
            records.append({"text": sentence(12)})
        else:
            records.append({"prompt": "question " + sentence(5) + " answer", "completion": " " + sentence(6)})
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def config_for(model_dir, data_file, out, **overrides) -> TrainConfig:
    values = dict(model=str(model_dir), data=str(data_file), out=str(out), seq=16, batch=2, accumulate=2, steps=8,
                  lr=3e-3, warmup=2, weight_decay=0.1, max_grad_norm=0.5, eval_fraction=0.1, eval_every=3,
                  eval_batches=2, save_every=0, keep=2, budget="1GiB", device="cpu", tensorboard=False,
                  progress=False)
    return TrainConfig(**{**values, **overrides})


def reference_run(config: TrainConfig, norms: list | None = None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same fine-tuning in plain PyTorch: transformers' model, torch.optim.AdamW, clip_grad_norm_, LambdaLR;
    ``norms`` gets each update's gradient norm."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(config.model).train()
    tokenizer = load_tokenizer(config.model)
    train_set, _ = split(pack(load_examples(config.data), tokenizer, config.seq), config.eval_fraction,
                         seed=config.seed)
    batches = Batches(train_set, config.batch, seed=config.seed)
    opt = torch.optim.AdamW(decay_groups(model, config.weight_decay), lr=config.lr, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(config.warmup, config.steps, config.min_lr_ratio))
    losses = []
    for _ in range(config.steps):
        micro = [next(batches) for _ in range(config.accumulate)]
        cycle = sum(trained_tokens(labels) for _, labels in micro)
        total = 0.0
        for ids, labels in micro:
            loss = model(ids, labels=labels).loss
            (loss * (trained_tokens(labels) / cycle)).backward()
            total += loss.item() * trained_tokens(labels)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        if norms is not None:
            norms.append(float(norm))
        opt.step()
        opt.zero_grad()
        schedule.step()
        losses.append(total / cycle)
    return losses, {k: v.detach() for k, v in model.state_dict().items()}


def load_trained(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def assert_close_states(ours: dict, theirs: dict, rel: float = 1e-5) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        diff = (ours[name].float() - theirs[name].float()).abs().max().item()
        scale = theirs[name].float().abs().max().item() or 1.0
        assert diff <= rel * scale, f"{name} differs by {diff / scale:.2e}"


@pytest.fixture(scope="module")
def uninterrupted(model_dir, data_file, tmp_path_factory):
    config = config_for(model_dir, data_file, tmp_path_factory.mktemp("run"))
    result = train(config, say=lambda line: None)
    return config, result


def test_a_run_equals_the_same_fine_tuning_in_plain_pytorch(uninterrupted):
    config, result = uninterrupted
    losses, state = reference_run(config)
    assert result.steps == config.steps
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(losses), rtol=1e-5, atol=0)
    assert_close_states(load_trained(result.checkpoint), state)


def test_a_run_with_layers_kept_on_the_gpu_equals_plain_pytorch_and_no_resident_parses(model_dir, data_file,
                                                                                       tmp_path):
    import argparse

    from ratel.tools.train import add_arguments, config_from_args
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    required = ["--model", "m", "--data", "d"]
    assert config_from_args(parser.parse_args(required)).resident is None          # chosen on a GPU
    assert config_from_args(parser.parse_args(required + ["--no-resident"])).resident is False
    # resident=True asks for it on the CPU too, where the "GPU" is the host: the same path, in CI.
    config = config_for(model_dir, data_file, tmp_path / "run", steps=4, resident=True)
    said = []
    result = train(config, say=said.append)
    assert any("parameter groups kept on the GPU" in line for line in said)
    losses, state = reference_run(config)
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(losses), rtol=1e-5, atol=0)
    assert_close_states(load_trained(result.checkpoint), state)


def test_a_run_writes_metrics_evaluations_and_a_loadable_model_with_its_tokenizer(uninterrupted):
    from transformers import AutoTokenizer

    config, result = uninterrupted
    records = [json.loads(line) for line in (Path(config.out) / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in records if "loss" in r]
    assert [r["step"] for r in updates] == list(range(1, config.steps + 1))
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["tflops"] > 0 for r in updates)
    evals = [(r["step"], r["eval_loss"]) for r in updates if "eval_loss" in r]
    assert [s for s, _ in evals] == [3, 6] and evals == result.eval_losses
    assert evals[-1][1] < evals[0][1]                 # it learns
    assert result.checkpoint == Path(config.out) / f"checkpoint-{config.steps}"
    tokenizer = AutoTokenizer.from_pretrained(result.checkpoint)
    assert tokenizer.encode("the cat", add_special_tokens=False) == [3, 4]


def test_sigterm_saves_and_resume_continues_as_the_uninterrupted_run(uninterrupted, tmp_path):
    config, result = uninterrupted
    interrupted = dataclasses.replace(config, out=str(tmp_path / "run"), save_every=100)
    env = subprocess_env(HERE.parents[1])
    proc = subprocess.run([sys.executable, str(HERE / "train_run.py"), json.dumps(dataclasses.asdict(interrupted)), "5"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 128 + 15, proc.stderr[-3000:]
    assert "stopped by SIGTERM after update 5" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-5"]

    resumed = train(dataclasses.replace(interrupted, resume=True), say=lambda line: None)
    assert resumed.resumed_from == tmp_path / "run" / "checkpoint-5"
    assert resumed.losses == result.losses[5:]          # bitwise: same states, schedule, data position
    assert_close_states(load_trained(resumed.checkpoint), load_trained(result.checkpoint), rel=0)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, config.steps + 1))


def test_checkpoints_every_n_updates_keep_the_last_k_and_tensorboard_gets_the_metrics(model_dir, data_file,
                                                                                       tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    code = main(["train", "--model", str(model_dir), "--data", str(data_file), "--out", str(tmp_path), "--seq", "16",
                 "--batch", "2", "--steps", "7", "--save-every", "2", "--keep", "2", "--eval-every", "0",
                 "--device", "cpu", "--budget", "1GiB", "--no-progress"])
    assert code == 0
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-7"]
    assert not list(tmp_path.glob(".checkpoint-*"))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("loss")]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx([r["loss"] for r in records if "loss" in r], rel=1e-6)


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused(uninterrupted, capsys):
    config, _ = uninterrupted
    code = main(["train", "--model", config.model, "--data", config.data, "--out", config.out, "--device", "cpu",
                 "--no-progress"])
    assert code == 1
    assert "holds checkpoints of an earlier run (checkpoint-8 the latest): pass --resume" in capsys.readouterr().err


def test_resume_without_a_checkpoint_says_so(model_dir, data_file, tmp_path, capsys):
    code = main(["train", "--model", str(model_dir), "--data", str(data_file), "--out", str(tmp_path),
                 "--device", "cpu", "--resume", "--no-progress"])
    assert code == 1
    assert "no complete checkpoint in" in capsys.readouterr().err


def test_a_tokenizer_larger_than_the_embedding_is_refused(data_file, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 100, "hidden_size": 32,
                                                      "intermediate_size": 64, "num_hidden_layers": 1,
                                                      "num_attention_heads": 4}))
    code = main(["train", "--model", str(tmp_path), "--data", str(data_file), "--out", str(tmp_path / "out"),
                 "--device", "cpu", "--no-progress"])
    assert code == 1
    assert "the tokenizer has 257 tokens, the model's embedding only 100" in capsys.readouterr().err


def test_warmup_then_cosine_to_the_floor():
    f = warmup_cosine(warmup=4, total=14, min_ratio=0.1)
    assert [round(f(s), 6) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4) == 1.0 and abs(f(14) - 0.1) < 1e-12 and abs(f(9) - 0.55) < 1e-12


def test_resuming_a_checkpoint_not_written_by_ratel_train_says_so(model_dir, data_file, tmp_path):
    import ratel
    from ratel.tools.train import build
    config = config_for(model_dir, data_file, tmp_path, resume=True)
    model, _, weights, _ = build(config)
    engine = ratel.compile(model, "1GiB", optimizer=torch.optim.AdamW(decay_groups(model, 0.1)), weights=weights,
                           example_inputs=(torch.zeros(2, 16, dtype=torch.long),), device="cpu", progress=False)
    engine.save(tmp_path / "checkpoint-1")        # no data position in its state
    engine.close()
    with pytest.raises(ratel.RatelError, match="not a checkpoint of `ratel train`"):
        train(config, say=lambda line: None)


def test_two_ranks_under_torchrun_equal_one_process_and_resume_on_one(model_dir, data_file, tmp_path):
    """``torchrun --nproc-per-node 2``: 2 rows a rank train as one process with 4 rows; SIGTERM to one rank
    stops both after the same update with one checkpoint, which one process with --batch 4 continues."""
    config = config_for(model_dir, data_file, tmp_path / "run", steps=6, save_every=100)
    env = subprocess_env(HERE.parents[1], OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(HERE / "train_run.py"), json.dumps(dataclasses.asdict(config)), "3", "1"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert "stopped by SIGTERM after update 3" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "x 2 ranks" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-3"]

    one = dataclasses.replace(config, batch=4, resume=True)
    resumed = train(one, say=lambda line: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == config.steps and losses[3:] == resumed.losses

    reference_norms = []
    reference_losses, reference_state = reference_run(dataclasses.replace(config, batch=4), reference_norms)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-5, atol=0)
    # Adam and clipping hide a gradient scaled by a constant: the norms do not
    norms = [r["grad_norm"] for r in records if "grad_norm" in r]
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(reference_norms), rtol=1e-5, atol=0)
    assert_close_states(load_trained(resumed.checkpoint), reference_state)

    with pytest.raises(RatelError, match="--batch x ranks = 4"):     # another global batch: another data order
        train(dataclasses.replace(config, resume=True, steps=8), say=lambda line: None)
