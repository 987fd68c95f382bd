"""Training data for ``python -m ratel train``: load examples, tokenize, pack, split, batch.

The pipeline is ``load_examples`` -> ``pack`` -> ``split`` -> ``Batches`` / ``eval_batches``:

* An :class:`Example` is either a whole document (``text``, every token trained on) or a
  prompt/completion pair (loss only on the completion). ``load_examples`` reads JSON lines and plain
  text itself; folders, ``.json``, ``.csv``, ``.parquet`` and ``.arrow`` go through the optional
  ``datasets`` library, locally.
* ``load_tokenizer`` uses the model folder's own tokenizer when it has one, else :class:`ByteTokenizer`
  (UTF-8 bytes are ids 0..255, eos is 256). Nothing loaded here ever runs code from the user's files.

Conventions of a :class:`Packed` set, which the trainer relies on:

* ``input_ids`` and ``labels`` are int64 ``[n_sequences, seq_len]``; ``labels`` equals ``input_ids``
  where the position is trained on and is ``-100`` where it is masked (prompt tokens, padding).
* Labels are **not shifted**: Hugging Face causal LMs shift inside the model, so the label at position
  ``t`` is predicted from the tokens before ``t`` (and the label at position 0 of a row is never a target).
* An eos token follows every example and is trained on (label = eos), for a document and for a
  completion alike, so the model learns where an example ends.
* Examples are packed back to back across example boundaries into one token stream, which is cut into
  rows of ``seq_len``: no padding except in the last row, whose padding is eos with label ``-100``. A row
  with no trained position is dropped, since it would only add a ``0/0`` to the loss.
* ``tokens`` counts the label positions that are not ``-100``.
"""
from __future__ import annotations

import json
import os
import re
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import torch

from ratel.errors import RatelError

IGNORE_INDEX = -100   # the label value Hugging Face losses skip

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_JSON_LINES_SUFFIXES = (".jsonl", ".json-lines", ".jsonlines", ".ndjson")
_DATASETS_BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
_ENCODE_CHUNK = 1024   # texts per call to a Hugging Face tokenizer: fast in Rust, bounded in memory


class Tokenizer(Protocol):
    """What ``pack`` needs from a tokenizer: ids without special tokens added, and an eos id."""

    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...


# ----------------------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """Fallback when the model folder has no tokenizer: UTF-8 bytes 0..255 are token ids, eos_token_id = 256."""

    vocab_size: int = 257
    eos_token_id: int = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        # eos, padding and any id past the byte range carry no text
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face tokenizer behind the small interface Ratel uses.

    ``encode`` adds no special tokens (``pack`` adds eos itself, and a BOS in the middle of a packed row
    would be wrong); ``hf`` is the wrapped tokenizer, e.g. to save it beside a checkpoint.
    """

    def __init__(self, hf_tokenizer: Any, source: str = "the tokenizer"):
        self.hf = hf_tokenizer
        self.eos_token_id = _choose_eos_id(hf_tokenizer, source)
        self.vocab_size = len(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        # verbose=False: packing cuts long texts into rows, so "longer than model_max_length" is no problem here
        return list(self.hf.encode(text, add_special_tokens=False, verbose=False))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        ids: list[list[int]] = []
        for start in range(0, len(texts), _ENCODE_CHUNK):
            chunk = texts[start:start + _ENCODE_CHUNK]
            ids.extend(self.hf(chunk, add_special_tokens=False, verbose=False)["input_ids"])
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.hf).__name__}, vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id})"


def _choose_eos_id(hf_tokenizer: Any, source: str) -> int:
    # Some tokenizers (BERT-style) have no eos but a sep or pad token that can end an example as well.
    for attribute in ("eos_token_id", "sep_token_id", "pad_token_id"):
        token_id = getattr(hf_tokenizer, attribute, None)
        if isinstance(token_id, int):
            return token_id
    raise RatelError(
        f"{source} has no eos token (nor a sep or pad token), and Ratel ends every example with one: "
        f"add \"eos_token\" to its tokenizer_config.json (a token in its vocabulary, e.g. \"</s>\"), "
        f"or remove the tokenizer files so Ratel uses its byte-level tokenizer")


def load_tokenizer(model_dir: str | os.PathLike | None) -> ByteTokenizer | HFTokenizer:
    """The model folder's own tokenizer, or :class:`ByteTokenizer` when it has none (or ``model_dir`` is None)."""
    if model_dir is None:
        return ByteTokenizer()
    folder = Path(model_dir)
    if not folder.is_dir():
        raise RatelError(f"model folder {str(folder)!r} does not exist or is not a folder: pass the folder "
                         f"that holds the model's config.json and weights")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return ByteTokenizer()
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise RatelError(f"{folder} has tokenizer files, and reading them needs transformers: "
                         f"pip install 'transformers>=5.0'") from exc
    try:
        # Local files only: training never downloads; no remote code: nothing a user loads executes code.
        hf_tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    except Exception as exc:
        raise RatelError(
            f"could not load the tokenizer in {folder}: {type(exc).__name__}: {exc}\n"
            f"Ratel loads tokenizers without running code from the folder: make sure its tokenizer files "
            f"(tokenizer.json, tokenizer_config.json, ...) are complete and need no custom code, "
            f"or remove them to use Ratel's byte-level tokenizer") from exc
    return HFTokenizer(hf_tokenizer, source=f"the tokenizer in {folder}")


