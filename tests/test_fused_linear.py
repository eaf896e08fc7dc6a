"""fused_linear_distillation_loss against distillation_loss on the logits it never materialises.

The reference is the logits path on ``hidden @ weight.T + bias`` (the teacher's logits likewise, with no
gradient). Both run the same kernels on the same float32 logits; what differs is the projection (one fused
``addmm`` per block instead of a matmul and an add) and the order in which the weight's gradient is summed
(block by block instead of in one matmul). Each changes a value by a few float32 ulps, so losses, parts and
gradients are compared at ``rtol=1e-5, atol=1e-6``: a hundred ulps of headroom, and far below any real
difference (a wrong weight, mask, temperature or chunk boundary moves them by 1e-2 or more).
"""

import pytest
import torch

import seqkd.losses as losses
from seqkd.errors import InvalidValueError
from seqkd.losses import (
    DISTILLATION_TERMS,
    LossOutput,
    SparseTeacher,
    distillation_loss,
    fused_linear_distillation_loss,
    kd_loss,
    loss_names,
    register_distillation_term,
)

IGNORE = -100
N, H, H_T, V = 23, 6, 9, 13  # the teacher's hidden size differs from the student's
CHUNK = 5  # five chunks of the 23 tokens, the last one short
TOL = {"rtol": 1e-5, "atol": 1e-6}


def make_heads(n=N, h=H, h_t=H_T, v=V, seed=0, dtype=torch.float32, bias=True, ignore_every=4):
    g = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    heads = {
        "hidden": draw(n, h).requires_grad_(),
        "weight": draw(v, h, scale=1.5).requires_grad_(),
        "bias": draw(v).requires_grad_() if bias else None,
        "teacher_hidden": draw(n, h_t),
        "teacher_weight": draw(v, h_t, scale=1.5),
        "teacher_bias": draw(v) if bias else None,
    }
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = IGNORE
    return heads, labels


def student_inputs(heads):
    return [t for t in (heads["hidden"], heads["weight"], heads["bias"]) if t is not None and t.requires_grad]


def projected(hidden, weight, bias):
    logits = hidden @ weight.T
    return logits if bias is None else logits + bias


def teacher_logits(heads):
    with torch.no_grad():
        return projected(heads["teacher_hidden"], heads["teacher_weight"], heads["teacher_bias"])


def logits_path(name, heads, labels, teacher="dense", **options):
    student = projected(heads["hidden"], heads["weight"], heads["bias"])
    teacher = teacher_logits(heads) if teacher == "dense" else teacher
    return distillation_loss(name, student, teacher, labels, **options)


def fused_path(name, heads, labels, teacher="dense", **options):
    if teacher == "dense":
        teacher_args = {k: heads[k] for k in ("teacher_hidden", "teacher_weight", "teacher_bias")}
    else:
        teacher_args = {"teacher": teacher}
    return fused_linear_distillation_loss(
        name, heads["hidden"], heads["weight"], labels, student_bias=heads["bias"], **teacher_args, **options
    )


def grads(loss, heads):
    return torch.autograd.grad(loss, student_inputs(heads))


def assert_same(fused, ref, heads, tol=TOL, grad_scale=1.0):
    """``grad_scale``: how many times larger than a mean's the gradients' terms are (a sum over tokens), which
    scales the absolute rounding of both paths' gradients alike."""
    assert set(fused.parts) == set(ref.parts)
    torch.testing.assert_close(fused.loss, ref.loss, **tol)
    for key in ref.parts:
        torch.testing.assert_close(fused.parts[key], ref.parts[key], **tol)
        assert not fused.parts[key].requires_grad
    for got, want in zip(grads(fused.loss, heads), grads(ref.loss, heads), strict=True):
        torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * grad_scale)


def with_generators(name, options):
    """DKPP's options for one run: each path gets its own generator in the same state."""
    if name == "dkpp":
        return dict(options, generator=torch.Generator().manual_seed(3))
    return options


