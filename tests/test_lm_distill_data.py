"""distill-data for a causal language model: its continuations of the training lines' prefixes as a text corpus."""

import json

import pytest
import torch
from test_translation_cli import parallel_dir, recipe  # noqa: F401  (fixtures)
from transformers import AutoTokenizer

from seqkd.cli import main
from seqkd.pipeline import load_saved_model
from seqkd.sequence_kd import DistillDataArguments, continue_prefixes, write_distilled_data

pytestmark = pytest.mark.usefixtures("one_thread")


def run(*argv):
    return main([str(a) for a in argv] + ["--debug"])


@pytest.fixture(scope="module")
def lm_teacher(cyclic_corpus_dir, tmp_path_factory):
    """A word-level LSTM LM briefly trained on the cyclic language (each word is followed by the next of a cycle)."""
    out = tmp_path_factory.mktemp("lm-teacher")
    run("train", "--model", "lstm", "--dataset", cyclic_corpus_dir, "--output_dir", out, "--max_steps", "60",
        "--loss", "ce", "--use_cpu", "true", "--report_to", "none", "--learning_rate", "0.01", "--seq_len", "16",
        "--model_config", '{"hidden_size": 32, "embedding_size": 32, "num_layers": 1}')  # fmt: skip
    return out / "model"


def lm_argv(corpus, teacher, out, *extra):
    return ["distill-data", "--model", "lstm", "--dataset", corpus, "--teacher_model_name_or_path", teacher,
            "--output_dir", out, "--max_train_examples", "50", "--per_device_eval_batch_size", "8",
            "--max_new_tokens", "10", "--prefix_length", "2", "--num_beams", "1", "--use_cpu", "true", *extra]  # fmt: skip


