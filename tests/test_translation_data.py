"""Tests of seqkd.data.translation: parallel splits, joint tokenizer, filtering, encoding, collation."""

from __future__ import annotations

import gzip
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from seqkd.data import (
    filter_by_length,
    find_parallel_files,
    load_multi30k,
    load_translation_splits,
    read_lines,
    tokenize_translation,
    train_translation_tokenizer,
    translation_collator,
)
from seqkd.data import translation as translation_module

torch.set_num_threads(1)

# A tiny German-English corpus (raw, cased) that every machine has.
TINY = {
    "train": (
        [
            "Ein Hund läuft im Park.",
            "Eine Katze schläft auf der Matte.",
            "Zwei Männer spielen Fußball.",
            "Ein Kind isst ein Eis.",
            "Eine Frau liest ein Buch im Park.",
        ],
        [
            "A dog runs in the park.",
            "A cat sleeps on the mat.",
            "Two men play soccer.",
            "A child eats an ice cream.",
            "A woman reads a book in the park.",
        ],
    ),
    "validation": (["Ein Hund schläft.", "Zwei Katzen spielen."], ["A dog sleeps.", "Two cats play."]),
    "test": (["Eine Frau läuft.", "Ein Mann liest."], ["A woman runs.", "A man reads."]),
}


def write_lines(path: Path, lines, *, gz: bool = False, newline: str = "\n") -> Path:
    data = "".join(line + newline for line in lines).encode("utf-8")
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_corpus(root: Path, names: dict[str, str], *, gz: bool = False, langs=("de", "en")) -> Path:
    """Write TINY as ``root/{names[split]}.{lang}`` (``.gz`` when ``gz``)."""
    root.mkdir(parents=True, exist_ok=True)
    for split, stem in names.items():
        for lang, lines in zip(langs, TINY[split]):
            write_lines(root / f"{stem}.{lang}", lines, gz=gz)
    return root


GENERIC = {"train": "train", "validation": "valid", "test": "test"}
MULTI30K_RAW = {"train": "train", "validation": "val", "test": "test_2016_flickr"}
MULTI30K_TOK = {"train": "train.lc.norm.tok", "validation": "val.lc.norm.tok", "test": "test_2016_flickr.lc.norm.tok"}


@pytest.fixture(scope="module")
def tiny_splits() -> datasets.DatasetDict:
    return datasets.DatasetDict(
        {s: datasets.Dataset.from_dict({"source": src, "target": tgt}) for s, (src, tgt) in TINY.items()}
    )


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_splits):
    return train_translation_tokenizer(tiny_splits["train"], vocab_size=120, min_frequency=1)


# --------------------------------------------------------------------------------------------------
# loading splits
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_load_local_plain_and_gz(tmp_path, gz):
    write_corpus(tmp_path, GENERIC, gz=gz)
    splits = load_translation_splits(tmp_path, "de", "en")
    assert isinstance(splits, datasets.DatasetDict)
    assert list(splits) == ["train", "validation", "test"]
    for split, (src, tgt) in TINY.items():
        assert splits[split].column_names == ["source", "target"]
        assert splits[split]["source"][:] == src
        assert splits[split]["target"][:] == tgt
    # the other direction
    rev = load_translation_splits(str(tmp_path), "en", "de", splits=["validation"])
    assert list(rev) == ["validation"]
    assert rev["validation"]["source"][:] == TINY["validation"][1]
    assert rev["validation"]["target"][:] == TINY["validation"][0]


