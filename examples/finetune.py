"""Fine-tune a small GPT on a bundled text with Ratel: the project's main job.

    python examples/finetune.py                 # a few hundred steps, on CUDA if present, else CPU
    python examples/finetune.py --steps 50 --budget 64MiB

The model is Ratel's reference GPT at byte level (vocabulary 256). The GPU budget defaults to the smallest
the planner accepts, so parameters stream through a two-slot ring, block inputs are checkpointed to host
memory, and AdamW runs on the CPU while backward goes on. At the end the trained weights are loaded into
a plain PyTorch model, which writes a sample.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import ratel
from ratel.ir import format_bytes
from ratel.models import GPT, GPTConfig

TEXT = Path(__file__).parent / "data" / "honey_badger.txt"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--budget", default=None, help="GPU budget, e.g. 24GiB (default: the smallest accepted)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def batches(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
        yield torch.stack([data[s: s + seq] for s in starts]).long()


@torch.no_grad()
def sample(model: GPT, prompt: str, length: int, device) -> str:
    ids = torch.tensor([list(prompt.encode())], device=device)
    for _ in range(length):
        logits = model(ids[:, -model.config.max_seq_len:]).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return bytes(ids[0].tolist()).decode(errors="replace")


def main():
    args = parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    data = torch.frombuffer(bytearray(TEXT.read_bytes()), dtype=torch.uint8)
    cfg = GPTConfig(vocab_size=256, n_layer=args.layers, n_head=4, d_model=args.width, max_seq_len=args.seq,
                    dropout=args.dropout)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = GPT(cfg).to(dtype).train()
    params = sum(p.numel() for p in model.parameters())
    param_bytes = params * dtype.itemsize
    generator = torch.Generator().manual_seed(args.seed)
    stream = batches(data, args.batch, args.seq, generator)
    example = next(stream)

    budget = args.budget
    if budget is None:
        # The smallest budget the planner accepts for this batch: its most frugal plan (every unit recomputed).
        budget = ratel.explain(model, "1TiB", (example,), device=device, activations="recompute").memory.gpu_peak
    engine = ratel.compile(model, budget=budget, optimizer=ratel.AdamW(lr=args.lr, weight_decay=0.1),
                           example_inputs=(example,), device=device)
    plan = engine.plan
    print(f"ratel: {params / 1e6:.2f}M parameters ({format_bytes(param_bytes)} in {dtype}) on {device}; "
          f"GPU budget {format_bytes(plan.budget_gpu)}, planned peak {format_bytes(plan.memory.gpu_peak)}, "
          f"host {format_bytes(plan.memory.host_total)}")

    tokens = args.batch * args.seq
    bar = tqdm(range(args.steps), desc="fine-tuning", unit="step")
    start = time.perf_counter()
    ema = None
    for step in bar:
        ids = example if step == 0 else next(stream)
        loss = engine(ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        value = loss.item()
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        rate = tokens * (step + 1) / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{rate:,.0f}")
    bar.close()

    trained = GPT(cfg).to(device)
    trained.load_state_dict({k: v for k, v in engine.state_dict().items() if k in trained.state_dict()})
    engine.close()
    trained.eval()
    print(f"final loss {ema:.3f} (a uniform guess over bytes is {torch.log(torch.tensor(256.0)):.3f})")
    print("sample:", repr(sample(trained, "The honey badger ", 120, device)))


if __name__ == "__main__":
    main()
