"""The trainer's fused-linear path: the loss from hidden states and LM heads trains as the logits path does."""

import pytest
import torch
from test_teacher_cache import corpus, lstm  # noqa: F401  (fixture and helper)
from transformers import default_data_collator

import seqkd.trainer as trainer_module
from seqkd.data.text import StreamBatches, group_texts
from seqkd.errors import InvalidValueError
from seqkd.models import LSTMForCausalLM, build_causal_lm, build_seq2seq, hidden_and_head
from seqkd.trainer import DistillationArguments, DistillationTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


def args(tmp_path, name, **overrides):
    defaults = dict(output_dir=str(tmp_path / name), report_to=[], disable_tqdm=True, use_cpu=True, save_strategy="no",
                    learning_rate=0.05, logging_steps=2, seed=0, per_device_train_batch_size=4, max_steps=6)  # fmt: skip
    return DistillationArguments(**{**defaults, **overrides})


def assert_same_training(fused, logits):
    for (key, a), b in zip(fused.model.state_dict().items(), logits.model.state_dict().values()):
        # Two code paths: the same sums in another order, amplified a little by six steps.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{key} differs")
    fused_losses = [e["loss"] for e in fused.state.log_history if "loss" in e]
    logits_losses = [e["loss"] for e in logits.state.log_history if "loss" in e]
    assert fused_losses == pytest.approx(logits_losses, rel=1e-4)


@pytest.mark.parametrize("loss", ["kd", "dkd", "ban"])
def test_lstm_streams_with_a_live_teacher_train_as_the_logits_path(corpus, tmp_path, loss):  # noqa: F811
    tokenizer, _, ids = corpus
    train = StreamBatches(ids[:1200], 4, 8)
    teacher = lstm(tokenizer, 1)

    def run(mode):
        trainer = DistillationTrainer(model=lstm(tokenizer, 2), teacher_model=teacher, train_dataset=train,
                                      args=args(tmp_path, mode, loss=loss, temperature=2.0, fused_linear=mode))  # fmt: skip
        trainer.train()
        return trainer

    assert_same_training(run("true"), run("false"))


def test_gpt2_blocks_from_a_teacher_cache_train_as_the_logits_path(corpus, tmp_path):  # noqa: F811
    from seqkd.teacher_cache import cache_teacher

    tokenizer, lines, _ = corpus
    blocks = group_texts(lines, tokenizer, 16)
    torch.manual_seed(1)
    teacher = build_causal_lm("gpt2-tiny", tokenizer=tokenizer)
    cache_teacher(teacher, blocks, str(tmp_path / "cache"), top_k=8, tokenizer=tokenizer, show_progress=False)

    def run(mode):
        torch.manual_seed(2)
        student = build_causal_lm("gpt2-tiny", tokenizer=tokenizer)
        trainer = DistillationTrainer(
            model=student, train_dataset=blocks, data_collator=default_data_collator, processing_class=tokenizer,
            args=args(tmp_path, mode, loss="kd", teacher_cache=str(tmp_path / "cache"), fused_linear=mode),
        )  # fmt: skip
        trainer.train()
        return trainer

    assert_same_training(run("true"), run("false"))


def test_marian_with_a_live_teacher_trains_as_the_logits_path(tmp_path):
    import datasets

    from seqkd.data.translation import tokenize_translation, train_translation_tokenizer, translation_collator

    words = "ein zwei drei vier fuenf sechs".split()
    pairs = datasets.Dataset.from_dict({"source": [" ".join(words[i % 6 : i % 6 + 3]) for i in range(48)],
                                        "target": [" ".join(words[i % 5 : i % 5 + 4]) for i in range(48)]})  # fmt: skip
    tokenizer = train_translation_tokenizer(pairs, 60, pretokenized=True)
    train = tokenize_translation(datasets.DatasetDict({"train": pairs}), tokenizer, max_source_length=16,
                                 max_target_length=16)["train"]  # fmt: skip
    torch.manual_seed(1)
    teacher = build_seq2seq("marian-tiny", tokenizer=tokenizer)
    with torch.no_grad():  # a non-zero bias, so that the fused path must add it
        teacher.final_logits_bias.normal_()

    def run(mode):
        torch.manual_seed(2)
        student = build_seq2seq("marian-tiny", tokenizer=tokenizer)
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, train_dataset=train, processing_class=tokenizer,
            data_collator=translation_collator(tokenizer, student),
            args=args(tmp_path, mode, loss="dkd", temperature=1.0, fused_linear=mode),
        )  # fmt: skip
        trainer.train()
        return trainer

    assert_same_training(run("true"), run("false"))


def test_hidden_and_head_reproduce_the_models_logits(corpus):  # noqa: F811
    tokenizer, _, ids = corpus
    model = lstm(tokenizer, 0).eval()
    inputs = {"input_ids": ids[:24].view(3, 8)}
    hidden, weight, bias, _ = hidden_and_head(model, inputs)
    torch.testing.assert_close(hidden @ weight.T + bias, model(**inputs).logits)
    assert isinstance(model.lm_head, torch.nn.Linear)  # the head is back in place


def test_auto_fuses_only_large_batches_and_true_refuses_what_it_cannot_fuse(corpus, tmp_path, monkeypatch):  # noqa: F811
    tokenizer, _, ids = corpus
    train = StreamBatches(ids[:1200], 4, 8)
    teacher = lstm(tokenizer, 1)
    calls = []
    real = trainer_module.DistillationTrainer._fused_loss

    def counting(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(trainer_module.DistillationTrainer, "_fused_loss", counting)
    DistillationTrainer(model=lstm(tokenizer, 2), teacher_model=teacher, train_dataset=train,
                        args=args(tmp_path, "small", loss="kd")).train()  # fmt: skip
    assert calls == []  # 32 tokens x a small vocabulary: the logits path
    monkeypatch.setattr(trainer_module, "_FUSED_MIN_ELEMENTS", 1)
    DistillationTrainer(model=lstm(tokenizer, 2), teacher_model=teacher, train_dataset=train,
                        args=args(tmp_path, "large", loss="kd")).train()  # fmt: skip
    assert len(calls) == 6

    class Unsupported(LSTMForCausalLM):
        pass

    from seqkd.models import supports_hidden_head

    monkeypatch.setattr("seqkd.models.supports_hidden_head", lambda model: not isinstance(model, Unsupported) and supports_hidden_head(model))
    torch.manual_seed(0)
    other = Unsupported(lstm(tokenizer, 3).config)
    with pytest.raises(InvalidValueError, match="fused_linear true takes the LM head apart.*Unsupported"):
        DistillationTrainer(model=other, teacher_model=teacher, train_dataset=train,
                            args=args(tmp_path, "true", loss="kd", fused_linear="true"))  # fmt: skip
    with pytest.raises(InvalidValueError, match="fused_linear must be one of"):
        args(tmp_path, "bad", fused_linear="yes")
