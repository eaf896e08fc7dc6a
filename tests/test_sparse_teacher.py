"""Sparse (top-k) teachers, as a teacher cache stores them, in every loss."""

import math

import pytest
import torch

from seqkd.losses import SparseTeacher, distillation_loss, kd_loss
from test_losses import ALL_LOSSES, grad_of, make_inputs

TEACHER_LOSSES = sorted(name for name in ALL_LOSSES if name != "ls")


def top_k(teacher_logits, k, dtype=torch.float64):
    logprobs = torch.log_softmax(teacher_logits.double(), -1)
    values, ids = logprobs.topk(k, dim=-1)
    return SparseTeacher(ids.to(torch.int32), values.to(dtype), teacher_logits.shape[-1])


def expanded(teacher_logits, k):
    """The dense distribution a top-k teacher stands for, built by hand: the tail shares the residual mass."""
    q = torch.softmax(teacher_logits.double(), -1)
    values, ids = q.topk(k, dim=-1)
    residual = 1 - values.sum(-1, keepdim=True)
    dense = (residual / (q.shape[-1] - k)).expand_as(q).clone()
    return dense.scatter(-1, ids, values).log()


@pytest.mark.parametrize("name", TEACHER_LOSSES)
def test_k_equal_to_vocabulary_is_the_dense_teacher(name):
    s, t, y = make_inputs()
    fn = ALL_LOSSES[name]
    dense = fn(s, t, y)
    dense_grad = grad_of(dense.loss, s)
    whole_with_student_tail = top_k(t, t.shape[-1])
    whole_with_student_tail.tail = "student"  # no tail to spread: every loss takes it (at any temperature)
    for teacher in (top_k(t, t.shape[-1]), whole_with_student_tail):
        assert teacher.is_whole
        sparse = fn(s, teacher, y)
        torch.testing.assert_close(sparse.loss, dense.loss)
        for part in dense.parts:
            torch.testing.assert_close(sparse.parts[part], dense.parts[part])
        torch.testing.assert_close(grad_of(sparse.loss, s), dense_grad)


@pytest.mark.parametrize("name", TEACHER_LOSSES)
@pytest.mark.parametrize("k", [1, 4])
def test_top_k_spreads_the_residual_mass_over_the_tail(name, k):
    s, t, y = make_inputs()
    fn = ALL_LOSSES[name]
    sparse, reference = fn(s, top_k(t, k), y), fn(s, expanded(t, k), y)
    torch.testing.assert_close(sparse.loss, reference.loss)
    torch.testing.assert_close(grad_of(sparse.loss, s), grad_of(reference.loss, s))


def test_leading_shape_half_precision_storage_and_chunks():
    s, t, y = make_inputs(n=24, v=30, dtype=torch.float32)
    s3, t3, y3 = s.reshape(2, 12, 30), t.reshape(2, 12, 30), y.reshape(2, 12)
    teacher = top_k(t3, 8, dtype=torch.float16)
    out = kd_loss(s3, teacher, y3, temperature=2.0, chunk_size=5)
    reference = kd_loss(s3, expanded(t3, 8).float(), y3, temperature=2.0)
    torch.testing.assert_close(out.loss, reference.loss, rtol=2e-3, atol=1e-4)  # fp16 log-probabilities
    combined = distillation_loss("ban", s3, teacher, y3)
    assert set(combined.parts) == {"ce", "kd"} and math.isfinite(combined.loss.item())


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: SparseTeacher(torch.tensor([[0, 13]]), torch.zeros(1, 2), 13), r"ids must lie in \[0, 13\)"),
        (lambda: SparseTeacher(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 3), 13), "must have one shape"),
        (lambda: SparseTeacher(torch.zeros(1, 14, dtype=torch.long), torch.zeros(1, 14), 13), r"k must be in \[1, vocab_size=13\]"),
        (lambda: SparseTeacher(torch.zeros(1, 2), torch.zeros(1, 2), 13), "ids must be an integer tensor"),
    ],
)
def test_bad_sparse_teachers_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_vocabulary_mismatch_names_both_sizes():
    s, t, y = make_inputs()
    with pytest.raises(ValueError, match=r"teacher vocabulary size \(20\) differs from the student's \(13\)"):
        kd_loss(s, SparseTeacher(torch.zeros(23, 2, dtype=torch.long), torch.zeros(23, 2), 20), y)


