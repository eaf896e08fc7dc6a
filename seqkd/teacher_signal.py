"""What a distillation step compares the student with: no teacher, a live teacher, a teacher cache, or generated
targets scored by a live teacher.

:class:`seqkd.trainer.DistillationTrainer` holds one :class:`TeacherSignal` and asks it two things per batch:

- :meth:`TeacherSignal.take`: the inputs of the student's forward pass, with what belongs to the signal taken out
  of the batch (a cache's stored top-k, a prompt) and, for generated targets, the batch's targets replaced by
  sequences the student (on-policy distillation, GKD) or the teacher (sequence-level KD) has just sampled;
- :meth:`TeacherSignal.logits`: the teacher's distributions over those targets (``None``, dense logits, or a
  :class:`seqkd.losses.SparseTeacher`).

The loss itself is always :func:`seqkd.losses.distillation_loss`: the signal decides *what* is scored, never how.
"""

from __future__ import annotations

import time

import torch

from seqkd.losses import SparseTeacher
from seqkd.teacher_cache import TEACHER_KEYS

PROMPT_KEY = "prompt_input_ids"  # causal prompt-completion batches: the prompts generation continues
SOURCES = ("gold", "student", "teacher")


class TeacherSignal:
    """No teacher: the student learns from the batch's own targets."""

    kind = "none"

    def take(self, inputs: dict, student) -> tuple[dict, dict]:
        """``(inputs for the student, what logits() needs)``; ``taken["source"]`` names whose targets they are."""
        inputs = dict(inputs)
        inputs.pop(PROMPT_KEY, None)
        return inputs, {"source": "gold"}

    def logits(self, inputs: dict, taken: dict, vocab_size: int, state=None):
        """``(teacher logits or None, the teacher's next recurrent state)``."""
        return None, None


class LiveTeacher(TeacherSignal):
    """A frozen teacher run on the same inputs as the student, without gradient."""

    kind = "live"

    def __init__(self, teacher):
        self.teacher = teacher

    def logits(self, inputs: dict, taken: dict, vocab_size: int, state=None):
        # no_grad rather than inference_mode: the latter measured no faster on CPU (bench_distill_step.py
        # --breakdown), and its tensors may not be saved for backward by a registered loss.
        with torch.no_grad():
            if state is not None:
                inputs = {**inputs, "state": state}
            outputs = self.teacher(**inputs)
        return outputs.logits, getattr(outputs, "state", None)


class CachedTeacher(TeacherSignal):
    """A teacher's stored top-k log-probabilities, carried in the batch by :class:`seqkd.teacher_cache.TeacherCache`."""

    kind = "cache"

    def __init__(self, tail: str = "uniform"):
        self.tail = tail

    def take(self, inputs: dict, student) -> tuple[dict, dict]:
        inputs, taken = super().take(inputs, student)
        taken.update({key: inputs.pop(key) for key in TEACHER_KEYS if key in inputs})
        return inputs, taken

    def logits(self, inputs: dict, taken: dict, vocab_size: int, state=None):
        teacher = SparseTeacher(
            taken["teacher_ids"], taken["teacher_logprobs"], vocab_size, taken["teacher_residual"], tail=self.tail
        )
        return teacher, None


