"""Tests of seqkd.models.lstm_seq2seq: config validation, padding invariance, losses, save/load, generate, learning."""

import itertools
import random

import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForSeq2SeqLM

import seqkd  # noqa: F401  (registers the Auto classes)
from seqkd.evaluation import is_stateful
from seqkd.models import (
    LSTMForConditionalGeneration,
    LSTMSeq2SeqConfig,
    LSTMSeq2SeqEncoderOutput,
    LSTMSeq2SeqGenerationState,
    LSTMSeq2SeqLMOutput,
    realign_weights,
)

VOCAB = 12
PAD, BOS, EOS = 0, 1, 2

# Architectures covered by the parametrised tests (on top of small_config's defaults).
VARIANTS = {
    "luong-general-feed-bridge": dict(attention="luong", attention_score="general", input_feeding=True),
    "luong-dot-nofeed-copy": dict(
        attention="luong", attention_score="dot", input_feeding=False, decoder_init="copy", decoder_layers=2
    ),
    "bahdanau-bridge-uni": dict(attention="bahdanau", bidirectional=False, encoder_layers=1),
    "luong-zeros-deep": dict(decoder_init="zeros", decoder_layers=3),
}


def small_config(**kwargs) -> LSTMSeq2SeqConfig:
    defaults = dict(
        vocab_size=VOCAB, embedding_size=16, hidden_size=16, encoder_layers=2, decoder_layers=1,
        embedding_dropout=0.1, layer_dropout=0.1, output_dropout=0.1,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )
    defaults.update(kwargs)
    return LSTMSeq2SeqConfig(**defaults)


