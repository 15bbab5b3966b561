"""Model-card templates, one per model family (``<model_type>.md``) extending ``base.md``.

A package (not a bare folder) so that the templates travel with a wheel install of hf_fusion;
``training.model_card`` renders them.
"""

from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent
