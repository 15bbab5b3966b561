"""Depth-wise LSTM Transformer (Xu et al., arXiv 2007.06257): equations, wiring, caching, sharing,
checkpointing, Hub round trip, training, and config errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSeq2SeqLM, Seq2SeqTrainer, Seq2SeqTrainingArguments

from hf_fusion import DepthwiseLSTMConfig, DepthwiseLSTMForConditionalGeneration, FusionTransformerConfig
from hf_fusion.depthwise_lstm import (
    DepthwiseLSTMCell,
    DepthwiseLSTMDecoderLayer,
    DepthwiseLSTMEncoderLayer,
    GateLayerNorm,
)
from hf_fusion.layers import FusionAttention
from hf_fusion.modeling_fusion_transformer import FusionTransformerForConditionalGeneration
from tests.helpers import TINY, assert_cached_decoding_matches, assert_roundtrip_in_clean_process, random_batch

GATE_NORMS = ("per_gate", "joint")
CANDIDATES = ("linear", "ffn")
ACTIVATIONS = ("relu", "gelu", "tanh")
DECODER_MODES = ("per_sublayer", "concat")


def tiny_config(**overrides) -> DepthwiseLSTMConfig:
    return DepthwiseLSTMConfig(**{**TINY, **overrides})


def randomize_(module: nn.Module) -> None:
    """Give every parameter (LayerNorm scales and shifts included) a random value, so no term of
    the equations can hide behind an identity initialisation."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, 0.5)


