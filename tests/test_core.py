"""The vanilla core: validation, caching, HF capabilities, and save -> load without hf_fusion."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSeq2SeqLM

import hf_fusion
from hf_fusion import FusionTransformerConfig, FusionTransformerForConditionalGeneration
from hf_fusion.seams import SEAM_CHOICES, SEAM_TABLES, ConnectionSpec, DepthConnection, EncoderMemory, OutputHead
from hf_fusion.sharing import execution_plan
from tests.helpers import (
    assert_cached_decoding_matches,
    assert_roundtrip_in_clean_process,
    build_tiny,
    random_batch,
)


def tiny_model(**overrides) -> FusionTransformerForConditionalGeneration:
    return build_tiny(**overrides).eval()


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field, allowed",
    [
        ({"activation_function": "tanhh"}, "activation_function", "'gelu'"),
        ({"position_embedding_type": "rotary"}, "position_embedding_type", "'learned', 'sinusoidal'"),
        ({"d_model": 18, "encoder_attention_heads": 4}, "encoder_attention_heads", "divisors of 18"),
        ({"dropout": -0.1}, "dropout", "[0.0, 1.0)"),
        ({"attention_dropout": 1.0}, "attention_dropout", "[0.0, 1.0)"),
        ({"label_smoothing": 1.5}, "label_smoothing", "[0.0, 1.0)"),
        ({"encoder_layers": 0}, "encoder_layers", "positive integer"),
        ({"depth_connection": "highway"}, "depth_connection", "'residual'"),
        ({"encoder_memory": "all"}, "encoder_memory", "'last'"),
        ({"output_head": "copy"}, "output_head", "'lm'"),
        ({"sharing_strategy": "random"}, "sharing_strategy", "'cycle_rev'"),
        ({"sharing_strategy": "cycle"}, "encoder_unique_layers", "must be set"),
        ({"sharing_strategy": "cycle", "encoder_unique_layers": 3, "decoder_unique_layers": 1}, "encoder_unique_layers", "1 to 2"),
        ({"sharing_strategy": "recurrent", "encoder_unique_layers": 2}, "encoder_unique_layers", "allowed: 1"),
        ({"encoder_unique_layers": 1}, "encoder_unique_layers", "sharing_strategy other than 'none'"),
        # Wrong types are refused with the field named (unknown fields: see the warning test below).
        ({"normalize_before": "false"}, "normalize_before", "wrong type; expected bool"),
        ({"activation_function": ["relu"]}, "activation_function", "wrong type; expected str"),
        ({"encoder_layers": 2.0}, "encoder_layers", "wrong type; expected int"),
        ({"scale_embedding": 1}, "scale_embedding", "wrong type; expected bool"),
        # Token ids must index the vocabulary (they failed late, in an embedding or a generation step).
        ({"pad_token_id": 100}, "pad_token_id", "0 to vocab_size - 1 = 99"),
        ({"decoder_start_token_id": -1}, "decoder_start_token_id", "0 to vocab_size - 1 = 99"),
        ({"eos_token_id": [2, 500]}, "eos_token_id", "0 to vocab_size - 1 = 99"),
    ],
)
def test_invalid_config_is_refused_naming_field_and_allowed_values(tiny, overrides, field, allowed):
    with pytest.raises(ValueError) as error:
        FusionTransformerConfig(**{**tiny, **overrides})
    assert field in str(error.value)
    assert allowed in str(error.value)


def test_config_json_with_a_mistyped_field_is_refused_on_load(tiny, tmp_path):
    """The type checks guard config.json too: a string where a bool belongs fails when the config
    is loaded, not later as a silently different model."""
    FusionTransformerConfig(**tiny).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "normalize_before": "false"}))
    with pytest.raises(ValueError, match="normalize_before = 'false' has the wrong type"):
        AutoConfig.from_pretrained(tmp_path)


def test_unknown_fields_are_named_with_the_closest_field(tiny, tmp_path, caplog):
    """transformers' configs accept extra attributes by contract (its own model tests pass generic
    ones), so the config warns, naming the closest field; the training tool refuses them."""
    FusionTransformerConfig(**tiny).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "decoder_layer": 4}))
    with caplog.at_level("WARNING"):
        config = FusionTransformerConfig.from_pretrained(tmp_path)
    assert config.decoder_layers == tiny["decoder_layers"]
    assert "no field 'decoder_layer' (did you mean 'decoder_layers'?)" in caplog.text


def test_configs_other_tools_write_still_load(tiny):
    """What save_pretrained writes besides the fields, generation parameters older config.json
    files carry, and BART fields these models ignore are accepted."""
    config = FusionTransformerConfig(
        **tiny, auto_map={}, torch_dtype="float32", num_beams=4, max_length=20, encoder_layerdrop=0.0,
        hidden_size=16, num_attention_heads=2,
    )
    assert config.d_model == 16 and config.encoder_attention_heads == 2


def test_schedule_the_layer_counts_do_not_admit_is_refused(tiny):
    # sequence with N=6, M=4 runs blocks 0,0,1,1,2,2: block 3 would never train.
    with pytest.raises(ValueError, match=r"never runs block\(s\) \[3\]"):
        FusionTransformerConfig(
            **{**tiny, "encoder_layers": 6, "sharing_strategy": "sequence", "encoder_unique_layers": 4, "decoder_unique_layers": 1}
        )


def test_config_choices_are_the_seam_tables_keys(tiny):
    for key, table in SEAM_TABLES.items():
        assert SEAM_CHOICES[key] == tuple(table)
        with pytest.raises(ValueError, match=f"{key} = 'nope' is not supported; allowed values: "
                           + ", ".join(repr(choice) for choice in table)):
            FusionTransformerConfig(**{**tiny, key: "nope"})


def _signature(function) -> list[str]:
    return [name for name in inspect.signature(function).parameters if name != "self"]


@pytest.mark.parametrize("key, name", [(key, name) for key, table in SEAM_TABLES.items() for name in table])
def test_every_seam_table_entry_satisfies_its_interface(tiny, key: str, name: str):
    """Each entry is built from a config that selects it and checked against the seam's
    Protocol: the methods exist and take the interface's arguments, by name and in order."""
    overrides = {key: name}
    if key == "sharing_strategy" and name not in ("none", "recurrent"):  # these need the block counts
        overrides.update(encoder_unique_layers=1, decoder_unique_layers=1)
    config = FusionTransformerConfig(**{**tiny, **overrides})
    entry = SEAM_TABLES[key][name]
    if key == "sharing_strategy":
        plan = entry(config.encoder_layers, config.encoder_unique_layers)
        assert plan == config.encoder_plan and all(0 <= block < config.encoder_unique_layers for block in plan)
        return
    if key == "depth_connection":
        assert isinstance(entry, ConnectionSpec)
        connection = entry.connection(config, config.encoder_layers)
        assert isinstance(connection, DepthConnection)
        for method in ("start", "layer_input", "update", "hidden", "finish"):
            assert _signature(getattr(connection, method)) == _signature(getattr(DepthConnection, method)), method
        assert isinstance(entry.encoder_layer(config), nn.Module) and isinstance(entry.decoder_layer(config), nn.Module)
        return
    protocol = {"encoder_memory": EncoderMemory, "output_head": OutputHead}[key]
    implementation = entry(config)
    assert isinstance(implementation, protocol)
    assert _signature(implementation.forward) == _signature(protocol.forward)


