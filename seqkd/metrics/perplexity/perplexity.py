"""Corpus perplexity as an ``evaluate`` metric: ``exp(total NLL / total predicted tokens)``.

Loaded from this local file (no Hub access): ``seqkd.metrics.load("perplexity")``.
Kept free of ``seqkd`` imports: ``evaluate`` copies this file into its module cache.
"""

import math

import datasets
import evaluate

_CITATION = ""

_DESCRIPTION = """\
Corpus-level perplexity from summed negative log-likelihoods: exp(sum(nll) / sum(tokens)).
Each input row is one chunk of text -- a sentence, a batch, or a whole split -- with the total
negative log-likelihood (natural log, nats) of its predicted tokens and how many tokens were
predicted. This is the classic corpus definition (as in seqkd.evaluation.corpus_perplexity, whose
"nll" and "tokens" outputs can be fed directly), not a mean of per-chunk perplexities.
"""

_KWARGS_DESCRIPTION = """
Args:
    nll (list of float): summed negative log-likelihood, in nats, of each chunk's predicted tokens
        (>= 0; for a sentence: -sum of its token log-probabilities).
    tokens (list of int): number of predicted tokens of each chunk (>= 0).
Returns:
    perplexity (float): exp(sum(nll) / sum(tokens)) (inf on overflow).
    loss (float): sum(nll) / sum(tokens), mean NLL per token in nats.
    nll (float): sum(nll).
    tokens (int): sum(tokens).
Examples:
    >>> ppl = seqkd.metrics.load("perplexity")
    >>> ppl.compute(nll=[2.0, 4.0], tokens=[1, 2])["perplexity"]  # exp(6 / 3)
    7.38905609893065
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll": datasets.Value("float64"), "tokens": datasets.Value("int64")}),
            reference_urls=[],
        )

    def _compute(self, nll, tokens):
        if len(nll) != len(tokens):
            raise ValueError(f"{len(nll)} nll values but {len(tokens)} token counts")
        if any(n is None or n != n or n < 0 for n in nll):
            raise ValueError("nll values must be non-negative numbers (summed negative log-likelihoods in nats)")
        if any(t is None or t < 0 for t in tokens):
            raise ValueError("token counts must be non-negative integers")
        total_nll = math.fsum(float(n) for n in nll)
        total_tokens = int(sum(int(t) for t in tokens))
        if total_tokens == 0:
            raise ValueError("no predicted tokens: sum(tokens) is 0")
        loss = total_nll / total_tokens
        try:
            ppl = math.exp(loss)
        except OverflowError:
            ppl = float("inf")
        return {"perplexity": ppl, "loss": loss, "nll": total_nll, "tokens": total_tokens}
