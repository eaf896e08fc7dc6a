"""Translation data: parallel splits, a joint subword tokenizer, filtering, encoding and batching.

Four layers, each usable on its own:

1. **Splits** -- :func:`load_translation_splits` / :func:`load_multi30k` return a
   :class:`datasets.DatasetDict` with splits ``train`` / ``validation`` / ``test`` and two
   text columns, ``source`` and ``target`` (one sentence pair per row, file order), read
   either from local files ``{split}.{lang}`` (plain or ``.gz``, one sentence per line;
   Multi30k's ``val`` / ``test_2016_flickr`` and ``{split}.lc.norm.tok.{lang}`` names are
   understood) or from a Hugging Face Hub dataset with a ``translation`` column (the
   WMT/IWSLT layout ``{"translation": {"de": ..., "en": ...}}``) or one column per language.
   Any language pair and direction: ``source_lang`` / ``target_lang``.
2. **Tokenizer** -- :func:`train_translation_tokenizer`: one subword vocabulary (BPE or
   Unigram, trained with ``tokenizers`` on both sides of the train split) shared by source
   and target, wrapped as :class:`transformers.PreTrainedTokenizerFast` (``save_pretrained``
   / ``AutoTokenizer`` round trip). Special tokens ``<pad>``=0, ``<s>``=1, ``</s>``=2,
   ``<unk>``=3 (the ids :func:`seqkd.models.build_seq2seq` defaults to); encoding appends
   ``</s>``.
3. **Filtering** -- :func:`filter_by_length`: min/max length and max length ratio of the
   train pairs (Moses ``clean-corpus-n`` style).
4. **Encoding and batching** -- :func:`tokenize_translation` (``input_ids``,
   ``attention_mask``, ``labels`` = target ids + ``</s>``) and :func:`translation_collator`
   (a :class:`transformers.DataCollatorForSeq2Seq`: inputs padded with the pad id, labels
   with -100, optionally ``decoder_input_ids`` from the model).

Every path works from local files; only :func:`load_translation_splits` with a Hub name (and
:func:`load_multi30k` without ``data_dir``) touches the network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from seqkd.data.text import _check_not_empty, _looks_local, canonical_split, find_one_file, load_hub_splits, read_text
from seqkd.errors import InvalidValueError, MissingInputError

SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""Canonical split names of the returned :class:`~datasets.DatasetDict`."""

# Accepted aliases (file-name stems / Hub split names) for each canonical split, in order of preference.
TRANSLATION_SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "test_2016_flickr"),
}

#: The file-name infix of Multi30k's lowercased, normalised, Moses-tokenized files.
MULTI30K_TOK_VARIANT = "lc.norm.tok"
#: Hub copy of Multi30k task 1 (raw, cased text; one column per language: ``en``, ``de``).
MULTI30K_HUB_NAME = "bentrevett/multi30k"

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
METASPACE = "\u2581"  # "▁", SentencePiece's word-start marker
IGNORE_INDEX = -100

__all__ = [
    "TRANSLATION_SPLIT_ALIASES",
    "MULTI30K_TOK_VARIANT",
    "MULTI30K_HUB_NAME",
    "find_parallel_files",
    "read_lines",
    "load_translation_splits",
    "load_multi30k",
    "train_translation_tokenizer",
    "filter_by_length",
    "make_tokenize_function",
    "tokenize_translation",
    "translation_collator",
]


# --------------------------------------------------------------------------- #
# Splits
# --------------------------------------------------------------------------- #
def _canonical_split(name: str) -> str:
    return canonical_split(name, TRANSLATION_SPLIT_ALIASES)


def _check_langs(source_lang: str, target_lang: str) -> None:
    for what, lang in (("source_lang", source_lang), ("target_lang", target_lang)):
        if not isinstance(lang, str) or not lang or any(c in lang for c in "/\\ "):
            raise InvalidValueError(f"{what} must be a language code such as 'de', got {lang!r}")
    if source_lang == target_lang:
        raise InvalidValueError(f"source_lang and target_lang are both {source_lang!r}")


