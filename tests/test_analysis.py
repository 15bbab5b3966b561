"""The papers' analyses (``hf_fusion/analysis``), each checked against an independent computation.

Tiny models and a tokenizer trained on a handful of sentences; every ``python -m`` entry is run
in-process through its ``main(argv)`` (one subprocess smoke test, marked slow).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hf_fusion import MODEL_FAMILIES
from hf_fusion.analysis import (
    decoding_speed,
    embedding_similarity,
    fusion_weights,
    layer_masking,
    nonlinearity,
    recurrence,
)
from hf_fusion.analysis.common import encode_sample, run_command, token_nll
from hf_fusion.analysis.layer_masking import masked_encoder_layers
from hf_fusion.analysis.nonlinearity import fit_linear_map, linearized_step, record_steps
from hf_fusion.analysis.recurrence import with_depth
from hf_fusion.checkpoint_code import model_code_files
from tests.helpers import REPO_ROOT, build_tiny, random_batch
from training import evaluate_file
from training.tokenizer import train_tokenizer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SOURCES = [
    "Eventually the river flows into the sea.",
    "The game eats up too much memory.",
    "She waited for the train in the rain.",
    "The house is very old.",
    "We work every day.",
    "Time flies like an arrow.",
]
TARGETS = [
    "Der Fluss mündet schließlich ins Meer.",
    "Das Spiel frisst zu viel Speicher.",
    "Sie wartete im Regen auf den Zug.",
    "Das Haus ist sehr alt.",
    "Wir arbeiten jeden Tag.",
    "Die Zeit vergeht wie im Flug.",
]


def spread(model: nn.Module) -> nn.Module:
    """Move every weight away from its initialisation so that layers and mixes matter."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    # BPE: on so little text it still learns whole words ("Time", "Zeit"), which the lexicon tests need.
    return train_tokenizer((SOURCES + TARGETS) * 3, vocab_size=200, model="bpe", model_max_length=64)


def tiny_model(tokenizer, model_type: str, **overrides) -> nn.Module:
    model = build_tiny(
        model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id, **overrides,
    )
    model.generation_config.max_length = 8
    return spread(model).eval()


