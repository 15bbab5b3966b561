"""EncoderFusion: transparent attention, fine-grained layer attention and DLCL.

Every numerical claim is checked against an independent recomputation of the equation in docs/encoder_fusion.md
from the model's own tensors (encoder states via ``output_hidden_states``, the seam modules'
weights), never against stored numbers.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from hf_fusion import (
    EncoderFusionConfig,
    EncoderFusionForConditionalGeneration,
    FusionTransformerConfig,
    FusionTransformerForConditionalGeneration,
    convert_from_pretrained,
)
from hf_fusion.memory import FineGrainedLayerAttentionMemory
from tests.helpers import (
    TINY,
    assert_cached_decoding_matches,
    assert_roundtrip_in_clean_process,
    build_tiny,
    random_batch,
)

MODES = ("transparent", "fine_grained", "dlcl")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OUT_OF_RANGE = r"is out of range; allowed: \[0.0, 1.0\)"


def build(fusion_mode: str, **overrides) -> EncoderFusionForConditionalGeneration:
    """A tiny EncoderFusion model with 3 encoder and 2 decoder layers (so N + 1 != M)."""
    return build_tiny("encoder_fusion", **{"encoder_layers": 3, "fusion_mode": fusion_mode, **overrides})


def randomize(module: torch.nn.Module) -> None:
    """Move every parameter of ``module`` away from its initialisation (LayerNorms included), so
    a check cannot pass because a weight is still 1, 0 or uniform."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)


def memory_init_bound(config: EncoderFusionConfig) -> float:
    """Transparent: +-sqrt(1 / (N + 1)); fine-grained: +-sqrt(2 / (M + N + 1))."""
    N, M = config.encoder_layers, config.decoder_layers
    return math.sqrt(1 / (N + 1)) if config.encoder_memory == "transparent" else math.sqrt(2 / (M + N + 1))


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def capture_memories(model: EncoderFusionForConditionalGeneration, batch: dict) -> list[torch.Tensor]:
    """Run the model and return what each decoder step's cross-attention actually read."""
    memories = []

    def hook(module, args, kwargs):
        memories.append(kwargs["key_value_states"])

    handles = [
        layer.encoder_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.decoder.layers
    ]
    with torch.no_grad():
        model(**batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return memories


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fusion_mode, field, value",
    [
        ("transparent", "encoder_memory", "transparent"),
        ("fine_grained", "encoder_memory", "fine_grained"),
        ("dlcl", "depth_connection", "dlcl"),
    ],
)
def test_fusion_mode_maps_onto_its_seam(fusion_mode, field, value):
    config = EncoderFusionConfig(fusion_mode=fusion_mode)
    assert getattr(config, field) == value
    assert config.model_type == "encoder_fusion"
    reloaded = EncoderFusionConfig.from_dict(config.to_dict())
    assert reloaded.to_dict() == config.to_dict()


def test_fusion_defaults_per_mode():
    assert EncoderFusionConfig(fusion_mode="transparent").fusion_dropout == 0.1
    assert EncoderFusionConfig(fusion_mode="fine_grained").fusion_dropout == 0.3
    assert EncoderFusionConfig(fusion_mode="transparent", normalize_before=True).fusion_embedding_layer_norm is True
    assert EncoderFusionConfig(fusion_mode="fine_grained").fusion_embedding_layer_norm is True
    assert EncoderFusionConfig(fusion_mode="fine_grained", normalize_before=True).fusion_embedding_layer_norm is False
    dlcl = EncoderFusionConfig(fusion_mode="dlcl")
    assert dlcl.fusion_dropout is None and dlcl.encoder_memory == "last"
    # Composition: DLCL inside the stacks and a fine-grained memory between them.
    both = EncoderFusionConfig(fusion_mode="dlcl", encoder_memory="fine_grained")
    assert (both.depth_connection, both.encoder_memory, both.fusion_dropout) == ("dlcl", "fine_grained", 0.3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fusion_mode": "layerwise"}, r"fusion_mode = 'layerwise'.*allowed values: 'transparent', 'fine_grained'"),
        ({"fusion_mode": "fine_grained", "fusion_dropout": 1.0}, rf"fusion_dropout = 1.0 {OUT_OF_RANGE}"),
        ({"fusion_mode": "transparent", "fusion_dropout": -0.1}, rf"fusion_dropout = -0.1 {OUT_OF_RANGE}"),
        ({"fusion_mode": "transparent", "fusion_dropout": "high"}, r"fusion_dropout = 'high' has the wrong type; expected float \| None"),
        ({"fusion_mode": "dlcl", "fusion_dropout": 0.2}, r"fusion_dropout = 0.2 has no effect.*allowed: None"),
        (
            {"fusion_mode": "transparent", "encoder_memory": "fine_grained"},
            r"encoder_memory = 'fine_grained' contradicts.*allowed encoder_memory: 'transparent' or unset",
        ),
        (  # an explicit choice equal to the core default is not silently rewritten either
            {"fusion_mode": "transparent", "encoder_memory": "last"},
            r"encoder_memory = 'last' contradicts fusion_mode = 'transparent'",
        ),
        (
            {"fusion_mode": "fine_grained", "fusion_embedding_layer_norm": "yes"},
            r"fusion_embedding_layer_norm = 'yes' has the wrong type; expected bool \| None",
        ),
    ],
)
def test_bad_config_is_refused_with_field_and_allowed_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EncoderFusionConfig(**kwargs)


