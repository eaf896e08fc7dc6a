"""Offline teacher cache: run a teacher once over the training data and distil from its stored top-k outputs.

A cache is a folder::

    manifest.json              format, layout, k, dtypes, fingerprints (teacher, tokenizer, data), the shards
    shard-00000.safetensors    "ids" [..., k], "logprobs" [..., k], "residual" [...]; stream shards also "state.i"
    ...
    tokenizer.json ...         the teacher's tokenizer, so that `seqkd distill --teacher_cache DIR` needs no teacher

Per predicted position it holds the teacher's k most likely token ids (the smallest unsigned integer type that
holds the vocabulary), their log-probabilities at temperature 1 (float16, bfloat16 or float32) and the residual
probability mass of the other ``V - k`` tokens (computed in float32 before rounding). Training expands each row
to a full distribution with :class:`seqkd.losses.SparseTeacher`: the residual spread uniformly over the tail.

Two layouts follow the two ways language-model data is batched:

- ``stream`` (:class:`seqkd.data.text.StreamBatches`, stateful LSTMs): ``[streams, positions, k]``, the teacher
  run along every stream with its state carried, exactly as online distillation runs it. Shards cut the
  positions (time); each stores the teacher's state at its end, so an interrupted run resumes there.
- ``blocks`` (fixed-length blocks of ``group_texts``): ``[blocks, block_size, k]``; shards cut the blocks.

Writing is resumable and never leaves a corrupt shard that training would read: a shard is written to a
``.partial`` file, renamed into place, and only then listed (with its size and sha256) in the manifest, itself
replaced atomically. A reader accepts only a complete manifest whose shards all match their listed size and hash.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from seqkd.errors import InvalidValueError, MissingInputError
from seqkd.files import write_json_atomically

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TEACHER_KEYS = ("teacher_ids", "teacher_logprobs", "teacher_residual")
# Fields that identify what a cache holds; a resumed write must agree on all of them.
_IDENTITY = (
    "format", "layout", "vocab_size", "top_k", "dtype", "id_dtype", "teacher", "tokenizer", "data", "shard_size",
    "teacher_window", "sampling",
)  # fmt: skip
CACHE_FORMATS = ("topk", "sampled")


@dataclass
class TeacherCacheArguments:
    """How ``seqkd cache-teacher`` (and a Born-Again chain with ``cache_teacher``) writes a teacher cache."""

    cache_top_k: int = field(
        default=64,
        metadata={
            "help": "Teacher log-probabilities kept per token (the top k); the residual mass covers the rest. 0 keeps "
            "the whole vocabulary: the teacher exactly, up to cache_dtype's rounding (4 x vocabulary + 2 bytes per "
            "token in float16)."
        },
    )
    cache_format: str = field(
        default="topk",
        metadata={
            "help": "'topk': the teacher's top cache_top_k log-probabilities and the residual mass. 'sampled': the "
            "exact top cache_top_k plus cache_samples ids drawn from the rest of the teacher's distribution, each "
            "weighted so that the stored distribution equals the teacher's in expectation (Anshumann et al., ACL "
            "2025): an unbiased forward-KL gradient in 4 bytes per stored entry.",
            "choices": list(CACHE_FORMATS),
        },
    )
    cache_samples: int = field(
        default=12, metadata={"help": "cache_format 'sampled': ids drawn per token (duplicates merged, with their counts)."}
    )
    cache_sample_temperature: float = field(
        default=1.0,
        metadata={
            "help": "cache_format 'sampled': draw from the teacher's tail at this temperature, with importance weights "
            "q / r; 1 draws from the teacher itself (unbiased); others are self-normalised (consistent)."
        },
    )
    cache_sample_seed: int = field(
        default=0, metadata={"help": "cache_format 'sampled': seed of the first shard's draws (shard i uses seed + i)."}
    )
    cache_dtype: str = field(
        default="float16",
        metadata={"help": "Storage type of the log-probabilities.", "choices": list(CACHE_DTYPES)},
    )
    cache_shard_tokens: int = field(
        default=1 << 20,
        metadata={"help": "Predicted tokens per shard file: the unit in which an interrupted write resumes."},
    )
    cache_num_processes: int = field(
        default=1,
        metadata={
            "help": "Stream batching: the number of training processes the cache will serve (it holds "
            "per_device_train_batch_size x this many streams, the streams those processes train on)."
        },
    )

    def __post_init__(self):
        if self.cache_top_k < 0:
            raise InvalidValueError(f"cache_top_k must be >= 1, or 0 for the whole vocabulary, got {self.cache_top_k}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise InvalidValueError(f"cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {self.cache_dtype!r}")
        if self.cache_shard_tokens < 1:
            raise InvalidValueError(f"cache_shard_tokens must be >= 1, got {self.cache_shard_tokens}")
        if self.cache_num_processes < 1:
            raise InvalidValueError(f"cache_num_processes must be >= 1, got {self.cache_num_processes}")
        if self.cache_format not in CACHE_FORMATS:
            raise InvalidValueError(f"cache_format must be 'topk' or 'sampled', got {self.cache_format!r}")
        if self.cache_format == "sampled":
            if self.cache_samples < 1:
                raise InvalidValueError(f"cache_samples must be >= 1, got {self.cache_samples}")
            if not self.cache_sample_temperature > 0:
                raise InvalidValueError(f"cache_sample_temperature must be > 0, got {self.cache_sample_temperature}")

    @property
    def samples(self) -> int:
        """Sampled entries per token: 0 for the top-k format."""
        return self.cache_samples if self.cache_format == "sampled" else 0


# --------------------------------------------------------------------------------------------------------
# Fingerprints and layouts.


def id_dtype_for(vocab_size: int) -> torch.dtype:
    """The smallest integer type that holds every id below ``vocab_size``."""
    if vocab_size <= 1 << 8:
        return torch.uint8
    if vocab_size <= 1 << 16:
        return torch.uint16
    return torch.int32


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's class and weights (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str | None:
    """sha256 of a tokenizer's full serialisation (fast tokenizers) or of its vocabulary."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def data_layout(dataset) -> tuple[dict, str]:
    """The cache layout a training set needs and its data fingerprint.

    Stream batches: one row per stream of every process; fixed-length blocks: one row per block; tokenized
    translation pairs (``input_ids`` and ``labels`` of any lengths): one row per pair, ``positions`` counting
    every target token.
    """
    from seqkd.data.text import StreamBatches, token_fingerprint

    if isinstance(dataset, StreamBatches):
        streams = dataset.batch_size * dataset.num_processes
        layout = {"kind": "stream", "rows": streams, "positions": dataset.stream_length - 1}
        return layout, dataset.fingerprint
    columns = getattr(dataset, "column_names", None) or []
    if "prompt_input_ids" in columns:
        raise InvalidValueError(
            "prompt-completion data (batching 'prompts') has no teacher cache: distil it from a live teacher, or "
            "cache the language model's stream or blocks (batching 'stream' or 'blocks')"
        )
    blocks = _blocks(dataset)
    if blocks is not None:
        return {"kind": "blocks", "rows": blocks.shape[0], "positions": blocks.shape[1]}, token_fingerprint(blocks)
    if {"input_ids", "labels"} <= set(columns):
        return _pairs_layout(dataset)
    raise InvalidValueError(
        f"a teacher cache covers StreamBatches, fixed-length blocks or tokenized translation pairs (input_ids and "
        f"labels), got {type(dataset).__name__} with columns {columns}: distil other data from a live teacher"
    )


