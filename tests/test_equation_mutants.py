"""Every equation test fails on a plausible wrong implementation.

Each test here builds one wrong variant of an equation by monkeypatching the implementation, with
a mistake someone could really make (the old ``cycle_rev`` rule, NT-Xent without its symmetric
half, word-level KD without T^2, a cache slot per parameter block, ...), and runs the *same* check
the equation test runs: the test function itself, imported with its module, or its reference
helper. The check must raise ``AssertionError``. An equation test that passed on the wrong
variant as well could not catch the mistake it exists for.

Wrong variants that the equation tests already build in place are not repeated here: DropConnect
after the softmax, no DropConnect and a single X^0 dropout (tests/test_encoder_fusion.py), the
fine-grained X^N before or after the final LayerNorm (same file), the depth-wise LSTM gate norms,
attention residual and decoder wiring (tests/test_depthwise_lstm.py), and SurfaceFusion's
ablation switches (tests/test_surface_fusion.py).

Some "mistakes" are *equivalent* and no test can or should catch them. Soft SurfaceFusion without
the inner log_softmax, ``log_softmax(l_tgt + tau * l_src)``, is the same distribution as the
paper's ``log_softmax(l_tgt + log_softmax(tau * l_src))``: the inner log_softmax only subtracts a
per-position constant, which the outer one cancels. So soft mode is tested here with the plausible
mistake that is not equivalent, the temperature dividing instead of multiplying.
"""

from __future__ import annotations

import copy
import dataclasses
import unittest
from collections.abc import Callable
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from transformers.cache_utils import DynamicCache

import hf_fusion.heads
import hf_fusion.layers
import hf_fusion.sharing
import hf_fusion.surface_fusion
import hf_fusion.transfer
import training.distill
import training.e2s2.collator
import training.e2s2.model
from hf_fusion import (
    FusionTransformerConfig,
    FusionTransformerForConditionalGeneration,
    RecurrentStackingForConditionalGeneration,
    UnnormalisedBeamScores,
)
from hf_fusion.connections import DLCLConnection
from hf_fusion.depthwise_lstm import GATES, DepthwiseLSTMCell, DepthwiseLSTMConnection
from hf_fusion.layers import FusionDecoderLayer, LearnedPositionalEmbedding, SinusoidalPositionalEmbedding
from hf_fusion.memory import FineGrainedLayerAttentionMemory, TransparentAttentionMemory
from hf_fusion.surface_fusion import SurfaceFusionHead
from tests import test_core as core_tests
from tests import test_depthwise_lstm as dlstm_tests
from tests import test_distill as distill_tests
from tests import test_e2s2 as e2s2_tests
from tests import test_encoder_fusion as fusion_tests
from tests import test_sharing as sharing_tests
from tests import test_surface_fusion as surface_tests
from tests.generation_contract import GenerationContractMixin
from tests.helpers import TINY

# The 6+6 vanilla teacher of tests/test_sharing.py, as a fixture of this module too.
teacher = sharing_tests.teacher

NOT_CLOSE = "not close"  # what torch.testing.assert_close says when the numbers differ


def patch_everywhere(monkeypatch: pytest.MonkeyPatch, name: str, value: object, *modules: ModuleType) -> None:
    """Replace ``name`` in the implementation module and in every test module that imported it by
    name (``from x import name`` binds a second reference that patching the first would miss)."""
    for module in modules:
        monkeypatch.setattr(module, name, value)


# --- the core: label-smoothed cross-entropy (heads.py), attention kernels -------------------------


def wrong_log_prob_nll(mistake: str) -> Callable[..., torch.Tensor]:
    """``hf_fusion.heads.log_prob_nll`` with one mistake: the smoothing term summed over the
    vocabulary instead of averaged, the ignored positions counted in the denominator, or the
    accumulated batch's token count ignored."""

    def log_prob_nll(log_probs, labels, label_smoothing=0.0, num_items_in_batch=None):
        keep = labels != -100
        nll = -log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        smooth = -log_probs.sum(-1) if mistake == "smoothing_summed_over_vocab" else -log_probs.mean(-1)
        per_token = ((1.0 - label_smoothing) * nll + label_smoothing * smooth).masked_fill(~keep, 0.0)
        if mistake == "ignored_positions_counted":
            denominator = labels.numel()
        elif mistake == "accumulation_ignored" or num_items_in_batch is None:
            denominator = keep.sum()
        else:
            denominator = num_items_in_batch
        return per_token.sum() / denominator

    return log_prob_nll


