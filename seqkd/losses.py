"""Token-level distillation losses: pure functions of logits and labels.

Every public function takes logits of shape ``[..., V]`` and, where it needs them, ``labels`` of shape
``[...]`` that are already aligned with the logits (the caller shifts; shift the *labels* of a causal LM,
e.g. ``labels[:, 1:]`` padded with ``ignore_index``, rather than slicing the logits, which would copy them).
Each returns a :class:`LossOutput` whose ``.loss`` is differentiable with respect to the student's logits and
whose ``.parts`` are detached, named components for logging, reduced the same way as the loss.

Teacher logits are constants: no gradient flows to them, as in every distillation recipe.

Memory: the losses are computed in chunks of tokens inside a custom autograd function, which writes each
chunk's gradient straight into one logits-sized buffer during the forward pass (when the student needs a
gradient) and scales it in place in the backward pass. Forward + backward therefore needs the gradient
(which must exist anyway) plus a few chunk-sized temporaries, never several full-size copies of the logits. All arithmetic is
in float32 (float64 for float64 inputs), whatever the logits' dtype.

Reductions: ``"mean"`` divides the sum over non-ignored tokens by their number, or by ``num_items_in_batch``
when given (so that gradient accumulation normalises over the whole accumulated batch, as transformers'
``Trainer`` does); ``"sum"``; ``"none"`` returns per-token values of the labels' shape, 0 where ignored.
A batch whose tokens are all ignored has loss 0 and a zero gradient.

Fused linear head: :func:`fused_linear_distillation_loss` takes the student's (and the teacher's) hidden states
and LM-head weights instead of logits, projects one block of tokens at a time and runs the same kernels on it,
so that neither model's ``[N, V]`` logits, nor their gradient, ever exist: memory is ``O(block x V + weights)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from seqkd.errors import InvalidValueError

__all__ = [
    "DISTILLATION_TERMS",
    "DIVERGENCES",
    "LOSS_NAMES",
    "DistillationTerm",
    "LossOutput",
    "SparseTeacher",
    "cwtm_loss",
    "distillation_loss",
    "dkd_loss",
    "dkpp_loss",
    "fused_linear_distillation_loss",
    "kd_loss",
    "label_smoothed_cross_entropy",
    "loss_names",
    "register_distillation_term",
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
LOSS_NAMES = ("ce", "ls", "kd", "ban", "dkd", "cwtm", "dkpp")  # the built-in ones; loss_names() adds registered terms
SPARSE_TAILS = ("uniform", "student")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Elements of one chunk of logits (16 MiB in float32): small enough that the temporaries stay cheap, large
# enough that each kernel call amortises the Python overhead.
_CHUNK_ELEMENTS = 1 << 22
# Elements of one block of projected logits in the fused linear path (128 MiB in float32). A block is a whole
# number of chunks; it is larger than a chunk because each block also reads and writes the whole weight
# gradient ([V, H]), which a few dozen rows would not amortise.
_FUSED_BLOCK_ELEMENTS = 1 << 25


@dataclass
class LossOutput:
    """A loss and its named, detached components (``parts``), reduced the same way as the loss."""

    loss: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)


class SparseTeacher:
    """A teacher's distributions kept as their top-k entries, as a teacher cache stores them.

    ``ids`` ``[..., k]`` (integer token ids) and ``logprobs`` ``[..., k]`` (their log-probabilities at
    temperature 1, any float dtype) per token; the residual mass -- ``residual`` ``[...]`` when given (a cache
    stores it, computed in float32 before the log-probabilities were rounded), else ``1 - sum(exp(logprobs))``
    -- is spread over the other ``V - k`` tokens (with ``k = V`` the distribution is exact):

    - ``tail="uniform"`` (default, every loss): evenly, each tail token getting ``residual / (V - k)``.
    - ``tail="student"`` (forward KL only -- ``kd``, ``ban`` -- at temperature 1): in proportion to the
      student's own probabilities, which makes the KD term the exact KL between teacher and student over the
      k + 1 outcomes "one of the teacher's top k" and "any other token": it matches the student's tail mass
      to the teacher's without imposing a shape on the tail. (On PTB, whose teacher keeps ~23% of its mass
      outside its top 64, the two tails train equally good students: docs/benchmarks.md.)

    Pass it as ``teacher_logits``. Forward KL works on the k entries directly; the other losses expand it to
    dense log-probabilities one chunk of tokens at a time, so memory stays ``O(N * k)`` plus the chunks. A
    temperature T applies to the expanded distribution (``q ** (1/T)``, renormalised), tail included.
    """

    def __init__(
        self, ids: Tensor, logprobs: Tensor, vocab_size: int, residual: Tensor | None = None, tail: str = "uniform"
    ):
        if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise InvalidValueError(f"SparseTeacher ids must be an integer tensor, got {getattr(ids, 'dtype', type(ids))}")
        if not isinstance(logprobs, Tensor) or not logprobs.dtype.is_floating_point:
            raise InvalidValueError("SparseTeacher logprobs must be a float tensor")
        if ids.shape != logprobs.shape or ids.dim() < 1:
            raise InvalidValueError(
                f"SparseTeacher ids {tuple(ids.shape)} and logprobs {tuple(logprobs.shape)} must have one shape [..., k]"
            )
        k = ids.shape[-1]
        if not 1 <= k <= vocab_size:
            raise InvalidValueError(f"SparseTeacher holds k = {k} entries per token; k must be in [1, vocab_size={vocab_size}]")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise InvalidValueError(f"SparseTeacher ids must lie in [0, {vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
        if residual is not None and (not isinstance(residual, Tensor) or residual.shape != ids.shape[:-1]):
            raise InvalidValueError(
                f"SparseTeacher residual must be a tensor of shape {tuple(ids.shape[:-1])} (one mass per token), "
                f"got {tuple(getattr(residual, 'shape', ()))}"
            )
        _check_choice("SparseTeacher tail", tail, SPARSE_TAILS)
        self.ids, self.logprobs, self.vocab_size, self.residual, self.tail = ids, logprobs, vocab_size, residual, tail

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.ids.shape[:-1], self.vocab_size)

    @property
    def is_whole(self) -> bool:
        """Whether it holds the whole vocabulary (k = V): then it is the dense teacher, which one scatter gives
        back, and the losses take their dense kernels, faster than gathering V entries per token."""
        return self.ids.shape[-1] == self.vocab_size

    @property
    def device(self) -> torch.device:
        return self.ids.device

    @property
    def dtype(self) -> torch.dtype:
        return self.logprobs.dtype

    def flatten_tokens(self) -> "SparseTeacher":
        k = self.ids.shape[-1]
        # Validated already: skip __init__'s checks (each id range check is a device synchronisation).
        flat = object.__new__(SparseTeacher)
        flat.ids, flat.logprobs = self.ids.reshape(-1, k), self.logprobs.reshape(-1, k)
        flat.residual = None if self.residual is None else self.residual.reshape(-1)
        flat.vocab_size, flat.tail = self.vocab_size, self.tail
        return flat

    def dense_logprobs(self, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        """Rows ``start:stop`` (of the flattened tokens) as dense ``[n, V]`` log-probabilities."""
        tail = self.vocab_size - self.ids.shape[-1]
        if self.tail != "uniform" and tail > 0:
            raise InvalidValueError(f"a SparseTeacher with tail={self.tail!r} has no dense form without the student")
        ids, logprobs = self.ids[start:stop].long(), self.logprobs[start:stop].to(dtype)
        if tail > 0:
            if self.residual is not None:
                residual = self.residual[start:stop].to(dtype).clamp(min=0.0)
            else:
                residual = (-torch.expm1(torch.logsumexp(logprobs, -1))).clamp(min=0.0)
            tail_logprob = torch.log(residual) - math.log(tail)
        else:
            tail_logprob = torch.full(ids.shape[:1], -math.inf, dtype=dtype, device=ids.device)
        dense = tail_logprob[:, None].expand(ids.shape[0], self.vocab_size).clone()
        return dense.scatter_(1, ids, logprobs)


def _teacher_rows(teacher, start: int, stop: int, dtype: torch.dtype) -> Tensor:
    if isinstance(teacher, SparseTeacher):
        return teacher.dense_logprobs(start, stop, dtype)
    if isinstance(teacher, _ProjectedTeacher):
        return teacher.rows(start, stop, dtype)
    return teacher[start:stop].to(dtype)


# ----------------------------------------------------------------------------------------------------------
# Validation: every check runs before any computation.


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise InvalidValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise InvalidValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise InvalidValueError(f"temperature must be > 0, got {temperature!r}")


def _check_epsilon(epsilon: float) -> None:
    if not (isinstance(epsilon, (int, float)) and 0 <= epsilon < 1):
        raise InvalidValueError(f"epsilon (label smoothing) must be in [0, 1), got {epsilon!r}")


def _check_logits(name: str, logits: Tensor) -> None:
    if not isinstance(logits, Tensor):
        raise InvalidValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise InvalidValueError(f"{name} must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise InvalidValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")


def _check_inputs(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None,
    ignore_index: int,
    reduction: str,
    chunk_size: int | None,
) -> None:
    _check_logits("student_logits", student_logits)
    vocab_size = student_logits.shape[-1]
    if teacher_logits is not None:
        if not isinstance(teacher_logits, SparseTeacher):
            _check_logits("teacher_logits", teacher_logits)
        if teacher_logits.shape[-1] != vocab_size:
            raise InvalidValueError(
                f"teacher vocabulary size ({teacher_logits.shape[-1]}) differs from the student's ({vocab_size}): "
                "distil between models that share one tokenizer, or map the vocabularies first"
            )
        if teacher_logits.shape != student_logits.shape:
            raise InvalidValueError(
                f"teacher_logits shape {tuple(teacher_logits.shape)} differs from student_logits shape "
                f"{tuple(student_logits.shape)}: feed both models the same batch"
            )
        if teacher_logits.device != student_logits.device:
            raise InvalidValueError(
                f"teacher_logits are on {teacher_logits.device} but student_logits on {student_logits.device}: "
                "move the teacher to the student's device"
            )
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise InvalidValueError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels))}")
        if labels.shape != student_logits.shape[:-1]:
            raise InvalidValueError(
                f"labels shape {tuple(labels.shape)} must equal the logits' shape without the vocabulary "
                f"dimension, {tuple(student_logits.shape[:-1])}; align them first (for a causal LM shift the "
                "labels: labels[..., 1:] against logits[..., :-1, :])"
            )
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
        if bad.any():
            value = labels[bad][0].item()
            raise InvalidValueError(
                f"label {value} is outside [0, {vocab_size}) and is not ignore_index ({ignore_index}): "
                "check the tokenizer matches the model's vocabulary, or mark padding with ignore_index"
            )
    _check_choice("reduction", reduction, REDUCTIONS)
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise InvalidValueError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}")


# ----------------------------------------------------------------------------------------------------------
# Per-chunk kernels. Each takes float32/64 student logits ``s`` [n, V], teacher logits ``t`` [n, V] (or None),
# labels ``y`` [n] (ignored positions replaced by 0), an optional per-token tensor ``aux`` [n], the loss'
# parameters and ``want_grad``. It returns (per-token loss [n], per-token parts [k, n], and when ``want_grad``
# the gradient of each token's loss w.r.t. its logits ``s`` [n, V], else None).


# Log-probabilities are floored at a finite value so that a zero probability (a -inf logit, or a softmax that
# underflows) contributes 0 * finite = 0 to a KL term instead of 0 * inf = NaN. Any log-probability below the
# floor is zero to every float type.
_LOG_FLOOR = -1e30


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    return logits if temperature == 1.0 else logits / temperature


def _floored_log_softmax(x: Tensor) -> Tensor:
    return torch.log_softmax(x, dim=-1).clamp_(min=_LOG_FLOOR)


def _kl_rows(prob: Tensor, log_prob: Tensor, log_other: Tensor) -> Tensor:
    """``sum_v prob * (log_prob - log_other)`` per row, as one fused multiply-sum."""
    return torch.linalg.vecdot(prob, log_prob - log_other)


def _dense_forward_kl(log_p: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``KL(q || p)`` per row and ``q = softmax(t)``, for dense teacher logits ``t`` (already divided by T) and the
    student's floored log-probabilities ``log_p``.

    The same sum as :func:`_kl_rows`, computed in ``log q``'s own buffer: two logits-sized buffers fewer than
    copying and subtracting (docs/benchmarks.md, "Where online distillation's time goes").
    """
    log_q = torch.log_softmax(t, dim=-1)
    q = log_q.exp()
    # The clamp keeps a -inf teacher logit (zero probability) from making 0 * inf = NaN, as the floor does for log_p;
    # a NaN still propagates.
    terms = log_q.sub_(log_p).clamp_(min=_LOG_FLOOR, max=-_LOG_FLOOR).mul_(q)
    return terms.sum(-1), q