@pytest.mark.parametrize(
    "strategy, steps, blocks, expected",
    [
        ("none", 4, 4, (0, 1, 2, 3)),
        ("recurrent", 4, 1, (0, 0, 0, 0)),
        ("sequence", 6, 3, (0, 0, 1, 1, 2, 2)),
        ("cycle", 6, 3, (0, 1, 2, 0, 1, 2)),
        ("cycle_rev", 6, 3, (0, 1, 2, 2, 1, 0)),
    ],
)
def test_execution_plan_tables(strategy, steps, blocks, expected):
    assert execution_plan(strategy, steps, blocks) == expected


# --- inputs -------------------------------------------------------------------------------------


def test_overlong_source_gives_a_clear_error(tiny):
    model = tiny_model()
    too_long = torch.randint(3, 100, (1, tiny["max_position_embeddings"] + 1))
    with pytest.raises(ValueError, match="max_position_embeddings = 64"):
        model(input_ids=too_long, decoder_input_ids=too_long[:, :3])


@pytest.mark.parametrize("position_embedding_type", ["learned", "sinusoidal"])
def test_overlong_generation_gives_a_clear_error(position_embedding_type):
    model = tiny_model(position_embedding_type=position_embedding_type, max_position_embeddings=8)
    batch = random_batch(src_len=5)
    with pytest.raises(ValueError, match="target \\(decoder\\) sequence has 9 positions"):
        model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=20, min_new_tokens=20)


