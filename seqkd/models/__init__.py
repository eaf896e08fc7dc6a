"""Models of seqkd.

Importing this package registers the custom architectures with transformers' Auto classes
(``AutoConfig`` / ``AutoModelForCausalLM``), so saved checkpoints load without ``trust_remote_code``.

* :mod:`seqkd.models.lstm`: :class:`LSTMLMConfig`, :class:`LSTMForCausalLM` (``model_type="seqkd_lstm"``).
* :mod:`seqkd.models.transformer`: builders of small from-scratch transformers (GPT-2 decoders,
  Marian/BART encoder-decoders) sized to a tokenizer's vocabulary.
"""

import torch

from seqkd.models.lstm import (
    LSTMCausalLMOutput,
    LSTMForCausalLM,
    LSTMGenerationState,
    LSTMLMConfig,
    LSTMPreTrainedModel,
)
from seqkd.models.lstm_seq2seq import (
    LSTMForConditionalGeneration,
    LSTMSeq2SeqConfig,
    LSTMSeq2SeqDecoder,
    LSTMSeq2SeqEncoder,
    LSTMSeq2SeqEncoderOutput,
    LSTMSeq2SeqGenerationState,
    LSTMSeq2SeqLMOutput,
    LSTMSeq2SeqPreTrainedModel,
)
from seqkd.models.transformer import (
    CAUSAL_LM_PRESETS,
    SEQ2SEQ_PRESETS,
    build_causal_lm,
    build_seq2seq,
)

# torch's CPU allocator aligns tensors to 64 bytes; MKL picks its kernels (and so the order of its sums) by the
# operands' alignment on some CPUs (AMD EPYC among them).
_ALIGNMENT = 64


def realign_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter and buffer that is not 64-byte aligned into freshly allocated storage, in place.

    ``from_pretrained`` leaves weights where safetensors put them (inside the file's memory map, at offsets that
    are not 64-byte aligned). On CPUs where MKL's results depend on alignment, such a model computes logits that
    differ in the last bits from the same weights in ordinary tensors: a reloaded teacher or a resumed chain
    would then drift from an uninterrupted run. One copy of the misaligned weights at load time makes a reloaded
    model compute exactly what the saved one did. Tied weights stay tied (each shared tensor is moved once).
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % _ALIGNMENT:
                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
    return model


def freeze_unsaved_parameters(model: torch.nn.Module) -> torch.nn.Module:
    """Stop gradients to the parameters ``save_pretrained`` leaves out (``_keys_to_ignore_on_save``), in place.

    Marian's sinusoidal position tables are such parameters: a fresh model freezes them, but ``from_pretrained``
    (transformers 5) rebuilds them as trainable. A model loaded to train further (a warm-started student) would
    then learn position tables that its checkpoint drops, and the saved model would not be the trained one: its
    test BLEU moved by 0.15 on reload in the GKD warm-start grid. ``DistillationTrainer`` calls this on every
    student, however it was loaded; frozen, the tables stay the computed ones.
    """
    unsaved = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if name in unsaved:
            parameter.requires_grad_(False)
    return model


def _is_bias_decoder(model) -> bool:
    # Marian and BART add a bias buffer to the head's output: their decoder states come from the base model.
    from transformers import BartForConditionalGeneration, MarianMTModel

    return isinstance(model, (MarianMTModel, BartForConditionalGeneration))


def supports_hidden_head(model) -> bool:
    """Whether :func:`hidden_and_head` knows how ``model`` turns its last hidden states into logits (a plain
    linear head, plus a bias for Marian and BART), so that a loss can take the hidden states instead of logits."""
    from transformers import GPT2LMHeadModel

    return isinstance(model, (LSTMForCausalLM, LSTMForConditionalGeneration, GPT2LMHeadModel)) or _is_bias_decoder(model)


class _CapturedHead(torch.nn.Module):
    """Stands in for a model's LM head for one forward pass: keeps the hidden states it is given and returns
    logits of the right shape that take no memory (one zero, expanded), which the caller never reads."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size, self.hidden = vocab_size, None

    def forward(self, hidden):
        self.hidden = hidden
        return hidden.new_zeros(()).expand(*hidden.shape[:-1], self.vocab_size)


def hidden_and_head(model, inputs: dict):
    """Run ``model`` on ``inputs`` without its LM head: ``(hidden states [..., H], head weight [V, H], head bias
    [V] or None, the model's outputs)``; the outputs' ``logits``, if any, are a placeholder not to be read.

    The logits the model would have returned are ``hidden @ weight.T + bias``. For models
    :func:`supports_hidden_head` refuses, raise ``ValueError``.
    """
    if not supports_hidden_head(model):
        raise ValueError(f"{type(model).__name__} is not a model whose LM head seqkd can take apart")
    head = model.get_output_embeddings()
    if _is_bias_decoder(model):
        inputs = {key: value for key, value in inputs.items() if key not in ("labels", "logits_to_keep")}
        outputs = model.model(**inputs)
        return outputs.last_hidden_state, head.weight, model.final_logits_bias[0], outputs
    captured = _CapturedHead(head.weight.shape[0])
    model.lm_head = captured
    try:
        outputs = model(**inputs)
    finally:
        model.lm_head = head
    return captured.hidden, head.weight, head.bias, outputs


__all__ = [
    "hidden_and_head",
    "supports_hidden_head",
    "realign_weights",
    "freeze_unsaved_parameters",
    "LSTMLMConfig",
    "LSTMPreTrainedModel",
    "LSTMForCausalLM",
    "LSTMCausalLMOutput",
    "LSTMGenerationState",
    "LSTMSeq2SeqConfig",
    "LSTMSeq2SeqPreTrainedModel",
    "LSTMSeq2SeqEncoder",
    "LSTMSeq2SeqDecoder",
    "LSTMForConditionalGeneration",
    "LSTMSeq2SeqEncoderOutput",
    "LSTMSeq2SeqLMOutput",
    "LSTMSeq2SeqGenerationState",
    "CAUSAL_LM_PRESETS",
    "SEQ2SEQ_PRESETS",
    "build_causal_lm",
    "build_seq2seq",
]
