"""The ``seqkd`` command: ``train``, ``distill``, ``cache-teacher``, ``born-again`` and ``evaluate``.

Each command reads an optional recipe YAML (safe loading) whose keys are the fields of
:class:`seqkd.pipeline.ModelArguments`, :class:`seqkd.pipeline.DataArguments`, ``DistillationArguments`` and the
command's own arguments; any field can be overridden on the command line::

    seqkd born-again recipes/ban_lstm_ptb_small.yaml --data_dir ../shared/data --output_dir runs/ban
    seqkd train recipes/ban_lstm_ptb_small.yaml --max_steps 100 --output_dir runs/smoke
    seqkd cache-teacher recipes/ban_lstm_ptb_small.yaml --teacher_model_name_or_path T --teacher_cache runs/cache
    seqkd distill recipes/ban_lstm_ptb_small.yaml --teacher_cache runs/cache --output_dir runs/student
    seqkd evaluate --model_name_or_path runs/ban/gen-1/model --data_dir ../shared/data --split test
    accelerate launch --multi_gpu --num_processes 2 -m seqkd distill recipe.yaml ...

``seqkd COMMAND --help`` lists every field with its help. A user error (a bad field, value, file or folder) prints
one line ``seqkd COMMAND: error: ...`` and exits with status 2; ``--debug`` (or ``SEQKD_DEBUG=1``) shows its
traceback. This module only parses arguments and runs commands: the recipe is assembled by :mod:`seqkd.pipeline`.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field

import yaml
from transformers import AutoTokenizer, HfArgumentParser

from seqkd.errors import InvalidValueError, MissingInputError, UserError
from seqkd.pipeline import (
    DATA_DIR_ENV,
    DataArguments,
    ModelArguments,
    build_datasets,
    build_pipeline,
    build_translation_datasets,
    canonical_split_name,
    check_model_folder,
    is_translation,
    load_corpus,
    load_parallel_corpus,
    load_saved_model,
    uses_streams,
)

COMMANDS = ("train", "distill", "cache-teacher", "distill-data", "born-again", "evaluate")
DEBUG_ENV = "SEQKD_DEBUG"

logger = logging.getLogger("seqkd")


@dataclass
class EvaluateArguments:
    """What ``seqkd evaluate`` scores."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "The saved model to evaluate."})
    split: str = field(default="test", metadata={"help": "Split to evaluate (train, validation or test)."})
    stability: bool = field(
        default=False,
        metadata={
            "help": "Also report Shen et al.'s stability: 1 - the mean intra-class variance of the model's predicted "
            "distributions, a class being the gold target token."
        },
    )


# --------------------------------------------------------------------------------------------------------
# Recipes and arguments.


class _RecipeParser(HfArgumentParser):
    def error(self, message: str):
        # argparse would print the whole usage (hundreds of fields) and exit; one line says more. The same field
        # may come from the recipe or the command line: name it as both spell it.
        message = re.sub(r"argument --(\w+)(?:/--[\w-]+)*:", r"field \1:", message)
        raise InvalidValueError(f"{message} (`{self.prog} --help` lists the fields)")


def _parser(command: str) -> HfArgumentParser:
    from seqkd.born_again import BornAgainArguments
    from seqkd.teacher_cache import TeacherCacheArguments
    from seqkd.trainer import DistillationArguments

    types = [ModelArguments, DataArguments, DistillationArguments]
    if command == "born-again":
        types += [BornAgainArguments, TeacherCacheArguments]
    if command == "cache-teacher":
        types.append(TeacherCacheArguments)
    if command == "distill-data":
        from seqkd.sequence_kd import DistillDataArguments

        types.append(DistillDataArguments)
    if command == "evaluate":
        types.append(EvaluateArguments)
    return _RecipeParser(types, prog=f"seqkd {command}", description=f"seqkd {command}: see `seqkd --help`.")


def read_recipe(path: str) -> dict:
    """A recipe YAML file as a mapping of field: value (safe loading; nothing in it is executed)."""
    if os.path.isdir(path):
        raise InvalidValueError(f"recipe {path!r} is a folder: name a .yaml file")
    if not os.path.isfile(path):
        raise MissingInputError(f"recipe {path!r} does not exist")
    from seqkd.data.text import read_text

    text = read_text(path)  # refuses bytes that are not UTF-8, naming where they are
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise InvalidValueError(f"recipe {path} is not valid YAML{line}: {getattr(error, 'problem', None) or error}") from error
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise InvalidValueError(
            f"recipe {path} must be a mapping of field: value, got a {type(recipe).__name__}: write one `field: value` "
            "per line, without leading dashes"
        )
    return recipe