def save(model: nn.Module, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """``--test_file SRC --reference_file REF``: plain text, one sentence per line."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "test.en").write_text("\n".join(SOURCES) + "\n")
    (folder / "test.de").write_text("\n".join(TARGETS) + "\n")
    return ["--test_file", str(folder / "test.en"), "--reference_file", str(folder / "test.de"), "--max_sentences", "3"]


def _sample(count: int = len(SOURCES)) -> evaluate_file.TestSet:
    """The first ``count`` test pairs (the entry tests read 3 of them from the files)."""
    return evaluate_file.TestSet(SOURCES[:count], TARGETS[:count], "tiny")


# --- common ----------------------------------------------------------------------------------------


def test_the_analyses_are_never_copied_into_a_checkpoint() -> None:
    package = Path(layer_masking.__file__).parent
    for model_type in MODEL_FAMILIES:
        files = model_code_files(model_type)
        assert files and not any(path.resolve().is_relative_to(package.resolve()) for path in files), model_type


def test_token_nll_is_the_models_own_mean_loss_over_all_tokens(tokenizer) -> None:
    model = tiny_model(tokenizer, "fusion_transformer")
    batches = encode_sample(model, tokenizer, _sample(), batch_size=len(SOURCES))
    with torch.no_grad():
        expected = model(**batches[0]).loss  # one batch: the model's own token-mean cross-entropy
    assert token_nll(model, batches) == pytest.approx(float(expected), rel=1e-5)
    # Split into batches, the per-token mean is still over the whole sample, not a mean of batch means.
    assert token_nll(model, encode_sample(model, tokenizer, _sample(), batch_size=4)) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("module", [layer_masking, recurrence, nonlinearity, decoding_speed, embedding_similarity])
def test_a_bad_output_is_refused_before_any_work_and_as_one_line(module, tmp_path: Path, monkeypatch, capsys) -> None:
    argv = [str(tmp_path / "no-such-model"), "--corpus", "ding", "--output", str(tmp_path / "table.txt")]
    if module is embedding_similarity:
        argv = [str(tmp_path / "no-such-model"), "--output", str(tmp_path / "table.txt")]
    with pytest.raises(ValueError, match=r"table.txt must end in one of .md, .json"):
        module.main(argv)  # the missing model folder is never reached
    monkeypatch.setattr(sys, "argv", ["prog", *argv])
    with pytest.raises(SystemExit) as stop:
        run_command(module.main)
    assert str(stop.value).startswith("error: --output") and "\n" not in str(stop.value)


# --- layer masking ---------------------------------------------------------------------------------


def _memories(model: nn.Module, batch: dict) -> list[torch.Tensor]:
    encoder = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    memory = model.base_model.decoder.memory
    return [
        memory(step, encoder.last_hidden_state, encoder.layer_states, encoder.token_embeddings)
        for step in range(model.config.decoder_layers)
    ], encoder


def test_masking_x0_in_transparent_attention_mixes_the_other_layers_renormalised(tokenizer) -> None:
    model = tiny_model(tokenizer, "encoder_fusion", fusion_mode="transparent", encoder_layers=3)
    batch = random_batch(len(tokenizer))
    with torch.no_grad(), masked_encoder_layers(model, [0]):
        masked, encoder = _memories(model, batch)
    W = model.base_model.decoder.memory.weight.detach()  # (N + 1, M), restored
    states = encoder.layer_states  # (batch, N + 1, src_len, d)
    for step, got in enumerate(masked):
        logits = W[1:, step]
        weights = torch.exp(logits) / torch.exp(logits).sum()  # softmax over X^1..X^N only
        expected = sum(weights[n - 1] * states[:, n] for n in range(1, 4))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    unmasked, _ = _memories(model, batch)
    assert not torch.allclose(unmasked[0], masked[0], atol=1e-4)  # the mask changed something


def test_masking_a_middle_layer_in_fine_grained_attention_renormalises_per_dimension(tokenizer) -> None:
    model = tiny_model(tokenizer, "encoder_fusion", fusion_mode="fine_grained", encoder_layers=3)
    batch = random_batch(len(tokenizer))
    with torch.no_grad(), masked_encoder_layers(model, [2]):
        masked, encoder = _memories(model, batch)
    memory = model.base_model.decoder.memory
    W = memory.weight.detach()  # (M, N + 1, d)
    embeddings = encoder.token_embeddings
    if memory.embedding_layer_norm is not None:
        embeddings = memory.embedding_layer_norm(embeddings)
    layers = [embeddings] + [encoder.layer_states[:, n] for n in range(1, 4)]
    keep = [0, 1, 3]
    for step, got in enumerate(masked):
        logits = W[step, keep]  # (3, d)
        weights = torch.exp(logits) / torch.exp(logits).sum(dim=0)  # per dimension, over kept layers
        fused = sum(weights[i] * layers[n] for i, n in enumerate(keep))
        expected = F.layer_norm(fused, memory.layer_norm.normalized_shape, memory.layer_norm.weight,
                                memory.layer_norm.bias, memory.layer_norm.eps)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["transparent", "fine_grained"])
def test_masking_restores_the_weights_bit_exactly_even_after_an_error(tokenizer, mode: str) -> None:
    model = tiny_model(tokenizer, "encoder_fusion", fusion_mode=mode)
    weight = model.base_model.decoder.memory.weight
    before = weight.detach().clone()
    with masked_encoder_layers(model, [0, 1]):
        assert torch.isinf(weight).any()
    assert torch.equal(weight, before)
    with pytest.raises(RuntimeError, match="boom"), masked_encoder_layers(model, [1]):
        raise RuntimeError("boom")
    assert torch.equal(weight, before) and weight.requires_grad


def test_masking_refuses_what_it_cannot_mask(tokenizer) -> None:
    model = tiny_model(tokenizer, "encoder_fusion", fusion_mode="transparent")
    for layers, message in (([3], r"out of range; allowed: 0 \(the embedding layer\) to 2"), ([0, 1, 2], "every")):
        with pytest.raises(ValueError, match=message), masked_encoder_layers(model, layers):
            pass
    with pytest.raises(ValueError, match="eval mode"), masked_encoder_layers(model.train(), [0]):
        pass
    with pytest.raises(ValueError, match="encoder_memory = 'last'"), masked_encoder_layers(
        tiny_model(tokenizer, "fusion_transformer"), [0]
    ):
        pass


def test_layer_masking_entry_writes_the_ablation_table(tokenizer, data_files, tmp_path: Path) -> None:
    model = tiny_model(tokenizer, "encoder_fusion", fusion_mode="transparent")
    folder = save(model, tokenizer, tmp_path / "model")
    output = layer_masking.main([str(folder), *data_files, "--layers", "0", "2", "--output", str(tmp_path / "masking.json")])
    rows = json.loads(output.read_text())["rows"]
    assert [row["masked"] for row in rows] == ["none", "X^0 (embedding)", "X^2"]
    batches = encode_sample(model, tokenizer, _sample(3))
    assert rows[0]["loss"] == pytest.approx(token_nll(model, batches), rel=1e-5)
    with masked_encoder_layers(model, [0]):
        assert rows[1]["loss"] == pytest.approx(token_nll(model, batches), rel=1e-5)
    assert rows[1]["loss"] != pytest.approx(rows[0]["loss"], abs=1e-4)  # the mask was on while scoring
    assert rows[1]["delta_loss"] == pytest.approx(rows[1]["loss"] - rows[0]["loss"])
    assert all(0.0 <= row["chrf"] <= 100.0 for row in rows)


# --- recurrence ------------------------------------------------------------------------------------


def test_with_the_trained_depth_the_model_gives_its_own_logits(tokenizer) -> None:
    model = tiny_model(tokenizer, "recurrent_stacking", encoder_layers=3, decoder_layers=3)
    batch = random_batch(len(tokenizer))
    with torch.no_grad():
        torch.testing.assert_close(with_depth(model)(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_fewer_recurrences_apply_the_shared_block_fewer_times(tokenizer) -> None:
    model = tiny_model(tokenizer, "recurrent_stacking", encoder_layers=3, decoder_layers=3)
    batch = random_batch(len(tokenizer))
    shallow = with_depth(model, encoder_layers=2)
    assert shallow.config.encoder_plan == (0, 0) and shallow.config.decoder_layers == 3
    encoder = model.get_encoder()
    with torch.no_grad():
        got = shallow.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        # By hand: embeddings, then the one block twice, then the final LayerNorm if any.
        state = encoder.embed(encoder.embed_tokens(batch["input_ids"]), 0, "source")
        mask = batch["attention_mask"][:, None, None, :].bool()
        for _ in range(2):
            state = encoder.layers[0](state, attention_mask=mask)[0]
        if encoder.layer_norm is not None:
            state = encoder.layer_norm(state)
    torch.testing.assert_close(got.last_hidden_state, state, atol=1e-5, rtol=1e-5)


def test_with_depth_refuses_models_whose_parameters_depend_on_depth(tokenizer) -> None:
    with pytest.raises(ValueError, match="only 'recurrent'"):
        with_depth(tiny_model(tokenizer, "fusion_transformer"), 1, 1)
    fused = tiny_model(tokenizer, "recurrent_stacking", encoder_memory="transparent")
    with pytest.raises(ValueError, match="cannot change depth"):
        with_depth(fused, 1, 1)
    with pytest.raises(ValueError, match="encoder_layers must be at least 1"):
        with_depth(tiny_model(tokenizer, "recurrent_stacking"), 0)


def test_attention_maps_are_distributions_per_step_and_causal_in_the_decoder(tokenizer) -> None:
    model = tiny_model(tokenizer, "recurrent_stacking", encoder_layers=3, decoder_layers=2)
    maps = recurrence.attention_maps(model, tokenizer, SOURCES[0], TARGETS[0])
    src, tgt = len(maps["source_tokens"]), len(maps["target_tokens"])
    assert (len(maps["encoder_self"]), len(maps["decoder_self"]), len(maps["cross"])) == (3, 2, 2)
    assert maps["target_tokens"][0] == tokenizer.convert_ids_to_tokens(model.config.decoder_start_token_id)
    for kind, shape in (("encoder_self", (src, src)), ("decoder_self", (tgt, tgt)), ("cross", (tgt, src))):
        for step in maps[kind]:
            assert step.shape == shape
            torch.testing.assert_close(step.sum(dim=-1), torch.ones(shape[0]))
    assert all(torch.equal(step.triu(1), torch.zeros(tgt, tgt)) for step in maps["decoder_self"])
    assert not torch.allclose(maps["encoder_self"][0], maps["encoder_self"][1])  # steps differ: inputs differ


def test_recurrence_entry_writes_the_depth_table_and_the_attention_grid(tokenizer, data_files, tmp_path: Path) -> None:
    model = tiny_model(tokenizer, "recurrent_stacking", encoder_layers=3, decoder_layers=3)
    folder = save(model, tokenizer, tmp_path / "model")
    table, png = recurrence.main([
        str(folder), *data_files, "--depths", "1", "3", "--output", str(tmp_path / "depth.md"),
        "--attention_png", str(tmp_path / "attention.png"),
    ])
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    rows = [line.split(" | ") for line in table.read_text().splitlines() if line.startswith(("| 1", "| 3"))]
    assert [row[2] for row in rows] == ["False", "True"]
    trained_loss = token_nll(model, encode_sample(model, tokenizer, _sample(3)))
    assert float(rows[1][3]) == pytest.approx(trained_loss, abs=1e-4)
    assert float(rows[0][3]) != pytest.approx(trained_loss, abs=1e-4)


# --- non-linearity ---------------------------------------------------------------------------------


class LinearBlock(nn.Module):
    """A depth step that IS linear: output = input @ A + b (attention weights: none)."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)
        with torch.no_grad():
            self.linear.weight.mul_(0.3)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple:
        return self.linear(hidden_states), (None, None)


@pytest.mark.parametrize("model_type", ["fusion_transformer", "depthwise_lstm"])
def test_a_step_that_is_linear_is_recovered_and_costs_nothing(tokenizer, model_type: str) -> None:
    model = tiny_model(tokenizer, model_type, encoder_layers=3)
    width = 2 * model.config.d_model if model_type == "depthwise_lstm" else model.config.d_model
    # Encoder step 1 (a depth-wise LSTM's first step sees h = c: collinear inputs) and decoder step 2.
    model.base_model.encoder.layers[0] = LinearBlock(width)
    model.base_model.decoder.layers[1] = LinearBlock(width)
    rows = nonlinearity.nonlinearity_analysis(model, tokenizer, _sample())
    linear_rows = [row for row in rows if (row["stack"], row["step"]) in (("encoder", 1), ("decoder", 2))]
    for row in linear_rows:
        assert row["fit_r2"] == pytest.approx(1.0, abs=1e-9)
        assert abs(row["delta_loss"]) < 1e-5
    records = record_steps(model, encode_sample(model, tokenizer, _sample()))
    inputs, outputs = records[("decoder", 1)]
    torch.testing.assert_close(outputs, model.base_model.decoder.layers[1].linear(inputs))  # recorded right
    # LayerNorm outputs span a hyperplane, so the map is not unique there: compare what it computes.
    torch.testing.assert_close(fit_linear_map(inputs, outputs)(inputs), outputs, atol=1e-5, rtol=1e-5)
    # A genuinely non-linear step is not free to replace.
    assert max(abs(row["delta_loss"]) for row in rows if row not in linear_rows) > 1e-4


def test_only_the_chosen_step_of_a_shared_block_is_replaced(tokenizer) -> None:
    model = tiny_model(tokenizer, "recurrent_stacking", encoder_layers=3, decoder_layers=2)
    batches = encode_sample(model, tokenizer, _sample())
    records = record_steps(model, batches)
    assert sorted(records) == [("decoder", 0), ("decoder", 1), ("encoder", 0), ("encoder", 1), ("encoder", 2)]
    batch = batches[0]
    linear_map = fit_linear_map(*records[("encoder", 1)])
    with torch.no_grad():
        with linearized_step(model, "encoder", 1, linear_map):
            replaced = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                           output_hidden_states=True).hidden_states
        original = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       output_hidden_states=True).hidden_states
    torch.testing.assert_close(replaced[1], original[1])  # step 1 ran the block
    torch.testing.assert_close(replaced[2], linear_map(original[1]))  # step 2 was the map of its input
    assert not torch.allclose(replaced[2], original[2], atol=1e-4)


