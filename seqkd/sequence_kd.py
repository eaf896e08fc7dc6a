"""Sequence-level distillation data (Kim & Rush, EMNLP 2016): the training set re-targeted by a teacher.

``seqkd distill-data`` decodes every training source with the teacher and writes a parallel corpus that
``--dataset`` reads like any other (``train.{src,tgt}``, ``validation.*`` and ``test.*`` copied unchanged):

- ``seq_kd``: the teacher's best beam hypothesis (Seq-KD);
- ``seq_inter``: among the teacher's K best, the one closest to the reference by sentence-level BLEU (smoothed)
  or chrF (Seq-Inter).

The teacher may be an ensemble (:class:`TranslationEnsemble`): its members' token distributions are averaged at
every decoding step.

Training on it is ``seqkd train --dataset D`` (Seq-KD: plain CE on the teacher's outputs) or
``seqkd distill --dataset D`` (Seq-KD + Word-KD). Decoding is done shard by shard (a fixed range of sources,
length-sorted into batches inside it); each shard is written to a ``.partial`` file, renamed, then listed with
its sha256 in ``distill_manifest.json``, so an interrupted run continues from its last whole shard and ends with
the same bytes. The split files appear only once every shard is written; a reader refuses a folder whose
manifest is not complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor

from seqkd.errors import InvalidValueError, MissingInputError
from seqkd.files import write_json_atomically, write_text_atomically

logger = logging.getLogger(__name__)

MANIFEST_FILE = "distill_manifest.json"
SHARD_DIR = "shards"
METHODS = ("seq_kd", "seq_inter")
SELECT_METRICS = ("bleu", "chrf")


@dataclass
class DistillDataArguments:
    """How ``seqkd distill-data`` decodes the training set and which pairs it keeps."""

    method: str = field(
        default="seq_kd",
        metadata={
            "help": "'seq_kd' (the teacher's best beam hypothesis) or 'seq_inter' (of its num_return_sequences best, "
            "the closest to the reference by select_metric).",
            "choices": list(METHODS),
        },
    )
    num_beams: int | None = field(
        default=None, metadata={"help": "Beam size of the teacher's decoding (1 = greedy); default 5, or 1 with do_sample."}
    )
    num_return_sequences: int | None = field(
        default=None,
        metadata={"help": "seq_inter: how many of the beam's best hypotheses to choose from (Kim & Rush: 35); "
                  "default num_beams. At most num_beams."},  # fmt: skip
    )
    select_metric: str = field(
        default="bleu",
        metadata={"help": "seq_inter: sentence-level 'bleu' (sacreBLEU, exponential smoothing) or 'chrf' against "
                  "the reference.", "choices": list(SELECT_METRICS)},  # fmt: skip
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Longest hypothesis the teacher may write."})
    shard_sentences: int = field(
        default=2000, metadata={"help": "Sources per shard: the unit an interrupted run resumes from."}
    )
    drop_empty: bool = field(default=True, metadata={"help": "Drop pairs whose hypothesis is empty."})
    max_length_ratio: float | None = field(
        default=None,
        metadata={"help": "Drop pairs whose hypothesis is more than this many times longer or shorter than the "
                  "source (in whitespace tokens), e.g. 3."},  # fmt: skip
    )
    max_ngram_repeats: int | None = field(
        default=None,
        metadata={"help": "Drop pairs whose hypothesis repeats one n-gram (of repeat_ngram_size words) more than "
                  "this many times: the teacher's degenerate loops."},  # fmt: skip
    )
    repeat_ngram_size: int = field(default=3, metadata={"help": "The n of max_ngram_repeats."})
    add_original: bool = field(
        default=False,
        metadata={"help": "Also keep every original (source, reference) pair: two targets per source, the teacher's "
                  "and the gold one."},  # fmt: skip
    )
    original_fraction: float = field(
        default=0.0,
        metadata={"help": "Give this fraction of the sources (drawn with mix_seed) their reference instead of the "
                  "teacher's hypothesis, e.g. 0.5."},  # fmt: skip
    )
    mix_seed: int = field(default=0, metadata={"help": "Seed of the draw of original_fraction."})
    prefix_length: int = field(
        default=5,
        metadata={"help": "Language models: the teacher continues the first this many tokens of every training line "
                  "(after the end-of-sentence token that precedes a line in the stream)."},  # fmt: skip
    )
    do_sample: bool = field(
        default=False,
        metadata={"help": "Sample one hypothesis per source or prefix instead of beam search (with sample_temperature "
                  "and sample_top_p; needs num_beams 1). Each shard draws from its own seed: a resumed run writes the same bytes."},  # fmt: skip
    )
    sample_temperature: float = field(default=1.0, metadata={"help": "do_sample: softmax temperature (> 0)."})
    sample_top_p: float = field(default=1.0, metadata={"help": "do_sample: nucleus sampling mass, in (0, 1]."})
    sample_seed: int = field(default=0, metadata={"help": "do_sample: seed of the first shard (shard i uses seed + i)."})
    ensemble_with: list[str] | None = field(
        default=None,
        metadata={"help": "More saved translation models decoded together with the teacher as one ensemble: at each "
                  "step the token distributions of all of them are averaged (e.g. the two teachers, or the "
                  "generations of a Born-Again chain). They must share the teacher's tokenizer."},  # fmt: skip
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise InvalidValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.select_metric not in SELECT_METRICS:
            raise InvalidValueError(f"select_metric must be 'bleu' or 'chrf', got {self.select_metric!r}")
        if self.num_beams is None:
            self.num_beams = 1 if self.do_sample else 5
        if self.num_beams < 1:
            raise InvalidValueError(f"num_beams must be >= 1, got {self.num_beams}")
        k = self.candidates
        if k < 1:
            raise InvalidValueError(f"num_return_sequences (K) must be >= 1, got {k}")
        if k > self.num_beams:
            raise InvalidValueError(
                f"num_return_sequences (K = {k}) must be <= num_beams ({self.num_beams}): beam search returns at most "
                "its beam; raise num_beams"
            )
        if self.max_new_tokens < 1:
            raise InvalidValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.shard_sentences < 1:
            raise InvalidValueError(f"shard_sentences must be >= 1, got {self.shard_sentences}")
        if self.max_length_ratio is not None and self.max_length_ratio < 1:
            raise InvalidValueError(f"max_length_ratio must be >= 1, got {self.max_length_ratio}")
        if self.max_ngram_repeats is not None and self.max_ngram_repeats < 1:
            raise InvalidValueError(f"max_ngram_repeats must be >= 1, got {self.max_ngram_repeats}")
        if self.repeat_ngram_size < 1:
            raise InvalidValueError(f"repeat_ngram_size must be >= 1, got {self.repeat_ngram_size}")
        if not 0 <= self.original_fraction <= 1:
            raise InvalidValueError(f"original_fraction must be in [0, 1], got {self.original_fraction}")
        if self.prefix_length < 0:
            raise InvalidValueError(f"prefix_length must be >= 0, got {self.prefix_length}")
        if self.sample_temperature <= 0:
            raise InvalidValueError(f"sample_temperature must be > 0, got {self.sample_temperature}")
        if not 0 < self.sample_top_p <= 1:
            raise InvalidValueError(f"sample_top_p must be in (0, 1], got {self.sample_top_p}")
        if self.do_sample and self.num_beams != 1:
            raise InvalidValueError(
                f"do_sample draws one hypothesis per source: set num_beams 1 (got {self.num_beams}), or drop do_sample "
                "for beam search"
            )
        if self.do_sample and self.method == "seq_inter":
            raise InvalidValueError("seq_inter chooses among beam search's K best: drop do_sample, or use method seq_kd")
        if self.add_original and self.original_fraction > 0:
            raise InvalidValueError(
                "add_original (both targets for every source) and original_fraction (one or the other) exclude each "
                "other: choose one"
            )

    @property
    def candidates(self) -> int:
        """K: hypotheses decoded per source (1 for seq_kd)."""
        if self.method == "seq_kd":
            return 1
        return self.num_beams if self.num_return_sequences is None else self.num_return_sequences


# --------------------------------------------------------------------------------------------------------
# An ensemble teacher.


class _AverageWithMembers(LogitsProcessor):
    """A logits processor that turns the decoding model's scores into the ensemble's: the log of the mean of every
    member's next-token probabilities.

    ``generate`` runs the first member with its own cache and beam bookkeeping; the other members read the same
    (already reordered) decoder prefixes and recompute them without a cache, so no member's state has to follow the
    beams. Tokens the generation config has banned (``-inf`` in the incoming scores: forced EOS at the length
    limit, minimum length, ...) stay banned for the ensemble.
    """

    def __init__(self, others, encoder_outputs, attention_mask):
        self.others = others
        self.encoder_outputs = encoder_outputs
        self.attention_mask = attention_mask
        self.batch_size = attention_mask.shape[0]

    def _expanded(self, member_index: int, rows: int):
        # generate() repeats every source num_beams times, next to each other: row r decodes source r // num_beams.
        repeat = rows // self.batch_size
        encoder_outputs = self.encoder_outputs[member_index]
        if repeat == 1:
            return encoder_outputs, self.attention_mask
        expanded = type(encoder_outputs)(
            **{key: value.repeat_interleave(repeat, dim=0) for key, value in encoder_outputs.items() if value is not None}
        )
        return expanded, self.attention_mask.repeat_interleave(repeat, dim=0)

    def __call__(self, input_ids, scores):
        import math

        import torch

        if input_ids.shape[0] % self.batch_size:
            raise RuntimeError(f"{input_ids.shape[0]} decoding rows do not divide into {self.batch_size} sources")
        log_probs = [torch.log_softmax(scores.float(), dim=-1)]
        for index, member in enumerate(self.others):
            encoder_outputs, attention_mask = self._expanded(index, input_ids.shape[0])
            logits = member(
                encoder_outputs=encoder_outputs, attention_mask=attention_mask, decoder_input_ids=input_ids,
                use_cache=False,
            ).logits[:, -1, : scores.shape[-1]]  # fmt: skip
            log_probs.append(torch.log_softmax(logits.float(), dim=-1))
        mixed = torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(log_probs))
        mixed = mixed.masked_fill(torch.isneginf(scores), float("-inf"))
        return torch.log_softmax(mixed, dim=-1).to(scores.dtype)


class TranslationEnsemble(torch.nn.Module):
    """Encoder-decoders that translate as one: at each decoding step the mean of their next-token distributions
    (greedy and beam search). The members must share one vocabulary and the same special tokens.

    ``generate`` takes what a member's ``generate`` takes; ``config`` and ``generation_config`` are the first
    member's.
    """

    def __init__(self, members):
        super().__init__()
        if not members:
            raise InvalidValueError("an ensemble needs at least one model")
        self.members = torch.nn.ModuleList(members)
        first = members[0].config
        for index, member in enumerate(members[1:], start=1):
            config = member.config
            if not getattr(config, "is_encoder_decoder", False):
                raise InvalidValueError(
                    f"ensemble member {index} ({type(member).__name__}) is not an encoder-decoder: every member must translate"
                )
            for key in ("vocab_size", "decoder_start_token_id", "eos_token_id", "pad_token_id"):
                if getattr(config, key, None) != getattr(first, key, None):
                    raise InvalidValueError(
                        f"ensemble member {index} has {key}={getattr(config, key, None)!r} but the first member has "
                        f"{getattr(first, key, None)!r}: the members must share one tokenizer"
                    )

    @property
    def config(self):
        return self.members[0].config

    @property
    def generation_config(self):
        return self.members[0].generation_config

    def fingerprints(self) -> list[str]:
        from seqkd.teacher_cache import model_fingerprint

        return [model_fingerprint(member) for member in self.members]

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, logits_processor=None, **kwargs):
        from transformers import LogitsProcessorList

        first, others = self.members[0], list(self.members[1:])
        if not others:
            return first.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=logits_processor, **kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        encoder_outputs = [
            member.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True) for member in others
        ]
        average = _AverageWithMembers(others, encoder_outputs, attention_mask)
        # The ensemble's average must come before any caller's processor, which then sees the ensemble's scores.
        processors = LogitsProcessorList([average, *(logits_processor or [])])
        return first.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=processors, **kwargs)


# --------------------------------------------------------------------------------------------------------
# Choosing and filtering hypotheses.


def select_closest(candidates: list[str], reference: str, *, metric: str = "bleu", tokenize: str = "13a") -> int:
    """The index of the candidate with the highest sentence-level score against ``reference`` (the first, i.e. the
    beam's better-ranked one, among equals): Seq-Inter's choice."""
    from sacrebleu.metrics import BLEU, CHRF

    if not candidates:
        raise InvalidValueError("select_closest needs at least one candidate")
    scorer = BLEU(tokenize=tokenize, effective_order=True) if metric == "bleu" else CHRF()
    scores = [scorer.sentence_score(candidate, [reference]).score for candidate in candidates]
    return max(range(len(candidates)), key=lambda i: (scores[i], -i))


def drop_reason(source: str, hypothesis: str, args: DistillDataArguments) -> str | None:
    """Why a (source, hypothesis) pair is filtered out, or None to keep it."""
    words = hypothesis.split()
    if not words:
        return "empty" if args.drop_empty else None
    if args.max_length_ratio is not None:
        ratio = len(words) / max(len(source.split()), 1)
        if ratio > args.max_length_ratio or ratio < 1 / args.max_length_ratio:
            return "length_ratio"
    if args.max_ngram_repeats is not None:
        n = args.repeat_ngram_size
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        if counts and max(counts.values()) > args.max_ngram_repeats:
            return "repeated_ngram"
    return None


# --------------------------------------------------------------------------------------------------------
# Writing.


def _text_sha256(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _write_lines_atomically(path: str, lines: list[str]) -> None:
    write_text_atomically(path, "".join(line + "\n" for line in lines))


def _one_line(text: str) -> str:
    # A hypothesis is one line of the corpus: a newline inside it would shift every later pair.
    return " ".join(text.split())


def continue_prefixes(
    model,
    tokenizer,
    lines: list[str],
    *,
    prefix_length: int,
    max_new_tokens: int,
    num_beams: int = 1,
    batch_size: int = 32,
    device=None,
    **generate_kwargs,
) -> list[str]:
    """A causal language model's continuation of the first ``prefix_length`` tokens of each line: the line's prefix
    followed by what the model writes up to its end-of-sentence token (or ``max_new_tokens``).

    Each prompt starts with the end-of-sentence token, the context a line has in the training stream. Lines are
    batched by prefix length, so no prompt is padded.
    """
    eos = tokenizer.eos_token_id
    start = [eos] if eos is not None else []
    prefixes = [tokenizer(line, add_special_tokens=False)["input_ids"][:prefix_length] for line in lines]
    if eos is None and any(not prefix for prefix in prefixes):
        raise InvalidValueError(
            "a line has no tokens to continue and the tokenizer has no eos token to start from: raise prefix_length "
            "or drop empty lines"
        )
    if device is None:
        device = next(model.parameters()).device
    by_length: dict[int, list[int]] = {}
    for index, prefix in enumerate(prefixes):
        by_length.setdefault(len(prefix), []).append(index)
    outputs: list[str | None] = [None] * len(lines)
    was_training = model.training
    model.eval()
    try:
        for length in sorted(by_length):
            indices = by_length[length]
            for first in range(0, len(indices), batch_size):
                batch = indices[first : first + batch_size]
                input_ids = torch.tensor([start + prefixes[i] for i in batch], device=device)
                with torch.no_grad():
                    generated = model.generate(
                        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), num_beams=num_beams,
                        max_new_tokens=max_new_tokens, eos_token_id=eos,
                        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                        **generate_kwargs,
                    )  # fmt: skip
                for row, i in enumerate(batch):
                    new = generated[row, input_ids.shape[1] :].tolist()
                    if eos in new:
                        new = new[: new.index(eos)]
                    # Special tokens that are words of the corpus (PTB's <unk>) stay; the end of sentence was cut.
                    text = tokenizer.decode(prefixes[i] + new, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                    outputs[i] = _one_line(text)
    finally:
        model.train(was_training)
    return outputs  # type: ignore[return-value]


def write_distilled_data(
    teacher,
    tokenizer,
    corpus,
    output_dir: str,
    args: DistillDataArguments,
    *,
    source_lang: str | None = None,
    target_lang: str | None = None,
    batch_size: int = 32,
    bleu_tokenize: str = "13a",
    max_source_length: int | None = None,
    device=None,
    show_progress: bool = True,
) -> dict:
    """Decode ``corpus['train']`` with ``teacher`` and write the distilled corpus to ``output_dir``.

    Args:
        teacher: an encoder-decoder with ``generate`` (or a :class:`TranslationEnsemble`), or a causal language
            model with ``generate``; ``tokenizer`` its tokenizer.
        corpus: a ``DatasetDict``: for a translation teacher with ``source`` / ``target`` columns
            (:func:`seqkd.pipeline.load_parallel_corpus`), for a language model with a ``text`` column
            (:func:`seqkd.pipeline.load_corpus`); ``validation`` and ``test``, when present, are copied unchanged.
        source_lang, target_lang: translation only: the file suffixes of the written corpus.
        bleu_tokenize: sacreBLEU's tokenizer for Seq-Inter's sentence BLEU ('none' for pretokenized text).
        max_source_length: sources are truncated to this many tokens, as training truncates them.
    Returns:
        The manifest: method, decoding settings, teacher and data fingerprints, shards with sha256, counts.
    """
    from tqdm.auto import tqdm

    from seqkd.evaluation import translate_n_best
    from seqkd.teacher_cache import _file_sha256, _whole_shards, model_fingerprint, tokenizer_fingerprint

    config = getattr(teacher, "config", None)
    translation = bool(getattr(config, "is_encoder_decoder", False))
    if config is None or not hasattr(teacher, "generate"):
        raise InvalidValueError(
            f"distill-data decodes with the teacher: it must be a transformers model with generate(), got {type(teacher).__name__}"
        )
    if "train" not in corpus:
        raise InvalidValueError(f"the corpus has no 'train' split to distil; it has {sorted(corpus)}")
    if translation:
        if source_lang is None or target_lang is None:
            raise InvalidValueError("a translation teacher's distilled corpus needs source_lang and target_lang")
        # One sentence per line: a line break inside a sentence (possible in Hub data) would shift every later pair.
        sources = [_one_line(str(s)) for s in corpus["train"]["source"]]
        references = [_one_line(str(t)) for t in corpus["train"]["target"]]
        split_files = {"source": f"{{split}}.{source_lang}", "target": f"{{split}}.{target_lang}"}
    else:
        if args.method == "seq_inter":
            raise InvalidValueError(
                "seq_inter chooses the hypothesis closest to a reference translation: a language model's corpus has "
                "none; use method seq_kd"
            )
        # A language model continues each line's prefix; the line itself is the "reference" a mix puts back.
        sources = references = [_one_line(str(t)) for t in corpus["train"]["text"]]
        split_files = {"text": "{split}.txt"}
    if not sources:
        raise InvalidValueError("the corpus' train split is empty: there is nothing to distil")
    generation_config = getattr(teacher, "generation_config", None)
    sampling = {"do_sample": True, "temperature": args.sample_temperature, "top_p": args.sample_top_p} if args.do_sample else {}
    # What decides the shards' bytes. Filters and the mix of gold targets only decide how the shards are assembled
    # into train.*: they may change without decoding again. (Keys a translation run without sampling leaves at
    # None keep its folders readable by later versions.)
    identity = {
        "format": 1,
        "task": None if translation else "language_modeling",
        "method": args.method,
        "num_beams": args.num_beams,
        "num_return_sequences": args.candidates,
        "select_metric": args.select_metric if args.method == "seq_inter" else None,
        "bleu_tokenize": bleu_tokenize if args.method == "seq_inter" else None,
        "max_new_tokens": args.max_new_tokens,
        "prefix_length": None if translation else args.prefix_length,
        "sampling": {**sampling, "sample_seed": args.sample_seed} if sampling else None,
        "shard_sentences": args.shard_sentences,
        "source_lang": source_lang if translation else None,
        "target_lang": target_lang if translation else None,
        "teacher": teacher.fingerprints() if isinstance(teacher, TranslationEnsemble) else model_fingerprint(teacher),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "sources": _text_sha256(sources),
        "references": _text_sha256(references),
        "batch_size": batch_size,
        "max_source_length": max_source_length if translation else None,
        "generation_config": _text_sha256([generation_config.to_json_string()]) if generation_config else None,
    }
    assembly = {
        "filters": {key: getattr(args, key) for key in ("drop_empty", "max_length_ratio", "max_ngram_repeats",
                                                         "repeat_ngram_size")},
        "mix": {key: getattr(args, key) for key in ("add_original", "original_fraction", "mix_seed")},
    }  # fmt: skip
    manifest_path = os.path.join(output_dir, MANIFEST_FILE)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise InvalidValueError(f"output_dir {output_dir!r} is a file: name a folder for the distilled data")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not os.path.isfile(manifest_path):
        raise InvalidValueError(
            f"output_dir {output_dir!r} holds other files and no {MANIFEST_FILE}: distilled data goes to an empty or "
            "new folder (or to the folder of an interrupted distill-data run, to finish it)"
        )
    os.makedirs(os.path.join(output_dir, SHARD_DIR), exist_ok=True)
    num_shards = max(1, -(-len(sources) // args.shard_sentences))
    manifest = {**identity, "num_shards": num_shards, "shards": [], "complete": False}
    train_files = [os.path.join(output_dir, pattern.format(split="train")) for pattern in split_files.values()]
    previous_decoding = None
    if os.path.isfile(manifest_path):
        existing = _read_manifest(output_dir)
        previous_decoding = existing.get("decoding")
        changed = sorted(key for key in identity if existing.get(key) != identity[key])
        if changed:
            raise InvalidValueError(
                f"{output_dir} holds distilled data written with other settings or another teacher or corpus "
                f"(differs in {', '.join(changed)}): use a new output_dir, or rerun with the settings it was "
                "started with"
            )
        if existing.get("complete") and existing.get("assembly") == assembly and all(map(os.path.isfile, train_files)):
            logger.info("distilled data in %s is complete, nothing to do", output_dir)
            return existing
        manifest["shards"] = _whole_shards(output_dir, existing.get("shards", []), what="distilled-data")
        if manifest["shards"]:
            logger.warning("resuming distill-data in %s after %d of %d shards", output_dir, len(manifest["shards"]), num_shards)
    for name in os.listdir(os.path.join(output_dir, SHARD_DIR)):
        if name.endswith(".partial"):
            os.remove(os.path.join(output_dir, SHARD_DIR, name))
    write_json_atomically(manifest_path, manifest)

    started, decoded = time.perf_counter(), 0
    done = manifest["shards"][-1]["stop"] if manifest["shards"] else 0
    progress = tqdm(total=len(sources), initial=done, desc="distill-data", disable=not show_progress, unit="sent")
    for index in range(len(manifest["shards"]), num_shards):
        start, stop = index * args.shard_sentences, min((index + 1) * args.shard_sentences, len(sources))
        # Every shard draws from its own seed (and leaves the caller's generator alone): a resumed run samples
        # what an uninterrupted one did.
        with torch.random.fork_rng():
            torch.manual_seed(args.sample_seed + index)
            if translation:
                n_best = translate_n_best(
                    teacher, tokenizer, sources[start:stop], num_beams=args.num_beams,
                    num_return_sequences=args.candidates, max_new_tokens=args.max_new_tokens, batch_size=batch_size,
                    max_source_length=max_source_length, device=device, show_progress=False, **sampling,
                )  # fmt: skip
            else:
                continuations = continue_prefixes(
                    teacher, tokenizer, sources[start:stop], prefix_length=args.prefix_length,
                    max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, batch_size=batch_size, device=device,
                    **sampling,
                )  # fmt: skip
                n_best = [[continuation] for continuation in continuations]
        hypotheses = []
        for candidates, reference in zip(n_best, references[start:stop]):
            chosen = 0
            if args.method == "seq_inter":
                chosen = select_closest(candidates, reference, metric=args.select_metric, tokenize=bleu_tokenize)
            hypotheses.append(_one_line(candidates[chosen]))
        name = os.path.join(SHARD_DIR, f"shard-{index:05d}.{target_lang if translation else 'txt'}")
        path = os.path.join(output_dir, name)
        _write_lines_atomically(path, hypotheses)
        manifest["shards"].append(
            {"file": name, "start": start, "stop": stop, "bytes": os.path.getsize(path), "sha256": _file_sha256(path)}
        )
        write_json_atomically(manifest_path, manifest)
        decoded += stop - start
        progress.update(stop - start)
    progress.close()
    elapsed = time.perf_counter() - started

    hypotheses = []
    for shard in manifest["shards"]:
        with open(os.path.join(output_dir, shard["file"]), encoding="utf-8") as f:
            hypotheses += f.read().split("\n")[:-1]
    kept_sources, kept_targets, dropped = [], [], Counter()
    gold = _sources_given_their_reference(len(sources), args.original_fraction, args.mix_seed)
    for i, (source, hypothesis, reference) in enumerate(zip(sources, hypotheses, references)):
        if i in gold:
            kept_sources.append(source)
            kept_targets.append(reference)
            continue
        reason = drop_reason(source, hypothesis, args)
        if reason is None:
            kept_sources.append(source)
            kept_targets.append(hypothesis)
        else:
            dropped[reason] += 1
        if args.add_original:
            kept_sources.append(source)
            kept_targets.append(reference)
    if not kept_targets:
        raise InvalidValueError(f"every one of the {len(sources)} distilled pairs was filtered out ({dict(dropped)}): loosen the filters")
    if translation:
        _write_lines_atomically(os.path.join(output_dir, f"train.{source_lang}"), kept_sources)
        _write_lines_atomically(os.path.join(output_dir, f"train.{target_lang}"), kept_targets)
    else:
        _write_lines_atomically(os.path.join(output_dir, "train.txt"), kept_targets)
    for split in ("validation", "test"):
        if split in corpus:
            for column, pattern in split_files.items():
                lines = [_one_line(str(x)) for x in corpus[split][column]]
                _write_lines_atomically(os.path.join(output_dir, pattern.format(split=split)), lines)
    manifest.update(
        complete=True,
        assembly=assembly,
        counts={"sources": len(sources), "pairs": len(kept_targets), "original_targets": len(gold) + (
            len(sources) if args.add_original else 0), "dropped": dict(dropped)},
    )
    if decoded:  # a rerun that only re-assembled keeps the decoding figures of the run that decoded
        manifest["decoding"] = {"sentences": decoded, "seconds": round(elapsed, 2),
                                "sentences_per_second": round(decoded / elapsed, 2) if elapsed > 0 else None}  # fmt: skip
    else:
        manifest["decoding"] = previous_decoding
    write_json_atomically(manifest_path, manifest)
    return manifest


def _sources_given_their_reference(count: int, fraction: float, seed: int) -> set[int]:
    import random

    return set(random.Random(seed).sample(range(count), round(fraction * count))) if fraction > 0 else set()


def _read_manifest(output_dir: str) -> dict:
    import json

    with open(os.path.join(output_dir, MANIFEST_FILE), encoding="utf-8") as f:
        return json.load(f)


def check_complete(dataset_dir: str) -> None:
    """Refuse a distilled-data folder whose ``distill-data`` run has not finished (its split files would be missing
    or stale). Folders without a distill manifest are ordinary corpora and pass."""
    if not os.path.isfile(os.path.join(dataset_dir, MANIFEST_FILE)):
        return
    manifest = _read_manifest(dataset_dir)
    if not manifest.get("complete"):
        done = len(manifest.get("shards", []))
        raise MissingInputError(
            f"distilled data in {dataset_dir} is incomplete ({done} of {manifest.get('num_shards', '?')} shards): "
            "run the same `seqkd distill-data` command again to finish it"
        )


__all__ = [
    "DistillDataArguments",
    "TranslationEnsemble",
    "check_complete",
    "continue_prefixes",
    "drop_reason",
    "select_closest",
    "write_distilled_data",
]