KD_DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0)]
CASES = [
    ("ce", {}),
    ("ce", {"label_smoothing": 0.1}),
    ("ls", {}),
    *[
        ("kd", {"divergence": divergence, "jsd_beta": jsd_beta, "temperature": temperature, "label_smoothing": eps})
        for divergence, jsd_beta in KD_DIVERGENCES
        for temperature in (1.0, 2.0)
        for eps in (0.0, 0.1)
    ],
    ("kd", {"ce_weight": 0.3, "kd_weight": 0.7, "temperature": 2.0}),
    ("kd", {"ce_weight": 0.0, "divergence": "jsd", "temperature": 2.0}),
    ("ban", {"temperature": 2.0, "label_smoothing": 0.1}),
    ("ban", {"ce_weight": 0.0}),
    ("dkd", {}),
    ("dkd", {"alpha": 0.7, "beta": 3.0, "temperature": 2.0, "ce_weight": 0.5, "label_smoothing": 0.1}),
    ("dkd", {"ce_weight": 0.0, "temperature": 1.0}),
    ("cwtm", {}),
    ("cwtm", {"ce_weight": 0.0, "temperature": 2.0}),
    ("dkpp", {}),
    ("dkpp", {"ce_weight": 0.0, "temperature": 2.0, "label_smoothing": 0.1}),
]


def case_id(case):
    name, options = case
    return "-".join([name, *(f"{k}={v}" for k, v in options.items())])


# ---------------------------------------------------------------------------------------------------------
# Values, parts and gradients equal the logits path's.


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_equals_the_logits_path(case, bias):
    name, options = case
    heads, labels = make_heads(bias=bias)
    options = dict(options, chunk_size=CHUNK, num_items_in_batch=40)
    fused = fused_path(name, heads, labels, **with_generators(name, options))
    ref = logits_path(name, heads, labels, **with_generators(name, options))
    assert_same(fused, ref, heads)


@pytest.mark.parametrize("name", loss_names())
@pytest.mark.parametrize(
    "reduction", [{}, {"reduction": "sum"}, {"num_items_in_batch": torch.tensor(31)}], ids=["mean", "sum", "tensor_items"]
)
def test_reductions_equal_the_logits_path(name, reduction):
    heads, labels = make_heads(seed=1)
    options = dict(reduction, chunk_size=CHUNK, temperature=2.0)
    fused = fused_path(name, heads, labels, **with_generators(name, options))
    ref = logits_path(name, heads, labels, **with_generators(name, options))
    # A sum over the tokens makes every gradient term (and its rounding) as many times a mean's; for DKD at T = 2,
    # beta = 8, the two paths then differ by up to 6.7e-6 (summation order) where the mean's differ by under 1e-6.
    counted = int((labels != IGNORE).sum())
    assert_same(fused, ref, heads, grad_scale=counted if reduction.get("reduction") == "sum" else 1.0)


def sparse_teacher(heads, k, tail="uniform"):
    values, ids = torch.log_softmax(teacher_logits(heads), -1).topk(k, -1)
    return SparseTeacher(ids, values, V, tail=tail)


@pytest.mark.parametrize("k", [4, V])
@pytest.mark.parametrize(
    "case",
    [
        ("kd", {"temperature": 1.0}),
        ("kd", {"temperature": 2.0, "label_smoothing": 0.1}),
        ("kd", {"ce_weight": 0.0, "temperature": 2.0}),
        ("kd", {"divergence": "reverse_kl", "temperature": 2.0}),
        ("kd", {"divergence": "jsd", "jsd_beta": 0.5}),
        ("dkd", {}),
        ("dkd", {"ce_weight": 0.0, "temperature": 1.0}),
        ("cwtm", {}),
    ],
    ids=case_id,
)
def test_sparse_teacher_equals_the_logits_path(case, k):
    name, options = case
    heads, labels = make_heads(seed=2)
    teacher = sparse_teacher(heads, k)
    options = dict(options, chunk_size=CHUNK, num_items_in_batch=40)
    assert_same(fused_path(name, heads, labels, teacher, **options), logits_path(name, heads, labels, teacher, **options), heads)


def test_sparse_teacher_with_the_students_tail_equals_the_logits_path():
    heads, labels = make_heads(seed=3)
    teacher = sparse_teacher(heads, 4, tail="student")
    for options in ({"label_smoothing": 0.1}, {"ce_weight": 0.0}):
        options = dict(options, chunk_size=CHUNK)
        fused = fused_path("ban", heads, labels, teacher, **options)
        assert_same(fused, logits_path("ban", heads, labels, teacher, **options), heads)


def test_teacher_logits_given_as_a_tensor_equal_the_logits_path():
    heads, labels = make_heads(seed=4)
    t = teacher_logits(heads)
    fused = fused_path("dkd", heads, labels, t, chunk_size=CHUNK)
    assert_same(fused, logits_path("dkd", heads, labels, t, chunk_size=CHUNK), heads)