# --- decoding, caching, attention kernels ---------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"normalize_before": True, "add_final_layer_norm": True, "position_embedding_type": "sinusoidal", "scale_embedding": True},
        {"encoder_layers": 3, "decoder_layers": 3, "sharing_strategy": "cycle_rev", "encoder_unique_layers": 2, "decoder_unique_layers": 2},
    ],
)
def test_cached_decoding_equals_full_recomputation(overrides):
    assert_cached_decoding_matches(tiny_model(**overrides), random_batch())


def test_eager_and_sdpa_agree_and_eager_returns_attention_weights():
    model = tiny_model()
    batch = random_batch()
    with torch.no_grad():
        sdpa = model(**batch)
        eager = model(**batch, output_attentions=True, output_hidden_states=True)
    torch.testing.assert_close(sdpa.logits, eager.logits, atol=1e-5, rtol=1e-5)
    assert len(eager.encoder_attentions) == 2 and len(eager.decoder_attentions) == 2 and len(eager.cross_attentions) == 2
    assert eager.cross_attentions[0].shape == (3, 2, 6, 9)  # (batch, heads, tgt_len, src_len)
    # Padding keys get no weight; causal self-attention gets none from the future.
    assert eager.encoder_attentions[0][2, :, :, -4:].abs().max() == 0
    assert torch.triu(eager.decoder_attentions[0][0, 0], diagonal=1).abs().max() == 0
    # Embedding output + one state per step; the last equals the returned final state.
    assert len(eager.encoder_hidden_states) == 3
    torch.testing.assert_close(eager.encoder_hidden_states[-1], eager.encoder_last_hidden_state)


