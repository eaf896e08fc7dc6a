"""Teacher cache: exactness at k = V, top-k contents, refusal of mismatched caches, resumable writing."""

import json
import os

import pytest
import torch
from conftest import cyclic_lines
from safetensors.torch import load_file

import seqkd.teacher_cache as teacher_cache_module
from seqkd.data.text import StreamBatches, encode_stream, group_texts, train_word_tokenizer
from seqkd.models import LSTMForCausalLM, LSTMLMConfig, build_causal_lm
from seqkd.teacher_cache import TeacherCacheArguments, TeacherCache, cache_teacher, id_dtype_for
from seqkd.trainer import DistillationArguments, DistillationTrainer
from transformers import default_data_collator


@pytest.fixture(scope="module")
def corpus():
    lines = cyclic_lines(300)
    tokenizer = train_word_tokenizer(lines)
    return tokenizer, lines, encode_stream(tokenizer, lines)


def lstm(tokenizer, seed):
    torch.manual_seed(seed)
    return LSTMForCausalLM(
        LSTMLMConfig(
            vocab_size=len(tokenizer), embedding_size=24, hidden_size=24, num_layers=1,
            embedding_dropout=0.0, layer_dropout=0.0, output_dropout=0.0,
        )
    )  # fmt: skip


def make_args(tmp_path, name, **overrides):
    defaults = dict(
        output_dir=str(tmp_path / name), report_to=[], disable_tqdm=True, use_cpu=True, save_strategy="no",
        learning_rate=0.05, logging_steps=1, seed=0, per_device_train_batch_size=4, max_steps=12,
    )  # fmt: skip
    defaults.update(overrides)
    return DistillationArguments(**defaults)


def step_losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def train_student(tmp_path, name, tokenizer, train, *, teacher=None, cache=None, **overrides):
    trainer = DistillationTrainer(
        model=lstm(tokenizer, seed=2) if isinstance(train, StreamBatches) else gpt2(tokenizer, seed=2),
        args=make_args(tmp_path, name, teacher_cache=cache, **overrides),
        teacher_model=teacher, train_dataset=train, processing_class=tokenizer,
        data_collator=None if isinstance(train, StreamBatches) else default_data_collator,
    )  # fmt: skip
    trainer.train()
    return trainer, step_losses(trainer)


def gpt2(tokenizer, seed):
    torch.manual_seed(seed)
    return build_causal_lm("gpt2-tiny", tokenizer=tokenizer)


@pytest.mark.parametrize(
    "loss, dtype, rel, tail",
    [
        ("kd", "float32", 1e-5, "uniform"),
        ("dkd", "float32", 1e-5, "uniform"),
        ("ban", "float32", 1e-5, "uniform"),
        ("cwtm", "float32", 1e-5, "uniform"),
        ("dkpp", "float32", 1e-5, "uniform"),
        ("kd", "float16", 2e-3, "uniform"),
        ("dkd", "bfloat16", 2e-2, "uniform"),
        ("ban", "float16", 2e-3, "student"),
    ],
)
def test_stream_student_from_a_full_cache_matches_the_live_teacher_step_by_step(
    corpus, tmp_path, loss, dtype, rel, tail
):
    tokenizer, _, ids = corpus
    train = StreamBatches(ids[:1600], 4, 8)
    teacher = lstm(tokenizer, seed=1)
    vocab = len(tokenizer)
    cache_teacher(teacher, train, str(tmp_path / "cache"), top_k=vocab, dtype=dtype, tokenizer=tokenizer,
                  shard_tokens=100, show_progress=False)  # fmt: skip
    fields = {"loss": loss, "temperature": 2.0 if tail == "uniform" else 1.0}
    _, online = train_student(tmp_path, "online", tokenizer, train, teacher=teacher, **fields)
    _, cached = train_student(tmp_path, "cached", tokenizer, train, cache=str(tmp_path / "cache"), cache_tail=tail,
                              **fields)  # fmt: skip
    assert len(online) == len(cached) == 12
    assert cached == pytest.approx(online, rel=rel)


def test_block_student_from_a_full_cache_matches_the_live_teacher_with_shuffling(corpus, tmp_path):
    tokenizer, lines, _ = corpus
    blocks = group_texts(lines, tokenizer, 16)
    teacher = gpt2(tokenizer, seed=1)
    cache_teacher(teacher, blocks, str(tmp_path / "cache"), top_k=len(tokenizer), dtype="float32",
                  tokenizer=tokenizer, shard_tokens=160, batch_size=7, show_progress=False)  # fmt: skip
    fields = {"loss": "kd", "max_steps": 8}
    _, online = train_student(tmp_path, "online", tokenizer, blocks, teacher=teacher, **fields)
    _, cached = train_student(tmp_path, "cached", tokenizer, blocks, cache=str(tmp_path / "cache"), **fields)
    assert cached == pytest.approx(online, rel=1e-5)


