"""scripts/translation_grid.py: two teachers, a student by CE and by KD from each, results table and plot."""

import importlib.util
from pathlib import Path

import yaml

from test_translation_cli import parallel_dir, recipe  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]


def load_grid_module():
    spec = importlib.util.spec_from_file_location("translation_grid", REPO / "scripts" / "translation_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_trains_every_cell_writes_results_and_skips_finished_runs(recipe, tmp_path, capsys):  # noqa: F811
    teacher = yaml.safe_load(recipe.read_text())
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
            }
        )
    )
    module = load_grid_module()
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
    assert (out / "bleu.png").stat().st_size > 1000
    stamp = (out / "tiny-kd-from-ls" / "model" / "metrics.json").stat().st_mtime_ns
    module.run_grid(str(grid), [], str(out))  # everything finished: nothing is trained again
    assert (out / "tiny-kd-from-ls" / "model" / "metrics.json").stat().st_mtime_ns == stamp