def _recipe_to_argv(path: str, parser: HfArgumentParser) -> list[str]:
    recipe = read_recipe(path)
    known = {action.dest for action in parser._actions}
    # One recipe serves every command: fields of another command (num_generations for `evaluate`, say) are skipped.
    every_field = {f.name for command in COMMANDS for cls in _parser(command).dataclass_types for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(recipe) - every_field))  # YAML 1.1 reads `yes:` or `on:` as a boolean key
    if unknown:
        raise InvalidValueError(f"recipe {path} has unknown fields {unknown}; `{parser.prog} --help` lists the fields")
    argv = []
    for key, value in recipe.items():
        if value is None or key not in known:
            continue
        if isinstance(value, dict):
            value = json.dumps(value)
        if isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


_BF16_VALUES = {"auto", "true", "false", "yes", "no", "t", "f", "y", "n", "1", "0"}  # transformers' booleans and auto


def _resolve_bf16_auto(argv: list[str]) -> list[str]:
    """``bf16: auto`` (recipe) or ``--bf16 auto``: bf16 autocast where the hardware computes in bf16 (a GPU with bf16,
    a CPU with avx512_bf16 or AMX), float32 where autocast would only emulate it and run slower."""
    from seqkd.hardware import bf16_is_native

    argv = list(argv)
    values = []  # (index of the value, written as --bf16=value) for every bf16 given; the last one wins
    for i, token in enumerate(argv):
        if token.startswith("--bf16="):
            values.append((i, True))
        elif token == "--bf16" and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            values.append((i + 1, False))  # a bare `--bf16` means true and is left to the parser
    for position, (at, inline) in enumerate(values):
        value = argv[at].split("=", 1)[1] if inline else argv[at]
        if value.lower() not in _BF16_VALUES:
            raise InvalidValueError(f"bf16 must be true, false or auto, got {value!r}")
        if value.lower() != "auto":
            continue
        native = bf16_is_native(use_cpu=_last_value(argv, "use_cpu", "false").lower() in ("true", "t", "yes", "y", "1"))
        if position == len(values) - 1:
            logger.info("bf16 auto: %s", "on (this hardware computes in bf16)" if native else
                        "off (no bf16 instructions here: autocast would emulate bf16, slower than float32)")  # fmt: skip
        argv[at] = ("--bf16=" if inline else "") + ("true" if native else "false")
    return argv


def _last_value(argv: list[str], name: str, default: str) -> str:
    value = default
    for i, token in enumerate(argv):
        if token == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(f"--{name}="):
            value = token.split("=", 1)[1]
    return value


def parse_command_line(command: str, argv: list[str]):
    """``argv`` = [recipe.yaml] [--field value ...]; the command line overrides the recipe."""
    parser = _parser(command)
    recipe_argv: list[str] = []
    if argv and not argv[0].startswith("-"):
        recipe_argv = _recipe_to_argv(argv[0], parser)
        argv = argv[1:]
    full = _resolve_bf16_auto(recipe_argv + argv)
    if not _names_field(full, "output_dir"):
        full += ["--output_dir", os.path.join("runs", command)]
    try:
        parsed = parser.parse_args_into_dataclasses(args=full)
    except UserError:
        raise
    except ValueError as error:
        # The arguments' own checks (transformers' TrainingArguments among them) reject values with ValueError:
        # here every one of those is about what the user wrote.
        raise InvalidValueError(str(error)) from error
    except FileNotFoundError as error:  # a config file a field names (accelerator_config, fsdp_config, deepspeed)
        raise MissingInputError(
            f"{error.filename or error} does not exist: a field (accelerator_config, fsdp_config, deepspeed) names it"
        ) from error
    for value in parsed:
        output_dir = getattr(value, "output_dir", None)
        if output_dir and os.path.exists(output_dir) and not os.path.isdir(output_dir):
            raise InvalidValueError(f"output_dir {output_dir!r} is a file: name a folder (it is created if missing)")
    return parsed


# --------------------------------------------------------------------------------------------------------
# Commands.


