"""Evaluation: corpus perplexity (language models and encoder-decoders), BLEU and chrF, teacher stability."""

from __future__ import annotations

import inspect
import math
import time
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F

from seqkd.errors import InvalidValueError

__all__ = ["corpus_perplexity", "check_vocab_size", "model_vocab_size", "is_stateful"]

IGNORE_INDEX = -100


def model_vocab_size(model_or_config) -> int:
    """``vocab_size`` of a model, a config, or an int."""
    if isinstance(model_or_config, int):
        return model_or_config
    config = getattr(model_or_config, "config", model_or_config)
    size = getattr(config, "vocab_size", None)
    if size is None and hasattr(config, "get_text_config"):
        size = getattr(config.get_text_config(), "vocab_size", None)
    if size is None:
        raise InvalidValueError(f"cannot find a vocab_size on {type(model_or_config).__name__}")
    return int(size)


def check_vocab_size(tokenizer, model_or_config, *, exact: bool = True) -> None:
    """Raise ``ValueError`` unless ``len(tokenizer)`` fits the model's ``config.vocab_size``.

    With ``exact`` (default) the two must be equal; with ``exact=False`` the model
    may be larger (e.g. an embedding padded to a multiple of 64) but not smaller.
    """
    n_tok = len(tokenizer)
    n_model = model_vocab_size(model_or_config)
    if n_tok == n_model or (not exact and n_tok < n_model):
        return
    raise InvalidValueError(
        f"tokenizer has {n_tok} tokens but the model's vocab_size is {n_model}: "
        + (
            "token ids would index past the model's embedding/output layer"
            if n_tok > n_model
            else "the model has rows for ids the tokenizer never produces"
        )
        + f"; build the model with vocab_size=len(tokenizer)={n_tok}"
        + ("" if not exact or n_tok > n_model else " (or pass exact=False to allow a larger model)")
    )


def is_stateful(model) -> bool:
    """True when ``model.forward`` takes a ``state`` argument (recurrent LMs)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "state" in params


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _logits(out) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None:
        if isinstance(out, (tuple, list)):
            logits = out[0]
        elif isinstance(out, torch.Tensor):
            logits = out
        elif isinstance(out, Mapping):
            logits = out["logits"]
        else:
            raise TypeError(f"cannot find logits in the model output ({type(out).__name__})")
    return logits


def _sum_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood of ``targets`` (-100 ignored) under ``logits``, and the target count."""
    vocab = logits.shape[-1]
    valid = targets != IGNORE_INDEX
    n = int(valid.sum())
    if n == 0:
        return 0.0, 0
    t_valid = targets[valid]
    if int(t_valid.max()) >= vocab or int(t_valid.min()) < 0:
        raise InvalidValueError(
            f"target ids range over [{int(t_valid.min())}, {int(t_valid.max())}] but the model "
            f"outputs {vocab} logits: tokenizer and model vocabularies differ"
        )
    nll = F.cross_entropy(
        logits.reshape(-1, vocab).float(), targets.reshape(-1), reduction="sum", ignore_index=IGNORE_INDEX
    )
    return float(nll.double()), n


