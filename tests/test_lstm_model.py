"""Tests of seqkd.models.lstm: config validation, stateful forward, losses, save/load, generate, learning."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import seqkd  # noqa: F401  (registers the Auto classes)
from seqkd.models import LSTMCausalLMOutput, LSTMForCausalLM, LSTMGenerationState, LSTMLMConfig, realign_weights

VOCAB = 13


def small_config(**kwargs) -> LSTMLMConfig:
    defaults = dict(
        vocab_size=VOCAB, embedding_size=16, hidden_size=16, num_layers=2,
        embedding_dropout=0.1, layer_dropout=0.1, output_dropout=0.1,
    )
    defaults.update(kwargs)
    return LSTMLMConfig(**defaults)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models run faster on one thread, and do not slow to a crawl when other jobs share the CPU.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def model() -> LSTMForCausalLM:
    torch.manual_seed(0)
    # A large init range gives a random model with varied (non-constant) predictions.
    return LSTMForCausalLM(small_config(init_range=0.5)).eval()


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=0), "hidden_size must be > 0, got 0"),
        (dict(vocab_size=-3), "vocab_size must be > 0, got -3"),
        (dict(num_layers=0), "num_layers must be > 0, got 0"),
        (dict(embedding_size=0), "embedding_size must be > 0, got 0"),
        (dict(embedding_dropout=1.0), r"embedding_dropout must be in \[0, 1\), got 1.0"),
        (dict(layer_dropout=-0.1), r"layer_dropout must be in \[0, 1\), got -0.1"),
        (dict(output_dropout=1.5), r"output_dropout must be in \[0, 1\), got 1.5"),
        (dict(init_range=0), "init_range must be > 0"),
        (dict(projection_size=0), "projection_size must be > 0 or None"),
        (dict(hidden_size=32), "set embedding_size == hidden_size, enable the output projection with projection_size=16"),
        (dict(hidden_size=32, projection_size=8), "projection_size=16"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_config(**kwargs)


def test_config_untied_or_projected_sizes_are_accepted():
    untied = LSTMForCausalLM(small_config(hidden_size=32, tie_word_embeddings=False))
    assert untied.lm_head.weight.shape == (VOCAB, 32)
    assert untied.lm_head.weight.data_ptr() != untied.embeddings.weight.data_ptr()

    projected = LSTMForCausalLM(small_config(hidden_size=32, projection_size=16))
    assert projected.projection.weight.shape == (16, 32)
    assert projected.lm_head.weight is projected.embeddings.weight
    out = projected(torch.randint(0, VOCAB, (2, 5)))
    assert out.logits.shape == (2, 5, VOCAB)


def test_config_defaults_and_init_range():
    config = LSTMLMConfig()
    assert (config.vocab_size, config.embedding_size, config.hidden_size, config.num_layers) == (10000, 650, 650, 2)
    assert config.num_hidden_layers == 2  # attribute_map
    m = LSTMForCausalLM(small_config(init_range=0.05))
    for name, p in m.named_parameters():
        if name.endswith("lm_head.bias"):
            assert torch.all(p == 0)
        else:
            assert p.abs().max() <= 0.05, name


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------


def test_forward_shapes_and_output(model):
    x = torch.randint(0, VOCAB, (3, 9))
    out = model(x)
    assert isinstance(out, LSTMCausalLMOutput)
    assert out.loss is None
    assert out.logits.shape == (3, 9, VOCAB)
    h, c = out.state
    assert h.shape == c.shape == (2, 3, 16)
    as_tuple = model(x, labels=x, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3
    torch.testing.assert_close(as_tuple[1], out.logits)


def test_state_carry_equals_single_pass(model):
    x = torch.randint(0, VOCAB, (4, 12))
    full = model(x)
    first = model(x[:, :5])
    second = model(x[:, 5:], state=first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), full.logits)
    for a, b in zip(second.state, full.state):
        torch.testing.assert_close(a, b)


def test_shift_labels_loss_equals_manual_cross_entropy(model):
    x = torch.randint(0, VOCAB, (3, 8))
    y = torch.randint(0, VOCAB, (3, 8))
    y[0, :3] = -100
    out = model(x, shift_labels=y)
    expected = F.cross_entropy(out.logits.reshape(-1, VOCAB), y.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    # shift_labels are *not* shifted: every position keeps its target, including the last one
    only_last = torch.full_like(y, -100)
    only_last[:, -1] = y[:, -1].clamp(min=0)
    out = model(x, shift_labels=only_last)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[:, -1], only_last[:, -1]))


def test_labels_loss_equals_hf_shifted_cross_entropy(model):
    x = torch.randint(0, VOCAB, (3, 8))
    labels = x.clone()
    labels[1, 5:] = -100
    out = model(x, labels=labels)
    expected = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)


def test_num_items_in_batch_normalises_a_sum(model):
    x = torch.randint(0, VOCAB, (2, 6))
    out = model(x, shift_labels=x, num_items_in_batch=torch.tensor(24))
    expected = F.cross_entropy(out.logits.reshape(-1, VOCAB), x.reshape(-1), reduction="sum") / 24
    torch.testing.assert_close(out.loss, expected)


def test_attention_mask_skips_masked_positions(model):
    x = torch.randint(1, VOCAB, (2, 7))
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding
    mask[1, 5:] = 0  # right padding
    out = model(x, attention_mask=mask)
    ref0 = model(x[0:1, 3:])
    ref1 = model(x[1:2, :5])
    torch.testing.assert_close(out.logits[0, 3:], ref0.logits[0])
    torch.testing.assert_close(out.logits[1, :5], ref1.logits[0])
    torch.testing.assert_close(out.state[0][:, 0], ref0.state[0][:, 0])
    torch.testing.assert_close(out.state[1][:, 1], ref1.state[1][:, 0])


def test_inputs_embeds_and_logits_to_keep(model):
    x = torch.randint(0, VOCAB, (2, 6))
    out = model(x)
    torch.testing.assert_close(model(inputs_embeds=model.embeddings(x)).logits, out.logits)
    torch.testing.assert_close(model(x, logits_to_keep=1).logits, out.logits[:, -1:])
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()


# --------------------------------------------------------------------------------------------------
# save / load / auto classes
# --------------------------------------------------------------------------------------------------


def test_save_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "pytorch_model.bin").exists()
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "model.safetensors")
    assert "embeddings.weight" in saved and "lstm.weight_ih_l0" in saved

    loaded = LSTMForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.embeddings.weight  # still tied
    # "Identical after reload": every weight equal bit for bit, and, once the weights sit in 64-byte-aligned
    # storage as the saved model's do (realign_weights, which seqkd's loaders apply), bit-identical logits. Left
    # where safetensors maps them, MKL on some CPUs (AMD EPYC) sums in another order: last-bit differences.
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name
    realign_weights(loaded)
    assert loaded.lm_head.weight is loaded.embeddings.weight  # realigning keeps the tie
    x = torch.randint(0, VOCAB, (2, 10))
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_realign_weights_moves_mapped_weights_to_aligned_storage(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = LSTMForCausalLM.from_pretrained(tmp_path)
    realign_weights(loaded)
    assert all(p.data_ptr() % 64 == 0 for p in loaded.parameters())
    # A deliberately misaligned weight (one float into a larger buffer) is moved, its values kept.
    weight = loaded.lm_head.bias
    shifted = torch.empty(weight.numel() + 1)[1:].copy_(weight.data)
    assert shifted.data_ptr() % 64 != 0
    weight.data = shifted
    realign_weights(loaded)
    assert weight.data_ptr() % 64 == 0 and torch.equal(weight, shifted)
    from seqkd.pipeline import load_saved_model

    assert all(p.data_ptr() % 64 == 0 for p in load_saved_model(str(tmp_path)).parameters())


def test_untied_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    m = LSTMForCausalLM(small_config(hidden_size=24, tie_word_embeddings=False)).eval()
    m.save_pretrained(tmp_path)
    loaded = realign_weights(AutoModelForCausalLM.from_pretrained(tmp_path).eval())  # see test_save_load_round_trip
    assert loaded.lm_head.weight.data_ptr() != loaded.embeddings.weight.data_ptr()
    x = torch.randint(0, VOCAB, (2, 4))
    torch.testing.assert_close(loaded(x).logits, m(x).logits, rtol=0, atol=0)


def test_auto_classes(model, tmp_path):
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, LSTMLMConfig)
    assert config.model_type == "seqkd_lstm" and config.hidden_size == 16
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, LSTMForCausalLM)
    assert loaded.lm_head.weight is loaded.embeddings.weight
    assert isinstance(AutoModelForCausalLM.from_config(small_config()), LSTMForCausalLM)
    assert isinstance(AutoConfig.for_model("seqkd_lstm", vocab_size=7), LSTMLMConfig)


def test_registration_is_idempotent():
    code = (
        "import importlib, seqkd, seqkd.models.lstm as m; importlib.reload(m); "
        "from transformers import AutoModelForCausalLM; "
        "assert AutoModelForCausalLM.from_config(m.LSTMLMConfig(vocab_size=5, embedding_size=4, hidden_size=4))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------------


def _record_input_lengths(model):
    lengths = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        lengths.append(ids.shape[1])

    return lengths, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_generate_greedy_equals_manual_loop_and_feeds_one_token(model):
    prompt = torch.randint(0, VOCAB, (3, 4))
    n_new = 6
    lengths, handle = _record_input_lengths(model)
    try:
        generated = model.generate(prompt, max_new_tokens=n_new, do_sample=False)
    finally:
        handle.remove()
    assert lengths == [4] + [1] * (n_new - 1)

    ids = prompt
    with torch.no_grad():
        for _ in range(n_new):
            next_token = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
    assert torch.equal(generated, ids)
    assert len(set(generated[:, 4:].flatten().tolist())) > 1  # a non-degenerate check


def test_generate_without_cache_rereads_the_prefix(model):
    prompt = torch.randint(0, VOCAB, (2, 3))
    lengths, handle = _record_input_lengths(model)
    try:
        no_cache = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    finally:
        handle.remove()
    assert lengths == [3, 4, 5, 6]
    assert torch.equal(no_cache, model.generate(prompt, max_new_tokens=4, do_sample=False))


def test_generate_sampling_with_seed(model):
    prompt = torch.randint(0, VOCAB, (4, 2))
    lengths, handle = _record_input_lengths(model)
    try:
        torch.manual_seed(123)
        a = model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=0)
    finally:
        handle.remove()
    assert lengths == [2] + [1] * 7
    torch.manual_seed(123)
    b = model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=0)
    assert torch.equal(a, b)
    assert a.shape == (4, 10) and torch.equal(a[:, :2], prompt)
    assert a.min() >= 0 and a.max() < VOCAB


def test_generate_beam_search_reorders_state(model):
    prompt = torch.randint(0, VOCAB, (2, 3))
    kwargs = dict(max_new_tokens=5, num_beams=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    cached = model.generate(prompt, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores)


def test_generate_left_padded_batch_matches_single_prompts(model):
    pad = 0
    short = torch.tensor([[5, 6]])
    long = torch.tensor([[3, 4, 5, 6]])
    batch = torch.tensor([[pad, pad, 5, 6], [3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=pad)
    assert torch.equal(out[0, 4:], model.generate(short, max_new_tokens=5, do_sample=False)[0, 2:])
    assert torch.equal(out[1, 4:], model.generate(long, max_new_tokens=5, do_sample=False)[0, 4:])


def test_generate_returns_state_and_continues_from_a_state(model):
    prompt = torch.randint(0, VOCAB, (2, 5))
    out = model.generate(prompt, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache, LSTMGenerationState)
    # continuing from the state after the first 3 prompt tokens == reading the full prompt
    state = model(prompt[:, :3]).state
    continued = model.generate(prompt[:, 3:], state=state, max_new_tokens=3, do_sample=False)
    assert torch.equal(continued[:, 2:], out.sequences[:, 5:])


# --------------------------------------------------------------------------------------------------
# learning
# --------------------------------------------------------------------------------------------------

PATTERN = [3, 1, 4, 1, 5, 9, 2, 6]  # "1" is followed by 4 or 5: needs memory, not just the last token


def pattern_stream(batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    offsets = torch.randint(0, len(PATTERN), (batch_size, 1), generator=generator)
    positions = (offsets + torch.arange(length)) % len(PATTERN)
    return torch.tensor(PATTERN)[positions]


def test_lstm_learns_a_repeating_pattern_with_tbptt():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    config = LSTMLMConfig(
        vocab_size=10, embedding_size=32, hidden_size=32, num_layers=1,
        embedding_dropout=0.0, layer_dropout=0.0, output_dropout=0.0,
    )
    model = LSTMForCausalLM(config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    bptt, batch_size = 8, 16
    stream = pattern_stream(batch_size, 80 * bptt + 1, g)
    state = None
    for step in range(80):  # one TBPTT pass over the stream; the state is carried across chunks
        x = stream[:, step * bptt : (step + 1) * bptt]
        y = stream[:, step * bptt + 1 : (step + 1) * bptt + 1]
        out = model(x, state=state, shift_labels=y)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        state = tuple(s.detach() for s in out.state)

    model.eval()
    with torch.no_grad():
        test = pattern_stream(8, 24, torch.Generator().manual_seed(1))
        labels = test.clone()
        labels[:, :2] = -100  # the first targets can be ambiguous without context
        loss = model(test, labels=labels).loss
    assert loss.item() < 0.05, loss.item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_head_runs_as_one_matrix_product(dtype):
    # A frozen teacher (no parameter requires grad, no_grad) used to reach the head with the LSTM's transposed
    # [seq, batch] buffer, which matmul multiplies as a batch of [seq, H] x [H, V] products against a weight
    # copied once per row: at 2 x 650 and batch 20 that copy doubled the bf16 teacher's step.
    from torch.profiler import ProfilerActivity, profile

    # The head is told apart by its vocabulary (40, unlike the LSTM's 4 x 16 gates): on a CPU without avx512, torch's
    # own bf16 LSTM (no oneDNN kernel there) projects its inputs with a bmm of its own, which is not the head's.
    vocab = 40
    config = LSTMLMConfig(vocab_size=vocab, embedding_size=16, hidden_size=16, num_layers=2)
    model = LSTMForCausalLM(config).eval().to(dtype)
    model.requires_grad_(False)
    ids = torch.randint(0, vocab, (4, 7))
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        logits = model(input_ids=ids).logits
    head_bmms = [
        event.input_shapes
        for event in prof.key_averages(group_by_input_shape=True)
        if event.key == "aten::bmm" and any(shape and shape[-1] == vocab for shape in event.input_shapes)
    ]
    assert head_bmms == []
    assert logits.shape == (4, 7, vocab)


@pytest.mark.parametrize("with_mask", [False, True])
def test_trains_under_cpu_bf16_autocast_on_any_cpu(model, with_mask):
    # torch's LSTM has no bf16 autocast kernel on a CPU without avx512 (it fails there); the model's LSTM then runs in
    # float32 inside the autocast region, so `--bf16 true` trains an LSTM on every CPU.
    model.train()
    x = torch.randint(0, VOCAB, (3, 7))
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x, attention_mask=mask if with_mask else None)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_lstm_without_an_autocast_kernel_runs_in_float32_inside_autocast(model, monkeypatch):
    # Forced to the fallback, the LSTM inside a bf16 autocast region computes exactly what it computes outside one:
    # the same float32 kernel on the same float32 inputs (packed or not).
    import seqkd.models.lstm as lstm_module

    monkeypatch.setattr(lstm_module, "cpu_autocast_runs_lstm", lambda dtype: False)
    x = torch.randn(3, 5, 16)
    state = (torch.randn(2, 3, 16), torch.randn(2, 3, 16))
    # The bf16 inputs round x and the state to 8 bits of mantissa; the float32 reference reads the same rounded values.
    x_bf16, state_bf16 = x.bfloat16(), tuple(s.bfloat16() for s in state)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3, 2]), batch_first=True)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, (h_got, _) = model.lstm(x_bf16, state_bf16)
            got_packed, _ = model.lstm(packed)
        expected, (h_expected, _) = model.lstm(x_bf16.float(), tuple(s.float() for s in state_bf16))
        expected_packed, _ = model.lstm(packed)
    assert got.dtype == h_got.dtype == got_packed.data.dtype == torch.float32
    # float32's default tolerance: the two calls may differ by a few ulps where MKL's blocking follows the buffers'
    # alignment, while an LSTM computed in bf16 would be off by about 1e-2.
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(h_got, h_expected)
    torch.testing.assert_close(got_packed.data, expected_packed.data)


def test_the_autocast_lstm_probe_tells_the_truth_from_any_grad_mode_and_leaves_the_random_stream():
    from seqkd.hardware import cpu_autocast_runs_lstm

    lstm = torch.nn.LSTM(8, 8)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output, _ = lstm(torch.randn(3, 2, 8))
        output.float().sum().backward()
        runs = True
    except RuntimeError:
        runs = False
    cpu_autocast_runs_lstm.cache_clear()
    torch.manual_seed(0)
    with torch.no_grad():  # a model's first LSTM call may be in an evaluation or a frozen teacher's forward
        probed = cpu_autocast_runs_lstm(torch.bfloat16)
    drawn_after = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(drawn_after, torch.rand(4))
    assert probed is runs
