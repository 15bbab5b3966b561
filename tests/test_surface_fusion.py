"""SurfaceFusion (Liu et al., ICLR 2021): the head's equations, loss, gradient paths, cache, generation,
checkpoints, training and composition with parameter sharing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_fusion import (
    FusionTransformerConfig,
    FusionTransformerForConditionalGeneration,
    SurfaceFusionConfig,
    SurfaceFusionForConditionalGeneration,
    UnnormalisedBeamScores,
    convert_from_pretrained,
)
from hf_fusion.compat import cache_output, output_cache
from hf_fusion.heads import token_cross_entropy
from tests.helpers import (
    TINY,
    assert_cached_decoding_matches,
    assert_roundtrip_in_clean_process,
    build_tiny,
    random_batch,
)

# Head settings the equation tests sweep: fixed and learned hard fusion, soft fusion, several
# heads, no FFN; a pre-norm model so that the query (before the final LayerNorm) differs from the
# target path's decoder output.
HEAD_VARIANTS = {
    "hard": dict(),
    "hard_learned_gate": dict(surface_fusion_lambda=None),
    "soft": dict(surface_fusion_mode="soft", surface_fusion_tau=0.7),
    "hard_2_heads_no_ffn": dict(surface_fusion_heads=2, surface_fusion_ffn=False),
    "prenorm_hard_learned_gate": dict(surface_fusion_lambda=None, normalize_before=True, add_final_layer_norm=True),
    # The official code's ablations: pooled sources, the linear variant, a lower query layer.
    "hard_mean_source": dict(surface_fusion_source="mean"),
    "soft_max_source_linear": dict(surface_fusion_mode="soft", surface_fusion_source="max", surface_fusion_linear=True),
    "prenorm_query_layer_0_learned_gate": dict(
        surface_fusion_query_layer=0, surface_fusion_lambda=None, normalize_before=True, add_final_layer_norm=True
    ),
}


def build(label_smoothing: float = 0.0, spread: float = 0.5, **overrides) -> SurfaceFusionForConditionalGeneration:
    """A tiny SurfaceFusion model in eval mode. ``spread`` re-draws every weight matrix from
    N(0, spread^2) and jitters biases and LayerNorms: the default init (std 0.02) makes the source
    logits nearly constant and the surface attention nearly uniform, which would let a wrong
    surface path pass a numerical comparison unnoticed."""
    model = build_tiny("surface_fusion", label_smoothing=label_smoothing, **overrides)
    if spread:
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() >= 2:
                    parameter.normal_(0.0, spread)
                else:
                    parameter.add_(0.1 * torch.randn_like(parameter))
            model.final_logits_bias.normal_(0.0, 0.1)
    return model.eval()


def labelled_batch() -> dict[str, torch.Tensor]:
    """``random_batch`` plus labels with some ignored (-100) positions."""
    batch = random_batch()
    labels = torch.randint(3, 100, batch["decoder_input_ids"].shape)
    labels[1, -2:] = -100
    return {**batch, "labels": labels}


def recompute(model: SurfaceFusionForConditionalGeneration, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The equations of docs/surface_fusion.md written out with plain tensor ops from the model's own weights.

    Only the encoder-decoder body is run by the model (its outputs h_t before/after the final
    LayerNorm and X^N); V, the attention, the FFN, the projection and the fusion are recomputed here.
    """
    config = model.config
    head = model.output_head
    encoder_out, decoder_out = model.model.encode_decode(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
        output_hidden_states=True,
    )
    query, target, keys = decoder_out.top_layer_state, decoder_out.last_hidden_state, encoder_out.last_hidden_state
    layer = config.surface_fusion_query_layer
    if layer is not None and layer < config.decoder_layers - 1:
        query = decoder_out.hidden_states[layer + 1]  # the state after decoder step ``layer``
    scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
    values = model.model.shared.weight[batch["input_ids"]] * scale  # (batch, src_len, d)
    batch_size, tgt_len, d = query.shape
    keep = batch["attention_mask"][..., None].bool()  # (batch, src_len, 1)

    if config.surface_fusion_source == "mean":
        r = ((values * keep).sum(1) / keep.sum(1))[:, None].expand(-1, tgt_len, -1)
    elif config.surface_fusion_source == "max":
        r = torch.stack([row[mask[:, 0]].max(0).values for row, mask in zip(values, keep)])[:, None].expand(-1, tgt_len, -1)
    else:
        attn, heads = head.surface_attn, config.surface_fusion_heads
        head_dim = d // heads

        def split(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
            return (x @ linear.weight.T + linear.bias).view(batch_size, x.shape[1], heads, head_dim).transpose(1, 2)

        q, k, v = split(query, attn.q_proj), split(keys, attn.k_proj), split(values, attn.v_proj)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)  # (batch, heads, tgt_len, src_len)
        scores = scores.masked_fill(batch["attention_mask"][:, None, None, :] == 0, float("-inf"))
        r = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch_size, tgt_len, d)
        r = r @ attn.out_proj.weight.T + attn.out_proj.bias

    if config.surface_fusion_ffn:
        fc1, fc2 = head.ffn.fc1, head.ffn.fc2

        def ffn(x: torch.Tensor) -> torch.Tensor:
            return x + torch.relu(x @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias

        target, r = ffn(target), ffn(r)
    if config.surface_fusion_linear:
        target, r = target @ head.target_proj.weight.T, r @ head.source_proj.weight.T
    embedding, bias = model.model.shared.weight, model.final_logits_bias
    logits_tgt, logits_src = target @ embedding.T + bias, r @ embedding.T + bias
    log_p_tgt = logits_tgt.log_softmax(-1)
    if config.surface_fusion_mode == "soft":
        log_p_src = (config.surface_fusion_tau * logits_src).log_softmax(-1)
        log_probs = (logits_tgt + log_p_src).log_softmax(-1)
        lam = None
    else:
        log_p_src = logits_src.log_softmax(-1)
        if config.surface_fusion_lambda is None:
            lam = torch.sigmoid(torch.cat([target, r], -1) @ head.gate.weight.T)  # (batch, tgt_len, 1)
        else:
            lam = torch.tensor(config.surface_fusion_lambda)
        log_probs = lam * log_p_tgt + (1 - lam) * log_p_src
    return dict(
        log_probs=log_probs, logits_tgt=logits_tgt, logits_src=logits_src, log_p_src=log_p_src, lam=lam, query=query,
        target=target,
    )


# --- configuration ---------------------------------------------------------------------------


def test_family_defaults_are_the_papers() -> None:
    config = SurfaceFusionConfig(**TINY)
    assert config.model_type == "surface_fusion" and config.output_head == "surface_fusion"
    assert (config.surface_fusion_mode, config.surface_fusion_lambda, config.surface_fusion_tau) == ("hard", 0.8, 1.0)
    assert (config.surface_fusion_heads, config.surface_fusion_ffn) == (1, True)
    # The head is a seam of the base config, usable by any family; the base default stays the LM head.
    assert FusionTransformerConfig(**TINY).output_head == "lm"
    base = FusionTransformerForConditionalGeneration(FusionTransformerConfig(**TINY, output_head="surface_fusion"))
    assert type(base.output_head).__name__ == "SurfaceFusionHead"


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("surface_fusion_mode", "medium", "'hard', 'soft'"),
        ("surface_fusion_lambda", 1.5, "[0, 1], or None"),
        ("surface_fusion_lambda", -0.1, "[0, 1], or None"),
        ("surface_fusion_lambda", "0.8", "expected float | None"),
        ("surface_fusion_tau", 0.0, "(0.0, inf]"),
        ("surface_fusion_tau", -1.0, "(0.0, inf]"),
        ("surface_fusion_heads", 3, "divisors of 16"),
        ("surface_fusion_heads", 0, "positive integer"),
        ("surface_fusion_ffn", "yes", "expected bool"),
        ("surface_fusion_source", "sum", "'attention', 'mean', 'max'"),
        ("surface_fusion_query_layer", 2, "0 to decoder_layers - 1 = 1, or None"),
        ("surface_fusion_linear", 1, "expected bool"),
        ("output_head", "lm", "'surface_fusion'"),
    ],
)
def test_bad_config_is_refused_naming_field_and_allowed_values(field: str, value, allowed: str) -> None:
    with pytest.raises(ValueError) as error:
        SurfaceFusionConfig(**{**TINY, field: value})
    assert field in str(error.value) and allowed in str(error.value)