@torch.no_grad()
def corpus_perplexity(
    model,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    device: torch.device | str | None = None,
    stateful: bool | None = None,
    tokenizer=None,
    show_progress: bool = True,
    desc: str = "perplexity",
) -> dict:
    """Perplexity of ``model`` over a whole split: ``exp(total NLL / predicted tokens)``.

    This is the classic corpus-level definition (the number reported for PTB),
    not a mean of per-batch perplexities.

    Args:
        model: a causal LM returning ``.logits`` ``[B, L, V]`` (or a tuple whose
            first element is the logits).
        batches: iterable of dicts of ``[B, L]`` tensors (lists are converted), either
            * stream batches (``input_ids`` + ``shift_labels``, already aligned, e.g.
              :class:`seqkd.data.StreamBatches`): ``logits[:, t]`` is scored against
              ``shift_labels[:, t]``; for a stateful model the recurrent state is
              carried from each batch to the next, so consecutive batches must
              continue the same streams row by row;
            * block batches (``input_ids`` + HF ``labels``, e.g. from
              :func:`seqkd.data.group_texts`): ``logits[:, :-1]`` against
              ``labels[:, 1:]``, no state carried;
            * encoder-decoder batches (``input_ids`` + ``labels``, for a model whose
              ``config.is_encoder_decoder``): the decoder reads ``decoder_input_ids``
              (from the batch, else built from the labels by the model) and its
              ``logits[:, t]`` are scored against ``labels[:, t]``.
            Targets equal to -100 are ignored; an ``attention_mask`` is forwarded
            to the model.
        device: where to run (default: the model's parameters' device).
        stateful: whether to pass/carry ``state``; default: detected from a ``state``
            parameter of ``model.forward`` (and the output having a ``state``).
        tokenizer: if given, :func:`check_vocab_size` is run first.
        show_progress: tqdm progress bar over the batches.

    Returns:
        ``{"nll": total NLL in nats (float), "tokens": predicted tokens (int),
        "loss": nll / tokens, "perplexity": exp(loss)}``.
    """
    from tqdm.auto import tqdm

    if tokenizer is not None:
        check_vocab_size(tokenizer, model)
    if device is None:
        device = _model_device(model)
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if stateful is None:
        stateful = is_stateful(model) and not encoder_decoder

    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    state = None
    try:
        total = len(batches) if hasattr(batches, "__len__") else None
        for batch in tqdm(batches, total=total, desc=desc, disable=not show_progress, leave=False):
            batch = {
                k: torch.as_tensor(batch[k]).to(device)
                for k in ("input_ids", "shift_labels", "labels", "attention_mask", "decoder_input_ids")
                if batch.get(k) is not None
            }
            input_ids = batch["input_ids"]
            if encoder_decoder:
                labels = batch["labels"]
                decoder_input_ids = batch.get("decoder_input_ids")
                if decoder_input_ids is None:
                    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
                out = model(
                    input_ids=input_ids, attention_mask=batch.get("attention_mask"), decoder_input_ids=decoder_input_ids
                )
                nll, n = _sum_nll(_logits(out), labels)
                total_nll += nll
                total_tokens += n
                continue
            if "shift_labels" in batch:
                targets = batch["shift_labels"]
                stream = True
            elif "labels" in batch:
                targets = batch["labels"][:, 1:]
                stream = False
            else:
                raise InvalidValueError(
                    f"batch has neither 'shift_labels' nor 'labels' (keys: {sorted(batch)})"
                )
            kwargs = {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}
            if stateful:
                out = model(input_ids=input_ids, state=state if stream else None, **kwargs)
                new_state = getattr(out, "state", None)
                if new_state is None:
                    stateful = False  # the model does not expose a state after all
                state = new_state if stream else None
            else:
                out = model(input_ids=input_ids, **kwargs)
            logits = _logits(out)
            if not stream:
                logits = logits[:, :-1]
            if logits.shape[:2] != targets.shape:
                raise InvalidValueError(
                    f"logits {tuple(logits.shape)} do not line up with targets {tuple(targets.shape)}"
                )
            nll, n = _sum_nll(logits, targets)
            total_nll += nll
            total_tokens += n
    finally:
        model.train(was_training)

    if total_tokens == 0:
        raise InvalidValueError("no target tokens: the batches are empty or all targets are -100")
    loss = total_nll / total_tokens
    try:
        ppl = math.exp(loss)
    except OverflowError:
        ppl = float("inf")
    return {"nll": total_nll, "tokens": total_tokens, "loss": loss, "perplexity": ppl}


# --------------------------------------------------------------------------- #
# Translation: BLEU / chrF, batched generation, teacher stability
# --------------------------------------------------------------------------- #
__all__ += ["corpus_bleu", "corpus_chrf", "translate", "bleu_eval", "teacher_stability"]


def _reference_streams(references, n_hyp: int) -> list[list]:
    """sacreBLEU reference streams from one reference per hypothesis (``[str]``) or a list of
    references per hypothesis (``[[str, ...]]``, the ``evaluate`` convention; counts may
    vary, missing ones become ``None``, which sacreBLEU skips)."""
    if isinstance(references, str):
        raise TypeError("references must be a sequence of strings (or of lists of strings), got a single str")
    refs = list(references)
    if len(refs) != n_hyp:
        raise InvalidValueError(
            f"{n_hyp} hypotheses but {len(refs)} references: pass one reference (a str) or one list of "
            "references per hypothesis"
        )
    if all(isinstance(r, str) for r in refs):
        return [refs]
    per_hyp = [[r] if isinstance(r, str) else list(r) for r in refs]
    for i, rs in enumerate(per_hyp):
        if not rs or not all(isinstance(x, str) for x in rs):
            raise TypeError(f"references[{i}] must be a str or a non-empty list of str, got {refs[i]!r}")
    n_refs = max(len(rs) for rs in per_hyp)
    return [[rs[k] if k < len(rs) else None for rs in per_hyp] for k in range(n_refs)]


