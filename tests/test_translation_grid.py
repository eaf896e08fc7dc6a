"""scripts/translation_grid.py: two teachers, a student by CE and by KD from each, results table and plot."""

import shutil
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from test_translation_cli import parallel_dir, recipe  # noqa: F401  (fixtures)
from conftest import load_script


def test_grid_trains_every_cell_writes_results_and_skips_finished_runs(recipe, tmp_path, capsys, monkeypatch):  # noqa: F811
    teacher = yaml.safe_load(recipe.read_text())
    teacher["eval_strategy"] = "epoch"  # validation BLEU after every epoch, for the validation curves
    (tmp_path / "ls.yaml").write_text(yaml.safe_dump({**teacher, "loss": "ls", "label_smoothing": 0.1, "num_train_epochs": 2}))
    (tmp_path / "ce.yaml").write_text(yaml.safe_dump({**teacher, "loss": "ce", "label_smoothing": 0.0, "num_train_epochs": 2}))
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "teachers": {"ls": "ls.yaml", "ce": "ce.yaml"},
                "students": {"tiny": {"model": "marian-tiny"}},
                "losses": {"ce": {"loss": "ce"}, "kd": {"loss": "kd", "ce_weight": 0.5, "kd_weight": 0.5}},
                "training": {"num_train_epochs": 1},
            },
            sort_keys=False,  # the teachers in this order: ls first
        )
    )
    module = load_script("translation_grid")
    out = tmp_path / "out"
    rows = module.run_grid(str(grid), [], str(out))
    names = {(r["role"], r["name"], r["loss"], r["teacher"]) for r in rows}
    assert names == {
        ("teacher", "ls", "ls", ""), ("teacher", "ce", "ce", ""),
        ("student", "tiny", "ce", ""), ("student", "tiny", "kd", "ls"), ("student", "tiny", "kd", "ce"),
    }  # fmt: skip
    assert all(0 < r["stability"] <= 1 for r in rows if r["role"] == "teacher")
    results = (out / "results.md").read_text()
    assert "| ls |" in results and "| tiny | kd | ce |" in results
    bleu = {(r["loss"], r["teacher"]): r["test_bleu"] for r in rows if r["role"] == "student"}
    # the side-by-side table: the same student and loss from each teacher, and their difference
    ls_bleu, ce_bleu = bleu[("kd", "ls")], bleu[("kd", "ce")]
    assert f"| tiny | kd | {ls_bleu:.2f} | {ce_bleu:.2f} | {ls_bleu - ce_bleu:+.2f} |" in results
    assert (out / "bleu.png").stat().st_size > 1000
    # every run's validation curve: one point per epoch (teachers 2, students 1), listed and plotted
    curves = {r["run"]: [e["epoch"] for e in r["eval_history"]] for r in rows}
    assert curves["teacher-ls"] == [1.0, 2.0] and curves["tiny-kd-from-ce"] == [1.0]
    assert "## Validation BLEU by epoch" in results and "- teacher-ce: " in results
    assert (out / "validation.png").stat().st_size > 1000
    stamp = (out / "tiny-kd-from-ls" / "model" / "metrics.json").stat().st_mtime_ns
    module.run_grid(str(grid), [], str(out))  # everything finished: nothing is trained again
    assert (out / "tiny-kd-from-ls" / "model" / "metrics.json").stat().st_mtime_ns == stamp

    # paired bootstrap on the finished grid: each system scores as the grid scored it (the same greedy decoding)
    paired = load_script("paired_bleu")
    compared = paired.paired_rows(str(grid), [], "test", str(out))
    test_bleu = {f"tiny-{r['loss']}" + (f"-from-{r['teacher']}" if r["teacher"] else ""): r["test_bleu"]
                 for r in rows if r["role"] == "student"}  # fmt: skip
    assert [(r["baseline"], r["system"]) for r in compared] == [
        ("tiny-kd-from-ce", "tiny-kd-from-ls"), ("tiny-ce", "tiny-kd-from-ls"), ("tiny-ce", "tiny-kd-from-ce"),
    ]  # fmt: skip
    for r in compared:
        assert r["baseline_bleu"] == pytest.approx(test_bleu[r["baseline"]], abs=0.01)
        assert r["system_bleu"] == pytest.approx(test_bleu[r["system"]], abs=0.01)
        assert r["difference"] == pytest.approx(r["system_bleu"] - r["baseline_bleu"])
        assert 0 < r["p_value"] <= 1 and r["ci95"] >= 0
    table = paired.format_rows(compared, "test")
    assert table.count("\n") == len(compared) + 1 and "| tiny-ce | tiny-kd-from-ce |" in table
    with pytest.raises(FileNotFoundError, match="no finished grid"):
        paired.paired_rows(str(grid), [], "test", str(tmp_path / "nothing-here"))
    # chosen pairs only: those two runs' models and no others are decoded (which folders were loaded, not BLEU across
    # two decodes: the comparisons above already hold each run's BLEU to the grid's)
    loaded = []
    load = paired.load_saved_model
    monkeypatch.setattr(paired, "load_saved_model", lambda path, *a, **k: loaded.append(path) or load(path, *a, **k))
    (chosen,) = paired.paired_rows(str(grid), [], "test", str(out), pairs=[("tiny-ce", "tiny-kd-from-ce")])
    assert (chosen["baseline"], chosen["system"]) == ("tiny-ce", "tiny-kd-from-ce")
    assert sorted(loaded) == sorted([str(out / "tiny-ce" / "model"), str(out / "tiny-kd-from-ce" / "model")])
    with pytest.raises(ValueError, match="has not finished: \\['tiny-nope'\\]"):
        paired.paired_rows(str(grid), [], "test", str(out), pairs=[("tiny-ce", "tiny-nope")])
    # a run named by its path: another grid's run, decoded from that folder's model (which folder was loaded is
    # checked, not BLEU against the original: two loads of the same weights need not decode bit-identically)
    import shutil

    elsewhere = tmp_path / "elsewhere" / "tiny-kd-from-ce"
    shutil.copytree(out / "tiny-kd-from-ce", elsewhere)
    loaded.clear()
    (by_path,) = paired.paired_rows(str(grid), [], "test", str(out), pairs=[("tiny-ce", str(elsewhere))])
    assert by_path["system"] == str(elsewhere) and 0 <= by_path["system_bleu"] <= 100
    assert sorted(loaded) == sorted([str(out / "tiny-ce" / "model"), str(elsewhere / "model")])
    with pytest.raises(ValueError, match="hold no finished run"):
        paired.paired_rows(str(grid), [], "test", str(out), pairs=[("tiny-ce", str(tmp_path / "elsewhere"))])


