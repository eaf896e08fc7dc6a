"""``evaluate`` metric modules shipped with seqkd, loadable offline from the installed package.

Each metric is a standard ``evaluate`` script in a folder of its own (``<name>/<name>.py``):

* ``perplexity`` -- corpus perplexity ``exp(sum(nll) / sum(tokens))`` from per-chunk summed
  NLLs (nats) and predicted-token counts (features ``nll``: float64, ``tokens``: int64);
* ``bleu`` -- sacreBLEU corpus BLEU + chrF with their signatures (features ``predictions``:
  str, ``references``: str or list of str; options ``tokenize``, ``lowercase``,
  ``chrf_word_order``).

``seqkd.metrics.load("bleu")`` is ``evaluate.load(<path of seqkd/metrics/bleu>)``: nothing is
fetched from the Hub (it works with ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

from pathlib import Path

from seqkd.errors import InvalidValueError, MissingInputError

__all__ = ["METRICS", "metric_path", "load"]

_ROOT = Path(__file__).resolve().parent

#: Names of the metric modules in this package.
METRICS: tuple[str, ...] = ("bleu", "perplexity")


def metric_path(name: str) -> Path:
    """Directory of the local ``evaluate`` module ``name`` (it holds ``<name>.py``)."""
    if name not in METRICS:
        raise InvalidValueError(f"unknown seqkd metric {name!r}: available metrics are {', '.join(METRICS)}")
    path = _ROOT / name
    script = path / f"{name}.py"
    if not script.is_file():
        raise MissingInputError(
            f"metric script {str(script)!r} is missing: the seqkd installation lacks its package data"
        )
    return path


def load(name: str, **kwargs):
    """``evaluate.load`` of the local metric module ``name`` (``"bleu"`` or ``"perplexity"``).

    Extra keyword arguments (``experiment_id``, ``keep_in_memory``, ...) go to ``evaluate.load``.
    """
    path = metric_path(name)  # validate the name before importing evaluate
    import evaluate

    return evaluate.load(str(path), **kwargs)