def _hypotheses(hypotheses) -> list[str]:
    if isinstance(hypotheses, str):
        raise TypeError("hypotheses must be a sequence of strings, got a single str")
    hyps = list(hypotheses)
    if not hyps:
        raise InvalidValueError("no hypotheses to score")
    bad = [i for i, h in enumerate(hyps) if not isinstance(h, str)]
    if bad:
        raise TypeError(f"hypotheses must be strings; hypotheses[{bad[0]}] is {type(hyps[bad[0]]).__name__}")
    return hyps


def corpus_bleu(hypotheses, references, *, tokenize: str = "13a", lowercase: bool = False) -> dict:
    """Corpus BLEU with sacreBLEU (``sacrebleu.metrics.BLEU``, default smoothing ``exp``).

    Args:
        hypotheses: one detokenized system output per sentence.
        references: one reference string per hypothesis, or a list of references per
            hypothesis (``evaluate``'s convention, not sacreBLEU's reference *streams*).
        tokenize: sacreBLEU tokenizer (``"13a"`` default, ``"intl"``, ``"char"``, ``"none"``
            for text that is already tokenized, e.g. Multi30k's ``tok/`` files...).
        lowercase: case-insensitive BLEU.

    Returns:
        ``{"score": BLEU in [0, 100], "signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:...",
        "precisions": [p1..p4] (percent), "bp": brevity penalty, "sys_len": int, "ref_len": int}``.
    """
    from sacrebleu.metrics import BLEU

    hyps = _hypotheses(hypotheses)
    streams = _reference_streams(references, len(hyps))
    metric = BLEU(tokenize=tokenize, lowercase=lowercase)
    res = metric.corpus_score(hyps, streams)
    return {
        "score": float(res.score),
        "signature": str(metric.get_signature()),
        "precisions": [float(p) for p in res.precisions],
        "bp": float(res.bp),
        "sys_len": int(res.sys_len),
        "ref_len": int(res.ref_len),
    }


def corpus_chrf(
    hypotheses, references, *, char_order: int = 6, word_order: int = 0, beta: int = 2, lowercase: bool = False
) -> dict:
    """Corpus chrF (``word_order=2``: chrF++) with sacreBLEU; same inputs as :func:`corpus_bleu`.

    Returns:
        ``{"score": chrF in [0, 100], "signature": "nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:..."}``.
    """
    from sacrebleu.metrics import CHRF

    hyps = _hypotheses(hypotheses)
    streams = _reference_streams(references, len(hyps))
    metric = CHRF(char_order=char_order, word_order=word_order, beta=beta, lowercase=lowercase)
    res = metric.corpus_score(hyps, streams)
    return {"score": float(res.score), "signature": str(metric.get_signature())}


def _source_texts(sources, column: str = "source") -> list[str]:
    if isinstance(sources, str):
        raise TypeError("sources must be a sequence of strings, got a single str")
    names = getattr(sources, "column_names", None)
    if names is not None:
        if isinstance(names, dict):
            raise TypeError("pass one split (e.g. splits['test']), not a whole DatasetDict")
        if column not in names:
            raise InvalidValueError(f"dataset has no {column!r} column (columns: {names})")
        return list(sources[column])
    return list(sources)


