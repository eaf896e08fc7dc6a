"""``DistillationTrainer``: a ``transformers`` ``Seq2SeqTrainer`` that distils from a frozen teacher.

The trainer only orchestrates: it runs the student (and the teacher, under ``no_grad``), aligns the labels,
and calls :func:`seqkd.losses.distillation_loss`. Every loss lives in :mod:`seqkd.losses`.

It works for causal LMs (GPT-2, seqkd's LSTM) and encoder-decoders alike. For stateful LSTM language models
trained on :class:`seqkd.data.text.StreamBatches` it carries the student's and the teacher's recurrent states
across steps (truncated BPTT), detached, reset at every epoch, saved in checkpoints so that a resumed run
continues exactly; evaluation carries the state over the whole split.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    PreTrainedModel,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    TrainerCallback,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from seqkd.evaluation import corpus_perplexity, is_stateful
from seqkd.hardware import cpu_has_native_bf16
from seqkd.teacher_cache import TEACHER_KEYS
from seqkd.losses import (
    DIVERGENCES,
    LOSS_NAMES,
    loss_names,
    SPARSE_TAILS,
    _check_choice,
    _check_epsilon,
    _check_non_negative,
    _check_temperature,
    SparseTeacher,
    distillation_loss,
)
from seqkd.errors import InvalidValueError, MissingInputError, NonFiniteLossError

logger = logging.getLogger("seqkd")
# fused_linear 'auto' takes the fused path for batches whose logits would hold at least this many values.
_FUSED_MIN_ELEMENTS = 1 << 28
TEACHER_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STREAM_STATE_FILE = "stream_state-rank{rank}.safetensors"
# Under bf16 autocast on CPU (torch 2.13) the flash attention kernel is several times slower than the math kernel for
# short sequences (16-64 positions: 1.8-6.4x on an AMD EPYC), level at 128 and twice as fast from 256 on
# (scripts/bench_attention.py; docs/benchmarks.md, "Attention kernels under bf16 on CPU"): batches up to this length
# take the math kernel.
_CPU_BF16_MATH_ATTENTION_MAX_LENGTH = 128
_SEQUENCE_KEYS = ("input_ids", "decoder_input_ids", "labels", "inputs_embeds")


def attention_kernel_context(args, inputs: dict):
    """The scaled-dot-product attention kernels a forward pass on ``inputs`` may use (see above)."""
    if not (args.bf16 and args.device.type == "cpu"):
        return nullcontext()
    lengths = [inputs[key].shape[1] for key in _SEQUENCE_KEYS if torch.is_tensor(inputs.get(key)) and inputs[key].dim() > 1]
    if not lengths or max(lengths) > _CPU_BF16_MATH_ATTENTION_MAX_LENGTH:
        return nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


@dataclass
class DistillationArguments(Seq2SeqTrainingArguments):
    """Training arguments plus what distillation needs. Every field is a command-line and recipe option."""

    loss: str = field(
        default="kd",
        metadata={
            "help": "Training loss: 'ce' (gold labels), 'ls' (label-smoothed CE), 'kd' (CE + KD), 'ban' (Born-Again "
            "BAN+L: CE + forward-KL KD), 'dkd' (CE + Decoupled KD), 'cwtm' (CE + confidence-weighted CE), "
            "'dkpp' (CE + KD to a permuted teacher).",
            "choices": list(LOSS_NAMES),
        },
    )
    ce_weight: float = field(default=1.0, metadata={"help": "Weight of the gold-label term (CE, or LS-CE)."})
    kd_weight: float = field(default=1.0, metadata={"help": "Weight of the distillation term."})
    temperature: float | None = field(
        default=None, metadata={"help": "Softmax temperature of the distillation term; default 4 for 'dkd', else 1."}
    )
    divergence: str = field(
        default="forward_kl",
        metadata={"help": "Divergence for 'kd': forward_kl, reverse_kl or jsd.", "choices": list(DIVERGENCES)},
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={
            "help": "Generalised JSD (divergence 'jsd'): the teacher's weight in the mixture; GKD's and TRL's beta. "
            "0 is forward KL(teacher || student), 1 reverse KL(student || teacher)."
        },
    )
    alpha: float = field(default=1.0, metadata={"help": "DKD: weight of TCKD (target-class KD)."})
    beta: float = field(default=8.0, metadata={"help": "DKD: weight of NCKD (non-target-class KD)."})
    label_smoothing: float | None = field(
        default=None,
        metadata={"help": "Label smoothing epsilon of the gold-label term; default 0.1 for loss 'ls', else 0."},
    )
    distill_warmup_epochs: float = field(
        default=0.0,
        metadata={
            "help": "Ramp the distillation term's weight linearly from 0 to kd_weight over this many epochs (the DKD "
            "paper's warm-up uses 20); 0 disables the ramp."
        },
    )
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The teacher: a saved model directory or a Hub model id."}
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "A teacher cache folder written by `seqkd cache-teacher`: distil from its stored top-k teacher "
            "outputs instead of running the teacher (refused unless written for this run's data and tokenizer)."
        },
    )
    cache_tail: str = field(
        default="uniform",
        metadata={
            "help": "Training from a teacher cache: how the residual mass outside the cached top k is spread over "
            "the other tokens. 'uniform' (every loss), or 'student' (kd with forward KL and ban, temperature 1: "
            "in proportion to the student's own probabilities, the exact KL over the top k and 'any other "
            "token'; see seqkd.losses.SparseTeacher).",
            "choices": ["uniform", "student"],
        },
    )
    allow_pickle_weights: bool = field(
        default=False,
        metadata={
            "help": "Load saved models (teacher, student to start from, model to evaluate) that hold pickled weights "
            "only (pytorch_model.bin). Off by default: unpickling a file can run code; safetensors cannot."
        },
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={"help": "Teacher weights' dtype: auto, float32, bfloat16 or float16.", "choices": list(TEACHER_DTYPES)},
    )
    loss_chunk_size: int | None = field(
        default=None, metadata={"help": "Tokens per chunk inside the loss (memory vs. speed); default automatic."}
    )
    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "On-policy distillation (GKD): the probability that a batch's targets are the student's own "
            "samples, scored token by token by the teacher; 0 trains on the batch's targets only (supervised)."
        },
    )
    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "GKD's sequence-level KD: a batch that is not on-policy gets targets sampled by the teacher "
            "instead of its gold ones (only the sequences a batch uses are generated)."
        },
    )
    gkd_max_new_tokens: int = field(
        default=64, metadata={"help": "Longest sample (in tokens) the student or the teacher generates for lmbda / seq_kd."}
    )
    gkd_temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature of lmbda / seq_kd sampling (> 0); 1 samples the model's own distribution."}
    )
    gkd_top_k: int = field(
        default=0, metadata={"help": "lmbda / seq_kd sampling: keep only the k most likely tokens; 0 keeps all."}
    )
    gkd_top_p: float = field(
        default=1.0, metadata={"help": "lmbda / seq_kd sampling: nucleus mass, in (0, 1]; 1 keeps all tokens."}
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop training once metric_for_best_model (default: the validation loss; e.g. 'bleu' with "
            "predict_with_generate) has not improved for this many evaluations, and keep the best checkpoint as "
            "the final model (load_best_model_at_end). Needs eval_strategy epoch or steps. 0 (or unset) trains "
            "for the whole budget: how a recipe that inherits a teacher's early stopping keeps a fixed step count."
        },
    )
    fused_linear: str = field(
        default="auto",
        metadata={
            "help": "Compute the loss from the models' last hidden states and LM heads, never building the [tokens, "
            "vocabulary] logits (seqkd.losses.fused_linear_distillation_loss): 'true', 'false', or 'auto' (when a "
            "batch's logits would hold >= 2**28 values, 1 GiB in float32, and the models allow it). Supported: "
            "seqkd's LSTMs, GPT-2, Marian and BART, in one process; elsewhere (several processes, FSDP, DeepSpeed) "
            "'auto' uses the logits.",
            "choices": ["auto", "true", "false"],
        },
    )
    bleu_tokenize: str = field(
        default="13a",
        metadata={
            "help": "sacreBLEU tokenizer for BLEU at evaluation (with predict_with_generate): '13a' for detokenized "
            "text, 'none' for references that are already tokenized (e.g. Multi30k's tok/ files)."
        },
    )

    def __post_init__(self):
        _check_choice("loss", self.loss, loss_names())
        _check_non_negative("ce_weight", self.ce_weight)
        _check_non_negative("kd_weight", self.kd_weight)
        if self.temperature is not None:
            _check_temperature(self.temperature)
        _check_choice("divergence", self.divergence, DIVERGENCES)
        if not 0 <= self.jsd_beta <= 1:
            raise InvalidValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta!r}")
        _check_non_negative("alpha", self.alpha)
        _check_non_negative("beta", self.beta)
        if self.label_smoothing is not None:
            _check_epsilon(self.label_smoothing)
        _check_non_negative("distill_warmup_epochs", self.distill_warmup_epochs)
        _check_choice("teacher_dtype", self.teacher_dtype, list(TEACHER_DTYPES))
        _check_choice("cache_tail", self.cache_tail, SPARSE_TAILS)
        if self.teacher_cache and self.cache_tail == "student" and self.needs_teacher:
            forward_kl = self.loss == "ban" or (self.loss == "kd" and self.divergence == "forward_kl")
            if not forward_kl or (self.temperature or 1.0) != 1.0:
                raise InvalidValueError(
                    f"cache_tail='student' needs forward KL at temperature 1 (loss 'ban', or 'kd' with divergence "
                    f"'forward_kl'), got loss {self.loss!r}, divergence {self.divergence!r}, temperature "
                    f"{self.temperature}: use cache_tail='uniform'"
                )
        if not (isinstance(self.lmbda, (int, float)) and 0 <= self.lmbda <= 1):
            raise InvalidValueError(f"lmbda must be in [0, 1] (the probability of an on-policy batch), got {self.lmbda!r}")
        if self.gkd_max_new_tokens < 1:
            raise InvalidValueError(f"gkd_max_new_tokens must be >= 1, got {self.gkd_max_new_tokens}")
        if not self.gkd_temperature > 0:
            raise InvalidValueError(f"gkd_temperature must be > 0, got {self.gkd_temperature}")
        if self.gkd_top_k < 0:
            raise InvalidValueError(f"gkd_top_k must be >= 0 (0 keeps every token), got {self.gkd_top_k}")
        if not 0 < self.gkd_top_p <= 1:
            raise InvalidValueError(f"gkd_top_p must be in (0, 1], got {self.gkd_top_p}")
        if self.generates_targets:
            if not self.needs_teacher:
                raise InvalidValueError(
                    f"lmbda / seq_kd need a teacher to score the generated targets, but loss {self.loss!r} with "
                    f"kd_weight {self.kd_weight} uses none: use loss kd (divergence jsd for GKD) or dkd"
                )
            if self.teacher_cache:
                raise InvalidValueError(
                    "lmbda / seq_kd score targets generated during training, which a teacher cache (written for the "
                    "data's own targets) cannot: drop teacher_cache and give teacher_model_name_or_path"
                )
        _check_choice("fused_linear", self.fused_linear, ("auto", "true", "false"))
        if self.loss_chunk_size is not None and self.loss_chunk_size <= 0:
            raise InvalidValueError(f"loss_chunk_size must be > 0, got {self.loss_chunk_size}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 0:
            raise InvalidValueError(
                f"early_stopping_patience must be >= 1 (or 0 for no early stopping), got {self.early_stopping_patience}"
            )
        if self.early_stopping_patience == 0:
            self.early_stopping_patience = None
        if self.early_stopping_patience is not None:
            if str(getattr(self.eval_strategy, "value", self.eval_strategy)) == "no":
                raise InvalidValueError(
                    "early_stopping_patience needs evaluations to compare: set eval_strategy to 'epoch' (or 'steps', "
                    "with save_strategy the same)"
                )
            # The best checkpoint must survive rotation and become the saved model.
            self.load_best_model_at_end = True
        if (self.bf16 or self.bf16_full_eval) and not self.use_cpu and not _has_bf16_accelerator():
            # transformers refuses bf16 without a GPU unless use_cpu is set; on a CPU-only machine the field can only
            # mean CPU autocast, which Accelerate applies once use_cpu is on (the losses stay in float32).
            logger.info("bf16 on a machine without a GPU: training with CPU autocast (use_cpu=True)")
            self.use_cpu = True
        if (self.bf16 or self.bf16_full_eval) and self.use_cpu and not cpu_has_native_bf16():
            logger.warning(
                "bf16 on a CPU without bf16 instructions (neither avx512_bf16 nor AMX): autocast emulates bf16 here "
                "and float32 is faster (a 2 x 650 LSTM step ran at 0.53x float32's speed on an Ice Lake Xeon and "
                "0.05x on an avx2-only AMD EPYC, docs/benchmarks.md); --bf16 auto picks float32 here, and "
                "scripts/bench_bf16.py measures both on this machine"
            )
        if self.dataloader_pin_memory and (self.use_cpu or not torch.accelerator.is_available()):
            # Pinned memory only speeds copies to an accelerator; on CPU the DataLoader warns on every run instead.
            self.dataloader_pin_memory = False
        if getattr(self, "label_smoothing_factor", 0.0):
            raise InvalidValueError(
                f"label_smoothing_factor={self.label_smoothing_factor} is transformers' own smoother, which the "
                "distillation loss bypasses: set label_smoothing instead"
            )
        super().__post_init__()

    @property
    def needs_teacher(self) -> bool:
        return self.loss not in ("ce", "ls") and self.kd_weight > 0

    @property
    def generates_targets(self) -> bool:
        """Whether training samples targets (on-policy with lmbda > 0, or the teacher's with seq_kd)."""
        return self.lmbda > 0 or self.seq_kd


def load_teacher(
    path: str, *, is_encoder_decoder: bool, dtype: str = "auto", allow_pickle: bool = False
) -> PreTrainedModel:
    """Load a teacher from a saved directory or, when no such directory exists, from the Hub (safetensors weights
    only, unless ``allow_pickle``)."""
    from seqkd.models import realign_weights
    from seqkd.pipeline import check_model_folder

    auto = AutoModelForSeq2SeqLM if is_encoder_decoder else AutoModelForCausalLM
    kwargs = {} if TEACHER_DTYPES[dtype] is None else {"dtype": TEACHER_DTYPES[dtype]}
    kwargs["use_safetensors"] = None if allow_pickle else True
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        check_model_folder(local, allow_pickle=allow_pickle, what="teacher")
        return realign_weights(auto.from_pretrained(local, **kwargs))
    if not re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", path):
        raise MissingInputError(
            f"teacher {path!r} does not exist: train the teacher first, or point at the folder it was saved to"
        )
    try:
        return realign_weights(auto.from_pretrained(path, **kwargs))
    except OSError as error:
        raise MissingInputError(
            f"teacher {path!r} is neither a local folder nor a model the Hub could serve: {error}"
        ) from error


def _has_bf16_accelerator() -> bool:
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return is_torch_bf16_gpu_available() or is_torch_xla_available()


def _generation_figures(generation_seconds: float, step_seconds: float, batches: dict[str, int]) -> dict[str, float]:
    """Share of step time spent generating, and share of the batches whose targets the student sampled."""
    figures = {"generation_share": round(generation_seconds / step_seconds, 4) if step_seconds > 0 else 0.0}
    if sum(batches.values()):
        figures["on_policy_fraction"] = round(batches["student"] / sum(batches.values()), 4)
    return figures


def _is_stream(dataset) -> bool:
    from seqkd.data.text import StreamBatches
    from seqkd.teacher_cache import CachedStreamBatches

    return isinstance(dataset.batches if isinstance(dataset, CachedStreamBatches) else dataset, StreamBatches)


def _single_batch(items: list[dict]) -> dict:
    return items[0]


def _detach_state(state):
    if state is None:
        return None
    return tuple(s.detach() for s in state)


class _ResetStreamStateAtEpoch(TrainerCallback):
    """Recurrent states start from zero at every epoch, except when a checkpoint resumes in the middle of one."""

    def __init__(self, trainer: "DistillationTrainer"):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        # A checkpoint written at the end of an epoch holds the state that epoch ended with, which the
        # uninterrupted run drops here; only a resume inside an epoch continues its streams. transformers sets
        # state.epoch to epoch + (step + 1) / steps_in_epoch, a whole number exactly when the epoch was complete;
        # with ignore_data_skip it replays the epoch's data from the start, so the streams restart too.
        resumes_mid_epoch = not float(state.epoch or 0).is_integer() and not args.ignore_data_skip
        if not (trainer._keep_loaded_state and resumes_mid_epoch):
            trainer._student_state = trainer._teacher_state = None
        trainer._keep_loaded_state = False


class DistillationTrainer(Seq2SeqTrainer):
    """A ``Seq2SeqTrainer`` whose loss is :func:`seqkd.losses.distillation_loss` against a frozen teacher.

    Args:
        teacher_model: the teacher (a model, or a path / Hub id; default ``args.teacher_model_name_or_path``).
            It is frozen, kept in eval mode on the student's device, out of the optimizer and out of DDP; under
            FSDP and DeepSpeed ZeRO-3 it is prepared by Accelerate for inference.
        Everything else as for ``transformers.Seq2SeqTrainer``.
    """

    # compute_loss normalises by num_items_in_batch (the accumulated batch's token count) itself.
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args: DistillationArguments | None = None, teacher_model=None, **kwargs):
        if args is None or not isinstance(args, DistillationArguments):
            raise InvalidValueError("DistillationTrainer needs args=DistillationArguments(...)")
        if model is None:
            raise InvalidValueError("DistillationTrainer needs the student model")
        use_cache = bool(args.teacher_cache) and args.needs_teacher
        if teacher_model is None and args.needs_teacher and not use_cache:
            if args.teacher_model_name_or_path is None:
                raise InvalidValueError(
                    f"loss {args.loss!r} needs a teacher: pass teacher_model=, set teacher_model_name_or_path or "
                    "teacher_cache (or use loss 'ce' / 'ls' to train from labels alone)"
                )
            teacher_model = args.teacher_model_name_or_path
        if teacher_model is None and use_cache and args.teacher_model_name_or_path:
            teacher_model = args.teacher_model_name_or_path  # only to check that the cache is this teacher's
        if isinstance(teacher_model, (str, os.PathLike)):
            teacher_model = load_teacher(
                str(teacher_model), is_encoder_decoder=model.config.is_encoder_decoder, dtype=args.teacher_dtype,
                allow_pickle=args.allow_pickle_weights,
            )
        self.teacher_cache = None
        if use_cache:
            from seqkd.teacher_cache import TeacherCache

            if kwargs.get("train_dataset") is None:
                raise InvalidValueError("training from a teacher cache needs train_dataset= (the data the cache was written for)")
            self.teacher_cache = TeacherCache(args.teacher_cache)
            self.teacher_cache.check_matches(
                kwargs["train_dataset"], tokenizer=kwargs.get("processing_class"),
                vocab_size=model.get_output_embeddings().weight.shape[0], teacher=teacher_model,
                decoder_start_token_id=getattr(model.config, "decoder_start_token_id", None),
            )  # fmt: skip
            teacher_model = None
        if teacher_model is not None:
            _check_same_vocabulary(model, teacher_model)
            _check_same_decoder_start(model, teacher_model)
            if TEACHER_DTYPES[args.teacher_dtype] is not None:
                teacher_model = teacher_model.to(TEACHER_DTYPES[args.teacher_dtype])
        from seqkd.models import freeze_unsaved_parameters

        # Before the optimizer sees them: a student loaded from a folder may hold parameters its checkpoint drops.
        freeze_unsaved_parameters(model)
        super().__init__(model=model, args=args, **kwargs)
        if self.teacher_cache is not None:
            self.train_dataset = self.teacher_cache.attach(self.train_dataset)
            if self.teacher_cache.layout["kind"] == "pairs":
                from seqkd.teacher_cache import PadCachedTeacher

                self.data_collator = PadCachedTeacher(self.data_collator)
        self.teacher = self._prepare_teacher(teacher_model) if teacher_model is not None and args.needs_teacher else None
        self._stateful = is_stateful(model)
        # Recurrent states run on across the batches of a stream only; blocks and prompts each start afresh.
        self._carry_state = self._stateful and _is_stream(self.train_dataset)
        self.teacher_signal = self._build_teacher_signal()
        self._fused_linear = self._fused_linear_mode(model)
        # Running totals of step and generation time, and their values at the last log (the log reports the window).
        self._step_seconds = self._logged_step_seconds = self._logged_generation_seconds = 0.0
        self._logged_batches: dict[str, int] = {}
        self._student_state = self._teacher_state = None
        self._keep_loaded_state = False
        self._part_sums: dict[str, torch.Tensor] = {}
        self._part_tokens: torch.Tensor | int = 0
        # The first training step whose loss was not finite: [step, loss, each part, teacher logits] flags, on the
        # device (step -1 while every loss was finite). Read on CPU at every step (free), else at logging and
        # checkpoint steps, so that a GPU run pays no synchronisation per step.
        self._nonfinite: torch.Tensor | None = None
        self._nonfinite_names: list[str] = []
        self.add_callback(_ResetStreamStateAtEpoch(self))
        self._early_stopping = None
        if args.early_stopping_patience is not None:
            from transformers import EarlyStoppingCallback

            self._early_stopping = EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience)

    # ---- the teacher -------------------------------------------------------------------------------------

    def _prepare_teacher(self, teacher: PreTrainedModel):
        teacher.requires_grad_(False)
        teacher.eval()
        if self.is_deepspeed_enabled:
            return _prepare_deepspeed_teacher(teacher, self.accelerator)
        if self.is_fsdp_enabled:
            # Not accelerator.prepare_model(teacher, evaluation_mode=True): under FSDP that neither shards the
            # teacher nor moves it to the device, and it registers the teacher as the accelerator's first model.
            return _prepare_fsdp_teacher(teacher, self.accelerator)
        return teacher.to(self.accelerator.device)

    def _build_teacher_signal(self):
        """The one place that decides what the student is compared with: none, live, cache or generated."""
        from transformers.integrations import is_deepspeed_zero3_enabled

        from seqkd.teacher_signal import CachedTeacher, GeneratedTargets, LiveTeacher, TeacherSignal

        if self.teacher_cache is not None:
            return CachedTeacher(self.args.cache_tail)
        if self.teacher is None:
            return TeacherSignal()
        live = LiveTeacher(self.teacher)
        args = self.args
        if not args.generates_targets:
            return live
        if self._carry_state:
            raise InvalidValueError(
                "lmbda / seq_kd sample completions of prompts, and a stream of truncated-BPTT windows has none: "
                "train the language model on prompt-completion data (batching 'prompts', with prompt_length)"
            )
        sharded = self.is_fsdp_enabled or (self.is_deepspeed_enabled and is_deepspeed_zero3_enabled())
        sampling = {"max_new_tokens": args.gkd_max_new_tokens, "temperature": args.gkd_temperature,
                    "top_k": args.gkd_top_k, "top_p": args.gkd_top_p}  # fmt: skip
        return GeneratedTargets(
            live, lmbda=args.lmbda, seq_kd=args.seq_kd, generation_kwargs=sampling,
            synced_gpus=sharded and self.accelerator.num_processes > 1,
        )  # fmt: skip

    def _fused_linear_mode(self, model) -> str:
        """'never', 'always' or 'large' (batches whose logits would hold >= _FUSED_MIN_ELEMENTS values)."""
        from seqkd.models import supports_hidden_head

        args = self.args
        if args.fused_linear == "false":
            return "never"
        teacher = self.teacher if self.teacher_signal.kind in ("live", "generated") else None
        unsupported = [type(m).__name__ for m in (model, teacher) if m is not None and not supports_hidden_head(m)]
        distributed = self.args.world_size > 1 or self.is_fsdp_enabled or self.is_deepspeed_enabled
        if args.fused_linear == "true":
            if unsupported:
                raise InvalidValueError(
                    f"fused_linear true takes the LM head apart, which seqkd cannot do for {', '.join(unsupported)} "
                    "(supported: seqkd's LSTMs, GPT-2, Marian, BART): use fused_linear auto or false"
                )
            if distributed:
                raise InvalidValueError(
                    "fused_linear true runs in one process for now (a DDP, FSDP or DeepSpeed wrapper must see the "
                    "model's own forward pass): use fused_linear auto, which falls back to the logits there"
                )
            return "always"
        return "never" if unsupported or distributed else "large"

    # ---- data --------------------------------------------------------------------------------------------

    def _stream_dataloader(self, dataset) -> DataLoader | None:
        """Stream batches are already per process and in order: no sampler, no sharding, no shuffling."""
        from seqkd.data.text import StreamBatches
        from seqkd.teacher_cache import CachedStreamBatches

        batches = dataset.batches if isinstance(dataset, CachedStreamBatches) else dataset
        if not isinstance(batches, StreamBatches):
            return None
        if batches.num_processes != self.args.world_size or batches.process_index != self.args.process_index:
            raise InvalidValueError(
                f"StreamBatches built for process {batches.process_index} of {batches.num_processes}, but this is "
                f"process {self.args.process_index} of {self.args.world_size}: build it with "
                "process_index=args.process_index, num_processes=args.world_size"
            )
        # One dataset item per step, through a batch sampler (batch_size=1, unwrapped by the collate function)
        # rather than batch_size=None, so that a resumed run can skip the steps already done.
        return DataLoader(
            dataset, batch_size=1, shuffle=False, collate_fn=_single_batch, pin_memory=self.args.dataloader_pin_memory
        )

    def get_train_dataloader(self) -> DataLoader:
        loader = self._stream_dataloader(self.train_dataset)
        return loader if loader is not None else super().get_train_dataloader()

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        loader = self._stream_dataloader(dataset)
        return loader if loader is not None else super().get_eval_dataloader(eval_dataset)

    def _set_signature_columns_if_needed(self) -> None:
        # The cached teacher outputs and the prompts are not arguments of the model, but the teacher signal needs them.
        super()._set_signature_columns_if_needed()
        from seqkd.teacher_signal import PROMPT_KEY

        extra = (*TEACHER_KEYS, PROMPT_KEY)
        self._signature_columns += [key for key in extra if key not in self._signature_columns]

    def _get_num_items_in_batch(self, batch_samples, device):
        # Stream batches carry `shift_labels` only; transformers counts tokens only when `labels` are present.
        if batch_samples and "labels" not in batch_samples[0] and "shift_labels" in batch_samples[0]:
            count = sum(batch["shift_labels"].ne(-100).sum() for batch in batch_samples).to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                count = self.accelerator.gather(count).sum()
            return count
        return super()._get_num_items_in_batch(batch_samples, device)

    # ---- the loss ----------------------------------------------------------------------------------------

    def _aligned_targets(self, model, inputs: dict) -> torch.Tensor:
        """Pop the labels from ``inputs`` (so the models skip their own loss) and align them with the logits."""
        labels, shift_labels = inputs.pop("labels", None), inputs.pop("shift_labels", None)
        if shift_labels is not None:
            return shift_labels
        if labels is None:
            raise InvalidValueError(f"the batch has no 'labels' or 'shift_labels'; it has {sorted(inputs)}")
        unwrapped = self.accelerator.unwrap_model(model)
        if unwrapped.config.is_encoder_decoder:
            if "decoder_input_ids" not in inputs:
                inputs["decoder_input_ids"] = unwrapped.prepare_decoder_input_ids_from_labels(labels=labels)
            return labels
        # Causal LM: position i predicts token i + 1. Shift the labels, not the logits (which would copy them).
        return F.pad(labels[..., 1:], (0, 1), value=-100)

    def _kd_weight_now(self) -> float:
        warmup = self.args.distill_warmup_epochs
        if warmup <= 0 or not self.model.training:
            return self.args.kd_weight
        return self.args.kd_weight * min(1.0, (self.state.epoch or 0.0) / warmup)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with attention_kernel_context(self.args, inputs):
            return self._compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _compute_loss(self, model, inputs, return_outputs, num_items_in_batch):
        signal = self.teacher_signal
        inputs, taken = signal.take(inputs, self.accelerator.unwrap_model(model))
        if signal.kind == "generated":
            # Sampled targets differ in length from the gold ones transformers counted: every batch of such a run
            # is normalised by its own tokens.
            num_items_in_batch = None
        targets = self._aligned_targets(model, inputs)
        student_inputs = {**inputs, "state": self._student_state} if self._carry_state else inputs
        vocab_size = self.accelerator.unwrap_model(model).get_output_embeddings().weight.shape[0]
        fused = self._fused_linear == "always" or (
            self._fused_linear == "large" and targets.numel() * vocab_size >= _FUSED_MIN_ELEMENTS
        )
        if fused:
            return self._fused_loss(model, signal, inputs, student_inputs, taken, targets, num_items_in_batch, return_outputs)
        outputs = model(**student_inputs)
        if self._carry_state:
            self._student_state = _detach_state(outputs.state)
        teacher_logits, teacher_state = signal.logits(
            inputs, taken, outputs.logits.shape[-1], self._teacher_state if self._carry_state else None
        )
        if self._carry_state and signal.kind == "live":
            self._teacher_state = _detach_state(teacher_state)
        result = distillation_loss(
            self.args.loss, outputs.logits, teacher_logits, targets, **self._loss_options(taken),
            num_items_in_batch=num_items_in_batch,
        )
        return self._finish_loss(model, result, teacher_logits, targets, num_items_in_batch, outputs, return_outputs)

    def _loss_options(self, taken: dict) -> dict:
        args = self.args
        return dict(
            # A student's own sample is no reference: on it the loss is the distillation term alone.
            ce_weight=0.0 if taken["source"] == "student" else args.ce_weight,
            kd_weight=self._kd_weight_now(), label_smoothing=args.label_smoothing, temperature=args.temperature,
            divergence=args.divergence, jsd_beta=args.jsd_beta, alpha=args.alpha, beta=args.beta,
            chunk_size=args.loss_chunk_size,
        )  # fmt: skip

    def _fused_loss(self, model, signal, inputs, student_inputs, taken, targets, num_items_in_batch, return_outputs):
        """The loss from the models' last hidden states and LM heads: no [tokens, vocabulary] logits at all."""
        from seqkd.losses import fused_linear_distillation_loss
        from seqkd.models import hidden_and_head

        hidden, weight, bias, outputs = hidden_and_head(model, student_inputs)
        if self._carry_state:
            self._student_state = _detach_state(outputs.state)
        teacher = {}
        teacher_signal_values = None
        if signal.kind in ("live", "generated"):
            live = signal if signal.kind == "live" else signal.scorer
            teacher_inputs = {**inputs, "state": self._teacher_state} if self._carry_state and self._teacher_state is not None else inputs
            with torch.no_grad():
                t_hidden, t_weight, t_bias, t_outputs = hidden_and_head(live.teacher, teacher_inputs)
            if self._carry_state:
                self._teacher_state = _detach_state(t_outputs.state)
            teacher = {"teacher_hidden": t_hidden, "teacher_weight": t_weight, "teacher_bias": t_bias}
            teacher_signal_values = t_hidden
        elif signal.kind == "cache":
            teacher_signal_values, _ = signal.logits(inputs, taken, weight.shape[0])
            teacher = {"teacher": teacher_signal_values}
        result = fused_linear_distillation_loss(
            self.args.loss, hidden, weight, targets, student_bias=bias, **teacher, **self._loss_options(taken),
            num_items_in_batch=num_items_in_batch,
        )  # fmt: skip
        return self._finish_loss(model, result, teacher_signal_values, targets, num_items_in_batch, outputs, return_outputs)

    def _finish_loss(self, model, result, teacher_logits, targets, num_items_in_batch, outputs, return_outputs):
        args = self.args
        loss = result.loss
        if model.training:
            self._track_nonfinite(result, teacher_logits)
            # Parts are logged as token-weighted means over the logging interval. The sums stay on the device
            # (no synchronisation per step) until log() reads them.
            local_tokens = targets.ne(-100).sum()
            denominator = local_tokens if num_items_in_batch is None else num_items_in_batch
            for name, value in result.parts.items():
                self._part_sums[name] = self._part_sums.get(name, 0.0) + value.double() * denominator
            self._part_tokens = self._part_tokens + local_tokens
            if num_items_in_batch is None:
                loss = loss / self.current_gradient_accumulation_steps
            elif args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                # num_items_in_batch counts every process' tokens; DDP averages gradients over processes.
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _track_nonfinite(self, result, teacher_logits) -> None:
        flags = [~torch.isfinite(result.loss.detach())]
        flags += [~torch.isfinite(value.detach()) for value in result.parts.values()]
        names = list(result.parts)
        device = flags[0].device
        check_now = self._check_nonfinite_every_step(device)
        if teacher_logits is not None:
            if check_now and not flags[0]:
                flags.append(torch.zeros((), dtype=torch.bool, device=device))  # no need to look: the loss is fine
            else:
                # A sum is NaN or inf whenever one of its terms is; it is several times cheaper than isfinite().all().
                if isinstance(teacher_logits, SparseTeacher):
                    total = teacher_logits.logprobs.detach().sum(dtype=torch.float32)
                    if teacher_logits.residual is not None:
                        total = total + teacher_logits.residual.detach().sum(dtype=torch.float32)
                else:
                    total = teacher_logits.detach().sum(dtype=torch.float32)
                flags.append(~torch.isfinite(total))
            names.append("teacher")
        record = torch.stack([torch.full((), self.state.global_step + 1, dtype=torch.long, device=device),
                              *(flag.to(torch.long) for flag in flags)])  # fmt: skip
        if self._nonfinite is None or self._nonfinite_names != names:
            # The parts change (a distillation warm-up adds the KD term): settle the old record before a new one.
            self._raise_if_nonfinite()
            self._nonfinite = torch.full_like(record, -1)
            self._nonfinite_names = names
        first = flags[0] & (self._nonfinite[0] < 0)
        self._nonfinite = torch.where(first, record, self._nonfinite)
        if check_now:
            self._raise_if_nonfinite()

    def _check_nonfinite_every_step(self, device: torch.device) -> bool:
        # Reading a CPU tensor costs nothing; reading a GPU one would stall the step until the device catches up.
        # With several processes every one must stop together, which takes a collective: only where all of them
        # check (logging and checkpoint steps, the end of training), never on one process alone.
        return device.type == "cpu" and self.accelerator.num_processes == 1

    def _raise_if_nonfinite(self) -> None:
        """Stop at a non-finite loss, before it reaches a checkpoint: the last one saved stays the last good one.
        With several processes, a collective: every process raises, naming the earliest bad step of any."""
        if self._nonfinite is None:
            return
        records = self._nonfinite[None]
        if self.accelerator.num_processes > 1:
            records = self.accelerator.gather(records)
        bad = [(row[0], rank, row) for rank, row in enumerate(records.tolist()) if row[0] >= 0]
        if not bad:
            return
        step, rank, record = min(bad)
        flags = dict(zip(self._nonfinite_names, record[2:]))
        teacher = flags.pop("teacher", None)
        parts = [name for name, bad in flags.items() if bad] or ["the total (every part was finite)"]
        if teacher is None:
            source = "no teacher was involved"
        elif teacher:
            source = "the teacher's logits were not finite: check the teacher (or its cache) on this batch"
        else:
            source = "the teacher's logits were finite, so the student diverged: lower the learning rate or clip gradients (max_grad_norm)"
        last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved"
        on_process = f" on process {rank}" if len(records) > 1 else ""
        raise NonFiniteLossError(
            f"the training loss was not finite (NaN or inf) at step {step}{on_process}, in {', '.join(parts)}; "
            f"{source}; training stopped and {where}"
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        started = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_seconds += time.perf_counter() - started
        return loss

    def generation_summary(self) -> dict[str, float]:
        """The whole run's share of training-step time spent generating and share of batches the student sampled
        (this process, since it started or resumed): the per-log figures, over every step."""
        signal = self.teacher_signal
        if signal.kind != "generated" or self._step_seconds <= 0:
            return {}
        return _generation_figures(signal.generation_seconds, self._step_seconds, signal.batches)

    def _generation_logs(self) -> dict[str, float]:
        """The share of training-step time spent generating targets, and where the batches' targets came from,
        since the last log (this process' own figures)."""
        signal = self.teacher_signal
        if signal.kind != "generated":
            return {}
        counts = {source: n - self._logged_batches.get(source, 0) for source, n in signal.batches.items()}
        logs = _generation_figures(signal.generation_seconds - self._logged_generation_seconds,
                                   self._step_seconds - self._logged_step_seconds, counts)  # fmt: skip
        self._logged_generation_seconds, self._logged_step_seconds = signal.generation_seconds, self._step_seconds
        self._logged_batches = dict(signal.batches)
        return logs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            self._raise_if_nonfinite()
            logs.update(self._generation_logs())
        if "loss" in logs and self._part_sums:
            totals = torch.stack(
                [torch.as_tensor(v, dtype=torch.float64, device=self.accelerator.device)
                 for v in (*self._part_sums.values(), self._part_tokens)]
            )  # fmt: skip
            if self.accelerator.num_processes > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            totals = totals.cpu()
            if totals[-1] > 0:
                for name, total in zip(self._part_sums, totals[:-1]):
                    logs[f"loss_{name}"] = round(float(total / totals[-1]), 4)
            self._part_sums.clear()
            self._part_tokens = 0
        super().log(logs, start_time)

    # ---- evaluation --------------------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **gen_kwargs):
        """``{prefix}_loss`` (mean NLL per predicted token) and ``{prefix}_perplexity`` over the whole split."""
        dataloader = self.get_eval_dataloader(eval_dataset)
        model = self.accelerator.unwrap_model(self.model)
        result = corpus_perplexity(
            model, dataloader, show_progress=not self.args.disable_tqdm and self.is_local_process_zero(), desc=metric_key_prefix
        )
        totals = torch.tensor([result["nll"], result["tokens"]], dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        nll, tokens = totals.tolist()
        mean = nll / max(tokens, 1)
        metrics = {
            f"{metric_key_prefix}_loss": mean,
            f"{metric_key_prefix}_perplexity": math.exp(min(mean, 700.0)),
            f"{metric_key_prefix}_tokens": int(tokens),
        }
        if self.args.predict_with_generate and model.config.is_encoder_decoder:
            metrics.update(self._bleu(model, dataloader, metric_key_prefix, **gen_kwargs))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        return metrics

    def _bleu(self, model, dataloader, prefix: str, **gen_kwargs) -> dict[str, float]:
        """Corpus BLEU and chrF of greedy or beam outputs against the decoded labels, over all processes."""
        from accelerate.utils import gather_object
        from transformers.integrations import is_deepspeed_zero3_enabled

        from seqkd.evaluation import corpus_bleu, corpus_chrf

        tokenizer = self.processing_class
        if tokenizer is None:
            raise InvalidValueError("BLEU at evaluation needs the tokenizer: pass processing_class= to the trainer")
        # Under FSDP and ZeRO-3 each forward gathers parameters from every process, so a process whose sequences
        # are done must keep stepping until all are; said here, not left to transformers' guess from the model.
        sharded = self.is_fsdp_enabled or (self.is_deepspeed_enabled and is_deepspeed_zero3_enabled())
        gen_kwargs = {
            "num_beams": self.args.generation_num_beams or 1,
            "max_new_tokens": self.args.generation_max_length or 128,
            "synced_gpus": sharded and self.accelerator.num_processes > 1,
            **gen_kwargs,
        }
        hypotheses, references = [], []
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in dataloader:
                batch = self._prepare_inputs(batch)
                generated = model.generate(
                    input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), **gen_kwargs
                )
                labels = batch["labels"].masked_fill(batch["labels"] == -100, tokenizer.pad_token_id)
                hypotheses += tokenizer.batch_decode(generated, skip_special_tokens=True)
                references += tokenizer.batch_decode(labels, skip_special_tokens=True)
        model.train(was_training)
        if self.accelerator.num_processes > 1:
            hypotheses, references = gather_object(hypotheses), gather_object(references)
        hypotheses = [h.strip() for h in hypotheses]
        references = [r.strip() for r in references]
        bleu = corpus_bleu(hypotheses, references, tokenize=self.args.bleu_tokenize)
        chrf = corpus_chrf(hypotheses, references)
        return {f"{prefix}_bleu": bleu["score"], f"{prefix}_chrf": chrf["score"]}

    # ---- checkpoints -------------------------------------------------------------------------------------

    def _get_output_dir(self, trial) -> str:
        staging = getattr(self, "_staging_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint in a staging folder, then rename it into place: an interrupted save leaves no
        ``checkpoint-N`` folder that a resume would load."""
        self._raise_if_nonfinite()
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = self._staging_dir = os.path.join(run_dir, ".staging")
        staged, final = os.path.join(staging, name), os.path.join(run_dir, name)
        try:
            super()._save_checkpoint(model, trial)
            if self._stateful:
                self._save_stream_state(staged)
        except BaseException:
            # A failed save (disk full, killed) leaves nothing: not even a staged folder to trip over later.
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            best = self.state.best_model_checkpoint
            if best is not None and os.path.dirname(best) == os.path.dirname(staged):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(staged, final)
            shutil.rmtree(os.path.join(run_dir, ".staging"), ignore_errors=True)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()

    def _save_stream_state(self, checkpoint_dir: str) -> None:
        tensors = {}
        for owner, state in (("student", self._student_state), ("teacher", self._teacher_state)):
            for i, tensor in enumerate(state or ()):
                tensors[f"{owner}.{i}"] = tensor.detach().contiguous().cpu()
        os.makedirs(checkpoint_dir, exist_ok=True)
        save_file(tensors, os.path.join(checkpoint_dir, _STREAM_STATE_FILE.format(rank=self.args.process_index)))

    def _load_stream_state(self, checkpoint_dir: str) -> None:
        name = _STREAM_STATE_FILE.format(rank=self.args.process_index)
        path = os.path.join(checkpoint_dir, name)
        if not os.path.isdir(checkpoint_dir):
            raise MissingInputError(f"cannot resume from checkpoint {checkpoint_dir}: no such folder")
        # Restarting from zero state would silently train on different inputs than the interrupted run did.
        if not os.path.isfile(path):
            raise MissingInputError(
                f"checkpoint {checkpoint_dir} lacks {name}, the recurrent (TBPTT) state of process "
                f"{self.args.process_index} that resuming this stateful model needs: resume with as many processes "
                "as wrote the checkpoint, from a checkpoint written by seqkd's DistillationTrainer, or start afresh "
                "in a new output_dir"
            )
        tensors = load_file(path, device=str(self.accelerator.device))
        for owner in ("student", "teacher"):
            parts = [tensors[k] for k in sorted(k for k in tensors if k.startswith(owner + "."))]
            setattr(self, f"_{owner}_state", tuple(parts) if parts else None)
        self._keep_loaded_state = True

    def _issue_warnings_after_load(self, load_result) -> None:
        # transformers forgives missing keys only when they are exactly _keys_to_ignore_on_save, so a model with
        # tied embeddings (Marian, GPT-2 and both LSTM families save the shared matrix once) warned on every resume
        # and every best-model reload. A tied copy shares its storage with a key that was loaded, so it is not
        # missing; anything else still is, and still warns.
        model = self.accelerator.unwrap_model(self.model)
        state = model.state_dict()
        missing = set(load_result.missing_keys)
        loaded_storage = {t.data_ptr() for k, t in state.items() if k not in missing}
        expected = set(model._keys_to_ignore_on_save or ())
        still_missing = [
            k
            for k in load_result.missing_keys
            if k not in expected and not (k in state and state[k].data_ptr() in loaded_storage)
        ]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=still_missing))

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise InvalidValueError(f"resume_from_checkpoint=True but {self.args.output_dir} holds no checkpoint")
        if resume_from_checkpoint and self._stateful:
            self._load_stream_state(resume_from_checkpoint)
        self._nonfinite = None  # a second train() does not inherit the first one's bad step
        # The stopper watches the evaluations of training alone: one after it (a test split, say) has no
        # eval_<metric> to compare and would only warn.
        if self._early_stopping is not None:
            self._early_stopping.early_stopping_patience_counter = _saved_patience_counter(resume_from_checkpoint)
            self.add_callback(self._early_stopping)
        try:
            output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        finally:
            if self._early_stopping is not None:
                self.remove_callback(self._early_stopping)
        self._raise_if_nonfinite()  # a bad step after the last logging step must not reach the saved model
        return output


def eval_history(log_history: list[dict]) -> list[dict]:
    """One ``{"epoch": ..., "step": ..., "eval_<metric>": ...}`` per evaluation during training, in order, from a
    trainer's ``state.log_history``; timings and token counts left out, since they describe the machine and the data
    rather than the model."""
    history = []
    for entry in log_history:
        scores = {k: v for k, v in entry.items() if k.startswith("eval_") and isinstance(v, (int, float))
                  and not k.endswith(("_runtime", "_per_second", "_tokens"))}  # fmt: skip
        if scores:
            history.append({"epoch": round(entry.get("epoch", 0.0), 2), "step": entry.get("step"), **scores})
    return history


def eval_curve(history: list[dict] | None, metric: str) -> list[tuple[float, float]]:
    """``(epoch, value)`` of ``metric`` (e.g. ``"eval_bleu"``) from an :func:`eval_history`; empty without one."""
    return [(entry["epoch"], entry[metric]) for entry in history or () if metric in entry]


def format_curve(values: list[float], best, spec: str) -> str:
    """``values`` comma-separated, the first ``best`` one (``max`` or ``min``) in bold: a line of a results.md."""
    top = values.index(best(values))
    return ", ".join(f"**{v:{spec}}**" if i == top else f"{v:{spec}}" for i, v in enumerate(values))


def _saved_patience_counter(checkpoint: str | None) -> int:
    """How many evaluations in a row had not improved when ``checkpoint`` was saved (0 when starting afresh).

    transformers restores callback states only under ``restore_callback_states_from_checkpoint``, which would also
    restore the saved ``TrainerControl`` (a final checkpoint's ``should_training_stop``); without the count, a run
    resumed in the middle of a plateau would wait a whole patience again and train longer than an uninterrupted one.
    """
    if not checkpoint:
        return 0
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        callbacks = json.load(f).get("stateful_callbacks", {})
    saved = callbacks.get("EarlyStoppingCallback") or {}
    if isinstance(saved, list):  # transformers stores several callbacks of one class as a list
        saved = saved[0] if saved else {}
    return int(saved.get("attributes", {}).get("early_stopping_patience_counter", 0))


def save_model_atomically(trainer: "DistillationTrainer", final_dir: str, metrics: dict | None = None) -> None:
    """The trained model, its tokenizer and (optionally) ``metrics.json``, written to ``final_dir.partial`` and
    renamed into ``final_dir`` once complete, so an interrupted save never leaves a model that looks finished."""
    staging = final_dir + ".partial"
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        if trainer.is_fsdp_enabled:
            # transformers' save_model writes no weights unless the FSDP state dict type is FULL_STATE_DICT (the
            # launcher's default is SHARDED): gather the full weights (every process takes part), and write them
            # from an unsharded copy of the model, since save_pretrained inspects the model's own (sharded) tensors.
            state_dict = trainer.accelerator.get_state_dict(trainer.model)
            # Where Accelerate hands back the shards themselves (DTensors), gather them: a collective, on every process.
            state_dict = {key: _full_tensor(value) for key, value in state_dict.items()}
            if trainer.args.should_save:
                unwrapped = trainer.accelerator.unwrap_model(trainer.model)
                # Built from the config, not type(unwrapped): FSDP2 swaps the model's class for a sharded one.
                auto = AutoModelForSeq2SeqLM if unwrapped.config.is_encoder_decoder else AutoModelForCausalLM
                full = auto.from_config(unwrapped.config)
                full.load_state_dict(state_dict)
                full.generation_config = unwrapped.generation_config
                full.save_pretrained(staging)
        else:
            trainer.save_model(staging)
        if trainer.args.should_save:
            if trainer.processing_class is not None:
                trainer.processing_class.save_pretrained(staging)
            if metrics is not None:
                with open(os.path.join(staging, "metrics.json"), "w") as f:
                    json.dump(metrics, f, indent=2)
    except BaseException:
        if trainer.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if trainer.args.should_save:
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(staging, final_dir)
    trainer.accelerator.wait_for_everyone()


def _check_same_decoder_start(student, teacher) -> None:
    # The teacher scores the student's decoder inputs: from another start token they are prefixes it never saw.
    if not (student.config.is_encoder_decoder and teacher.config.is_encoder_decoder):
        return
    student_start = getattr(student.config, "decoder_start_token_id", None)
    teacher_start = getattr(teacher.config, "decoder_start_token_id", None)
    if None not in (student_start, teacher_start) and student_start != teacher_start:
        raise InvalidValueError(
            f"the teacher's decoder starts from token {teacher_start}, the student's from {student_start}: the teacher "
            "would score prefixes it never saw; build the student with decoder_start_token_id="
            f"{teacher_start} (model_config)"
        )


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(tensor, "full_tensor", None)  # a DTensor's
    return full_tensor().cpu() if callable(full_tensor) else tensor


def _check_same_vocabulary(student, teacher) -> None:
    student_size = student.get_output_embeddings().weight.shape[0]
    teacher_size = teacher.get_output_embeddings().weight.shape[0]
    if student_size != teacher_size:
        raise InvalidValueError(
            f"teacher vocabulary size ({teacher_size}) differs from the student's ({student_size}): "
            "distil between models built with the same tokenizer"
        )


def _prepare_deepspeed_teacher(teacher, accelerator):
    """Wrap the teacher in a DeepSpeed inference engine with the run's ZeRO stage (3 shards it; 0 otherwise)."""
    import deepspeed

    hidden_size = _hidden_size(getattr(teacher, "config", None))
    config = _teacher_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, hidden_size)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


# transformers fills these "auto" ZeRO-3 sizes from the student's hidden size (HfTrainerDeepSpeedConfig.
# trainer_config_finalize), but only once training starts, after the teacher is prepared.
_ZERO3_AUTO_SIZES = {
    "reduce_bucket_size": lambda hidden: hidden * hidden,
    "stage3_prefetch_bucket_size": lambda hidden: int(0.9 * hidden * hidden),
    "stage3_param_persistence_threshold": lambda hidden: 10 * hidden,
}


def _teacher_deepspeed_config(config: dict, hidden_size: int | None) -> dict:
    """The run's DeepSpeed config, made fit for the teacher: no optimizer or scheduler, ZeRO stage 3 kept (other
    stages shard only optimizer state and gradients, which the teacher has none of: stage 0), and the ZeRO-3 sizes
    left at "auto" filled from the teacher's own hidden size (``deepspeed.initialize`` refuses "auto")."""
    import copy

    config = copy.deepcopy(config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config.get("zero_optimization") or {}
    if zero.get("stage", 0) != 3:
        config["zero_optimization"] = {"stage": 0}
        return config
    auto = [key for key in _ZERO3_AUTO_SIZES if zero.get(key) == "auto"]
    if auto and hidden_size is None:
        raise InvalidValueError(
            f"the teacher's config has no hidden_size to fill the DeepSpeed ZeRO-3 entries left at 'auto' "
            f"({', '.join('zero_optimization.' + key for key in auto)}): set them to numbers in the DeepSpeed config"
        )
    for key in auto:
        zero[key] = _ZERO3_AUTO_SIZES[key](hidden_size)
    return config


def _hidden_size(config) -> int | None:
    """The model's hidden size as transformers reads it for DeepSpeed's "auto" sizes (the largest, if several)."""
    for candidate in (config, getattr(config, "text_config", None)):
        if candidate is None:
            continue
        if getattr(candidate, "hidden_size", None) is not None:
            return int(candidate.hidden_size)
        if getattr(candidate, "hidden_sizes", None):
            return int(max(candidate.hidden_sizes))
    return None


def _prepare_fsdp_teacher(teacher, accelerator):
    """Shard the teacher with the run's FSDP settings (version, mixed precision, offload, wrap policy), for inference.

    It goes through Accelerate's own FSDP preparation, but with a copy of the run's plugin: preparing a model fixes
    the plugin's auto-wrap policy to that model's layer classes, which must stay free to be the student's. The
    teacher is not left among the accelerator's models (whose order ``save_state``/``load_state`` rely on, and an
    evaluation before training prepares the student only when there is none).
    """
    import copy
    import functools

    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

    state = accelerator.state
    run_plugin = state.fsdp_plugin
    plugin = copy.copy(run_plugin)
    # A policy already bound to the student's (or an earlier model's) layer classes is re-derived for the teacher.
    policy = plugin.auto_wrap_policy
    builtin_policies = (transformer_auto_wrap_policy, size_based_auto_wrap_policy)
    if isinstance(policy, functools.partial) and policy.func in builtin_policies:
        plugin.auto_wrap_policy = policy.func
    if plugin.transformer_cls_names_to_wrap:
        classes = {type(module).__name__ for module in teacher.modules()}
        names = [name for name in plugin.transformer_cls_names_to_wrap if name in classes]
        plugin.transformer_cls_names_to_wrap = names or None
    plugin.ignored_modules = None  # they are the student's
    plugin.activation_checkpointing = False  # nothing is back-propagated through the teacher
    models = list(accelerator._models)
    state.fsdp_plugin = plugin
    try:
        if plugin.fsdp_version == 2:
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            teacher = fsdp2_prepare_model(accelerator, teacher)
            if plugin.reshard_after_forward is True:
                # Accelerate keeps the root's (and the output layer's) parameters gathered after forward, for the
                # backward that follows; the teacher has none, so they would stay gathered for good.
                teacher.set_reshard_after_forward(True)
                if hasattr(teacher, "reset_iter_state"):  # recent torch only (2.13 has it)
                    # FSDP2 records each forward's order for the backward that replays it and forgets it only
                    # after that backward: with none, the records would grow every step. Resetting also reshards,
                    # which is why it is done only where parameters are resharded after forward anyway.
                    teacher.register_forward_hook(lambda module, args, output: module.reset_iter_state())
        else:
            teacher = accelerator.prepare_model(teacher)
    finally:
        state.fsdp_plugin = run_plugin
        accelerator._models[:] = models
    teacher.eval()
    return teacher


__all__ = ["DistillationArguments", "DistillationTrainer", "load_teacher", "save_model_atomically"]
