"""The seqkd command: recipes, overrides, train / distill / born-again / evaluate end to end on a tiny corpus."""

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from seqkd.born_again import GenerationEnsemble
from seqkd.cli import main, parse_command_line

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus_dir(cyclic_corpus_dir):
    return cyclic_corpus_dir


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipes") / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": "lstm",
                "model_config": {"embedding_size": 24, "hidden_size": 24, "num_layers": 1, "embedding_dropout": 0.0,
                                 "layer_dropout": 0.0, "output_dropout": 0.0},
                "batching": "stream", "seq_len": 8, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 2,
                "loss": "ce", "optim": "sgd", "learning_rate": 5.0, "max_grad_norm": 0.5, "num_train_epochs": 2,
                "lr_scheduler_type": "reduce_lr_on_plateau",
                "lr_scheduler_kwargs": {"factor": 0.25, "patience": 0, "threshold": 0.0},
                "eval_strategy": "epoch", "save_strategy": "epoch", "save_total_limit": 1, "logging_steps": 20,
                "report_to": "none", "disable_tqdm": True, "use_cpu": True, "seed": 3,
            }
        )  # fmt: skip
    )
    return path


def run(*argv):
    """``seqkd ARGV --debug``: a user error raises, as a bug does, so that tests can match its type."""
    argv = [str(a) for a in argv]
    return main(argv if not argv or argv[0].startswith("-") else [*argv, "--debug"])


def test_help_lists_commands_and_every_field(capsys):
    assert run("--help") == 0
    usage = capsys.readouterr().out
    assert all(command in usage for command in ("train", "distill", "born-again", "evaluate"))
    with pytest.raises(SystemExit) as exit_info:
        run("born-again", "--help")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for field in ("--kd_weight", "--num_generations", "--data_dir", "--teacher_model_name_or_path", "--seq_len"):
        assert field in text
    assert "Ramp the distillation term's weight linearly" in " ".join(text.split())


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "seqkd", "--help"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and "born-again" in result.stdout


def test_command_line_overrides_the_recipe(recipe, tmp_path):
    model_args, data_args, args = parse_command_line(
        "train", [str(recipe), "--learning_rate", "0.5", "--output_dir", str(tmp_path), "--seq_len", "12"]
    )
    assert args.learning_rate == 0.5 and data_args.seq_len == 12
    assert json.loads(model_args.model_config)["hidden_size"] == 24
    assert args.lr_scheduler_kwargs == {"factor": 0.25, "patience": 0, "threshold": 0.0}