def test_multi30k_names_and_variant(tmp_path):
    raw = write_corpus(tmp_path / "raw", MULTI30K_RAW, gz=True)
    files = find_parallel_files(raw, "de", "en")
    assert {k: (s.name, t.name) for k, (s, t) in files.items()} == {
        "train": ("train.de.gz", "train.en.gz"),
        "validation": ("val.de.gz", "val.en.gz"),
        "test": ("test_2016_flickr.de.gz", "test_2016_flickr.en.gz"),
    }
    tok = write_corpus(tmp_path / "tok", MULTI30K_TOK)
    assert load_translation_splits(tok, "de", "en")["test"]["target"][:] == TINY["test"][1]
    # both layouts in one directory: plain names win, variant= selects the other one
    both = write_corpus(write_corpus(tmp_path / "both", MULTI30K_RAW), {"train": "train.lc.norm.tok"})
    write_lines(both / "train.lc.norm.tok.en", ["x y"] * 5)
    assert load_translation_splits(both, "de", "en", splits=["train"])["train"]["target"][0] == TINY["train"][1][0]
    alt = load_translation_splits(both, "de", "en", splits=["train"], variant="lc.norm.tok")
    assert alt["train"]["target"][0] == "x y"
    # a unique *.{lang} match is accepted, several are ambiguous
    other = write_corpus(tmp_path / "other", {"train": "train.bpe"})
    assert load_translation_splits(other, "de", "en", splits=["train"])["train"].num_rows == 5
    write_corpus(other, {"train": "train.tc"})
    with pytest.raises(ValueError, match="ambiguous 'train'.*train.bpe.de, train.tc.de"):
        load_translation_splits(other, "de", "en", splits=["train"])


def test_explicit_files_prefix_and_pair(tmp_path):
    write_corpus(tmp_path, {"train": "corpus", "test": "newstest"})
    splits = load_translation_splits(
        tmp_path, "de", "en", splits=["train", "test"],
        files={"train": "corpus", "test": (tmp_path / "newstest.de", "newstest.en")},
    )
    assert splits["train"]["source"][:] == TINY["train"][0]
    assert splits["test"]["target"][:] == TINY["test"][1]
    with pytest.raises(FileNotFoundError, match="prefix 'nope'"):
        load_translation_splits(tmp_path, "de", "en", splits=["train"], files={"train": "nope"})


def test_whitespace_crlf_and_read_lines(tmp_path):
    p = write_lines(tmp_path / "x.de", ["  a b ", "c\t"], newline="\r\n")
    assert read_lines(p) == ["a b", "c"]
    assert read_lines(p, strip=False) == ["  a b ", "c\t"]
    assert read_lines(write_lines(tmp_path / "y.de", ["ä"], gz=True)) == ["ä"]
    (tmp_path / "empty.de").write_text("")
    assert read_lines(tmp_path / "empty.de") == []


def test_mismatched_line_counts_name_both_files_and_counts(tmp_path):
    write_corpus(tmp_path, GENERIC)
    write_lines(tmp_path / "valid.en", TINY["validation"][1] + ["one more"])
    with pytest.raises(ValueError) as err:
        load_translation_splits(tmp_path, "de", "en")
    msg = str(err.value)
    assert "'validation'" in msg
    assert str(tmp_path / "valid.de") in msg and "2 line(s)" in msg
    assert str(tmp_path / "valid.en") in msg and "3 line(s)" in msg


