"""Shared pytest fixtures.

Data lives outside the repository: ``$SEQKD_DATA_DIR`` (CI sets it to ``<repo>/../shared/data``),
falling back to ``<repo root>/../shared/data``. Tests that need a data set skip when it is absent.
Tests never download: the Hugging Face Hub is switched to offline mode unless the caller set it.
"""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports huggingface_hub / datasets: fail fast instead of trying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

PTB_SPLIT_FILES = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")

# A tiny corpus (with a blank line and PTB's <unk>) that every machine has.
TINY_CORPUS = {
    "train": [
        "the cat sat on the mat",
        "the dog sat on the log",
        "",
        "a cat and a dog <unk> the mat",
        "the end",
    ],
    "validation": ["the cat sat on the log", "a dog and the mat"],
    "test": ["the dog and the cat", "a zebra sat"],  # "zebra" is out of vocabulary
}


def load_script(name: str):
    """``scripts/NAME.py`` as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def data_root() -> Path:
    """The shared data directory (``$SEQKD_DATA_DIR`` or ``<repo root>/../shared/data``)."""
    env = os.environ.get("SEQKD_DATA_DIR")
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed_every_test():
    """Every test starts from the same random state, so that it sees the same random inputs whether it runs
    alone, in another order or after other tests (some tests draw inputs without seeding)."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny models: they run faster so, and do not slow to a crawl (two
    threads waiting on each other) when other work shares the CPU. Results are as exact either way."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return data_root()


@pytest.fixture(scope="session")
def ptb_dir(data_dir: Path) -> Path:
    """Directory with Mikolov's ``ptb.{train,valid,test}.txt``; skips the test when absent."""
    d = data_dir / "ptb"
    missing = [n for n in PTB_SPLIT_FILES if not (d / n).is_file()]
    if missing:
        pytest.skip(f"PTB not found in {d} (missing {', '.join(missing)}); set SEQKD_DATA_DIR")
    return d


@pytest.fixture(scope="session")
def ptb_splits(ptb_dir: Path):
    """PTB as a ``DatasetDict`` (train/validation/test, column ``text``), loaded once per session."""
    from seqkd.data import load_ptb

    return load_ptb(ptb_dir)


@pytest.fixture(scope="session")
def ptb_word_tokenizer(ptb_splits):
    """The 10,000-word PTB tokenizer trained on the train split, built once per session."""
    from seqkd.data import train_word_tokenizer

    return train_word_tokenizer(ptb_splits["train"])


@pytest.fixture(scope="session")
def tiny_corpus() -> dict[str, list[str]]:
    return {k: list(v) for k, v in TINY_CORPUS.items()}


@pytest.fixture
def tiny_corpus_dir(tmp_path: Path) -> Path:
    """``train.txt`` / ``valid.txt`` / ``test.txt`` holding :data:`TINY_CORPUS`."""
    names = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}
    for split, lines in TINY_CORPUS.items():
        (tmp_path / names[split]).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


@pytest.fixture(scope="session")
def tiny_word_tokenizer():
    from seqkd.data import train_word_tokenizer

    return train_word_tokenizer(TINY_CORPUS["train"])


# A small learnable language for training tests: each line is a run of a fixed word cycle.
CYCLE_WORDS = "the cat sat on a mat while dog ran far away and then".split()


def cyclic_lines(count: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        start = rng.randrange(len(CYCLE_WORDS))
        lines.append(" ".join(CYCLE_WORDS[(start + i) % len(CYCLE_WORDS)] for i in range(rng.randint(4, 9))))
    return lines


@pytest.fixture(scope="module")
def cyclic_corpus_dir(tmp_path_factory) -> Path:
    """``train.txt`` (400 lines), ``validation.txt`` and ``test.txt`` (60 lines each) of the cyclic language."""
    root = tmp_path_factory.mktemp("cyclic")
    for seed, (split, count) in enumerate((("train", 400), ("validation", 60), ("test", 60))):
        (root / f"{split}.txt").write_text("\n".join(cyclic_lines(count, seed)) + "\n")
    return root
