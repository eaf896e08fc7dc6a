"""Tests of the translation metrics: sacreBLEU BLEU/chrF, batched translation, BLEU evaluation,
teacher stability (seqkd.evaluation) and the local ``evaluate`` modules (seqkd.metrics)."""

from __future__ import annotations

import math
import socket
from types import SimpleNamespace

import pytest
import sacrebleu
import torch
import torch.nn as nn

import seqkd.metrics
from seqkd.data import train_translation_tokenizer
from seqkd.evaluation import (
    bleu_eval,
    corpus_bleu,
    corpus_chrf,
    corpus_perplexity,
    teacher_stability,
    translate,
)

torch.set_num_threads(1)

HYPS = [
    "The cat sat on the mat.",
    "A dog is running in the park!",
    "two men play football",
    "Hello , world .",
]
REFS = [
    "The cat is sitting on the mat.",
    "A dog runs in the park!",
    "Two men are playing soccer.",
    "Hello, world.",
]
REFS2 = ["A cat sat on the mat.", "The dog is running in a park.", "two men play football .", "Hello world!"]


# --------------------------------------------------------------------------------------------------
# BLEU / chrF
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenize,lowercase", [("13a", False), ("none", False), ("intl", True)])
def test_corpus_bleu_matches_sacrebleu(tokenize, lowercase):
    res = corpus_bleu(HYPS, REFS, tokenize=tokenize, lowercase=lowercase)
    direct = sacrebleu.corpus_bleu(HYPS, [REFS], tokenize=tokenize, lowercase=lowercase)
    assert res["score"] == pytest.approx(direct.score, abs=1e-12)
    assert res["precisions"] == pytest.approx(direct.precisions)
    assert (res["bp"], res["sys_len"], res["ref_len"]) == (pytest.approx(direct.bp), direct.sys_len, direct.ref_len)
    metric = sacrebleu.BLEU(tokenize=tokenize, lowercase=lowercase)
    metric.corpus_score(HYPS, [REFS])  # the signature needs the number of references
    signature = str(metric.get_signature())
    assert res["signature"] == signature
    assert f"tok:{tokenize}" in signature and "nrefs:1" in signature
    assert ("case:lc" if lowercase else "case:mixed") in signature
    assert f"version:{sacrebleu.__version__}" in signature
    assert 0 < res["score"] < 100


def test_corpus_bleu_multiple_references_and_errors():
    per_hyp = [[a, b] for a, b in zip(REFS, REFS2)]
    res = corpus_bleu(HYPS, per_hyp)
    assert res["score"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS, REFS2]).score)
    assert "nrefs:2" in res["signature"]
    # a variable number of references per hypothesis
    ragged = [[REFS[0], REFS2[0]], REFS[1], [REFS[2]], [REFS[3], REFS2[3]]]
    assert corpus_bleu(HYPS, ragged)["score"] == pytest.approx(
        sacrebleu.corpus_bleu(HYPS, [REFS, [REFS2[0], None, None, REFS2[3]]]).score
    )
    assert corpus_bleu(["a b c d e"], ["a b c d e"])["score"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="4 hypotheses but 3 references"):
        corpus_bleu(HYPS, REFS[:3])
    with pytest.raises(ValueError, match="no hypotheses"):
        corpus_bleu([], [])
    with pytest.raises(TypeError):
        corpus_bleu("a b", "a b")


def test_corpus_chrf_matches_sacrebleu():
    res = corpus_chrf(HYPS, REFS)
    assert res["score"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score, abs=1e-12)
    metric = sacrebleu.CHRF()
    metric.corpus_score(HYPS, [REFS])
    assert res["signature"] == str(metric.get_signature()) and "nc:6|nw:0" in res["signature"]
    plus = corpus_chrf(HYPS, REFS, word_order=2)
    assert plus["score"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS], word_order=2).score)
    assert "nw:2" in plus["signature"]


# --------------------------------------------------------------------------------------------------
# the local `evaluate` modules
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_metric_paths_and_unknown_name():
    assert set(seqkd.metrics.METRICS) == {"bleu", "perplexity"}
    for name in seqkd.metrics.METRICS:
        path = seqkd.metrics.metric_path(name)
        assert (path / f"{name}.py").is_file()
    with pytest.raises(ValueError, match="available metrics are bleu, perplexity"):
        seqkd.metrics.load("rouge")


