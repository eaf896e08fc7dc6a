#!/usr/bin/env python
"""Training throughput of distillation: plain CE, a live teacher, and a teacher cache; and the trainer's overhead.

For each model it times, over the same batches of random tokens:

- ``plain loop``  a hand-written PyTorch loop (forward, cross-entropy, backward, clip, SGD; state carried);
- ``ce``          ``DistillationTrainer`` with ``loss=ce`` (no teacher);
- ``online``      ``DistillationTrainer`` distilling (``ban``: CE + KD) from a same-size teacher run at every step;
- ``online bf16 teacher``  the same with ``teacher_dtype=bfloat16`` (the teacher's weights cast, its logits
                  read by the loss in float32), the cheaper teacher a CPU with AMX or avx512_bf16 can run;
- ``cache``       the same loss from a teacher cache of that teacher (``--top_k``), written once beforehand.

Every run takes ``--warmup + --steps`` optimiser steps; the time between the end of step ``warmup`` and the end
of the last step is measured (data loading and cache reads included). Each mode runs ``--repeats`` times,
interleaved, and the median is reported, with the median of each repeat's ratio to the ``ce`` run beside it (slow
drifts of a shared machine cancel in those). ``--breakdown`` also times, outside the trainer and on one batch, the parts
of a step that online distillation adds (the teacher's forward pass under ``no_grad`` and under
``inference_mode``, and the distillation loss over the gold-only loss), as shares of the CE step, so that the
online / ce ratio can be read as "1 + what the teacher adds"::

    flock /tmp/seqkd_heavy.lock python scripts/bench_distill_step.py
    python scripts/bench_distill_step.py --device cuda --models lstm-medium,gpt2-small --steps 100
    python scripts/bench_distill_step.py --breakdown

Prints a markdown table (tokens/s, ms/step, time ratios against ``ce``, the trainer against the plain loop),
the cache's bytes per token, and the machine. Models:

- ``lstm-medium``  Zaremba et al.'s medium LSTM (2 x 650, tied, dropout 0.5), vocabulary 10k, batch 20 x bptt 35
  (stream batching, state carried);
- ``gpt2-small``   the ``gpt2-small-ptb`` preset (4 layers, d 256), vocabulary 10k, 32 blocks of 128 tokens;
- ``transformer-2x2-128``  the Multi30k student, taught by the ``transformer-3x3-256`` teacher (not a same-size one),
  on 64 random translation pairs of 8-20 words per batch with a word-level vocabulary of ``--vocab_size``
  (the plain loop is not timed for it; tokens/s counts 15 target tokens per pair, their mean with the end of sentence).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import datasets
import torch
import torch.nn.functional as F
import transformers
from transformers import TrainerCallback, default_data_collator

from seqkd.data.text import StreamBatches
from seqkd.evaluation import is_stateful
from seqkd.losses import distillation_loss
from seqkd.hardware import cpu_name
from seqkd.models import LSTMForCausalLM, LSTMLMConfig, build_causal_lm
from seqkd.teacher_cache import TeacherCache, cache_teacher
from seqkd.trainer import DistillationArguments, DistillationTrainer

MODES = ("plain loop", "ce", "online", "online bf16 teacher", "cache")
ONLINE_MODES = {"online": "float32", "online bf16 teacher": "bfloat16"}
# Translation students and the teacher that teaches them.
SEQ2SEQ_TEACHERS = {"transformer-2x2-128": "transformer-3x3-256"}


def build_model(name: str, vocab_size: int, seed: int, tokenizer=None):
    torch.manual_seed(seed)
    if name in SEQ2SEQ_TEACHERS or name in SEQ2SEQ_TEACHERS.values():
        from seqkd.models import build_seq2seq

        return build_seq2seq(name, tokenizer=tokenizer)
    if name == "lstm-medium":
        return LSTMForCausalLM(
            LSTMLMConfig(
                vocab_size=vocab_size, embedding_size=650, hidden_size=650, num_layers=2, embedding_dropout=0.5,
                layer_dropout=0.5, output_dropout=0.5, tie_word_embeddings=True, init_range=0.05,
            )
        )  # fmt: skip
    if name == "gpt2-small":
        return build_causal_lm("gpt2-small-ptb", vocab_size=vocab_size)
    raise ValueError(f"unknown model {name!r}: choose lstm-medium or gpt2-small")


def translation_data(vocab_size: int, num_batches: int, batch: int = 64):
    """Random word pairs, a joint tokenizer holding every word, and the tokenized training set."""
    import random

    from seqkd.data.translation import tokenize_translation, train_translation_tokenizer

    rng = random.Random(0)
    words = [f"w{i}" for i in range(vocab_size - 16)]

    def sentence():
        return " ".join(rng.choice(words) for _ in range(rng.randint(8, 20)))

    pairs = datasets.Dataset.from_dict(
        {"source": [sentence() for _ in range(batch * num_batches)], "target": [sentence() for _ in range(batch * num_batches)]}
    )
    vocabulary = datasets.Dataset.from_dict({"source": [" ".join(words)], "target": [" ".join(words)]})
    tokenizer = train_translation_tokenizer(vocabulary, vocab_size, pretokenized=True)
    train = tokenize_translation(datasets.DatasetDict({"train": pairs}), tokenizer, max_source_length=64,
                                 max_target_length=64)["train"]  # fmt: skip
    return train, batch, 15, tokenizer


def training_data(name: str, vocab_size: int, num_batches: int):
    generator = torch.Generator().manual_seed(0)
    if name == "lstm-medium":
        batch, seq_len = 20, 35
        ids = torch.randint(0, vocab_size, (batch * (num_batches * seq_len + 1),), generator=generator)
        return StreamBatches(ids, batch, seq_len), batch, seq_len
    batch, seq_len = 32, 128
    blocks = torch.randint(0, vocab_size, (batch * num_batches, seq_len), generator=generator)
    data = datasets.Dataset.from_dict({"input_ids": blocks.tolist(), "labels": blocks.tolist()})
    return data, batch, seq_len


class StepClock(TrainerCallback):
    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def time_trainer(model_name, mode, data, vocab_size, args_common, teacher, cache_dir, warmup, steps, tokenizer=None) -> float:
    fields = {"loss": "ce"} if mode == "ce" else {"loss": "ban"}
    if mode in ONLINE_MODES:
        fields["teacher_dtype"] = ONLINE_MODES[mode]
        # The trainer casts the teacher in place: the float32 modes after this one must keep theirs.
        teacher = copy.deepcopy(teacher)
    if mode == "cache":
        fields["teacher_cache"] = cache_dir
    args = DistillationArguments(**args_common, **fields, max_steps=warmup + steps)
    clock = StepClock()
    model = build_model(model_name, vocab_size, seed=2, tokenizer=tokenizer)
    if tokenizer is not None:
        from seqkd.data.translation import translation_collator

        collator = translation_collator(tokenizer, model)
    else:
        collator = None if isinstance(data, StreamBatches) else default_data_collator
    trainer = DistillationTrainer(
        model=model, args=args, train_dataset=data, teacher_model=teacher if mode in ONLINE_MODES else None,
        callbacks=[clock], data_collator=collator, processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    return (clock.ends[-1] - clock.ends[warmup - 1]) / steps


def time_plain_loop(model_name, data, vocab_size, device, warmup, steps) -> float:
    model = build_model(model_name, vocab_size, seed=2).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stateful = is_stateful(model)
    if isinstance(data, StreamBatches):
        batches = (data[i] for i in range(len(data)))
    else:
        loader = torch.utils.data.DataLoader(data.with_format("torch"), batch_size=32, shuffle=True)
        batches = iter(loader)
    state, ends = None, []
    for _ in range(warmup + steps):
        batch = next(batches)
        input_ids = batch["input_ids"].to(device)
        if "shift_labels" in batch:
            targets = batch["shift_labels"].to(device)
        else:
            targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100).to(device)
        if stateful:
            out = model(input_ids=input_ids, state=state)
            state = tuple(s.detach() for s in out.state)
        else:
            out = model(input_ids=input_ids)
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
    return (ends[-1] - ends[warmup - 1]) / steps


def _median_seconds(fn, device: str, repeats: int, warmup: int = 2) -> float:
    times = []
    for i in range(warmup + repeats):
        started = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def time_breakdown(model_name, data, vocab_size, device, repeats) -> dict[str, float]:
    """Seconds of the parts online distillation adds to a step, on one batch, outside the trainer.

    ``student ce``: the student's forward, the gold-only loss and the backward pass; ``student ban``: the same
    with the distillation loss against the teacher's logits (computed once beforehand); ``teacher``: the
    teacher's forward pass under ``no_grad`` and under ``inference_mode``; ``teacher bf16``: a bfloat16 copy of the
    teacher under ``no_grad``.
    """
    student = build_model(model_name, vocab_size, seed=2).to(device).train()
    teacher = build_model(model_name, vocab_size, seed=1).to(device).eval()
    batch = data[0] if isinstance(data, StreamBatches) else data.with_format("torch")[: 32]
    input_ids = batch["input_ids"].to(device)
    labels = torch.randint(0, vocab_size, input_ids.shape, generator=torch.Generator().manual_seed(0)).to(device)
    teacher_bf16 = copy.deepcopy(teacher).to(torch.bfloat16)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids).logits

    def student_step(name):
        logits = student(input_ids=input_ids).logits
        distillation_loss(name, logits, teacher_logits if name != "ce" else None, labels).loss.backward()
        student.zero_grad(set_to_none=True)

    def teacher_forward(context, model=teacher):
        with context():
            model(input_ids=input_ids)

    return {
        "student ce": _median_seconds(lambda: student_step("ce"), device, repeats),
        "student ban": _median_seconds(lambda: student_step("ban"), device, repeats),
        "teacher no_grad": _median_seconds(lambda: teacher_forward(torch.no_grad), device, repeats),
        "teacher inference_mode": _median_seconds(lambda: teacher_forward(torch.inference_mode), device, repeats),
        "teacher bf16": _median_seconds(lambda: teacher_forward(torch.no_grad, teacher_bf16), device, repeats),
    }


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="lstm-medium,gpt2-small", help="Comma-separated: lstm-medium, gpt2-small.")
    parser.add_argument("--steps", type=int, default=15, help="Timed optimiser steps per run.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps before them.")
    parser.add_argument("--repeats", type=int, default=2, help="Runs per mode (interleaved); the median is reported.")
    parser.add_argument("--modes", default=",".join(MODES), help=f"Comma-separated, from: {', '.join(MODES)}.")
    parser.add_argument("--top_k", type=int, default=64, help="Teacher log-probabilities per token in the cache.")
    parser.add_argument("--vocab_size", type=int, default=10_000)
    parser.add_argument("--device", default="cpu", help="cpu or cuda.")
    parser.add_argument("--breakdown", action="store_true",
                        help="Also time the teacher's forward pass and the distillation loss alone (language models).")
    options = parser.parse_args(argv)
    if options.steps < 1 or options.warmup < 1 or options.repeats < 1:
        parser.error("--steps, --warmup and --repeats must be >= 1")
    modes = [mode.strip() for mode in options.modes.split(",")]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or "ce" not in modes:
        parser.error(f"--modes must include ce and name only {', '.join(MODES)}; got {options.modes!r}")
    transformers.logging.set_verbosity_error()
    device = options.device
    args_common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench_distill_"), report_to=[], disable_tqdm=True, save_strategy="no",
        logging_steps=10_000, optim="sgd", learning_rate=0.1, max_grad_norm=1.0, seed=0, lr_scheduler_type="constant",
        per_device_train_batch_size=32, use_cpu=device == "cpu", dataloader_pin_memory=False,
    )  # fmt: skip
    rows, breakdown = [], []
    for model_name in options.models.split(","):
        tokenizer = None
        if model_name in SEQ2SEQ_TEACHERS:
            data, batch, seq_len, tokenizer = translation_data(options.vocab_size, options.warmup + options.steps + 1)
            teacher = build_model(SEQ2SEQ_TEACHERS[model_name], options.vocab_size, seed=1, tokenizer=tokenizer)
        else:
            data, batch, seq_len = training_data(model_name, options.vocab_size, options.warmup + options.steps + 1)
            teacher = build_model(model_name, options.vocab_size, seed=1)
        teacher = teacher.to(device).eval()
        args_common["per_device_train_batch_size"] = batch
        cache_dir = tempfile.mkdtemp(prefix="bench_cache_")
        started = time.perf_counter()
        cache_teacher(teacher, data, cache_dir, top_k=options.top_k, device=device, show_progress=False,
                      tokenizer=tokenizer)  # fmt: skip
        cache_seconds = time.perf_counter() - started
        bytes_per_token = TeacherCache(cache_dir).bytes_per_token
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(options.repeats):
            for mode in modes:
                if mode == "plain loop":
                    if tokenizer is not None:
                        continue
                    seconds = time_plain_loop(model_name, data, options.vocab_size, device, options.warmup, options.steps)
                else:
                    seconds = time_trainer(model_name, mode, data, options.vocab_size, args_common, teacher, cache_dir,
                                           options.warmup, options.steps, tokenizer=tokenizer)  # fmt: skip
                times[mode].append(seconds)
        times = {mode: values for mode, values in times.items() if values}
        median = {mode: statistics.median(values) for mode, values in times.items()}
        tokens = batch * seq_len
        for mode in median:
            # Each repeat's ratio to the ce run beside it: the machine's slow drifts (other tenants) cancel in it.
            paired = [t / ce for t, ce in zip(times[mode], times["ce"])]
            rows.append(
                {
                    "model": model_name, "mode": mode, "tokens/s": tokens / median[mode], "ms/step": 1000 * median[mode],
                    "time vs ce": median[mode] / median["ce"], "runs": ", ".join(f"{1000 * t:.0f}" for t in times[mode]),
                    "paired": statistics.median(paired), "paired range": (min(paired), max(paired)),
                }
            )  # fmt: skip
        if "plain loop" in median:
            rows.append({"model": model_name, "mode": "trainer vs plain loop (tokens/s)", "ratio": median["plain loop"] / median["ce"]})
        rows.append({"model": model_name, "mode": f"cache: k={options.top_k}, bytes/token", "ratio": bytes_per_token,
                     "note": f"written in {cache_seconds:.1f} s"})  # fmt: skip
        if options.breakdown and tokenizer is None and "online" in median:
            parts = time_breakdown(model_name, data, options.vocab_size, device, options.steps)
            step = median["ce"]
            teacher_share = parts["teacher no_grad"] / step
            loss_share = (parts["student ban"] - parts["student ce"]) / step
            breakdown.append({
                "model": model_name, "teacher": teacher_share, "teacher inference_mode": parts["teacher inference_mode"] / step,
                "loss": loss_share, "expected": 1 + teacher_share + loss_share, "measured": median["online"] / step,
                "teacher bf16": parts["teacher bf16"] / step,
                "expected bf16": 1 + parts["teacher bf16"] / step + loss_share,
                "measured bf16": median["online bf16 teacher"] / step if "online bf16 teacher" in median else float("nan"),
            })  # fmt: skip

    print(f"\nmachine: {machine(device)}; torch {torch.__version__}; transformers {transformers.__version__}")
    print(f"batches of random tokens, vocabulary {options.vocab_size}; {options.warmup} warm-up + {options.steps} timed "
          f"steps; median of {options.repeats} interleaved runs\n")  # fmt: skip
    print("| model | mode | tokens/s | ms/step | time vs ce | paired vs ce (median, range) | runs (ms/step) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "tokens/s" in row:
            low, high = row["paired range"]
            print(f"| {row['model']} | {row['mode']} | {row['tokens/s']:,.0f} | {row['ms/step']:.1f} | "
                  f"{row['time vs ce']:.3f} | {row['paired']:.3f} ({low:.3f}-{high:.3f}) | {row['runs']} |")  # fmt: skip
    print("\n| model | measure | value |\n|---|---|---|")
    for row in rows:
        if "ratio" in row:
            note = f" ({row['note']})" if row.get("note") else ""
            print(f"| {row['model']} | {row['mode']} | {row['ratio']:.3f}{note} |")
    if breakdown:
        print("\nWhat online distillation adds to a CE step (shares of the trainer's median ce step):\n")
        print("| model | teacher forward (no_grad) | teacher forward (inference_mode) | distillation loss over ce loss "
              "| 1 + teacher + loss | measured online / ce | bf16 teacher forward | 1 + bf16 teacher + loss "
              "| measured online bf16 teacher / ce |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in breakdown:
            print(f"| {row['model']} | {row['teacher']:.3f} | {row['teacher inference_mode']:.3f} | {row['loss']:.3f} | "
                  f"{row['expected']:.3f} | {row['measured']:.3f} | {row['teacher bf16']:.3f} | "
                  f"{row['expected bf16']:.3f} | {row['measured bf16']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
