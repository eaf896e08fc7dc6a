"""Tests of seqkd.data.text: split loading, tokenizers, stream and block batching."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from seqkd.data import (
    StreamBatches,
    encode_stream,
    find_split_files,
    group_texts,
    load_ptb,
    load_text_splits,
    stream_dataloader,
    train_bpe_tokenizer,
    train_word_tokenizer,
)
from seqkd.data import text as text_module

# --------------------------------------------------------------------------------------------------
# loading splits
# --------------------------------------------------------------------------------------------------


def test_load_local_generic_names(tiny_corpus_dir, tiny_corpus):
    splits = load_text_splits(tiny_corpus_dir)
    assert isinstance(splits, datasets.DatasetDict)
    assert list(splits) == ["train", "validation", "test"]
    for split, lines in tiny_corpus.items():
        assert splits[split].column_names == ["text"]
        assert splits[split]["text"][:] == lines  # blank lines kept, order kept
    dropped = load_text_splits(tiny_corpus_dir, splits=["train"], drop_empty_lines=True)
    assert list(dropped) == ["train"]
    assert dropped["train"]["text"][:] == [l for l in tiny_corpus["train"] if l]


def test_load_local_ptb_names_and_crlf(tmp_path):
    for name, body in [("ptb.train.txt", " a b \r\n c\r\n"), ("ptb.valid.txt", "b\n"), ("ptb.test.txt", "c")]:
        (tmp_path / name).write_bytes(body.encode())
    files = find_split_files(tmp_path)
    assert {k: v.name for k, v in files.items()} == {
        "train": "ptb.train.txt", "validation": "ptb.valid.txt", "test": "ptb.test.txt"
    }
    splits = load_ptb(tmp_path)
    assert splits["train"]["text"][:] == [" a b ", " c"]
    assert splits["test"]["text"][:] == ["c"]
    # load_ptb also accepts the parent of a ptb/ directory
    (tmp_path / "ptb").mkdir()
    for name in ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"):
        (tmp_path / "ptb" / name).write_text("x y\n")
    parent = tmp_path.parent / (tmp_path.name + "_parent")
    parent.mkdir()
    (parent / "ptb").symlink_to(tmp_path / "ptb")
    assert load_ptb(parent)["validation"]["text"][:] == ["x y"]


def test_missing_split_file_names_path_and_candidates(tiny_corpus_dir):
    (tiny_corpus_dir / "valid.txt").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_text_splits(tiny_corpus_dir)
    msg = str(err.value)
    assert str(tiny_corpus_dir) in msg and "'validation'" in msg
    for name in ("validation.txt", "valid.txt", "ptb.valid.txt"):
        assert name in msg
    # only the requested splits are needed
    assert list(load_text_splits(tiny_corpus_dir, splits=["train", "test"])) == ["train", "test"]


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_splits(tmp_path / "nope")


def test_empty_corpus_names_split_and_file(tiny_corpus_dir):
    (tiny_corpus_dir / "test.txt").write_text("\n  \n")
    with pytest.raises(ValueError) as err:
        load_text_splits(tiny_corpus_dir)
    assert "'test'" in str(err.value) and "test.txt" in str(err.value) and "empty" in str(err.value)
    (tiny_corpus_dir / "test.txt").write_text("")
    with pytest.raises(ValueError, match="'test' is empty"):
        load_text_splits(tiny_corpus_dir)


def test_hub_path_uses_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.DatasetDict(
            {
                split: datasets.Dataset.from_dict({"id": [0, 1], "sentence": [f"{split} one", f"{split} two"]})
                for split in ("train", "valid", "test")
            }
        )

    monkeypatch.setattr(text_module, "load_dataset", fake_load_dataset)
    splits = load_ptb()
    assert calls[0][0] == "ptb_text_only"
    assert list(splits) == ["train", "validation", "test"]
    assert splits["validation"].column_names == ["text"]
    assert splits["validation"]["text"][:] == ["valid one", "valid two"]
    # column auto-detection picks the only string column
    assert load_text_splits("someone/corpus")["test"]["text"][:] == ["test one", "test two"]
    with pytest.raises(ValueError, match="no column 'words'"):
        load_text_splits("someone/corpus", text_column="words")


# --------------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------------


def test_word_tokenizer_tiny(tiny_corpus, tmp_path):
    tok = train_word_tokenizer(tiny_corpus["train"])
    vocab = tok.get_vocab()
    assert vocab["<unk>"] == 0 and vocab["<eos>"] == 1 and tok.unk_token_id == 0 and tok.eos_token_id == 1
    assert vocab["the"] == 2  # most frequent word first
    assert sorted(vocab.values()) == list(range(len(tok)))
    words = {w for line in tiny_corpus["train"] for w in line.split()}
    assert len(tok) == len(words | {"<eos>"})

    ids = tok("a cat sat")["input_ids"]
    assert ids == [vocab["a"], vocab["cat"], vocab["sat"], 1]  # <eos> appended
    assert tok("a zebra <unk>")["input_ids"] == [vocab["a"], 0, 0, 1]  # OOV and literal <unk> -> unk
    assert tok("")["input_ids"] == [1]
    line = "the dog sat on the mat"
    assert tok.decode(tok(line)["input_ids"]) == line + " <eos>"
    assert tok.decode(tok(line)["input_ids"], skip_special_tokens=True) == line

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok) and loaded.get_vocab() == vocab
    assert loaded.eos_token == "<eos>" and loaded.unk_token == "<unk>"
    for text in tiny_corpus["test"] + tiny_corpus["validation"]:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"]) == tok.decode(tok(text)["input_ids"])


def test_word_tokenizer_limits(tiny_corpus):
    small = train_word_tokenizer(tiny_corpus["train"], max_vocab_size=4)
    assert list(small.get_vocab()) and len(small) == 4
    frequent = train_word_tokenizer(tiny_corpus["train"], min_frequency=3)
    assert set(frequent.get_vocab()) == {"<unk>", "<eos>", "the"}
    with pytest.raises(ValueError, match="no words"):
        train_word_tokenizer(["", "  "])


def test_bpe_tokenizer_round_trip(tiny_corpus, tmp_path):
    corpus = tiny_corpus["train"] * 5 + ["Ünïcode, punctuation! and   spaces."]
    tok = train_bpe_tokenizer(corpus, vocab_size=300, min_frequency=2)
    assert 256 < len(tok) <= 300
    assert tok.get_vocab()["<eos>"] == 0 and tok.eos_token == "<eos>"
    for text in corpus + ["a never seen wörd 123"]:
        ids = tok(text)["input_ids"]
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok)
    assert loaded("the cat sat")["input_ids"] == tok("the cat sat")["input_ids"]

    with_unk = train_bpe_tokenizer(corpus, vocab_size=300, special_tokens=["<unk>"])
    ids = with_unk("a <unk> b")["input_ids"]
    assert with_unk.convert_tokens_to_ids("<unk>") in ids  # kept whole
    with pytest.raises(ValueError, match="too small"):
        train_bpe_tokenizer(corpus, vocab_size=100)


# --------------------------------------------------------------------------------------------------
# PTB (skipped when the data is absent)
# --------------------------------------------------------------------------------------------------


def test_ptb_counts(ptb_splits, ptb_word_tokenizer):
    assert {k: v.num_rows for k, v in ptb_splits.items()} == {"train": 42068, "validation": 3370, "test": 3761}
    tok = ptb_word_tokenizer
    assert len(tok) == 10_000
    train = encode_stream(tok, ptb_splits["train"])
    assert train.dtype == torch.long and train.shape == (929_589,)
    assert int((train == tok.eos_token_id).sum()) == 42068
    # PTB's valid/test words are all in the train vocabulary (OOVs are already <unk>)
    vocab = tok.get_vocab()
    for split in ("validation", "test"):
        words = {w for line in ptb_splits[split]["text"] for w in line.split()}
        assert words <= set(vocab)
    assert encode_stream(tok, ptb_splits["validation"]).numel() == 73_760
    assert encode_stream(tok, ptb_splits["test"]).numel() == 82_430

    batches = StreamBatches(train, batch_size=20, seq_len=35)
    assert batches.stream_length == 929_589 // 20 and batches.dropped_tokens == 929_589 % 20
    assert len(batches) == 1328
    assert batches.num_predicted_tokens + 20 + batches.dropped_tokens == 929_589


# --------------------------------------------------------------------------------------------------
# stream batching
# --------------------------------------------------------------------------------------------------


def test_stream_batches_continuity():
    n, B, L = 103, 4, 5
    ids = torch.arange(n)
    sb = StreamBatches(ids, batch_size=B, seq_len=L)
    T = n // B
    assert (sb.stream_length, sb.dropped_tokens, len(sb)) == (T, n - B * T, -(-(T - 1) // L))
    streams = ids[: B * T].view(B, T)

    batches = list(stream_dataloader(sb))
    assert len(batches) == len(sb)
    for i, batch in enumerate(batches):
        assert set(batch) == {"input_ids", "shift_labels"}
        assert batch["input_ids"].dtype == torch.long
        assert torch.equal(batch["input_ids"], sb[i]["input_ids"])
        assert batch["input_ids"].shape == batch["shift_labels"].shape
        assert batch["input_ids"].shape == (B, L if i < len(sb) - 1 else (T - 1) - (len(sb) - 1) * L)
        # targets are the next input token, inside a batch ...
        assert torch.equal(batch["shift_labels"][:, :-1], batch["input_ids"][:, 1:])
        # ... and across the boundary with the next batch
        if i + 1 < len(batches):
            assert torch.equal(batch["shift_labels"][:, -1], batches[i + 1]["input_ids"][:, 0])
    assert batches[-1]["input_ids"].shape[1] < L  # the last batch is shorter here

    # concatenating the rows reproduces every stream
    inputs = torch.cat([b["input_ids"] for b in batches], dim=1)
    targets = torch.cat([b["shift_labels"] for b in batches], dim=1)
    assert torch.equal(inputs, streams[:, :-1]) and torch.equal(targets, streams[:, 1:])
    # every token after the first of each stream is a target exactly once
    flat = targets.flatten().tolist()
    assert len(flat) == len(set(flat)) == sb.num_predicted_tokens == B * (T - 1)
    assert set(flat) == set(ids[: B * T].tolist()) - set(streams[:, 0].tolist())
    assert torch.equal(sb[-1]["input_ids"], batches[-1]["input_ids"])
    with pytest.raises(IndexError):
        sb[len(sb)]


def test_stream_batches_exact_fit():
    # (T - 1) divisible by L: no short batch
    sb = StreamBatches(torch.arange(2 * 11), batch_size=2, seq_len=5)
    assert len(sb) == 2 and all(sb[i]["input_ids"].shape == (2, 5) for i in range(2))
    assert sb.dropped_tokens == 0


def test_stream_batches_two_processes():
    n, B, L = 100, 3, 4
    ids = torch.arange(n)
    parts = [StreamBatches(ids, B, L, process_index=k, num_processes=2) for k in range(2)]
    T = n // (2 * B)
    assert all(p.stream_length == T and p.dropped_tokens == n - 2 * B * T for p in parts)
    assert len(parts[0]) == len(parts[1])  # same number of batches on every process
    rows = []
    for k, part in enumerate(parts):
        inputs = torch.cat([part[i]["input_ids"] for i in range(len(part))], dim=1)
        targets = torch.cat([part[i]["shift_labels"] for i in range(len(part))], dim=1)
        own = ids[: 2 * B * T].view(2 * B, T)[k * B : (k + 1) * B]
        assert torch.equal(inputs, own[:, :-1]) and torch.equal(targets, own[:, 1:])
        rows.append(own)
    covered = torch.cat(rows).flatten().tolist()
    assert sorted(covered) == list(range(2 * B * T))  # every stream exactly once, disjoint
    assert set(rows[0].flatten().tolist()).isdisjoint(rows[1].flatten().tolist())


def test_stream_batches_errors():
    with pytest.raises(ValueError, match="too few"):
        StreamBatches(torch.arange(7), batch_size=4, seq_len=3)
    with pytest.raises(ValueError, match="process_index"):
        StreamBatches(torch.arange(100), batch_size=2, seq_len=3, process_index=2, num_processes=2)
    with pytest.raises(ValueError, match="1-D"):
        StreamBatches(torch.zeros(2, 10, dtype=torch.long), batch_size=1, seq_len=3)
    with pytest.raises(ValueError, match="cannot be set"):
        stream_dataloader(StreamBatches(torch.arange(10), 1, 3), shuffle=True)


def test_stream_batches_from_texts(tiny_corpus, tiny_word_tokenizer):
    tok = tiny_word_tokenizer
    stream = encode_stream(tok, tiny_corpus["train"])
    expected = [i for line in tiny_corpus["train"] for i in tok(line)["input_ids"]]
    assert stream.tolist() == expected
    ds = datasets.Dataset.from_dict({"text": tiny_corpus["train"]})
    sb = StreamBatches.from_texts(tok, ds, batch_size=2, seq_len=3)
    T = len(expected) // 2
    got = torch.cat([sb[i]["input_ids"] for i in range(len(sb))], dim=1)
    assert torch.equal(got, torch.tensor(expected[: 2 * T]).view(2, T)[:, :-1])


# --------------------------------------------------------------------------------------------------
# block batching
# --------------------------------------------------------------------------------------------------


def test_group_texts_blocks(tiny_corpus, tiny_word_tokenizer):
    tok = tiny_word_tokenizer
    ds = datasets.Dataset.from_dict({"text": tiny_corpus["train"]})
    stream = encode_stream(tok, ds)
    blocks = group_texts(ds, tok, block_size=4)
    n = stream.numel() // 4
    assert blocks.column_names == ["input_ids", "labels"] and blocks.num_rows == n
    t = blocks.with_format("torch")[:]
    assert t["input_ids"].shape == (n, 4) and t["input_ids"].dtype == torch.long
    assert torch.equal(t["labels"], t["input_ids"])
    assert torch.equal(t["input_ids"].flatten(), stream[: n * 4])

    kept = group_texts(tiny_corpus["train"], tok, block_size=4, drop_remainder=False)
    assert kept.num_rows == -(-stream.numel() // 4)
    assert kept[-1]["input_ids"] == stream[n * 4 :].tolist() or stream.numel() % 4 == 0
    with pytest.raises(ValueError, match="fewer than block_size"):
        group_texts(["a cat"], tok, block_size=64)