def test_bleu_module_loads_offline_and_agrees(no_network):
    import os

    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest unless the caller overrode it
    bleu = seqkd.metrics.load("bleu")
    res = bleu.compute(predictions=HYPS, references=REFS)
    assert res["bleu"] == pytest.approx(corpus_bleu(HYPS, REFS)["score"], abs=1e-12)
    assert res["signature"] == corpus_bleu(HYPS, REFS)["signature"]
    assert res["chrf"] == pytest.approx(corpus_chrf(HYPS, REFS)["score"], abs=1e-12)
    assert res["chrf_signature"] == corpus_chrf(HYPS, REFS)["signature"]
    # options, lists of references, incremental batches
    res = bleu.compute(predictions=HYPS, references=[[a, b] for a, b in zip(REFS, REFS2)], tokenize="none")
    expected = corpus_bleu(HYPS, [[a, b] for a, b in zip(REFS, REFS2)], tokenize="none")
    assert res["bleu"] == pytest.approx(expected["score"]) and res["signature"] == expected["signature"]
    for h, r in zip(HYPS, REFS):
        bleu.add_batch(predictions=[h], references=[r])
    assert bleu.compute(lowercase=True)["bleu"] == pytest.approx(corpus_bleu(HYPS, REFS, lowercase=True)["score"])


class BigramStub(nn.Module):
    """Stateless LM whose logits depend only on the current token."""

    def __init__(self, vocab=9):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(vocab, vocab)
        self.config = SimpleNamespace(vocab_size=vocab)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return SimpleNamespace(logits=self.table(input_ids))