def test_bad_recipes_are_refused(tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model: lstm\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown fields \['learning_rat'\]"):
        parse_command_line("train", [str(unknown)])
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("model: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ValueError, match="could not determine a constructor"):  # safe loading: nothing runs
        parse_command_line("train", [str(unsafe)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_command_line("train", [str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_shipped_recipes_parse(name, tmp_path):
    path = REPO / "recipes" / name
    recipe = yaml.safe_load(path.read_text())
    if "teachers" not in recipe:
        parse_command_line("born-again", [str(path), "--output_dir", str(tmp_path), "--use_cpu", "true"])
        return
    # A grid recipe (scripts/translation_grid.py): every cell's command line must parse.
    import importlib.util

    spec = importlib.util.spec_from_file_location("translation_grid", REPO / "scripts" / "translation_grid.py")
    grid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid)
    teachers = [str(path.parent / teacher) for teacher in recipe["teachers"].values()]
    for teacher in teachers:
        parse_command_line("train", [teacher, "--output_dir", str(tmp_path), "--use_cpu", "true"])
    for student in recipe["students"].values():
        if student["model"] == "lstm-seq2seq":  # the model's config must build, too
            from seqkd.models import LSTMSeq2SeqConfig

            LSTMSeq2SeqConfig(vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, **student["model_config"])
        for loss in recipe["losses"].values():
            fields = {**recipe.get("training", {}), **student, **{k: v for k, v in loss.items() if k != "data"}}
            parse_command_line("distill", [teachers[0], *grid._argv(fields), "--output_dir", str(tmp_path), "--use_cpu", "true"])
    grid._read_grid(str(path))  # every loss names data the recipe defines
    for fields in (recipe.get("distilled_data") or {}).values():
        parse_command_line("distill-data", [teachers[0], *grid._argv(fields), "--output_dir", str(tmp_path), "--use_cpu", "true"])


def test_the_cache_pair_recipe_is_the_converged_grids_word_kd_row_with_a_top_64_cache():
    # docs/results.md prices a top-64 cache by this recipe's run against the converged grid's word-KD row (live when
    # the pair ran; the grid now reads a whole-vocabulary cache): the same fields otherwise.
    pair = yaml.safe_load((REPO / "recipes" / "word_kd_cache_pair_multi30k.yaml").read_text())
    grid = yaml.safe_load((REPO / "recipes" / "students_multi30k_converged.yaml").read_text())
    for key in ("training", "eval_num_beams"):
        assert pair[key] == grid[key]
    assert pair["teachers"] == {"ce": grid["teachers"]["ce"]}
    assert pair["students"] == {"transformer-2x2-128": grid["students"]["transformer-2x2-128"]}
    assert pair["losses"] == {"word-kd": grid["losses"]["word-kd"]}
    assert pair["teacher_cache"] == {"cache_top_k": 64} and grid["teacher_cache"]["cache_top_k"] == 0


def test_the_ls_seeds_recipe_is_the_converged_grids_dkd_cells_with_two_more_seeds():
    # It shares the converged grid's output folder so that the grid's seed-1234 runs count as its first seed: that
    # holds only while every field that shapes a run is the grid's.
    seeds = yaml.safe_load((REPO / "recipes" / "ls_question_seeds_multi30k_converged.yaml").read_text())
    grid = yaml.safe_load((REPO / "recipes" / "students_multi30k_converged.yaml").read_text())
    for key in ("teachers", "training", "teacher_cache", "eval_num_beams", "output_dir"):
        assert seeds[key] == grid[key]
    assert seeds["students"] == {"transformer-2x2-128": grid["students"]["transformer-2x2-128"]}
    assert seeds["losses"] == {"dkd": grid["losses"]["dkd"]}
    own_seed = yaml.safe_load((REPO / "recipes" / grid["teachers"]["ce"]).read_text())["seed"]
    assert seeds["seeds"][0] == own_seed and len(set(seeds["seeds"])) == 3
    assert "seeds" not in grid


def test_train_distill_evaluate(recipe, corpus_dir, tmp_path, capsys):
    teacher_dir = tmp_path / "teacher"
    run("train", recipe, "--dataset", corpus_dir, "--output_dir", teacher_dir)
    metrics = json.loads((teacher_dir / "model" / "metrics.json").read_text())
    assert metrics["test_perplexity"] < 14  # uniform over the 15-token vocabulary would be 15
    assert (teacher_dir / "model" / "model.safetensors").is_file()
    assert (teacher_dir / "model" / "tokenizer.json").is_file()

    capsys.readouterr()
    run("evaluate", recipe, "--dataset", corpus_dir, "--model_name_or_path", teacher_dir / "model", "--split", "test",
        "--output_dir", tmp_path / "eval")  # fmt: skip
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["perplexity"] == pytest.approx(metrics["test_perplexity"], rel=1e-6)

    student_dir = tmp_path / "student"
    run("distill", recipe, "--dataset", corpus_dir, "--output_dir", student_dir, "--loss", "dkd", "--beta", "2.0",
        "--teacher_model_name_or_path", teacher_dir / "model")  # fmt: skip
    student = json.loads((student_dir / "model" / "metrics.json").read_text())
    assert student["test_perplexity"] < 14
    state = json.loads(next((student_dir).glob("checkpoint-*/trainer_state.json")).read_text())
    assert any("loss_nckd" in entry for entry in state["log_history"])


def test_distill_and_train_refuse_a_missing_teacher(recipe, corpus_dir, tmp_path):
    with pytest.raises(ValueError, match="seqkd distill needs --teacher_model_name_or_path"):
        run("distill", recipe, "--dataset", corpus_dir, "--output_dir", tmp_path, "--loss", "kd")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run("distill", recipe, "--dataset", corpus_dir, "--output_dir", tmp_path, "--loss", "kd",
            "--teacher_model_name_or_path", tmp_path / "nothing")  # fmt: skip
    with pytest.raises(ValueError, match="loss 'kd' needs a teacher"):
        run("train", recipe, "--dataset", corpus_dir, "--output_dir", tmp_path, "--loss", "kd")


@pytest.mark.parametrize("bf16", ["false", "true"])  # true: CPU autocast on a machine without a GPU
def test_born_again_writes_generations_results_plot_and_skips_finished_ones(recipe, corpus_dir, tmp_path, capsys, bf16):
    out = tmp_path / "ban"
    argv = ["born-again", recipe, "--dataset", corpus_dir, "--output_dir", out, "--loss", "ban", "--num_generations", "1",
            "--bf16", bf16]  # fmt: skip
    run(*argv)
    for generation in (0, 1):
        assert (out / f"gen-{generation}" / "model" / "model.safetensors").is_file()
        metrics = json.loads((out / f"gen-{generation}" / "metrics.json").read_text())
        assert metrics["loss"] == ("ce" if generation == 0 else "ban")
        assert math.isfinite(metrics["validation_perplexity"]) and math.isfinite(metrics["test_perplexity"])
        # each generation's curve while it trained (2 epochs), which results.md lists with the best in bold
        curve = [e["eval_perplexity"] for e in metrics["eval_history"]]
        assert [e["epoch"] for e in metrics["eval_history"]] == [1.0, 2.0]
        best = min(curve)
        line = ", ".join(f"**{v:.1f}**" if v == best else f"{v:.1f}" for v in curve)
        assert f"- generation {generation}: {line}" in (out / "results.md").read_text()
    results = (out / "results.md").read_text()
    assert "| 0 | ce |" in results and "| 1 | ban |" in results and "| ensemble |" in results
    assert (out / "perplexity.png").stat().st_size > 1000
    stamp = (out / "gen-1" / "model" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    run(*argv)  # a restart: both generations are finished, only the ensemble is evaluated again
    assert (out / "gen-1" / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    assert "| ensemble |" in capsys.readouterr().out


def test_ensemble_is_the_mean_of_the_members_probabilities():
    from seqkd.models import LSTMForCausalLM, LSTMLMConfig

    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(LSTMForCausalLM(LSTMLMConfig(vocab_size=11, embedding_size=8, hidden_size=8, num_layers=1)).eval())
    ids = torch.randint(0, 11, (2, 5))
    out = GenerationEnsemble(members)(input_ids=ids)
    expected = (members[0](input_ids=ids).logits.softmax(-1) + members[1](input_ids=ids).logits.softmax(-1)) / 2
    torch.testing.assert_close(out.logits.exp(), expected)
    assert len(out.state) == 2
    # Carrying the members' states: two halves equal one pass.
    first = GenerationEnsemble(members)(input_ids=ids[:, :3])
    second = GenerationEnsemble(members)(input_ids=ids[:, 3:], state=first.state)
    torch.testing.assert_close(second.logits, out.logits[:, 3:])


def test_a_born_again_recipe_serves_every_command(tmp_path):
    recipe = REPO / "recipes" / "ban_lstm_ptb_small.yaml"
    _, _, args, eval_args = parse_command_line("evaluate", [str(recipe), "--model_name_or_path", "m", "--output_dir", str(tmp_path)])
    assert args.learning_rate == 20.0 and eval_args.model_name_or_path == "m"
    parse_command_line("train", [str(recipe), "--loss", "ce", "--output_dir", str(tmp_path)])


def test_train_with_a_born_again_recipe_trains_generation_0_with_its_teacher_loss(recipe, corpus_dir, tmp_path, caplog):
    ban_recipe = tmp_path / "ban.yaml"
    ban_recipe.write_text(recipe.read_text() + "loss: ban\nteacher_loss: ls\nnum_generations: 2\n")
    out = tmp_path / "gen0"
    with caplog.at_level("INFO", logger="seqkd"):
        run("train", ban_recipe, "--dataset", corpus_dir, "--output_dir", out, "--max_steps", "5", "--logging_steps", "5")
    assert "training generation 0 with its teacher_loss 'ls'" in caplog.text
    state = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())
    assert any("loss_nll" in entry for entry in state["log_history"])  # label smoothing logs the plain NLL too
    assert not any("loss_kd" in entry for entry in state["log_history"])
    with pytest.raises(ValueError, match="loss 'ban' needs a teacher"):  # the command line's own choice stands
        run("train", ban_recipe, "--dataset", corpus_dir, "--output_dir", tmp_path / "x", "--loss", "ban")


def test_transformer_lm_on_blocks(recipe, corpus_dir, tmp_path):
    out = tmp_path / "gpt2"
    run("train", recipe, "--dataset", corpus_dir, "--output_dir", out, "--model", "gpt2-tiny", "--batching", "blocks",
        "--optim", "adamw_torch", "--learning_rate", "0.003", "--lr_scheduler_type", "constant", "--max_grad_norm", "1.0")  # fmt: skip
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert metrics["test_perplexity"] < 14


def test_cache_teacher_then_distill_from_the_cache(recipe, corpus_dir, tmp_path, capsys):
    teacher_dir, cache_dir = tmp_path / "teacher", tmp_path / "cache"
    run("train", recipe, "--dataset", corpus_dir, "--output_dir", teacher_dir, "--num_train_epochs", "1")
    capsys.readouterr()
    run("cache-teacher", recipe, "--dataset", corpus_dir, "--teacher_model_name_or_path", teacher_dir / "model",
        "--teacher_cache", cache_dir, "--cache_top_k", "5", "--cache_shard_tokens", "2000")  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["layout"]["kind"] == "stream" and summary["layout"]["rows"] == 4
    assert summary["shards"] > 1 and summary["top_k"] == 5
    assert (cache_dir / "tokenizer.json").is_file()

    # No teacher model needed; the cache brings the teacher's tokenizer. Another BPTT length reads the same cache.
    student_dir = tmp_path / "student"
    run("distill", recipe, "--dataset", corpus_dir, "--output_dir", student_dir, "--loss", "kd",
        "--teacher_cache", cache_dir, "--seq_len", "5")  # fmt: skip
    student = json.loads((student_dir / "model" / "metrics.json").read_text())
    assert student["test_perplexity"] < 14
    state = json.loads(next(student_dir.glob("checkpoint-*/trainer_state.json")).read_text())
    assert any("loss_kd" in entry for entry in state["log_history"])

    # The sampled format from the command line: exact top 2 and 4 draws per token, then a student from it.
    sampled_dir = tmp_path / "sampled"
    run("cache-teacher", recipe, "--dataset", corpus_dir, "--teacher_model_name_or_path", teacher_dir / "model",
        "--teacher_cache", sampled_dir, "--cache_format", "sampled", "--cache_top_k", "2", "--cache_samples", "4")  # fmt: skip
    manifest = json.loads((sampled_dir / "manifest.json").read_text())
    assert manifest["top_k"] == 2 and manifest["sampling"] == {"samples": 4, "temperature": 1.0, "seed": 0}
    run("distill", recipe, "--dataset", corpus_dir, "--output_dir", tmp_path / "from-sampled", "--loss", "kd",
        "--teacher_cache", sampled_dir, "--max_steps", "3")  # fmt: skip

    with pytest.raises(ValueError, match="layout"):
        run("distill", recipe, "--dataset", corpus_dir, "--output_dir", tmp_path / "other", "--loss", "kd",
            "--teacher_cache", cache_dir, "--per_device_train_batch_size", "2")  # fmt: skip
    with pytest.raises(ValueError, match="needs --teacher_cache"):
        run("cache-teacher", recipe, "--dataset", corpus_dir, "--teacher_model_name_or_path", teacher_dir / "model")
    with pytest.raises(FileNotFoundError, match="seqkd cache-teacher"):
        run("distill", recipe, "--dataset", corpus_dir, "--output_dir", tmp_path / "other", "--loss", "kd",
            "--teacher_cache", tmp_path / "no-cache")  # fmt: skip


def test_born_again_from_cached_generations(recipe, corpus_dir, tmp_path):
    out = tmp_path / "ban"
    run("born-again", recipe, "--dataset", corpus_dir, "--output_dir", out, "--loss", "ban", "--num_generations", "2",
        "--num_train_epochs", "1", "--cache_teacher", "true", "--cache_top_k", "4", "--ensemble", "false")  # fmt: skip
    for generation in (0, 1):
        manifest = json.loads((out / f"gen-{generation}" / "teacher-cache" / "manifest.json").read_text())
        assert manifest["complete"] and manifest["top_k"] == 4
    assert not (out / "gen-2" / "teacher-cache").exists()
    metrics = json.loads((out / "gen-2" / "metrics.json").read_text())
    assert metrics["loss"] == "ban" and metrics["test_perplexity"] < 14


def test_early_stopping_keeps_the_best_checkpoint_and_reports_the_epochs(recipe, corpus_dir, tmp_path, request):
    # Learning rate 0: the validation loss never improves after the first evaluation, so patience 2 stops the
    # run after its third epoch of ten, and the model saved is the first epoch's (the best).
    out = tmp_path / "early"
    warnings = logging.Handler(logging.WARNING)
    warnings.records = []
    warnings.emit = warnings.records.append
    logging.getLogger("transformers").addHandler(warnings)
    request.addfinalizer(lambda: logging.getLogger("transformers").removeHandler(warnings))
    run("train", recipe, "--dataset", corpus_dir, "--output_dir", out, "--num_train_epochs", "10", "--learning_rate", "0",
        "--lr_scheduler_type", "constant", "--early_stopping_patience", "2", "--save_total_limit", "1")  # fmt: skip
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    steps_per_epoch = metrics["best_step"]
    assert metrics["stopped_early"] and metrics["epochs"] == pytest.approx(3.0) and metrics["best_epoch"] == 1.0
    assert metrics["teacher_signal"] == "none"  # trained from labels alone
    # the finished run keeps the best checkpoint alone (transformers drops the last one at the end with limit 1)
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{steps_per_epoch}"]
    assert metrics["best_metric"] == pytest.approx(metrics["validation_loss"], rel=1e-6)
    # the validation curve, one point per epoch, stays in metrics.json after the checkpoints are gone
    history = metrics["eval_history"]
    assert [(e["epoch"], e["step"]) for e in history] == [(float(i), i * steps_per_epoch) for i in (1, 2, 3)]
    assert history[0]["eval_loss"] == pytest.approx(metrics["best_metric"], rel=1e-6)
    assert not any(k.endswith(("_runtime", "_per_second")) for e in history for k in e)
    # the final evaluations (validation_*, test_*) do not wake the stopper, which would warn that eval_* is missing
    assert not [r for r in warnings.records if "early stopping required" in r.getMessage()]
    with pytest.raises(ValueError, match="early_stopping_patience needs evaluations"):
        run("train", recipe, "--dataset", corpus_dir, "--output_dir", tmp_path / "no-eval", "--eval_strategy", "no",
            "--save_strategy", "no", "--lr_scheduler_type", "constant", "--early_stopping_patience", "2")  # fmt: skip
    # patience 0 switches off a recipe's early stopping: the whole budget, no evaluations needed, no best model kept
    run("train", recipe, "--dataset", corpus_dir, "--output_dir", tmp_path / "fixed", "--eval_strategy", "no",
        "--save_strategy", "no", "--lr_scheduler_type", "constant", "--num_train_epochs", "2",
        "--early_stopping_patience", "0")  # fmt: skip
    metrics = json.loads((tmp_path / "fixed" / "model" / "metrics.json").read_text())
    assert metrics["epochs"] == pytest.approx(2.0) and "stopped_early" not in metrics


def test_a_run_resumed_on_a_plateau_keeps_its_patience_count(recipe, corpus_dir, tmp_path):
    # Learning rate 0: no epoch after the first improves. A run that its budget stopped after epoch 2 (one epoch
    # without improvement), resumed with a larger budget, must stop after epoch 4 under patience 3, as the same run
    # uninterrupted does; counting afresh from the resume would train on to epoch 5.
    import shutil

    common = ("--dataset", corpus_dir, "--learning_rate", "0", "--lr_scheduler_type", "constant",
              "--early_stopping_patience", "3", "--save_total_limit", "2")  # fmt: skip
    out = tmp_path / "resumed"
    run("train", recipe, *common, "--output_dir", out, "--num_train_epochs", "2")
    first = json.loads((out / "model" / "metrics.json").read_text())
    assert first["epochs"] == pytest.approx(2.0) and first["stopped_early"] is False
    shutil.rmtree(out / "model")  # what an interrupted run leaves behind: its checkpoints, no model
    run("train", recipe, *common, "--output_dir", out, "--num_train_epochs", "10")
    resumed = json.loads((out / "model" / "metrics.json").read_text())
    run("train", recipe, *common, "--output_dir", tmp_path / "uninterrupted", "--num_train_epochs", "10")
    uninterrupted = json.loads((tmp_path / "uninterrupted" / "model" / "metrics.json").read_text())
    for metrics in (resumed, uninterrupted):
        assert metrics["stopped_early"] and metrics["epochs"] == pytest.approx(4.0) and metrics["best_epoch"] == 1.0
    # the resumed run's curve includes the evaluations made before the interruption
    assert [e["epoch"] for e in resumed["eval_history"]] == [e["epoch"] for e in uninterrupted["eval_history"]] == [
        1.0, 2.0, 3.0, 4.0
    ]


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("spelling", [["--bf16", "auto"], ["--bf16=AUTO"], "recipe"])
def test_bf16_auto_is_bf16_exactly_where_the_cpu_computes_in_it(native, spelling, tmp_path, monkeypatch, caplog):
    import logging

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: bf16 auto asks the GPU")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: lstm\nbf16: auto\n" if spelling == "recipe" else "model: lstm\n")
    flags = [] if spelling == "recipe" else spelling
    with caplog.at_level(logging.INFO, logger="seqkd"):
        _, _, args = parse_command_line("train", [str(recipe), *flags, "--output_dir", str(tmp_path / "o")])
    assert args.bf16 is native
    assert args.use_cpu is native  # bf16 on a machine without a GPU is CPU autocast
    assert ("bf16 auto: on" if native else "bf16 auto: off") in caplog.text
    # An explicit value later on the command line still wins over the recipe's auto.
    if spelling == "recipe":
        _, _, args = parse_command_line("train", [str(recipe), "--bf16", "false", "--output_dir", str(tmp_path / "o")])
        assert args.bf16 is False


def test_bf16_accepts_only_booleans_and_auto(tmp_path):
    from seqkd.errors import UserError

    # A bare --bf16 is transformers' "true", whatever follows it.
    _, _, args = parse_command_line("train", ["--bf16", "--output_dir", str(tmp_path / "o")])
    assert args.bf16 is True

    with pytest.raises(UserError, match="bf16 must be true, false or auto, got 'sometimes'"):
        parse_command_line("train", ["--bf16", "sometimes", "--output_dir", str(tmp_path / "o")])
