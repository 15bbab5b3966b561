"""The arguments of an experiment: one YAML file, overridable from the command line.

An experiment is three ``HfArgumentParser`` dataclasses (model, data, training) filled from a YAML
file whose top-level keys are their fields, plus a ``model_config:`` mapping of config fields of
the model family. A file may start from another with ``extends: BASE.yaml`` (a path relative to
the file): its keys override the base's, and ``model_config`` is merged field by field, so the
shipped configs state only what differs. On the command line ``--key value`` overrides a YAML key
and ``--model_config.FIELD value`` overrides (or adds) a config field, so a sweep never needs a
copy of the YAML. Unknown keys fail with the closest known name. The resolved settings (bases
merged, overrides applied) are what ``experiment.yaml`` records.

Adding a model family needs no code here: its YAML names its ``model_type`` and config fields,
which go to ``AutoConfig.for_model(model_type, **model_config)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import HfArgumentParser, Seq2SeqTrainingArguments

import hf_fusion
from hf_fusion.configuration_fusion_transformer import unknown_fields

from .errors import ModelLoadError

MODEL_CONFIG_KEY = "model_config"
EXTENDS_KEY = "extends"

# Option names that hold a credential (``hub_token``, any ``*_secret``/``*_password``/``*_api_key``):
# they are used for the run and never recorded (experiment.yaml, model card, logs, checkpoints).
SECRET_OPTION = re.compile(r"(^|_)(token|secret|password|passwd|api_key|apikey|credentials?)$", re.IGNORECASE)


def is_secret_option(name: str) -> bool:
    """Whether option ``name`` holds a credential that must never be written anywhere."""
    return bool(SECRET_OPTION.search(name))


def redact_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without any credential (see :data:`SECRET_OPTION`), ``model_config`` included."""
    clean = {key: value for key, value in settings.items() if not is_secret_option(str(key))}
    if isinstance(clean.get(MODEL_CONFIG_KEY), dict):
        clean[MODEL_CONFIG_KEY] = {
            key: value for key, value in clean[MODEL_CONFIG_KEY].items() if not is_secret_option(str(key))
        }
    return clean


def _check_pretrained_location(option: str, value: str | None) -> None:
    """Refuse a local path that does not exist (else ``from_pretrained`` takes it for a Hub id and
    fails with "Repo id must be in the form ..."). A Hub id is ``NAME`` or ``NAMESPACE/NAME``."""
    if value is None:
        return
    path = Path(value).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise ModelLoadError(f"{option}={value!r} is a file; give the folder that holds it (config.json, tokenizer.json).")
    if value.startswith(("/", ".", "~")) or value.count("/") > 1 or "\\" in value or value.endswith("/"):
        raise ModelLoadError(
            f"{option}={value!r} does not exist: give an existing folder written by save_pretrained, or a Hub id "
            "NAMESPACE/NAME."
        )


@dataclass
class ModelArguments:
    """Which model to train: a fresh model of an hf_fusion family, or a checkpoint to fine-tune."""

    model_type: str = field(
        default="fusion_transformer",
        metadata={"help": "hf_fusion model family (a key of hf_fusion.MODEL_FAMILIES) of a model built from scratch."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint to fine-tune instead: an hf_fusion folder or Hub id, or a BART/mBART/Marian one, "
            "which is converted to model_type with hf_fusion.convert_from_pretrained."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Existing tokenizer (folder or Hub id). Default: the checkpoint's tokenizer when fine-tuning, "
            "else a joint subword tokenizer trained on the training data."
        },
    )
    # Config fields of the family; filled from the YAML mapping and --model_config.FIELD options
    # (not an argparse option itself: argparse cannot type a mapping).
    model_config: dict[str, Any] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        # A family typo or a missing folder fails here, before any data work; config fields are
        # checked when the config is built (once, sized to the tokenizer).
        for option in ("model_name_or_path", "tokenizer_name_or_path"):
            _check_pretrained_location(option, getattr(self, option))
        if self.model_name_or_path is None and self.model_type not in hf_fusion.MODEL_FAMILIES:
            raise ValueError(
                f"model_type={self.model_type!r} is not an hf_fusion family; allowed: "
                f"{', '.join(hf_fusion.MODEL_FAMILIES)}."
            )

    @property
    def trains_tokenizer(self) -> bool:
        """Whether the run trains its tokenizer (no tokenizer or checkpoint to take one from)."""
        return not (self.tokenizer_name_or_path or self.model_name_or_path)


