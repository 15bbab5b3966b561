"""Corpus BLEU and chrF for translation, as an ``evaluate`` metric module that ships with hf_fusion.

``evaluate.load("sacrebleu")`` downloads its script from the Hub, which fails offline; this module
is loaded by path instead (``training.metrics.load_translation_metric()``), so evaluation works
with ``HF_HUB_OFFLINE=1``. Both scores come from sacrebleu with its standard settings (BLEU:
``13a`` tokenisation, exponential smoothing; chrF: character 6-grams, beta 2), so numbers are
comparable with published sacreBLEU scores on the same references.
"""

from __future__ import annotations

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
@inproceedings{popovic-2015-chrf,
    title = "chr{F}: character n-gram {F}-score for automatic {MT} evaluation",
    author = "Popovi{\'c}, Maja",
    booktitle = "Proceedings of the Tenth Workshop on Statistical Machine Translation",
    year = "2015",
    pages = "392--395",
}
"""

_DESCRIPTION = "Corpus-level BLEU and chrF (sacrebleu) of detokenised translations against one or more references."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): detokenised system outputs.
    references (list of str, or list of list of str): one reference per prediction, or the same
        number of references for every prediction.
    bleu_tokenize (str): sacrebleu BLEU tokeniser, default "13a" (use "intl" or "char" for other scripts).
    lowercase (bool): case-insensitive BLEU and chrF, default False.
    chrf_word_order (int): 0 for chrF (default), 2 for chrF++.
Returns:
    bleu (float): corpus BLEU, 0-100.
    chrf (float): corpus chrF (or chrF++), 0-100.
Examples:
    >>> metric = training.metrics.load_translation_metric()
    >>> metric.compute(predictions=["Das ist gut."], references=["Das ist gut."])
    {'bleu': 100.00000000000004, 'chrf': 100.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TranslationMetrics(evaluate.Metric):
    """sacrebleu corpus BLEU + chrF in one ``compute`` call."""

    def _info(self) -> evaluate.MetricInfo:
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
            reference_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[str] | list[list[str]],
        bleu_tokenize: str = "13a",
        lowercase: bool = False,
        chrf_word_order: int = 0,
    ) -> dict[str, float]:
        # Normalise to one list of references per prediction.
        references = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
        num_refs = {len(refs) for refs in references}
        if len(num_refs) != 1:
            raise ValueError(f"Every prediction needs the same number of references; got counts {sorted(num_refs)}.")
        # sacrebleu wants reference *streams*: stream k holds the k-th reference of every sentence.
        streams = [list(stream) for stream in zip(*references)]
        bleu = BLEU(tokenize=bleu_tokenize, lowercase=lowercase).corpus_score(predictions, streams)
        chrf = CHRF(word_order=chrf_word_order, lowercase=lowercase).corpus_score(predictions, streams)
        return {"bleu": float(bleu.score), "chrf": float(chrf.score)}