@pytest.mark.parametrize(
    "mistake", ["smoothing_summed_over_vocab", "ignored_positions_counted", "accumulation_ignored"]
)
def test_label_smoothed_loss_check_rejects(monkeypatch, mistake: str) -> None:
    """Guards tests/test_core.py::test_loss_matches_independent_cross_entropy_with_label_smoothing_and_item_count."""
    wrong = wrong_log_prob_nll(mistake)
    monkeypatch.setattr(hf_fusion.heads, "log_prob_nll", wrong)
    monkeypatch.setattr(  # the LM head's fused cross-entropy, made of the same wrong pieces
        hf_fusion.heads,
        "token_cross_entropy",
        lambda logits, labels, smoothing=0.0, items=None: wrong(logits.float().log_softmax(-1), labels, smoothing, items),
    )
    with pytest.raises(AssertionError, match=NOT_CLOSE):
        core_tests.test_loss_matches_independent_cross_entropy_with_label_smoothing_and_item_count()


def test_eager_attention_check_rejects_the_unscaled_scores(monkeypatch) -> None:
    """Guards tests/test_core.py::test_eager_and_sdpa_agree_and_eager_returns_attention_weights:
    an eager kernel that forgets the 1 / sqrt(head_dim) scaling no longer agrees with SDPA."""
    original = hf_fusion.layers.eager_attention_forward

    def unscaled(module, query, key, value, attention_mask, scaling, **kwargs):
        return original(module, query, key, value, attention_mask, 1.0, **kwargs)

    monkeypatch.setattr(hf_fusion.layers, "eager_attention_forward", unscaled)
    with pytest.raises(AssertionError, match=NOT_CLOSE):
        core_tests.test_eager_and_sdpa_agree_and_eager_returns_attention_weights()


# --- sharing.py: execution plans ------------------------------------------------------------------


@pytest.fixture
def fresh_plans():
    """``execution_plan`` memoises its results: clear them before and after a patched plan."""
    hf_fusion.sharing.execution_plan.cache_clear()
    yield
    hf_fusion.sharing.execution_plan.cache_clear()


def cycle_rev_reversing_the_last_m(num_steps: int, num_blocks: int) -> tuple[int, ...]:
    """The rule used before the paper's was adopted (hf_fusion/sharing.py): cycle, then reverse the
    *last M* steps."""
    head = num_steps - num_blocks
    return tuple(step_idx % num_blocks for step_idx in range(head)) + tuple(reversed(range(num_blocks)))