def test_stateless_teacher_on_streams_is_cached_window_by_window(corpus, tmp_path):
    tokenizer, _, ids = corpus
    train = StreamBatches(ids[:1600], 4, 8)
    teacher = gpt2(tokenizer, seed=1)
    manifest = cache_teacher(teacher, train, str(tmp_path / "cache"), top_k=len(tokenizer), dtype="float32",
                             tokenizer=tokenizer, shard_tokens=100, show_progress=False)  # fmt: skip
    assert manifest["teacher_window"] == 8 and manifest["shard_size"] % 8 == 0
    fields = {"loss": "kd", "max_steps": 6}
    online = DistillationTrainer(
        model=gpt2(tokenizer, seed=2), args=make_args(tmp_path, "online", **fields), teacher_model=teacher,
        train_dataset=train, processing_class=tokenizer,
    )  # fmt: skip
    online.train()
    cached = DistillationTrainer(
        model=gpt2(tokenizer, seed=2), args=make_args(tmp_path, "cached", teacher_cache=str(tmp_path / "cache"), **fields),
        train_dataset=train, processing_class=tokenizer,
    )  # fmt: skip
    cached.train()
    assert step_losses(cached) == pytest.approx(step_losses(online), rel=1e-5)
    with pytest.raises(ValueError, match="windows of 8 tokens"):
        DistillationTrainer(
            model=gpt2(tokenizer, seed=2), args=make_args(tmp_path, "other", teacher_cache=str(tmp_path / "cache"), **fields),
            train_dataset=StreamBatches(ids[:1600], 4, 6), processing_class=tokenizer,
        )  # fmt: skip


def test_top_k_cache_holds_the_teacher_top_k_and_residual(corpus, tmp_path):
    tokenizer, _, ids = corpus
    train = StreamBatches(ids[:800], 4, 8)
    teacher = lstm(tokenizer, seed=1)
    manifest = cache_teacher(teacher, train, str(tmp_path / "cache"), top_k=3, tokenizer=tokenizer,
                             shard_tokens=200, show_progress=False)  # fmt: skip
    assert manifest["complete"] and manifest["num_shards"] == len(manifest["shards"]) > 1
    cache = TeacherCache(str(tmp_path / "cache"))
    assert id_dtype_for(len(tokenizer)) == torch.uint8 and id_dtype_for(10_000) == torch.uint16
    assert id_dtype_for(70_000) == torch.int32
    with torch.no_grad():
        full = torch.log_softmax(teacher(input_ids=train.all_streams[:, :-1]).logits, -1)
    # A slice across a shard boundary: every row's top 3 and its residual mass.
    got = cache.stream_slice(slice(1, 3), 45, 58)
    expected = full[1:3, 45:58].topk(3, dim=-1)
    assert torch.equal(got["teacher_ids"].long(), expected.indices)
    assert torch.allclose(got["teacher_logprobs"].float(), expected.values, atol=2e-3)
    residual = 1 - expected.values.exp().sum(-1)
    assert torch.allclose(got["teacher_residual"].float(), residual, atol=1e-3)
    # uint8 ids + float16 log-probabilities + float16 residual = 3 * 1 + 3 * 2 + 2 bytes, plus shard headers and
    # the stored LSTM states (large here only because the shards are tiny).
    payload = 0
    for shard in manifest["shards"]:
        tensors = load_file(os.path.join(tmp_path, "cache", shard["file"]))
        assert tensors["ids"].dtype == torch.uint8 and tensors["logprobs"].dtype == torch.float16
        payload += sum(tensors[key].numel() * tensors[key].element_size() for key in ("ids", "logprobs", "residual"))
    assert payload == 11 * train.batch_size * (train.stream_length - 1)
    assert 11 < cache.bytes_per_token < 20


def test_mismatched_caches_are_refused(corpus, tmp_path):
    tokenizer, _, ids = corpus
    train = StreamBatches(ids[:1600], 4, 8)
    teacher = lstm(tokenizer, seed=1)
    path = str(tmp_path / "cache")
    cache_teacher(teacher, train, path, top_k=5, tokenizer=tokenizer, show_progress=False)

    def build(dataset):
        DistillationTrainer(
            model=lstm(tokenizer, seed=2), args=make_args(tmp_path, "run", loss="kd", teacher_cache=path),
            train_dataset=dataset, processing_class=tokenizer,
        )  # fmt: skip

    build(train)  # the matching run is accepted
    with pytest.raises(ValueError, match="training data"):
        build(StreamBatches(ids[100:1700], 4, 8))
    with pytest.raises(ValueError, match="layout"):
        build(StreamBatches(ids[:1600], 2, 8))
    other_tokenizer = train_word_tokenizer(cyclic_lines(300) + ["zebra"])
    with pytest.raises(ValueError, match="tokenizer"):
        DistillationTrainer(
            model=lstm(tokenizer, seed=2), args=make_args(tmp_path, "run", loss="kd", teacher_cache=path),
            train_dataset=train, processing_class=other_tokenizer,
        )  # fmt: skip
    with pytest.raises(ValueError, match="teacher weights"):
        DistillationTrainer(
            model=lstm(tokenizer, seed=2), args=make_args(tmp_path, "run", loss="kd", teacher_cache=path),
            train_dataset=train, processing_class=tokenizer, teacher_model=lstm(tokenizer, seed=3),
        )  # fmt: skip
    with pytest.raises(ValueError, match="another teacher, data or setting"):
        cache_teacher(teacher, train, path, top_k=6, tokenizer=tokenizer, show_progress=False)
    with pytest.raises(FileNotFoundError, match="seqkd cache-teacher"):
        TeacherCache(str(tmp_path / "nowhere"))


