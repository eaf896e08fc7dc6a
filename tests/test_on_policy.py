"""On-policy distillation (GKD): the student's own samples scored by the teacher, for causal LMs and seq2seq."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import cyclic_lines
from test_trainer import StopAt
from test_translation_cli import parallel_dir, recipe  # noqa: F401  (fixtures)

from seqkd.cli import main
from seqkd.data.text import PromptCompletionCollator, prompt_completions, train_word_tokenizer
from seqkd.errors import InvalidValueError
from seqkd.losses import kd_loss
from seqkd.models import LSTMForCausalLM, LSTMLMConfig, build_seq2seq
from seqkd.teacher_signal import GeneratedTargets, sampled_causal_targets, sampled_seq2seq_targets
from seqkd.trainer import DistillationArguments, DistillationTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT_LENGTH = 2


@pytest.fixture(scope="module")
def lm_data():
    lines = cyclic_lines(120)
    tokenizer = train_word_tokenizer(lines)
    dataset = prompt_completions(lines, tokenizer, PROMPT_LENGTH)
    return tokenizer, dataset, PromptCompletionCollator(tokenizer.eos_token_id)


def lstm(tokenizer, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return LSTMForCausalLM(
        LSTMLMConfig(
            vocab_size=len(tokenizer), embedding_size=24, hidden_size=24, num_layers=1, eos_token_id=tokenizer.eos_token_id,
            embedding_dropout=dropout, layer_dropout=0.0, output_dropout=dropout,
        )
    )  # fmt: skip


def make_args(tmp_path, name="run", **overrides):
    defaults = dict(
        output_dir=str(tmp_path / name), report_to=[], disable_tqdm=True, use_cpu=True, save_strategy="no",
        learning_rate=0.01, logging_steps=2, seed=0, per_device_train_batch_size=8, loss="kd", divergence="jsd",
        jsd_beta=0.5, ce_weight=0.0, gkd_max_new_tokens=6, remove_unused_columns=False,
    )  # fmt: skip
    defaults.update(overrides)
    return DistillationArguments(**defaults)


def lm_trainer(lm_data, tmp_path, name="run", student_dropout=0.2, callbacks=(), **overrides):
    tokenizer, dataset, collator = lm_data
    student, teacher = lstm(tokenizer, seed=0, dropout=student_dropout), lstm(tokenizer, seed=1)
    return DistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(tmp_path, name, **overrides), train_dataset=dataset,
        data_collator=collator, callbacks=list(callbacks),
    )  # fmt: skip


def trl_generalised_jsd(student_logits, teacher_logits, beta):
    """TRL's GKDTrainer.generalized_jsd_loss per token, in float64, written from its definition."""
    s, t = F.log_softmax(student_logits.double(), -1), F.log_softmax(teacher_logits.double(), -1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)  # KL(teacher || student)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)  # KL(student || teacher)
    m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), 0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_beta_follows_gkd_and_trl(beta):
    # beta = 0 is forward KL(teacher || student), beta = 1 reverse KL(student || teacher), between them the
    # generalised JSD with the teacher's weight beta in the mixture.
    torch.manual_seed(0)
    student, teacher = torch.randn(12, 17), torch.randn(12, 17)
    ours = kd_loss(student, teacher, divergence="jsd", jsd_beta=beta, reduction="none").loss
    torch.testing.assert_close(ours.double(), trl_generalised_jsd(student, teacher, beta), rtol=1e-5, atol=1e-6)