@pytest.mark.parametrize("ffn, learned_gate", [(True, False), (False, False), (True, True), (False, True)])
def test_parameter_overhead(ffn: bool, learned_gate: bool) -> None:
    """The head adds exactly: attention 4 (d^2 + d), FFN 2 d f + f + d, gate 2 d; nothing else."""
    overrides = dict(surface_fusion_ffn=ffn, surface_fusion_lambda=None if learned_gate else 0.8)
    vanilla = FusionTransformerForConditionalGeneration(FusionTransformerConfig(**TINY)).num_parameters()
    fused = SurfaceFusionForConditionalGeneration(SurfaceFusionConfig(**TINY, **overrides)).num_parameters()
    d, f = TINY["d_model"], TINY["decoder_ffn_dim"]
    assert fused - vanilla == 4 * (d * d + d) + ffn * (2 * d * f + f + d) + learned_gate * 2 * d


# --- the equations ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", HEAD_VARIANTS)
def test_fused_log_probs_match_an_independent_recomputation(variant: str) -> None:
    model = build(**HEAD_VARIANTS[variant])
    batch = random_batch()
    with torch.no_grad():
        expected = recompute(model, batch)
        logits = model(**batch).logits
    torch.testing.assert_close(logits, expected["log_probs"], atol=1e-5, rtol=1e-5)
    # The comparison is informative: the source distribution is far from uniform, and the fused
    # distribution differs from the target-only one.
    entropy = -(expected["log_p_src"].exp() * expected["log_p_src"]).sum(-1)
    assert entropy.mean() < 0.9 * math.log(TINY["vocab_size"])
    assert (logits - expected["logits_tgt"].log_softmax(-1)).abs().max() > 1e-2
    if model.config.normalize_before:
        assert (expected["query"] - expected["target"]).abs().max() > 1e-2  # query is taken before the final LN


