"""Language-modelling data: text splits, tokenizers and LM batching.

Three layers, each usable on its own:

1. **Splits** -- :func:`load_text_splits` / :func:`load_ptb` return a
   :class:`datasets.DatasetDict` with splits ``train`` / ``validation`` / ``test``
   and a single ``text`` column (one corpus line per row), read either from a
   local directory of ``.txt`` files or from a Hugging Face Hub dataset.
2. **Tokenizers** -- :func:`train_word_tokenizer` (word level, Mikolov-PTB style)
   and :func:`train_bpe_tokenizer` (byte-level BPE) build a ``tokenizers``
   pipeline and wrap it as :class:`transformers.PreTrainedTokenizerFast`, so
   ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` work next to a model.
   Both append an end-of-sentence token to every line when encoding.
3. **Batching** -- :class:`StreamBatches` (contiguous streams for stateful
   truncated BPTT, ``input_ids`` + already-aligned ``shift_labels``) and
   :func:`group_texts` (fixed-length blocks with HF ``labels`` for Transformers).

Every path works from local files; only :func:`load_text_splits` with a Hub
name (and :func:`load_ptb` without ``data_dir``) touches the network.
"""

from __future__ import annotations

import collections
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from seqkd.errors import InvalidValueError, MissingInputError

SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""Canonical split names of the returned :class:`~datasets.DatasetDict`."""

# Accepted aliases (file names / Hub split names) for each canonical split.
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("validation", "valid", "dev"),
    "test": ("test",),
}

PTB_HUB_NAME = "ptb_text_only"
PTB_HUB_COLUMN = "sentence"
PTB_FILES: dict[str, str] = {
    "train": "ptb.train.txt",
    "validation": "ptb.valid.txt",
    "test": "ptb.test.txt",
}

UNK_TOKEN = "<unk>"
EOS_TOKEN = "<eos>"

__all__ = [
    "SPLITS",
    "PTB_HUB_NAME",
    "PTB_HUB_COLUMN",
    "PTB_FILES",
    "find_split_files",
    "read_text_file",
    "load_text_splits",
    "load_ptb",
    "train_word_tokenizer",
    "train_bpe_tokenizer",
    "encode_stream",
    "StreamBatches",
    "token_fingerprint",
    "stream_dataloader",
    "group_texts",
    "prompt_completions",
    "PromptCompletionCollator",
]


# --------------------------------------------------------------------------- #
# Splits
# --------------------------------------------------------------------------- #
def canonical_split(name: str, aliases: Mapping[str, Sequence[str]] = SPLIT_ALIASES) -> str:
    """The canonical name (train / validation / test) of a split called ``name`` under ``aliases``."""
    for canon, names in aliases.items():
        if name in names:
            return canon
    raise InvalidValueError(
        f"unknown split {name!r}: expected one of "
        + ", ".join(f"{c} (aliases: {', '.join(a)})" for c, a in aliases.items())
    )


def load_hub_splits(loader, source, hub_config, splits: Sequence[str], aliases: Mapping[str, Sequence[str]], **kwargs):
    """``{canonical split: Dataset}`` from ``loader(source, hub_config, **kwargs)`` (a ``datasets.load_dataset``),
    matching the Hub's split names through ``aliases``; a missing split names the aliases looked for."""
    import datasets

    try:
        loaded = loader(os.fspath(source), hub_config, **kwargs)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        # Offline, or a name that is neither a local folder nor a Hub dataset (often a misspelt path).
        raise MissingInputError(
            f"dataset {os.fspath(source)!r} is not a local folder, and the Hub could not serve it ({error}): check "
            "the path (or data_dir), or go online for a Hub dataset"
        ) from error
    if not isinstance(loaded, datasets.DatasetDict):
        raise InvalidValueError(f"load_dataset({source!r}) did not return a DatasetDict (got {type(loaded).__name__})")
    by_canon: dict[str, str] = {}
    for name in loaded:
        try:
            by_canon.setdefault(canonical_split(name, aliases), name)
        except ValueError:
            continue
    for split in splits:
        if split not in by_canon:
            raise InvalidValueError(
                f"Hub dataset {source!r} has no {split!r} split "
                f"(looked for {', '.join(aliases[split])}; it has {', '.join(loaded)})"
            )
    return {split: loaded[by_canon[split]] for split in splits}


