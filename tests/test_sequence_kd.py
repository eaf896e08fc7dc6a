"""Sequence-level distillation data: `seqkd distill-data` (Seq-KD, Seq-Inter), resuming, filters, bad inputs."""

import json
import os
import re
import shutil

import pytest
import sacrebleu
from test_translation_cli import parallel_dir, recipe  # noqa: F401  (fixtures)
from transformers import AutoTokenizer

from seqkd.cli import main
from seqkd.evaluation import translate, translate_n_best
from seqkd.pipeline import load_saved_model
from seqkd.sequence_kd import DistillDataArguments, drop_reason, select_closest

pytestmark = pytest.mark.usefixtures("one_thread")


def run(*argv):
    return main([str(a) for a in argv] + ["--debug"])


@pytest.fixture(scope="module")
def teacher(recipe, tmp_path_factory):  # noqa: F811
    """A briefly trained translation teacher (its outputs need not be good, only its own)."""
    out = tmp_path_factory.mktemp("teacher")
    run("train", recipe, "--output_dir", out, "--num_train_epochs", "1", "--max_train_examples", "200")
    return out / "model"


def distill_argv(recipe, teacher, out, *extra):  # noqa: F811
    return ["distill-data", recipe, "--teacher_model_name_or_path", teacher, "--output_dir", out,
            "--max_train_examples", "60", "--per_device_eval_batch_size", "8", "--max_new_tokens", "12",
            "--drop_empty", "false", *extra]  # fmt: skip


def read(path):
    return path.read_text(encoding="utf-8").split("\n")[:-1]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_seq_kd_targets_are_the_teachers_own_outputs(recipe, parallel_dir, teacher, tmp_path, num_beams):  # noqa: F811
    out = tmp_path / "seq_kd"
    run(*distill_argv(recipe, teacher, out, "--num_beams", num_beams, "--shard_sentences", "25"))
    sources = read(parallel_dir / "train.de")[:60]
    assert read(out / "train.de") == sources
    model, tokenizer = load_saved_model(str(teacher)), AutoTokenizer.from_pretrained(teacher)
    expected = translate(model, tokenizer, sources, num_beams=num_beams, max_new_tokens=12, batch_size=8, show_progress=False)
    assert read(out / "train.en") == expected
    # The other splits are copied unchanged; the manifest records what was done.
    assert read(out / "validation.en") == read(parallel_dir / "val.en")
    assert read(out / "test.de") == read(parallel_dir / "test.de")
    manifest = json.loads((out / "distill_manifest.json").read_text())
    assert manifest["complete"] and manifest["method"] == "seq_kd" and manifest["num_beams"] == num_beams
    assert manifest["num_shards"] == 3 and all(len(shard["sha256"]) == 64 for shard in manifest["shards"])
    assert manifest["counts"] == {"sources": 60, "pairs": 60, "original_targets": 0, "dropped": {}}


def test_seq_inter_picks_the_candidate_with_the_best_sentence_bleu():
    reference = "the cat sat on the mat"
    candidates = ["a dog ran", "the cat sat on a mat", "the cat sat on the mat today", "cat"]
    scores = [sacrebleu.sentence_bleu(c, [reference]).score for c in candidates]
    assert select_closest(candidates, reference) == max(range(4), key=scores.__getitem__) == 2
    chrf = [sacrebleu.sentence_chrf(c, [reference]).score for c in candidates]
    assert select_closest(candidates, reference, metric="chrf") == max(range(4), key=chrf.__getitem__)
    assert select_closest(["same", "same"], "same") == 0  # ties go to the beam's better-ranked hypothesis


def test_seq_inter_writes_the_closest_of_the_k_best(recipe, parallel_dir, teacher, tmp_path):  # noqa: F811
    out = tmp_path / "seq_inter"
    run(*distill_argv(recipe, teacher, out, "--method", "seq_inter", "--num_beams", "4", "--num_return_sequences", "3"))
    sources, references = read(parallel_dir / "train.de")[:60], read(parallel_dir / "train.en")[:60]
    model, tokenizer = load_saved_model(str(teacher)), AutoTokenizer.from_pretrained(teacher)
    n_best = translate_n_best(model, tokenizer, sources, num_beams=4, num_return_sequences=3, max_new_tokens=12,
                              batch_size=8, show_progress=False)  # fmt: skip
    # Each source's candidates are its own, best first: the first is what the same beam search keeps as its best
    # (same batches, same arithmetic; an unbatched run would pad differently and could flip a near-tie).
    best = translate(model, tokenizer, sources, num_beams=4, max_new_tokens=12, batch_size=8, show_progress=False)
    assert [candidates[0] for candidates in n_best] == best and all(len(c) == 3 for c in n_best)
    expected = [c[select_closest(c, r, tokenize="none")] for c, r in zip(n_best, references)]
    assert read(out / "train.en") == [" ".join(e.split()) for e in expected]


