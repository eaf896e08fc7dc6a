"""Bad inputs: each gives one line ``seqkd COMMAND: error: ...`` (exit 2) or a clear exception, before any work,
and leaves nothing half-written that a later command would load. docs/robustness.md lists them, row by row,
with the test below that checks each (``test_every_row_of_the_robustness_table_has_a_test`` keeps them in step).
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cyclic_lines

from seqkd.cli import main

REPO = Path(__file__).resolve().parents[1]

MODEL_CONFIG = {"embedding_size": 16, "hidden_size": 16, "num_layers": 1, "embedding_dropout": 0.0,
                "layer_dropout": 0.0, "output_dropout": 0.0}  # fmt: skip


@pytest.fixture(scope="module")
def corpus_dir(cyclic_corpus_dir) -> Path:
    return cyclic_corpus_dir


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": "lstm", "model_config": MODEL_CONFIG, "batching": "stream", "seq_len": 8,
                "per_device_train_batch_size": 4, "per_device_eval_batch_size": 2, "loss": "ce", "optim": "sgd",
                "learning_rate": 1.0, "max_steps": 4, "save_strategy": "no", "logging_steps": 2,
                "report_to": "none", "disable_tqdm": True, "use_cpu": True, "seed": 3,
            }
        )  # fmt: skip
    )
    return path


@pytest.fixture(scope="module")
def teacher_dir(recipe, corpus_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    assert main(["train", str(recipe), "--dataset", str(corpus_dir), "--output_dir", str(out)]) == 0
    return out / "model"


def fails(capsys, *argv) -> str:
    """Run ``seqkd ARGV``; assert it exits 2 with exactly one ``seqkd CMD: error:`` line and no traceback."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if re.match(r"seqkd( [\w-]+)?: error: ", line)]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def copy_corpus(corpus_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    shutil.copytree(corpus_dir, root)
    return root


# ---- the command line and recipes -----------------------------------------------------------------------


def test_unknown_command(capsys):
    assert "unknown command 'trian'" in fails(capsys, "trian", "recipe.yaml")


