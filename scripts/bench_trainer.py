#!/usr/bin/env python
"""Whole-epoch throughput of ``seqkd train`` against a plain PyTorch training loop, on the same PTB files.

The plain loop is the pytorch/examples word_language_model recipe written out by hand: words plus ``<eos>``
per line, the training stream cut into ``batch`` columns, truncated BPTT with the hidden state carried and
detached, cross-entropy, gradient-norm clipping, SGD, and one pass over the validation split at the end of the
epoch. ``seqkd train`` runs the small Born-Again recipe (``recipes/ban_lstm_ptb_small.yaml``) with the same
model, batch, BPTT length, dropout, optimiser and evaluation, through the Trainer. Both times cover training
and the end-of-epoch validation (``train_runtime`` for seqkd), not start-up or data loading.

    python scripts/bench_trainer.py --data_dir ../shared/data                      # 2 x 200, one epoch each
    python scripts/bench_trainer.py --data_dir ../shared/data --size 650 --dropout 0.5 --max_steps 300

``--max_steps`` shortens the epoch (validation still runs once at the end); ``--repeats`` alternates the two
runs (plain, seqkd, seqkd, plain, ...) to even out drift of the machine. Prints a markdown table: tokens/s,
seconds, validation perplexity and the ratio of throughputs.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lstm import PlainLSTMLM, machine_description  # noqa: E402

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes", "ban_lstm_ptb_small.yaml")


def _ptb_dir(data_dir: str) -> str:
    for root in (data_dir, os.path.join(data_dir, "ptb")):
        if os.path.isfile(os.path.join(root, "ptb.train.txt")):
            return root
    raise SystemExit(f"no ptb.train.txt in {data_dir!r} or {os.path.join(data_dir, 'ptb')!r}: pass --data_dir")


def _columns(path: str, vocab: dict[str, int], batch_size: int) -> torch.Tensor:
    """The split as ``batch_size`` contiguous streams, ``[batch, length]`` (word_language_model's batchify)."""
    ids = []
    with open(path) as f:
        for line in f:
            for word in line.split() + ["<eos>"]:
                ids.append(vocab.setdefault(word, len(vocab)))
    ids = torch.tensor(ids, dtype=torch.long)
    length = ids.numel() // batch_size
    return ids[: length * batch_size].view(batch_size, length)


def run_plain(args, ptb: str) -> dict:
    torch.manual_seed(args.seed)
    vocab: dict[str, int] = {}
    train = _columns(os.path.join(ptb, "ptb.train.txt"), vocab, args.batch_size)
    valid = _columns(os.path.join(ptb, "ptb.valid.txt"), vocab, args.eval_batch_size)
    model = PlainLSTMLM(len(vocab), args.size, 2, args.dropout)
    nn.init.uniform_(model.encoder.weight, -0.1, 0.1)  # word_language_model's init (tied: the decoder too)
    nn.init.zeros_(model.decoder.bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    T = args.bptt
    starts = list(range(0, train.shape[1] - 1, T))
    if args.max_steps:
        starts = starts[: args.max_steps]
    tokens = 0
    began = time.perf_counter()
    model.train()
    hidden = None
    for i in starts:
        x, y = train[:, i : i + T], train[:, i + 1 : i + 1 + T]
        x = x[:, : y.shape[1]]
        logits, hidden = model(x, hidden)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        hidden = tuple(h.detach() for h in hidden)
        tokens += y.numel()
    model.eval()
    nll, count, hidden = 0.0, 0, None
    with torch.no_grad():
        for i in range(0, valid.shape[1] - 1, T):
            x, y = valid[:, i : i + T], valid[:, i + 1 : i + 1 + T]
            x = x[:, : y.shape[1]]
            logits, hidden = model(x, hidden)
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
            count += y.numel()
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "tokens": tokens, "steps": len(starts), "perplexity": math.exp(nll / count)}


def run_seqkd(args, data_dir: str) -> dict:
    from seqkd.cli import command_train

    model_config = (
        f'{{"embedding_size": {args.size}, "hidden_size": {args.size}, "num_layers": 2, "embedding_dropout": '
        f'{args.dropout}, "layer_dropout": {args.dropout}, "output_dropout": {args.dropout}, '
        f'"tie_word_embeddings": true, "init_range": 0.1}}'
    )
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as output:
        argv = [RECIPE, "--data_dir", data_dir, "--loss", "ce", "--model_config", model_config,
                "--seq_len", str(args.bptt), "--per_device_train_batch_size", str(args.batch_size),
                "--per_device_eval_batch_size", str(args.eval_batch_size), "--learning_rate", str(args.lr),
                "--max_grad_norm", str(args.clip), "--num_train_epochs", "1", "--eval_splits", "validation",
                "--eval_strategy", "epoch", "--save_strategy", "no", "--logging_steps", "200",
                "--disable_tqdm", "true", "--seed", str(args.seed), "--output_dir", output,
                "--bf16", "false"]  # fmt: skip  # the plain loop is float32; the recipe's bf16 auto would not be
        if args.max_steps:
            argv += ["--max_steps", str(args.max_steps)]
        metrics = command_train(argv, distill=False)
    return {"seconds": metrics["train_runtime_s"], "perplexity": metrics["validation_perplexity"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.environ.get("SEQKD_DATA_DIR", "../shared/data"),
                        help="folder holding ptb.{train,valid,test}.txt, or its parent (default: $SEQKD_DATA_DIR)")
    parser.add_argument("--size", type=int, default=200, help="embedding and hidden size of the 2-layer LSTM")
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--batch_size", type=int, default=20)
    parser.add_argument("--eval_batch_size", type=int, default=10)
    parser.add_argument("--lr", type=float, default=20.0)
    parser.add_argument("--clip", type=float, default=0.25)
    parser.add_argument("--max_steps", type=int, default=0, help="stop the epoch after this many steps (0: whole)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, alternating")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=1111)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ptb = _ptb_dir(args.data_dir)

    results: dict[str, list[dict]] = {"plain": [], "seqkd": []}
    runners = {"plain": lambda: run_plain(args, ptb), "seqkd": lambda: run_seqkd(args, args.data_dir)}
    for r in range(args.repeats):
        for name in ("plain", "seqkd") if r % 2 == 0 else ("seqkd", "plain"):
            results[name].append(runners[name]())
            print(f"[{name} run {r + 1}] {results[name][-1]}", flush=True)
    # Both read the same stream in the same steps: the plain loop's token count is the one both trained on.
    tokens = results["plain"][0]["tokens"]
    seconds = {name: statistics.median(run["seconds"] for run in runs) for name, runs in results.items()}
    rate = {name: tokens / s for name, s in seconds.items()}
    what = f"{args.max_steps} steps" if args.max_steps else "one epoch"
    print(f"\nPTB LM, 2 x {args.size} tied LSTM, dropout {args.dropout}, bptt {args.bptt}, batch {args.batch_size}, "
          f"SGD lr {args.lr} + clip {args.clip}: {what} + validation (batch {args.eval_batch_size}), "
          f"median of {args.repeats} run(s) each, alternating.\n")  # fmt: skip
    print("| training loop | seconds (train + validation) | train tokens/s | validation perplexity | throughput vs plain |")
    print("|---|---:|---:|---:|---:|")
    labels = {"plain": "plain PyTorch loop (word_language_model)", "seqkd": "`seqkd train` (Trainer)"}
    for name in ("plain", "seqkd"):
        ppl = statistics.median(run["perplexity"] for run in results[name])
        print(f"| {labels[name]} | {seconds[name]:.1f} | {rate[name]:,.0f} | {ppl:.1f} | {rate[name] / rate['plain']:.3f} |")
    print(f"\n{machine_description(torch.device('cpu'))}")
    ratio = rate["seqkd"] / rate["plain"]
    print(f"seqkd/plain throughput ratio: {ratio:.3f}")
    return {"ratio": ratio, "seconds": seconds, "results": results}


if __name__ == "__main__":
    main()
