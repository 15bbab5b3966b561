"""Convert pretrained BART, mBART and Marian checkpoints into hf_fusion models.

With the vanilla config the converted model computes exactly what the source computes: the core
uses BART's checkpoint keys, so conversion is a key-for-key copy plus the config fields that say
where the LayerNorms and positions sit in each architecture. Naming another ``model_type``
retrofits the pretrained model with that family: every parameter the family shares with the
vanilla model is copied, the new ones keep their fresh initialisation (and are listed in the log).

This module is library code, not model code: it is not copied into saved checkpoints.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel

from .configuration_fusion_transformer import SIZE_FIELDS
from .families import MODEL_FAMILIES

logger = logging.getLogger(__name__)

# Per source architecture: the core switches that reproduce it.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "bart": {
        "normalize_before": False,
        "layernorm_embedding": True,
        "add_final_layer_norm": False,
        "position_embedding_type": "learned",
    },
    "mbart": {
        "normalize_before": True,
        "layernorm_embedding": True,
        "add_final_layer_norm": True,
        "position_embedding_type": "learned",
    },
    "marian": {
        "normalize_before": False,
        "layernorm_embedding": False,
        "add_final_layer_norm": False,
        "position_embedding_type": "sinusoidal",
    },
}
COPIED_FIELDS = SIZE_FIELDS + (
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "activation_function",
    "init_std",
    "scale_embedding",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "decoder_start_token_id",
    "forced_eos_token_id",
    "tie_word_embeddings",
)


def _load_source(source: str | PreTrainedModel, **load_kwargs: Any) -> PreTrainedModel:
    if isinstance(source, PreTrainedModel):
        return source
    try:
        return AutoModelForSeq2SeqLM.from_pretrained(source, **load_kwargs)
    except OSError as error:
        raise OSError(
            f"Could not load the source checkpoint {source!r}: give a local folder holding config.json and "
            f"model weights, a Hub model id (with network access), or a model instance. ({error})"
        ) from error


def source_config_fields(source: PreTrainedModel) -> dict[str, Any]:
    """The hf_fusion config fields that reproduce ``source`` (a BART, mBART or Marian model)."""
    config = source.config
    if config.model_type not in ARCHITECTURES:
        raise ValueError(
            f"Cannot convert a {config.model_type!r} model; supported source model types: {', '.join(ARCHITECTURES)}."
        )
    if config.model_type == "marian" and (
        not getattr(config, "share_encoder_decoder_embeddings", True)
        or getattr(config, "decoder_vocab_size", config.vocab_size) != config.vocab_size
    ):
        raise ValueError(
            "This Marian model has separate source and target vocabularies; hf_fusion models share one "
            "embedding across encoder, decoder and output layer, so only shared-vocabulary Marian models convert."
        )
    fields = {name: getattr(config, name) for name in COPIED_FIELDS if hasattr(config, name)}
    fields.update(ARCHITECTURES[config.model_type])
    return fields


def convert_from_pretrained(
    source: str | PreTrainedModel,
    model_type: str = "fusion_transformer",
    load_kwargs: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> PreTrainedModel:
    """Build the hf_fusion model of ``model_type`` equivalent to a pretrained BART/mBART/Marian model.

    Args:
        source: A ``BartForConditionalGeneration``, ``MBartForConditionalGeneration`` or
            ``MarianMTModel`` instance, a local folder, or a Hub model id.
        model_type: The hf_fusion family to build (``fusion_transformer`` = exact equivalent).
        load_kwargs: Passed to ``AutoModelForSeq2SeqLM.from_pretrained`` when ``source`` is a name.
        config_overrides: Config fields of the target family (e.g. ``dropout=0.3``).

    Returns:
        The converted model (in the source's dtype) with the source's generation config.

    Raises:
        ValueError: for an unsupported source or family, or when a source weight has no place
            in the target (e.g. fewer layers requested than the source has).
    """
    if model_type not in MODEL_FAMILIES:
        raise ValueError(f"model_type = {model_type!r} is not an hf_fusion family; allowed: {', '.join(MODEL_FAMILIES)}.")
    source_model = _load_source(source, **(load_kwargs or {}))
    config_class, _, lm_class = MODEL_FAMILIES[model_type]
    config = config_class(**{**source_config_fields(source_model), **config_overrides})
    target = lm_class(config)

    source_state = source_model.state_dict()
    target_state = target.state_dict()
    if config.position_embedding_type == "sinusoidal":
        for side in ("encoder", "decoder"):
            key = f"model.{side}.embed_positions.weight"
            table = source_state.pop(key, None)
            ours = getattr(target.model, side).embed_positions.weight
            if table is not None and not torch.allclose(table.float(), ours[: table.shape[0]], atol=1e-4):
                raise ValueError(f"The source's {key} is not the standard sinusoidal table; it cannot be converted exactly.")
    unexpected = sorted(key for key in source_state if key not in target_state)
    if unexpected:
        raise ValueError(
            f"{len(unexpected)} source weights have no place in the {model_type!r} model (first: {unexpected[:5]}). "
            "To build a model with fewer or shared layers from this one, use hf_fusion's transfer-learning helpers."
        )
    mismatched = [key for key in source_state if source_state[key].shape != target_state[key].shape]
    if mismatched:
        raise ValueError(f"Shape mismatch between source and target for {mismatched[:5]}: check the config overrides.")
    missing = target.load_state_dict(source_state, strict=False).missing_keys
    new_parameters = [key for key in missing if key not in target._tied_weights_keys]
    if new_parameters:
        logger.info("Freshly initialised %s parameters of %r: %s", len(new_parameters), model_type, new_parameters)
    target.tie_weights()
    target.generation_config = source_model.generation_config
    return target.to(source_model.dtype)


def main(argv: list[str] | None = None, config_fields: dict[str, Any] | None = None) -> None:
    """``hf-fusion convert SOURCE OUTPUT [--model_type T] [--model_config.FIELD value ...]``.

    ``hf-fusion`` parses the ``--model_config.FIELD value`` options (one syntax for every command)
    and passes them as ``config_fields``.
    """
    parser = argparse.ArgumentParser(
        prog="hf-fusion convert",
        description="Convert a BART/mBART/Marian checkpoint to an hf_fusion model.",
        epilog="--model_config.FIELD value: a config field of the converted model, as in hf-fusion train.",
    )
    parser.add_argument("source", help="local folder or Hub id of the pretrained model")
    parser.add_argument("output_dir", help="folder to write the converted, self-contained checkpoint to")
    parser.add_argument("--model_type", default="fusion_transformer", help="hf_fusion family to build")
    args = parser.parse_args(argv)
    model = convert_from_pretrained(args.source, args.model_type, **(config_fields or {}))
    model.save_pretrained(args.output_dir)
    try:
        AutoTokenizer.from_pretrained(args.source).save_pretrained(args.output_dir)
    except (OSError, ValueError):
        logger.warning("No tokenizer found at %s; the converted folder holds the model only.", args.source)
    print(f"Converted {args.source} -> {args.output_dir} ({args.model_type}, {model.num_parameters():,} parameters)")


if __name__ == "__main__":
    main()