def read(path):
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def test_greedy_continuations_are_the_teachers_argmax(cyclic_corpus_dir, lm_teacher, tmp_path):
    out = tmp_path / "greedy"
    run(*lm_argv(cyclic_corpus_dir, lm_teacher, out, "--shard_sentences", "20"))
    originals = read(cyclic_corpus_dir / "train.txt")[:50]
    lines = read(out / "train.txt")
    assert len(lines) == 50 and lines != originals
    model, tokenizer = load_saved_model(str(lm_teacher)).eval(), AutoTokenizer.from_pretrained(lm_teacher)
    eos = tokenizer.eos_token_id
    for line, original in zip(lines, originals):
        words = line.split()
        assert words[:2] == original.split()[:2]  # the prefix is kept
        # Teacher forcing over [eos] + the line: every continuation word is the model's argmax after what precedes
        # it, and the line ends where the model puts its end of sentence (or at max_new_tokens).
        ids = [eos] + tokenizer(line, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            predicted = model(input_ids=torch.tensor([ids])).logits[0].argmax(-1).tolist()
        assert ids[3:] == predicted[2 : len(ids) - 1]
        assert len(ids) - 3 == 10 or predicted[len(ids) - 1] == eos
    assert read(out / "validation.txt") == read(cyclic_corpus_dir / "validation.txt")
    assert read(out / "test.txt") == read(cyclic_corpus_dir / "test.txt")
    manifest = json.loads((out / "distill_manifest.json").read_text())
    assert manifest["task"] == "language_modeling" and manifest["num_shards"] == 3 and manifest["prefix_length"] == 2
    # The teacher learnt the cycle: most continuations follow it.
    assert sum(line.split()[:4] == original.split()[:4] for line, original in zip(lines, originals)) >= 25


def test_sampled_continuations_resume_to_the_same_bytes(cyclic_corpus_dir, lm_teacher, tmp_path, monkeypatch):
    import seqkd.sequence_kd as sequence_kd

    sample = ("--do_sample", "true", "--sample_temperature", "1.5", "--sample_top_p", "0.9", "--shard_sentences", "20")
    run(*lm_argv(cyclic_corpus_dir, lm_teacher, tmp_path / "whole", *sample))
    original, calls = sequence_kd._write_lines_atomically, []

    def dies_on_second_shard(path, lines):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while writing a shard")
        original(path, lines)

    monkeypatch.setattr(sequence_kd, "_write_lines_atomically", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run(*lm_argv(cyclic_corpus_dir, lm_teacher, tmp_path / "resumed", *sample))
    with pytest.raises(FileNotFoundError, match=r"incomplete \(1 of 3 shards\)"):  # not yet a corpus
        run("train", "--model", "lstm", "--dataset", tmp_path / "resumed", "--output_dir", tmp_path / "s", "--max_steps", "1",
            "--loss", "ce")
    monkeypatch.setattr(sequence_kd, "_write_lines_atomically", original)
    torch.manual_seed(12345)  # the caller's generator does not decide the samples
    run(*lm_argv(cyclic_corpus_dir, lm_teacher, tmp_path / "resumed", *sample))
    assert (tmp_path / "resumed" / "train.txt").read_bytes() == (tmp_path / "whole" / "train.txt").read_bytes()
    # Another seed draws other samples; greedy decoding differs from sampling at temperature 1.5.
    run(*lm_argv(cyclic_corpus_dir, lm_teacher, tmp_path / "seed1", *sample, "--sample_seed", "1"))
    run(*lm_argv(cyclic_corpus_dir, lm_teacher, tmp_path / "greedy"))
    whole = read(tmp_path / "whole" / "train.txt")
    assert whole != read(tmp_path / "seed1" / "train.txt") and whole != read(tmp_path / "greedy" / "train.txt")


def test_a_student_lm_trains_on_the_continuations(cyclic_corpus_dir, lm_teacher, tmp_path):
    out = tmp_path / "data"
    run(*lm_argv(cyclic_corpus_dir, lm_teacher, out, "--add_original", "true"))
    assert len(read(out / "train.txt")) == 100  # each continuation and its original line
    student = tmp_path / "student"
    run("train", "--model", "lstm", "--dataset", out, "--output_dir", student, "--max_steps", "3", "--use_cpu", "true",
        "--report_to", "none", "--tokenizer", lm_teacher, "--seq_len", "16", "--loss", "ce",
        "--model_config", '{"hidden_size": 8, "embedding_size": 8, "num_layers": 1}')  # fmt: skip
    assert (student / "model" / "model.safetensors").is_file()


def test_continue_prefixes_keeps_corpus_words_that_are_special_tokens(lm_teacher):
    # PTB writes unknown words as <unk>, a special token of its tokenizer: a continuation must keep it.
    model, tokenizer = load_saved_model(str(lm_teacher)), AutoTokenizer.from_pretrained(lm_teacher)
    [line] = continue_prefixes(model, tokenizer, ["<unk> a"], prefix_length=2, max_new_tokens=3)
    assert line.split()[:2] == ["<unk>", "a"]


def test_bad_lm_inputs_are_refused(cyclic_corpus_dir, lm_teacher, tmp_path, recipe):  # noqa: F811
    with pytest.raises(ValueError, match="a language model's corpus has none; use method seq_kd"):
        run(*lm_argv(cyclic_corpus_dir, lm_teacher, tmp_path / "a", "--method", "seq_inter", "--num_beams", "2"))
    with pytest.raises(ValueError, match="is a language model but the recipe is a translation task"):
        run("distill-data", recipe, "--teacher_model_name_or_path", lm_teacher, "--output_dir", tmp_path / "b")
    with pytest.raises(ValueError, match="ensemble_with decodes with an ensemble of translation models"):
        run(*lm_argv(cyclic_corpus_dir, lm_teacher, tmp_path / "c", "--ensemble_with", lm_teacher))
    with pytest.raises(ValueError, match="it must be a transformers model with generate"):
        write_distilled_data(torch.nn.Linear(2, 2), None, {"train": None}, str(tmp_path / "d"), DistillDataArguments())


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(sample_temperature=0), "sample_temperature must be > 0, got 0"),
        (dict(sample_top_p=1.5), "sample_top_p must be in \\(0, 1\\], got 1.5"),
        (dict(do_sample=True, num_beams=4), "set num_beams 1 \\(got 4\\)"),
        (dict(prefix_length=-1), "prefix_length must be >= 0, got -1"),
    ],
    ids=["temperature", "top-p", "sample-with-beams", "prefix"],
)
def test_bad_sampling_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        DistillDataArguments(**fields)


def test_sampling_decodes_one_hypothesis_by_default():
    assert DistillDataArguments().num_beams == 5
    assert DistillDataArguments(do_sample=True).num_beams == 1
