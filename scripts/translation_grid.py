"""Label-smoothed vs plain teachers, distilled into students, on a translation corpus: the whole grid.

    python scripts/translation_grid.py recipes/students_multi30k.yaml --data_dir ../shared/data [--field value ...]

Trains each teacher of the grid recipe (skipping those already trained), measures its BLEU, chrF, perplexity
and stability, trains every student by every loss ('ce' once, from labels; the others once per teacher), and
writes OUTPUT/results.md and OUTPUT/bleu.png. Fields after the recipe override every run. A restarted grid
skips finished runs and resumes unfinished ones from their last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

from seqkd.cli import command_evaluate, command_train

GRID_KEYS = {"teachers", "students", "losses", "training", "output_dir"}


def _argv(fields: dict) -> list[str]:
    argv = []
    for key, value in fields.items():
        if isinstance(value, dict):
            value = json.dumps(value)
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def _metrics(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, "model", "metrics.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_grid(recipe_path: str, overrides: list[str], output_dir: str | None = None) -> list[dict]:
    with open(recipe_path) as f:
        grid = yaml.safe_load(f)
    unknown = set(grid) - GRID_KEYS
    if unknown:
        raise ValueError(f"grid recipe {recipe_path} has unknown keys {sorted(unknown)}; expected {sorted(GRID_KEYS)}")
    for key in ("teachers", "students", "losses"):
        if not grid.get(key):
            raise ValueError(f"grid recipe {recipe_path} needs a non-empty {key!r} section")
    here = os.path.dirname(os.path.abspath(recipe_path))
    output = output_dir or grid.get("output_dir", "runs/grid")
    rows = []

    teacher_dirs = {}
    for name, teacher_recipe in grid["teachers"].items():
        teacher_recipe = os.path.join(here, teacher_recipe)
        run_dir = os.path.join(output, f"teacher-{name}")
        teacher_dirs[name] = (teacher_recipe, run_dir)
        if _metrics(run_dir) is None:
            print(f"\n=== teacher {name} ===", flush=True)
            command_train([teacher_recipe, *overrides, "--output_dir", run_dir], distill=False)
        metrics = _metrics(run_dir)
        stability_path = os.path.join(run_dir, "stability.json")
        if not os.path.exists(stability_path):
            evaluated = command_evaluate(
                [teacher_recipe, *overrides, "--model_name_or_path", os.path.join(run_dir, "model"),
                 "--split", "validation", "--stability", "true", "--output_dir", os.path.join(run_dir, "eval")]
            )  # fmt: skip
            with open(stability_path, "w") as f:
                json.dump(evaluated, f, indent=2)
        with open(stability_path) as f:
            metrics["stability"] = json.load(f)["stability"]
        rows.append({"role": "teacher", "name": name, "loss": name, "teacher": "", "run": os.path.basename(run_dir), **metrics})

    base_recipe = next(iter(teacher_dirs.values()))[0]
    for student, student_fields in grid["students"].items():
        for loss_name, loss_fields in grid["losses"].items():
            teachers = [None] if loss_fields.get("loss") in ("ce", "ls") else list(teacher_dirs)
            for teacher in teachers:
                run_dir = os.path.join(output, f"{student}-{loss_name}" + (f"-from-{teacher}" if teacher else ""))
                if _metrics(run_dir) is None:
                    print(f"\n=== student {student}, {loss_name}" + (f" from teacher {teacher}" if teacher else "") + " ===", flush=True)
                    fields = {**grid.get("training", {}), **student_fields, **loss_fields}
                    if teacher:
                        fields["teacher_model_name_or_path"] = os.path.join(teacher_dirs[teacher][1], "model")
                    command_train([base_recipe, *_argv(fields), *overrides, "--output_dir", run_dir], distill=bool(teacher))
                rows.append({"role": "student", "name": student, "loss": loss_name, "teacher": teacher or "",
                             "run": os.path.basename(run_dir), **_metrics(run_dir)})  # fmt: skip
    write_results(rows, output)
    return rows


def write_results(rows: list[dict], output: str) -> None:
    teachers = [r for r in rows if r["role"] == "teacher"]
    students = [r for r in rows if r["role"] == "student"]
    lines = ["# Label-smoothed vs plain teachers, distilled", "", "## Teachers", "",
             "| teacher | test BLEU | test chrF | test perplexity | validation BLEU | validation stability | train time (s) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in teachers:
        lines.append(
            f"| {r['name']} | {r['test_bleu']:.2f} | {r['test_chrf']:.2f} | {r['test_perplexity']:.2f} | "
            f"{_number(r.get('validation_bleu'), '.2f')} | {r['stability']:.4f} | {_number(r.get('train_runtime_s'), '.0f')} |"
        )
    lines += ["", "## Students", "",
              "| student | loss | teacher | test BLEU | test chrF | vs CE-only BLEU | train time (s) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    ce_only = {r["name"]: r["test_bleu"] for r in students if r["teacher"] == ""}
    for r in students:
        delta = r["test_bleu"] - ce_only.get(r["name"], float("nan"))
        lines.append(
            f"| {r['name']} | {r['loss']} | {r['teacher'] or '-'} | {r['test_bleu']:.2f} | {r['test_chrf']:.2f} | "
            f"{'' if r['teacher'] == '' else f'{delta:+.2f}'} | {_number(r.get('train_runtime_s'), '.0f')} |"
        )
    lines += _teacher_comparison(teachers, students)
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(output, "rows.json"), "w") as f:  # what scripts/paired_bleu.py compares
        json.dump(rows, f, indent=2)
    _plot(teachers, students, output)
    print("\n".join(lines))


def _number(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _teacher_comparison(teachers: list[dict], students: list[dict]) -> list[str]:
    """Each student and loss taught by every teacher, side by side: which teacher distils the better student."""
    names = [t["name"] for t in teachers]
    bleu = {(r["name"], r["loss"], r["teacher"]): r["test_bleu"] for r in students if r["teacher"]}
    cells = list(dict.fromkeys((student, loss) for student, loss, _ in bleu))
    if len(names) != 2 or not cells:
        return []
    first, second = names
    lines = ["", f"## Teacher {first} against teacher {second}, test BLEU of the same student and loss", "",
             f"| student | loss | from {first} | from {second} | {first} - {second} |", "|---|---|---|---|---|"]  # fmt: skip
    for student, loss in cells:
        a, b = bleu.get((student, loss, first)), bleu.get((student, loss, second))
        if a is not None and b is not None:
            lines.append(f"| {student} | {loss} | {a:.2f} | {b:.2f} | {a - b:+.2f} |")
    return lines


def _plot(teachers: list[dict], students: list[dict], output: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"teacher {r['name']}" for r in teachers] + [
        f"{r['name']}\n{r['loss']}" + (f" <- {r['teacher']}" if r["teacher"] else "") for r in students
    ]
    values = [r["test_bleu"] for r in teachers + students]
    colors = ["0.4"] * len(teachers) + [
        {"": "C7", **{t["name"]: f"C{i}" for i, t in enumerate(teachers)}}[r["teacher"]] for r in students
    ]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(values)), 4.5))
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("test BLEU")
    ax.set_title("Teachers and distilled students (colour: the student's teacher)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(output, "bleu.png"), dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="a grid recipe such as recipes/students_multi30k.yaml")
    parser.add_argument("--output_dir", default=None, help="where the runs and results go (default: the recipe's)")
    args, overrides = parser.parse_known_args(argv)
    if not os.path.isfile(args.recipe):
        parser.error(f"grid recipe {args.recipe!r} does not exist")
    run_grid(args.recipe, overrides, args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
