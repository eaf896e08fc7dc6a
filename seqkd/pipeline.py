"""Recipe -> tokenizer, model factory, datasets and collator: the pieces every seqkd command and script assembles.

A recipe's fields live in :class:`ModelArguments`, :class:`DataArguments` and
:class:`seqkd.trainer.DistillationArguments`. :func:`build_pipeline` turns them into a :class:`Pipeline`; the
functions it calls are public for scripts that need one piece (a corpus, a tokenizer, a saved model)::

    from seqkd.pipeline import DataArguments, ModelArguments, build_pipeline

    pipeline = build_pipeline(model_args, data_args, training_args)
    trainer = DistillationTrainer(model=pipeline.model, args=training_args, train_dataset=pipeline.train_dataset, ...)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from seqkd.errors import InvalidValueError, MissingInputError

DATA_DIR_ENV = "SEQKD_DATA_DIR"


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
        default=None,
        metadata={"help": "Translation: use only the first N training pairs; batching 'prompts': the first N lines "
                  "(quick runs and tests)."},  # fmt: skip
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
            "'prompts' (each training line a prompt of prompt_length tokens and its completion: on-policy "
            "distillation, lmbda; evaluation as 'auto'), or 'auto' (stream for the LSTM, blocks for Transformers).",
            "choices": ["auto", "stream", "blocks", "prompts"],
        },
    )
    prompt_length: int = field(
        default=5,
        metadata={"help": "batching 'prompts': the prompt is a line's first this many tokens (after the end-of-sentence "
                  "token before it); shorter lines are left out."},  # fmt: skip
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


def resolve_data_dir(data_args: DataArguments) -> str | None:
    """The data folder: ``data_dir``, else ``$SEQKD_DATA_DIR``, else None (load from the Hub)."""
    return data_args.data_dir or os.environ.get(DATA_DIR_ENV)


def dataset_path(data_args: DataArguments) -> str:
    """``dataset`` itself, or the folder of that name inside ``data_dir`` when there is one."""
    root, data_dir = data_args.dataset, resolve_data_dir(data_args)
    if data_dir and not os.path.isabs(root) and os.path.isdir(os.path.join(data_dir, root)):
        return os.path.join(data_dir, root)
    return root


def teacher_tokenizer(teacher_path: str | None):
    """The tokenizer saved beside a teacher (or a teacher cache), or None: a student must share its teacher's
    vocabulary."""
    if teacher_path and os.path.isfile(os.path.join(teacher_path, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(teacher_path)
    return None


def load_corpus(data_args: DataArguments):
    """A language-modelling corpus: a ``DatasetDict`` of train/validation/test with a ``text`` column."""
    from seqkd.data.text import load_ptb, load_text_splits

    if data_args.dataset == "ptb":
        return load_ptb(resolve_data_dir(data_args))
    path = dataset_path(data_args)
    if os.path.isdir(path):
        from seqkd.sequence_kd import check_complete

        check_complete(path)  # a distill-data folder still being written is not a corpus yet
    return load_text_splits(path)


def build_tokenizer(data_args: DataArguments, corpus, teacher_path: str | None = None):
    """A language model's tokenizer: the teacher's when there is one, else trained on ``corpus['train']`` or loaded."""
    from seqkd.data.text import train_bpe_tokenizer, train_word_tokenizer

    saved = teacher_tokenizer(teacher_path)
    if saved is not None:
        return saved
    if data_args.tokenizer == "word":
        return train_word_tokenizer(corpus["train"])
    if data_args.tokenizer == "bpe":
        return train_bpe_tokenizer(corpus["train"], vocab_size=data_args.bpe_vocab_size)
    if os.path.isdir(data_args.tokenizer):
        return AutoTokenizer.from_pretrained(data_args.tokenizer)
    raise InvalidValueError(f"tokenizer must be 'word', 'bpe' or a saved tokenizer folder, got {data_args.tokenizer!r}")


def model_config_overrides(model_args: ModelArguments) -> dict:
    """``model_config`` parsed: the config fields that override a preset's."""
    if model_args.model_config is None:
        return {}
    try:
        config = json.loads(model_args.model_config)
    except json.JSONDecodeError as error:
        raise InvalidValueError(f"model_config must be a JSON object, got {model_args.model_config!r}: {error}") from error
    if not isinstance(config, dict):
        raise InvalidValueError(f"model_config must be a JSON object, got {model_args.model_config!r}")
    return config


def model_factory(model_args: ModelArguments, tokenizer, *, allow_pickle: bool = False):
    """A function that builds a fresh student sized to ``tokenizer`` (or loads the saved model it names)."""
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

    overrides = model_config_overrides(model_args)
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
            model = load_saved_model(name, allow_pickle=allow_pickle)
            check_vocab_size(tokenizer, model)
            return model
    else:
        raise InvalidValueError(
            f"model must be 'lstm', 'lstm-seq2seq', one of the presets {sorted(CAUSAL_LM_PRESETS)} or "
            f"{sorted(SEQ2SEQ_PRESETS)}, or a saved model folder; got {name!r}"
        )
    return build