@pytest.mark.parametrize("name", loss_names())
def test_automatic_blocks_of_several_chunks_equal_the_logits_path(name, monkeypatch):
    # Chunks of 4 tokens in blocks of 12: the blocks are 0-11 and 12-22, the chunks (and DKPP's seeds) those of
    # the logits path, which is run with the same chunk size.
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 4 * V)
    monkeypatch.setattr(losses, "_FUSED_BLOCK_ELEMENTS", 12 * V)
    heads, labels = make_heads(seed=5)
    options = {"temperature": 2.0, "label_smoothing": 0.1}
    fused = fused_path(name, heads, labels, **with_generators(name, options))
    ref = logits_path(name, heads, labels, **with_generators(name, options))
    assert_same(fused, ref, heads)


def test_leading_dimensions_equal_the_flat_tokens():
    heads, labels = make_heads(n=24, seed=6)
    shaped = dict(heads, hidden=heads["hidden"].detach().reshape(2, 3, 4, H).requires_grad_(),
                  teacher_hidden=heads["teacher_hidden"].reshape(2, 3, 4, H_T))  # fmt: skip
    fused = fused_path("dkd", shaped, labels.reshape(2, 3, 4), chunk_size=CHUNK)
    ref = logits_path("dkd", heads, labels, chunk_size=CHUNK)
    torch.testing.assert_close(fused.loss, ref.loss, **TOL)
    got, want = grads(fused.loss, shaped), grads(ref.loss, heads)
    assert got[0].shape == (2, 3, 4, H)
    for a, b in zip((got[0].reshape(-1, H), *got[1:]), want):
        torch.testing.assert_close(a, b, **TOL)


def test_dkpp_draws_what_the_logits_path_draws():
    heads, labels = make_heads(seed=7)
    # From a generator: the same permutation, and the generator left where the logits path leaves it.
    a, b = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    fused = fused_path("dkpp", heads, labels, generator=a, ce_weight=0.0)
    ref = logits_path("dkpp", heads, labels, generator=b, ce_weight=0.0)
    torch.testing.assert_close(fused.loss, ref.loss, **TOL)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
    # From torch's global generator: likewise.
    torch.manual_seed(12)
    fused = fused_path("dkpp", heads, labels, ce_weight=0.0)
    after_fused = torch.rand(3)
    torch.manual_seed(12)
    ref = logits_path("dkpp", heads, labels, ce_weight=0.0)
    torch.testing.assert_close(fused.loss, ref.loss, **TOL)
    assert torch.equal(after_fused, torch.rand(3))


def test_half_precision_heads_compute_in_float32():
    heads32, labels = make_heads(seed=8)
    heads16 = {k: None if t is None else t.detach().to(torch.bfloat16).requires_grad_(t.requires_grad)
               for k, t in heads32.items()}  # fmt: skip
    # The reference is float32 on the same rounded values: what is left is the rounding of the gradients.
    rounded = {k: None if t is None else t.detach().float().requires_grad_(t.requires_grad) for k, t in heads16.items()}
    fused = fused_path("dkd", heads16, labels, chunk_size=CHUNK)
    ref = logits_path("dkd", rounded, labels, chunk_size=CHUNK)
    assert fused.loss.dtype == torch.float32
    torch.testing.assert_close(fused.loss, ref.loss, **TOL)
    for got, want in zip(grads(fused.loss, heads16), grads(ref.loss, rounded)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-5)


def test_autocast_does_not_lower_the_projection_to_half_precision():
    heads, labels = make_heads(seed=17)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fused_path("dkd", heads, labels, chunk_size=CHUNK)
    assert_same(fused, logits_path("dkd", heads, labels, chunk_size=CHUNK), heads)


# ---------------------------------------------------------------------------------------------------------
# Gradients: gradcheck, scaling, second backward, what needs no gradient.


@pytest.mark.parametrize(
    "name,options",
    [
        ("kd", {"divergence": "jsd", "jsd_beta": 0.3, "temperature": 2.0, "ce_weight": 0.4}),
        ("dkd", {"alpha": 0.7, "beta": 3.0, "temperature": 2.0}),
        ("ls", {}),
    ],
)
def test_gradcheck(name, options):
    heads, labels = make_heads(n=7, h=3, h_t=4, v=5, seed=9, dtype=torch.float64, ignore_every=3)

    def loss(hidden, weight, bias):
        return fused_linear_distillation_loss(
            name, hidden, weight, labels, student_bias=bias, teacher_hidden=heads["teacher_hidden"],
            teacher_weight=heads["teacher_weight"], teacher_bias=heads["teacher_bias"], chunk_size=3, **options,
        ).loss  # fmt: skip

    assert torch.autograd.gradcheck(loss, (heads["hidden"], heads["weight"], heads["bias"]))