def cached_positions(layout: dict) -> int:
    """How many token positions a cache of this layout holds."""
    # Pairs count their target tokens in total; streams and blocks per row.
    return layout["positions"] if layout["kind"] == "pairs" else layout["rows"] * layout["positions"]


def _pairs_layout(dataset) -> tuple[dict, str]:
    import numpy as np

    digest, positions = hashlib.sha256(b"pairs"), 0
    for source, target in zip(dataset["input_ids"], dataset["labels"]):
        source, target = np.asarray(source, dtype=np.int64), np.asarray(target, dtype=np.int64)
        positions += int((target != -100).sum())
        digest.update(np.asarray([len(source), len(target)], dtype=np.int64).tobytes())
        digest.update(source.tobytes())
        digest.update(target.tobytes())
    return {"kind": "pairs", "rows": len(dataset), "positions": positions}, digest.hexdigest()


def _blocks(dataset) -> torch.Tensor | None:
    """The ``input_ids`` of a dataset of equal-length, unpadded rows as one ``[rows, length]`` tensor, else None."""
    columns = getattr(dataset, "column_names", None) or []
    if "input_ids" not in columns or "attention_mask" in columns or "decoder_input_ids" in columns:
        return None
    import numpy as np

    rows = dataset.with_format("numpy")["input_ids"]
    try:
        blocks = np.asarray(rows)
        if blocks.dtype == object:
            blocks = np.stack(list(blocks))
    except ValueError:  # rows of different lengths
        return None
    return torch.from_numpy(blocks) if blocks.ndim == 2 else None


