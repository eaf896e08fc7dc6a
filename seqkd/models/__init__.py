"""Models of seqkd.

Importing this package registers the custom architectures with transformers' Auto classes
(``AutoConfig`` / ``AutoModelForCausalLM``), so saved checkpoints load without ``trust_remote_code``.

* :mod:`seqkd.models.lstm`: :class:`LSTMLMConfig`, :class:`LSTMForCausalLM` (``model_type="seqkd_lstm"``).
* :mod:`seqkd.models.transformer`: builders of small from-scratch transformers (GPT-2 decoders,
  Marian/BART encoder-decoders) sized to a tokenizer's vocabulary.
"""

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

__all__ = [
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