def _as_tokenizer(tokenizer: Any) -> Any:
    """Wrap a bare transformers tokenizer, whose ``encode`` would add special tokens."""
    transformers = sys.modules.get("transformers")   # a transformers tokenizer means it is imported
    if transformers is not None and isinstance(tokenizer, transformers.PreTrainedTokenizerBase):
        return HFTokenizer(tokenizer)
    has_encode = callable(getattr(tokenizer, "encode", None))
    if not has_encode or not isinstance(getattr(tokenizer, "eos_token_id", None), int):
        raise RatelError(f"{tokenizer!r} is not a tokenizer Ratel can use: it needs .encode(text) -> list[int] "
                         f"and an integer .eos_token_id; use ratel.data.load_tokenizer(model_dir)")
    return tokenizer


# ------------------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    """A whole document (``text``, all of it trained on) or a ``prompt``/``completion`` pair.

    In a pair only the completion is trained on; the prompt is context with label -100.
    """

    text: str | None = None
    prompt: str | None = None
    completion: str | None = None

    def __post_init__(self) -> None:
        for name in ("text", "prompt", "completion"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise RatelError(f"Example.{name} must be a string, not {type(value).__name__}")
        is_document = self.text is not None and self.prompt is None and self.completion is None
        is_pair = self.text is None and self.prompt is not None and self.completion is not None
        if not (is_document or is_pair):
            raise RatelError("an Example is either Example(text=...) or Example(prompt=..., completion=...), "
                             f"got text={self.text!r:.40}, prompt={self.prompt!r:.40}, "
                             f"completion={self.completion!r:.40}")


def load_examples(path: str | os.PathLike, *, text_field: str = "text", prompt_field: str = "prompt",
                  completion_field: str = "completion") -> list[Example]:
    """Read examples from JSON lines, plain text, or (with ``datasets``) a folder, .json, .csv, .parquet, .arrow.

    A record with ``text_field`` is a document; one with ``prompt_field`` and ``completion_field`` is a
    pair (``text_field`` wins when a record has both). In plain text, documents are separated by blank lines.
    """
    source = Path(path)
    if not source.exists():
        raise RatelError(f"training data {str(source)!r} does not exist: pass a .jsonl or .txt file "
                         f"(or a folder, .json, .csv, .parquet, .arrow with `datasets` installed)")
    fields = (text_field, prompt_field, completion_field)
    suffix = source.suffix.lower()
    if source.is_dir() or suffix in _DATASETS_BUILDERS:
        examples = _load_with_datasets(source, fields)
    elif suffix in _JSON_LINES_SUFFIXES:
        examples = _load_json_lines(source, fields)
    else:
        examples = _load_plain_text(source)
    if not examples:
        raise RatelError(f"{source} holds no examples: it is empty (or only blank lines); "
                         f"check that it is the file you meant")
    return examples


def _example_from_record(record: Any, fields: tuple[str, str, str], where: str) -> Example:
    text_field, prompt_field, completion_field = fields
    if not isinstance(record, dict):
        raise RatelError(f"{where} is a JSON {type(record).__name__}, not an object: write one object per line, "
                         f'e.g. {{"{text_field}": "..."}} or {{"{prompt_field}": "...", "{completion_field}": "..."}}')

    def field(name: str) -> str | None:
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            raise RatelError(f"{where}: field {name!r} is a {type(value).__name__}, it must be a string")
        return value

    # A missing field and a null one are alike: table formats fill the columns a row lacks with null.
    text = field(text_field)
    if text is not None:
        return Example(text=text)
    prompt, completion = field(prompt_field), field(completion_field)
    if prompt is not None and completion is not None:
        return Example(prompt=prompt, completion=completion)
    found = sorted(name for name, value in record.items() if value is not None)
    raise RatelError(
        f"{where} has fields {found}, but an example needs {text_field!r}, or {prompt_field!r} and "
        f"{completion_field!r}: rename the fields in the data, or pass text_field= (or prompt_field= and "
        f"completion_field=) naming the ones it has")


def _load_json_lines(source: Path, fields: tuple[str, str, str]) -> list[Example]:
    examples = []
    for line_number, line in enumerate(_text_lines(source), start=1):
        if not line.strip():
            continue
        where = f"{source} line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RatelError(f"{where} is not JSON ({exc.msg} at column {exc.colno}): "
                             f"each non-blank line must be one JSON object; the line starts {line[:60]!r}") from exc
        examples.append(_example_from_record(record, fields, where))
    return examples


def _load_plain_text(source: Path) -> list[Example]:
    content = "".join(_text_lines(source))
    documents = []
    # One or more blank lines (possibly holding spaces) end a document; indentation after them is kept.
    for chunk in re.split(r"\n\s*\n", content):
        if chunk.strip():
            documents.append(Example(text=chunk.lstrip("\n").rstrip()))
    return documents


def _text_lines(source: Path) -> Iterator[str]:
    # utf-8-sig: editors on Windows often start UTF-8 files with a byte order mark
    with open(source, encoding="utf-8-sig") as handle:
        try:
            yield from handle
        except UnicodeDecodeError as exc:
            raise _not_utf8(source, exc) from exc


def _not_utf8(source: Path, exc: UnicodeDecodeError) -> RatelError:
    return RatelError(f"{source} is not UTF-8 text (byte {exc.start}: {exc.reason}): "
                      f"convert it to UTF-8, e.g. iconv -f LATIN1 -t UTF-8")


def _load_with_datasets(source: Path, fields: tuple[str, str, str]) -> list[Example]:
    try:
        import datasets
    except ImportError as exc:
        raise RatelError(f"reading {source} ({'a folder' if source.is_dir() else source.suffix}) needs the "
                         f"`datasets` library: pip install datasets, or convert it to JSON lines "
                         f"(.jsonl, one object per line)") from exc
    try:
        if source.is_dir():
            loaded = _load_dataset_folder(datasets, source)
        else:
            loaded = datasets.load_dataset(_DATASETS_BUILDERS[source.suffix.lower()], data_files=str(source))
    except RatelError:
        raise
    except Exception as exc:
        raise RatelError(f"`datasets` could not read {source}: {type(exc).__name__}: {exc}\n"
                         f"convert it to JSON lines (.jsonl, one object per line) if it is in another format") from exc
    table = _pick_split(loaded, source)
    return [_example_from_record(row, fields, f"{source} row {row_number}")
            for row_number, row in enumerate(table, start=1)]


def _load_dataset_folder(datasets: Any, folder: Path) -> Any:
    # A folder written by save_to_disk is read as it is; any other folder by the data files in it.
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        return datasets.load_from_disk(str(folder))
    scripts = sorted(p.name for p in folder.glob("*.py"))
    if scripts:
        raise RatelError(f"{folder} holds {scripts}: Ratel never runs dataset loading scripts; "
                         f"point it at the data files (.jsonl, .parquet, ...) instead")
    return datasets.load_dataset(str(folder))


def _pick_split(loaded: Any, source: Path) -> Any:
    if not hasattr(loaded, "keys"):   # already one split
        return loaded
    splits = list(loaded.keys())
    if "train" in splits:
        return loaded["train"]
    if len(splits) == 1:
        return loaded[splits[0]]
    raise RatelError(f"{source} has the splits {splits} and none is named 'train': "
                     f"keep only the training data there, or name its split 'train'")


# -------------------------------------------------------------------------------------------- packing


@dataclass(frozen=True, eq=False)   # eq=False: tensors have no single truth value to compare by
class Packed:
    """Fixed-length training rows; see the module docstring for the conventions."""

    input_ids: torch.Tensor   # int64 [n_sequences, seq_len]
    labels: torch.Tensor      # int64 [n_sequences, seq_len], -100 where masked
    tokens: int               # label positions != -100

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.shape != self.labels.shape:
            raise RatelError(f"Packed input_ids {tuple(self.input_ids.shape)} and labels {tuple(self.labels.shape)} "
                             f"must both be [n_sequences, seq_len]")
        if self.input_ids.dtype != torch.int64 or self.labels.dtype != torch.int64:
            raise RatelError(f"Packed tensors must be int64, got {self.input_ids.dtype} and {self.labels.dtype}")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]


def _trained_count(labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())


def _encode_all(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    if isinstance(tokenizer, HFTokenizer):   # one call per chunk lets the Rust tokenizer work in parallel
        return tokenizer.encode_batch(texts)
    return [tokenizer.encode(text) for text in texts]


def pack(examples: list[Example], tokenizer: Tokenizer, seq_len: int) -> Packed:
    """Tokenize ``examples``, end each with eos, and cut the stream into rows of ``seq_len`` with a loss mask."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise RatelError(f"seq_len={seq_len!r}: a row needs at least 2 tokens (one to predict from, one to predict); "
                         f"use e.g. seq_len=1024")
    if not examples:
        raise RatelError("no examples to pack: check the training data file")
    tokenizer = _as_tokenizer(tokenizer)
    eos = tokenizer.eos_token_id
    for position, example in enumerate(examples):
        if not isinstance(example, Example):
            raise RatelError(f"examples[{position}] is a {type(example).__name__}, not a ratel.data.Example")

    # Prompt and completion are tokenized apart so that the mask falls exactly on their boundary;
    # whitespace between them belongs in the data.
    documents = _encode_all(tokenizer, [e.text for e in examples if e.text is not None])
    prompts = _encode_all(tokenizer, [e.prompt for e in examples if e.text is None])
    completions = _encode_all(tokenizer, [e.completion for e in examples if e.text is None])

    # array("q") keeps the whole stream at 8 bytes a token, where a list of ints would take several times that.
    stream_ids, stream_labels = array("q"), array("q")
    next_document, next_pair = iter(documents), iter(zip(prompts, completions))
    try:
        for example in examples:
            if example.text is not None:
                trained = next(next_document)
            else:
                prompt_ids, trained = next(next_pair)
                stream_ids.extend(prompt_ids)
                stream_labels.extend([IGNORE_INDEX] * len(prompt_ids))
            stream_ids.extend(trained)
            stream_labels.extend(trained)
            stream_ids.append(eos)
            stream_labels.append(eos)
    except (TypeError, OverflowError) as exc:
        raise RatelError(f"{tokenizer!r}.encode did not return a list of token ids ({exc}): "
                         f"use ratel.data.load_tokenizer(model_dir)") from exc

    remainder = len(stream_ids) % seq_len
    if remainder:
        padding = seq_len - remainder
        stream_ids.extend([eos] * padding)
        stream_labels.extend([IGNORE_INDEX] * padding)
    input_ids = torch.frombuffer(stream_ids, dtype=torch.int64).clone().view(-1, seq_len)
    labels = torch.frombuffer(stream_labels, dtype=torch.int64).clone().view(-1, seq_len)
    keep = (labels != IGNORE_INDEX).any(dim=1)
    if not bool(keep.all()):
        input_ids, labels = input_ids[keep], labels[keep]
    return Packed(input_ids=input_ids, labels=labels, tokens=_trained_count(labels))