def command_train(argv: list[str], *, distill: bool) -> dict:
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from seqkd.trainer import DistillationTrainer, eval_history, save_model_atomically

    model_args, data_args, args = parse_command_line("distill" if distill else "train", argv)
    has_teacher = bool(args.teacher_model_name_or_path or args.teacher_cache)
    if distill and not has_teacher:
        raise InvalidValueError(
            "seqkd distill needs --teacher_model_name_or_path (a trained model folder) or --teacher_cache "
            "(a folder written by `seqkd cache-teacher`)"
        )
    if not distill and args.needs_teacher and not has_teacher:
        teacher_loss = _born_again_teacher_loss(argv)
        if teacher_loss is None:
            raise InvalidValueError(
                f"loss {args.loss!r} needs a teacher: use `seqkd distill --teacher_model_name_or_path ...`, "
                "or train from labels with --loss ce / ls"
            )
        # A Born-Again recipe's `loss` is its students'; `train` trains what has no teacher: generation 0.
        logger.info("Born-Again recipe: training generation 0 with its teacher_loss %r (loss %r is the students')",
                    teacher_loss, args.loss)  # fmt: skip
        args.loss = teacher_loss
    teacher_path = args.teacher_model_name_or_path if args.needs_teacher else None
    if teacher_path:
        check_model_folder(teacher_path, allow_pickle=args.allow_pickle_weights, what="teacher")
    if args.needs_teacher and args.teacher_cache:
        if not os.path.isdir(args.teacher_cache):
            raise MissingInputError(f"teacher_cache {args.teacher_cache!r} does not exist: write it with `seqkd cache-teacher`")
        # The cache keeps the teacher's tokenizer beside its shards.
        teacher_path = teacher_path or args.teacher_cache
    set_seed(args.seed)
    pipeline = build_pipeline(model_args, data_args, args, teacher_path)
    evals = pipeline.eval_datasets
    if not evals:
        raise InvalidValueError("eval_splits names no split: give at least one, e.g. --eval_splits validation,test")
    try:
        trainer = DistillationTrainer(
            model=pipeline.model, args=args, train_dataset=pipeline.train_dataset,
            eval_dataset=next(iter(evals.values())), processing_class=pipeline.tokenizer,
            data_collator=pipeline.data_collator,
        )  # fmt: skip
    except UserError:
        raise
    except ValueError as error:
        # transformers checks some fields only when the trainer is built (report_to, say): still the user's input.
        raise InvalidValueError(str(error)) from error
    resume = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    output = trainer.train(resume_from_checkpoint=resume)
    metrics = {
        "train_loss": output.metrics.get("train_loss"),
        "train_runtime_s": output.metrics.get("train_runtime"),
        "world_size": args.world_size,
        "epochs": trainer.state.epoch,
        # Whether the student read its teacher live, from a cache or not at all: a grid labels its rows by this.
        "teacher_signal": trainer.teacher_signal.kind,
        **trainer.generation_summary(),
    }
    if args.early_stopping_patience is not None:
        best = trainer.state.best_model_checkpoint
        best_step = int(best.rsplit("-", 1)[-1]) if best else None
        # The epoch the kept weights come from: the evaluation logged at the best checkpoint's step says it.
        best_epoch = next((entry["epoch"] for entry in trainer.state.log_history
                           if entry.get("step") == best_step and "epoch" in entry), None)  # fmt: skip
        metrics.update(best_metric=trainer.state.best_metric, best_step=best_step,
                       best_epoch=round(best_epoch, 2) if best_epoch is not None else None,
                       stopped_early=trainer.state.global_step < trainer.state.max_steps)  # fmt: skip
    # The run's validation curve outlives its checkpoints: whether it had converged, and the grid's plot, read it.
    metrics["eval_history"] = eval_history(trainer.state.log_history)
    for split, dataset in evals.items():
        result = trainer.evaluate(dataset, metric_key_prefix=split)
        metrics.update({k: v for k, v in result.items() if k.startswith(split) and not k.endswith("_tokens")})
    save_model_atomically(trainer, os.path.join(args.output_dir, "model"), metrics)
    if trainer.is_world_process_zero():
        print(json.dumps({k: v for k, v in metrics.items() if k != "eval_history"}, indent=2))  # in metrics.json
    return metrics


