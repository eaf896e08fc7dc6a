"""The sampled teacher cache: exact top entries plus weighted draws, unbiased in expectation at temperature 1."""

import json
import os

import pytest
import torch
from test_teacher_cache import corpus, lstm, make_args  # noqa: F401  (fixture and helpers)

import seqkd.teacher_cache as teacher_cache_module
from seqkd.data.text import StreamBatches
from seqkd.errors import InvalidValueError
from seqkd.losses import SparseTeacher, kd_loss
from seqkd.teacher_cache import TeacherCache, TeacherCacheArguments, _sampled, cache_teacher
from seqkd.trainer import DistillationTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


def draws(logits, rows, top, samples, temperature=1.0, seed=0):
    """``rows`` independent sampled summaries of the same teacher distribution."""
    generator = torch.Generator().manual_seed(seed)
    return _sampled(logits.expand(rows, -1), top, samples, temperature, generator, torch.float32, torch.int64)


def dense(summary, vocab_size):
    q = torch.zeros(summary["ids"].shape[0], vocab_size, dtype=torch.float64)
    return q.scatter_add_(1, summary["ids"], summary["logprobs"].double().exp())


# (A temperature below 1 starves the tail: its rare tokens go undrawn in any affordable number of rows.)
@pytest.mark.parametrize("top, temperature", [(0, 1.0), (3, 1.0), (3, 2.0)])
def test_the_stored_distribution_is_the_teachers_in_expectation(top, temperature):
    torch.manual_seed(0)
    logits = torch.randn(1, 40) * 2
    q = torch.softmax(logits.double(), -1)[0]
    rows, samples = 20_000, 6
    summary = draws(logits, rows, top, samples, temperature)
    ids = summary["ids"]
    # one id per slot: a dense expansion writes no id twice
    assert all(len(set(row)) == top + samples for row in ids.tolist())
    # the exact top entries are the teacher's own
    exact_q, exact_ids = q.topk(top) if top else (q[:0], ids[0, :0])
    assert torch.equal(ids[:, :top], exact_ids.expand(rows, -1))
    torch.testing.assert_close(summary["logprobs"][:, :top].double().exp(), exact_q.expand(rows, -1), rtol=1e-5, atol=1e-7)
    assert (summary["residual"] == 0).all()
    estimate = dense(summary, 40)
    if temperature == 1.0:
        torch.testing.assert_close(estimate.sum(-1), torch.ones(rows, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    # The mean over independent rows converges to q: each coordinate within 5 standard errors of its mean.
    mean, error = estimate.mean(0), estimate.std(0) / rows**0.5
    assert ((mean - q).abs() <= 5 * error + 1e-7).all(), (mean - q).abs().max()


def test_the_forward_kl_gradient_from_sampled_rows_is_unbiased():
    # E[d KL(q_hat || p) / d s] = p - q: the student's gradient from the cache is the live teacher's on average.
    torch.manual_seed(1)
    teacher_logits, student_logits = torch.randn(1, 30) * 2, torch.randn(1, 30)
    rows = 20_000
    summary = draws(teacher_logits, rows, top=2, samples=5)
    student = student_logits.expand(rows, -1).clone().requires_grad_(True)
    sparse = SparseTeacher(summary["ids"], summary["logprobs"], 30, summary["residual"])
    kd_loss(student, sparse, reduction="sum").loss.backward()
    live = student_logits.clone().requires_grad_(True)
    kd_loss(live, teacher_logits, reduction="sum").loss.backward()
    mean, error = student.grad.double().mean(0), student.grad.double().std(0) / rows**0.5
    assert ((mean - live.grad[0].double()).abs() <= 5 * error + 1e-6).all()


def test_a_sampled_cache_is_written_resumed_byte_for_byte_and_trains_a_student(corpus, tmp_path, monkeypatch):  # noqa: F811
    tokenizer, _, ids = corpus
    train = StreamBatches(ids[:1600], 4, 8)
    teacher = lstm(tokenizer, seed=1)
    options = dict(top_k=2, tokenizer=tokenizer, shard_tokens=300, show_progress=False, samples=5, sample_seed=3)
    whole = cache_teacher(teacher, train, str(tmp_path / "whole"), **options)
    assert whole["sampling"] == {"samples": 5, "temperature": 1.0, "seed": 3} and whole["num_shards"] == 6
    # 2 + 5 entries per token: exactly the bytes of a top-7 cache
    top_7 = cache_teacher(teacher, train, str(tmp_path / "top-7"), top_k=7, tokenizer=tokenizer, shard_tokens=300,
                          show_progress=False)  # fmt: skip
    assert [s["bytes"] for s in whole["shards"]] == [s["bytes"] for s in top_7["shards"]]
    TeacherCache(str(tmp_path / "whole"))

    real_save, calls = teacher_cache_module.save_file, []

    def dying_save(tensors, path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_save(tensors, path)

    path = str(tmp_path / "cache")
    monkeypatch.setattr(teacher_cache_module, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher(teacher, train, path, **options)
    monkeypatch.setattr(teacher_cache_module, "save_file", real_save)
    with pytest.raises(InvalidValueError, match="sampling"):  # other draws would not continue the same shards
        cache_teacher(teacher, train, path, **{**options, "sample_seed": 4})
    resumed = cache_teacher(teacher, train, path, **options)
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in whole["shards"]]

    trainer = DistillationTrainer(model=lstm(tokenizer, seed=2), args=make_args(tmp_path, "student", loss="kd", teacher_cache=path),
                                  train_dataset=train, processing_class=tokenizer)  # fmt: skip
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and all(loss == loss for loss in losses)


def test_bad_sampled_cache_arguments_are_refused(corpus, tmp_path):  # noqa: F811
    with pytest.raises(InvalidValueError, match="cache_samples must be >= 1"):
        TeacherCacheArguments(cache_format="sampled", cache_samples=0)
    with pytest.raises(InvalidValueError, match="cache_sample_temperature must be > 0"):
        TeacherCacheArguments(cache_format="sampled", cache_sample_temperature=0.0)
    assert TeacherCacheArguments(cache_format="topk", cache_samples=0).samples == 0
    tokenizer, _, ids = corpus
    with pytest.raises(InvalidValueError, match="at most the vocabulary size"):
        cache_teacher(lstm(tokenizer, seed=1), StreamBatches(ids[:400], 4, 8), str(tmp_path / "c"), top_k=4,
                      samples=len(tokenizer), show_progress=False)  # fmt: skip
    assert not os.path.exists(tmp_path / "c" / "manifest.json") or not json.load(open(tmp_path / "c" / "manifest.json"))["shards"]
