"""Teachers distilled into students on a translation corpus, word level and sequence level: the whole grid.

    python scripts/translation_grid.py recipes/students_multi30k.yaml --data_dir ../shared/data [--field value ...]
    python scripts/translation_grid.py recipes/sequence_kd_multi30k.yaml --data_dir ../shared/data

Trains every student that learns from labels alone, then teacher by teacher: the teacher (skipped when already
trained), its BLEU, chrF, perplexity and stability, and every student it teaches: by a word-level loss
(``kd``, ``dkd``, ...), by training on the teacher's distilled data (a ``data`` entry naming a corpus of the
recipe's ``distilled_data`` section, decoded by ``seqkd distill-data`` just before the first student that
reads it), or both. ``teacher_cache`` (fields of ``seqkd cache-teacher``, e.g. ``{cache_top_k: 64}``) makes the
word-level students on gold targets read a cache of their teacher, written once per teacher, instead of running it
at every step. ``eval_num_beams`` adds test BLEU, chrF and decoding speed (sentences/s, each student against its
teacher) with those beams. OUTPUT/results.md, OUTPUT/rows.json, OUTPUT/bleu.png and OUTPUT/validation.png (every
run's validation curve) are rewritten after every finished run, whole or not at all, and list every finished run
that an earlier call listed too. Fields after the recipe override every run. A
restarted grid skips finished runs and resumes unfinished ones from their last checkpoint (and an interrupted
distilled corpus from its last whole shard). ``seeds`` (a list) trains every student once per seed: the
run with the recipe's own seed keeps its plain folder name (so runs made before seeds were listed count), the others
get ``-seedN``; results.md then adds each cell's mean and standard deviation over its seeds. ``--only PATTERN ...``
trains only the runs whose folder names match (shell patterns, e.g. ``'*-seq-kd-from-ce'``) and the teachers they
need, so that a long grid can be run in the order its answers are wanted.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import statistics
import sys
import time
from typing import NamedTuple

import yaml

from seqkd.cli import command_cache_teacher, command_distill_data, command_evaluate, command_train, parse_command_line
from seqkd.files import save_figure_atomically, write_json_atomically, write_text_atomically
from seqkd.sequence_kd import MANIFEST_FILE
from seqkd.trainer import eval_curve, format_curve

GRID_KEYS = {"teachers", "students", "losses", "training", "output_dir", "distilled_data", "eval_num_beams", "teacher_cache",
             "seeds"}  # fmt: skip
TEACHER_FREE_LOSSES = ("ce", "ls")


class StudentRun(NamedTuple):
    student: str
    loss_name: str
    loss_fields: dict
    fields: dict  # the run's grid fields: training, then student, then loss
    data: str  # "gold" or a distilled corpus of the recipe
    seed: int
    run_dir: str
    distill: bool  # whether the run learns from a teacher's outputs
    extra_seed: bool  # one of the recipe's ``seeds`` other than the run's own


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


def _read_grid(recipe_path: str) -> dict:
    with open(recipe_path) as f:
        grid = yaml.safe_load(f)
    unknown = set(grid) - GRID_KEYS
    if unknown:
        raise ValueError(f"grid recipe {recipe_path} has unknown keys {sorted(unknown)}; expected {sorted(GRID_KEYS)}")
    for key in ("teachers", "students", "losses"):
        if not grid.get(key):
            raise ValueError(f"grid recipe {recipe_path} needs a non-empty {key!r} section")
    data = grid.get("distilled_data") or {}
    for loss_name, loss_fields in grid["losses"].items():
        name = loss_fields.get("data", "gold")
        if name != "gold" and name not in data:
            raise ValueError(
                f"loss {loss_name!r} of grid recipe {recipe_path} trains on data {name!r}, which its distilled_data "
                f"section does not define (it defines {sorted(data) or 'none'}); use 'gold' or add it there"
            )
    beams = grid.get("eval_num_beams") or []
    if not all(isinstance(k, int) and k >= 1 for k in beams):
        raise ValueError(f"eval_num_beams of grid recipe {recipe_path} must list beam sizes >= 1, got {beams}")
    seeds = grid.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                              or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):  # fmt: skip
        raise ValueError(f"seeds of grid recipe {recipe_path} must be a non-empty list of distinct integers, got {seeds!r}")
    return grid


def _student_cells(grid: dict, teacher: str | None):
    """(student, loss name, loss fields, data name) of every run taught by ``teacher`` (None: by labels alone)."""
    for student in grid["students"]:
        for loss_name, loss_fields in grid["losses"].items():
            data = loss_fields.get("data", "gold")
            # A run depends on a teacher through its loss (word-level KD) or through its data (distilled targets).
            taught = loss_fields.get("loss") not in TEACHER_FREE_LOSSES or data != "gold"
            if taught == (teacher is not None):
                yield student, loss_name, {k: v for k, v in loss_fields.items() if k != "data"}, data


def _seeded(cells, seeds: list[int] | None):
    """Each cell once per seed (None: the recipe's own), seed by seed: a grid cut short has every cell at its first
    seed before any cell gets a second."""
    cells = list(cells)
    for seed in seeds or [None]:
        for cell in cells:
            yield (*cell, seed)


def _beam_metrics(run_dir: str, recipe: str, overrides: list[str], num_beams: int) -> dict:
    """Test BLEU and chrF of the run's model decoding with a beam of ``num_beams``, computed once and kept."""
    path = os.path.join(run_dir, f"test_beam{num_beams}.json")
    if not os.path.exists(path):
        evaluated = command_evaluate(
            [recipe, *overrides, "--model_name_or_path", os.path.join(run_dir, "model"), "--split", "test",
             "--generation_num_beams", str(num_beams), "--output_dir", os.path.join(run_dir, "eval")]
        )  # fmt: skip
        write_json_atomically(path, {key: evaluated[key] for key in ("bleu", "chrf", "decode_seconds", "sentences_per_second")})
    with open(path) as f:
        scores = json.load(f)
    # Files kept from before decoding was timed have no speed: the tables show '-' rather than decode again.
    return {f"test_bleu_beam{num_beams}": scores["bleu"], f"test_chrf_beam{num_beams}": scores["chrf"],
            f"test_sentences_per_second_beam{num_beams}": scores.get("sentences_per_second")}


def _distilled_data(output: str, name: str, fields: dict, teacher: str, teacher_recipe: str, teacher_model: str,
                    overrides: list[str]) -> dict:
    """The teacher's distilled corpus ``name`` (written once by ``seqkd distill-data``, resumed if interrupted)."""
    data_dir = os.path.join(output, f"data-{name}-from-{teacher}")
    manifest_path = os.path.join(data_dir, MANIFEST_FILE)
    complete = False
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            complete = bool(json.load(f).get("complete"))
    if not complete:
        print(f"\n=== distilled data {name} from teacher {teacher} ===", flush=True)
        command_distill_data([teacher_recipe, *_argv(fields), *overrides, "--teacher_model_name_or_path", teacher_model,
                              "--output_dir", data_dir])  # fmt: skip
    with open(manifest_path) as f:
        manifest = json.load(f)
    decoding = manifest.get("decoding") or {}
    return {"role": "data", "name": name, "teacher": teacher, "dir": os.path.basename(data_dir),
            "method": manifest["method"], **manifest["counts"], "decode_seconds": decoding.get("seconds"),
            "sentences_per_second": decoding.get("sentences_per_second")}  # fmt: skip


def _teacher_cache(output: str, teacher: str, recipe: str, teacher_model: str, fields: dict, overrides: list[str]) -> dict:
    """The teacher's cache of the gold training set (written once by ``seqkd cache-teacher``, resumed if interrupted),
    as the students build that set from ``recipe`` and ``fields``."""
    cache_dir = os.path.join(output, f"cache-from-{teacher}")
    summary_path = cache_dir + ".json"
    if not os.path.isfile(summary_path):
        print(f"\n=== teacher cache from teacher {teacher} ===", flush=True)
        started = time.perf_counter()
        summary = command_cache_teacher([recipe, *_argv(fields), *overrides, "--teacher_model_name_or_path",
                                         teacher_model, "--teacher_cache", cache_dir])  # fmt: skip
        summary["write_seconds"] = round(time.perf_counter() - started, 1)
        write_json_atomically(summary_path, summary)
    return _cache_row(output, teacher)


def _row_key(row: dict) -> tuple[str, str]:
    return row["role"], row.get("run") or row["dir"]


def _listed_rows(output: str) -> list[dict]:
    """The rows of OUTPUT/rows.json whose runs (finished), caches or corpora are still in OUTPUT."""
    path = os.path.join(output, "rows.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        rows = json.load(f)
    return [r for r in rows if (_metrics(os.path.join(output, r["run"])) is not None if "run" in r
                                else os.path.isdir(os.path.join(output, r["dir"])))]


def _cache_row(output: str, teacher: str) -> dict:
    cache_dir = os.path.join(output, f"cache-from-{teacher}")
    with open(cache_dir + ".json") as f:
        summary = json.load(f)
    return {"role": "cache", "teacher": teacher, "dir": os.path.basename(cache_dir), "top_k": summary["top_k"],
            "sampling": summary.get("sampling"), "dtype": summary["dtype"], "bytes_per_token": summary["bytes_per_token"],
            "write_seconds": summary.get("write_seconds")}  # fmt: skip


def run_grid(recipe_path: str, overrides: list[str], output_dir: str | None = None,
             only: list[str] | None = None) -> list[dict]:
    """Train and score every run of the grid, teacher by teacher, writing the tables after each finished run.

    ``only`` (shell patterns on run folder names, e.g. ``*-seq-kd-from-ce``) trains only the runs it matches,
    and the teachers those runs need; finished runs are scored and listed whether or not they match."""
    grid = _read_grid(recipe_path)
    here = os.path.dirname(os.path.abspath(recipe_path))
    output = output_dir or grid.get("output_dir", "runs/grid")
    beams = grid.get("eval_num_beams") or []
    teacher_recipes = {name: os.path.join(here, path) for name, path in grid["teachers"].items()}
    # The data fields (corpus, languages, tokenization) of every student are the first teacher's.
    base_recipe = next(iter(teacher_recipes.values()))
    rows = []
    # Finished runs listed by an earlier call stay in the tables until this call reaches them, so that a grid stopped
    # part-way, or run piece by piece with --only, never lists fewer finished runs than it did.
    listed_before = _listed_rows(output)

    def write_so_far() -> None:
        reached = {_row_key(r) for r in rows}
        write_results(rows + [r for r in listed_before if _row_key(r) not in reached], output, quiet=True)

    def scored(run_dir: str, recipe: str) -> dict:
        extra = {}
        for k in beams:
            extra.update(_beam_metrics(run_dir, recipe, overrides, k))
        return {**_metrics(run_dir), **extra}

    def selected(run_dir: str) -> bool:
        return only is None or any(fnmatch.fnmatchcase(os.path.basename(run_dir), pattern) for pattern in only)

    def student_runs(teacher: str | None):
        """Every run taught by ``teacher`` (None: by labels alone), as a :class:`StudentRun`."""
        for student, loss_name, loss_fields, data, seed in _seeded(_student_cells(grid, teacher), grid.get("seeds")):
            fields = {**grid.get("training", {}), **grid["students"][student], **loss_fields}
            distill = loss_fields.get("loss") not in TEACHER_FREE_LOSSES
            # The seed the run's own command line gives it (recipe, grid fields, then the overrides).
            own_seed = parse_command_line("distill" if distill else "train",
                                          [base_recipe, *_argv(fields), *overrides, "--output_dir", output])[2].seed  # fmt: skip
            seed = own_seed if seed is None else seed
            run_dir = os.path.join(output, f"{student}-{loss_name}" + (f"-from-{teacher}" if teacher else "")
                                   + (f"-seed{seed}" if seed != own_seed else ""))  # fmt: skip
            yield StudentRun(student, loss_name, loss_fields, fields, data, seed, run_dir, distill, seed != own_seed)

    # Every student run of the grid, by its teacher (None: taught by labels alone), built once.
    runs_by_teacher = {teacher: list(student_runs(teacher)) for teacher in (None, *teacher_recipes)}
    if only is not None:
        names = [os.path.basename(r.run_dir) for r in runs_by_teacher[None]]
        for name in teacher_recipes:
            names += [f"teacher-{name}", *(os.path.basename(r.run_dir) for r in runs_by_teacher[name])]
        unmatched = [p for p in only if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise ValueError(f"--only pattern(s) {unmatched} match no run of grid recipe {recipe_path}; its runs are "
                             f"{names}")  # fmt: skip

    def train_students(teacher: str | None, teacher_model: str | None):
        for student, loss_name, loss_fields, fields, data, seed, run_dir, distill, extra_seed in runs_by_teacher[teacher]:
            fields = dict(fields)  # the run's command line gains fields below
            if _metrics(run_dir) is None and not selected(run_dir):
                continue
            if _metrics(run_dir) is None:
                print(f"\n=== student {student}, {loss_name}" + (f" from teacher {teacher}" if teacher else "")
                      + (f", seed {seed}" if extra_seed else "") + " ===", flush=True)  # fmt: skip
                fields["seed"] = seed
                if distill:
                    fields["teacher_model_name_or_path"] = teacher_model
                if distill and data == "gold" and grid.get("teacher_cache"):
                    cache = _teacher_cache(output, teacher, base_recipe, teacher_model,
                                           {**grid.get("training", {}), **grid["teacher_cache"]}, overrides)  # fmt: skip
                    if not any(r["role"] == "cache" and r["teacher"] == teacher for r in rows):
                        rows.append(cache)
                    fields["teacher_cache"] = os.path.join(output, cache["dir"])
                if data != "gold":
                    row = _distilled_data(output, data, grid["distilled_data"][data], teacher, teacher_recipes[teacher],
                                          teacher_model, overrides)  # fmt: skip
                    if not any(r["role"] == "data" and r["dir"] == row["dir"] for r in rows):
                        rows.append(row)
                    # The student reads the teacher's subwords: a tokenizer trained on distilled text would differ.
                    fields.update(dataset=os.path.join(output, row["dir"]), tokenizer=teacher_model)
                command_train([base_recipe, *_argv(fields), *overrides, "--output_dir", run_dir], distill=distill)
            elif (teacher and data == "gold" and grid.get("teacher_cache") and os.path.isfile(os.path.join(output, f"cache-from-{teacher}.json"))
                  and not any(r["role"] == "cache" and r["teacher"] == teacher for r in rows)):
                rows.append(_cache_row(output, teacher))
            elif data != "gold" and not any(r["role"] == "data" and r["name"] == data and r["teacher"] == teacher for r in rows):
                rows.append(_distilled_data(output, data, grid["distilled_data"][data], teacher, teacher_recipes[teacher],
                                            teacher_model, overrides))  # fmt: skip
            metrics = _metrics(run_dir)
            # A run says which teacher signal it read; runs trained before it said so followed the recipe.
            cached = (metrics["teacher_signal"] == "cache" if "teacher_signal" in metrics else
                      bool(teacher and data == "gold" and loss_fields.get("loss") not in TEACHER_FREE_LOSSES
                           and grid.get("teacher_cache")))  # fmt: skip
            rows.append({"role": "student", "name": student, "loss": loss_name, "teacher": teacher or "", "data": data,
                         "seed": seed, "teacher_cache": cached, "run": os.path.basename(run_dir),
                         **scored(run_dir, base_recipe)})  # fmt: skip
            write_so_far()

    train_students(None, None)
    for name, teacher_recipe in teacher_recipes.items():
        run_dir = os.path.join(output, f"teacher-{name}")
        if _metrics(run_dir) is None and not (
            selected(run_dir) or any(_metrics(r.run_dir) is None and selected(r.run_dir) for r in runs_by_teacher[name])
        ):
            continue  # not selected, and none of its selected students waits for it
        if _metrics(run_dir) is None:
            print(f"\n=== teacher {name} ===", flush=True)
            command_train([teacher_recipe, *overrides, "--output_dir", run_dir], distill=False)
        stability_path = os.path.join(run_dir, "stability.json")
        if not os.path.exists(stability_path):
            evaluated = command_evaluate(
                [teacher_recipe, *overrides, "--model_name_or_path", os.path.join(run_dir, "model"),
                 "--split", "validation", "--stability", "true", "--output_dir", os.path.join(run_dir, "eval")]
            )  # fmt: skip
            write_json_atomically(stability_path, evaluated)
        with open(stability_path) as f:
            stability = json.load(f)["stability"]
        rows.append({"role": "teacher", "name": name, "loss": name, "teacher": "", "run": os.path.basename(run_dir),
                     **scored(run_dir, teacher_recipe), "stability": stability})  # fmt: skip
        write_so_far()
        train_students(name, os.path.join(run_dir, "model"))
    write_results(rows, output)
    return rows


def _beam_sizes(rows: list[dict]) -> list[int]:
    found = {int(key[len("test_bleu_beam"):]) for r in rows for key in r if key.startswith("test_bleu_beam")}
    return sorted(found)


def write_results(rows: list[dict], output: str, quiet: bool = False) -> None:
    """OUTPUT/results.md (the tables), rows.json, bleu.png and validation.png, from the rows finished so far."""
    teachers = [r for r in rows if r["role"] == "teacher"]
    students = [r for r in rows if r["role"] == "student"]
    data = [r for r in rows if r["role"] == "data"]
    caches = [r for r in rows if r["role"] == "cache"]
    beams = _beam_sizes(teachers + students)
    beam_heads = "".join(f" test BLEU beam {k} | test chrF beam {k} |" for k in beams)

    def beam_cells(r: dict) -> str:
        return "".join(f" {_number(r.get(f'test_bleu_beam{k}'), '.2f')} | {_number(r.get(f'test_chrf_beam{k}'), '.2f')} |"
                       for k in beams)  # fmt: skip

    lines = ["# Teachers and distilled students", "", "Test BLEU and chrF decode greedily unless a column names a beam.",
             "", "## Teachers", "",
             f"| teacher | test BLEU | test chrF |{beam_heads} test perplexity | validation BLEU | validation stability | train time (s) |",
             "|---|---|---|" + "---|---|" * len(beams) + "---|---|---|---|"]  # fmt: skip
    for r in teachers:
        lines.append(
            f"| {r['name']} | {r['test_bleu']:.2f} | {r['test_chrf']:.2f} |{beam_cells(r)} {r['test_perplexity']:.2f} | "
            f"{_number(r.get('validation_bleu'), '.2f')} | {r['stability']:.4f} | {_number(r.get('train_runtime_s'), '.0f')} |"
        )
    if data:
        lines += ["", "## Distilled data", "",
                  "| data | teacher | method | sources | pairs kept | decoding time (s) | sentences/s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in data:
            lines.append(f"| {r['name']} | {r['teacher']} | {r['method']} | {r['sources']} | {r['pairs']} | "
                         f"{_number(r.get('decode_seconds'), '.0f')} | {_number(r.get('sentences_per_second'), '.1f')} |")  # fmt: skip
    if caches:
        lines += ["", "## Teacher caches (read by the word-level students on gold targets)", "",
                  "| teacher | top k | sampled | dtype | bytes/token | writing time (s) |", "|---|---|---|---|---|---|"]  # fmt: skip
        for r in caches:
            sampled = r["sampling"]["samples"] if r.get("sampling") else "-"
            lines.append(f"| {r['teacher']} | {r['top_k']} | {sampled} | {r['dtype']} | {r['bytes_per_token']:.0f} | "
                         f"{_number(r.get('write_seconds'), '.0f')} |")  # fmt: skip
    seeded = len({r.get("seed") for r in students}) > 1  # a seed column only where the grid ran several
    seed_head, seed_rule = (" seed |", "---|") if seeded else ("", "")
    # Students that stop early train for different lengths: say how long, and which epoch's weights were kept.
    stopping = any("best_step" in r for r in students)
    epochs_head, epochs_rule = (" epochs run (best) |", "---|") if stopping else ("", "")
    lines += ["", "## Students", "",
              f"| student | loss | teacher | training targets |{seed_head} test BLEU | test chrF |{beam_heads} vs CE-only BLEU |{epochs_head} train time (s) |",
              "|---|---|---|---|" + seed_rule + "---|---|" + "---|---|" * len(beams) + "---|" + epochs_rule + "---|"]  # fmt: skip
    # The CE-only twin of the same seed where there is one, else the twin's first seed.
    ce_only = {}
    for r in students:
        if r["teacher"] == "":
            ce_only.setdefault(r["name"], r["test_bleu"])
            ce_only[r["name"], r.get("seed")] = r["test_bleu"]
    for r in students:
        delta = ""  # a CE-only row is the twin itself
        if r["teacher"]:
            # A grid without a CE-only row (the GKD grid) has no twin to compare with: '-' rather than nan.
            twin = ce_only.get((r["name"], r.get("seed")), ce_only.get(r["name"]))
            delta = "-" if twin is None else f"{r['test_bleu'] - twin:+.2f}"
        seed_cell = f" {r.get('seed')} |" if seeded else ""
        epochs_cell = f" {_epochs(r)} |" if stopping else ""
        lines.append(
            f"| {r['name']} | {r['loss']} | {r['teacher'] or '-'} | {_targets(r)} |{seed_cell} {r['test_bleu']:.2f} | "
            f"{r['test_chrf']:.2f} |{beam_cells(r)} {delta} |{epochs_cell} {_number(r.get('train_runtime_s'), '.0f')} |"
        )
    lines += _over_seeds(students, beams)
    lines += _decoding_speed(teachers, students, beams)
    lines += _teacher_comparison(teachers, students)
    lines += _validation_curves(teachers + students)
    os.makedirs(output, exist_ok=True)
    write_text_atomically(os.path.join(output, "results.md"), "\n".join(lines) + "\n")
    write_json_atomically(os.path.join(output, "rows.json"), rows)  # what scripts/paired_bleu.py compares
    _plot(teachers, students, output)
    _plot_validation(teachers, students, output)
    if not quiet:
        print("\n".join(lines))


def _epochs(r: dict) -> str:
    """Epochs trained, and in brackets the epoch whose weights were kept (runs with early stopping)."""
    if r.get("epochs") is None:
        return "-"
    best = f" ({r['best_epoch']:g})" if r.get("best_epoch") is not None else ""
    return f"{r['epochs']:g}{best}"


def _targets(r: dict) -> str:
    targets = "gold" if r.get("data", "gold") == "gold" else f"{r['data']} from {r['teacher']}"
    return targets + (" (teacher cache)" if r.get("teacher_cache") else "")


def _over_seeds(students: list[dict], beams: list[int]) -> list[str]:
    """Mean and sample standard deviation of each cell (student, loss, teacher, targets) trained with several seeds."""
    cells: dict[tuple, list[dict]] = {}
    for r in students:
        cells.setdefault((r["name"], r["loss"], r["teacher"], _targets(r)), []).append(r)
    several = {cell: runs for cell, runs in cells.items() if len({r.get("seed") for r in runs}) > 1}
    if not several:
        return []
    metrics = ["test_bleu", "test_chrf"] + [f"test_bleu_beam{k}" for k in beams]
    heads = " test BLEU | test chrF |" + "".join(f" test BLEU beam {k} |" for k in beams)
    lines = ["", "## Over seeds: mean ± sample standard deviation", "",
             f"| student | loss | teacher | training targets | seeds |{heads}", "|---|---|---|---|---|" + "---|" * len(metrics)]  # fmt: skip
    for (name, loss, teacher, targets), runs in several.items():
        cells_text = ""
        for metric in metrics:
            values = [r[metric] for r in runs if r.get(metric) is not None]
            cells_text += f" {statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} |" if len(values) > 1 else " |"
        seeds = ", ".join(str(r.get("seed")) for r in runs)
        lines.append(f"| {name} | {loss} | {teacher or '-'} | {targets} | {seeds} |{cells_text}")
    return lines


def _number(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _decoding_speed(teachers: list[dict], students: list[dict], beams: list[int]) -> list[str]:
    """Test sentences per second decoding with each beam, and each student's speed over its teacher's (a CE-only
    student's over the first teacher's): rows whose decoding was timed."""
    timed = [r for r in teachers + students if any(r.get(f"test_sentences_per_second_beam{k}") for k in beams)]
    if not timed or not teachers:
        return []
    teacher_rows = {r["name"]: r for r in teachers}
    first = teachers[0]["name"]
    seeded = len({r.get("seed") for r in students}) > 1
    lines = ["", "## Decoding speed (test set, sentences/s, the beam evaluations timed on this machine)", "",
             "| model | loss | teacher |" + "".join(f" beam {k} sentences/s | beam {k} vs teacher |" for k in beams),
             "|---|---|---|" + "---|---|" * len(beams)]  # fmt: skip
    for r in timed:
        is_teacher = r.get("role") == "teacher"
        cells = ""
        for k in beams:
            own = r.get(f"test_sentences_per_second_beam{k}")
            base = teacher_rows[r["name"] if is_teacher else (r["teacher"] or first)].get(f"test_sentences_per_second_beam{k}")
            ratio = f"{own / base:.2f}x" if own and base else "-"
            cells += f" {_number(own, '.1f')} | {ratio} |"
        name = f"teacher {r['name']}" if is_teacher else r["name"] + (f" (seed {r.get('seed')})" if seeded else "")
        taught = "-" if is_teacher else (r["teacher"] or f"(CE only; vs {first})")
        lines.append(f"| {name} | {r['loss']} | {taught} |{cells}")
    return lines


def _teacher_comparison(teachers: list[dict], students: list[dict]) -> list[str]:
    """Each student and loss taught by every teacher, side by side: which teacher distils the better student."""
    names = [t["name"] for t in teachers]
    bleu = {}
    for r in students:  # a grid with several seeds: each cell's first seed, the one its runs share
        if r["teacher"]:
            bleu.setdefault((r["name"], r["loss"], r["teacher"]), r["test_bleu"])
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


def _validation_metric(rows: list[dict]) -> str | None:
    """The metric every run's validation curve has: BLEU where the runs scored it each epoch, else the loss."""
    keys = [{k for e in r["eval_history"] for k in e} for r in rows if r.get("eval_history")]
    if not keys:
        return None
    return next((m for m in ("eval_bleu", "eval_loss") if all(m in k for k in keys)), None)


def _validation_curves(rows: list[dict]) -> list[str]:
    metric = _validation_metric(rows)
    if metric is None:
        return []
    name, best, spec = {"eval_bleu": ("BLEU", max, ".1f"), "eval_loss": ("loss", min, ".3f")}[metric]
    lines = ["", f"## Validation {name} by epoch (best in bold; validation.png plots them)", ""]
    for r in rows:
        points = eval_curve(r.get("eval_history"), metric)
        if points:
            lines.append(f"- {r['run']}: {format_curve([v for _, v in points], best, spec)}")
    return lines


def _plot_validation(teachers: list[dict], students: list[dict], output: str) -> None:
    """OUTPUT/validation.png: every run's validation curve by epoch, a student in its teacher's colour."""
    metric = _validation_metric(teachers + students)
    if metric is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"": "C7", **{t["name"]: f"C{i}" for i, t in enumerate(teachers)}}
    styles = {}
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in teachers + students:
        points = eval_curve(r.get("eval_history"), metric)
        if not points:
            continue
        teacher_row = r["role"] == "teacher"
        style = "-" if teacher_row else styles.setdefault(r["loss"], ["-", "--", ":", "-."][len(styles) % 4])
        colour = colours[r["name"]] if teacher_row else colours.get(r["teacher"], "C7")
        ax.plot(*zip(*points), style, color=colour, linewidth=2.5 if teacher_row else 1, label=r["run"])
    ax.set_xlabel("epoch")
    ax.set_ylabel({"eval_bleu": "validation BLEU", "eval_loss": "validation loss"}[metric])
    ax.set_title("Validation by epoch (colour: the teacher; thick: the teacher itself; grey: no teacher)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure_atomically(fig, os.path.join(output, "validation.png"), dpi=120)
    plt.close(fig)


def _plot(teachers: list[dict], students: list[dict], output: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeded = len({r.get("seed") for r in students}) > 1
    labels = [f"teacher {r['name']}" for r in teachers] + [
        f"{r['name']}\n{r['loss']}" + (f" <- {r['teacher']}" if r["teacher"] else "") + (f" s{r.get('seed')}" if seeded else "")
        for r in students
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
    save_figure_atomically(fig, os.path.join(output, "bleu.png"), dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="a grid recipe such as recipes/students_multi30k.yaml")
    parser.add_argument("--output_dir", default=None, help="where the runs and results go (default: the recipe's)")
    parser.add_argument("--only", nargs="+", default=None, metavar="PATTERN",
                        help="train only the runs whose folder names match one of these shell patterns (e.g. "
                             "'*-seq-kd-from-ce' 'teacher-ls'), and the teachers they need; finished runs are listed "
                             "either way")  # fmt: skip
    args, overrides = parser.parse_known_args(argv)
    if not os.path.isfile(args.recipe):
        parser.error(f"grid recipe {args.recipe!r} does not exist")
    run_grid(args.recipe, overrides, args.output_dir, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
