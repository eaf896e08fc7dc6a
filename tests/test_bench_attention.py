"""scripts/bench_attention.py: every kernel and precision is timed and lands in the table."""

import pytest

from conftest import load_script


def _script():
    return load_script("bench_attention")


def test_table_has_a_row_per_length_with_every_case(capsys):
    bench = _script()
    assert bench.main(["--lengths", "4,9", "--batch", "2", "--heads", "2", "--head_dim", "8", "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[0] for row in rows] == ["| 4", "| 9"]
    for row in rows:
        cells = row.strip("| ").split(" | ")
        times = [float(cell) for cell in cells[1:5]]
        assert all(t > 0 for t in times), row
        assert all(float(ratio) > 0 for ratio in cells[5:9]), row
        assert len(cells) == 10, row
        assert cells[-1] in {"fp32 flash", "fp32 math", "bf16 flash", "bf16 math"}


def test_each_case_runs_its_own_kernel():
    from torch.profiler import ProfilerActivity, profile

    bench = _script()
    for precision, kernel in bench.CASES:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            bench.time_case(precision, kernel, (2, 2, 8, 8), repeats=1, causal=True)
        ops = " ".join(event.key for event in prof.key_averages())
        assert ("flash_attention" in ops) == (kernel == "flash"), (precision, kernel)


def test_bad_sizes_are_refused():
    bench = _script()
    with pytest.raises(SystemExit):
        bench.main(["--lengths", "0"])
