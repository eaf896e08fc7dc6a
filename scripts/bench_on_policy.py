#!/usr/bin/env python
"""What on-policy distillation (GKD) costs: step time against supervised KD, and the share spent generating.

For each model it times ``DistillationTrainer`` over the same batches, with a live teacher and the generalised
JSD (beta 0.5) as the loss:

- ``supervised kd``  ``lmbda 0``: the batch's own targets;
- ``lmbda 0.5``      half the batches' targets sampled by the student (drawn per batch);
- ``on-policy``      ``lmbda 1``: every batch's targets sampled by the student;
- ``seq_kd``         ``lmbda 0, seq_kd``: every batch's targets sampled by the teacher.

Models (random weights, so samples run until ``--max_new_tokens`` unless an end token is drawn; the table gives
the mean sampled length):

- ``transformer-2x2-128``  the Multi30k student taught by ``transformer-3x3-256``, on 64 random pairs of 8-20
  words per batch, vocabulary ``--vocab_size``;
- ``lstm-small``  the 2 x 200 LSTM taught by a same-size one, on prompt-completion lines (prompt 5 tokens,
  completions of 8-20 words), 20 lines per batch.

Every run takes ``--warmup + --steps`` optimiser steps; the time between the end of step ``warmup`` and the end of
the last step is measured, the median of ``--repeats`` interleaved runs is reported::

    python scripts/bench_on_policy.py
    python scripts/bench_on_policy.py --device cuda --steps 50
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile

import torch
import transformers
from bench_distill_step import StepClock, build_model, machine, translation_data

from seqkd.data.text import PromptCompletionCollator, prompt_completions, train_word_tokenizer
from seqkd.data.translation import translation_collator
from seqkd.models import LSTMForCausalLM, LSTMLMConfig
from seqkd.trainer import DistillationArguments, DistillationTrainer

MODES = {
    "supervised kd": {"lmbda": 0.0},
    "lmbda 0.5": {"lmbda": 0.5},
    "on-policy": {"lmbda": 1.0},
    "seq_kd": {"lmbda": 0.0, "seq_kd": True},
}


def lm_data(vocab_size: int, num_batches: int, batch: int = 20):
    rng = random.Random(0)
    words = [f"w{i}" for i in range(vocab_size - 2)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(13, 25))) for _ in range(batch * num_batches)]
    tokenizer = train_word_tokenizer([" ".join(words)])
    return prompt_completions(lines, tokenizer, 5), batch, tokenizer


def lstm_small(vocab_size: int, eos: int, seed: int):
    torch.manual_seed(seed)
    return LSTMForCausalLM(
        LSTMLMConfig(vocab_size=vocab_size, embedding_size=200, hidden_size=200, num_layers=2, embedding_dropout=0.0,
                     layer_dropout=0.0, output_dropout=0.0, tie_word_embeddings=True, eos_token_id=eos)
    )  # fmt: skip


class GenerationClock(StepClock):
    """Step ends, and the generation seconds the teacher signal had counted by then."""

    def __init__(self, signal):
        super().__init__()
        self.signal, self.generated = signal, []

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        self.generated.append(getattr(self.signal, "generation_seconds", 0.0))


def time_mode(fields, data, collator, build_student, teacher, args_common, warmup, steps):
    """Seconds per timed step, the share of them spent generating, and the mean sampled length (tokens)."""
    args = DistillationArguments(**args_common, **fields, max_steps=warmup + steps)
    trainer = DistillationTrainer(model=build_student(), args=args, teacher_model=teacher, train_dataset=data,
                                  data_collator=collator)  # fmt: skip
    signal = trainer.teacher_signal
    clock = GenerationClock(signal)
    trainer.add_callback(clock)
    lengths = []
    if signal.kind == "generated":
        take = signal.take

        def measured_take(inputs, model):
            taken_inputs, taken = take(inputs, model)
            if taken["source"] != "gold":
                lengths.append(float(taken_inputs["labels"].ne(-100).sum(1).float().mean()))
            return taken_inputs, taken

        signal.take = measured_take
    trainer.train()
    elapsed = clock.ends[-1] - clock.ends[warmup - 1]
    share = (clock.generated[-1] - clock.generated[warmup - 1]) / elapsed
    return elapsed / steps, share, (statistics.mean(lengths) if lengths else None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="transformer-2x2-128,lstm-small", help="Comma-separated: transformer-2x2-128, lstm-small.")
    parser.add_argument("--steps", type=int, default=10, help="Timed optimiser steps per run.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps before them.")
    parser.add_argument("--repeats", type=int, default=2, help="Runs per mode (interleaved); the median is reported.")
    parser.add_argument("--max_new_tokens", type=int, default=20, help="Longest sample (Multi30k targets average 15 tokens).")
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--device", default="cpu", help="cpu or cuda.")
    options = parser.parse_args(argv)
    if options.steps < 1 or options.warmup < 1 or options.repeats < 1 or options.max_new_tokens < 1:
        parser.error("--steps, --warmup, --repeats and --max_new_tokens must be >= 1")
    transformers.logging.set_verbosity_error()
    args_common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench_on_policy_"), report_to=[], disable_tqdm=True, save_strategy="no",
        logging_steps=10_000, optim="sgd", learning_rate=0.1, max_grad_norm=1.0, seed=0, lr_scheduler_type="constant",
        use_cpu=options.device == "cpu", dataloader_pin_memory=False, loss="kd", divergence="jsd", jsd_beta=0.5,
        ce_weight=0.0, gkd_max_new_tokens=options.max_new_tokens, remove_unused_columns=False,
    )  # fmt: skip
    num_batches = options.warmup + options.steps + 1
    rows = []
    for model_name in options.models.split(","):
        if model_name == "transformer-2x2-128":
            data, batch, _, tokenizer = translation_data(options.vocab_size, num_batches)
            teacher = build_model("transformer-3x3-256", options.vocab_size, seed=1, tokenizer=tokenizer)
            collator = translation_collator(tokenizer, teacher)

            def build_student():
                return build_model("transformer-2x2-128", options.vocab_size, seed=2, tokenizer=tokenizer)

        elif model_name == "lstm-small":
            data, batch, tokenizer = lm_data(options.vocab_size, num_batches)
            teacher = lstm_small(len(tokenizer), tokenizer.eos_token_id, seed=1)
            collator = PromptCompletionCollator(tokenizer.eos_token_id)

            def build_student():
                return lstm_small(len(tokenizer), tokenizer.eos_token_id, seed=2)

        else:
            parser.error(f"unknown model {model_name!r}: choose transformer-2x2-128 or lstm-small")
        teacher = teacher.to(options.device).eval()
        args_common["per_device_train_batch_size"] = batch
        results: dict[str, list[tuple]] = {mode: [] for mode in MODES}
        for _ in range(options.repeats):
            for mode, fields in MODES.items():
                results[mode].append(
                    time_mode(fields, data, collator, build_student, teacher, args_common, options.warmup, options.steps)
                )
        base = statistics.median(r[0] for r in results["supervised kd"])
        for mode, runs in results.items():
            seconds = statistics.median(r[0] for r in runs)
            lengths = [r[2] for r in runs if r[2] is not None]
            rows.append((model_name, mode, 1000 * seconds, seconds / base, statistics.median(r[1] for r in runs),
                         statistics.mean(lengths) if lengths else None, ", ".join(f"{1000 * r[0]:.0f}" for r in runs)))  # fmt: skip
    print(f"\nmachine: {machine(options.device)}; torch {torch.__version__}; transformers {transformers.__version__}")
    print(f"random weights and tokens, vocabulary {options.vocab_size}, max_new_tokens {options.max_new_tokens}; "
          f"{options.warmup} warm-up + {options.steps} timed steps; median of {options.repeats} interleaved runs\n")  # fmt: skip
    print("| model | mode | ms/step | time vs supervised kd | share generating | mean sampled tokens | runs (ms/step) |")
    print("|---|---|---|---|---|---|---|")
    for model_name, mode, ms, ratio, share, length, runs in rows:
        print(f"| {model_name} | {mode} | {ms:.1f} | {ratio:.3f} | {share:.3f} | "
              f"{'' if length is None else f'{length:.1f}'} | {runs} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
