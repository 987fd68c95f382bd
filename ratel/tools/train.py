"""``python -m ratel train``: fine-tune a causal LM on local data, with checkpoints that survive a crash.

    python -m ratel train --model path/to/model --data train.jsonl --out runs/ft --seq 1024 --batch 4 \\
        --accumulate 8 --lr 2e-5 --ssd-dir /mnt/nvme

The run, in order:

1. The model: a Hugging Face folder (config.json, safetensors weights when present: a config alone gives a
   random initialisation), a config.json or a preset, built on the meta device and filled one module at a
   time by ``ratel.compile``; its own tokenizer when the folder has one, else the byte-level fallback.
2. The data (``ratel.data``): JSON lines with a text field or prompt/completion pairs (the loss only on the
   completion), plain text, or what ``datasets`` reads locally; packed into rows of ``seq`` tokens; a
   held-out share for the evaluation loss.
3. Training: ``batch`` rows a micro-batch, ``accumulate`` micro-batches an update; each update's loss is the
   mean over every trained token of its micro-batches (as one large batch would give); AdamW with no weight
   decay on vectors (norms, biases), linear warm-up then cosine decay to ``min_lr_ratio``, clipping.
4. Every ``eval_every`` updates the held-out loss; every ``save_every`` a checkpoint ``out/checkpoint-N``
   (``engine.save``: Hugging Face weights and config, the tokenizer, Adam states, schedule, RNG and data
   position), keeping the last ``keep``; metrics to ``out/metrics.jsonl`` and TensorBoard when installed.
5. SIGTERM or SIGINT finishes the update under way, saves a checkpoint and returns (exit status 128 + the
   signal's number); ``--resume`` continues from the latest complete checkpoint in ``out`` exactly as the
   run would have gone on.

The result loads with ``AutoModelForCausalLM.from_pretrained("out/checkpoint-N")``.

Under ``torchrun --nproc-per-node N -m ratel train ...`` the run is data parallel: ``batch`` rows a micro-batch
on each rank (N x ``batch`` rows in all, drawn in the order one process with N x ``batch`` would draw them),
the loss the mean over every trained token of all ranks; rank 0 prints, logs and writes the checkpoints. A run
resumes with another number of ranks when N x ``batch`` stays the same.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import ratel
from ratel.checkpoint import latest, resolve
from ratel.data import (IGNORE_INDEX, Batches, HFTokenizer, eval_batches, load_examples,
                        load_tokenizer, pack, split)
from ratel.errors import RatelError
from ratel.ir import format_bytes
from ratel.ir.budget import Budget
from ratel.runtime.ranks import Ranks
from ratel.tools.bench import model_flops
from ratel.tools.presets import ModelSpec, build_model, parse_dtype, resolve as resolve_model

log = logging.getLogger("ratel")

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class TrainConfig:
    """Everything a fine-tuning run is made of; the CLI flags map one to one (``--min-lr-ratio``...)."""

    model: str                        # HF model folder, config.json or preset
    data: str                         # .jsonl / .txt / what `datasets` reads locally
    out: str = "runs/train"
    seq: int = 1024
    batch: int = 1                    # rows per micro-batch
    accumulate: int = 1               # micro-batches per update
    steps: int | None = None          # updates; default: `epochs` over the data
    epochs: float = 1.0
    lr: float = 2e-5
    min_lr_ratio: float = 0.1         # the cosine ends at lr * min_lr_ratio
    warmup: int | float = 0.03        # updates of linear warm-up, or a share of `steps` when below 1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    eval_fraction: float = 0.05
    eval_every: int = 100
    eval_batches: int = 20            # at most this many micro-batches of held-out data per evaluation
    save_every: int = 500
    keep: int = 2                     # checkpoints kept (the oldest complete ones go first)
    resume: bool | str = False        # True: the latest checkpoint in `out`; a path: that checkpoint
    budget: str = "24GiB"             # GPU budget
    host: str | None = None
    ssd: str | None = None
    ssd_dir: str | None = None
    activations: str = "auto"
    resident: bool | None = None      # groups kept on the GPU (compile's resident=): None chooses on a GPU
    dtype: str | None = None          # default bf16 on CUDA, fp32 on the CPU
    device: str | None = None         # default cuda when present
    seed: int = 0
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    tensorboard: bool = True
    progress: bool = True


@dataclass
class TrainResult:
    steps: int                                   # updates done, counted across resumes
    losses: list[float] = field(default_factory=list)       # training loss of every update of this run
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    checkpoint: Path | None = None               # the last checkpoint written or resumed from
    resumed_from: Path | None = None
    stopped_by: int | None = None                # the signal that stopped the run early, if any
    save_seconds: list[float] = field(default_factory=list)
    checkpoint_bytes: int = 0
    startup_seconds: float = 0.0                 # from the start of the run to the first update's start


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """The LR multiplier of update ``s``: linear from 1/(warmup+1) to 1 over ``warmup`` updates, then a cosine
    down to ``min_ratio`` at ``total``."""
    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW param groups: weight decay on matrices, none on vectors (norm weights, biases); trainable only."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0}]


def trained_tokens(labels: torch.Tensor) -> int:
    """Positions the causal loss counts: labels are shifted inside the model, so position 0 predicts nothing."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class _Stop:
    """SIGTERM/SIGINT ask the loop to save and stop after the update under way; a second one interrupts."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:      # not the main thread: the caller handles signals
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("ratel train: %s received: saving a checkpoint after this update, then stopping (again to "
                    "interrupt without saving)", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class _NoMetrics:
    """Ranks other than 0 log nothing."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _Metrics:
    """One JSON line per record in ``out/metrics.jsonl``, and TensorBoard scalars when it is installed."""

    def __init__(self, out: Path, resume_step: int | None, tensorboard: bool):
        self.path = out / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Records of updates after the checkpoint belong to a run that did not get to save them.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")
        self.board = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.board = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step)
            except ImportError:
                log.info("ratel train: tensorboard is not installed; metrics go to %s only", self.path)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.board.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