def sequence_proportional(num_steps: int, num_blocks: int) -> tuple[int, ...]:
    """Step i runs block floor(i * M / N), the proportional split, not runs of ceil(N / M)."""
    return tuple(step_idx * num_blocks // num_steps for step_idx in range(num_steps))


@pytest.mark.parametrize(
    ("strategy", "wrong", "depth", "blocks"),
    [("cycle_rev", cycle_rev_reversing_the_last_m, 6, 4), ("sequence", sequence_proportional, 7, 3)],
)
def test_execution_plan_check_rejects(monkeypatch, fresh_plans, strategy: str, wrong, depth: int, blocks: int) -> None:
    """Guards tests/test_sharing.py::test_execution_plan_matches_definition (the paper's cycle_rev
    rule; the sequence case needs M not dividing N, the table's (7, 3) entry)."""
    monkeypatch.setitem(hf_fusion.sharing.EXECUTION_PLANS, strategy, wrong)
    with pytest.raises(AssertionError):
        sharing_tests.test_execution_plan_matches_definition(strategy, depth, blocks)


original_block_sources = hf_fusion.transfer.block_sources


def mean_over_consecutive_layers(plan, teacher_depth, source, stack="encoder"):
    """``block_sources`` whose "mean" averages consecutive teacher layers whatever the plan."""
    if source != "mean":
        return original_block_sources(plan, teacher_depth, source, stack)
    run = len(plan) // (max(plan) + 1)
    return [tuple(range(block * run, (block + 1) * run)) for block in range(max(plan) + 1)]


def test_transfer_mean_check_rejects(monkeypatch, teacher) -> None:
    """Guards tests/test_sharing.py::test_transfer_mean_follows_each_schedule: the mean must
    follow the student's plan (cycle: layers 0 and 3 feed block 0), not consecutive layers."""
    monkeypatch.setattr(hf_fusion.transfer, "block_sources", mean_over_consecutive_layers)
    with pytest.raises(AssertionError, match=NOT_CLOSE):
        sharing_tests.test_transfer_mean_follows_each_schedule(teacher)


@pytest.mark.parametrize(
    ("strategy", "unique", "block_of_step"), [("recurrent", None, lambda step: 0), ("cycle", 2, lambda step: step % 2)]
)
def test_cached_decoding_check_rejects_one_cache_slot_per_block(monkeypatch, strategy, unique, block_of_step) -> None:
    """Guards tests/test_sharing.py::test_cached_decoding_matches_full_recomputation: the decoder
    layer writes the cache slot of its parameter block instead of its depth step, so two steps
    that share weights share (and corrupt) one slot."""
    original = FusionDecoderLayer.forward

    def forward(self, *args, cache_idx: int = 0, **kwargs):
        return original(self, *args, cache_idx=block_of_step(cache_idx), **kwargs)

    monkeypatch.setattr(FusionDecoderLayer, "forward", forward)
    with pytest.raises(AssertionError, match=NOT_CLOSE):
        sharing_tests.test_cached_decoding_matches_full_recomputation(dict(TINY), strategy, unique, False)


def test_shared_gradient_check_rejects_the_gradient_averaged_over_uses(monkeypatch) -> None:
    """Guards tests/test_sharing.py::test_shared_gradient_is_sum_over_steps: a block run at k
    steps gets the *sum* of the k steps' gradients, not their mean (what averaging the gradients
    of per-step copies, a common way to tie weights by hand, would give)."""
    original = RecurrentStackingForConditionalGeneration.__init__

    def __init__(self, config):
        original(self, config)
        for stack in (self.model.encoder, self.model.decoder):
            for block_idx, block in enumerate(stack.layers):
                uses = stack.plan.count(block_idx)
                for parameter in block.parameters():
                    parameter.register_hook(lambda grad, uses=uses: grad / uses)

    monkeypatch.setattr(RecurrentStackingForConditionalGeneration, "__init__", __init__)
    with pytest.raises(AssertionError, match=NOT_CLOSE):
        sharing_tests.test_shared_gradient_is_sum_over_steps(dict(TINY), "recurrent", None, False)


# --- caches and positions: the cached-decoding checks and the generation contract -----------------


def generation_contract() -> GenerationContractMixin:
    """tests/generation_contract.py's mixin on the vanilla tiny model (default initialisation, as
    the contract runs it), four source rows."""
    config = FusionTransformerConfig(**TINY)
    inputs = {"input_ids": torch.randint(3, TINY["vocab_size"], (4, 7))}

    class Contract(GenerationContractMixin, unittest.TestCase):
        all_generative_model_classes = (FusionTransformerForConditionalGeneration,)

        def runTest(self) -> None:  # unittest needs a method to bind the case to
            pass

    case = Contract()
    case.model_tester = SimpleNamespace(prepare_config_and_inputs_for_common=lambda: (config, dict(inputs)))
    return case


def drop_the_oldest_cached_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache returns every cached step but the first (an off-by-one window) once it has one."""
    original = DynamicCache.update

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = original(self, key_states, value_states, layer_idx, *args, **kwargs)
        if keys.shape[-2] > key_states.shape[-2]:
            return keys[..., 1:, :], values[..., 1:, :]
        return keys, values

    monkeypatch.setattr(DynamicCache, "update", update)


def positions_without_the_past_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every decoding step embeds its token at position 0 (``past_len`` ignored), learned or sinusoidal."""
    for positions in (LearnedPositionalEmbedding, SinusoidalPositionalEmbedding):
        original = positions.forward
        monkeypatch.setattr(
            positions,
            "forward",
            lambda self, seq_len, past_len=0, side="input", original=original: original(self, seq_len, 0, side),
        )


@pytest.mark.parametrize("mutate", [drop_the_oldest_cached_step, positions_without_the_past_offset])
@pytest.mark.parametrize("overrides", [{}, {"position_embedding_type": "sinusoidal"}], ids=["learned", "sinusoidal"])
def test_cached_decoding_check_rejects(monkeypatch, mutate, overrides: dict) -> None:
    """Guards tests/test_core.py::test_cached_decoding_equals_full_recomputation (the helper every
    family's cache test uses): a cache that drops a step, positions that forget the cached prefix."""
    mutate(monkeypatch)
    with pytest.raises(AssertionError, match=NOT_CLOSE):
        core_tests.test_cached_decoding_equals_full_recomputation(overrides)


# Generation tests that compared tokens only, now also step logits or scores (a tiny model repeats
# one token, so tokens alone agreed with both mistakes above).
DECODING_CHECKS = {
    "core_greedy": core_tests.test_generate_greedy_beam_and_sampling,
    "sharing_beam": lambda: sharing_tests.test_beam_search_with_cache_equals_without(dict(TINY), "recurrent", None),
    "surface_fusion_greedy": surface_tests.test_greedy_generate_equals_stepwise_argmax_of_the_mixture,
}


@pytest.mark.parametrize("mutate", [drop_the_oldest_cached_step, positions_without_the_past_offset])
@pytest.mark.parametrize("check", list(DECODING_CHECKS))
def test_decoding_checks_reject(monkeypatch, mutate, check: str) -> None:
    """Guards tests/test_core.py::test_generate_greedy_beam_and_sampling,
    tests/test_sharing.py::test_beam_search_with_cache_equals_without and
    tests/test_surface_fusion.py::test_greedy_generate_equals_stepwise_argmax_of_the_mixture."""
    mutate(monkeypatch)
    with pytest.raises(AssertionError, match=NOT_CLOSE):
        DECODING_CHECKS[check]()


@pytest.mark.parametrize("mutate", [drop_the_oldest_cached_step, positions_without_the_past_offset])
def test_generation_contract_rejects(monkeypatch, mutate) -> None:
    """Guards tests/generation_contract.py's step-logit check (run by
    tests/test_transformers_contract.py): it passes on the model, then fails once the cache drops
    a step or the positions forget the cached prefix."""
    contract = generation_contract()
    contract._check_generate("greedy", do_sample=False, num_beams=1)
    mutate(monkeypatch)
    with pytest.raises(AssertionError, match="step logits differ from teacher forcing"):
        generation_contract()._check_generate("greedy", do_sample=False, num_beams=1)


# --- EncoderFusion: DLCL, transparent attention, fine-grained layer attention ---------------------


def dlcl_normalising_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pre-norm DLCL that combines the raw outputs and normalises the sum (the post-norm order)."""
    original = DLCLConnection.__init__

    def __init__(self, config, num_steps):
        original(self, config, num_steps)
        self.normalize_before = False

    monkeypatch.setattr(DLCLConnection, "__init__", __init__)


def dlcl_softmax_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """DLCL whose row weights are softmax-normalised, as transparent attention's are."""

    def combine(self, state, row):
        stacked = torch.stack(state.history, dim=0)  # (row + 1, batch, len, d_model)
        mixed = torch.tensordot(self.weight[row, : row + 1].softmax(0).to(stacked.dtype), stacked, dims=1)
        return mixed if self.normalize_before or row == 0 else self.layer_norms[row - 1](mixed)

    monkeypatch.setattr(DLCLConnection, "combine", combine)


@pytest.mark.parametrize(("mutate", "pre_norm"), [(dlcl_normalising_after, True), (dlcl_softmax_rows, False)])
def test_dlcl_check_rejects(monkeypatch, mutate, pre_norm: bool) -> None:
    """Guards tests/test_encoder_fusion.py::test_dlcl_matches_the_equation_in_encoder_and_decoder."""
    mutate(monkeypatch)
    with pytest.raises(AssertionError, match=NOT_CLOSE):
        fusion_tests.test_dlcl_matches_the_equation_in_encoder_and_decoder(pre_norm)


def wrong_transparent_forward(mistake: str) -> Callable[..., torch.Tensor]:
    """Transparent attention (evaluation mode) with the softmax over the decoder steps instead of
    the encoder layers, or with X^0 mixed in without its LayerNorm."""

    def forward(self, step_idx, encoder_hidden_states, encoder_layer_states=None, encoder_token_embeddings=None):
        states = encoder_layer_states  # (batch, N + 1, src_len, d_model)
        if mistake != "raw_embedding_layer":
            states = torch.cat([self.embedding_layer_norm(states[:, :1]), states[:, 1:]], dim=1)
        weights = self.weight.softmax(dim=1 if mistake == "softmax_over_decoder_steps" else 0)[:, step_idx]
        return torch.einsum("n,bnsd->bsd", weights, states)

    return forward


@pytest.mark.parametrize("mistake", ["softmax_over_decoder_steps", "raw_embedding_layer"])
def test_transparent_memory_check_rejects(monkeypatch, mistake: str) -> None:
    """Guards tests/test_encoder_fusion.py::test_transparent_memory_is_softmax_weighted_sum_of_encoder_layers."""
    monkeypatch.setattr(TransparentAttentionMemory, "forward", wrong_transparent_forward(mistake))
    with pytest.raises(AssertionError, match=NOT_CLOSE):
        fusion_tests.test_transparent_memory_is_softmax_weighted_sum_of_encoder_layers()


def test_fusion_weights_check_rejects_the_softmax_over_decoder_steps(monkeypatch) -> None:
    """Guards tests/test_encoder_fusion.py::test_fusion_weights_shapes_and_normalisation (the
    weights the heatmap plots): transparent attention normalises over the encoder layers."""
    monkeypatch.setattr(TransparentAttentionMemory, "layer_weights", lambda self: self.weight.detach().softmax(dim=1).T)
    with pytest.raises(AssertionError, match=NOT_CLOSE):
        fusion_tests.test_fusion_weights_shapes_and_normalisation("transparent")


def test_added_parameter_count_check_rejects_fusion_weights_per_block(monkeypatch) -> None:
    """Guards tests/test_encoder_fusion.py::test_added_parameter_count: under sharing the
    transparent weights keep one column per decoder *step*, not one per parameter block."""
    original = TransparentAttentionMemory.__init__

    def __init__(self, config):
        per_block = copy.copy(config)
        per_block.decoder_layers = config.decoder_unique_layers
        original(self, per_block)

    monkeypatch.setattr(TransparentAttentionMemory, "__init__", __init__)
    with pytest.raises(AssertionError):
        fusion_tests.test_added_parameter_count("transparent", "recurrent")


def wrong_fine_grained_forward(mistake: str) -> Callable[..., torch.Tensor]:
    """Fine-grained layer attention (evaluation mode) with the softmax over the dimensions instead
    of the layers, X^0 taken with positions (the embedding layer output), or no LayerNorm."""

    def forward(self, step_idx, encoder_hidden_states, encoder_layer_states=None, encoder_token_embeddings=None):
        embeddings = encoder_layer_states[:, 0] if mistake == "x0_with_positions" else encoder_token_embeddings
        if self.embedding_layer_norm is not None:
            embeddings = self.embedding_layer_norm(embeddings)
        states = torch.cat([embeddings[:, None], encoder_layer_states[:, 1:]], dim=1)  # (batch, N + 1, src_len, d)
        weights = self.weight[step_idx].softmax(dim=1 if mistake == "softmax_over_dimensions" else 0)
        fused = torch.einsum("nd,bnsd->bsd", weights, states)
        return fused if mistake == "no_layer_norm" else self.layer_norm(fused)

    return forward


@pytest.mark.parametrize("mistake", ["softmax_over_dimensions", "x0_with_positions", "no_layer_norm"])
def test_fine_grained_memory_check_rejects(monkeypatch, mistake: str) -> None:
    """Guards tests/test_encoder_fusion.py::test_fine_grained_memory_is_per_dimension_layer_attention."""
    monkeypatch.setattr(FineGrainedLayerAttentionMemory, "forward", wrong_fine_grained_forward(mistake))
    with pytest.raises(AssertionError, match=NOT_CLOSE):
        fusion_tests.test_fine_grained_memory_is_per_dimension_layer_attention({})


# --- SurfaceFusion --------------------------------------------------------------------------------


def wrong_fuse(mistake: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``SurfaceFusionHead.fuse`` with hard fusion mixing probabilities instead of log-probabilities,
    hard fusion renormalised, or the soft temperature dividing the source logits."""
    original = SurfaceFusionHead.fuse

    def fuse(self, logits_tgt, logits_src, target, surface):
        if mistake == "soft_tau_divides":
            log_p_src = nn.functional.log_softmax(logits_src / self.tau, dim=-1)
            log_p_tgt = nn.functional.log_softmax(logits_tgt, dim=-1)
            return nn.functional.log_softmax(logits_tgt + log_p_src, dim=-1), log_p_tgt, log_p_src
        log_probs, log_p_tgt, log_p_src = original(self, logits_tgt, logits_src, target, surface)
        if mistake == "hard_mixes_probabilities":
            lam = self.fixed_lambda
            log_probs = torch.logaddexp(log_p_tgt + np.log(lam), log_p_src + np.log(1 - lam))
        elif mistake == "hard_renormalised":
            log_probs = log_probs.log_softmax(-1)
        return log_probs, log_p_tgt, log_p_src

    return fuse


@pytest.mark.parametrize(
    ("mistake", "variant"),
    [("hard_mixes_probabilities", "hard"), ("hard_renormalised", "hard"), ("soft_tau_divides", "soft")],
)
def test_surface_fusion_check_rejects_wrong_fusion(monkeypatch, mistake: str, variant: str) -> None:
    """Guards tests/test_surface_fusion.py::test_fused_log_probs_match_an_independent_recomputation."""
    monkeypatch.setattr(SurfaceFusionHead, "fuse", wrong_fuse(mistake))
    with pytest.raises(AssertionError, match=NOT_CLOSE):
        surface_tests.test_fused_log_probs_match_an_independent_recomputation(variant)


def test_surface_fusion_check_rejects_the_query_after_the_final_layer_norm(monkeypatch) -> None:
    """Guards the same test's pre-norm variant: the query must be the top state before the
    decoder's final LayerNorm, not the normalised decoder output."""
    monkeypatch.setattr(
        SurfaceFusionHead, "query_states", lambda self, decoder_hidden_states, context: decoder_hidden_states
    )
    with pytest.raises(AssertionError, match=NOT_CLOSE):
        surface_tests.test_fused_log_probs_match_an_independent_recomputation("prenorm_hard_learned_gate")


def test_lambda_one_check_rejects_the_target_path_reading_the_query(monkeypatch) -> None:
    """Guards tests/test_surface_fusion.py::test_hard_fusion_with_lambda_one_is_the_plain_decoder:
    the target path reads the decoder output (after the final LayerNorm), not the query's
    un-normalised top state."""
    original = SurfaceFusionHead.forward

    def forward(self, project, decoder_hidden_states, context):
        return original(self, project, context.decoder_top_layer_state, context)

    monkeypatch.setattr(SurfaceFusionHead, "forward", forward)
    with pytest.raises(AssertionError, match=NOT_CLOSE):
        surface_tests.test_hard_fusion_with_lambda_one_is_the_plain_decoder()


def test_parameter_overhead_check_rejects_a_gate_with_a_bias(monkeypatch) -> None:
    """Guards tests/test_surface_fusion.py::test_parameter_overhead: the learned gate is a
    bias-free Linear(2 d, 1), as in the reference code."""
    original = SurfaceFusionHead.__init__

    def __init__(self, config):
        original(self, config)
        if self.gate is not None:
            self.gate = nn.Linear(2 * config.d_model, 1)

    monkeypatch.setattr(SurfaceFusionHead, "__init__", __init__)
    with pytest.raises(AssertionError):
        surface_tests.test_parameter_overhead(True, True)


def test_surface_fusion_loss_check_rejects_cross_entropy_of_the_renormalised_mixture(monkeypatch) -> None:
    """Guards tests/test_surface_fusion.py::test_loss_is_the_papers: the hard loss is the
    label-smoothed NLL of the unnormalised log P, not the cross-entropy of its renormalisation
    (which is what ``token_cross_entropy`` on the mixture would train)."""
    monkeypatch.setattr(
        hf_fusion.surface_fusion, "log_prob_nll",
        lambda log_probs, *args: hf_fusion.heads.log_prob_nll(log_probs.log_softmax(-1), *args),
    )  # fmt: skip
    with pytest.raises(AssertionError, match=NOT_CLOSE):
        surface_tests.test_loss_is_the_papers("hard")


def test_surface_fusion_gradient_check_rejects_detached_values(monkeypatch) -> None:
    """Guards tests/test_surface_fusion.py::test_source_term_reaches_the_embeddings_through_the_values_only:
    V detached like the keys would stop CE_src from reaching the source embeddings."""
    original = SurfaceFusionHead.surface_states

    def surface_states(self, query_states, context):
        detached = dataclasses.replace(context, encoder_token_embeddings=context.encoder_token_embeddings.detach())
        return original(self, query_states, detached)

    monkeypatch.setattr(SurfaceFusionHead, "surface_states", surface_states)
    with pytest.raises(AssertionError):
        surface_tests.test_source_term_reaches_the_embeddings_through_the_values_only()


def test_official_beam_scores_check_rejects_a_sign_error(monkeypatch) -> None:
    """Guards tests/test_surface_fusion.py::test_unnormalised_beam_scores_are_the_official_sums_of_log_p:
    the processor must add log Z back to the renormalised scores, not subtract it once more."""
    monkeypatch.setattr(
        UnnormalisedBeamScores,
        "__call__",
        lambda self, input_ids, scores: scores - self.head.last_log_normaliser[:, None],
    )
    with pytest.raises(AssertionError, match=NOT_CLOSE):
        surface_tests.test_unnormalised_beam_scores_are_the_official_sums_of_log_p()


# --- depth-wise LSTM ------------------------------------------------------------------------------


def wrong_cell_forward(mistake: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The "linear"-candidate cell (evaluation mode) with the textbook LSTM's h = o * tanh(c), or
    with PyTorch's nn.LSTM block order (i, f, c_hat, o) read as the cell's (i, f, o, c_hat)."""

    def forward(self, inputs, h, c):
        x = torch.cat([*inputs, h], dim=-1)
        pre = self.norm(self.proj(x).unflatten(-1, (self.num_blocks, self.d_model)))  # (batch, len, 4, d)
        order = (0, 1, 3, 2) if mistake == "torch_lstm_block_order" else (0, 1, 2, 3)
        input_gate, forget_gate, output_gate = (torch.sigmoid(pre[..., k, :]) for k in order[:GATES])
        c = forget_gate * c + input_gate * self.activation(pre[..., order[GATES], :])
        return output_gate * (torch.tanh(c) if mistake == "tanh_on_the_cell_output" else c), c

    return forward


@pytest.mark.parametrize("mistake", ["tanh_on_the_cell_output", "torch_lstm_block_order"])
def test_lstm_step_check_rejects(monkeypatch, mistake: str) -> None:
    """Guards tests/test_depthwise_lstm.py::test_lstm_step_matches_the_equations."""
    monkeypatch.setattr(DepthwiseLSTMCell, "forward", wrong_cell_forward(mistake))
    with pytest.raises(AssertionError, match=NOT_CLOSE):
        dlstm_tests.test_lstm_step_matches_the_equations("linear", "joint", "tanh", 2)


def test_hidden_states_check_rejects_exposing_the_cell_state(monkeypatch) -> None:
    """Guards tests/test_depthwise_lstm.py::test_hidden_states_expose_h: a step exposes h, not c
    (the packed pair read in the wrong order)."""
    monkeypatch.setattr(DepthwiseLSTMConnection, "hidden", lambda self, state: state[1])
    with pytest.raises(AssertionError, match=NOT_CLOSE):
        dlstm_tests.test_hidden_states_expose_h()


# --- E2S2: contrastive, denoising and corruption --------------------------------------------------


def nt_xent_one_sided(first, second, temperature=1.0):
    """NT-Xent with only the first view's anchors (SimCLR's symmetric term missing)."""
    batch = first.shape[0]
    vectors = nn.functional.normalize(torch.cat([first, second]).float(), dim=-1)
    similarity = (vectors @ vectors.T / temperature).masked_fill(torch.eye(2 * batch, dtype=torch.bool), float("-inf"))
    return nn.functional.cross_entropy(similarity[:batch], torch.arange(batch, 2 * batch))


def nt_xent_temperature_multiplies(first, second, temperature=1.0):
    """NT-Xent that multiplies the similarities by tau instead of dividing."""
    return original_nt_xent_loss(first, second, 1.0 / temperature)


def nt_xent_keeps_the_self_pair(first, second, temperature=1.0):
    """NT-Xent whose denominator includes each vector's similarity with itself."""
    batch = first.shape[0]
    vectors = nn.functional.normalize(torch.cat([first, second]).float(), dim=-1)
    positives = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)])
    return nn.functional.cross_entropy(vectors @ vectors.T / temperature, positives)