def test_sequence_level_grid_decodes_each_teachers_data_once_and_scores_beams(recipe, tmp_path):  # noqa: F811
    teacher = yaml.safe_load(recipe.read_text())
    (tmp_path / "ls.yaml").write_text(yaml.safe_dump({**teacher, "num_train_epochs": 3}))
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "teachers": {"ls": "ls.yaml"},
                "students": {"tiny": {"model": "marian-tiny"}},
                "distilled_data": {"seq-kd": {"method": "seq_kd", "num_beams": 2, "max_new_tokens": 24}},
                "losses": {"ce": {"loss": "ce"}, "seq-kd": {"loss": "ce", "data": "seq-kd"},
                           "seq-kd+word-kd": {"loss": "kd", "data": "seq-kd"}},
                "training": {"num_train_epochs": 1},
                "eval_num_beams": [2],
            },
            sort_keys=False,
        )  # fmt: skip
    )
    module = load_script("translation_grid")
    out = tmp_path / "out"
    rows = module.run_grid(str(grid), [], str(out))
    students = {r["loss"]: r for r in rows if r["role"] == "student"}
    assert set(students) == {"ce", "seq-kd", "seq-kd+word-kd"}
    assert students["ce"]["teacher"] == "" and students["seq-kd"]["teacher"] == "ls"  # distilled targets are taught
    assert students["seq-kd"]["data"] == students["seq-kd+word-kd"]["data"] == "seq-kd"
    # one corpus per teacher, decoded once however many students read it, with its decoding figures
    (data,) = [r for r in rows if r["role"] == "data"]
    assert data["dir"] == "data-seq-kd-from-ls" and data["pairs"] == 400 and data["sentences_per_second"] > 0
    # the Seq-KD student trained on the teacher's outputs, in the teacher's subwords
    distilled_targets = (out / "data-seq-kd-from-ls" / "train.en").read_text().splitlines()
    gold_targets = (Path(teacher["dataset"]) / "train.en").read_text().splitlines()
    assert len(distilled_targets) == len(gold_targets) and distilled_targets != gold_targets
    assert (out / "tiny-seq-kd-from-ls" / "model" / "tokenizer.json").read_text() == (
        out / "teacher-ls" / "model" / "tokenizer.json").read_text()  # fmt: skip
    for r in rows:
        if r["role"] != "data":
            assert 0 <= r["test_bleu_beam2"] <= 100 and 0 <= r["test_chrf_beam2"] <= 100
            assert r["test_sentences_per_second_beam2"] > 0  # the beam decoding is timed
    results = (out / "results.md").read_text()
    assert "test BLEU beam 2" in results and "## Distilled data" in results
    # each student's decoding speed over its teacher's (a CE-only student's over the first teacher's)
    speed = {r["loss"]: r["test_sentences_per_second_beam2"] for r in rows if r["role"] != "data"}
    assert f"| teacher ls | ls | - | {speed['ls']:.1f} | 1.00x |" in results
    assert f"| tiny | ce | (CE only; vs ls) | {speed['ce']:.1f} | {speed['ce'] / speed['ls']:.2f}x |" in results
    assert f"| tiny | seq-kd | ls | {speed['seq-kd']:.1f} | {speed['seq-kd'] / speed['ls']:.2f}x |" in results
    assert "| tiny | seq-kd | ls | seq-kd from ls |" in results
    stamp = (out / "data-seq-kd-from-ls" / "distill_manifest.json").stat().st_mtime_ns
    module.run_grid(str(grid), [], str(out))  # finished: neither decoded nor scored again
    assert (out / "data-seq-kd-from-ls" / "distill_manifest.json").stat().st_mtime_ns == stamp