def reference_step(
    cell: DepthwiseLSTMCell, inputs: list[torch.Tensor], h: torch.Tensor, c: torch.Tensor, joint: bool, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cell equations of docs/depthwise_lstm.md computed from the cell's weights, block by block, without the module's code.
    With the "ffn" candidate: c_hat = W_2 act(LN(W_1 x + b_1)) + b_2 and only the gates are blocks."""
    d = h.shape[-1]
    x = torch.cat([*inputs, h], dim=-1)
    weight, bias = cell.proj.weight, cell.proj.bias
    num_blocks = weight.shape[0] // d  # 4: i, f, o, c_hat ("linear"); 3: i, f, o ("ffn")
    blocks = [x @ weight[k * d : (k + 1) * d].T + bias[k * d : (k + 1) * d] for k in range(num_blocks)]
    eps = cell.norm.eps
    if joint:
        stacked = torch.stack(blocks, dim=-2)  # (batch, len, blocks, d)
        mean = stacked.mean(dim=(-2, -1), keepdim=True)
        var = ((stacked - mean) ** 2).mean(dim=(-2, -1), keepdim=True)
        normed = list(((stacked - mean) / torch.sqrt(var + eps)).unbind(-2))
    else:
        normed = [standardize(z, eps) for z in blocks]
    normed = [z * cell.norm.weight[k] + cell.norm.bias[k] for k, z in enumerate(normed)]
    input_gate, forget_gate, output_gate = (1.0 / (1.0 + torch.exp(-z)) for z in normed[:3])
    if num_blocks == 4:
        candidate = act(normed[3], activation)
    else:
        inner = standardize(x @ cell.fc1.weight.T + cell.fc1.bias, cell.ffn_layer_norm.eps)
        inner = act(inner * cell.ffn_layer_norm.weight + cell.ffn_layer_norm.bias, activation)
        candidate = inner @ cell.fc2.weight.T + cell.fc2.bias
    c_new = forget_gate * c + input_gate * candidate
    return output_gate * c_new, c_new


def standardize(z: torch.Tensor, eps: float) -> torch.Tensor:
    mean = z.mean(-1, keepdim=True)
    var = ((z - mean) ** 2).mean(-1, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


def act(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.where(z > 0, z, torch.zeros_like(z))
    if activation == "tanh":
        return 1 - 2 / (torch.exp(2 * z) + 1)
    return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))


def all_cells(model: nn.Module) -> list[DepthwiseLSTMCell]:
    return [module for module in model.modules() if isinstance(module, DepthwiseLSTMCell)]


# --- the equations ---------------------------------------------------------------------------


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("gate_norm", GATE_NORMS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("num_inputs", (1, 2))
def test_lstm_step_matches_the_equations(candidate: str, gate_norm: str, activation: str, num_inputs: int) -> None:
    config = tiny_config(dlstm_gate_norm=gate_norm, dlstm_activation=activation, dlstm_candidate=candidate)
    cell = DepthwiseLSTMCell(config, ffn_dim=24, num_inputs=num_inputs).eval()
    randomize_(cell)
    inputs = [torch.randn(3, 5, config.d_model) for _ in range(num_inputs)]
    h, c = torch.randn(3, 5, config.d_model), torch.randn(3, 5, config.d_model)
    got_h, got_c = cell(inputs, h, c)
    want_h, want_c = reference_step(cell, inputs, h, c, gate_norm == "joint", activation)
    torch.testing.assert_close(got_c, want_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_h, want_h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("built", "wrong"), [("per_gate", "joint"), ("joint", "per_gate")])
def test_the_cell_reference_tells_the_gate_norms_apart(built: str, wrong: str) -> None:
    """The reference above is strict enough to catch a cell that normalises the wrong way: the
    reference of the *other* gate norm does not match the cell's output."""
    cell = DepthwiseLSTMCell(tiny_config(dlstm_gate_norm=built), ffn_dim=32).eval()
    randomize_(cell)
    a, h, c = (torch.randn(2, 4, TINY["d_model"]) for _ in range(3))
    got_h = cell([a], h, c)[0]
    torch.testing.assert_close(got_h, reference_step(cell, [a], h, c, built == "joint", "tanh")[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got_h, reference_step(cell, [a], h, c, wrong == "joint", "tanh")[0], atol=1e-3)


def reference_attention(
    attention: FusionAttention, layer_norm: nn.LayerNorm | None, x: torch.Tensor, **kwargs
) -> torch.Tensor:
    """A sub-layer's output as the layer must compute it: ``Attn(x)`` ("pure"), or the authors'
    pre-norm residual on the normalised input, ``LN(x) + Attn(LN(x))``, with the LayerNorm written out."""
    if layer_norm is None:
        return attention(x, **kwargs)[0]
    normed = standardize(x, layer_norm.eps) * layer_norm.weight + layer_norm.bias
    return normed + attention(normed, **kwargs)[0]


@pytest.mark.parametrize("residual", (True, False))
def test_encoder_layer_is_attention_then_one_step(residual: bool) -> None:
    config = tiny_config(dlstm_attention_residual=residual)
    layer = DepthwiseLSTMEncoderLayer(config).eval()
    randomize_(layer)
    assert (layer.self_attn_layer_norm is not None) is residual
    h, c = torch.randn(2, 6, config.d_model), torch.randn(2, 6, config.d_model)
    out = layer(torch.cat([h, c], -1))[0]
    attn = reference_attention(layer.self_attn, layer.self_attn_layer_norm, h)
    want_h, want_c = reference_step(layer.lstm, [attn], h, c, joint=True, activation="tanh")
    torch.testing.assert_close(out, torch.cat([want_h, want_c], -1), atol=1e-5, rtol=1e-5)
    # Plausible wrong layers are caught by the same check: a residual on the raw input x instead
    # of LN(x) in the authors' form, a residual at all in the "pure" form.
    normed = standardize(h, config.layer_norm_eps)
    wrong = attn - normed * layer.self_attn_layer_norm.weight - layer.self_attn_layer_norm.bias + h if residual else attn + h
    wrong_h, wrong_c = reference_step(layer.lstm, [wrong], h, c, joint=True, activation="tanh")
    assert not torch.allclose(out, torch.cat([wrong_h, wrong_c], -1), atol=1e-3)


@pytest.mark.parametrize("residual", (True, False))
@pytest.mark.parametrize("mode", DECODER_MODES)
def test_decoder_layer_wiring(mode: str, residual: bool) -> None:
    """per_sublayer: step after self-attention, cross-attention reads that h, second step.
    concat (the authors' dual-input cell): cross-attention reads the self-attention sub-layer's
    output, one step on [self; cross; h]. Each sub-layer is pure or pre-norm residual."""
    config = tiny_config(dlstm_decoder_mode=mode, dlstm_attention_residual=residual)
    layer = DepthwiseLSTMDecoderLayer(config).eval()
    randomize_(layer)
    h, c = torch.randn(2, 5, config.d_model), torch.randn(2, 5, config.d_model)
    memory = torch.randn(2, 7, config.d_model)
    out = layer(torch.cat([h, c], -1), None, memory)[0]
    self_out = reference_attention(layer.self_attn, layer.self_attn_layer_norm, h)
    cross_norm = layer.encoder_attn_layer_norm
    if mode == "per_sublayer":
        h1, c1 = reference_step(layer.self_attn_lstm, [self_out], h, c, joint=True, activation="tanh")
        cross_out = reference_attention(layer.encoder_attn, cross_norm, h1, key_value_states=memory)
        want_h, want_c = reference_step(layer.encoder_attn_lstm, [cross_out], h1, c1, joint=True, activation="tanh")
    else:
        cross_out = reference_attention(layer.encoder_attn, cross_norm, self_out, key_value_states=memory)
        want_h, want_c = reference_step(layer.lstm, [self_out, cross_out], h, c, joint=True, activation="tanh")
        # The wrong wiring (cross-attention querying with h instead of the self-attention output):
        wrong_cross = reference_attention(layer.encoder_attn, cross_norm, h, key_value_states=memory)
        wrong_h, _ = reference_step(layer.lstm, [self_out, wrong_cross], h, c, joint=True, activation="tanh")
        assert not torch.allclose(out[..., : config.d_model], wrong_h, atol=1e-3)
    torch.testing.assert_close(out, torch.cat([want_h, want_c], -1), atol=1e-5, rtol=1e-5)


def test_defaults_are_the_authors_cell() -> None:
    """The family default is the authors' cell: dual-input decoder step, joint LayerNorm of the
    pre-activations, tanh candidate, pre-norm residual attention sub-layers."""
    config = DepthwiseLSTMConfig()
    assert (config.dlstm_decoder_mode, config.dlstm_gate_norm, config.dlstm_activation) == ("concat", "joint", "tanh")
    assert config.dlstm_candidate == "linear" and config.dlstm_attention_residual is True


def test_a_config_saved_before_the_attention_residual_keeps_its_meaning() -> None:
    """config.json files written before ``dlstm_attention_residual`` existed describe pure-attention
    models; loading one must not silently add LayerNorms (and change what the weights compute)."""
    saved = tiny_config(dlstm_attention_residual=False).to_dict()
    del saved["dlstm_attention_residual"]
    assert DepthwiseLSTMConfig.from_dict(saved).dlstm_attention_residual is False
    assert DepthwiseLSTMConfig.from_dict(tiny_config().to_dict()).dlstm_attention_residual is True


# --- no residual stream left -----------------------------------------------------------------


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("mode", DECODER_MODES)
def test_pure_attention_layers_hold_only_attention_and_cells(mode: str, candidate: str) -> None:
    """Structure of the paper's "pure attention" form: a layer's children are attention modules
    and LSTM cells, so every LayerNorm (and, with the "ffn" candidate, every feed-forward weight)
    sits inside a cell. The authors' form adds exactly one pre-norm LayerNorm per attention."""
    for residual in (False, True):
        config = tiny_config(dlstm_decoder_mode=mode, dlstm_candidate=candidate, dlstm_attention_residual=residual)
        model = DepthwiseLSTMForConditionalGeneration(config)
        for layer in [*model.model.encoder.layers, *model.model.decoder.layers]:
            kinds = [type(child) for child in layer.children()]
            assert set(kinds) == {FusionAttention, DepthwiseLSTMCell} | ({nn.LayerNorm} if residual else set()), kinds
            assert kinds.count(nn.LayerNorm) == (kinds.count(FusionAttention) if residual else 0)
            assert any(isinstance(m, GateLayerNorm) for m in layer.modules())


@pytest.mark.parametrize(("mode", "candidate"), [("per_sublayer", "linear"), ("concat", "ffn")])
def test_closed_output_gates_zero_every_layer_state(mode: str, candidate: str) -> None:
    """Numerics: with every output gate forced shut (o = sigmoid(-1e4) = 0) every layer's h is
    exactly 0 whatever the input. A residual join would leave ``x + f(x)``, which is not 0."""
    config = tiny_config(dlstm_decoder_mode=mode, dlstm_candidate=candidate)
    model = DepthwiseLSTMForConditionalGeneration(config).eval()
    randomize_(model)
    with torch.no_grad():
        for cell in all_cells(model):
            cell.norm.weight[2].zero_()
            cell.norm.bias[2].fill_(-1e4)
        out = model(**random_batch(), output_hidden_states=True)
    assert out.encoder_hidden_states[0].abs().sum() > 0  # the embeddings themselves are not zero
    for states in (out.encoder_hidden_states[1:-1], out.decoder_hidden_states[1:-1]):
        for h in states:
            assert torch.equal(h, torch.zeros_like(h))
    # The tops are the final LayerNorm of h = 0: its shift, at every position.
    top = out.encoder_last_hidden_state
    torch.testing.assert_close(top, model.model.encoder.layer_norm.bias.expand_as(top))


def test_open_forget_and_output_gates_carry_the_embeddings_through_the_cell() -> None:
    """With f = o = 1 and i = 0 in every step the cell is a pure carry: the top encoder state
    (before the final LayerNorm) is c_0 = the embedding output, however deep the stack."""
    model = DepthwiseLSTMForConditionalGeneration(tiny_config(encoder_layers=4)).eval()
    randomize_(model)
    with torch.no_grad():
        for cell in all_cells(model):
            cell.norm.weight[:3].zero_()
            cell.norm.bias[0].fill_(-1e4)  # input gate shut
            cell.norm.bias[1:3].fill_(1e4)  # forget and output gates open
        out = model(**random_batch(), output_hidden_states=True)
    for h in out.encoder_hidden_states[1:-1]:
        torch.testing.assert_close(h, out.encoder_hidden_states[0])


def test_hidden_states_expose_h() -> None:
    """``hidden(state)`` is the visible h (d_model wide), as the encoder-memory seam needs."""
    model = DepthwiseLSTMForConditionalGeneration(tiny_config(encoder_layers=3)).eval()
    randomize_(model)
    batch = random_batch()
    encoder = model.model.encoder
    with torch.no_grad():
        out = encoder(input_ids=batch["input_ids"], output_hidden_states=True)
        embeddings = out.hidden_states[0]
        state = torch.cat([embeddings, embeddings], -1)  # h_0 = c_0 = embedding output
        for step_idx, layer in enumerate(encoder.layers):
            state = layer(state)[0]
            if step_idx < len(encoder.layers) - 1:
                torch.testing.assert_close(out.hidden_states[step_idx + 1], state[..., : TINY["d_model"]])
        torch.testing.assert_close(out.last_hidden_state, encoder.layer_norm(state[..., : TINY["d_model"]]))
    assert len(out.hidden_states) == 4 and all(h.shape[-1] == TINY["d_model"] for h in out.hidden_states)


# --- gradients, caching, sharing, checkpointing ----------------------------------------------


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("mode", DECODER_MODES)
def test_gradients_reach_every_gate(mode: str, candidate: str) -> None:
    config = tiny_config(dlstm_decoder_mode=mode, dlstm_candidate=candidate)
    model = DepthwiseLSTMForConditionalGeneration(config).train()
    batch = random_batch()
    model(**batch, labels=batch["decoder_input_ids"]).loss.backward()
    d = TINY["d_model"]
    cells = all_cells(model)
    assert len(cells) == 2 + (4 if mode == "per_sublayer" else 2)
    for cell in cells:
        blocks = 4 if candidate == "linear" else 3
        proj_grad = cell.proj.weight.grad.view(blocks, d, -1)  # (i, f, o[, c_hat]) blocks
        assert (proj_grad.abs().sum(dim=(1, 2)) > 0).all()
        assert (cell.proj.bias.grad.view(blocks, d).abs().sum(-1) > 0).all()
        assert (cell.norm.weight.grad.abs().sum(-1) > 0).all()
        assert (cell.norm.bias.grad.abs().sum(-1) > 0).all()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mode", DECODER_MODES)
@pytest.mark.parametrize(("gate_norm", "candidate"), [("per_gate", "linear"), ("joint", "ffn")])
def test_cached_decoding_matches_full_recomputation(mode: str, gate_norm: str, candidate: str) -> None:
    config = tiny_config(dlstm_decoder_mode=mode, dlstm_gate_norm=gate_norm, dlstm_candidate=candidate)
    model = DepthwiseLSTMForConditionalGeneration(config)
    randomize_(model)
    assert_cached_decoding_matches(model, random_batch(tgt_len=7))


@pytest.mark.parametrize("mode", DECODER_MODES)
def test_recurrent_sharing_runs_one_block_at_every_step(mode: str) -> None:
    """DepthwiseLSTMConfig(sharing_strategy="recurrent"): one block per stack, LSTM cell included,
    equal to an unshared model whose blocks are all copies of it; cached decoding still exact."""
    depth = dict(encoder_layers=3, decoder_layers=3, dlstm_decoder_mode=mode)
    shared = DepthwiseLSTMForConditionalGeneration(tiny_config(sharing_strategy="recurrent", **depth)).eval()
    randomize_(shared)
    assert len(shared.model.encoder.layers) == len(shared.model.decoder.layers) == 1
    unshared = DepthwiseLSTMForConditionalGeneration(tiny_config(**depth)).eval()
    state = {k: v for k, v in shared.state_dict().items() if ".layers." not in k}
    for stack in ("encoder", "decoder"):
        block = getattr(shared.model, stack).layers[0].state_dict()
        for step_idx in range(3):
            state.update({f"model.{stack}.layers.{step_idx}.{k}": v for k, v in block.items()})
    unshared.load_state_dict(state)
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(shared(**batch).logits, unshared(**batch).logits)
    layer_params = sum(p.numel() for p in unshared.model.encoder.layers[0].parameters())
    assert unshared.num_parameters() - shared.num_parameters() == 2 * layer_params + 2 * sum(
        p.numel() for p in unshared.model.decoder.layers[0].parameters()
    )
    assert_cached_decoding_matches(shared, batch)


@pytest.mark.slow
@pytest.mark.parametrize("use_reentrant", (True, False))
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant: bool) -> None:
    model = DepthwiseLSTMForConditionalGeneration(tiny_config()).train()
    randomize_(model)
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert all(layer.gradient_checkpointing for layer in checkpointed.model.decoder.layers)
    batch = random_batch()
    for m in (model, checkpointed):
        m(**batch, labels=batch["decoder_input_ids"]).loss.backward()
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)


