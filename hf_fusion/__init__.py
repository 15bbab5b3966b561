"""hf_fusion: Hub-native seq2seq Transformers that change how layers connect and share parameters.

Importing the package registers every model family with the Auto classes (so
``AutoModelForSeq2SeqLM.from_config`` / ``from_pretrained`` work without ``trust_remote_code``
where hf_fusion is installed) and with ``register_for_auto_class`` (so ``save_pretrained`` writes a
self-contained folder that loads with ``trust_remote_code=True`` where it is not).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from .configuration_depthwise_lstm import DepthwiseLSTMConfig
from .configuration_encoder_fusion import EncoderFusionConfig
from .configuration_fusion_transformer import FusionTransformerConfig
from .configuration_recurrent_stacking import RecurrentStackingConfig
from .configuration_surface_fusion import SurfaceFusionConfig
from .modeling_depthwise_lstm import DepthwiseLSTMForConditionalGeneration, DepthwiseLSTMModel
from .modeling_encoder_fusion import EncoderFusionForConditionalGeneration, EncoderFusionModel
from .modeling_fusion_transformer import (
    FusionTransformerForConditionalGeneration,
    FusionTransformerModel,
    FusionTransformerPreTrainedModel,
)
from .modeling_recurrent_stacking import RecurrentStackingForConditionalGeneration, RecurrentStackingModel
from .modeling_surface_fusion import SurfaceFusionForConditionalGeneration, SurfaceFusionModel

# model_type -> (config class, base model class, LM class) of every model family.
MODEL_FAMILIES = {
    config_class.model_type: (config_class, base_class, lm_class)
    for config_class, base_class, lm_class in (
        (FusionTransformerConfig, FusionTransformerModel, FusionTransformerForConditionalGeneration),
        (EncoderFusionConfig, EncoderFusionModel, EncoderFusionForConditionalGeneration),
        (SurfaceFusionConfig, SurfaceFusionModel, SurfaceFusionForConditionalGeneration),
        (RecurrentStackingConfig, RecurrentStackingModel, RecurrentStackingForConditionalGeneration),
        (DepthwiseLSTMConfig, DepthwiseLSTMModel, DepthwiseLSTMForConditionalGeneration),
    )
}


def _register_families() -> None:
    for config_class, base_class, lm_class in MODEL_FAMILIES.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, base_class, exist_ok=True)
        AutoModelForSeq2SeqLM.register(config_class, lm_class, exist_ok=True)
        config_class.register_for_auto_class()
        base_class.register_for_auto_class("AutoModel")
        lm_class.register_for_auto_class("AutoModelForSeq2SeqLM")


_register_families()

from .convert import convert_from_pretrained  # noqa: E402  (needs the registered families)
from .transfer import transfer_from_pretrained  # noqa: E402  (needs the registered families)

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
    "RecurrentStackingConfig",
    "RecurrentStackingModel",
    "RecurrentStackingForConditionalGeneration",
    "DepthwiseLSTMConfig",
    "DepthwiseLSTMModel",
    "DepthwiseLSTMForConditionalGeneration",
    "convert_from_pretrained",
    "transfer_from_pretrained",
]
