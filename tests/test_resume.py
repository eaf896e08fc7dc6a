"""Resuming a killed run ends bit-identical to the run that was never interrupted.

Kills at an epoch boundary, in the middle of an epoch and during evaluation; stream data (an LSTM carrying its
TBPTT state from step to step) and block data (GPT-2 on shuffled blocks); trained on the labels alone, from a live
teacher and from a teacher cache. All runs of a case are made in this process, with the same thread settings.
"""

import os
import re

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import corpus, lstm, make_args  # noqa: F401  (corpus: a fixture)
from transformers import TrainerCallback, default_data_collator
from transformers.trainer_utils import get_last_checkpoint

from seqkd.data.text import StreamBatches, group_texts
from seqkd.errors import MissingInputError
from seqkd.models import build_causal_lm
from seqkd.teacher_cache import cache_teacher
from seqkd.trainer import DistillationTrainer

EPOCH = 8  # optimizer steps per epoch, for stream and block data alike; every run is two epochs


class Kill(TrainerCallback):
    """Kills the run (raises KeyboardInterrupt) at ``event`` once ``global_step`` is ``step``."""

    def __init__(self, event: str, step: int):
        self.event, self.step = event, step

    def _maybe_kill(self, event, state):
        if event == self.event and state.global_step == self.step:
            raise KeyboardInterrupt(f"killed at {event}, step {state.global_step}")

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._maybe_kill("epoch_begin", state)

    def on_step_end(self, args, state, control, **kwargs):
        self._maybe_kill("step_end", state)

    def on_evaluate(self, args, state, control, **kwargs):
        self._maybe_kill("evaluate", state)


# kill point: (checkpoint and evaluation schedule, Kill(...) arguments, the checkpoint left to resume from)
KILL_POINTS = {
    # Killed as the second epoch begins: the end-of-epoch evaluation ran, then the checkpoint was written.
    "epoch_boundary": (dict(save_strategy="epoch", eval_strategy="epoch"), ("epoch_begin", EPOCH), EPOCH),
    # Killed in the second epoch, one step after a checkpoint taken half-way through it.
    "mid_epoch": (dict(save_strategy="steps", save_steps=3), ("step_end", 13), 12),
    # Killed as the evaluation at step 6 ends, before that step's checkpoint: the resumed run redoes steps 4 to 6
    # and crosses the epoch boundary itself.
    "evaluation": (dict(save_strategy="steps", save_steps=3, eval_strategy="steps", eval_steps=3), ("evaluate", 6), 3),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setups(corpus, tmp_path_factory):  # noqa: F811
    """``setup(data)``: the data, student, teacher and teacher cache for one kind of data, built once."""
    tokenizer, lines, ids = corpus
    built = {}

    def setup(data):
        if data in built:
            return built[data]
        if data == "stream":
            train = StreamBatches(ids[: 4 * (EPOCH * 8 + 1)], 4, 8)
            valid = StreamBatches(ids[1600:1700], 2, 8)

            def student():
                return lstm(tokenizer, seed=5, dropout=0.2)  # dropout: the RNG must be restored too

            teacher = lstm(tokenizer, seed=1)
        else:
            blocks = group_texts(lines, tokenizer, 8)
            train, valid = blocks.select(range(4 * EPOCH)), blocks.select(range(200, 216))

            def student():
                torch.manual_seed(5)
                dropout = dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)  # the RNG must be restored too
                return build_causal_lm("gpt2-tiny", tokenizer=tokenizer, **dropout)

            torch.manual_seed(1)
            teacher = build_causal_lm("gpt2-tiny", tokenizer=tokenizer)
        assert len(train) == EPOCH * (1 if data == "stream" else 4)
        cache = str(tmp_path_factory.mktemp(f"{data}-cache"))
        cache_teacher(teacher, train, cache, top_k=6, tokenizer=tokenizer, show_progress=False)
        built[data] = dict(tokenizer=tokenizer, train=train, valid=valid, student=student, teacher=teacher, cache=cache)
        return built[data]

    return setup