def test_missing_file_names_path_and_candidates(tmp_path):
    write_corpus(tmp_path, GENERIC)
    (tmp_path / "test.en").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_translation_splits(tmp_path, "de", "en")
    msg = str(err.value)
    assert str(tmp_path) in msg and "'test'" in msg and "target" in msg and "'en'" in msg
    for name in ("test.en", "test.en.gz", "test_2016_flickr.en", "test.lc.norm.tok.en", "test.*.en"):
        assert name in msg
    # only the requested splits are needed
    assert list(load_translation_splits(tmp_path, "de", "en", splits=["train", "valid"])) == ["train", "validation"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_translation_splits(tmp_path / "nope", "de", "en")
    with pytest.raises(ValueError, match="unknown split 'dev2'"):
        load_translation_splits(tmp_path, "de", "en", splits=["dev2"])
    with pytest.raises(ValueError, match="both 'de'"):
        load_translation_splits(tmp_path, "de", "de")


def test_empty_split(tmp_path):
    write_corpus(tmp_path, GENERIC)
    write_lines(tmp_path / "test.de", ["", " "])
    write_lines(tmp_path / "test.en", ["", ""])
    with pytest.raises(ValueError) as err:
        load_translation_splits(tmp_path, "de", "en")
    assert "'test' is empty" in str(err.value) and str(tmp_path / "test.de") in str(err.value)
    (tmp_path / "test.de").write_text("")
    (tmp_path / "test.en").write_text("")
    with pytest.raises(ValueError, match="'test' is empty.*0 line"):
        load_translation_splits(tmp_path, "de", "en")


def test_hub_translation_column_and_language_columns(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        if path == "wmt-like":
            feats = datasets.Features({"translation": datasets.Translation(languages=["de", "en"])})
            return datasets.DatasetDict(
                {
                    split: datasets.Dataset.from_dict(
                        {"translation": [{"de": f"{split} eins ", "en": f"{split} one"}, {"de": "zwei", "en": "two"}]},
                        features=feats,
                    )
                    for split in ("train", "validation", "test")
                }
            )
        return datasets.DatasetDict(
            {
                split: datasets.Dataset.from_dict({"en": [f"{split} one"], "de": [f"{split} eins"], "id": [0]})
                for split in ("train", "valid", "test")
            }
        )

    monkeypatch.setattr(translation_module, "load_dataset", fake_load_dataset)
    splits = load_translation_splits("wmt-like", "de", "en", hub_config="de-en")
    assert calls[-1][:2] == ("wmt-like", "de-en")
    assert splits["validation"].column_names == ["source", "target"]
    assert splits["validation"]["source"][:] == ["validation eins", "zwei"]  # stripped
    assert load_translation_splits("wmt-like", "en", "de")["test"]["source"][:] == ["test one", "two"]
    with pytest.raises(ValueError, match="languages \\['de', 'en'\\], not 'fr'"):
        load_translation_splits("wmt-like", "fr", "en")

    m30k = load_multi30k()  # the Hub copy: one column per language
    assert calls[-1][0] == translation_module.MULTI30K_HUB_NAME
    assert m30k["validation"]["source"][:] == ["valid eins"] and m30k["validation"]["target"][:] == ["valid one"]
    with pytest.raises(ValueError, match="neither a 'translation' column nor columns 'fr' and 'en'"):
        load_translation_splits("someone/pairs", "fr", "en")


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["bpe", "unigram"])
def test_tokenizer_specials_round_trip_and_save(tiny_splits, tmp_path, model):
    tok = train_translation_tokenizer(tiny_splits["train"], vocab_size=150, model=model, min_frequency=1)
    assert len(tok) <= 150
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert [tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert sorted(tok.get_vocab().values()) == list(range(len(tok)))
    enc = tok("Ein Hund spielt.")
    assert set(enc) == {"input_ids", "attention_mask"}  # no token_type_ids for the model
    assert enc["input_ids"][-1] == tok.eos_token_id and tok.eos_token_id not in enc["input_ids"][:-1]
    # decoding gives the text back (punctuation attached or not, whitespace normalised)
    for text in ["Eine Katze liest im Park.", "Zwei  Kinder. spielen .", ".Hund", " Ein Eis "]:
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == " ".join(text.split())
    # unseen characters become <unk> (dropped by skip_special_tokens)
    ids = tok("Ein Hund, ☃")["input_ids"]
    assert ids.count(tok.unk_token_id) == 2
    assert tok.decode(ids, skip_special_tokens=True).split() == ["Ein", "Hund"]

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok) and loaded.get_vocab() == tok.get_vocab()
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2, 3)
    for text in TINY["test"][0] + TINY["test"][1]:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    assert "token_type_ids" not in loaded("a b")


