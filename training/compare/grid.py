"""A comparison grid: variants x seeds x corpora x budgets, read from one YAML file.

Every cell of the grid is an ordinary ``hf-fusion train`` run of the grid's experiment file with
the same overrides except the ones that define the variant, so that variants differ in nothing but
their model (same data, tokenizer recipe, batches, schedule and step budget). A variant may start
from another variant's trained model of the same seed (``transfer``: ``hf-fusion transfer``) or
train on its sequence-level distillation outputs (``distill``), which makes it depend on that cell, or be pretrained first on the training text of
its cell (``pretrain``: ``hf-fusion pretrain-e2s2`` with E2S2's or BART's objective), then fine-tuned.

A cell's identity is a hash of everything that decides its outcome: the *fully resolved* model
config (the family's config class filled with the grid's fields, so that a changed family default
changes the hash), every data and training argument after parsing (again with the code's defaults
filled in), the transfer/distillation recipe and the hash of the teacher cell. A result recorded
under another hash is stale and the cell runs again.

The YAML format (``benchmarks/grids/*.yaml`` are the shipped grids)::

    name: cpu_claims                      # results go to benchmarks/results/claims/<name>/
    config: training/configs/default.yaml # the experiment file every cell starts from
    seeds: [0, 1, 2]
    corpora: [ding]                       # built-in corpus names (the `dataset` option)
    budgets:                              # a budget = the overrides that set the compute
      - {name: s720, overrides: {max_steps: 720, warmup_steps: 240}}
    overrides: {report_to: none, model_config: {d_model: 128}}   # every cell
    baseline: vanilla                     # paired tests are against this variant
    variants:
      - {name: vanilla, model_type: fusion_transformer}
      - {name: rs_transfer, model_type: recurrent_stacking, model_config: {sharing_strategy: recurrent},
         transfer: {teacher: vanilla, block_source: mean}}
      - {name: rs_kd, model_type: recurrent_stacking, distill: {teacher: vanilla}}
      - {name: e2s2, model_type: fusion_transformer, pretrain: {objective: e2s2, max_steps: 300}}
    claims: [...]                         # see training/compare/report.py
    analyses:                             # analyses of the trained models (training/compare/analyses.py)
      - {id: x0_upper, paper: P, claim: ..., kind: fusion_weights, variant: fine_grained}
      - {id: closer, paper: P, claim: ..., kind: embedding_similarity, a: surface_fusion, b: vanilla}

A grid may start from another (``extends: cpu_claims.yaml``, relative to the file): its own keys
replace the base's, and ``variant_overrides: {variant: {key: value}}`` changes the overrides of
inherited variants (e.g. the step budget of the deep models at another scale), so a preset at
another scale restates only its scale, never the variants and claims.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hf_fusion.configuration_fusion_transformer import FUSION_DROPOUT_DEFAULTS

from .stats import CLAIM_KINDS

GRID_KEYS = (
    "name", "description", "config", "seeds", "corpora", "budgets", "overrides", "baseline", "variants",
    "claims", "analyses", "keep_checkpoints", "extends", "variant_overrides",
)
VARIANT_KEYS = ("name", "model_type", "model_config", "overrides", "transfer", "distill", "pretrain", "description")
TRANSFER_KEYS = ("teacher", "block_source")
DISTILL_KEYS = ("teacher", "num_beams", "batch_size")
PRETRAIN_KEYS = ("objective", "max_steps", "batch_size", "learning_rate")
PRETRAIN_OBJECTIVES = ("e2s2", "bart")
ANALYSIS_KEYS = ("id", "paper", "claim", "paper_number", "kind", "variant", "a", "b", "metric", "rule", "margin",
                 "settings")
# Arguments that say where a run writes, not what it computes: left out of the cell's hash.
NOT_HASHED = {
    "output_dir", "export_dir", "logging_dir", "run_name", "resume_from_checkpoint", "hub_token", "hub_model_id",
    "overwrite_output_dir", "disable_tqdm", "report_to", "plot_training_curves", "logging_steps", "push_to_hub",
    "data_cache_dir", "preprocessing_num_workers", "dataloader_num_workers",
}
# Where the repository's grids and results live (relative to the repository root).
REPO_ROOT = Path(__file__).resolve().parents[2]


class GridError(ValueError):
    """A grid file that cannot be run: the message names the field and the allowed values."""


@dataclass(frozen=True)
class AnalysisKind:
    """What an analysis kind reads and reports, for the grid's checks (the computation is in
    ``training/compare/analyses.py``).

    ``roles``: the variant fields an entry names, ``("variant",)`` for an analysis of one model
    per seed or ``("a", "b")`` for one that pairs two variants' models of the same seed.
    ``metrics``: the per-seed effects it can test, the first the default; a claim holds when the
    effect is above ``null`` (0 for a difference, 1 for a ratio). ``settings``: the measurement
    options with their defaults (``None``: the analysis' own default), all in the cache key.
    """

    roles: tuple[str, ...]
    metrics: tuple[str, ...]
    settings: dict[str, Any]
    ratio: bool = False

    @property
    def null(self) -> float:
        return 1.0 if self.ratio else 0.0


ANALYSIS_KINDS = {
    "fusion_weights": AnalysisKind(("variant",), ("x0_margin", "x0_upper_minus_lower"), {"upper_layers": None}),
    "layer_masking": AnalysisKind(("variant",), ("loss", "bleu"), {"bleu_sentences": None, "batch_size": 32}),
    "embedding_similarity": AnalysisKind(("a", "b"), ("gap", "aligned_cos", "p_at_1"), {"lexicon": None}),
    "decoding_speed": AnalysisKind(
        ("a", "b"), ("sentences_per_s", "tokens_per_s"),
        {"sentences": 200, "num_beams": None, "batch_size": 32, "rounds": 3, "max_length": 128}, ratio=True,
    ),
}
# The type of each setting whose default is None (the others take their default's type). None
# means: the top half of the decoder (upper_layers), every test sentence (bleu_sentences), the
# Ding dictionary (lexicon), the beam the cells were evaluated with (num_beams).
ANALYSIS_SETTING_TYPES = {"upper_layers": int, "bleu_sentences": int, "lexicon": str, "num_beams": int}


@dataclass(frozen=True)
class Analysis:
    """One analysis row of the grid: a claim about trained models, tested per seed.

    ``variants`` are the variants it reads (one, or the pair ``a``, ``b``); ``metric`` the
    per-seed effect the verdict reads, with ``rule`` and ``margin`` as a claim's kind and margin
    (``training/compare/stats.py``); ``settings`` the measurement options, defaults filled in.
    """

    id: str
    kind: str
    paper: str
    claim: str
    variants: tuple[str, ...]
    metric: str
    rule: str = "greater"
    margin: float = 0.0
    paper_number: str = ""
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Variant:
    """One model of the comparison: a family, its config fields and, optionally, a teacher."""

    name: str
    model_type: str
    model_config: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    transfer: dict[str, Any] | None = None
    distill: dict[str, Any] | None = None
    pretrain: dict[str, Any] | None = None
    description: str = ""

    @property
    def teacher(self) -> str | None:
        """The variant whose trained cell (same seed, corpus, budget) this one starts from."""
        for recipe in (self.transfer, self.distill):
            if recipe:
                return recipe["teacher"]
        return None


@dataclass(frozen=True)
class Budget:
    """The compute of a cell: a name and the training overrides that set it (``max_steps``...)."""

    name: str
    overrides: dict[str, Any]


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    variant: Variant
    seed: int
    corpus: str
    budget: Budget

    @property
    def key(self) -> str:
        return f"{self.variant.name}/{self.corpus}/{self.budget.name}/seed{self.seed}"

    @property
    def slug(self) -> str:
        """The key as one file name."""
        return self.key.replace("/", "__")


@dataclass
class Grid:
    """A parsed grid file."""

    name: str
    config: Path
    seeds: list[int]
    corpora: list[str]
    budgets: list[Budget]
    overrides: dict[str, Any]
    baseline: str
    variants: list[Variant]
    claims: list[dict[str, Any]] = field(default_factory=list)
    analyses: list[Analysis] = field(default_factory=list)
    keep_checkpoints: list[str] = field(default_factory=list)
    description: str = ""
    path: Path | None = None

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise GridError(f"no variant {name!r}; variants: {', '.join(v.name for v in self.variants)}.")

    def cells(self) -> list[Cell]:
        """Every cell, in run order: corpus, budget, then the variants in the file's order (so the
        order of the file is the order of the claims' priority), then the seeds."""
        return [
            Cell(variant, seed, corpus, budget)
            for corpus in self.corpora
            for budget in self.budgets
            for variant in self.variants
            for seed in self.seeds
        ]

    def cell(self, variant: str, seed: int, corpus: str, budget: Budget) -> Cell:
        return Cell(self.variant(variant), seed, corpus, budget)


def _check_keys(mapping: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(mapping, dict):
        raise GridError(f"{where} must be a mapping, not {type(mapping).__name__}.")
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise GridError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(allowed)}.")
    return mapping


def _read_raw(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """The grid file's keys with its ``extends`` chain resolved and ``variant_overrides`` applied."""
    if not path.is_file():
        raise FileNotFoundError(f"grid file {str(path)!r} does not exist.")
    raw = _check_keys(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, GRID_KEYS, str(path))
    base_name = raw.pop("extends", None)
    changes = raw.pop("variant_overrides", None) or {}
    if not isinstance(changes, dict):
        raise GridError(f"{path}: variant_overrides must map variant names to overrides.")
    if base_name is not None:
        base_path = path.parent / str(base_name)
        if base_path.resolve() in {link.resolve() for link in (*chain, path)}:
            raise GridError(f"{path}: extends {base_name!r} makes a cycle.")
        raw = {**_read_raw(base_path, (*chain, path)), **raw}
    if changes:
        variants = [dict(variant) for variant in raw.get("variants", [])]
        names = [variant.get("name") for variant in variants]
        for name, overrides in changes.items():
            if name not in names:
                raise GridError(f"{path}: variant_overrides names {name!r}, which is not a variant ({', '.join(map(str, names))}).")
            variant = variants[names.index(name)]
            variant["overrides"] = {**(variant.get("overrides") or {}), **(overrides or {})}
        raw["variants"] = variants
    return raw


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file.

    Raises:
        GridError: a missing or unknown field, a duplicate variant, a teacher that is not an
            earlier variant, a baseline that is not a variant.
    """
    path = Path(path)
    raw = _read_raw(path, ())
    for required in ("name", "config", "seeds", "corpora", "budgets", "baseline", "variants"):
        if required not in raw:
            raise GridError(f"{path}: the field {required!r} is required.")
    config = Path(raw["config"])
    if not config.is_absolute():
        config = REPO_ROOT / config
    if not config.is_file():
        raise GridError(f"{path}: config {raw['config']!r} does not exist (a path relative to the repository root).")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(seed, int) for seed in seeds):
        raise GridError(f"{path}: seeds must be a non-empty list of integers, not {seeds!r}.")
    if len(set(seeds)) != len(seeds):
        raise GridError(f"{path}: seeds repeat: {seeds}.")
    budgets = []
    for entry in raw["budgets"]:
        entry = _check_keys(entry, ("name", "overrides"), f"{path}: budgets")
        budgets.append(Budget(str(entry["name"]), dict(entry.get("overrides") or {})))
    variants: list[Variant] = []
    for entry in raw["variants"]:
        entry = _check_keys(entry, VARIANT_KEYS, f"{path}: variant {entry.get('name', '?')!r}")
        name = entry.get("name")
        if not name or "/" in str(name):
            raise GridError(f"{path}: every variant needs a name without '/', got {name!r}.")
        if any(variant.name == name for variant in variants):
            raise GridError(f"{path}: variant {name!r} appears twice.")
        if "model_type" not in entry:
            raise GridError(f"{path}: variant {name!r} needs a model_type.")
        recipes = {}
        for recipe, allowed in (("transfer", TRANSFER_KEYS), ("distill", DISTILL_KEYS)):
            value = entry.get(recipe)
            if value is None:
                continue
            value = _check_keys(value, allowed, f"{path}: variant {name!r} {recipe}")
            teacher = value.get("teacher")
            if teacher not in [variant.name for variant in variants]:
                raise GridError(
                    f"{path}: variant {name!r} {recipe}.teacher = {teacher!r} must name an earlier variant "
                    f"({', '.join(v.name for v in variants) or 'none yet'})."
                )
            recipes[recipe] = dict(value)
        if entry.get("pretrain") is not None:
            pretrain = _check_keys(entry["pretrain"], PRETRAIN_KEYS, f"{path}: variant {name!r} pretrain")
            if pretrain.get("objective") not in PRETRAIN_OBJECTIVES or not isinstance(pretrain.get("max_steps"), int):
                raise GridError(
                    f"{path}: variant {name!r} pretrain needs objective ({', '.join(PRETRAIN_OBJECTIVES)}) and "
                    f"max_steps (an integer), got {pretrain}."
                )
            if recipes:
                raise GridError(f"{path}: variant {name!r}: pretrain cannot be combined with transfer or distill.")
            recipes["pretrain"] = dict(pretrain)
        if recipes.get("transfer") and recipes.get("distill") and (
            recipes["transfer"]["teacher"] != recipes["distill"]["teacher"]
        ):
            raise GridError(f"{path}: variant {name!r}: transfer and distill must name the same teacher.")
        variants.append(
            Variant(
                name=str(name),
                model_type=str(entry["model_type"]),
                model_config=dict(entry.get("model_config") or {}),
                overrides=dict(entry.get("overrides") or {}),
                description=str(entry.get("description", "")),
                **recipes,
            )
        )
    grid = Grid(
        name=str(raw["name"]),
        config=config,
        seeds=seeds,
        corpora=[str(corpus) for corpus in raw["corpora"]],
        budgets=budgets,
        overrides=dict(raw.get("overrides") or {}),
        baseline=str(raw["baseline"]),
        variants=variants,
        claims=list(raw.get("claims") or []),
        analyses=[],
        keep_checkpoints=list(raw.get("keep_checkpoints") or []),
        description=str(raw.get("description", "")),
        path=path,
    )
    grid.variant(grid.baseline)  # the baseline must be a variant
    for name in grid.keep_checkpoints:
        grid.variant(name)
    grid.analyses = _parse_analyses(raw.get("analyses") or [], grid, path)
    return grid


def _parse_analyses(entries: Any, grid: Grid, path: Path) -> list[Analysis]:
    """The ``analyses:`` entries, checked: a unique ``id``, a known ``kind``, the variant fields
    of that kind naming variants, a metric, rule and settings the kind allows."""
    if not isinstance(entries, list):
        raise GridError(f"{path}: analyses must be a list of mappings, not {type(entries).__name__}.")
    analyses: list[Analysis] = []
    for entry in entries:
        where = f"{path}: analysis {entry.get('id', '?') if isinstance(entry, dict) else '?'!r}"
        entry = _check_keys(entry, ANALYSIS_KEYS, where)
        for required in ("id", "paper", "claim", "kind"):
            if not entry.get(required):
                raise GridError(f"{where}: the field {required!r} is required.")
        if any(analysis.id == entry["id"] for analysis in analyses):
            raise GridError(f"{where}: the id appears twice.")
        kind = ANALYSIS_KINDS.get(entry["kind"])
        if kind is None:
            raise GridError(f"{where}: kind = {entry['kind']!r} is not supported; allowed: {', '.join(ANALYSIS_KINDS)}.")
        for role in ("variant", "a", "b"):
            if role in kind.roles and role not in entry:
                raise GridError(f"{where}: kind {entry['kind']!r} needs {' and '.join(kind.roles)} (variant names).")
            if role not in kind.roles and role in entry:
                raise GridError(f"{where}: kind {entry['kind']!r} takes {' and '.join(kind.roles)}, not {role!r}.")
        variants = tuple(str(entry[role]) for role in kind.roles)
        for role, name in zip(kind.roles, variants):
            if name not in [variant.name for variant in grid.variants]:
                raise GridError(f"{where}: {role} = {name!r} is not a variant; variants: "
                                f"{', '.join(variant.name for variant in grid.variants)}.")
        metric = entry.get("metric", kind.metrics[0])
        if metric not in kind.metrics:
            raise GridError(f"{where}: metric = {metric!r} is not one of kind {entry['kind']!r}'s; allowed: "
                            f"{', '.join(kind.metrics)}.")
        rule = entry.get("rule", "greater")
        if rule not in CLAIM_KINDS:
            raise GridError(f"{where}: rule = {rule!r} is not supported; allowed: {', '.join(CLAIM_KINDS)}.")
        margin = entry.get("margin", 0.0)
        if not isinstance(margin, (int, float)) or isinstance(margin, bool) or margin < 0:
            raise GridError(f"{where}: margin must be a number >= 0, got {margin!r}.")
        settings = dict(kind.settings)
        for name, value in _check_keys(entry.get("settings") or {}, tuple(kind.settings), f"{where} settings").items():
            wanted = ANALYSIS_SETTING_TYPES.get(name) or type(kind.settings[name])
            if value is not None and (not isinstance(value, wanted) or isinstance(value, bool)
                                      or (wanted is int and value < 1)):
                raise GridError(f"{where}: settings.{name} = {value!r} must be "
                                f"{'an integer >= 1' if wanted is int else 'a ' + wanted.__name__} or null.")
            settings[name] = value
        analyses.append(Analysis(
            id=str(entry["id"]), kind=str(entry["kind"]), paper=str(entry["paper"]), claim=str(entry["claim"]),
            variants=variants, metric=metric, rule=rule, margin=float(margin),
            paper_number=str(entry.get("paper_number", "")), settings=settings,
        ))
    return analyses


# --- a cell as an `hf-fusion train` command line ---------------------------------------------------
def _option_tokens(name: str, value: Any) -> list[str]:
    if isinstance(value, list):
        return [f"--{name}", *(str(item) for item in value)]
    if isinstance(value, bool):
        return [f"--{name}", "true" if value else "false"]
    if isinstance(value, (dict, tuple)):
        return [f"--{name}", json.dumps(value)]
    return [f"--{name}", "none" if value is None else str(value)]


def override_tokens(overrides: dict[str, Any]) -> list[str]:
    """``{key: value, model_config: {field: value}}`` as ``--key value --model_config.field value``."""
    tokens: list[str] = []
    for key, value in overrides.items():
        if key == "model_config":
            for config_field, config_value in (value or {}).items():
                tokens += _option_tokens(f"model_config.{config_field}", config_value)
        else:
            tokens += _option_tokens(key, value)
    return tokens


def merged_overrides(grid: Grid, cell: Cell) -> dict[str, Any]:
    """The overrides of a cell, later ones winning: grid, budget, variant (``model_config`` merged
    field by field), then what the cell fixes (seed, corpus, model type)."""
    merged: dict[str, Any] = {}
    for layer in (grid.overrides, cell.budget.overrides, cell.variant.overrides,
                  {"model_config": cell.variant.model_config}):
        for key, value in layer.items():
            if key == "model_config":
                merged["model_config"] = {**merged.get("model_config", {}), **(value or {})}
            else:
                merged[key] = value
    merged.update(seed=cell.seed, dataset=cell.corpus, model_type=cell.variant.model_type)
    return merged


# A seam's option fields (by prefix) and the seam choice that reads them: while the seam is set to
# something else the fields change nothing the model computes.
SEAM_OPTIONS = {
    "dlstm_": lambda config: config.get("depth_connection") == "depthwise_lstm",
    "surface_fusion_": lambda config: config.get("output_head") == "surface_fusion",
    "fusion_": lambda config: config.get("encoder_memory") in FUSION_DROPOUT_DEFAULTS,
}
# Bookkeeping a saved config.json carries that is not a setting.
CONFIG_BOOKKEEPING = {"transformers_version", "architectures", "auto_map", "_name_or_path", "dtype", "torch_dtype"}


def effective_model_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config fields that can change what a model computes: the options of a seam the model
    does not use are left out, so that a new option of one seam (a new field with its default)
    does not make every recorded cell of the other families stale."""
    return {
        key: value
        for key, value in config.items()
        if key not in CONFIG_BOOKKEEPING
        and all(active(config) for prefix, active in SEAM_OPTIONS.items() if key.startswith(prefix))
    }


def settings_of(experiment: Any, config: dict[str, Any]) -> dict[str, Any]:
    """The hashed settings of a parsed experiment whose model config is ``config`` (a config dict
    as the family's config class builds or loads it)."""
    model = {key: value for key, value in dataclasses.asdict(experiment.model).items() if key != "model_config"}
    training = {key: value for key, value in experiment.training.to_dict().items() if key not in NOT_HASHED}
    data = {key: value for key, value in dataclasses.asdict(experiment.data).items() if key not in NOT_HASHED}
    return {"model_config": effective_model_config(config), "model": model, "data": data, "training": training}


def resolved_settings(grid: Grid, cell: Cell) -> dict[str, Any]:
    """What decides the cell's outcome, with the code's defaults filled in: the model config as the
    family's config class builds it (its effective fields), and every data/training argument as the
    parser fills it."""
    from transformers import AutoConfig

    import hf_fusion  # noqa: F401 -- registers the families with AutoConfig

    from ..arguments import parse_experiment

    experiment = parse_experiment(grid.config, override_tokens(merged_overrides(grid, cell)))
    config = AutoConfig.for_model(experiment.model.model_type, **experiment.model.model_config).to_dict()
    return settings_of(experiment, config)


# Config fields the pipeline takes from the trained tokenizer (training/tokenizer.py,
# ``config_fields_for``): a grid's settings do not fix them, the corpus and vocabulary size do.
TOKENIZER_FIELDS = {"vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"}


def same_run_settings(recorded: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a finished run's settings (:func:`trained_settings`) are the ones a cell asks for
    now (:func:`resolved_settings`), the tokenizer-derived config fields aside."""

    def comparable(settings: dict[str, Any]) -> dict[str, Any]:
        config = {key: value for key, value in settings["model_config"].items() if key not in TOKENIZER_FIELDS}
        return json.loads(json.dumps({**settings, "model_config": config}, sort_keys=True, default=str))

    return comparable(recorded) == comparable(wanted)


def trained_settings(run_dir: Path) -> dict[str, Any] | None:
    """The settings a finished run folder was trained with, read by the current code: the saved
    ``final/config.json`` (loaded by the family's config class, so fields it predates get the
    values its model was trained with) and the run's ``final/experiment.yaml``. ``None`` when the
    folder lacks either file."""
    from transformers import AutoConfig

    import hf_fusion  # noqa: F401 -- registers the families with AutoConfig

    from ..arguments import parse_experiment

    final = run_dir / "final"
    if not (final / "config.json").is_file() or not (final / "experiment.yaml").is_file():
        return None
    experiment = parse_experiment(final / "experiment.yaml", [])
    return settings_of(experiment, AutoConfig.from_pretrained(final).to_dict())


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def cell_hash(grid: Grid, cell: Cell, _memo: dict[str, str] | None = None) -> str:
    """The cell's identity (see the module docstring); a teacher's hash is part of its students'."""
    memo = {} if _memo is None else _memo
    if cell.key in memo:
        return memo[cell.key]
    payload: dict[str, Any] = {"settings": resolved_settings(grid, cell)}
    if cell.variant.pretrain:
        payload["pretrain"] = cell.variant.pretrain
    if cell.variant.teacher:
        teacher = grid.cell(cell.variant.teacher, cell.seed, cell.corpus, cell.budget)
        payload.update(
            teacher=cell_hash(grid, teacher, memo), transfer=cell.variant.transfer, distill=cell.variant.distill
        )
    memo[cell.key] = _digest(payload)
    return memo[cell.key]