@pytest.mark.parametrize(
    "variant, field",
    [
        ("hard_mean_source", "surface_fusion_source"),
        ("soft_max_source_linear", "surface_fusion_source"),
        ("soft_max_source_linear", "surface_fusion_linear"),
        ("prenorm_query_layer_0_learned_gate", "surface_fusion_query_layer"),
    ],
)
def test_the_recomputation_tells_each_ablation_from_the_default(variant: str, field: str) -> None:
    """The reference is sharp enough to catch a head that ignored an ablation switch: the same
    weights recomputed with that one field at its default give different log-probabilities (the
    pooled sources are recomputed as attention with the model's weights only where they exist,
    so for them the wrong variant is the other pooling)."""
    model = build(**HEAD_VARIANTS[variant])
    batch = random_batch()
    with torch.no_grad():
        logits = model(**batch).logits
        value = getattr(model.config, field)
        wrong = {"surface_fusion_source": "max" if value == "mean" else "mean", "surface_fusion_linear": False}
        setattr(model.config, field, wrong.get(field))
        try:
            wrong_log_probs = recompute(model, batch)["log_probs"]
        finally:
            setattr(model.config, field, value)
    assert (logits - wrong_log_probs).abs().max() > 1e-3


def test_hard_mixture_is_unnormalised_and_soft_is_normalised() -> None:
    batch = random_batch()
    with torch.no_grad():
        hard = build()(**batch).logits
        soft = build(surface_fusion_mode="soft")(**batch).logits
    assert (hard.logsumexp(-1) < -1e-4).all()  # sum_v P(v) = Z < 1 (weighted AM-GM)
    torch.testing.assert_close(soft.logsumexp(-1), torch.zeros(soft.shape[:2]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["hard", "hard_learned_gate", "soft"])
def test_loss_is_the_papers(variant: str) -> None:
    """Label-smoothed NLL of log P itself (fairseq's criterion on the reference's log-probs): for
    hard fusion lam * CE_tgt + (1 - lam) * CE_src per token; loss_terms are CE_tgt and CE_src."""
    smoothing = 0.1
    model = build(label_smoothing=smoothing, **HEAD_VARIANTS[variant])
    batch = labelled_batch()
    labels = batch["labels"]
    with torch.no_grad():
        out = model(**batch)
        expected = recompute(model, {k: v for k, v in batch.items() if k != "labels"})
    ce_tgt = token_cross_entropy(expected["logits_tgt"], labels, smoothing)
    source_logits = expected["logits_src"] * (model.config.surface_fusion_tau if variant == "soft" else 1.0)
    ce_src = token_cross_entropy(source_logits, labels, smoothing)
    torch.testing.assert_close(out.loss_terms["ce_tgt"], ce_tgt)
    torch.testing.assert_close(out.loss_terms["ce_src"], ce_src)
    if variant == "hard":
        lam = model.config.surface_fusion_lambda
        torch.testing.assert_close(out.loss, lam * ce_tgt + (1 - lam) * ce_src)
    elif variant == "hard_learned_gate":

        def per_token(logits: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(
                logits.transpose(1, 2), labels, ignore_index=-100, label_smoothing=smoothing, reduction="none"
            )

        lam = expected["lam"].squeeze(-1)
        mixed = lam * per_token(expected["logits_tgt"]) + (1 - lam) * per_token(expected["logits_src"])
        torch.testing.assert_close(out.loss, mixed[labels != -100].mean())
    else:  # soft: log P is normalised, so the loss is ordinary cross-entropy on it
        torch.testing.assert_close(out.loss, token_cross_entropy(expected["log_probs"], labels, smoothing))
    # Under gradient accumulation the sum is divided by the whole accumulated batch's token count.
    with torch.no_grad():
        accumulated = model(**batch, num_items_in_batch=torch.tensor(40)).loss
    torch.testing.assert_close(accumulated, out.loss * (labels != -100).sum() / 40)


def test_hard_fusion_with_lambda_one_is_the_plain_decoder() -> None:
    """lam = 1 without the FFN is the vanilla model's distribution and loss, also in a pre-norm model
    (the target path reads the decoder output after its final LayerNorm)."""
    fields = dict(TINY, normalize_before=True, add_final_layer_norm=True, label_smoothing=0.1)
    fused = build(surface_fusion_lambda=1.0, surface_fusion_ffn=False, normalize_before=True, add_final_layer_norm=True,
                  label_smoothing=0.1)
    vanilla = FusionTransformerForConditionalGeneration(FusionTransformerConfig(**fields)).eval()
    vanilla.load_state_dict(fused.state_dict(), strict=False)
    batch = labelled_batch()
    with torch.no_grad():
        fused_out, vanilla_out = fused(**batch), vanilla(**batch)
    torch.testing.assert_close(fused_out.logits, vanilla_out.logits.log_softmax(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_out.loss, vanilla_out.loss)


# --- gradient paths ---------------------------------------------------------------------------


def test_source_term_reaches_the_embeddings_through_the_values_only() -> None:
    """Backpropagating CE_src alone: gradient reaches the source token embeddings (values, not
    detached) and the head, but no decoder layer (query detached) and no encoder layer or encoder
    position embedding (keys detached). The full loss reaches all of them."""
    model = build(spread=0.0, surface_fusion_lambda=None)
    model.train()  # dropout is 0 in TINY; train mode checks the training path
    embedding_outputs = []

    def keep_output(module: nn.Module, inputs, output: torch.Tensor) -> None:
        output.retain_grad()
        embedding_outputs.append(output)

    model.model.encoder.embed_tokens.register_forward_hook(keep_output)
    model.model.decoder.embed_tokens.register_forward_hook(keep_output)
    out = model(**labelled_batch())
    source_embeddings, target_embeddings = embedding_outputs  # the encoder embeds first, then the decoder
    out.loss_terms["ce_src"].backward(retain_graph=True)

    assert source_embeddings.grad is not None and source_embeddings.grad.abs().sum() > 0
    assert target_embeddings.grad is None
    assert model.model.shared.weight.grad.abs().sum() > 0
    for name, parameter in model.output_head.surface_attn.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    blocked = {
        "decoder layers": model.model.decoder.layers,
        "encoder layers": model.model.encoder.layers,
        "encoder positions": model.model.encoder.embed_positions,
        "encoder embedding LayerNorm": model.model.encoder.layernorm_embedding,
    }
    for what, module in blocked.items():
        assert all(p.grad is None for p in module.parameters()), what

    model.zero_grad(set_to_none=True)
    out.loss.backward()
    for what, module in blocked.items():
        assert all(p.grad is not None for p in module.parameters()), what
    assert model.output_head.gate.weight.grad.abs().sum() > 0


# --- caching and generation -------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["hard", "hard_learned_gate", "soft", "prenorm_hard_learned_gate"])
def test_cached_decoding_matches_full_recomputation(variant: str) -> None:
    assert_cached_decoding_matches(build(**HEAD_VARIANTS[variant]), random_batch())


def test_cache_keeps_the_standard_layout_and_the_head_needs_the_source_embeddings() -> None:
    """The surface keys/values are not cached: self- and cross-attention caches both hold one
    slot per decoder step, the layout transformers' static caches and assisted decoding assume."""
    model = build(surface_fusion_heads=2)
    batch = random_batch()
    with torch.no_grad():
        encoder_outputs = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        first = model(
            encoder_outputs=encoder_outputs,
            attention_mask=batch["attention_mask"],
            decoder_input_ids=batch["decoder_input_ids"][:, :1],
            use_cache=True,
        )
        cache = output_cache(first)
        assert len(cache.cross_attention_cache.layers) == len(cache.self_attention_cache.layers)
        assert len(cache.cross_attention_cache.layers) == model.config.decoder_layers
        second = model(
            encoder_outputs=encoder_outputs,
            attention_mask=batch["attention_mask"],
            decoder_input_ids=batch["decoder_input_ids"][:, 1:2],
            **cache_output(cache),
            use_cache=True,
        )
        full = model(**{**batch, "decoder_input_ids": batch["decoder_input_ids"][:, :2]}).logits
    torch.testing.assert_close(second.logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-4)
    # Hand-made encoder outputs without the source embeddings: the head says what it is missing.
    encoder_outputs.token_embeddings = None
    with pytest.raises(ValueError, match="token_embeddings"):
        model(encoder_outputs=encoder_outputs, attention_mask=batch["attention_mask"],
              decoder_input_ids=batch["decoder_input_ids"][:, :1])


def test_greedy_generate_equals_stepwise_argmax_of_the_mixture() -> None:
    model = build(surface_fusion_lambda=0.5)
    batch = random_batch()
    steps = 6
    with torch.no_grad():
        out = model.generate(
            batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False, num_beams=1,
            max_new_tokens=steps, return_dict_in_generate=True, output_logits=True,
        )
        generated = out.sequences
        prefix = torch.full((3, 1), model.config.decoder_start_token_id)
        finished = torch.zeros(3, dtype=torch.bool)
        step_log_probs = []
        for _ in range(steps):
            log_probs = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=prefix,
                use_cache=False,
            ).logits[:, -1]
            step_log_probs.append(log_probs)
            token = log_probs.argmax(-1).masked_fill(finished, model.config.pad_token_id)
            finished |= token == model.config.eos_token_id
            prefix = torch.cat([prefix, token[:, None]], dim=1)
            if finished.all():
                break
    assert torch.equal(generated, prefix)
    assert len(set(map(tuple, generated.tolist()))) > 1  # the rows differ: the comparison is informative
    # The step log P too: the argmax alone agrees with a cache that drops a step or positions that
    # forget the prefix (the source distribution decides most tokens).
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(step_log_probs, 1), atol=1e-5, rtol=1e-4)


def test_beam_search_scores_are_the_renormalised_mixture_and_match_uncached() -> None:
    """generate() log-softmaxes the returned logits: beam search scores a step with
    log_softmax(hard mixture), not with the unnormalised mixture."""
    model = build()
    batch = random_batch()
    kwargs = dict(
        attention_mask=batch["attention_mask"], num_beams=3, max_new_tokens=5, return_dict_in_generate=True,
        output_scores=True, output_logits=True,
    )
    with torch.no_grad():
        cached = model.generate(batch["input_ids"], use_cache=True, **kwargs)
        uncached = model.generate(batch["input_ids"], use_cache=False, **kwargs)
        start = torch.full((3, 1), model.config.decoder_start_token_id)
        mixture = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=start
        ).logits[:, -1]
    first_logits = cached.logits[0].view(3, 3, -1)  # (batch, beams, vocab)
    first_scores = cached.scores[0].view(3, 3, -1)
    for beam in range(3):
        torch.testing.assert_close(first_logits[:, beam], mixture, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(first_scores[:, beam], mixture.log_softmax(-1), atol=1e-5, rtol=1e-5)
    assert (mixture.logsumexp(-1) < -1e-4).all()  # so renormalising really changes the scores
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores)
    assert output_cache(cached).cross_attention_cache.layers[-1].keys.shape[0] == 3 * 3  # batch * beams