def _kd_kernel(s, t, y, aux, params, want_grad):
    temperature, divergence, jsd_beta = params["temperature"], params["divergence"], params["jsd_beta"]
    if divergence == "jsd" and jsd_beta == 0.0:
        divergence = "forward_kl"
    elif divergence == "jsd" and jsd_beta == 1.0:
        divergence = "reverse_kl"
    log_p = _floored_log_softmax(_scaled(s, temperature))
    t2 = temperature * temperature
    if divergence == "forward_kl":
        kl, q = _dense_forward_kl(log_p, _scaled(t, temperature))
        loss = kl.mul_(t2)
        if not want_grad:
            return loss, loss[None], None
        # d/ds of T^2 KL(q || softmax(s/T)) = T (p - q)
        grad = log_p.exp_().sub_(q)
        if temperature != 1.0:
            grad.mul_(temperature)
        return loss, loss[None], grad
    log_q = _floored_log_softmax(_scaled(t, temperature))
    p = log_p.exp()
    if divergence == "reverse_kl":
        # dKL(p||q)/dp_j = log p_j - log q_j + 1; the constant vanishes through the softmax Jacobian.
        dloss_dp = log_p - log_q
        loss = t2 * _kl_rows(p, log_p, log_q)
    else:
        beta = jsd_beta
        log_m = torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))
        q = log_q.exp()
        loss = t2 * (beta * _kl_rows(q, log_q, log_m) + (1 - beta) * _kl_rows(p, log_p, log_m))
        # dJSD/dp_j = (1 - beta) log(p_j / m_j): the terms through m cancel.
        dloss_dp = (1 - beta) * (log_p - log_m)
    if not want_grad:
        return loss, loss[None], None
    centred = dloss_dp - (p * dloss_dp).sum(-1, keepdim=True)
    grad = centred.mul_(p)
    if temperature != 1.0:
        grad.mul_(temperature)
    return loss, loss[None], grad


def _sparse_kl(log_p: Tensor, t: tuple, temperature: float):
    """KL(q_T || p_T) per token for a top-k teacher chunk ``t = (ids, log_top, residual, tail)``, never
    expanded to ``[n, V]``; ``log_p`` is the student's ``log_softmax(s / T)``.

    Returns the KL and the pieces of its gradient ``dKL/d(s/T) = p_T * scale - shift + scatter(ids, correction)``
    (``scale``, ``shift`` per row; ``correction`` ``[n, k]``):

    - ``tail="uniform"``: the tail's ``V - k`` tokens share one probability ``c``, so their terms reduce to one
      sum over the row: ``sum_tail c (log c - log p_i) = (V - k) c log c - c (sum_all log p - sum_top log p)``;
      the gradient is ``p - c``, corrected at the k ids.
    - ``tail="student"`` (T = 1): the KL between the two distributions coarsened to k + 1 outcomes, the
      teacher's top k and "any other token": ``sum_top q_j log(q_j / p_j) + r log(r / P_tail)``. Equivalently,
      the teacher's residual mass ``r`` spread over the tail in proportion to the student's own probabilities,
      so the student's tail is matched in mass and never pushed towards a made-up shape.
    """
    ids, log_top, residual, tail_mode = t
    tail = log_p.shape[-1] - ids.shape[-1]
    log_p_top = log_p.gather(1, ids).clamp_(min=_LOG_FLOOR)
    ones = torch.ones_like(residual)
    if tail_mode == "student":
        # Renormalise the stored top k and residual together (they were rounded to 16 bits apart).
        r = residual.clamp(min=0.0) if tail > 0 else torch.zeros_like(residual)
        norm = torch.logaddexp(torch.logsumexp(log_top, -1), torch.log(r))
        log_q_top = (log_top - norm[:, None]).clamp_(min=_LOG_FLOOR)
        q_top = log_q_top.exp()
        r = r / norm.exp()
        p_top = log_p_top.exp()
        # The student's tail mass. 1 - sum(top) loses its digits when the student puts almost everything on the
        # teacher's top k: those rows (rare) get the exact log-sum-exp over their tail instead.
        p_tail = 1.0 - p_top.sum(-1)
        log_p_tail = torch.log(p_tail.clamp(min=1e-30))
        risky = (p_tail < 1e-3).nonzero()[:, 0]
        if risky.numel() and tail > 0:
            exact = log_p[risky].scatter(1, ids[risky], -math.inf).logsumexp(-1)
            log_p_tail = log_p_tail.index_put((risky,), exact)
        has_rest = r > 0
        log_r = torch.log(torch.where(has_rest, r, 1.0))
        rho = torch.where(has_rest, (log_r - log_p_tail).exp(), 0.0)
        kl = _kl_rows(q_top, log_q_top, log_p_top) + torch.where(has_rest, r * (log_r - log_p_tail), 0.0)
        return kl, ones - rho, torch.zeros_like(rho), rho[:, None] * p_top - q_top
    # The teacher at temperature T: q_i ** (1/T), renormalised over the top k and the tail together.
    top = log_top / temperature
    if tail > 0:
        tail_each = (torch.log(residual.clamp(min=0.0)) - math.log(tail)) / temperature
        norm = torch.logaddexp(torch.logsumexp(top, -1), tail_each + math.log(tail))
        log_c = tail_each - norm
        c = log_c.exp()
    else:
        norm = torch.logsumexp(top, -1)
        c = torch.zeros_like(norm)
    log_q_top = (top - norm[:, None]).clamp_(min=_LOG_FLOOR)
    q_top = log_q_top.exp()
    kl = _kl_rows(q_top, log_q_top, log_p_top)
    if tail > 0:
        sum_log_p_tail = log_p.sum(-1) - log_p_top.sum(-1)
        kl = kl + torch.where(c > 0, tail * c * log_c - c * sum_log_p_tail, 0.0)
    return kl, ones, c, c[:, None] - q_top


def _sparse_forward_kl_kernel(s, t, y, aux, params, want_grad):
    """Forward KL to a top-k teacher chunk ``t = (ids, logprobs, residual, tail)``: a few passes over the logits
    (see :func:`_sparse_kl`)."""
    temperature = params["temperature"]
    log_p = torch.log_softmax(_scaled(s, temperature), dim=-1)
    kl, scale, shift, correction = _sparse_kl(log_p, t, temperature)
    loss = temperature * temperature * kl
    if not want_grad:
        return loss, loss[None], None
    grad = torch.addcmul(-shift[:, None], log_p.exp_(), scale[:, None])
    grad.scatter_add_(1, t[0], correction)
    if temperature != 1.0:
        grad.mul_(temperature)
    return loss, loss[None], grad


_sparse_forward_kl_kernel.takes_sparse_teacher = True