def test_only_trains_the_matching_runs_and_the_teachers_they_need(recipe, tmp_path, monkeypatch):  # noqa: F811
    teacher = yaml.safe_load(recipe.read_text())
    for name in ("ce", "ls"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**teacher, "num_train_epochs": 1}))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(
        {"teachers": {"ce": "ce.yaml", "ls": "ls.yaml"}, "students": {"tiny": {"model": "marian-tiny"}},
         "losses": {"ce": {"loss": "ce"}, "kd": {"loss": "kd", "ce_weight": 0.5, "kd_weight": 0.5}},
         "training": {"num_train_epochs": 1}}, sort_keys=False))  # fmt: skip
    module = load_script("translation_grid")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"\['tiny-dkd\*'\] match no run .* 'teacher-ls', 'tiny-kd-from-ls'\]"):
        module.run_grid(str(grid), [], str(out), only=["tiny-kd-*", "tiny-dkd*"])
    assert not out.exists()  # refused before any work
    with pytest.raises(ValueError, match=r"\['nope'\] match no run"):  # the command line's --only, before an override
        module.main([str(grid), "--output_dir", str(out), "--only", "nope", "--learning_rate", "0.1"])
    assert not out.exists()

    def finished(run: str) -> bool:
        return (out / run / "model" / "metrics.json").exists()

    rows = module.run_grid(str(grid), [], str(out), only=["tiny-kd-from-ls"])
    # the selected student and the teacher it needs; neither the CE student nor the other teacher
    assert [finished(r) for r in ("tiny-kd-from-ls", "teacher-ls", "tiny-ce", "teacher-ce", "tiny-kd-from-ce")] == [
        True, True, False, False, False]  # fmt: skip
    assert [(r["role"], r["run"]) for r in rows] == [("teacher", "teacher-ls"), ("student", "tiny-kd-from-ls")]
    rows = module.run_grid(str(grid), [], str(out), only=["tiny-ce"])
    # finished runs are listed whether or not they match
    assert [r["run"] for r in rows] == ["tiny-ce", "teacher-ls", "tiny-kd-from-ls"] and not finished("teacher-ce")
    # Until a call reaches a finished run, its tables keep the row an earlier call listed (a run removed since is
    # dropped), so that a grid stopped part-way never lists fewer finished runs than before.
    shutil.rmtree(out / "tiny-kd-from-ls")
    written, write_results = [], module.write_results

    def recording_write_results(rows, output, quiet=False):
        written.append([r["run"] for r in rows])
        write_results(rows, output, quiet)

    monkeypatch.setattr(module, "write_results", recording_write_results)
    module.run_grid(str(grid), [], str(out), only=["teacher-*"])  # a teacher may be selected alone
    assert finished("teacher-ce") and not finished("tiny-kd-from-ce")
    assert written[0] == ["tiny-ce", "teacher-ls"]  # before this call reached teacher-ls
    assert written[-1] == ["tiny-ce", "teacher-ce", "teacher-ls"]
    assert all({"tiny-ce", "teacher-ls"} <= set(runs) and "tiny-kd-from-ls" not in runs for runs in written)