def _find_one(root: Path, split: str, lang: str, variant: str | None) -> tuple[Path | None, list[str]]:
    """The file of one split and language in ``root`` and the names/patterns looked for."""
    aliases = TRANSLATION_SPLIT_ALIASES[split]
    if variant is not None:
        names = [f"{a}.{variant}.{lang}{gz}" for a in aliases for gz in ("", ".gz")]
        patterns: list[str] = []
    else:
        names = [f"{a}.{lang}{gz}" for a in aliases for gz in ("", ".gz")]
        names += [f"{a}.{MULTI30K_TOK_VARIANT}.{lang}{gz}" for a in aliases for gz in ("", ".gz")]
        patterns = [f"{a}.*.{lang}{gz}" for a in aliases for gz in ("", ".gz")]
    path = find_one_file(
        root, names, patterns, f"{split!r} file for language {lang!r}",
        f"pass variant=... or files={{'{split}': ...}}",
    )  # fmt: skip
    return path, names + patterns


def find_parallel_files(
    data_dir: str | os.PathLike,
    source_lang: str,
    target_lang: str,
    splits: Sequence[str] = SPLITS,
    *,
    variant: str | None = None,
) -> dict[str, tuple[Path, Path]]:
    """Locate the ``(source file, target file)`` of each split in ``data_dir``.

    For a split alias ``a`` (``train``; ``validation``/``valid``/``val``/``dev``;
    ``test``/``test_2016_flickr``) and language ``l`` the names tried are ``{a}.{l}``,
    ``{a}.{l}.gz``, then Multi30k's ``{a}.lc.norm.tok.{l}[.gz]``, and finally the patterns
    ``{a}.*.{l}[.gz]`` when they match exactly one file. With ``variant`` (e.g.
    ``"lc.norm.tok"``) only ``{a}.{variant}.{l}[.gz]`` is looked for.

    Raises:
        FileNotFoundError: the directory does not exist, or a file is missing; the message
            names the directory, the split, the language and every name/pattern looked for.
        ValueError: a pattern matches several files.
    """
    _check_langs(source_lang, target_lang)
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise MissingInputError(f"data directory {str(root)!r} does not exist or is not a directory")
    found: dict[str, tuple[Path, Path]] = {}
    for split in splits:
        canon = _canonical_split(split)
        pair = []
        for side, lang in (("source", source_lang), ("target", target_lang)):
            path, tried = _find_one(root, canon, lang, variant)
            if path is None:
                raise MissingInputError(
                    f"no {canon!r} {side} file (language {lang!r}) in {str(root)!r}: looked for "
                    f"{', '.join(tried)}"
                )
            pair.append(path)
        found[canon] = (pair[0], pair[1])
    return found


def read_lines(path: str | os.PathLike, *, strip: bool = True) -> list[str]:
    """Lines of a UTF-8 text file, plain or gzip-compressed (name ending in ``.gz``).

    Newlines are universal (``\\r\\n`` and ``\\r`` count); a final newline does not create an
    extra line. With ``strip`` (default) surrounding whitespace is removed from every line.
    """
    data = read_text(path)
    if not data:
        return []
    lines = data.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.strip() for line in lines] if strip else lines


def _check_pair(src: Sequence[str], tgt: Sequence[str], split: str, src_where: str, tgt_where: str) -> None:
    if len(src) != len(tgt):
        raise InvalidValueError(
            f"split {split!r}: source and target line counts differ: {src_where} has {len(src)} line(s), "
            f"{tgt_where} has {len(tgt)} line(s)"
        )
    for side, lines, where in (("source", src, src_where), ("target", tgt, tgt_where)):
        _check_not_empty(lines, split, f"the {side} side ({where})")


