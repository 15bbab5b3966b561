"""Model cards and publishing: the metadata parses and carries the results, every family has a
card, and a pushed folder loads by repo id and pinned revision in a clean process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import ModelCard

import hf_fusion
from hf_fusion.compat import TESTED_TRANSFORMERS_RELEASES
from tests.cli_helpers import RecordingHub, publish_to_hf_cache
from tests.helpers import TINY, random_batch, run_in_clean_process
from training.cli import main
from training.export import check_export, export_model
from training.model_card import (
    BASE_TEMPLATE,
    REPO_PLACEHOLDER,
    REVISION_PLACEHOLDER,
    TEMPLATE_DIR,
    CardFacts,
    HeldOutScore,
    render_model_card,
    template_for,
)
from training.tokenizer import train_tokenizer

SENTENCES = [
    "Eventually the river flows into the sea.",
    "Der Fluss mündet schließlich ins Meer.",
    "The game eats up too much memory.",
    "Das Spiel frisst zu viel Speicher.",
    "She waited for the train in the rain.",
    "Sie wartete im Regen auf den Zug.",
]


def _facts(config: transformers.PreTrainedConfig, **overrides) -> CardFacts:
    facts = dict(
        model_type=config.model_type,
        config=config,
        num_parameters=12345,
        source_lang="en",
        target_lang="de",
        dataset_name="ding",
        dataset_description="Ding dictionary example sentences, English -> German",
        dataset_license="GPL-2.0-or-later",
        split_sizes={"train": 100, "validation": 10, "test": 10},
        tokenizer_summary="Unigram subwords, 100 tokens.",
        hyperparameters={"learning rate": 0.002},
        results=[HeldOutScore("bleu", 12.345, num_beams=5), HeldOutScore("chrf", 40.5, num_beams=5)],
        validation={"bleu": 11.0},
    )
    facts.update(overrides)
    return CardFacts(**facts)


def test_card_metadata_parses_with_huggingface_hub_and_carries_the_results() -> None:
    config = hf_fusion.FusionTransformerConfig(**TINY)
    text = str(render_model_card(_facts(config)))
    card = ModelCard(text)  # parse the rendered text back, as the Hub does
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "translation"
    assert data.language == ["en", "de"] and data.license == "gpl-2.0"  # SPDX of the data -> Hub id
    assert {"custom_code", "hf_fusion", "fusion_transformer"} <= set(data.tags)
    results = {(r.metric_type, r.dataset_split): r.metric_value for r in data.eval_results}
    assert results == {("bleu", "test"): 12.35, ("chrf", "test"): 40.5}
    assert all(r.task_type == "translation" and r.dataset_type == "ding" for r in data.eval_results)
    assert "model-index" in text.split("---")[1]
    assert "trust_remote_code=True" in card.text and "revision=revision" in card.text
    assert REVISION_PLACEHOLDER in card.text and "arXiv:1706.03762" in card.text


def test_shared_models_report_depth_and_unique_layers() -> None:
    config = hf_fusion.FusionTransformerConfig(
        **{**TINY, "encoder_layers": 6, "decoder_layers": 4},
        sharing_strategy="cycle",
        encoder_unique_layers=2,
        decoder_unique_layers=2,
    )
    text = render_model_card(_facts(config)).text
    assert "| encoder | 6 | 2 |" in text and "| decoder | 4 | 2 |" in text
    assert "execution plan `cycle`" in text


@pytest.mark.parametrize("family", sorted(hf_fusion.MODEL_FAMILIES))
def test_every_registered_family_ships_a_card_template(family: str) -> None:
    assert template_for(family) != BASE_TEMPLATE, f"add model_cards/{family}.md"
    config_class = hf_fusion.MODEL_FAMILIES[family][0]
    card = render_model_card(_facts(config_class(**TINY)))
    assert "## The variant" in card.text and "arxiv.org" in card.text.lower()
    # The card states the transformers releases the saved code was tested on, and the way out.
    assert f"tested with transformers {', '.join(TESTED_TRANSFORMERS_RELEASES)}" in " ".join(card.text.split())
    assert "hf-fusion refresh-code" in card.text


@pytest.mark.parametrize("template", sorted(p.stem for p in TEMPLATE_DIR.glob("*.md") if p.name != BASE_TEMPLATE))
def test_every_template_renders_from_core_config_fields(template: str) -> None:
    """Templates may only use fields every family has, so a template of a family that is not
    registered here still renders."""
    config = hf_fusion.FusionTransformerConfig(**TINY)
    card = render_model_card(_facts(config, model_type=template))
    assert card.data.eval_results and "## Citation" in card.text


def _tiny_export(folder: Path) -> tuple[torch.nn.Module, Path]:
    tokenizer = train_tokenizer(SENTENCES * 3, vocab_size=60)
    config = hf_fusion.FusionTransformerConfig(**{**TINY, "vocab_size": 100})
    model = hf_fusion.FusionTransformerForConditionalGeneration(config).eval()
    model.config.use_cache = False  # what the Trainer leaves behind; the export must undo it
    card = render_model_card(_facts(model.config))
    return model, export_model(model, tokenizer, folder, card)


@pytest.mark.slow
def test_push_uploads_a_folder_that_loads_by_repo_id_and_pinned_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    model, folder = _tiny_export(tmp_path / "export")
    assert json.loads((folder / "config.json").read_text())["use_cache"] is True
    hub = RecordingHub()
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", hub)

    assert main(["push", str(folder), "--repo_id", "test-org/tiny-fusion", "--revision", "v1"]) == 0
    assert [name for name, _ in hub.calls] == ["create_repo", "create_branch", "upload_folder", "upload_file"]
    assert hub.calls[2][1]["revision"] == "v1" and hub.calls[3][1]["revision"] == "v1"
    (_, model_oid, uploaded), (_, _, final) = hub.commits
    assert model_oid in capsys.readouterr().out
    expected = {p.name for p in folder.iterdir()}
    assert set(uploaded) == expected and {"modeling_fusion_transformer.py", "heads.py"} <= expected
    readme = final["README.md"].decode()
    assert f'repo_id = "test-org/tiny-fusion"' in readme and f'revision = "{model_oid}"' in readme
    assert REPO_PLACEHOLDER not in readme and REVISION_PLACEHOLDER not in readme
    assert ModelCard(readme).data.eval_results[0].metric_value == 12.35

    # The upload, laid out as the offline Hub cache, loads by repo id at the pinned revision.
    publish_to_hf_cache(hub, Path(os.environ["HF_HOME"]))
    batch = random_batch(vocab_size=100)
    torch.save(batch, tmp_path / "batch.pt")
    with torch.no_grad():
        expected_logits = model(**batch).logits
    run_in_clean_process(
        f"""
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
        model = AutoModelForSeq2SeqLM.from_pretrained(
            "test-org/tiny-fusion", revision={model_oid!r}, trust_remote_code=True
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained("test-org/tiny-fusion", revision={model_oid!r}, trust_remote_code=True)
        assert model.config.use_cache
        with torch.no_grad():
            torch.save(model(**torch.load("batch.pt")).logits, "logits.pt")
            model.generate(**tokenizer(["The game eats up too much memory."], return_tensors="pt"), max_new_tokens=4)
        """,
        tmp_path,
    )
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected_logits, atol=1e-6, rtol=0)


def test_check_export_names_what_is_missing(tmp_path: Path) -> None:
    _, folder = _tiny_export(tmp_path / "export")
    check_export(folder)
    (folder / "heads.py").unlink()
    with pytest.raises(ValueError, match=r"heads\.py"):
        check_export(folder)
    _, folder = _tiny_export(tmp_path / "again")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "use_cache": False}))
    with pytest.raises(ValueError, match="use_cache"):
        check_export(folder)
