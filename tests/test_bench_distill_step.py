"""scripts/bench_distill_step.py --breakdown: the parts online distillation adds are timed on one real batch."""

import math

from conftest import load_script


def _script():
    return load_script("bench_distill_step")


def test_breakdown_times_every_part():
    bench = _script()
    data, _, _ = bench.training_data("lstm-medium", vocab_size=50, num_batches=2)
    parts = bench.time_breakdown("lstm-medium", data, 50, "cpu", repeats=1)
    assert set(parts) == {"student ce", "student ban", "teacher no_grad", "teacher inference_mode", "teacher bf16"}
    assert all(math.isfinite(seconds) and seconds > 0 for seconds in parts.values()), parts


def test_bf16_teacher_mode_trains_and_leaves_the_shared_teacher_float32(tmp_path):
    import torch

    bench = _script()
    data, batch, _ = bench.training_data("lstm-medium", vocab_size=50, num_batches=4)
    teacher = bench.build_model("lstm-medium", 50, seed=1).eval()
    args_common = dict(
        output_dir=str(tmp_path), report_to=[], disable_tqdm=True, save_strategy="no", logging_steps=10_000,
        optim="sgd", learning_rate=0.1, seed=0, per_device_train_batch_size=batch, use_cpu=True,
        dataloader_pin_memory=False,
    )  # fmt: skip
    seconds = bench.time_trainer("lstm-medium", "online bf16 teacher", data, 50, args_common, teacher, None, 1, 2)
    assert math.isfinite(seconds) and seconds > 0
    # The float32 "online" runs that follow in the same process reuse this teacher object.
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}


def test_modes_must_include_ce():
    import pytest

    bench = _script()
    with pytest.raises(SystemExit):
        bench.main(["--modes", "online", "--steps", "1"])
    with pytest.raises(SystemExit):
        bench.main(["--modes", "ce,online-bf16", "--steps", "1"])
