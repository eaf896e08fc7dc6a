"""Forward+backward time and peak memory of seqkd's losses against the naive PyTorch composition.

    python scripts/bench_losses.py                       # CPU, float32, the issue's three sizes
    python scripts/bench_losses.py --device cuda --dtype bf16 --sizes 8192x128000

Peak memory is the largest amount of tensor memory held above what the inputs already use, during one
forward+backward: on CUDA from ``torch.cuda.max_memory_allocated``, on CPU from the profiler's allocation
events (every tensor allocation and free, summed in order). Times are medians over ``--repeats`` runs after a
warm-up. Ratios are seqkd / naive, both measured in this run on this machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from seqkd.losses import dkd_loss, kd_loss, label_smoothed_cross_entropy

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


def naive_ls(student, teacher, labels):
    return F.cross_entropy(student.float(), labels, label_smoothing=0.1, ignore_index=-100)


CASES = {
    "kd": (lambda s, t, y: kd_loss(s, t, y, temperature=TEMPERATURE).loss, naive_kd),
    "dkd": (lambda s, t, y: dkd_loss(s, t, y, temperature=TEMPERATURE).loss, naive_dkd),
    "ls": (lambda s, t, y: label_smoothed_cross_entropy(s, y, epsilon=0.1).loss, naive_ls),
}


def forward_backward(loss_fn, student, teacher, labels):
    student.grad = None
    loss_fn(student, teacher, labels).backward()
    return student.grad


def peak_memory_bytes(loss_fn, student, teacher, labels, device) -> int:
    student.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward_backward(loss_fn, student, teacher, labels)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        forward_backward(loss_fn, student, teacher, labels)
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def median_time_ms(loss_fn, student, teacher, labels, device, repeats) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        forward_backward(loss_fn, student, teacher, labels)
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
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--sizes", default="4096x10000,4096x32000,8192x128000", help="comma-separated NxV")
    parser.add_argument("--losses", default="kd,dkd,ls", help=f"comma-separated, from {','.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    sizes = [tuple(int(x) for x in size.split("x")) for size in args.sizes.split(",")]
    losses = args.losses.split(",")
    for name in losses:
        if name not in CASES:
            parser.error(f"unknown loss {name!r}; choose from {', '.join(CASES)}")

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
            t_seqkd = median_time_ms(seqkd_fn, student, teacher, labels, device, args.repeats)
            m_seqkd = peak_memory_bytes(seqkd_fn, student, teacher, labels, device) / 2**20
            if needed_naive > budget:
                print(
                    f"| {name} | {n} | {v} | out of memory (needs ~{needed_naive / 2**30:.0f} GiB) | {t_seqkd:.0f} | "
                    f"| | {m_seqkd:.0f} | |",
                    flush=True,
                )
                continue
            t_naive = median_time_ms(naive_fn, student, teacher, labels, device, args.repeats)
            m_naive = peak_memory_bytes(naive_fn, student, teacher, labels, device) / 2**20
            print(
                f"| {name} | {n} | {v} | {t_naive:.0f} | {t_seqkd:.0f} | {t_seqkd / t_naive:.2f} | "
                f"{m_naive:.0f} | {m_seqkd:.0f} | {m_seqkd / m_naive:.2f} |",
                flush=True,
            )
        del student, teacher, labels


if __name__ == "__main__":
    main()