def denoising_with_padding_as_original(logits, labels, classes=3):
    """The official code's labelling: padding and special tokens count as "original"."""
    return original_denoising_loss(logits, labels.masked_fill(labels == -100, 0), classes)


def mean_pool_over_padding(hidden_states, attention_mask):
    """Mean pooling over every position, padding included (the official ``avg_pool1d``)."""
    return hidden_states.mean(dim=1)


original_denoising_loss = training.e2s2.model.denoising_loss
original_nt_xent_loss = training.e2s2.model.nt_xent_loss


@pytest.mark.parametrize(
    ("name", "wrong"),
    [
        ("nt_xent_loss", nt_xent_one_sided),
        ("nt_xent_loss", nt_xent_temperature_multiplies),
        ("nt_xent_loss", nt_xent_keeps_the_self_pair),
        ("denoising_loss", denoising_with_padding_as_original),
        ("masked_mean_pool", mean_pool_over_padding),
    ],
    ids=[
        "nt_xent_one_sided",
        "nt_xent_tau_multiplies",
        "nt_xent_self_pair",
        "denoising_padding_as_original",
        "pool_over_padding",
    ],
)
def test_e2s2_loss_check_rejects(monkeypatch, name: str, wrong) -> None:
    """Guards tests/test_e2s2.py::test_every_loss_term_matches_an_independent_computation."""
    monkeypatch.setattr(training.e2s2.model, name, wrong)
    with pytest.raises(AssertionError):
        e2s2_tests.test_every_loss_term_matches_an_independent_computation(
            "fusion_transformer", e2s2_tests.build_tokenizer()
        )