def _tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The tokenizer's files, to travel inside every checkpoint so that it loads as a whole."""
    if not isinstance(tokenizer, HFTokenizer):
        return {}
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.hf.save_pretrained(folder)
        return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    found = []
    for folder in out.glob(CHECKPOINT_PREFIX + "*"):
        suffix = folder.name.removeprefix(CHECKPOINT_PREFIX)
        if suffix.isdigit() and folder.is_dir():
            found.append((int(suffix), folder))
    return sorted(found)


def _prune(out: Path, keep: int) -> None:
    for _, folder in _checkpoints(out)[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)


def _resume_path(config: TrainConfig, out: Path) -> Path | None:
    if config.resume is False or config.resume is None:
        earlier = _checkpoints(out)
        if earlier:
            # A fresh run would mix its checkpoints and metrics with the earlier run's, and replace some.
            raise RatelError(f"{out} holds checkpoints of an earlier run ({earlier[-1][1].name} the latest): pass "
                             "--resume to continue it, or another --out to start afresh")
        return None
    if config.resume is True or config.resume == "latest":
        found = latest(out)
        if found is None:
            raise RatelError(f"--resume: no complete checkpoint in {out} (folders {CHECKPOINT_PREFIX}N written by "
                             "an earlier run with the same --out); drop --resume to start afresh")
        return resolve(found)
    return resolve(config.resume)


def _check_vocabulary(tokenizer, model: torch.nn.Module, where: str) -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    needed = getattr(tokenizer, "vocab_size", None)
    if vocab is not None and needed is not None and needed > vocab:
        raise RatelError(f"{where}: the tokenizer has {needed} tokens, the model's embedding only {vocab}: use a "
                         "model folder with its own tokenizer, or a config with vocab_size >= " + str(needed))


