"""E2S2: encoder-side objectives for seq2seq pretraining, for any Hugging Face seq2seq LM.

Zhong et al., "E2S2: Encoding-Enhanced Sequence-to-Sequence Pretraining for Language
Understanding and Generation" (arXiv 2205.14912; official code: a fairseq fork, BART only).
Plain BART pretraining only supervises the decoder; E2S2 adds two losses on the encoder output:

    L = w·NLL(main) + w·NLL(second) + λ_de·L_de + λ_cl·L_cl        w = 0.5, λ_de = λ_cl = 0.05

Everything lives outside the model folder (seam 5 of hf_fusion: the corruption lives in the data
collator, the extra losses are reported as ``loss_terms`` beside the loss, the heads are dropped
for fine-tuning), one module per piece:

- ``collator.py``: :class:`E2S2DataCollator` turns raw text into two corrupted views of each text.
  The *second view* is BART span masking (a share ``mask_ratio`` of the tokens, span lengths ~
  Poisson(λ), each span replaced by one mask token). The *main view* is the second view plus local
  trigram shuffling and random token replacement, with a per-token label original(0) /
  shuffled(1) / replaced(2). Both decoders reconstruct the original text. ``objective="bart"``
  gives the plain BART baseline (span masking only, one view).
- ``model.py``: :class:`E2S2ForPreTraining` wraps any seq2seq LM (an hf_fusion model, or a stock
  ``BartForConditionalGeneration``): a 3-way denoising head ``Linear(d, 3)`` after dropout on the
  final encoder output, and a SimCLR NT-Xent contrastive loss between the masked-mean-pooled,
  L2-normalised encoder outputs of the two views (in-batch negatives from both views).
  ``save_backbone`` exports the plain model; ``save_pretrained`` writes the same plain-model
  folder plus the head weights, so every checkpoint also loads directly for fine-tuning.
- ``trainer.py``: :class:`E2S2Trainer` logs every loss term (``loss_terms/<name>``, as every
  hf_fusion trainer does), draws fresh noise each epoch and checkpoints/resumes the wrapper.
- ``pretrain.py``: the ``hf-fusion pretrain-e2s2`` command.

The deviations from the official code, with the reasons, are listed in the docstrings of
``collator.py`` (the noise) and ``model.py`` (the losses).
"""

from .collator import OBJECTIVES, E2S2DataCollator, poisson_span_mask, replace_randomly, shuffle_trigrams
from .model import (
    HEADS_CONFIG_NAME,
    HEADS_WEIGHTS_NAME,
    E2S2ForPreTraining,
    E2S2Output,
    denoising_loss,
    masked_mean_pool,
    nt_xent_loss,
)
from .trainer import E2S2Trainer

__all__ = [
    "HEADS_CONFIG_NAME",
    "HEADS_WEIGHTS_NAME",
    "OBJECTIVES",
    "E2S2DataCollator",
    "E2S2ForPreTraining",
    "E2S2Output",
    "E2S2Trainer",
    "masked_mean_pool",
    "nt_xent_loss",
    "denoising_loss",
    "poisson_span_mask",
    "shuffle_trigrams",
    "replace_randomly",
]
