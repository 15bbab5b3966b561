"""hf_fusion: Hub-native seq2seq Transformers that change how layers connect and share parameters.

Importing the package registers every model family with the Auto classes (so
``AutoModelForSeq2SeqLM.from_config`` / ``from_pretrained`` work without ``trust_remote_code``
where hf_fusion is installed) and with ``register_for_auto_class`` (so ``save_pretrained`` writes a
self-contained folder that loads with ``trust_remote_code=True`` where it is not).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from .configuration_fusion_transformer import FusionTransformerConfig
from .configuration_recurrent_stacking import RecurrentStackingConfig
from .modeling_fusion_transformer import (
    FusionTransformerForConditionalGeneration,
    FusionTransformerModel,
    FusionTransformerPreTrainedModel,
)
from .modeling_recurrent_stacking import RecurrentStackingForConditionalGeneration, RecurrentStackingModel

# (config class, base model class, LM class) of every model family.
MODEL_FAMILIES = {
    FusionTransformerConfig.model_type: (
        FusionTransformerConfig,
        FusionTransformerModel,
        FusionTransformerForConditionalGeneration,
    ),
    RecurrentStackingConfig.model_type: (
        RecurrentStackingConfig,
        RecurrentStackingModel,
        RecurrentStackingForConditionalGeneration,
    ),
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
    "convert_from_pretrained",
    "RecurrentStackingConfig",
    "RecurrentStackingModel",
    "RecurrentStackingForConditionalGeneration",
    "transfer_from_pretrained",
]