def test_sampled_targets_ignore_what_follows_the_first_eos():
    eos, pad = 2, 0
    # encoder-decoder: decoder start token, then the sample; the eos itself stays a target
    sequences = torch.tensor([[pad, 5, 6, eos, pad, pad], [pad, 7, eos, 8, eos, pad], [pad, 5, 6, 7, 8, 9]])
    targets = sampled_seq2seq_targets(sequences, eos)
    assert targets["decoder_input_ids"].tolist() == sequences[:, :-1].tolist()
    assert targets["labels"].tolist() == [[5, 6, eos, -100, -100], [7, eos, -100, -100, -100], [5, 6, 7, 8, 9]]
    # causal LM: the prompt (3 tokens) is no target, nor anything after the continuation's first eos (here eos
    # also pads, as for GPT-2 and the word-level LSTM)
    sequences = torch.tensor([[eos, 4, 4, 5, eos, eos], [eos, 4, 6, 7, 8, 9]])
    targets = sampled_causal_targets(sequences, 3, eos)
    assert targets["labels"].tolist() == [[-100, -100, -100, 5, eos, -100], [-100, -100, -100, 7, 8, 9]]
    assert targets["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6]


def test_prompt_completion_data():
    lines = ["a b c d", "a b", "a"]  # the last line is shorter than the prompt: left out
    tokenizer = train_word_tokenizer(lines)
    dataset = prompt_completions(lines, tokenizer, 2)
    assert len(dataset) == 2
    eos = tokenizer.eos_token_id
    ids = lambda words: tokenizer(words, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert dataset[0]["input_ids"] == [eos, *ids("a b c d"), eos]
    assert dataset[0]["prompt_input_ids"] == [eos, *ids("a b")]
    assert dataset[0]["labels"] == [-100, -100, -100, *ids("c d"), eos]
    assert dataset[1]["labels"] == [-100, -100, -100, eos]  # a line of prompt_length tokens: only its eos is predicted
    batch = PromptCompletionCollator(eos)([dataset[0], dataset[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 6)
    assert batch["labels"][1].tolist() == [-100, -100, -100, eos, -100, -100]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0]
    with pytest.raises(InvalidValueError, match="prompt_length=9"):
        prompt_completions(lines, tokenizer, 9)


def test_on_policy_loss_is_the_generalised_jsd_on_the_students_samples_and_only_the_logits_get_gradient(lm_data, tmp_path):
    # Dropout off, so that the trainer's forward pass and the reference's see the same logits.
    trainer = lm_trainer(lm_data, tmp_path, lmbda=1.0, student_dropout=0.0)
    student, teacher = trainer.model, trainer.teacher
    seen = {}
    generate = student.generate

    def recording_generate(*args, **kwargs):
        seen["grad_enabled"], seen["training"] = torch.is_grad_enabled(), student.training
        return generate(*args, **kwargs)

    student.generate = recording_generate
    take = trainer.teacher_signal.take

    def recording_take(inputs, model):
        taken_inputs, taken = take(inputs, model)
        seen["taken"] = (dict(taken_inputs), taken)  # a copy: compute_loss pops the labels from its own
        return taken_inputs, taken

    trainer.teacher_signal.take = recording_take
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    student.train()
    trainer.current_gradient_accumulation_steps = 1  # set by train(); this test calls compute_loss directly
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    # sampled without gradient and without dropout, then trained on in training mode again
    assert seen["grad_enabled"] is False and seen["training"] is False and student.training
    inputs, taken = seen["taken"]
    assert taken["source"] == "student"
    assert torch.equal(inputs["input_ids"][:, : PROMPT_LENGTH + 1], batch["prompt_input_ids"])  # the prompts continued
    assert (inputs["labels"][:, : PROMPT_LENGTH + 1] == -100).all()
    assert not torch.equal(inputs["input_ids"][:, PROMPT_LENGTH + 1 :], batch["input_ids"][:, PROMPT_LENGTH + 1 : inputs["input_ids"].shape[1]])
    grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()

    # The reference: the same samples, held fixed, scored in float64 by TRL's formula.
    logits = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.double()
    with torch.no_grad():
        teacher_logits = teacher(input_ids=inputs["input_ids"]).logits
    valid = F.pad(inputs["labels"][:, 1:], (0, 1), value=-100) != -100
    reference = trl_generalised_jsd(logits, teacher_logits, 0.5)[valid].mean()
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-7)
    reference.backward()
    for ours, p in zip(grads, student.parameters()):
        torch.testing.assert_close(ours, p.grad.float(), rtol=1e-4, atol=1e-6)


def test_lmbda_zero_is_supervised_kd_step_for_step(lm_data, tmp_path):
    def final_weights(name, **overrides):
        trainer = lm_trainer(lm_data, tmp_path, name, max_steps=6, **overrides)
        trainer.train()
        return trainer

    supervised = final_weights("supervised")
    gkd_off = final_weights("gkd-off", lmbda=0.0, seq_kd=False, gkd_temperature=0.5, gkd_top_k=3)
    assert supervised.teacher_signal.kind == gkd_off.teacher_signal.kind == "live"
    # Two trainers, two sets of allocations: on CPUs whose BLAS depends on alignment the last bits may differ.
    for a, b in zip(supervised.model.state_dict().values(), gkd_off.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_generation_is_logged_and_only_the_used_samples_are_generated(lm_data, tmp_path):
    trainer = lm_trainer(lm_data, tmp_path, lmbda=0.5, seq_kd=True, max_steps=8, logging_steps=4)
    calls = {"student": 0, "teacher": 0}
    for name, model in (("student", trainer.model), ("teacher", trainer.teacher)):
        generate = model.generate

        def counting(*args, _name=name, _generate=generate, **kwargs):
            calls[_name] += 1
            return _generate(*args, **kwargs)

        model.generate = counting
    trainer.train()
    signal = trainer.teacher_signal
    assert isinstance(signal, GeneratedTargets)
    # each batch is generated once, by whoever's targets it uses: no teacher sample is thrown away
    assert calls == {"student": signal.batches["student"], "teacher": signal.batches["teacher"]}
    assert calls["student"] + calls["teacher"] == 8 and signal.batches["gold"] == 0
    assert 0 < calls["student"] < 8
    logged = [entry for entry in trainer.state.log_history if "generation_share" in entry]
    assert len(logged) == 2 and all(0 < entry["generation_share"] < 1 for entry in logged)
    # Each log covers its own window of 4 batches; the run's summary covers all 8.
    assert sum(entry["on_policy_fraction"] * 4 for entry in logged) == calls["student"]
    assert trainer.generation_summary()["on_policy_fraction"] == calls["student"] / 8
    assert 0 < trainer.generation_summary()["generation_share"] < 1


def test_resumed_on_policy_run_ends_where_an_uninterrupted_one_does(lm_data, tmp_path):
    def run(name, callbacks=(), resume=None):
        trainer = lm_trainer(lm_data, tmp_path, name, callbacks=callbacks, lmbda=0.5, max_steps=12,
                             save_strategy="steps", save_steps=5)  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run("full")
    with pytest.raises(KeyboardInterrupt):
        run("killed", callbacks=[StopAt(7).callback])
    assert sorted(os.listdir(tmp_path / "killed")) == ["checkpoint-5"]
    resumed = run("killed", resume=True)
    assert full.teacher_signal.batches["student"] > 0 and full.teacher_signal.batches["gold"] > 0  # both kinds drawn
    for (key, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), f"{key} differs after resuming"


@pytest.mark.parametrize(
    "overrides, message",
    [
        pytest.param({"lmbda": 1.5}, "lmbda must be in \\[0, 1\\]", id="lmbda-above-one"),
        pytest.param({"lmbda": -0.1}, "lmbda must be in \\[0, 1\\]", id="lmbda-negative"),
        pytest.param({"lmbda": 0.5, "jsd_beta": 1.2}, "jsd_beta must be in \\[0, 1\\]", id="beta-above-one"),
        pytest.param({"lmbda": 0.5, "gkd_max_new_tokens": 0}, "gkd_max_new_tokens must be >= 1", id="no-new-tokens"),
        pytest.param({"lmbda": 0.5, "gkd_temperature": 0.0}, "gkd_temperature must be > 0", id="zero-temperature"),
        pytest.param({"lmbda": 0.5, "gkd_top_p": 0.0}, "gkd_top_p must be in \\(0, 1\\]", id="zero-top-p"),
        pytest.param({"lmbda": 0.5, "loss": "ce"}, "need a teacher to score", id="no-teacher"),
        pytest.param({"seq_kd": True, "teacher_cache": "cache"}, "teacher cache", id="teacher-cache"),
    ],
)
def test_bad_on_policy_arguments_are_refused(tmp_path, overrides, message):
    with pytest.raises(InvalidValueError, match=message):
        make_args(tmp_path, **overrides)


def test_a_teacher_of_another_vocabulary_is_refused(lm_data, tmp_path):
    tokenizer, dataset, collator = lm_data
    other = train_word_tokenizer(cyclic_lines(120) + ["zebra quagga"])
    with pytest.raises(InvalidValueError, match="vocabulary size"):
        DistillationTrainer(model=lstm(tokenizer), teacher_model=lstm(other), args=make_args(tmp_path, lmbda=1.0),
                            train_dataset=dataset, data_collator=collator)  # fmt: skip


def test_on_policy_refuses_truncated_bptt_streams(lm_data, tmp_path):
    from seqkd.data.text import StreamBatches, encode_stream

    tokenizer, _, _ = lm_data
    streams = StreamBatches(encode_stream(tokenizer, cyclic_lines(60)), 4, 8)
    with pytest.raises(InvalidValueError, match="batching 'prompts'"):
        DistillationTrainer(model=lstm(tokenizer), teacher_model=lstm(tokenizer, seed=1),
                            args=make_args(tmp_path, lmbda=0.5), train_dataset=streams)  # fmt: skip


def seq2seq(name, tokenizer):
    if name == "lstm-seq2seq":  # seqkd's attentional LSTM: generate carries its decoder state
        from seqkd.models import LSTMForConditionalGeneration, LSTMSeq2SeqConfig

        ids = {k: getattr(tokenizer, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
        config = LSTMSeq2SeqConfig(vocab_size=len(tokenizer), decoder_start_token_id=ids["bos_token_id"], **ids,
                                   embedding_size=16, hidden_size=16)  # fmt: skip
        return LSTMForConditionalGeneration(config)
    return build_seq2seq(name, tokenizer=tokenizer)


@pytest.mark.parametrize("model", ["marian-tiny", "lstm-seq2seq"])
def test_encoder_decoder_students_sample_their_own_targets(parallel_dir, tmp_path, model):  # noqa: F811
    import datasets

    from seqkd.data.translation import read_lines, train_translation_tokenizer

    pairs = datasets.Dataset.from_dict({"source": read_lines(parallel_dir / "train.de"), "target": read_lines(parallel_dir / "train.en")})
    tokenizer = train_translation_tokenizer(pairs, 100, pretokenized=True)
    torch.manual_seed(0)
    student, teacher = seq2seq(model, tokenizer), seq2seq(model, tokenizer)
    sources = tokenizer(list(pairs["source"][:4]), padding=True, return_tensors="pt")
    labels = tokenizer(text_target=list(pairs["target"][:4]), padding=True, return_tensors="pt")["input_ids"]
    batch = {**sources, "labels": labels.masked_fill(labels == tokenizer.pad_token_id, -100)}
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=[batch],
                                  args=make_args(tmp_path, lmbda=1.0, loss="dkd", temperature=1.0))  # fmt: skip
    inputs, taken = trainer.teacher_signal.take(batch, student)
    assert taken["source"] == "student" and torch.equal(inputs["input_ids"], batch["input_ids"])
    assert (inputs["decoder_input_ids"][:, 0] == student.config.decoder_start_token_id).all()
    assert inputs["labels"].shape[1] <= 6  # gkd_max_new_tokens
    eos = student.generation_config.eos_token_id
    for row in inputs["labels"].tolist():
        if eos in row:
            assert all(token == -100 for token in row[row.index(eos) + 1 :])
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(student, batch)
    assert torch.isfinite(loss) and loss.requires_grad


def test_on_policy_translation_from_the_command_line(recipe, tmp_path):  # noqa: F811
    main(["train", str(recipe), "--num_train_epochs", "2", "--output_dir", str(tmp_path / "teacher")])
    main(["distill", str(recipe), "--teacher_model_name_or_path", str(tmp_path / "teacher" / "model"), "--num_train_epochs", "1",
          "--loss", "kd", "--divergence", "jsd", "--jsd_beta", "0.5", "--ce_weight", "0", "--lmbda", "0.5",
          "--gkd_max_new_tokens", "12", "--output_dir", str(tmp_path / "student")])  # fmt: skip
    metrics = json.loads((tmp_path / "student" / "model" / "metrics.json").read_text())
    assert math.isfinite(metrics["test_perplexity"]) and 0 <= metrics["test_bleu"] <= 100
    # The whole run's generation figures, as the logs give them per window.
    assert 0 < metrics["generation_share"] < 1 and 0 <= metrics["on_policy_fraction"] <= 1


def test_on_policy_language_model_from_the_command_line(cyclic_corpus_dir, tmp_path, capsys):
    recipe = ["--dataset", str(cyclic_corpus_dir), "--model", "lstm", "--model_config",
              json.dumps({"embedding_size": 16, "hidden_size": 16, "num_layers": 1}), "--max_steps", "6",
              "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4", "--save_strategy", "no",
              "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--seq_len", "8"]  # fmt: skip
    main(["train", *recipe, "--loss", "ce", "--output_dir", str(tmp_path / "teacher")])
    main(["distill", *recipe, "--teacher_model_name_or_path", str(tmp_path / "teacher" / "model"), "--batching", "prompts",
          "--prompt_length", "3", "--lmbda", "0.5", "--loss", "kd", "--divergence", "jsd", "--jsd_beta", "0.5",
          "--ce_weight", "0", "--gkd_max_new_tokens", "8", "--logging_steps", "3", "--output_dir", str(tmp_path / "student")])  # fmt: skip
    metrics = json.loads((tmp_path / "student" / "model" / "metrics.json").read_text())
    assert math.isfinite(metrics["validation_perplexity"]) and metrics["validation_perplexity"] < 20


def test_prompt_completion_data_has_no_teacher_cache(lm_data, tmp_path):
    from seqkd.teacher_cache import cache_teacher

    tokenizer, dataset, _ = lm_data
    with pytest.raises(InvalidValueError, match="prompt-completion data .* has no teacher cache"):
        cache_teacher(lstm(tokenizer), dataset, str(tmp_path / "cache"), top_k=4, show_progress=False)
    assert not (tmp_path / "cache").exists()