def find_one_file(root: Path, names: Sequence[str], patterns: Sequence[str], what: str, hint: str) -> Path | None:
    """The first of ``names`` that exists in ``root``, else the single file matching ``patterns``, else None;
    several matches are ambiguous: a ``ValueError`` naming them, ``what`` was looked for, and ``hint``."""
    path = next((root / n for n in names if (root / n).is_file()), None)
    if path is None and patterns:
        matches = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})
        if len(matches) > 1:
            raise InvalidValueError(
                f"ambiguous {what} in {str(root)!r}: {', '.join(m.name for m in matches)} all match; {hint}"
            )
        path = matches[0] if matches else None
    return path


def _candidate_names(split: str) -> list[str]:
    """File names looked for, in order of preference, for a canonical split."""
    names: list[str] = []
    for alias in SPLIT_ALIASES[split]:
        names.append(f"{alias}.txt")
    for alias in SPLIT_ALIASES[split]:
        names.append(f"ptb.{alias}.txt")
    return names


def find_split_files(
    data_dir: str | os.PathLike, splits: Sequence[str] = SPLITS
) -> dict[str, Path]:
    """Locate one text file per split in ``data_dir``.

    For each split the names ``{alias}.txt`` then ``ptb.{alias}.txt`` are tried
    (aliases: ``validation``/``valid``/``dev``), and finally the pattern
    ``*.{alias}.txt`` when it matches exactly one file (e.g. ``wiki.valid.txt``).

    Raises:
        FileNotFoundError: the directory does not exist, or a split has no file;
            the message names the directory and every name/pattern looked for.
        ValueError: the fallback pattern matches several files.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise MissingInputError(f"data directory {str(root)!r} does not exist or is not a directory")
    found: dict[str, Path] = {}
    for split in splits:
        canon = canonical_split(split)
        names = _candidate_names(canon)
        patterns = [f"*.{a}.txt" for a in SPLIT_ALIASES[canon]]
        path = find_one_file(
            root, names, patterns, f"{canon!r} split", f"pass files={{'{canon}': ...}} explicitly"
        )
        if path is None:
            raise MissingInputError(
                f"no {canon!r} split file in {str(root)!r}: looked for "
                f"{', '.join(names + patterns)}"
            )
        found[canon] = path
    return found


def read_text(path: str | os.PathLike) -> str:
    """The whole of a UTF-8 text file, plain or gzip-compressed (name ending in ``.gz``), universal newlines.

    Bytes that are not UTF-8 and a truncated ``.gz`` file are refused with the file's name and where the problem is,
    rather than read as garbage or as a shorter corpus.
    """
    import gzip
    import zlib

    path = os.fspath(path)
    compressed = path.endswith(".gz")
    try:
        if compressed:
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise InvalidValueError(f"{path} is a damaged or truncated gzip file ({error}): download or copy it again") from error
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise InvalidValueError(
            f"{path} is not UTF-8 text: byte {error.start} (line {line}) is {raw[error.start:error.start + 1]!r}; "
            "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from error
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text_file(path: str | os.PathLike) -> list[str]:
    """Lines of a UTF-8 text file, newline characters removed, nothing else changed.

    Lines are split on ``\\n`` after universal-newline decoding (``\\r\\n`` and
    ``\\r`` count as newlines), like iterating over the file; a final newline
    does not create an extra empty line.
    """
    data = read_text(path)
    if not data:
        return []
    lines = data.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def _check_not_empty(lines: Sequence[str], split: str, where: str) -> None:
    if not any(line.strip() for line in lines):
        raise InvalidValueError(
            f"split {split!r} is empty: {where} contains no text "
            f"({len(lines)} line(s), all blank)"
        )


def _looks_local(source: str | os.PathLike) -> bool:
    if isinstance(source, Path):
        return True
    s = os.fspath(source)
    return (
        os.path.exists(os.path.expanduser(s))
        or s.startswith(("/", "./", "../", "~", "."))
        or (os.sep != "/" and os.sep in s)
    )


def load_text_splits(
    source: str | os.PathLike,
    *,
    splits: Sequence[str] = SPLITS,
    files: Mapping[str, str | os.PathLike] | None = None,
    hub_config: str | None = None,
    text_column: str | None = None,
    drop_empty_lines: bool = False,
    **load_dataset_kwargs,
):
    """Load LM text splits as a :class:`datasets.DatasetDict` with a ``text`` column.

    Args:
        source: a local directory (see :func:`find_split_files` for the file
            names accepted: PTB's ``ptb.{train,valid,test}.txt`` or
            ``{train,validation|valid,test}.txt``) or a Hub dataset name passed to
            :func:`datasets.load_dataset`. A string is treated as local when it
            exists on disk or starts with ``/``, ``.`` or ``~``; anything else
            (``"name"``, ``"org/name"``) is a Hub name.
        splits: which splits to load (canonical names or aliases); the result
            always uses the canonical ``train`` / ``validation`` / ``test`` keys.
        files: explicit ``{split: path}`` overriding the look-up (local only;
            relative paths are resolved against ``source``).
        hub_config: dataset configuration name for the Hub (``load_dataset``'s
            ``name``).
        text_column: column holding the text in a Hub dataset. Default: ``text``
            if present, else the only string column; it is renamed to ``text``.
        drop_empty_lines: drop blank lines. Default ``False``, like the classic
            word-LM corpus readers, where every line -- blank or not -- ends with
            an end-of-sentence token.
        **load_dataset_kwargs: forwarded to :func:`datasets.load_dataset`.

    Returns:
        ``DatasetDict({split: Dataset({"text": [...]})})``, one row per line in
        file order.

    Raises:
        FileNotFoundError: missing directory / split file (names the paths tried).
        ValueError: a split contains no text, an unknown split or a missing column.
    """
    import datasets

    canon_splits = [canonical_split(s) for s in splits]
    if not canon_splits:
        raise InvalidValueError("splits must name at least one split")

    out = {}
    if files is not None or _looks_local(source):
        root = Path(source).expanduser()
        paths: dict[str, Path] = {}
        explicit = {canonical_split(k): Path(v) for k, v in (files or {}).items()}
        for split, p in explicit.items():
            p = p if p.is_absolute() else root / p
            if split in canon_splits and not p.is_file():
                raise MissingInputError(f"{split!r} split file {str(p)!r} does not exist")
            paths[split] = p
        missing = [s for s in canon_splits if s not in paths]
        if missing:
            paths.update(find_split_files(root, missing))
        for split in canon_splits:
            lines = read_text_file(paths[split])
            _check_not_empty(lines, split, f"file {str(paths[split])!r}")
            if drop_empty_lines:
                lines = [line for line in lines if line.strip()]
            out[split] = datasets.Dataset.from_dict({"text": lines})
        return datasets.DatasetDict(out)

    # ---- Hugging Face Hub -------------------------------------------------- #
    hub_splits = load_hub_splits(load_dataset, source, hub_config, canon_splits, SPLIT_ALIASES, **load_dataset_kwargs)
    for split in canon_splits:
        ds = hub_splits[split]
        col = text_column
        if col is None:
            if "text" in ds.column_names:
                col = "text"
            else:
                str_cols = [
                    c for c, f in ds.features.items()
                    if getattr(f, "dtype", None) in ("string", "large_string")
                ]
                if len(str_cols) != 1:
                    raise InvalidValueError(
                        f"cannot tell the text column of Hub dataset {source!r}: "
                        f"columns are {ds.column_names}; pass text_column="
                    )
                col = str_cols[0]
        if col not in ds.column_names:
            raise InvalidValueError(
                f"Hub dataset {source!r} split {split!r} has no column {col!r} "
                f"(columns: {ds.column_names})"
            )
        ds = ds.select_columns([col])
        if col != "text":
            ds = ds.rename_column(col, "text")
        _check_not_empty(ds["text"], split, f"Hub dataset {source!r} split {split!r}")
        if drop_empty_lines:
            ds = ds.filter(lambda t: bool(t.strip()), input_columns="text")
        out[split] = ds
    return datasets.DatasetDict(out)


def load_dataset(*args, **kwargs):
    """Indirection over :func:`datasets.load_dataset` (kept patchable for tests)."""
    import datasets

    return datasets.load_dataset(*args, **kwargs)


def load_ptb(
    data_dir: str | os.PathLike | None = None,
    *,
    splits: Sequence[str] = SPLITS,
    hub_name: str = PTB_HUB_NAME,
    hub_column: str = PTB_HUB_COLUMN,
    **load_dataset_kwargs,
):
    """Mikolov's Penn Treebank as a ``DatasetDict`` with a ``text`` column.

    ``data_dir`` is either the directory holding ``ptb.{train,valid,test}.txt``
    or a parent of a ``ptb/`` directory holding them; without it the Hub dataset
    ``ptb_text_only`` (column ``sentence``) is downloaded.
    """
    if data_dir is None:
        return load_text_splits(hub_name, splits=splits, text_column=hub_column, **load_dataset_kwargs)
    root = Path(data_dir).expanduser()
    if not (root / PTB_FILES["train"]).is_file() and (root / "ptb" / PTB_FILES["train"]).is_file():
        root = root / "ptb"
    canon = [canonical_split(s) for s in splits]
    files = {s: PTB_FILES[s] for s in canon if (root / PTB_FILES[s]).is_file()}
    return load_text_splits(root, splits=canon, files=files or None)


# --------------------------------------------------------------------------- #
# Tokenizers
# --------------------------------------------------------------------------- #
def _as_texts(texts, text_column: str = "text") -> Iterable[str]:
    """Accept a ``datasets.Dataset`` (its ``text_column``), or any iterable of str."""
    if isinstance(texts, str):
        raise TypeError("expected an iterable of lines, got a single str")
    column_names = getattr(texts, "column_names", None)
    if column_names is not None:
        if isinstance(column_names, dict):  # DatasetDict
            raise TypeError("pass one split (e.g. splits['train']), not a whole DatasetDict")
        if text_column not in column_names:
            raise InvalidValueError(f"dataset has no {text_column!r} column (columns: {column_names})")
        return list(texts[text_column])
    return texts


def _eos_post_processor(eos_token: str, eos_id: int):
    from tokenizers import processors

    return processors.TemplateProcessing(
        single=f"$A {eos_token}",
        pair=f"$A {eos_token} $B:1 {eos_token}:1",
        special_tokens=[(eos_token, eos_id)],
    )


def _check_contiguous_ids(tok) -> None:
    vocab = tok.get_vocab(with_added_tokens=True)
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise RuntimeError(
            f"tokenizer ids are not contiguous 0..{len(ids) - 1} (max id {ids[-1] if ids else None}); "
            "a special token probably collides with a corpus word"
        )


def _wrap(tok, **special_tokens):
    from transformers import PreTrainedTokenizerFast

    _check_contiguous_ids(tok)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        clean_up_tokenization_spaces=False,
        **{k: v for k, v in special_tokens.items() if v is not None},
    )


def train_word_tokenizer(
    texts,
    *,
    unk_token: str = UNK_TOKEN,
    eos_token: str = EOS_TOKEN,
    min_frequency: int = 1,
    max_vocab_size: int | None = None,
    add_eos: bool = True,
    text_column: str = "text",
):
    """Word-level tokenizer (whitespace split) for word LMs such as PTB.

    The vocabulary is ``[unk_token, eos_token]`` followed by the corpus words
    sorted by decreasing frequency (ties alphabetically), keeping words seen at
    least ``min_frequency`` times and at most ``max_vocab_size`` entries in total.
    A corpus word equal to ``unk_token`` (PTB's ``<unk>``) maps to the unk id.
    With ``add_eos`` the post-processor appends ``eos_token`` to every encoded
    line (``add_special_tokens=True``, the default when calling the tokenizer).

    For PTB's train split this gives exactly 10,000 entries and 929,589 tokens.

    Args:
        texts: iterable of lines, or a ``datasets.Dataset`` with ``text_column``.

    Returns:
        :class:`transformers.PreTrainedTokenizerFast` with ``unk_token`` and
        ``eos_token`` set (ids 0 and 1); ``decode`` joins words with spaces.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    if unk_token == eos_token:
        raise InvalidValueError("unk_token and eos_token must differ")
    if min_frequency < 1:
        raise InvalidValueError(f"min_frequency must be >= 1, got {min_frequency}")
    if max_vocab_size is not None and max_vocab_size < 2:
        raise InvalidValueError(f"max_vocab_size must leave room for {unk_token} and {eos_token}")
    # Count with the same pre-tokenizer as at encoding time. (We build the vocabulary
    # here rather than with tokenizers' WordLevelTrainer: the trainer leaves a hole
    # in the ids when a special token, like PTB's <unk>, also occurs in the corpus.)
    pre = pre_tokenizers.WhitespaceSplit()
    counts: collections.Counter[str] = collections.Counter()
    n_lines = 0
    for line in _as_texts(texts, text_column):
        n_lines += 1
        counts.update(w for w, _ in pre.pre_tokenize_str(line))
    if not counts:
        raise InvalidValueError(f"cannot build a vocabulary: the corpus ({n_lines} line(s)) contains no words")
    vocab = {unk_token: 0, eos_token: 1}
    for word, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if c < min_frequency or (max_vocab_size is not None and len(vocab) >= max_vocab_size):
            break
        vocab.setdefault(word, len(vocab))

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    tok.pre_tokenizer = pre
    tok.add_special_tokens([unk_token, eos_token])
    if add_eos:
        tok.post_processor = _eos_post_processor(eos_token, vocab[eos_token])
    return _wrap(tok, unk_token=unk_token, eos_token=eos_token)


def train_bpe_tokenizer(
    texts,
    vocab_size: int,
    *,
    min_frequency: int = 2,
    eos_token: str = EOS_TOKEN,
    add_eos: bool = True,
    special_tokens: Sequence[str] = (),
    add_prefix_space: bool = False,
    text_column: str = "text",
    show_progress: bool = False,
):
    """Byte-level BPE tokenizer (GPT-2 style) with at most ``vocab_size`` entries.

    The vocabulary holds ``eos_token`` (id 0), then ``special_tokens`` (which are
    never split when encoding, e.g. ``("<unk>",)`` for PTB-style text), the 256
    byte symbols and the learned merges; it is smaller than ``vocab_size`` when the
    corpus runs out of merges with ``min_frequency``. Byte level means no unknown
    token is ever needed and ``decode`` inverts ``encode`` exactly. With ``add_eos``
    every encoded line ends with ``eos_token``.

    Returns:
        :class:`transformers.PreTrainedTokenizerFast` with ``eos_token`` set.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = [eos_token, *[t for t in special_tokens if t != eos_token]]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise InvalidValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
            f"{len(alphabet)} byte symbols + {len(specials)} special token(s)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )
    lines = _as_texts(texts, text_column)
    tok.train_from_iterator(lines, trainer=trainer)
    if tok.get_vocab_size() <= len(specials):
        raise InvalidValueError("cannot build a vocabulary: the corpus contains no text")
    byte_level = processors.ByteLevel(trim_offsets=False)
    if add_eos:
        tok.post_processor = processors.Sequence(
            [byte_level, _eos_post_processor(eos_token, tok.token_to_id(eos_token))]
        )
    else:
        tok.post_processor = byte_level
    extra = [t for t in specials if t != eos_token]
    return _wrap(tok, eos_token=eos_token, additional_special_tokens=extra or None)


# --------------------------------------------------------------------------- #
# Batching
# --------------------------------------------------------------------------- #
def encode_stream(tokenizer, texts, *, text_column: str = "text", chunk_size: int = 10_000) -> torch.Tensor:
    """Encode lines (each followed by the tokenizer's end-of-line token, if its
    post-processor adds one) and concatenate them into one 1-D ``LongTensor``."""
    lines = _as_texts(texts, text_column)
    if not isinstance(lines, list):
        lines = list(lines)
    # Fast path: the Rust tokenizer without offsets/attention masks (same ids).
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    parts: list[np.ndarray] = []
    for start in range(0, len(lines), chunk_size):
        chunk = lines[start : start + chunk_size]
        if fast is not None:
            enc = [e.ids for e in fast(chunk, add_special_tokens=True)]
        else:
            enc = tokenizer(
                chunk,
                add_special_tokens=True,
                return_attention_mask=False,
                return_token_type_ids=False,
                verbose=False,
            )["input_ids"]
        lengths = np.fromiter((len(x) for x in enc), dtype=np.int64, count=len(enc))
        flat = np.fromiter(
            (i for ids in enc for i in ids), dtype=np.int64, count=int(lengths.sum())
        )
        parts.append(flat)
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(ids)


def token_fingerprint(token_ids) -> str:
    """sha256 of a tensor of token ids (as int64) and its shape: a cheap identity for tokenized training data."""
    import hashlib

    ids = torch.as_tensor(token_ids).to(torch.int64).contiguous()
    digest = hashlib.sha256(repr(tuple(ids.shape)).encode())
    digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


class StreamBatches(torch.utils.data.Dataset):
    """Contiguous token streams for stateful truncated BPTT (map-style dataset).

    The split's token ids form one stream of ``N`` tokens. It is cut into
    ``S = batch_size * num_processes`` equal streams of ``T = N // S`` tokens
    (``streams[s] = ids[s*T : (s+1)*T]``); the ``N - S*T`` leftover tokens at
    the very end are **dropped** (fewer than ``S``, see :attr:`dropped_tokens`).
    Process ``k`` owns streams ``k*B .. (k+1)*B - 1``, so processes never share a
    stream and all have the same number of batches.

    Item ``i`` is the whole batch ``i``::

        {"input_ids":    streams[:, i*L     : i*L + L],      # [B, L_i] LongTensor
         "shift_labels": streams[:, i*L + 1 : i*L + L + 1]}  # [B, L_i] LongTensor

    ``shift_labels[b, t]`` is the target of ``input_ids[b, t]`` (the next token:
    already aligned, do **not** shift again, no ``labels`` key). Row ``b`` of
    batch ``i+1`` continues row ``b`` of batch ``i``, so a stateful model should
    be fed the batches in order carrying its recurrent state. The last batch may
    be shorter (``L_last = (T-1) - (len-1)*L``); every token of each stream except
    its first is a target exactly once: ``num_predicted_tokens = B * (T - 1)``.

    Iterate with ``torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False)``
    (see :func:`stream_dataloader`). With ``accelerate``, pass
    ``process_index=accelerator.process_index, num_processes=accelerator.num_processes``
    and do **not** ``accelerator.prepare`` this loader (that would shard the batches
    a second time); move the batches to the device yourself.
    """

    def __init__(
        self,
        token_ids,
        batch_size: int,
        seq_len: int,
        *,
        process_index: int = 0,
        num_processes: int = 1,
    ):
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        if ids.dim() != 1:
            raise InvalidValueError(f"token_ids must be 1-D, got shape {tuple(ids.shape)}")
        if batch_size < 1 or seq_len < 1 or num_processes < 1:
            raise InvalidValueError(
                f"batch_size, seq_len and num_processes must be >= 1 "
                f"(got {batch_size}, {seq_len}, {num_processes})"
            )
        if not 0 <= process_index < num_processes:
            raise InvalidValueError(f"process_index {process_index} not in [0, {num_processes})")
        n_streams = batch_size * num_processes
        stream_len = ids.numel() // n_streams
        if stream_len < 2:
            raise InvalidValueError(
                f"{ids.numel()} tokens are too few for {n_streams} streams "
                f"(batch_size={batch_size} x num_processes={num_processes}): each stream "
                "needs at least 2 tokens"
            )
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.process_index = process_index
        self.num_processes = num_processes
        self.total_tokens = ids.numel()
        self.stream_length = stream_len
        self.dropped_tokens = ids.numel() - n_streams * stream_len
        # The whole split stays referenced (not copied): a teacher cache is written over every process' streams.
        self.token_ids = ids
        start = process_index * batch_size
        self.streams = self.all_streams[start : start + batch_size].clone()  # [B, T]
        self._len = math.ceil((stream_len - 1) / seq_len)
        self._fingerprint: str | None = None

    @property
    def all_streams(self) -> torch.Tensor:
        """Every process' streams, ``[batch_size * num_processes, stream_length]``."""
        n_streams = self.batch_size * self.num_processes
        return self.token_ids[: n_streams * self.stream_length].view(n_streams, self.stream_length)

    @property
    def fingerprint(self) -> str:
        """sha256 of every process' streams (their tokens and their number): equal for equal training data."""
        if self._fingerprint is None:
            self._fingerprint = token_fingerprint(self.all_streams)
        return self._fingerprint

    def with_num_processes(self, num_processes: int, process_index: int = 0) -> "StreamBatches":
        """The same split cut for ``num_processes`` processes of ``batch_size`` streams each."""
        return StreamBatches(
            self.token_ids, self.batch_size, self.seq_len, process_index=process_index, num_processes=num_processes
        )

    @classmethod
    def from_texts(cls, tokenizer, texts, batch_size: int, seq_len: int, **kwargs) -> "StreamBatches":
        """Encode ``texts`` with :func:`encode_stream` and build the batches."""
        text_column = kwargs.pop("text_column", "text")
        return cls(encode_stream(tokenizer, texts, text_column=text_column), batch_size, seq_len, **kwargs)

    @property
    def num_predicted_tokens(self) -> int:
        """Targets in this process's batches: ``batch_size * (stream_length - 1)``."""
        return self.batch_size * (self.stream_length - 1)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"batch index out of range (0..{self._len - 1})")
        start = i * self.seq_len
        end = min(start + self.seq_len, self.stream_length - 1)
        return {
            "input_ids": self.streams[:, start:end].contiguous(),
            "shift_labels": self.streams[:, start + 1 : end + 1].contiguous(),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(batches={len(self)}, batch_size={self.batch_size}, "
            f"seq_len={self.seq_len}, stream_length={self.stream_length}, "
            f"process={self.process_index}/{self.num_processes}, "
            f"dropped_tokens={self.dropped_tokens})"
        )


def stream_dataloader(batches: StreamBatches, **kwargs) -> torch.utils.data.DataLoader:
    """``DataLoader`` yielding the batches of ``batches`` in order (``batch_size=None``,
    no shuffling). Extra kwargs (``pin_memory``, ``num_workers``...) are forwarded."""
    for key in ("batch_size", "shuffle", "sampler", "batch_sampler"):
        if key in kwargs:
            raise InvalidValueError(f"{key} cannot be set: stream batches must come whole and in order")
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, **kwargs)


