"""Transfer learning into shared-layer models: initialise each parameter block from a trained model.

Dabre & Fujita (arXiv 2106.10002) close most of the gap between a recurrently stacked model and a
vanilla one by initialising the shared layer from a trained vanilla model instead of training it
from scratch. Which teacher layer they copy is **unconfirmed**, so the source of every student
block is a choice (``block_source``):

    "mean"         each block = the element-wise mean of the teacher layers it replaces, i.e. of the
                   layers at the depth steps that run this block in the student's execution plan
                   (recurrent stacking: the mean of all layers; ``cycle`` N=6, M=3: block 0 =
                   mean of layers 0 and 3, ...). Needs the student as deep as the teacher.
    int k          every block = teacher layer k (negative counts from the top, -1 = last layer)
    [s_0, s_1..]   block b = teacher layer s_b, or the mean of the layers listed in s_b
    {"encoder": ..., "decoder": ...}   one of the above per stack

Everything that is not a layer (token embeddings, positions, embedding and final LayerNorms, the
output projection and its bias) is copied unchanged. Teacher "layers" are its depth steps, so a
teacher that itself shares layers is read through its own execution plan.

The teacher is an hf_fusion model (instance or checkpoint folder) or a BART/mBART/Marian model,
which is first converted exactly with :func:`hf_fusion.convert.convert_from_pretrained`.

This module is library code, not model code: it is not copied into saved checkpoints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from .configuration_fusion_transformer import FusionTransformerConfig
from .convert import ARCHITECTURES, _load_source, convert_from_pretrained
from .families import MODEL_FAMILIES
from .seams import SEAM_CHOICES

logger = logging.getLogger(__name__)

StackSource = str | int | Sequence[int | Sequence[int]]
BlockSource = StackSource | Mapping[str, StackSource]

STACKS = ("encoder", "decoder")
# Config fields the student inherits from the teacher: the vanilla architecture, not the seams
# (those come from the student's family defaults and the caller) nor the sharing fields.
INHERITED_FIELDS = tuple(
    name
    for name in FusionTransformerConfig.__annotations__
    if name not in SEAM_CHOICES and name not in ("encoder_unique_layers", "decoder_unique_layers")
)
_LAYER_KEY = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(.+)$")


def _teacher_layer(index: Any, depth: int, where: str) -> int:
    """Check one teacher layer index (negative counts from the top) and return it in ``0..depth-1``."""
    if isinstance(index, bool) or not isinstance(index, int) or not -depth <= index < depth:
        raise ValueError(
            f"block_source{where} = {index!r} is not a teacher layer; allowed: an integer from {-depth} to {depth - 1} "
            f"(the teacher stack has {depth} layers)."
        )
    return index % depth


def block_sources(
    plan: Sequence[int], teacher_depth: int, source: StackSource, stack: str = "encoder"
) -> list[tuple[int, ...]]:
    """The teacher layers averaged into each student block of one stack.

    Args:
        plan: The student stack's execution plan (step -> block), from ``sharing.execution_plan``.
        teacher_depth: Number of layers (depth steps) of the teacher's stack.
        source: ``"mean"``, a teacher layer index, or one entry per block (an index or a list of
            indices to average); see the module docstring.
        stack: ``"encoder"`` or ``"decoder"``, for error messages.

    Returns:
        For block ``b`` (list position), the tuple of teacher layer indices whose mean initialises it.

    Raises:
        ValueError: for ``"mean"`` when the student's depth differs from the teacher's (the plan
            then does not say which teacher layers a block replaces), for indices outside the
            teacher, and for a list whose length is not the number of blocks.
    """
    num_blocks = max(plan) + 1
    if isinstance(source, str):
        if source != "mean":
            raise ValueError(f"block_source = {source!r} is not supported; allowed: 'mean', a layer index, or a list.")
        if len(plan) != teacher_depth:
            raise ValueError(
                f"block_source = 'mean' needs the student {stack} as deep as the teacher's ({len(plan)} vs "
                f"{teacher_depth} layers), since each block takes the mean of the teacher layers at the steps "
                "that run it; give a layer index or one index list per block instead."
            )
        return [tuple(step_idx for step_idx, block_idx in enumerate(plan) if block_idx == b) for b in range(num_blocks)]
    if isinstance(source, int):
        return [(_teacher_layer(source, teacher_depth, f" ({stack})"),)] * num_blocks
    if not isinstance(source, Sequence) or len(source) != num_blocks:
        raise ValueError(
            f"block_source for the {stack} must be 'mean', an integer, or a list with one entry per block "
            f"({num_blocks} blocks); got {source!r}."
        )
    sources = []
    for block_idx, entry in enumerate(source):
        where = f"[{block_idx}] ({stack})"
        indices = list(entry) if isinstance(entry, Sequence) and not isinstance(entry, str) else [entry]
        if not indices:
            raise ValueError(f"block_source{where} is empty; give at least one teacher layer.")
        sources.append(tuple(_teacher_layer(index, teacher_depth, where) for index in indices))
    return sources


def _as_fusion_model(teacher: str | os.PathLike | PreTrainedModel, load_kwargs: dict[str, Any]) -> PreTrainedModel:
    """An hf_fusion model equal to ``teacher`` (loaded, and converted if it is BART/mBART/Marian)."""
    model = _load_source(teacher, **load_kwargs)
    if model.config.model_type in MODEL_FAMILIES:
        return model
    if model.config.model_type in ARCHITECTURES:
        return convert_from_pretrained(model)
    raise ValueError(
        f"Cannot transfer from a {model.config.model_type!r} model; allowed teachers: hf_fusion families "
        f"({', '.join(MODEL_FAMILIES)}) and {', '.join(ARCHITECTURES)}."
    )


def transfer_from_pretrained(
    teacher: str | os.PathLike | PreTrainedModel,
    sharing_strategy: str | None = None,
    encoder_unique_layers: int | None = None,
    decoder_unique_layers: int | None = None,
    block_source: BlockSource = "mean",
    model_type: str = "recurrent_stacking",
    load_kwargs: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> PreTrainedModel:
    """Build a shared-layer model initialised from a trained (usually vanilla) seq2seq model.

    Args:
        teacher: An hf_fusion or BART/mBART/Marian model instance, a checkpoint folder, or a Hub id.
        sharing_strategy: The student's execution plan (``None``: the family default, recurrent).
        encoder_unique_layers / decoder_unique_layers: Parameter blocks per student stack
            (``None``: the strategy's default, e.g. 1 for recurrent stacking).
        block_source: Where each block's initial weights come from: ``"mean"``, a teacher layer
            index, a list with one entry per block, or ``{"encoder": ..., "decoder": ...}``.
        model_type: The hf_fusion family of the student.
        load_kwargs: Passed to ``AutoModelForSeq2SeqLM.from_pretrained`` when ``teacher`` is a name.
        config_overrides: Further student config fields (e.g. ``dropout=0.1``, ``encoder_layers=12``);
            by default the student has the teacher's architecture (width, depth, heads, norms, ...).

    Returns:
        The student model, in the teacher's dtype, with the teacher's generation config.

    Raises:
        ValueError: for an unknown family or teacher type, an invalid sharing configuration (from
            the config's validation), an invalid ``block_source``, or student layer weights that
            have no counterpart in the teacher (a different layer type or width).
    """
    if model_type not in MODEL_FAMILIES:
        raise ValueError(
            f"model_type = {model_type!r} is not an hf_fusion family; allowed: {', '.join(MODEL_FAMILIES)}."
        )
    teacher_model = _as_fusion_model(teacher, load_kwargs or {})
    teacher_config = teacher_model.config
    sharing = {
        key: value
        for key, value in (
            ("sharing_strategy", sharing_strategy),
            ("encoder_unique_layers", encoder_unique_layers),
            ("decoder_unique_layers", decoder_unique_layers),
        )
        if value is not None
    }
    config_class, _, lm_class = MODEL_FAMILIES[model_type]
    inherited = {name: getattr(teacher_config, name) for name in INHERITED_FIELDS if hasattr(teacher_config, name)}
    config = config_class(**{**inherited, **sharing, **config_overrides})
    student = lm_class(config)

    per_stack = block_source if isinstance(block_source, Mapping) else {stack: block_source for stack in STACKS}
    if set(per_stack) != set(STACKS):
        raise ValueError(
            f"block_source as a mapping needs exactly the keys 'encoder' and 'decoder'; got {sorted(per_stack)}."
        )
    teacher_state = {key: tensor.float() for key, tensor in teacher_model.state_dict().items()}
    sources: dict[str, list[tuple[int, ...]]] = {}
    teacher_blocks: dict[str, tuple[int, ...]] = {}
    for stack in STACKS:
        teacher_depth = getattr(teacher_config, f"{stack}_layers")
        teacher_blocks[stack] = getattr(teacher_config, f"{stack}_plan")
        sources[stack] = block_sources(getattr(config, f"{stack}_plan"), teacher_depth, per_stack[stack], stack)
        logger.info("Student %s blocks <- teacher layers: %s", stack, sources[stack])

    new_state = {}
    fresh = []
    for key, target in student.state_dict().items():
        layer = _LAYER_KEY.match(key)
        if layer:
            stack, block_idx, name = layer.group(1), int(layer.group(2)), layer.group(3)
            parts = []
            for step_idx in sources[stack][block_idx]:
                teacher_key = f"model.{stack}.layers.{teacher_blocks[stack][step_idx]}.{name}"
                if teacher_key not in teacher_state or teacher_state[teacher_key].shape != target.shape:
                    raise ValueError(
                        f"The student's {key} {tuple(target.shape)} has no counterpart {teacher_key} of the same shape in "
                        "the teacher: transfer needs the same layer type and widths (check depth_connection and the "
                        "*_ffn_dim / d_model overrides)."
                    )
                parts.append(teacher_state[teacher_key])
            new_state[key] = torch.stack(parts).mean(dim=0).to(target.dtype)
        elif key in teacher_state and teacher_state[key].shape == target.shape:
            new_state[key] = teacher_state[key].to(target.dtype)
        else:
            new_state[key] = target
            fresh.append(key)
    if fresh:
        logger.info(
            "Freshly initialised %d parameters of %r (no teacher counterpart): %s", len(fresh), model_type, fresh
        )
    left_behind = sorted(key for key in teacher_state if not _LAYER_KEY.match(key) and key not in new_state)
    if left_behind:
        logger.warning(
            "%d teacher weights have no place in the student and were not copied: %s", len(left_behind), left_behind
        )
    student.load_state_dict(new_state, strict=True)
    student.tie_weights()
    student.generation_config = teacher_model.generation_config
    return student.to(teacher_model.dtype)


def _parse_block_source(value: str) -> BlockSource:
    """CLI value -> block source: ``mean``, an integer, or JSON (a list, or an encoder/decoder mapping)."""
    if value == "mean":
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(
            f"--block_source {value!r}: use 'mean', an integer, or JSON such as '[0, [2, 3]]'."
        ) from error


def main(argv: list[str] | None = None, config_fields: dict[str, Any] | None = None) -> None:
    """``hf-fusion transfer TEACHER OUTPUT [--sharing_strategy S] [--encoder_unique_layers M] ...
    [--model_config.FIELD value ...]``; ``config_fields`` as in :func:`hf_fusion.convert.main`."""
    parser = argparse.ArgumentParser(
        prog="hf-fusion transfer",
        description="Build a shared-layer hf_fusion model initialised from a trained model (transfer learning).",
        epilog="--model_config.FIELD value: a config field of the student, as in hf-fusion train.",
    )
    parser.add_argument("teacher", help="folder or Hub id of the trained model (hf_fusion, BART, mBART or Marian)")
    parser.add_argument("output_dir", help="folder to write the student checkpoint to")
    parser.add_argument("--model_type", default="recurrent_stacking", help="hf_fusion family of the student")
    parser.add_argument("--sharing_strategy", default=None, help="recurrent, sequence, cycle or cycle_rev")
    parser.add_argument("--encoder_unique_layers", type=int, default=None, help="parameter blocks in the encoder")
    parser.add_argument("--decoder_unique_layers", type=int, default=None, help="parameter blocks in the decoder")
    parser.add_argument(
        "--block_source",
        type=_parse_block_source,
        default="mean",
        help="'mean' (default), a teacher layer index, or JSON: a list with one entry per block, "
        'or {"encoder": ..., "decoder": ...}',
    )
    args = parser.parse_args(argv)

    model = transfer_from_pretrained(
        args.teacher,
        sharing_strategy=args.sharing_strategy,
        encoder_unique_layers=args.encoder_unique_layers,
        decoder_unique_layers=args.decoder_unique_layers,
        block_source=args.block_source,
        model_type=args.model_type,
        **(config_fields or {}),
    )
    model.save_pretrained(args.output_dir)
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(args.teacher).save_pretrained(args.output_dir)
    except (OSError, ValueError):
        logger.warning("No tokenizer found at %s; the student folder holds the model only.", args.teacher)
    config = model.config
    print(
        f"Transferred {args.teacher} -> {args.output_dir} ({args.model_type}, {config.sharing_strategy}: "
        f"encoder {config.encoder_layers} steps / {config.encoder_unique_layers} blocks, decoder "
        f"{config.decoder_layers} steps / {config.decoder_unique_layers} blocks, {model.num_parameters():,} parameters)"
    )


if __name__ == "__main__":
    main()