class GeneratedTargets(TeacherSignal):
    """Targets generated during training and scored by a live teacher (Agarwal et al., ICLR 2024, GKD).

    For each batch, with probability ``lmbda`` the student samples the targets itself (on-policy); otherwise,
    with ``seq_kd``, the teacher samples them; otherwise the batch keeps its gold targets. Only the sequences a
    batch uses are generated. Sampling runs without gradient, in eval mode (no dropout), with the model's cache;
    its draws come from torch's global generator, which checkpoints save and resumes restore, so a resumed run
    samples what the uninterrupted one did. Tokens after a sample's first end-of-sequence token are ignored by the
    loss (the end-of-sequence token itself is a target).

    Encoder-decoders sample a target for each source (``input_ids``). Causal LMs continue the batch's prompts
    (``prompt_input_ids``, all of one length); the prompt's tokens are not targets.
    """

    kind = "generated"

    def __init__(self, scorer: LiveTeacher, *, lmbda: float, seq_kd: bool, generation_kwargs: dict, synced_gpus: bool = False):
        self.scorer = scorer
        self.lmbda = float(lmbda)
        self.seq_kd = bool(seq_kd)
        self.generation_kwargs = dict(generation_kwargs)
        self.synced_gpus = synced_gpus
        self.generation_seconds = 0.0
        self.batches = {source: 0 for source in SOURCES}

    def draw_source(self) -> str:
        """'student' with probability lmbda, else 'teacher' (seq_kd) or 'gold'. lmbda 0 and 1 draw nothing."""
        if self.lmbda >= 1.0:
            return "student"
        if self.lmbda > 0.0 and float(torch.rand(())) < self.lmbda:
            return "student"
        return "teacher" if self.seq_kd else "gold"

    def take(self, inputs: dict, student) -> tuple[dict, dict]:
        inputs = dict(inputs)
        prompts = inputs.pop(PROMPT_KEY, None)
        source = self.draw_source()
        self.batches[source] += 1
        if source == "gold":
            return inputs, {"source": source}
        # A DeepSpeed engine holds the teacher as .module; other wrappers are the model itself.
        generator = student if source == "student" else getattr(self.scorer.teacher, "module", self.scorer.teacher)
        encoder_decoder = bool(generator.config.is_encoder_decoder)
        if not encoder_decoder and prompts is None:
            raise ValueError(
                f"a causal language model's batch needs {PROMPT_KEY!r} to sample from (prompt-completion data, "
                "batching 'prompts')"
            )
        eos = generator.generation_config.eos_token_id
        pad = generator.generation_config.pad_token_id
        if pad is None:  # a word-level LM has no pad token; what follows the end of a sample is ignored anyway
            pad = eos[0] if isinstance(eos, (list, tuple)) else eos
        sampling = {**self.generation_kwargs, "pad_token_id": pad, "do_sample": True, "num_beams": 1,
                    "synced_gpus": self.synced_gpus}  # fmt: skip
        started = time.perf_counter()
        was_training = generator.training
        generator.eval()
        try:
            with torch.no_grad():
                if encoder_decoder:
                    sequences = generator.generate(
                        input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), **sampling
                    )
                else:
                    sequences = generator.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), **sampling)
        finally:
            generator.train(was_training)
        self.generation_seconds += time.perf_counter() - started
        if encoder_decoder:
            targets = sampled_seq2seq_targets(sequences, eos)
            inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask"), **targets}
            inputs = {key: value for key, value in inputs.items() if value is not None}
        else:
            inputs = sampled_causal_targets(sequences, prompts.shape[1], eos)
        return inputs, {"source": source}

    def logits(self, inputs: dict, taken: dict, vocab_size: int, state=None):
        return self.scorer.logits(inputs, taken, vocab_size, state)


def _after_first_eos(tokens: torch.Tensor, eos_token_id) -> torch.Tensor:
    """True at every position strictly after a row's first end-of-sequence token."""
    if eos_token_id is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    eos_ids = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device))
    return (is_eos.cumsum(dim=1) - is_eos.long()) > 0


def sampled_seq2seq_targets(sequences: torch.Tensor, eos_token_id) -> dict:
    """Decoder inputs and labels from an encoder-decoder's generated ``sequences`` (decoder start token first):
    the labels are the generated tokens, ignored (-100) after the first end-of-sequence token."""
    sequences = sequences.detach()
    labels = sequences[:, 1:].clone()
    labels[_after_first_eos(labels, eos_token_id)] = -100
    return {"decoder_input_ids": sequences[:, :-1].contiguous(), "labels": labels}


def sampled_causal_targets(sequences: torch.Tensor, prompt_length: int, eos_token_id) -> dict:
    """A causal LM's inputs from prompts and their generated continuations: the labels are the continuation's
    tokens up to its first end-of-sequence token (the prompt's and later ones ignored, and masked out)."""
    sequences = sequences.detach()
    after = torch.zeros_like(sequences, dtype=torch.bool)
    after[:, prompt_length:] = _after_first_eos(sequences[:, prompt_length:], eos_token_id)
    labels = sequences.clone()
    labels[:, :prompt_length] = -100
    labels[after] = -100
    return {"input_ids": sequences, "attention_mask": (~after).long(), "labels": labels}


__all__ = [
    "CachedTeacher",
    "GeneratedTargets",
    "LiveTeacher",
    "PROMPT_KEY",
    "TeacherSignal",
    "sampled_causal_targets",
    "sampled_seq2seq_targets",
]