def _gold_and_forward_kl_kernel(s, t, y, aux, params, want_grad):
    """``ce_weight * gold CE + kd_weight * T^2 KL(q_T || p_T)`` per token in one pass (``distillation_loss``'s
    ``kd`` and ``ban`` with forward KL): one softmax of the student serves both terms, and one gradient buffer.

    ``t`` is a dense teacher chunk or a top-k one ``(ids, logprobs, residual, tail)`` (see :func:`_sparse_kl`).
    Parts: the gold term, its NLL when label-smoothed, and the KD term (all unweighted).
    """
    w_ce, w_kd, epsilon, temperature = params["ce_weight"], params["kd_weight"], params["epsilon"], params["temperature"]
    vocab_size = s.shape[-1]
    log_p = torch.log_softmax(s, dim=-1)
    nll = -log_p.gather(1, y[:, None])[:, 0]
    if epsilon > 0:
        gold = (1 - epsilon) * nll - epsilon * log_p.mean(-1)
        gold_parts = [gold, nll]
    else:
        gold, gold_parts = nll, [nll]
    log_p_t = log_p if temperature == 1.0 else torch.log_softmax(_scaled(s, temperature), dim=-1)
    sparse = isinstance(t, tuple)
    if sparse:
        kl, scale, shift, correction = _sparse_kl(log_p_t, t, temperature)
    else:
        # In place: the gold terms above have read log_p, and exp() of the floor is still 0 for the gradient.
        kl, q = _dense_forward_kl(log_p_t.clamp_(min=_LOG_FLOOR), _scaled(t, temperature))
    kd = temperature * temperature * kl
    loss = w_ce * gold + w_kd * kd
    parts = torch.stack([*gold_parts, kd])
    if not want_grad:
        return loss, parts, None
    if not sparse:
        # d/ds = w_ce (p - (1 - eps) onehot(y) - eps / V) + w_kd T (p_T - q): in place in log_p's buffer.
        kd_scale = w_kd * temperature
        if temperature == 1.0:
            grad = log_p.exp_().mul_(w_ce + kd_scale)
        else:
            grad = log_p.exp_().mul_(w_ce).add_(log_p_t.exp_(), alpha=kd_scale)
        grad.sub_(q, alpha=kd_scale)
        if epsilon > 0:
            grad.sub_(w_ce * epsilon / vocab_size)
        grad.scatter_add_(1, y[:, None], torch.full_like(nll[:, None], -w_ce * (1 - epsilon)))
        return loss, parts, grad
    # d gold/ds = p - (1 - eps) onehot(y) - eps / V;  d KD/ds = T (p_T * scale - shift + scatter(correction)):
    # the per-row scales and shifts of both terms go into one pass over the logits.
    kd_scale = w_kd * temperature
    shift = kd_scale * shift + w_ce * epsilon / vocab_size
    if temperature == 1.0:
        grad = torch.addcmul(-shift[:, None], log_p.exp_(), (w_ce + kd_scale * scale)[:, None])
    else:
        grad = log_p.exp_().mul_(w_ce).sub_(shift[:, None])
        grad.addcmul_(log_p_t.exp_(), (kd_scale * scale)[:, None])
    grad.scatter_add_(1, t[0], correction.mul_(kd_scale))
    grad.scatter_add_(1, y[:, None], torch.full_like(nll[:, None], -w_ce * (1 - epsilon)))
    return loss, parts, grad


_gold_and_forward_kl_kernel.takes_sparse_teacher = True


def _dkd_rows_exact(s, t, y, alpha, beta, want_grad):
    """TCKD, NCKD and their gradient (before ``T^2`` and ``T``) for already scaled logits, each distribution
    renormalised by a logsumexp over its masked logits: exact however certain it is, at about twice the passes
    over the logits of :func:`_dkd_kernel`'s shortcut."""
    target = y[:, None]
    # Exact renormalisation over the non-target classes: mask the target logit out of the softmax.
    s_nt = s.scatter(1, target, -math.inf)
    t_nt = t.scatter(1, target, -math.inf)
    lse_s, lse_t = torch.logsumexp(s, -1), torch.logsumexp(t, -1)
    lse_s_nt, lse_t_nt = torch.logsumexp(s_nt, -1), torch.logsumexp(t_nt, -1)
    log_pt_s = s.gather(1, target)[:, 0] - lse_s  # log p_target
    log_pt_t = t.gather(1, target)[:, 0] - lse_t
    log_rest_s = lse_s_nt - lse_s  # log (1 - p_target), accurate when p_target is near 1
    log_rest_t = lse_t_nt - lse_t
    # Log of the non-target distributions; floored, since they are -inf at the target.
    log_hat_s = (s_nt - lse_s_nt[:, None]).clamp_(min=_LOG_FLOOR)
    log_hat_t = (t_nt - lse_t_nt[:, None]).clamp_(min=_LOG_FLOOR)
    pt_t, rest_t = log_pt_t.exp(), log_rest_t.exp()
    # Per-token terms: the guards are cheap here and keep a certain teacher (rest_t = 0) finite.
    tckd = torch.where(pt_t > 0, pt_t * (log_pt_t - log_pt_s), 0.0) + torch.where(
        rest_t > 0, rest_t * (log_rest_t - log_rest_s), 0.0
    )
    q_hat = log_hat_t.exp()
    nckd = _kl_rows(q_hat, log_hat_t, log_hat_s)
    if not want_grad:
        return tckd, nckd, None
    pt_s = log_pt_s.exp()
    p_hat = log_hat_s.exp()
    grad = p_hat * (alpha * (pt_t - pt_s) + beta)[:, None] - beta * q_hat
    grad.scatter_(1, target, (alpha * (pt_s - pt_t))[:, None])
    return tckd, nckd, grad


# Below this non-target mass a row's renormalisation is taken from its masked logsumexp (``_dkd_rows_exact``): the
# sum of the non-target probabilities would lose the small ones to float32's underflow (e^-87), or all of them.
_DKD_EXACT_BELOW = 1e-20


def _dkd_kernel(s, t, y, aux, params, want_grad):
    """DKD from one log-softmax of each side (docs/benchmarks.md, "DKD in fewer passes").

    With ``rest = 1 - p_target`` summed from the non-target probabilities, ``log p^_j = log p_j - log rest``, so
    ``NCKD = sum_{j != y} q_j (log q_j - log p_j) / rest_T - (log rest_T - log rest_S)`` and the renormalised
    distributions are never formed: three logits-sized buffers instead of ten. Rows where either side's
    non-target mass is too small to sum in floating point go through :func:`_dkd_rows_exact`.
    """
    temperature, alpha, beta = params["temperature"], params["alpha"], params["beta"]
    s, t = _scaled(s, temperature), _scaled(t, temperature)
    target = y[:, None]
    log_p = torch.log_softmax(s, dim=-1)
    log_q = torch.log_softmax(t, dim=-1)
    # Read before the floor: a student with no mass on the target has an infinite TCKD, as the exact path gives.
    log_pt_s, log_pt_t = log_p.gather(1, target)[:, 0], log_q.gather(1, target)[:, 0]
    log_p.clamp_(min=_LOG_FLOOR)
    q = log_q.exp().scatter_(1, target, 0.0)  # the non-target teacher probabilities
    rest_t = q.sum(-1)
    # sum_{j != y} q_j (log q_j - log p_j) in log q's own buffer; the clamp keeps q_j = 0 from making 0 * inf.
    kl_rest = torch.linalg.vecdot(q, log_q.sub_(log_p).clamp_(min=_LOG_FLOOR, max=-_LOG_FLOOR))
    p = log_p.exp_().scatter_(1, target, 0.0)
    rest_s = p.sum(-1)
    log_rest_s, log_rest_t = rest_s.log(), rest_t.log()
    pt_t = log_pt_t.exp()
    tckd = torch.where(pt_t > 0, pt_t * (log_pt_t - log_pt_s), 0.0) + torch.where(
        rest_t > 0, rest_t * (log_rest_t - log_rest_s), 0.0
    )
    nckd = kl_rest / rest_t - (log_rest_t - log_rest_s)
    grad = None
    if want_grad:
        # dTCKD/ds: p_t - pT_t at the target, p^_j (pT_t - p_t) elsewhere; dNCKD/ds: p^_j - q^_j off the target.
        pt_s = log_pt_s.exp()
        grad = p.mul_(((alpha * (pt_t - pt_s) + beta) / rest_s)[:, None])
        grad.addcmul_(q, (-beta / rest_t)[:, None])
        grad.scatter_(1, target, (alpha * (pt_s - pt_t))[:, None])
    tiny = (rest_s < _DKD_EXACT_BELOW) | (rest_t < _DKD_EXACT_BELOW)
    if tiny.any():
        rows = tiny.nonzero()[:, 0]
        tckd[rows], nckd[rows], exact_grad = _dkd_rows_exact(s[rows], t[rows], y[rows], alpha, beta, want_grad)
        if want_grad:
            grad[rows] = exact_grad
    t2 = temperature * temperature
    tckd, nckd = t2 * tckd, t2 * nckd
    loss = alpha * tckd + beta * nckd
    if grad is not None and temperature != 1.0:
        grad.mul_(temperature)
    return loss, torch.stack([tckd, nckd]), grad


def _ce_kernel(s, t, y, aux, params, want_grad):
    """Label-smoothed cross-entropy, PyTorch's convention (epsilon spread over all V classes).

    With ``aux`` (CWTM) each token's loss and gradient are multiplied by ``aux``.
    """
    epsilon = params["epsilon"]
    vocab_size = s.shape[-1]
    log_p = torch.log_softmax(s, dim=-1)
    nll = -log_p.gather(1, y[:, None])[:, 0]
    if epsilon > 0:
        smooth = -log_p.mean(-1)
        loss = (1 - epsilon) * nll + epsilon * smooth
        parts = torch.stack([nll, smooth])
    else:
        loss, parts = nll, nll[None]
    if aux is not None:
        loss = loss * aux
        parts = torch.cat([loss[None], parts])
    if not want_grad:
        return loss, parts, None
    grad = log_p.exp_()
    if epsilon > 0:
        grad.sub_(epsilon / vocab_size)
    grad.scatter_add_(1, y[:, None], torch.full_like(nll[:, None], -(1 - epsilon)))
    if aux is not None:
        grad.mul_(aux[:, None])
    return loss, parts, grad


# CWTM passes its teacher only for the confidence weights: the chunks need not expand or project it.
_ce_kernel.reads_teacher = False
# The kernel's only logits-sized temporary (log_p) becomes the gradient in place, so one chunk over all the
# tokens peaks at the logits' gradient alone, which the chunked path allocates as its buffer anyway.
_ce_kernel.gradient_is_its_workspace = True


