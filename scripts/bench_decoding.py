#!/usr/bin/env python
"""Decoding speed of a translation teacher against its student: sentences/s, greedy and beam 5, as a ratio.

Both models decode the same sources, batched and length-sorted as ``seqkd evaluate`` and ``seqkd distill-data``
do (``seqkd.evaluation.translate``). Models are saved folders (``runs/.../model``) or presets of
``seqkd.models.transformer`` built untrained with the recipe's tokenizer. An untrained model writes
hypotheses of arbitrary length, so by default every hypothesis is forced to exactly ``--length`` tokens
(``min_new_tokens = max_new_tokens``): the ratio is then the cost of decoding the same number of tokens, which
is what the architecture decides. ``--free_length`` lets trained models stop at their own EOS instead.

    python scripts/bench_decoding.py recipes/ls_teacher_multi30k.yaml --data_dir ../shared/data \\
        --teacher transformer-3x3-256 --student transformer-2x2-128 --sentences 500

``--student`` takes several models, all timed against the one teacher. ``--repeats N`` times every model N times,
the models interleaved within each round so that a slow spell of the machine falls on all of them; each row gives
the median and the range of its N speeds, and the ratio of medians.

Prints a markdown table (model, decoding, sentences/s, ratio student / teacher) and the machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import transformers

from seqkd.cli import parse_command_line
from seqkd.evaluation import translate
from seqkd.models import SEQ2SEQ_PRESETS, build_seq2seq
from seqkd.pipeline import build_translation_tokenizer, load_parallel_corpus, load_saved_model, teacher_tokenizer


def load(name: str, tokenizer):
    if name in SEQ2SEQ_PRESETS:
        torch.manual_seed(0)
        return build_seq2seq(name, tokenizer=tokenizer).eval()
    return load_saved_model(name).eval()


def sentences_per_second(model, tokenizer, sources, *, num_beams, length, free_length, batch_size) -> float:
    lengths = {"max_new_tokens": length} if free_length else {"max_new_tokens": length, "min_new_tokens": length}
    translate(model, tokenizer, sources[:batch_size], num_beams=num_beams, batch_size=batch_size, show_progress=False,
              **lengths)  # warm-up  # fmt: skip
    started = time.perf_counter()
    translate(model, tokenizer, sources, num_beams=num_beams, batch_size=batch_size, show_progress=False, **lengths)
    return len(sources) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="a translation recipe: its data fields choose the corpus and the tokenizer")
    parser.add_argument("--teacher", required=True, help="a saved model folder or a seq2seq preset")
    parser.add_argument("--student", required=True, nargs="+", help="saved model folders or seq2seq presets")
    parser.add_argument("--split", default="test")
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--length", type=int, default=20, help="tokens per hypothesis (the cap with --free_length)")
    parser.add_argument("--free_length", action="store_true", help="let models stop at EOS (trained models)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--beams", default="1,5", help="comma-separated beam sizes")
    parser.add_argument("--repeats", type=int, default=1, help="timings of each model, interleaved; median reported")
    options, overrides = parser.parse_known_args()
    if options.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {options.repeats}")

    torch.set_grad_enabled(False)
    _, data_args, _, _ = parse_command_line("evaluate", [options.recipe, *overrides, "--output_dir", "runs/bench"])
    corpus = load_parallel_corpus(data_args)
    names = [options.teacher, *options.student]
    # A saved model decodes with the tokenizer saved beside it; a preset with the teacher's (or the recipe's).
    saved_tokenizers = [teacher_tokenizer(name) for name in names]
    tokenizer = saved_tokenizers[0] or build_translation_tokenizer(data_args, corpus)
    tokenizers = [saved or tokenizer for saved in saved_tokenizers]
    sources = [str(s) for s in corpus[options.split]["source"]][: options.sentences]
    models = [load(name, tokenizer) for name in names]
    roles = ["teacher", *["student"] * len(options.student)]
    rows = []
    for beams in (int(b) for b in options.beams.split(",")):
        speeds = [[] for _ in models]
        for _ in range(options.repeats):
            for timings, model, model_tokenizer in zip(speeds, models, tokenizers):
                speed = sentences_per_second(model, model_tokenizer, sources, num_beams=beams, length=options.length,
                                             free_length=options.free_length, batch_size=options.batch_size)  # fmt: skip
                timings.append(speed)
        medians = [statistics.median(timings) for timings in speeds]
        decoding = "greedy" if beams == 1 else f"beam {beams}"
        for role, name, model, timings, median in zip(roles, names, models, speeds, medians):
            parameters = sum(p.numel() for p in model.parameters())
            spread = f" ({min(timings):.1f}-{max(timings):.1f})" if len(timings) > 1 else ""
            rows.append(f"| {role}: {name} ({parameters / 1e6:.1f} M) | {decoding} | {median:.1f}{spread} | "
                        f"{median / medians[0]:.2f}x |")  # fmt: skip
    length = f"up to {options.length} tokens, own EOS" if options.free_length else f"exactly {options.length} tokens"
    timed = f"median (range) of {options.repeats} interleaved timings" if options.repeats > 1 else "one timing"
    print(f"{len(sources)} {options.split} sentences, batch {options.batch_size}, {length} per hypothesis, {timed}\n")
    print("| model | decoding | sentences/s | vs teacher |\n|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")  # fmt: skip


if __name__ == "__main__":
    main()
