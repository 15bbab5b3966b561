"""transformers' own model contract, on BART (the control) and on every hf_fusion family and mode.

Each class below runs transformers' ``ModelTesterMixin`` (from the sdist of the installed release,
see ``tests/transformers_suite.py``), our generation contract in place of ``GenerationTesterMixin``
(``tests/generation_contract.py``) and ``ConfigTester``, with one BART-style model tester: width 16,
2+2 layers, 4 heads, vocabulary 99, the sizes transformers tests BART with. BART runs the same
classes unchanged, so a test that fails for a family but passes for BART is our bug; the only
exceptions are listed in ``DESIGN_SKIPS`` with the design reason that makes the test inapplicable.
"""

from __future__ import annotations

import unittest
from typing import Any

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, BartModel
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

from hf_fusion import (
    DepthwiseLSTMConfig,
    DepthwiseLSTMForConditionalGeneration,
    DepthwiseLSTMModel,
    EncoderFusionConfig,
    EncoderFusionForConditionalGeneration,
    EncoderFusionModel,
    FusionTransformerConfig,
    FusionTransformerForConditionalGeneration,
    FusionTransformerModel,
    RecurrentStackingConfig,
    RecurrentStackingForConditionalGeneration,
    RecurrentStackingModel,
    SurfaceFusionConfig,
    SurfaceFusionForConditionalGeneration,
    SurfaceFusionModel,
)
from tests.transformers_suite import load_common_tests

pytestmark = pytest.mark.slow  # not in make test-fast

modeling_common, configuration_common = load_common_tests()
ModelTesterMixin = modeling_common.ModelTesterMixin
GenerationTesterMixin = modeling_common.GenerationTesterMixin
ConfigTester = configuration_common.ConfigTester
ids_tensor = modeling_common.ids_tensor
# The name tables of a base model and of a seq2seq LM, in the order of each variant's model classes.
NAME_TABLES = (MODEL_MAPPING_NAMES, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)


class Seq2SeqModelTester:
    """BART's model tester, for any config class: the inputs and sizes transformers tests BART with.

    Args:
        parent: The test case.
        config_class: The config class to build.
        overrides: Extra config fields (a family's mode).
    """

    def __init__(self, parent: unittest.TestCase, config_class: type, overrides: dict[str, Any]):
        self.parent = parent
        self.config_class = config_class
        self.overrides = overrides
        self.batch_size = 13
        self.seq_length = 7
        self.is_training = True
        self.use_labels = False
        self.vocab_size = 99
        self.hidden_size = 16
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.intermediate_size = 4
        self.hidden_act = "gelu"
        self.hidden_dropout_prob = 0.1
        self.attention_probs_dropout_prob = 0.1
        self.max_position_embeddings = 50
        self.eos_token_id = 2
        self.pad_token_id = 1
        self.bos_token_id = 0

    def get_config(self):
        return self.config_class(
            vocab_size=self.vocab_size,
            d_model=self.hidden_size,
            encoder_layers=self.num_hidden_layers,
            decoder_layers=self.num_hidden_layers,
            encoder_attention_heads=self.num_attention_heads,
            decoder_attention_heads=self.num_attention_heads,
            encoder_ffn_dim=self.intermediate_size,
            decoder_ffn_dim=self.intermediate_size,
            dropout=self.hidden_dropout_prob,
            attention_dropout=self.attention_probs_dropout_prob,
            max_position_embeddings=self.max_position_embeddings,
            eos_token_id=self.eos_token_id,
            bos_token_id=self.bos_token_id,
            pad_token_id=self.pad_token_id,
            **self.overrides,
        )

    def prepare_config_and_inputs(self) -> tuple[Any, dict[str, torch.Tensor]]:
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size).clamp(3)
        input_ids[:, -1] = self.eos_token_id
        decoder_input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        config = self.get_config()
        attention_mask = input_ids.ne(config.pad_token_id)
        inputs = {
            "input_ids": input_ids,
            "decoder_input_ids": decoder_input_ids,
            "attention_mask": attention_mask,
            "decoder_attention_mask": decoder_input_ids.ne(config.pad_token_id),
        }
        return config, inputs

    def prepare_config_and_inputs_for_common(self) -> tuple[Any, dict[str, torch.Tensor]]:
        return self.prepare_config_and_inputs()


