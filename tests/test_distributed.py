"""A tiny distillation under `accelerate launch --num_processes 2` on CPU (two gloo processes), with DDP and FSDP2.

Two processes with 4 streams each see exactly the global batch of one process with 8 streams (the streams are
cut the same way and each process takes its own), and the loss is normalised over the tokens of all
processes, so the two runs must agree up to floating-point reduction order.

Accelerate enables FSDP only on accelerator devices; the FSDP2 tests run through tests/fsdp_on_cpu.py, which marks
the CPU processes' state as FSDP (see there).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(command: list) -> list:
    # Accelerate's default port (29500) would collide with another test run on the same machine.
    if command[:2] == ["accelerate", "launch"]:
        command = [*command[:2], "--main_process_port", str(_free_port()), *command[2:]]
    return command


def _run(command, cwd, expect_success=True):
    result = subprocess.run(_launch(command), capture_output=True, text=True, cwd=cwd, timeout=600)
    if not expect_success:
        return result
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def single_run(setup):
    """A teacher, and the one-process distillation every two-process run is compared with."""
    root, recipe = setup
    teacher = root / "teacher"
    _run([sys.executable, "-m", "seqkd", "train", str(recipe), "--loss", "ce", "--per_device_train_batch_size", "8",
          "--per_device_eval_batch_size", "4", "--output_dir", str(teacher)], root)  # fmt: skip
    common = ["distill", str(recipe), "--loss", "kd", "--ce_weight", "0.5", "--kd_weight", "0.5",
              "--teacher_model_name_or_path", str(teacher / "model")]  # fmt: skip
    _run([sys.executable, "-m", "seqkd", *common, "--per_device_train_batch_size", "8",
          "--per_device_eval_batch_size", "4", "--output_dir", str(root / "single")], root)  # fmt: skip
    return common, root / "single"


def test_two_process_distillation_matches_one_process(setup, single_run):
    root, _ = setup
    common, _ = single_run
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


FSDP_ON_CPU = Path(__file__).with_name("fsdp_on_cpu.py")
# The launcher's FSDP2 defaults, spelled out, with the layer-wise wrapping policy: the teacher is then sharded in
# several units, and (cpu_ram_efficient_loading) the second process' copy of it is replaced by the first one's.
FSDP2_LAUNCH = [
    "accelerate", "launch", "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
    "--fsdp_reshard_after_forward", "true", "--fsdp_cpu_ram_efficient_loading", "true",
    "--fsdp_state_dict_type", "SHARDED_STATE_DICT", "--num_processes", "2", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no", str(FSDP_ON_CPU),
]  # fmt: skip
# The FSDP2 run's weights differ from the one-process run's by ~1e-7 (reduction order); distilling with kd_weight
# 0.49 instead of 0.5 moves every weight tensor by more than 1e-5, so these bounds tell a real difference apart.
WEIGHT_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def test_two_process_fsdp2_distillation_matches_one_process(setup, single_run):
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    root, _ = setup
    common, single_dir = single_run
    out = root / "fsdp2"
    # The launcher's SHARDED_STATE_DICT: checkpoints hold shards, the final model folder the gathered weights.
    _run([*FSDP2_LAUNCH, "-m", "seqkd", *common, "--per_device_train_batch_size", "4", "--per_device_eval_batch_size",
          "2", "--save_strategy", "steps", "--save_steps", "20", "--output_dir", str(out)], root)  # fmt: skip
    single = json.loads((single_dir / "model" / "metrics.json").read_text())
    fsdp = json.loads((out / "model" / "metrics.json").read_text())
    assert fsdp["world_size"] == 2
    assert fsdp["train_loss"] == pytest.approx(single["train_loss"], rel=RELATIVE_TOLERANCE)
    for split in ("validation", "test"):
        assert fsdp[f"{split}_perplexity"] == pytest.approx(single[f"{split}_perplexity"], rel=RELATIVE_TOLERANCE)
    sharded = out / "checkpoint-20" / "pytorch_model_fsdp_0"
    assert sharded.is_dir(), "no FSDP checkpoint: the run was not sharded"
    dcp_to_torch_save(sharded, root / "fsdp2-weights.pt")
    weights = torch.load(root / "fsdp2-weights.pt")["model"]
    expected = load_file(single_dir / "model" / "model.safetensors")
    assert expected
    final = load_file(out / "model" / "model.safetensors")
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, **WEIGHT_TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")
        torch.testing.assert_close(final[name], value, **WEIGHT_TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")


_FSDP2_TEACHER_PROBE = """
import json, sys
import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import default_data_collator
from seqkd.data.text import group_texts, train_word_tokenizer
from seqkd.models import LSTMForCausalLM, LSTMLMConfig, build_causal_lm
from seqkd.trainer import DistillationArguments, DistillationTrainer

