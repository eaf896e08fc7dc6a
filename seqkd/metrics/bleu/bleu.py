"""sacreBLEU corpus BLEU + chrF (with their signatures) as an ``evaluate`` metric.

Loaded from this local file (no Hub access): ``seqkd.metrics.load("bleu")``.
Kept free of ``seqkd`` imports: ``evaluate`` copies this file into its module cache.
"""

import datasets
import evaluate
from sacrebleu.metrics import BLEU, CHRF

_CITATION = """\
@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores",
    author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
    year = "2018",
    pages = "186--191",
}
"""

_DESCRIPTION = """\
Corpus BLEU and chrF computed by sacreBLEU on detokenized text, returned with sacreBLEU's
signatures (which record the number of references, case, tokenizer, smoothing and version) so
that scores can be reported reproducibly. Same numbers as seqkd.evaluation.corpus_bleu /
corpus_chrf.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): one system output per sentence.
    references (list of str, or list of list of str): one reference, or a list of references,
        per prediction (the number may vary between predictions).
    tokenize (str): sacreBLEU tokenizer for BLEU: "13a" (default), "intl", "char", "zh",
        "ja-mecab", "none" (already tokenized text), ...
    lowercase (bool): case-insensitive BLEU and chrF. Default False.
    chrf_word_order (int): 0 = chrF (default), 2 = chrF++.
Returns:
    bleu (float): corpus BLEU, 0-100.
    chrf (float): corpus chrF, 0-100.
    signature (str): BLEU signature, e.g. "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0".
    chrf_signature (str): chrF signature.
    precisions (list of float): n-gram precisions 1-4 (percent).
    bp (float): brevity penalty.
    sys_len (int), ref_len (int): hypothesis and reference lengths in BLEU tokens.
Examples:
    >>> bleu = seqkd.metrics.load("bleu")
    >>> bleu.compute(predictions=["the cat sat on the mat"], references=["the cat sat on the mat"])["bleu"]
    100.00000000000004
"""


def _streams(references):
    per_hyp = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not rs for rs in per_hyp):
        raise ValueError("every prediction needs at least one reference")
    n_refs = max(len(rs) for rs in per_hyp)
    return [[rs[k] if k < len(rs) else None for rs in per_hyp] for k in range(n_refs)]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
                ),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
            codebase_urls=["https://github.com/mjpost/sacrebleu"],
            reference_urls=["https://aclanthology.org/W18-6319/"],
        )

    def _compute(self, predictions, references, tokenize="13a", lowercase=False, chrf_word_order=0):
        if not predictions:
            raise ValueError("no predictions to score")
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        streams = _streams(references)
        bleu = BLEU(tokenize=tokenize, lowercase=lowercase)
        chrf = CHRF(word_order=chrf_word_order, lowercase=lowercase)
        b = bleu.corpus_score(list(predictions), streams)
        c = chrf.corpus_score(list(predictions), streams)
        return {
            "bleu": float(b.score),
            "chrf": float(c.score),
            "signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature()),
            "precisions": [float(p) for p in b.precisions],
            "bp": float(b.bp),
            "sys_len": int(b.sys_len),
            "ref_len": int(b.ref_len),
        }