def test_an_interrupted_run_resumes_to_the_same_bytes(recipe, teacher, tmp_path, monkeypatch):  # noqa: F811
    import seqkd.sequence_kd as sequence_kd

    argv = distill_argv(recipe, teacher, tmp_path / "whole", "--num_beams", "2", "--shard_sentences", "20")
    run(*argv)
    original, calls = sequence_kd._write_lines_atomically, []

    def dies_on_second_shard(path, lines):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while writing a shard")
        original(path, lines)

    monkeypatch.setattr(sequence_kd, "_write_lines_atomically", dies_on_second_shard)
    argv = distill_argv(recipe, teacher, tmp_path / "resumed", "--num_beams", "2", "--shard_sentences", "20")
    with pytest.raises(KeyboardInterrupt):
        run(*argv)
    resumed = tmp_path / "resumed"
    assert not (resumed / "train.en").exists()
    with pytest.raises(FileNotFoundError, match=r"incomplete \(1 of 3 shards\)"):  # not yet a corpus
        run("train", recipe, "--dataset", resumed, "--output_dir", tmp_path / "student", "--max_steps", "1")
    monkeypatch.setattr(sequence_kd, "_write_lines_atomically", original)
    run(*argv)
    for name in ("train.de", "train.en", "shards/shard-00001.en", "shards/shard-00002.en"):
        assert (resumed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_a_student_trains_on_the_distilled_data(recipe, teacher, tmp_path):  # noqa: F811
    out = tmp_path / "data"
    run(*distill_argv(recipe, teacher, out, "--num_beams", "1"))
    student = tmp_path / "student"
    run("train", recipe, "--dataset", out, "--output_dir", student, "--max_steps", "3", "--tokenizer", teacher)
    run("distill", recipe, "--dataset", out, "--output_dir", tmp_path / "word-kd", "--max_steps", "3", "--loss", "kd",
        "--teacher_model_name_or_path", teacher)  # fmt: skip
    assert (student / "model" / "model.safetensors").is_file()
    assert (tmp_path / "word-kd" / "model" / "model.safetensors").is_file()


def test_original_targets_can_be_mixed_in(recipe, parallel_dir, teacher, tmp_path):  # noqa: F811
    import random

    sources, references = read(parallel_dir / "train.de")[:60], read(parallel_dir / "train.en")[:60]
    run(*distill_argv(recipe, teacher, tmp_path / "plain", "--num_beams", "1"))
    hypotheses = read(tmp_path / "plain" / "train.en")
    run(*distill_argv(recipe, teacher, tmp_path / "both", "--num_beams", "1", "--add_original", "true"))
    assert read(tmp_path / "both" / "train.de") == [s for s in sources for _ in range(2)]
    assert read(tmp_path / "both" / "train.en") == [t for pair in zip(hypotheses, references) for t in pair]
    half = tmp_path / "half"
    run(*distill_argv(recipe, teacher, half, "--num_beams", "1", "--original_fraction", "0.5"))
    gold = set(random.Random(0).sample(range(60), 30))
    expected = [references[i] if i in gold else hypotheses[i] for i in range(60)]
    assert read(half / "train.de") == sources and read(half / "train.en") == expected
    assert json.loads((half / "distill_manifest.json").read_text())["counts"]["original_targets"] == 30
    # Another mix, or other filters, re-assemble train.* from the same shards: nothing is decoded again.
    shard = half / "shards" / "shard-00000.en"
    stamp = shard.stat().st_mtime_ns
    run(*distill_argv(recipe, teacher, half, "--num_beams", "1", "--original_fraction", "0.25", "--mix_seed", "3"))
    gold = set(random.Random(3).sample(range(60), 15))
    assert read(half / "train.en") == [references[i] if i in gold else hypotheses[i] for i in range(60)]
    assert shard.stat().st_mtime_ns == stamp
    run(*distill_argv(recipe, teacher, half, "--num_beams", "1", "--max_length_ratio", "1.0"))
    kept = [(s, h) for s, h in zip(sources, hypotheses) if len(h.split()) == len(s.split())]
    assert list(zip(read(half / "train.de"), read(half / "train.en"))) == kept
    assert shard.stat().st_mtime_ns == stamp


def test_a_student_whose_decoder_starts_elsewhere_is_refused(recipe, teacher, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="decoder starts from token"):
        run("distill", recipe, "--output_dir", tmp_path / "x", "--max_steps", "1", "--loss", "kd",
            "--teacher_model_name_or_path", teacher, "--model_config", '{"decoder_start_token_id": 3}')  # fmt: skip


def test_filters():
    args = DistillDataArguments(max_length_ratio=2.0, max_ngram_repeats=2, repeat_ngram_size=2)
    assert drop_reason("a b c", "", args) == "empty"
    assert drop_reason("a b c", "x y z", args) is None
    assert drop_reason("a b c", "x y z w v u t", args) == "length_ratio"
    assert drop_reason("a b c d e f", "x", args) == "length_ratio"
    assert drop_reason("a b c d e f g h", "x y x y x y", args) == "repeated_ngram"
    assert drop_reason("a b c", "", DistillDataArguments(drop_empty=False)) is None


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(method="seq_inter", num_beams=5, num_return_sequences=0), "num_return_sequences \\(K\\) must be >= 1, got 0"),
        (dict(method="seq_inter", num_beams=2, num_return_sequences=3), "must be <= num_beams \\(2\\)"),
        (dict(num_beams=0), "num_beams must be >= 1, got 0"),
        (dict(max_length_ratio=0.5), "max_length_ratio must be >= 1, got 0.5"),
        (dict(original_fraction=1.5), "original_fraction must be in \\[0, 1\\], got 1.5"),
        (dict(add_original=True, original_fraction=0.5), "exclude each other"),
    ],
    ids=["k-zero", "k-above-beam", "no-beam", "ratio", "fraction", "both-mixes"],
)
def test_bad_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        DistillDataArguments(**fields)