def build(config: TrainConfig) -> tuple[torch.nn.Module, Any, str | None, ModelSpec]:
    """The model on the meta device, its tokenizer, and the folder of weights to load (None: random init)."""
    spec = resolve_model(config.model)
    device = _device(config)
    dtype = parse_dtype(config.dtype) if config.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = build_model(spec, dtype, device="meta")
    folder = Path(config.model)
    weights = str(folder) if folder.is_dir() and any(folder.glob("*.safetensors")) else None
    tokenizer = load_tokenizer(folder if folder.is_dir() else None)
    return model, tokenizer, weights, spec


def _device(config: TrainConfig) -> torch.device:
    if config.device:
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train(config: TrainConfig, say: Callable[[str], None] = print,
          on_update: Callable[[dict], None] | None = None) -> TrainResult:
    """Run ``config`` (see the module docstring). ``say`` prints the run's few lines; ``on_update`` gets every
    update's metrics record (step, loss, lr, grad_norm, eval_loss, ...)."""
    started = time.perf_counter()
    ranks = Ranks.of_environment()
    rank, world = (ranks.rank, ranks.world) if ranks is not None else (0, 1)
    if rank != 0:
        say = _quiet
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, weights, spec = build(config)
    _check_vocabulary(tokenizer, model, config.model)
    device = _device(config)
    resume = _resume_path(config, out)

    examples = load_examples(config.data, text_field=config.text_field, prompt_field=config.prompt_field,
                             completion_field=config.completion_field)
    train_set, held_out = split(pack(examples, tokenizer, config.seq), config.eval_fraction, seed=config.seed)
    batches = Batches(train_set, config.batch * world, seed=config.seed)   # the global micro-batches
    per_epoch = max(1, batches.batches_per_epoch // config.accumulate)
    total = config.steps if config.steps is not None else max(1, math.ceil(config.epochs * per_epoch))
    warmup = int(config.warmup if config.warmup >= 1 else round(config.warmup * total))

    torch.manual_seed(config.seed)      # the initialisation of a model with no weights
    optimizer = torch.optim.AdamW(decay_groups(model, config.weight_decay), lr=config.lr, betas=config.betas,
                                  eps=config.eps)
    ids, labels = batches.packed.input_ids[: config.batch], batches.packed.labels[: config.batch]
    engine = ratel.compile(model, Budget(gpu=config.budget, host=config.host, ssd=config.ssd, ssd_dir=config.ssd_dir),
                           optimizer=optimizer, example_inputs=(ids,), example_kwargs={"labels": labels},
                           device=device, weights=None if resume else weights, accumulate=config.accumulate,
                           max_grad_norm=config.max_grad_norm, activations=config.activations,
                           progress=config.progress, resume=resume, resident=config.resident)
    scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, warmup_cosine(warmup, total, config.min_lr_ratio))
    result = TrainResult(steps=engine.global_step, resumed_from=resume)
    if resume is not None:
        try:
            state = engine.resumed.state or {}
            if "data" not in state:
                raise RatelError(f"{resume}: not a checkpoint of `ratel train` (no data position in its state); "
                                 "continue it with your own loop and ratel.compile(..., resume=)")
            engine.restore_scheduler(scheduler)
            _check_global_batch(state, config.batch * world, resume)
            batches.load_state_dict(state["data"])
        except BaseException:
            engine.close()      # its swap files and pinned memory go with it
            raise
        result.checkpoint = resume
        say(f"ratel train: resumed from {resume} at update {engine.global_step}")

    n_params = sum(p.numel() for p in model.parameters())
    flops = model_flops(n_params, spec.layers, spec.hidden, config.batch * world, config.seq) * config.accumulate
    plan = engine.plan
    on_gpu = plan.placement.gpu_groups
    say(f"ratel train: {n_params / 1e6:,.1f}M parameters, {len(train_set)} rows of {config.seq} tokens "
        f"({train_set.tokens:,} trained tokens), {len(held_out) if held_out else 0} held out; {total} updates of "
        f"{config.batch} x {config.accumulate} rows on {device}"
        + (f" x {world} ranks" if world > 1 else "") + f"; GPU peak {format_bytes(plan.memory.gpu_peak)} of "
        f"{format_bytes(plan.budget_gpu)}, host {format_bytes(plan.memory.host_total)}"
        + (f", SSD {format_bytes(plan.memory.ssd_total)}" if plan.memory.ssd_total else "")
        + (f"; {len(on_gpu)} of {len(plan.groups)} parameter groups kept on the GPU ({', '.join(on_gpu)})"
           if on_gpu else ""))

    extra_files = _tokenizer_files(tokenizer)
    metrics = (_Metrics(out, engine.global_step if resume is not None else None, config.tensorboard) if rank == 0
               else _NoMetrics())

    def save() -> None:
        folder = out / f"{CHECKPOINT_PREFIX}{engine.global_step}"
        begin = time.perf_counter()
        engine.save(folder, scheduler=scheduler, extra_files=extra_files,   # with ranks: all call it, rank 0 writes
                    state={"data": batches.state_dict(), "config": dataclasses.asdict(config),
                           "global_batch": config.batch * world})
        seconds = time.perf_counter() - begin
        result.checkpoint = folder
        if rank != 0:
            return
        size = sum(f.stat().st_size for f in folder.iterdir())
        result.checkpoint, result.checkpoint_bytes = folder, size
        result.save_seconds.append(seconds)
        metrics.write({"step": engine.global_step, "checkpoint_seconds": seconds, "checkpoint_bytes": size})
        _prune(out, config.keep)
        log.info("ratel train: saved %s (%s in %.1f s)", folder, format_bytes(size), seconds)

    def evaluate() -> float | None:
        # Evaluation is a program of its own (no backward), so a held-out set smaller than a batch still counts.
        pairs = (eval_batches(held_out, min(config.batch, len(held_out)))[: config.eval_batches]
                 if held_out is not None else [])
        if not pairs:
            return None
        engine.eval()
        total_loss, count = 0.0, 0
        with torch.no_grad():
            for e_ids, e_labels in pairs:
                n = trained_tokens(e_labels)
                if n:
                    total_loss += engine(e_ids, labels=e_labels).loss.item() * n
                    count += n
        engine.train()
        return total_loss / count if count else None

    bar = tqdm(total=total, initial=engine.global_step, desc="ratel train", unit="update",
               disable=not config.progress or rank != 0, dynamic_ncols=True)
    try:
        with _Stop() as stop:
            first = True
            stopping = False
            while engine.global_step < total and not stopping:
                if first:
                    result.startup_seconds = time.perf_counter() - started
                    metrics.write({"step": engine.global_step, "startup_seconds": result.startup_seconds,
                                   "resumed": resume is not None, "gpu_peak_planned": plan.memory.gpu_peak,
                                   "host_bytes": plan.memory.host_total, "ssd_bytes": plan.memory.ssd_total})
                    first = False
                begin = time.perf_counter()
                micro = [next(batches) for _ in range(config.accumulate)]
                cycle = sum(trained_tokens(m_labels) for _, m_labels in micro)   # of all ranks' rows
                micro = [(m_ids[rank * config.batch:(rank + 1) * config.batch],
                          m_labels[rank * config.batch:(rank + 1) * config.batch]) for m_ids, m_labels in micro]
                counts = [trained_tokens(m_labels) for _, m_labels in micro]
                loss_sum = 0.0
                for (m_ids, m_labels), n in zip(micro, counts):
                    if n == 0:
                        if ranks is None:
                            continue    # a micro-batch with no trained position adds nothing (and its loss is 0/0)
                        # Every rank runs as many backward passes: this one adds a zero gradient.
                        m_labels = _one_trained_position(m_labels)
                    loss = engine(m_ids, labels=m_labels).loss
                    # The mean over every trained token of the update, as one batch of all micro-batches gives
                    # (the ranks' gradients are averaged, hence the factor world).
                    engine.backward(loss * (n * world / cycle))
                    loss_sum += loss.item() * n
                if ranks is not None:
                    loss_sum = _sum_over_ranks(loss_sum, ranks)
                lr = engine.optimizer.param_groups[0]["lr"]
                engine.step()
                scheduler.step()
                seconds = time.perf_counter() - begin
                value = loss_sum / cycle if cycle else float("nan")
                result.losses.append(value)
                record = {"step": engine.global_step, "loss": value, "lr": lr, "seconds": seconds,
                          "tokens_per_s": config.accumulate * config.batch * world * config.seq / seconds,
                          "tflops": flops / seconds / 1e12, "epoch": batches.epoch}
                if engine.grad_norm is not None:
                    record["grad_norm"] = engine.grad_norm
                if config.eval_every and engine.global_step % config.eval_every == 0:
                    eval_loss = evaluate()
                    if eval_loss is not None:
                        record["eval_loss"] = eval_loss
                        result.eval_losses.append((engine.global_step, eval_loss))
                metrics.write(record)
                if on_update is not None:
                    on_update(record)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                                tflops=f"{record['tflops']:.3g}")
                stopping = _agreed_stop(stop, ranks)
                if (config.save_every and engine.global_step % config.save_every == 0) or stopping:
                    save()
            if stop.signal is not None:
                result.stopped_by = stop.signal
            elif result.checkpoint is None or result.checkpoint.name != f"{CHECKPOINT_PREFIX}{engine.global_step}":
                save()
    finally:
        bar.close()
        metrics.close()
        result.steps = engine.global_step
        engine.close()
    if result.stopped_by is not None:
        say(f"ratel train: stopped by {signal.Signals(result.stopped_by).name} after update {result.steps}; "
            f"checkpoint {result.checkpoint}; continue with --resume")
    else:
        say(f"ratel train: {result.steps} updates done; the model is in {result.checkpoint} "
            "(AutoModelForCausalLM.from_pretrained loads it)")
    return result


