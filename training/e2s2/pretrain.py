"""``hf-fusion pretrain-e2s2``: pretrain a seq2seq model on monolingual text with E2S2 or plain
BART denoising.

    hf-fusion pretrain-e2s2 --model fusion_transformer --tokenizer TOK_DIR \\
        --train_files corpus.txt --output_dir runs/e2s2 --max_steps 1000 [--objective bart] \\
        [--model_config.FIELD value ...]

``--model`` is an hf_fusion (or any registered) ``model_type`` built fresh with the tokenizer's
vocabulary size and special ids (``--model_config.d_model 256 --model_config.encoder_layers 3``,
the config-field syntax of ``hf-fusion train``), or a folder: a checkpoint (hf_fusion, or a stock
BART) continues pretraining, a folder holding only a config builds that config fresh. Text comes
from text files (one text per line) or from a column of a dataset (a Hub name, or a folder written
by ``save_to_disk``); empty and too-short texts are dropped with a count in the log. Every other
option is a ``TrainingArguments`` option (``--output_dir``, ``--max_steps``, ``--save_steps``,
``--learning_rate``, ``--resume_from_checkpoint PATH|last``, ...). Checkpoints and the final
``--output_dir`` load as the plain model for fine-tuning (the E2S2 heads sit beside it in
``e2s2_heads.safetensors``).

``--recipe NAME`` starts from a preset, ``training/configs/presets/e2s2_NAME.yaml`` (``paper``: the
authors' continued-pretraining recipe; ``small``: a CPU-sized run), or from any YAML file of the
same form: its keys are options of this command (``model_config:`` holds config fields), and every
option given on the command line wins over the recipe. Without ``--recipe`` the defaults are
Hugging Face's (lr 5e-5, linear decay, no warmup), which is not the paper's setting.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import yaml
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
    set_seed,
)

import hf_fusion  # noqa: F401  (registers the hf_fusion model types with the Auto classes)

from ..arguments import MODEL_CONFIG_KEY, split_config_options
from ..tokenizer import check_tokenizer_fits, config_fields_for
from .collator import OBJECTIVES, E2S2DataCollator
from .model import E2S2ForPreTraining
from .trainer import E2S2Trainer

logger = logging.getLogger(__name__)
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "presets"
RECIPE_PREFIX = "e2s2_"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class PretrainArguments:
    """What to pretrain, on which text, with which objective (the rest is ``TrainingArguments``)."""

    model: str = field(metadata={"help": "A model_type (e.g. fusion_transformer, bart) or a checkpoint/config folder."})
    tokenizer: str = field(metadata={"help": "Tokenizer folder (needs a mask and a pad token)."})
    objective: str = field(default="e2s2", metadata={"help": "e2s2 or bart (plain span-masking denoising).", "choices": OBJECTIVES})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow checkpoints that ship their own code."})
    train_files: list[str] | None = field(default=None, metadata={"help": "Text files, one text per line."})
    dataset: str | None = field(default=None, metadata={"help": "A datasets Hub name or a save_to_disk folder."})
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of --dataset."})
    dataset_split: str = field(default="train", metadata={"help": "Split of --dataset."})
    text_column: str = field(default="text", metadata={"help": "Column of --dataset holding the text."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N usable texts."})
    max_length: int = field(default=256, metadata={"help": "Truncate texts to this many tokens."})
    min_tokens: int = field(default=3, metadata={"help": "Drop texts with fewer content tokens."})
    mask_ratio: float = field(default=0.15, metadata={"help": "Share of tokens covered by masked spans."})
    poisson_lambda: float = field(default=3.0, metadata={"help": "Mean masked span length."})
    shuffle_ratio: float = field(default=0.05, metadata={"help": "E2S2: share of tokens that centre a shuffled trigram."})
    replace_ratio: float = field(default=0.15, metadata={"help": "E2S2: share of remaining tokens replaced at random."})
    lambda_de: float = field(default=0.05, metadata={"help": "E2S2: weight of the denoising loss."})
    lambda_cl: float = field(default=0.05, metadata={"help": "E2S2: weight of the contrastive loss."})
    temperature: float = field(default=1.0, metadata={"help": "E2S2: NT-Xent temperature."})
    nll_weight: float = field(default=0.5, metadata={"help": "E2S2: weight of each of the two NLL terms."})
    denoising_classes: int = field(
        default=3,
        metadata={
            "help": "E2S2: 3 trains original/shuffled/replaced; 2 reproduces the official code, whose ignore "
            "index drops the shuffled positions.",
            "choices": [3, 2],
        },
    )
    pack_texts: bool = field(
        default=False,
        metadata={
            "help": "Join consecutive texts into blocks of up to --max_length tokens, never splitting a text "
            "(fairseq's --sample-break-mode complete), instead of one example per text."
        },
    )
    recipe: str | None = field(
        default=None,
        metadata={
            "help": f"Start from a preset: a name ({RECIPE_PREFIX}NAME.yaml in training/configs/presets, e.g. "
            "paper or small) or a YAML file; command-line options win over it."
        },
    )


def recipe_path(recipe: str) -> Path:
    """The YAML file of ``--recipe``: an existing file, or the preset ``e2s2_<recipe>.yaml``."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ValueError(f"--recipe {recipe!r}: no such file.")
        return path
    preset = PRESET_DIR / f"{RECIPE_PREFIX}{recipe}.yaml"
    if not preset.is_file():
        names = sorted(file.stem[len(RECIPE_PREFIX) :] for file in PRESET_DIR.glob(f"{RECIPE_PREFIX}*.yaml"))
        raise ValueError(f"--recipe {recipe!r} is not a preset; allowed: {', '.join(names)}, or a YAML file.")
    return preset