def _permute_except_argmax(q: Tensor, generator: torch.Generator) -> Tensor:
    """Randomly permute each row's probabilities among its non-argmax positions; the argmax keeps its own."""
    argmax = q.argmax(-1, keepdim=True)
    keys = torch.rand(q.shape, generator=generator, device=q.device, dtype=q.dtype)
    keys.scatter_(1, argmax, -1.0)
    shuffled = keys.argsort(-1)  # argmax first, the others in random order
    in_order = torch.arange(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q).clone()
    in_order.scatter_(1, argmax, -1.0)
    positions = in_order.argsort(-1)  # argmax first, the others in index order
    return torch.empty_like(q).scatter_(1, positions, q.gather(1, shuffled))


def _dkpp_kernel(s, t, y, aux, params, want_grad):
    temperature = params["temperature"]
    generator = torch.Generator(device=s.device)
    generator.manual_seed(params["seed"] + params["chunk_start"])
    log_p = _floored_log_softmax(_scaled(s, temperature))
    q = _permute_except_argmax(torch.softmax(_scaled(t, temperature), dim=-1), generator)
    t2 = temperature * temperature
    loss = -t2 * torch.linalg.vecdot(q, log_p)
    if not want_grad:
        return loss, loss[None], None
    grad = log_p.exp_().sub_(q)
    if temperature != 1.0:
        grad.mul_(temperature)
    return loss, loss[None], grad


def _max_probability(teacher_logits, temperature: float, chunk_rows: int) -> Tensor:
    compute_dtype = _compute_dtype(teacher_logits.dtype)
    out = torch.empty(teacher_logits.shape[0], dtype=compute_dtype, device=teacher_logits.device)
    for start in range(0, teacher_logits.shape[0], chunk_rows):
        t = _teacher_rows(teacher_logits, start, start + chunk_rows, compute_dtype) / temperature
        out[start : start + chunk_rows] = (t.amax(-1) - torch.logsumexp(t, -1)).exp()
    return out


# ----------------------------------------------------------------------------------------------------------
# The chunked autograd function shared by every loss.


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(vocab_size: int, chunk_size: int | None) -> int:
    return chunk_size if chunk_size is not None else max(1, _CHUNK_ELEMENTS // vocab_size)


class _ChunkedTokenLoss(torch.autograd.Function):
    """Per-token loss values and parts of ``kernel`` over ``[N, V]`` logits, computed chunk by chunk.

    When the student needs a gradient, the forward pass also writes each token's gradient into one
    logits-sized buffer (which has to exist anyway: it becomes the logits' gradient), and the first backward
    pass scales it in place by the upstream per-token gradient. A second backward through the same graph
    (``retain_graph=True``, ``gradcheck``) finds the buffer spent and recomputes it chunk by chunk.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, valid, aux, kernel, params, chunk_rows, num_parts, chunk_size_given):
        compute_dtype = _compute_dtype(student.dtype)
        n = student.shape[0]
        losses = torch.zeros(n, dtype=compute_dtype, device=student.device)
        parts = torch.zeros(num_parts, n, dtype=compute_dtype, device=student.device)
        want_grad = ctx.needs_input_grad[0]
        forward_rows = chunk_rows
        one_pass = getattr(kernel, "gradient_is_its_workspace", False) and compute_dtype == student.dtype
        if want_grad and one_pass and not chunk_size_given:
            # No memory to save by chunking, and a chunked pass pays for a fresh logits-sized buffer and a
            # copy into it (docs/benchmarks.md, "Cross-entropy in one pass").
            forward_rows = max(n, 1)
        single_chunk = n <= forward_rows
        grad = torch.empty_like(student) if want_grad and not single_chunk else None
        for start in range(0, n, forward_rows):
            stop = min(start + forward_rows, n)
            loss, chunk_parts, chunk_grad = kernel(
                *_chunk_args(kernel, student, teacher, labels, aux, start, stop, compute_dtype),
                dict(params, chunk_start=start),
                want_grad,
            )
            losses[start:stop] = loss
            parts[:, start:stop] = chunk_parts
            if want_grad and single_chunk:
                # One chunk (a small model's whole batch): its gradient is the buffer, without a copy into one.
                # (A fresh logits-sized buffer costs page faults on every step: about as much as the kernel.)
                grad = chunk_grad.to(student.dtype).contiguous()
            elif want_grad:
                grad[start:stop] = chunk_grad
        losses.mul_(valid)
        parts.mul_(valid)
        ctx.save_for_backward(student, labels, valid, aux)
        # The teacher needs no gradient; it may also be a SparseTeacher, which save_for_backward cannot hold.
        ctx.teacher = teacher
        ctx.kernel, ctx.params, ctx.chunk_rows = kernel, params, chunk_rows
        ctx.grad_buffer = grad  # not a saved tensor: the first backward consumes it in place
        ctx.mark_non_differentiable(parts)
        return losses, parts

    @staticmethod
    def backward(ctx, grad_losses, grad_parts):
        student, labels, valid, aux = ctx.saved_tensors
        teacher = ctx.teacher
        if not ctx.needs_input_grad[0]:
            return (None,) * 10
        grad_scale = (grad_losses * valid).to(_compute_dtype(student.dtype))
        grad, ctx.grad_buffer = ctx.grad_buffer, None
        if grad is not None:
            grad.mul_(grad_scale[:, None])
            return (grad,) + (None,) * 9
        grad = torch.empty_like(student)
        for start in range(0, student.shape[0], ctx.chunk_rows):
            stop = min(start + ctx.chunk_rows, student.shape[0])
            _, _, chunk_grad = ctx.kernel(
                *_chunk_args(ctx.kernel, student, teacher, labels, aux, start, stop, _compute_dtype(student.dtype)),
                dict(ctx.params, chunk_start=start),
                True,
            )
            grad[start:stop] = chunk_grad.mul_(grad_scale[start:stop, None])
        return (grad,) + (None,) * 9


def _teacher_chunk(kernel, teacher, start, stop, compute_dtype):
    """The teacher's rows ``start:stop`` in the form ``kernel`` takes (dense, or top-k for a sparse kernel)."""
    if teacher is None or not getattr(kernel, "reads_teacher", True):
        return None
    if isinstance(teacher, SparseTeacher) and getattr(kernel, "takes_sparse_teacher", False) and not teacher.is_whole:
        logprobs = teacher.logprobs[start:stop].to(compute_dtype)
        if teacher.residual is not None:
            residual = teacher.residual[start:stop].to(compute_dtype)
        else:
            residual = (-torch.expm1(torch.logsumexp(logprobs, -1))).clamp(min=0.0)
        return (teacher.ids[start:stop].long(), logprobs, residual, teacher.tail)
    return _teacher_rows(teacher, start, stop, compute_dtype)


def _chunk_args(kernel, student, teacher, labels, aux, start, stop, compute_dtype):
    return (
        student[start:stop].to(compute_dtype),
        _teacher_chunk(kernel, teacher, start, stop, compute_dtype),
        labels[start:stop],
        None if aux is None else aux[start:stop],
    )


def _flat_teacher(teacher_logits, vocab_size: int):
    if teacher_logits is None:
        return None
    if isinstance(teacher_logits, SparseTeacher):
        return teacher_logits.flatten_tokens()
    return teacher_logits.detach().reshape(-1, vocab_size)


def _token_loss(
    kernel: Callable,
    part_names: tuple[str, ...],
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None,
    params: dict,
    *,
    ignore_index: int,
    reduction: str,
    num_items_in_batch: int | Tensor | None,
    chunk_size: int | None,
    aux_fn: Callable[[Tensor, Tensor, int], Tensor] | None = None,
) -> LossOutput:
    """Flatten, run ``kernel`` chunk by chunk through the autograd function, and reduce."""
    if isinstance(teacher_logits, SparseTeacher) and teacher_logits.tail == "student" and not teacher_logits.is_whole:
        if not getattr(kernel, "takes_sparse_teacher", False):
            raise InvalidValueError(
                "a SparseTeacher with tail='student' is defined for forward KL only (losses 'kd' with divergence "
                "'forward_kl', and 'ban'); use tail='uniform' for this loss"
            )
        if params.get("temperature", 1.0) != 1.0:
            raise InvalidValueError(
                f"a SparseTeacher with tail='student' needs temperature 1, got {params['temperature']}: the "
                "teacher's tail at another temperature depends on its shape, which the cache does not keep; "
                "use tail='uniform'"
            )
    token_shape = student_logits.shape[:-1]
    vocab_size = student_logits.shape[-1]
    num_tokens = math.prod(token_shape)
    device = student_logits.device
    if labels is None:
        valid = torch.ones(num_tokens, dtype=torch.bool, device=device)
        flat_labels = torch.zeros(num_tokens, dtype=torch.long, device=device)
    else:
        flat_labels = labels.reshape(-1).to(device=device, dtype=torch.long)
        valid = flat_labels != ignore_index
        flat_labels = flat_labels.masked_fill(~valid, 0)
    chunk_rows = _chunk_rows(vocab_size, chunk_size)
    if isinstance(student_logits, _LogitsStandIn):
        # Inside fused_linear_distillation_loss: its session records this term, or hands back its values.
        losses, parts = student_logits.session.token_term(
            student_logits, kernel, part_names, teacher_logits, flat_labels, valid, params, chunk_rows, aux_fn
        )
    else:
        student = student_logits.reshape(-1, vocab_size)
        teacher = _flat_teacher(teacher_logits, vocab_size)
        aux = None if aux_fn is None else aux_fn(teacher, valid, chunk_rows)
        losses, parts = _ChunkedTokenLoss.apply(
            student, teacher, flat_labels, valid, aux, kernel, params, chunk_rows, len(part_names),
            chunk_size is not None,
        )
    loss = _reduce(losses, valid, reduction, num_items_in_batch, token_shape)
    reduced_parts = {
        name: _reduce(part, valid, reduction, num_items_in_batch, token_shape).detach()
        for name, part in zip(part_names, parts)
    }
    return LossOutput(loss=loss, parts=reduced_parts)


def _reduce(values: Tensor, valid: Tensor, reduction: str, num_items_in_batch, token_shape) -> Tensor:
    if reduction == "none":
        return values.reshape(token_shape)
    total = values.sum()
    if reduction == "sum":
        return total
    denominator = valid.sum() if num_items_in_batch is None else num_items_in_batch
    if isinstance(denominator, Tensor):
        denominator = denominator.to(device=total.device, dtype=total.dtype).clamp(min=1)
    else:
        denominator = max(denominator, 1)
    return total / denominator


# ----------------------------------------------------------------------------------------------------------
# Public losses.


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    chunk_size: int | None = None,
) -> LossOutput:
    """Knowledge distillation (Hinton et al., 2015) between softened distributions, times ``temperature**2``.

    ``divergence``:
      - ``"forward_kl"``: KL(p_T || p_S), the classic KD (mass-covering).
      - ``"reverse_kl"``: KL(p_S || p_T) (mode-seeking).
      - ``"jsd"``: generalised Jensen-Shannon divergence with mixture m = jsd_beta * p_T + (1 - jsd_beta) * p_S,
        ``jsd_beta * KL(p_T || m) + (1 - jsd_beta) * KL(p_S || m)``; at the end points, where that value
        vanishes, it is defined (as in GKD and TRL) as forward KL for ``jsd_beta = 0`` and reverse KL for
        ``jsd_beta = 1``.

    ``labels`` are optional and only mark ignored tokens. Parts: ``"kd"``.
    """
    _check_inputs(student_logits, teacher_logits, labels, ignore_index, reduction, chunk_size)
    _check_temperature(temperature)
    _check_choice("divergence", divergence, DIVERGENCES)
    if not (isinstance(jsd_beta, (int, float)) and 0 <= jsd_beta <= 1):
        raise InvalidValueError(f"jsd_beta must be in [0, 1], got {jsd_beta!r}")
    params = {"temperature": float(temperature), "divergence": divergence, "jsd_beta": float(jsd_beta)}
    forward = divergence == "forward_kl" or (divergence == "jsd" and jsd_beta == 0.0)
    sparse = isinstance(teacher_logits, SparseTeacher) and not teacher_logits.is_whole
    kernel = _sparse_forward_kl_kernel if forward and sparse else _kd_kernel
    return _token_loss(
        kernel, ("kd",), student_logits, teacher_logits, labels, params,
        ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
        chunk_size=chunk_size,
    )  # fmt: skip


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    chunk_size: int | None = None,
) -> LossOutput:
    """Decoupled KD (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD``, each times ``temperature**2``.

    TCKD is the KL between the binary distributions (p_target, 1 - p_target) of teacher and student; NCKD the
    KL between their distributions renormalised exactly over the non-target classes (no "-1000" trick).
    With V = 2 NCKD is 0. Identity: KL(p_T || p_S) = TCKD + (1 - p_T[target]) * NCKD.
    Parts: ``"tckd"`` and ``"nckd"`` (each times ``temperature**2``, before ``alpha`` and ``beta``).
    """
    if labels is None:
        raise InvalidValueError("dkd_loss needs labels: the target class splits each distribution into TCKD and NCKD")
    _check_inputs(student_logits, teacher_logits, labels, ignore_index, reduction, chunk_size)
    _check_temperature(temperature)
    _check_non_negative("alpha", alpha)
    _check_non_negative("beta", beta)
    if student_logits.shape[-1] < 2:
        raise InvalidValueError(f"dkd_loss needs a vocabulary of at least 2 classes, got {student_logits.shape[-1]}")
    params = {"temperature": float(temperature), "alpha": float(alpha), "beta": float(beta)}
    return _token_loss(
        _dkd_kernel, ("tckd", "nckd"), student_logits, teacher_logits, labels, params,
        ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
        chunk_size=chunk_size,
    )  # fmt: skip


