"""scripts/bench_bf16.py: every precision of a configuration trains and lands in the table."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_bf16.py"


def _script():
    spec = importlib.util.spec_from_file_location("bench_bf16", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