# Tests that cannot apply to a family by design, with the reason; every other test that passes for
# BART must pass for every family.
FAMILY_SKIPS = {
    "test_capture_outputs_decorator": (
        "checks transformers' `capture_outputs` hook decorator, which records each layer's output; hf_fusion's "
        "stacks collect hidden states themselves because what a depth step exposes is the depth connection's "
        "state (DLCL mixes earlier layers, the depth-wise LSTM exposes h of a packed [h; c]), not a layer output"
    ),
}
SURFACE_FUSION_SKIPS = {
    **FAMILY_SKIPS,
    "test_encoder_decoder_loss_no_double_shift": (
        "SurfaceFusion's loss is the paper's mixture lambda CE_tgt + (1 - lambda) CE_src, by design not the "
        "cross-entropy of the returned logits (log P of the mixture)"
    ),
}

# name -> (config class, (base model, LM model), config overrides, design skips)
VARIANTS: dict[str, tuple[type, tuple[type, type], dict[str, Any], dict[str, str]]] = {
    "bart": (BartConfig, (BartModel, BartForConditionalGeneration), {}, {}),
    "fusion_transformer": (FusionTransformerConfig, (FusionTransformerModel, FusionTransformerForConditionalGeneration), {}, FAMILY_SKIPS),
    "encoder_fusion_transparent": (
        EncoderFusionConfig, (EncoderFusionModel, EncoderFusionForConditionalGeneration), {"fusion_mode": "transparent"}, FAMILY_SKIPS
    ),
    "encoder_fusion_fine_grained": (
        EncoderFusionConfig, (EncoderFusionModel, EncoderFusionForConditionalGeneration), {"fusion_mode": "fine_grained"}, FAMILY_SKIPS
    ),
    "encoder_fusion_dlcl": (
        EncoderFusionConfig, (EncoderFusionModel, EncoderFusionForConditionalGeneration), {"fusion_mode": "dlcl"}, FAMILY_SKIPS
    ),
    "surface_fusion_hard": (
        SurfaceFusionConfig, (SurfaceFusionModel, SurfaceFusionForConditionalGeneration), {}, SURFACE_FUSION_SKIPS
    ),
    "surface_fusion_soft": (
        SurfaceFusionConfig,
        (SurfaceFusionModel, SurfaceFusionForConditionalGeneration),
        {"surface_fusion_mode": "soft"},
        SURFACE_FUSION_SKIPS,
    ),
    "recurrent_stacking": (
        RecurrentStackingConfig, (RecurrentStackingModel, RecurrentStackingForConditionalGeneration), {}, FAMILY_SKIPS
    ),
    "depthwise_lstm_per_sublayer": (
        DepthwiseLSTMConfig, (DepthwiseLSTMModel, DepthwiseLSTMForConditionalGeneration), {}, FAMILY_SKIPS
    ),
    "depthwise_lstm_concat": (
        DepthwiseLSTMConfig,
        (DepthwiseLSTMModel, DepthwiseLSTMForConditionalGeneration),
        {"dlstm_decoder_mode": "concat"},
        FAMILY_SKIPS,
    ),
}


def make_test_case(
    name: str, config_class: type, model_classes: tuple[type, type], overrides: dict[str, Any], skips: dict[str, str]
) -> type:
    """One ``unittest.TestCase`` running transformers' common tests on ``name``."""

    class ContractTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
        all_model_classes = model_classes
        is_encoder_decoder = True

        @classmethod
        def setUpClass(cls) -> None:
            # The common tests tell a base model from a task model by transformers' built-in name
            # tables (a base model has no loss to train). ``AutoModel.register`` does not write
            # them, so for the duration of the class our names are entered where BART's stand.
            cls.registered = []
            model_type = config_class.model_type
            for table, model_class in zip(NAME_TABLES, model_classes):
                if model_type not in table:
                    table[model_type] = model_class.__name__
                    cls.registered.append(table)

        @classmethod
        def tearDownClass(cls) -> None:
            for table in cls.registered:
                del table[config_class.model_type]

        def setUp(self) -> None:
            self.model_tester = Seq2SeqModelTester(self, config_class, overrides)
            self.config_tester = ConfigTester(self, config_class=config_class, **overrides)

        def test_config(self) -> None:
            self.config_tester.run_common_tests()

    for test_name, reason in skips.items():
        setattr(ContractTest, test_name, unittest.skip(reason)(lambda self: None))
    ContractTest.__name__ = ContractTest.__qualname__ = "Test" + "".join(part.title() for part in name.split("_"))
    return ContractTest


for _name, _spec in VARIANTS.items():
    _case = make_test_case(_name, *_spec)
    globals()[_case.__name__] = _case
del _name, _spec, _case
