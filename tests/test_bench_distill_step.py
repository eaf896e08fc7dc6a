"""scripts/bench_distill_step.py --breakdown: the parts online distillation adds are timed on one real batch."""

import importlib.util
import math
from pathlib import Path

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