@pytest.mark.parametrize(
    "data, teacher, kill_point",
    [
        ("stream", "none", "epoch_boundary"),
        ("stream", "live", "epoch_boundary"),
        ("stream", "live", "mid_epoch"),
        ("stream", "cache", "evaluation"),
        ("block", "cache", "epoch_boundary"),
        ("block", "none", "mid_epoch"),
        ("block", "live", "evaluation"),
    ],
)
def test_resumed_run_ends_bit_identical_to_the_uninterrupted_one(setups, tmp_path, data, teacher, kill_point):
    setup = setups(data)
    schedule, (event, step), checkpoint = KILL_POINTS[kill_point]
    loss = {"none": "ce", "live": "kd", "cache": "kd"}[teacher]

    def run(name, callbacks=(), resume=None):
        args = make_args(
            tmp_path, name, loss=loss, num_train_epochs=2, per_device_eval_batch_size=4, logging_steps=3,
            teacher_cache=setup["cache"] if teacher == "cache" else None, **schedule,
        )  # fmt: skip
        trainer = DistillationTrainer(
            model=setup["student"](), args=args, teacher_model=setup["teacher"] if teacher == "live" else None,
            train_dataset=setup["train"], eval_dataset=setup["valid"], processing_class=setup["tokenizer"],
            data_collator=default_data_collator if data == "block" else None, callbacks=list(callbacks),
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run("full")
    with pytest.raises(KeyboardInterrupt):
        run("killed", callbacks=[Kill(event, step)])
    last = get_last_checkpoint(str(tmp_path / "killed"))
    assert os.path.basename(last) == f"checkpoint-{checkpoint}"
    if data == "stream":  # the checkpoint holds the streams' states, even at the end of an epoch
        owners = {"student"} | ({"teacher"} if teacher == "live" else set())
        stored = load_file(os.path.join(last, "stream_state-rank0.safetensors"))
        assert {f"{owner}.{i}" for owner in owners for i in (0, 1)} <= set(stored)
    resumed = run("killed", resume=True)
    assert resumed.state.global_step == full.state.global_step == 2 * EPOCH
    expected = full.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), f"{name} differs after resuming"


def test_a_checkpoint_without_the_stream_state_is_refused_before_training(corpus, tmp_path):  # noqa: F811
    tokenizer, _, ids = corpus
    train = StreamBatches(ids[:400], 4, 8)
    steps = []

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    def trainer():
        args = make_args(tmp_path, "run", loss="ce", max_steps=4, save_strategy="steps", save_steps=2)
        return DistillationTrainer(model=lstm(tokenizer), args=args, train_dataset=train, callbacks=[Record()])

    trainer().train()
    checkpoint = tmp_path / "run" / "checkpoint-4"
    os.remove(checkpoint / "stream_state-rank0.safetensors")
    steps.clear()
    message = rf"checkpoint {re.escape(str(checkpoint))} lacks stream_state-rank0\.safetensors.*as many processes.*start afresh"
    with pytest.raises(MissingInputError, match=message):
        trainer().train(resume_from_checkpoint=True)
    assert steps == []


@pytest.mark.parametrize("family", ["gpt2", "marian", "lstm", "lstm-seq2seq"])
def test_a_tied_model_resumes_warning_only_about_keys_really_missing(corpus, tmp_path, monkeypatch, family):  # noqa
    # Tied embeddings are saved once; transformers' Trainer called the other copies missing on every resume and
    # every best-model reload, which hid a real missing key among false ones.
    import transformers.trainer
    from safetensors.torch import save_file
    from test_lstm_seq2seq import make_model as lstm_seq2seq

    from seqkd.models import build_seq2seq

    tokenizer = corpus[0]

    def build(seed):
        torch.manual_seed(seed)
        if family == "gpt2":
            return build_causal_lm("gpt2-tiny", tokenizer=tokenizer)
        if family == "marian":  # the corpus has no bos or pad token to start the decoder from
            return build_seq2seq("marian-tiny", tokenizer=tokenizer, decoder_start_token_id=0)
        if family == "lstm":
            return lstm(tokenizer, seed)
        return lstm_seq2seq(seed).train()  # tied and shared by default

    saved = build(0)
    checkpoint = tmp_path / "checkpoint-1"
    saved.save_pretrained(checkpoint)
    warnings = []
    monkeypatch.setattr(transformers.trainer.logger, "warning", lambda message, *a, **k: warnings.append(message))

    trainer = DistillationTrainer(model=build(1), args=make_args(tmp_path, loss="ce"))
    trainer._load_from_checkpoint(str(checkpoint))
    assert warnings == []
    for name, value in trainer.model.state_dict().items():  # every copy, tied or not, holds the saved weights
        assert torch.equal(value, saved.state_dict()[name]), name

    weights = load_file(checkpoint / "model.safetensors")
    lost = next(k for k in weights if "embed" not in k and "wte" not in k and "shared" not in k)
    save_file({k: v for k, v in weights.items() if k != lost}, checkpoint / "model.safetensors", {"format": "pt"})
    trainer._load_from_checkpoint(str(checkpoint))
    assert len(warnings) == 1 and repr([lost]) in warnings[0]