def make_model(seed: int = 0, **kwargs) -> LSTMForConditionalGeneration:
    torch.manual_seed(seed)
    # A large init range gives a random model with varied (non-constant) predictions.
    kwargs.setdefault("init_range", 0.5)
    return LSTMForConditionalGeneration(small_config(**kwargs)).eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models run faster on one thread, and do not slow to a crawl when other jobs share the CPU.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def strip_generated(row: torch.Tensor) -> list[int]:
    """Generated ids after the decoder start token, up to (not including) EOS."""
    ids = [int(v) for v in row[1:]]
    return ids[: ids.index(EOS)] if EOS in ids else ids


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=0), "hidden_size must be > 0, got 0"),
        (dict(vocab_size=-3), "vocab_size must be > 0, got -3"),
        (dict(encoder_layers=0), "encoder_layers must be > 0, got 0"),
        (dict(decoder_layers=0), "decoder_layers must be > 0, got 0"),
        (dict(embedding_size=0), "embedding_size must be > 0, got 0"),
        (dict(hidden_size=15, embedding_size=15), "hidden_size must be even with bidirectional=True.*hidden_size=16"),
        (dict(attention="multihead"), r"attention must be one of \('luong', 'bahdanau'\), got 'multihead'"),
        (dict(attention_score="concat"), r"attention_score must be one of \('general', 'dot'\)"),
        (dict(decoder_init="mean"), r"decoder_init must be one of \('bridge', 'copy', 'zeros'\), got 'mean'"),
        (dict(decoder_init="copy", decoder_layers=3), "decoder_init='copy' needs encoder_layers == decoder_layers"),
        (dict(embedding_dropout=1.0), r"embedding_dropout must be in \[0, 1\), got 1.0"),
        (dict(layer_dropout=-0.1), r"layer_dropout must be in \[0, 1\), got -0.1"),
        (dict(output_dropout=1.5), r"output_dropout must be in \[0, 1\), got 1.5"),
        (dict(init_range=0), "init_range must be > 0"),
        (dict(hidden_size=32), "set embedding_size=32 or tie_word_embeddings=False"),
        (dict(pad_token_id=VOCAB), r"pad_token_id must be a token id in \[0, vocab_size=12\)"),
        (dict(eos_token_id=[2, 99]), "eos_token_id must be a token id"),
        (dict(is_encoder_decoder=False), "is_encoder_decoder must be True"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_config(**kwargs)


def test_config_defaults_and_auto_config():
    config = small_config()
    assert config.model_type == "seqkd_lstm_seq2seq"
    assert config.is_encoder_decoder is True
    assert config.decoder_start_token_id == BOS  # falls back to bos_token_id
    assert small_config(decoder_start_token_id=PAD).decoder_start_token_id == PAD
    assert config.num_hidden_layers == config.decoder_layers
    auto = AutoConfig.for_model("seqkd_lstm_seq2seq", vocab_size=VOCAB, embedding_size=8, hidden_size=8)
    assert isinstance(auto, LSTMSeq2SeqConfig)
    # Untied, with embedding_size != hidden_size and a unidirectional encoder of odd size: accepted.
    model = LSTMForConditionalGeneration(
        small_config(embedding_size=8, hidden_size=15, bidirectional=False, tie_word_embeddings=False)
    )
    assert model.lm_head.weight.shape == (VOCAB, 15)
    assert model.lm_head.weight.data_ptr() != model.decoder.embeddings.weight.data_ptr()


def test_not_treated_as_a_stateful_language_model():
    # seqkd's trainer carries `state` from batch to batch for models whose forward takes `state` (TBPTT LMs).
    model = make_model()
    assert not is_stateful(model)
    assert model.get_encoder() is model.encoder


# --------------------------------------------------------------------------------------------------
# forward: shapes, state continuation, padding invariance
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_shapes_and_every_parameter_gets_a_gradient(variant):
    model = make_model(**VARIANTS[variant]).train()
    src = torch.randint(3, VOCAB, (3, 5))
    labels = torch.randint(3, VOCAB, (3, 4))
    out = model(input_ids=src, labels=labels, output_attentions=True, output_hidden_states=True)
    assert isinstance(out, LSTMSeq2SeqLMOutput)
    assert out.logits.shape == (3, 4, VOCAB)
    assert out.encoder_last_hidden_state.shape == (3, 5, 16)
    assert out.cross_attentions[0].shape == (3, 1, 4, 5)
    torch.testing.assert_close(out.cross_attentions[0].sum(-1), torch.ones(3, 1, 4))
    n_layers = model.config.decoder_layers
    assert [tuple(s.shape) for s in out.decoder_state[:2]] == [(n_layers, 3, 16)] * 2
    assert len(out.decoder_state) == (3 if model.config.feeds_attentional_vector else 2)
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decoder_state_continues_decoding(variant):
    model = make_model(**VARIANTS[variant])
    src = torch.randint(3, VOCAB, (2, 6))
    tgt = torch.randint(3, VOCAB, (2, 5))
    with torch.no_grad():
        full = model(input_ids=src, decoder_input_ids=tgt)
        enc = model.get_encoder()(input_ids=src)
        first = model(encoder_outputs=enc, decoder_input_ids=tgt[:, :2])
        rest = model(encoder_outputs=enc, decoder_input_ids=tgt[:, 2:], decoder_state=first.decoder_state)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full.logits)
    for a, b in zip(rest.decoder_state, full.decoder_state):
        torch.testing.assert_close(a, b)
    # encoder_outputs also accepted as a plain tuple
    as_tuple = model(encoder_outputs=tuple(enc.values()), decoder_input_ids=tgt)
    torch.testing.assert_close(as_tuple.logits, full.logits)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padding_invariance(variant, padding_side):
    model = make_model(**VARIANTS[variant])
    sentence = torch.tensor([[5, 3, 9, 4]])
    longer = torch.tensor([[7, 8, 3, 3, 6, 10, 11]])
    pad = torch.full((1, 3), PAD)
    padded = torch.cat([sentence, pad], 1) if padding_side == "right" else torch.cat([pad, sentence], 1)
    batch = torch.cat([longer, padded])
    mask = torch.cat([torch.ones(1, 7, dtype=torch.long), (padded != PAD).long()])
    tgt = torch.tensor([[BOS, 6, 4, 4, 9]])
    with torch.no_grad():
        alone = model(input_ids=sentence, decoder_input_ids=tgt, output_attentions=True)
        batched = model(
            input_ids=batch, attention_mask=mask, decoder_input_ids=tgt.repeat(2, 1), output_attentions=True
        )
        # What sits under the mask does not matter either.
        garbage = batch.masked_fill(mask == 0, 11)
        batched_garbage = model(input_ids=garbage, attention_mask=mask, decoder_input_ids=tgt.repeat(2, 1))
    torch.testing.assert_close(batched.logits[1:], alone.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched_garbage.logits, batched.logits, rtol=1e-5, atol=1e-5)
    weights = batched.cross_attentions[0][1, 0]  # [tgt_len, src_len]
    assert weights[:, mask[1] == 0].abs().max() == 0
    torch.testing.assert_close(weights[:, mask[1] == 1], alone.cross_attentions[0][0, 0])

    greedy_alone = model.generate(sentence, max_new_tokens=6)
    greedy_batch = model.generate(batch, attention_mask=mask, max_new_tokens=6)
    assert strip_generated(greedy_batch[1]) == strip_generated(greedy_alone[0])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decoder_attention_mask_skips_positions(variant):
    # Left-padded decoder prompts: masked positions neither read nor update the decoder state (this also checks the
    # step-by-step decoder against the fused one of Luong attention without input feeding).
    model = make_model(**VARIANTS[variant])
    src = torch.randint(3, VOCAB, (1, 5))
    tgt = torch.tensor([[BOS, 6, 4]])
    padded = torch.tensor([[PAD, PAD, BOS, 6, 4]])
    with torch.no_grad():
        plain = model(input_ids=src, decoder_input_ids=tgt)
        masked = model(
            input_ids=src, decoder_input_ids=padded, decoder_attention_mask=torch.tensor([[0, 0, 1, 1, 1]])
        )
    torch.testing.assert_close(masked.logits[:, 2:], plain.logits)
    for a, b in zip(masked.decoder_state, plain.decoder_state):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------------