def _explicit_files(root: Path, spec, split: str, source_lang: str, target_lang: str) -> tuple[Path, Path]:
    """``files[split]``: a ``(source, target)`` pair of paths, or a prefix completed with ``.{lang}``."""
    if isinstance(spec, (str, os.PathLike)):
        prefix = os.fspath(spec)
        pair = []
        for lang in (source_lang, target_lang):
            cands = [Path(f"{prefix}.{lang}"), Path(f"{prefix}.{lang}.gz")]
            cands = [c if c.is_absolute() else root / c for c in cands]
            p = next((c for c in cands if c.is_file()), None)
            if p is None:
                raise MissingInputError(
                    f"{split!r} split: no file for language {lang!r} with prefix {prefix!r}: looked for "
                    f"{', '.join(str(c) for c in cands)}"
                )
            pair.append(p)
        return pair[0], pair[1]
    try:
        src, tgt = spec
    except (TypeError, ValueError):
        raise TypeError(
            f"files[{split!r}] must be a path prefix or a (source_path, target_path) pair, got {spec!r}"
        ) from None
    out = []
    for p in (Path(src), Path(tgt)):
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            raise MissingInputError(f"{split!r} split file {str(p)!r} does not exist")
        out.append(p)
    return out[0], out[1]


def load_translation_splits(
    source: str | os.PathLike,
    source_lang: str,
    target_lang: str,
    *,
    splits: Sequence[str] = SPLITS,
    files: Mapping[str, str | os.PathLike | tuple] | None = None,
    variant: str | None = None,
    hub_config: str | None = None,
    strip: bool = True,
    **load_dataset_kwargs,
):
    """Load parallel splits as a :class:`datasets.DatasetDict` with ``source`` / ``target`` columns.

    Args:
        source: a local directory (file names: see :func:`find_parallel_files`) or a Hub
            dataset name passed to :func:`datasets.load_dataset`. A string is local when it
            exists on disk or starts with ``/``, ``.`` or ``~``; anything else is a Hub name.
        source_lang, target_lang: language codes (file suffixes / keys of the ``translation``
            column); they set the direction: ``source`` holds ``source_lang``.
        splits: which splits to load (canonical names or aliases); the result always uses the
            canonical ``train`` / ``validation`` / ``test`` keys.
        files: explicit ``{split: prefix}`` (files ``{prefix}.{lang}[.gz]``) or
            ``{split: (source_path, target_path)}`` overriding the look-up (local only;
            relative paths are resolved against ``source``).
        variant: only look for ``{split}.{variant}.{lang}[.gz]`` (e.g. ``"lc.norm.tok"``).
        hub_config: the Hub dataset configuration (``load_dataset``'s ``name``, e.g. ``"de-en"``).
        strip: remove surrounding whitespace from every sentence (default).
        **load_dataset_kwargs: forwarded to :func:`datasets.load_dataset`.

    Returns:
        ``DatasetDict({split: Dataset({"source": [...], "target": [...]})})``, one row per line
        pair, in file order. Blank pairs are kept (the default :func:`filter_by_length` drops
        them from the train split).

    Raises:
        FileNotFoundError: missing directory or file (names the path and the names looked for).
        ValueError: source and target line counts differ (names both files and both counts), a
            split whose source or target side has no text, unknown split, missing language.
    """
    import datasets

    _check_langs(source_lang, target_lang)
    canon_splits = list(dict.fromkeys(_canonical_split(s) for s in splits))
    if not canon_splits:
        raise InvalidValueError("splits must name at least one split")

    out = {}
    if files is not None or _looks_local(source):
        root = Path(source).expanduser()
        paths: dict[str, tuple[Path, Path]] = {}
        for split, spec in (files or {}).items():
            canon = _canonical_split(split)
            if canon in canon_splits:
                paths[canon] = _explicit_files(root, spec, canon, source_lang, target_lang)
        missing = [s for s in canon_splits if s not in paths]
        if missing:
            paths.update(find_parallel_files(root, source_lang, target_lang, missing, variant=variant))
        for split in canon_splits:
            src_path, tgt_path = paths[split]
            src, tgt = read_lines(src_path, strip=strip), read_lines(tgt_path, strip=strip)
            _check_pair(src, tgt, split, f"{str(src_path)!r}", f"{str(tgt_path)!r}")
            out[split] = datasets.Dataset.from_dict({"source": src, "target": tgt})
        return datasets.DatasetDict(out)

    # ---- Hugging Face Hub -------------------------------------------------- #
    hub_splits = load_hub_splits(
        load_dataset, source, hub_config, canon_splits, TRANSLATION_SPLIT_ALIASES, **load_dataset_kwargs
    )
    for split in canon_splits:
        ds = _hub_pairs(hub_splits[split], source_lang, target_lang, f"Hub dataset {source!r} split {split!r}")
        if strip:
            ds = ds.map(
                lambda b: {"source": [s.strip() for s in b["source"]], "target": [t.strip() for t in b["target"]]},
                batched=True,
            )
        _check_pair(ds["source"], ds["target"], split, f"{source!r}[{split!r}]", f"{source!r}[{split!r}]")
        out[split] = ds
    return datasets.DatasetDict(out)


