"""Model cards for exported hf_fusion models, rendered from per-family templates.

``model_cards/base.md`` is the card layout (Jinja2); ``model_cards/<model_type>.md`` extends it and
fills the ``variant`` block: what the family changes, with the paper. A family without its own
template gets the layout with its config class's docstring, so a new family is never blocked on a
card, but should ship one.

The YAML metadata is written with ``huggingface_hub.ModelCardData`` and the results as
``EvalResult`` entries, which the Hub shows as ``model-index`` (``Trainer.create_model_card``
leaves it empty for seq2seq tasks).
"""

from __future__ import annotations

import inspect
import platform
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from hf_fusion.compat import TESTED_TRANSFORMERS_RELEASES
from model_cards import TEMPLATE_DIR

BASE_TEMPLATE = "base.md"
# SPDX identifiers of corpus licenses -> Hub license ids.
HUB_LICENSES = {
    "GPL-2.0-or-later": "gpl-2.0",
    "GPL-2.0-only": "gpl-2.0",
    "GPL-3.0-or-later": "gpl-3.0",
    "MPL-2.0": "mpl-2.0",
    "MIT": "mit",
    "Apache-2.0": "apache-2.0",
    "CC-BY-4.0": "cc-by-4.0",
    "CC-BY-SA-4.0": "cc-by-sa-4.0",
}
# Filled in by ``export.push_folder`` once the repository and the commit are known.
REPO_PLACEHOLDER = "YOUR-NAMESPACE/"
REVISION_PLACEHOLDER = "COMMIT-HASH-YOU-REVIEWED"
FRAMEWORKS = ("transformers", "torch", "accelerate", "datasets", "tokenizers", "huggingface_hub")


@dataclass
class HeldOutScore:
    """One score on a held-out split."""

    metric: str  # "bleu" / "chrf"
    value: float
    split: str = "test"
    num_beams: int = 1

    @property
    def pretty_metric(self) -> str:
        return {"bleu": "BLEU", "chrf": "chrF"}.get(self.metric, self.metric)


@dataclass
class CardFacts:
    """Everything a card states, gathered by the training run (nothing here is guessed)."""

    model_type: str
    config: Any  # the model's PreTrainedConfig
    num_parameters: int
    repo_id: str | None = None
    revision: str | None = None
    source_lang: str | None = None
    target_lang: str | None = None
    dataset_name: str = "custom"
    dataset_id: str | None = None  # a Hub dataset id, if the data came from the Hub
    dataset_description: str = ""
    dataset_license: str | None = None
    split_sizes: dict[str, int] = field(default_factory=dict)
    tokenizer_summary: str = ""
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    results: list[HeldOutScore] = field(default_factory=list)
    validation: dict[str, float] = field(default_factory=dict)
    license: str | None = None
    base_model: str | None = None
    example_source: str = "Eventually the river flows into the sea."
    num_beams: int = 5
    has_curves: bool = False
    world_size: int = 1
    training_seconds: float | None = None
    device: str = "cpu"


def framework_versions() -> dict[str, str]:
    """Installed versions of the libraries a user needs to reproduce the run."""
    versions = {"python": platform.python_version()}
    for name in ("hf_fusion", *FRAMEWORKS):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "source checkout" if name == "hf_fusion" else "not installed"
    return versions


def _stack_summary(config: Any) -> list[dict[str, Any]]:
    """Depth (steps run) and unique parameter blocks per stack: they differ under parameter sharing."""
    rows = []
    for stack in ("encoder", "decoder"):
        depth = getattr(config, f"{stack}_layers", None)
        unique = getattr(config, f"{stack}_unique_layers", None) or depth
        rows.append({"stack": stack, "depth": depth, "unique": unique})
    return rows


def _family_description(config: Any) -> str:
    """First paragraph of the config class docstring (fallback for a family without a template)."""
    doc = inspect.getdoc(type(config)) or ""
    return doc.split("\n\n")[0].strip()


def _card_data(facts: CardFacts) -> ModelCardData:
    hub_license = facts.license or HUB_LICENSES.get(facts.dataset_license or "", None)
    dataset_pretty = f"{facts.dataset_name} ({facts.source_lang}-{facts.target_lang})" if facts.source_lang else facts.dataset_name
    eval_results = [
        EvalResult(
            task_type="translation",
            task_name="Translation",
            dataset_type=facts.dataset_id or facts.dataset_name,
            dataset_name=dataset_pretty,
            dataset_split=result.split,
            metric_type=result.metric,
            metric_value=round(result.value, 2),
            metric_name=f"{result.pretty_metric} ({result.split}, beam {result.num_beams})",
        )
        for result in facts.results
    ]
    languages = [lang for lang in (facts.source_lang, facts.target_lang) if lang]
    return ModelCardData(
        language=languages or None,
        license=hub_license or "other",
        license_name=None if hub_license else "see-model-card",
        library_name="transformers",
        pipeline_tag="translation",
        tags=["hf_fusion", facts.model_type, "translation", "seq2seq", "custom_code"],
        datasets=[facts.dataset_id] if facts.dataset_id else None,
        metrics=sorted({result.metric for result in facts.results}) or None,
        base_model=facts.base_model,
        model_name=facts.repo_id.split("/")[-1] if facts.repo_id else f"{facts.model_type}-{facts.dataset_name}",
        eval_results=eval_results or None,
    )


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,  # a template asking for a fact we do not have is a bug
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def template_for(model_type: str) -> str:
    """The template file name of a family (``base.md`` when the family ships none)."""
    name = f"{model_type}.md"
    return name if (TEMPLATE_DIR / name).is_file() else BASE_TEMPLATE


def render_model_card(facts: CardFacts) -> ModelCard:
    """Render the card of an exported model (metadata + body)."""
    data = _card_data(facts)
    config = facts.config
    body = _environment().get_template(template_for(facts.model_type)).render(
        facts=facts,
        config=config,
        config_dict=config.to_diff_dict(),
        family_class=type(config).__name__,
        family_description=_family_description(config),
        stacks=_stack_summary(config),
        versions=framework_versions(),
        tested_transformers=TESTED_TRANSFORMERS_RELEASES,
        repo_id=facts.repo_id or REPO_PLACEHOLDER + data.model_name,
        revision=facts.revision or REVISION_PLACEHOLDER,
        model_name=data.model_name,
        hub_license=data.license,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n")