def test_interrupted_write_resumes_to_the_same_cache_and_is_never_read_half_done(corpus, tmp_path, monkeypatch):
    tokenizer, _, ids = corpus
    train = StreamBatches(ids[:1600], 4, 8)
    teacher = lstm(tokenizer, seed=1)
    whole = str(tmp_path / "whole")
    reference = cache_teacher(teacher, train, whole, top_k=4, tokenizer=tokenizer, shard_tokens=300,
                              show_progress=False)  # fmt: skip
    assert reference["num_shards"] == 6

    real_save, calls = teacher_cache_module.save_file, []

    def dying_save(tensors, path):
        calls.append(path)
        if len(calls) == 3:  # killed while writing the third shard: a partial file is all that is left of it
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise KeyboardInterrupt
        real_save(tensors, path)

    path = str(tmp_path / "cache")
    monkeypatch.setattr(teacher_cache_module, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher(teacher, train, path, top_k=4, tokenizer=tokenizer, shard_tokens=300, show_progress=False)
    monkeypatch.setattr(teacher_cache_module, "save_file", real_save)
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    assert not manifest["complete"] and len(manifest["shards"]) == 2
    assert not os.path.exists(os.path.join(path, "shard-00002.safetensors"))
    with pytest.raises(ValueError, match="incomplete"):
        TeacherCache(path)
    with pytest.raises(ValueError, match="incomplete"):
        DistillationTrainer(
            model=lstm(tokenizer, seed=2), args=make_args(tmp_path, "run", loss="kd", teacher_cache=path),
            train_dataset=train, processing_class=tokenizer,
        )  # fmt: skip

    with pytest.raises(ValueError, match="shard_size"):  # another shard size would not continue the same shards
        cache_teacher(teacher, train, path, top_k=4, tokenizer=tokenizer, shard_tokens=600, show_progress=False)
    resumed = cache_teacher(teacher, train, path, top_k=4, tokenizer=tokenizer, shard_tokens=300, show_progress=False)
    assert resumed["complete"] and not [name for name in os.listdir(path) if name.endswith(".partial")]
    # The resumed run restarted the teacher from the state stored with shard 1: byte-identical shards.
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in reference["shards"]]

    # A listed shard damaged afterwards is refused by readers, and written again by the next cache run.
    damaged = os.path.join(path, "shard-00004.safetensors")
    with open(damaged, "r+b") as f:
        f.seek(os.path.getsize(damaged) - 8)
        f.write(b"\xff" * 8)
    with pytest.raises(ValueError, match="damaged"):
        TeacherCache(path)
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    manifest["complete"] = False
    json.dump(manifest, open(os.path.join(path, "manifest.json"), "w"))
    repaired = cache_teacher(teacher, train, path, top_k=4, tokenizer=tokenizer, shard_tokens=300, show_progress=False)
    assert [s["sha256"] for s in repaired["shards"]] == [s["sha256"] for s in reference["shards"]]
    TeacherCache(path)


def test_student_tail_needs_forward_kl_at_temperature_one(tmp_path):
    for fields in ({"loss": "dkd"}, {"loss": "kd", "temperature": 2.0}, {"loss": "kd", "divergence": "jsd"}):
        with pytest.raises(ValueError, match="cache_tail='student' needs forward KL at temperature 1"):
            make_args(tmp_path, "run", teacher_cache="somewhere", cache_tail="student", **fields)
    make_args(tmp_path, "run", teacher_cache="somewhere", cache_tail="student", loss="ban")


def test_bad_cache_arguments_are_refused(corpus, tmp_path):
    tokenizer, _, ids = corpus
    train = StreamBatches(ids[:800], 4, 8)
    teacher = lstm(tokenizer, seed=1)
    refused = r"top_k must be in \[1, 15\] \(the teacher.s vocabulary size\), or 0 for all of it, got -1"
    with pytest.raises(ValueError, match=r"cache_top_k must be >= 1, or 0 for the whole vocabulary, got -1"):
        TeacherCacheArguments(cache_top_k=-1)
    with pytest.raises(ValueError, match=refused):
        cache_teacher(teacher, train, str(tmp_path / "c"), top_k=-1, show_progress=False)
    with pytest.raises(ValueError, match="dtype must be one of"):
        cache_teacher(teacher, train, str(tmp_path / "c"), top_k=2, dtype="int8", show_progress=False)
    pairs = __import__("datasets").Dataset.from_dict({"input_ids": [[1, 2]], "attention_mask": [[1, 1]]})
    with pytest.raises(ValueError, match="live teacher"):
        cache_teacher(teacher, pairs, str(tmp_path / "c"), top_k=2, show_progress=False)
    assert not os.path.exists(tmp_path / "c" / "manifest.json")
