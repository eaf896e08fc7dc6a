"""An ensemble teacher for distill-data: the mean of its members' next-token distributions at every decoding step."""

import json

import pytest
import torch
from test_sequence_kd import distill_argv, read, run, teacher  # noqa: F401  (fixtures and helpers)
from test_translation_cli import parallel_dir, recipe  # noqa: F401  (fixtures)
from transformers import AutoTokenizer

from seqkd.evaluation import translate
from seqkd.models.lstm_seq2seq import LSTMForConditionalGeneration, LSTMSeq2SeqConfig
from seqkd.models.transformer import build_seq2seq
from seqkd.pipeline import load_saved_model
from seqkd.sequence_kd import TranslationEnsemble

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, PAD, BOS, EOS = 40, 0, 1, 2


def members():
    """A Transformer and an LSTM encoder-decoder over one vocabulary: different encoder outputs, the same tokens."""
    torch.manual_seed(0)
    transformer = build_seq2seq("marian-tiny", vocab_size=VOCAB, forced_eos_token_id=None, d_model=32, ffn_dim=64).eval()
    torch.manual_seed(1)
    lstm = LSTMForConditionalGeneration(
        LSTMSeq2SeqConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=16, encoder_layers=1, decoder_layers=1,
                          pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=BOS,
                          init_range=0.5)  # fmt: skip
    ).eval()
    return transformer, lstm


def sources():
    # Two sources of different lengths: the shorter is padded, so the attention mask matters.
    input_ids = torch.tensor([[5, 9, 12, 7, 3, EOS], [8, 4, 11, EOS, PAD, PAD]])
    return input_ids, (input_ids != PAD).long()


def ensemble_log_probs(models, input_ids, attention_mask, decoder_input_ids):
    """log of the mean of the members' next-token probabilities after every decoder prefix, computed directly."""
    probs = [
        torch.softmax(m(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits.float(), -1)
        for m in models
    ]
    return torch.stack(probs).mean(0).log()


def test_greedy_decoding_follows_the_mean_distribution():
    transformer, lstm = members()
    assert transformer.config.decoder_start_token_id == lstm.config.decoder_start_token_id == BOS
    input_ids, attention_mask = sources()
    ensemble = TranslationEnsemble([transformer, lstm])
    out = ensemble.generate(input_ids=input_ids, attention_mask=attention_mask, num_beams=1, do_sample=False,
                            max_new_tokens=8)  # fmt: skip
    # The same decoding, one full forward pass per step and no cache.
    expected = torch.full((2, 1), BOS)
    finished = torch.zeros(2, dtype=torch.bool)
    for _ in range(8):
        step = ensemble_log_probs([transformer, lstm], input_ids, attention_mask, expected)[:, -1].argmax(-1)
        step = torch.where(finished, torch.tensor(PAD), step)
        expected = torch.cat([expected, step[:, None]], dim=1)
        finished |= step == EOS
        if finished.all():
            break
    assert out.tolist() == expected.tolist()
    # Neither member alone decodes this (else the test would not see the average).
    alone = [m.generate(input_ids=input_ids, attention_mask=attention_mask, num_beams=1, do_sample=False,
                        max_new_tokens=8).tolist() for m in (transformer, lstm)]  # fmt: skip
    assert out.tolist() not in alone


def test_beam_scores_are_the_ensembles_log_probabilities():
    # If a beam read another source's or beam's rows from a member, its score would not be the ensemble's
    # log-probability of its own hypothesis.
    transformer, lstm = members()
    input_ids, attention_mask = sources()
    ensemble = TranslationEnsemble([transformer, lstm])
    out = ensemble.generate(input_ids=input_ids, attention_mask=attention_mask, num_beams=3, num_return_sequences=3,
                            max_new_tokens=6, length_penalty=0.0, return_dict_in_generate=True, output_scores=True)  # fmt: skip
    rows = input_ids.repeat_interleave(3, dim=0), attention_mask.repeat_interleave(3, dim=0)
    log_probs = ensemble_log_probs([transformer, lstm], *rows, out.sequences[:, :-1])
    targets = out.sequences[:, 1:]
    token_log_probs = log_probs.gather(-1, targets[..., None])[..., 0]
    # Positions after a hypothesis's end are padding.
    ended = (targets == EOS).long().cumsum(-1) - (targets == EOS).long()
    total = (token_log_probs * (ended == 0)).sum(-1)
    torch.testing.assert_close(out.sequences_scores, total, atol=1e-4, rtol=1e-4)
    hypotheses = out.sequences.tolist()
    assert all(len(set(map(tuple, hypotheses[i : i + 3]))) == 3 for i in (0, 3))  # three different ones per source


@pytest.mark.parametrize("num_beams", [1, 3])
def test_an_ensemble_of_one_model_twice_decodes_as_the_model(num_beams):
    transformer, _ = members()
    input_ids, attention_mask = sources()
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, num_beams=num_beams, max_new_tokens=8)
    assert TranslationEnsemble([transformer, transformer]).generate(**kwargs).tolist() == transformer.generate(**kwargs).tolist()


def test_members_must_share_the_special_tokens():
    transformer, lstm = members()
    other = build_seq2seq("marian-tiny", vocab_size=VOCAB + 1, forced_eos_token_id=None)
    with pytest.raises(ValueError, match="ensemble member 1 has vocab_size=41 but the first member has 40"):
        TranslationEnsemble([transformer, other])
    lstm.config.decoder_start_token_id = PAD
    with pytest.raises(ValueError, match="ensemble member 1 has decoder_start_token_id=0 but the first member has 1"):
        TranslationEnsemble([transformer, lstm])
    with pytest.raises(ValueError, match="at least one model"):
        TranslationEnsemble([])


def test_distill_data_with_an_ensemble_teacher(recipe, parallel_dir, teacher, tmp_path):  # noqa: F811
    out = tmp_path / "ensemble"
    run(*distill_argv(recipe, teacher, out, "--num_beams", "2", "--ensemble_with", teacher))
    # Two copies of one teacher decode as the teacher.
    sources = read(parallel_dir / "train.de")[:60]
    model, tokenizer = load_saved_model(str(teacher)), AutoTokenizer.from_pretrained(teacher)
    assert read(out / "train.en") == translate(model, tokenizer, sources, num_beams=2, max_new_tokens=12, batch_size=8,
                                               show_progress=False)  # fmt: skip
    manifest = json.loads((out / "distill_manifest.json").read_text())
    assert isinstance(manifest["teacher"], list) and len(manifest["teacher"]) == 2
    assert manifest["teacher"][0] == manifest["teacher"][1]


def test_an_ensemble_member_with_another_tokenizer_is_refused(recipe, teacher, tmp_path):  # noqa: F811
    other = tmp_path / "other"
    run("train", recipe, "--output_dir", other, "--max_steps", "1", "--max_train_examples", "50", "--bpe_vocab_size", "90")
    with pytest.raises(ValueError, match="has another tokenizer than the teacher"):
        run(*distill_argv(recipe, teacher, tmp_path / "x", "--ensemble_with", other / "model"))
    with pytest.raises(FileNotFoundError, match="ensemble member folder"):
        run(*distill_argv(recipe, teacher, tmp_path / "y", "--ensemble_with", tmp_path / "missing"))