def test_the_least_squares_fit_recovers_a_linear_map_from_full_rank_inputs() -> None:
    inputs, weight, bias = torch.randn(200, 16), torch.randn(16, 8), torch.randn(8)
    fitted = fit_linear_map(inputs, inputs @ weight + bias)
    torch.testing.assert_close(fitted.weight.float(), weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fitted.bias.float(), bias, atol=1e-5, rtol=1e-5)
    assert fitted.tokens == 200 and fitted.r2 == pytest.approx(1.0)
    noisy = fit_linear_map(inputs, inputs @ weight + bias + torch.randn(200, 8))
    assert 0.0 < noisy.r2 < 1.0
    with pytest.raises(ValueError, match="cannot determine a linear map from 16 inputs"):
        fit_linear_map(torch.randn(10, 16), torch.randn(10, 16))


def test_nonlinearity_entry_writes_one_row_per_step(tokenizer, data_files, tmp_path: Path) -> None:
    folder = save(tiny_model(tokenizer, "depthwise_lstm"), tokenizer, tmp_path / "model")
    output = nonlinearity.main([str(folder), *data_files, "--output", str(tmp_path / "nonlinearity.json")])
    rows = json.loads(output.read_text())["rows"]
    assert [(row["stack"], row["step"]) for row in rows] == [("encoder", 1), ("encoder", 2), ("decoder", 1), ("decoder", 2)]
    assert all(row["delta_loss"] == pytest.approx(row["loss"] - row["base_loss"]) for row in rows)


