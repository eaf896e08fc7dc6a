#!/usr/bin/env python
"""Teacher-cache size against k: bytes per cached token on disk, and the time to write the cache.

Writes one cache per k with ``seqkd cache-teacher`` (the recipe's data and batching, the given teacher) into a
temporary folder, prints a markdown table, and deletes the caches unless ``--keep DIR`` is given::

    python scripts/bench_cache_size.py recipes/ban_lstm_ptb_small.yaml \\
        --teacher runs/ban_lstm_ptb_small/gen-0/model --data_dir ../shared/data --ks 1,8,16,32,64,128

Bytes per token count everything in the shards (ids, log-probabilities, residual, headers and, for LSTM
streams, the state stored at the end of each shard) divided by the cached positions.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
import time

from safetensors import safe_open

from seqkd.cli import command_cache_teacher


def mean_residual(cache_dir: str) -> float:
    """The teacher's mean probability mass outside its cached top k, over every cached position."""
    total, count = 0.0, 0
    with open(os.path.join(cache_dir, "manifest.json")) as f:
        shards = json.load(f)["shards"]
    for shard in shards:
        with safe_open(os.path.join(cache_dir, shard["file"]), framework="pt") as f:
            residual = f.get_tensor("residual").double()
        total, count = total + residual.sum().item(), count + residual.numel()
    return total / max(count, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="The distillation recipe whose training data the cache covers.")
    parser.add_argument("--teacher", required=True, help="The saved teacher model folder.")
    parser.add_argument("--data_dir", default=None, help="Data folder (default $SEQKD_DATA_DIR).")
    parser.add_argument("--ks", default="1,8,16,32,64,128", help="Comma-separated k values.")
    parser.add_argument("--dtype", default="float16", help="float16, bfloat16 or float32.")
    parser.add_argument("--keep", default=None, help="Keep the caches in DIR/k{K} instead of deleting them.")
    options = parser.parse_args(argv)
    ks = [int(k) for k in options.ks.split(",")]
    root = options.keep or tempfile.mkdtemp(prefix="cache_size_")
    rows = []
    for k in ks:
        cache_dir = os.path.join(root, f"k{k}")
        argv = [options.recipe, "--teacher_model_name_or_path", options.teacher, "--teacher_cache", cache_dir,
                "--cache_top_k", str(k), "--cache_dtype", options.dtype, "--disable_tqdm", "true",
                "--output_dir", os.path.join(root, "unused")]  # fmt: skip
        if options.data_dir:
            argv += ["--data_dir", options.data_dir]
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            summary = command_cache_teacher(argv)
        rows.append({**summary, "seconds": time.perf_counter() - started, "k": k,
                     "mean_residual": mean_residual(cache_dir)})  # fmt: skip
        if not options.keep:
            shutil.rmtree(cache_dir)
    layout = rows[0]["layout"]
    print(f"\nteacher {options.teacher}; {layout['kind']} layout, {layout['rows']} x {layout['positions']} positions; "
          f"log-probabilities in {options.dtype}\n")  # fmt: skip
    print("| k | bytes/token | total MB | mean residual mass | write time (s) |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['k']} | {row['bytes_per_token']:.1f} | {row['bytes'] / 1e6:.1f} | {row['mean_residual']:.3f} | "
              f"{row['seconds']:.1f} |")  # fmt: skip
    print("\n" + json.dumps([{k: r[k] for k in ("k", "bytes_per_token", "bytes")} for r in rows]))
    if not options.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
