"""Configuration of the hf_fusion seq2seq Transformer core.

One config class describes the vanilla encoder-decoder (enough to express BART, mBART and Marian
exactly) plus one string key per *seam* where a model family changes it:

    execution plan    ``sharing_strategy`` + ``encoder_unique_layers`` / ``decoder_unique_layers``
    depth connection  ``depth_connection``
    encoder memory    ``encoder_memory``
    output head       ``output_head``
    auxiliary losses  (reported in the model output's ``loss_terms``; E2S2 wraps the model)

Family configs (EncoderFusion, SurfaceFusion, ...) subclass this one and only change
``model_type`` and defaults, so every family accepts every core option and the families compose:
"SurfaceFusion on a recurrently stacked model" is a config, not a fork.

Everything is validated when the config is built, so a bad value fails with the field name and
the allowed values instead of deep inside ``forward``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from collections.abc import Iterable
from typing import Any

from transformers import GenerationConfig, PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.utils import logging

from .seams import SEAM_CHOICES
from .sharing import execution_plan

logger = logging.get_logger(__name__)

POSITION_EMBEDDING_TYPES = ("learned", "sinusoidal")
# The sizes of the network: positive integers, named as in BART's config.
SIZE_FIELDS = (
    "vocab_size",
    "d_model",
    "encoder_layers",
    "decoder_layers",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "max_position_embeddings",
)
# Per layer-fusion memory: the ``fusion_dropout`` a config gets when it leaves the field unset
# (Lingvo's transparent-merger default; the 0.3 of all of Liu et al.'s experiments).
FUSION_DROPOUT_DEFAULTS: dict[str, float] = {"transparent": 0.1, "fine_grained": 0.3}
# The fields only a fusing encoder memory reads (``None`` = that memory's default).
FUSION_FIELDS = ("fusion_dropout", "fusion_embedding_layer_norm", "fusion_top_layer_norm", "fusion_double_embedding_dropout")
# Options of the depth-wise LSTM connection (``depth_connection = "depthwise_lstm"``).
DLSTM_DECODER_MODES = ("per_sublayer", "concat")
DLSTM_GATE_NORMS = ("per_gate", "joint")
DLSTM_ACTIVATIONS = ("relu", "gelu", "tanh")
DLSTM_CANDIDATES = ("linear", "ffn")
SURFACE_FUSION_MODES = ("hard", "soft")
SURFACE_FUSION_SOURCES = ("attention", "mean", "max")


def legacy_field_values(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Values for fields added after checkpoints were first published, chosen so that a model
    saved before a field existed still computes what it computed then.

    ``save_pretrained`` writes every field, so a saved ``config.json`` without one of these keys
    predates it; a config built in code gets the new (authors') defaults instead.
    """
    legacy: dict[str, Any] = {"dlstm_attention_residual": False}
    if config_dict.get("encoder_memory") in FUSION_DROPOUT_DEFAULTS:
        legacy.update(fusion_top_layer_norm=True, fusion_double_embedding_dropout=False)
    return {key: value for key, value in legacy.items() if key not in config_dict}


def check_choice(cls_name: str, field: str, value: Any, choices: Iterable[Any]) -> None:
    """Refuse ``value`` unless it is one of ``choices``, naming the field and the choices."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{cls_name}.{field} = {value!r} is not supported; allowed values: {', '.join(map(repr, choices))}.")


def check_range(
    cls_name: str,
    field: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Refuse a number outside ``[low, high]`` (bounds optional, open or closed), naming the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{cls_name}.{field} must be a number, got {value!r}.")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"{cls_name}.{field} = {value!r} is out of range; allowed: {interval}.")


def check_positive_int(cls_name: str, field: str, value: Any) -> None:
    """Refuse anything but an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{cls_name}.{field} must be a positive integer, got {value!r}.")