SAFE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_folder(path: str, *, allow_pickle: bool = False, what: str = "model") -> None:
    """Refuse, before any work, a saved-model folder that is missing, has no config or no weights, or holds
    pickled weights only (``pytorch_model.bin``) while ``allow_pickle`` is off: unpickling can run code."""
    if not os.path.isdir(path):
        raise MissingInputError(f"{what} folder {path!r} does not exist: train it first, or point at the folder it was saved to")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MissingInputError(f"{what} folder {path!r} has no config.json: it is not a saved model (save it with save_pretrained)")
    if any(os.path.isfile(os.path.join(path, name)) for name in SAFE_WEIGHT_FILES):
        return
    if any(os.path.isfile(os.path.join(path, name)) for name in PICKLE_WEIGHT_FILES):
        if allow_pickle:
            return
        raise InvalidValueError(
            f"{what} folder {path!r} holds pickled weights only (pytorch_model.bin), and loading a pickle can run "
            "code: re-save the model with safetensors (model.save_pretrained), or pass --allow_pickle_weights true "
            "if you trust its source"
        )
    raise MissingInputError(
        f"{what} folder {path!r} has no weights (model.safetensors): the save was interrupted or the folder is "
        "not a model's; train or save it again"
    )


def load_saved_model(path: str, *, allow_pickle: bool = False, dtype=None) -> PreTrainedModel:
    """A saved causal LM or encoder-decoder (seqkd's own or any transformers model), checked first by
    :func:`check_model_folder`; safetensors weights unless ``allow_pickle``."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    check_model_folder(path, allow_pickle=allow_pickle)
    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    kwargs = {} if dtype is None else {"dtype": dtype}
    from seqkd.models import realign_weights

    return realign_weights(auto.from_pretrained(path, use_safetensors=None if allow_pickle else True, **kwargs))


def is_translation(data_args: DataArguments, model_args: ModelArguments) -> bool:
    """Whether the recipe is a translation task (``task``, else the model's kind, else the dataset's name)."""
    if data_args.task != "auto":
        return data_args.task == "translation"
    from seqkd.models import SEQ2SEQ_PRESETS

    if model_args.model in ("lstm-seq2seq", *SEQ2SEQ_PRESETS):
        return True
    if os.path.isdir(model_args.model):
        from transformers import AutoConfig

        # Only the config is read here; whether its weights may be loaded is decided when they are.
        check_model_folder(model_args.model, allow_pickle=True)
        return bool(AutoConfig.from_pretrained(model_args.model).is_encoder_decoder)
    return data_args.dataset == "multi30k"


def load_parallel_corpus(data_args: DataArguments):
    """A parallel corpus: a ``DatasetDict`` of splits with a ``translation`` column of {source_lang, target_lang}."""
    from seqkd.data.translation import load_multi30k, load_translation_splits

    languages = {"source_lang": data_args.source_lang, "target_lang": data_args.target_lang}
    if data_args.dataset == "multi30k":
        corpus = load_multi30k(resolve_data_dir(data_args), tokenized=data_args.pretokenized, **languages)
    else:
        from seqkd.sequence_kd import check_complete

        path = dataset_path(data_args)
        if os.path.isdir(path):
            check_complete(path)  # a distill-data folder still being written is not a corpus yet
        corpus = load_translation_splits(path, data_args.source_lang, data_args.target_lang)
    if data_args.max_train_examples is not None:
        corpus["train"] = corpus["train"].select(range(min(data_args.max_train_examples, len(corpus["train"]))))
    return corpus


def build_translation_tokenizer(data_args: DataArguments, corpus, teacher_path: str | None = None):
    """The joint source/target tokenizer: the teacher's, a saved one, or trained on ``corpus['train']``."""
    from seqkd.data.translation import train_translation_tokenizer

    saved = teacher_tokenizer(teacher_path)
    if saved is not None:
        return saved
    if data_args.tokenizer not in ("word", "bpe") and os.path.isdir(data_args.tokenizer):
        return AutoTokenizer.from_pretrained(data_args.tokenizer)
    return train_translation_tokenizer(
        corpus["train"], data_args.bpe_vocab_size, model=data_args.tokenizer_model, pretokenized=data_args.pretokenized
    )


def build_translation_datasets(corpus, tokenizer, data_args: DataArguments, splits: list[str]):
    """The tokenized train split and the evaluation ``splits`` of a parallel corpus."""
    from seqkd.data.translation import filter_by_length, tokenize_translation

    for split in ["train", *splits]:
        if split not in corpus:
            raise InvalidValueError(f"the corpus has no {split!r} split; it has {sorted(corpus)}")
    corpus = filter_by_length(corpus, tokenizer, min_tokens=1, max_tokens=data_args.max_source_length)
    tokenized = tokenize_translation(
        corpus, tokenizer, max_source_length=data_args.max_source_length, max_target_length=data_args.max_target_length
    )
    return tokenized["train"], {split: tokenized[split] for split in splits}