def test_grid_refuses_a_loss_on_undefined_data(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"teachers": {"a": "a.yaml"}, "students": {"s": {}},
                                    "losses": {"seq-kd": {"loss": "ce", "data": "seq-kd"}}}))  # fmt: skip
    with pytest.raises(ValueError, match="data 'seq-kd'.*defines none"):
        load_script("translation_grid").run_grid(str(grid), [], str(tmp_path / "out"))


def test_grid_with_a_full_teacher_cache_trains_the_live_teachers_student(recipe, tmp_path, monkeypatch):  # noqa: F811
    # teacher_cache: the word-level student on gold targets reads a cache of its teacher, written once per teacher;
    # with every log-probability kept (k = V, float32) it is the live teacher's student, step for step.
    import json
    import shutil

    teacher = yaml.safe_load(recipe.read_text())
    (tmp_path / "ce.yaml").write_text(yaml.safe_dump({**teacher, "num_train_epochs": 2}))
    base = {"teachers": {"ce": "ce.yaml"}, "students": {"tiny": {"model": "marian-tiny"}},
            "losses": {"kd": {"loss": "kd", "ce_weight": 0.5, "kd_weight": 0.5}}, "training": {"num_train_epochs": 1}}  # fmt: skip
    (tmp_path / "live.yaml").write_text(yaml.safe_dump(base))
    module = load_script("translation_grid")
    live_rows = module.run_grid(str(tmp_path / "live.yaml"), [], str(tmp_path / "live"))
    vocab_size = json.loads((tmp_path / "live" / "teacher-ce" / "model" / "config.json").read_text())["vocab_size"]
    (tmp_path / "cached.yaml").write_text(
        yaml.safe_dump({**base, "teacher_cache": {"cache_top_k": 0, "cache_dtype": "float32"}})  # 0: all V
    )
    shutil.copytree(tmp_path / "live" / "teacher-ce", tmp_path / "cached" / "teacher-ce")  # the same teacher
    from seqkd.teacher_signal import LiveTeacher

    def never(*args, **kwargs):
        raise AssertionError("a student of the cached grid ran the teacher")

    monkeypatch.setattr(LiveTeacher, "logits", never)
    cached_rows = module.run_grid(str(tmp_path / "cached.yaml"), [], str(tmp_path / "cached"))

    (cache,) = [r for r in cached_rows if r["role"] == "cache"]
    assert cache["teacher"] == "ce" and cache["top_k"] == vocab_size and cache["write_seconds"] >= 0
    manifest = json.loads((tmp_path / "cached" / "cache-from-ce" / "manifest.json").read_text())
    assert manifest["top_k"] == vocab_size
    live_student, cached_student = (next(r for r in rows if r["role"] == "student") for rows in (live_rows, cached_rows))
    assert cached_student["train_loss"] == pytest.approx(live_student["train_loss"], rel=1e-5)
    assert cached_student["test_bleu"] == pytest.approx(live_student["test_bleu"], abs=0.5)
    assert cached_student["teacher_cache"] and not live_student["teacher_cache"]
    signal = {d: json.loads((tmp_path / d / "tiny-kd-from-ce" / "model" / "metrics.json").read_text())["teacher_signal"]
              for d in ("live", "cached")}  # fmt: skip
    assert signal == {"live": "live", "cached": "cache"}
    # A student trained live before its recipe turned the cache on keeps its label: the run says what it read.
    relabelled = module.run_grid(str(tmp_path / "cached.yaml"), [], str(tmp_path / "live"))
    assert not next(r for r in relabelled if r["role"] == "student")["teacher_cache"]
    results = (tmp_path / "cached" / "results.md").read_text()
    assert "## Teacher caches" in results and "| gold (teacher cache) |" in results
    stamp = (tmp_path / "cached" / "cache-from-ce.json").stat().st_mtime_ns
    module.run_grid(str(tmp_path / "cached.yaml"), [], str(tmp_path / "cached"))  # finished: the cache is not rewritten
    assert (tmp_path / "cached" / "cache-from-ce.json").stat().st_mtime_ns == stamp