@pytest.mark.parametrize("model", ["bpe", "unigram"])
def test_pretokenized_tokenizer_reproduces_tokens(model):
    lines = ["ein mann mit einem hut , der etwas anstarrt .", "a man in an orange hat ( starring ) ."] * 3
    tok = train_translation_tokenizer(lines, vocab_size=60, model=model, pretokenized=True, min_frequency=1)
    for text in lines + ["ein hut , ein mann .", "anstarrt einem orange"]:
        ids = tok(text)["input_ids"]
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    # whitespace-only pre-tokenization: "," stays a word of its own, never glued to a neighbour
    pieces = tok.convert_ids_to_tokens(tok("hut , der")["input_ids"])
    assert "".join(pieces[:-1]).split("\u2581")[1:] == ["hut", ",", "der"]


def test_tokenizer_errors(tiny_splits):
    with pytest.raises(ValueError, match="model must be"):
        train_translation_tokenizer(tiny_splits["train"], model="wordpiece")
    with pytest.raises(ValueError, match="no text"):
        train_translation_tokenizer(["", " "], vocab_size=50)
    with pytest.raises(TypeError, match="DatasetDict"):
        train_translation_tokenizer(tiny_splits)
    with pytest.raises(ValueError, match="must differ"):
        train_translation_tokenizer(["a"], pad_token="<s>")


# --------------------------------------------------------------------------------------------------
# filtering, encoding, collation
# --------------------------------------------------------------------------------------------------


def test_filter_by_length(tiny_tokenizer):
    ds = datasets.Dataset.from_dict(
        {
            "source": ["a b c", "", "a b c d e f g h", "a", "a b"],
            "target": ["x y z", "x", "x y", "x y z w", "x y"],
        }
    )
    assert filter_by_length(ds)["source"][:] == ["a b c", "a b c d e f g h", "a", "a b"]  # empty side dropped
    assert filter_by_length(ds, max_tokens=4)["source"][:] == ["a b c", "a", "a b"]
    assert filter_by_length(ds, max_ratio=2)["source"][:] == ["a b c", "a b"]  # 8/2 and 4/1 > 2
    assert filter_by_length(ds, min_tokens=3)["source"][:] == ["a b c"]
    # only the train split of a DatasetDict is filtered
    dd = datasets.DatasetDict({"train": ds, "test": ds})
    out = filter_by_length(dd, max_tokens=4)
    assert out["train"].num_rows == 3 and out["test"].num_rows == 5
    # subword lengths with a tokenizer (special tokens not counted)
    sub = datasets.Dataset.from_dict({"source": ["Hund"], "target": ["dog"]})
    n_src = len(tiny_tokenizer("Hund", add_special_tokens=False)["input_ids"])
    assert filter_by_length(sub, tiny_tokenizer, max_tokens=n_src).num_rows == 1
    assert filter_by_length(sub, tiny_tokenizer, min_tokens=n_src + 1).num_rows == 0
    with pytest.raises(ValueError, match="max_ratio"):
        filter_by_length(ds, max_ratio=0.5)


