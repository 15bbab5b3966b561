"""Parity: the vanilla core with copied BART / mBART / Marian weights computes what they compute."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    MarianConfig,
    MarianMTModel,
    MBartConfig,
    MBartForConditionalGeneration,
)

from hf_fusion import FusionTransformerForConditionalGeneration, convert_from_pretrained
from tests.helpers import random_batch
from training.cli import main as cli

SIZES = dict(
    vocab_size=100,
    d_model=16,
    encoder_layers=2,
    decoder_layers=3,
    encoder_attention_heads=2,
    decoder_attention_heads=4,
    encoder_ffn_dim=32,
    decoder_ffn_dim=24,
    max_position_embeddings=64,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
)


def bart() -> BartForConditionalGeneration:
    return BartForConditionalGeneration(BartConfig(**SIZES, activation_function="gelu"))


def mbart() -> MBartForConditionalGeneration:
    return MBartForConditionalGeneration(MBartConfig(**SIZES, scale_embedding=True, activation_function="relu"))


def marian() -> MarianMTModel:
    return MarianMTModel(MarianConfig(**{**SIZES, "decoder_start_token_id": 1}, scale_embedding=True, activation_function="swish"))


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Random LayerNorm and bias values too, so that a misplaced norm or bias cannot hide."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name or "layernorm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.2)
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("build", [bart, mbart, marian], ids=["bart", "mbart", "marian"])
def test_logits_and_generation_match_the_source_model(build):
    source = randomise(build())
    converted = convert_from_pretrained(source).eval()
    assert isinstance(converted, FusionTransformerForConditionalGeneration)
    batch = random_batch()
    with torch.no_grad():
        expected = source(**batch).logits
        got = converted(**batch).logits
    assert (got - expected).abs().max().item() <= 1e-4
    for kwargs in ({"do_sample": False}, {"num_beams": 4, "do_sample": False}):
        want = source.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=8, **kwargs)
        have = converted.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=8, **kwargs)
        assert torch.equal(want, have), kwargs


def test_converted_model_keeps_parity_after_save_and_reload(tmp_path):
    source = randomise(marian())
    convert_from_pretrained(source).save_pretrained(tmp_path)
    reloaded = FusionTransformerForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, source(**batch).logits, atol=1e-4, rtol=0)


def test_cli_converts_a_local_checkpoint(tmp_path, capsys):
    source = randomise(bart())
    source.save_pretrained(tmp_path / "bart")
    assert cli(["convert", str(tmp_path / "bart"), str(tmp_path / "out"), "--model_config.dropout", "0.2"]) == 0
    converted = FusionTransformerForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert converted.config.dropout == 0.2
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(converted(**batch).logits, source(**batch).logits, atol=1e-4, rtol=0)
    assert "Converted" in capsys.readouterr().out


def test_unsupported_source_and_impossible_targets_are_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="supported source model types: bart, mbart, marian"):
        convert_from_pretrained(t5)
    with pytest.raises(ValueError, match="have no place"):
        convert_from_pretrained(bart(), decoder_layers=2)
    with pytest.raises(ValueError, match="not an hf_fusion family"):
        convert_from_pretrained(bart(), model_type="bart")
    with pytest.raises(OSError, match="Could not load the source checkpoint"):
        convert_from_pretrained("/nonexistent/folder")