def test_students_without_a_ce_only_twin_show_a_dash_not_nan(tmp_path):
    rows = [
        {"role": "teacher", "name": "ce", "loss": "ce", "teacher": "", "run": "teacher-ce", "test_bleu": 38.0,
         "test_chrf": 58.0, "test_perplexity": 6.0, "validation_bleu": 37.5, "stability": 0.8, "train_runtime_s": 10.0},
        {"role": "student", "name": "s", "loss": "kd-beta0", "teacher": "ce", "data": "gold", "run": "s-kd",
         "test_bleu": 31.16, "test_chrf": 49.2, "train_runtime_s": 812.0},
        {"role": "student", "name": "t", "loss": "ce", "teacher": "", "data": "gold", "run": "t-ce",
         "test_bleu": 25.0, "test_chrf": 45.0, "train_runtime_s": 5.0},
        {"role": "student", "name": "t", "loss": "kd", "teacher": "ce", "data": "gold", "run": "t-kd",
         "test_bleu": 26.5, "test_chrf": 46.0, "train_runtime_s": 9.0},
    ]  # fmt: skip
    load_script("translation_grid").write_results(rows, str(tmp_path), quiet=True)
    table = (tmp_path / "results.md").read_text()
    assert "nan" not in table
    assert "| s | kd-beta0 | ce | gold | 31.16 | 49.20 | - | 812 |" in table
    assert "| t | kd | ce | gold | 26.50 | 46.00 | +1.50 | 9 |" in table
    assert "| t | ce | - | gold | 25.00 | 45.00 |  | 5 |" in table


def test_students_that_stop_early_show_their_epochs_and_best_epoch(tmp_path):
    def student(loss, teacher, bleu, **stopping):
        return {"role": "student", "name": "s", "loss": loss, "teacher": teacher, "data": "gold", "run": f"s-{loss}",
                "test_bleu": bleu, "test_chrf": bleu + 20, "train_runtime_s": 100.0, **stopping}  # fmt: skip

    teacher = {"role": "teacher", "name": "t", "loss": "ce", "teacher": "", "run": "teacher-t", "test_bleu": 35.0,
               "test_chrf": 55.0, "test_perplexity": 6.0, "stability": 0.8}  # fmt: skip
    rows = [teacher, student("ce", "", 30.0, epochs=19.0, best_step=3632, best_epoch=16.0, stopped_early=True),
            student("kd", "t", 31.0, epochs=30.0, best_step=6810, best_epoch=30.0, stopped_early=False),
            student("old", "t", 29.0, epochs=6.0)]  # fmt: skip
    load_script("translation_grid").write_results(rows, str(tmp_path), quiet=True)
    table = (tmp_path / "results.md").read_text()
    assert "| s | ce | - | gold | 30.00 | 50.00 |  | 19 (16) | 100 |" in table
    assert "| s | kd | t | gold | 31.00 | 51.00 | +1.00 | 30 (30) | 100 |" in table
    assert "| s | old | t | gold | 29.00 | 49.00 | -1.00 | 6 | 100 |" in table
    # a grid without early stopping keeps its table as it was
    load_script("translation_grid").write_results([teacher, student("kd", "t", 31.0, epochs=2.0)], str(tmp_path), quiet=True)
    assert "epochs run" not in (tmp_path / "results.md").read_text()


