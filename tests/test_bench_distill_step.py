"""scripts/bench_distill_step.py --breakdown: the parts online distillation adds are timed on one real batch."""

import importlib.util
import math
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_distill_step.py"


def _script():
    spec = importlib.util.spec_from_file_location("bench_distill_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_breakdown_times_every_part():
    bench = _script()
    data, _, _ = bench.training_data("lstm-medium", vocab_size=50, num_batches=2)
    parts = bench.time_breakdown("lstm-medium", data, 50, "cpu", repeats=1)
    assert set(parts) == {"student ce", "student ban", "teacher no_grad", "teacher inference_mode"}
    assert all(math.isfinite(seconds) and seconds > 0 for seconds in parts.values()), parts


def test_losses_accept_a_teacher_run_under_inference_mode():
    # The breakdown times the teacher under inference_mode too: its logits must be usable as a loss's target.
    from seqkd.losses import distillation_loss

    student = torch.randn(2, 3, 11, requires_grad=True)
    with torch.inference_mode():
        teacher = torch.randn(2, 3, 11)
    labels = torch.randint(0, 11, (2, 3))
    for name in ("ban", "dkd"):
        distillation_loss(name, student, teacher, labels).loss.backward()
        assert student.grad is not None and torch.isfinite(student.grad).all()
        student.grad = None