def test_first_backward_scales_the_forward_gradients_and_a_second_recomputes(monkeypatch):
    heads, labels = make_heads(seed=10)
    passes = []
    real_pass = losses._fused_pass
    monkeypatch.setattr(losses, "_fused_pass", lambda *a, **k: passes.append(k["values"]) or real_pass(*a, **k))
    out = fused_path("dkd", heads, labels, chunk_size=CHUNK)
    first = torch.autograd.grad(-2.5 * out.loss, student_inputs(heads), retain_graph=True)
    assert passes == [True], "the first backward recomputed instead of scaling the stored gradients"
    second = torch.autograd.grad(-2.5 * out.loss, student_inputs(heads))
    assert passes == [True, False]
    ref = logits_path("dkd", heads, labels, chunk_size=CHUNK).loss
    for a, b, c in zip(first, second, grads(-2.5 * ref, heads)):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c, **TOL)


def test_bias_without_gradient_and_inputs_without_gradient():
    heads, labels = make_heads(seed=11)
    heads["bias"].requires_grad_(False)  # as Marian's final_logits_bias, a buffer
    assert_same(fused_path("kd", heads, labels, chunk_size=CHUNK), logits_path("kd", heads, labels, chunk_size=CHUNK), heads)
    with torch.no_grad():
        fused = fused_path("dkd", heads, labels, chunk_size=CHUNK)
        ref = logits_path("dkd", heads, labels, chunk_size=CHUNK)
    assert not fused.loss.requires_grad
    torch.testing.assert_close(fused.loss, ref.loss, **TOL)


def test_the_hidden_states_are_freed_without_the_garbage_collector():
    import gc
    import weakref

    heads, labels = make_heads(seed=16)
    heads["hidden"] = heads["hidden"] * 2.0  # a model's activation, which holds the model's graph
    alive = weakref.ref(heads["hidden"])
    gc.disable()
    try:
        fused_path("dkd", heads, labels, chunk_size=CHUNK).loss.backward()
        del heads
        assert alive() is None, "a reference cycle keeps the hidden states (and the model's graph) alive"
    finally:
        gc.enable()


def test_zero_weights_give_a_zero_loss_that_backpropagates():
    heads, labels = make_heads(seed=12)
    out = fused_path("kd", heads, labels, ce_weight=0.0, kd_weight=0.0)
    assert out.loss.item() == 0 and out.parts == {}
    assert all((g == 0).all() for g in grads(out.loss, heads))


def test_all_ignored_tokens_give_zero_loss_and_gradient():
    heads, labels = make_heads(seed=13)
    out = fused_path("dkd", heads, labels.fill_(IGNORE), chunk_size=CHUNK)
    assert out.loss.item() == 0 and all(p.item() == 0 for p in out.parts.values())
    assert all(torch.isfinite(g).all() and (g == 0).all() for g in grads(out.loss, heads))


# ---------------------------------------------------------------------------------------------------------
# Registered terms: fused through the same kernels, or refused; never computed differently.


def test_a_registered_term_that_is_not_linear_in_its_kernels_is_still_exact():
    @register_distillation_term("kd_squared", part="kd2")
    def kd_squared(student_logits, teacher_logits, labels, options, **common):
        kd = kd_loss(student_logits, teacher_logits, labels, temperature=options["temperature"], **common)
        return type(kd)(loss=kd.loss**2, parts={})

    try:
        heads, labels = make_heads(seed=14)
        options = {"chunk_size": CHUNK, "temperature": 2.0, "ce_weight": 0.5}
        assert_same(fused_path("kd_squared", heads, labels, **options), logits_path("kd_squared", heads, labels, **options), heads)
    finally:
        DISTILLATION_TERMS.pop("kd_squared")