def _quiet(line: str) -> None:
    """What ranks other than 0 print: nothing."""


def _agreed_stop(stop: _Stop, ranks: Ranks | None) -> bool:
    """Whether to stop now: a signal to any rank stops every rank after the same update."""
    asked = stop.signal is not None
    if ranks is None:
        return asked
    flag = torch.tensor([stop.signal or 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ranks.group)
    if int(flag) and stop.signal is None:
        stop.signal = int(flag)
    return bool(int(flag))


def _sum_over_ranks(value: float, ranks: Ranks) -> float:
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total, group=ranks.group)     # gloo: a host value, whatever the default group's backend
    return float(total)


def _one_trained_position(labels: torch.Tensor) -> torch.Tensor:
    """Labels with one trained position, for a rank whose share of a micro-batch has none: its loss is then
    finite and, weighted by 0, adds a zero gradient (a loss over no token is 0/0)."""
    labels = labels.clone()
    labels[0, -1] = 0
    return labels


def _check_global_batch(state: dict, global_batch: int, resume: Path) -> None:
    saved = state.get("global_batch", state.get("config", {}).get("batch"))
    if saved is not None and saved != global_batch:
        raise RatelError(f"{resume} was trained with {saved} rows per micro-batch over all ranks, this run has "
                         f"{global_batch} (--batch x ranks): pass --batch so that --batch x ranks = {saved} to "
                         "continue the same data order")


