"""Forward+backward time and peak memory of seqkd's losses against the naive PyTorch composition.

    python scripts/bench_losses.py                       # CPU, float32, the issue's three sizes
    python scripts/bench_losses.py --device cuda --dtype bf16 --sizes 8192x128000
    python scripts/bench_losses.py --head --head_sizes 4096x32000x1024,8192x128000x1024 --losses kd,dkd

``--head`` times the whole LM head and loss (projection + loss, forward + backward, gradients of the hidden
states and the weight) three ways: fused (``fused_linear_distillation_loss``, no ``[N, V]`` logits), the logits
path (``hidden @ W.T`` then ``distillation_loss``, the teacher's logits computed under no_grad) and naive
(``hidden @ W.T`` then the naive composition below). The teacher has the student's hidden size; the losses are
the distillation terms alone (``ce_weight=0``, as the naive compositions are).

Peak memory is the largest amount of tensor memory held above what the inputs already use, during one
forward+backward: on CUDA from ``torch.cuda.max_memory_allocated``, on CPU from the profiler's allocation
events (every tensor allocation and free, summed in order). Times are medians over ``--repeats`` runs after a
warm-up. Ratios are seqkd / naive, both measured in this run on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from seqkd.hardware import cpu_name
from seqkd.losses import (
    distillation_loss,
    dkd_loss,
    fused_linear_distillation_loss,
    kd_loss,
    label_smoothed_cross_entropy,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEMPERATURE = 2.0


def naive_kd(student, teacher, labels):
    log_p = F.log_softmax(student.float() / TEMPERATURE, dim=-1)
    log_q = F.log_softmax(teacher.float() / TEMPERATURE, dim=-1)
    per_token = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    mask = labels != -100
    return (per_token * mask).sum() / mask.sum() * TEMPERATURE**2


def naive_dkd(student, teacher, labels, alpha=1.0, beta=8.0):
    """The reference implementation's composition (mdistiller), with the exact non-target renormalisation."""
    student, teacher = student.float() / TEMPERATURE, teacher.float() / TEMPERATURE
    gt = F.one_hot(labels.clamp(min=0), student.shape[-1]).bool()
    p_s, p_t = F.softmax(student, -1), F.softmax(teacher, -1)
    b_s = torch.stack([(p_s * gt).sum(-1), (p_s * ~gt).sum(-1)], -1)
    b_t = torch.stack([(p_t * gt).sum(-1), (p_t * ~gt).sum(-1)], -1)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="none").sum(-1)
    log_hat_s = F.log_softmax(student.masked_fill(gt, float("-inf")), -1)
    log_hat_t = F.log_softmax(teacher.masked_fill(gt, float("-inf")), -1)
    nckd = (log_hat_t.exp() * (log_hat_t - log_hat_s.masked_fill(gt, 0.0))).nan_to_num().sum(-1)
    mask = labels != -100
    return ((alpha * tckd + beta * nckd) * mask).sum() / mask.sum() * TEMPERATURE**2


def naive_ban(student, teacher, labels):
    """Gold CE + forward KL at T = 1 (Born-Again BAN+L, the trainer's online loss), composed from F functions."""
    log_p = F.log_softmax(student.float(), dim=-1)
    log_q = F.log_softmax(teacher.float(), dim=-1)
    per_token = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    mask = labels != -100
    return F.nll_loss(log_p, labels, ignore_index=-100) + (per_token * mask).sum() / mask.sum()


def naive_ls(student, teacher, labels):
    return F.cross_entropy(student.float(), labels, label_smoothing=0.1, ignore_index=-100)


def naive_ce(student, teacher, labels):
    return F.cross_entropy(student.float(), labels, ignore_index=-100)


CASES = {
    "kd": (lambda s, t, y: kd_loss(s, t, y, temperature=TEMPERATURE).loss, naive_kd),
    "dkd": (lambda s, t, y: dkd_loss(s, t, y, temperature=TEMPERATURE).loss, naive_dkd),
    "ban": (lambda s, t, y: distillation_loss("ban", s, t, y).loss, naive_ban),
    "ls": (lambda s, t, y: label_smoothed_cross_entropy(s, y, epsilon=0.1).loss, naive_ls),
    "ce": (lambda s, t, y: label_smoothed_cross_entropy(s, y, epsilon=0.0).loss, naive_ce),
}