def _select_rows(packed: Packed, rows: torch.Tensor) -> Packed:
    labels = packed.labels[rows]
    return Packed(input_ids=packed.input_ids[rows], labels=labels, tokens=_trained_count(labels))


def split(packed: Packed, eval_fraction: float, seed: int = 0) -> tuple[Packed, Packed | None]:
    """Hold out ``round(n * eval_fraction)`` rows (at least one) chosen by a seeded permutation: ``(train, eval)``.

    Both parts keep the rows' original order. ``eval_fraction == 0`` returns ``(packed, None)``.
    """
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) or not 0 <= eval_fraction < 1:
        raise RatelError(f"eval_fraction={eval_fraction!r}: it must be at least 0 and below 1, e.g. 0.05 "
                         f"(0 for no evaluation)")
    if eval_fraction == 0:
        return packed, None
    rows = len(packed)
    if rows < 2:
        raise RatelError(f"the data packs into {rows} row of seq_len={packed.seq_len}, too few to hold some out "
                         f"for evaluation: set eval_fraction to 0, use a smaller seq_len, or add data")
    # At least one row to evaluate on, at least one to train on.
    held_out = min(max(1, round(rows * eval_fraction)), rows - 1)
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    eval_rows, _ = order[:held_out].sort()
    train_rows, _ = order[held_out:].sort()
    return _select_rows(packed, train_rows), _select_rows(packed, eval_rows)