def load_recipe(path: Path) -> dict[str, Any]:
    """A recipe file's settings, every key checked to be an option of the command (a typo must not
    silently leave a paper value at its default)."""
    settings = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(settings, dict) or not isinstance(settings.get(MODEL_CONFIG_KEY, {}), dict):
        # ValueError, not TypeError: the CLI reports it as a bad option (exit status 2).
        raise ValueError(f"{path} must hold a mapping of option names to values ({MODEL_CONFIG_KEY}: a mapping).")  # noqa: TRY004
    known = {f.name for cls in (PretrainArguments, TrainingArguments) for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(settings) - known - {MODEL_CONFIG_KEY})
    if unknown:
        raise ValueError(f"{path}: {', '.join(map(repr, unknown))} is no option of `hf-fusion pretrain-e2s2`.")
    return settings


def _recipe_option(options: list[str]) -> str | None:
    """The value of ``--recipe`` in ``options`` (read before parsing: the recipe sets the defaults)."""
    for position, token in enumerate(options):
        if token == "--recipe" and position + 1 < len(options):
            return options[position + 1]
        if token.startswith("--recipe="):
            return token.split("=", 1)[1]
    return None


def parse_pretrain_arguments(
    argv: Sequence[str],
) -> tuple[PretrainArguments, TrainingArguments, dict[str, Any]]:
    """``argv`` -> the command's arguments and the config-field overrides, with ``--recipe``'s
    settings as defaults under the command line. Parses only: no file but the recipe is read.

    Raises:
        ValueError: for an unknown recipe, or a recipe key that is no option of the command.
    """
    options, overrides, _ = split_config_options(list(argv))
    parser = HfArgumentParser((PretrainArguments, TrainingArguments), prog="hf-fusion pretrain-e2s2")
    recipe = _recipe_option(options)
    if recipe is not None:
        settings = load_recipe(recipe_path(recipe))
        overrides = {**settings.pop(MODEL_CONFIG_KEY, {}), **overrides}
        parser.set_defaults(**settings)
    args, training_args = parser.parse_args_into_dataclasses(args=options)
    return args, training_args, overrides


def pack_texts(texts: Sequence[str], lengths: Sequence[int], budget: int) -> list[str]:
    """Join consecutive texts (with a space) into blocks of at most ``budget`` content tokens,
    never splitting a text: fairseq's ``--sample-break-mode complete``, which the E2S2 recipe uses
    for its 1,024-token blocks. A text longer than the budget stays a block of its own (and is
    truncated by the collator)."""
    blocks: list[str] = []
    current: list[str] = []
    used = 0
    for text, length in zip(texts, lengths):
        if current and used + length > budget:
            blocks.append(" ".join(current))
            current, used = [], 0
        current.append(text)
        used += length
    if current:
        blocks.append(" ".join(current))
    return blocks


def load_texts(args: PretrainArguments) -> datasets.Dataset:
    """The training texts as a one-column (``text``) dataset, empty texts dropped."""
    if bool(args.train_files) == bool(args.dataset):
        raise ValueError("Give exactly one of --train_files or --dataset.")
    if args.train_files:
        texts = []
        for path in args.train_files:
            lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
            lines = [line for line in lines if line]
            if not lines:
                raise ValueError(f"--train_files: {path} has no non-empty line.")
            texts.extend(lines)
        return datasets.Dataset.from_dict({"text": texts})
    if Path(args.dataset).is_dir():
        loaded = datasets.load_from_disk(args.dataset)
        if isinstance(loaded, datasets.DatasetDict):
            if args.dataset_split not in loaded:
                raise ValueError(f"--dataset_split {args.dataset_split!r} not in {args.dataset}; splits: {list(loaded)}.")
            loaded = loaded[args.dataset_split]
    else:
        loaded = datasets.load_dataset(args.dataset, args.dataset_config, split=args.dataset_split)
    if args.text_column not in loaded.column_names:
        raise ValueError(f"--text_column {args.text_column!r} is not a column of {args.dataset}; columns: {loaded.column_names}.")
    loaded = loaded.select_columns([args.text_column]).rename_column(args.text_column, "text")
    return loaded.filter(lambda batch: [isinstance(t, str) and bool(t.strip()) for t in batch["text"]], batched=True)