def label_smoothed_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    epsilon: float = 0.1,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    chunk_size: int | None = None,
) -> LossOutput:
    """Cross-entropy against ``(1 - epsilon) * one_hot(label) + epsilon / V``.

    Equals ``torch.nn.functional.cross_entropy(..., label_smoothing=epsilon)``. Parts: ``"nll"`` (the plain
    cross-entropy) and, when ``epsilon > 0``, ``"smooth"`` (the mean negative log-probability over the
    vocabulary), so that ``loss = (1 - epsilon) * nll + epsilon * smooth``.
    """
    if labels is None:
        raise InvalidValueError("label_smoothed_cross_entropy needs labels")
    _check_inputs(logits, None, labels, ignore_index, reduction, chunk_size)
    _check_epsilon(epsilon)
    names = ("nll", "smooth") if epsilon > 0 else ("nll",)
    return _token_loss(
        _ce_kernel, names, logits, None, labels, {"epsilon": float(epsilon)},
        ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
        chunk_size=chunk_size,
    )  # fmt: skip


def _gold_and_forward_kl(
    student_logits, teacher_logits, labels, *, ce_weight, kd_weight, epsilon, temperature, **common
) -> LossOutput:
    """The gold term and forward-KL KD fused (same values and parts as computing them apart, fewer passes)."""
    if labels is None:
        raise InvalidValueError("the gold-label term needs labels")
    _check_inputs(student_logits, teacher_logits, labels, common["ignore_index"], common["reduction"], common["chunk_size"])
    names = ("ce", "nll", "kd") if epsilon > 0 else ("ce", "kd")
    params = {"ce_weight": float(ce_weight), "kd_weight": float(kd_weight), "epsilon": float(epsilon),
              "temperature": float(temperature)}  # fmt: skip
    return _token_loss(_gold_and_forward_kl_kernel, names, student_logits, teacher_logits, labels, params, **common)


def cwtm_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    chunk_size: int | None = None,
) -> LossOutput:
    """Born-Again CWTM (Furlanello et al., 2018, Eq. 10): confidence-weighted teacher max.

    Gold-label cross-entropy with each token weighted by the teacher's maximum probability, the weights
    normalised over the non-ignored tokens of the batch. Per token the value is
    ``max_v p_T / mean_u(max_v p_T) * CE``, so the ``"mean"`` reduction gives exactly
    ``sum_s [max p_T(s) / sum_u max p_T(u)] * CE_s``. Parts: ``"cwtm"`` and ``"nll"`` (unweighted CE).
    """
    if labels is None:
        raise InvalidValueError("cwtm_loss needs labels: it weights the gold-label cross-entropy")
    _check_inputs(student_logits, teacher_logits, labels, ignore_index, reduction, chunk_size)
    _check_temperature(temperature)

    def confidence_weights(teacher: Tensor, valid: Tensor, chunk_rows: int) -> Tensor:
        confidence = _max_probability(teacher, float(temperature), chunk_rows) * valid
        return confidence / (confidence.sum() / valid.sum().clamp(min=1)).clamp(min=torch.finfo(confidence.dtype).tiny)

    return _token_loss(
        _ce_kernel, ("cwtm", "nll"), student_logits, teacher_logits, labels, {"epsilon": 0.0},
        ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
        chunk_size=chunk_size, aux_fn=confidence_weights,
    )  # fmt: skip


