"""Every attention kernel of the HF interface gets the mask it takes and gives SDPA's numbers.

SDPA and eager take the boolean masks; flash attention takes a 2-D key padding mask and applies
causality itself; flex attention takes a ``BlockMask``. Flash attention cannot run on a CPU, so
its contract is checked with a stand-in registered under its name that does what the flash
kernel does with its inputs (rejects anything but a 2-D mask, bottom-right aligned causality) in
plain torch. Every comparison is against the SDPA model on padded batches, both for a full
forward and step by step through the cache. Also here: a bf16 training step on CPU.
"""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_fusion.layers import kernel_mask
from tests.helpers import FAMILIES, build_tiny, random_batch


def logits_and_cached_generation(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced logits, and greedy generation's tokens and per-step logits (cached)."""
    source = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        logits = model(**batch).logits
        out = model.generate(
            **source, max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    return logits, out.sequences, torch.stack(out.logits, dim=1)


def with_kernel(model: torch.nn.Module, implementation: str) -> torch.nn.Module:
    """The same model switched to another attention implementation (no copy: the config's
    ``_attn_implementation`` is read at every call)."""
    model.config._attn_implementation = implementation
    return model


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_eager_equals_sdpa_with_padding_and_cache(model_type: str) -> None:
    torch.manual_seed(0)
    model = build_tiny(model_type, **FAMILIES[model_type]).eval()
    batch = random_batch()
    assert batch["attention_mask"].min() == 0  # padded rows are part of the comparison
    sdpa = logits_and_cached_generation(with_kernel(model, "sdpa"), batch)
    eager = logits_and_cached_generation(with_kernel(model, "eager"), batch)
    torch.testing.assert_close(eager[0], sdpa[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(eager[1], sdpa[1])
    torch.testing.assert_close(eager[2], sdpa[2], atol=1e-5, rtol=1e-5)


def flash_standin(calls: list[int]):
    """What flash attention does with its inputs, in plain torch: a 2-D (batch, key_len) 0/1
    key padding mask or none, causality from ``module.is_causal`` aligned to the last key."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        assert attention_mask is None or attention_mask.dim() == 2, f"flash attention got a {attention_mask.dim()}-D mask"
        calls.append(0 if attention_mask is None else 2)
        query_len, key_len = query.shape[2], key.shape[2]
        allowed = torch.ones(query_len, key_len, dtype=torch.bool)
        if module.is_causal if is_causal is None else is_causal:
            allowed = torch.arange(key_len)[None, :] <= torch.arange(key_len - query_len, key_len)[:, None]
        allowed = allowed[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        scores = (query @ key.transpose(2, 3)) * scaling
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        return (weights @ value).transpose(1, 2).contiguous(), None

    return attention


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_flash_attention_gets_2d_padding_masks_and_matches_sdpa(model_type: str, monkeypatch) -> None:
    torch.manual_seed(0)
    model = build_tiny(model_type, **FAMILIES[model_type]).eval()
    batch = random_batch()
    sdpa = logits_and_cached_generation(with_kernel(model, "sdpa"), batch)
    calls: list[int] = []
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", flash_standin(calls))
    flash = logits_and_cached_generation(with_kernel(model, "flash_attention_2"), batch)
    assert 2 in calls and 0 in calls  # padded sources reach it as 2-D masks, causal steps as none
    torch.testing.assert_close(flash[0], sdpa[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(flash[1], sdpa[1])
    torch.testing.assert_close(flash[2], sdpa[2], atol=1e-5, rtol=1e-5)


def test_flash_attention_refuses_a_4d_mask_it_cannot_express() -> None:
    """A static cache hands the decoder a 4-D mask over the whole cache; flash attention has no
    way to take it, so the model says so instead of attending wrongly."""
    static_cache_mask = torch.ones(2, 1, 1, 8, dtype=torch.bool).tril(diagonal=3)
    with pytest.raises(ValueError, match="attn_implementation = 'flash_attention_2' takes a 2-D padding mask"):
        kernel_mask("flash_attention_2", static_cache_mask, None, 2, 1, 8, causal=True, device=torch.device("cpu"))


@pytest.mark.slow  # flex attention compiles its kernel
@pytest.mark.parametrize("model_type", ["fusion_transformer", "surface_fusion"])
def test_flex_attention_matches_sdpa(model_type: str) -> None:
    torch.manual_seed(0)
    model = build_tiny(model_type, **FAMILIES[model_type]).eval()
    batch = random_batch()
    sdpa = logits_and_cached_generation(with_kernel(model, "sdpa"), batch)
    flex = logits_and_cached_generation(with_kernel(model, "flex_attention"), batch)
    torch.testing.assert_close(flex[0], sdpa[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(flex[1], sdpa[1])
    torch.testing.assert_close(flex[2], sdpa[2], atol=1e-5, rtol=1e-5)


def test_attn_implementation_is_accepted_at_load_for_every_declared_kernel() -> None:
    for implementation in ("eager", "sdpa", "flex_attention"):
        model = build_tiny(attn_implementation=implementation)
        assert model.config._attn_implementation == implementation
    assert type(model)._supports_flash_attn and type(model)._supports_flex_attn and type(model)._supports_sdpa


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_bf16_training_step_on_cpu(model_type: str) -> None:
    """A bf16 forward/backward gives the float32 loss to bf16 precision and finite gradients on
    every parameter that trains."""
    torch.manual_seed(0)
    model = build_tiny(model_type, **{**FAMILIES[model_type], "dropout": 0.0})
    batch = random_batch()
    labels = batch.pop("decoder_input_ids")
    reference = model(**batch, labels=labels).loss
    model = model.to(torch.bfloat16)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    assert loss.dtype == torch.float32  # the loss is computed in float32 from bf16 logits
    torch.testing.assert_close(loss, reference.detach(), atol=0.05, rtol=0.02)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


def test_projections_fuse_only_where_no_gradient_is_recorded(monkeypatch) -> None:
    """Fused Q/K/V products would keep their concatenated weights for the backward pass (more
    training memory than BART for no speed), so training runs the three projections; inference
    fuses them, with the unfused path's numbers; and a hook on one projection is never bypassed."""
    from hf_fusion import layers

    calls = []
    original = layers.fused_linear

    def counting(hidden_states, projections):
        calls.append(len(projections))
        return original(hidden_states, projections)

    monkeypatch.setattr(layers, "fused_linear", counting)
    model = build_tiny("fusion_transformer").eval()
    batch = random_batch()
    trained = model(**batch).logits
    assert calls == []
    with torch.no_grad():
        inferred = model(**batch).logits
    layer_count = model.config.encoder_layers + model.config.decoder_layers
    assert calls.count(3) == layer_count and calls.count(2) == model.config.decoder_layers  # self Q/K/V, cross K/V
    torch.testing.assert_close(inferred, trained.detach(), rtol=1e-5, atol=1e-5)

    calls.clear()
    seen = []
    model.model.encoder.layers[0].self_attn.q_proj.register_forward_hook(lambda *args: seen.append(True))
    with torch.no_grad():
        model(**batch)
    assert seen == [True] and calls.count(3) == layer_count - 1