def test_two_class_denoising_check_rejects_dropping_the_wrong_class(monkeypatch) -> None:
    """Guards tests/test_e2s2.py::test_two_class_denoising_drops_the_shuffled_positions: the
    two-class loss must drop the "shuffled" label (1, fairseq's padding index), not "replaced" (2)."""
    monkeypatch.setattr(training.e2s2.model, "SHUFFLED", training.e2s2.collator.REPLACED)
    with pytest.raises(AssertionError):
        e2s2_tests.test_two_class_denoising_drops_the_shuffled_positions(e2s2_tests.build_tokenizer())


def replace_possibly_by_itself(ids, candidates, rng, replace_ratio, vocabulary):
    """Random replacement drawing from the whole vocabulary, the original token included."""
    ids = ids.copy()
    replaced = np.zeros(len(ids), dtype=bool)
    positions = np.flatnonzero(candidates)
    count = min(training.e2s2.collator.stochastic_round(replace_ratio * len(positions), rng), len(positions))
    chosen = rng.choice(positions, size=count, replace=False)
    ids[chosen] = vocabulary[rng.integers(len(vocabulary), size=count)]
    replaced[chosen] = True
    return ids, replaced


def token_masking(content, rng, mask_ratio, poisson_lambda, mask_token_id, max_length):
    """BERT-style masking: each masked token becomes its own mask instead of one mask per span."""
    view = content.copy()
    count = min(training.e2s2.collator.stochastic_round(mask_ratio * len(content), rng), len(content))
    view[rng.choice(len(content), size=count, replace=False)] = mask_token_id
    return view