# --head: the loss names of distillation_loss for each case, with the distillation term alone.
HEAD_OPTIONS = {
    "kd": ("kd", {"ce_weight": 0.0, "temperature": TEMPERATURE}),
    "dkd": ("dkd", {"ce_weight": 0.0, "temperature": TEMPERATURE}),
    "ban": ("ban", {}),
    "ls": ("ls", {}),
    "ce": ("ce", {}),
}


def forward_backward(loss_fn, student, teacher, labels):
    student.grad = None
    loss_fn(student, teacher, labels).backward()
    return student.grad


def head_steps(name, hidden, weight, teacher_hidden, teacher_weight, labels):
    """One forward + backward of projection and loss each way: {"fused": step, "logits path": step, "naive": step}."""
    loss_name, options = HEAD_OPTIONS[name]
    naive_fn = CASES[name][1]

    def teacher_logits():
        with torch.no_grad():
            return teacher_hidden @ teacher_weight.T

    def fused():
        return fused_linear_distillation_loss(
            loss_name, hidden, weight, labels, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, **options
        ).loss

    def logits_path():
        return distillation_loss(loss_name, hidden @ weight.T, teacher_logits(), labels, **options).loss

    def naive():
        return naive_fn(hidden @ weight.T, teacher_logits(), labels)

    def step(loss_fn):
        def run():
            hidden.grad = weight.grad = None
            loss_fn().backward()

        return run

    return {"fused": step(fused), "logits path": step(logits_path), "naive": step(naive)}