def command_cache_teacher(argv: list[str]) -> dict:
    from seqkd.data.text import StreamBatches
    from seqkd.teacher_cache import cache_teacher, cached_positions
    from seqkd.trainer import load_teacher

    model_args, data_args, args, cache_args = parse_command_line("cache-teacher", argv)
    teacher_path = args.teacher_model_name_or_path
    if not teacher_path:
        raise InvalidValueError("seqkd cache-teacher needs --teacher_model_name_or_path (a trained model folder)")
    if not args.teacher_cache:
        raise InvalidValueError("seqkd cache-teacher needs --teacher_cache (the folder to write the cache to)")
    check_model_folder(teacher_path, allow_pickle=args.allow_pickle_weights, what="teacher")
    if os.path.exists(args.teacher_cache) and not os.path.isdir(args.teacher_cache):
        raise InvalidValueError(f"teacher_cache {args.teacher_cache!r} is a file: name a folder for the cache")
    translation = is_translation(data_args, model_args)
    # The training set exactly as `seqkd distill` with this recipe will build it (the student decides the batching).
    pipeline = build_pipeline(model_args, data_args, args, teacher_path)
    tokenizer, train = pipeline.tokenizer, pipeline.train_dataset
    if isinstance(train, StreamBatches):
        train = train.with_num_processes(cache_args.cache_num_processes)
    teacher = load_teacher(
        teacher_path, is_encoder_decoder=translation, dtype=args.teacher_dtype, allow_pickle=args.allow_pickle_weights
    )
    manifest = cache_teacher(
        teacher, train, args.teacher_cache, top_k=cache_args.cache_top_k, dtype=cache_args.cache_dtype,
        tokenizer=tokenizer, shard_tokens=cache_args.cache_shard_tokens, batch_size=args.per_device_eval_batch_size,
        device=args.device, show_progress=not args.disable_tqdm, samples=cache_args.samples,
        sample_temperature=cache_args.cache_sample_temperature, sample_seed=cache_args.cache_sample_seed,
    )  # fmt: skip
    layout = manifest["layout"]
    stored = sum(shard["bytes"] for shard in manifest["shards"])
    summary = {
        "teacher_cache": args.teacher_cache,
        "layout": layout,
        "top_k": manifest["top_k"],
        "sampling": manifest.get("sampling"),
        "dtype": manifest["dtype"],
        "shards": len(manifest["shards"]),
        "bytes": stored,
        "bytes_per_token": stored / max(cached_positions(layout), 1),
    }
    print(json.dumps(summary, indent=2))
    return summary


def command_distill_data(argv: list[str]) -> dict:
    from transformers import AutoConfig

    from seqkd.pipeline import is_translation, load_corpus, teacher_tokenizer
    from seqkd.sequence_kd import TranslationEnsemble, write_distilled_data
    from seqkd.teacher_cache import tokenizer_fingerprint

    model_args, data_args, args, distill_data_args = parse_command_line("distill-data", argv)
    teacher_path = args.teacher_model_name_or_path
    if not teacher_path:
        raise InvalidValueError("seqkd distill-data needs --teacher_model_name_or_path (a trained translation or language model)")
    check_model_folder(teacher_path, allow_pickle=args.allow_pickle_weights, what="teacher")
    translation = bool(AutoConfig.from_pretrained(teacher_path).is_encoder_decoder)
    if translation != is_translation(data_args, model_args):
        teacher_kind, recipe_kind = ("translation", "language-modelling") if translation else ("language", "translation")
        raise InvalidValueError(
            f"teacher {teacher_path!r} is a {teacher_kind} model but the recipe is a {recipe_kind} task: distil with a "
            "recipe of the teacher's own task (its dataset and model kind)"
        )
    tokenizer = teacher_tokenizer(teacher_path)
    if tokenizer is None:
        raise MissingInputError(f"teacher folder {teacher_path!r} has no tokenizer (tokenizer.json): save it beside the model")
    members = [teacher_path, *(distill_data_args.ensemble_with or [])]
    if len(members) > 1 and not translation:
        raise InvalidValueError("ensemble_with decodes with an ensemble of translation models; the teacher is a language model")
    for path in members[1:]:
        check_model_folder(path, allow_pickle=args.allow_pickle_weights, what="ensemble member")
        member_tokenizer = teacher_tokenizer(path)
        if member_tokenizer is not None and tokenizer_fingerprint(member_tokenizer) != tokenizer_fingerprint(tokenizer):
            raise InvalidValueError(
                f"ensemble member {path!r} has another tokenizer than the teacher {teacher_path!r}: an ensemble averages "
                "distributions over one vocabulary; train its members with the same tokenizer"
            )
    if len(members) > 1:
        teacher = TranslationEnsemble(
            [load_saved_model(path, allow_pickle=args.allow_pickle_weights) for path in members]
        ).to(args.device)
    else:
        teacher = load_saved_model(teacher_path, allow_pickle=args.allow_pickle_weights).to(args.device)
    if translation:
        corpus = load_parallel_corpus(data_args)
        languages = {"source_lang": data_args.source_lang, "target_lang": data_args.target_lang}
    else:
        corpus = load_corpus(data_args)
        if data_args.max_train_examples is not None:
            corpus["train"] = corpus["train"].select(range(min(data_args.max_train_examples, len(corpus["train"]))))
        languages = {}
    manifest = write_distilled_data(
        teacher, tokenizer, corpus, args.output_dir, distill_data_args, **languages,
        batch_size=args.per_device_eval_batch_size,
        bleu_tokenize="none" if data_args.pretokenized else args.bleu_tokenize,
        max_source_length=data_args.max_source_length if translation else None, device=args.device,
        show_progress=not args.disable_tqdm,
    )  # fmt: skip
    summary = {"output_dir": args.output_dir, "method": manifest["method"], **manifest["counts"],
               **(manifest.get("decoding") or {})}  # fmt: skip
    print(json.dumps(summary, indent=2))
    return summary


