"""Training data: examples load from the user's files, pack into masked fixed-length rows, split and batch resumably."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from ratel.data import (ByteTokenizer, Batches, Example, HFTokenizer, Packed, eval_batches, load_examples,
                        load_tokenizer, pack, split)
from ratel.errors import RatelError

WORDS = ["the", "cat", "sat", "on", "mat", "question", "answer", "is", "a", "dog"]


def build_word_tokenizer(*, bos_template: bool = True):
    """A WordLevel tokenizer over WORDS; with bos_template its encode(add_special_tokens=True) prepends <s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["[UNK]", "<s>", "</s>", "<pad>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos_template:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                 special_tokens=[("<s>", vocab["<s>"])])
    return tokenizer, vocab


def save_hf_tokenizer(folder, *, eos: str | None = "</s>", pad: str | None = None):
    from transformers import PreTrainedTokenizerFast

    tokenizer, vocab = build_word_tokenizer()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, pad_token=pad).save_pretrained(folder)
    return tokenizer, vocab


@pytest.fixture(scope="module")
def word_tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("word_tokenizer")
    tokenizer, vocab = save_hf_tokenizer(folder)
    return folder, tokenizer, vocab


def write_jsonl(path, records, blank_lines_after=()):
    lines = []
    for i, record in enumerate(records):
        lines.append(record if isinstance(record, str) else json.dumps(record))
        if i in blank_lines_after:
            lines.append("   ")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def rows_packed(n_rows: int, seq_len: int = 3) -> Packed:
    """Row r holds the token r everywhere, so a batch tells which rows it took."""
    ids = torch.arange(n_rows, dtype=torch.int64)[:, None].expand(n_rows, seq_len).contiguous()
    return Packed(input_ids=ids, labels=ids.clone(), tokens=n_rows * seq_len)


def row_ids(batch) -> list[int]:
    return batch[0][:, 0].tolist()


# ------------------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trips_non_ascii_text_and_has_eos_256():
    tokenizer = ByteTokenizer()
    text = "Grüße, 東京! 🦡"
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == 256 and tokenizer.vocab_size == 257
    assert tokenizer.decode(torch.tensor(ids + [256, 256])) == text   # eos and padding carry no text


def test_a_model_folder_without_tokenizer_files_gets_the_byte_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    with pytest.raises(RatelError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


def test_a_model_folder_tokenizer_encodes_like_it_without_special_tokens(word_tokenizer_dir):
    folder, tokenizer, vocab = word_tokenizer_dir
    loaded = load_tokenizer(folder)
    assert isinstance(loaded, HFTokenizer)
    text = "the cat sat on a mat"
    expected = tokenizer.encode(text, add_special_tokens=False).ids
    assert loaded.encode(text) == expected == [vocab[w] for w in text.split()]
    assert tokenizer.encode(text).ids[0] == vocab["<s>"]   # the template would add <s>; Ratel's encode must not
    assert loaded.eos_token_id == vocab["</s>"]
    assert loaded.vocab_size == len(vocab)
    assert loaded.decode(expected + [vocab["</s>"]]) == text


def test_a_tokenizer_without_eos_ends_examples_with_its_pad_token_or_is_refused(tmp_path):
    _, vocab = save_hf_tokenizer(tmp_path / "pad_only", eos=None, pad="<pad>")
    assert load_tokenizer(tmp_path / "pad_only").eos_token_id == vocab["<pad>"]
    save_hf_tokenizer(tmp_path / "none", eos=None, pad=None)
    with pytest.raises(RatelError, match="no eos token"):
        load_tokenizer(tmp_path / "none")


def test_a_broken_tokenizer_folder_is_a_ratel_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(RatelError, match="could not load the tokenizer"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------- loading


def test_jsonl_loads_documents_and_pairs_in_order_skipping_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"text": "first document"},
        {"prompt": "Q: 2+2?", "completion": " 4", "id": 7},
        {"text": "third", "prompt": "ignored"},
    ], blank_lines_after=(0, 1))
    assert load_examples(path) == [Example(text="first document"), Example(prompt="Q: 2+2?", completion=" 4"),
                                   Example(text="third")]


def test_jsonl_field_names_can_be_chosen_and_a_bom_is_tolerated(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("\ufeff" + json.dumps({"question": "why?", "answer": "because"}) + "\n", encoding="utf-8")
    assert load_examples(path, prompt_field="question", completion_field="answer") == [
        Example(prompt="why?", completion="because")]


def test_a_jsonl_line_that_is_not_json_is_named_by_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "", "{oops"])
    with pytest.raises(RatelError) as error:
        load_examples(path)
    assert "bad.jsonl line 3" in str(error.value) and "not JSON" in str(error.value)