def test_core_config_refuses_unknown_seam_keys():
    with pytest.raises(ValueError, match=r"encoder_memory = 'all'.*'last', 'transparent', 'fine_grained'"):
        FusionTransformerConfig(encoder_memory="all")
    with pytest.raises(ValueError, match=r"depth_connection = 'dense'.*'residual', 'dlcl'"):
        FusionTransformerConfig(depth_connection="dense")


# --- the equations -----------------------------------------------------------------------------


def test_transparent_memory_is_softmax_weighted_sum_of_encoder_layers():
    model = build("transparent").eval()
    memory = model.model.decoder.memory
    randomize(memory)
    batch = random_batch()
    read = capture_memories(model, batch)

    encoder = model.get_encoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
    )
    layers = list(encoder.hidden_states)  # X^0 .. X^N, each (batch, src_len, d_model)
    layers[0] = layer_norm(layers[0], memory.embedding_layer_norm)  # the LayerNorm on the embedding output
    assert len(read) == model.config.decoder_layers
    for m, memory_read in enumerate(read):
        s = torch.softmax(memory.weight[:, m], dim=0)  # s[n, m] over encoder layers n
        expected = sum(s[n] * layers[n] for n in range(len(layers)))
        torch.testing.assert_close(memory_read, expected, atol=1e-5, rtol=1e-5)


PRE_NORM = {"normalize_before": True, "add_final_layer_norm": True}