@torch.no_grad()
def translate(
    model,
    tokenizer,
    sources,
    *,
    num_beams: int = 1,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    max_source_length: int | None = None,
    device: torch.device | str | None = None,
    postprocess=None,
    show_progress: bool = True,
    desc: str = "translate",
    **generate_kwargs,
) -> list[str]:
    """Translate ``sources`` with an encoder-decoder's ``generate``, in batches, order kept.

    Sentences are sorted by length into batches (less padding) and the outputs put back in
    input order. Inputs longer than ``max_source_length`` (default: the model's
    ``max_position_embeddings`` when it has one) are truncated.

    Args:
        sources: a sequence of source sentences, or a ``datasets.Dataset`` with a ``source``
            column.
        num_beams: 1 = greedy search; more = beam search.
        max_new_tokens: generation limit per sentence.
        postprocess: optional ``str -> str`` applied to every decoded output (e.g. a Moses
            detokenizer when the tokenizer was trained on tokenized text).
        **generate_kwargs: forwarded to ``model.generate`` (``length_penalty``, ...).

    Returns:
        one string per source: ``tokenizer.decode(..., skip_special_tokens=True)``, stripped
        (detokenized text for a tokenizer trained on raw text).
    """
    n_best = translate_n_best(
        model, tokenizer, sources, num_beams=num_beams, num_return_sequences=1, max_new_tokens=max_new_tokens,
        batch_size=batch_size, max_source_length=max_source_length, device=device, postprocess=postprocess,
        show_progress=show_progress, desc=desc, **generate_kwargs,
    )  # fmt: skip
    return [candidates[0] for candidates in n_best]


