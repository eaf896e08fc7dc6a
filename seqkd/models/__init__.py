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


__all__ = [
    "realign_weights",
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