def dkpp_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    chunk_size: int | None = None,
) -> LossOutput:
    """Born-Again DKPP (Furlanello et al., 2018, Eq. 11): dark-knowledge with permuted predictions.

    Soft cross-entropy ``-sum_v q~_v log p_S,v`` (times ``temperature**2``) towards the teacher's distribution
    whose non-argmax probabilities are randomly permuted per token; the argmax probability stays in place, so
    the distribution's moments survive while which classes are alike is destroyed. ``generator`` seeds the
    permutation. ``labels`` are optional and only mark ignored tokens. Parts: ``"dkpp"``.
    """
    _check_inputs(student_logits, teacher_logits, labels, ignore_index, reduction, chunk_size)
    _check_temperature(temperature)
    # One seed per call; each chunk derives its permutation from it, so the backward pass can rebuild it.
    seed_device = "cpu" if generator is None else generator.device
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=seed_device))
    params = {"temperature": float(temperature), "seed": seed}
    return _token_loss(
        _dkpp_kernel, ("dkpp",), student_logits, teacher_logits, labels, params,
        ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
        chunk_size=chunk_size,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# The registry of distillation terms, and the combinator the trainer calls.


@dataclass(frozen=True)
class DistillationTerm:
    """A registered distillation term: ``compute(student_logits, teacher_logits, labels, options, **common)``.

    ``options`` holds every option of :func:`distillation_loss` (``temperature``, ``divergence``, ``jsd_beta``,
    ``alpha``, ``beta``, ``generator``); ``common`` the reduction arguments. ``part`` is the name its value is
    logged under, ``own_parts`` those of its own parts that are logged beside it.
    """

    name: str
    compute: Callable[..., LossOutput]
    part: str
    own_parts: tuple[str, ...] = ()
    default_temperature: float = 1.0
    forward_kl: Callable[[dict], bool] = staticmethod(lambda options: False)


DISTILLATION_TERMS: dict[str, DistillationTerm] = {}


def register_distillation_term(
    name: str, *, part: str | None = None, own_parts: tuple[str, ...] = (), default_temperature: float = 1.0,
    forward_kl: Callable[[dict], bool] | None = None,
):
    """Register ``fn(student_logits, teacher_logits, labels, options, **common) -> LossOutput`` as the loss
    ``name`` of :func:`distillation_loss` (and of the trainer's ``loss`` field): the gold-label term plus it.
    ``forward_kl(options)`` says when the term is forward KL, which the gold term may share one softmax with.
    :func:`fused_linear_distillation_loss` fuses a term built from seqkd's token losses (``kd_loss``, ...) and
    refuses one that computes on the logits itself."""
    if name in ("ce", "ls") or name in DISTILLATION_TERMS:
        raise InvalidValueError(f"a loss named {name!r} is registered already: choose another name")

    def register(fn):
        DISTILLATION_TERMS[name] = DistillationTerm(
            name, fn, part or name, own_parts, default_temperature, forward_kl or (lambda options: False)
        )
        return fn

    return register


def loss_names() -> tuple[str, ...]:
    """Every loss name :func:`distillation_loss` accepts: 'ce', 'ls' and the registered distillation terms."""
    return ("ce", "ls", *DISTILLATION_TERMS)


def _is_forward_kl_kd(options: dict) -> bool:
    return options["divergence"] == "forward_kl" or (options["divergence"] == "jsd" and options["jsd_beta"] == 0)


@register_distillation_term("kd", forward_kl=_is_forward_kl_kd)
def _kd_term(student_logits, teacher_logits, labels, options, **common):
    return kd_loss(student_logits, teacher_logits, labels, temperature=options["temperature"],
                   divergence=options["divergence"], jsd_beta=options["jsd_beta"], **common)  # fmt: skip


@register_distillation_term("ban", part="kd", forward_kl=lambda options: True)
def _ban_term(student_logits, teacher_logits, labels, options, **common):
    # Born-Again BAN+L is the gold term plus forward-KL KD, whatever `divergence` says.
    return kd_loss(student_logits, teacher_logits, labels, temperature=options["temperature"], **common)


@register_distillation_term("dkd", own_parts=("tckd", "nckd"), default_temperature=4.0)
def _dkd_term(student_logits, teacher_logits, labels, options, **common):
    return dkd_loss(student_logits, teacher_logits, labels, alpha=options["alpha"], beta=options["beta"],
                    temperature=options["temperature"], **common)  # fmt: skip


@register_distillation_term("cwtm")
def _cwtm_term(student_logits, teacher_logits, labels, options, **common):
    return cwtm_loss(student_logits, teacher_logits, labels, temperature=options["temperature"], **common)


@register_distillation_term("dkpp")
def _dkpp_term(student_logits, teacher_logits, labels, options, **common):
    return dkpp_loss(student_logits, teacher_logits, labels, generator=options["generator"],
                     temperature=options["temperature"], **common)  # fmt: skip


def distillation_loss(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    *,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    label_smoothing: float | None = None,
    temperature: float | None = None,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    alpha: float = 1.0,
    beta: float = 8.0,
    generator: torch.Generator | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    chunk_size: int | None = None,
) -> LossOutput:
    """``ce_weight * gold-label term + kd_weight * distillation term``, with every part.

    ``name``:
      - ``"ce"``: gold-label cross-entropy alone (label-smoothed when ``label_smoothing > 0``); no teacher.
      - ``"ls"``: label-smoothed cross-entropy alone, ``label_smoothing`` defaulting to 0.1; no teacher.
      - ``"kd"``: gold term + :func:`kd_loss` (``divergence``, ``jsd_beta``).
      - ``"ban"``: Born-Again BAN+L, gold term + forward-KL :func:`kd_loss` (the same computation as ``"kd"``).
      - ``"dkd"``: gold term + :func:`dkd_loss` (``alpha``, ``beta``).
      - ``"cwtm"``: gold term + :func:`cwtm_loss` (set ``ce_weight=0`` for the paper's CWTM alone).
      - ``"dkpp"``: gold term + :func:`dkpp_loss` (``generator``).
      - any name registered with :func:`register_distillation_term`.

    ``temperature`` defaults to the term's own default (4 for ``"dkd"``, the DKD paper's; else 1). A weight of
    0 skips that term. Parts: ``"ce"`` (the gold term; with label smoothing also ``"nll"``), the distillation
    term under its part name (``"kd"``, ``"dkd"``, ``"cwtm"``, ``"dkpp"``), and that term's own parts
    (``"tckd"``, ``"nckd"``). Each part is unweighted; ``loss`` is the weighted sum.
    """
    _check_choice("loss name", name, loss_names())
    _check_non_negative("ce_weight", ce_weight)
    _check_non_negative("kd_weight", kd_weight)
    if label_smoothing is None:
        label_smoothing = 0.1 if name == "ls" else 0.0
    _check_epsilon(label_smoothing)
    term = DISTILLATION_TERMS.get(name)
    if temperature is None:
        temperature = term.default_temperature if term is not None else 1.0
    _check_temperature(temperature)
    options = {"temperature": temperature, "divergence": divergence, "jsd_beta": jsd_beta, "alpha": alpha,
               "beta": beta, "generator": generator}  # fmt: skip
    forward_kl = term is not None and term.forward_kl(options)
    sparse_tail = isinstance(teacher_logits, SparseTeacher) and not teacher_logits.is_whole
    if sparse_tail and teacher_logits.tail == "student" and kd_weight > 0:
        if not forward_kl or temperature != 1.0:
            raise InvalidValueError(
                f"a SparseTeacher with tail='student' is defined for forward KL only (losses 'kd' with divergence "
                f"'forward_kl', and 'ban') at temperature 1, got loss {name!r} at temperature {temperature}; use "
                "tail='uniform'"
            )
    if term is not None and teacher_logits is None and kd_weight > 0:
        raise InvalidValueError(f"loss {name!r} needs teacher_logits; use 'ce' or 'ls' to train from labels alone")
    common = {
        "ignore_index": ignore_index,
        "reduction": reduction,
        "num_items_in_batch": num_items_in_batch,
        "chunk_size": chunk_size,
    }
    # The gold term and forward KL share one softmax of the student: computed together.
    if forward_kl and ce_weight > 0 and kd_weight > 0:
        return _gold_and_forward_kl(
            student_logits, teacher_logits, labels, ce_weight=ce_weight, kd_weight=kd_weight,
            epsilon=label_smoothing, temperature=temperature, **common,
        )  # fmt: skip
    terms: list[tuple[float, LossOutput]] = []
    parts: dict[str, Tensor] = {}
    if term is None or ce_weight > 0:
        gold = label_smoothed_cross_entropy(student_logits, labels, epsilon=label_smoothing, **common)
        parts["ce"] = gold.loss.detach()
        if label_smoothing > 0:
            parts["nll"] = gold.parts["nll"]
        terms.append((1.0 if term is None else ce_weight, gold))
    if term is not None and kd_weight > 0:
        value = term.compute(student_logits, teacher_logits, labels, options, **common)
        parts[term.part] = value.loss.detach()
        parts.update({k: v for k, v in value.parts.items() if k in term.own_parts})
        terms.append((kd_weight, value))
    loss = sum(weight * value.loss for weight, value in terms)
    if not terms:  # both weights 0: a zero loss that still backpropagates
        loss = _zero_loss(student_logits)
    return LossOutput(loss=loss, parts=parts)


def _zero_loss(student_logits: Tensor) -> Tensor:
    if isinstance(student_logits, _LogitsStandIn):
        return student_logits.session.zero_loss()
    return student_logits.sum() * 0.0


# ----------------------------------------------------------------------------------------------------------
# The fused linear path: hidden states and LM heads instead of logits.
#
# fused_linear_distillation_loss runs distillation_loss twice on stand-ins for the logits, which have a shape,
# a dtype and a device but no storage. The first run records which chunked kernels (_token_loss calls) the loss
# is made of, and -- through per-token placeholders -- how much each token of each kernel weighs in the final
# loss. One pass over blocks of tokens then projects each block, runs every recorded kernel on it and folds the
# weighted logits' gradient into the gradients of the hidden states and weights. The second run composes the
# loss and its parts from the kernels' real values exactly as the logits path does. Every registered term is
# therefore fused through the same code as the logits path; one that computes on the logits itself cannot be
# (its stand-in refuses every operation), and is refused rather than computed differently.


def _cannot_fuse(name: str, what: str) -> InvalidValueError:
    return InvalidValueError(
        f"loss {name!r} {what}, which fused_linear_distillation_loss cannot fuse: build the term from seqkd's "
        "token losses (kd_loss, dkd_loss, label_smoothed_cross_entropy, ...), or compute the logits and call "
        "distillation_loss"
    )


class _LogitsStandIn(Tensor):
    """The ``[..., V]`` logits of the student or teacher of a fused call: metadata only, no storage."""

    @staticmethod
    def __new__(cls, shape, dtype, device, session, role):
        stand_in = Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device)
        stand_in.session, stand_in.role = session, role
        return stand_in

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        stand_in = next(a for a in flat if isinstance(a, _LogitsStandIn))
        raise _cannot_fuse(stand_in.session.name, f"computes on the {stand_in.role}'s logits itself ({func})")


