"""What the machine is, for benchmark tables and for choices that depend on it (bf16 on CPU)."""

from __future__ import annotations

import functools
import platform

import torch


def cpu_name() -> str:
    """The CPU's model name (``AMD EPYC``, ``Intel(R) Xeon(R) ...``), or the architecture where Linux does not say."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes in bf16 itself (avx512_bf16 or AMX) rather than autocast emulating it."""
    # Private torch probes (present in torch 2.x); without them, assume the instructions are there.
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [probe for probe in probes if probe is not None]
    return not probes or any(probe() for probe in probes)


def bf16_is_native(use_cpu: bool = False) -> bool:
    """Whether bf16 autocast would run on hardware that computes in bf16: a GPU with bf16, or (without one, or with
    ``use_cpu``) a CPU with avx512_bf16 or AMX. ``--bf16 auto`` resolves to this."""
    if not use_cpu and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


@functools.lru_cache(maxsize=None)
def cpu_autocast_runs_lstm(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether ``nn.LSTM`` runs under CPU autocast to ``dtype`` on this machine.

    torch sends a CPU LSTM under bf16 autocast to oneDNN, which has no bf16 LSTM without avx512: on an avx2-only CPU
    (a 2-core AMD EPYC, torch 2.13) the forward fails with "could not create a primitive descriptor". A probe on a
    tiny LSTM asks the installed torch itself, so a torch that gains the kernel is used as soon as it has it.
    """
    # The probe may first run inside a model's forward: it leaves the random stream as it was (the LSTM's init draws
    # from it) and needs gradients whatever mode the caller is in (training needs the backward kernel too).
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        lstm = torch.nn.LSTM(4, 4)
        try:
            with torch.autocast("cpu", dtype=dtype):
                output, _ = lstm(torch.zeros(2, 1, 4))
            output.float().sum().backward()
        except RuntimeError:
            return False
    return True