# --- the family, the Hub, training -----------------------------------------------------------


def test_family_registration_and_composition() -> None:
    config = AutoConfig.for_model("depthwise_lstm", **TINY)
    assert type(config) is DepthwiseLSTMConfig and config.depth_connection == "depthwise_lstm"
    assert config.add_final_layer_norm
    assert type(AutoModelForSeq2SeqLM.from_config(config)) is DepthwiseLSTMForConditionalGeneration
    # The seam key alone turns any family into a depth-wise LSTM model.
    core = FusionTransformerForConditionalGeneration(FusionTransformerConfig(**TINY, depth_connection="depthwise_lstm"))
    assert isinstance(core.model.decoder.layers[0], DepthwiseLSTMDecoderLayer)


@pytest.mark.slow
def test_roundtrip_in_clean_process(tmp_path) -> None:
    options = dict(dlstm_decoder_mode="concat", dlstm_gate_norm="joint", dlstm_activation="gelu", dlstm_candidate="ffn")
    model = DepthwiseLSTMForConditionalGeneration(tiny_config(**options))
    randomize_(model)
    folder = assert_roundtrip_in_clean_process(model, tmp_path)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == "depthwise_lstm"
    assert {key: saved[key] for key in options} == options
    assert (folder / "depthwise_lstm.py").exists()


