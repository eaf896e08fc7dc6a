"""The ``seqkd`` command: ``train``, ``distill``, ``cache-teacher``, ``born-again`` and ``evaluate``.

Each command reads an optional recipe YAML (safe loading) whose keys are the fields of the argument dataclasses
below and of ``DistillationArguments``; any field can be overridden on the command line::

    seqkd born-again recipes/ban_lstm_ptb_small.yaml --data_dir ../shared/data --output_dir runs/ban
    seqkd train recipes/ban_lstm_ptb_small.yaml --max_steps 100 --output_dir runs/smoke
    seqkd cache-teacher recipes/ban_lstm_ptb_small.yaml --teacher_model_name_or_path T --teacher_cache runs/cache
    seqkd distill recipes/ban_lstm_ptb_small.yaml --teacher_cache runs/cache --output_dir runs/student
    seqkd evaluate --model_name_or_path runs/ban/gen-1/model --data_dir ../shared/data --split test
    accelerate launch --multi_gpu --num_processes 2 -m seqkd distill recipe.yaml ...

``seqkd COMMAND --help`` lists every field with its help.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, PreTrainedModel

from seqkd.errors import InvalidValueError, MissingInputError

COMMANDS = ("train", "distill", "cache-teacher", "born-again", "evaluate")
DATA_DIR_ENV = "SEQKD_DATA_DIR"

logger = logging.getLogger("seqkd")


@dataclass
class ModelArguments:
    """The student's architecture (or a saved model to start from)."""

    model: str = field(
        default="lstm",
        metadata={
            "help": "'lstm' (seqkd's LSTM LM), 'lstm-seq2seq' (seqkd's attentional LSTM encoder-decoder), a preset of "
            "seqkd.models.transformer (causal: e.g. 'gpt2-small-ptb'; encoder-decoder: e.g. 'transformer-3x3-256'), "
            "or a saved model folder to start from."
        },
    )
    model_config: str | None = field(
        default=None,
        metadata={
            "help": "Config fields of the model as a JSON object (a mapping in a recipe), e.g. "
            '\'{"hidden_size": 650, "num_layers": 2}\'.'
        },
    )


@dataclass
class DataArguments:
    """The corpus, its tokenizer and how it is batched."""

    dataset: str = field(
        default="ptb",
        metadata={
            "help": "Language modelling: 'ptb' (Penn Treebank: from data_dir, else the Hub's ptb_text_only), a folder "
            "with {train,validation,test}.txt, or a Hub dataset name. Translation: 'multi30k' (from data_dir, else "
            "the Hub), or a folder of {split}.{lang}[.gz] files, or a Hub dataset with a 'translation' column."
        },
    )
    task: str = field(
        default="auto",
        metadata={
            "help": "'lm' (language modelling), 'translation', or 'auto' (translation for encoder-decoder models).",
            "choices": ["auto", "lm", "translation"],
        },
    )
    source_lang: str = field(default="de", metadata={"help": "Translation: the source language's file suffix."})
    target_lang: str = field(default="en", metadata={"help": "Translation: the target language's file suffix."})
    pretokenized: bool = field(
        default=False,
        metadata={
            "help": "Translation: the text is already tokenized (Multi30k's tok/ files): split subwords on spaces "
            "only, and score BLEU with tokenize 'none'."
        },
    )
    tokenizer_model: str = field(
        default="bpe",
        metadata={"help": "Translation: the joint subword model, 'bpe' or 'unigram'.", "choices": ["bpe", "unigram"]},
    )
    max_source_length: int = field(default=128, metadata={"help": "Translation: truncate sources to this many tokens."})
    max_target_length: int = field(default=128, metadata={"help": "Translation: truncate targets to this many tokens."})
    max_train_examples: int | None = field(
        default=None, metadata={"help": "Translation: use only the first N training pairs (quick runs and tests)."}
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": f"Folder holding the corpus (for PTB: ptb/ or the ptb.*.txt files); default ${DATA_DIR_ENV}."},
    )
    tokenizer: str = field(
        default="word",
        metadata={
            "help": "'word' (word-level, <eos> per line), 'bpe' (byte-level BPE), or a saved tokenizer folder. "
            "When distilling from a saved teacher, the teacher's own tokenizer is used."
        },
    )
    bpe_vocab_size: int = field(
        default=8000, metadata={"help": "Vocabulary size of a trained subword (BPE or Unigram) tokenizer."}
    )
    batching: str = field(
        default="auto",
        metadata={
            "help": "'stream' (contiguous streams, state carried: truncated BPTT), 'blocks' (fixed-length blocks), "
            "or 'auto' (stream for the LSTM, blocks for Transformers).",
            "choices": ["auto", "stream", "blocks"],
        },
    )
    seq_len: int = field(default=35, metadata={"help": "Tokens per row of a batch: the BPTT length or block size."})
    max_train_tokens: int | None = field(
        default=None, metadata={"help": "Use only the first N tokens of the train split (quick runs and tests)."}
    )
    max_eval_tokens: int | None = field(
        default=None, metadata={"help": "Use only the first N tokens of each evaluation split."}
    )
    eval_splits: str = field(
        default="validation,test",
        metadata={"help": "Comma-separated splits to report; the first drives evaluation during training."},
    )


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


