"""LSTM encoder-decoder with attention (Luong et al. 2015 / Bahdanau et al. 2015) on the transformers 5 stack.

Configuration and model live side by side, in transformers' one-file-per-model style:

* :class:`LSTMSeq2SeqConfig` (``model_type = "seqkd_lstm_seq2seq"``, ``is_encoder_decoder = True``)
* :class:`LSTMForConditionalGeneration`:

  - encoder: embedding -> dropout -> fused (optionally bidirectional) ``nn.LSTM``, run on a packed sequence
    so that padded source positions change nothing (left or right padding);
  - bridge: the encoder's final ``(h, c)`` (both directions concatenated) give the decoder's initial state
    (``decoder_init``: a dense ``"bridge"``, a ``"copy"``, or ``"zeros"``);
  - decoder: embedding -> dropout -> ``nn.LSTM`` stepped over time with attention over the encoder outputs
    (padded source positions masked out), an attentional vector ``tanh(W_c [context; h])`` -> dropout ->
    softmax layer (optionally tied to the decoder embedding, which may also be shared with the encoder).

Both are registered with ``AutoConfig`` / ``AutoModelForSeq2SeqLM`` when this module is imported
(``import seqkd`` does it), so ``AutoModelForSeq2SeqLM.from_pretrained(path)`` works without
``trust_remote_code``.

Attention
---------
``attention="luong"`` (global attention, Luong et al. 2015): the LSTM reads ``[y_{t-1}; h~_{t-1}]`` (input
feeding, ``input_feeding=True``) or ``y_{t-1}``, then its top output ``h_t`` attends to the encoder outputs with
the ``"general"`` (``h_t^T W_a h_s``) or ``"dot"`` (``h_t^T h_s``) score and ``h~_t = tanh(W_c [c_t; h_t])``.
Without input feeding the decoder LSTM runs fused over the whole target (training and prefill).

``attention="bahdanau"`` (additive, Bahdanau et al. 2015): the previous top state ``s_{t-1}`` attends with
``v^T tanh(W_q s_{t-1} + W_k h_s)``, the LSTM reads ``[y_{t-1}; c_t]`` and ``h~_t = tanh(W_c [s_t; c_t])``.

Decoder state
-------------
``forward`` returns ``decoder_state``: ``(h, c)`` or, with Luong input feeding, ``(h, c, feed)``; ``h`` and ``c``
are ``[decoder_layers, batch, hidden_size]``, ``feed`` (the last attentional vector) is ``[1, batch, hidden_size]``,
so every tensor has the batch on dim 1. Passing it back as ``decoder_state=`` (with the same ``encoder_outputs``)
continues decoding from there; ``None`` starts from the encoder's bridged final state.

The argument is deliberately *not* called ``state``: seqkd's trainer and evaluation treat a ``forward(state=...)``
model as a stateful language model whose state flows from one batch to the next (TBPTT), which a translation model
must not do.

``generate()`` runs the encoder once, reads the decoder prompt (usually ``decoder_start_token_id``) once, then
feeds only the newest token with the cached decoder state. Greedy, sampling and beam search are supported (the
state is reordered between beams); assisted generation is not (the model is stateful).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import AutoConfig, AutoModelForSeq2SeqLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import ModelOutput

from seqkd.errors import InvalidValueError
from seqkd.models.lstm import AutocastSafeLSTM

__all__ = [
    "LSTMSeq2SeqConfig",
    "LSTMSeq2SeqPreTrainedModel",
    "LSTMSeq2SeqEncoder",
    "LSTMSeq2SeqDecoder",
    "LSTMForConditionalGeneration",
    "LSTMSeq2SeqEncoderOutput",
    "LSTMSeq2SeqLMOutput",
    "LSTMSeq2SeqGenerationState",
]

DecoderState = tuple[torch.Tensor, ...]

ATTENTION_TYPES = ("luong", "bahdanau")
ATTENTION_SCORES = ("general", "dot")
DECODER_INITS = ("bridge", "copy", "zeros")


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@strict
class LSTMSeq2SeqConfig(PreTrainedConfig):
    r"""Configuration of :class:`LSTMForConditionalGeneration`.

    Args:
        vocab_size: size of the vocabulary, shared by source and target.
        embedding_size: size of the word embeddings (encoder and decoder).
        hidden_size: size of the decoder LSTM state, of the encoder outputs and of the attentional vector. With a
            bidirectional encoder each direction has ``hidden_size // 2`` units (so it must be even).
        encoder_layers / decoder_layers: number of stacked LSTM layers of the encoder / decoder.
        bidirectional: bidirectional encoder (the two directions are concatenated).
        attention: ``"luong"`` (global attention, score after the LSTM step) or ``"bahdanau"`` (additive, score
            from the previous decoder state, context fed to the LSTM).
        attention_score: Luong's score, ``"general"`` (``h_t^T W_a h_s``) or ``"dot"`` (``h_t^T h_s``); unused by
            ``"bahdanau"``.
        input_feeding: Luong input feeding (the previous attentional vector is concatenated to the decoder LSTM
            input). Unused by ``"bahdanau"``, which always feeds its context vector.
        decoder_init: initial decoder state from the encoder's final ``(h, c)``: ``"bridge"`` (a dense layer over
            all encoder layers, ``tanh`` on ``h``; any layer counts), ``"copy"`` (layer by layer; needs
            ``encoder_layers == decoder_layers``) or ``"zeros"``.
        embedding_dropout: dropout on the embeddings, in [0, 1).
        layer_dropout: dropout between stacked LSTM layers (``nn.LSTM(dropout=...)``), in [0, 1).
        output_dropout: dropout on the attentional vector (before the softmax layer and the input feeding), in [0, 1).
        tie_word_embeddings: tie the softmax weight to the decoder input embedding (needs
            ``embedding_size == hidden_size``).
        share_encoder_decoder_embeddings: one embedding matrix for encoder and decoder (same vocabulary).
        init_range: every weight is initialised uniformly in ``[-init_range, init_range]``; biases of linear layers
            start at zero.
        pad_token_id / bos_token_id / eos_token_id: special token ids.
        decoder_start_token_id: first decoder input (``generate`` and label shifting); defaults to ``bos_token_id``.
    """

    model_type = "seqkd_lstm_seq2seq"
    attribute_map = {"num_hidden_layers": "decoder_layers"}

    vocab_size: int = 10000
    embedding_size: int = 256
    hidden_size: int = 256
    encoder_layers: int = 2
    decoder_layers: int = 2
    bidirectional: bool = True
    attention: str = "luong"
    attention_score: str = "general"
    input_feeding: bool = True
    decoder_init: str = "bridge"
    embedding_dropout: float | int = 0.2
    layer_dropout: float | int = 0.2
    output_dropout: float | int = 0.2
    tie_word_embeddings: bool = True
    share_encoder_decoder_embeddings: bool = True
    init_range: float | int = 0.1
    use_cache: bool = True
    is_encoder_decoder: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    decoder_start_token_id: int | None = None

    def __post_init__(self, **kwargs):
        self._validate()
        if self.decoder_start_token_id is None:
            self.decoder_start_token_id = self.bos_token_id
        super().__post_init__(**kwargs)

    def _validate(self) -> None:
        for name in ("vocab_size", "embedding_size", "hidden_size", "encoder_layers", "decoder_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidValueError(f"{name} must be > 0, got {value!r}: pass a positive integer.")
        if self.bidirectional and self.hidden_size % 2:
            raise InvalidValueError(
                f"hidden_size must be even with bidirectional=True (each encoder direction gets hidden_size // 2 "
                f"units), got hidden_size={self.hidden_size}: use hidden_size={self.hidden_size + 1} or "
                "bidirectional=False."
            )
        if self.attention not in ATTENTION_TYPES:
            raise InvalidValueError(f"attention must be one of {ATTENTION_TYPES}, got {self.attention!r}.")
        if self.attention_score not in ATTENTION_SCORES:
            raise InvalidValueError(
                f"attention_score must be one of {ATTENTION_SCORES} (Luong's score; unused by 'bahdanau'), "
                f"got {self.attention_score!r}."
            )
        if self.decoder_init not in DECODER_INITS:
            raise InvalidValueError(f"decoder_init must be one of {DECODER_INITS}, got {self.decoder_init!r}.")
        if self.decoder_init == "copy" and self.encoder_layers != self.decoder_layers:
            raise InvalidValueError(
                f"decoder_init='copy' needs encoder_layers == decoder_layers, got encoder_layers={self.encoder_layers} "
                f"and decoder_layers={self.decoder_layers}: use decoder_init='bridge' (any layer counts) or equal "
                "layer counts."
            )
        for name in ("embedding_dropout", "layer_dropout", "output_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise InvalidValueError(f"{name} must be in [0, 1), got {value!r}: use e.g. {name}=0.2, or 0.0 to disable it.")
        if isinstance(self.init_range, bool) or not isinstance(self.init_range, (int, float)) or self.init_range <= 0:
            raise InvalidValueError(f"init_range must be > 0, got {self.init_range!r}: e.g. init_range=0.1.")
        if self.tie_word_embeddings and self.embedding_size != self.hidden_size:
            raise InvalidValueError(
                "tie_word_embeddings=True needs embedding_size == hidden_size (the softmax layer reads the "
                f"hidden_size attentional vector), got embedding_size={self.embedding_size} and "
                f"hidden_size={self.hidden_size}: set embedding_size={self.hidden_size} or tie_word_embeddings=False."
            )
        if not self.is_encoder_decoder:
            raise InvalidValueError(
                "is_encoder_decoder must be True for LSTMSeq2SeqConfig (got False): leave it at its default."
            )
        for name in ("pad_token_id", "bos_token_id", "decoder_start_token_id", "eos_token_id"):
            value = getattr(self, name)
            values = value if isinstance(value, list) else [value]
            for v in values:
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < self.vocab_size):
                    raise InvalidValueError(
                        f"{name} must be a token id in [0, vocab_size={self.vocab_size}) or None, got {value!r}."
                    )

    @property
    def encoder_direction_size(self) -> int:
        """Hidden units of each encoder direction (``hidden_size // 2`` when bidirectional)."""
        return self.hidden_size // 2 if self.bidirectional else self.hidden_size

    @property
    def feeds_attentional_vector(self) -> bool:
        """True when the decoder state carries the previous attentional vector (Luong input feeding)."""
        return self.attention == "luong" and self.input_feeding


# --------------------------------------------------------------------------------------------------
# Outputs and generation state
# --------------------------------------------------------------------------------------------------


@dataclass
class LSTMSeq2SeqEncoderOutput(ModelOutput):
    """Output of :class:`LSTMSeq2SeqEncoder`.

    Every tensor has the batch on dim 0 (``generate`` repeats them along dim 0 for beams).

    Attributes:
        last_hidden_state: ``[batch, src_len, hidden_size]`` top-layer outputs (directions concatenated; zeros at
            padded positions).
        final_hidden_state / final_cell_state: ``[batch, encoder_layers, hidden_size]`` final ``h`` / ``c`` of each
            layer (for each direction after its last real token; directions concatenated).
    """

    last_hidden_state: torch.Tensor | None = None
    final_hidden_state: torch.Tensor | None = None
    final_cell_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class LSTMSeq2SeqLMOutput(ModelOutput):
    """Output of :class:`LSTMForConditionalGeneration` (``Seq2SeqLMOutput`` with ``decoder_state`` for the cache).

    Attributes:
        loss: cross-entropy of ``logits`` against ``labels`` (``-100`` ignored) when labels are given.
        logits: ``[batch, tgt_len, vocab_size]`` (fewer positions with ``logits_to_keep``).
        decoder_state: the decoder state after the last (unmasked) target position (see the module docstring).
        decoder_hidden_states: with ``output_hidden_states``: ``(top LSTM outputs, attentional vectors)``, each
            ``[batch, tgt_len, hidden_size]``.
        decoder_attentions: always ``None`` (no self-attention).
        cross_attentions: with ``output_attentions``: a 1-tuple of attention weights ``[batch, 1, tgt_len, src_len]``.
        encoder_last_hidden_state: ``[batch, src_len, hidden_size]``.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    decoder_state: DecoderState | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None


class LSTMSeq2SeqGenerationState:
    """Holder of the decoder state inside ``generate()``.

    ``generate`` keeps it in ``model_kwargs["cache"]`` (the only key its beam search knows how to reorder) and
    returns it as ``GenerateEncoderDecoderOutput.cache`` with ``return_dict_in_generate=True``; ``.state`` is the
    decoder state after the last token fed to the model.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, state: DecoderState):
        self.state = tuple(state)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        beam_idx = beam_idx.to(self.state[0].device)
        self.state = tuple(s.index_select(1, beam_idx) for s in self.state)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        h = self.state[0]
        return f"LSTMSeq2SeqGenerationState(layers={h.shape[0]}, batch={h.shape[1]}, hidden_size={h.shape[2]})"


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def _run_masked_lstm(
    lstm: nn.LSTM, x: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Run a batch-first ``nn.LSTM`` from a zero state, skipping positions where ``attention_mask == 0``.

    Real tokens are moved to the front of each row (order kept), the rows are packed, and the outputs are
    scattered back to their original positions (zeros at masked positions). Works for left and right padding.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return lstm(x)
    seq_len = x.shape[1]
    mask = attention_mask.to(device=x.device, dtype=torch.bool)
    lengths = mask.sum(dim=1)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    x_sorted = x.gather(1, order.unsqueeze(-1).expand_as(x))
    packed = pack_padded_sequence(x_sorted, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
    out_packed, (h, c) = lstm(packed)
    out_sorted, _ = pad_packed_sequence(out_packed, batch_first=True, total_length=seq_len)
    out_sorted = out_sorted * (lengths > 0).view(-1, 1, 1).to(out_sorted.dtype)  # fully masked rows: zeros
    out = torch.zeros_like(out_sorted).scatter(1, order.unsqueeze(-1).expand_as(out_sorted), out_sorted)
    return out, (h, c)


class LSTMSeq2SeqEncoder(nn.Module):
    """Embedding -> dropout -> (bidirectional) ``nn.LSTM``; returns :class:`LSTMSeq2SeqEncoderOutput`."""

    # generate() reads `model.encoder.main_input_name` whenever the model has an `encoder` attribute.
    main_input_name = "input_ids"

    def __init__(self, config: LSTMSeq2SeqConfig):
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_size)
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)
        self.lstm = AutocastSafeLSTM(
            input_size=config.embedding_size,
            hidden_size=config.encoder_direction_size,
            num_layers=config.encoder_layers,
            dropout=config.layer_dropout if config.encoder_layers > 1 else 0.0,
            bidirectional=config.bidirectional,
            batch_first=True,
        )

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = True,
        **kwargs,
    ) -> LSTMSeq2SeqEncoderOutput | tuple:
        """Encode ``input_ids`` ``[batch, src_len]``; ``attention_mask`` 0 = padding (skipped by the LSTM)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise InvalidValueError("Pass exactly one of input_ids or inputs_embeds to the encoder.")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        if inputs_embeds.is_cuda:
            # Weights loaded straight onto the GPU (e.g. device_map) are not in cuDNN's single chunk yet.
            self.lstm.flatten_parameters()
        out, (h, c) = _run_masked_lstm(self.lstm, self.embedding_dropout(inputs_embeds), attention_mask)
        h, c = self._merge_directions(h), self._merge_directions(c)
        output = LSTMSeq2SeqEncoderOutput(
            last_hidden_state=out, final_hidden_state=h.transpose(0, 1), final_cell_state=c.transpose(0, 1)
        )
        return output if return_dict is None or return_dict else output.to_tuple()

    def _merge_directions(self, s: torch.Tensor) -> torch.Tensor:
        """``[layers * directions, batch, H_dir]`` -> ``[layers, batch, hidden_size]``."""
        if not self.config.bidirectional:
            return s
        layers, batch = self.config.encoder_layers, s.shape[1]
        s = s.view(layers, 2, batch, s.shape[-1])
        return torch.cat([s[:, 0], s[:, 1]], dim=-1)


class LSTMSeq2SeqDecoder(nn.Module):
    """Attentional LSTM decoder (see the module docstring); produces attentional vectors, not logits."""

    def __init__(self, config: LSTMSeq2SeqConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_size)
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)
        extra_input = hidden if (config.attention == "bahdanau" or config.input_feeding) else 0
        self.lstm = AutocastSafeLSTM(
            input_size=config.embedding_size + extra_input,
            hidden_size=hidden,
            num_layers=config.decoder_layers,
            dropout=config.layer_dropout if config.decoder_layers > 1 else 0.0,
            batch_first=True,
        )
        if config.attention == "bahdanau":
            self.attention_query = nn.Linear(hidden, hidden)
            self.attention_key = nn.Linear(hidden, hidden, bias=False)
            self.attention_v = nn.Linear(hidden, 1, bias=False)
        elif config.attention_score == "general":
            self.attention_key = nn.Linear(hidden, hidden, bias=False)
        self.combine = nn.Linear(2 * hidden, hidden, bias=False)
        self.output_dropout = nn.Dropout(config.output_dropout)

        n_enc, n_dec = config.encoder_layers, config.decoder_layers
        if config.decoder_init == "bridge":
            self.bridge_hidden = nn.Linear(n_enc * hidden, n_dec * hidden)
            self.bridge_cell = nn.Linear(n_enc * hidden, n_dec * hidden)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    # -- state ---------------------------------------------------------------------------------------
    def initial_state(self, encoder_outputs: LSTMSeq2SeqEncoderOutput) -> DecoderState:
        """Decoder state before the first target token, from the encoder's final ``(h, c)``."""
        config = self.config
        memory = encoder_outputs.last_hidden_state
        batch, hidden = memory.shape[0], config.hidden_size
        shape = (config.decoder_layers, batch, hidden)
        if config.decoder_init == "zeros":
            h = c = memory.new_zeros(shape)
        else:
            enc_h, enc_c = encoder_outputs.final_hidden_state, encoder_outputs.final_cell_state
            if enc_h is None or enc_c is None:
                raise InvalidValueError(
                    f"decoder_init={config.decoder_init!r} needs the encoder's final state: pass encoder_outputs as "
                    "the LSTMSeq2SeqEncoderOutput of model.get_encoder() (or a tuple (last_hidden_state, "
                    "final_hidden_state, final_cell_state)), not only the last hidden state."
                )
            if config.decoder_init == "copy":
                h, c = enc_h.transpose(0, 1), enc_c.transpose(0, 1)
            else:
                h = torch.tanh(self.bridge_hidden(enc_h.reshape(batch, -1)))
                c = self.bridge_cell(enc_c.reshape(batch, -1))
                h = h.view(batch, config.decoder_layers, hidden).transpose(0, 1)
                c = c.view(batch, config.decoder_layers, hidden).transpose(0, 1)
            h, c = h.contiguous(), c.contiguous()
        if config.feeds_attentional_vector:
            return h, c, memory.new_zeros((1, batch, hidden))
        return h, c

    # -- attention -----------------------------------------------------------------------------------
    def attention_keys(self, memory: torch.Tensor) -> torch.Tensor:
        """Keys ``[batch, src_len, hidden]`` computed once per forward from the encoder outputs."""
        if self.config.attention == "bahdanau" or self.config.attention_score == "general":
            return self.attention_key(memory)
        return memory

    def attend(
        self, query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor, source_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``query`` ``[batch, T, hidden]`` -> context ``[batch, T, hidden]`` and weights ``[batch, T, src_len]``."""
        if self.config.attention == "bahdanau":
            q = self.attention_query(query)  # [B, T, H]
            scores = self.attention_v(torch.tanh(q.unsqueeze(2) + keys.unsqueeze(1))).squeeze(-1)  # [B, T, S]
        else:
            scores = torch.bmm(query, keys.transpose(1, 2))  # [B, T, S]
        if source_mask is not None:
            # A large negative number rather than -inf: a fully masked row stays finite (uniform weights).
            scores = scores.masked_fill(~source_mask.unsqueeze(1), torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores.float(), dim=-1).to(memory.dtype)
        return torch.bmm(weights, memory), weights

    # -- forward -------------------------------------------------------------------------------------
    def forward(
        self,
        inputs_embeds: torch.Tensor,
        memory: torch.Tensor,
        state: DecoderState,
        source_mask: torch.Tensor | None = None,
        target_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DecoderState]:
        """Run the decoder over embedded targets ``[batch, T, E]``.

        Returns ``(attentional vectors, top LSTM outputs, attention weights, new state)`` (the first three
        ``[batch, T, ...]``). ``target_mask`` 0 = skip that position (its state update is dropped).
        """
        config = self.config
        if inputs_embeds.is_cuda:
            self.lstm.flatten_parameters()
        x = self.embedding_dropout(inputs_embeds)
        keys = self.attention_keys(memory)
        h, c = state[0], state[1]
        all_ones = target_mask is None or bool(target_mask.all())

        if config.attention == "luong" and not config.input_feeding and all_ones:
            # No recurrence through the attention: one fused LSTM call over the whole target.
            top, (h, c) = self.lstm(x, (h, c))
            context, weights = self.attend(top, keys, memory, source_mask)
            attentional = self.output_dropout(torch.tanh(self.combine(torch.cat([context, top], dim=-1))))
            return attentional, top, weights, (h, c)

        feed = state[2] if config.feeds_attentional_vector else None
        step_mask = None if all_ones else target_mask.to(device=x.device, dtype=torch.bool)
        attentionals, tops, all_weights = [], [], []
        for t in range(x.shape[1]):
            x_t = x[:, t : t + 1]
            if config.attention == "bahdanau":
                context, weights = self.attend(h[-1].unsqueeze(1), keys, memory, source_mask)
                out, (h_new, c_new) = self.lstm(torch.cat([x_t, context], dim=-1), (h, c))
                attentional = self.output_dropout(torch.tanh(self.combine(torch.cat([out, context], dim=-1))))
            else:
                inp = torch.cat([x_t, feed.transpose(0, 1)], dim=-1) if feed is not None else x_t
                out, (h_new, c_new) = self.lstm(inp, (h, c))
                context, weights = self.attend(out, keys, memory, source_mask)
                attentional = self.output_dropout(torch.tanh(self.combine(torch.cat([context, out], dim=-1))))
            if step_mask is None:
                h, c = h_new, c_new
                if feed is not None:
                    feed = attentional.transpose(0, 1)
            else:
                keep = step_mask[:, t].view(1, -1, 1)
                h, c = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
                if feed is not None:
                    feed = torch.where(keep, attentional.transpose(0, 1), feed)
            attentionals.append(attentional)
            tops.append(out)
            all_weights.append(weights)
        new_state = (h, c, feed) if feed is not None else (h, c)
        return torch.cat(attentionals, 1), torch.cat(tops, 1), torch.cat(all_weights, 1), new_state


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class LSTMSeq2SeqPreTrainedModel(PreTrainedModel):
    config_class = LSTMSeq2SeqConfig
    config: LSTMSeq2SeqConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _is_stateful = True
    _no_split_modules = ["LSTMSeq2SeqEncoder", "LSTMSeq2SeqDecoder"]

    # Copied from seqkd.models.lstm.LSTMPreTrainedModel._init_weights (one file per model family).
    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        r = float(self.config.init_range)
        if isinstance(module, nn.Embedding):
            init.uniform_(module.weight, -r, r)
        elif isinstance(module, nn.LSTM):
            for param in module.parameters(recurse=False):
                init.uniform_(param, -r, r)
        elif isinstance(module, nn.Linear):
            init.uniform_(module.weight, -r, r)
            if module.bias is not None:
                init.zeros_(module.bias)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The decoder state is not a key/value cache: generate() must not create an EncoderDecoderCache for us.
        return False


class LSTMForConditionalGeneration(LSTMSeq2SeqPreTrainedModel, GenerationMixin):
    """LSTM encoder-decoder with attention and a (optionally tied) softmax layer.

    ``forward(input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
    encoder_outputs=None, decoder_state=None, labels=None, return_dict=None, *, inputs_embeds=None,
    decoder_inputs_embeds=None, output_attentions=None, output_hidden_states=None, logits_to_keep=0,
    use_cache=None, **kwargs) -> LSTMSeq2SeqLMOutput``

    * ``labels``: ``[batch, tgt_len]``, *not* shifted (``labels[:, t]`` is the target of ``logits[:, t]``), ``-100``
      ignored. Without ``decoder_input_ids`` the decoder reads the labels shifted right behind
      ``decoder_start_token_id`` (:meth:`prepare_decoder_input_ids_from_labels`).
    * ``num_items_in_batch`` (in ``kwargs``): the loss is then ``sum / num_items_in_batch`` (gradient accumulation
      in ``Trainer``), as for any transformers model.
    * ``attention_mask``: source padding (0 = pad); padded positions are skipped by the encoder and masked out of
      the attention. ``decoder_attention_mask``: 0 = skip that target position (the state is not updated); the
      usual right-padded targets need none.
    """

    def __init__(self, config: LSTMSeq2SeqConfig):
        super().__init__(config)
        self.encoder = LSTMSeq2SeqEncoder(config)
        self.decoder = LSTMSeq2SeqDecoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self._tied_weights_keys = self._tie_mapping()
        self.post_init()

    # -- tying -----------------------------------------------------------------------------------
    def _tie_mapping(self) -> dict[str, str]:
        mapping = {}
        if self.config.tie_word_embeddings:
            mapping["lm_head.weight"] = "decoder.embeddings.weight"
        if self.config.share_encoder_decoder_embeddings:
            mapping["encoder.embeddings.weight"] = "decoder.embeddings.weight"
        return mapping

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        # transformers only ties anything when `tie_word_embeddings` is set; the encoder/decoder embedding sharing
        # has its own switch, so the mapping is built from the (current) config here.
        if all_submodels:
            return super().get_expanded_tied_weights_keys(all_submodels=True)
        self._tied_weights_keys = self._tie_mapping()
        return dict(self._tied_weights_keys)

    # -- accessors -------------------------------------------------------------------------------
    def get_encoder(self, modality: str | None = None) -> LSTMSeq2SeqEncoder:
        return self.encoder

    def get_decoder(self) -> LSTMSeq2SeqDecoder:
        return self.decoder

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.encoder.embeddings = value
        if self.config.share_encoder_decoder_embeddings:
            self.decoder.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    # -- labels ----------------------------------------------------------------------------------
    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.LongTensor:
        """``labels`` shifted one position right behind ``decoder_start_token_id`` (``-100`` -> ``pad_token_id``)."""
        start, pad = self.config.decoder_start_token_id, self.config.pad_token_id
        if start is None:
            raise InvalidValueError("decoder_start_token_id (or bos_token_id) must be set in the config to shift labels.")
        shifted = labels.new_empty(labels.shape)
        shifted[:, 1:] = labels[:, :-1]
        shifted[:, 0] = start
        if bool((shifted == -100).any()):
            if pad is None:
                raise InvalidValueError("labels contain -100 but pad_token_id is None: set pad_token_id in the config.")
            shifted = shifted.masked_fill(shifted == -100, pad)
        return shifted

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: LSTMSeq2SeqEncoderOutput | tuple | None = None,
        decoder_state: DecoderState | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        use_cache: bool | None = None,
        **kwargs,
    ) -> LSTMSeq2SeqLMOutput | tuple:
        r"""Encode the source (unless ``encoder_outputs`` are given) and decode the target.

        Args:
            input_ids / inputs_embeds: source ``[batch, src_len]`` (or its embeddings); not needed with
                ``encoder_outputs``.
            attention_mask: source mask, 1 = token, 0 = padding.
            decoder_input_ids / decoder_inputs_embeds: decoder inputs ``[batch, tgt_len]``; built from ``labels``
                when both are missing.
            decoder_attention_mask: optional target mask, 0 = skip that position.
            encoder_outputs: :class:`LSTMSeq2SeqEncoderOutput` (or tuple) from ``model.get_encoder()``.
            decoder_state: decoder state to continue from (see the module docstring); ``None`` = from the encoder.
            labels: targets aligned with the decoder positions (``-100`` ignored).
            return_dict: ``False`` returns a tuple of the non-``None`` fields.
            output_attentions: return the attention weights as ``cross_attentions``.
            output_hidden_states: return ``decoder_hidden_states`` (top LSTM outputs, attentional vectors).
            logits_to_keep: ``0`` keeps all positions; ``k`` keeps the last ``k`` (used by ``generate``).
            use_cache: accepted for API compatibility; the decoder state is always returned.
            kwargs: ``num_items_in_batch`` / ``ignore_index`` are forwarded to the loss; others are ignored.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, return_dict=True
            )
        elif not isinstance(encoder_outputs, LSTMSeq2SeqEncoderOutput):
            if isinstance(encoder_outputs, (tuple, list)):
                encoder_outputs = LSTMSeq2SeqEncoderOutput(*encoder_outputs)
            else:  # another ModelOutput (e.g. BaseModelOutput) or a dict
                encoder_outputs = LSTMSeq2SeqEncoderOutput(
                    last_hidden_state=encoder_outputs["last_hidden_state"],
                    final_hidden_state=encoder_outputs.get("final_hidden_state"),
                    final_cell_state=encoder_outputs.get("final_cell_state"),
                )
        memory = encoder_outputs.last_hidden_state

        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if labels is None:
                raise InvalidValueError("Pass decoder_input_ids (or decoder_inputs_embeds), or labels to build them from.")
            decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels=labels)
        if decoder_inputs_embeds is None:
            decoder_inputs_embeds = self.decoder.embeddings(decoder_input_ids)

        if decoder_state is None:
            decoder_state = self.decoder.initial_state(encoder_outputs)
        source_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            source_mask = attention_mask.to(device=memory.device, dtype=torch.bool)

        attentional, top, weights, new_state = self.decoder(
            decoder_inputs_embeds, memory, decoder_state, source_mask=source_mask, target_mask=decoder_attention_mask
        )
        if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            attentional = slice_logits_to_keep(attentional, logits_to_keep)
        logits = self.lm_head(attentional)

        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise InvalidValueError(
                    f"labels have {labels.shape[1]} positions but the logits {logits.shape[1]}: do not combine labels "
                    "with logits_to_keep."
                )
            loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
            # transformers' loss for "...ForConditionalGeneration" is the causal-LM one; passing the labels as
            # `shift_labels` makes it use them as they are (seq2seq labels are already aligned with the logits).
            loss = self.loss_function(
                logits, None, vocab_size=self.config.vocab_size, shift_labels=labels.contiguous(), **loss_kwargs
            )

        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output = LSTMSeq2SeqLMOutput(
            loss=loss,
            logits=logits,
            decoder_state=new_state,
            decoder_hidden_states=(top, attentional) if output_hidden_states else None,
            cross_attentions=(weights.unsqueeze(1),) if output_attentions else None,
            encoder_last_hidden_state=memory,
        )
        return output if return_dict else output.to_tuple()

    # -- generation ------------------------------------------------------------------------------
    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: LSTMSeq2SeqGenerationState | None = None,
        decoder_state: DecoderState | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: LSTMSeq2SeqEncoderOutput | None = None,
        use_cache: bool = True,
        logits_to_keep: int | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> dict:
        """Feed the decoder prompt once, then only the newest token together with the carried decoder state.

        ``input_ids`` are the decoder ids generated so far. The encoder outputs (computed once by ``generate``) are
        passed at every step. With ``use_cache=False`` the whole target is re-decoded at every step (for checks).
        """
        model_inputs: dict = {"encoder_outputs": encoder_outputs}
        if attention_mask is not None:
            model_inputs["attention_mask"] = attention_mask
        if use_cache and isinstance(cache, LSTMSeq2SeqGenerationState):
            n_new = next_sequence_length or 1
            model_inputs["decoder_input_ids"] = input_ids[:, -n_new:].contiguous()
            model_inputs["decoder_state"] = cache.state
            if decoder_attention_mask is not None:
                model_inputs["decoder_attention_mask"] = decoder_attention_mask[:, -n_new:]
        else:
            model_inputs["decoder_input_ids"] = input_ids.contiguous()
            if decoder_attention_mask is not None:
                model_inputs["decoder_attention_mask"] = decoder_attention_mask
            if decoder_state is not None:
                batch_size = input_ids.shape[0]
                if decoder_state[0].shape[1] != batch_size and batch_size % decoder_state[0].shape[1] == 0:
                    # generate() expanded the inputs for num_beams / num_return_sequences
                    expand = batch_size // decoder_state[0].shape[1]
                    decoder_state = tuple(s.repeat_interleave(expand, dim=1) for s in decoder_state)
                model_inputs["decoder_state"] = decoder_state
        if logits_to_keep is not None:
            model_inputs["logits_to_keep"] = logits_to_keep
        if output_attentions is not None:
            model_inputs["output_attentions"] = output_attentions
        if output_hidden_states is not None:
            model_inputs["output_hidden_states"] = output_hidden_states
        return model_inputs

    def _update_model_kwargs_for_generation(
        self,
        outputs: ModelOutput,
        model_kwargs: dict,
        is_encoder_decoder: bool = False,
        num_new_tokens: int = 1,
    ) -> dict:
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        if model_kwargs.get("use_cache", True) and outputs.get("decoder_state") is not None:
            cache = model_kwargs.get("cache")
            if isinstance(cache, LSTMSeq2SeqGenerationState):
                cache.state = tuple(outputs.decoder_state)
            else:
                model_kwargs["cache"] = LSTMSeq2SeqGenerationState(outputs.decoder_state)
        return model_kwargs


# --------------------------------------------------------------------------------------------------
# Auto-class registration (idempotent: re-importing or reloading the module must not raise)
# --------------------------------------------------------------------------------------------------

AutoConfig.register(LSTMSeq2SeqConfig.model_type, LSTMSeq2SeqConfig, exist_ok=True)
AutoModelForSeq2SeqLM.register(LSTMSeq2SeqConfig, LSTMForConditionalGeneration, exist_ok=True)