# loss and labels
# --------------------------------------------------------------------------------------------------


def test_prepare_decoder_input_ids_from_labels():
    model = make_model()
    labels = torch.tensor([[5, 6, 7, EOS], [8, EOS, -100, -100]])
    expected = torch.tensor([[BOS, 5, 6, 7], [BOS, 8, EOS, PAD]])
    assert torch.equal(model.prepare_decoder_input_ids_from_labels(labels=labels), expected)
    start_pad = make_model(decoder_start_token_id=PAD)
    assert start_pad.prepare_decoder_input_ids_from_labels(labels=labels)[:, 0].tolist() == [PAD, PAD]


def test_labels_loss_equals_manual_cross_entropy():
    model = make_model()
    src = torch.randint(3, VOCAB, (3, 6))
    mask = torch.ones_like(src)
    mask[2, 4:] = 0
    labels = torch.tensor([[5, 6, 7, EOS], [8, EOS, -100, -100], [3, 3, 9, EOS]])
    with torch.no_grad():
        out = model(input_ids=src, attention_mask=mask, labels=labels)
        explicit = model(
            input_ids=src, attention_mask=mask,
            decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=labels),
        )
        summed = model(input_ids=src, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(4))
    torch.testing.assert_close(out.logits, explicit.logits)
    manual = F.cross_entropy(explicit.logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    manual_sum = F.cross_entropy(explicit.logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(summed.loss, manual_sum / 4)
    as_tuple = model(input_ids=src, attention_mask=mask, labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.loss)


# --------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tying",
    [
        dict(tie_word_embeddings=True, share_encoder_decoder_embeddings=True),
        dict(tie_word_embeddings=False, share_encoder_decoder_embeddings=True),
        dict(tie_word_embeddings=False, share_encoder_decoder_embeddings=False),
    ],
    ids=["tied-shared", "untied-shared", "untied-separate"],
)
def test_save_load_round_trip(tmp_path, tying):
    model = make_model(attention="bahdanau", **tying)
    with torch.no_grad():
        model.lm_head.bias.normal_()  # so a bias lost on load would show
    src = torch.randint(3, VOCAB, (2, 5))
    tgt = torch.randint(3, VOCAB, (2, 4))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name
    # Bit-identical logits need the weights in aligned storage, as seqkd's loaders leave them: see
    # test_lstm_model.test_save_load_round_trip.
    realign_weights(loaded)
    assert type(loaded) is LSTMForConditionalGeneration
    assert loaded.config.attention == "bahdanau"
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=src, decoder_input_ids=tgt).logits, model(input_ids=src, decoder_input_ids=tgt).logits,
            rtol=0, atol=0,
        )
    dec = loaded.decoder.embeddings.weight
    assert (loaded.lm_head.weight is dec) == tying["tie_word_embeddings"]
    assert (loaded.encoder.embeddings.weight is dec) == tying["share_encoder_decoder_embeddings"]
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert loaded.generate(src, max_new_tokens=5).tolist() == model.generate(src, max_new_tokens=5).tolist()