# ------------------------------------------------------------------------------------------- batching


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise RatelError(f"batch_size={batch_size!r}: it must be a positive integer")


class Batches:
    """Micro-batches of a Packed set in a seeded shuffled order per epoch, resumable.

    Epoch ``e`` visits the rows in the permutation drawn from ``torch.Generator().manual_seed(seed + e)``
    (in order if not ``shuffle``), ``batch_size`` rows at a time; the rows beyond the last full batch are
    left out of that epoch, so every batch has one shape and the compiled program is reused. Iteration
    never ends: the trainer decides when to stop, e.g. ``while batches.epoch < epochs``.
    """

    def __init__(self, packed: Packed, batch_size: int, seed: int = 0, shuffle: bool = True):
        _check_batch_size(batch_size)
        rows = len(packed)
        if rows < batch_size:
            raise RatelError(f"the training data packs into {rows} row(s) of seq_len={packed.seq_len}, fewer than "
                             f"batch_size={batch_size}: use a batch size of at most {rows}, a smaller seq_len, "
                             f"or more data")
        self.packed = packed
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self._epoch = 0
        self._position = 0   # index of the next batch within the epoch
        self._order: torch.Tensor | None = None
        self._order_epoch = -1

    @property
    def batches_per_epoch(self) -> int:
        return len(self.packed) // self.batch_size

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from, i.e. the number of epochs completed."""
        return self._epoch

    def _epoch_order(self) -> torch.Tensor:
        if self._order_epoch != self._epoch:
            rows = len(self.packed)
            if self.shuffle:
                self._order = torch.randperm(rows, generator=torch.Generator().manual_seed(self.seed + self._epoch))
            else:
                self._order = torch.arange(rows)
            self._order_epoch = self._epoch
        assert self._order is not None
        return self._order

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = self._position * self.batch_size
        rows = self._epoch_order()[start:start + self.batch_size]
        batch = (self.packed.input_ids[rows], self.packed.labels[rows])
        self._position += 1
        # Move on eagerly so that a state taken at an epoch's end already reads as the next epoch.
        if self._position == self.batches_per_epoch:
            self._epoch += 1
            self._position = 0
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "position": self._position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken from a Batches over the same data, batch size and seed."""
        def is_count(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not isinstance(state, dict) or not all(is_count(state.get(key)) for key in ("epoch", "position", "seed")):
            raise RatelError(f"{state!r} is not a Batches state: it needs integer 'epoch', 'position' and 'seed' "
                             f"(as Batches.state_dict() returns)")
        if state["seed"] != self.seed:
            raise RatelError(f"the saved data order used seed={state['seed']} and this run seed={self.seed}: "
                             f"resume with seed={state['seed']} to continue the same order")
        if state["epoch"] < 0 or not 0 <= state["position"] < self.batches_per_epoch:
            raise RatelError(f"the saved data position (epoch {state['epoch']}, batch {state['position']}) is outside "
                             f"this data's {self.batches_per_epoch} batches per epoch: resume with the same data, "
                             f"seq_len and batch size as the saved run")
        self._epoch = state["epoch"]
        self._position = state["position"]

    def __repr__(self) -> str:
        return (f"Batches(rows={len(self.packed)}, batch_size={self.batch_size}, seed={self.seed}, "
                f"shuffle={self.shuffle}, epoch={self._epoch}, position={self._position})")


def eval_batches(packed: Packed, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All rows in order, in full batches of ``batch_size``; ``[]`` when there are fewer rows than that.

    A partial last batch is left out to keep one shape (and so one compiled program).
    """
    _check_batch_size(batch_size)
    full = len(packed) // batch_size * batch_size
    return [(packed.input_ids[start:start + batch_size], packed.labels[start:start + batch_size])
            for start in range(0, full, batch_size)]
