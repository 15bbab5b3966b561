"""EncoderFusion's layer-masking ablation (Liu et al., ICLR 2021, arXiv 2012.14768).

Liu et al. take a trained EncoderFusion model and, at inference only, remove one encoder layer
from what the decoder fuses; the translation quality drops most when the removed layer is X^0, the
embedding layer. That finding is what motivates SurfaceFusion (fuse the embeddings directly, at the
output softmax).

How a layer is removed here: its fusion logit is set to -inf before the softmax, so it gets weight
0 and the remaining layers' weights renormalise among themselves. For transparent attention that
is row n of ``W`` (``(N + 1, M)``, every decoder step); for fine-grained layer attention it is
``W[:, n, :]`` (every decoder step and dimension). :func:`masked_encoder_layers` does it from
outside the model (the weights are edited under ``torch.no_grad`` and restored bit for bit
afterwards), so the model code is untouched and the same model serves every row of the table.

Only in eval mode: with ``fusion_dropout`` active, DropConnect could zero a masked logit and put
the layer back in.

Command line::

    python -m hf_fusion.analysis.layer_masking CHECKPOINT --corpus ding --max_sentences 500 --output masking.md
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.evaluate_file import TestSet

from .common import (
    add_sample_arguments,
    check_table_path,
    encode_sample,
    load_checkpoint,
    quality,
    run_command,
    sample_from_args,
    write_table,
)

# encoder_memory -> the axis of the fusion weight W that indexes encoder layers (0 = X^0).
LAYER_AXIS = {"transparent": 0, "fine_grained": 1}


def layer_name(layer: int) -> str:
    return "X^0 (embedding)" if layer == 0 else f"X^{layer}"


@contextmanager
def masked_encoder_layers(model: PreTrainedModel, layers: Sequence[int]) -> Iterator[None]:
    """Within the block, the fused encoder memory ignores the encoder layers ``layers`` (0 = X^0):
    their logits in W are -inf, so the other layers' weights renormalise. W is restored exactly on
    exit, also after an exception.

    Args:
        model: An hf_fusion model in eval mode whose ``encoder_memory`` is ``transparent`` or
            ``fine_grained``.
        layers: Encoder layer indices in ``0..encoder_layers``; at least one layer must remain.

    Raises:
        ValueError: for a model without a fused memory, a model in training mode, an index out of
            range, or masking every layer.
    """
    config = model.config
    if config.encoder_memory not in LAYER_AXIS:
        raise ValueError(
            f"encoder_memory = {config.encoder_memory!r} fuses no encoder layers; layer masking needs one of "
            f"{', '.join(map(repr, LAYER_AXIS))}."
        )
    if model.training:
        raise ValueError("Layer masking needs the model in eval mode (model.eval()): DropConnect would unmask layers.")
    count = config.encoder_layers + 1
    bad = [layer for layer in layers if not 0 <= layer < count]
    if bad:
        raise ValueError(f"masked layers {bad} are out of range; allowed: 0 (the embedding layer) to {count - 1}.")
    if len(set(layers)) == count:
        raise ValueError("Masking every encoder layer leaves nothing to fuse; keep at least one.")
    weight = model.base_model.decoder.memory.weight
    saved = weight.detach().clone()
    index = [slice(None)] * weight.dim()
    index[LAYER_AXIS[config.encoder_memory]] = list(layers)
    try:
        with torch.no_grad():
            weight[tuple(index)] = float("-inf")
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def layer_masking_ablation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sample: TestSet,
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
) -> list[dict[str, Any]]:
    """The test loss, BLEU and chrF of the model with nothing masked, then with each of ``layers``
    masked alone.

    Args:
        model / tokenizer: An EncoderFusion-style model (transparent or fine-grained memory).
        sample: The parallel test sentences.
        layers: Encoder layers to mask one at a time (default: every layer, X^0 first).
        batch_size: Sentences per batch of the teacher-forced loss.
        max_length: Longest greedy translation (default: the model's generation config).

    Returns:
        One row per setting: ``masked`` (``"none"`` or the layer), ``loss``, ``bleu``, ``chrf``,
        and ``delta_loss`` / ``delta_bleu`` against the unmasked model.
    """
    model.eval()
    batches = encode_sample(model, tokenizer, sample, batch_size)
    layers = range(model.config.encoder_layers + 1) if layers is None else layers
    base = quality(model, tokenizer, sample, batches, max_length)
    rows = [{"masked": "none", **base, "delta_loss": 0.0, "delta_bleu": 0.0}]
    for layer in layers:
        with masked_encoder_layers(model, [layer]):
            scores = quality(model, tokenizer, sample, batches, max_length)
        rows.append({
            "masked": layer_name(layer), **scores,
            "delta_loss": scores["loss"] - base["loss"], "delta_bleu": scores["bleu"] - base["bleu"],
        })
    return rows


def main(argv: list[str] | None = None) -> Path:
    """``python -m hf_fusion.analysis.layer_masking CHECKPOINT (--test_file F | --corpus C) --output T``."""
    parser = argparse.ArgumentParser(description="EncoderFusion layer-masking ablation: mask one encoder layer "
                                     "from the fusion at inference, report loss / BLEU / chrF.")
    parser.add_argument("checkpoint", help="saved EncoderFusion-style model folder")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="layers to mask (default: all; 0 = X^0)")
    parser.add_argument("--output", required=True, help="table to write (.md or .json)")
    add_sample_arguments(parser)
    args = parser.parse_args(argv)
    check_table_path(args.output)
    model, tokenizer = load_checkpoint(args.checkpoint, args.device)
    sample = sample_from_args(args)
    rows = layer_masking_ablation(model, tokenizer, sample, args.layers, args.batch_size, args.max_length)
    notes = (f"{args.checkpoint} ({model.config.encoder_memory} memory), {len(sample.sources)} sentences of "
             f"{sample.name}; loss = teacher-forced NLL per token, BLEU/chrF of greedy decoding.")
    path = write_table(rows, args.output, "Layer-masking ablation", notes)
    print(f"Wrote {path}")
    return path


if __name__ == "__main__":
    run_command(main)