def test_a_jsonl_line_without_the_fields_names_the_fields_it_has(tmp_path):
    path = write_jsonl(tmp_path / "other.jsonl", [{"text": "ok"}, {"question": "q", "answer": "a"}])
    with pytest.raises(RatelError) as error:
        load_examples(path)
    message = str(error.value)
    assert "line 2" in message and "'answer'" in message and "'question'" in message and "text_field=" in message
    only_prompt = write_jsonl(tmp_path / "half.jsonl", [{"prompt": "q"}])
    with pytest.raises(RatelError, match="line 1"):
        load_examples(only_prompt)
    not_string = write_jsonl(tmp_path / "number.jsonl", [{"text": 3}])
    with pytest.raises(RatelError, match="must be a string"):
        load_examples(not_string)


def test_plain_text_splits_into_documents_at_blank_lines(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("alpha\nstill alpha\n\n\n  \nbeta:\n    indented\n\ngamma\n", encoding="utf-8")
    assert [e.text for e in load_examples(path)] == ["alpha\nstill alpha", "beta:\n    indented", "gamma"]
    windows = tmp_path / "windows.md"
    windows.write_bytes(b"one\r\n\r\ntwo\r\n")
    assert [e.text for e in load_examples(windows)] == ["one", "two"]


def test_plain_text_without_a_blank_line_is_one_document(tmp_path):
    path = tmp_path / "book"
    path.write_text("line one\nline two\nline three\n", encoding="utf-8")
    assert load_examples(path) == [Example(text="line one\nline two\nline three")]


def test_a_missing_or_empty_data_file_is_a_ratel_error(tmp_path):
    with pytest.raises(RatelError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(RatelError, match="no examples"):
        load_examples(tmp_path / "empty.jsonl")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(RatelError, match="not UTF-8"):
        load_examples(tmp_path / "latin1.txt")


def test_datasets_formats_load_through_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    csv = tmp_path / "train.csv"
    csv.write_text("prompt,completion\nhello,world\nQ,A\n", encoding="utf-8")
    assert load_examples(csv) == [Example(prompt="hello", completion="world"), Example(prompt="Q", completion="A")]
    array_json = tmp_path / "train.json"
    array_json.write_text(json.dumps([{"text": "one"}, {"text": "two"}]), encoding="utf-8")
    assert [e.text for e in load_examples(array_json)] == ["one", "two"]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": ["x", "y"]}).save_to_disk(str(saved))
    assert [e.text for e in load_examples(saved, text_field="body")] == ["x", "y"]
    parquet_dir = tmp_path / "parquet"
    parquet_dir.mkdir()
    datasets.Dataset.from_dict({"text": ["p", None], "prompt": [None, "q"], "completion": [None, "c"]}).to_parquet(
        str(parquet_dir / "part-0.parquet"))
    assert load_examples(parquet_dir) == [Example(text="p"), Example(prompt="q", completion="c")]
    with pytest.raises(RatelError, match="row 1"):
        load_examples(csv, prompt_field="question")


def test_without_datasets_a_parquet_file_says_how_to_read_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)   # makes `import datasets` fail
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(RatelError) as error:
        load_examples(path)
    assert "pip install datasets" in str(error.value) and ".jsonl" in str(error.value)


def test_an_example_is_a_document_or_a_pair():
    for bad in (dict(), dict(prompt="p"), dict(text="t", prompt="p", completion="c"), dict(text=3)):
        with pytest.raises(RatelError):
            Example(**bad)


# ---------------------------------------------------------------------------------------------- packing


def stream_of(packed: Packed) -> tuple[list[int], list[int]]:
    return packed.input_ids.flatten().tolist(), packed.labels.flatten().tolist()


def test_pack_masks_exactly_the_prompt_tokens_and_trains_on_the_rest():
    tokenizer = ByteTokenizer()
    examples = [Example(prompt="Q: café?", completion=" ja"), Example(text="doc"), Example(prompt="P", completion="C")]
    packed = pack(examples, tokenizer, seq_len=16)   # 20 tokens: the prompts stay in rows that train
    ids, labels = stream_of(packed)
    masked = [i for i, label in zip(ids, labels) if label == -100]
    trained = [label for label in labels if label != -100]
    eos = tokenizer.eos_token_id
    assert tokenizer.decode(masked) == "Q: café?P"        # prompts (padding is eos, which decodes to nothing)
    assert tokenizer.decode(trained) == " jadocC"
    assert all(label == i for i, label in zip(ids, labels) if label != -100)   # unshifted: label t is token t
    expected_stream = (list("Q: café? ja".encode()) + [eos] + list(b"doc") + [eos] + list(b"PC") + [eos])
    assert ids[:len(expected_stream)] == expected_stream


def test_pack_ends_every_example_with_a_trained_eos():
    tokenizer = ByteTokenizer()
    packed = pack([Example(text="ab"), Example(prompt="c", completion="d"), Example(text="ef")], tokenizer, 4)
    ids, labels = stream_of(packed)
    eos_positions = [i for i, token in enumerate(ids) if token == 256]
    assert eos_positions[:3] == [2, 5, 8]                 # a b E c d E e f E, then padding
    assert [labels[i] for i in eos_positions] == [256, 256, 256, -100, -100, -100]


def test_pack_cuts_rows_of_seq_len_and_masks_the_last_rows_padding():
    tokenizer = ByteTokenizer()
    packed = pack([Example(text="abcdefg"), Example(prompt="xy", completion="z")], tokenizer, seq_len=5)
    # stream: abcdefg E x y z E = 12 tokens -> rows of 5, 5 and 2 + 3 padding
    assert packed.input_ids.shape == packed.labels.shape == (3, 5)
    assert packed.input_ids.dtype == packed.labels.dtype == torch.int64
    assert packed.input_ids[2].tolist() == [ord("z"), 256, 256, 256, 256]
    assert packed.labels[2].tolist() == [ord("z"), 256, -100, -100, -100]
    assert packed.tokens == 7 + 1 + 1 + 1 == int((packed.labels != -100).sum())


def test_pack_drops_rows_with_nothing_to_train_on():
    packed = pack([Example(prompt="0123456789", completion="x")], ByteTokenizer(), seq_len=4)
    # the first two rows are prompt only: no loss, so no row
    assert packed.input_ids.tolist() == [[ord("8"), ord("9"), ord("x"), 256]]
    assert packed.labels.tolist() == [[-100, -100, ord("x"), 256]] and packed.tokens == 2


def test_pack_uses_the_model_tokenizer_and_its_eos(word_tokenizer_dir):
    folder, _, vocab = word_tokenizer_dir
    tokenizer = load_tokenizer(folder)
    packed = pack([Example(prompt="question is", completion="a cat"), Example(text="the dog")], tokenizer, 8)
    eos = vocab["</s>"]
    words = ["question", "is", "a", "cat", "</s>", "the", "dog", "</s>"]
    assert packed.input_ids.tolist() == [[vocab[w] for w in words]]
    assert packed.labels.tolist() == [[-100, -100] + [vocab[w] for w in words[2:]]]
    assert packed.tokens == 6 and eos in packed.labels[0].tolist()


def test_pack_wraps_a_bare_transformers_tokenizer_so_no_bos_is_added(word_tokenizer_dir):
    from transformers import AutoTokenizer

    folder, _, vocab = word_tokenizer_dir
    bare = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert bare.encode("the cat")[0] == vocab["<s>"]
    packed = pack([Example(text="the cat")], bare, 3)
    assert packed.input_ids.tolist() == [[vocab["the"], vocab["cat"], vocab["</s>"]]]


def test_packed_labels_give_the_loss_of_a_hugging_face_causal_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    packed = pack([Example(prompt="ask", completion="reply"), Example(text="more text")], ByteTokenizer(), 8)
    with torch.no_grad():
        loss = model(input_ids=packed.input_ids, labels=packed.labels).loss
        logits = model(input_ids=packed.input_ids).logits
    # the model shifts: the label at t is predicted from the logits at t - 1
    targets = packed.labels[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 257), targets.reshape(-1),
                                                 ignore_index=-100)
    assert torch.allclose(loss, expected, atol=1e-5)