def binned_kl(s, t, k):
    """KL between teacher and student over the k + 1 outcomes: the teacher's top k, and any other token."""
    log_p, log_q = torch.log_softmax(s, -1), torch.log_softmax(t.double(), -1)
    ids = log_q.topk(k, -1).indices
    q_top, p_top = log_q.gather(-1, ids).exp(), log_p.gather(-1, ids).exp()
    q_rest, p_rest = 1 - q_top.sum(-1), 1 - p_top.sum(-1)
    kl = (q_top * (q_top.log() - p_top.log())).sum(-1)
    if k == s.shape[-1]:
        return kl  # no other token
    return kl + torch.where(q_rest > 0, q_rest * (q_rest.clamp(min=1e-300).log() - p_rest.log()), 0.0)


@pytest.mark.parametrize("k", [1, 4, 13])
def test_student_tail_is_the_kl_over_the_top_k_and_the_rest(k):
    s, t, y = make_inputs()
    teacher = top_k(t, k)
    teacher.tail = "student"
    valid = y != -100

    def reference():
        return binned_kl(s, t, k)[valid].mean()

    for out in (kd_loss(s, teacher, y), distillation_loss("kd", s, teacher, y, ce_weight=0.0)):
        torch.testing.assert_close(out.loss, reference())
        torch.testing.assert_close(grad_of(out.loss, s), grad_of(reference(), s))
    fused = distillation_loss("ban", s, teacher, y, ce_weight=0.4, kd_weight=1.3, label_smoothing=0.1, chunk_size=4)
    gold = torch.nn.functional.cross_entropy(s, y, ignore_index=-100, label_smoothing=0.1)
    torch.testing.assert_close(fused.loss, 0.4 * gold + 1.3 * reference())
    gold = torch.nn.functional.cross_entropy(s, y, ignore_index=-100, label_smoothing=0.1)
    torch.testing.assert_close(grad_of(fused.loss, s), grad_of(0.4 * gold + 1.3 * reference(), s))
    if k == t.shape[-1]:  # nothing outside the top k: the full KL
        torch.testing.assert_close(reference(), kd_loss(s, t, y).loss)


def test_student_tail_is_refused_where_it_is_not_defined():
    s, t, y = make_inputs()
    teacher = SparseTeacher(*reversed(torch.log_softmax(t, -1).topk(3, -1)), t.shape[-1], tail="student")
    with pytest.raises(ValueError, match="forward KL only"):
        distillation_loss("dkd", s, teacher, y)
    with pytest.raises(ValueError, match="needs temperature 1"):
        kd_loss(s, teacher, y, temperature=2.0)
    with pytest.raises(ValueError, match="SparseTeacher tail must be one of"):
        SparseTeacher(teacher.ids, teacher.logprobs, t.shape[-1], tail="zipf")


def test_student_tail_stays_exact_when_the_student_is_certain_of_the_teacher_top_k():
    s, t, y = make_inputs(dtype=torch.float32)
    ids = torch.log_softmax(t, -1).topk(4, -1).indices
    s = s.detach().scatter(1, ids, 25.0).requires_grad_()  # < 1e-8 of the student's mass left outside the top 4
    teacher = top_k(t, 4, dtype=torch.float32)
    teacher.tail = "student"
    out = kd_loss(s, teacher, y)
    reference = binned_kl(s.double(), t, 4)[y != -100].mean()
    torch.testing.assert_close(out.loss.double(), reference, rtol=1e-4, atol=1e-5)
    assert grad_of(out.loss, s).abs().max() < 1.0