def _parser(command: str) -> HfArgumentParser:
    from seqkd.born_again import BornAgainArguments
    from seqkd.trainer import DistillationArguments

    from seqkd.teacher_cache import TeacherCacheArguments

    types = [ModelArguments, DataArguments, DistillationArguments]
    if command == "born-again":
        types += [BornAgainArguments, TeacherCacheArguments]
    if command == "cache-teacher":
        types.append(TeacherCacheArguments)
    if command == "evaluate":
        types.append(EvaluateArguments)
    return HfArgumentParser(types, prog=f"seqkd {command}", description=f"seqkd {command}: see `seqkd --help`.")


def _recipe_to_argv(path: str, parser: HfArgumentParser) -> list[str]:
    if not os.path.isfile(path):
        raise MissingInputError(f"recipe {path!r} does not exist")
    with open(path) as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict):
        raise InvalidValueError(f"recipe {path} must be a mapping of field: value, got {type(recipe).__name__}")
    known = {action.dest for action in parser._actions}
    # One recipe serves every command: fields of another command (num_generations for `evaluate`, say) are skipped.
    every_field = {f.name for command in COMMANDS for cls in _parser(command).dataclass_types for f in dataclasses.fields(cls)}
    unknown = sorted(set(recipe) - every_field)
    if unknown:
        raise InvalidValueError(f"recipe {path} has unknown fields {unknown}; `seqkd COMMAND --help` lists the fields")
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


def parse_command_line(command: str, argv: list[str]):
    """``argv`` = [recipe.yaml] [--field value ...]; the command line overrides the recipe."""
    parser = _parser(command)
    recipe_argv: list[str] = []
    if argv and not argv[0].startswith("-"):
        recipe_argv = _recipe_to_argv(argv[0], parser)
        argv = argv[1:]
    full = recipe_argv + argv
    if "--output_dir" not in full:
        full += ["--output_dir", os.path.join("runs", command)]
    return parser.parse_args_into_dataclasses(args=full)


# --------------------------------------------------------------------------------------------------------
# Building the pieces.


def _data_dir(data_args: DataArguments) -> str | None:
    return data_args.data_dir or os.environ.get(DATA_DIR_ENV)


def _dataset_path(data_args: DataArguments) -> str:
    """``dataset`` itself, or the folder of that name inside ``data_dir`` when there is one."""
    root, data_dir = data_args.dataset, _data_dir(data_args)
    if data_dir and not os.path.isabs(root) and os.path.isdir(os.path.join(data_dir, root)):
        return os.path.join(data_dir, root)
    return root