@pytest.mark.parametrize(
    ("name", "wrong"), [("replace_randomly", replace_possibly_by_itself), ("poisson_span_mask", token_masking)]
)
def test_corruption_check_rejects(monkeypatch, name: str, wrong) -> None:
    """Guards tests/test_e2s2.py::test_collator_views_are_consistent_over_many_texts."""
    monkeypatch.setattr(training.e2s2.collator, name, wrong)
    with pytest.raises(AssertionError):
        e2s2_tests.test_collator_views_are_consistent_over_many_texts(e2s2_tests.build_tokenizer())


def test_span_length_check_rejects_token_masking(monkeypatch) -> None:
    """Guards tests/test_e2s2.py::test_span_lengths_follow_poisson: one mask per masked token
    gives a mean span length of 1, not lambda = 3."""
    patch_everywhere(monkeypatch, "poisson_span_mask", token_masking, training.e2s2.collator, e2s2_tests)
    with pytest.raises(AssertionError):
        e2s2_tests.test_span_lengths_follow_poisson()


def test_pooling_check_rejects_the_mean_over_padding(monkeypatch) -> None:
    """Guards tests/test_e2s2.py::test_padding_does_not_change_the_pooled_vector."""
    patch_everywhere(monkeypatch, "masked_mean_pool", mean_pool_over_padding, training.e2s2.model, e2s2_tests)
    with pytest.raises(AssertionError, match=NOT_CLOSE):
        e2s2_tests.test_padding_does_not_change_the_pooled_vector(e2s2_tests.build_tokenizer())


