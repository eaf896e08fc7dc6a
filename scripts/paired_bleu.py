"""Is one teacher's student better than the other's, or is it seed noise? Paired bootstrap on a finished grid.

    python scripts/paired_bleu.py recipes/students_multi30k.yaml --data_dir ../shared/data [--split test]

For a grid that scripts/translation_grid.py has run, translates the split with every student (greedy, as the
grid scores them) and, with sacreBLEU's paired bootstrap resampling (1,000 resamples, sacreBLEU's fixed
seed), compares for each student and loss the student taught by the first teacher against the one taught by
the second, and every distilled student against the CE-only student of the same model. Prints a markdown
table: BLEU of both systems, the difference, sacreBLEU's p-value (the chance of a difference at least this
large if the systems were equally good) and the 95% confidence interval of the system's BLEU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml
from sacrebleu.metrics import BLEU
from sacrebleu.significance import PairedTest
from transformers import AutoTokenizer

from seqkd.cli import parse_command_line
from seqkd.pipeline import load_parallel_corpus, load_saved_model
from seqkd.evaluation import translate


def _is_path(run: str) -> bool:
    """A run named by its folder's path (another grid's run, say) rather than by its name in this grid."""
    return os.sep in run or (os.altsep is not None and os.altsep in run)


def paired_rows(
    recipe_path: str, overrides: list[str], split: str, output_dir: str | None = None, pairs: list[tuple[str, str]] | None = None
) -> list[dict]:
    """The paired bootstrap of the grid's default comparisons, or of ``pairs`` of run folders (baseline, system)."""
    with open(recipe_path) as f:
        grid = yaml.safe_load(f)
    output = output_dir or grid.get("output_dir", "runs/grid")
    rows_path = os.path.join(output, "rows.json")
    if not os.path.isfile(rows_path):
        raise FileNotFoundError(f"{output} holds no finished grid ({rows_path} is missing): run scripts/translation_grid.py first")
    with open(rows_path) as f:
        rows = json.load(f)
    teachers = [r["name"] for r in rows if r["role"] == "teacher"]
    if pairs is None and len(teachers) != 2:
        raise ValueError(f"paired_bleu compares two teachers; the grid in {output} has {teachers} (or name --pairs)")
    if not teachers:
        raise ValueError(f"the grid in {output} has no finished teacher yet")
    finished = {r["run"] for r in rows if r["role"] == "student"}
    named = {run for pair in pairs or [] for run in pair}
    unknown = sorted(run for run in named - finished if not _is_path(run))
    if unknown:
        raise ValueError(f"--pairs names runs the grid in {output} has not finished: {unknown}; finished: {sorted(finished)}")
    unfinished = sorted(run for run in named if _is_path(run) and not os.path.isfile(os.path.join(run, "model", "metrics.json")))
    if unfinished:
        raise ValueError(f"--pairs names run folders that hold no finished run (no model/metrics.json): {unfinished}")
    # The data fields (corpus, languages, tokenization) are the first teacher's, as the grid's students use them.
    base_recipe = os.path.join(os.path.dirname(os.path.abspath(recipe_path)), grid["teachers"][teachers[0]])
    _, data_args, args, _ = parse_command_line("evaluate", [base_recipe, *overrides, "--split", split])
    corpus = load_parallel_corpus(data_args)
    if split not in corpus:
        raise ValueError(f"the corpus has no {split!r} split; it has {sorted(corpus)}")
    sources, references = list(corpus[split]["source"]), list(corpus[split]["target"])
    bleu = BLEU(tokenize="none" if data_args.pretokenized else args.bleu_tokenize)

    hypotheses: dict[str, list[str]] = {}

    def hyps(run: str) -> list[str]:
        if run not in hypotheses:
            model_dir = os.path.join(run if _is_path(run) else os.path.join(output, run), "model")
            model = load_saved_model(model_dir).to(args.device)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            hypotheses[run] = translate(
                model, tokenizer, sources, num_beams=args.generation_num_beams or 1,
                max_new_tokens=args.generation_max_length or 128, batch_size=args.per_device_eval_batch_size,
                show_progress=not args.disable_tqdm, desc=run,
            )  # fmt: skip
        return hypotheses[run]

    def compare(baseline: str, system: str) -> dict:
        test = PairedTest([(baseline, hyps(baseline)), (system, hyps(system))], {"BLEU": bleu}, [references], test_type="bs")
        _, scores = test()
        base, result = scores["BLEU"]
        return {"baseline": baseline, "system": system, "baseline_bleu": base.score, "system_bleu": result.score,
                "difference": result.score - base.score, "p_value": result.p_value, "ci95": result.ci}  # fmt: skip

    if pairs is not None:
        return [compare(baseline, system) for baseline, system in pairs]
    first, second = teachers
    compared = []
    all_students = [r for r in rows if r["role"] == "student"]
    # A grid trained with several seeds pairs runs of the same seed only.
    for seed in dict.fromkeys(r.get("seed") for r in all_students):
        students = [r for r in all_students if r.get("seed") == seed]
        run = {(r["name"], r["loss"], r["teacher"]): r["run"] for r in students}
        for student in dict.fromkeys(r["name"] for r in students):
            distilled = [r for r in students if r["name"] == student and r["teacher"]]
            for loss in dict.fromkeys(r["loss"] for r in distilled):
                if (student, loss, first) in run and (student, loss, second) in run:
                    compared.append(compare(run[student, loss, second], run[student, loss, first]))
            ce_only = next((r["run"] for r in students if r["name"] == student and not r["teacher"]), None)
            if ce_only is not None:
                compared += [compare(ce_only, r["run"]) for r in distilled]
    return compared


def format_rows(rows: list[dict], split: str) -> str:
    lines = [f"| baseline | system | baseline {split} BLEU | system {split} BLEU | system - baseline | p-value | system 95% CI |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['baseline']} | {r['system']} | {r['baseline_bleu']:.2f} | {r['system_bleu']:.2f} | "
            f"{r['difference']:+.2f} | {r['p_value']:.4f} | ±{r['ci95']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="the grid recipe scripts/translation_grid.py ran, e.g. recipes/students_multi30k.yaml")
    parser.add_argument("--split", default="test", help="the split to translate and compare on (default: test)")
    parser.add_argument("--output_dir", default=None, help="the grid's output folder (default: the recipe's)")
    parser.add_argument(
        "--pairs", default=None,
        help="compare only these runs: comma-separated BASELINE:SYSTEM run folders of the grid, e.g. "
        "transformer-2x2-128-word-kd-from-ls:transformer-2x2-128-seq-kd-from-ls; a run given as a path "
        "(one with a '/') is that folder, e.g. a run of another grid on the same data",
    )  # fmt: skip
    args, overrides = parser.parse_known_args(argv)
    if not os.path.isfile(args.recipe):
        parser.error(f"grid recipe {args.recipe!r} does not exist")
    pairs = None
    if args.pairs:
        pairs = [tuple(pair.split(":")) for pair in args.pairs.split(",")]
        if any(len(pair) != 2 or not all(pair) for pair in pairs):
            parser.error(f"--pairs must be comma-separated BASELINE:SYSTEM run names, got {args.pairs!r}")
    rows = paired_rows(args.recipe, overrides, args.split, args.output_dir, pairs)
    print(format_rows(rows, args.split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
