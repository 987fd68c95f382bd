"""Fine-tune a small Llama on a bundled text with Ratel: the project's main job, on ``ratel train``'s code.

    python examples/finetune.py                   # 120 updates, on CUDA if present, else the CPU
    python examples/finetune.py --steps 50 --budget 64MiB
    python examples/finetune.py --resume          # continue from the latest checkpoint in --out
    torchrun --nproc-per-node 2 examples/finetune.py --batch 4   # 2 ranks x 4 rows: the same run as --batch 8

The model is a 4-layer Llama built from a config (random initialisation) at byte level (Ratel's fallback
tokenizer: UTF-8 bytes and an eos). The GPU budget defaults to the smallest the planner accepts, so
parameters stream through a two-slot ring, block inputs are checkpointed, and AdamW runs on the CPU while
backward goes on. Checkpoints land in ``--out`` as Hugging Face folders; at the end the last one is loaded
with ``transformers`` and writes a sample.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

import ratel
from ratel.data import ByteTokenizer
from ratel.tools.train import TrainConfig, build, train

TEXT = Path(__file__).parent / "data" / "honey_badger.txt"
CONFIG = {"model_type": "llama", "vocab_size": 264, "hidden_size": 128, "intermediate_size": 344,
          "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
          "bos_token_id": 256, "eos_token_id": 256, "pad_token_id": 256, "tie_word_embeddings": False}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="updates (default 120)")
    parser.add_argument("--batch", type=int, default=8, help="rows per update (default 8)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per row (default 128)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    parser.add_argument("--budget", default=None, help="GPU budget, e.g. 24GiB (default: the smallest accepted)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default cuda when present)")
    parser.add_argument("--out", default="runs/finetune", help="checkpoints and metrics (default runs/finetune)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    return parser.parse_args()


@torch.no_grad()
def sample(model, prompt: str, length: int) -> str:
    tokenizer = ByteTokenizer()
    ids = torch.tensor([tokenizer.encode(prompt)], device=model.device)
    out = model.generate(ids, max_new_tokens=length, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0])


def main():
    args = parse_args()
    ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ranks:     # under torchrun: rank 0 alone clears the earlier run and writes the sample
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    first = not ranks or dist.get_rank() == 0
    out = Path(args.out)
    earlier = sorted(out.glob("checkpoint-*"))
    if earlier and not args.resume and first:
        # This script's own scratch folder: a new run replaces the last one (ratel train itself would refuse).
        print(f"removing the earlier run in {out} (pass --resume to continue it instead)")
        for folder in earlier:
            shutil.rmtree(folder)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(out / "tensorboard", ignore_errors=True)
    if ranks:
        dist.barrier()
    model_dir = out / "model"                    # a config alone: ratel train initialises the weights
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(CONFIG, indent=1))
    config = TrainConfig(model=str(model_dir), data=str(TEXT), out=str(out), seq=args.seq, batch=args.batch,
                         steps=args.steps, lr=args.lr, warmup=0.05, weight_decay=0.1, eval_fraction=0.1,
                         eval_every=20, eval_batches=4, save_every=50, keep=1, device=args.device,
                         resume=args.resume, budget=args.budget or "1TiB")
    if args.budget is None:
        # The smallest budget the planner accepts for this batch: its most frugal plan (every unit recomputed,
        # every layer streamed).
        model, _, _, _ = build(config)
        ids = torch.zeros(args.batch, args.seq, dtype=torch.long)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        config.budget = str(ratel.explain(model, "1TiB", (ids,), device=device, activations="recompute",
                                          resident=False).memory.gpu_peak)
    result = train(config)
    if ranks:
        dist.destroy_process_group()
    if not first:
        return

    from transformers import AutoModelForCausalLM
    trained = AutoModelForCausalLM.from_pretrained(result.checkpoint).float().eval()
    uniform = torch.log(torch.tensor(256.0)).item()
    if result.losses:
        last = result.eval_losses[-1][1] if result.eval_losses else float("nan")
        print(f"final training loss {result.losses[-1]:.3f}, held-out loss {last:.3f} "
              f"(a uniform guess over bytes is {uniform:.3f})")
    print("sample:", repr(sample(trained, "The honey badger ", 120)))


if __name__ == "__main__":
    main()