def test_pack_refuses_rows_shorter_than_two_tokens_and_non_examples():
    with pytest.raises(RatelError, match="seq_len"):
        pack([Example(text="a")], ByteTokenizer(), 1)
    with pytest.raises(RatelError, match="not a ratel.data.Example"):
        pack(["plain string"], ByteTokenizer(), 4)
    with pytest.raises(RatelError, match="no examples"):
        pack([], ByteTokenizer(), 4)


# ------------------------------------------------------------------------------------------------ split


def test_split_holds_out_the_fraction_disjointly_and_deterministically():
    packed = rows_packed(20)
    packed = Packed(input_ids=packed.input_ids, labels=packed.labels.index_fill(1, torch.tensor([0]), -100),
                    tokens=20 * 2)
    train, held_out = split(packed, 0.25, seed=3)
    train_rows, eval_rows = set(train.input_ids[:, 0].tolist()), set(held_out.input_ids[:, 0].tolist())
    assert len(held_out) == 5 and len(train) == 15
    assert not train_rows & eval_rows and train_rows | eval_rows == set(range(20))
    assert train.tokens == 15 * 2 and held_out.tokens == 5 * 2
    again_train, again_eval = split(packed, 0.25, seed=3)
    assert torch.equal(again_eval.input_ids, held_out.input_ids) and torch.equal(again_train.labels, train.labels)
    other_seeds = {tuple(split(packed, 0.25, seed=s)[1].input_ids[:, 0].tolist()) for s in range(4, 9)}
    assert other_seeds - {tuple(sorted(eval_rows))}


