"""Translation through the seqkd command: a label-smoothed teacher, a distilled LSTM student, BLEU and stability."""

import json
import random

import pytest
import torch
import yaml

from seqkd.cli import main

SOURCE_WORDS = "ein zwei drei vier fuenf sechs sieben acht".split()
TARGET_WORDS = "one two three four five six seven eight".split()


@pytest.fixture(scope="module")
def parallel_dir(tmp_path_factory):
    """A word-by-word translation task (each source word has one target word, in the same order)."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("parallel")
    for split, count in (("train", 400), ("val", 30), ("test", 30)):
        sources, targets = [], []
        for _ in range(count):
            ids = [rng.randrange(len(SOURCE_WORDS)) for _ in range(rng.randint(3, 6))]
            sources.append(" ".join(SOURCE_WORDS[i] for i in ids))
            targets.append(" ".join(TARGET_WORDS[i] for i in ids))
        (root / f"{split}.de").write_text("\n".join(sources) + "\n")
        (root / f"{split}.en").write_text("\n".join(targets) + "\n")
    return root


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, parallel_dir):
    path = tmp_path_factory.mktemp("recipes") / "translation.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": "marian-tiny", "dataset": str(parallel_dir), "source_lang": "de", "target_lang": "en",
                "pretokenized": True, "bpe_vocab_size": 100, "loss": "ls", "label_smoothing": 0.1,
                "optim": "adamw_torch", "learning_rate": 0.003, "num_train_epochs": 8, "per_device_train_batch_size": 16, "lr_scheduler_type": "constant",
                "per_device_eval_batch_size": 32, "predict_with_generate": True, "generation_max_length": 24,
                "eval_strategy": "no", "save_strategy": "no", "logging_steps": 20, "report_to": "none",
                "disable_tqdm": True, "use_cpu": True, "seed": 0,
            }
        )  # fmt: skip
    )
    return path


def test_teacher_student_bleu_and_stability(recipe, tmp_path, capsys):
    torch.set_num_threads(1)
    teacher = tmp_path / "teacher"
    main(["train", str(recipe), "--output_dir", str(teacher)])
    metrics = json.loads((teacher / "model" / "metrics.json").read_text())
    assert {"validation_bleu", "validation_chrf", "test_bleu", "test_perplexity"} <= set(metrics)
    assert metrics["test_bleu"] > 50, metrics  # an easy task: far above chance after a few epochs

    student = tmp_path / "student"
    main(["distill", str(recipe), "--output_dir", str(student), "--model", "lstm-seq2seq", "--loss", "kd",
          "--teacher_model_name_or_path", str(teacher / "model"), "--learning_rate", "0.01",
          "--model_config", json.dumps({"embedding_size": 32, "hidden_size": 32})])  # fmt: skip
    distilled = json.loads((student / "model" / "metrics.json").read_text())
    assert distilled["test_bleu"] > 0 and distilled["test_perplexity"] < 40

    capsys.readouterr()
    main(["evaluate", str(recipe), "--model_name_or_path", str(teacher / "model"), "--split", "test", "--stability",
          "true", "--output_dir", str(tmp_path / "eval")])  # fmt: skip
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["bleu"] == pytest.approx(metrics["test_bleu"], abs=1e-6)
    assert evaluated["perplexity"] == pytest.approx(metrics["test_perplexity"], rel=1e-5)
    assert 0 < evaluated["stability"] <= 1
    assert "tok:none" in evaluated["bleu_signature"]


def test_a_model_trained_further_from_its_folder_saves_what_it_trained(recipe, tmp_path, capsys):
    # Marian's position tables are left out of its checkpoint: trained further from a saved folder (a warm start),
    # they must stay frozen, or the saved model is not the one whose scores metrics.json reports.
    torch.set_num_threads(1)
    main(["train", str(recipe), "--output_dir", str(tmp_path / "first"), "--num_train_epochs", "2"])
    # The trainer freezes them however the student was loaded (here transformers' own from_pretrained).
    from transformers import AutoModelForSeq2SeqLM

    from seqkd.trainer import DistillationArguments, DistillationTrainer

    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "first" / "model")
    DistillationTrainer(model=loaded, args=DistillationArguments(output_dir=str(tmp_path / "t"), loss="ce", use_cpu=True))
    frozen = {name for name, p in loaded.named_parameters() if not p.requires_grad}
    assert frozen == {"model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"}

    main(["train", str(recipe), "--output_dir", str(tmp_path / "further"), "--num_train_epochs", "2",
          "--model", str(tmp_path / "first" / "model"), "--tokenizer", str(tmp_path / "first" / "model")])  # fmt: skip
    metrics = json.loads((tmp_path / "further" / "model" / "metrics.json").read_text())
    capsys.readouterr()
    main(["evaluate", str(recipe), "--model_name_or_path", str(tmp_path / "further" / "model"), "--split", "test",
          "--output_dir", str(tmp_path / "eval")])  # fmt: skip
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["perplexity"] == pytest.approx(metrics["test_perplexity"], rel=1e-5)
    assert evaluated["bleu"] == pytest.approx(metrics["test_bleu"], abs=1e-6)
