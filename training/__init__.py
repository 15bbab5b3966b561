"""Training-side code for hf_fusion: corpora, tokenizers, metrics, collators and the CLI.

Nothing here is imported by the model folder (``hf_fusion/``), so checkpoints never depend on it.
"""