# --- word-level knowledge distillation ------------------------------------------------------------


def kd_mean_over_vocabulary(student_logits, teacher_logits, labels, temperature=1.0, num_items_in_batch=None):
    """``kl_div(reduction="mean")``: the KL averaged over tokens *and* vocabulary entries."""
    mask = labels.ne(-100)
    student = nn.functional.log_softmax(student_logits[mask].float() / temperature, dim=-1)
    teacher = nn.functional.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)
    return nn.functional.kl_div(student, teacher, log_target=True, reduction="mean")


def kd_ignoring_accumulation(student_logits, teacher_logits, labels, temperature=1.0, num_items_in_batch=None):
    """The KL divided by this batch's token count even under gradient accumulation."""
    return original_kd_loss(student_logits, teacher_logits, labels, temperature)


def kd_reversed(student_logits, teacher_logits, labels, temperature=1.0, num_items_in_batch=None):
    """KL(student || teacher) instead of KL(teacher || student)."""
    return original_kd_loss(teacher_logits, student_logits, labels, temperature, num_items_in_batch)


original_kd_loss = training.distill.word_level_kd_loss


@pytest.mark.parametrize(
    "wrong",
    [
        pytest.param(kd_mean_over_vocabulary, marks=pytest.mark.filterwarnings("ignore:reduction:UserWarning")),
        kd_reversed,
        kd_ignoring_accumulation,
    ],
)
def test_word_level_kd_check_rejects(monkeypatch, wrong) -> None:
    """Guards tests/test_distill.py::test_word_level_kd_loss_matches_token_by_token_kl."""
    patch_everywhere(monkeypatch, "word_level_kd_loss", wrong, training.distill, distill_tests)
    with pytest.raises(AssertionError):
        distill_tests.test_word_level_kd_loss_matches_token_by_token_kl()


def test_kd_trainer_check_rejects_the_loss_without_t_squared(monkeypatch, tmp_path) -> None:
    """Guards tests/test_distill.py::test_trainer_loss_equals_independent_computation: the soft
    term without Hinton's T^2 (here: the KL handed to the trainer divided by T^2)."""

    def without_t_squared(student_logits, teacher_logits, labels, temperature=1.0, num_items_in_batch=None):
        return (
            original_kd_loss(student_logits, teacher_logits, labels, temperature, num_items_in_batch) / temperature**2
        )

    monkeypatch.setattr(training.distill, "word_level_kd_loss", without_t_squared)
    with pytest.raises(AssertionError, match=NOT_CLOSE):
        distill_tests.test_trainer_loss_equals_independent_computation(tmp_path, None)