# --------------------------------------------------------------------------------------------------------
# Writing.


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _top_k(logits: torch.Tensor, k: int, dtype: torch.dtype, id_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    # 1 - sum(top-k probabilities), without the cancellation of 1 - sum(exp(.)) when the top k hold nearly all.
    residual = (-torch.expm1(torch.logsumexp(values, dim=-1))).clamp(min=0.0)
    return {"ids": ids.to(id_dtype).cpu(), "logprobs": values.to(dtype).cpu(), "residual": residual.to(dtype).cpu()}


def _sampled(
    logits: torch.Tensor, top: int, samples: int, temperature: float, generator: torch.Generator,
    dtype: torch.dtype, id_dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The exact ``top`` log-probabilities and ``samples`` draws from the rest of the distribution.

    Draws come from the tail renormalised at ``temperature`` (``r``), each weighted ``q / (r * samples)``;
    duplicates are merged (their weights summed), and the slots they free hold distinct unused ids with
    probability 0, so that a dense expansion never writes one id twice. At temperature 1 the stored entries sum
    to 1 and equal the teacher's distribution in expectation: the forward-KL gradient ``p - q`` they give is
    unbiased. The residual is stored as 0: nothing is spread over the other tokens.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    rows, vocab_size = logprobs.shape
    pool_logprobs, pool_ids = logprobs.topk(min(vocab_size, top + 2 * samples), dim=-1)
    exact_ids, exact_logprobs = pool_ids[:, :top], pool_logprobs[:, :top]
    tail = logprobs.scatter(1, exact_ids, -math.inf) if top else logprobs
    log_r = torch.log_softmax(tail / temperature, dim=-1)
    draws = torch.multinomial(log_r.exp(), samples, replacement=True, generator=generator)
    weights = (logprobs.gather(1, draws) - log_r.gather(1, draws)).exp() / samples
    draws, order = draws.sort(dim=-1)
    weights = weights.gather(1, order)
    starts = torch.ones_like(draws, dtype=torch.bool)
    starts[:, 1:] = draws[:, 1:] != draws[:, :-1]
    group = starts.long().cumsum(dim=-1) - 1
    merged = torch.zeros_like(weights).scatter_add_(1, group, weights)
    merged_ids = torch.zeros_like(draws).scatter_(1, group, draws)
    unique = starts.sum(dim=-1, keepdim=True)
    slot = torch.arange(samples, device=draws.device)[None, :]
    # Ids for the freed slots: the most likely tokens that are neither exact nor drawn.
    candidates = pool_ids[:, top:]
    taken = (candidates[:, :, None] == torch.where(slot < unique, merged_ids, -1)[:, None, :]).any(-1)
    free = candidates.gather(1, torch.sort(taken.to(torch.uint8), dim=-1, stable=True).indices)
    filler = free.gather(1, (slot - unique).clamp(min=0))
    sampled_ids = torch.where(slot < unique, merged_ids, filler)
    sampled_logprobs = torch.where(slot < unique, torch.log(merged), -math.inf)
    ids = torch.cat([exact_ids, sampled_ids], dim=-1)
    values = torch.cat([exact_logprobs, sampled_logprobs], dim=-1)
    residual = torch.zeros(rows, dtype=dtype)
    return {"ids": ids.to(id_dtype).cpu(), "logprobs": values.to(dtype).cpu(), "residual": residual}


def _vocab_size(model) -> int:
    embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.shape[0]
    return model.config.vocab_size


def cache_teacher(
    teacher,
    train_dataset,
    output_dir: str,
    *,
    top_k: int = 64,
    dtype: str = "float16",
    tokenizer=None,
    shard_tokens: int = 1 << 20,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    show_progress: bool = True,
    samples: int = 0,
    sample_temperature: float = 1.0,
    sample_seed: int = 0,
) -> dict:
    """Run ``teacher`` once over ``train_dataset`` and store its top-k outputs in ``output_dir``.

    With ``samples > 0`` (the 'sampled' format) each token keeps its exact top ``top_k`` entries and ``samples``
    weighted draws from the rest (see :func:`_sampled`); shard ``i`` draws from seed ``sample_seed + i``, so a
    resumed write ends with the same bytes.

    ``train_dataset`` is the training set exactly as the student will see it: :class:`StreamBatches` (any
    process' view: every process' streams are cached) or fixed-length blocks. A folder already holding part of
    the same cache is completed from its last whole shard; a folder holding another cache is refused.

    Returns:
        The manifest (a dict, also written to ``output_dir/manifest.json``).
    """
    from tqdm.auto import tqdm

    from seqkd.evaluation import is_stateful

    if dtype not in CACHE_DTYPES:
        raise InvalidValueError(f"dtype must be one of {', '.join(CACHE_DTYPES)}, got {dtype!r}")
    vocab_size = _vocab_size(teacher)
    if not 0 <= top_k <= vocab_size:
        raise InvalidValueError(
            f"top_k must be in [1, {vocab_size}] (the teacher's vocabulary size), or 0 for all of it, got {top_k}"
        )
    top_k = top_k or vocab_size
    if shard_tokens < 1 or batch_size < 1:
        raise InvalidValueError(f"shard_tokens and batch_size must be >= 1, got {shard_tokens} and {batch_size}")
    if samples < 0 or (samples and not sample_temperature > 0):
        raise InvalidValueError(f"samples must be >= 0 and sample_temperature > 0, got {samples} and {sample_temperature}")
    if samples and top_k + samples > vocab_size:
        raise InvalidValueError(
            f"top_k + samples ({top_k} + {samples}) must be at most the vocabulary size {vocab_size}: store fewer entries"
        )
    if tokenizer is not None and len(tokenizer) > vocab_size:
        raise InvalidValueError(f"the tokenizer has {len(tokenizer)} tokens but the teacher only {vocab_size} outputs")
    layout, data = data_layout(train_dataset)
    pairs = layout["kind"] == "pairs"
    if pairs != bool(getattr(teacher.config, "is_encoder_decoder", False)):
        raise InvalidValueError(
            "translation pairs are cached from an encoder-decoder teacher, language-model data from a language model: "
            f"got {type(teacher).__name__} for {layout['kind']} data"
        )
    stream = layout["kind"] == "stream"
    stateful = is_stateful(teacher)
    # A stateless (Transformer) teacher on streams sees each BPTT window alone, as online distillation feeds it:
    # its windows are the training batches', so shards hold whole windows and the cache is tied to seq_len.
    teacher_window = train_dataset.seq_len if stream and not stateful else None
    if stream:
        rows_per_shard = layout["rows"]
        positions_per_shard = max(1, shard_tokens // layout["rows"])
        if teacher_window:
            positions_per_shard = max(teacher_window, positions_per_shard // teacher_window * teacher_window)
        num_shards = -(-layout["positions"] // positions_per_shard)
    elif pairs:
        rows_per_shard = max(1, shard_tokens * layout["rows"] // max(layout["positions"], 1))
        num_shards = max(1, -(-layout["rows"] // rows_per_shard))
    else:
        rows_per_shard = max(1, shard_tokens // layout["positions"])
        num_shards = -(-layout["rows"] // rows_per_shard)
    manifest = {
        "format": FORMAT_VERSION,
        "layout": layout,
        "vocab_size": vocab_size,
        "top_k": top_k,
        "dtype": dtype,
        "id_dtype": str(id_dtype_for(vocab_size)).removeprefix("torch."),
        "teacher": model_fingerprint(teacher),
        "teacher_class": type(teacher).__name__,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": data,
        "shard_size": positions_per_shard if stream else rows_per_shard,
        "teacher_window": teacher_window,
        "sampling": {"samples": samples, "temperature": sample_temperature, "seed": sample_seed} if samples else None,
        # The token the teacher's decoder started from: a student starting from another one sees other prefixes.
        "decoder_start_token_id": getattr(teacher.config, "decoder_start_token_id", None) if pairs else None,
        "num_shards": num_shards,
        "shards": [],
        "complete": False,
    }
    os.makedirs(output_dir, exist_ok=True)
    manifest_path = os.path.join(output_dir, MANIFEST_FILE)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            existing = json.load(f)
        differing = [key for key in _IDENTITY if existing.get(key) != manifest[key]]
        if differing:
            raise InvalidValueError(
                f"{output_dir} holds a teacher cache of another teacher, data or setting (differs in "
                f"{', '.join(differing)}): write this cache to another folder, or delete that one (or, to finish "
                "it, rerun with the settings it was started with)"
            )
        if existing.get("complete"):
            logger.info("teacher cache %s is complete, nothing to do", output_dir)
            return existing
        manifest["shards"] = _whole_shards(output_dir, existing.get("shards", []))
        if manifest["shards"]:
            logger.warning("resuming teacher cache %s after %d of %d shards", output_dir, len(manifest["shards"]), num_shards)
    for name in os.listdir(output_dir):
        if name.endswith(".partial"):
            os.remove(os.path.join(output_dir, name))
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    write_json_atomically(manifest_path, manifest)

    id_dtype, value_dtype = id_dtype_for(vocab_size), CACHE_DTYPES[dtype]
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval().to(device)
    done = len(manifest["shards"])
    state = None
    if stream:
        streams = train_dataset.all_streams
        if done:
            last = os.path.join(output_dir, manifest["shards"][-1]["file"])
            with safe_open(last, framework="pt") as f:
                keys = sorted((k for k in f.keys() if k.startswith("state.")), key=lambda k: int(k.split(".")[1]))
                dtype_of_state = next(teacher.parameters()).dtype
                state = tuple(f.get_tensor(k).to(device=device, dtype=dtype_of_state) for k in keys) or None
        # Logits of one window of every stream stay under ~256 MB (float32).
        window = teacher_window or max(1, min(positions_per_shard, (1 << 26) // (layout["rows"] * vocab_size)))
    elif pairs:
        from seqkd.data.translation import translation_collator

        # The teacher's own decoder inputs (its decoder start token), batched and padded as training batches them.
        collate = translation_collator(tokenizer, teacher) if tokenizer is not None else None
        if collate is None:
            raise InvalidValueError("caching translation pairs needs the teacher's tokenizer (its pad token): pass tokenizer=")
        rows_of_pairs = train_dataset.with_format(None)
    else:
        blocks = _blocks(train_dataset)
    total = layout["positions"] if stream else layout["rows"]
    start_at = done * (positions_per_shard if stream else rows_per_shard)
    progress = tqdm(total=total, initial=start_at, desc="caching teacher", unit="pos" if stream else "block",
                    disable=not show_progress)  # fmt: skip
    with torch.no_grad():
        for index in range(done, num_shards):
            parts: list[dict[str, torch.Tensor]] = []
            if samples:
                generator = torch.Generator(device=device).manual_seed(sample_seed + index)

                def summarise(logits):
                    flat = _sampled(logits.reshape(-1, logits.shape[-1]), top_k, samples, sample_temperature, generator,
                                    value_dtype, id_dtype)  # fmt: skip
                    return {key: value.reshape(*logits.shape[:-1], *value.shape[1:]) for key, value in flat.items()}
            else:

                def summarise(logits):
                    return _top_k(logits, top_k, value_dtype, id_dtype)
            if stream:
                start, stop = index * positions_per_shard, min((index + 1) * positions_per_shard, layout["positions"])
                for a in range(start, stop, window):
                    b = min(a + window, stop)
                    if stateful:
                        out = teacher(input_ids=streams[:, a:b].to(device), state=state)
                        state = tuple(s.detach() for s in out.state)
                    else:  # a Transformer teacher sees each window alone, as online distillation feeds it
                        out = teacher(input_ids=streams[:, a:b].to(device))
                    parts.append(summarise(out.logits))
                    progress.update(b - a)
                tensors = {key: torch.cat([p[key] for p in parts], dim=1).contiguous() for key in parts[0]}
                for i, s in enumerate(state or ()):
                    tensors[f"state.{i}"] = s.float().cpu().contiguous()
            elif pairs:
                start, stop = index * rows_per_shard, min((index + 1) * rows_per_shard, layout["rows"])
                lengths = []
                for a in range(start, stop, batch_size):
                    b = min(a + batch_size, stop)
                    rows = [{key: rows_of_pairs[i][key] for key in ("input_ids", "attention_mask", "labels")
                             if key in rows_of_pairs.column_names} for i in range(a, b)]  # fmt: skip
                    batch = collate(rows)
                    labels = batch.pop("labels")
                    logits = teacher(**{key: value.to(device) for key, value in batch.items()}).logits
                    keep = labels.ne(-100)
                    parts.append(summarise(logits[keep.to(device)]))
                    lengths += keep.sum(dim=1).tolist()
                    progress.update(b - a)
                tensors = {key: torch.cat([p[key] for p in parts], dim=0).contiguous() for key in parts[0]}
                tensors["offsets"] = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
            else:
                start, stop = index * rows_per_shard, min((index + 1) * rows_per_shard, layout["rows"])
                for a in range(start, stop, batch_size):
                    b = min(a + batch_size, stop)
                    parts.append(summarise(teacher(input_ids=blocks[a:b].to(device)).logits))
                    progress.update(b - a)
                tensors = {key: torch.cat([p[key] for p in parts], dim=0).contiguous() for key in parts[0]}
            name = f"shard-{index:05d}.safetensors"
            path = os.path.join(output_dir, name)
            try:
                save_file(tensors, path + ".partial")
            except BaseException:
                # Disk full or killed mid-write: the manifest never lists the shard; drop its partial bytes too.
                if os.path.exists(path + ".partial"):
                    os.remove(path + ".partial")
                raise
            os.replace(path + ".partial", path)
            manifest["shards"].append(
                {"file": name, "start": start, "stop": stop, "bytes": os.path.getsize(path), "sha256": _file_sha256(path)}
            )
            manifest["complete"] = len(manifest["shards"]) == num_shards
            write_json_atomically(manifest_path, manifest)
    progress.close()
    teacher.train(was_training)
    if not manifest["complete"]:  # a cache with no positions at all
        manifest["complete"] = True
        write_json_atomically(manifest_path, manifest)
    return manifest


def _whole_shards(output_dir: str, listed: list[dict], what: str = "teacher cache") -> list[dict]:
    """The longest prefix of listed shards whose files are intact (size and sha256)."""
    kept = []
    for shard in listed:
        path = os.path.join(output_dir, shard["file"])
        if not os.path.isfile(path) or os.path.getsize(path) != shard["bytes"] or _file_sha256(path) != shard["sha256"]:
            logger.warning("%s shard %s is missing or damaged; it is written again", what, path)
            break
        kept.append(shard)
    return kept


# --------------------------------------------------------------------------------------------------------
# Reading.


class TeacherCache:
    """A complete teacher cache, opened for reading (every shard's size and sha256 checked first)."""

    def __init__(self, path: str, *, verify: bool = True):
        manifest_path = os.path.join(path, MANIFEST_FILE)
        if not os.path.isfile(manifest_path):
            raise MissingInputError(
                f"teacher cache {path!r} has no {MANIFEST_FILE}: write it first with `seqkd cache-teacher`"
            )
        with open(manifest_path) as f:
            self.manifest = manifest = json.load(f)
        if manifest.get("format") != FORMAT_VERSION:
            raise InvalidValueError(f"teacher cache {path} has format {manifest.get('format')!r}; this seqkd reads {FORMAT_VERSION}")
        if not manifest.get("complete"):
            raise InvalidValueError(
                f"teacher cache {path} is incomplete ({len(manifest['shards'])} of {manifest['num_shards']} shards): "
                "run the same `seqkd cache-teacher` command again to finish it"
            )
        for shard in manifest["shards"]:
            file = os.path.join(path, shard["file"])
            if not os.path.isfile(file) or os.path.getsize(file) != shard["bytes"] or (
                verify and _file_sha256(file) != shard["sha256"]
            ):
                raise InvalidValueError(
                    f"teacher cache shard {file} is missing or damaged (size or sha256 differs from the manifest): "
                    "delete the cache folder and write it again"
                )
        self.path = path
        self.layout = manifest["layout"]
        self.vocab_size = manifest["vocab_size"]
        self.top_k = manifest["top_k"]
        self._starts = [shard["start"] for shard in manifest["shards"]]
        self._handles: list | None = None

    def __getstate__(self) -> dict:
        # Open shard handles cannot be pickled (DataLoader workers): each process opens its own.
        return {**self.__dict__, "_handles": None}

    @property
    def bytes_per_token(self) -> float:
        """Stored bytes (shards) per cached position."""
        positions = cached_positions(self.layout)
        return sum(shard["bytes"] for shard in self.manifest["shards"]) / max(positions, 1)

    def check_matches(
        self, train_dataset, *, tokenizer=None, vocab_size: int | None = None, teacher=None,
        decoder_start_token_id: int | None = None,
    ) -> None:  # fmt: skip
        """Refuse (``ValueError``) a cache written for other data, another tokenizer, vocabulary or teacher, or (for
        translation pairs) a student whose decoder starts from another token than the teacher's did."""
        layout, data = data_layout(train_dataset)
        if layout != self.layout:
            hint = ""
            if layout["kind"] == "stream" == self.layout["kind"] and layout["rows"] != self.layout["rows"]:
                hint = (
                    f" (the run trains {layout['rows']} streams = per_device_train_batch_size x processes, the cache "
                    f"holds {self.layout['rows']}: use the per_device_train_batch_size the cache was written with, "
                    "or write the cache with this run's, and cache_num_processes = the number of processes)"
                )
            raise InvalidValueError(
                f"teacher cache {self.path} was written for the layout {self.layout}, this run needs {layout}{hint}"
            )
        window = self.manifest.get("teacher_window")
        if window and getattr(train_dataset, "seq_len", window) != window:
            raise InvalidValueError(
                f"teacher cache {self.path} holds a stateless teacher run on windows of {window} tokens, this run "
                f"trains on windows of {train_dataset.seq_len}: use seq_len {window}, or write a cache for this run"
            )
        mismatches = []
        if data != self.manifest["data"]:
            mismatches.append(f"training data (fingerprint {self.manifest['data'][:12]} vs {data[:12]})")
        if tokenizer is not None and self.manifest["tokenizer"] not in (None, tokenizer_fingerprint(tokenizer)):
            mismatches.append("tokenizer")
        if vocab_size is not None and vocab_size != self.vocab_size:
            mismatches.append(f"vocabulary size ({self.vocab_size} vs the student's {vocab_size})")
        if teacher is not None and model_fingerprint(teacher) != self.manifest["teacher"]:
            mismatches.append("teacher weights")
        start = self.manifest.get("decoder_start_token_id")
        if start is not None and decoder_start_token_id is not None and start != decoder_start_token_id:
            mismatches.append(f"decoder start token ({start} for the teacher, {decoder_start_token_id} for the student)")
        if mismatches:
            raise InvalidValueError(
                f"teacher cache {self.path} does not match this run: different {'; '.join(mismatches)}. Write a "
                "cache for this run with `seqkd cache-teacher` (same recipe and teacher)"
            )

    def _read(self, shard: int, key: str, index) -> torch.Tensor:
        if self._handles is None:
            self._handles = [_memory_mapped(os.path.join(self.path, s["file"])) for s in self.manifest["shards"]]
        # A copy: the slice must not keep the map (or a view of it) alive in a batch.
        return self._handles[shard][key][index].clone()

    def stream_slice(self, rows: slice, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Positions ``start:stop`` of the streams ``rows``: ``[rows, stop - start, k]`` (residual ``[rows, n]``)."""
        first = bisect.bisect_right(self._starts, start) - 1
        pieces: dict[str, list[torch.Tensor]] = {key: [] for key in ("ids", "logprobs", "residual")}
        shard = first
        while shard < len(self._starts) and self._starts[shard] < stop:
            offset = self._starts[shard]
            a, b = max(start, offset) - offset, min(stop, self.manifest["shards"][shard]["stop"]) - offset
            for key in pieces:
                index = (rows, slice(a, b)) if key == "residual" else (rows, slice(a, b), slice(None))
                pieces[key].append(self._read(shard, key, index))
            shard += 1
        return _as_teacher_batch({key: torch.cat(value, dim=1) for key, value in pieces.items()})

    def block_rows(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``: ``[block_size, k]`` (residual ``[block_size]``)."""
        shard = bisect.bisect_right(self._starts, index) - 1
        row = index - self._starts[shard]
        return _as_teacher_batch({key: self._read(shard, key, row) for key in ("ids", "logprobs", "residual")})

    def pair_rows(self, index: int) -> dict[str, torch.Tensor]:
        """Translation pair ``index``: ``[target tokens, k]`` (residual ``[target tokens]``)."""
        shard = bisect.bisect_right(self._starts, index) - 1
        row = index - self._starts[shard]
        a, b = self._read(shard, "offsets", slice(row, row + 2)).tolist()
        return _as_teacher_batch({key: self._read(shard, key, slice(a, b)) for key in ("ids", "logprobs", "residual")})

    def attach(self, train_dataset) -> Dataset:
        """``train_dataset`` whose items also carry the cached teacher outputs under :data:`TEACHER_KEYS`."""
        if self.layout["kind"] == "stream":
            return CachedStreamBatches(train_dataset, self)
        if self.layout["kind"] == "pairs":
            return CachedPairs(train_dataset, self)
        return CachedBlocks(train_dataset, self)


_NUMPY_STORAGE = {"U8": "uint8", "U16": "uint16", "I32": "int32", "I64": "int64", "F16": "float16", "F32": "float32",
                  "BF16": "uint16"}  # fmt: skip


def _memory_mapped(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of one read-only memory map: reading a row costs an index, not a
    call into the file reader (per-row reads dominated the cost of batches of translation pairs)."""
    import numpy as np

    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        array = data[start:stop].view(_NUMPY_STORAGE[info["dtype"]]).reshape(info["shape"])
        with warnings.catch_warnings():  # read-only on purpose: nothing writes through these views
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
        tensors[name] = tensor.view(torch.bfloat16) if info["dtype"] == "BF16" else tensor
    return tensors


def _as_teacher_batch(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Ids travel as int32: unsigned 16-bit tensors support too few operations on accelerators.
    return {
        "teacher_ids": tensors["ids"].to(torch.int32),
        "teacher_logprobs": tensors["logprobs"],
        "teacher_residual": tensors["residual"],
    }


class CachedStreamBatches(Dataset):
    """:class:`StreamBatches` items with this process' cached teacher outputs added."""

    def __init__(self, batches, cache: TeacherCache):
        self.batches, self.cache = batches, cache
        first = batches.process_index * batches.batch_size
        self.rows = slice(first, first + batches.batch_size)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.batches[i]
        start = (i % len(self)) * self.batches.seq_len
        return {**item, **self.cache.stream_slice(self.rows, start, start + item["input_ids"].shape[1])}


class CachedBlocks(Dataset):
    """Fixed-length blocks with each block's cached teacher outputs added."""

    def __init__(self, blocks, cache: TeacherCache):
        self.blocks, self.cache = blocks.with_format("torch"), cache

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**self.blocks[i], **self.cache.block_rows(i)}


class CachedPairs(Dataset):
    """Tokenized translation pairs with each pair's cached teacher outputs (one row per target token) added;
    :class:`PadCachedTeacher` pads them in a batch as the collator pads the labels."""

    def __init__(self, pairs, cache: TeacherCache):
        self.pairs, self.cache = pairs, cache

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        return {**self.pairs[i], **self.cache.pair_rows(i)}


class PadCachedTeacher:
    """Wraps a translation collator: the cached teacher rows of a batch are padded to its labels' length. Padded
    positions repeat the pair's first row (a valid distribution, so no NaN can arise there; the labels ignore
    them anyway)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features: list[dict]) -> dict:
        if not all(key in features[0] for key in TEACHER_KEYS):  # evaluation batches: no teacher rows
            return self.collator(features)
        if getattr(getattr(self.collator, "tokenizer", None), "padding_side", "right") == "left":
            raise InvalidValueError(
                "cached teacher rows are aligned with right-padded labels, but the tokenizer pads on the left: set "
                "tokenizer.padding_side = 'right' for training"
            )
        features = [dict(feature) for feature in features]
        cached = [{key: feature.pop(key) for key in TEACHER_KEYS} for feature in features]
        batch = self.collator(features)
        length = batch["labels"].shape[1]
        for key in TEACHER_KEYS:
            rows = []
            for row in cached:
                values = row[key][:length]
                if values.shape[0] < length:
                    filler = values[:1] if values.shape[0] else torch.zeros((1, *values.shape[1:]), dtype=values.dtype)
                    values = torch.cat([values, filler.expand(length - values.shape[0], *values.shape[1:])])
                rows.append(values)
            batch[key] = torch.stack(rows)
        return batch


__all__ = [
    "cached_positions",
    "CachedPairs",
    "PadCachedTeacher",
    "TeacherCacheArguments",
    "TeacherCache",
    "CachedStreamBatches",
    "CachedBlocks",
    "cache_teacher",
    "data_layout",
    "id_dtype_for",
    "model_fingerprint",
    "tokenizer_fingerprint",
    "CACHE_DTYPES",
    "TEACHER_KEYS",
]