def peak_memory_bytes(step, device) -> int:
    """Peak tensor memory above what is held before ``step()`` (one forward + backward) runs."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def median_time_ms(step, device, repeats) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[1:])


def available_bytes(device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def machine(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{cpu_name()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--sizes", default="4096x10000,4096x32000,8192x128000", help="comma-separated NxV")
    parser.add_argument("--losses", default="kd,dkd,ls", help=f"comma-separated, from {','.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--head", action="store_true", help="time the LM head + loss: fused, logits path, naive")
    parser.add_argument(
        "--head_sizes", default="4096x32000x1024,8192x128000x1024", help="with --head: comma-separated NxVxH"
    )
    args = parser.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    losses = args.losses.split(",")
    for name in losses:
        if name not in CASES:
            parser.error(f"unknown loss {name!r}; choose from {', '.join(CASES)}")
    if args.head:
        try:
            sizes = [tuple(int(x) for x in size.split("x")) for size in args.head_sizes.split(",")]
        except ValueError:
            sizes = []
        if not sizes or any(len(size) != 3 or min(size) < 1 for size in sizes):
            parser.error(f"--head_sizes must be comma-separated NxVxH (e.g. 4096x32000x1024), got {args.head_sizes!r}")
        bench_head(sizes, losses, device, dtype, args)
        return
    sizes = [tuple(int(x) for x in size.split("x")) for size in args.sizes.split(",")]

    print(f"machine: {machine(device)}; dtype {args.dtype}; temperature {TEMPERATURE}; median of {args.repeats}\n")
    print("| loss | N | V | naive ms | seqkd ms | time ratio | naive MiB | seqkd MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, v in sizes:
        logits_bytes = n * v * torch.finfo(dtype).bits // 8
        # Inputs and the gradient: three logits-sized tensors; the naive composition adds about eight
        # float32 logits-sized temporaries at its peak, seqkd a few chunks.
        needed_seqkd = 3 * logits_bytes + 2**30
        needed_naive = 3 * logits_bytes + 8 * n * v * 4
        budget = 0.9 * available_bytes(device)
        if needed_seqkd > budget:
            for name in losses:
                print(f"| {name} | {n} | {v} | skipped: needs ~{needed_seqkd / 2**30:.0f} GiB | | | | | |")
            continue
        generator = torch.Generator(device=device).manual_seed(0)
        student = torch.randn(n, v, device=device, generator=generator).to(dtype).requires_grad_()
        teacher = torch.randn(n, v, device=device, generator=generator).to(dtype)
        labels = torch.randint(0, v, (n,), device=device, generator=generator)
        labels[::17] = -100
        for name in losses:
            seqkd_fn, naive_fn = CASES[name]
            seqkd_step = lambda: forward_backward(seqkd_fn, student, teacher, labels)  # noqa: E731
            naive_step = lambda: forward_backward(naive_fn, student, teacher, labels)  # noqa: E731
            student.grad = None
            t_seqkd = median_time_ms(seqkd_step, device, args.repeats)
            student.grad = None
            m_seqkd = peak_memory_bytes(seqkd_step, device) / 2**20
            if needed_naive > budget:
                print(
                    f"| {name} | {n} | {v} | out of memory (needs ~{needed_naive / 2**30:.0f} GiB) | {t_seqkd:.0f} | "
                    f"| | {m_seqkd:.0f} | |",
                    flush=True,
                )
                continue
            student.grad = None
            t_naive = median_time_ms(naive_step, device, args.repeats)
            student.grad = None
            m_naive = peak_memory_bytes(naive_step, device) / 2**20
            print(
                f"| {name} | {n} | {v} | {t_naive:.0f} | {t_seqkd:.0f} | {t_seqkd / t_naive:.2f} | "
                f"{m_naive:.0f} | {m_seqkd:.0f} | {m_seqkd / m_naive:.2f} |",
                flush=True,
            )
        del student, teacher, labels


def bench_head(sizes, losses, device, dtype, args) -> None:
    print(
        f"machine: {machine(device)}; dtype {args.dtype}; temperature {TEMPERATURE}; median of {args.repeats}; "
        "projection + loss, forward + backward\n"
    )
    ways = ("fused", "logits path", "naive")
    print(
        "| loss | N | V | H | fused ms | logits path ms | naive ms | fused/logits time | fused/naive time | "
        "fused MiB | logits path MiB | naive MiB | fused/logits memory | fused/naive memory |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, v, h in sizes:
        element = torch.finfo(dtype).bits // 8
        logits_bytes = n * v * element
        heads_bytes = 2 * (n * h + v * h) * element  # student and teacher
        # Beyond the inputs and their gradients: the logits path holds the student's logits, their gradient and
        # the teacher's logits; naive adds about eight float32 logits-sized temporaries; fused a few blocks
        # and float32 copies of the weight and its gradient.
        needed = {
            "fused": 3 * heads_bytes + 4 * 2**27 + 2 * v * h * 4,
            "logits path": 3 * heads_bytes + 3 * logits_bytes + 2**30,
            "naive": 3 * heads_bytes + 3 * logits_bytes + 8 * n * v * 4,
        }
        budget = 0.9 * available_bytes(device)
        generator = torch.Generator(device=device).manual_seed(0)

        def draw(*shape, scale):
            return (scale * torch.randn(*shape, device=device, generator=generator)).to(dtype)

        # Scaled so that the logits have unit variance, as a trained head's roughly do.
        hidden = draw(n, h, scale=1.0).requires_grad_()
        weight = draw(v, h, scale=h**-0.5).requires_grad_()
        teacher_hidden, teacher_weight = draw(n, h, scale=1.0), draw(v, h, scale=h**-0.5)
        labels = torch.randint(0, v, (n,), device=device, generator=generator)
        labels[::17] = -100
        for name in losses:
            steps = head_steps(name, hidden, weight, teacher_hidden, teacher_weight, labels)
            ms, mib = {}, {}
            for way in ways:
                if needed[way] > budget:
                    ms[way] = mib[way] = None
                    continue
                ms[way] = median_time_ms(steps[way], device, args.repeats)
                hidden.grad = weight.grad = None
                mib[way] = peak_memory_bytes(steps[way], device) / 2**20
                hidden.grad = weight.grad = None

            def cell(table, way):
                if table[way] is None:
                    return f"skipped (needs ~{needed[way] / 2**30:.0f} GiB)"
                return f"{table[way]:.0f}"

            def ratio(table, other):
                if table["fused"] is None or table[other] is None:
                    return ""
                return f"{table['fused'] / table[other]:.2f}"

            print(
                f"| {name} | {n} | {v} | {h} | {' | '.join(cell(ms, w) for w in ways)} | {ratio(ms, 'logits path')} | "
                f"{ratio(ms, 'naive')} | {' | '.join(cell(mib, w) for w in ways)} | {ratio(mib, 'logits path')} | "
                f"{ratio(mib, 'naive')} |",
                flush=True,
            )
        del hidden, weight, teacher_hidden, teacher_weight, labels


if __name__ == "__main__":
    main()