# Keyword arguments a config may receive that are not fields of the dataclasses: what
# PreTrainedConfig itself consumes (legacy names, loading bookkeeping, generation parameters that
# older config.json files carry and it drops) and what save_pretrained writes besides the fields.
PRETRAINED_CONFIG_KWARGS = frozenset(
    {
        "auto_map", "model_type", "torch_dtype", "num_labels", "name_or_path", "_name_or_path", "_commit_hash",
        "output_attentions", "attn_implementation", "experts_implementation", "per_layer_config",
        "use_return_dict", "rope_scaling", "rope_theta",
        *GenerationConfig._get_default_generation_params(),
    }
)
# Fields of other seq2seq configs (BART, Marian) that these models do not read but that converted
# or hand-written configs commonly carry; accepted and ignored, as BART ignores them on inference.
IGNORED_BART_FIELDS = frozenset(
    {"encoder_layerdrop", "decoder_layerdrop", "classifier_dropout", "num_labels", "gradient_checkpointing",
     "share_encoder_decoder_embeddings", "decoder_vocab_size", "normalize_embedding", "static_position_embeddings",
     "add_bias_logits", "extra_pos_embeddings", "do_blenderbot_90_layernorm"}
)


def unknown_fields(config_class: type, names: Iterable[str]) -> list[str]:
    """The names among ``names`` that are no field of ``config_class``, each with the closest
    field name when there is one: ``["'encoder_layer' (did you mean 'encoder_layers'?)"]``."""
    known = {field.name for field in dataclasses.fields(config_class)} | set(config_class.attribute_map)
    described = []
    for name in sorted(set(names) - known - PRETRAINED_CONFIG_KWARGS - IGNORED_BART_FIELDS):
        close = difflib.get_close_matches(name, sorted(known), n=1)
        described.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return described


def warn_unknown_fields(config_class: type, kwargs: dict[str, Any]) -> None:
    """Warn about keyword arguments that are no field of ``config_class``.

    A warning, not an error, because transformers' configs accept extra attributes by contract
    (generic tooling sets them, e.g. every epsilon name a model might use); the training tool, which
    reads user-written settings, refuses them outright (``training/arguments.py``).
    """
    unknown = unknown_fields(config_class, kwargs)
    if unknown:
        logger.warning(
            "%s has no field %s; the value is stored but no model reads it.", config_class.__name__, ", ".join(unknown)
        )


def _matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits a field's annotation (ints are not bools; a float field takes ints)."""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_matches(element, item) for element in value)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, annotation)


def check_field_types(config: PreTrainedConfig) -> None:
    """Check every field hf_fusion declares against its annotation: ``normalize_before: "false"``
    (a string) must not build a pre-norm model.

    Raises:
        ValueError: naming the field, the value and the expected type.
    """
    hints: dict[str, Any] = {}
    for cls in reversed(type(config).__mro__):  # a family's annotation overrides the core's
        if isinstance(cls, type) and issubclass(cls, FusionTransformerConfig):
            hints.update(inspect.get_annotations(cls, eval_str=True))
    for name, hint in hints.items():
        value = getattr(config, name)
        if not _matches(value, hint):
            expected = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
            raise ValueError(f"{type(config).__name__}.{name} = {value!r} has the wrong type; expected {expected}.")


