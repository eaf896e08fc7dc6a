"""Evaluation metrics. For now: corpus-level perplexity of language models."""

from __future__ import annotations

import inspect
import math
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F

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
        raise ValueError(f"cannot find a vocab_size on {type(model_or_config).__name__}")
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
    raise ValueError(
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
              ``labels[:, 1:]``, no state carried.
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
    if stateful is None:
        stateful = is_stateful(model)

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
                for k in ("input_ids", "shift_labels", "labels", "attention_mask")
                if batch.get(k) is not None
            }
            input_ids = batch["input_ids"]
            if "shift_labels" in batch:
                targets = batch["shift_labels"]
                stream = True
            elif "labels" in batch:
                targets = batch["labels"][:, 1:]
                stream = False
            else:
                raise ValueError(
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
                raise ValueError(
                    f"logits {tuple(logits.shape)} do not line up with targets {tuple(targets.shape)}"
                )
            vocab = logits.shape[-1]
            valid = targets != IGNORE_INDEX
            n = int(valid.sum())
            if n == 0:
                continue
            t_valid = targets[valid]
            if int(t_valid.max()) >= vocab or int(t_valid.min()) < 0:
                raise ValueError(
                    f"target ids range over [{int(t_valid.min())}, {int(t_valid.max())}] but the model "
                    f"outputs {vocab} logits: tokenizer and model vocabularies differ"
                )
            nll = F.cross_entropy(
                logits.reshape(-1, vocab).float(),
                targets.reshape(-1),
                reduction="sum",
                ignore_index=IGNORE_INDEX,
            )
            total_nll += float(nll.double())
            total_tokens += n
    finally:
        model.train(was_training)

    if total_tokens == 0:
        raise ValueError("no target tokens: the batches are empty or all targets are -100")
    loss = total_nll / total_tokens
    try:
        ppl = math.exp(loss)
    except OverflowError:
        ppl = float("inf")
    return {"nll": total_nll, "tokens": total_tokens, "loss": loss, "perplexity": ppl}