def test_bad_teachers_and_folders_are_refused(recipe, teacher, tmp_path, cyclic_corpus_dir):  # noqa: F811
    # A language model does not translate.
    lm = tmp_path / "lm"
    main(["train", "--model", "lstm", "--dataset", str(cyclic_corpus_dir), "--output_dir", str(lm), "--max_steps", "2",
          "--loss", "ce", "--use_cpu", "true", "--report_to", "none", "--model_config", '{"hidden_size": 8, "embedding_size": 8, "num_layers": 1}'])  # fmt: skip
    with pytest.raises(ValueError, match="is a language model but the recipe is a translation task"):
        run(*distill_argv(recipe, lm / "model", tmp_path / "x"))
    # A folder holding other data.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files and no distill_manifest.json"):
        run(*distill_argv(recipe, teacher, other))
    # Data written by other settings is not continued with these.
    done = tmp_path / "done"
    run(*distill_argv(recipe, teacher, done, "--num_beams", "1"))
    with pytest.raises(ValueError, match="differs in num_beams"):
        run(*distill_argv(recipe, teacher, done, "--num_beams", "2"))
    # A teacher folder without its tokenizer.
    bare = tmp_path / "bare"
    shutil.copytree(teacher, bare)
    for name in os.listdir(bare):
        if name.startswith("tokenizer"):
            os.remove(bare / name)
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        run(*distill_argv(recipe, bare, tmp_path / "y"))


def test_the_decoding_benchmark_prints_its_table(recipe, teacher):  # noqa: F811
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_decoding.py"
    result = subprocess.run(
        [sys.executable, str(script), str(recipe), "--teacher", str(teacher), "--student", "marian-tiny", str(teacher),
         "--sentences", "16", "--length", "4", "--batch_size", "8", "--beams", "1,2", "--repeats", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| teacher:") or line.startswith("| student:")]
    assert len(rows) == 6 and all(row.endswith("x |") for row in rows)  # teacher and two students, by 2 decodings
    assert "| greedy |" in rows[0] and "| beam 2 |" in rows[3] and rows[0].endswith("| 1.00x |")
    assert rows[2].startswith(f"| student: {teacher} (")  # a saved model may be timed as a student, too
    # each speed is the median of its 2 timings, with their range
    low, high = (float(x) for x in re.search(r"\| [\d.]+ \(([\d.]+)-([\d.]+)\) \|", rows[1]).groups())
    assert 0 < low <= high and "median (range) of 2 interleaved timings" in result.stdout
    refused = subprocess.run([sys.executable, str(script), str(recipe), "--teacher", str(teacher), "--student",
                              "marian-tiny", "--repeats", "0"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert refused.returncode != 0 and "--repeats must be >= 1, got 0" in refused.stderr