def _hub_pairs(ds, source_lang: str, target_lang: str, where: str):
    """``source`` / ``target`` columns from a ``translation`` column or from per-language columns."""
    if "translation" in ds.column_names:
        feat = ds.features["translation"]
        langs = list(getattr(feat, "languages", None) or (feat.keys() if isinstance(feat, dict) else []))
        absent = [lang for lang in (source_lang, target_lang) if lang not in langs]
        if absent:
            raise InvalidValueError(
                f"{where}: its 'translation' column has languages {langs}, not {', '.join(map(repr, absent))}"
            )
        return ds.map(
            lambda b: {
                "source": [t[source_lang] for t in b["translation"]],
                "target": [t[target_lang] for t in b["translation"]],
            },
            batched=True,
            remove_columns=ds.column_names,
        )
    if source_lang in ds.column_names and target_lang in ds.column_names:
        ds = ds.select_columns([source_lang, target_lang])
        return ds.rename_columns({source_lang: "source", target_lang: "target"})
    raise InvalidValueError(
        f"{where} has neither a 'translation' column nor columns {source_lang!r} and {target_lang!r} "
        f"(columns: {ds.column_names})"
    )


def load_dataset(*args, **kwargs):
    """Indirection over :func:`datasets.load_dataset` (kept patchable for tests)."""
    import datasets

    return datasets.load_dataset(*args, **kwargs)


def load_multi30k(
    data_dir: str | os.PathLike | None = None,
    *,
    source_lang: str = "de",
    target_lang: str = "en",
    tokenized: bool = False,
    splits: Sequence[str] = SPLITS,
    hub_name: str = MULTI30K_HUB_NAME,
    **load_dataset_kwargs,
):
    """Multi30k task 1 (29,000 / 1,014 / 1,000 pairs) as a ``DatasetDict`` of ``source`` / ``target``.

    ``data_dir`` may be the directory holding the files, a ``multi30k/`` directory with
    ``raw/`` (cased ``{train,val,test_2016_flickr}.{en,de}.gz``) and ``tok/`` (lowercased,
    Moses-tokenized ``{split}.lc.norm.tok.{lang}``) sub-directories, or its parent. ``tokenized``
    picks ``tok/`` (else ``raw/``). Without ``data_dir`` the Hub copy :data:`MULTI30K_HUB_NAME`
    (raw text only) is downloaded.
    """
    if data_dir is None:
        if tokenized:
            raise InvalidValueError("the Hub copy of Multi30k is raw text only: pass data_dir= for tokenized=True")
        return load_translation_splits(hub_name, source_lang, target_lang, splits=splits, **load_dataset_kwargs)
    root = Path(data_dir).expanduser()
    if (root / "multi30k").is_dir():
        root = root / "multi30k"
    sub = "tok" if tokenized else "raw"
    if (root / sub).is_dir():
        root = root / sub
    variant = MULTI30K_TOK_VARIANT if tokenized else None
    return load_translation_splits(root, source_lang, target_lang, splits=splits, variant=variant)


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #
def _pair_texts(texts, columns: Sequence[str]) -> Iterable[str]:
    """Both sides of a ``datasets.Dataset`` (``columns``), or any iterable of str."""
    if isinstance(texts, str):
        raise TypeError("expected an iterable of sentences or a Dataset, got a single str")
    column_names = getattr(texts, "column_names", None)
    if column_names is not None:
        if isinstance(column_names, dict):  # DatasetDict
            raise TypeError("pass one split (e.g. splits['train']), not a whole DatasetDict")
        absent = [c for c in columns if c not in column_names]
        if absent:
            raise InvalidValueError(f"dataset has no column(s) {absent} (columns: {column_names})")
        return [line for c in columns for line in texts[c]]
    return texts