def build_backbone(
    args: PretrainArguments, tokenizer: PreTrainedTokenizerBase, overrides: dict[str, Any]
) -> PreTrainedModel:
    """A fresh model of a ``model_type`` sized to the tokenizer, or a model/config from a folder;
    ``overrides`` (the ``--model_config.FIELD value`` options) set config fields of either."""
    path = Path(args.model)
    if path.exists():
        if any((path / name).is_file() for name in WEIGHT_FILES):
            return AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=args.trust_remote_code, **overrides)
        config = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code, **overrides)
        return AutoModelForSeq2SeqLM.from_config(config, trust_remote_code=args.trust_remote_code)
    try:
        config = AutoConfig.for_model(args.model, **{**config_fields_for(tokenizer), **overrides})
    except ValueError as error:
        if "Unrecognized model identifier" not in str(error):
            raise
        raise ValueError(
            f"--model {args.model!r} is neither an existing folder nor a known model_type; hf_fusion types: "
            f"{', '.join(hf_fusion.MODEL_FAMILIES)} (or any transformers model_type such as 'bart')."
        ) from None
    return AutoModelForSeq2SeqLM.from_config(config)


def check_model_fits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
    """Refuse a tokenizer/model pair that would fail (or silently mis-train) inside forward."""
    check_tokenizer_fits(tokenizer, model.config)
    if getattr(model.config, "decoder_start_token_id", None) is None:
        raise ValueError("config.decoder_start_token_id is None; set it to the eos id (BART's convention).")
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and max_length > max_positions:
        raise ValueError(f"--max_length {max_length} exceeds the model's max_position_embeddings = {max_positions}.")


def pretrain(argv: Sequence[str] | None = None) -> E2S2Trainer:
    """Parse ``argv`` (default ``sys.argv[1:]``), pretrain, save to ``--output_dir``; return the
    Trainer (its state holds the logged loss terms)."""
    args, training_args, overrides = parse_pretrain_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # The collator reads the raw text column, which the Trainer would otherwise drop.
    training_args.remove_unused_columns = False
    set_seed(training_args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    collator = E2S2DataCollator(
        tokenizer,
        objective=args.objective,
        mask_ratio=args.mask_ratio,
        poisson_lambda=args.poisson_lambda,
        shuffle_ratio=args.shuffle_ratio,
        replace_ratio=args.replace_ratio,
        max_length=args.max_length,
        min_tokens=args.min_tokens,
        seed=training_args.seed,
    )
    texts = load_texts(args)
    total = len(texts)
    texts = texts.filter(
        lambda batch: [n >= args.min_tokens for n in collator.content_lengths(batch["text"])], batched=True
    )
    if args.max_train_samples is not None:
        texts = texts.select(range(min(args.max_train_samples, len(texts))))
    logger.info("%d usable texts (%d dropped as shorter than %d tokens).", len(texts), total - len(texts), args.min_tokens)
    if len(texts) == 0:
        raise ValueError(f"No text has at least --min_tokens {args.min_tokens} tokens.")
    if args.pack_texts:
        budget = args.max_length - collator.boundary_tokens(texts[0]["text"])
        lengths = collator.content_lengths(texts["text"])
        texts = datasets.Dataset.from_dict({"text": pack_texts(texts["text"], lengths, budget)})
        logger.info("Packed into %d blocks of up to %d tokens.", len(texts), args.max_length)

    backbone = build_backbone(args, tokenizer, overrides)
    check_model_fits(backbone, tokenizer, args.max_length)
    model = backbone
    if args.objective == "e2s2":
        model = E2S2ForPreTraining(
            backbone,
            lambda_de=args.lambda_de,
            lambda_cl=args.lambda_cl,
            temperature=args.temperature,
            nll_weight=args.nll_weight,
            denoising_classes=args.denoising_classes,
        )
    trainer = E2S2Trainer(
        model=model, args=training_args, train_dataset=texts, data_collator=collator, processing_class=tokenizer
    )
    resume = training_args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "last" else resume)
    backbone.config.use_cache = True
    trainer.save_model()
    trainer.save_state()
    return trainer

