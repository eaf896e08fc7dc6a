"""DistillationTrainer: teacher handling, loss logging, accumulation, TBPTT state, resume, atomic checkpoints."""

import math
import os

import pytest
import torch
from conftest import cyclic_lines
from safetensors.torch import load_file

from seqkd.data.text import StreamBatches, encode_stream, group_texts, train_word_tokenizer
from seqkd.models import LSTMForCausalLM, LSTMLMConfig, build_causal_lm
from seqkd.trainer import DistillationArguments, DistillationTrainer



@pytest.fixture(scope="module")
def corpus():
    lines = cyclic_lines(300)
    tokenizer = train_word_tokenizer(lines)
    ids = encode_stream(tokenizer, lines)
    return tokenizer, lines, ids


def lstm(tokenizer, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return LSTMForCausalLM(
        LSTMLMConfig(
            vocab_size=len(tokenizer), embedding_size=24, hidden_size=24, num_layers=1,
            embedding_dropout=dropout, layer_dropout=0.0, output_dropout=dropout,
        )
    )  # fmt: skip


def make_args(tmp_path, name="run", **overrides):
    defaults = dict(
        output_dir=str(tmp_path / name), report_to=[], disable_tqdm=True, use_cpu=True, save_strategy="no",
        learning_rate=0.01, logging_steps=5, seed=0, per_device_train_batch_size=4,
    )  # fmt: skip
    defaults.update(overrides)
    return DistillationArguments(**defaults)


def streams(ids, batch_size=4, seq_len=8):
    return StreamBatches(ids[:1600], batch_size, seq_len), StreamBatches(ids[1600:], 2, 8)


def trained_teacher(corpus, tmp_path):
    tokenizer, _, ids = corpus
    train, valid = streams(ids)
    teacher = lstm(tokenizer, seed=1)
    DistillationTrainer(
        model=teacher, args=make_args(tmp_path, "teacher", loss="ce", num_train_epochs=2), train_dataset=train
    ).train()
    return teacher


def test_teacher_is_frozen_and_parts_are_logged(corpus, tmp_path):
    tokenizer, _, ids = corpus
    train, valid = streams(ids)
    teacher = trained_teacher(corpus, tmp_path)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = lstm(tokenizer, seed=2)
    trainer = DistillationTrainer(
        model=student, args=make_args(tmp_path, loss="dkd", max_steps=20, temperature=2.0),
        teacher_model=teacher, train_dataset=train, eval_dataset=valid,
    )  # fmt: skip
    trainer.train()
    assert not trainer.teacher.training
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in trainer.teacher.parameters()}
    for key, value in trainer.teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"teacher weight {key} changed"
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and all({"loss_ce", "loss_dkd", "loss_tckd", "loss_nckd"} <= set(entry) for entry in logs)
    last = logs[-1]
    assert last["loss_dkd"] == pytest.approx(1.0 * last["loss_tckd"] + 8.0 * last["loss_nckd"], abs=2e-3)
    metrics = trainer.evaluate()
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item())
    assert metrics["eval_tokens"] == valid.num_predicted_tokens


def test_distillation_lowers_the_kd_term(corpus, tmp_path):
    tokenizer, _, ids = corpus
    train, _ = streams(ids)
    teacher = trained_teacher(corpus, tmp_path)
    trainer = DistillationTrainer(
        model=lstm(tokenizer, seed=3), args=make_args(tmp_path, loss="kd", ce_weight=0.0, num_train_epochs=3),
        teacher_model=teacher, train_dataset=train,
    )  # fmt: skip
    trainer.train()
    kd = [entry["loss_kd"] for entry in trainer.state.log_history if "loss_kd" in entry]
    assert kd[-1] < 0.5 * kd[0]