def test_a_registered_term_that_computes_on_the_logits_itself_is_refused():
    @register_distillation_term("logsumexp_penalty")
    def penalty(student_logits, teacher_logits, labels, options, **common):
        return LossOutput(loss=student_logits.logsumexp(-1).mean())

    try:
        heads, labels = make_heads(seed=15)
        logits_path("logsumexp_penalty", heads, labels)  # the logits path computes it
        with pytest.raises(InvalidValueError, match="'logsumexp_penalty' computes on the student's logits itself"):
            fused_path("logsumexp_penalty", heads, labels)
    finally:
        DISTILLATION_TERMS.pop("logsumexp_penalty")


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line naming the value and the fix, before any work.


def fused_call(**changes):
    heads, labels = make_heads()
    args = {"name": "kd", "student_hidden": heads["hidden"], "student_weight": heads["weight"], "labels": labels,
            "student_bias": heads["bias"], "teacher_hidden": heads["teacher_hidden"],
            "teacher_weight": heads["teacher_weight"], "teacher_bias": heads["teacher_bias"]}  # fmt: skip
    args.update(changes)
    return lambda: fused_linear_distillation_loss(
        args.pop("name"), args.pop("student_hidden"), args.pop("student_weight"), args.pop("labels"), **args
    )


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"reduction": "none"}, "reduction 'none' cannot be fused.*use reduction 'mean' or 'sum', or the logits path"),
        ({"reduction": "avg"}, "reduction must be one of 'mean', 'sum', got 'avg'"),
        ({"student_weight": torch.randn(V, H + 1)}, r"student_weight has shape \(13, 7\).*hidden size 6.*not its transpose"),
        ({"student_weight": torch.randn(H, V)}, r"student_weight has shape \(6, 13\)"),
        ({"student_weight": torch.randn(V)}, "student_weight must be the LM head's weight"),
        ({"student_hidden": torch.randint(0, 3, (N, H))}, "student_hidden must be float16, bfloat16, float32 or float64"),
        ({"student_bias": torch.randn(V + 1)}, r"student_bias must have shape \(13,\).*got \(14,\)"),
        ({"teacher_weight": torch.randn(V + 2, H_T), "teacher_bias": None}, r"teacher vocabulary size \(15\) differs from the student's \(13\)"),
        ({"teacher_weight": torch.randn(V, H)}, r"teacher_weight has shape \(13, 6\).*teacher_hidden's hidden size 9"),
        ({"teacher_hidden": torch.randn(N - 1, H_T)}, r"teacher_hidden holds tokens of shape \(22,\) but student_hidden \(23,\)"),
        ({"teacher_weight": None, "teacher_bias": None}, "teacher_weight is missing"),
        ({"teacher_hidden": None}, "teacher_hidden is missing"),
        ({"teacher": torch.randn(N, V)}, "either as teacher_hidden and teacher_weight .* not both"),
        ({"teacher_hidden": None, "teacher_weight": None, "teacher_bias": None}, "loss 'kd' needs a teacher: pass teacher_hidden"),
        ({"teacher_hidden": None, "teacher_weight": None, "teacher_bias": None, "teacher": [1, 2]}, "teacher must be a SparseTeacher"),
        ({"labels": torch.zeros(N - 1, dtype=torch.long)}, r"labels shape \(22,\) must equal student_hidden's shape"),
        ({"labels": torch.full((N,), V)}, r"label 13 is outside \[0, 13\)"),
        ({"name": "distil"}, "loss name must be one of .* got 'distil'"),
        ({"temperature": 0}, "temperature must be > 0, got 0"),
        ({"chunk_size": 0}, "chunk_size must be a positive int"),
    ],
)
def test_bad_input_is_refused(changes, message):
    with pytest.raises(InvalidValueError, match=message):
        fused_call(**changes)()


def test_sparse_teacher_of_another_vocabulary_or_batch_is_refused():
    heads, labels = make_heads()
    no_dense = {"teacher_hidden": None, "teacher_weight": None, "teacher_bias": None}
    other_vocab = SparseTeacher(torch.zeros(N, 2, dtype=torch.long), torch.zeros(N, 2), V + 1)
    with pytest.raises(InvalidValueError, match=r"teacher vocabulary size \(14\)"):
        fused_call(**no_dense, teacher=other_vocab)()
    other_batch = SparseTeacher(torch.zeros(N + 1, 2, dtype=torch.long), torch.zeros(N + 1, 2), V)
    with pytest.raises(InvalidValueError, match=r"teacher holds tokens of shape \(24,\)"):
        fused_call(**no_dense, teacher=other_batch)()