def evaluation_dataloader(dataset, batch_size: int, collate_fn=None) -> torch.utils.data.DataLoader:
    """Batches of an evaluation split in order: :class:`StreamBatches` whole (state can be carried), anything
    else (blocks, tokenized pairs) in batches of ``batch_size``."""
    if isinstance(dataset, StreamBatches):
        return stream_dataloader(dataset)
    if collate_fn is None:
        dataset = dataset.with_format("torch")
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)


def group_texts(
    texts,
    tokenizer,
    block_size: int,
    *,
    text_column: str = "text",
    drop_remainder: bool = True,
):
    """Fixed-length blocks for Transformer LMs (``run_clm``'s ``group_texts``).

    All lines are encoded (with the tokenizer's end-of-line token), concatenated
    and cut into consecutive blocks of ``block_size`` tokens over the **whole**
    split (not per ``map`` batch, so only the final partial block is affected:
    dropped when ``drop_remainder`` -- the default -- else kept as a shorter row).

    Returns:
        ``datasets.Dataset`` with columns ``input_ids`` and ``labels`` (equal to
        ``input_ids``: the Hugging Face convention, the model shifts internally, so
        the first token of each block is not a target). ``.with_format("torch")``
        gives ``[batch, block_size]`` tensors.
    """
    import datasets
    import pyarrow as pa

    if block_size < 2:
        raise InvalidValueError(f"block_size must be >= 2, got {block_size}")
    ids = encode_stream(tokenizer, texts, text_column=text_column).numpy()
    n_full = len(ids) // block_size
    if n_full == 0 and (drop_remainder or len(ids) == 0):
        raise InvalidValueError(f"the corpus has {len(ids)} tokens, fewer than block_size={block_size}")
    if drop_remainder or len(ids) % block_size == 0:
        arr = pa.FixedSizeListArray.from_arrays(pa.array(ids[: n_full * block_size]), block_size)
    else:
        offsets = np.append(np.arange(0, len(ids), block_size), len(ids)).astype(np.int32)
        arr = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids))
    return datasets.Dataset.from_dict({"input_ids": arr, "labels": arr})