# --- decoding speed --------------------------------------------------------------------------------


def test_decoding_speed_counts_generated_tokens_and_interleaves_rounds(tokenizer) -> None:
    models = {name: tiny_model(tokenizer, "recurrent_stacking", decoder_layers=depth) for name, depth in (("a", 1), ("b", 3))}
    calls: list[str] = []
    for name, model in models.items():
        model.get_encoder().register_forward_pre_hook(lambda module, args, name=name: calls.append(name))
    decoders = [decoding_speed.Decoder(name, model, tokenizer) for name, model in models.items()]
    rows = decoding_speed.compare_decoding_speed(decoders, SOURCES, batch_size=len(SOURCES), num_beams=2,
                                                 max_length=10, rounds=2)
    assert calls == ["a", "b", "a", "b", "b", "a"]  # warm-up, then rounds in rotated order
    for row, model in zip(rows, models.values()):
        inputs = tokenizer(SOURCES, return_tensors="pt", padding=True)
        with torch.no_grad():
            output = model.generate(**inputs, num_beams=2, max_length=10, do_sample=False)
        generated = int((output[:, 1:] != tokenizer.pad_token_id).sum())
        assert row["mean_output_length"] == pytest.approx(generated / len(SOURCES))
        assert row["tokens_per_s"] * row["seconds"] == pytest.approx(generated)
        assert row["sentences_per_s"] * row["ms_per_sentence"] == pytest.approx(1000.0)
        assert row["parameters"] == sum(parameter.numel() for parameter in model.parameters())


