"""Recurrent stacking at other depths, and its attention maps (Dabre & Fujita, AAAI 2019; journal
version arXiv 2106.10002).

A recurrently stacked model runs one parameter block N times; nothing in its weights fixes N. Dabre
& Fujita decode trained models with fewer recurrences than they were trained with and report how
quickly the quality falls; they also plot the attention of every depth step for one sentence to
compare what the repeated layer does at each step with what distinct layers do.

- :func:`with_depth` builds the same model with another ``encoder_layers`` / ``decoder_layers``
  (the execution plan follows from the config: ``sharing_strategy = "recurrent"`` runs block 0 at
  every step) and copies the weights unchanged.
- :func:`recurrence_sweep` reports the test loss (teacher-forced NLL per token) and greedy BLEU /
  chrF per depth.
- :func:`plot_attention_maps` draws, for one sentence, the encoder self-attention, decoder
  self-attention and cross-attention of every depth step (mean over heads) as a PNG grid. It works
  for any hf_fusion model, so a vanilla model's maps can be set beside a recurrent one's.

Only recurrent stacking with a plain encoder memory and depth connection can change depth: a fused
memory (one weight row per decoder step) or DLCL (one weight row per step) has parameters sized by
the trained depth, and the other sharing schedules assign blocks by depth.

Command line::

    python -m hf_fusion.analysis.recurrence CHECKPOINT --corpus ding --depths 1 2 3 4 5 6 --output depth.md \
        --attention_png attention.png
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
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

STACK_CHOICES = ("both", "encoder", "decoder")
MAP_TITLES = {"encoder_self": "encoder self-attn", "decoder_self": "decoder self-attn", "cross": "cross-attn"}
LABEL_MAX_TOKENS = 24  # write token labels on the axes only while they stay readable


def with_depth(
    model: PreTrainedModel, encoder_layers: int | None = None, decoder_layers: int | None = None
) -> PreTrainedModel:
    """The same recurrently stacked model run with another number of steps per stack.

    Args:
        model: An hf_fusion model with ``sharing_strategy = "recurrent"``.
        encoder_layers / decoder_layers: New depths; ``None`` keeps the trained one.

    Returns:
        A new model (eval mode, same device and dtype) holding copies of ``model``'s weights.

    Raises:
        ValueError: for another sharing strategy, a fused encoder memory or DLCL (parameters sized
            by depth), or a depth below 1.
    """
    config = model.config
    if getattr(config, "sharing_strategy", "none") != "recurrent":
        raise ValueError(
            f"sharing_strategy = {getattr(config, 'sharing_strategy', 'none')!r}: only 'recurrent' runs the same "
            "block at every step, so only a recurrently stacked model can be decoded at another depth."
        )
    if config.encoder_memory != "last" or config.depth_connection == "dlcl":
        raise ValueError(
            f"encoder_memory = {config.encoder_memory!r} / depth_connection = {config.depth_connection!r} learn "
            "one weight row per depth step, so the model cannot change depth; allowed: encoder_memory 'last' with "
            "depth_connection 'residual' or 'depthwise_lstm'."
        )
    changes = {name: depth for name, depth in (("encoder_layers", encoder_layers), ("decoder_layers", decoder_layers))
               if depth is not None}
    for name, depth in changes.items():
        if depth < 1:
            raise ValueError(f"{name} must be at least 1, got {depth}.")
    new_config = type(config).from_dict({**config.to_dict(), **changes})
    parameter = next(model.parameters())
    deeper = type(model)(new_config).to(device=parameter.device, dtype=parameter.dtype)
    deeper.load_state_dict(model.state_dict(), strict=True)
    deeper.generation_config = model.generation_config
    return deeper.eval()


def recurrence_sweep(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sample: TestSet,
    depths: Sequence[int],
    stack: str = "both",
    batch_size: int = 32,
    max_length: int | None = None,
) -> list[dict[str, Any]]:
    """Loss, BLEU and chrF of the model decoded at each depth in ``depths``.

    Args:
        model / tokenizer: A recurrently stacked model (see :func:`with_depth`).
        sample: The parallel test sentences.
        depths: Numbers of recurrences to try.
        stack: Which stack gets the depth: ``"both"``, ``"encoder"`` or ``"decoder"`` (the other
            keeps its trained depth).
        batch_size / max_length: As in :func:`hf_fusion.analysis.common.quality`.

    Returns:
        One row per depth: ``encoder_layers``, ``decoder_layers``, ``trained`` (whether this is
        the trained depth), ``loss``, ``bleu``, ``chrf``.
    """
    if stack not in STACK_CHOICES:
        raise ValueError(f"stack = {stack!r} is not supported; allowed: {', '.join(STACK_CHOICES)}.")
    rows = []
    batches = encode_sample(model, tokenizer, sample, batch_size)
    for depth in depths:
        encoder = depth if stack in ("both", "encoder") else None
        decoder = depth if stack in ("both", "decoder") else None
        variant = with_depth(model, encoder, decoder)
        depth_of = {"encoder": variant.config.encoder_layers, "decoder": variant.config.decoder_layers}
        trained = depth_of["encoder"] == model.config.encoder_layers and depth_of["decoder"] == model.config.decoder_layers
        rows.append({
            "encoder_layers": depth_of["encoder"], "decoder_layers": depth_of["decoder"], "trained": trained,
            **quality(variant, tokenizer, sample, batches, max_length),
        })
    return rows


@torch.no_grad()
def attention_maps(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: str, target: str | None = None
) -> dict[str, Any]:
    """Every depth step's attention for one sentence pair, averaged over heads.

    Args:
        model / tokenizer: Any hf_fusion model.
        source: The source sentence.
        target: The target the decoder is teacher-forced on; ``None`` uses the model's own greedy
            translation.

    Returns:
        ``source_tokens``, ``target_tokens`` (the decoder inputs: start token, then the target),
        and per kind a list over depth steps of 2-D tensors: ``encoder_self`` ``(src, src)``,
        ``decoder_self`` ``(tgt, tgt)``, ``cross`` ``(tgt, src)``; rows are queries.
    """
    model.eval()
    device = next(model.parameters()).device
    inputs = tokenizer([source], return_tensors="pt").to(device)
    if target is None:
        labels = model.generate(**inputs, num_beams=1, do_sample=False)[:, 1:]  # drop the start token
    else:
        labels = tokenizer(text_target=[target], return_tensors="pt")["input_ids"].to(device)
    outputs = model(**inputs, labels=labels, output_attentions=True)
    decoder_inputs = model.prepare_decoder_input_ids_from_labels(labels)[0]
    return {
        "source_tokens": tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist()),
        "target_tokens": tokenizer.convert_ids_to_tokens(decoder_inputs.tolist()),
        "encoder_self": [step[0].mean(dim=0).cpu() for step in outputs.encoder_attentions],
        "decoder_self": [step[0].mean(dim=0).cpu() for step in outputs.decoder_attentions],
        "cross": [step[0].mean(dim=0).cpu() for step in outputs.cross_attentions],
    }


def plot_attention_maps(maps: dict[str, Any], output: str | Path, dpi: int = 120) -> Path:
    """Draw :func:`attention_maps` as a grid: one row per depth step (step 1 at the top), one
    column per kind; a stack with fewer steps leaves its cells empty."""
    rows = max(len(maps[kind]) for kind in MAP_TITLES)
    figure = Figure(figsize=(3.2 * len(MAP_TITLES), 2.8 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes_grid = figure.subplots(rows, len(MAP_TITLES), squeeze=False)
    labels = {"encoder_self": ("source_tokens", "source_tokens"), "decoder_self": ("target_tokens", "target_tokens"),
              "cross": ("target_tokens", "source_tokens")}
    for column, (kind, title) in enumerate(MAP_TITLES.items()):
        for step_idx in range(rows):
            axes = axes_grid[step_idx][column]
            if step_idx >= len(maps[kind]):
                axes.axis("off")
                continue
            axes.imshow(maps[kind][step_idx].float().cpu().numpy(), cmap="viridis", vmin=0.0, aspect="auto")
            axes.set_title(f"{title}, step {step_idx + 1}", fontsize=9)
            query_tokens, key_tokens = (maps[name] for name in labels[kind])
            for set_ticks, tokens in ((axes.set_yticks, query_tokens), (axes.set_xticks, key_tokens)):
                if len(tokens) <= LABEL_MAX_TOKENS:
                    set_ticks(range(len(tokens)), tokens, fontsize=6)
                else:
                    set_ticks([])
            axes.tick_params(axis="x", labelrotation=90)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=dpi, format="png")
    return output


def main(argv: list[str] | None = None) -> list[Path]:
    """``python -m hf_fusion.analysis.recurrence CHECKPOINT (--test_file F | --corpus C) --depths D ...
    --output T [--attention_png P]``."""
    parser = argparse.ArgumentParser(description="Recurrent stacking decoded at other depths (table) and its "
                                     "attention maps per depth step (PNG).")
    parser.add_argument("checkpoint", help="saved recurrently stacked model folder")
    parser.add_argument("--depths", type=int, nargs="+", default=None,
                        help="recurrences to decode with (default: 1 .. the trained decoder depth)")
    parser.add_argument("--stack", default="both", choices=STACK_CHOICES, help="which stack gets the new depth")
    parser.add_argument("--output", default=None, help="depth table to write (.md or .json)")
    parser.add_argument("--attention_png", default=None, help="PNG of the attention maps of one test sentence")
    parser.add_argument("--sentence_index", type=int, default=0, help="which test sentence the maps show")
    parser.add_argument("--attention_depth", type=int, default=None,
                        help="draw the maps at this depth (recurrent models; default: as trained)")
    add_sample_arguments(parser)
    args = parser.parse_args(argv)
    if args.output is None and args.attention_png is None:
        parser.error("give --output (the depth table) and/or --attention_png")
    if args.output is not None:
        check_table_path(args.output)
    model, tokenizer = load_checkpoint(args.checkpoint, args.device)
    sample = sample_from_args(args)
    written = []
    if args.output is not None:
        depths = args.depths or list(range(1, model.config.decoder_layers + 1))
        rows = recurrence_sweep(model, tokenizer, sample, depths, args.stack, args.batch_size, args.max_length)
        notes = (f"{args.checkpoint}, trained with {model.config.encoder_layers}+{model.config.decoder_layers} "
                 f"steps; {len(sample.sources)} sentences of {sample.name}; loss = teacher-forced NLL per token, "
                 "BLEU/chrF of greedy decoding.")
        written.append(write_table(rows, args.output, "Decoding with other numbers of recurrences", notes))
    if args.attention_png is not None:
        if not 0 <= args.sentence_index < len(sample.sources):
            raise ValueError(f"--sentence_index must lie in 0..{len(sample.sources) - 1}, got {args.sentence_index}.")
        shown = model if args.attention_depth is None else with_depth(model, args.attention_depth, args.attention_depth)
        maps = attention_maps(shown, tokenizer, sample.sources[args.sentence_index], sample.references[args.sentence_index])
        written.append(plot_attention_maps(maps, args.attention_png))
    for path in written:
        print(f"Wrote {path}")
    return written


if __name__ == "__main__":
    run_command(main)