# --------------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------------


def manual_greedy(model, src, mask, max_new_tokens):
    """Greedy decoding by re-running the full model on the whole prefix at every step (no cache)."""
    out = torch.full((src.shape[0], 1), BOS)
    done = torch.zeros(src.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(input_ids=src, attention_mask=mask, decoder_input_ids=out).logits[:, -1]
        nxt = logits.argmax(-1).masked_fill(done, PAD)
        out = torch.cat([out, nxt[:, None]], 1)
        done |= nxt == EOS
        if bool(done.all()):
            break
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generate_equals_manual_loop_and_uses_the_cache(variant):
    model = make_model(**VARIANTS[variant])
    src = torch.randint(3, VOCAB, (3, 6))
    mask = torch.ones_like(src)
    mask[1, 4:] = 0
    expected = manual_greedy(model, src, mask, max_new_tokens=8)

    encoder_calls, decoder_lengths = [], []
    h1 = model.encoder.register_forward_hook(lambda mod, args, out: encoder_calls.append(1))
    h2 = model.decoder.register_forward_pre_hook(lambda mod, args: decoder_lengths.append(args[0].shape[1]))
    try:
        out = model.generate(src, attention_mask=mask, max_new_tokens=8, return_dict_in_generate=True)
    finally:
        h1.remove()
        h2.remove()
    assert out.sequences.tolist() == expected.tolist()
    assert len(encoder_calls) == 1  # the encoder runs once
    assert decoder_lengths == [1] * len(decoder_lengths)  # one new token per step (the prompt is the start token)
    assert isinstance(out.cache, LSTMSeq2SeqGenerationState)
    no_cache = model.generate(src, attention_mask=mask, max_new_tokens=8, use_cache=False)
    assert no_cache.tolist() == expected.tolist()


def test_generate_with_decoder_prompt_and_precomputed_encoder_outputs():
    model = make_model()
    src = torch.randint(3, VOCAB, (2, 5))
    prompt = torch.tensor([[BOS, 7, 4], [BOS, 3, 3]])
    decoder_lengths = []
    hook = model.decoder.register_forward_pre_hook(lambda mod, args: decoder_lengths.append(args[0].shape[1]))
    try:
        out = model.generate(src, decoder_input_ids=prompt, max_new_tokens=4, min_new_tokens=4)
    finally:
        hook.remove()
    assert decoder_lengths == [3, 1, 1, 1]  # the prompt is read once, then one token per step
    assert out[:, :3].tolist() == prompt.tolist()
    with torch.no_grad():
        logits = model(input_ids=src, decoder_input_ids=out[:, :-1]).logits
    logits[..., EOS] = float("-inf")  # min_new_tokens suppresses EOS
    expected = logits.argmax(-1)[:, 2:]
    assert out[:, 3:].tolist() == expected.tolist()
    enc = model.get_encoder()(input_ids=src)
    assert isinstance(enc, LSTMSeq2SeqEncoderOutput)
    again = model.generate(encoder_outputs=enc, decoder_input_ids=prompt, max_new_tokens=4, min_new_tokens=4)
    assert again.tolist() == out.tolist()


def sequence_log_probs(model, src, hyps: list[list[int]]) -> torch.Tensor:
    """Sum of log-probabilities of each hypothesis (ids after BOS, EOS included if present)."""
    length = max(len(h) for h in hyps)
    tgt = torch.full((len(hyps), length), -100)
    for i, h in enumerate(hyps):
        tgt[i, : len(h)] = torch.tensor(h)
    with torch.no_grad():
        logits = model(input_ids=src.expand(len(hyps), -1), labels=tgt).logits
    logp = logits.log_softmax(-1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * (tgt != -100)).sum(-1)


@pytest.mark.parametrize("attention", ["luong", "bahdanau"])
def test_beam_search_returns_the_exhaustive_best_hypothesis(attention):
    # Small vocabulary, 4 new tokens, EOS made impossible so that every hypothesis runs to the end and the decoder
    # state must be carried and reordered between beams at every step. Every hypothesis can then be scored: with
    # length_penalty=0 the beam score is the sum of log-probabilities, and with num_beams >= (VOCAB - 1) ** 3
    # nothing is pruned, so beam search is exact.
    vocab, max_new = 5, 4
    all_hyps = [list(h) for h in itertools.product([t for t in range(vocab) if t != EOS], repeat=max_new)]
    src = torch.tensor([[3, 4, 3, 4]])
    for seed in range(50):
        model = make_model(seed=seed, vocab_size=vocab, init_range=1.0, attention=attention)
        with torch.no_grad():
            model.lm_head.bias[EOS] = -1e4
        scores = sequence_log_probs(model, src, all_hyps)
        best = int(scores.argmax())
        greedy = model.generate(src, max_new_tokens=max_new)[0, 1:].tolist()
        if greedy != all_hyps[best]:
            break
    else:
        pytest.fail("no seed where greedy search misses the best hypothesis")

    kwargs = dict(max_new_tokens=max_new, length_penalty=0.0, early_stopping="never", output_scores=True,
                  return_dict_in_generate=True)
    beam = model.generate(src, num_beams=(vocab - 1) ** (max_new - 1), **kwargs)
    assert beam.sequences[0, 1:].tolist() == all_hyps[best]
    torch.testing.assert_close(beam.sequences_scores[0], scores[best], rtol=1e-4, atol=1e-4)
    greedy_score = scores[all_hyps.index(greedy)]
    assert beam.sequences_scores[0] > greedy_score

    # A narrow beam scores at least as well as greedy here, and matches decoding without the cache (the whole
    # target re-read at every step), so the cached state is reordered exactly between beams.
    narrow = model.generate(src, num_beams=3, num_return_sequences=2, **kwargs)
    assert narrow.sequences_scores[0] >= greedy_score
    narrow_no_cache = model.generate(src, num_beams=3, num_return_sequences=2, use_cache=False, **kwargs)
    assert narrow.sequences.tolist() == narrow_no_cache.sequences.tolist()
    torch.testing.assert_close(narrow.sequences_scores, narrow_no_cache.sequences_scores)


def test_batched_beam_search_matches_single_sentences():
    model = make_model(**VARIANTS["luong-general-feed-bridge"])
    src = torch.tensor([[5, 3, 9, 4, PAD, PAD], [7, 8, 3, 3, 6, 10]])
    mask = (src != PAD).long()
    batched = model.generate(src, attention_mask=mask, num_beams=4, max_new_tokens=6)
    for i in range(2):
        single = model.generate(src[i : i + 1, : int(mask[i].sum())], num_beams=4, max_new_tokens=6)
        assert strip_generated(batched[i]) == strip_generated(single[0])


# --------------------------------------------------------------------------------------------------
# learning
# --------------------------------------------------------------------------------------------------


def test_distillation_trainer_trains_a_seq2seq_student(tmp_path):
    # DistillationTrainer builds decoder_input_ids with prepare_decoder_input_ids_from_labels and must not carry a
    # recurrent state between batches; the teacher's logits line up with the student's.
    from seqkd.trainer import DistillationArguments, DistillationTrainer

    rng = random.Random(0)
    rows = []
    for _ in range(32):
        input_ids, mask, labels, _ = reverse_batch(rng, 1)
        rows.append({"input_ids": input_ids[0], "attention_mask": mask[0], "labels": labels[0]})

    def collate(features):
        def pad(key, value):
            length = max(len(f[key]) for f in features)
            return torch.stack([F.pad(f[key], (0, length - len(f[key])), value=value) for f in features])

        return {
            "input_ids": pad("input_ids", PAD),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", -100),
        }

    student, teacher = make_model(seed=0), make_model(seed=1)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    args = DistillationArguments(
        output_dir=str(tmp_path), report_to=[], disable_tqdm=True, use_cpu=True, save_strategy="no", seed=0,
        learning_rate=0.01, per_device_train_batch_size=8, num_train_epochs=1, loss="kd", logging_steps=2,
        remove_unused_columns=False,
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=rows, data_collator=collate
    )
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert trainer._stateful is False
    assert any(not torch.equal(before[n], p) for n, p in student.named_parameters())
    logged = [log for log in trainer.state.log_history if "loss_kd" in log]
    assert logged and all(log["loss_kd"] >= 0 for log in logged)


def reverse_batch(rng: random.Random, n: int):
    sources = [[rng.randint(3, VOCAB - 1) for _ in range(rng.randint(3, 6))] for _ in range(n)]
    targets = [list(reversed(s)) + [EOS] for s in sources]
    src_len, tgt_len = max(map(len, sources)), max(map(len, targets))
    input_ids = torch.tensor([s + [PAD] * (src_len - len(s)) for s in sources])
    labels = torch.tensor([t + [-100] * (tgt_len - len(t)) for t in targets])
    return input_ids, (input_ids != PAD).long(), labels, targets


def reverse_task_bleu(model, *, steps: int, lr: float) -> float:
    """Train `model` on the reverse task with Adam, then its greedy test BLEU (also used by the Transformer tests)."""
    rng = random.Random(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        input_ids, mask, labels, _ = reverse_batch(rng, 64)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    model.eval()
    input_ids, mask, _, targets = reverse_batch(random.Random(1234), 200)
    generated = model.generate(input_ids, attention_mask=mask, max_new_tokens=8, num_beams=1, do_sample=False)
    assert torch.all(generated[:, 0] == model.config.decoder_start_token_id)
    hyps = [" ".join(f"w{t}" for t in strip_generated(row)) for row in generated]
    refs = [" ".join(f"w{t}" for t in target[:-1]) for target in targets]
    return sacrebleu.corpus_bleu(hyps, [refs]).score


@pytest.mark.parametrize("attention", ["luong", "bahdanau"])
def test_learns_to_reverse_sequences(attention):
    torch.manual_seed(0)
    config = small_config(
        embedding_size=32, hidden_size=32, encoder_layers=1, decoder_layers=1, attention=attention,
        embedding_dropout=0.0, layer_dropout=0.0, output_dropout=0.0, init_range=0.1,
    )
    bleu = reverse_task_bleu(LSTMForConditionalGeneration(config), steps=250, lr=1e-2)
    assert bleu >= 90, f"{attention}: BLEU {bleu:.1f} on the reverse task"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_trains_and_generates_under_cpu_bf16_autocast_on_any_cpu(variant):
    # torch's LSTM has no bf16 autocast kernel on a CPU without avx512 (it fails there); the model's LSTMs then run
    # in float32 inside the autocast region, so `--bf16 true` trains and decodes an LSTM student on every CPU.
    model = make_model(**VARIANTS[variant]).train()
    src = torch.randint(3, VOCAB, (3, 5))
    mask = torch.ones_like(src)
    mask[0, 3:] = 0
    labels = torch.randint(3, VOCAB, (3, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=src, attention_mask=mask, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        generated = model.generate(input_ids=src, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False)
    assert generated.shape[0] == 3
