"""scripts/bench_bf16.py: every precision of a configuration trains and lands in the table."""

from conftest import load_script


def _script():
    return load_script("bench_bf16")


def test_a_bf16_teacher_is_a_precision_of_distilled_configurations_only():
    bench = _script()
    assert bench.precisions_of(distill=False) == ["fp32", "bf16"]
    assert bench.precisions_of(distill=True) == ["fp32", "bf16", "bf16 teacher"]
    # The float32 student of a bf16 teacher: no autocast, the teacher's weights cast.
    assert bench.PRECISIONS["bf16 teacher"] == ["--bf16", "false", "--teacher_dtype", "bfloat16"]


def test_lstm_configuration_runs_both_precisions(data_dir, ptb_dir, capsys):
    bench = _script()
    assert bench.main(["--configs", "lstm-medium", "--steps", "2", "--seeds", "1", "--data_dir", str(data_dir),
                       "--max_eval_tokens", "700"]) == 0  # fmt: skip
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| lstm-medium |")]
    assert [line.split(" | ")[1] for line in table] == ["fp32", "bf16"]
    assert table[0].split(" | ")[3] == "1.00x"


def test_lstm_student_trains_every_precision_from_its_teacher(data_dir, ptb_dir, tmp_path, capsys):
    import contextlib
    import io

    from seqkd.cli import command_train

    bench = _script()
    teacher = tmp_path / "teacher"
    with contextlib.redirect_stdout(io.StringIO()):
        command_train([str(bench.RECIPES + "/ban_lstm_ptb_small.yaml"), "--data_dir", str(data_dir), *bench.QUIET,
                       "--max_steps", "2", "--lr_scheduler_type", "constant", "--eval_splits", "validation",
                       "--max_eval_tokens", "700",
                       "--output_dir", str(teacher)], distill=False)  # fmt: skip
    assert bench.main(["--configs", "lstm-student", "--steps", "2", "--seeds", "1", "--data_dir", str(data_dir),
                       "--max_eval_tokens", "700", "--lm_teacher", str(teacher / "model")]) == 0  # fmt: skip
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| lstm-student |")]
    assert [line.split(" | ")[1] for line in table] == ["fp32", "bf16", "bf16 teacher"]


def test_lstm_student_needs_its_teacher():
    import pytest

    bench = _script()
    with pytest.raises(SystemExit, match="--lm_teacher"):
        bench.main(["--configs", "lstm-student", "--steps", "2"])


def test_flash_attention_option_turns_off_the_math_kernel_choice(monkeypatch):
    import pytest

    import seqkd.trainer

    monkeypatch.setattr(seqkd.trainer, "_CPU_BF16_MATH_ATTENTION_MAX_LENGTH", 128)  # restored after the test
    bench = _script()
    with pytest.raises(SystemExit, match="unknown configuration"):
        bench.main(["--configs", "nothing", "--bf16_attention", "flash"])
    assert seqkd.trainer._CPU_BF16_MATH_ATTENTION_MAX_LENGTH == 0