def test_seq2seq_trainer_reduces_the_loss(tmp_path) -> None:
    """A few optimiser steps on a copy task: the logged training loss goes down."""
    model = DepthwiseLSTMForConditionalGeneration(tiny_config())
    rows = []
    for _ in range(32):
        ids = torch.randint(5, 15, (6,))
        labels = torch.cat([ids, torch.tensor([2])])
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("dlstm_decoder_mode", "parallel", "'per_sublayer', 'concat'"),
        ("dlstm_gate_norm", "per_block", "'per_gate', 'joint'"),
        ("dlstm_activation", "sigmoid", "'relu', 'gelu', 'tanh'"),
        ("dlstm_candidate", "mlp", "'linear', 'ffn'"),
        ("depth_connection", "residual", "'depthwise_lstm'"),
    ],
)
def test_bad_options_name_the_field_and_the_allowed_values(field: str, value: str, allowed: str) -> None:
    with pytest.raises(ValueError, match=f"DepthwiseLSTMConfig.{field} = '{value}'.*allowed values: {allowed}"):
        tiny_config(**{field: value})


def test_base_config_validates_the_options_too() -> None:
    with pytest.raises(ValueError, match="FusionTransformerConfig.dlstm_gate_norm = 'batch'"):
        FusionTransformerConfig(**TINY, dlstm_gate_norm="batch")


def test_pre_norm_flag_is_refused() -> None:
    with pytest.raises(ValueError, match="normalize_before = True .*depthwise_lstm.*allowed: False"):
        tiny_config(normalize_before=True)