def test_seeds_train_each_cell_per_seed_reuse_the_recipe_seed_run_and_report_mean_and_sd(recipe, tmp_path):  # noqa: F811
    teacher = yaml.safe_load(recipe.read_text())  # its seed is 0
    (tmp_path / "ce.yaml").write_text(yaml.safe_dump({**teacher, "loss": "ce", "label_smoothing": 0.0, "num_train_epochs": 2}))
    grid = {"teachers": {"ce": "ce.yaml"}, "students": {"tiny": {"model": "marian-tiny"}},
            "losses": {"kd": {"loss": "kd", "ce_weight": 0.5, "kd_weight": 0.5}}, "training": {"num_train_epochs": 1}}  # fmt: skip
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(grid))
    module = load_script("translation_grid")
    out = tmp_path / "out"
    module.run_grid(str(tmp_path / "one.yaml"), [], str(out))  # before seeds were listed: the recipe's seed, plain name
    stamp = (out / "tiny-kd-from-ce" / "model" / "metrics.json").stat().st_mtime_ns

    (tmp_path / "seeds.yaml").write_text(yaml.safe_dump({**grid, "seeds": [0, 7]}))
    rows = module.run_grid(str(tmp_path / "seeds.yaml"), [], str(out))
    # seed 0 is the recipe's own: the run made before is that seed's, not trained again; seed 7 gets its own folder
    assert (out / "tiny-kd-from-ce" / "model" / "metrics.json").stat().st_mtime_ns == stamp
    students = [r for r in rows if r["role"] == "student"]
    assert [(r["run"], r["seed"]) for r in students] == [("tiny-kd-from-ce", 0), ("tiny-kd-from-ce-seed7", 7)]
    # the seed reached the trainer (our own file, written by Trainer.save_model: safe to unpickle)
    assert torch.load(out / "tiny-kd-from-ce-seed7" / "model" / "training_args.bin", weights_only=False).seed == 7
    a, b = (r["test_bleu"] for r in students)
    results = (out / "results.md").read_text()
    assert "| tiny | kd | ce | gold | 0 |" in results and "| tiny | kd | ce | gold | 7 |" in results
    assert f"| tiny | kd | ce | gold | 0, 7 | {statistics.mean([a, b]):.2f} ± {statistics.stdev([a, b]):.2f} |" in results