def test_decoding_speed_entry_writes_its_table(tokenizer, data_files, tmp_path: Path) -> None:
    folders = [str(save(tiny_model(tokenizer, "recurrent_stacking", encoder_layers=2, decoder_layers=2), tokenizer,
                        tmp_path / name)) for name in ("scratch", "transfer")]
    output = decoding_speed.main([*folders, *data_files, "--rounds", "1", "--num_beams", "1", "--depth", "1",
                                  "--max_output_length", "8", "--output", str(tmp_path / "speed.md")])
    text = output.read_text()
    assert "depth 1" in text and all(f"| {folder} |" in text for folder in folders)
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        decoding_speed.compare_decoding_speed([decoding_speed.Decoder("x", None, tokenizer)], SOURCES, rounds=0)


# --- fusion weights --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["transparent", "fine_grained"])
def test_averaged_heatmap_is_the_mean_of_the_models_weights(tokenizer, mode: str) -> None:
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(tiny_model(tokenizer, "encoder_fusion", fusion_mode=mode, encoder_layers=3))
    summary = fusion_weights.summarize_fusion_weights(models)
    # Independently: softmax over encoder layers of each model's raw W, as a (decoder, encoder) matrix.
    per_model = []
    for model in models:
        W = model.base_model.decoder.memory.weight.detach().double().numpy()
        if mode == "transparent":  # (N + 1, M)
            per_model.append((np.exp(W) / np.exp(W).sum(axis=0)).T)
        else:  # (M, N + 1, d): per-dimension softmax over layers, then the mean over dimensions
            per_model.append((np.exp(W) / np.exp(W).sum(axis=1, keepdims=True)).mean(axis=2))
    per_model = np.stack(per_model)
    np.testing.assert_allclose(summary.mean.numpy(), per_model.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(summary.std.numpy(), per_model.std(axis=0, ddof=1), atol=1e-6)
    rows = summary.embedding_rows()
    assert [row["x0_mean"] for row in rows] == pytest.approx(per_model[:, :, 0].mean(axis=0).tolist(), abs=1e-6)
    winners = (per_model.argmax(axis=2) == 0).sum(axis=0)
    assert [row["models_with_x0_max"] for row in rows] == [f"{count}/3" for count in winners]
    assert rows[0]["uniform"] == pytest.approx(0.25)


def test_fusion_weights_entry_writes_heatmap_and_table_and_refuses_mismatches(tokenizer, tmp_path: Path) -> None:
    folders = [str(save(tiny_model(tokenizer, "encoder_fusion", fusion_mode="transparent"), tokenizer, tmp_path / f"s{seed}"))
               for seed in range(2)]
    png, table = fusion_weights.main([*folders, "--output", str(tmp_path / "heat.png"), "--output", str(tmp_path / "x0.json")])
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    assert [row["decoder_layer"] for row in json.loads(table.read_text())["rows"]] == [1, 2]
    deeper = tiny_model(tokenizer, "encoder_fusion", fusion_mode="transparent", encoder_layers=3)
    with pytest.raises(ValueError, match="same depth"):
        fusion_weights.summarize_fusion_weights([folders[0], deeper])
    with pytest.raises(ValueError, match="learns no fusion weights"):
        fusion_weights.summarize_fusion_weights([tiny_model(tokenizer, "fusion_transformer")])


# --- embedding similarity --------------------------------------------------------------------------

DING_LINES = """# Version :: test
Haus {n}; Gebäude {n} | Häuser {pl} :: house; building | houses
arbeiten {vi} | arbeitend :: to work | working
Teewagen {m} | Teewagen {pl} | extra :: tea trolley | tea trolleys
Zeit {f} [phys.] :: time
B {n} [mus.] :: B
"""


def test_ding_lexicon_keeps_one_word_alternatives_of_matching_sub_entries(tmp_path: Path) -> None:
    path = tmp_path / "de-en"
    path.write_text(DING_LINES)
    assert embedding_similarity.read_ding_lexicon(path) == [
        ("house", "Haus"), ("house", "Gebäude"), ("building", "Haus"), ("building", "Gebäude"), ("houses", "Häuser"),
        ("work", "arbeiten"), ("working", "arbeitend"), ("time", "Zeit"),
    ]


def test_tsv_lexicon_names_a_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "lexicon.tsv"
    path.write_text("# comment\nhouse\tHaus\n\nbroken line\n")
    with pytest.raises(ValueError, match="line 4: a lexicon line is 'source<TAB>target'"):
        embedding_similarity.read_tsv_lexicon(path)


def test_similarity_measures_match_a_numpy_computation(tokenizer) -> None:
    model = tiny_model(tokenizer, "surface_fusion")
    pairs = [(5, 9), (5, 11), (6, 9), (7, 12), (8, 13)]
    got = embedding_similarity.embedding_similarity(model, pairs)
    E = model.get_input_embeddings().weight.detach().double().numpy()
    E = E / np.linalg.norm(E, axis=1, keepdims=True)
    cos = {(s, t): float(E[s] @ E[t]) for s in (5, 6, 7, 8) for t in (9, 11, 12, 13)}
    aligned = [cos[pair] for pair in pairs]
    unaligned = [value for pair, value in cos.items() if pair not in pairs]
    hits = [max((9, 11, 12, 13), key=lambda t: cos[(s, t)]) in {t for s2, t in pairs if s2 == s} for s in (5, 6, 7, 8)]
    assert got["pairs"] == 5
    assert got["aligned_cos"] == pytest.approx(np.mean(aligned))
    assert got["aligned_cos_std"] == pytest.approx(np.std(aligned, ddof=1))
    assert got["unaligned_cos"] == pytest.approx(np.mean(unaligned))
    assert got["gap"] == pytest.approx(np.mean(aligned) - np.mean(unaligned))
    assert got["p_at_1"] == pytest.approx(np.mean(hits))


def test_token_pairs_keep_single_distinct_tokens_for_every_tokenizer(tokenizer) -> None:
    lexicon = [("river", "Fluss"), ("Time", "Zeit"), ("rain", "Regen"), ("the", "Das"), ("im", "im")]
    kept, (ids,) = embedding_similarity.token_pairs([tokenizer], lexicon)
    for (source, target), (s, t) in zip(kept, ids):
        assert tokenizer(source, add_special_tokens=False)["input_ids"] == [s]
        assert tokenizer(target, add_special_tokens=False)["input_ids"] == [t]
        assert s != t
    dropped = [pair for pair in lexicon if pair not in kept]
    assert ("im", "im") in dropped and kept  # identical tokens never count; some pairs remain
    assert all(
        len(tokenizer(source, add_special_tokens=False)["input_ids"]) > 1
        or len(tokenizer(target, add_special_tokens=False)["input_ids"]) > 1
        for source, target in dropped if source != target
    )


def test_embedding_similarity_entry_compares_models_on_a_tsv_lexicon(tokenizer, tmp_path: Path) -> None:
    folders = [str(save(tiny_model(tokenizer, model_type), tokenizer, tmp_path / model_type))
               for model_type in ("fusion_transformer", "surface_fusion")]
    lexicon = tmp_path / "lexicon.tsv"
    lexicon.write_text("river\tFluss\nTime\tZeit\nthe\tDas\ngame\tSpiel\n")
    output = embedding_similarity.main([*folders, "--lexicon", str(lexicon), "--output", str(tmp_path / "sim.json")])
    rows = json.loads(output.read_text())["rows"]
    assert [row["model"] for row in rows] == folders
    assert rows[0]["pairs"] == rows[1]["pairs"] > 0


# --- one real process ------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_analysis_runs_as_a_module(tokenizer, data_files, tmp_path: Path) -> None:
    folder = save(tiny_model(tokenizer, "encoder_fusion", fusion_mode="fine_grained"), tokenizer, tmp_path / "model")
    output = tmp_path / "masking.md"
    subprocess.run([sys.executable, "-m", "hf_fusion.analysis.layer_masking", str(folder), *data_files,
                    "--output", str(output)], cwd=REPO_ROOT, check=True, capture_output=True, timeout=300)
    assert "| X^0 (embedding) |" in output.read_text()
