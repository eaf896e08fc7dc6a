"""Tests of seqkd.models.transformer: GPT-2 and Marian/BART builders."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    MarianMTModel,
    PreTrainedTokenizerFast,
)

from seqkd.models import CAUSAL_LM_PRESETS, SEQ2SEQ_PRESETS, build_causal_lm, build_seq2seq


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(20)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


# --------------------------------------------------------------------------------------------------
# decoder-only
# --------------------------------------------------------------------------------------------------


def test_build_causal_lm_preset_with_vocab_size():
    model = build_causal_lm("gpt2-tiny", vocab_size=50)
    assert isinstance(model, GPT2LMHeadModel)
    c = model.config
    assert (c.vocab_size, c.n_layer, c.n_embd, c.n_head) == (50, 2, 64, 2)
    assert model.lm_head.weight.shape == (50, 64)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert c.bos_token_id is None and c.eos_token_id is None  # not GPT-2's 50256


def test_build_causal_lm_small_ptb_preset():
    c = build_causal_lm("gpt2-small-ptb", vocab_size=10000).config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_positions) == (4, 256, 4, 256)


def test_build_causal_lm_from_tokenizer_and_overrides(tokenizer):
    model = build_causal_lm("gpt2-tiny", tokenizer=tokenizer, n_layer=3)
    c = model.config
    assert c.vocab_size == len(tokenizer) == 24
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (0, 1, 2)
    assert c.n_layer == 3 and len(model.transformer.h) == 3
    assert model.generation_config.eos_token_id == 2


def test_build_causal_lm_from_dict_and_config():
    model = build_causal_lm({"n_layer": 1, "n_embd": 32, "n_head": 4, "vocab_size": 40})
    assert (model.config.n_layer, model.config.vocab_size) == (1, 40)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=30, bos_token_id=None, eos_token_id=None)
    assert build_causal_lm(config, n_positions=64).config.n_positions == 64


def test_causal_lm_errors(tokenizer):
    with pytest.raises(ValueError, match="Unknown causal LM preset 'gpt9'.*gpt2-small-ptb.*gpt2-tiny"):
        build_causal_lm("gpt9", vocab_size=10)
    with pytest.raises(ValueError, match="Missing vocabulary size"):
        build_causal_lm("gpt2-tiny")
    with pytest.raises(ValueError, match="smaller than the tokenizer's vocabulary"):
        build_causal_lm("gpt2-tiny", vocab_size=5, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="multiple of the number of heads"):
        build_causal_lm("gpt2-tiny", vocab_size=10, n_head=3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_causal_lm("gpt2-tiny", vocab_size=10, eos_token_id=10)


PATTERN = [3, 1, 4, 1, 5, 9, 2, 6]


def pattern_batch(batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    offsets = torch.randint(0, len(PATTERN), (batch_size, 1), generator=generator)
    return torch.tensor(PATTERN)[(offsets + torch.arange(length)) % len(PATTERN)]


def test_tiny_gpt2_learns_a_repeating_pattern():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = build_causal_lm("gpt2-tiny", vocab_size=10).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        x = pattern_batch(16, 24, g)
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        x = pattern_batch(8, 24, torch.Generator().manual_seed(1))
        labels = x.clone()
        labels[:, :2] = -100  # the first targets can be ambiguous without context
        loss = model(input_ids=x, labels=labels).loss
    assert loss.item() < 0.05, loss.item()
    generated = model.generate(torch.tensor([[3, 1, 4]]), max_new_tokens=8, do_sample=False)
    assert generated[0].tolist() == [3, 1, 4, 1, 5, 9, 2, 6, 3, 1, 4]


# --------------------------------------------------------------------------------------------------
# encoder-decoder
# --------------------------------------------------------------------------------------------------


def _assert_shared_vocab(model):
    shared = model.get_input_embeddings().weight
    assert model.get_encoder().embed_tokens.weight.data_ptr() == shared.data_ptr()
    assert model.get_decoder().embed_tokens.weight.data_ptr() == shared.data_ptr()
    assert model.lm_head.weight.data_ptr() == shared.data_ptr()


@pytest.mark.parametrize(
    "preset, cls, layers, d_model, heads, ffn",
    [
        ("marian-tiny", MarianMTModel, 2, 64, 2, 128),
        ("bart-tiny", BartForConditionalGeneration, 2, 64, 2, 128),
        ("transformer-3x3-256", MarianMTModel, 3, 256, 8, 512),
        ("transformer-2x2-128", MarianMTModel, 2, 128, 4, 256),
    ],
)
def test_seq2seq_presets(preset, cls, layers, d_model, heads, ffn):
    model = build_seq2seq(preset, vocab_size=300)
    assert type(model) is cls
    c = model.config
    assert (c.encoder_layers, c.decoder_layers) == (layers, layers)
    assert len(model.get_encoder().layers) == len(model.get_decoder().layers) == layers
    assert (c.d_model, c.encoder_attention_heads, c.decoder_attention_heads) == (d_model, heads, heads)
    assert (c.encoder_ffn_dim, c.decoder_ffn_dim) == (ffn, ffn)
    assert c.vocab_size == 300 and model.lm_head.out_features == 300
    _assert_shared_vocab(model)


def test_seq2seq_from_tokenizer(tokenizer):
    model = build_seq2seq("marian-tiny", tokenizer=tokenizer)
    c = model.config
    assert c.vocab_size == len(tokenizer)
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id, c.decoder_start_token_id) == (0, 1, 2, 1)
    assert model.generation_config.decoder_start_token_id == 1


def test_seq2seq_from_dict_with_family():
    model = build_seq2seq(
        {"family": "bart", "d_model": 32, "layers": 1, "heads": 4, "ffn_dim": 64, "vocab_size": 40}
    )
    assert isinstance(model, BartForConditionalGeneration)
    assert (model.config.encoder_layers, model.config.decoder_layers, model.config.vocab_size) == (1, 1, 40)
    _assert_shared_vocab(model)
    # overrides win over the preset, including the family
    bart = build_seq2seq("transformer-2x2-128", vocab_size=40, family="bart", decoder_layers=1)
    assert isinstance(bart, BartForConditionalGeneration)
    assert (bart.config.encoder_layers, bart.config.decoder_layers, bart.config.d_model) == (2, 1, 128)


def test_seq2seq_errors():
    with pytest.raises(ValueError, match="Unknown seq2seq preset 'nope'.*marian-tiny.*transformer-3x3-256"):
        build_seq2seq("nope", vocab_size=10)
    with pytest.raises(ValueError, match="Missing vocabulary size"):
        build_seq2seq("marian-tiny")
    with pytest.raises(ValueError, match="Unknown seq2seq family 't5'"):
        build_seq2seq({"family": "t5", "vocab_size": 10})
    with pytest.raises(ValueError, match="multiple of the number of heads"):
        build_seq2seq("marian-tiny", vocab_size=10, heads=3)


@pytest.mark.parametrize("preset", ["marian-tiny", "bart-tiny"])
def test_tiny_seq2seq_forward_with_labels_and_generate(preset):
    torch.manual_seed(0)
    model = build_seq2seq(preset, vocab_size=30)
    src = torch.randint(3, 30, (2, 7))
    labels = torch.randint(3, 30, (2, 5))
    labels[1, 3:] = -100
    out = model(input_ids=src, attention_mask=torch.ones_like(src), labels=labels)
    assert out.logits.shape == (2, 5, 30)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.get_input_embeddings().weight.grad is not None

    model.eval()
    generated = model.generate(src, max_new_tokens=6, num_beams=2)
    assert generated.shape[0] == 2 and generated.shape[1] <= 7
    assert torch.all(generated[:, 0] == model.config.decoder_start_token_id)


def test_all_presets_are_listed():
    assert {"gpt2-tiny", "gpt2-small-ptb"} <= set(CAUSAL_LM_PRESETS)
    assert {"marian-tiny", "transformer-3x3-256", "transformer-2x2-128"} <= set(SEQ2SEQ_PRESETS)


@pytest.mark.parametrize("preset", ["marian-tiny", "bart-tiny"])
def test_tiny_seq2seq_learns_to_reverse_sequences(preset):
    from test_lstm_seq2seq import BOS, EOS, PAD, VOCAB, reverse_task_bleu  # the same task as the LSTM's

    torch.manual_seed(0)
    model = build_seq2seq(preset, vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, dropout=0.0)
    bleu = reverse_task_bleu(model, steps=300, lr=3e-3)
    assert bleu >= 90, f"{preset}: BLEU {bleu:.1f} on the reverse task"