@dataclass
class DataArguments:
    """Where the parallel text comes from and how it is cut."""

    dataset: str = field(
        default="ding",
        metadata={
            "help": "Built-in corpus ('ding', 'libreoffice') or a Hub dataset id. Ignored when train_file is set."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of a Hub dataset."})
    train_file: str | None = field(default=None, metadata={"help": "Local jsonl/tsv/csv file of training pairs."})
    validation_file: str | None = field(default=None, metadata={"help": "Local file of validation pairs."})
    test_file: str | None = field(default=None, metadata={"help": "Local file of test pairs."})
    source_lang: str | None = field(default=None, metadata={"help": "Source language code (e.g. en)."})
    target_lang: str | None = field(default=None, metadata={"help": "Target language code (e.g. de)."})
    data_cache_dir: str | None = field(default=None, metadata={"help": "Cache folder of built-in corpora."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training pairs."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Validate on the first N validation pairs (generation is slow)."}
    )
    max_test_samples: int | None = field(default=None, metadata={"help": "Test on the first N test pairs."})
    max_source_length: int = field(default=128, metadata={"help": "Truncate sources to this many tokens."})
    max_target_length: int = field(default=128, metadata={"help": "Truncate targets to this many tokens."})
    tokenizer_vocab_size: int = field(
        default=8000, metadata={"help": "Vocabulary size of a tokenizer trained on the training data."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})

    def __post_init__(self) -> None:
        if self.train_file or self.validation_file or self.test_file:
            self.dataset = None  # local files replace the corpus (see the help of ``dataset``)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class FusionTrainingArguments(Seq2SeqTrainingArguments):
    """``Seq2SeqTrainingArguments`` plus what a translation run needs.

    Label smoothing is a *model* config field (``model_config.label_smoothing``): the loss lives in
    the model because heads such as SurfaceFusion define their own, so ``label_smoothing_factor``
    (the Trainer's logits-only smoother) is refused. ``push_to_hub`` uploads the exported final
    folder with its model card, never the intermediate checkpoints.
    """

    max_tokens_per_batch: int | None = field(
        default=None,
        metadata={
            "help": "Token budget of a training batch (rows x longest row, padding included): batches of "
            "length-sorted examples up to this budget and at most per_device_train_batch_size rows."
        },
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after this many evaluations without improvement."}
    )
    max_train_minutes: float | None = field(
        default=None, metadata={"help": "Stop training (and keep the best model) after this many minutes."}
    )
    final_num_beams: int = field(
        default=5, metadata={"help": "Beam size of the final test evaluation and of the exported generation config."}
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "auto: bf16 (else fp16) on a CUDA GPU, fp32 on CPU; or force fp32/bf16/fp16.",
            "choices": list(PRECISIONS),
        },
    )
    export_dir: str | None = field(
        default=None, metadata={"help": "Hub-ready final folder (default: OUTPUT_DIR/final)."}
    )
    plot_training_curves: bool = field(default=True, metadata={"help": "Write training_curves.png."})
    hub_license: str | None = field(
        default=None,
        metadata={
            "help": "License id of the exported model card (e.g. apache-2.0). Default: the Hub id of the "
            "training corpus's license when known, else 'other'."
        },
    )

    def __post_init__(self) -> None:
        if self.label_smoothing_factor:
            raise ValueError(
                "label_smoothing_factor is not used by hf_fusion: set model_config.label_smoothing instead "
                "(the model computes its own loss; heads such as SurfaceFusion smooth several distributions)."
            )
        if not isinstance(self.final_num_beams, int) or self.final_num_beams < 1:
            raise ValueError(f"final_num_beams={self.final_num_beams!r} must be a whole number >= 1 (1 = greedy).")
        if self.generation_num_beams is not None and self.generation_num_beams < 1:
            raise ValueError(f"generation_num_beams={self.generation_num_beams!r} must be >= 1 (1 = greedy).")
        if self.generation_max_length is not None and self.generation_max_length < 1:
            raise ValueError(f"generation_max_length={self.generation_max_length!r} must be >= 1.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision = {self.precision!r} is not supported; allowed: {', '.join(PRECISIONS)}.")
        if self.precision == "auto" and not self.use_cpu and torch.cuda.is_available():
            self.bf16 = torch.cuda.is_bf16_supported()
            self.fp16 = not self.bf16
        elif self.precision in ("bf16", "fp16"):
            setattr(self, self.precision, True)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            self.use_cpu = True  # else every CPU process would silently train alone (no DDP)
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin for
        if self.ddp_find_unused_parameters is None:
            # hf_fusion models use every parameter in each forward; the unused-parameter search
            # costs a graph traversal per step.
            self.ddp_find_unused_parameters = False
        if self.export_dir is None and self.output_dir is not None:
            self.export_dir = str(Path(self.output_dir) / "final")
        super().__post_init__()


ARGUMENT_CLASSES = (ModelArguments, DataArguments, FusionTrainingArguments)


@dataclass
class Experiment:
    """The parsed arguments of one run and the settings they came from (for ``experiment.yaml``)."""

    model: ModelArguments
    data: DataArguments
    training: FusionTrainingArguments
    settings: dict[str, Any]

    @property
    def generation_max_length(self) -> int:
        """Longest generated sequence: ``generation_max_length``, else the longest target."""
        return self.training.generation_max_length or self.data.max_target_length

    def to_yaml(self) -> str:
        """The YAML file that reproduces this run: the config file with its ``extends`` chain
        resolved and the overrides applied (so it stands alone, next to the exported model). Credentials
        (``hub_token``, ...) are never part of it: a rerun takes the logged-in token."""
        return yaml.safe_dump(redact_settings(self.settings), sort_keys=False, allow_unicode=True)


def _known_fields() -> set[str]:
    return {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init} | {MODEL_CONFIG_KEY}


def _unknown_key_error(key: str, where: str) -> ValueError:
    close = difflib.get_close_matches(key, sorted(_known_fields()), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"Unknown option {key!r} in {where}{hint} (config fields go under {MODEL_CONFIG_KEY}.FIELD)")


def _parse_value(text: str) -> Any:
    """A command-line value typed the way YAML types it (``256`` -> int, ``true`` -> bool, ...)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_settings(config_path: str | Path | None) -> dict[str, Any]:
    """Read an experiment YAML file (a mapping of argument names to values) with its ``extends``
    chain resolved: the settings the run uses, without an ``extends`` key."""
    if config_path is None:
        return {}
    return _resolve_extends(Path(config_path), ())


def merge_settings(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: its keys win, and its ``model_config`` fields win field by field
    (so a family config adds its one field to the base model's sizes)."""
    merged = {**base, **child}
    if MODEL_CONFIG_KEY in base and MODEL_CONFIG_KEY in child:
        merged[MODEL_CONFIG_KEY] = {**(base[MODEL_CONFIG_KEY] or {}), **(child[MODEL_CONFIG_KEY] or {})}
    return merged


def _resolve_extends(path: Path, extended_by: tuple[Path, ...]) -> dict[str, Any]:
    """The settings of ``path`` merged over those of its base; ``extended_by`` is the chain of
    files that led here (to name it in errors and to refuse a cycle)."""
    if not path.is_file():
        if extended_by:
            raise FileNotFoundError(f"{extended_by[-1]} extends {str(path)!r}, which does not exist.")
        raise FileNotFoundError(f"Experiment config {str(path)!r} does not exist.")
    settings = _read_settings(path)
    base_name = settings.pop(EXTENDS_KEY, None)
    if base_name is None:
        return settings
    if not isinstance(base_name, str):
        raise ValueError(f"{path}: {EXTENDS_KEY} must be the path of one YAML file (relative to {path.parent}).")
    base = path.parent / base_name
    chain = (*extended_by, path)
    if base.resolve() in {link.resolve() for link in chain}:
        cycle = " -> ".join(str(link) for link in (*chain, base))
        raise ValueError(f"{path}: {EXTENDS_KEY} makes a cycle ({cycle}); a base cannot extend its own child.")
    return merge_settings(_resolve_extends(base, chain), settings)


def _read_settings(path: Path) -> dict[str, Any]:
    """One YAML file's own keys, checked (names known, ``model_config`` a mapping)."""
    settings = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(settings, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values, not {type(settings).__name__}.")
    for key in settings:
        if key not in _known_fields() and key != EXTENDS_KEY:
            raise _unknown_key_error(key, str(path))
    if not isinstance(settings.get(MODEL_CONFIG_KEY, {}) or {}, dict):
        raise ValueError(f"{path}: {MODEL_CONFIG_KEY} must be a mapping of config fields to values.")
    return settings


def split_config_options(argv: list[str]) -> tuple[list[str], dict[str, Any], list[str]]:
    """Separate ``--model_config.FIELD value`` (or ``=value``) pairs from the other options: the
    one config-field syntax of every ``hf-fusion`` command that builds a model.

    Returns the other options, the config fields (values typed as YAML types them) and the option
    names given (for the record).
    """
    options, config_overrides, given = [], {}, []
    position = 0
    while position < len(argv):
        token = argv[position]
        if not token.startswith("--"):
            options.append(token)
            position += 1
            continue
        name, has_value, inline = token[2:].partition("=")
        if name.startswith(MODEL_CONFIG_KEY + "."):
            field_name = name[len(MODEL_CONFIG_KEY) + 1 :]
            if has_value:
                value = inline
            elif position + 1 < len(argv) and not argv[position + 1].startswith("--"):
                value = argv[position + 1]
                position += 1
            else:
                raise ValueError(f"--{name} needs a value.")
            config_overrides[field_name] = _parse_value(value)
        else:
            options.append(token)
            name = name.replace("-", "_")
            given.append(name[3:] if name.startswith("no_") and name[3:] in _known_fields() else name)
        position += 1
    return options, config_overrides, given


def parse_experiment(config_path: str | Path | None, argv: list[str] | None = None) -> Experiment:
    """Build the three argument dataclasses from a YAML file and command-line overrides.

    Args:
        config_path: Experiment YAML (top-level keys: dataclass fields; ``model_config``: config
            fields of the model family; ``extends``: a base file), or None for command-line
            options only.
        argv: Overrides, ``--key value`` / ``--key=value`` / ``--model_config.FIELD value``.

    Raises:
        ValueError: for an unknown key (naming the closest known one) or a value of the wrong type.
    """
    settings = load_settings(config_path)
    model_config = dict(settings.get(MODEL_CONFIG_KEY) or {})
    defaults = {key: value for key, value in settings.items() if key != MODEL_CONFIG_KEY}
    options, config_overrides, given = split_config_options(list(argv or []))

    parser = HfArgumentParser(ARGUMENT_CLASSES, exit_on_error=False, allow_abbrev=False)
    parser.set_defaults(**defaults)
    try:
        model_args, data_args, training_args, remaining = parser.parse_args_into_dataclasses(
            args=options, return_remaining_strings=True, look_for_args_file=False
        )
    except argparse.ArgumentError as error:
        raise ValueError(f"{error} (see `hf-fusion train --help`)") from error
    if remaining:
        first = next((token for token in remaining if token.startswith("--")), remaining[0])
        raise _unknown_key_error(first.lstrip("-").split("=")[0], "the command line")
    model_config.update(config_overrides)
    model_args.model_config = model_config
    # A config class accepts unknown fields with a warning (transformers' contract); settings a
    # user wrote are refused instead, so a typo never trains a silently different model.
    family = hf_fusion.MODEL_FAMILIES.get(model_args.model_type, hf_fusion.MODEL_FAMILIES["fusion_transformer"])
    unknown = unknown_fields(family[0], model_config)
    if unknown:
        raise ValueError(
            f"model_config has no field {', '.join(unknown)}; the fields are listed in `{family[0].__name__}`'s docstring."
        )

    recorded = dict(defaults)
    for name in given:
        for args in (model_args, data_args, training_args):
            if hasattr(args, name):
                value = getattr(args, name)
                recorded[name] = value.value if isinstance(value, Enum) else value
    if model_config:
        recorded[MODEL_CONFIG_KEY] = model_config
    # A credential is used for the run (training_args.hub_token) but never recorded.
    return Experiment(model_args, data_args, training_args, redact_settings(recorded))
