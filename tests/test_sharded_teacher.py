"""The teacher under DeepSpeed ZeRO-3 (without DeepSpeed installed) and generation with sharded parameters.

The FSDP teacher is tested under two processes in tests/test_distributed.py.
"""

import copy
import sys
import types

import pytest
import torch
from transformers import GPT2Config

from seqkd.errors import InvalidValueError
from seqkd.models import LSTMForCausalLM, LSTMLMConfig
from seqkd.trainer import (
    DistillationArguments,
    DistillationTrainer,
    _hidden_size,
    _prepare_deepspeed_teacher,
    _teacher_deepspeed_config,
)

ZERO3 = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}},
    "zero_optimization": {
        "stage": 3,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
    },
}


def test_zero3_sizes_left_at_auto_are_filled_from_the_teachers_hidden_size():
    before = copy.deepcopy(ZERO3)
    config = _teacher_deepspeed_config(ZERO3, hidden_size=64)
    assert ZERO3 == before  # the run's (the student's) config is untouched
    assert "optimizer" not in config and "scheduler" not in config
    assert config["zero_optimization"] == {
        "stage": 3,
        "reduce_bucket_size": 64 * 64,
        "stage3_prefetch_bucket_size": int(0.9 * 64 * 64),
        "stage3_param_persistence_threshold": 10 * 64,
        "stage3_max_live_parameters": 1e9,
    }
    assert config["train_micro_batch_size_per_gpu"] == 4


def test_zero3_sizes_set_by_the_user_are_kept():
    config = copy.deepcopy(ZERO3)
    config["zero_optimization"]["reduce_bucket_size"] = 1000
    zero = _teacher_deepspeed_config(config, hidden_size=64)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 1000 and zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_other_zero_stages_give_the_teacher_stage_0(stage):
    config = copy.deepcopy(ZERO3)
    config["zero_optimization"]["stage"] = stage
    # Nothing is left at "auto", so no hidden size is needed.
    assert _teacher_deepspeed_config(config, hidden_size=None)["zero_optimization"] == {"stage": 0}
    assert _teacher_deepspeed_config({"train_batch_size": 8}, hidden_size=None)["zero_optimization"] == {"stage": 0}


def test_auto_sizes_without_a_hidden_size_are_refused():
    with pytest.raises(InvalidValueError, match="zero_optimization.reduce_bucket_size"):
        _teacher_deepspeed_config(ZERO3, hidden_size=None)
    config = copy.deepcopy(ZERO3)
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        config["zero_optimization"][key] = 100
    assert _teacher_deepspeed_config(config, hidden_size=None)["zero_optimization"]["reduce_bucket_size"] == 100


def test_hidden_size_is_read_like_transformers_reads_it():
    assert _hidden_size(GPT2Config(n_embd=48)) == 48  # through GPT-2's attribute_map (n_embd)
    assert _hidden_size(LSTMLMConfig(vocab_size=10, embedding_size=24, hidden_size=24)) == 24
    assert _hidden_size(types.SimpleNamespace(hidden_sizes=[8, 32, 16])) == 32
    assert _hidden_size(types.SimpleNamespace(text_config=types.SimpleNamespace(hidden_size=12))) == 12
    assert _hidden_size(types.SimpleNamespace()) is None
    assert _hidden_size(None) is None


def test_deepspeed_teacher_is_initialized_without_auto_values(monkeypatch):
    calls = []

    class Engine:
        def eval(self):
            calls.append("eval")

    def initialize(model, config):
        calls.append((model, config))
        return Engine(), None, None, None

    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(initialize=initialize))
    teacher = LSTMForCausalLM(LSTMLMConfig(vocab_size=10, embedding_size=16, hidden_size=16, num_layers=1))
    plugin = types.SimpleNamespace(deepspeed_config=copy.deepcopy(ZERO3))
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=plugin))
    engine = _prepare_deepspeed_teacher(teacher, accelerator)
    (model, config), evaluated = calls
    assert model is teacher and evaluated == "eval" and isinstance(engine, Engine)
    assert config["zero_optimization"]["reduce_bucket_size"] == 16 * 16
    assert "auto" not in repr(config)
    assert plugin.deepspeed_config == ZERO3


class _RecordingModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.synced = []

    def generate(self, input_ids, attention_mask=None, **kwargs):
        self.synced.append(kwargs["synced_gpus"])
        return input_ids


class _Tokenizer:
    pad_token_id = 0

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(str(int(i)) for i in row) for row in ids]


@pytest.mark.parametrize(("fsdp", "processes", "synced"), [(True, 2, True), (True, 1, False), (False, 2, False)])
def test_generation_is_synced_across_processes_when_parameters_are_sharded(
    tmp_path, monkeypatch, fsdp, processes, synced
):
    student = LSTMForCausalLM(LSTMLMConfig(vocab_size=10, embedding_size=16, hidden_size=16, num_layers=1))
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, loss="ce")
    trainer = DistillationTrainer(model=student, args=args, processing_class=_Tokenizer())
    monkeypatch.setattr(trainer, "is_fsdp_enabled", fsdp)
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: processes))
    model = _RecordingModel()
    batch = {"input_ids": torch.tensor([[3, 4, 5]]), "labels": torch.tensor([[3, 4, -100]])}
    metrics = trainer._bleu(model, [batch], "eval")
    assert model.synced == [synced]
    assert set(metrics) == {"eval_bleu", "eval_chrf"}