@pytest.mark.parametrize(
    "overrides",
    [{}, PRE_NORM, {**PRE_NORM, "fusion_top_layer_norm": True}, {"sharing_strategy": "recurrent"}],
    ids=["post-norm", "pre-norm", "pre-norm-normalised-top", "recurrent-sharing"],
)
def test_fine_grained_memory_is_per_dimension_layer_attention(overrides):
    model = build("fine_grained", **overrides).eval()
    memory = model.model.decoder.memory
    randomize(memory)
    batch = random_batch()
    read = capture_memories(model, batch)

    encoder_stack = model.get_encoder()
    raw_top = []  # what enters the encoder's final LayerNorm, when it has one
    hook = (
        encoder_stack.layer_norm.register_forward_pre_hook(lambda module, args: raw_top.append(args[0]))
        if encoder_stack.layer_norm is not None
        else None
    )
    encoder = encoder_stack(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    if hook is not None:
        hook.remove()
    x0 = model.model.shared(batch["input_ids"])  # word embeddings WITHOUT positions
    if model.config.normalize_before:
        assert memory.embedding_layer_norm is None  # the official code normalises X^0 in post-norm models only
    else:
        x0 = layer_norm(x0, memory.embedding_layer_norm)
    layers = [x0] + list(encoder.hidden_states[1:])
    other = list(layers)
    if raw_top and not model.config.fusion_top_layer_norm:  # the official default: X^N before the final LayerNorm
        layers[-1], other[-1] = raw_top[0], layers[-1]
    elif raw_top:
        other[-1] = raw_top[0]
    assert len(read) == model.config.decoder_layers
    for m, memory_read in enumerate(read):
        w = torch.softmax(memory.weight[m], dim=0)  # (N + 1, d): softmax over layers, per dimension
        weighted = sum(w[n] * layers[n] for n in range(len(layers)))
        torch.testing.assert_close(memory_read, layer_norm(weighted, memory.layer_norm), atol=1e-5, rtol=1e-5)
        if raw_top:  # the reference tells the two choices of X^N apart
            wrong = sum(w[n] * other[n] for n in range(len(other)))
            assert not torch.allclose(memory_read, layer_norm(wrong, memory.layer_norm), atol=1e-3)


def dlcl_recompute(
    connection, run_layer, y0: torch.Tensor, num_steps: int, pre_norm: bool
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The DLCL equation of docs/encoder_fusion.md with the connection's W and LayerNorms: pre-norm
    x_{l+1} = sum_k W[l, k] LN_k(y_k) (y_0 un-normalised); post-norm x_{l+1} = LN(sum_k W[l, k] y_k)."""
    W = connection.weight
    outputs, normed = [y0], [y0]

    def mix(row: int) -> torch.Tensor:
        x = sum(W[row, k] * normed[k] for k in range(row + 1))
        return x if pre_norm or row == 0 else layer_norm(x, connection.layer_norms[row - 1])

    for step in range(num_steps):
        y = run_layer(step, mix(step))
        outputs.append(y)
        normed.append(layer_norm(y, connection.layer_norms[step]) if pre_norm else y)
    return outputs, mix(num_steps)


@pytest.mark.parametrize("pre_norm", [False, True], ids=["post-norm", "pre-norm"])
def test_dlcl_matches_the_equation_in_encoder_and_decoder(pre_norm):
    model = build("dlcl", normalize_before=pre_norm, add_final_layer_norm=pre_norm).eval()
    encoder, decoder = model.model.encoder, model.model.decoder
    for connection in (encoder.connection, decoder.connection):
        randomize(connection)
        with torch.no_grad():
            connection.weight.copy_(torch.randn_like(connection.weight).tril())  # arbitrary signs, no normalisation
    batch = random_batch()
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, use_cache=False)

        key_mask = batch["attention_mask"][:, None, None, :].bool()
        enc_outputs, enc_final = dlcl_recompute(
            encoder.connection,
            lambda step, x: encoder.layers[step](x, attention_mask=key_mask)[0],
            out.encoder_hidden_states[0],
            model.config.encoder_layers,
            pre_norm,
        )
        if pre_norm:
            enc_final = encoder.layer_norm(enc_final)
        torch.testing.assert_close(out.encoder_last_hidden_state, enc_final, atol=1e-5, rtol=1e-5)
        for ours, theirs in zip(out.encoder_hidden_states[1:-1], enc_outputs[1:-1]):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

        dec_outputs, dec_final = dlcl_recompute(
            decoder.connection,
            lambda step, x: decoder.layers[step](x, None, enc_final, encoder_attention_mask=key_mask)[0],
            out.decoder_hidden_states[0],
            model.config.decoder_layers,
            pre_norm,
        )
        if pre_norm:
            dec_final = decoder.layer_norm(dec_final)
        torch.testing.assert_close(out.decoder_hidden_states[-1], dec_final, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.logits, model.project(dec_final), atol=1e-5, rtol=1e-5)


def training_memory_reference(memory, step: int, encoder, variant: str = "official") -> torch.Tensor:
    """A fusing memory's training-mode output written out from its parameters, drawing the
    dropout masks in the module's order from the same random stream. ``variant`` builds the
    plausible wrong implementations the check must reject: ``"after_softmax"`` (dropout on the
    normalised weights instead of DropConnect on W), ``"no_dropconnect"``, and for fine-grained
    ``"single_embedding_dropout"`` (one dropout on X^0 where the official code applies two)."""
    p = memory.dropout
    states = encoder.layer_states  # (batch, N + 1, src_len, d)
    if isinstance(memory, FineGrainedLayerAttentionMemory):
        x0 = encoder.token_embeddings
        for _ in range(1 if variant == "single_embedding_dropout" else 2):
            x0 = F.dropout(x0, p=memory.embedding_dropout)
        if memory.embedding_layer_norm is not None:
            x0 = layer_norm(x0, memory.embedding_layer_norm)
        layers = [x0] + list(states[:, 1:].unbind(1))
        raw = memory.weight[step]  # (N + 1, d): normalised over layers, per dimension
    else:
        layers = [layer_norm(states[:, 0], memory.embedding_layer_norm)] + list(states[:, 1:].unbind(1))
        raw = memory.weight[:, step]  # (N + 1,)
    if variant == "after_softmax":
        weights = F.dropout(torch.softmax(raw, dim=0), p=p)
    elif variant == "no_dropconnect":
        weights = torch.softmax(raw, dim=0)
    else:
        weights = torch.softmax(F.dropout(raw, p=p), dim=0)
    fused = sum(weights[n] * layers[n] for n in range(len(layers)))
    if isinstance(memory, FineGrainedLayerAttentionMemory):
        fused = F.dropout(layer_norm(fused, memory.layer_norm), p=p)
    return fused


@pytest.mark.parametrize("fusion_mode", ["transparent", "fine_grained"])
def test_fusion_dropout_is_dropconnect_on_the_logits_in_training(fusion_mode):
    """Training mode, same random stream: the memory equals the reference with DropConnect on W
    *before* the softmax (and, fine-grained, two dropouts on X^0 and one on the fused output), and
    differs from each plausible wrong variant built the same way. Evaluation mode is deterministic."""
    model = build(fusion_mode, fusion_dropout=0.4, dropout=0.3).eval()
    memory = model.model.decoder.memory
    randomize(memory)
    batch = random_batch()
    with torch.no_grad():
        encoder = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        memory.train()
        args = (1, encoder.last_hidden_state, encoder.layer_states, encoder.token_embeddings)
        torch.manual_seed(7)
        got = memory(*args)
        torch.manual_seed(7)
        torch.testing.assert_close(got, training_memory_reference(memory, 1, encoder), atol=1e-5, rtol=1e-5)
        wrong_variants = ["after_softmax", "no_dropconnect"]
        if fusion_mode == "fine_grained":
            wrong_variants.append("single_embedding_dropout")
        for variant in wrong_variants:
            torch.manual_seed(7)
            assert not torch.allclose(got, training_memory_reference(memory, 1, encoder, variant), atol=1e-3), variant
        memory.eval()
        torch.testing.assert_close(memory(*args), memory(*args))


def test_fused_memory_needs_the_encoder_layer_states():
    model = build("transparent").eval()
    batch = random_batch()
    encoder_last = model.get_encoder()(**{k: batch[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
    with pytest.raises(ValueError, match="layer_states"):
        model(
            encoder_outputs=(encoder_last,),
            attention_mask=batch["attention_mask"],
            decoder_input_ids=batch["decoder_input_ids"],
        )


# --- weights, gradients, parameter counts --------------------------------------------------------


@pytest.mark.parametrize("fusion_mode", MODES)
def test_gradients_reach_every_fusion_parameter(fusion_mode):
    model = build(fusion_mode)
    batch = random_batch()
    model(**batch, labels=batch["decoder_input_ids"]).loss.backward()
    base = model.model
    modules = {
        "transparent": [base.decoder.memory],
        "fine_grained": [base.decoder.memory],
        "dlcl": [base.encoder.connection, base.decoder.connection],
    }[fusion_mode]
    for module in modules:
        for name, parameter in module.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    if fusion_mode == "dlcl":
        for connection in modules:
            lower = torch.ones_like(connection.weight).tril().bool()
            assert (connection.weight.grad[lower] != 0).all()  # every used entry learns
            assert (connection.weight.grad[~lower] == 0).all()  # entries above the diagonal are never used


@pytest.mark.parametrize("fusion_mode", MODES)
def test_fusion_weights_shapes_and_normalisation(fusion_mode):
    model = build(fusion_mode)
    N, M, d = model.config.encoder_layers, model.config.decoder_layers, model.config.d_model
    weights = model.fusion_weights()
    memory = model.model.decoder.memory
    if fusion_mode == "transparent":
        assert set(weights) == {"encoder_memory"} and memory.weight.shape == (N + 1, M)
        assert memory.weight.abs().max() <= memory_init_bound(model.config)
        torch.testing.assert_close(weights["encoder_memory"], torch.softmax(memory.weight, dim=0).T)
    elif fusion_mode == "fine_grained":
        assert set(weights) == {"encoder_memory"} and memory.weight.shape == (M, N + 1, d)
        assert memory.weight.abs().max() <= memory_init_bound(model.config)
        per_dimension = torch.softmax(memory.weight, dim=1)  # (M, N + 1, d)
        torch.testing.assert_close(per_dimension.sum(dim=1), torch.ones(M, d))
        torch.testing.assert_close(weights["encoder_memory"], per_dimension.mean(dim=-1))
    else:
        assert set(weights) == {"encoder_connection", "decoder_connection"}
        for key, depth in (("encoder_connection", N), ("decoder_connection", M)):
            rows = torch.arange(1, depth + 2, dtype=torch.float32)[:, None]
            expected = torch.ones(depth + 1, depth + 1).tril() / rows  # 1 / (l + 1) on and below the diagonal
            torch.testing.assert_close(weights[key], expected)
    if fusion_mode != "dlcl":
        assert weights["encoder_memory"].shape == (M, N + 1)
        torch.testing.assert_close(weights["encoder_memory"].sum(dim=1), torch.ones(M))


@pytest.mark.parametrize("fusion_mode", MODES)
def test_fusion_weights_missing_from_a_checkpoint_get_the_paper_init(fusion_mode, tmp_path):
    from safetensors.torch import load_file, save_file

    model = build(fusion_mode)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # every weight away from any initialisation
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    fusion_keys = [key for key in state if ".memory." in key or ".connection." in key]
    save_file({k: v for k, v in state.items() if k not in fusion_keys}, tmp_path / "model.safetensors", {"format": "pt"})

    loaded = EncoderFusionForConditionalGeneration.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.model.shared.weight, model.model.shared.weight)  # the rest is loaded
    fresh = build(fusion_mode)
    loaded_state, fresh_state = loaded.state_dict(), fresh.state_dict()
    for key in fusion_keys:
        if key.endswith("memory.weight"):  # a fresh uniform draw within the paper's bound
            assert 0 < loaded_state[key].abs().max() <= memory_init_bound(loaded.config)
        else:  # LayerNorms and DLCL's 1 / (l + 1) are deterministic
            torch.testing.assert_close(loaded_state[key], fresh_state[key], msg=key)


def fusion_parameter_count(config: EncoderFusionConfig) -> int:
    """The parameters each mode adds, from the papers' shapes (LayerNorm = 2 d)."""
    N, M, d = config.encoder_layers, config.decoder_layers, config.d_model
    embedding_norm = 2 * d if config.fusion_embedding_layer_norm else 0
    if config.fusion_mode == "transparent":
        return (N + 1) * M + embedding_norm
    if config.fusion_mode == "fine_grained":
        return M * (N + 1) * d + 2 * d + embedding_norm
    return (N + 1) ** 2 + N * 2 * d + (M + 1) ** 2 + M * 2 * d


@pytest.mark.parametrize("fusion_mode", MODES)
@pytest.mark.parametrize("sharing", ["none", "recurrent"])
def test_added_parameter_count(fusion_mode, sharing):
    model = build(fusion_mode, sharing_strategy=sharing)
    vanilla = FusionTransformerForConditionalGeneration(
        FusionTransformerConfig(**{**TINY, "encoder_layers": 3, "sharing_strategy": sharing})
    )
    added = model.num_parameters() - vanilla.num_parameters()
    assert added == fusion_parameter_count(model.config)  # fusion weights stay per depth step under sharing


# --- the model contract: cache, generate, save/load, training, conversion -------------------------

COMBINATIONS = [
    {},
    {"sharing_strategy": "recurrent"},
    {
        "normalize_before": True,
        "add_final_layer_norm": True,
        "sharing_strategy": "cycle",
        "encoder_unique_layers": 2,
        "decoder_unique_layers": 1,
    },
    {"position_embedding_type": "sinusoidal", "layernorm_embedding": False, "scale_embedding": True},
]


@pytest.mark.parametrize("overrides", COMBINATIONS, ids=["plain", "recurrent", "pre-norm-cycle", "marian-like"])
@pytest.mark.parametrize("fusion_mode", MODES)
def test_cached_decoding_matches_full_recomputation(fusion_mode, overrides):
    model = build(fusion_mode, **overrides)
    assert_cached_decoding_matches(model, random_batch())


def test_cached_decoding_with_dlcl_and_fine_grained_memory():
    model = build("dlcl", encoder_memory="fine_grained", sharing_strategy="recurrent")
    assert_cached_decoding_matches(model, random_batch())


@pytest.mark.parametrize("fusion_mode", MODES)
def test_beam_search_generate(fusion_mode):
    model = build(fusion_mode).eval()
    batch = random_batch()
    out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=3, max_new_tokens=5)
    assert out.shape[0] == batch["input_ids"].shape[0] and out.shape[1] <= 6


@pytest.mark.slow
def test_roundtrip_in_clean_process(tmp_path):
    # DLCL inside the stacks and a fine-grained memory: both new seam files travel with the checkpoint.
    model = build("dlcl", encoder_memory="fine_grained")
    for module in (model.model.decoder.memory, model.model.encoder.connection, model.model.decoder.connection):
        randomize(module)
    folder = assert_roundtrip_in_clean_process(model, tmp_path)
    assert (folder / "modeling_encoder_fusion.py").exists() and (folder / "memory.py").exists()


def test_heatmap_is_written_for_a_model_and_a_checkpoint(tmp_path):
    import matplotlib.image

    from hf_fusion.visualization import plot_fusion_weights

    model = build("fine_grained", decoder_layers=3)
    png = plot_fusion_weights(model, tmp_path / "plots" / "fusion.png")
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    assert matplotlib.image.imread(png).ndim == 3  # decodes as an image

    dlcl = build("dlcl", encoder_memory="transparent")
    dlcl.save_pretrained(tmp_path / "checkpoint")
    png = plot_fusion_weights(tmp_path / "checkpoint", tmp_path / "dlcl.png")
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    height, width = matplotlib.image.imread(png).shape[:2]
    assert width > 2 * height  # three panels side by side: memory, encoder DLCL, decoder DLCL

    with pytest.raises(ValueError, match="learns no layer-fusion weights"):
        vanilla = FusionTransformerForConditionalGeneration(FusionTransformerConfig(**TINY))
        plot_fusion_weights(vanilla, tmp_path / "vanilla.png")


def test_seq2seq_trainer_loss_goes_down(tmp_path):
    from datasets import Dataset
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    sources = torch.randint(3, 100, (32, 8))
    targets = sources.flip(-1)  # a reversal task
    dataset = Dataset.from_dict({"input_ids": sources.tolist(), "labels": targets.tolist()})
    model = build("fine_grained")
    initial_fusion = model.model.decoder.memory.weight.detach().clone()
    model.eval()
    with torch.no_grad():
        loss_before = model(input_ids=sources, labels=targets).loss.item()
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        max_steps=12,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        loss_after = model(input_ids=sources, labels=targets).loss.item()
    assert loss_after < loss_before - 0.2, (loss_before, loss_after)
    assert not torch.allclose(model.model.decoder.memory.weight, initial_fusion)  # the fusion weights were trained


@pytest.mark.parametrize("fusion_mode", MODES)
def test_convert_from_pretrained_bart_copies_everything_and_initialises_fusion(fusion_mode):
    from transformers import BartConfig, BartForConditionalGeneration

    bart = BartForConditionalGeneration(
        BartConfig(
            vocab_size=100,
            d_model=16,
            encoder_layers=3,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=64,
        )
    ).eval()
    model = convert_from_pretrained(bart, model_type="encoder_fusion", fusion_mode=fusion_mode)
    assert type(model) is EncoderFusionForConditionalGeneration and model.config.fusion_mode == fusion_mode

    ours, theirs = model.state_dict(), bart.state_dict()
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, msg=key)
    new = {key: ours[key] for key in ours if key not in theirs}
    base = model.model
    fusion_modules = {
        "transparent": {"model.decoder.memory": base.decoder.memory},
        "fine_grained": {"model.decoder.memory": base.decoder.memory},
        "dlcl": {
            "model.encoder.connection": base.encoder.connection,
            "model.decoder.connection": base.decoder.connection,
        },
    }[fusion_mode]
    expected_keys = {
        f"{prefix}.{name}" for prefix, module in fusion_modules.items() for name, _ in module.named_parameters()
    }
    assert set(new) == expected_keys
    for key, value in new.items():
        if key.endswith("norm.weight") or ".layer_norms." in key and key.endswith(".weight"):
            torch.testing.assert_close(value, torch.ones_like(value), msg=key)
        elif key.endswith(".bias"):
            torch.testing.assert_close(value, torch.zeros_like(value), msg=key)
    N, M = 3, 2
    if fusion_mode != "dlcl":
        weight = base.decoder.memory.weight
        assert 0 < weight.abs().max() <= memory_init_bound(model.config) and weight.std() > 0
    else:
        weights = model.fusion_weights()
        for key, depth in (("encoder_connection", N), ("decoder_connection", M)):
            rows = torch.arange(1, depth + 2, dtype=torch.float32)[:, None]
            torch.testing.assert_close(weights[key], torch.ones(depth + 1, depth + 1).tril() / rows)
    # The retrofitted model runs end to end, including generation.
    batch = random_batch()
    assert model(**batch).logits.shape == (3, 6, 100)
    model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=2, max_new_tokens=3)