def translate_n_best(
    model,
    tokenizer,
    sources,
    *,
    num_beams: int,
    num_return_sequences: int,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    max_source_length: int | None = None,
    device: torch.device | str | None = None,
    postprocess=None,
    show_progress: bool = True,
    desc: str = "translate",
    **generate_kwargs,
) -> list[list[str]]:
    """The ``num_return_sequences`` best translations of each source (beam search's ranking, best first), as
    :func:`translate` batches and decodes them; ``num_return_sequences <= num_beams``."""
    from tqdm.auto import tqdm

    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        raise InvalidValueError("translate needs an encoder-decoder model (config.is_encoder_decoder=True)")
    if batch_size < 1:
        raise InvalidValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 1 <= num_return_sequences <= num_beams:
        raise InvalidValueError(
            f"num_return_sequences must be between 1 and num_beams ({num_beams}), got {num_return_sequences}"
        )
    texts = _source_texts(sources)
    if max_source_length is None:
        max_source_length = getattr(config, "max_position_embeddings", None)
    if device is None:
        device = _model_device(model)

    lengths = [len(t.split()) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    outputs: list[list[str] | None] = [None] * len(texts)
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc=desc, disable=not show_progress, leave=False):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=max_source_length is not None,
                max_length=max_source_length,
                return_tensors="pt",
                return_token_type_ids=False,
            )
            gen = model.generate(
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
                num_beams=num_beams,
                num_return_sequences=num_return_sequences,
                max_new_tokens=max_new_tokens,
                **generate_kwargs,
            )
            decoded = tokenizer.batch_decode(gen, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            for j, i in enumerate(idx):
                candidates = [text.strip() for text in decoded[j * num_return_sequences : (j + 1) * num_return_sequences]]
                outputs[i] = [postprocess(text) for text in candidates] if postprocess is not None else candidates
    finally:
        model.train(was_training)
    return outputs  # type: ignore[return-value]


def bleu_eval(
    model,
    tokenizer,
    dataset_split,
    *,
    source_column: str = "source",
    target_column: str = "target",
    num_beams: int = 1,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    tokenize: str = "13a",
    lowercase: bool = False,
    postprocess=None,
    return_hypotheses: bool = False,
    show_progress: bool = True,
    **generate_kwargs,
) -> dict:
    """Translate a split with :func:`translate` and score it with :func:`corpus_bleu` and :func:`corpus_chrf`.

    Args:
        dataset_split: a ``datasets.Dataset`` (or a dict of lists) with ``source_column`` and
            ``target_column`` (e.g. ``load_multi30k(...)["test"]``; the references are the raw
            target texts, never decoded token ids).
        tokenize, lowercase: sacreBLEU options (use ``tokenize="none"`` for already-tokenized
            references such as Multi30k's ``tok/`` files).
        other arguments: see :func:`translate`.

    Returns:
        ``{"bleu": float, "chrf": float, "signature": BLEU signature, "chrf_signature": str,
        "num_sentences": int, "length_ratio": hypothesis / reference length, "decode_seconds": float,
        "sentences_per_second": float}`` plus ``"hypotheses": [str]`` with ``return_hypotheses``.
    """
    names = getattr(dataset_split, "column_names", None)
    if isinstance(names, dict):
        raise TypeError("pass one split (e.g. splits['test']), not a whole DatasetDict")
    cols = names if names is not None else list(dataset_split)
    for c in (source_column, target_column):
        if c not in cols:
            raise InvalidValueError(f"dataset split has no {c!r} column (columns: {list(cols)})")
    sources = list(dataset_split[source_column])
    references = list(dataset_split[target_column])
    started = time.perf_counter()
    hyps = translate(
        model,
        tokenizer,
        sources,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        postprocess=postprocess,
        show_progress=show_progress,
        **generate_kwargs,
    )
    decode_seconds = time.perf_counter() - started
    bleu = corpus_bleu(hyps, references, tokenize=tokenize, lowercase=lowercase)
    chrf = corpus_chrf(hyps, references, lowercase=lowercase)
    out = {
        "bleu": bleu["score"],
        "chrf": chrf["score"],
        "signature": bleu["signature"],
        "chrf_signature": chrf["signature"],
        "num_sentences": len(hyps),
        # Hypothesis / reference length (sacreBLEU's tokens): above 1, some outputs ramble or loop to the limit.
        "length_ratio": bleu["sys_len"] / max(bleu["ref_len"], 1),
        # Decoding speed (translate alone, tokenization included, scoring not): compare models on one machine.
        "decode_seconds": decode_seconds,
        "sentences_per_second": len(hyps) / decode_seconds if decode_seconds > 0 else float("inf"),
    }
    if return_hypotheses:
        out["hypotheses"] = hyps
    return out


@torch.no_grad()
def teacher_stability(
    model,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    min_count: int = 2,
    aligned: bool | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    show_progress: bool = True,
    desc: str = "stability",
) -> dict:
    """Shen et al.'s stability of a teacher, with gold target *tokens* as the classes.

    For every predicted position ``i`` with gold token ``y_i`` (a target that is not -100),
    ``p_i = softmax(logits_i)`` over the full vocabulary ``V``. For a class ``c`` (a token id)
    with ``n_c`` positions::

        Var_c = 1/n_c * sum_{i: y_i = c} ||p_i - mean_c p||^2        (squared L2 over V)
              = Q_c / n_c - ||S_c / n_c||^2,   S_c = sum_i p_i,  Q_c = sum_i ||p_i||^2

        stability = 1 - mean over classes c with n_c >= min_count of Var_c

    Classes seen fewer than ``min_count`` times (default 2: a class seen once has zero
    variance by construction and would inflate the score) are left out; ``min_count=1``
    keeps them. Higher is more stable (1 = every class always gets the same distribution).

    Streaming: one pass over the batches keeps per-class ``S_c`` (a ``V``-vector), ``Q_c``
    and ``n_c``, in ``dtype`` (float64 by default, to avoid cancellation in ``Q/n - ||S/n||^2``;
    the softmax is computed in that precision too).
    **Memory**: ``C x V`` accumulators for the ``C`` distinct gold tokens seen (grown on
    demand, up to twice that while growing), i.e. ``8 * C * V`` bytes in float64 -- e.g.
    3,000 classes x 8,000 tokens = 192 MB; ``dtype=torch.float32`` halves it. Plus one batch
    of probabilities ``[tokens in batch, V]``.

    Args:
        model: returns ``.logits`` ``[B, L, V]`` (or a tuple / dict holding them).
        batches: dicts of ``[B, L]`` tensors: ``input_ids`` (+ ``attention_mask``) and either
            ``labels`` or ``shift_labels``. For an encoder-decoder (seq2seq collator output, with
            or without ``decoder_input_ids``) the batch is passed with its ``labels`` and
            ``logits[:, t]`` is scored against ``labels[:, t]``. For a decoder-only model,
            ``labels`` are HF causal labels (``logits[:, :-1]`` vs ``labels[:, 1:]``) and
            ``shift_labels`` are already aligned.
        aligned: force the alignment (``True``: logits and targets line up); default as above.
        min_count: minimum occurrences of a class to enter the mean.

    Returns:
        ``{"stability": float, "mean_variance": float, "num_classes": classes averaged,
        "num_classes_seen": distinct gold tokens, "num_tokens": positions counted,
        "min_count": int}``.
    """
    from tqdm.auto import tqdm

    if min_count < 1:
        raise InvalidValueError(f"min_count must be >= 1, got {min_count}")
    if dtype not in (torch.float32, torch.float64):
        raise InvalidValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if device is None:
        device = _model_device(model)
    is_enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))

    sums = None  # [capacity, V] per-class sums of p
    sq = None  # [capacity] per-class sums of ||p||^2
    counts = None  # [capacity] int64
    lut = None  # [V] row of each class, -1 if unseen
    row_of: dict[int, int] = {}
    n_tokens = 0
    vocab = None
    was_training = model.training
    model.eval()
    try:
        total = len(batches) if hasattr(batches, "__len__") else None
        for batch in tqdm(batches, total=total, desc=desc, disable=not show_progress, leave=False):
            batch = {k: torch.as_tensor(v).to(device) for k, v in batch.items() if v is not None}
            if "shift_labels" in batch:
                targets = batch.pop("shift_labels")
                batch.pop("labels", None)
                default_aligned, inputs = True, batch
            elif "labels" in batch:
                targets = batch["labels"]
                default_aligned = is_enc_dec
                # an encoder-decoder builds its decoder inputs from the labels when they are absent
                inputs = batch if is_enc_dec else {k: v for k, v in batch.items() if k != "labels"}
            else:
                raise InvalidValueError(f"batch has neither 'labels' nor 'shift_labels' (keys: {sorted(batch)})")
            shift = not (default_aligned if aligned is None else aligned)
            logits = _logits(model(**inputs))
            if shift:
                logits, targets = logits[:, :-1], targets[:, 1:]
            if logits.shape[:2] != targets.shape:
                raise InvalidValueError(
                    f"logits {tuple(logits.shape)} do not line up with targets {tuple(targets.shape)}"
                )
            valid = targets != IGNORE_INDEX
            if not bool(valid.any()):
                continue
            probs = torch.softmax(logits[valid].to(dtype), dim=-1)  # [N, V], in the accumulator precision
            y = targets[valid].long()
            if vocab is None:
                vocab = probs.shape[-1]
                sums = torch.zeros(0, vocab, dtype=dtype, device=device)
                sq = torch.zeros(0, dtype=dtype, device=device)
                counts = torch.zeros(0, dtype=torch.long, device=device)
                lut = torch.full((vocab,), -1, dtype=torch.long, device=device)  # class id -> row
            elif probs.shape[-1] != vocab:
                raise InvalidValueError(f"vocabulary size changed between batches ({vocab} -> {probs.shape[-1]})")
            if int(y.min()) < 0 or int(y.max()) >= vocab:
                raise InvalidValueError(f"target ids range over [{int(y.min())}, {int(y.max())}] outside [0, {vocab})")
            new = [c for c in torch.unique(y).tolist() if c not in row_of]
            for c in new:
                row_of[c] = len(row_of)
            if new:
                lut[torch.tensor(new, device=device)] = torch.arange(
                    len(row_of) - len(new), len(row_of), device=device
                )
            if len(row_of) > sums.shape[0]:  # grow geometrically: O(C x V) in all
                cap = max(len(row_of), 2 * sums.shape[0], 64)
                sums = torch.cat([sums, sums.new_zeros(cap - sums.shape[0], vocab)])
                sq = torch.cat([sq, sq.new_zeros(cap - sq.shape[0])])
                counts = torch.cat([counts, counts.new_zeros(cap - counts.shape[0])])
            rows = lut[y]
            sums.index_add_(0, rows, probs)
            sq.index_add_(0, rows, (probs * probs).sum(-1))
            counts.index_add_(0, rows, torch.ones_like(rows))
            n_tokens += int(y.numel())
    finally:
        model.train(was_training)

    if n_tokens == 0:
        raise InvalidValueError("no target tokens: the batches are empty or all targets are -100")
    used = len(row_of)
    n = counts[:used]
    keep = n >= min_count
    if not bool(keep.any()):
        raise InvalidValueError(f"no class (gold token) occurs at least min_count={min_count} times")
    n_k = n[keep].to(dtype)
    mean = sums[:used][keep] / n_k[:, None]
    var = (sq[:used][keep] / n_k - (mean * mean).sum(-1)).clamp_min(0.0)
    mean_var = float(var.mean())
    return {
        "stability": 1.0 - mean_var,
        "mean_variance": mean_var,
        "num_classes": int(keep.sum()),
        "num_classes_seen": used,
        "num_tokens": n_tokens,
        "min_count": min_count,
    }