def test_over_seeds_table_and_same_seed_ce_twins(tmp_path):
    def student(loss, teacher, seed, bleu):
        return {"role": "student", "name": "s", "loss": loss, "teacher": teacher, "data": "gold", "seed": seed,
                "run": f"s-{loss}-{seed}", "test_bleu": bleu, "test_chrf": bleu + 20, "test_bleu_beam5": bleu + 1,
                "test_chrf_beam5": bleu + 21, "test_sentences_per_second_beam5": 10.0 * seed, "train_runtime_s": 1.0}  # fmt: skip

    teacher = {"role": "teacher", "name": "t", "loss": "ce", "teacher": "", "run": "teacher-t", "test_bleu": 35.0,
               "test_chrf": 55.0, "test_perplexity": 6.0, "stability": 0.8, "test_sentences_per_second_beam5": 5.0}  # fmt: skip
    rows = [teacher, student("ce", "", 1, 20.0), student("ce", "", 2, 22.0), student("kd", "t", 1, 25.0),
            student("kd", "t", 2, 28.0), student("kd", "t", 3, 31.0)]  # fmt: skip
    load_script("translation_grid").write_results(rows, str(tmp_path), quiet=True)
    table = (tmp_path / "results.md").read_text()
    # each distilled run against the CE-only run of its own seed; a seed without one against the first seed's
    assert "| s | kd | t | gold | 2 | 28.00 | 48.00 | 29.00 | 49.00 | +6.00 | 1 |" in table
    assert "| s | kd | t | gold | 3 | 31.00 | 51.00 | 32.00 | 52.00 | +11.00 | 1 |" in table
    assert "| s | kd | t | gold | 1, 2, 3 | 28.00 ± 3.00 | 48.00 ± 3.00 | 29.00 ± 3.00 |" in table
    assert "| s | ce | - | gold | 1, 2 | 21.00 ± 1.41 | 41.00 ± 1.41 | 22.00 ± 1.41 |" in table
    # decoding speed, each seed's run named: a distilled student against its teacher, a CE-only one the first teacher
    assert "| s (seed 2) | kd | t | 20.0 | 4.00x |" in table and "| s (seed 1) | ce | (CE only; vs t) | 10.0 | 2.00x |" in table


@pytest.mark.parametrize("seeds", [[], [1, 1], "1", [1.5], [True]])
def test_grid_refuses_bad_seeds(tmp_path, seeds):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"teachers": {"ce": "ce.yaml"}, "students": {"s": {"model": "marian-tiny"}},
                                    "losses": {"kd": {"loss": "kd"}}, "seeds": seeds}))  # fmt: skip
    with pytest.raises(ValueError, match="seeds of grid recipe .* must be a non-empty list of distinct integers"):
        load_script("translation_grid")._read_grid(str(grid))


def test_validation_curves_are_listed_with_the_best_epoch_in_bold_and_plotted(tmp_path):
    def row(role, run, history, **fields):
        return {"role": role, "name": "s", "loss": "ce", "teacher": "", "data": "gold", "run": run,
                "test_bleu": 30.0, "test_chrf": 50.0, "test_perplexity": 6.0, "stability": 0.8,
                "eval_history": history, **fields}  # fmt: skip

    def curve(values, **more):
        return [{"epoch": float(i + 1), "step": 10 * (i + 1), "eval_bleu": v, "eval_loss": 3.0 - v / 100, **more}
                for i, v in enumerate(values)]  # fmt: skip

    module = load_script("translation_grid")
    rows = [row("teacher", "teacher-t", curve([10.0, 30.25, 29.0]), name="t"),
            row("student", "s-ce", curve([5.0, 20.0, 25.04, 24.0])),
            row("student", "s-kd-from-t", curve([7.0, 22.0]), loss="kd", teacher="t"),
            row("student", "s-old", None)]  # fmt: skip  (a run finished before metrics kept its curve)
    module.write_results(rows, str(tmp_path), quiet=True)
    results = (tmp_path / "results.md").read_text()
    assert "- teacher-t: 10.0, **30.2**, 29.0" in results
    assert "- s-ce: 5.0, 20.0, **25.0**, 24.0" in results and "- s-kd-from-t: 7.0, **22.0**" in results
    assert "s-old:" not in results
    assert (tmp_path / "validation.png").stat().st_size > 1000
    # a run that scored no BLEU each epoch: every curve falls back to the loss, whose best is its lowest
    rows[2]["eval_history"] = [{k: v for k, v in e.items() if k != "eval_bleu"} for e in rows[2]["eval_history"]]
    module.write_results(rows, str(tmp_path), quiet=True)
    results = (tmp_path / "results.md").read_text()
    assert "## Validation loss by epoch" in results and "- s-kd-from-t: 2.930, **2.780**" in results
    # no curve at all (a grid made before metrics kept them): no section and no plot
    (tmp_path / "validation.png").unlink()
    module.write_results([row("teacher", "teacher-t", None, name="t")], str(tmp_path), quiet=True)
    assert "Validation" not in (tmp_path / "results.md").read_text() and not (tmp_path / "validation.png").exists()