def command_born_again(argv: list[str]) -> list[dict]:
    from seqkd.born_again import run_born_again

    model_args, data_args, args, born_again_args, cache_args = parse_command_line("born-again", argv)
    pipeline = build_pipeline(model_args, data_args, args)
    recipe = {**dataclasses.asdict(model_args), **dataclasses.asdict(data_args)}
    results = run_born_again(
        pipeline.build_model, args, born_again_args, train_dataset=pipeline.train_dataset,
        eval_datasets=pipeline.eval_datasets, processing_class=pipeline.tokenizer,
        data_collator=pipeline.data_collator, cache_args=cache_args, recipe=recipe,
    )  # fmt: skip
    if args.process_index == 0:
        with open(os.path.join(args.output_dir, "results.md")) as f:
            print(f.read())
    return results


def command_evaluate(argv: list[str]) -> dict:
    from seqkd.data.text import evaluation_dataloader
    from seqkd.evaluation import check_vocab_size, corpus_perplexity, teacher_stability

    model_args, data_args, args, eval_args = parse_command_line("evaluate", argv)
    path = eval_args.model_name_or_path
    if not path:
        raise InvalidValueError("seqkd evaluate needs --model_name_or_path (a saved model folder)")
    model = load_saved_model(path, allow_pickle=args.allow_pickle_weights).to(args.device)
    if not any(os.path.isfile(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer_config.json")):
        raise MissingInputError(
            f"model folder {path!r} has no tokenizer (tokenizer.json): save the tokenizer beside the model "
            "(tokenizer.save_pretrained), as seqkd's commands do"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    check_vocab_size(tokenizer, model)
    split = canonical_split_name(eval_args.split)
    metrics = {"model": path, "split": split}
    if model.config.is_encoder_decoder:
        from seqkd.data.translation import translation_collator
        from seqkd.evaluation import bleu_eval

        corpus = load_parallel_corpus(data_args)
        _, evals = build_translation_datasets(corpus, tokenizer, data_args, [split])
        tokenize = "none" if data_args.pretokenized else args.bleu_tokenize
        bleu = bleu_eval(
            model, tokenizer, corpus[split], num_beams=args.generation_num_beams or 1,
            max_new_tokens=args.generation_max_length or 128, batch_size=args.per_device_eval_batch_size,
            tokenize=tokenize,
        )  # fmt: skip
        metrics.update({"bleu": bleu["bleu"], "chrf": bleu["chrf"], "bleu_signature": bleu["signature"],
                        "length_ratio": bleu["length_ratio"], "decode_seconds": round(bleu["decode_seconds"], 2),
                        "sentences_per_second": round(bleu["sentences_per_second"], 2)})  # fmt: skip
        loader = evaluation_dataloader(
            evals[split], args.per_device_eval_batch_size, collate_fn=translation_collator(tokenizer)
        )
    else:
        corpus = load_corpus(data_args)
        _, evals = build_datasets(corpus, tokenizer, data_args, args, uses_streams(model, data_args), [split])
        loader = evaluation_dataloader(evals[split], args.per_device_eval_batch_size)
    result = corpus_perplexity(model, loader, device=args.device, desc=split)
    metrics.update({"perplexity": result["perplexity"], "loss": result["loss"], "tokens": result["tokens"]})
    if eval_args.stability:
        metrics["stability"] = teacher_stability(model, loader, device=args.device)["stability"]
    print(json.dumps(metrics, indent=2))
    return metrics


USAGE = f"""usage: seqkd {{{",".join(COMMANDS)}}} [RECIPE.yaml] [--field value ...]

  train        train a model from labels (loss ce or ls)
  distill      train a student from a saved teacher (--teacher_model_name_or_path) or its cache (--teacher_cache)
  cache-teacher  run a teacher once over the training split and store its top-k outputs (--teacher_cache)
  distill-data   decode the training set with a teacher: a corpus for Seq-KD / Seq-Inter (or LM continuations)
  born-again   a Born-Again chain: generation 0 from labels, each next one from the last, and their ensemble
  evaluate     perplexity (and BLEU, chrF for translation; --stability) of a saved model on a split

`seqkd COMMAND --help` lists every field of the recipe with its help. A user error prints one line and exits
with status 2; --debug (or SEQKD_DEBUG=1) shows its traceback.
"""


def _names_field(argv: list[str], name: str) -> bool:
    """Whether a command line sets ``--name`` (as ``--name value`` or ``--name=value``)."""
    return any(arg == f"--{name}" or arg.startswith(f"--{name}=") for arg in argv)


def _born_again_teacher_loss(argv: list[str]) -> str | None:
    """The ``teacher_loss`` of a Born-Again recipe, unless the command line chose the loss itself."""
    if not argv or argv[0].startswith("-") or _names_field(argv, "loss"):
        return None
    return read_recipe(argv[0]).get("teacher_loss")


def _strip_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """Remove seqkd's own ``--debug``. transformers has a ``debug`` field too, which takes a value
    (``--debug underflow_overflow``): a ``--debug`` followed by a value is that field's, and stays."""
    kept, debug = [], False
    for i, arg in enumerate(argv):
        if arg == "--debug" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            debug = True
        else:
            kept.append(arg)
    return kept, debug


def _is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or one it was raised from) says the disk is full. safetensors and torch report it in
    exceptions of their own (SafetensorError, RuntimeError) whose text names the OS error."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if any(sign in text for sign in ("No space left on device", "os error 28", "StorageFull", "Disk quota exceeded",
                                         "os error 122", "QuotaExceeded")):  # fmt: skip
            return True
        error = error.__cause__ or error.__context__
    return False