class FusionTransformerConfig(PreTrainedConfig):
    r"""Configuration of [`FusionTransformerModel`] and its family variants.

    Field names follow BART so that converted checkpoints and HF tooling read them unchanged.

    Args:
        vocab_size: Size of the shared source/target vocabulary.
        d_model: Width of every layer.
        encoder_layers / decoder_layers: Depth of each stack, i.e. the number of *steps* executed;
            with parameter sharing fewer parameter blocks back those steps.
        encoder_attention_heads / decoder_attention_heads: Heads per attention; must divide d_model.
        encoder_ffn_dim / decoder_ffn_dim: Inner width of the feed-forward sub-layers.
        max_position_embeddings: Longest sequence a stack accepts; longer inputs raise a ValueError.
        dropout / attention_dropout / activation_dropout: Dropout probabilities in [0, 1).
        activation_function: Feed-forward activation, any key of ``transformers.activations.ACT2FN``.
        init_std: Standard deviation of the normal initialisation.
        scale_embedding: Multiply token embeddings by sqrt(d_model) (Marian, mBART).
        normalize_before: Pre-norm residual sub-layers (mBART) instead of post-norm (BART, Marian).
        position_embedding_type: ``"learned"`` (BART's table with its offset of 2) or
            ``"sinusoidal"`` (Marian's fixed table, not stored in checkpoints).
        layernorm_embedding: LayerNorm after token + position embeddings (BART, mBART).
        add_final_layer_norm: LayerNorm at the top of each stack (pre-norm models such as mBART).
        layer_norm_eps: Epsilon of every LayerNorm.
        label_smoothing: Label smoothing of the model's own loss. The loss lives in the model (not
            in the Trainer's label smoother) because output heads such as SurfaceFusion define a
            loss over several distributions that a logits-only smoother would get wrong.
        sharing_strategy: Execution plan, which parameter block each depth step runs:
            ``"none"`` (one block per step), ``"recurrent"`` (one block for every step), or
            Takase & Kiyono's ``"sequence"``, ``"cycle"``, ``"cycle_rev"``.
        encoder_unique_layers / decoder_unique_layers: Number of parameter blocks per stack.
            ``None`` means one per step for ``"none"`` and 1 for ``"recurrent"``; the other
            strategies need it set explicitly.
        depth_connection: How sub-layer outputs join the running state: ``"residual"``;
            ``"dlcl"``: each layer's input is a learned linear combination of all earlier layers'
            outputs (Wang et al. 2019), in encoder and decoder; or ``"depthwise_lstm"`` (Xu et al.,
            arXiv 2007.06257: an LSTM across depth replaces the residual stream, LayerNorms and
            feed-forward; see ``depthwise_lstm.py``).
        dlstm_decoder_mode: Depth-wise LSTM decoder wiring: ``"concat"`` (default, the authors'
            dual-input cell: one step on both sub-layers' outputs concatenated) or
            ``"per_sublayer"`` (one LSTM step after self-attention, another after cross-attention).
        dlstm_gate_norm: LayerNorm of the LSTM pre-activations: ``"joint"`` (default: all of them
            together, as the authors' cells do) or ``"per_gate"`` (each gate, and the ``"linear"``
            candidate, normalised on its own over d).
        dlstm_activation: Activation of the LSTM candidate (the feed-forward's role): ``"tanh"``
            (default, the authors' signed activation), ``"gelu"`` or ``"relu"``.
        dlstm_attention_residual: Wrap each attention sub-layer in a pre-norm residual on the
            normalised input, ``LN(x) + dropout(Attn(LN(x)))``, as the authors' implementation does
            (default); ``False`` is the paper's "pure attention" ``dropout(Attn(x))``.
        dlstm_candidate: How the LSTM candidate is computed: ``"linear"`` (``act(LN(W x + b))``,
            the single projection of the equations in ``depthwise_lstm.py``) or ``"ffn"``
            (``W_2 act(LN(W_1 x + b_1)) + b_2`` with
            inner width ``encoder_ffn_dim`` / ``decoder_ffn_dim``, as Neutron's cell does).
        encoder_memory: What each decoder layer's cross-attention reads (``"last"``: the top
            encoder layer, as in vanilla seq2seq; ``"transparent"``: a softmax-weighted sum of all
            encoder layers per decoder layer, Bapna et al. 2018; ``"fine_grained"``: the same with
            one weight per dimension, Liu et al. 2021).
        fusion_dropout: Dropout on the layer-fusion weights before their softmax (DropConnect), and
            for ``"fine_grained"`` also on the fused memory. ``None`` means the memory's default:
            0.1 for ``"transparent"`` (Lingvo), 0.3 for ``"fine_grained"`` (the paper). Only valid
            with a fusing ``encoder_memory``.
        fusion_embedding_layer_norm: LayerNorm on the embedding layer before it is fused. ``None``
            means the memory's default: on for ``"transparent"``; for ``"fine_grained"`` on in
            post-norm models only, as in the official code. Only valid with a fusing ``encoder_memory``.
        fusion_top_layer_norm: Whether the top encoder layer X^N enters the fusion after the
            encoder's final LayerNorm (only models with ``add_final_layer_norm`` have one). ``None``
            means the memory's default: after it for ``"transparent"`` (X^N is then the encoder
            output, as for every other reader), before it for ``"fine_grained"`` (the official
            code fuses the raw top state). Only valid with a fusing ``encoder_memory``.
        fusion_double_embedding_dropout: ``"fine_grained"`` only: drop out the fused embedding
            layer X^0 twice, as the official code does (once with the encoder's embedding dropout,
            once more before the LayerNorm), instead of once. ``None`` means on for
            ``"fine_grained"`` (the official behaviour), off for ``"transparent"``, whose X^0 is
            the embedding layer output the encoder already dropped out.
        output_head: How the top decoder state becomes logits (``"lm"``: the tied LM head;
            ``"surface_fusion"``: Liu et al.'s SurfaceFusion head, see ``surface_fusion.py``).
        surface_fusion_mode: SurfaceFusion's fusion of the target and source distributions:
            ``"hard"`` (log P = lambda log p_tgt + (1 - lambda) log p_src) or ``"soft"``
            (log P = log_softmax(l_tgt + log_softmax(tau l_src))).
        surface_fusion_lambda: Weight of the target distribution in hard fusion, in [0, 1]
            (reference recipe: 0.8); ``None`` learns a per-position gate sigmoid(w . [h; r]).
            Read in hard mode only.
        surface_fusion_tau: Temperature on the source logits in soft fusion, > 0. Read in soft
            mode only.
        surface_fusion_heads: Heads of the surface attention; must divide d_model (paper: 1).
        surface_fusion_ffn: Pass both the decoder state and the surface state through one shared
            residual ReLU feed-forward network before the output projection (paper: on).
        surface_fusion_source: How the surface state r is read from the source embeddings:
            ``"attention"`` (the paper's surface attention) or the official code's ablations
            ``"mean"`` / ``"max"`` (the mean or maximum of the source embeddings over the source
            tokens, the same r for every target position).
        surface_fusion_linear: The official code's linear variant: a separate bias-free d x d
            projection of the target and of the surface state before the output projection.
        surface_fusion_query_layer: Decoder step (0-based) whose state queries the surface
            attention; ``None`` (default) is the top step, as in the paper (the official code's
            ``--sf-idx``). Read with ``surface_fusion_source="attention"`` only.
    """

    model_type = "fusion_transformer"
    keys_to_ignore_at_inference = ["past_key_values"]
    # The key/value cache is sized by ``num_hidden_layers``: one slot per *decoder step*.
    attribute_map = {
        "num_attention_heads": "encoder_attention_heads",
        "hidden_size": "d_model",
        "num_hidden_layers": "decoder_layers",
    }

    # --- the vanilla Transformer -----------------------------------------------------------
    vocab_size: int = 32000
    d_model: int = 512
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 8
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_ffn_dim: int = 2048
    max_position_embeddings: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    activation_function: str = "gelu"
    init_std: float = 0.02
    scale_embedding: bool = False
    normalize_before: bool = False
    position_embedding_type: str = "learned"
    layernorm_embedding: bool = True
    add_final_layer_norm: bool = False
    layer_norm_eps: float = 1e-5
    label_smoothing: float = 0.0
    use_cache: bool = True
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    decoder_start_token_id: int | None = 2
    forced_eos_token_id: int | list[int] | None = None

    # --- seam 1: execution plan (cross-layer parameter sharing) -----------------------------
    sharing_strategy: str = "none"
    encoder_unique_layers: int | None = None
    decoder_unique_layers: int | None = None

    # --- seam 2: depth connection ------------------------------------------------------------
    depth_connection: str = "residual"
    dlstm_decoder_mode: str = "concat"
    dlstm_gate_norm: str = "joint"
    dlstm_activation: str = "tanh"
    dlstm_candidate: str = "linear"
    dlstm_attention_residual: bool = True

    # --- seam 3: encoder memory --------------------------------------------------------------
    encoder_memory: str = "last"
    fusion_dropout: float | None = None
    fusion_embedding_layer_norm: bool | None = None
    fusion_top_layer_norm: bool | None = None
    fusion_double_embedding_dropout: bool | None = None

    # --- seam 4: output head -----------------------------------------------------------------
    output_head: str = "lm"
    surface_fusion_mode: str = "hard"
    surface_fusion_lambda: float | None = 0.8
    surface_fusion_tau: float = 1.0
    surface_fusion_heads: int = 1
    surface_fusion_ffn: bool = True
    surface_fusion_source: str = "attention"
    surface_fusion_linear: bool = False
    surface_fusion_query_layer: int | None = None

    @property
    def encoder_plan(self) -> tuple[int, ...]:
        """The encoder's execution plan, the parameter block each encoder step runs (seam 1).
        A property, not a field, so it never goes stale or into config.json; ``execution_plan``
        caches it."""
        return self._plan("encoder")

    @property
    def decoder_plan(self) -> tuple[int, ...]:
        """The decoder's execution plan, the parameter block each decoder step runs (seam 1)."""
        return self._plan("decoder")

    def _plan(self, stack: str) -> tuple[int, ...]:
        field = f"{stack}_unique_layers"
        return execution_plan(
            self.sharing_strategy, getattr(self, f"{stack}_layers"), getattr(self, field), field=f"{type(self).__name__}.{field}"
        )

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> FusionTransformerConfig:
        """Load a saved config; fields it predates get the values that keep its model unchanged
        (:func:`legacy_field_values`)."""
        return super().from_dict({**config_dict, **legacy_field_values(config_dict)}, **kwargs)

    def __post_init__(self, **kwargs: Any) -> None:
        warn_unknown_fields(type(self), kwargs)
        check_field_types(self)
        self.validate_fields()
        super().__post_init__(**kwargs)

    def validate_fields(self) -> None:
        """Check every field; raise ValueError naming the field and what is allowed."""
        name = type(self).__name__
        for field in SIZE_FIELDS:
            check_positive_int(name, field, getattr(self, field))
        self._check_token_ids(name)
        for field in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, field):
                raise ValueError(
                    f"{name}.d_model = {self.d_model} must be divisible by {field} = {getattr(self, field)}; "
                    f"allowed {field}: divisors of {self.d_model}."
                )
        for field in ("dropout", "attention_dropout", "activation_dropout"):
            check_range(name, field, getattr(self, field), 0.0, 1.0, high_inclusive=False)
        check_range(name, "label_smoothing", self.label_smoothing, 0.0, 1.0, high_inclusive=False)
        check_range(name, "init_std", self.init_std, 0.0, None, low_inclusive=False)
        check_range(name, "layer_norm_eps", self.layer_norm_eps, 0.0, None, low_inclusive=False)
        check_choice(name, "activation_function", self.activation_function, sorted(ACT2FN.keys()))
        check_choice(name, "position_embedding_type", self.position_embedding_type, POSITION_EMBEDDING_TYPES)
        if self.position_embedding_type == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"{name}.d_model = {self.d_model} must be even for sinusoidal positions.")
        for field, choices in SEAM_CHOICES.items():
            check_choice(name, field, getattr(self, field), choices)
        check_choice(name, "dlstm_decoder_mode", self.dlstm_decoder_mode, DLSTM_DECODER_MODES)
        check_choice(name, "dlstm_gate_norm", self.dlstm_gate_norm, DLSTM_GATE_NORMS)
        check_choice(name, "dlstm_activation", self.dlstm_activation, DLSTM_ACTIVATIONS)
        check_choice(name, "dlstm_candidate", self.dlstm_candidate, DLSTM_CANDIDATES)
        if self.depth_connection == "depthwise_lstm" and self.normalize_before:
            # The LSTM cell normalises its own pre-activations; a pre-norm flag would silently do nothing.
            raise ValueError(
                f"{name}.normalize_before = True has no meaning with depth_connection='depthwise_lstm' "
                "(the LSTM cell normalises its own pre-activations); allowed: False."
            )
        self._check_surface_fusion(name)
        self._resolve_unique_layers(name)
        self._resolve_fusion_fields(name)

    def _check_token_ids(self, name: str) -> None:
        """Every special token id is an index into the vocabulary (or ``None``); an id outside it
        would otherwise fail deep inside an embedding lookup or a generation step."""
        for field in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "forced_eos_token_id"):
            value = getattr(self, field)
            for token_id in value if isinstance(value, list) else [value]:
                if token_id is not None and not 0 <= token_id < self.vocab_size:
                    raise ValueError(
                        f"{name}.{field} = {value!r} is not a token id of the vocabulary; allowed: 0 to "
                        f"vocab_size - 1 = {self.vocab_size - 1}, or None."
                    )

    def _resolve_fusion_fields(self, name: str) -> None:
        """Fill in the layer-fusion defaults of the chosen memory; refuse them without fusion."""
        if self.encoder_memory not in FUSION_DROPOUT_DEFAULTS:
            for field in FUSION_FIELDS:
                if getattr(self, field) is not None:
                    raise ValueError(
                        f"{name}.{field} = {getattr(self, field)!r} has no effect with encoder_memory = "
                        f"{self.encoder_memory!r}; allowed: None, or set encoder_memory to one of "
                        f"{', '.join(map(repr, FUSION_DROPOUT_DEFAULTS))}."
                    )
            return
        if self.fusion_dropout is None:
            self.fusion_dropout = FUSION_DROPOUT_DEFAULTS[self.encoder_memory]
        fine_grained = self.encoder_memory == "fine_grained"
        if self.fusion_top_layer_norm is None:
            self.fusion_top_layer_norm = not fine_grained
        if self.fusion_double_embedding_dropout is None:
            self.fusion_double_embedding_dropout = fine_grained
        if self.fusion_double_embedding_dropout and not fine_grained:
            raise ValueError(
                f"{name}.fusion_double_embedding_dropout = True needs encoder_memory = 'fine_grained' "
                f"(got {self.encoder_memory!r}); allowed: False or None."
            )
        check_range(name, "fusion_dropout", self.fusion_dropout, 0.0, 1.0, high_inclusive=False)
        if self.fusion_embedding_layer_norm is None:
            self.fusion_embedding_layer_norm = self.encoder_memory == "transparent" or not self.normalize_before
        if not isinstance(self.fusion_embedding_layer_norm, bool):
            raise ValueError(
                f"{name}.fusion_embedding_layer_norm = {self.fusion_embedding_layer_norm!r} is not supported; "
                "allowed values: True, False, None."
            )

    def _check_surface_fusion(self, name: str) -> None:
        """Check the SurfaceFusion head's fields (always, so a bad value never waits in a config)."""
        check_choice(name, "surface_fusion_mode", self.surface_fusion_mode, SURFACE_FUSION_MODES)
        lam = self.surface_fusion_lambda
        if lam is not None and (
            isinstance(lam, bool) or not isinstance(lam, (int, float)) or math.isnan(lam) or not 0.0 <= lam <= 1.0
        ):
            raise ValueError(
                f"{name}.surface_fusion_lambda = {lam!r} is not supported; allowed: a number in [0, 1], "
                "or None for a learned gate."
            )
        check_range(name, "surface_fusion_tau", self.surface_fusion_tau, 0.0, None, low_inclusive=False)
        check_positive_int(name, "surface_fusion_heads", self.surface_fusion_heads)
        if self.d_model % self.surface_fusion_heads:
            raise ValueError(
                f"{name}.surface_fusion_heads = {self.surface_fusion_heads} must divide d_model = {self.d_model}; "
                f"allowed: divisors of {self.d_model}."
            )
        check_choice(name, "surface_fusion_source", self.surface_fusion_source, SURFACE_FUSION_SOURCES)
        layer = self.surface_fusion_query_layer
        if layer is not None and not 0 <= layer < self.decoder_layers:
            raise ValueError(
                f"{name}.surface_fusion_query_layer = {layer!r} is not a decoder step; allowed: 0 to "
                f"decoder_layers - 1 = {self.decoder_layers - 1}, or None for the top step."
            )

    def _resolve_unique_layers(self, name: str) -> None:
        """Fill in and check the number of parameter blocks of each stack for the sharing strategy."""
        for stack in ("encoder", "decoder"):
            field = f"{stack}_unique_layers"
            depth = getattr(self, f"{stack}_layers")
            value = getattr(self, field)
            if value is None:
                if self.sharing_strategy == "none":
                    value = depth
                elif self.sharing_strategy == "recurrent":
                    value = 1
                else:
                    raise ValueError(
                        f"{name}.{field} must be set for sharing_strategy={self.sharing_strategy!r}; "
                        f"allowed: an integer from 1 to {stack}_layers = {depth}."
                    )
            check_positive_int(name, field, value)
            if value > depth:
                raise ValueError(
                    f"{name}.{field} = {value} exceeds the depth {stack}_layers = {depth}; allowed: 1 to {depth}."
                )
            if self.sharing_strategy == "none" and value != depth:
                raise ValueError(
                    f"{name}.{field} = {value} needs a sharing_strategy other than 'none' "
                    f"(with 'none' it must equal {stack}_layers = {depth})."
                )
            if self.sharing_strategy == "recurrent" and value != 1:
                raise ValueError(f"{name}.{field} = {value} contradicts sharing_strategy='recurrent'; allowed: 1.")
            setattr(self, field, value)
        # A schedule the layer counts do not admit is refused now, not at model build time; the
        # plans are computed here once (execution_plan is cached) and the stacks read them.
        for stack in ("encoder", "decoder"):
            self._plan(stack)
