#!/usr/bin/env python
"""Training throughput of seqkd's LSTMForCausalLM against a plain PyTorch LSTM LM.

Default: the Zaremba et al. (2014) "medium" configuration (2 x 650 LSTM, bptt 35, batch 20,
vocabulary 10k, dropout 0.5) with tied embeddings, trained by truncated BPTT with SGD and gradient
clipping. Both models see the same random token stream, alternate step by step (the order flips
every step), and warm-up steps are excluded from the timings.

    flock /tmp/seqkd_heavy.lock python scripts/bench_lstm.py --steps 30
    python scripts/bench_lstm.py --device cuda --dtype bfloat16 --steps 200

``--dtype bfloat16|float16`` runs both models under ``torch.autocast`` (mixed precision).
Prints a markdown table (model, tokens/s, ms/step, ratio vs plain) and the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

import transformers
from seqkd.hardware import cpu_name
from seqkd.models import LSTMForCausalLM, LSTMLMConfig


class PlainLSTMLM(nn.Module):
    """The PyTorch word_language_model recipe: embedding -> dropout -> nn.LSTM -> dropout -> tied Linear."""

    def __init__(self, vocab_size: int, size: int, num_layers: int, dropout: float, tie: bool = True):
        super().__init__()
        self.encoder = nn.Embedding(vocab_size, size)
        self.drop = nn.Dropout(dropout)
        self.rnn = nn.LSTM(size, size, num_layers, dropout=dropout if num_layers > 1 else 0.0, batch_first=True)
        self.decoder = nn.Linear(size, vocab_size)
        if tie:
            self.decoder.weight = self.encoder.weight

    def forward(self, x, hidden=None):
        out, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return self.decoder(self.drop(out)), hidden


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_name()
    return (
        f"device: {device.type} ({name}); torch {torch.__version__}; transformers {transformers.__version__}; "
        f"threads: {torch.get_num_threads()}"
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--vocab-size", type=int, default=10000)
    parser.add_argument("--hidden-size", type=int, default=650)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--clip", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    autocast = (
        torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    )
    V, H, L, B, T = args.vocab_size, args.hidden_size, args.num_layers, args.batch_size, args.bptt

    torch.manual_seed(args.seed)
    config = LSTMLMConfig(
        vocab_size=V, embedding_size=H, hidden_size=H, num_layers=L, embedding_dropout=args.dropout,
        layer_dropout=args.dropout, output_dropout=args.dropout, tie_word_embeddings=True, init_range=0.05,
    )
    seqkd_model = LSTMForCausalLM(config).to(device).train()
    plain_model = PlainLSTMLM(V, H, L, args.dropout).to(device).train()
    with torch.no_grad():  # same weights (not needed for speed, but makes the sanity check below possible)
        plain_model.encoder.weight.copy_(seqkd_model.embeddings.weight)
        plain_model.decoder.bias.copy_(seqkd_model.lm_head.bias)
        for name, p in plain_model.rnn.named_parameters():
            p.copy_(getattr(seqkd_model.lstm, name))
    n_seqkd = sum(p.numel() for p in seqkd_model.parameters())
    n_plain = sum(p.numel() for p in plain_model.parameters())
    assert n_seqkd == n_plain, (n_seqkd, n_plain)

    # The same random token stream for both, read by truncated BPTT.
    total = args.warmup + args.steps
    stream = torch.randint(0, V, (B, total * T + 1), generator=torch.Generator().manual_seed(args.seed)).to(device)
    batches = [(stream[:, i * T : (i + 1) * T], stream[:, i * T + 1 : (i + 1) * T + 1]) for i in range(total)]

    # Sanity check: identical losses without dropout.
    seqkd_model.eval(), plain_model.eval()
    with torch.no_grad():
        x, y = batches[0]
        a = seqkd_model(input_ids=x, shift_labels=y).loss
        logits, _ = plain_model(x)
        b = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    seqkd_model.train(), plain_model.train()

    opt_seqkd = torch.optim.SGD(seqkd_model.parameters(), lr=args.lr)
    opt_plain = torch.optim.SGD(plain_model.parameters(), lr=args.lr)
    states = {"seqkd": None, "plain": None}

    def step_seqkd(x, y):
        with autocast:
            out = seqkd_model(input_ids=x, state=states["seqkd"], shift_labels=y)
        opt_seqkd.zero_grad(set_to_none=True)
        out.loss.backward()
        nn.utils.clip_grad_norm_(seqkd_model.parameters(), args.clip)
        opt_seqkd.step()
        states["seqkd"] = tuple(s.detach() for s in out.state)

    def step_plain(x, y):
        with autocast:
            logits, hidden = plain_model(x, states["plain"])
            loss = F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1))
        opt_plain.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(plain_model.parameters(), args.clip)
        opt_plain.step()
        states["plain"] = tuple(s.detach() for s in hidden)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    runners = {"seqkd": step_seqkd, "plain": step_plain}
    times: dict[str, list[float]] = {"seqkd": [], "plain": []}
    for i, (x, y) in enumerate(batches):
        order = ("seqkd", "plain") if i % 2 == 0 else ("plain", "seqkd")
        for name in order:
            sync()
            start = time.perf_counter()
            runners[name](x, y)
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)

    tokens_per_step = B * T
    rates = {name: tokens_per_step * len(t) / sum(t) for name, t in times.items()}
    rows = [
        ("plain PyTorch (embedding + nn.LSTM + linear)", "plain"),
        ("seqkd LSTMForCausalLM", "seqkd"),
    ]
    print(
        f"\nZaremba-medium LM training: {L} x {H} LSTM, vocab {V}, batch {B}, bptt {T}, dropout {args.dropout}, "
        f"tied embeddings, SGD + clip {args.clip}, dtype {args.dtype}; {args.steps} timed steps per model "
        f"(+{args.warmup} warm-up), alternating.\n"
    )
    print("| model | tokens/s | median ms/step | ratio vs plain |")
    print("|---|---:|---:|---:|")
    for label, name in rows:
        median_ms = 1000 * statistics.median(times[name])
        print(f"| {label} | {rates[name]:,.0f} | {median_ms:.1f} | {rates[name] / rates['plain']:.3f} |")
    print(f"\n{machine_description(device)}")
    ratio = rates["seqkd"] / rates["plain"]
    median_ratio = statistics.median(times["plain"]) / statistics.median(times["seqkd"])
    print(f"seqkd/plain throughput ratio: {ratio:.3f} (from medians: {median_ratio:.3f})")
    return {"rates": rates, "ratio": ratio, "median_ratio": median_ratio}


if __name__ == "__main__":
    main()
