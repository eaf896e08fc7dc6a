"""Teacher caches for encoder-decoders: per target token, the teacher's top-k given the source and the gold prefix."""

import json

import pytest
import torch
from test_translation_cli import parallel_dir, recipe  # noqa: F401  (fixtures)
from transformers import TrainerCallback

from seqkd.cli import main, parse_command_line
from seqkd.pipeline import build_pipeline
from seqkd.teacher_cache import TeacherCache, cache_teacher
from seqkd.trainer import DistillationTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pieces(recipe, tmp_path_factory):  # noqa: F811
    """The recipe's tokenizer, model factory and 96 tokenized training pairs, and an untrained teacher."""
    out = tmp_path_factory.mktemp("pieces")
    model_args, data_args, args = parse_command_line(
        "distill", [str(recipe), "--output_dir", str(out), "--max_train_examples", "96", "--loss", "kd"]
    )
    pipeline = build_pipeline(model_args, data_args, args)
    torch.manual_seed(1)
    return pipeline, pipeline.build_model().eval()


class RecordLosses(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs.append(logs)


def train(pipeline, tmp_path, name, *, teacher=None, teacher_cache=None, loss="kd"):
    _, _, args = parse_command_line("distill", [
        "--output_dir", str(tmp_path / name), "--loss", loss, "--temperature", "1",
        "--ce_weight", "0.5", "--kd_weight", "0.5",
        "--max_steps", "6", "--per_device_train_batch_size", "16", "--logging_steps", "1", "--learning_rate", "0.003",
        "--optim", "adamw_torch", "--lr_scheduler_type", "constant", "--report_to", "none", "--disable_tqdm", "true",
        "--use_cpu", "true", "--save_strategy", "no", "--seed", "0", "--teacher_cache", teacher_cache or "",
    ])  # fmt: skip
    args.teacher_cache = teacher_cache
    torch.manual_seed(0)
    student = pipeline.build_model()
    record = RecordLosses()
    trainer = DistillationTrainer(
        model=student, args=args, teacher_model=teacher, train_dataset=pipeline.train_dataset,
        processing_class=pipeline.tokenizer, data_collator=pipeline.data_collator, callbacks=[record],
    )  # fmt: skip
    trainer.train()
    return student, record.logs


@pytest.mark.parametrize("loss", ["kd", "dkd"])
def test_a_full_cache_reproduces_online_word_level_distillation_step_by_step(pieces, tmp_path, loss):
    pipeline, teacher = pieces
    vocab = teacher.get_output_embeddings().weight.shape[0]
    # top_k=0: the whole vocabulary, whatever its size.
    manifest = cache_teacher(teacher, pipeline.train_dataset, str(tmp_path / "cache"), top_k=0, dtype="float32",
                             tokenizer=pipeline.tokenizer, shard_tokens=300, batch_size=8, show_progress=False)  # fmt: skip
    assert manifest["layout"]["kind"] == "pairs" and manifest["num_shards"] > 1 and manifest["top_k"] == vocab
    online_student, online = train(pipeline, tmp_path, "online", teacher=teacher, loss=loss)
    cached_student, cached = train(pipeline, tmp_path, "cached", teacher_cache=str(tmp_path / "cache"), loss=loss)
    assert len(online) == len(cached) == 6
    for a, b in zip(online, cached):
        for key in ("loss", "loss_ce", f"loss_{loss}"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (key, a, b)
    for (name, p), q in zip(online_student.named_parameters(), cached_student.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_cached_rows_are_the_teachers_top_k_at_every_target_token(pieces, tmp_path):
    pipeline, teacher = pieces
    cache_teacher(teacher, pipeline.train_dataset, str(tmp_path / "cache"), top_k=4, dtype="float32",
                  tokenizer=pipeline.tokenizer, shard_tokens=200, batch_size=8, show_progress=False)  # fmt: skip
    cache = TeacherCache(str(tmp_path / "cache"))
    collate = pipeline.data_collator
    for index in (0, 17, len(pipeline.train_dataset) - 1):
        row = pipeline.train_dataset[index]
        batch = collate([{k: row[k] for k in ("input_ids", "attention_mask", "labels")}])
        labels = batch.pop("labels")
        with torch.no_grad():
            logprobs = teacher(**batch).logits.log_softmax(-1)[0]
        expected = logprobs.topk(4, dim=-1)
        cached = cache.pair_rows(index)
        assert cached["teacher_ids"].shape == (labels.shape[1], 4)
        assert torch.equal(cached["teacher_ids"].long(), expected.indices)
        torch.testing.assert_close(cached["teacher_logprobs"], expected.values)


def test_cache_teacher_and_distill_from_the_cli(recipe, tmp_path, capsys):  # noqa: F811
    teacher_dir, cache_dir = tmp_path / "teacher", tmp_path / "cache"
    common = [str(recipe), "--max_train_examples", "64", "--debug"]
    main(["train", *common, "--output_dir", str(teacher_dir), "--max_steps", "3"])
    capsys.readouterr()
    main(["cache-teacher", *common, "--teacher_model_name_or_path", str(teacher_dir / "model"),
          "--teacher_cache", str(cache_dir), "--cache_top_k", "8"])  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["layout"]["kind"] == "pairs" and summary["layout"]["rows"] == 64 and summary["top_k"] == 8
    student = tmp_path / "student"
    main(["distill", *common, "--teacher_cache", str(cache_dir), "--output_dir", str(student), "--max_steps", "3",
          "--loss", "kd", "--logging_steps", "1"])  # fmt: skip
    assert (student / "model" / "model.safetensors").is_file()
    assert json.loads((student / "model" / "metrics.json").read_text())["train_loss"] > 0
    with pytest.raises(ValueError, match="teacher cache .* (was written for the layout|does not match this run)"):
        main(["distill", str(recipe), "--max_train_examples", "64", "--max_target_length", "4", "--debug",
              "--loss", "kd", "--teacher_cache", str(cache_dir), "--output_dir", str(tmp_path / "other"),
              "--max_steps", "1"])  # fmt: skip
