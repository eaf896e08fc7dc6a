"""Builders of small from-scratch transformers, sized to a tokenizer's vocabulary.

No custom modelling code: these functions only build configurations for models transformers
already has, and instantiate them with random weights.

* :func:`build_causal_lm` -> ``GPT2LMHeadModel`` (decoder-only LM, tied input/output embeddings).
* :func:`build_seq2seq` -> ``MarianMTModel`` (default family) or ``BartForConditionalGeneration``,
  an encoder-decoder with one vocabulary shared by source and target (encoder embedding, decoder
  embedding and output projection are the same tensor).

Both take a preset name (see :data:`CAUSAL_LM_PRESETS` / :data:`SEQ2SEQ_PRESETS`), a config dict,
or a config object, then ``vocab_size`` / ``tokenizer`` and keyword overrides (applied last)::

    model = build_causal_lm("gpt2-small-ptb", tokenizer=tok)
    teacher = build_seq2seq("transformer-3x3-256", tokenizer=tok, dropout=0.3)
    student = build_seq2seq({"family": "bart", "d_model": 128, "layers": 2, "heads": 4, "ffn_dim": 256},
                            vocab_size=8000)

Special token ids come from the tokenizer when one is given (``pad/bos/eos_token_id``), otherwise
from the config dict / overrides. Encoder-decoders need a decoder start token: it defaults to
``bos_token_id`` (else ``pad_token_id``); without a tokenizer, unset ids default to pad=0, bos=1,
eos=2 (:data:`DEFAULT_SEQ2SEQ_SPECIAL_IDS`).
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    MarianConfig,
    MarianMTModel,
    PreTrainedConfig,
)

from seqkd.errors import InvalidValueError

__all__ = [
    "CAUSAL_LM_PRESETS",
    "SEQ2SEQ_PRESETS",
    "SEQ2SEQ_FAMILIES",
    "DEFAULT_SEQ2SEQ_SPECIAL_IDS",
    "build_causal_lm",
    "build_seq2seq",
    "causal_lm_config",
    "seq2seq_config",
]

_SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")

#: GPT-2 presets (``GPT2Config`` keyword arguments).
CAUSAL_LM_PRESETS: dict[str, dict[str, Any]] = {
    # For tests and smoke runs: trains in seconds on a CPU.
    "gpt2-tiny": dict(
        n_layer=2, n_embd=64, n_head=2, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    ),
    # Word-level PTB-sized decoder (~3M non-embedding parameters).
    "gpt2-small-ptb": dict(
        n_layer=4, n_embd=256, n_head=4, n_positions=256, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1
    ),
    "gpt2-medium-ptb": dict(
        n_layer=6, n_embd=512, n_head=8, n_positions=512, resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.1
    ),
}

#: Encoder-decoder families: name -> (config class, model class).
SEQ2SEQ_FAMILIES: dict[str, tuple[type[PreTrainedConfig], type]] = {
    "marian": (MarianConfig, MarianMTModel),
    "bart": (BartConfig, BartForConditionalGeneration),
}

#: Encoder-decoder presets: ``family`` plus config keyword arguments (``layers``/``heads``/``ffn_dim``
#: set both encoder and decoder).
SEQ2SEQ_PRESETS: dict[str, dict[str, Any]] = {
    # For tests and smoke runs.
    "marian-tiny": dict(
        family="marian", d_model=64, layers=2, heads=2, ffn_dim=128, max_position_embeddings=128,
        dropout=0.0, activation_function="relu", scale_embedding=True,
    ),
    "bart-tiny": dict(
        family="bart", d_model=64, layers=2, heads=2, ffn_dim=128, max_position_embeddings=128,
        dropout=0.0, activation_function="relu",
    ),
    # The Multi30k teacher: 3+3 layers, d_model 256, 8 heads, FFN 512.
    "transformer-3x3-256": dict(
        family="marian", d_model=256, layers=3, heads=8, ffn_dim=512, max_position_embeddings=256,
        dropout=0.1, activation_function="relu", scale_embedding=True,
    ),
    # A small Multi30k student.
    "transformer-2x2-128": dict(
        family="marian", d_model=128, layers=2, heads=4, ffn_dim=256, max_position_embeddings=256,
        dropout=0.1, activation_function="relu", scale_embedding=True,
    ),
}

#: Special ids used by :func:`build_seq2seq` when neither a tokenizer nor the config sets them.
DEFAULT_SEQ2SEQ_SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

_SEQ2SEQ_ALIASES = {
    "layers": ("encoder_layers", "decoder_layers"),
    "heads": ("encoder_attention_heads", "decoder_attention_heads"),
    "ffn_dim": ("encoder_ffn_dim", "decoder_ffn_dim"),
}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _resolve_preset(preset_or_config: str | Mapping | PreTrainedConfig, presets: dict, kind: str) -> dict:
    if isinstance(preset_or_config, str):
        if preset_or_config not in presets:
            known = ", ".join(sorted(presets))
            raise InvalidValueError(
                f"Unknown {kind} preset {preset_or_config!r}. Known presets: {known}; "
                "or pass a config dict / config object."
            )
        return copy.deepcopy(presets[preset_or_config])
    if isinstance(preset_or_config, PreTrainedConfig):
        cfg = preset_or_config.to_diff_dict()
        for key in ("model_type", "transformers_version", "architectures"):
            cfg.pop(key, None)
        return cfg | {"_config_class": type(preset_or_config)}
    if isinstance(preset_or_config, Mapping):
        return copy.deepcopy(dict(preset_or_config))
    raise TypeError(
        f"preset_or_config must be a preset name, a dict or a transformers config, got {type(preset_or_config).__name__}."
    )


def _tokenizer_vocab_size(tokenizer) -> int:
    if hasattr(tokenizer, "__len__"):
        return len(tokenizer)
    if hasattr(tokenizer, "get_vocab_size"):  # a raw `tokenizers.Tokenizer`
        return tokenizer.get_vocab_size(with_added_tokens=True)
    raise TypeError(f"Cannot read the vocabulary size of {type(tokenizer).__name__}: pass vocab_size= explicitly.")


def _resolve_vocab_and_ids(cfg: dict, vocab_size: int | None, tokenizer, overrides: dict, kind: str) -> None:
    """Fill ``cfg['vocab_size']`` and the special ids in place (tokenizer < explicit arguments)."""
    tok_vocab = _tokenizer_vocab_size(tokenizer) if tokenizer is not None else None
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
            raise InvalidValueError(f"vocab_size must be a positive integer, got {vocab_size!r}.")
        if tok_vocab is not None and vocab_size < tok_vocab:
            raise InvalidValueError(
                f"vocab_size={vocab_size} is smaller than the tokenizer's vocabulary ({tok_vocab} tokens): "
                "token ids would be out of range. Leave vocab_size=None to use the tokenizer's size."
            )
        cfg["vocab_size"] = vocab_size
    elif tok_vocab is not None:
        cfg["vocab_size"] = tok_vocab
    if "vocab_size" in overrides:
        cfg["vocab_size"] = overrides.pop("vocab_size")
    if cfg.get("vocab_size") is None:
        raise InvalidValueError(
            f"Missing vocabulary size for the {kind}: pass vocab_size=..., tokenizer=..., or a config with 'vocab_size'."
        )
    if tokenizer is not None:
        for name in _SPECIAL_IDS:
            token_id = getattr(tokenizer, name, None)
            if token_id is not None:
                cfg[name] = token_id
    for name in (*_SPECIAL_IDS, "decoder_start_token_id"):
        if name in overrides:
            cfg[name] = overrides.pop(name)


def _check_ids(cfg: dict, kind: str) -> None:
    vocab = cfg["vocab_size"]
    for name in (*_SPECIAL_IDS, "decoder_start_token_id", "forced_eos_token_id", "forced_bos_token_id"):
        value = cfg.get(name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and not 0 <= v < vocab:
                raise InvalidValueError(f"{kind}: {name}={v} is outside the vocabulary [0, {vocab}).")


def _check_heads(d_model: int, heads: int, what: str) -> None:
    if heads <= 0 or d_model % heads != 0:
        raise InvalidValueError(f"{what}: the model size ({d_model}) must be a multiple of the number of heads ({heads}).")


# --------------------------------------------------------------------------------------------------
# decoder-only
# --------------------------------------------------------------------------------------------------


def causal_lm_config(
    preset_or_config: str | Mapping | PreTrainedConfig = "gpt2-tiny",
    vocab_size: int | None = None,
    tokenizer=None,
    **overrides,
) -> GPT2Config:
    """The ``GPT2Config`` that :func:`build_causal_lm` would use (same arguments)."""
    cfg = _resolve_preset(preset_or_config, CAUSAL_LM_PRESETS, "causal LM")
    cfg.pop("_config_class", None)
    if cfg.pop("family", "gpt2") != "gpt2":
        raise InvalidValueError("build_causal_lm only builds GPT-2 models ('family': 'gpt2').")
    overrides = dict(overrides)
    # GPT2Config defaults bos/eos to 50256 (the OpenAI vocabulary): never inherit them for a small vocab.
    for name in _SPECIAL_IDS:
        cfg.setdefault(name, None)
    _resolve_vocab_and_ids(cfg, vocab_size, tokenizer, overrides, "causal LM")
    cfg.update(overrides)
    config = GPT2Config(**cfg)
    _check_heads(config.n_embd, config.n_head, "GPT-2")
    _check_ids(config.to_dict(), "causal LM")
    return config


def build_causal_lm(
    preset_or_config: str | Mapping | PreTrainedConfig = "gpt2-tiny",
    vocab_size: int | None = None,
    tokenizer=None,
    **overrides,
) -> GPT2LMHeadModel:
    """Build a randomly initialised ``GPT2LMHeadModel``.

    Args:
        preset_or_config: a name in :data:`CAUSAL_LM_PRESETS`, a dict of ``GPT2Config`` arguments, or a
            ``GPT2Config``.
        vocab_size: vocabulary size (default: ``len(tokenizer)``, else the config's ``vocab_size``).
        tokenizer: takes ``vocab_size`` and ``pad/bos/eos_token_id`` from it.
        overrides: ``GPT2Config`` fields applied last (e.g. ``n_layer=6``, ``n_positions=512``).

    Raises:
        ValueError: unknown preset, missing vocabulary size, heads not dividing ``n_embd``, ids out of range.
    """
    model = GPT2LMHeadModel(causal_lm_config(preset_or_config, vocab_size, tokenizer, **overrides))
    # The class name does not contain "ForCausalLM", so transformers would warn and fall back to this loss anyway.
    model.loss_type = "ForCausalLM"
    return model


# --------------------------------------------------------------------------------------------------
# encoder-decoder
# --------------------------------------------------------------------------------------------------


def seq2seq_config(
    preset_or_config: str | Mapping | PreTrainedConfig = "marian-tiny",
    vocab_size: int | None = None,
    tokenizer=None,
    **overrides,
) -> MarianConfig | BartConfig:
    """The config that :func:`build_seq2seq` would use (same arguments)."""
    cfg = _resolve_preset(preset_or_config, SEQ2SEQ_PRESETS, "seq2seq")
    config_class = cfg.pop("_config_class", None)
    overrides = dict(overrides)
    family = overrides.pop("family", cfg.pop("family", None))
    if family is None:
        family = next((f for f, (c, _) in SEQ2SEQ_FAMILIES.items() if c is config_class), "marian")
    if family not in SEQ2SEQ_FAMILIES:
        raise InvalidValueError(f"Unknown seq2seq family {family!r}; known families: {', '.join(sorted(SEQ2SEQ_FAMILIES))}.")
    config_class = SEQ2SEQ_FAMILIES[family][0]

    for source in (cfg, overrides):  # expand layers / heads / ffn_dim to encoder_* and decoder_*
        for alias, targets in _SEQ2SEQ_ALIASES.items():
            if alias in source:
                value = source.pop(alias)
                for target in targets:
                    source[target] = value
    _resolve_vocab_and_ids(cfg, vocab_size, tokenizer, overrides, "seq2seq model")
    cfg.update(overrides)
    if tokenizer is None:
        for name, default in DEFAULT_SEQ2SEQ_SPECIAL_IDS.items():
            if cfg.get(name) is None and default < cfg["vocab_size"]:
                cfg[name] = default
    for name in _SPECIAL_IDS:
        cfg.setdefault(name, None)  # never inherit the family's pretrained-vocabulary ids
    if cfg.get("decoder_start_token_id") is None:
        start = cfg["bos_token_id"] if cfg["bos_token_id"] is not None else cfg["pad_token_id"]
        if start is None:
            raise InvalidValueError(
                "The seq2seq model needs a decoder start token: give the tokenizer a bos or pad token, "
                "or pass decoder_start_token_id=..."
            )
        cfg["decoder_start_token_id"] = start
    if cfg["eos_token_id"] is None:
        raise InvalidValueError("The seq2seq model needs an eos token: give the tokenizer one or pass eos_token_id=...")
    cfg.setdefault("forced_eos_token_id", cfg["eos_token_id"])
    if family == "bart":
        cfg.setdefault("forced_bos_token_id", None)
    # One vocabulary for source and target: shared encoder/decoder embeddings tied to the output layer.
    cfg.setdefault("tie_word_embeddings", True)
    if family == "marian":
        cfg["decoder_vocab_size"] = cfg["vocab_size"]
        cfg.setdefault("share_encoder_decoder_embeddings", True)
    config = config_class(**cfg)
    _check_heads(config.d_model, config.encoder_attention_heads, f"{family} encoder")
    _check_heads(config.d_model, config.decoder_attention_heads, f"{family} decoder")
    _check_ids(config.to_dict(), "seq2seq model")
    return config


def build_seq2seq(
    preset_or_config: str | Mapping | PreTrainedConfig = "marian-tiny",
    vocab_size: int | None = None,
    tokenizer=None,
    **overrides,
):
    """Build a randomly initialised encoder-decoder with a shared source/target vocabulary.

    Args:
        preset_or_config: a name in :data:`SEQ2SEQ_PRESETS`, a dict (``"family": "marian" | "bart"``, default
            marian, plus config fields; ``layers`` / ``heads`` / ``ffn_dim`` set encoder and decoder alike),
            or a ``MarianConfig`` / ``BartConfig``.
        vocab_size: vocabulary size (default: ``len(tokenizer)``, else the config's ``vocab_size``).
        tokenizer: takes ``vocab_size`` and ``pad/bos/eos_token_id`` from it.
        overrides: config fields applied last (e.g. ``dropout=0.3``, ``layers=4``, ``family="bart"``).

    Returns:
        ``MarianMTModel`` or ``BartForConditionalGeneration``.

    Raises:
        ValueError: unknown preset or family, missing vocabulary size, missing eos / decoder start token,
        heads not dividing ``d_model``, ids out of range.
    """
    config = seq2seq_config(preset_or_config, vocab_size, tokenizer, **overrides)
    model_class = next(m for c, m in SEQ2SEQ_FAMILIES.values() if isinstance(config, c))
    return model_class(config)
