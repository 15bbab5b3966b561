"""EncoderFusion's fusion-weight heatmap averaged over several trained models (seeds).

Liu et al. (ICLR 2021, arXiv 2012.14768) plot how much each decoder layer reads from each encoder
layer in a trained EncoderFusion model and find that the *upper decoder layers put most weight on
the embedding layer X^0*. One model's heatmap says little at small scale, where seeds disagree;
this module averages the heatmaps of several models of the same shape (e.g. the same recipe
trained with different seeds):

- the mean and the standard deviation over models (sample std, ddof = 1; 0 for a single model) of
  each model's ``layer_weights()`` (``hf_fusion/memory.py``: decoder layer x encoder layer, rows
  summing to 1; for fine-grained fusion the mean over dimensions), drawn side by side with
  ``hf_fusion.visualization``'s heatmap;
- the statistic for the claim, per decoder layer: the weight on X^0 (mean +- std over models),
  the uniform weight 1 / (N + 1) for reference, and in how many models X^0 gets that layer's
  largest weight. The claim predicts the X^0 weight growing towards the top decoder layers and
  standing above uniform there.

Command line::

    python -m hf_fusion.analysis.fusion_weights SEED0 SEED1 SEED2 --output heatmap.png --output x0.md
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSeq2SeqLM, PreTrainedModel

from ..modeling_encoder_fusion import collect_fusion_weights
from ..visualization import draw_weight_panels
from .common import TABLE_SUFFIXES, run_command, write_table

MEMORY = "encoder_memory"  # the collect_fusion_weights key of the fused encoder memory


@dataclass
class FusionWeightSummary:
    """Fusion weights of K models: ``per_model`` ``(K, decoder_layers, encoder_layers + 1)``,
    their ``mean`` and ``std`` over models, and the models' ``names``."""

    per_model: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    names: list[str]

    def embedding_rows(self) -> list[dict[str, Any]]:
        """Per decoder layer (1 = bottom): the X^0 weight's mean and std over models, the uniform
        weight, and the number of models whose largest weight in that row is X^0."""
        uniform = 1.0 / self.mean.shape[1]
        x0_is_max = (self.per_model.argmax(dim=-1) == 0).sum(dim=0)  # (decoder_layers,)
        return [
            {
                "decoder_layer": layer + 1,
                "x0_mean": float(self.mean[layer, 0]),
                "x0_std": float(self.std[layer, 0]),
                "uniform": uniform,
                "models_with_x0_max": f"{int(x0_is_max[layer])}/{len(self.names)}",
            }
            for layer in range(self.mean.shape[0])
        ]


def summarize_fusion_weights(models: Sequence[PreTrainedModel | str | os.PathLike]) -> FusionWeightSummary:
    """Stack the fused-memory weights of ``models`` (instances or checkpoint folders) and average
    them.

    Raises:
        ValueError: for no models, a model without a fused encoder memory, or models whose weight
            shapes differ (other depths).
    """
    if not models:
        raise ValueError("Give at least one model.")
    weights, names = [], []
    for model in models:
        if isinstance(model, PreTrainedModel):
            name = model.name_or_path or f"model {len(names) + 1}"
        else:
            name, model = str(model), AutoModelForSeq2SeqLM.from_pretrained(model)
        found = collect_fusion_weights(model)
        if MEMORY not in found:
            raise ValueError(
                f"{name} has encoder_memory = {model.config.encoder_memory!r}, which learns no fusion weights; allowed: "
                "'transparent' or 'fine_grained'."
            )
        if weights and found[MEMORY].shape != weights[0].shape:
            raise ValueError(
                f"{name} has fusion weights of shape {tuple(found[MEMORY].shape)}, {names[0]} of "
                f"{tuple(weights[0].shape)}; average models of the same depth only."
            )
        weights.append(found[MEMORY])
        names.append(name)
    stacked = torch.stack(weights)  # (K, decoder_layers, encoder_layers + 1)
    std = stacked.std(dim=0) if len(weights) > 1 else torch.zeros_like(stacked[0])
    return FusionWeightSummary(stacked, stacked.mean(dim=0), std, names)


def plot_summary(summary: FusionWeightSummary, output: str | os.PathLike) -> Path:
    """The mean and the std heatmaps side by side, as a PNG."""
    count = len(summary.names)
    return draw_weight_panels(
        [(MEMORY, f"Fusion weights, mean of {count} models", summary.mean),
         (MEMORY, f"Std over the {count} models", summary.std)],
        output,
    )


def main(argv: list[str] | None = None) -> list[Path]:
    """``python -m hf_fusion.analysis.fusion_weights CHECKPOINT [CHECKPOINT ...] --output FILE [--output FILE]``:
    a ``.png`` gets the heatmaps, a ``.md`` / ``.json`` the X^0 table."""
    parser = argparse.ArgumentParser(description="Average the EncoderFusion fusion weights of several checkpoints: "
                                     "heatmap (PNG) and the X^0 weight per decoder layer (table).")
    parser.add_argument("checkpoints", nargs="+", help="saved models of the same shape (e.g. seeds)")
    parser.add_argument("--output", action="append", required=True,
                        help="a .png (heatmaps) or .md/.json (table); repeat for several")
    args = parser.parse_args(argv)
    for output in args.output:
        if Path(output).suffix not in (".png", *TABLE_SUFFIXES):
            parser.error(f"--output {output} must end in .png, {', '.join(TABLE_SUFFIXES)}")
    summary = summarize_fusion_weights(args.checkpoints)
    written = []
    for output in args.output:
        if Path(output).suffix == ".png":
            written.append(plot_summary(summary, output))
        else:
            notes = (f"Weight on the embedding layer X^0 per decoder layer, over {len(summary.names)} models: "
                     f"{', '.join(summary.names)}.")
            written.append(write_table(summary.embedding_rows(), output, "Fusion weight on X^0", notes))
    for path in written:
        print(f"Wrote {path}")
    return written


if __name__ == "__main__":
    run_command(main)