def uses_streams(model: PreTrainedModel, data_args: DataArguments) -> bool:
    """Whether a language model trains on stateful streams (truncated BPTT) rather than fixed blocks (or prompts)."""
    if data_args.batching == "auto":
        from seqkd.evaluation import is_stateful

        return is_stateful(model)
    return data_args.batching == "stream"


def build_datasets(corpus, tokenizer, data_args: DataArguments, args, stream: bool, splits: list[str], *, with_train: bool = True):
    """The train split (None unless ``with_train``) and the evaluation splits, as stream batches or blocks."""
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
    train = make("train", args.per_device_train_batch_size, data_args.max_train_tokens) if with_train else None
    evals = {split: make(split, args.per_device_eval_batch_size, data_args.max_eval_tokens) for split in splits}
    return train, evals


def eval_split_names(data_args: DataArguments) -> list[str]:
    """The evaluation splits named by ``eval_splits``, in order, by their canonical names ('dev' is 'validation')."""
    return [canonical_split_name(s.strip()) for s in data_args.eval_splits.split(",") if s.strip()]


def canonical_split_name(name: str) -> str:
    """'dev', 'valid', ... are 'validation' (and so on); a name that is no known alias is kept as it is."""
    from seqkd.data.text import SPLIT_ALIASES

    return next((canon for canon, aliases in SPLIT_ALIASES.items() if name in aliases), name)


class Pipeline(NamedTuple):
    """What a recipe assembles: everything a trainer needs besides its arguments."""

    tokenizer: Any
    build_model: Callable[[], PreTrainedModel]
    model: PreTrainedModel
    train_dataset: Any
    eval_datasets: dict
    data_collator: Callable | None


def build_pipeline(model_args: ModelArguments, data_args: DataArguments, args, teacher_path: str | None = None) -> Pipeline:
    """The tokenizer, a model builder, one built model, the train set, the evaluation sets and the collator.

    ``teacher_path`` (a teacher or teacher-cache folder) supplies the tokenizer when it holds one. ``args`` (the
    training arguments) gives the batch sizes and process layout; for pretokenized translation it switches BLEU
    to tokenize 'none'.
    """
    splits = eval_split_names(data_args)
    if is_translation(data_args, model_args):
        from seqkd.data.translation import translation_collator

        if data_args.pretokenized and args.bleu_tokenize == "13a":
            args.bleu_tokenize = "none"
        corpus = load_parallel_corpus(data_args)
        tokenizer = build_translation_tokenizer(data_args, corpus, teacher_path)
        build = model_factory(model_args, tokenizer, allow_pickle=getattr(args, "allow_pickle_weights", False))
        model = build()
        train, evals = build_translation_datasets(corpus, tokenizer, data_args, splits)
        return Pipeline(tokenizer, build, model, train, evals, translation_collator(tokenizer, model))
    corpus = load_corpus(data_args)
    tokenizer = build_tokenizer(data_args, corpus, teacher_path)
    build = model_factory(model_args, tokenizer, allow_pickle=getattr(args, "allow_pickle_weights", False))
    model = build()
    if data_args.batching == "prompts":
        return _prompt_pipeline(corpus, tokenizer, build, model, data_args, args, splits)
    streams = uses_streams(model, data_args)
    train, evals = build_datasets(corpus, tokenizer, data_args, args, streams, splits)
    # Fixed-length blocks need no padding (the word tokenizer has no pad token): stack them as they are.
    from transformers import default_data_collator

    return Pipeline(tokenizer, build, model, train, evals, None if streams else default_data_collator)


def _prompt_pipeline(corpus, tokenizer, build, model, data_args: DataArguments, args, splits) -> Pipeline:
    """Training lines as prompt-completion pairs; the evaluation splits as the model's 'auto' batching has them."""
    from seqkd.data.text import PromptCompletionCollator, prompt_completions
    from seqkd.evaluation import is_stateful

    if "train" not in corpus:
        raise InvalidValueError(f"the corpus has no 'train' split; it has {sorted(corpus)}")
    train = prompt_completions(corpus["train"], tokenizer, data_args.prompt_length, max_examples=data_args.max_train_examples)
    _, evals = build_datasets(corpus, tokenizer, data_args, args, is_stateful(model), splits, with_train=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Pipeline(tokenizer, build, model, train, evals, PromptCompletionCollator(pad))


__all__ = [
    "DATA_DIR_ENV",
    "DataArguments",
    "ModelArguments",
    "Pipeline",
    "build_datasets",
    "build_pipeline",
    "build_tokenizer",
    "build_translation_datasets",
    "build_translation_tokenizer",
    "check_model_folder",
    "dataset_path",
    "canonical_split_name",
    "eval_split_names",
    "is_translation",
    "load_corpus",
    "load_parallel_corpus",
    "load_saved_model",
    "model_config_overrides",
    "model_factory",
    "resolve_data_dir",
    "teacher_tokenizer",
    "uses_streams",
]
