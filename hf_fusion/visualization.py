"""Heatmaps of learned layer-fusion weights: the figure of Liu et al. 2021 (arXiv 2012.14768).

Liu et al. plot, for a trained EncoderFusion model, how much each decoder layer (rows) reads from
each encoder layer (columns, the embedding layer first) and find that the uppermost decoder
layer leans on the *embedding* layer. :func:`plot_fusion_weights` draws that figure for any
hf_fusion model or checkpoint folder that learns layer weights: a fused encoder memory
(``transparent``, ``fine_grained``) and/or DLCL connections (one panel per stack).

Library code, not model code: it is never imported by the model files and never copied into
checkpoints. It draws with matplotlib's object API on an Agg canvas, so it needs no display and
leaves the caller's pyplot backend alone.

Command line: ``python -m hf_fusion.visualization CHECKPOINT OUTPUT.png``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from transformers import AutoModelForSeq2SeqLM, PreTrainedModel

from .modeling_encoder_fusion import collect_fusion_weights

PANEL_TITLES = {
    "encoder_memory": "Encoder layer fusion (decoder reads)",
    "encoder_connection": "DLCL weights, encoder",
    "decoder_connection": "DLCL weights, decoder",
}
ANNOTATE_MAX_COLUMNS = 13  # write the value into each cell only while cells stay readable


def _load(model_or_path: PreTrainedModel | str | os.PathLike, load_kwargs: dict[str, Any] | None) -> PreTrainedModel:
    if isinstance(model_or_path, PreTrainedModel):
        return model_or_path
    return AutoModelForSeq2SeqLM.from_pretrained(model_or_path, **(load_kwargs or {}))


def _tick_labels(count: int) -> list[str]:
    """Layer labels with the embedding layer first: emb, 1, 2, ..."""
    return ["emb"] + [str(layer) for layer in range(1, count)]


def _draw_panel(figure: Figure, axes, key: str, weights: torch.Tensor, title: str) -> None:
    values = weights.cpu().numpy()
    rows, cols = values.shape
    if key == "encoder_memory":
        # Row m = decoder layer m + 1; drawn with the top decoder layer at the top, as in the paper.
        image = axes.imshow(values, origin="lower", aspect="auto", cmap="viridis", vmin=0.0, vmax=float(values.max()))
        axes.set_yticks(range(rows), [str(layer) for layer in range(1, rows + 1)])
        axes.set_ylabel("decoder layer")
        axes.set_xlabel("encoder layer")
    else:
        # DLCL: row l = input of layer l + 1 (last row: stack output), column k = y_k; above the
        # diagonal is unused, so it is blanked. Weights are unnormalised and may be negative.
        values = values.copy()
        values[np.triu_indices(rows, 1, cols)] = np.nan
        bound = float(np.nanmax(np.abs(values)))
        image = axes.imshow(values, origin="lower", aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound)
        axes.set_yticks(range(rows), [f"in {layer}" for layer in range(1, rows)] + ["out"])
        axes.set_ylabel("combination (layer input)")
        axes.set_xlabel("layer output")
    axes.set_xticks(range(cols), _tick_labels(cols))
    axes.set_title(title)
    if cols <= ANNOTATE_MAX_COLUMNS:
        for row in range(rows):
            for col in range(cols):
                value = values[row, col]
                if not np.isnan(value):
                    red, green, blue, _ = image.cmap(image.norm(value))
                    ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
                    axes.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color=ink)
    figure.colorbar(image, ax=axes)


def plot_fusion_weights(
    model_or_path: PreTrainedModel | str | os.PathLike,
    output_path: str | os.PathLike,
    load_kwargs: dict[str, Any] | None = None,
    dpi: int = 150,
) -> Path:
    """Write the heatmap(s) of a model's learned layer-fusion weights to a PNG file.

    Args:
        model_or_path: An hf_fusion model, or a checkpoint folder / Hub id to load it from.
        output_path: Where to write the PNG (parent folders are created).
        load_kwargs: Passed to ``AutoModelForSeq2SeqLM.from_pretrained`` for a path (e.g.
            ``{"trust_remote_code": True}`` for a family this hf_fusion version lacks).
        dpi: Resolution of the image.

    Returns:
        The path of the written PNG.

    Raises:
        ValueError: if the model learns no layer weights (e.g. a vanilla model).
    """
    weights = collect_fusion_weights(_load(model_or_path, load_kwargs))
    if not weights:
        raise ValueError(
            "This model learns no layer-fusion weights: use an EncoderFusion model (fusion_mode "
            "'transparent', 'fine_grained' or 'dlcl'), or a config with encoder_memory in "
            "('transparent', 'fine_grained') or depth_connection = 'dlcl'."
        )
    return draw_weight_panels([(key, PANEL_TITLES.get(key, key), value) for key, value in weights.items()], output_path, dpi)


def draw_weight_panels(
    panels: Sequence[tuple[str, str, torch.Tensor]], output_path: str | os.PathLike, dpi: int = 150
) -> Path:
    """Write heatmaps of layer weights side by side to a PNG file.

    Args:
        panels: ``(seam key, title, weights)`` per panel; the key (as in
            :func:`~hf_fusion.modeling_encoder_fusion.collect_fusion_weights`) picks the layout:
            ``"encoder_memory"`` draws decoder layer x encoder layer, the DLCL keys the triangle.
        output_path: Where to write the PNG (parent folders are created).
        dpi: Resolution of the image.

    Returns:
        The path of the written PNG.
    """
    figure = Figure(figsize=(5.0 * len(panels), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, (key, title, value) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        _draw_panel(figure, axes, key, value, title)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output_path, dpi=dpi, format="png")
    return output_path


def main(argv: list[str] | None = None) -> None:
    """``python -m hf_fusion.visualization CHECKPOINT OUTPUT.png [--trust_remote_code]``."""
    parser = argparse.ArgumentParser(description="Plot the learned layer-fusion weights of an hf_fusion checkpoint.")
    parser.add_argument("checkpoint", help="checkpoint folder or Hub id")
    parser.add_argument("output", help="PNG file to write")
    parser.add_argument("--trust_remote_code", action="store_true", help="load the checkpoint's own model code")
    args = parser.parse_args(argv)
    path = plot_fusion_weights(args.checkpoint, args.output, load_kwargs={"trust_remote_code": args.trust_remote_code})
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
