"""The depth-wise LSTM Transformer (Xu et al., arXiv 2007.06257) as a model family.

No model code of its own: the core encoder and decoder run the layers and the connection that
``depth_connection = "depthwise_lstm"`` selects (``depthwise_lstm.py``, seam 2). This file binds the
family config so that ``model_type = "depthwise_lstm"`` loads through the Auto classes and saved
checkpoints carry the family name.
"""

from __future__ import annotations

from .configuration_depthwise_lstm import DepthwiseLSTMConfig
from .modeling_fusion_transformer import FusionTransformerForConditionalGeneration, FusionTransformerModel


class DepthwiseLSTMModel(FusionTransformerModel):
    """The depth-wise LSTM encoder-decoder without an output head."""

    config_class = DepthwiseLSTMConfig


class DepthwiseLSTMForConditionalGeneration(FusionTransformerForConditionalGeneration):
    """The depth-wise LSTM seq2seq model with its LM head, for ``Seq2SeqTrainer`` and ``generate``."""

    config_class = DepthwiseLSTMConfig


__all__ = ["DepthwiseLSTMModel", "DepthwiseLSTMForConditionalGeneration"]
