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
"""

from __future__ import annotations

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
        if self.tail != "uniform":
            raise InvalidValueError(f"a SparseTeacher with tail={self.tail!r} has no dense form without the student")
        ids, logprobs = self.ids[start:stop].long(), self.logprobs[start:stop].to(dtype)
        tail = self.vocab_size - ids.shape[-1]
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


def _kd_kernel(s, t, y, aux, params, want_grad):
    temperature, divergence, jsd_beta = params["temperature"], params["divergence"], params["jsd_beta"]
    if divergence == "jsd" and jsd_beta == 0.0:
        divergence = "forward_kl"
    elif divergence == "jsd" and jsd_beta == 1.0:
        divergence = "reverse_kl"
    log_p = _floored_log_softmax(_scaled(s, temperature))
    log_q = _floored_log_softmax(_scaled(t, temperature))
    t2 = temperature * temperature
    if divergence == "forward_kl":
        q = log_q.exp()
        loss = t2 * _kl_rows(q, log_q, log_p)
        if not want_grad:
            return loss, loss[None], None
        # d/ds of T^2 KL(q || softmax(s/T)) = T (p - q)
        grad = log_p.exp_().sub_(q)
        if temperature != 1.0:
            grad.mul_(temperature)
        return loss, loss[None], grad
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
        log_q = _floored_log_softmax(_scaled(t, temperature))
        q = log_q.exp()
        kl = _kl_rows(q, log_q, log_p_t.clamp(min=_LOG_FLOOR))
        scale, shift = torch.ones_like(nll), torch.zeros_like(nll)
    kd = temperature * temperature * kl
    loss = w_ce * gold + w_kd * kd
    parts = torch.stack([*gold_parts, kd])
    if not want_grad:
        return loss, parts, None
    # d gold/ds = p - (1 - eps) onehot(y) - eps / V;  d KD/ds = T (p_T * scale - shift + scatter(correction))
    # [- q for a dense teacher]: the per-row scales and shifts of both terms go into one pass over the logits.
    kd_scale = w_kd * temperature
    shift = kd_scale * shift + w_ce * epsilon / vocab_size
    if temperature == 1.0:
        grad = torch.addcmul(-shift[:, None], log_p.exp_(), (w_ce + kd_scale * scale)[:, None])
    else:
        grad = log_p.exp_().mul_(w_ce).sub_(shift[:, None])
        grad.addcmul_(log_p_t.exp_(), (kd_scale * scale)[:, None])
    if sparse:
        grad.scatter_add_(1, t[0], correction.mul_(kd_scale))
    else:
        grad.sub_(q, alpha=kd_scale)
    grad.scatter_add_(1, y[:, None], torch.full_like(nll[:, None], -w_ce * (1 - epsilon)))
    return loss, parts, grad


_gold_and_forward_kl_kernel.takes_sparse_teacher = True


def _dkd_kernel(s, t, y, aux, params, want_grad):
    temperature, alpha, beta = params["temperature"], params["alpha"], params["beta"]
    s, t = _scaled(s, temperature), _scaled(t, temperature)
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
    t2 = temperature * temperature
    tckd, nckd = t2 * tckd, t2 * nckd
    loss = alpha * tckd + beta * nckd
    parts = torch.stack([tckd, nckd])
    if not want_grad:
        return loss, parts, None
    # dTCKD/ds: p_t - pT_t at the target, p^_j (pT_t - p_t) elsewhere; dNCKD/ds: p^_j - q^_j off the target.
    pt_s = log_pt_s.exp()
    p_hat = log_hat_s.exp()
    grad = p_hat * (alpha * (pt_t - pt_s) + beta)[:, None] - beta * q_hat
    grad.scatter_(1, target, (alpha * (pt_s - pt_t))[:, None])
    if temperature != 1.0:
        grad.mul_(temperature)
    return loss, parts, grad


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
    def forward(ctx, student, teacher, labels, valid, aux, kernel, params, chunk_rows, num_parts):
        compute_dtype = _compute_dtype(student.dtype)
        n = student.shape[0]
        losses = torch.zeros(n, dtype=compute_dtype, device=student.device)
        parts = torch.zeros(num_parts, n, dtype=compute_dtype, device=student.device)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(student) if want_grad else None
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            loss, chunk_parts, chunk_grad = kernel(
                *_chunk_args(kernel, student, teacher, labels, aux, start, stop, compute_dtype),
                dict(params, chunk_start=start),
                want_grad,
            )
            losses[start:stop] = loss
            parts[:, start:stop] = chunk_parts
            if want_grad:
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
            return (None,) * 9
        grad_scale = (grad_losses * valid).to(_compute_dtype(student.dtype))
        grad, ctx.grad_buffer = ctx.grad_buffer, None
        if grad is not None:
            grad.mul_(grad_scale[:, None])
            return (grad,) + (None,) * 8
        grad = torch.empty_like(student)
        for start in range(0, student.shape[0], ctx.chunk_rows):
            stop = min(start + ctx.chunk_rows, student.shape[0])
            _, _, chunk_grad = ctx.kernel(
                *_chunk_args(ctx.kernel, student, teacher, labels, aux, start, stop, _compute_dtype(student.dtype)),
                dict(ctx.params, chunk_start=start),
                True,
            )
            grad[start:stop] = chunk_grad.mul_(grad_scale[start:stop, None])
        return (grad,) + (None,) * 8


def _chunk_args(kernel, student, teacher, labels, aux, start, stop, compute_dtype):
    if teacher is None:
        teacher_rows = None
    elif isinstance(teacher, SparseTeacher) and getattr(kernel, "takes_sparse_teacher", False):
        logprobs = teacher.logprobs[start:stop].to(compute_dtype)
        if teacher.residual is not None:
            residual = teacher.residual[start:stop].to(compute_dtype)
        else:
            residual = (-torch.expm1(torch.logsumexp(logprobs, -1))).clamp(min=0.0)
        teacher_rows = (teacher.ids[start:stop].long(), logprobs, residual, teacher.tail)
    else:
        teacher_rows = _teacher_rows(teacher, start, stop, compute_dtype)
    return (
        student[start:stop].to(compute_dtype),
        teacher_rows,
        labels[start:stop],
        None if aux is None else aux[start:stop],
    )


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
    if isinstance(teacher_logits, SparseTeacher) and teacher_logits.tail == "student":
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
    student = student_logits.reshape(-1, vocab_size)
    if teacher_logits is None:
        teacher = None
    elif isinstance(teacher_logits, SparseTeacher):
        teacher = teacher_logits.flatten_tokens()
    else:
        teacher = teacher_logits.detach().reshape(-1, vocab_size)
    if labels is None:
        valid = torch.ones(student.shape[0], dtype=torch.bool, device=student.device)
        flat_labels = torch.zeros(student.shape[0], dtype=torch.long, device=student.device)
    else:
        flat_labels = labels.reshape(-1).to(device=student.device, dtype=torch.long)
        valid = flat_labels != ignore_index
        flat_labels = flat_labels.masked_fill(~valid, 0)
    chunk_rows = _chunk_rows(vocab_size, chunk_size)
    aux = None if aux_fn is None else aux_fn(teacher, valid, chunk_rows)
    losses, parts = _ChunkedTokenLoss.apply(
        student, teacher, flat_labels, valid, aux, kernel, params, chunk_rows, len(part_names)
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
    kernel = _sparse_forward_kl_kernel if forward and isinstance(teacher_logits, SparseTeacher) else _kd_kernel
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
    ``forward_kl(options)`` says when the term is forward KL, which the gold term may share one softmax with."""
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
    if isinstance(teacher_logits, SparseTeacher) and teacher_logits.tail == "student" and kd_weight > 0:
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
        loss = student_logits.sum() * 0.0
    return LossOutput(loss=loss, parts=parts)