COMMAND_FUNCTIONS = {
    "train": lambda argv: command_train(argv, distill=False),
    "distill": lambda argv: command_train(argv, distill=True),
    "cache-teacher": command_cache_teacher,
    "distill-data": command_distill_data,
    "born-again": command_born_again,
    "evaluate": command_evaluate,
}


def _print_error(line: str) -> None:
    # One write of line and newline together: processes of one launch sharing stderr do not interleave them.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        _print_error(f"seqkd: error: unknown command {command!r}: choose one of {', '.join(COMMANDS)}")
        return 2
    rest, debug = _strip_debug_flag(rest)
    debug = debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import seqkd  # noqa: F401  (registers the models with the Auto classes)

    try:
        COMMAND_FUNCTIONS[command](rest)
    except UserError as error:
        if debug:
            raise
        _print_error(f"seqkd {command}: error: {_one_line(error)}")
        return 2
    except Exception as error:
        # A full disk (or quota) is the machine's state, not a bug: say so in one line (every write is atomic, so
        # nothing half-written is left to load).
        if debug or not _is_disk_full(error):
            raise
        _print_error(f"seqkd {command}: error: the disk is full (or over quota) while writing ({_one_line(error)}): "
                     "free some space and run the same command again: it resumes from the last whole checkpoint or "
                     "cache shard")  # fmt: skip
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
