"""A tiny distillation under `accelerate launch --multi_gpu --num_processes 2` on CPU (two gloo processes).

Two processes with 4 streams each see exactly the global batch of one process with 8 streams (the streams are
cut the same way and each process takes its own), and the loss is normalised over the tokens of all
processes, so the two runs must agree up to floating-point reduction order.
"""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

# Floating-point sums over two processes differ from one process' in the last bits; 20 SGD steps amplify it a
# little, far below any real difference in training (a wrong normalisation changes the result by > 1%).
RELATIVE_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cyclic_corpus_dir):
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate's launcher is not on PATH")
    root = tmp_path_factory.mktemp("dist")
    corpus = cyclic_corpus_dir
    recipe = root / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": "lstm", "dataset": str(corpus), "batching": "stream", "seq_len": 8,
                "model_config": {"embedding_size": 24, "hidden_size": 24, "num_layers": 1, "embedding_dropout": 0.0,
                                 "layer_dropout": 0.0, "output_dropout": 0.0},
                "optim": "sgd", "learning_rate": 5.0, "max_grad_norm": 0.5, "max_steps": 20, "logging_steps": 5,
                "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "seed": 7, "use_cpu": True,
            }
        )  # fmt: skip
    )
    return root, recipe


def _run(command, cwd):
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_two_process_distillation_matches_one_process(setup):
    root, recipe = setup
    teacher = root / "teacher"
    _run([sys.executable, "-m", "seqkd", "train", str(recipe), "--loss", "ce", "--per_device_train_batch_size", "8",
          "--per_device_eval_batch_size", "4", "--output_dir", str(teacher)], root)  # fmt: skip
    common = ["distill", str(recipe), "--loss", "kd", "--ce_weight", "0.5", "--kd_weight", "0.5",
              "--teacher_model_name_or_path", str(teacher / "model")]  # fmt: skip
    _run([sys.executable, "-m", "seqkd", *common, "--per_device_train_batch_size", "8",
          "--per_device_eval_batch_size", "4", "--output_dir", str(root / "single")], root)  # fmt: skip
    _run(
        ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "seqkd", *common, "--per_device_train_batch_size", "4",
         "--per_device_eval_batch_size", "2", "--output_dir", str(root / "double")],
        root,
    )  # fmt: skip
    single = json.loads((root / "single" / "model" / "metrics.json").read_text())
    double = json.loads((root / "double" / "model" / "metrics.json").read_text())
    assert single["world_size"] == 1 and double["world_size"] == 2
    for split in ("validation", "test"):
        assert double[f"{split}_perplexity"] == pytest.approx(single[f"{split}_perplexity"], rel=RELATIVE_TOLERANCE)
    assert double["train_loss"] == pytest.approx(single["train_loss"], rel=RELATIVE_TOLERANCE)


def test_two_processes_distilling_from_a_cache_match_one_process_with_the_live_teacher(setup):
    """Each process reads its own streams' rows of one cache written for two processes (k = V, float32)."""
    from transformers import AutoTokenizer

    root, recipe = setup
    teacher = root / "teacher-for-cache"
    _run([sys.executable, "-m", "seqkd", "train", str(recipe), "--loss", "ce", "--per_device_train_batch_size", "8",
          "--per_device_eval_batch_size", "4", "--output_dir", str(teacher)], root)  # fmt: skip
    vocab_size = len(AutoTokenizer.from_pretrained(teacher / "model"))
    cache = root / "cache"
    _run([sys.executable, "-m", "seqkd", "cache-teacher", str(recipe), "--teacher_model_name_or_path",
          str(teacher / "model"), "--teacher_cache", str(cache), "--per_device_train_batch_size", "4",
          "--cache_num_processes", "2", "--cache_top_k", str(vocab_size), "--cache_dtype", "float32"], root)  # fmt: skip
    common = ["distill", str(recipe), "--loss", "kd", "--ce_weight", "0.5", "--kd_weight", "0.5"]
    _run([sys.executable, "-m", "seqkd", *common, "--teacher_model_name_or_path", str(teacher / "model"),
          "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4",
          "--output_dir", str(root / "single-online")], root)  # fmt: skip
    _run(
        ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "seqkd", *common, "--teacher_cache", str(cache),
         "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "2",
         "--output_dir", str(root / "double-cached")],
        root,
    )  # fmt: skip
    single = json.loads((root / "single-online" / "model" / "metrics.json").read_text())
    double = json.loads((root / "double-cached" / "model" / "metrics.json").read_text())
    assert double["world_size"] == 2
    assert double["train_loss"] == pytest.approx(single["train_loss"], rel=RELATIVE_TOLERANCE)
    assert double["test_perplexity"] == pytest.approx(single["test_perplexity"], rel=RELATIVE_TOLERANCE)