# --------------------------------------------------------------------------- #
# Prompt-completion data (on-policy distillation of language models)
# --------------------------------------------------------------------------- #
def prompt_completions(texts, tokenizer, prompt_length: int, *, text_column: str = "text", max_examples: int | None = None):
    """Each line as a prompt and its completion: the prompt is the end-of-sentence token (a line's context in the
    training stream) and the line's first ``prompt_length`` tokens, the completion the rest of the line and its
    end-of-sentence token. Lines shorter than ``prompt_length`` are left out, so that every prompt has one length
    and a batch of them is generated from without padding.

    Returns:
        ``datasets.Dataset`` with ``input_ids`` (prompt + completion), ``labels`` (-100 on the prompt) and
        ``prompt_input_ids``; :class:`PromptCompletionCollator` pads a batch of them.
    """
    import datasets

    if prompt_length < 1:
        raise InvalidValueError(f"prompt_length must be >= 1, got {prompt_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidValueError("prompt-completion data needs a tokenizer with an eos token (it ends each completion)")
    lines = list(_as_texts(texts, text_column))
    if max_examples is not None:
        lines = lines[:max_examples]
    rows = {"input_ids": [], "labels": [], "prompt_input_ids": []}
    for line in lines:
        ids = tokenizer(line, add_special_tokens=False)["input_ids"]
        if len(ids) < prompt_length:
            continue
        sequence = [eos, *ids, eos]
        prompt = sequence[: prompt_length + 1]
        rows["input_ids"].append(sequence)
        rows["labels"].append([-100] * len(prompt) + sequence[len(prompt) :])
        rows["prompt_input_ids"].append(prompt)
    if not rows["input_ids"]:
        raise InvalidValueError(
            f"no line has prompt_length={prompt_length} tokens or more ({len(lines)} lines): lower prompt_length"
        )
    return datasets.Dataset.from_dict(rows)


class PromptCompletionCollator:
    """Right-pads ``input_ids`` (with ``pad_token_id``) and ``labels`` (with -100) to the longest row and adds the
    ``attention_mask``; ``prompt_input_ids``, all of one length, are stacked. Rows of one length (blocks) pass as
    they are, with an all-ones mask."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        def rows(key):
            return [torch.as_tensor(f[key], dtype=torch.long) for f in features]

        input_ids = rows("input_ids")
        longest = max(len(ids) for ids in input_ids)
        batch = {
            "input_ids": torch.stack([_pad_to(ids, longest, self.pad_token_id) for ids in input_ids]),
            "attention_mask": torch.stack([_pad_to(torch.ones_like(ids), longest, 0) for ids in input_ids]),
            "labels": torch.stack([_pad_to(labels, longest, -100) for labels in rows("labels")]),
        }
        if "prompt_input_ids" in features[0]:
            batch["prompt_input_ids"] = torch.stack(rows("prompt_input_ids"))
        return batch


def _pad_to(row: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(row, (0, length - len(row)), value=value)