def teacher_forced_sum(model: SurfaceFusionForConditionalGeneration, batch: dict, sequences: torch.Tensor, normalise: bool) -> torch.Tensor:
    """Sum over each generated sequence (up to and including its EOS) of the model's log P of the
    chosen token, unnormalised (the official score) or log-softmaxed (transformers' default)."""
    log_probs = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=sequences[:, :-1]
    ).logits
    if normalise:
        log_probs = log_probs.log_softmax(-1)
    chosen = log_probs.gather(-1, sequences[:, 1:, None]).squeeze(-1)  # (batch, steps)
    eos = model.config.eos_token_id
    ended = (sequences[:, 1:] == eos).long().cumsum(-1)
    keep = (ended == 0) | ((ended == 1) & (sequences[:, 1:] == eos))  # tokens up to the first EOS
    return (chosen * keep).sum(-1)


def test_unnormalised_beam_scores_are_the_official_sums_of_log_p() -> None:
    """With ``UnnormalisedBeamScores`` a finished beam's score is the sum of the unnormalised hard
    log P of its tokens, as the official decoder scores it; without it, the sum of the renormalised
    scores. Both checked against a teacher-forced forward of the returned sequences."""
    model = build()
    batch = random_batch()
    kwargs = dict(
        attention_mask=batch["attention_mask"], num_beams=3, max_new_tokens=5, length_penalty=0.0,
        return_dict_in_generate=True, output_scores=True,
    )
    with torch.no_grad():
        default = model.generate(batch["input_ids"], **kwargs)
        official = model.generate(batch["input_ids"], logits_processor=[UnnormalisedBeamScores(model)], **kwargs)
        for out, normalise in ((default, True), (official, False)):
            want = teacher_forced_sum(model, batch, out.sequences, normalise)
            torch.testing.assert_close(out.sequences_scores, want, atol=1e-4, rtol=1e-4)
        renormalised = teacher_forced_sum(model, batch, official.sequences, normalise=True)
    assert (official.sequences_scores - renormalised).abs().min() > 1e-3  # the two scorings really differ


