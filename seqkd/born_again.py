"""Born-Again networks (Furlanello et al., 2018): a chain of generations, each taught by the last.

Generation 0 learns from the labels; generation k learns from generation k-1 with the chosen loss (BAN+L =
gold-label CE + KD by default; CWTM, DKPP, DKD selectable). Each generation is saved under ``OUTPUT/gen-k`` with
its metrics; a restarted run skips the generations already finished and resumes the one in progress from its
last checkpoint. The ensemble of the generations (the mean of their predicted distributions, BAN's BANE) is
evaluated too, and the run ends with ``OUTPUT/results.md`` and ``OUTPUT/perplexity.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, set_seed
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import ModelOutput

from seqkd.evaluation import corpus_perplexity, is_stateful
from seqkd.data.text import evaluation_dataloader
from seqkd.pipeline import load_saved_model
from seqkd.trainer import (
    DistillationArguments,
    DistillationTrainer,
    eval_curve,
    eval_history,
    format_curve,
    save_model_atomically,
)
from seqkd.errors import InvalidValueError
from seqkd.files import save_figure_atomically, write_json_atomically, write_text_atomically

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
MODEL_DIR = "model"
RUN_CONFIG_FILE = "born_again_config.json"
# Fields that change where, how often or how a run reports and saves, not what it trains, and fields that only
# extend the chain (more generations, the ensemble): a resumed chain may change them. (Evaluation fields are not
# here: evaluation steers the plateau schedule and draws from the random generator.)
_FIELDS_A_RESUME_MAY_CHANGE = frozenset({
    "output_dir", "logging_strategy", "logging_steps", "logging_first_step", "logging_nan_inf_filter",
    "disable_tqdm", "report_to", "run_name", "project", "trackio_space_id", "trackio_bucket_id",
    "trackio_static_space_id", "include_num_input_tokens_seen", "save_strategy", "save_steps", "save_total_limit",
    "save_only_model", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "push_to_hub", "hub_model_id",
    "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push", "hub_revision", "log_level",
    "log_level_replica", "log_on_each_node", "local_rank", "debug", "ddp_timeout", "resume_from_checkpoint",
    "skip_memory_metrics", "allow_pickle_weights", "num_generations", "ensemble",
    "data_dir",  # where the same files live (the run may move to another machine)
})  # fmt: skip


@dataclass
class BornAgainArguments:
    """How many generations, and how generation 0 is trained."""

    num_generations: int = field(
        default=2, metadata={"help": "Student generations after the teacher (generation 0); at least 1."}
    )
    teacher_loss: str = field(
        default="ce",
        metadata={"help": "Loss of generation 0, which has no teacher: 'ce' or 'ls'.", "choices": ["ce", "ls"]},
    )
    ensemble: bool = field(
        default=True, metadata={"help": "Also evaluate the ensemble of all generations (mean of probabilities)."}
    )
    cache_teacher: bool = field(
        default=False,
        metadata={
            "help": "Run each generation once over the training split and store its top-k outputs "
            "(OUTPUT/gen-k/teacher-cache, see `seqkd cache-teacher`); the next generation distils from that cache "
            "instead of running its teacher at every step."
        },
    )

    def __post_init__(self):
        if self.num_generations < 1:
            raise InvalidValueError(f"num_generations must be >= 1, got {self.num_generations}")
        if self.teacher_loss not in ("ce", "ls"):
            raise InvalidValueError(f"teacher_loss must be 'ce' or 'ls', got {self.teacher_loss!r}")


@dataclass
class EnsembleOutput(ModelOutput):
    logits: torch.Tensor | None = None
    state: tuple | None = None


class GenerationEnsemble(torch.nn.Module):
    """The mean of its members' predicted distributions; ``logits`` are the log of that mean.

    Recurrent members carry their own states, held together as one tuple ``state``.
    """

    def __init__(self, members: list[PreTrainedModel]):
        super().__init__()
        if not members:
            raise InvalidValueError("an ensemble needs at least one model")
        self.members = torch.nn.ModuleList(members)

    def forward(self, input_ids, state=None, **kwargs) -> EnsembleOutput:
        states = state if state is not None else (None,) * len(self.members)
        log_probs, new_states = [], []
        for member, member_state in zip(self.members, states):
            if is_stateful(member):
                out = member(input_ids=input_ids, state=member_state, **kwargs)
                new_states.append(out.state)
            else:
                out = member(input_ids=input_ids, **kwargs)
                new_states.append(None)
            log_probs.append(torch.log_softmax(out.logits.float(), dim=-1))
        logits = torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(self.members))
        return EnsembleOutput(logits=logits, state=tuple(new_states))


def _run_config(args, born_again_args, cache_args, recipe: dict | None) -> dict:
    """What a chain trains, as JSON-comparable values (reporting fields left out)."""
    config = {}
    for name, values in (("recipe", recipe), ("born_again", born_again_args), ("cache", cache_args), ("training", args)):
        if values is None:
            continue
        if dataclasses.is_dataclass(values):
            values = {f.name: getattr(values, f.name) for f in dataclasses.fields(values) if f.init}
        for key, value in values.items():
            if key in _FIELDS_A_RESUME_MAY_CHANGE or key.startswith("_"):
                continue
            config[key if key not in config else f"{name}.{key}"] = json.loads(json.dumps(value, default=str))
    return config


def _check_run_config(output_dir: str, config: dict, should_save: bool) -> None:
    """Refuse to resume a chain under another configuration: its generations would mix two recipes.

    Only fields both configurations know are compared (a newer seqkd or transformers adds fields), and only once
    the chain has something to resume (a generation's checkpoint or model): before that, a rerun with other
    settings (a lower learning rate after a diverged first try, say) simply starts the chain.
    """
    path = os.path.join(output_dir, RUN_CONFIG_FILE)
    if os.path.isfile(path) and _has_progress(output_dir):
        with open(path) as f:
            saved = json.load(f)
        changed = sorted(key for key in set(saved) & set(config) if saved[key] != config[key])
        if changed:
            details = ", ".join(f"{key}: {saved[key]!r} -> {config[key]!r}" for key in changed[:8])
            more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
            raise InvalidValueError(
                f"{output_dir} holds a Born-Again chain started with another configuration ({details}{more}): "
                "resume it with the recipe it started with, or start afresh in a new output_dir"
            )
        return
    if should_save:
        write_json_atomically(path, config)


def _has_progress(output_dir: str) -> bool:
    for name in os.listdir(output_dir):
        gen_dir = os.path.join(output_dir, name)
        if name.startswith("gen-") and os.path.isdir(gen_dir):
            if any(entry == MODEL_DIR or entry.startswith("checkpoint-") for entry in os.listdir(gen_dir)):
                return True
    return False


def run_born_again(
    model_init: Callable[[], PreTrainedModel],
    args: DistillationArguments,
    born_again_args: BornAgainArguments,
    *,
    train_dataset,
    eval_datasets: dict,
    processing_class=None,
    data_collator=None,
    cache_args=None,
    recipe: dict | None = None,
) -> list[dict]:
    """Train generation 0 from labels and generations 1..N each from the one before; evaluate all and the ensemble.

    Args:
        model_init: builds a fresh, randomly initialised student (called once per generation, after seeding).
        args: the training arguments of every generation; ``args.loss`` is the students' loss and
            ``args.output_dir`` the run's folder (generation k trains in ``output_dir/gen-k``).
        eval_datasets: named splits, e.g. ``{"validation": ..., "test": ...}``; the first is the trainer's
            evaluation set (learning-rate plateau, logging), all are reported.
        cache_args: :class:`seqkd.teacher_cache.TeacherCacheArguments` (k, dtype, shard size) for
            ``born_again_args.cache_teacher``; default its defaults.
        recipe: the rest of the run's configuration (model and data fields). With ``args`` and
            ``born_again_args`` it is written to ``output_dir/born_again_config.json`` when the chain starts; a
            restarted chain whose configuration differs (other than in logging and reporting fields) is refused.
    Returns:
        One metrics dict per generation, then the ensemble's (when enabled).
    """
    if not eval_datasets:
        raise InvalidValueError("run_born_again needs at least one evaluation split, e.g. {'validation': ...}")
    if args.loss in ("ce", "ls"):
        raise InvalidValueError(f"the students' loss must use the teacher, got {args.loss!r}; try 'ban', 'kd' or 'dkd'")
    if getattr(model_init().config, "is_encoder_decoder", False):
        raise InvalidValueError(
            "Born-Again chains and their ensemble are built for language models; distil a translation model with "
            "`seqkd distill` (DistillationTrainer) instead"
        )
    output_dir = args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    _check_run_config(output_dir, _run_config(args, born_again_args, cache_args, recipe), args.should_save)
    first_split = next(iter(eval_datasets))
    results: list[dict] = []
    teacher = None
    total = born_again_args.num_generations + 1
    for generation in range(total):
        gen_dir = os.path.join(output_dir, f"gen-{generation}")
        model_dir = os.path.join(gen_dir, MODEL_DIR)
        metrics_path = os.path.join(gen_dir, METRICS_FILE)
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                metrics = json.load(f)
            logger.warning("generation %d/%d already finished, skipping (%s)", generation, total - 1, gen_dir)
            results.append(metrics)
            teacher = load_saved_model(model_dir)
            continue
        print(f"\n=== Born-Again generation {generation}/{total - 1}: "
              f"{'labels only' if generation == 0 else f'taught by generation {generation - 1}'} ===", flush=True)
        gen_args = dataclasses.replace(
            args,
            output_dir=gen_dir,
            loss=born_again_args.teacher_loss if generation == 0 else args.loss,
            seed=args.seed + generation,
            teacher_model_name_or_path=None,
            teacher_cache=None,
        )
        if generation > 0 and born_again_args.cache_teacher:
            gen_args.teacher_cache = _cache_generation(
                teacher, os.path.join(output_dir, f"gen-{generation - 1}", "teacher-cache"), train_dataset,
                processing_class, cache_args, args,
            )  # fmt: skip
        set_seed(gen_args.seed)
        student = model_init()
        trainer = DistillationTrainer(
            model=student,
            args=gen_args,
            teacher_model=teacher if generation > 0 and not gen_args.teacher_cache else None,
            train_dataset=train_dataset,
            eval_dataset=eval_datasets[first_split],
            processing_class=processing_class,
            data_collator=data_collator,
        )
        last = get_last_checkpoint(gen_dir) if os.path.isdir(gen_dir) else None
        started = time.time()
        train_output = trainer.train(resume_from_checkpoint=last)
        metrics = {
            "generation": generation,
            "loss": gen_args.loss,
            "teacher": None if generation == 0 else f"gen-{generation - 1}",
            "parameters": sum(p.numel() for p in student.parameters()),
            "train_runtime_s": round(train_output.metrics.get("train_runtime", time.time() - started), 1),
            "train_loss": train_output.metrics.get("train_loss"),
            "eval_history": eval_history(trainer.state.log_history),
        }
        for split, dataset in eval_datasets.items():
            split_metrics = trainer.evaluate(dataset, metric_key_prefix=split)
            metrics[f"{split}_perplexity"] = split_metrics[f"{split}_perplexity"]
            metrics[f"{split}_loss"] = split_metrics[f"{split}_loss"]
        save_model_atomically(trainer, model_dir)
        if trainer.args.should_save:
            write_json_atomically(metrics_path, metrics)
        trainer.accelerator.wait_for_everyone()
        results.append(metrics)
        teacher = trainer.accelerator.unwrap_model(trainer.model)
        teacher.eval()
        del trainer

    if born_again_args.ensemble:
        members = [load_saved_model(os.path.join(output_dir, f"gen-{k}", MODEL_DIR)) for k in range(total)]
        ensemble = GenerationEnsemble(members).to(args.device)
        metrics = {"generation": "ensemble", "loss": f"mean of gen-0..gen-{total - 1}", "teacher": None,
                   "parameters": sum(p.numel() for p in ensemble.parameters())}
        for split, dataset in eval_datasets.items():
            loader = evaluation_dataloader(dataset, args.per_device_eval_batch_size)
            result = corpus_perplexity(ensemble, loader, device=args.device, desc=f"ensemble {split}")
            metrics[f"{split}_perplexity"] = result["perplexity"]
            metrics[f"{split}_loss"] = result["loss"]
        results.append(metrics)
    if args.should_save:
        write_results(results, output_dir, list(eval_datasets))
    return results


def _cache_generation(teacher, cache_dir: str, train_dataset, tokenizer, cache_args, args) -> str:
    """Write (or finish) the cache of ``teacher`` on the main process; every process then reads it."""
    from accelerate import PartialState

    from seqkd.teacher_cache import TeacherCacheArguments, cache_teacher

    cache_args = cache_args or TeacherCacheArguments()
    state = PartialState()
    if state.is_main_process:
        cache_teacher(
            teacher, train_dataset, cache_dir, top_k=cache_args.cache_top_k, dtype=cache_args.cache_dtype,
            tokenizer=tokenizer, shard_tokens=cache_args.cache_shard_tokens, samples=cache_args.samples,
            sample_temperature=cache_args.cache_sample_temperature, sample_seed=cache_args.cache_sample_seed,
            batch_size=args.per_device_eval_batch_size, device=args.device, show_progress=not args.disable_tqdm,
        )  # fmt: skip
    state.wait_for_everyone()
    return cache_dir


def write_results(results: list[dict], output_dir: str, splits: list[str]) -> None:
    """``results.md`` (one row per generation and the ensemble) and ``perplexity.png``."""
    header = "| generation | loss | " + " | ".join(f"{s} perplexity" for s in splits) + " | parameters | train time (s) |"
    lines = [
        "# Born-Again results",
        "",
        header,
        "|" + "---|" * (4 + len(splits)),
    ]
    for row in results:
        values = " | ".join(f"{row[f'{s}_perplexity']:.2f}" for s in splits)
        train_time = row.get("train_runtime_s", "")
        lines.append(f"| {row['generation']} | {row['loss']} | {values} | {row['parameters']:,} | {train_time} |")
    curves = [(r["generation"], eval_curve(r.get("eval_history"), "eval_perplexity")) for r in results]
    curves = [(generation, points) for generation, points in curves if points]
    if curves:
        lines += ["", f"## {splits[0].capitalize()} perplexity by epoch, while training (best in bold)", ""]
        for generation, points in curves:
            lines.append(f"- generation {generation}: {format_curve([v for _, v in points], min, '.1f')}")
    write_text_atomically(os.path.join(output_dir, "results.md"), "\n".join(lines) + "\n")
    _plot(results, output_dir, splits)


def _plot(results: list[dict], output_dir: str, splits: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generations = [r for r in results if r["generation"] != "ensemble"]
    ensemble = next((r for r in results if r["generation"] == "ensemble"), None)
    # Beside the generations, each one's curve while it trained, where the runs kept them.
    curves = [(r["generation"], eval_curve(r.get("eval_history"), "eval_perplexity")) for r in generations]
    curves = [(generation, points) for generation, points in curves if points]
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(11 if curves else 6, 4), squeeze=False)
    ax = axes[0][0]
    for i, split in enumerate(splits):
        color = f"C{i}"
        xs = [r["generation"] for r in generations]
        ax.plot(xs, [r[f"{split}_perplexity"] for r in generations], "o-", color=color, label=split)
        if ensemble is not None:
            ax.axhline(ensemble[f"{split}_perplexity"], color=color, linestyle="--", label=f"{split}, ensemble")
    ax.set_xlabel("generation (0 = trained from labels)")
    ax.set_ylabel("perplexity")
    ax.set_xticks([r["generation"] for r in generations])
    ax.set_title("Born-Again generations")
    ax.grid(alpha=0.3)
    ax.legend()
    if curves:
        by_epoch = axes[0][1]
        for generation, points in curves:
            by_epoch.plot(*zip(*points), "o-", markersize=3, label=f"generation {generation}")
        if ensemble is not None:
            by_epoch.axhline(ensemble[f"{splits[0]}_perplexity"], color="0.4", linestyle="--", label="ensemble")
        by_epoch.set_xlabel("epoch")
        by_epoch.set_ylabel(f"{splits[0]} perplexity")
        by_epoch.set_title("Each generation while it trained")
        by_epoch.grid(alpha=0.3)
        by_epoch.legend()
    fig.tight_layout()
    save_figure_atomically(fig, os.path.join(output_dir, "perplexity.png"), dpi=120)
    plt.close(fig)
