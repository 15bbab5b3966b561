"""Evaluation metrics that ship with the project and load offline."""

from __future__ import annotations

from pathlib import Path

import evaluate

TRANSLATION_METRICS_PATH = Path(__file__).with_name("translation_metrics.py")


def load_translation_metric(**kwargs) -> evaluate.EvaluationModule:
    """Load the bundled BLEU + chrF metric by file path (never from the Hub, so it works offline).

    Keyword arguments go to ``evaluate.load`` (e.g. ``experiment_id``, ``process_id`` and
    ``num_process`` for distributed evaluation). ``compute(predictions=[...], references=[...])``
    returns ``{"bleu": float, "chrf": float}``.
    """
    return evaluate.load(str(TRANSLATION_METRICS_PATH), **kwargs)