def train_translation_tokenizer(
    texts,
    vocab_size: int = 8000,
    *,
    model: str = "bpe",
    pretokenized: bool = False,
    min_frequency: int = 2,
    pad_token: str = PAD_TOKEN,
    bos_token: str = BOS_TOKEN,
    eos_token: str = EOS_TOKEN,
    unk_token: str = UNK_TOKEN,
    add_eos: bool = True,
    columns: Sequence[str] = ("source", "target"),
    show_progress: bool = False,
):
    """Joint source/target subword tokenizer (BPE or Unigram) trained with ``tokenizers``.

    Train it on the train split (a ``datasets.Dataset``: both ``columns`` are used, so
    source and target share one vocabulary) or on any iterable of sentences.

    Pipeline: NFC normalisation and whitespace runs collapsed to one space; then

    * ``pretokenized=False`` (raw text): SentencePiece-style -- words are split on spaces and
      marked with a leading ``▁`` (Metaspace), punctuation is isolated (``"Hut,"`` ->
      ``▁Hut`` ``,``) -- so decoding gives back the text exactly, spaces included;
    * ``pretokenized=True`` (already tokenized, e.g. Moses output such as Multi30k's
      ``tok/`` files): only whitespace splits words (nothing inside a token is split off
      before the subword model), and decoding gives back the space-separated tokens.

    Subwords of one word are joined by the ``▁`` decoder, so ``decode(...,
    skip_special_tokens=True)`` returns plain (detokenized-able) text. Characters never seen
    in training become ``unk_token`` (and vanish when decoding with ``skip_special_tokens``).

    Args:
        texts: a ``datasets.Dataset`` with ``columns``, or an iterable of sentences.
        vocab_size: target vocabulary size, special tokens included (BPE stops earlier when
            it runs out of pairs seen ``min_frequency`` times).
        model: ``"bpe"`` or ``"unigram"``.
        min_frequency: BPE merges need pairs seen at least this often (ignored by Unigram).
        add_eos: append ``eos_token`` to every encoded sentence (source and target).

    Returns:
        :class:`transformers.PreTrainedTokenizerFast` with ``pad_token`` (id 0), ``bos_token``
        (1), ``eos_token`` (2) and ``unk_token`` (3) set, ``model_input_names`` =
        ``["input_ids", "attention_mask"]`` and right padding.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = [pad_token, bos_token, eos_token, unk_token]
    if len(set(specials)) != 4:
        raise InvalidValueError(f"pad, bos, eos and unk tokens must differ, got {specials}")
    if model not in ("bpe", "unigram"):
        raise InvalidValueError(f"model must be 'bpe' or 'unigram', got {model!r}")
    if vocab_size <= len(specials):
        raise InvalidValueError(f"vocab_size={vocab_size} leaves no room beyond the {len(specials)} special tokens")

    if model == "bpe":
        tok = Tokenizer(models.BPE(unk_token=unk_token, fuse_unk=True))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, show_progress=show_progress
        )
    else:
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token=unk_token, show_progress=show_progress
        )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    )
    if pretokenized:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.WhitespaceSplit(),
                pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True),
                pre_tokenizers.Punctuation(behavior="isolated"),
            ]
        )
    tok.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)

    lines = _pair_texts(texts, columns)
    tok.train_from_iterator(lines, trainer=trainer)
    if tok.get_vocab_size() <= len(specials):
        raise InvalidValueError("cannot build a vocabulary: the corpus contains no text")
    ids = [tok.token_to_id(t) for t in specials]
    if ids != list(range(len(specials))):
        raise RuntimeError(f"special tokens {specials} got ids {ids}, expected 0..{len(specials) - 1}")
    if add_eos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {eos_token}",
            pair=f"$A {eos_token} $B:1 {eos_token}:1",
            special_tokens=[(eos_token, tok.token_to_id(eos_token))],
        )

    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad_token,
        bos_token=bos_token,
        eos_token=eos_token,
        unk_token=unk_token,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
        padding_side="right",
    )


# --------------------------------------------------------------------------- #
# Length filtering
# --------------------------------------------------------------------------- #
def _lengths(texts: list[str], tokenizer) -> list[int]:
    """Tokens per sentence: subwords (no special tokens) with a tokenizer, else whitespace words."""
    if tokenizer is None:
        return [len(t.split()) for t in texts]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is not None:
        return [len(e.ids) for e in fast(texts, add_special_tokens=False)]
    enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return [len(x) for x in enc["input_ids"]]


def filter_by_length(
    data,
    tokenizer=None,
    *,
    min_tokens: int = 1,
    max_tokens: int | None = None,
    max_ratio: float | None = None,
    splits: Sequence[str] = ("train",),
    source_column: str = "source",
    target_column: str = "target",
):
    """Drop pairs whose source or target length is outside ``[min_tokens, max_tokens]`` or whose
    length ratio (longer / shorter side) exceeds ``max_ratio``.

    Lengths are subword tokens without special tokens when ``tokenizer`` is given, else
    whitespace-separated words. ``data`` is a ``Dataset`` (filtered as a whole) or a
    ``DatasetDict``, of which only ``splits`` (default: ``train``) are filtered -- never
    filter the evaluation splits you report BLEU on. The default ``min_tokens=1`` only drops
    pairs with an empty side.

    Returns:
        the same kind of object, row order kept.
    """
    import datasets

    if min_tokens < 0 or (max_tokens is not None and max_tokens < min_tokens):
        raise InvalidValueError(f"need 0 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    if max_ratio is not None and max_ratio < 1:
        raise InvalidValueError(f"max_ratio must be >= 1, got {max_ratio}")

    def keep(src: list[str], tgt: list[str]) -> list[bool]:
        out = []
        for ls, lt in zip(_lengths(src, tokenizer), _lengths(tgt, tokenizer)):
            ok = min(ls, lt) >= min_tokens and (max_tokens is None or max(ls, lt) <= max_tokens)
            if ok and max_ratio is not None:
                ok = max(ls, lt) <= max_ratio * max(min(ls, lt), 1)
            out.append(ok)
        return out

    def run(ds):
        return ds.filter(keep, batched=True, input_columns=[source_column, target_column])

    if isinstance(data, datasets.DatasetDict):
        canon = {_canonical_split(s) for s in splits}
        return datasets.DatasetDict({k: run(v) if k in canon else v for k, v in data.items()})
    return run(data)


# --------------------------------------------------------------------------- #
# Encoding and batching
# --------------------------------------------------------------------------- #
def make_tokenize_function(
    tokenizer,
    *,
    max_source_length: int | None = None,
    max_target_length: int | None = None,
    source_column: str = "source",
    target_column: str = "target",
) -> Callable[[Mapping[str, list]], dict[str, list]]:
    """A batched ``Dataset.map`` function: ``{"source": [...], "target": [...]}`` ->
    ``{"input_ids", "attention_mask", "labels"}`` (lists of int lists).

    ``input_ids`` = source ids + eos, ``labels`` = target ids + eos (the decoder input is the
    labels shifted right after ``decoder_start_token_id``, done by the model or the collator).
    With ``max_*_length`` longer sequences are truncated, the eos kept last.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidValueError("the tokenizer has no eos token: labels must end with one")

    def _with_eos(rows: list[list[int]], max_len: int | None) -> list[list[int]]:
        out = []
        for ids in rows:
            ids = list(ids)
            if not ids or ids[-1] != eos:
                ids.append(eos)
                if max_len is not None and len(ids) > max_len:
                    ids = ids[: max_len - 1] + [eos]
            out.append(ids)
        return out

    def tokenize(batch: Mapping[str, list]) -> dict[str, list]:
        enc = tokenizer(
            list(batch[source_column]),
            truncation=max_source_length is not None,
            max_length=max_source_length,
            return_token_type_ids=False,
        )
        lab = tokenizer(
            text_target=list(batch[target_column]),
            truncation=max_target_length is not None,
            max_length=max_target_length,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        input_ids = _with_eos(enc["input_ids"], max_source_length)
        return {
            "input_ids": input_ids,
            "attention_mask": [[1] * len(ids) for ids in input_ids],
            "labels": _with_eos(lab, max_target_length),
        }

    return tokenize


def tokenize_translation(
    data,
    tokenizer,
    *,
    max_source_length: int | None = None,
    max_target_length: int | None = None,
    source_column: str = "source",
    target_column: str = "target",
    keep_text: bool = False,
    batch_size: int = 1000,
    num_proc: int | None = None,
):
    """Apply :func:`make_tokenize_function` to a ``Dataset`` or every split of a ``DatasetDict``.

    Returns the same kind of object with ``input_ids``, ``attention_mask`` and ``labels``
    columns (the text columns are removed unless ``keep_text``); feed it to
    :func:`translation_collator`.
    """
    import datasets

    fn = make_tokenize_function(
        tokenizer,
        max_source_length=max_source_length,
        max_target_length=max_target_length,
        source_column=source_column,
        target_column=target_column,
    )

    def run(ds):
        remove = [] if keep_text else [c for c in (source_column, target_column) if c in ds.column_names]
        return ds.map(fn, batched=True, batch_size=batch_size, num_proc=num_proc, remove_columns=remove)

    if isinstance(data, datasets.DatasetDict):
        return datasets.DatasetDict({k: run(v) for k, v in data.items()})
    return run(data)


def translation_collator(
    tokenizer,
    model=None,
    *,
    pad_to_multiple_of: int | None = None,
    label_pad_token_id: int = IGNORE_INDEX,
    return_tensors: str = "pt",
):
    """A :class:`transformers.DataCollatorForSeq2Seq` for :func:`tokenize_translation` rows.

    Pads ``input_ids`` with the tokenizer's pad id and ``attention_mask`` with 0 (right side),
    ``labels`` with ``label_pad_token_id`` (-100, ignored by the loss), to the longest row of
    the batch (or a multiple of ``pad_to_multiple_of``). With ``model`` (an encoder-decoder)
    it also adds ``decoder_input_ids`` (labels shifted right after the decoder start token).
    Rows must hold only token columns (``tokenize_translation(..., keep_text=False)``).
    """
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token_id is None:
        raise InvalidValueError("the tokenizer has no pad token: set tokenizer.pad_token first")
    return DataCollatorForSeq2Seq(
        tokenizer,
        model=model,
        padding="longest",
        pad_to_multiple_of=pad_to_multiple_of,
        label_pad_token_id=label_pad_token_id,
        return_tensors=return_tensors,
    )