def test_missing_recipe(capsys, tmp_path):
    line = fails(capsys, "train", tmp_path / "nope.yaml", "--output_dir", tmp_path / "out")
    assert "nope.yaml' does not exist" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("- model: lstm\n- loss: ce\n", "must be a mapping of field: value, got a list"),
        ("model: [lstm\n", "is not valid YAML at line 2"),
        ("model: lstm\nlearning_rat: 0.1\n", r"unknown fields \['learning_rat'\]"),
        ("model: lstm\nseq_len: thirty\n", "field seq_len: invalid int value: 'thirty'"),
        ("model: lstm\nloss: kdd\n", "field loss: invalid choice: 'kdd'"),
        ("model: lstm\ntemperature: 0\nloss: kd\n", "temperature must be > 0, got 0"),
        ("model: lstm\nloss: ce\nmodel_config: '{hidden_size: 8'\n", "model_config must be a JSON object"),
        ("model: lstm\njsd_beta: 1.5\n", r"jsd_beta must be in \[0, 1\], got 1.5"),
    ],
    ids=["list", "yaml-syntax", "unknown-field", "wrong-type", "bad-choice", "zero-temperature", "bad-json",
         "out-of-range"],  # fmt: skip
)
def test_bad_recipe(capsys, tmp_path, corpus_dir, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    line = fails(capsys, "train", path, "--dataset", corpus_dir, "--output_dir", tmp_path / "out")
    assert re.search(message, line), line
    assert files_under(tmp_path / "out") == []


def test_recipe_with_a_yaml_boolean_key(capsys, tmp_path):
    path = tmp_path / "yes.yaml"
    path.write_text("model: lstm\nyes: 1\nlearning_rat: 0.1\n")  # YAML 1.1 reads `yes` as True
    assert "unknown fields ['True', 'learning_rat']" in fails(capsys, "train", path)


def test_a_config_file_a_field_names_is_missing(capsys, recipe, corpus_dir, tmp_path):
    line = fails(capsys, "train", recipe, "--dataset", corpus_dir, "--output_dir", tmp_path / "out",
                 "--accelerator_config", tmp_path / "accelerate.json")  # fmt: skip
    assert "accelerate.json" in line


def test_an_unknown_report_to_integration(capsys, recipe, corpus_dir, tmp_path):
    line = fails(capsys, "train", recipe, "--dataset", corpus_dir, "--output_dir", tmp_path / "out", "--report_to", "wandbb")
    assert "wandbb" in line
    assert not (tmp_path / "out" / "model").exists()


def test_recipe_with_non_utf8_bytes(capsys, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: lstm\nrun_name: caf\xe9\n".encode("latin-1"))
    assert "is not UTF-8 text" in fails(capsys, "train", path)


def test_output_dir_is_a_file(capsys, recipe, corpus_dir, tmp_path):
    target = tmp_path / "out"
    target.write_text("not a folder")
    assert "output_dir" in fails(capsys, "train", recipe, "--dataset", corpus_dir, "--output_dir", target)
    assert target.read_text() == "not a folder"


def test_unknown_model_name(capsys, recipe, corpus_dir, tmp_path):
    line = fails(capsys, "train", recipe, "--dataset", corpus_dir, "--output_dir", tmp_path / "out", "--model", "lstmm")
    assert "model must be 'lstm'" in line and "'lstmm'" in line


def test_model_folder_that_is_not_a_saved_model(capsys, recipe, corpus_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    line = fails(capsys, "train", recipe, "--dataset", corpus_dir, "--output_dir", tmp_path / "out",
                 "--model", tmp_path / "empty")  # fmt: skip
    assert "model folder" in line and "has no config.json" in line


def test_user_error_shows_a_traceback_with_debug_and_a_bug_always_does(recipe, tmp_path, monkeypatch):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["train", missing, "--debug"])
    monkeypatch.setenv("SEQKD_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["train", missing])
    monkeypatch.delenv("SEQKD_DEBUG")

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr("seqkd.cli.build_pipeline", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["train", str(recipe), "--output_dir", str(tmp_path / "out")])


def test_the_installed_command_prints_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "seqkd", "train", str(tmp_path / "nope.yaml")], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("seqkd train: error: recipe ")
    assert "Traceback" not in proc.stderr


# ---- data folders ----------------------------------------------------------------------------------------


def test_empty_corpus_file(capsys, recipe, corpus_dir, tmp_path):
    root = copy_corpus(corpus_dir, tmp_path)
    (root / "train.txt").write_text("")
    line = fails(capsys, "train", recipe, "--dataset", root, "--output_dir", tmp_path / "out")
    assert "split 'train' is empty" in line
    assert files_under(tmp_path / "out") == []


def test_a_dataset_that_is_neither_a_folder_nor_reachable_on_the_hub(capsys, recipe, tmp_path):
    line = fails(capsys, "train", recipe, "--dataset", "ptb_txt_only", "--output_dir", tmp_path / "out")
    assert "dataset 'ptb_txt_only' is not a local folder, and the Hub could not serve it" in line


def test_corpus_with_an_empty_split(capsys, recipe, corpus_dir, tmp_path):
    root = copy_corpus(corpus_dir, tmp_path)
    (root / "validation.txt").write_text("\n\n  \n")
    assert "split 'validation' is empty" in fails(capsys, "train", recipe, "--dataset", root, "--output_dir", tmp_path / "o")


def test_corpus_without_a_requested_split(capsys, recipe, corpus_dir, tmp_path):
    root = copy_corpus(corpus_dir, tmp_path)
    (root / "test.txt").unlink()
    line = fails(capsys, "train", recipe, "--dataset", root, "--output_dir", tmp_path / "out")
    assert "no 'test' split file" in line


def test_corpus_with_non_utf8_bytes(capsys, recipe, corpus_dir, tmp_path):
    root = copy_corpus(corpus_dir, tmp_path)
    with open(root / "train.txt", "ab") as f:
        f.write("un caf\xe9 noir\n".encode("latin-1"))
    line = fails(capsys, "train", recipe, "--dataset", root, "--output_dir", tmp_path / "out")
    assert "train.txt is not UTF-8 text" in line and "line 401" in line


def test_truncated_gzip_corpus_file(capsys, tmp_path):
    root = tmp_path / "parallel"
    root.mkdir()
    for split in ("train", "validation", "test"):
        for lang in ("de", "en"):
            (root / f"{split}.{lang}").write_text("ein hund\nzwei katzen\n" if lang == "de" else "a dog\ntwo cats\n")
    payload = gzip.compress(("ein hund\n" * 200).encode())
    (root / "train.de").unlink()
    (root / "train.de.gz").write_bytes(payload[: len(payload) // 2])
    line = fails(capsys, "train", "--model", "lstm-seq2seq", "--dataset", root, "--output_dir", tmp_path / "out",
                 "--use_cpu", "true", "--loss", "ce")  # fmt: skip
    assert "train.de.gz is a damaged or truncated gzip file" in line


def test_eval_splits_naming_a_split_the_corpus_lacks(capsys, recipe, corpus_dir, tmp_path):
    line = fails(capsys, "train", recipe, "--dataset", corpus_dir, "--output_dir", tmp_path / "out",
                 "--eval_splits", "dev,heldout")  # fmt: skip  ('dev' is an alias of 'validation')
    assert "the corpus has no 'heldout' split" in line
    assert files_under(tmp_path / "out") == []


def test_evaluate_a_missing_model_folder(capsys, recipe, corpus_dir, tmp_path):
    line = fails(capsys, "evaluate", recipe, "--dataset", corpus_dir, "--model_name_or_path", tmp_path / "m")
    assert "model folder" in line and "does not exist" in line


# ---- teachers, students and tokenizers -------------------------------------------------------------------


def test_missing_teacher_folder(capsys, recipe, corpus_dir, tmp_path):
    line = fails(capsys, "distill", recipe, "--dataset", corpus_dir, "--output_dir", tmp_path / "out", "--loss", "kd",
                 "--teacher_model_name_or_path", tmp_path / "nothing")  # fmt: skip
    assert "teacher folder" in line and "does not exist" in line


def test_teacher_folder_without_weights(capsys, recipe, corpus_dir, teacher_dir, tmp_path):
    broken = tmp_path / "teacher"
    shutil.copytree(teacher_dir, broken)
    (broken / "model.safetensors").unlink()
    line = fails(capsys, "distill", recipe, "--dataset", corpus_dir, "--output_dir", tmp_path / "out", "--loss", "kd",
                 "--teacher_model_name_or_path", broken)  # fmt: skip
    assert "has no weights (model.safetensors)" in line
    assert files_under(tmp_path / "out") == []


def test_teacher_with_pickled_weights_only_needs_an_opt_in(capsys, recipe, corpus_dir, teacher_dir, tmp_path):
    from safetensors.torch import load_file

    pickled = tmp_path / "teacher"
    shutil.copytree(teacher_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    argv = ["distill", recipe, "--dataset", corpus_dir, "--loss", "kd", "--teacher_model_name_or_path", pickled]
    line = fails(capsys, *argv, "--output_dir", tmp_path / "refused")
    assert "pickled weights only" in line and "--allow_pickle_weights true" in line
    assert files_under(tmp_path / "refused") == []
    assert main([str(a) for a in argv] + ["--output_dir", str(tmp_path / "trusted"), "--allow_pickle_weights", "true"]) == 0
    assert (tmp_path / "trusted" / "model" / "model.safetensors").is_file()


def test_teacher_and_student_vocabularies_differ(capsys, recipe, corpus_dir, teacher_dir, tmp_path):
    # The student is told to use a tokenizer with another vocabulary than the teacher it distils from.
    other = tmp_path / "other-model"
    shutil.copytree(teacher_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] += 3
    (other / "config.json").write_text(json.dumps(config))
    from transformers import AutoConfig

    from seqkd.models import LSTMForCausalLM

    LSTMForCausalLM(AutoConfig.from_pretrained(other)).save_pretrained(other)
    line = fails(capsys, "distill", recipe, "--dataset", corpus_dir, "--output_dir", tmp_path / "out", "--loss", "kd",
                 "--teacher_model_name_or_path", teacher_dir, "--model", other)  # fmt: skip
    assert "tokenizer has 15 tokens but the model's vocab_size is 18" in line


def test_evaluate_a_model_saved_without_its_tokenizer(capsys, recipe, corpus_dir, teacher_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(teacher_dir / name, bare / name)
    line = fails(capsys, "evaluate", recipe, "--dataset", corpus_dir, "--model_name_or_path", bare)
    assert "has no tokenizer (tokenizer.json)" in line


def test_evaluate_a_folder_that_is_not_a_model(capsys, recipe, corpus_dir, tmp_path):
    (tmp_path / "notes").mkdir()
    line = fails(capsys, "evaluate", recipe, "--dataset", corpus_dir, "--model_name_or_path", tmp_path / "notes")
    assert "has no config.json" in line


# ---- teacher caches --------------------------------------------------------------------------------------


def cache_argv(recipe, corpus_dir, teacher_dir, cache_dir):
    return ["cache-teacher", recipe, "--dataset", corpus_dir, "--teacher_model_name_or_path", teacher_dir,
            "--teacher_cache", cache_dir, "--cache_top_k", "4", "--cache_shard_tokens", "400"]  # fmt: skip


def distill_from_cache_argv(recipe, corpus_dir, cache_dir, out):
    return ["distill", recipe, "--dataset", corpus_dir, "--output_dir", out, "--loss", "kd", "--teacher_cache", cache_dir]


@pytest.mark.parametrize("interruption", ["killed", "disk-full"])
def test_interrupted_cache_teacher_leaves_no_shard_to_load(capsys, recipe, corpus_dir, teacher_dir, tmp_path,
                                                           monkeypatch, interruption):  # fmt: skip
    import seqkd.teacher_cache as teacher_cache

    cache_dir = tmp_path / "cache"
    original, calls = teacher_cache.save_file, []

    def dies_on_second_shard(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"half a shard")
            if interruption == "killed":
                raise KeyboardInterrupt("killed while writing a shard")
            raise DISK_FULL_FROM_SAFETENSORS
        return original(tensors, path, *args, **kwargs)

    monkeypatch.setattr(teacher_cache, "save_file", dies_on_second_shard)
    argv = cache_argv(recipe, corpus_dir, teacher_dir, cache_dir)
    if interruption == "killed":
        with pytest.raises(KeyboardInterrupt):
            main([str(a) for a in argv])
    else:
        assert "the disk is full (or over quota)" in fails(capsys, *argv)
    assert not any(name.endswith(".partial") for name in os.listdir(cache_dir))
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 1

    line = fails(capsys, *distill_from_cache_argv(recipe, corpus_dir, cache_dir, tmp_path / "student"))
    assert "is incomplete (1 of" in line
    assert files_under(tmp_path / "student") == []
    monkeypatch.setattr(teacher_cache, "save_file", original)
    assert main([str(a) for a in argv]) == 0  # resumes from the whole shard
    assert json.loads((cache_dir / "manifest.json").read_text())["complete"]


def test_cache_for_other_data_is_refused(capsys, recipe, corpus_dir, teacher_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    assert main([str(a) for a in cache_argv(recipe, corpus_dir, teacher_dir, cache_dir)]) == 0
    line = fails(capsys, *distill_from_cache_argv(recipe, corpus_dir, cache_dir, tmp_path / "out"),
                 "--per_device_train_batch_size", "2")  # fmt: skip
    assert "layout" in line


def test_missing_teacher_cache(capsys, recipe, corpus_dir, tmp_path):
    line = fails(capsys, *distill_from_cache_argv(recipe, corpus_dir, tmp_path / "no-cache", tmp_path / "out"))
    assert "does not exist: write it with `seqkd cache-teacher`" in line


# ---- checkpoints and resuming ----------------------------------------------------------------------------


def _safetensors_disk_full():
    from safetensors import SafetensorError

    # What safetensors raises when the disk fills: its own exception type, the OS error only in the text.
    return SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )


DISK_FULL_FROM_SAFETENSORS = _safetensors_disk_full()


@pytest.mark.parametrize(
    "error, full",
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (DISK_FULL_FROM_SAFETENSORS, True),
        (RuntimeError("file write failed"), False),
        (OSError(errno.EACCES, "Permission denied"), False),
        (ValueError("bad"), False),
    ],
    ids=["enospc", "edquot", "safetensors", "other-runtime", "permission", "value"],
)
def test_disk_full_is_recognised_whatever_the_library_raises(error, full):
    from seqkd.cli import _is_disk_full

    assert _is_disk_full(error) is full
    try:  # also when it is the cause of another exception
        try:
            raise error
        except Exception as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as outer:
        assert _is_disk_full(outer) is full


def test_disk_full_while_saving_a_checkpoint_keeps_the_last_whole_one(capsys, recipe, corpus_dir, tmp_path, monkeypatch):
    from transformers.trainer_utils import get_last_checkpoint

    from seqkd.trainer import DistillationTrainer

    original, calls = DistillationTrainer._save_optimizer_and_scheduler, []

    def disk_full_on_second_save(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 2:
            raise DISK_FULL_FROM_SAFETENSORS
        return original(self, output_dir)

    monkeypatch.setattr(DistillationTrainer, "_save_optimizer_and_scheduler", disk_full_on_second_save)
    out = tmp_path / "out"
    line = fails(capsys, "train", recipe, "--dataset", corpus_dir, "--output_dir", out, "--save_strategy", "steps",
                 "--save_steps", "2")  # fmt: skip
    assert "the disk is full (or over quota)" in line
    assert get_last_checkpoint(str(out)).endswith("checkpoint-2")
    assert not (out / "checkpoint-4").exists() and not (out / ".staging").exists() and not (out / "model").exists()


def test_born_again_resumed_with_a_changed_recipe(capsys, recipe, corpus_dir, tmp_path):
    out = tmp_path / "ban"
    argv = ["born-again", recipe, "--dataset", corpus_dir, "--output_dir", out, "--loss", "ban", "--num_generations", "1",
            "--ensemble", "false"]  # fmt: skip
    # A configuration written by a first try that got nowhere (no checkpoint, no model) binds nothing.
    out.mkdir()
    (out / "born_again_config.json").write_text(json.dumps({"learning_rate": 9.0}))
    assert main([str(a) for a in argv]) == 0
    stamp = (out / "gen-1" / "model" / "model.safetensors").stat().st_mtime_ns
    line = fails(capsys, *argv, "--learning_rate", "0.5", "--seq_len", "6")
    assert "another configuration" in line and "learning_rate: 1.0 -> 0.5" in line and "seq_len: 8 -> 6" in line
    assert (out / "gen-1" / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    # Reporting fields may change, and the chain may grow by a generation (the finished ones are kept).
    extended = [str(a) for a in argv] + ["--logging_steps", "1", "--disable_tqdm", "false", "--num_generations", "2"]
    assert main(extended) == 0
    assert (out / "gen-1" / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    assert (out / "gen-2" / "model" / "model.safetensors").is_file()


# ---- the losses and training -----------------------------------------------------------------------------


def test_nan_teacher_logits_stop_training_at_the_first_step(capsys, recipe, corpus_dir, teacher_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "teacher"
    shutil.copytree(teacher_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["lm_head.bias"][3] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    line = fails(capsys, "distill", recipe, "--dataset", corpus_dir, "--output_dir", out, "--loss", "kd",
                 "--teacher_model_name_or_path", broken, "--save_strategy", "steps", "--save_steps", "1")  # fmt: skip
    assert "not finite (NaN or inf) at step 1" in line and "kd" in line
    assert "the teacher's logits were not finite" in line and "no checkpoint was saved" in line
    assert files_under(out) == []


def student_broken_after_step_6(tmp_path, *, with_teacher: bool, value: float, save_steps: int, logging_steps: int):
    """A tiny LSTM run whose student's output bias becomes ``value`` after step 6, so step 7's loss is not finite."""
    from transformers import TrainerCallback

    from seqkd.data.text import StreamBatches, encode_stream, train_word_tokenizer
    from seqkd.models import LSTMForCausalLM, LSTMLMConfig
    from seqkd.trainer import DistillationArguments, DistillationTrainer

    lines = cyclic_lines(200)
    tokenizer = train_word_tokenizer(lines)
    make = lambda: LSTMForCausalLM(LSTMLMConfig(vocab_size=len(tokenizer), **MODEL_CONFIG))  # noqa: E731
    student = make()

    class BreakStudentAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                with torch.no_grad():
                    student.lm_head.bias.fill_(value)

    args = DistillationArguments(
        output_dir=str(tmp_path / "out"), loss="kd" if with_teacher else "ce", max_steps=20, save_strategy="steps",
        save_steps=save_steps, logging_steps=logging_steps, report_to=[], disable_tqdm=True, use_cpu=True,
        learning_rate=0.1,
    )  # fmt: skip
    return DistillationTrainer(
        model=student, args=args, teacher_model=make() if with_teacher else None,
        train_dataset=StreamBatches(encode_stream(tokenizer, lines), 4, 8), callbacks=[BreakStudentAfter()],
    )  # fmt: skip


def test_a_diverging_student_stops_with_the_last_good_checkpoint_loadable(tmp_path):
    from safetensors.torch import load_file
    from transformers.trainer_utils import get_last_checkpoint

    from seqkd.errors import NonFiniteLossError

    trainer = student_broken_after_step_6(tmp_path, with_teacher=True, value=float("inf"), save_steps=5, logging_steps=10)
    with pytest.raises(NonFiniteLossError, match=r"at step 7, in .*ce.*teacher's logits were finite") as error:
        trainer.train()
    last = get_last_checkpoint(trainer.args.output_dir)
    assert last.endswith("checkpoint-5") and str(last) in str(error.value)
    assert all(torch.isfinite(t).all() for t in load_file(os.path.join(last, "model.safetensors")).values())


def test_without_a_check_per_step_a_bad_step_is_caught_before_the_next_checkpoint(tmp_path, monkeypatch):
    # As on a GPU: the flags stay on the device and are read at logging steps and before checkpoints only.
    from transformers.trainer_utils import get_last_checkpoint

    from seqkd.errors import NonFiniteLossError
    from seqkd.trainer import DistillationTrainer

    monkeypatch.setattr(DistillationTrainer, "_check_nonfinite_every_step", lambda self, device: False)
    trainer = student_broken_after_step_6(tmp_path, with_teacher=False, value=float("nan"), save_steps=4, logging_steps=50)
    with pytest.raises(NonFiniteLossError, match="at step 7, in ce; no teacher was involved"):
        trainer.train()
    assert trainer.state.global_step == 8  # it ran on to the next checkpoint, which it refused to write
    output_dir = trainer.args.output_dir
    assert get_last_checkpoint(output_dir).endswith("checkpoint-4")
    assert not os.path.exists(os.path.join(output_dir, "checkpoint-8"))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s, t, y: __import__("seqkd.losses").losses.kd_loss(s, t, y, temperature=0.0), "temperature must be > 0, got 0"),
        (lambda s, t, y: __import__("seqkd.losses").losses.kd_loss(s, t[:-1], y), "shape"),
        (lambda s, t, y: __import__("seqkd.losses").losses.dkd_loss(s, t, y, alpha=-1.0), "alpha must be a finite number >= 0, got -1.0"),
        (lambda s, t, y: __import__("seqkd.losses").losses.distillation_loss("kdd", s, t, y), "loss name must be one of 'ce', 'ls', 'kd'"),
    ],
    ids=["zero-temperature", "shape-mismatch", "negative-weight", "unknown-loss"],
)
def test_bad_loss_arguments(call, message):
    student, teacher = torch.randn(6, 11), torch.randn(6, 11)
    labels = torch.randint(0, 11, (6,))
    with pytest.raises(ValueError, match=message):
        call(student, teacher, labels)


# ---- the table -------------------------------------------------------------------------------------------


def test_every_row_of_the_robustness_table_has_a_test():
    table = (REPO / "docs" / "robustness.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    named = re.findall(r"`(test_\w+)(?:\[([\w-]+)\])?`", "\n".join(rows))
    assert len(rows) >= 25 and len(named) >= len(rows)
    sources = "\n".join(path.read_text() for path in (REPO / "tests").glob("test_*.py"))
    defined = set(re.findall(r"^def (test_\w+)", sources, re.MULTILINE))
    assert {name for name, _ in named} <= defined, sorted({name for name, _ in named} - defined)
    # A parametrised case is named by its id, which must be one of the test's ids.
    missing_ids = [f"{name}[{case}]" for name, case in named if case and f'"{case}"' not in sources]
    assert not missing_ids, missing_ids
