#!/usr/bin/env python
"""bf16 autocast against float32: training speed and the validation metric it reaches, recipe by recipe.

Each configuration is trained with ``seqkd train`` / ``seqkd distill`` for ``--steps`` optimiser steps in float32
and with ``--bf16 true`` (CPU autocast on a machine without a GPU; the losses stay in float32), once per seed in
``--seeds``; a distilled configuration also trains a float32 student from a teacher cast to bfloat16
(``--teacher_dtype bfloat16``, the cheaper online teacher of scripts/bench_distill_step.py). It prints a markdown
table: seconds per step (the trainer's ``train_runtime`` / steps, median over seeds), the speed-up over float32, and
the validation metric of each precision as mean +- standard deviation over the seeds. The seeds' spread is the
noise: a precision holds quality when its mean is within that spread of float32's.

    python scripts/bench_bf16.py --data_dir ../shared/data
    python scripts/bench_bf16.py --configs lstm-medium --steps 300 --seeds 1,2,3
    python scripts/bench_bf16.py --configs student --teacher runs/multi30k/teacher-ce/model
    python scripts/bench_bf16.py --configs lstm-small,lstm-student --lm_teacher runs/ban_lstm_ptb_small/gen-0/model

Configurations:

- ``lstm-medium``  the 2 x 650 LSTM LM of recipes/ban_lstm_ptb_medium.yaml on PTB (validation perplexity);
- ``lstm-small``   the 2 x 200 LSTM LM of recipes/ban_lstm_ptb_small.yaml, the CPU recipe (validation perplexity);
- ``lstm-student`` that 2 x 200 LSTM distilled Born-Again style (ban: CE + KD) from ``--lm_teacher`` on PTB;
- ``mt-teacher``   the 3 + 3 x 256 Transformer of recipes/ce_teacher_multi30k.yaml (validation perplexity);
- ``student``      transformer-2x2-128 distilled (kd) from ``--teacher`` on Multi30k (validation perplexity).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile

import torch

import seqkd.trainer
from seqkd.cli import command_train
from seqkd.hardware import cpu_has_native_bf16, cpu_name

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPES = os.path.join(HERE, "..", "recipes")
QUIET = ["--disable_tqdm", "true", "--report_to", "none", "--save_strategy", "no", "--eval_strategy", "no",
         "--logging_steps", "100000"]  # fmt: skip


# The teacher recipe stops early on validation BLEU; a timed run of fixed length evaluates only at its end.
FIXED_STEPS = ("--early_stopping_patience", "0", "--eval_strategy", "no")


def config_argv(name: str, options) -> tuple[list[str], bool]:
    """The command line of a configuration and whether it distils."""
    if name == "lstm-medium":
        # A constant learning rate: the plateau schedule needs evaluations, which would be timed too.
        return [os.path.join(RECIPES, "ban_lstm_ptb_medium.yaml"), "--loss", "ce", "--eval_splits", "validation",
                "--lr_scheduler_type", "constant",
                "--max_eval_tokens", str(options.max_eval_tokens)], False  # fmt: skip
    if name in ("lstm-small", "lstm-student"):
        argv = [os.path.join(RECIPES, "ban_lstm_ptb_small.yaml"), "--eval_splits", "validation",
                "--lr_scheduler_type", "constant", "--max_eval_tokens", str(options.max_eval_tokens)]  # fmt: skip
        if name == "lstm-small":
            return [*argv, "--loss", "ce"], False
        if not options.lm_teacher:
            raise SystemExit("the lstm-student configuration needs --lm_teacher (a trained PTB LSTM folder)")
        return [*argv, "--loss", "ban", "--teacher_model_name_or_path", options.lm_teacher], True
    if name == "mt-teacher":
        return [os.path.join(RECIPES, "ce_teacher_multi30k.yaml"), "--eval_splits", "validation",
                *FIXED_STEPS, "--predict_with_generate", "false"], False  # fmt: skip
    if name == "student":
        if not options.teacher:
            raise SystemExit("the student configuration needs --teacher (a trained Multi30k teacher folder)")
        return [os.path.join(RECIPES, "ce_teacher_multi30k.yaml"), "--model", "transformer-2x2-128", "--loss", "kd",
                "--ce_weight", "0.5", "--kd_weight", "0.5", "--learning_rate", "0.001", "--warmup_steps", "100",
                "--teacher_model_name_or_path", options.teacher, "--eval_splits", "validation", *FIXED_STEPS,
                "--predict_with_generate", "false"], True  # fmt: skip
    raise SystemExit(f"unknown configuration {name!r}: choose lstm-medium, lstm-small, lstm-student, mt-teacher or student")


PRECISIONS = {
    "fp32": ["--bf16", "false"],
    "bf16": ["--bf16", "true"],
    "bf16 teacher": ["--bf16", "false", "--teacher_dtype", "bfloat16"],  # distilled configurations only
}


def precisions_of(distill: bool) -> list[str]:
    return list(PRECISIONS) if distill else ["fp32", "bf16"]


def run(argv: list[str], distill: bool) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return command_train(argv, distill=distill)


def mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="lstm-medium,mt-teacher", help="Comma-separated configurations.")
    parser.add_argument("--steps", type=int, default=300, help="Optimiser steps per run.")
    parser.add_argument("--seeds", default="1,2", help="Comma-separated seeds: their spread is the noise.")
    parser.add_argument("--data_dir", default=None, help="Data folder (default $SEQKD_DATA_DIR).")
    parser.add_argument("--teacher", default=None, help="The student configuration's teacher.")
    parser.add_argument("--lm_teacher", default=None, help="The lstm-student configuration's teacher (a PTB LSTM).")
    parser.add_argument("--max_eval_tokens", type=int, default=20_000, help="LSTM configurations: validation tokens scored.")
    parser.add_argument("--bf16_attention", choices=("auto", "flash"), default="auto",
                        help="auto: seqkd's choice (the math kernel for batches up to 128 positions under bf16 on CPU); "
                             "flash: torch's default kernel, to measure what that choice is worth.")  # fmt: skip
    options = parser.parse_args(argv)
    if options.bf16_attention == "flash":
        seqkd.trainer._CPU_BF16_MATH_ATTENTION_MAX_LENGTH = 0
    seeds = [int(s) for s in options.seeds.split(",")]
    if options.steps < 1 or not seeds:
        parser.error("--steps must be >= 1 and --seeds non-empty")
    rows = []
    for name in options.configs.split(","):
        base, distill = config_argv(name, options)
        results: dict[str, list[dict]] = {precision: [] for precision in precisions_of(distill)}
        for seed in seeds:
            for precision in results:
                out = tempfile.mkdtemp(prefix=f"bench_bf16_{name}_{precision.replace(' ', '_')}_")
                argv = [*base, *QUIET, "--max_steps", str(options.steps), "--seed", str(seed), "--output_dir", out,
                        *PRECISIONS[precision]]  # fmt: skip
                if options.data_dir:
                    argv += ["--data_dir", options.data_dir]
                metrics = run(argv, distill)
                results[precision].append(metrics)
                print(f"{name} {precision} seed {seed}: {metrics['train_runtime_s'] / options.steps:.3f} s/step, "
                      f"validation perplexity {metrics['validation_perplexity']:.2f}", file=sys.stderr, flush=True)  # fmt: skip
        step = {p: statistics.median(m["train_runtime_s"] / options.steps for m in runs) for p, runs in results.items()}
        perplexity = {p: [m["validation_perplexity"] for m in runs] for p, runs in results.items()}
        for precision in results:
            rows.append((name, precision, step[precision], step["fp32"] / step[precision], mean_sd(perplexity[precision]),
                         statistics.mean(perplexity[precision]) - statistics.mean(perplexity["fp32"])))  # fmt: skip
    print(f"\nbf16 attention kernel: {options.bf16_attention}")
    print(f"machine: {cpu_name()} (bf16 instructions: {'yes' if cpu_has_native_bf16() else 'no, emulated'}), "
          f"{os.cpu_count()} cores; torch {torch.__version__}; {options.steps} steps; seeds {seeds}\n")
    print("| configuration | precision | s/step | speed-up over fp32 | validation perplexity | - fp32 |")
    print("|---|---|---|---|---|---|")
    for name, precision, seconds, speedup, ppl, delta in rows:
        print(f"| {name} | {precision} | {seconds:.3f} | {speedup:.2f}x | {ppl} | {delta:+.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
