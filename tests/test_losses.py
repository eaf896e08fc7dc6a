"""seqkd.losses against float64 references written from the papers' formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from seqkd.losses import (
    cwtm_loss,
    distillation_loss,
    dkd_loss,
    dkpp_loss,
    kd_loss,
    label_smoothed_cross_entropy,
)

IGNORE = -100


# ---------------------------------------------------------------------------------------------------------
# float64 references, one token per row, straight from the formulas (no chunking, no tricks).


def ref_kd(s, t, temperature, divergence, jsd_beta=0.5):
    p = torch.softmax(s.double() / temperature, -1)
    q = torch.softmax(t.double() / temperature, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if divergence == "forward_kl" or (divergence == "jsd" and jsd_beta == 0):
        value = kl(q, p)
    elif divergence == "reverse_kl" or (divergence == "jsd" and jsd_beta == 1):
        value = kl(p, q)
    else:
        m = jsd_beta * q + (1 - jsd_beta) * p
        value = jsd_beta * kl(q, m) + (1 - jsd_beta) * kl(p, m)
    return temperature**2 * value


def ref_dkd_parts(s, t, y, temperature):
    """TCKD and NCKD per token (times T^2), Zhao et al. 2022, Eq. (1)-(4), with exact renormalisation."""
    p = torch.softmax(s.double() / temperature, -1)
    q = torch.softmax(t.double() / temperature, -1)
    target = F.one_hot(y, s.shape[-1]).bool()
    p_t, q_t = p[target], q[target]
    b_s = torch.stack([p_t, 1 - p_t], -1)
    b_t = torch.stack([q_t, 1 - q_t], -1)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(-1)
    p_hat = (p / (1 - p_t)[:, None]).masked_fill(target, 1.0)  # 1 at the target: contributes log 1 = 0
    q_hat = (q / (1 - q_t)[:, None]).masked_fill(target, 1.0)
    nckd = (q_hat * (q_hat.log() - p_hat.log())).masked_fill(target, 0.0).sum(-1)
    return temperature**2 * tckd, temperature**2 * nckd


def make_inputs(n=23, v=13, seed=0, dtype=torch.float64, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(n, v, generator=g)).to(dtype).requires_grad_()
    t = (2 * torch.randn(n, v, generator=g)).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        y[::ignore_every] = IGNORE
    return s, t, y


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


ALL_LOSSES = {
    "kd_forward": lambda s, t, y, **kw: kd_loss(s, t, y, temperature=2.0, **kw),
    "kd_reverse": lambda s, t, y, **kw: kd_loss(s, t, y, temperature=2.0, divergence="reverse_kl", **kw),
    "kd_jsd": lambda s, t, y, **kw: kd_loss(s, t, y, temperature=2.0, divergence="jsd", jsd_beta=0.3, **kw),
    "dkd": lambda s, t, y, **kw: dkd_loss(s, t, y, alpha=0.7, beta=3.0, temperature=2.0, **kw),
    "ls": lambda s, t, y, **kw: label_smoothed_cross_entropy(s, y, epsilon=0.1, **kw),
    "cwtm": lambda s, t, y, **kw: cwtm_loss(s, t, y, **kw),
    "dkpp": lambda s, t, y, **kw: dkpp_loss(s, t, y, generator=torch.Generator().manual_seed(3), **kw),
}


# ---------------------------------------------------------------------------------------------------------
# Values and gradients against the references.


@pytest.mark.parametrize("divergence,jsd_beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 4.0])
def test_kd_matches_reference(divergence, jsd_beta, temperature):
    s, t, y = make_inputs()
    out = kd_loss(s, t, y, temperature=temperature, divergence=divergence, jsd_beta=jsd_beta, reduction="none")
    ref = ref_kd(s, t, temperature, divergence, jsd_beta).masked_fill(y == IGNORE, 0.0)
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(out.parts["kd"], ref.detach())
    mean = kd_loss(s, t, y, temperature=temperature, divergence=divergence, jsd_beta=jsd_beta)
    ref_mean = ref[y != IGNORE].mean()
    torch.testing.assert_close(mean.loss, ref_mean)
    torch.testing.assert_close(grad_of(mean.loss, s), grad_of(ref_mean, s))


def test_jsd_end_points_are_the_kls():
    s, t, y = make_inputs()
    for beta, divergence in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd = kd_loss(s, t, y, divergence="jsd", jsd_beta=beta, reduction="none").loss
        kl = kd_loss(s, t, y, divergence=divergence, reduction="none").loss
        torch.testing.assert_close(jsd, kl)


def test_dkd_matches_reference():
    s, t, y = make_inputs()
    out = dkd_loss(s, t, y, alpha=0.7, beta=3.0, temperature=2.0, reduction="none")
    keep = y != IGNORE
    tckd, nckd = ref_dkd_parts(s[keep], t[keep], y[keep], 2.0)
    torch.testing.assert_close(out.parts["tckd"][keep], tckd.detach())
    torch.testing.assert_close(out.parts["nckd"][keep], nckd.detach())
    torch.testing.assert_close(out.loss[keep], 0.7 * tckd + 3.0 * nckd)
    assert (out.loss[~keep] == 0).all()
    mean = dkd_loss(s, t, y, alpha=0.7, beta=3.0, temperature=2.0)
    ref_mean = (0.7 * tckd + 3.0 * nckd).mean()
    torch.testing.assert_close(mean.loss, ref_mean)
    torch.testing.assert_close(grad_of(mean.loss, s), grad_of(ref_mean, s))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kd_equals_tckd_plus_weighted_nckd_token_by_token(temperature):
    s, t, y = make_inputs(ignore_every=0)
    kd = kd_loss(s, t, y, temperature=temperature, reduction="none").loss
    dkd = dkd_loss(s, t, y, temperature=temperature, reduction="none")
    q_t = torch.softmax(t / temperature, -1).gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(kd, dkd.parts["tckd"] + (1 - q_t) * dkd.parts["nckd"])


def test_dkd_with_beta_one_minus_teacher_target_prob_equals_kd():
    s, t, y = make_inputs(n=6, ignore_every=0)
    q_t = torch.softmax(t, -1).gather(1, y[:, None])[:, 0]
    for i in range(len(y)):
        row = slice(i, i + 1)
        dkd = dkd_loss(s[row], t[row], y[row], alpha=1.0, beta=float(1 - q_t[i]), temperature=1.0).loss
        kd = kd_loss(s[row], t[row], y[row], temperature=1.0).loss
        torch.testing.assert_close(dkd, kd)
        torch.testing.assert_close(grad_of(dkd, s), grad_of(kd, s))


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.5])
def test_label_smoothing_equals_pytorch(epsilon):
    s, _, y = make_inputs()
    out = label_smoothed_cross_entropy(s, y, epsilon=epsilon)
    ref = F.cross_entropy(s, y, label_smoothing=epsilon, ignore_index=IGNORE)
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(grad_of(out.loss, s), grad_of(ref, s))
    nll = F.cross_entropy(s, y, ignore_index=IGNORE)
    torch.testing.assert_close(out.parts["nll"], nll.detach())
    if epsilon > 0:
        torch.testing.assert_close(out.loss.detach(), (1 - epsilon) * out.parts["nll"] + epsilon * out.parts["smooth"])


def test_label_smoothing_zero_equals_cross_entropy():
    s, _, y = make_inputs()
    out = label_smoothed_cross_entropy(s, y, epsilon=0.0, reduction="none")
    torch.testing.assert_close(out.loss, F.cross_entropy(s, y, ignore_index=IGNORE, reduction="none"))


def test_cwtm_matches_eq10():
    s, t, y = make_inputs()
    keep = y != IGNORE
    out = cwtm_loss(s, t, y)
    confidence = torch.softmax(t, -1).amax(-1)[keep]
    ce = F.cross_entropy(s[keep], y[keep], reduction="none")
    ref = (confidence / confidence.sum() * ce).sum()
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(grad_of(out.loss, s), grad_of(ref, s))
    torch.testing.assert_close(out.parts["nll"], ce.mean().detach())


def test_cwtm_with_uniform_confidence_teacher_equals_mean_ce():
    s, _, y = make_inputs()
    t = torch.randn(1, s.shape[-1], dtype=s.dtype).expand_as(s)  # every token: the same teacher confidence
    out = cwtm_loss(s, t, y)
    ref = F.cross_entropy(s, y, ignore_index=IGNORE)
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(grad_of(out.loss, s), grad_of(ref, s))


def test_dkpp_keeps_argmax_and_multiset_and_permutes():
    n, v = 16, 50
    s, t, _ = make_inputs(n=n, v=v, ignore_every=0)
    out = dkpp_loss(s, t, generator=torch.Generator().manual_seed(1), reduction="sum")
    # With T = 1 the gradient of the soft cross-entropy is p_S - q~: recover the permuted teacher q~.
    q_perm = torch.softmax(s, -1) - grad_of(out.loss, s)
    q = torch.softmax(t, -1)
    assert torch.equal(q_perm.argmax(-1), q.argmax(-1))
    torch.testing.assert_close(q_perm.gather(1, q.argmax(-1, keepdim=True)), q.gather(1, q.argmax(-1, keepdim=True)))
    torch.testing.assert_close(q_perm.sort(-1).values, q.sort(-1).values)
    assert (q_perm - q).abs().amax() > 1e-3, "the non-argmax probabilities were not permuted"
    ref = -(q_perm * torch.log_softmax(s, -1)).sum()
    torch.testing.assert_close(out.loss, ref.detach())


def test_dkpp_generator_makes_it_reproducible():
    s, t, y = make_inputs(v=40)
    a = dkpp_loss(s, t, y, generator=torch.Generator().manual_seed(7)).loss
    b = dkpp_loss(s, t, y, generator=torch.Generator().manual_seed(7)).loss
    c = dkpp_loss(s, t, y, generator=torch.Generator().manual_seed(8)).loss
    assert a == b and a != c


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_gradcheck(name):
    s, t, y = make_inputs(n=7, v=5, seed=1, ignore_every=3)
    fn = ALL_LOSSES[name]
    assert torch.autograd.gradcheck(lambda x: fn(x, t, y, reduction="none", chunk_size=3).loss, (s,))
    assert torch.autograd.gradcheck(lambda x: fn(x, t, y, chunk_size=2).loss, (s,))


# ---------------------------------------------------------------------------------------------------------
# Padding, reductions, accumulation, chunking, dtypes, extremes.


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_ignored_tokens_have_zero_loss_and_zero_gradient(name):
    s, t, y = make_inputs()
    out = ALL_LOSSES[name](s, t, y, reduction="none")
    ignored = y == IGNORE
    assert out.loss.shape == y.shape
    assert (out.loss[ignored] == 0).all() and (out.loss[~ignored] != 0).all()
    for part in out.parts.values():
        assert part.shape == y.shape and (part[ignored] == 0).all()
    g = grad_of(ALL_LOSSES[name](s, t, y).loss, s)
    assert (g[ignored] == 0).all() and (g[~ignored] != 0).any()


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_all_ignored_batch_gives_zero_loss_and_zero_gradient(name):
    s, t, y = make_inputs()
    y = torch.full_like(y, IGNORE)
    for reduction in ("mean", "sum"):
        out = ALL_LOSSES[name](s, t, y, reduction=reduction)
        assert out.loss.item() == 0 and all(p.item() == 0 for p in out.parts.values())
        g = grad_of(out.loss, s)
        assert torch.isfinite(g).all() and (g == 0).all()


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_leading_shape_and_reductions(name):
    s, t, y = make_inputs(n=24)
    s3, t3, y3 = s.reshape(2, 3, 4, -1), t.reshape(2, 3, 4, -1), y.reshape(2, 3, 4)
    fn = ALL_LOSSES[name]
    per_token = fn(s3, t3, y3, reduction="none").loss
    assert per_token.shape == (2, 3, 4)
    torch.testing.assert_close(fn(s3, t3, y3, reduction="none").loss.reshape(-1), fn(s, t, y, reduction="none").loss)
    if name != "cwtm":  # CWTM's weights are normalised per batch, so the sum is not a plain token sum
        torch.testing.assert_close(fn(s3, t3, y3, reduction="sum").loss, per_token.sum())
    torch.testing.assert_close(fn(s3, t3, y3).loss, per_token.sum() / (y3 != IGNORE).sum())


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_num_items_in_batch_normalises_gradient_accumulation(name):
    if name == "cwtm":
        pytest.skip("CWTM normalises its weights within each micro-batch by definition")
    s, t, y = make_inputs(n=20)
    fn = ALL_LOSSES[name]
    full = fn(s, t, y).loss
    total = int((y != IGNORE).sum())
    accumulated = sum(fn(s[i : i + 10], t[i : i + 10], y[i : i + 10], num_items_in_batch=total).loss for i in (0, 10))
    if name != "dkpp":  # DKPP draws one permutation seed per call
        torch.testing.assert_close(accumulated, full)
    half = fn(s[:10], t[:10], y[:10], num_items_in_batch=torch.tensor(total)).loss
    torch.testing.assert_close(half, fn(s[:10], t[:10], y[:10], reduction="sum").loss / total)


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_chunked_equals_unchunked(name):
    s, t, y = make_inputs(n=29, dtype=torch.float32)
    fn = ALL_LOSSES[name]
    whole = fn(s, t, y, chunk_size=29)
    if name == "dkpp":  # the permutation is drawn per chunk; compare one chunk against itself
        chunked = fn(s, t, y, chunk_size=29)
    else:
        chunked = fn(s, t, y, chunk_size=4)
    torch.testing.assert_close(chunked.loss, whole.loss)
    for key in whole.parts:
        torch.testing.assert_close(chunked.parts[key], whole.parts[key])
    torch.testing.assert_close(grad_of(chunked.loss, s), grad_of(whole.loss, s))
    default = fn(s, t, y)  # automatic chunk size
    if name != "dkpp":
        torch.testing.assert_close(default.loss, whole.loss)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_cross_entropy_trains_in_one_pass_when_it_costs_no_memory(monkeypatch, epsilon):
    """Past the automatic chunk size, CE's gradient still comes from one pass over all the tokens (its only
    logits-sized temporary is the gradient itself), and equals both the chunked path and PyTorch's."""
    import seqkd.losses as losses

    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 40 * 13)  # the automatic chunk: 40 of the 100 tokens
    rows_seen = []
    kernel = losses._ce_kernel

    def counting_kernel(s, t, y, aux, params, want_grad):
        rows_seen.append((s.shape[0], want_grad))
        return kernel(s, t, y, aux, params, want_grad)

    counting_kernel.__dict__.update(kernel.__dict__)
    monkeypatch.setattr(losses, "_ce_kernel", counting_kernel)
    torch.manual_seed(0)
    s = torch.randn(100, 13, requires_grad=True)
    y = torch.randint(0, 13, (100,))
    y[::7] = IGNORE
    one_pass = label_smoothed_cross_entropy(s, y, epsilon=epsilon)
    assert rows_seen == [(100, True)]
    chunked = label_smoothed_cross_entropy(s, y, epsilon=epsilon, chunk_size=40)  # a chunk size asked for is kept
    assert rows_seen[1:] == [(40, True), (40, True), (20, True)]
    reference = F.cross_entropy(s, y, ignore_index=IGNORE, label_smoothing=epsilon)
    torch.testing.assert_close(one_pass.loss, chunked.loss)
    torch.testing.assert_close(one_pass.loss, reference)
    one_pass_grad = grad_of(one_pass.loss, s)
    torch.testing.assert_close(one_pass_grad, grad_of(chunked.loss, s))
    torch.testing.assert_close(one_pass_grad, grad_of(reference, s))
    rows_seen.clear()
    # Without a gradient to hold (evaluation), chunks keep the temporaries small.
    label_smoothed_cross_entropy(s.detach(), y, epsilon=epsilon)
    assert rows_seen == [(40, False), (40, False), (20, False)]


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_float32(name, dtype):
    s, t, y = make_inputs(n=64, v=100, dtype=torch.float32)
    s_low = s.detach().to(dtype).requires_grad_()
    fn = ALL_LOSSES[name]
    # Compare against fp32 on the same rounded inputs: what is left is the loss' own precision.
    s_ref = s_low.detach().float().requires_grad_()
    low, ref = fn(s_low, t.to(dtype), y), fn(s_ref, t.to(dtype).float(), y)
    assert low.loss.dtype == torch.float32
    torch.testing.assert_close(low.loss, ref.loss, rtol=1e-5, atol=1e-5)
    g_low = grad_of(low.loss, s_low)
    assert g_low.dtype == dtype
    torch.testing.assert_close(g_low.float(), grad_of(ref.loss, s_ref), rtol=2e-2, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_extreme_logits_and_low_temperature_stay_finite(name):
    g = torch.Generator().manual_seed(0)
    n, v = 12, 9
    s = (1e4 * torch.randn(n, v, generator=g).sign()).requires_grad_()
    t = 1e4 * torch.randn(n, v, generator=g).sign()
    y = torch.randint(0, v, (n,), generator=g)
    kwargs = {} if name in ("ls", "cwtm") else {}
    out = ALL_LOSSES[name](s, t, y, **kwargs)
    assert torch.isfinite(out.loss)
    assert torch.isfinite(grad_of(out.loss, s)).all()
    for fn in (
        lambda: kd_loss(s, t, y, temperature=0.1),
        lambda: kd_loss(s, t, y, temperature=0.1, divergence="reverse_kl"),
        lambda: kd_loss(s, t, y, temperature=0.1, divergence="jsd"),
        lambda: dkd_loss(s, t, y, temperature=0.1),
        lambda: dkpp_loss(s, t, y, temperature=0.1),
        lambda: cwtm_loss(s, t, y, temperature=0.1),
    ):
        loss = fn().loss
        assert torch.isfinite(loss) and torch.isfinite(grad_of(loss, s)).all()


def test_certain_teacher_and_two_classes_are_finite():
    s = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    certain = F.one_hot(y, 2).double() * 1e4  # the teacher puts probability 1 on the target
    out = dkd_loss(s, certain, y, temperature=1.0, reduction="none")
    assert torch.isfinite(out.loss).all() and (out.parts["nckd"] == 0).all()
    assert torch.isfinite(grad_of(out.loss.sum(), s)).all()
    torch.testing.assert_close(out.loss, 1.0 * out.parts["tckd"])
    # With the target certain, TCKD is the student's -log p_target.
    torch.testing.assert_close(out.parts["tckd"], -torch.log_softmax(s, -1).gather(1, y[:, None])[:, 0].detach())
    assert torch.autograd.gradcheck(lambda x: dkd_loss(x, certain, y, reduction="none").loss, (s,))


def test_dkd_stays_exact_where_the_non_target_mass_underflows_float32():
    # A target logit 95-110 above the rest leaves non-target probabilities of e^-95..e^-110: subnormal or zero in
    # float32, so their sum cannot renormalise them; those rows take the masked-logsumexp path.
    g = torch.Generator().manual_seed(5)
    n, v = 8, 50
    s64 = 2 * torch.randn(n, v, generator=g, dtype=torch.float64)
    t64 = 2 * torch.randn(n, v, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=g)
    rows = torch.arange(n)
    t64[rows[:3], y[:3]] += torch.tensor([95.0, 110.0, 200.0], dtype=torch.float64)  # a near-certain teacher
    s64[rows[2:5], y[2:5]] += torch.tensor([110.0, 95.0, 120.0], dtype=torch.float64)  # a near-certain student
    want = dkd_loss(s64.requires_grad_(), t64, y, alpha=0.7, beta=3.0, temperature=1.0, reduction="none")
    s32 = s64.detach().float().requires_grad_()
    got = dkd_loss(s32, t64.float(), y, alpha=0.7, beta=3.0, temperature=1.0, reduction="none")
    # float32 logits near 100 carry an absolute rounding of 4e-6 (half a unit in the last place), which moves
    # the log-probabilities, and with them each term, by as much.
    for key in ("tckd", "nckd"):
        torch.testing.assert_close(got.parts[key].double(), want.parts[key].detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_of(got.loss.sum(), s32).double(), grad_of(want.loss.sum(), s64),
                               rtol=1e-4, atol=1e-5)  # fmt: skip


def test_dkd_is_infinite_where_the_student_gives_the_target_no_mass():
    s, t, y = make_inputs(n=4, ignore_every=0)
    s = s.detach().clone()
    s[0, y[0]] = -math.inf
    out = dkd_loss(s, t, y, temperature=1.0, reduction="none")
    assert out.parts["tckd"][0] == math.inf and torch.isfinite(out.loss[1:]).all()


def test_masked_vocabulary_entries_are_finite():
    s, t, y = make_inputs(ignore_every=0)
    t = t.clone()
    t[:, -1] = -math.inf  # e.g. a padded vocabulary entry the teacher never predicts
    y = y.clamp(max=s.shape[-1] - 2)
    for fn in ALL_LOSSES.values():
        loss = fn(s, t, y).loss
        assert torch.isfinite(loss) and torch.isfinite(grad_of(loss, s)).all()


@pytest.mark.parametrize("masked", ["teacher", "both"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gold_and_forward_kl_with_masked_vocabulary_entries_match_the_reference(masked, temperature):
    # The one-pass gold + forward-KL kernel computes the KL in the teacher's log-probabilities' own buffer: a -inf
    # logit in the teacher (or in both models, e.g. a padded vocabulary entry) must still add 0, not NaN.
    s, t, y = make_inputs(ignore_every=0)
    s, t = s.clone(), t.clone()
    t[:, -1] = -math.inf
    if masked == "both":
        s = s.detach().clone()
        s[:, -1] = -math.inf
        s.requires_grad_()
    y = y.clamp(max=s.shape[-1] - 2)
    out = distillation_loss("kd", s, t, y, ce_weight=0.4, kd_weight=0.6, temperature=temperature)
    grad = grad_of(out.loss, s)
    s64 = s.detach().double().requires_grad_()
    log_p = torch.log_softmax(s64[:, :-1] / temperature, -1)
    log_q = torch.log_softmax(t.double()[:, :-1] / temperature, -1)
    kd = temperature**2 * (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    if masked == "both":
        ce = F.cross_entropy(s64[:, :-1], y)
    else:
        ce = F.cross_entropy(s64, y)
        kd = temperature**2 * (log_q.exp() * (log_q - torch.log_softmax(s64 / temperature, -1)[:, :-1])).sum(-1).mean()
    reference = 0.4 * ce + 0.6 * kd
    reference.backward()
    torch.testing.assert_close(out.loss.double(), reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.parts["kd"].double(), kd.detach(), rtol=1e-5, atol=1e-6)
    expected_grad = s64.grad.nan_to_num(0.0).to(grad.dtype)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_teacher_receives_no_gradient():
    s, t, y = make_inputs()
    t.requires_grad_()
    kd_loss(s, t, y).loss.backward()
    assert t.grad is None and s.grad is not None


# ---------------------------------------------------------------------------------------------------------
# The combinator.


def test_distillation_loss_combines_weighted_terms():
    s, t, y = make_inputs()
    out = distillation_loss("kd", s, t, y, ce_weight=0.3, kd_weight=0.7, temperature=2.0)
    ce = F.cross_entropy(s, y, ignore_index=IGNORE)
    kd = kd_loss(s, t, y, temperature=2.0).loss
    torch.testing.assert_close(out.loss, 0.3 * ce + 0.7 * kd)
    assert set(out.parts) == {"ce", "kd"}
    dkd = distillation_loss("dkd", s, t, y, ce_weight=1.0, kd_weight=0.5, alpha=1.0, beta=2.0)
    assert set(dkd.parts) == {"ce", "dkd", "tckd", "nckd"}
    ref = dkd_loss(s, t, y, alpha=1.0, beta=2.0, temperature=4.0).loss  # DKD's default temperature
    torch.testing.assert_close(dkd.loss, ce + 0.5 * ref)
    ls = distillation_loss("ls", s, None, y)
    torch.testing.assert_close(ls.loss, F.cross_entropy(s, y, ignore_index=IGNORE, label_smoothing=0.1))
    assert set(ls.parts) == {"ce", "nll"}
    ban = distillation_loss("ban", s, t, y, label_smoothing=0.1)
    torch.testing.assert_close(ban.loss, F.cross_entropy(s, y, ignore_index=IGNORE, label_smoothing=0.1) + kd_loss(s, t, y).loss)
    for name in ("cwtm", "dkpp"):
        out = distillation_loss(name, s, t, y, ce_weight=0.0, generator=torch.Generator().manual_seed(0))
        assert set(out.parts) == {name}
    ce_only = distillation_loss("ce", s, None, y)
    torch.testing.assert_close(ce_only.loss, ce)


def test_distillation_loss_zero_weights_still_backpropagate():
    s, t, y = make_inputs()
    out = distillation_loss("kd", s, t, y, ce_weight=0.0, kd_weight=0.0)
    assert out.loss.item() == 0 and (grad_of(out.loss, s) == 0).all()


# ---------------------------------------------------------------------------------------------------------
# Bad input: ValueError naming the value and the fix.


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda s, t, y: kd_loss(s, t, y, temperature=0), "temperature must be > 0, got 0"),
        (lambda s, t, y: kd_loss(s, t, y, temperature=-1.5), "temperature must be > 0, got -1.5"),
        (lambda s, t, y: dkd_loss(s, t, y, temperature=float("nan")), "temperature must be > 0"),
        (lambda s, t, y: kd_loss(s, t[:, :-1], y), r"teacher vocabulary size \(12\) differs from the student's \(13\)"),
        (lambda s, t, y: kd_loss(s, t, y[:-1]), r"labels shape \(22,\) must equal"),
        (lambda s, t, y: kd_loss(s, t, y.float()), "labels must be an integer tensor"),
        (lambda s, t, y: kd_loss(s, t, y.clone().fill_(13)), r"label 13 is outside \[0, 13\)"),
        (lambda s, t, y: label_smoothed_cross_entropy(s, y.clone().fill_(-5)), r"label -5 is outside \[0, 13\)"),
        (lambda s, t, y: kd_loss(s, t, y, divergence="kl"), "divergence must be one of 'forward_kl', 'reverse_kl', 'jsd', got 'kl'"),
        (lambda s, t, y: kd_loss(s, t, y, divergence="jsd", jsd_beta=1.5), r"jsd_beta must be in \[0, 1\], got 1.5"),
        (lambda s, t, y: distillation_loss("distil", s, t, y), "loss name must be one of .* got 'distil'"),
        (lambda s, t, y: distillation_loss("kd", s, t, y, ce_weight=-1), "ce_weight must be a finite number >= 0, got -1"),
        (lambda s, t, y: distillation_loss("kd", s, t, y, kd_weight=-0.5), "kd_weight must be a finite number >= 0, got -0.5"),
        (lambda s, t, y: dkd_loss(s, t, y, alpha=-1), "alpha must be a finite number >= 0, got -1"),
        (lambda s, t, y: dkd_loss(s, t, y, beta=-2.0), "beta must be a finite number >= 0, got -2.0"),
        (lambda s, t, y: label_smoothed_cross_entropy(s, y, epsilon=1.0), r"epsilon \(label smoothing\) must be in \[0, 1\), got 1.0"),
        (lambda s, t, y: label_smoothed_cross_entropy(s, y, epsilon=-0.1), r"must be in \[0, 1\), got -0.1"),
        (lambda s, t, y: distillation_loss("kd", s, None, y), "loss 'kd' needs teacher_logits"),
        (lambda s, t, y: kd_loss(s, t, y, reduction="avg"), "reduction must be one of"),
        (lambda s, t, y: kd_loss(s, t, y, chunk_size=0), "chunk_size must be a positive int"),
        (lambda s, t, y: kd_loss(s.long(), t, y), "student_logits must be float16, bfloat16, float32 or float64"),
        (lambda s, t, y: dkd_loss(s[:, :1], t[:, :1], y.clamp(max=0)), "at least 2 classes"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    s, t, y = make_inputs()
    with pytest.raises(ValueError, match=message):
        call(s.detach(), t, y)


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_second_backward_through_a_retained_graph_gives_the_same_gradient(name):
    s, t, y = make_inputs()
    loss = ALL_LOSSES[name](s, t, y).loss
    first = torch.autograd.grad(2.0 * loss, s, retain_graph=True)[0]
    second = torch.autograd.grad(2.0 * loss, s)[0]
    torch.testing.assert_close(first, second)


def test_bf16_gradient_is_scaled_in_float32():
    s, t, y = make_inputs(n=64, v=50, dtype=torch.bfloat16)
    g = grad_of(kd_loss(s, t, y).loss * 3.0, s)
    s32 = s.detach().float().requires_grad_()
    ref = grad_of(kd_loss(s32, t.float(), y).loss * 3.0, s32)
    torch.testing.assert_close(g.float(), ref, rtol=1e-2, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The fused gold + forward-KL path of distillation_loss ("kd", "ban") equals its two terms computed apart.


@pytest.mark.parametrize("sparse_k", [None, 4, 13])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_fused_gold_and_forward_kl_equals_the_separate_terms(sparse_k, temperature, epsilon):
    from seqkd.losses import SparseTeacher

    s, t, y = make_inputs()
    teacher = t
    if sparse_k is not None:
        values, ids = torch.log_softmax(t, -1).topk(sparse_k, -1)
        teacher = SparseTeacher(ids, values, t.shape[-1])
    fused = distillation_loss("ban", s, teacher, y, ce_weight=0.3, kd_weight=1.7, label_smoothing=epsilon,
                              temperature=temperature, num_items_in_batch=40, chunk_size=5)  # fmt: skip
    gold = label_smoothed_cross_entropy(s, y, epsilon=epsilon, num_items_in_batch=40)
    kd = kd_loss(s, teacher, y, temperature=temperature, num_items_in_batch=40)
    torch.testing.assert_close(fused.loss, 0.3 * gold.loss + 1.7 * kd.loss)
    torch.testing.assert_close(fused.parts["ce"], gold.loss)
    torch.testing.assert_close(fused.parts["kd"], kd.loss)
    assert ("nll" in fused.parts) == (epsilon > 0)
    torch.testing.assert_close(grad_of(fused.loss, s), grad_of(0.3 * gold.loss + 1.7 * kd.loss, s))
    assert torch.autograd.gradcheck(
        lambda x: distillation_loss("kd", x, teacher, y, ce_weight=0.3, label_smoothing=epsilon,
                                    temperature=temperature).loss, (s,)  # fmt: skip
    )


def test_a_registered_distillation_term_is_a_loss_of_its_own():
    from seqkd.errors import InvalidValueError

    from seqkd.losses import DISTILLATION_TERMS, distillation_loss, kd_loss, loss_names, register_distillation_term

    @register_distillation_term("half_kd", part="half")
    def half_kd(student_logits, teacher_logits, labels, options, **common):
        full = kd_loss(student_logits, teacher_logits, labels, temperature=options["temperature"], **common)
        return type(full)(loss=0.5 * full.loss, parts={})

    try:
        assert "half_kd" in loss_names()
        torch.manual_seed(0)
        student, teacher, labels = torch.randn(6, 11), torch.randn(6, 11), torch.randint(0, 11, (6,))
        result = distillation_loss("half_kd", student, teacher, labels, ce_weight=0.0)
        expected = 0.5 * kd_loss(student, teacher, labels).loss
        torch.testing.assert_close(result.loss, expected)
        assert set(result.parts) == {"half"}
        with pytest.raises(InvalidValueError, match="registered already"):
            register_distillation_term("kd")
    finally:
        DISTILLATION_TERMS.pop("half_kd")
    with pytest.raises(InvalidValueError, match="loss name"):
        distillation_loss("half_kd", student, teacher, labels)


def test_losses_accept_a_teacher_run_under_inference_mode():
    # bench_distill_step.py --breakdown times a teacher under inference_mode: its logits must serve as a target.
    torch.manual_seed(0)
    student = torch.randn(2, 3, 11, requires_grad=True)
    teacher = torch.randn(2, 3, 11)
    with torch.inference_mode():
        inference_teacher = teacher.clone()
    labels = torch.randint(0, 11, (2, 3))
    for name in ("ban", "dkd"):
        results = []
        for target in (teacher, inference_teacher):
            loss = distillation_loss(name, student, target, labels).loss
            (grad,) = torch.autograd.grad(loss, student)
            results.append((loss.detach(), grad))
        # Same values through the same kernels; the tolerance only covers a different allocation of the copy.
        torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)
