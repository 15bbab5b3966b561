"""hf_fusion: Hub-native seq2seq Transformers that change how layers connect and share parameters.

Importing the package registers every model family with the Auto classes (so
``AutoModelForSeq2SeqLM.from_config`` / ``from_pretrained`` work without ``trust_remote_code``
where hf_fusion is installed) and with ``register_for_auto_class`` (so ``save_pretrained`` writes a
self-contained folder that loads with ``trust_remote_code=True`` where it is not).
"""

from __future__ import annotations

from .configuration_depthwise_lstm import DepthwiseLSTMConfig
from .configuration_encoder_fusion import EncoderFusionConfig
from .configuration_fusion_transformer import FusionTransformerConfig
from .configuration_recurrent_stacking import RecurrentStackingConfig
from .configuration_surface_fusion import SurfaceFusionConfig
from .families import MODEL_FAMILIES, register_families
from .modeling_depthwise_lstm import DepthwiseLSTMForConditionalGeneration, DepthwiseLSTMModel
from .modeling_encoder_fusion import EncoderFusionForConditionalGeneration, EncoderFusionModel
from .modeling_fusion_transformer import (
    FusionTransformerForConditionalGeneration,
    FusionTransformerModel,
    FusionTransformerPreTrainedModel,
)
from .modeling_recurrent_stacking import RecurrentStackingForConditionalGeneration, RecurrentStackingModel
from .modeling_surface_fusion import SurfaceFusionForConditionalGeneration, SurfaceFusionModel
from .surface_fusion import UnnormalisedBeamScores

register_families()

from .checkpoint_code import refresh_model_code  # noqa: E402  (tools need the registered families)
from .convert import convert_from_pretrained  # noqa: E402
from .transfer import transfer_from_pretrained  # noqa: E402

__all__ = [
    "MODEL_FAMILIES",
    "FusionTransformerConfig",
    "FusionTransformerModel",
    "FusionTransformerPreTrainedModel",
    "FusionTransformerForConditionalGeneration",
    "EncoderFusionConfig",
    "EncoderFusionModel",
    "EncoderFusionForConditionalGeneration",
    "SurfaceFusionConfig",
    "SurfaceFusionModel",
    "SurfaceFusionForConditionalGeneration",
    "UnnormalisedBeamScores",
    "RecurrentStackingConfig",
    "RecurrentStackingModel",
    "RecurrentStackingForConditionalGeneration",
    "DepthwiseLSTMConfig",
    "DepthwiseLSTMModel",
    "DepthwiseLSTMForConditionalGeneration",
    "convert_from_pretrained",
    "refresh_model_code",
    "transfer_from_pretrained",
]