def test_tokenize_and_collate(tiny_splits, tiny_tokenizer):
    tok = tiny_tokenizer
    enc = tokenize_translation(tiny_splits, tok)
    assert enc["train"].column_names == ["input_ids", "attention_mask", "labels"]
    row = enc["train"][1]
    assert row["input_ids"] == tok(TINY["train"][0][1])["input_ids"] and row["input_ids"][-1] == 2
    assert row["labels"] == tok(TINY["train"][1][1])["input_ids"] and row["labels"][-1] == 2
    assert row["attention_mask"] == [1] * len(row["input_ids"])
    assert tok.decode(row["labels"], skip_special_tokens=True) == TINY["train"][1][1]
    # truncation keeps the eos last
    short = tokenize_translation(tiny_splits["train"], tok, max_source_length=3, max_target_length=4, keep_text=True)
    assert "source" in short.column_names
    assert all(len(r) <= 3 and r[-1] == 2 for r in short["input_ids"])
    assert all(len(r) <= 4 and r[-1] == 2 for r in short["labels"])

    rows = [enc["train"][i] for i in range(3)]
    batch = translation_collator(tok)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    L = max(len(r["input_ids"]) for r in rows)
    T = max(len(r["labels"]) for r in rows)
    assert batch["input_ids"].shape == (3, L) and batch["labels"].shape == (3, T)
    for b, r in enumerate(rows):
        n, m = len(r["input_ids"]), len(r["labels"])
        assert batch["input_ids"][b, :n].tolist() == r["input_ids"]
        assert (batch["input_ids"][b, n:] == tok.pad_token_id).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (L - n)
        assert batch["labels"][b, :m].tolist() == r["labels"]
        assert (batch["labels"][b, m:] == -100).all()
    assert (batch["labels"] == -100).any()  # the rows do differ in length

    # with a model: decoder inputs are the labels shifted right after the start token
    from seqkd.models import build_seq2seq

    model = build_seq2seq("marian-tiny", tokenizer=tok)
    with_dec = translation_collator(tok, model=model, pad_to_multiple_of=8)(rows)
    assert with_dec["input_ids"].shape[1] % 8 == 0 and with_dec["labels"].shape[1] % 8 == 0
    dec = with_dec["decoder_input_ids"]
    assert (dec[:, 0] == model.config.decoder_start_token_id).all()
    labels = with_dec["labels"]
    assert torch.equal(dec[:, 1:], labels[:, :-1].masked_fill(labels[:, :-1] == -100, tok.pad_token_id))
    out = model(**with_dec)
    assert torch.isfinite(out.loss)


# --------------------------------------------------------------------------------------------------
# Multi30k (skipped when the data is absent)
# --------------------------------------------------------------------------------------------------

MULTI30K_COUNTS = {"train": 29000, "validation": 1014, "test": 1000}


@pytest.fixture(scope="module")
def multi30k_dir(data_dir: Path) -> Path:
    d = data_dir / "multi30k"
    needed = [d / "raw" / f"{s}.{l}.gz" for s in MULTI30K_RAW.values() for l in ("de", "en")]
    needed += [d / "tok" / f"{s}.{l}" for s in MULTI30K_TOK.values() for l in ("de", "en")]
    missing = [str(p.relative_to(d)) for p in needed if not p.is_file()]
    if missing:
        pytest.skip(f"Multi30k not found in {d} (missing {', '.join(missing)}); set SEQKD_DATA_DIR")
    return d


def test_multi30k_raw(multi30k_dir, data_dir):
    splits = load_multi30k(multi30k_dir)
    assert {k: v.num_rows for k, v in splits.items()} == MULTI30K_COUNTS
    assert splits["test"][0] == {
        "source": "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt.",
        "target": "A man in an orange hat starring at something.",
    }
    # the data root and the raw/ directory itself work too; en->de swaps the columns
    assert load_multi30k(data_dir, splits=["test"])["test"][0] == splits["test"][0]
    rev = load_translation_splits(multi30k_dir / "raw", "en", "de", splits=["validation"])
    assert rev["validation"]["target"][:] == splits["validation"]["source"][:]

    tok = train_translation_tokenizer(splits["train"], vocab_size=8000)
    assert len(tok) == 8000
    for text in list(splits["test"]["source"]) + list(splits["test"]["target"]):
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_multi30k_tokenized(multi30k_dir):
    splits = load_multi30k(multi30k_dir, tokenized=True)
    assert {k: v.num_rows for k, v in splits.items()} == MULTI30K_COUNTS
    assert splits["validation"]["target"][0] == "a group of men are loading cotton onto a truck"
    assert splits["test"]["source"][0] == "ein mann mit einem orangefarbenen hut , der etwas anstarrt ."

    tok = train_translation_tokenizer(splits["train"], vocab_size=8000, pretokenized=True)
    for text in list(splits["test"]["source"]) + list(splits["test"]["target"]):
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    kept = filter_by_length(splits, tok, max_tokens=50, max_ratio=3.0)
    assert 28000 < kept["train"].num_rows <= 29000
    assert kept["test"].num_rows == 1000 and kept["validation"].num_rows == 1014
