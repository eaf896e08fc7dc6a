#!/usr/bin/env python
"""Scaled-dot-product attention on CPU: which kernel to use under bf16 autocast, by sequence length.

For each length it times forward + backward of ``F.scaled_dot_product_attention`` (the call transformers' Marian,
BART and GPT-2 make) with the flash kernel and with the math kernel, in float32 and under bf16 autocast, on the
Multi30k teacher's attention shape (8 heads of 32, batch 128 by default; causal like the decoder's self-attention).
It prints one markdown table: median milliseconds of each of the four, and each time as a ratio to float32 flash
(torch's default kernel) measured in the same run, and bf16 math against bf16 flash. seqkd's trainer picks the math kernel under bf16 on CPU for
batches up to ``_CPU_BF16_MATH_ATTENTION_MAX_LENGTH`` positions (seqkd/trainer.py); this table is its evidence.

    python scripts/bench_attention.py
    python scripts/bench_attention.py --lengths 16,32,64,128,256,512 --batch 128 --heads 8 --head_dim 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from seqkd.hardware import cpu_has_native_bf16, cpu_name

KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
CASES = [("fp32", "flash"), ("fp32", "math"), ("bf16", "flash"), ("bf16", "math")]


def time_case(precision: str, kernel: str, shape: tuple[int, int, int, int], repeats: int, causal: bool) -> float:
    """Median seconds of one forward + backward pass."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=generator, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, generator=generator)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with sdpa_kernel([KERNELS[kernel]]), autocast:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out.backward(grad.to(out.dtype))
        for tensor in (q, k, v):
            tensor.grad = None

    step()  # the first call pays for kernel selection and allocation
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="16,32,64,128,256,512", help="Comma-separated sequence lengths.")
    parser.add_argument("--batch", type=int, default=128, help="Sequences per batch (the teacher recipe's 128).")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7, help="Timed passes per case; the median is reported.")
    parser.add_argument("--no_causal", action="store_true", help="Time full (encoder) attention instead.")
    options = parser.parse_args(argv)
    lengths = [int(n) for n in options.lengths.split(",")]
    if min(lengths) < 1 or options.batch < 1 or options.heads < 1 or options.head_dim < 1 or options.repeats < 1:
        parser.error("--lengths, --batch, --heads, --head_dim and --repeats must be >= 1")
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} cores, bf16 instructions {cpu_has_native_bf16()}, AMX {amx}; torch "
          f"{torch.__version__}; {torch.get_num_threads()} threads; batch {options.batch} x {options.heads} heads x "
          f"{options.head_dim}; {'full' if options.no_causal else 'causal'}; forward + backward, median of "
          f"{options.repeats}\n")  # fmt: skip
    print("| length | " + " | ".join(f"{p} {k} ms" for p, k in CASES) + " | " +
          " | ".join(f"{p} {k} / fp32 flash" for p, k in CASES[1:]) + " | bf16 math / bf16 flash | fastest |")  # fmt: skip
    print("|---:|" + "---:|" * 2 * len(CASES) + "---|")
    for length in lengths:
        shape = (options.batch, options.heads, length, options.head_dim)
        ms = {case: 1000 * time_case(*case, shape, options.repeats, not options.no_causal) for case in CASES}
        base = ms[("fp32", "flash")]
        fastest = min(ms, key=ms.get)
        print(f"| {length} | " + " | ".join(f"{ms[c]:.1f}" for c in CASES) + " | " +
              " | ".join(f"{ms[c] / base:.2f}" for c in CASES[1:]) +
              f" | {ms[('bf16', 'math')] / ms[('bf16', 'flash')]:.2f} | {' '.join(fastest)} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