class _ProjectedTeacher:
    """A teacher's logits as ``hidden @ weight.T + bias``, projected one aligned block of rows at a time.

    The last block is kept until another is asked for, so that the chunks of every term (and of CWTM's
    confidence pass) share one projection per block; :meth:`release` frees it.
    """

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None):
        self.hidden = hidden.detach().reshape(-1, hidden.shape[-1])
        self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()
        self.shape = (self.hidden.shape[0], weight.shape[0])
        self.dtype = torch.promote_types(hidden.dtype, weight.dtype)
        self.device = hidden.device
        self.block_rows = max(1, self.shape[0])
        self.release()

    def release(self) -> None:
        self._block_start, self._block, self._weight = None, None, None

    def _project(self, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        if self._weight is None or self._weight.dtype != dtype:
            self._weight = self.weight.to(dtype)  # a copy only for half-precision weights, made once per pass
        hidden = self.hidden[start:stop].to(dtype)
        if self.bias is None:
            return hidden @ self._weight.T
        return torch.addmm(self.bias.to(dtype), hidden, self._weight.T)

    def rows(self, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        first = start - start % self.block_rows
        if stop > first + self.block_rows:  # straddles two blocks (a caller with other chunks): project apart
            return self._project(start, stop, dtype)
        if self._block_start != first or self._block.dtype != dtype:
            self._block = None  # free the old block before projecting the next
            self._block = self._project(first, min(first + self.block_rows, self.shape[0]), dtype)
            self._block_start = first
        return self._block[start - first : stop - first]


@dataclass
class _FusedTerm:
    """One recorded ``_token_loss`` call of a fused loss."""

    kernel: Callable
    part_names: tuple[str, ...]
    params: dict
    teacher: object
    labels: Tensor
    valid: Tensor
    aux_fn: Callable | None
    chunk_rows: int
    part_offset: int
    placeholder: Tensor | None
    aux: Tensor | None = None


class _FusedSession:
    """The state of one fused call: the recorded terms, their per-token weights and their values."""

    def __init__(self, name, hidden, weight, bias, teacher, chunk_size, track_gradient):
        self.name, self.hidden, self.weight, self.bias, self.teacher = name, hidden, weight, bias, teacher
        self.chunk_size, self.track_gradient = chunk_size, track_gradient
        self.compute_dtype = _compute_dtype(torch.promote_types(hidden.dtype, weight.dtype))
        self.terms: list[_FusedTerm] = []
        self.num_parts = 0
        self.replaying, self.replayed = False, 0
        self.losses = self.parts = None

    def zero_loss(self) -> Tensor:
        tensors = [t for t in (self.hidden, self.weight, self.bias) if t is not None]
        return sum(t.sum() for t in tensors) * 0.0

    def token_term(self, student_logits, kernel, part_names, teacher_logits, labels, valid, params, chunk_rows, aux_fn):
        if student_logits.role != "student":
            raise _cannot_fuse(self.name, "scores the teacher's logits as a student's")
        if self.replaying:
            index = self.replayed
            term = self.terms[index] if index < len(self.terms) else None
            if term is None or (term.kernel, term.part_names, term.params, term.chunk_rows) != (
                kernel, part_names, params, chunk_rows
            ):
                raise _cannot_fuse(self.name, "composes different token losses on two runs with the same inputs")
            self.replayed += 1
            return self.losses[index], self.parts[term.part_offset : term.part_offset + len(part_names)]
        if isinstance(teacher_logits, _LogitsStandIn):
            if teacher_logits.role != "teacher":
                raise _cannot_fuse(self.name, "scores the student's logits as a teacher's")
            teacher = self.teacher
        else:
            teacher = _flat_teacher(teacher_logits, student_logits.shape[-1])
        n = valid.shape[0]
        # Stands for this term's per-token losses: the gradient of the composed loss with respect to it is
        # each token's weight, which the single pass needs before the values exist.
        placeholder = torch.zeros(n, dtype=self.compute_dtype, device=valid.device, requires_grad=self.track_gradient)
        self.terms.append(
            _FusedTerm(
                kernel, part_names, params, teacher, labels, valid, aux_fn, chunk_rows, self.num_parts, placeholder
            )
        )
        self.num_parts += len(part_names)
        return placeholder, torch.zeros(len(part_names), n, dtype=self.compute_dtype, device=valid.device)

    def plan(self, template: LossOutput) -> None:
        """The per-token weight of each recorded term in the composed loss, and the blocks of the pass."""
        if template.loss.dim() != 0:
            raise _cannot_fuse(self.name, f"is not a scalar (shape {tuple(template.loss.shape)})")
        if not self.terms:
            return
        placeholders = [term.placeholder for term in self.terms]
        grads = [None] * len(placeholders)
        if template.loss.requires_grad:
            grads = torch.autograd.grad(template.loss, placeholders, allow_unused=True)
        zeros = torch.zeros_like(placeholders[0], requires_grad=False)
        for term in self.terms:
            term.placeholder = None
        self.valid = torch.stack([term.valid for term in self.terms])
        self.weights = torch.stack([zeros if g is None else g for g in grads]) * self.valid
        self.part_valid = torch.stack([term.valid for term in self.terms for _ in term.part_names])
        self.chunk_rows = self.terms[0].chunk_rows
        if any(term.chunk_rows != self.chunk_rows for term in self.terms):
            raise _cannot_fuse(self.name, "runs its token losses in chunks of different sizes")
        # Blocks are whole chunks, so that every kernel sees the chunks (and DKPP the seeds) of the logits path.
        if self.chunk_size is not None:
            self.block_rows = self.chunk_rows
        else:
            vocab_size = self.weight.shape[0]
            self.block_rows = self.chunk_rows * max(1, _FUSED_BLOCK_ELEMENTS // (self.chunk_rows * vocab_size))
        if self.teacher is not None:
            self.teacher.block_rows = self.block_rows

    def run(self) -> None:
        if not self.terms:
            return
        with _full_precision(self.hidden.device), torch.no_grad():
            for term in self.terms:
                if term.aux_fn is not None:
                    term.aux = term.aux_fn(term.teacher, term.valid, term.chunk_rows)
            if self.teacher is not None:
                self.teacher.release()
        self.losses, self.parts = _FusedLinearTokenLoss.apply(self.hidden, self.weight, self.bias, self)
        self.replaying = True

    def check_replayed(self) -> None:
        if self.replayed != len(self.terms):
            raise _cannot_fuse(self.name, "composes different token losses on two runs with the same inputs")


def _full_precision(device: torch.device):
    # Under autocast the projection would run in half precision; the kernels' contract is float32 or float64.
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _rewound_rng(generator: torch.Generator | None, device: torch.device):
    """Undo the body's draws from torch's random generators, so that a second run draws the same numbers."""
    state = None if generator is None else generator.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        if generator is not None:
            generator.set_state(state)


def _fused_pass(session: _FusedSession, hidden, weight, bias, token_weights, want, values: bool):
    """Per-token losses and parts of every term (when ``values``), and the gradients of hidden, weight and bias
    (those ``want`` asks for) of ``sum_k sum_i token_weights[k, i] * loss_k,i``, one block of tokens at a time."""
    dtype = session.compute_dtype
    want_hidden, want_weight, want_bias = want
    want_grad = any(want)
    n, vocab_size = hidden.shape[0], weight.shape[0]
    w = weight.detach().to(dtype)
    b = None if bias is None else bias.detach().to(dtype)
    device = hidden.device
    losses = torch.zeros(len(session.terms), n, dtype=dtype, device=device) if values else None
    parts = torch.zeros(session.num_parts, n, dtype=dtype, device=device) if values else None
    grad_hidden = torch.empty(n, w.shape[1], dtype=dtype, device=device) if want_hidden else None
    grad_weight = torch.zeros(w.shape, dtype=dtype, device=device) if want_weight else None
    grad_bias = torch.zeros(vocab_size, dtype=dtype, device=device) if want_bias else None
    with _full_precision(device), torch.no_grad():
        for block_start in range(0, n, session.block_rows):
            block_stop = min(block_start + session.block_rows, n)
            h = hidden[block_start:block_stop].detach().to(dtype)
            logits = h @ w.T if b is None else torch.addmm(b, h, w.T)
            for start in range(block_start, block_stop, session.chunk_rows):
                stop = min(start + session.chunk_rows, block_stop)
                s = logits[start - block_start : stop - block_start]
                grad = None
                for k, term in enumerate(session.terms):
                    loss, term_parts, term_grad = term.kernel(
                        s,
                        _teacher_chunk(term.kernel, term.teacher, start, stop, dtype),
                        term.labels[start:stop],
                        None if term.aux is None else term.aux[start:stop],
                        dict(term.params, chunk_start=start),
                        want_grad,
                    )
                    if values:
                        losses[k, start:stop] = loss
                        parts[term.part_offset : term.part_offset + len(term.part_names), start:stop] = term_parts
                    if want_grad:
                        term_grad.mul_(token_weights[k, start:stop, None])
                        grad = term_grad if grad is None else grad.add_(term_grad)
                if want_grad:
                    s.copy_(grad)  # these rows' logits are spent: their gradient takes their place
            if want_grad:
                if want_hidden:
                    grad_hidden[block_start:block_stop] = logits @ w
                if want_weight:
                    grad_weight.addmm_(logits.T, h)
                if want_bias:
                    grad_bias.add_(logits.sum(0))
            del logits
        if session.teacher is not None:
            session.teacher.release()
    if values:
        losses.mul_(session.valid)
        parts.mul_(session.part_valid)
    return losses, parts, (grad_hidden, grad_weight, grad_bias)


def _common_factor(actual: Tensor, expected: Tensor, dtype: torch.dtype) -> float | None:
    """The scalar c with ``actual == c * expected`` up to rounding, or None when there is none."""
    actual, expected = actual.double(), expected.double()
    norm = expected.square().sum()
    if norm == 0:
        return 0.0 if not actual.any() else None
    factor = (actual * expected).sum() / norm
    tolerance = 64 * torch.finfo(dtype).eps
    if not torch.allclose(actual, factor * expected, rtol=tolerance, atol=torch.finfo(dtype).tiny):
        return None
    return float(factor)


class _FusedLinearTokenLoss(torch.autograd.Function):
    """Per-token losses ``[terms, N]`` and parts of a session's terms, from hidden states and an LM head.

    The forward pass folds each token's logits' gradient, weighted as the composed loss weighs it, into the
    gradients of the hidden states, weight and bias. The upstream gradient of a scalar loss is those weights
    times one number, by which the first backward pass scales the stored gradients. Any other upstream gradient
    (a composition that is not linear in the terms, or a second backward through a retained graph) recomputes
    them block by block with the actual per-token weights.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, session):
        want = tuple(ctx.needs_input_grad[:3])
        losses, parts, grads = _fused_pass(session, hidden, weight, bias, session.weights, want, values=True)
        ctx.save_for_backward(hidden, weight, bias)
        ctx.session = session
        ctx.grads = grads if any(want) else None  # not saved tensors: the first backward consumes them in place
        ctx.mark_non_differentiable(parts)
        return losses, parts

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses, grad_parts):
        hidden, weight, bias = ctx.saved_tensors
        session = ctx.session
        want = tuple(ctx.needs_input_grad[:3])
        if not any(want):
            return None, None, None, None
        token_weights = grad_losses.to(session.compute_dtype) * session.valid
        grads, ctx.grads = ctx.grads, None
        factor = None if grads is None else _common_factor(token_weights, session.weights, session.compute_dtype)
        if factor is None:
            _, _, grads = _fused_pass(session, hidden, weight, bias, token_weights, want, values=False)
            factor = 1.0
        result = []
        for grad, tensor in zip(grads, (hidden, weight, bias)):
            if grad is not None:
                if factor != 1.0:
                    grad.mul_(factor)
                grad = grad.to(tensor.dtype)
            result.append(grad)
        return (*result, None)


def _check_float_tensor(name: str, value, shape_hint: str) -> None:
    if not isinstance(value, Tensor):
        raise InvalidValueError(f"{name} must be a torch.Tensor {shape_hint}, got {type(value).__name__}")
    if value.dtype not in _FLOAT_DTYPES:
        raise InvalidValueError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    if value.dim() < 1 or value.shape[-1] < 1:
        raise InvalidValueError(f"{name} must have shape {shape_hint}, got {tuple(value.shape)}")


def _check_head(prefix: str, hidden: Tensor, weight, bias) -> None:
    """``{prefix}_hidden`` [..., H], ``{prefix}_weight`` [V, H] and ``{prefix}_bias`` [V] fit together."""
    _check_float_tensor(f"{prefix}_hidden", hidden, "[..., H]")
    _check_float_tensor(f"{prefix}_weight", weight, "[V, H] (the LM head's weight)")
    if weight.dim() != 2:
        raise InvalidValueError(
            f"{prefix}_weight must be the LM head's weight [V, H], a matrix, got shape {tuple(weight.shape)}"
        )
    if weight.shape[1] != hidden.shape[-1]:
        raise InvalidValueError(
            f"{prefix}_weight has shape {tuple(weight.shape)}, whose {weight.shape[1]} columns do not match "
            f"{prefix}_hidden's hidden size {hidden.shape[-1]}: pass the LM head's weight as [V, H] "
            "(nn.Linear.weight, not its transpose), and the hidden states it projects"
        )
    if bias is not None:
        _check_float_tensor(f"{prefix}_bias", bias, f"[{weight.shape[0]}] (one entry per vocabulary token)")
        if bias.shape != weight.shape[:1]:
            raise InvalidValueError(
                f"{prefix}_bias must have shape ({weight.shape[0]},), one entry per row of {prefix}_weight, "
                f"got {tuple(bias.shape)}"
            )
    for other_name, other in ((f"{prefix}_weight", weight), (f"{prefix}_bias", bias)):
        if other is not None and other.device != hidden.device:
            raise InvalidValueError(
                f"{other_name} is on {other.device} but {prefix}_hidden on {hidden.device}: keep the LM head on "
                "the hidden states' device"
            )


def _check_fused_inputs(
    name, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, teacher,
    labels, kd_weight, reduction,
) -> None:  # fmt: skip
    _check_choice("loss name", name, loss_names())
    _check_head("student", student_hidden, student_weight, student_bias)
    vocab_size, token_shape = student_weight.shape[0], tuple(student_hidden.shape[:-1])
    dense = teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None
    if dense and teacher is not None:
        raise InvalidValueError(
            "pass the teacher either as teacher_hidden and teacher_weight (its hidden states and LM head) or as "
            "teacher (a SparseTeacher), not both"
        )
    if dense:
        if teacher_hidden is None or teacher_weight is None:
            missing = "teacher_weight" if teacher_hidden is not None else "teacher_hidden"
            raise InvalidValueError(
                f"{missing} is missing: a dense teacher is its hidden states (teacher_hidden) and its LM head's "
                "weight (teacher_weight), with an optional teacher_bias"
            )
        _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
        teacher_vocab, teacher_tokens, where = teacher_weight.shape[0], teacher_hidden.shape[:-1], "teacher_hidden"
        teacher_device = teacher_hidden.device
    elif teacher is not None:
        if not isinstance(teacher, (SparseTeacher, Tensor)):
            raise InvalidValueError(
                f"teacher must be a SparseTeacher (a teacher cache's top-k rows) or the teacher's logits, got "
                f"{type(teacher).__name__}: pass a live teacher as teacher_hidden and teacher_weight"
            )
        teacher_vocab, teacher_tokens, where = teacher.shape[-1], teacher.shape[:-1], "teacher"
        teacher_device = teacher.device
    if dense or teacher is not None:
        if teacher_vocab != vocab_size:
            raise InvalidValueError(
                f"teacher vocabulary size ({teacher_vocab}) differs from the student's ({vocab_size}): distil "
                "between models that share one tokenizer, or map the vocabularies first"
            )
        if tuple(teacher_tokens) != token_shape:
            raise InvalidValueError(
                f"{where} holds tokens of shape {tuple(teacher_tokens)} but student_hidden {token_shape}: feed both "
                "models the same batch"
            )
        if teacher_device != student_hidden.device:
            raise InvalidValueError(
                f"the teacher is on {teacher_device} but student_hidden on {student_hidden.device}: move the "
                "teacher to the student's device"
            )
    elif name in DISTILLATION_TERMS and isinstance(kd_weight, (int, float)) and kd_weight > 0:
        raise InvalidValueError(
            f"loss {name!r} needs a teacher: pass teacher_hidden and teacher_weight (its hidden states and LM "
            "head), or teacher=SparseTeacher(...); use 'ce' or 'ls' to train from labels alone"
        )
    if isinstance(labels, Tensor) and tuple(labels.shape) != token_shape:
        raise InvalidValueError(
            f"labels shape {tuple(labels.shape)} must equal student_hidden's shape without the hidden dimension, "
            f"{token_shape}; align them first (for a causal LM shift the labels: labels[..., 1:] against "
            "hidden[..., :-1, :])"
        )
    if reduction == "none":
        raise InvalidValueError(
            "reduction 'none' cannot be fused: the fused path folds each token's gradient into the weights' "
            "gradient during the forward pass, before a per-token upstream gradient is known; use reduction "
            "'mean' or 'sum', or the logits path (distillation_loss)"
        )
    _check_choice("reduction", reduction, ("mean", "sum"))


def fused_linear_distillation_loss(
    name: str,
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor | None,
    *,
    student_bias: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher: SparseTeacher | Tensor | None = None,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    label_smoothing: float | None = None,
    temperature: float | None = None,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    alpha: float = 1.0,
    beta: float = 8.0,
    generator: torch.Generator | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    chunk_size: int | None = None,
) -> LossOutput:
    """:func:`distillation_loss` of the logits ``student_hidden @ student_weight.T + student_bias``, computed
    without them: same loss names, options, parts and values, to rounding.

    ``student_hidden`` ``[..., H]`` are the states the LM head projects, ``student_weight`` ``[V, H]`` its weight
    (possibly tied to an embedding), ``student_bias`` ``[V]`` an optional bias (such as Marian's
    ``final_logits_bias``, which need not require grad); ``labels`` ``[...]`` are aligned with the hidden states.
    The teacher is ``teacher_hidden`` ``[..., H_t]`` (``H_t`` may differ from ``H``) with its own
    ``teacher_weight`` ``[V, H_t]`` and ``teacher_bias``, or ``teacher``: a :class:`SparseTeacher` (a teacher
    cache's rows) or, where they exist anyway, the teacher's logits; or none for ``"ce"`` and ``"ls"``.
    No gradient flows to the teacher.

    Memory: ``O(block x V + weights)`` instead of ``O(N x V)``. Tokens are projected a block at a time (a whole
    number of the logits path's chunks, about 128 MiB of float32 logits; exactly ``chunk_size`` rows when it is
    given), the block's logits computed in float32 (float64 for float64 inputs) and scored by the logits path's
    kernels, and their gradient folded into those of the hidden states, weight and bias during the forward
    pass; neither model's ``[N, V]`` logits nor their gradient ever exist. Half-precision weights are copied to
    float32 once per pass, and their gradient is accumulated in float32. CWTM projects the teacher twice (its
    confidence weights need the whole batch first).

    ``reduction`` is ``"mean"`` (with ``num_items_in_batch`` as in :func:`distillation_loss`) or ``"sum"``;
    ``"none"`` cannot be fused, since the per-token upstream gradient is unknown during the forward pass. A
    second backward through a retained graph recomputes the gradients. DKPP draws the same permutations as the
    logits path with the same ``chunk_size`` and ``generator``. A registered term that computes on the logits
    itself, rather than through seqkd's token losses, is refused.
    """
    _check_fused_inputs(
        name, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, teacher,
        labels, kd_weight, reduction,
    )  # fmt: skip
    vocab_size, hidden_size = student_weight.shape
    device = student_hidden.device
    heads = (student_hidden, student_weight, student_bias)
    track_gradient = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in heads)
    projected = None if teacher_weight is None else _ProjectedTeacher(teacher_hidden, teacher_weight, teacher_bias)
    session = _FusedSession(
        name, student_hidden.reshape(-1, hidden_size), student_weight, student_bias, projected, chunk_size,
        track_gradient,
    )  # fmt: skip
    logits_shape = (*student_hidden.shape[:-1], vocab_size)
    student_logits = _LogitsStandIn(
        logits_shape, torch.promote_types(student_hidden.dtype, student_weight.dtype), device, session, "student"
    )
    if projected is None:
        teacher_logits = teacher
    else:
        teacher_logits = _LogitsStandIn(logits_shape, projected.dtype, device, session, "teacher")
    options = {
        "ce_weight": ce_weight, "kd_weight": kd_weight, "label_smoothing": label_smoothing,
        "temperature": temperature, "divergence": divergence, "jsd_beta": jsd_beta, "alpha": alpha, "beta": beta,
        "generator": generator, "ignore_index": ignore_index, "reduction": reduction,
        "num_items_in_batch": num_items_in_batch, "chunk_size": chunk_size,
    }  # fmt: skip
    # The recording run validates every option and draws DKPP's seed; the replay must draw the same one.
    with _rewound_rng(generator, device):
        template = distillation_loss(name, student_logits, teacher_logits, labels, **options)
    session.plan(template)
    del template
    try:
        session.run()
        result = distillation_loss(name, student_logits, teacher_logits, labels, **options)
        session.check_replayed()
    finally:
        # The autograd node keeps the session: without its outputs, which hold the node, there is no cycle that
        # would keep the model's activations alive until the garbage collector runs.
        session.losses = session.parts = None
    return result
