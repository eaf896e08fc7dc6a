"""LSTM language model (Zaremba et al. 2014 style) on the transformers 5 stack.

Configuration and model live side by side, in transformers' one-file-per-model style:

* :class:`LSTMLMConfig` (``model_type = "seqkd_lstm"``)
* :class:`LSTMForCausalLM`: embedding -> dropout -> fused ``nn.LSTM`` (cuDNN on GPU) -> dropout
  -> optional linear projection -> linear decoder (optionally tied to the embedding).

Both are registered with ``AutoConfig`` / ``AutoModelForCausalLM`` when this module is imported
(``import seqkd`` does it), so ``AutoModelForCausalLM.from_pretrained(path)`` works without
``trust_remote_code``.

Recurrent state
---------------
``forward`` returns ``state = (h, c)``, each ``[num_layers, batch, hidden_size]``. Passing it back
as ``state=`` continues the stream (truncated BPTT); callers detach it between optimisation steps::

    state = None
    for x, y in stream:                         # y: targets aligned with x (x shifted by one)
        out = model(input_ids=x, state=state, shift_labels=y)
        out.loss.backward()
        state = tuple(s.detach() for s in out.state)

``generate()`` carries the state as well: the prompt is read once, then only the newest token is
fed with the cached state. Greedy, sampling and beam search are supported (the state is reordered
between beams); assisted generation is not (the model is stateful).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import ModelOutput

from seqkd.errors import InvalidValueError
from seqkd.hardware import cpu_autocast_runs_lstm

__all__ = [
    "LSTMLMConfig",
    "LSTMPreTrainedModel",
    "LSTMForCausalLM",
    "LSTMCausalLMOutput",
    "LSTMGenerationState",
]

LSTMState = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@strict
class LSTMLMConfig(PreTrainedConfig):
    r"""Configuration of :class:`LSTMForCausalLM`.

    Args:
        vocab_size: number of tokens in the vocabulary.
        embedding_size: size of the word embeddings (input of the LSTM).
        hidden_size: size of the LSTM hidden/cell state (output of the LSTM).
        num_layers: number of stacked LSTM layers.
        embedding_dropout: dropout on the embeddings (before the LSTM), in [0, 1).
        layer_dropout: dropout between stacked LSTM layers (``nn.LSTM(dropout=...)``), in [0, 1).
        output_dropout: dropout on the LSTM output (before the projection/decoder), in [0, 1).
        projection_size: if set, a ``Linear(hidden_size, projection_size)`` is applied to the LSTM output
            before the decoder (a non-recurrent output projection, not ``nn.LSTM``'s ``proj_size``). With
            ``tie_word_embeddings`` it must equal ``embedding_size``; it lets tied models use
            ``embedding_size != hidden_size``.
        tie_word_embeddings: tie the decoder weight to the input embedding (Press & Wolf 2017; Inan et al. 2017).
        init_range: every weight is initialised uniformly in ``[-init_range, init_range]`` (Zaremba et al. 2014
            use 0.1 / 0.05 / 0.04 for small / medium / large); decoder and projection biases start at zero.
        pad_token_id / bos_token_id / eos_token_id: special token ids (used by ``generate``).

    Preset of Zaremba et al. "medium" on PTB: ``LSTMLMConfig(vocab_size=10000, embedding_size=650,
    hidden_size=650, num_layers=2, embedding_dropout=0.5, layer_dropout=0.5, output_dropout=0.5,
    init_range=0.05)`` (untied in the paper; tying is the usual improvement).
    """

    model_type = "seqkd_lstm"
    attribute_map = {"num_hidden_layers": "num_layers"}

    vocab_size: int = 10000
    embedding_size: int = 650
    hidden_size: int = 650
    num_layers: int = 2
    embedding_dropout: float | int = 0.5
    layer_dropout: float | int = 0.5
    output_dropout: float | int = 0.5
    projection_size: int | None = None
    tie_word_embeddings: bool = True
    init_range: float | int = 0.1
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        self._check_sizes_and_dropouts()
        super().__post_init__(**kwargs)

    def _check_sizes_and_dropouts(self) -> None:
        for name in ("vocab_size", "embedding_size", "hidden_size", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidValueError(f"{name} must be > 0, got {value!r}: pass a positive integer.")
        if self.projection_size is not None and (
            isinstance(self.projection_size, bool) or not isinstance(self.projection_size, int) or self.projection_size <= 0
        ):
            raise InvalidValueError(
                f"projection_size must be > 0 or None, got {self.projection_size!r}: pass None for no projection "
                f"or a positive integer (with tied embeddings: projection_size=embedding_size={self.embedding_size})."
            )
        for name in ("embedding_dropout", "layer_dropout", "output_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise InvalidValueError(f"{name} must be in [0, 1), got {value!r}: use e.g. {name}=0.5, or 0.0 to disable it.")
        if isinstance(self.init_range, bool) or not isinstance(self.init_range, (int, float)) or self.init_range <= 0:
            raise InvalidValueError(f"init_range must be > 0, got {self.init_range!r}: e.g. init_range=0.1 (Zaremba et al.).")
        if self.tie_word_embeddings:
            decoder_input = self.decoder_input_size
            if decoder_input != self.embedding_size:
                if self.projection_size is None:
                    raise InvalidValueError(
                        "tie_word_embeddings=True needs the decoder input size to equal embedding_size, but "
                        f"hidden_size={self.hidden_size} != embedding_size={self.embedding_size}. Either set "
                        f"embedding_size == hidden_size, enable the output projection with "
                        f"projection_size={self.embedding_size}, or set tie_word_embeddings=False."
                    )
                raise InvalidValueError(
                    "tie_word_embeddings=True needs projection_size == embedding_size, got "
                    f"projection_size={self.projection_size} and embedding_size={self.embedding_size}. Set "
                    f"projection_size={self.embedding_size} or tie_word_embeddings=False."
                )

    @property
    def decoder_input_size(self) -> int:
        """Size of the vector fed to the decoder: ``projection_size`` if a projection is used, else ``hidden_size``."""
        return self.projection_size if self.projection_size is not None else self.hidden_size


# --------------------------------------------------------------------------------------------------
# Outputs and generation state
# --------------------------------------------------------------------------------------------------


@dataclass
class LSTMCausalLMOutput(ModelOutput):
    """Output of :class:`LSTMForCausalLM`.

    Attributes:
        loss: language-modelling loss (scalar) when ``labels`` or ``shift_labels`` are given.
        logits: ``[batch, seq_len, vocab_size]`` next-token scores (fewer positions with ``logits_to_keep``).
        state: ``(h, c)``, each ``[num_layers, batch, hidden_size]``, the recurrent state after the last
            (unmasked) position; pass it back as ``state=`` to continue the stream.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    state: LSTMState | None = None


class LSTMGenerationState:
    """Holder of the ``(h, c)`` state inside ``generate()``.

    ``generate`` keeps it in ``model_kwargs["cache"]`` (the only key its beam search knows how to
    reorder) and returns it as ``GenerateDecoderOnlyOutput.cache`` with ``return_dict_in_generate=True``;
    ``.state`` is the state after the last token fed to the model.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, state: LSTMState):
        self.state = state

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        h, c = self.state
        beam_idx = beam_idx.to(h.device)
        self.state = (h.index_select(1, beam_idx), c.index_select(1, beam_idx))

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        h = self.state[0]
        return f"LSTMGenerationState(num_layers={h.shape[0]}, batch={h.shape[1]}, hidden_size={h.shape[2]})"


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class AutocastSafeLSTM(nn.LSTM):
    """``nn.LSTM`` that runs in float32 where CPU autocast has no LSTM kernel for its dtype.

    Under bf16 autocast on a CPU without avx512, torch's LSTM fails instead of falling back (see
    :func:`seqkd.hardware.cpu_autocast_runs_lstm`); there this module runs outside autocast, in float32, as autocast
    does for any op it cannot lower, and the rest of the model keeps its autocast. Its parameters, and so its
    checkpoints, are ``nn.LSTM``'s.
    """

    def forward(self, input, hx=None):
        data = input.data if isinstance(input, PackedSequence) else input
        if not (
            data.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
            and not cpu_autocast_runs_lstm(torch.get_autocast_dtype("cpu"))
        ):
            return super().forward(input, hx)
        if isinstance(input, PackedSequence):
            input = input._replace(data=input.data.float())
        else:
            input = input.float()
        if hx is not None:
            hx = tuple(state.float() for state in hx)
        with torch.autocast("cpu", enabled=False):
            return super().forward(input, hx)


class LSTMPreTrainedModel(PreTrainedModel):
    config_class = LSTMLMConfig
    config: LSTMLMConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _is_stateful = True
    _no_split_modules = ["AutocastSafeLSTM"]

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
        # The recurrent state is not a key/value cache: generate() must not create a DynamicCache for us.
        return False


class LSTMForCausalLM(LSTMPreTrainedModel, GenerationMixin):
    """Multi-layer LSTM language model with (optionally tied) softmax decoder.

    ``forward(input_ids, state=None, labels=None, shift_labels=None, return_dict=None, *,
    attention_mask=None, inputs_embeds=None, logits_to_keep=0, **kwargs) -> LSTMCausalLMOutput``

    * ``labels``: Hugging Face convention, same shape as ``input_ids``, shifted inside the model
      (position ``t`` predicts ``labels[t + 1]``), ``-100`` ignored.
    * ``shift_labels``: targets already aligned with the input positions (position ``t`` predicts
      ``shift_labels[t]``); used by stateful TBPTT streams so no target is lost at chunk boundaries.
    * ``num_items_in_batch`` (in ``kwargs``): forwarded to the loss (sum / num_items_in_batch), as for any
      transformers model, so gradient accumulation is normalised correctly by ``Trainer``.
    * ``attention_mask``: optional; positions with 0 are *skipped* by the recurrence (they neither read
      nor update the state; their logits are meaningless). Left-padded prompts therefore work in
      batched ``generate``. An all-ones mask takes the plain fused path.
    """

    _tied_weights_keys = {"lm_head.weight": "embeddings.weight"}

    def __init__(self, config: LSTMLMConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_size)
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)
        self.lstm = AutocastSafeLSTM(
            input_size=config.embedding_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.layer_dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.output_dropout = nn.Dropout(config.output_dropout)
        self.projection = (
            nn.Linear(config.hidden_size, config.projection_size) if config.projection_size is not None else None
        )
        self.lm_head = nn.Linear(config.decoder_input_size, config.vocab_size)
        self.post_init()

    # -- embeddings accessors (used by resize_token_embeddings, tying, ...) --------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    # -- state helpers ---------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=None) -> LSTMState:
        """Zero state ``(h, c)`` for ``batch_size`` streams (what ``state=None`` means)."""
        p = self.lm_head.weight
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)

    def _run_lstm(
        self, x: torch.Tensor, state: LSTMState | None, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, LSTMState]:
        if x.is_cuda and not getattr(self, "_lstm_flattened", False):
            # Weights loaded straight onto the GPU (e.g. device_map) are not in cuDNN's single chunk yet.
            self.lstm.flatten_parameters()
            self._lstm_flattened = True
        if attention_mask is None or bool(attention_mask.all()):
            out, new_state = self.lstm(x, state)
            # A batch_first LSTM returns its [seq, batch] buffer viewed as [batch, seq]. With no gradient anywhere (a
            # frozen teacher) matmul cannot fold that view into one mm and multiplies by the head's weight copied
            # once per row (a 20 x 650 x 10k copy per step at 2 x 650): one copy of the small hidden states avoids it.
            return out.contiguous(), new_state

        # Masked positions are skipped: move each row's real tokens to the front (order kept), run the
        # packed sequence, and scatter the outputs back to their original positions.
        batch_size, seq_len = x.shape[:2]
        mask = attention_mask[:, -seq_len:].to(device=x.device, dtype=torch.bool)
        lengths = mask.sum(dim=1)
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
        x_sorted = x.gather(1, order.unsqueeze(-1).expand_as(x))
        packed = pack_padded_sequence(
            x_sorted, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        out_packed, (h, c) = self.lstm(packed, state)
        out_sorted, _ = pad_packed_sequence(out_packed, batch_first=True, total_length=seq_len)
        out = torch.zeros_like(out_sorted).scatter(1, order.unsqueeze(-1).expand_as(out_sorted), out_sorted)
        empty = lengths == 0
        if bool(empty.any()):  # fully masked rows keep their incoming state
            h0, c0 = state if state is not None else self.init_state(batch_size, x.device, h.dtype)
            keep = empty.view(1, -1, 1)
            h, c = torch.where(keep, h0, h), torch.where(keep, c0, c)
        return out, (h, c)

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        state: LSTMState | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> LSTMCausalLMOutput | tuple:
        r"""Run the LSTM LM on ``input_ids`` ``[batch, seq_len]`` (or ``inputs_embeds`` ``[batch, seq_len, E]``).

        Args:
            state: ``(h, c)`` from a previous call (each ``[num_layers, batch, hidden_size]``); ``None`` = zeros.
            labels: HF-style labels (shifted inside; ``-100`` ignored).
            shift_labels: targets aligned with the inputs (not shifted; ``-100`` ignored). Takes precedence
                over ``labels``.
            return_dict: ``False`` returns a tuple ``(loss?, logits, state)``.
            attention_mask: optional, 0 = skip that position (see the class docstring).
            logits_to_keep: ``0`` keeps all positions; ``k`` keeps the last ``k`` (used by ``generate``).
            kwargs: ``num_items_in_batch`` / ``ignore_index`` are forwarded to the loss; others are ignored.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise InvalidValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        hidden = self.embedding_dropout(inputs_embeds)
        hidden, new_state = self._run_lstm(hidden, state, attention_mask)
        hidden = self.output_dropout(hidden)
        if self.projection is not None:
            hidden = self.projection(hidden)
        if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            hidden = slice_logits_to_keep(hidden, logits_to_keep)
        logits = self.lm_head(hidden)

        loss = None
        if labels is not None or shift_labels is not None:
            loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
            if shift_labels is not None:
                # ForCausalLMLoss calls .view(-1) on it: slices of a longer stream are not contiguous.
                shift_labels = shift_labels.contiguous()
            loss = self.loss_function(
                logits, labels, vocab_size=self.config.vocab_size, shift_labels=shift_labels, **loss_kwargs
            )

        output = LSTMCausalLMOutput(loss=loss, logits=logits, state=new_state)
        return output if return_dict else output.to_tuple()

    # -- generation ------------------------------------------------------------------------------
    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: LSTMGenerationState | None = None,
        state: LSTMState | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        use_cache: bool = True,
        logits_to_keep: int | None = None,
        **kwargs,
    ) -> dict:
        """Feed the whole prompt once, then only the newest token together with the carried state.

        ``state`` (optional, from a previous ``forward``/``generate``) is the state *before* the prompt;
        with ``use_cache=False`` the full sequence is re-read from it at every step (slow, for checks).
        """
        model_inputs: dict = {}
        if use_cache and isinstance(cache, LSTMGenerationState):
            # Decoding step: the state already covers everything but the newest token(s).
            n_new = next_sequence_length or 1
            model_inputs["input_ids"] = input_ids[:, -n_new:].contiguous()
            model_inputs["state"] = cache.state
        else:
            # Prefill (or no caching): read the prompt from the user's initial state.
            if inputs_embeds is not None and is_first_iteration:
                model_inputs["inputs_embeds"] = inputs_embeds
                batch_size = inputs_embeds.shape[0]
            else:
                model_inputs["input_ids"] = input_ids.contiguous()
                batch_size = input_ids.shape[0]
            if attention_mask is not None:
                model_inputs["attention_mask"] = attention_mask
            if state is not None:
                h, c = state
                if h.shape[1] != batch_size and batch_size % h.shape[1] == 0:
                    # generate() expanded the inputs for num_beams / num_return_sequences
                    expand = batch_size // h.shape[1]
                    h, c = h.repeat_interleave(expand, dim=1), c.repeat_interleave(expand, dim=1)
                model_inputs["state"] = (h, c)
        if logits_to_keep is not None:
            model_inputs["logits_to_keep"] = logits_to_keep
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
        if model_kwargs.get("use_cache", True) and outputs.get("state") is not None:
            cache = model_kwargs.get("cache")
            if isinstance(cache, LSTMGenerationState):
                cache.state = outputs.state
            else:
                model_kwargs["cache"] = LSTMGenerationState(outputs.state)
        return model_kwargs


# --------------------------------------------------------------------------------------------------
# Auto-class registration (idempotent: re-importing or reloading the module must not raise)
# --------------------------------------------------------------------------------------------------

AutoConfig.register(LSTMLMConfig.model_type, LSTMLMConfig, exist_ok=True)
AutoModelForCausalLM.register(LSTMLMConfig, LSTMForCausalLM, exist_ok=True)