def add_arguments(p) -> None:
    """The ``train`` subcommand's flags: TrainConfig's fields."""
    d = TrainConfig(model="", data="")
    p.add_argument("--model", required=True, help="Hugging Face model folder (config.json, safetensors weights: a "
                   "config alone gives a random init; its tokenizer when present), a config.json, or a preset")
    p.add_argument("--data", required=True, help=".jsonl ('text', or 'prompt'+'completion' with the loss on the "
                   "completion), .txt (documents split by blank lines), or a folder/.json/.csv/.parquet that "
                   "`datasets` reads locally")
    p.add_argument("--out", default=d.out, help=f"folder for checkpoints and metrics (default {d.out})")
    p.add_argument("--seq", type=int, default=d.seq, help=f"tokens per row; examples are packed (default {d.seq})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"rows per micro-batch (default {d.batch})")
    p.add_argument("--accumulate", type=int, default=d.accumulate,
                   help=f"micro-batches per update (default {d.accumulate})")
    p.add_argument("--steps", type=int, default=None, help="updates (default: --epochs over the data)")
    p.add_argument("--epochs", type=float, default=d.epochs, help=f"passes over the data (default {d.epochs})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                   help=f"the cosine ends at lr x this (default {d.min_lr_ratio})")
    p.add_argument("--warmup", type=float, default=d.warmup,
                   help=f"warm-up updates, or a share of all updates when below 1 (default {d.warmup})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"AdamW weight decay on matrices; none on norms and biases (default {d.weight_decay})")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help=f"clip the global gradient norm; 0 for none (default {d.max_grad_norm})")
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction,
                   help=f"share of rows held out for the evaluation loss (default {d.eval_fraction})")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help=f"updates between evaluations; 0 for none (default {d.eval_every})")
    p.add_argument("--eval-batches", type=int, default=d.eval_batches,
                   help=f"held-out micro-batches per evaluation at most (default {d.eval_batches})")
    p.add_argument("--save-every", type=int, default=d.save_every,
                   help=f"updates between checkpoints; 0: only at the end (default {d.save_every})")
    p.add_argument("--keep", type=int, default=d.keep, help=f"checkpoints kept (default {d.keep})")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the latest complete checkpoint in --out, or from the folder given")
    p.add_argument("--budget", default=d.budget, help=f"GPU memory budget (default {d.budget})")
    p.add_argument("--host", help="host memory budget (default 90%% of this machine's)")
    p.add_argument("--ssd", help="SSD budget")
    p.add_argument("--ssd-dir", help="SSD folder(s) for what does not fit in host memory")
    p.add_argument("--activations", default=d.activations, help=f"activation policy (default {d.activations})")
    p.add_argument("--no-resident", dest="resident", action="store_const", const=False, default=d.resident,
                   help="stream every layer: keep no parameter group on the GPU (the smallest GPU peak)")
    p.add_argument("--dtype", help="compute dtype: bf16 (default on CUDA), fp16, fp32 (default on the CPU)")
    p.add_argument("--device", help="cuda or cpu (default cuda when present)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"data order and initialisation (default {d.seed})")
    p.add_argument("--text-field", default=d.text_field, help=f"JSON field of a document (default {d.text_field})")
    p.add_argument("--prompt-field", default=d.prompt_field, help=f"JSON field of a prompt (default {d.prompt_field})")
    p.add_argument("--completion-field", default=d.completion_field,
                   help=f"JSON field of a completion (default {d.completion_field})")
    p.add_argument("--no-tensorboard", action="store_true", help="metrics to metrics.jsonl only")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if hasattr(args, f.name) and f.name not in ("resume", "tensorboard", "progress", "max_grad_norm")}
    return TrainConfig(**values, resume=args.resume or False, tensorboard=not args.no_tensorboard,
                       progress=not args.no_progress,
                       max_grad_norm=args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None)


__all__ = ["TrainConfig", "TrainResult", "add_arguments", "build", "config_from_args", "decay_groups", "train",
           "trained_tokens", "warmup_cosine"]