def test_generate_greedy_beam_and_sampling():
    model = tiny_model()
    batch = random_batch()
    kwargs = dict(attention_mask=batch["attention_mask"], max_new_tokens=5)
    # min_new_tokens: without it the tiny model ends every greedy row after one token (EOS), and
    # nothing below would involve the cache or a position beyond 0.
    greedy_out = model.generate(
        batch["input_ids"], do_sample=False, min_new_tokens=5, return_dict_in_generate=True, output_logits=True,
        **kwargs,
    )  # fmt: skip
    greedy = greedy_out.sequences
    beam = model.generate(batch["input_ids"], num_beams=3, do_sample=False, **kwargs)
    sampled = model.generate(batch["input_ids"], do_sample=True, top_k=5, **kwargs)
    for out in (greedy, beam, sampled):
        assert out.shape[0] == 3 and out.shape[1] <= 6
    # Greedy decoding is the step-wise argmax (EOS excluded, as min_new_tokens does) of full
    # (uncached) recomputation.
    prefix = greedy[:, :1]
    with torch.no_grad():
        for _ in range(greedy.shape[1] - 1):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=prefix).logits
            logits[:, -1, model.config.eos_token_id] = float("-inf")
            prefix = torch.cat([prefix, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, prefix) and greedy.shape[1] == 6
    # And its step logits are those of a teacher-forced forward: the tiny model repeats one token,
    # so equal tokens alone do not show that the cache and the positions are right.
    with torch.no_grad():
        forced = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=greedy[:, :-1]
        ).logits
    torch.testing.assert_close(torch.stack(greedy_out.logits, dim=1), forced, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = tiny_model().train()
    batch = random_batch()
    labels = batch.pop("decoder_input_ids")

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(**batch, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.activation_checkpointing_enable()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_loss_matches_independent_cross_entropy_with_label_smoothing_and_item_count():
    model = tiny_model(label_smoothing=0.1)
    batch = random_batch()
    labels = batch.pop("decoder_input_ids")
    labels[0, -2:] = -100
    out = model(**batch, labels=labels)
    logp = out.logits.log_softmax(-1)
    keep = labels != -100
    nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    smooth = -logp.mean(-1)
    expected = ((0.9 * nll + 0.1 * smooth)[keep]).mean()
    torch.testing.assert_close(out.loss, expected)
    summed = model(**batch, labels=labels, num_items_in_batch=torch.tensor(40)).loss
    torch.testing.assert_close(summed, (0.9 * nll + 0.1 * smooth)[keep].sum() / 40)


@pytest.mark.slow
def test_torch_compile_captures_the_training_forward_in_one_graph():
    model = tiny_model()
    batch = random_batch()
    labels = batch.pop("decoder_input_ids")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    loss = compiled(**batch, labels=labels).loss
    loss.backward()
    torch.testing.assert_close(loss, model(**batch, labels=labels).loss)
    assert model.model.shared.weight.grad is not None


def test_tied_embeddings_and_no_duplicate_tensors_in_checkpoint(tmp_path):
    model = tiny_model()
    assert model.lm_head.weight.data_ptr() == model.model.shared.weight.data_ptr()
    assert model.model.encoder.embed_tokens.weight.data_ptr() == model.model.shared.weight.data_ptr()
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    assert "lm_head.weight" not in keys or "model.shared.weight" not in keys


def test_device_map_knows_the_layer_classes():
    assert {"FusionEncoderLayer", "FusionDecoderLayer"} <= set(FusionTransformerForConditionalGeneration._no_split_modules)


# --- Hub-native saving and loading ----------------------------------------------------------------


def test_saved_folder_is_self_contained(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    files = {path.name for path in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "modeling_fusion_transformer.py"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling_fusion_transformer.FusionTransformerForConditionalGeneration"
    assert config["auto_map"]["AutoConfig"] == "configuration_fusion_transformer.FusionTransformerConfig"
    # Every sibling module the model code imports travelled with it.
    for source in tmp_path.glob("*.py"):
        for line in source.read_text().splitlines():
            if line.startswith("from ."):
                assert (tmp_path / f"{line.split()[1][1:]}.py").exists(), line


@pytest.mark.slow
def test_roundtrip_in_a_process_without_hf_fusion(tmp_path):
    assert_roundtrip_in_clean_process(tiny_model(normalize_before=True, add_final_layer_norm=True), tmp_path)


@pytest.mark.slow
def test_roundtrip_through_the_offline_hub_snapshot_path(tmp_path, monkeypatch):
    hub_home = tmp_path / "hf_home"
    snapshot = hub_home / "hub" / "models--hf-fusion--tiny" / "snapshots" / ("ab" * 20)
    tiny_model().save_pretrained(snapshot)
    (hub_home / "hub" / "models--hf-fusion--tiny" / "refs").mkdir(parents=True)
    (hub_home / "hub" / "models--hf-fusion--tiny" / "refs" / "main").write_text("ab" * 20)
    model = tiny_model()
    model.load_state_dict(FusionTransformerForConditionalGeneration.from_pretrained(snapshot).state_dict())
    monkeypatch.setenv("HF_HOME", str(hub_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_home / "hub"))
    # The clean process inherits HF_HOME, so "hf-fusion/tiny" resolves to the snapshot offline.
    assert_roundtrip_in_clean_process(model, tmp_path, model_id="hf-fusion/tiny")


def test_auto_classes_know_the_family_when_installed(tmp_path):
    config = AutoConfig.for_model("fusion_transformer", **dict(vocab_size=50, d_model=8, encoder_layers=1, decoder_layers=1,
                                                                encoder_attention_heads=2, decoder_attention_heads=2,
                                                                encoder_ffn_dim=16, decoder_ffn_dim=16))
    model = AutoModelForSeq2SeqLM.from_config(config)
    assert isinstance(model, FusionTransformerForConditionalGeneration)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoModelForSeq2SeqLM.from_pretrained(tmp_path), FusionTransformerForConditionalGeneration)
    assert "fusion_transformer" in hf_fusion.MODEL_FAMILIES


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(OSError, match="corrupt or truncated") as error:
        AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert str(tmp_path) in str(error.value)