def test_perplexity_module_loads_offline_and_agrees(no_network):
    model = BigramStub()
    gen = torch.Generator().manual_seed(1)
    batches = [
        {"input_ids": torch.randint(0, 9, (2, 5), generator=gen), "shift_labels": torch.randint(0, 9, (2, 5), generator=gen)}
        for _ in range(3)
    ]
    batches[1]["shift_labels"][0, 2:] = -100
    whole = corpus_perplexity(model, batches, show_progress=False)
    parts = [corpus_perplexity(model, [b], show_progress=False) for b in batches]
    ppl = seqkd.metrics.load("perplexity")
    res = ppl.compute(nll=[p["nll"] for p in parts], tokens=[p["tokens"] for p in parts])
    assert res["tokens"] == whole["tokens"] == 27
    assert res["nll"] == pytest.approx(whole["nll"], rel=1e-12)
    assert res["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-12)
    # exp of the corpus mean, not the mean of per-chunk perplexities
    assert res["perplexity"] != pytest.approx(sum(p["perplexity"] for p in parts) / 3, rel=1e-6)
    assert ppl.compute(nll=[2.0, 4.0], tokens=[1, 2])["perplexity"] == pytest.approx(math.exp(2.0))
    with pytest.raises(ValueError, match="no predicted tokens"):
        ppl.compute(nll=[0.0], tokens=[0])
    with pytest.raises(ValueError, match="non-negative"):
        ppl.compute(nll=[-1.0], tokens=[3])


# --------------------------------------------------------------------------------------------------
# translate / bleu_eval
# --------------------------------------------------------------------------------------------------

PAIRS_DE = ["ein hund läuft .", "eine katze schläft auf der matte .", "zwei männer spielen fußball .", "ein kind"]
PAIRS_EN = ["a dog runs .", "a cat sleeps on the mat .", "two men play soccer .", "a child"]


@pytest.fixture(scope="module")
def pair_tokenizer():
    return train_translation_tokenizer(PAIRS_DE + PAIRS_EN, vocab_size=90, pretokenized=True, min_frequency=1)


class EchoSeq2Seq(nn.Module):
    """An 'encoder-decoder' whose generate() returns its input ids: translate() must decode them back
    to the sources, in the input order, whatever the batching."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(is_encoder_decoder=True, max_position_embeddings=64)
        self.calls = []

    def generate(self, input_ids, attention_mask, num_beams, max_new_tokens, **kwargs):
        self.calls.append((tuple(input_ids.shape), num_beams, max_new_tokens, kwargs))
        assert not self.training
        return input_ids


def test_translate_keeps_order_and_detokenizes(pair_tokenizer):
    model = EchoSeq2Seq()
    model.train()
    sources = PAIRS_DE * 2 + ["ein"]
    out = translate(model, pair_tokenizer, sources, batch_size=3, num_beams=4, max_new_tokens=7, show_progress=True)
    assert out == sources
    assert model.training  # mode restored
    assert [c[0][0] for c in model.calls] == [3, 3, 3]
    assert all(c[1:3] == (4, 7) for c in model.calls)
    assert translate(model, pair_tokenizer, sources, batch_size=100, postprocess=str.upper, show_progress=False) == [
        s.upper() for s in sources
    ]
    with pytest.raises(ValueError, match="encoder-decoder"):
        translate(BigramStub(), pair_tokenizer, sources)


def test_translate_real_model_matches_single_generate(pair_tokenizer):
    from seqkd.models import build_seq2seq

    torch.manual_seed(0)
    model = build_seq2seq("marian-tiny", tokenizer=pair_tokenizer)
    out = translate(model, pair_tokenizer, PAIRS_DE, batch_size=1, max_new_tokens=6, show_progress=False)
    assert len(out) == 4 and all(isinstance(t, str) for t in out)
    for src, hyp in zip(PAIRS_DE, out):
        enc = pair_tokenizer([src], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, num_beams=1, max_new_tokens=6)
        assert hyp == pair_tokenizer.decode(ids[0], skip_special_tokens=True).strip()
    beams = translate(model, pair_tokenizer, PAIRS_DE, batch_size=3, num_beams=2, max_new_tokens=6, show_progress=False)
    assert len(beams) == 4


def test_bleu_eval(pair_tokenizer):
    import datasets

    ds = datasets.Dataset.from_dict({"source": PAIRS_DE, "target": PAIRS_DE})
    res = bleu_eval(EchoSeq2Seq(), pair_tokenizer, ds, show_progress=False, return_hypotheses=True)
    assert res["bleu"] == pytest.approx(100.0) and res["chrf"] == pytest.approx(100.0)
    assert res["hypotheses"] == PAIRS_DE and res["num_sentences"] == 4
    other = {"source": PAIRS_DE, "target": PAIRS_EN}
    res = bleu_eval(EchoSeq2Seq(), pair_tokenizer, other, tokenize="none", show_progress=False)
    assert set(res) == {"bleu", "chrf", "signature", "chrf_signature", "num_sentences", "length_ratio",
                        "decode_seconds", "sentences_per_second"}  # fmt: skip
    assert res["decode_seconds"] > 0 and res["sentences_per_second"] == pytest.approx(4 / res["decode_seconds"])
    longer = [target + " and more" for target in PAIRS_EN]  # references 2 tokens longer: a ratio under 1
    stretched = bleu_eval(EchoSeq2Seq(), pair_tokenizer, {"source": PAIRS_DE, "target": longer}, tokenize="none",
                          show_progress=False)  # fmt: skip
    reference = corpus_bleu(PAIRS_DE, longer, tokenize="none")
    assert stretched["length_ratio"] == pytest.approx(reference["sys_len"] / reference["ref_len"]) == pytest.approx(18 / 26)
    assert res["bleu"] == pytest.approx(corpus_bleu(PAIRS_DE, PAIRS_EN, tokenize="none")["score"])
    assert res["chrf"] == pytest.approx(corpus_chrf(PAIRS_DE, PAIRS_EN)["score"])
    assert res["signature"] == corpus_bleu(PAIRS_DE, PAIRS_EN, tokenize="none")["signature"]
    with pytest.raises(ValueError, match="no 'target' column"):
        bleu_eval(EchoSeq2Seq(), pair_tokenizer, {"source": PAIRS_DE}, show_progress=False)


# --------------------------------------------------------------------------------------------------
# teacher stability
# --------------------------------------------------------------------------------------------------

# Five fixed output distributions over a 3-token vocabulary; the stub model outputs log(DIST[i])
# at a position whose input id is i.
DIST = torch.tensor(
    [
        [0.5, 0.5, 0.0],  # d0
        [0.7, 0.3, 0.0],  # d1
        [0.2, 0.8, 0.0],  # d2
        [0.2, 0.2, 0.6],  # d3
        [0.1, 0.1, 0.8],  # d4
    ],
    dtype=torch.float64,
)


class TableSeq2Seq(nn.Module):
    """logits[b, t] = log DIST[input_ids[b, t]], aligned with labels (encoder-decoder convention)."""

    def __init__(self, table=DIST, enc_dec=True):
        super().__init__()
        self.register_buffer("log_p", table.log().float())
        self.config = SimpleNamespace(is_encoder_decoder=enc_dec)
        self.seen = []

    def forward(self, input_ids, labels=None, attention_mask=None):
        self.seen.append(labels is not None)
        return SimpleNamespace(logits=self.log_p[input_ids])


def test_teacher_stability_by_hand():
    # class 0 (gold token 0) gets d0, d1: mean (0.6, 0.4, 0);
    #   ||d0 - mean||^2 = 0.1^2 + 0.1^2 = 0.02, ||d1 - mean||^2 = 0.02  -> Var_0 = 0.02
    # class 1 gets d2, d2, d3: mean (0.2, 0.6, 0.2);
    #   ||d2 - mean||^2 = 0 + 0.2^2 + 0.2^2 = 0.08 (twice), ||d3 - mean||^2 = 0.4^2 + 0.4^2 = 0.32
    #   -> Var_1 = (0.08 + 0.08 + 0.32) / 3 = 0.16
    # class 2 gets d4 once: left out with min_count=2 (Var_2 = 0 with min_count=1)
    # stability = 1 - (0.02 + 0.16) / 2 = 0.91; with min_count=1: 1 - 0.18 / 3 = 0.94
    batches = [
        {"input_ids": torch.tensor([[0, 2, 4]]), "labels": torch.tensor([[0, 1, 2]])},
        {"input_ids": torch.tensor([[1, 2, 3], [0, 0, 0]]), "labels": torch.tensor([[0, 1, 1], [-100, -100, -100]])},
    ]
    model = TableSeq2Seq()
    res = teacher_stability(model, batches, show_progress=False)
    assert res["stability"] == pytest.approx(0.91, abs=1e-6)
    assert res["mean_variance"] == pytest.approx(0.09, abs=1e-6)
    assert (res["num_classes"], res["num_classes_seen"], res["num_tokens"]) == (2, 3, 6)
    assert all(model.seen)  # an encoder-decoder gets its labels (to build decoder inputs)
    res1 = teacher_stability(model, batches, min_count=1, show_progress=False)
    assert res1["stability"] == pytest.approx(0.94, abs=1e-6) and res1["num_classes"] == 3
    assert teacher_stability(model, batches, min_count=3, show_progress=False)["stability"] == pytest.approx(0.84)
    with pytest.raises(ValueError, match="min_count=4"):
        teacher_stability(model, batches, min_count=4, show_progress=False)

    # decoder-only conventions: HF `labels` are shifted by one, `shift_labels` are aligned
    causal = TableSeq2Seq(enc_dec=False)
    # logits'[:, :-1] (from the first L inputs) are scored against labels'[:, 1:] (the gold tokens)
    shifted = [
        {
            "input_ids": torch.cat([b["input_ids"], b["input_ids"][:, :1]], 1),
            "labels": torch.cat([torch.full_like(b["labels"][:, :1], -100), b["labels"]], 1),
        }
        for b in batches
    ]
    assert teacher_stability(causal, shifted, show_progress=False)["stability"] == pytest.approx(0.91, abs=1e-6)
    assert not any(causal.seen)
    aligned = [{"input_ids": b["input_ids"], "shift_labels": b["labels"]} for b in batches]
    assert teacher_stability(causal, aligned, show_progress=False)["stability"] == pytest.approx(0.91, abs=1e-6)


def test_teacher_stability_streaming_matches_direct_formula():
    """Many classes (beyond the first buffer size), several batches, float32 accumulators."""
    V, n_pos = 100, 400
    gen = torch.Generator().manual_seed(0)
    table = torch.softmax(torch.randn(n_pos, V, generator=gen, dtype=torch.float64) * 3, -1)
    ids = torch.arange(n_pos).view(8, 50)
    labels = torch.randint(0, V, (8, 50), generator=gen)
    labels[labels % 7 == 0] = -100
    batches = [{"input_ids": ids[i : i + 2], "labels": labels[i : i + 2]} for i in range(0, 8, 2)]
    model = TableSeq2Seq(table)
    p = torch.softmax(model.log_p.double(), -1)[ids[labels != -100]]
    y = labels[labels != -100]
    variances = [
        ((p[y == c] - p[y == c].mean(0)) ** 2).sum(-1).mean() for c in y.unique().tolist() if (y == c).sum() >= 2
    ]
    expected = 1 - float(torch.stack(variances).mean())
    res = teacher_stability(model, batches, show_progress=False)
    assert res["num_classes_seen"] == len(y.unique()) > 64 and res["num_classes"] == len(variances)
    assert res["num_tokens"] == int(y.numel())
    assert res["stability"] == pytest.approx(expected, abs=1e-9)
    res32 = teacher_stability(model, batches, dtype=torch.float32, show_progress=False)
    assert res32["stability"] == pytest.approx(expected, abs=1e-5)
