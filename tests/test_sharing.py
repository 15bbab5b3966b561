"""Cross-layer parameter sharing: schedules, real sharing, gradients, caches, saving, transfer learning."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForSeq2SeqLM, BartConfig, BartForConditionalGeneration

from hf_fusion import (
    FusionTransformerConfig,
    FusionTransformerForConditionalGeneration,
    RecurrentStackingConfig,
    RecurrentStackingForConditionalGeneration,
    RecurrentStackingModel,
    transfer_from_pretrained,
)
from hf_fusion.compat import output_cache
from hf_fusion.sharing import execution_plan
from tests.helpers import TINY, assert_cached_decoding_matches, assert_roundtrip_in_clean_process, random_batch
from training.cli import main as cli

LAYER_KEY = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(.+)$")

# Hand-written from the definitions (Takase & Kiyono 2021; recurrent stacking = one block), 0-based.
PLANS = {
    ("recurrent", 6, 1): (0, 0, 0, 0, 0, 0),
    ("sequence", 6, 3): (0, 0, 1, 1, 2, 2),
    ("cycle", 6, 3): (0, 1, 2, 0, 1, 2),
    ("cycle_rev", 6, 3): (0, 1, 2, 2, 1, 0),
    ("sequence", 6, 2): (0, 0, 0, 1, 1, 1),
    ("cycle", 6, 4): (0, 1, 2, 3, 0, 1),
    ("cycle_rev", 6, 4): (0, 1, 2, 3, 3, 2),  # the paper's rule: cycle M * (ceil(N/M) - 1) steps, then reverse
    ("cycle_rev", 7, 3): (0, 1, 2, 0, 1, 2, 2),
    ("sequence", 7, 3): (0, 0, 0, 1, 1, 1, 2),  # runs of ceil(N / M) when M does not divide N
    ("cycle_rev", 4, 4): (3, 2, 1, 0),
    ("sequence", 12, 6): (0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5),
    ("cycle", 12, 6): (0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5),
    ("cycle_rev", 12, 6): (0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0),
    ("sequence", 18, 6): (0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5),
    ("cycle", 18, 6): (0, 1, 2, 3, 4, 5) * 3,
    ("cycle_rev", 18, 6): (0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0),
    ("none", 4, 4): (0, 1, 2, 3),
}
STRATEGIES = [("recurrent", None), ("sequence", 2), ("cycle", 2), ("cycle_rev", 3)]


def shared_config(tiny: dict, strategy: str, unique: int | None, depth: int = 4, **extra) -> RecurrentStackingConfig:
    return RecurrentStackingConfig(
        **{
            **tiny,
            "encoder_layers": depth,
            "decoder_layers": depth,
            "sharing_strategy": strategy,
            "encoder_unique_layers": unique,
            "decoder_unique_layers": unique,
            **extra,
        }
    )


# --- plans and configuration -------------------------------------------------------------------


@pytest.mark.parametrize(("strategy", "depth", "blocks"), list(PLANS))
def test_execution_plan_matches_definition(strategy: str, depth: int, blocks: int) -> None:
    assert execution_plan(strategy, depth, blocks) == PLANS[strategy, depth, blocks]


@pytest.mark.parametrize(("strategy", "depth", "blocks"), [key for key in PLANS if key[0] != "none"])
def test_model_runs_the_plan(tiny: dict, strategy: str, depth: int, blocks: int) -> None:
    config = shared_config(tiny, strategy, blocks, depth=depth)
    model = RecurrentStackingModel(config)
    for stack in (model.encoder, model.decoder):
        assert stack.plan == PLANS[strategy, depth, blocks]
        assert len(stack.layers) == blocks


def test_defaults_are_recurrent_stacking(tiny: dict) -> None:
    config = RecurrentStackingConfig(**tiny)
    assert config.model_type == "recurrent_stacking"
    assert (config.sharing_strategy, config.encoder_unique_layers, config.decoder_unique_layers) == ("recurrent", 1, 1)
    assert isinstance(AutoModelForSeq2SeqLM.from_config(config), RecurrentStackingForConditionalGeneration)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"sharing_strategy": "none"},
            r"sharing_strategy = 'none' is not supported; allowed values: 'recurrent', 'sequence'",
        ),
        ({"sharing_strategy": "spiral"}, r"sharing_strategy = 'spiral' is not supported"),
        (
            {
                "sharing_strategy": "sequence",
                "encoder_layers": 6,
                "encoder_unique_layers": 4,
                "decoder_unique_layers": 1,
            },
            r"encoder_unique_layers = 4 never runs block\(s\) \[3\].*a divisor of 6",
        ),
        (
            {"sharing_strategy": "cycle", "encoder_unique_layers": 0, "decoder_unique_layers": 1},
            r"encoder_unique_layers must be a positive integer, got 0",
        ),
        (
            {"sharing_strategy": "cycle", "encoder_unique_layers": 1, "decoder_unique_layers": -2},
            r"decoder_unique_layers must be a positive integer, got -2",
        ),
        (
            {"sharing_strategy": "cycle", "encoder_unique_layers": 1.5, "decoder_unique_layers": 1},
            r"encoder_unique_layers = 1.5 has the wrong type; expected int \| None",
        ),
        (
            {"sharing_strategy": "cycle_rev", "encoder_unique_layers": 3, "decoder_unique_layers": 1},
            r"encoder_unique_layers = 3 exceeds the depth encoder_layers = 2; allowed: 1 to 2",
        ),
        ({"sharing_strategy": "cycle"}, r"encoder_unique_layers must be set for sharing_strategy='cycle'"),
        (
            {"encoder_unique_layers": 2},
            r"encoder_unique_layers = 2 contradicts sharing_strategy='recurrent'; allowed: 1",
        ),
    ],
)
def test_bad_sharing_configs_fail_at_construction(tiny: dict, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RecurrentStackingConfig(**{**tiny, **overrides})


def test_core_config_refuses_sharing_fields_without_strategy(tiny: dict) -> None:
    with pytest.raises(ValueError, match=r"encoder_unique_layers = 1 needs a sharing_strategy other than 'none'"):
        FusionTransformerConfig(**{**tiny, "encoder_unique_layers": 1})


# --- parameters are really shared --------------------------------------------------------------


@pytest.mark.parametrize(("strategy", "unique"), STRATEGIES)
def test_parameter_count_and_checkpoint_hold_each_block_once(
    tiny: dict, tmp_path, strategy: str, unique: int | None
) -> None:
    config = shared_config(tiny, strategy, unique, normalize_before=True, add_final_layer_norm=True)
    model = RecurrentStackingForConditionalGeneration(config)
    vanilla = FusionTransformerForConditionalGeneration(
        FusionTransformerConfig(
            **{**tiny, "encoder_layers": 4, "decoder_layers": 4, "normalize_before": True, "add_final_layer_norm": True}
        )
    )
    blocks = {"encoder": config.encoder_unique_layers, "decoder": config.decoder_unique_layers}
    per_layer = {
        stack: sum(p.numel() for p in getattr(vanilla.model, stack).layers[0].parameters()) for stack in blocks
    }
    assert model.num_parameters() == vanilla.num_parameters() - sum((4 - blocks[s]) * per_layer[s] for s in blocks)
    for stack in (model.model.encoder, model.model.decoder):
        # The final stack LayerNorm is its own module, outside the shared blocks.
        assert stack.layer_norm is not None
        assert all(stack.layer_norm is not module for layer in stack.layers for module in layer.modules())

    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as file:
        shapes = {key: file.get_slice(key).get_shape() for key in file.keys()}  # noqa: SIM118 (safe_open is not a dict)
    for key in shapes:
        layer = LAYER_KEY.match(key)
        if layer:
            assert int(layer.group(2)) < blocks[layer.group(1)], key
    # Every stored element is a distinct parameter (or the logits bias buffer): nothing stored twice.
    assert (
        sum(math.prod(shape) for shape in shapes.values()) == model.num_parameters() + model.final_logits_bias.numel()
    )

    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config["model_type"] == "recurrent_stacking"
    assert saved_config["sharing_strategy"] == strategy
    assert (saved_config["encoder_layers"], saved_config["decoder_layers"]) == (4, 4)
    assert (saved_config["encoder_unique_layers"], saved_config["decoder_unique_layers"]) == (
        blocks["encoder"],
        blocks["decoder"],
    )
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert type(reloaded) is RecurrentStackingForConditionalGeneration
    assert reloaded.model.decoder.plan == model.model.decoder.plan


def unshared_copy(model: RecurrentStackingForConditionalGeneration) -> FusionTransformerForConditionalGeneration:
    """A vanilla model with one layer per step whose layer ``i`` holds a *copy* of block plan[i]."""
    fields = {
        **model.config.to_diff_dict(),
        "sharing_strategy": "none",
        "encoder_unique_layers": None,
        "decoder_unique_layers": None,
    }
    fields.pop("model_type")
    vanilla = FusionTransformerForConditionalGeneration(FusionTransformerConfig(**fields))
    shared_state = model.state_dict()
    state = {}
    for key in vanilla.state_dict():
        layer = LAYER_KEY.match(key)
        if layer:
            stack, step_idx, name = layer.group(1), int(layer.group(2)), layer.group(3)
            block_idx = getattr(model.model, stack).plan[step_idx]
            key_in_shared = f"model.{stack}.layers.{block_idx}.{name}"
        else:
            key_in_shared = key
        state[key] = shared_state[key_in_shared].clone()
    vanilla.load_state_dict(state, strict=True)
    vanilla.tie_weights()
    return vanilla


@pytest.mark.parametrize("normalize_before", [False, True])
@pytest.mark.parametrize(("strategy", "unique"), STRATEGIES)
def test_shared_gradient_is_sum_over_steps(
    tiny: dict, strategy: str, unique: int | None, normalize_before: bool
) -> None:
    config = shared_config(
        tiny, strategy, unique, normalize_before=normalize_before, add_final_layer_norm=normalize_before
    )
    model = RecurrentStackingForConditionalGeneration(config)
    vanilla = unshared_copy(model)
    batch = random_batch()
    labels = torch.randint(3, 100, batch["decoder_input_ids"].shape)
    labels[0, -2:] = -100
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}

    loss = model(**inputs).loss
    vanilla_loss = vanilla(**inputs).loss
    torch.testing.assert_close(loss, vanilla_loss)
    loss.backward()
    vanilla_loss.backward()

    vanilla_grads = {name: p.grad for name, p in vanilla.named_parameters()}
    for name, param in model.named_parameters():
        layer = LAYER_KEY.match(name)
        if not layer:
            torch.testing.assert_close(param.grad, vanilla_grads[name], atol=1e-6, rtol=1e-5)
            continue
        stack, block_idx, rest = layer.group(1), int(layer.group(2)), layer.group(3)
        steps = [s for s, b in enumerate(getattr(model.model, stack).plan) if b == block_idx]
        expected = sum(vanilla_grads[f"model.{stack}.layers.{s}.{rest}"] for s in steps)
        torch.testing.assert_close(param.grad, expected, atol=1e-6, rtol=1e-5)
        assert param.grad.abs().sum() > 0, name


# --- caches -------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize_before", [False, True])
@pytest.mark.parametrize(("strategy", "unique"), STRATEGIES)
def test_cached_decoding_matches_full_recomputation(
    tiny: dict, strategy: str, unique: int | None, normalize_before: bool
) -> None:
    config = shared_config(
        tiny, strategy, unique, normalize_before=normalize_before, add_final_layer_norm=normalize_before
    )
    assert_cached_decoding_matches(RecurrentStackingForConditionalGeneration(config), random_batch())


def test_cache_has_one_slot_per_step(tiny: dict) -> None:
    model = RecurrentStackingForConditionalGeneration(shared_config(tiny, "recurrent", None, depth=3)).eval()
    batch = random_batch()
    with torch.no_grad():
        cache = output_cache(model(**batch, use_cache=True))
    self_cache = cache.self_attention_cache
    assert len(self_cache.layers) == 3
    # Same block, different inputs per step: three different key tensors, none aliased.
    keys = [layer.keys for layer in self_cache.layers]
    assert all(k.shape == (3, 2, batch["decoder_input_ids"].shape[1], 8) for k in keys)
    assert not torch.allclose(keys[0], keys[1]) and not torch.allclose(keys[1], keys[2])
    assert len({k.data_ptr() for k in keys}) == 3


@pytest.mark.parametrize(("strategy", "unique"), [STRATEGIES[0], STRATEGIES[-1]])
def test_beam_search_with_cache_equals_without(tiny: dict, strategy: str, unique: int | None) -> None:
    model = RecurrentStackingForConditionalGeneration(shared_config(tiny, strategy, unique)).eval()
    batch = random_batch()
    kwargs = {
        "attention_mask": batch["attention_mask"], "num_beams": 2, "max_new_tokens": 4, "return_dict_in_generate": True,
        "output_scores": True,
    }  # fmt: skip
    cached = model.generate(batch["input_ids"], **kwargs)
    uncached = model.generate(batch["input_ids"], use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    # The scores too: the tiny model repeats one token, so equal tokens alone do not show the cache is right.
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores)


@pytest.mark.slow
def test_roundtrip_in_clean_process(tiny: dict, tmp_path) -> None:
    model = RecurrentStackingForConditionalGeneration(
        shared_config(tiny, "cycle_rev", 3, normalize_before=True, add_final_layer_norm=True)
    )
    folder = assert_roundtrip_in_clean_process(model, tmp_path)
    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.sharing_strategy, config.encoder_unique_layers) == (
        "recurrent_stacking",
        "cycle_rev",
        3,
    )
    assert (folder / "configuration_recurrent_stacking.py").exists() and (folder / "sharing.py").exists()
    assert not (folder / "transfer.py").exists()  # training-time library code stays out of checkpoints


# --- transfer learning ---------------------------------------------------------------------------


@pytest.fixture
def teacher(tiny: dict) -> FusionTransformerForConditionalGeneration:
    """A 6+6 vanilla teacher with distinct layers (random init differs per layer)."""
    return FusionTransformerForConditionalGeneration(
        FusionTransformerConfig(
            **{**tiny, "encoder_layers": 6, "decoder_layers": 6, "normalize_before": True, "add_final_layer_norm": True}
        )
    )


def teacher_layer_params(teacher, stack: str, index: int) -> dict[str, torch.Tensor]:
    return dict(getattr(teacher.model, stack).layers[index].named_parameters())


def assert_blocks_from(student, teacher, stack: str, sources: list[list[int]]) -> None:
    """Student block b equals the mean of the listed teacher layers, tensor by tensor."""
    blocks = getattr(student.model, stack).layers
    assert len(blocks) == len(sources)
    for block, layer_indices in zip(blocks, sources):
        for name, param in block.named_parameters():
            total = torch.zeros_like(param)
            for index in layer_indices:
                total = total + teacher_layer_params(teacher, stack, index)[name]
            torch.testing.assert_close(param, total / len(layer_indices), atol=1e-7, rtol=0)


def assert_non_layers_copied(student, teacher) -> None:
    teacher_params = dict(teacher.named_parameters())
    checked = 0
    for name, param in student.named_parameters():
        if not LAYER_KEY.match(name):
            assert torch.equal(param, teacher_params[name]), name
            checked += 1
    assert checked >= 5  # shared embedding, 2 positions, 2 embedding norms, 2 final norms
    assert torch.equal(student.final_logits_bias, teacher.final_logits_bias)
    assert student.lm_head.weight is student.model.shared.weight


def test_transfer_mean_for_recurrent_stacking(teacher) -> None:
    with torch.no_grad():
        teacher.final_logits_bias.normal_()
    student = transfer_from_pretrained(teacher)
    assert isinstance(student, RecurrentStackingForConditionalGeneration)
    assert (student.config.encoder_layers, student.config.encoder_unique_layers) == (6, 1)
    assert student.config.normalize_before and student.config.add_final_layer_norm
    for stack in ("encoder", "decoder"):
        assert_blocks_from(student, teacher, stack, [[0, 1, 2, 3, 4, 5]])
    assert_non_layers_copied(student, teacher)
    assert student.generation_config.to_dict() == teacher.generation_config.to_dict()


def test_transfer_mean_follows_each_schedule(teacher) -> None:
    cycle = transfer_from_pretrained(
        teacher, sharing_strategy="cycle", encoder_unique_layers=3, decoder_unique_layers=2
    )
    assert_blocks_from(cycle, teacher, "encoder", [[0, 3], [1, 4], [2, 5]])
    assert_blocks_from(cycle, teacher, "decoder", [[0, 2, 4], [1, 3, 5]])
    cycle_rev = transfer_from_pretrained(
        teacher, sharing_strategy="cycle_rev", encoder_unique_layers=3, decoder_unique_layers=4
    )
    assert_blocks_from(cycle_rev, teacher, "encoder", [[0, 5], [1, 4], [2, 3]])
    assert_blocks_from(cycle_rev, teacher, "decoder", [[0], [1], [2, 5], [3, 4]])
    sequence = transfer_from_pretrained(
        teacher, sharing_strategy="sequence", encoder_unique_layers=2, decoder_unique_layers=3
    )
    assert_blocks_from(sequence, teacher, "encoder", [[0, 1, 2], [3, 4, 5]])
    assert_blocks_from(sequence, teacher, "decoder", [[0, 1], [2, 3], [4, 5]])
    assert_non_layers_copied(sequence, teacher)


def test_transfer_layer_index_list_and_per_stack(teacher) -> None:
    top = transfer_from_pretrained(teacher, block_source=-1)
    assert_blocks_from(top, teacher, "encoder", [[5]])
    assert_blocks_from(top, teacher, "decoder", [[5]])
    mixed = transfer_from_pretrained(
        teacher,
        sharing_strategy="cycle",
        encoder_unique_layers=3,
        decoder_unique_layers=2,
        block_source={"encoder": [0, [1, 4], -2], "decoder": 2},
    )
    assert_blocks_from(mixed, teacher, "encoder", [[0], [1, 4], [4]])
    assert_blocks_from(mixed, teacher, "decoder", [[2], [2]])
    # Deeper student than teacher: explicit sources are fine, "mean" is refused.
    deep = transfer_from_pretrained(
        teacher,
        sharing_strategy="cycle_rev",
        encoder_layers=12,
        encoder_unique_layers=6,
        decoder_unique_layers=1,
        block_source={"encoder": [0, 1, 2, 3, 4, 5], "decoder": "mean"},
    )
    assert deep.model.encoder.plan == PLANS["cycle_rev", 12, 6]
    assert_blocks_from(deep, teacher, "encoder", [[0], [1], [2], [3], [4], [5]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"encoder_layers": 12, "encoder_unique_layers": 6, "sharing_strategy": "cycle", "decoder_unique_layers": 2},
            r"'mean' needs the student encoder as deep as the teacher's \(12 vs 6",
        ),
        ({"block_source": 6}, r"block_source \(encoder\) = 6 is not a teacher layer; allowed: an integer from -6 to 5"),
        ({"block_source": [0, 1]}, r"one entry per block \(1 blocks\)"),
        ({"block_source": [[]]}, r"block_source\[0\] \(encoder\) is empty"),
        ({"block_source": "first"}, r"block_source = 'first' is not supported"),
        ({"block_source": {"encoder": 0}}, r"exactly the keys 'encoder' and 'decoder'"),
        ({"model_type": "bert"}, r"model_type = 'bert' is not an hf_fusion family"),
        ({"encoder_ffn_dim": 64}, r"has no counterpart model\.encoder\.layers\.0\.fc1\.weight of the same shape"),
        ({"sharing_strategy": "sequence", "encoder_unique_layers": 4, "decoder_unique_layers": 1}, r"never runs block"),
    ],
)
def test_transfer_bad_input(teacher, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        transfer_from_pretrained(teacher, **kwargs)


def test_transfer_from_bart_checkpoint(tmp_path) -> None:
    bart_config = BartConfig(**{**TINY, "encoder_layers": 3, "decoder_layers": 3})
    bart = BartForConditionalGeneration(bart_config).eval()
    bart.save_pretrained(tmp_path / "bart")
    # Without sharing, "mean" over one layer per block is an exact copy: the logits are BART's.
    exact = transfer_from_pretrained(tmp_path / "bart", sharing_strategy="none", model_type="fusion_transformer").eval()
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(exact(**batch).logits, bart(**batch).logits, atol=1e-5, rtol=1e-5)
    student = transfer_from_pretrained(str(tmp_path / "bart"))
    for stack in ("encoder", "decoder"):
        bart_layers = getattr(bart.model, stack).layers
        for name, param in student.model.get_submodule(f"{stack}.layers.0").named_parameters():
            expected = sum(dict(layer.named_parameters())[name] for layer in bart_layers) / 3
            torch.testing.assert_close(param, expected, atol=1e-7, rtol=0)
    torch.testing.assert_close(student.model.shared.weight, bart.model.shared.weight, atol=0, rtol=0)


def test_transfer_cli(teacher, tmp_path, capsys) -> None:
    teacher.save_pretrained(tmp_path / "teacher")
    assert cli(
        [
            "transfer",
            str(tmp_path / "teacher"),
            str(tmp_path / "student"),
            "--sharing_strategy",
            "cycle",
            "--encoder_unique_layers",
            "2",
            "--decoder_unique_layers",
            "3",
            "--block_source",
            '{"encoder": 1, "decoder": "mean"}',
            "--model_config.dropout",
            "0.2",
        ]
    ) == 0
    assert "encoder 6 steps / 2 blocks" in capsys.readouterr().out
    student = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "student")
    assert (student.config.model_type, student.config.dropout, student.config.encoder_unique_layers) == (
        "recurrent_stacking",
        0.2,
        2,
    )
    assert_blocks_from(student, teacher, "encoder", [[1], [1]])
    assert_blocks_from(student, teacher, "decoder", [[0, 3], [1, 4], [2, 5]])