corpus, output = sys.argv[1], sys.argv[2]
lines = open(corpus).read().splitlines()
tokenizer = train_word_tokenizer(lines)
torch.manual_seed(0)
teacher = LSTMForCausalLM(LSTMLMConfig(vocab_size=len(tokenizer), embedding_size=24, hidden_size=24, num_layers=1))
initial = {k: v.clone() for k, v in teacher.state_dict().items()}
student = build_causal_lm({"n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 16}, tokenizer=tokenizer)
args = DistillationArguments(
    output_dir=output + ".run", report_to=[], disable_tqdm=True, use_cpu=True, save_strategy="no", max_steps=4,
    per_device_train_batch_size=4, learning_rate=0.01, loss="kd",
)
trainer = DistillationTrainer(
    model=student, args=args, teacher_model=teacher, train_dataset=group_texts(lines, tokenizer, 8),
    data_collator=default_data_collator,
)
# fully_shard swaps a module's class for a subclass named FSDP<class>.
units = lambda model: sorted({type(m).__name__[4:] for m in model.modules() if isinstance(m, FSDPModule)})
report = {
    "fsdp2": trainer.accelerator.is_fsdp2,
    "teacher_units": units(trainer.teacher),
    "teacher_sharded_before": all(isinstance(p, DTensor) for p in trainer.teacher.parameters()),
    "teacher_among_models": any(m is trainer.teacher for m in trainer.accelerator._models),
}
trainer.train()
report["student_units"] = units(trainer.model)
# FSDP2 registers the sharded DTensors while resharded, the gathered tensors while not.
report["teacher_sharded_after"] = all(isinstance(p, DTensor) for p in trainer.teacher.parameters())
report["teacher_frozen"] = not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())
report["teacher_unchanged"] = all(
    torch.equal(v.full_tensor() if isinstance(v, DTensor) else v, initial[k])
    for k, v in trainer.teacher.state_dict().items()
)
if trainer.is_world_process_zero():
    open(output, "w").write(json.dumps(report))
"""


def test_fsdp2_shards_the_teacher_with_its_own_wrapping(setup, tmp_path):
    """An LSTM teacher for a GPT-2 student: each is wrapped by its own layer classes."""
    root, recipe = setup
    probe, report = tmp_path / "probe.py", tmp_path / "report.json"
    probe.write_text(_FSDP2_TEACHER_PROBE)
    corpus = yaml.safe_load(recipe.read_text())["dataset"]
    _run([*FSDP2_LAUNCH, str(probe), str(Path(corpus) / "train.txt"), str(report)], tmp_path)
    result = json.loads(report.read_text())
    assert result["fsdp2"]
    assert result["teacher_sharded_before"] and result["teacher_sharded_after"]
    assert not result["teacher_among_models"]
    assert "AutocastSafeLSTM" in result["teacher_units"] and "GPT2Block" not in result["teacher_units"]
    assert "GPT2Block" in result["student_units"] and "AutocastSafeLSTM" not in result["student_units"]
    assert result["teacher_frozen"] and result["teacher_unchanged"]


def test_a_nan_teacher_stops_both_processes_together(setup, single_run):
    from safetensors.torch import load_file, save_file

    root, _ = setup
    common, _ = single_run
    teacher = root / "teacher" / "model"
    broken = root / "nan-teacher"
    shutil.copytree(teacher, broken)
    weights = load_file(broken / "model.safetensors")
    weights["lm_head.bias"][0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    argv = [*common[:-1], str(broken)]
    out = root / "nan"
    result = _run(
        ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "seqkd", *argv, "--per_device_train_batch_size", "4",
         "--save_strategy", "steps", "--save_steps", "5", "--output_dir", str(out)],
        root, expect_success=False,
    )  # fmt: skip
    assert result.returncode != 0
    # Both processes stop at the first check (a collective), naming the first bad step.
    message = ("seqkd distill: error: the training loss was not finite (NaN or inf) at step 1 on process 0, in kd; "
               "the teacher's logits were not finite")  # fmt: skip
    assert result.stderr.count(message) == 2, result.stderr[-3000:]
    assert not list(out.glob("checkpoint-*")) and not (out / "model").exists()


def test_two_process_on_policy_distillation(setup, single_run):
    # Each process samples its own prompts' continuations with the student (DDP-wrapped for the update, unwrapped
    # to generate), the teacher scores them, and the loss parts and generation share are logged from both.
    root, _ = setup
    common, _ = single_run
    out = root / "on-policy"
    result = _run(
        ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "seqkd", *common, "--batching", "prompts", "--prompt_length", "3",
         "--lmbda", "0.5", "--divergence", "jsd", "--jsd_beta", "0.5", "--ce_weight", "0", "--gkd_max_new_tokens", "8",
         "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "2", "--max_steps", "6",
         "--learning_rate", "1.0", "--output_dir", str(out)],
        root,
    )  # fmt: skip
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["validation_perplexity"] < 1e4
    assert "generation_share" in result.stdout + result.stderr