def test_state_is_carried_between_steps_and_reset_each_epoch(corpus, tmp_path):
    tokenizer, _, ids = corpus
    train, _ = streams(ids)
    seen = []

    class Spy(DistillationTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen.append(None if self._student_state is None else self._student_state[0].clone())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    Spy(model=lstm(tokenizer), args=make_args(tmp_path, loss="ce", num_train_epochs=2), train_dataset=train).train()
    per_epoch = len(train)
    assert seen[0] is None and seen[per_epoch] is None  # fresh streams at each epoch
    assert all(state is not None for state in seen[1:per_epoch] + seen[per_epoch + 1 :])
    assert not seen[1].requires_grad


def test_gradient_accumulation_matches_one_big_batch(corpus, tmp_path):
    tokenizer, lines, _ = corpus
    blocks = group_texts(lines, tokenizer, 8)
    blocks = blocks.select(range(16))
    teacher = build_causal_lm("gpt2-tiny", tokenizer=tokenizer)

    def first_step_weights(batch_size, accumulation):
        torch.manual_seed(0)
        student = build_causal_lm("gpt2-tiny", tokenizer=tokenizer, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        args = make_args(
            tmp_path, f"ga{accumulation}", loss="kd", max_steps=1, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
        )  # fmt: skip
        trainer = DistillationTrainer(model=student, args=args, teacher_model=teacher, train_dataset=blocks)
        trainer.get_train_dataloader = lambda: torch.utils.data.DataLoader(
            blocks.with_format("torch"), batch_size=batch_size, shuffle=False
        )
        trainer.train()
        return {k: v.detach().clone() for k, v in student.state_dict().items()}

    # Make the blocks unequal in their number of targets, so a per-micro-batch mean would differ.
    lengths = [8] * 16
    blocks = blocks.map(lambda row, i: {"labels": row["labels"][: lengths[i] - (i % 4)] + [-100] * (i % 4)}, with_indices=True)
    one = first_step_weights(8, 1)
    two = first_step_weights(4, 2)
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-6)


def test_dkd_warmup_ramps_the_distillation_weight(corpus, tmp_path):
    tokenizer, _, ids = corpus
    train, _ = streams(ids)
    args = make_args(tmp_path, loss="dkd", distill_warmup_epochs=4, max_steps=1)
    trainer = DistillationTrainer(model=lstm(tokenizer), args=args, teacher_model=lstm(tokenizer), train_dataset=train)
    trainer.model.train()
    trainer.state.epoch = 1.0
    assert trainer._kd_weight_now() == pytest.approx(0.25)
    trainer.state.epoch = 6.0
    assert trainer._kd_weight_now() == pytest.approx(1.0)


def test_plateau_schedule_divides_the_learning_rate_when_validation_does_not_improve(corpus, tmp_path):
    from transformers import TrainerCallback

    tokenizer, _, ids = corpus
    train, valid = streams(ids)
    record = {"eval_loss": [], "lr": []}

    class Recorder(TrainerCallback):
        def on_epoch_begin(self, args, state, control, optimizer=None, **kwargs):
            record["lr"].append(optimizer.param_groups[0]["lr"])

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            record["eval_loss"].append(metrics["eval_loss"])

    # A learning rate far too high for SGD: validation loss goes up as often as down.
    args = make_args(
        tmp_path, loss="ce", num_train_epochs=6, optim="sgd", learning_rate=40.0, max_grad_norm=5.0,
        eval_strategy="epoch", lr_scheduler_type="reduce_lr_on_plateau",
        lr_scheduler_kwargs={"factor": 0.25, "patience": 0, "threshold": 0.0},
    )  # fmt: skip
    trainer = DistillationTrainer(model=lstm(tokenizer), args=args, train_dataset=train, eval_dataset=valid, callbacks=[Recorder()])
    trainer.train()
    best, decreases = float("inf"), 0
    for epoch, loss in enumerate(record["eval_loss"][:-1]):
        expected = record["lr"][epoch] * (1.0 if loss < best else 0.25)
        decreases += loss >= best
        assert record["lr"][epoch + 1] == pytest.approx(expected), (record, epoch)
        best = min(best, loss)
    assert decreases >= 1, record


# ---------------------------------------------------------------------------------------------------------
# Errors before any work.


def test_vocabulary_mismatch_is_refused(corpus, tmp_path):
    tokenizer, _, ids = corpus
    train, _ = streams(ids)
    bigger = LSTMForCausalLM(LSTMLMConfig(vocab_size=len(tokenizer) + 5, embedding_size=8, hidden_size=8, num_layers=1))
    with pytest.raises(ValueError, match=rf"teacher vocabulary size \({len(tokenizer) + 5}\) differs from the student's \({len(tokenizer)}\)"):
        DistillationTrainer(model=lstm(tokenizer), args=make_args(tmp_path), teacher_model=bigger, train_dataset=train)


def test_missing_teacher_is_refused(corpus, tmp_path):
    tokenizer, _, ids = corpus
    train, _ = streams(ids)
    with pytest.raises(ValueError, match="loss 'kd' needs a teacher"):
        DistillationTrainer(model=lstm(tokenizer), args=make_args(tmp_path, loss="kd"), train_dataset=train)
    args = make_args(tmp_path, loss="kd", teacher_model_name_or_path=str(tmp_path / "no-such-teacher"))
    with pytest.raises(FileNotFoundError, match="no-such-teacher.*does not exist"):
        DistillationTrainer(model=lstm(tokenizer), args=args, train_dataset=train)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"loss": "distil"}, "loss must be one of"),
        ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
        ({"ce_weight": -1.0}, "ce_weight must be a finite number >= 0, got -1.0"),
        ({"label_smoothing": 1.0}, r"must be in \[0, 1\), got 1.0"),
        ({"label_smoothing_factor": 0.1}, "set label_smoothing instead"),
        ({"divergence": "kl"}, "divergence must be one of"),
        ({"early_stopping_patience": -1}, r"early_stopping_patience must be >= 1 \(or 0 for no early stopping\), got -1"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_memory_is_pinned_only_for_an_accelerator(tmp_path):
    # transformers pins by default, and on a CPU-only machine the DataLoader then warns on every run.
    assert make_args(tmp_path).dataloader_pin_memory == torch.accelerator.is_available()
    assert make_args(tmp_path, use_cpu=True).dataloader_pin_memory is False


def test_stream_batches_for_another_process_layout_are_refused(corpus, tmp_path):
    tokenizer, _, ids = corpus
    train = StreamBatches(ids, 2, 8, process_index=1, num_processes=2)
    trainer = DistillationTrainer(model=lstm(tokenizer), args=make_args(tmp_path, loss="ce"), train_dataset=train)
    with pytest.raises(ValueError, match="built for process 1 of 2, but this is process 0 of 1"):
        trainer.get_train_dataloader()


# ---------------------------------------------------------------------------------------------------------
# Resume and checkpoints.


class StopAt:
    """A callback that kills the run (raises) once ``global_step`` reaches ``step``."""

    def __init__(self, step):
        from transformers import TrainerCallback

        outer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == outer.step:
                    raise KeyboardInterrupt("killed")

        self.step = step
        self.callback = _Callback()


def test_resume_after_kill_ends_where_an_uninterrupted_run_ends(corpus, tmp_path):
    tokenizer, _, ids = corpus
    train, valid = streams(ids)  # 25 batches per epoch: the kill and the resume fall mid-epoch
    teacher = trained_teacher(corpus, tmp_path)

    def run(name, callbacks=(), resume=None):
        model = lstm(tokenizer, seed=5, dropout=0.2)  # dropout: the RNG state must be restored too
        args = make_args(tmp_path, name, loss="ban", max_steps=40, save_strategy="steps", save_steps=15)
        trainer = DistillationTrainer(
            model=model, args=args, teacher_model=teacher, train_dataset=train, eval_dataset=valid,
            callbacks=list(callbacks),
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run("full")
    with pytest.raises(KeyboardInterrupt):
        run("killed", callbacks=[StopAt(20).callback])
    assert sorted(os.listdir(tmp_path / "killed")) == ["checkpoint-15"]
    state = load_file(tmp_path / "killed" / "checkpoint-15" / "stream_state-rank0.safetensors")
    assert {"student.0", "student.1", "teacher.0", "teacher.1"} <= set(state)
    resumed = run("killed", resume=True)
    for (key, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=f"{key} differs after resuming")
    assert resumed.evaluate()["eval_loss"] == pytest.approx(full.evaluate()["eval_loss"], rel=1e-6)


def test_interrupted_checkpoint_save_leaves_nothing_to_resume_from(corpus, tmp_path, monkeypatch):
    tokenizer, _, ids = corpus
    train, _ = streams(ids)
    args = make_args(tmp_path, loss="ce", max_steps=10, save_strategy="steps", save_steps=5)
    trainer = DistillationTrainer(model=lstm(tokenizer), args=args, train_dataset=train)
    original = trainer._save_optimizer_and_scheduler
    calls = []

    def dies_on_second_save(output_dir):
        calls.append(output_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while writing the checkpoint")
        original(output_dir)

    monkeypatch.setattr(trainer, "_save_optimizer_and_scheduler", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    from transformers.trainer_utils import get_last_checkpoint

    assert get_last_checkpoint(args.output_dir).endswith("checkpoint-5")
    assert not os.path.exists(os.path.join(args.output_dir, "checkpoint-10"))


def test_bf16_on_a_cpu_machine_trains_under_cpu_autocast(corpus, tmp_path):
    # `bf16: true` alone (no use_cpu) is accepted on a machine without a GPU and means CPU autocast: the models'
    # matrix products run in bfloat16, the loss in float32.
    tokenizer, _, ids = corpus
    train, _ = streams(ids)
    teacher = lstm(tokenizer, seed=1)
    args = DistillationArguments(output_dir=str(tmp_path / "bf16"), report_to=[], disable_tqdm=True, save_strategy="no",
                                 learning_rate=0.01, logging_steps=2, seed=0, loss="kd", bf16=True, max_steps=4)  # fmt: skip
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: bf16 there is the GPU's")
    assert args.use_cpu and args.bf16
    student = lstm(tokenizer)
    dtypes = []
    # Accelerate returns the model's outputs in float32; the output layer inside computes in bfloat16.
    student.get_output_embeddings().register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    trainer = DistillationTrainer(model=student, args=args, teacher_model=teacher, train_dataset=train)
    trainer.train()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(math.isfinite(v) for v in losses)
    assert next(student.parameters()).dtype == torch.float32  # autocast, not a bf16 model


@pytest.mark.parametrize("bf16, block, math_kernel", [(True, 8, True), (True, 160, False), (False, 8, False)])
def test_bf16_on_cpu_runs_short_batches_through_the_math_attention_kernel(corpus, tmp_path, bf16, block, math_kernel):
    # bf16 flash attention's backward on CPU is several times slower than the math kernel for short sequences, and
    # faster for long ones: a bf16 step on CPU picks the math kernel for batches up to 128 positions.
    from torch.profiler import ProfilerActivity, profile

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: bf16 there is the GPU's")
    tokenizer, lines, _ = corpus
    blocks = group_texts(lines * 40, tokenizer, block).select(range(4))
    student = build_causal_lm("gpt2-tiny", tokenizer=tokenizer, n_positions=256)
    args = DistillationArguments(output_dir=str(tmp_path / "sdpa"), report_to=[], disable_tqdm=True, save_strategy="no",
                                 learning_rate=0.01, seed=0, loss="ce", bf16=bf16, use_cpu=True, max_steps=1,
                                 per_device_train_batch_size=4)  # fmt: skip
    trainer = DistillationTrainer(model=student, args=args, train_dataset=blocks)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train()
    ops = {event.key for event in prof.key_averages()}
    flash = any("flash_attention" in op for op in ops)
    assert any("scaled_dot_product" in op for op in ops), sorted(ops)  # the model does attend through SDPA
    assert flash != math_kernel, sorted(op for op in ops if "attention" in op)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_bf16_instructions_warns_that_it_emulates(native, tmp_path, monkeypatch, caplog):
    # On a CPU with neither avx512_bf16 nor AMX, autocast emulates bf16: the user hears it may be slower.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    with caplog.at_level("WARNING", logger="seqkd"):
        args = DistillationArguments(output_dir=str(tmp_path), report_to=[], bf16=True, use_cpu=True, loss="ce")
    assert args.bf16
    assert ("without bf16 instructions" in caplog.text) is not native