def test_unnormalised_beam_scores_need_the_surface_fusion_head() -> None:
    with pytest.raises(TypeError, match="SurfaceFusion head"):
        UnnormalisedBeamScores(build_tiny("fusion_transformer"))


# --- checkpoints, conversion, training, composition -------------------------------------------


@pytest.mark.slow
def test_save_and_load_in_a_clean_process(tmp_path: Path) -> None:
    model = build(surface_fusion_lambda=None, surface_fusion_heads=2)
    folder = assert_roundtrip_in_clean_process(model, tmp_path)
    assert (folder / "surface_fusion.py").exists()
    assert '"surface_fusion_lambda": null' in (folder / "config.json").read_text()


def test_convert_from_bart_retrofits_the_head() -> None:
    from transformers import BartConfig, BartForConditionalGeneration

    bart = BartForConditionalGeneration(
        BartConfig(
            vocab_size=100, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
            dropout=0.0,
        )
    ).eval()
    fused = convert_from_pretrained(bart, model_type="surface_fusion").eval()
    assert isinstance(fused, SurfaceFusionForConditionalGeneration)
    fused_state = fused.state_dict()
    for key, value in bart.state_dict().items():
        torch.testing.assert_close(fused_state[key], value, msg=key)
    new = sorted(key for key in fused_state if key not in bart.state_dict())
    assert new and all(key.startswith("output_head.") for key in new)
    for key in new:
        if key.endswith("weight"):
            assert 0 < fused_state[key].std() < 0.1, key  # freshly initialised with init_std, not left empty

    # lam = 1 without the FFN reproduces BART's distribution exactly.
    plain = convert_from_pretrained(bart, model_type="surface_fusion", surface_fusion_lambda=1.0,
                                    surface_fusion_ffn=False).eval()
    batch = random_batch()
    with torch.no_grad():
        expected = bart(**batch).logits.log_softmax(-1)
        torch.testing.assert_close(plain(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        assert (fused(**batch).logits - expected).abs().max() > 1e-3


def test_seq2seq_trainer_loss_goes_down(tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, default_data_collator

    generator = torch.Generator().manual_seed(0)
    source = torch.randint(3, 13, (64, 8), generator=generator)  # copy task over 10 token types
    data = Dataset.from_dict({"input_ids": source.tolist(), "attention_mask": torch.ones_like(source).tolist(),
                              "labels": source.tolist()})
    model = SurfaceFusionForConditionalGeneration(SurfaceFusionConfig(**TINY, label_smoothing=0.1))
    probe = {"input_ids": source[:16], "attention_mask": torch.ones_like(source[:16]), "labels": source[:16]}
    with torch.no_grad():
        ce_src_before = model(**probe).loss_terms["ce_src"]
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=16, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=4, report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, seed=0,
    )
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 5 and losses[-1] < 0.8 * losses[0], losses
    with torch.no_grad():
        ce_src_after = model.eval()(**probe).loss_terms["ce_src"]
    assert ce_src_after < 0.8 * ce_src_before  # the source path learns too


def test_surface_fusion_on_a_recurrently_stacked_model() -> None:
    model = build(sharing_strategy="recurrent")
    assert len(model.model.decoder.layers) == 1 and model.model.decoder.plan == (0, 0)
    vanilla = FusionTransformerForConditionalGeneration(FusionTransformerConfig(**TINY, sharing_strategy="recurrent"))
    head = sum(p.numel() for p in model.output_head.parameters())
    assert model.num_parameters() == vanilla.num_parameters() + head
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, recompute(model, batch)["log_probs"], atol=1e-5, rtol=1e-5)
    assert_cached_decoding_matches(model, batch)
    with torch.no_grad():
        out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=2, max_new_tokens=4,
                             return_dict_in_generate=True)
    cross = output_cache(out).cross_attention_cache
    assert len(cross.layers) == model.config.decoder_layers  # one slot per decoder step, none per block
