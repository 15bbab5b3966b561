"""The seams compose: a matrix over combinations of families, each trained a step, decoded with
and without cache, and (for one rich combination) reloaded without hf_fusion."""

from __future__ import annotations

import pytest

import hf_fusion  # noqa: F401  (registers the families with the Auto classes)
from tests.helpers import assert_cached_decoding_matches, assert_roundtrip_in_clean_process, build_tiny, random_batch

# (model_type, fields): every seam exercised at least once beside another seam's variant.
COMBINATIONS = {
    "surface_on_recurrent": ("surface_fusion", {"sharing_strategy": "recurrent"}),
    "surface_on_dlstm": ("surface_fusion", {"depth_connection": "depthwise_lstm"}),
    "fine_grained_on_cycle_rev": (
        "encoder_fusion",
        {"fusion_mode": "fine_grained", "encoder_layers": 3, "decoder_layers": 3, "sharing_strategy": "cycle_rev",
         "encoder_unique_layers": 2, "decoder_unique_layers": 2},
    ),
    "transparent_on_dlstm": ("encoder_fusion", {"fusion_mode": "transparent", "depth_connection": "depthwise_lstm"}),
    "dlstm_recurrent_concat": ("depthwise_lstm", {"sharing_strategy": "recurrent", "dlstm_decoder_mode": "concat"}),
    "dlcl_with_surface_head": ("encoder_fusion", {"fusion_mode": "dlcl", "output_head": "surface_fusion"}),
    "everything": (
        "surface_fusion",
        {"depth_connection": "depthwise_lstm", "encoder_memory": "fine_grained", "sharing_strategy": "recurrent",
         "surface_fusion_lambda": None},
    ),
}


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_combination_trains_generates_and_caches(name):
    model_type, fields = COMBINATIONS[name]
    model = build_tiny(model_type, **fields).train()
    batch = random_batch()
    labels = batch.pop("decoder_input_ids")
    loss = model(**batch, labels=labels).loss
    loss.backward()
    without_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not without_grad, without_grad
    assert_cached_decoding_matches(model, random_batch())
    out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=3, max_new_tokens=5)
    assert out.shape[0] == batch["input_ids"].shape[0]


@pytest.mark.slow
def test_richest_combination_round_trips_without_hf_fusion(tmp_path):
    model_type, fields = COMBINATIONS["everything"]
    assert_roundtrip_in_clean_process(build_tiny(model_type, **fields), tmp_path)
