"""Run a module or a script under `accelerate launch --use_fsdp ...` with FSDP really enabled on CPU processes.

    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 tests/fsdp_on_cpu.py -m seqkd distill ...
    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 tests/fsdp_on_cpu.py script.py ...

Accelerate (1.16) switches to FSDP only on accelerator devices: ``AcceleratorState`` sets ``DistributedType.FSDP``
in the branch for MULTI_GPU, MULTI_XPU, ... and MULTI_CPU is not among them. On a CPU-only host `--use_fsdp` is
therefore ignored without a word: with ``use_cpu`` the run is plain DDP over gloo, and without it every process
believes it is alone. This wrapper lets Accelerate set up the gloo process group as usual, then marks the state as
FSDP with the plugin built from the launcher's flags. Everything after that (the Trainer's FSDP paths, Accelerate's
``fully_shard`` preparation, sharded checkpoints) is unmodified; torch's FSDP2 runs on CPU with gloo.
"""

import runpy
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_original_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin


def main() -> None:
    AcceleratorState.__init__ = _init_with_fsdp_on_cpu
    if sys.argv[1] == "-m":
        module = sys.argv[2]
        sys.argv = [module, *sys.argv[3:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
