"""Model cards for exported hf_fusion models, rendered from per-family templates.

``model_cards/base.md`` is the card layout (Jinja2); ``model_cards/<model_type>.md`` extends it and
fills the ``variant`` block: what the family changes, with the paper. A family without its own
template gets the layout with its config class's docstring, so a new family is never blocked on a
card, but should ship one.

:func:`card_facts` gathers what a card states from the finished run: its settings, data, tokenizer,
model and results. A card carries facts of that run only; measured comparisons between runs live
in ``docs/`` and ``benchmarks/results/``.

The YAML metadata is written with ``huggingface_hub.ModelCardData`` and the results as
``EvalResult`` entries, which the Hub shows as ``model-index`` (``Trainer.create_model_card``
leaves it empty for seq2seq tasks).
"""

from __future__ import annotations

import inspect
import json
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import datasets
import jinja2
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import PreTrainedModel

from hf_fusion.compat import TESTED_TRANSFORMERS_RELEASES
from model_cards import TEMPLATE_DIR

from .arguments import Experiment
from .corpora import BUILTIN_CORPORA

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


def _tokenizer_summary(tokenizer: Any, trained: bool) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    kind = json.loads(backend.to_str())["model"]["type"] if backend is not None else type(tokenizer).__name__
    origin = "joint source/target vocabulary trained on the training split" if trained else "the given tokenizer"
    return f"{kind} subwords, {len(tokenizer):,} tokens ({origin})."


def _enum_value(value: Any) -> Any:
    """An option as written in the YAML (``TrainingArguments`` turns some into enums)."""
    return getattr(value, "value", value)


def card_facts(
    experiment: Experiment,
    splits: datasets.DatasetDict,
    tokenizer: Any,
    model: PreTrainedModel,
    results: dict[str, Any],
    eval_split_name: str | None,
    has_curves: bool,
) -> CardFacts:
    """The facts of a finished run (see :func:`training.pipeline.train`): ``results`` is its
    ``results.json``, ``eval_split_name`` the split of its final beam-search scores (if any)."""
    args, data_args = experiment.training, experiment.data
    config = model.config
    hyperparameters = {
        "learning rate": args.learning_rate,
        "schedule": f"{_enum_value(args.lr_scheduler_type)}, {args.warmup_steps} warmup steps",
        "optimizer": f"{_enum_value(args.optim)} "
        f"(betas {args.adam_beta1}, {args.adam_beta2}; weight decay {args.weight_decay})",
        "batch": (
            f"up to {args.max_tokens_per_batch} tokens and {args.per_device_train_batch_size} sentences per process"
            if args.max_tokens_per_batch
            else f"{args.per_device_train_batch_size} sentences per process"
        )
        + f", {args.world_size} process(es), gradient accumulation {args.gradient_accumulation_steps}",
        "training steps": results.get("train_steps"),
        "label smoothing (in the model)": getattr(config, "label_smoothing", 0.0),
        "dropout": getattr(config, "dropout", None),
        "max gradient norm": args.max_grad_norm,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "seed": args.seed,
    }
    validation = {
        key.removeprefix("best_validation_"): value
        for key, value in results.items()
        if key.startswith("best_validation_")
    }
    test_results = [
        HeldOutScore(metric, results[f"{eval_split_name}_{metric}"], split=eval_split_name, num_beams=args.final_num_beams)
        for metric in ("bleu", "chrf")
        if eval_split_name and f"{eval_split_name}_{metric}" in results
    ]
    train = splits["train"]
    from_hub = data_args.dataset is not None and data_args.dataset not in BUILTIN_CORPORA
    return CardFacts(
        model_type=config.model_type,
        config=config,
        num_parameters=model.num_parameters(),
        repo_id=args.hub_model_id,
        source_lang=data_args.source_lang,
        target_lang=data_args.target_lang,
        dataset_name=Path(data_args.train_file).name if data_args.train_file else data_args.dataset,
        dataset_id=data_args.dataset if from_hub else None,
        dataset_description=train.info.description or "",
        dataset_license=train.info.license or None,
        split_sizes={name: len(split) for name, split in splits.items()},
        tokenizer_summary=_tokenizer_summary(tokenizer, trained=experiment.model.trains_tokenizer),
        hyperparameters=hyperparameters,
        results=test_results,
        validation=validation,
        license=args.hub_license,
        base_model=experiment.model.model_name_or_path,
        example_source=splits[eval_split_name]["source"][0] if eval_split_name else CardFacts.example_source,
        num_beams=args.final_num_beams,
        has_curves=has_curves,
        world_size=args.world_size,
        training_seconds=results.get("train_runtime"),
        device="GPU" if torch.cuda.is_available() and not args.use_cpu else "CPU",
    )


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