def _teacher_tokenizer(teacher_path: str | None):
    """The tokenizer saved beside a teacher: a student must share its teacher's vocabulary."""
    if teacher_path and os.path.isfile(os.path.join(teacher_path, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(teacher_path)
    return None


def load_corpus(data_args: DataArguments):
    from seqkd.data.text import load_ptb, load_text_splits

    if data_args.dataset == "ptb":
        return load_ptb(_data_dir(data_args))
    return load_text_splits(_dataset_path(data_args))


def build_tokenizer(data_args: DataArguments, corpus, teacher_path: str | None = None):
    from seqkd.data.text import train_bpe_tokenizer, train_word_tokenizer

    teacher_tokenizer = _teacher_tokenizer(teacher_path)
    if teacher_tokenizer is not None:
        return teacher_tokenizer
    if data_args.tokenizer == "word":
        return train_word_tokenizer(corpus["train"])
    if data_args.tokenizer == "bpe":
        return train_bpe_tokenizer(corpus["train"], vocab_size=data_args.bpe_vocab_size)
    if os.path.isdir(data_args.tokenizer):
        return AutoTokenizer.from_pretrained(data_args.tokenizer)
    raise InvalidValueError(f"tokenizer must be 'word', 'bpe' or a saved tokenizer folder, got {data_args.tokenizer!r}")


def _model_config(model_args: ModelArguments) -> dict:
    if model_args.model_config is None:
        return {}
    try:
        config = json.loads(model_args.model_config)
    except json.JSONDecodeError as error:
        raise InvalidValueError(f"model_config must be a JSON object, got {model_args.model_config!r}: {error}") from error
    if not isinstance(config, dict):
        raise InvalidValueError(f"model_config must be a JSON object, got {model_args.model_config!r}")
    return config


def model_factory(model_args: ModelArguments, tokenizer):
    """A function that builds a fresh student sized to ``tokenizer``."""
    from seqkd.evaluation import check_vocab_size
    from seqkd.models import (
        CAUSAL_LM_PRESETS,
        SEQ2SEQ_PRESETS,
        LSTMForCausalLM,
        LSTMForConditionalGeneration,
        LSTMLMConfig,
        LSTMSeq2SeqConfig,
        build_causal_lm,
        build_seq2seq,
    )

    overrides = _model_config(model_args)
    name = model_args.model
    if name == "lstm-seq2seq":
        def build():
            ids = {k: getattr(tokenizer, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
            return LSTMForConditionalGeneration(
                LSTMSeq2SeqConfig(vocab_size=len(tokenizer), decoder_start_token_id=ids["bos_token_id"], **ids, **overrides)
            )
    elif name in SEQ2SEQ_PRESETS:
        def build():
            return build_seq2seq(name, tokenizer=tokenizer, **overrides)
    elif name == "lstm":
        def build():
            eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else None
            return LSTMForCausalLM(LSTMLMConfig(vocab_size=len(tokenizer), eos_token_id=eos, **overrides))
    elif name in CAUSAL_LM_PRESETS:
        def build():
            return build_causal_lm(name, tokenizer=tokenizer, **overrides)
    elif os.path.isdir(name):
        def build():
            model = _load_saved_model(name)
            check_vocab_size(tokenizer, model)
            return model
    else:
        raise InvalidValueError(
            f"model must be 'lstm', 'lstm-seq2seq', one of the presets {sorted(CAUSAL_LM_PRESETS)} or "
            f"{sorted(SEQ2SEQ_PRESETS)}, or a saved model folder; got {name!r}"
        )
    return build


def _load_saved_model(path: str) -> PreTrainedModel:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return auto.from_pretrained(path)


def _is_translation(data_args: DataArguments, model_args: ModelArguments) -> bool:
    if data_args.task != "auto":
        return data_args.task == "translation"
    from seqkd.models import SEQ2SEQ_PRESETS

    if model_args.model in ("lstm-seq2seq", *SEQ2SEQ_PRESETS):
        return True
    if os.path.isdir(model_args.model):
        from transformers import AutoConfig

        return bool(AutoConfig.from_pretrained(model_args.model).is_encoder_decoder)
    return data_args.dataset == "multi30k"


def load_parallel_corpus(data_args: DataArguments):
    from seqkd.data.translation import load_multi30k, load_translation_splits

    languages = {"source_lang": data_args.source_lang, "target_lang": data_args.target_lang}
    if data_args.dataset == "multi30k":
        corpus = load_multi30k(_data_dir(data_args), tokenized=data_args.pretokenized, **languages)
    else:
        corpus = load_translation_splits(_dataset_path(data_args), data_args.source_lang, data_args.target_lang)
    if data_args.max_train_examples is not None:
        corpus["train"] = corpus["train"].select(range(min(data_args.max_train_examples, len(corpus["train"]))))
    return corpus


def build_translation_tokenizer(data_args: DataArguments, corpus, teacher_path: str | None = None):
    from seqkd.data.translation import train_translation_tokenizer

    teacher_tokenizer = _teacher_tokenizer(teacher_path)
    if teacher_tokenizer is not None:
        return teacher_tokenizer
    if data_args.tokenizer not in ("word", "bpe") and os.path.isdir(data_args.tokenizer):
        return AutoTokenizer.from_pretrained(data_args.tokenizer)
    return train_translation_tokenizer(
        corpus["train"], data_args.bpe_vocab_size, model=data_args.tokenizer_model, pretokenized=data_args.pretokenized
    )


def build_translation_datasets(corpus, tokenizer, data_args: DataArguments, splits: list[str]):
    from seqkd.data.translation import filter_by_length, tokenize_translation

    for split in ["train", *splits]:
        if split not in corpus:
            raise InvalidValueError(f"the corpus has no {split!r} split; it has {sorted(corpus)}")
    corpus = filter_by_length(corpus, tokenizer, min_tokens=1, max_tokens=data_args.max_source_length)
    tokenized = tokenize_translation(
        corpus, tokenizer, max_source_length=data_args.max_source_length, max_target_length=data_args.max_target_length
    )
    return tokenized["train"], {split: tokenized[split] for split in splits}


def _uses_streams(model: PreTrainedModel, data_args: DataArguments) -> bool:
    if data_args.batching == "auto":
        from seqkd.evaluation import is_stateful

        return is_stateful(model)
    return data_args.batching == "stream"


def build_datasets(corpus, tokenizer, data_args: DataArguments, args, stream: bool, splits: list[str]):
    """The train split and the evaluation splits, as stream batches or blocks."""
    from seqkd.data.text import StreamBatches, encode_stream, group_texts

    def ids(split, limit):
        tokens = encode_stream(tokenizer, corpus[split])
        return tokens if limit is None else tokens[:limit]

    def make(split, batch_size, limit):
        if stream:
            return StreamBatches(
                ids(split, limit), batch_size, data_args.seq_len,
                process_index=args.process_index, num_processes=args.world_size,
            )  # fmt: skip
        texts = corpus[split]
        if limit is not None:
            blocks = group_texts(texts, tokenizer, data_args.seq_len)
            return blocks.select(range(min(len(blocks), max(1, limit // data_args.seq_len))))
        return group_texts(texts, tokenizer, data_args.seq_len)

    for split in ["train", *splits]:
        if split not in corpus:
            raise InvalidValueError(f"the corpus has no {split!r} split; it has {sorted(corpus)}")
    train = make("train", args.per_device_train_batch_size, data_args.max_train_tokens)
    evals = {split: make(split, args.per_device_eval_batch_size, data_args.max_eval_tokens) for split in splits}
    return train, evals


def _prepare(model_args, data_args, args, teacher_path=None):
    """The tokenizer, a model builder, one built model, the train set, the evaluation sets and the collator."""
    splits = [s.strip() for s in data_args.eval_splits.split(",") if s.strip()]
    if _is_translation(data_args, model_args):
        from seqkd.data.translation import translation_collator

        if data_args.pretokenized and args.bleu_tokenize == "13a":
            args.bleu_tokenize = "none"
        corpus = load_parallel_corpus(data_args)
        tokenizer = build_translation_tokenizer(data_args, corpus, teacher_path)
        build = model_factory(model_args, tokenizer)
        probe = build()
        train, evals = build_translation_datasets(corpus, tokenizer, data_args, splits)
        return tokenizer, build, probe, train, evals, translation_collator(tokenizer, probe)
    corpus = load_corpus(data_args)
    tokenizer = build_tokenizer(data_args, corpus, teacher_path)
    build = model_factory(model_args, tokenizer)
    probe = build()
    streams = _uses_streams(probe, data_args)
    train, evals = build_datasets(corpus, tokenizer, data_args, args, streams, splits)
    # Fixed-length blocks need no padding (the word tokenizer has no pad token): stack them as they are.
    from transformers import default_data_collator

    return tokenizer, build, probe, train, evals, None if streams else default_data_collator


# --------------------------------------------------------------------------------------------------------
# Commands.


def command_train(argv: list[str], *, distill: bool) -> dict:
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from seqkd.trainer import DistillationTrainer, save_model_atomically

    model_args, data_args, args = parse_command_line("distill" if distill else "train", argv)
    has_teacher = bool(args.teacher_model_name_or_path or args.teacher_cache)
    if distill and not has_teacher:
        raise InvalidValueError(
            "seqkd distill needs --teacher_model_name_or_path (a trained model folder) or --teacher_cache "
            "(a folder written by `seqkd cache-teacher`)"
        )
    if not distill and args.needs_teacher and not has_teacher:
        raise InvalidValueError(
            f"loss {args.loss!r} needs a teacher: use `seqkd distill --teacher_model_name_or_path ...`, "
            "or train from labels with --loss ce / ls"
        )
    teacher_path = args.teacher_model_name_or_path if args.needs_teacher else None
    if teacher_path and not os.path.isdir(teacher_path):
        raise MissingInputError(f"teacher_model_name_or_path {teacher_path!r} does not exist")
    if args.needs_teacher and args.teacher_cache:
        if not os.path.isdir(args.teacher_cache):
            raise MissingInputError(f"teacher_cache {args.teacher_cache!r} does not exist: write it with `seqkd cache-teacher`")
        # The cache keeps the teacher's tokenizer beside its shards.
        teacher_path = teacher_path or args.teacher_cache
    set_seed(args.seed)
    tokenizer, _, student, train, evals, collator = _prepare(model_args, data_args, args, teacher_path)
    first = next(iter(evals))
    trainer = DistillationTrainer(
        model=student, args=args, train_dataset=train, eval_dataset=evals[first], processing_class=tokenizer,
        data_collator=collator,
    )  # fmt: skip
    resume = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    output = trainer.train(resume_from_checkpoint=resume)
    metrics = {
        "train_loss": output.metrics.get("train_loss"),
        "train_runtime_s": output.metrics.get("train_runtime"),
        "world_size": args.world_size,
    }
    for split, dataset in evals.items():
        result = trainer.evaluate(dataset, metric_key_prefix=split)
        metrics.update({k: v for k, v in result.items() if k.startswith(split) and not k.endswith("_tokens")})
    save_model_atomically(trainer, os.path.join(args.output_dir, "model"), metrics)
    if trainer.is_world_process_zero():
        print(json.dumps(metrics, indent=2))
    return metrics


def command_cache_teacher(argv: list[str]) -> dict:
    from seqkd.data.text import StreamBatches
    from seqkd.teacher_cache import cache_teacher
    from seqkd.trainer import load_teacher

    model_args, data_args, args, cache_args = parse_command_line("cache-teacher", argv)
    teacher_path = args.teacher_model_name_or_path
    if not teacher_path:
        raise InvalidValueError("seqkd cache-teacher needs --teacher_model_name_or_path (a trained model folder)")
    if not args.teacher_cache:
        raise InvalidValueError("seqkd cache-teacher needs --teacher_cache (the folder to write the cache to)")
    if not os.path.isdir(teacher_path):
        raise MissingInputError(f"teacher_model_name_or_path {teacher_path!r} does not exist")
    if _is_translation(data_args, model_args):
        raise InvalidValueError("seqkd cache-teacher caches language-model teachers; distil translation models online")
    # The training set exactly as `seqkd distill` with this recipe will build it (the student decides the batching).
    tokenizer, _, _, train, _, _ = _prepare(model_args, data_args, args, teacher_path)
    if isinstance(train, StreamBatches):
        train = train.with_num_processes(cache_args.cache_num_processes)
    teacher = load_teacher(teacher_path, is_encoder_decoder=False, dtype=args.teacher_dtype)
    manifest = cache_teacher(
        teacher, train, args.teacher_cache, top_k=cache_args.cache_top_k, dtype=cache_args.cache_dtype,
        tokenizer=tokenizer, shard_tokens=cache_args.cache_shard_tokens, batch_size=args.per_device_eval_batch_size,
        device=args.device, show_progress=not args.disable_tqdm,
    )  # fmt: skip
    layout = manifest["layout"]
    stored = sum(shard["bytes"] for shard in manifest["shards"])
    summary = {
        "teacher_cache": args.teacher_cache,
        "layout": layout,
        "top_k": manifest["top_k"],
        "dtype": manifest["dtype"],
        "shards": len(manifest["shards"]),
        "bytes": stored,
        "bytes_per_token": stored / max(layout["rows"] * layout["positions"], 1),
    }
    print(json.dumps(summary, indent=2))
    return summary


def command_born_again(argv: list[str]) -> list[dict]:
    from seqkd.born_again import run_born_again

    model_args, data_args, args, born_again_args, cache_args = parse_command_line("born-again", argv)
    tokenizer, build, _, train, evals, collator = _prepare(model_args, data_args, args)
    results = run_born_again(
        build, args, born_again_args, train_dataset=train, eval_datasets=evals, processing_class=tokenizer,
        data_collator=collator, cache_args=cache_args,
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
    if not os.path.isdir(path):
        raise MissingInputError(f"model_name_or_path {path!r} does not exist")
    model = _load_saved_model(path).to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    check_vocab_size(tokenizer, model)
    split = eval_args.split
    metrics = {"model": path, "split": split}
    if model.config.is_encoder_decoder:
        from seqkd.data.translation import translation_collator
        from seqkd.evaluation import bleu_eval

        corpus = load_parallel_corpus(data_args)
        if split not in corpus:
            raise InvalidValueError(f"the corpus has no {split!r} split; it has {sorted(corpus)}")
        _, evals = build_translation_datasets(corpus, tokenizer, data_args, [split])
        tokenize = "none" if data_args.pretokenized else args.bleu_tokenize
        bleu = bleu_eval(
            model, tokenizer, corpus[split], num_beams=args.generation_num_beams or 1,
            max_new_tokens=args.generation_max_length or 128, batch_size=args.per_device_eval_batch_size,
            tokenize=tokenize,
        )  # fmt: skip
        metrics.update({"bleu": bleu["bleu"], "chrf": bleu["chrf"], "bleu_signature": bleu["signature"]})
        loader = evaluation_dataloader(
            evals[split], args.per_device_eval_batch_size, collate_fn=translation_collator(tokenizer)
        )
    else:
        corpus = load_corpus(data_args)
        _, evals = build_datasets(corpus, tokenizer, data_args, args, _uses_streams(model, data_args), [split])
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
  born-again   a Born-Again chain: generation 0 from labels, each next one from the last, and their ensemble
  evaluate     perplexity (and BLEU, chrF for translation; --stability) of a saved model on a split

`seqkd COMMAND --help` lists every field of the recipe with its help.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"seqkd: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import seqkd  # noqa: F401  (registers the models with the Auto classes)

    if command == "train":
        command_train(rest, distill=False)
    elif command == "distill":
        command_train(rest, distill=True)
    elif command == "cache-teacher":
        command_cache_teacher(rest)
    elif command == "born-again":
        command_born_again(rest)
    else:
        command_evaluate(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
