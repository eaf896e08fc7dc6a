"""Tests of seqkd.evaluation: corpus perplexity (stream and block batches) and the vocab-size check."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from seqkd.data import StreamBatches, encode_stream, group_texts
from seqkd.evaluation import check_vocab_size, corpus_perplexity, is_stateful

V = 11


class BigramStub(nn.Module):
    """Stateless LM whose logits depend only on the current token (a lookup table)."""

    def __init__(self, vocab=V):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(vocab, vocab)
        self.dropout = nn.Dropout(0.5)
        self.config = SimpleNamespace(vocab_size=vocab)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return SimpleNamespace(logits=self.dropout(self.table(input_ids)))


class StatefulStub(nn.Module):
    """Tiny LSTM LM with the seqkd contract: forward(input_ids, state=None, ...) -> .logits, .state."""

    def __init__(self, vocab=V, hidden=8):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, vocab)
        self.config = SimpleNamespace(vocab_size=vocab)

    def forward(self, input_ids, state=None, labels=None, shift_labels=None):
        out, state = self.lstm(self.emb(input_ids), state)
        return SimpleNamespace(logits=self.head(out), state=state)


def hand_nll(logits, targets):
    """Sum of -log softmax(logits)[target] by explicit loops, skipping -100."""
    total, n = 0.0, 0
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            y = int(targets[b, t])
            if y == -100:
                continue
            row = logits[b, t].double()
            total += float(torch.logsumexp(row, 0) - row[y])
            n += 1
    return total, n


def test_perplexity_by_hand_stream_and_block_batches():
    model = BigramStub()
    model.train()  # corpus_perplexity must switch to eval (no dropout) and restore the mode
    torch.manual_seed(1)
    x1, x2 = torch.randint(0, V, (2, 6)), torch.randint(0, V, (2, 4))
    y1, y2 = torch.randint(0, V, (2, 6)), torch.randint(0, V, (2, 4))
    y2[1, 2] = -100
    with torch.no_grad():
        w = model.table.weight
        n1, c1 = hand_nll(w[x1], y1)
        n2, c2 = hand_nll(w[x2], y2)
    res = corpus_perplexity(
        model, [{"input_ids": x1, "shift_labels": y1}, {"input_ids": x2, "shift_labels": y2}], show_progress=False
    )
    assert model.training
    assert res["tokens"] == c1 + c2 == 12 + 7
    assert res["nll"] == pytest.approx(n1 + n2, rel=1e-6)
    assert res["loss"] == pytest.approx((n1 + n2) / (c1 + c2), rel=1e-6)
    # exp of the corpus mean, not a mean of per-batch perplexities
    assert res["perplexity"] == pytest.approx(math.exp((n1 + n2) / (c1 + c2)), rel=1e-6)
    assert res["perplexity"] != pytest.approx((math.exp(n1 / c1) + math.exp(n2 / c2)) / 2, rel=1e-6)

    # HF labels: logits[:, :-1] scored against labels[:, 1:]
    labels = x1.clone()
    labels[0, 3] = -100
    res_blocks = corpus_perplexity(model, [{"input_ids": x1, "labels": labels}], show_progress=False)
    with torch.no_grad():
        nb, cb = hand_nll(model.table.weight[x1][:, :-1], labels[:, 1:])
    assert res_blocks["tokens"] == cb == 2 * 5 - 1
    assert res_blocks["nll"] == pytest.approx(nb, rel=1e-6)


def test_uniform_model_has_perplexity_vocab_size():
    class Uniform(nn.Module):
        def forward(self, input_ids):
            return (torch.zeros(*input_ids.shape, V),)  # tuple output, logits first

    sb = StreamBatches(torch.randint(0, V, (500,)), batch_size=3, seq_len=7)
    res = corpus_perplexity(Uniform(), sb, show_progress=False)
    assert res["tokens"] == sb.num_predicted_tokens
    assert res["perplexity"] == pytest.approx(V, rel=1e-6)


def test_stateful_carry_equals_one_pass():
    model = StatefulStub()
    assert is_stateful(model) and not is_stateful(BigramStub())
    ids = torch.randint(0, V, (200,), generator=torch.Generator().manual_seed(3))
    chunked = StreamBatches(ids, batch_size=3, seq_len=5)
    whole = StreamBatches(ids, batch_size=3, seq_len=10_000)
    assert len(chunked) > 1 and len(whole) == 1
    r_chunked = corpus_perplexity(model, chunked, show_progress=False)
    r_whole = corpus_perplexity(model, whole, show_progress=False)
    assert r_chunked["tokens"] == r_whole["tokens"] == 3 * (200 // 3 - 1)
    assert r_chunked["nll"] == pytest.approx(r_whole["nll"], rel=1e-5)
    # without carrying the state each chunk restarts from zeros: a different (worse-informed) result
    r_reset = corpus_perplexity(model, chunked, stateful=False, show_progress=False)
    assert r_reset["tokens"] == r_chunked["tokens"]
    assert r_reset["nll"] != pytest.approx(r_chunked["nll"], rel=1e-5)


def test_vocab_size_mismatch_errors(tiny_word_tokenizer):
    tok = tiny_word_tokenizer
    n = len(tok)
    check_vocab_size(tok, SimpleNamespace(config=SimpleNamespace(vocab_size=n)))
    with pytest.raises(ValueError, match=rf"tokenizer has {n} tokens but the model's vocab_size is {n - 1}: "):
        check_vocab_size(tok, SimpleNamespace(vocab_size=n - 1))
    with pytest.raises(ValueError, match=rf"tokenizer has {n} tokens but the model's vocab_size is {n + 5}"):
        check_vocab_size(tok, n + 5)
    check_vocab_size(tok, n + 5, exact=False)  # padded embedding is allowed when asked
    with pytest.raises(ValueError, match="vocab_size is"):
        check_vocab_size(tok, n - 1, exact=False)

    small = BigramStub(vocab=n - 1)
    batches = [{"input_ids": torch.tensor([[1, 2]]), "shift_labels": torch.tensor([[2, n - 1]])}]
    with pytest.raises(ValueError, match=rf"tokenizer has {n} tokens but the model's vocab_size is {n - 1}"):
        corpus_perplexity(small, batches, tokenizer=tok, show_progress=False)
    with pytest.raises(ValueError, match="vocabularies differ"):  # caught from the targets as well
        corpus_perplexity(small, batches, show_progress=False)
    with pytest.raises(ValueError, match="neither 'shift_labels' nor 'labels'"):
        corpus_perplexity(small, [{"input_ids": torch.tensor([[1, 2]])}], show_progress=False)


def test_real_lstm_model_stream_perplexity(tiny_corpus, tiny_word_tokenizer):
    lstm = pytest.importorskip("seqkd.models.lstm")
    tok = tiny_word_tokenizer
    torch.manual_seed(0)
    config = lstm.LSTMLMConfig(
        vocab_size=len(tok), embedding_size=16, hidden_size=16, num_layers=2,
        embedding_dropout=0.3, layer_dropout=0.3, output_dropout=0.3, init_range=0.5,
    )
    model = lstm.LSTMForCausalLM(config)
    ids = encode_stream(tok, tiny_corpus["train"] * 4)
    chunked = StreamBatches(ids, batch_size=2, seq_len=4)
    whole = StreamBatches(ids, batch_size=2, seq_len=10_000)
    r_chunked = corpus_perplexity(model, chunked, tokenizer=tok, show_progress=False)
    r_whole = corpus_perplexity(model, whole, tokenizer=tok, show_progress=False)
    assert r_chunked["tokens"] == whole.num_predicted_tokens
    assert r_chunked["nll"] == pytest.approx(r_whole["nll"], rel=1e-5)
    # agrees with the model's own mean loss on shift_labels
    model.eval()
    with torch.no_grad():
        own = model(**whole[0]).loss
    assert r_whole["loss"] == pytest.approx(float(own), rel=1e-5)


def test_gpt2_block_perplexity_matches_model_loss(tiny_corpus, tiny_word_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_word_tokenizer
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=16, n_layer=1, n_head=2))
    blocks = group_texts(tiny_corpus["train"] * 3, tok, block_size=8).with_format("torch")
    batch = blocks[:]
    res = corpus_perplexity(model, [batch], tokenizer=tok, show_progress=False)
    assert res["tokens"] == batch["input_ids"].shape[0] * 7
    model.eval()
    with torch.no_grad():
        own = model(**batch).loss
    assert res["loss"] == pytest.approx(float(own), rel=1e-5)
    assert not is_stateful(model)


def test_ptb_uniform_perplexity_is_10000(ptb_splits, ptb_word_tokenizer):
    """Classic definition on a real split: a uniform model scores exactly the vocabulary size."""
    tok = ptb_word_tokenizer

    class Uniform(nn.Module):
        config = SimpleNamespace(vocab_size=10_000)

        def forward(self, input_ids):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 10_000))

    sb = StreamBatches(encode_stream(tok, ptb_splits["validation"]), batch_size=10, seq_len=35)
    res = corpus_perplexity(Uniform(), sb, tokenizer=tok, show_progress=False)
    assert res["tokens"] == sb.num_predicted_tokens == 73_760 - 10
    assert res["perplexity"] == pytest.approx(10_000, rel=1e-5)  # float32 logits