def test_split_holds_out_at_least_one_row_and_keeps_one_to_train():
    _, held_out = split(rows_packed(3), 0.01)
    assert len(held_out) == 1
    train, held_out = split(rows_packed(3), 0.99)
    assert len(train) == 1 and len(held_out) == 2
    packed = rows_packed(4)
    assert split(packed, 0.0) == (packed, None)


def test_split_refuses_bad_fractions_and_a_single_row():
    for fraction in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(RatelError, match="eval_fraction"):
            split(rows_packed(10), fraction)
    with pytest.raises(RatelError, match="too few"):
        split(rows_packed(1), 0.1)


# ---------------------------------------------------------------------------------------------- batches


def test_batches_have_one_shape_and_visit_each_row_once_per_epoch():
    batches = Batches(rows_packed(10, seq_len=3), batch_size=3, seed=0)
    assert batches.batches_per_epoch == 3
    epoch_rows = []
    for _ in range(batches.batches_per_epoch):
        input_ids, labels = next(batches)
        assert input_ids.shape == labels.shape == (3, 3) and input_ids.dtype == torch.int64
        epoch_rows += row_ids((input_ids, labels))
    assert len(set(epoch_rows)) == 9 and set(epoch_rows) <= set(range(10))   # the tail row sits this epoch out
    assert batches.epoch == 1


def test_batches_are_an_infinite_iterator_across_epochs():
    batches = Batches(rows_packed(4), batch_size=2, seed=1)
    taken = [row_ids(batch) for batch, _ in zip(batches, range(6))]
    assert len(taken) == 6 and batches.epoch == 3
    for epoch in range(3):
        assert sorted(taken[2 * epoch] + taken[2 * epoch + 1]) == [0, 1, 2, 3]


def test_batch_order_is_fixed_by_the_seed_and_changes_between_epochs():
    def order(seed: int) -> list[int]:
        batches = Batches(rows_packed(16), batch_size=4, seed=seed)
        return [row for _ in range(8) for row in row_ids(next(batches))]   # two epochs

    assert order(5) == order(5)
    assert order(5) != order(6)
    first_epoch, second_epoch = order(5)[:16], order(5)[16:]
    assert first_epoch != second_epoch and sorted(first_epoch) == sorted(second_epoch) == list(range(16))
    assert first_epoch != list(range(16))   # shuffled


def test_batches_without_shuffle_go_in_row_order():
    batches = Batches(rows_packed(5), batch_size=2, shuffle=False)
    assert [row_ids(next(batches)) for _ in range(3)] == [[0, 1], [2, 3], [0, 1]]


@pytest.mark.parametrize("taken", [0, 1, 3, 4, 6])
def test_batches_resume_exactly_from_a_saved_state(taken):
    packed = rows_packed(9)
    original = Batches(packed, batch_size=2, seed=11)   # 4 batches an epoch: 3, 4 and 6 cross its boundary
    for _ in range(taken):
        next(original)
    state = json.loads(json.dumps(original.state_dict()))
    assert set(state) == {"epoch", "position", "seed"}
    resumed = Batches(packed, batch_size=2, seed=11)
    resumed.load_state_dict(state)
    assert resumed.epoch == original.epoch
    for _ in range(10):
        expected, got = next(original), next(resumed)
        assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


def test_batches_refuse_a_state_from_another_seed_or_data():
    batches = Batches(rows_packed(8), batch_size=2, seed=1)
    with pytest.raises(RatelError, match="seed=2"):
        batches.load_state_dict({"epoch": 0, "position": 1, "seed": 2})
    with pytest.raises(RatelError, match="batches per epoch"):
        batches.load_state_dict({"epoch": 0, "position": 4, "seed": 1})
    with pytest.raises(RatelError, match="not a Batches state"):
        batches.load_state_dict({"epoch": 0})


def test_batches_refuse_fewer_rows_than_a_batch():
    with pytest.raises(RatelError) as error:
        Batches(rows_packed(3), batch_size=4)
    assert "3 row" in str(error.value) and "smaller seq_len" in str(error.value)
    with pytest.raises(RatelError, match="batch_size"):
        Batches(rows_packed(3), batch_size=0)


def test_eval_batches_are_the_full_batches_in_row_order():
    batches = eval_batches(rows_packed(7), batch_size=3)
    assert [row_ids(batch) for batch in batches] == [[0, 1, 2], [3, 4, 5]]
    assert all(labels.shape == (3, 3) for _, labels in batches)
    assert eval_batches(rows_packed(2), batch_size=3) == []
