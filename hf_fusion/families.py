"""The model families and their registration with the Auto classes.

One table, ``MODEL_FAMILIES``: model_type -> (config class, base model class, LM class). Library
tools (conversion, transfer, checkpoint-code refresh) import it from here; the package's
``__init__`` registers the families once on import. Registration does two things: the Auto classes
find the families without ``trust_remote_code`` where hf_fusion is installed, and
``register_for_auto_class`` makes ``save_pretrained`` write a self-contained folder (code and
``auto_map``) that loads with ``trust_remote_code=True`` where it is not.
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
from .modeling_fusion_transformer import FusionTransformerForConditionalGeneration, FusionTransformerModel
from .modeling_recurrent_stacking import RecurrentStackingForConditionalGeneration, RecurrentStackingModel
from .modeling_surface_fusion import SurfaceFusionForConditionalGeneration, SurfaceFusionModel

MODEL_FAMILIES: dict[str, tuple[type, type, type]] = {
    config_class.model_type: (config_class, base_class, lm_class)
    for config_class, base_class, lm_class in (
        (FusionTransformerConfig, FusionTransformerModel, FusionTransformerForConditionalGeneration),
        (EncoderFusionConfig, EncoderFusionModel, EncoderFusionForConditionalGeneration),
        (SurfaceFusionConfig, SurfaceFusionModel, SurfaceFusionForConditionalGeneration),
        (RecurrentStackingConfig, RecurrentStackingModel, RecurrentStackingForConditionalGeneration),
        (DepthwiseLSTMConfig, DepthwiseLSTMModel, DepthwiseLSTMForConditionalGeneration),
    )
}


def register_families() -> None:
    """Register every family with AutoConfig / AutoModel / AutoModelForSeq2SeqLM (idempotent)."""
    for config_class, base_class, lm_class in MODEL_FAMILIES.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, base_class, exist_ok=True)
        AutoModelForSeq2SeqLM.register(config_class, lm_class, exist_ok=True)
        config_class.register_for_auto_class()
        base_class.register_for_auto_class("AutoModel")
        lm_class.register_for_auto_class("AutoModelForSeq2SeqLM")
