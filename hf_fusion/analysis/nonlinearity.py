"""How much each depth step's non-linearity matters (Xu et al., "Rewiring the Transformer with
Depth-Wise LSTMs", arXiv 2007.06257).

Xu et al. measure the use a model makes of a layer's non-linearity by distilling that layer of the
trained model into a linear transformation and measuring how much the model degrades when the
linear map replaces the layer; they find depth-wise LSTM models use per-layer non-linearity more
efficiently than residual ones. Here, for one depth step at a time:

1. record the step's input and output state at every real (non-padding) position of a fitting
   sample, teacher-forced;
2. fit ``output = input @ A + b`` by least squares (the closed-form distillation under squared
   error), in float64;
3. run the test sample with that step's output replaced by the linear map of its input, and report
   the teacher-forced NLL per token and its increase over the unmodified model.

What "a step's input and output" are depends on the depth connection, and every connection works:
residual (and DLCL) steps map the ``(.., d_model)`` layer input to the layer output; a depth-wise
LSTM step maps the packed ``[h ; c]`` state ``(.., 2 * d_model)`` it receives to the packed state
it returns (``hf_fusion/depthwise_lstm.py``), so the replacement also gives the next step its cell
state. Under parameter sharing only the chosen *step* is replaced; the other steps that run the
same block keep it.

A decoder step's linear map sees its input state only, not the source: replacing it also removes
that step's cross-attention, so compare decoder steps with each other rather than with encoder
steps. ``fit_r2`` (the fraction of the output's variance around its mean the linear map explains
on the fitting data) says how linear the step already is.

Command line::

    python -m hf_fusion.analysis.nonlinearity CHECKPOINT --corpus ding --max_sentences 300 --output nonlinearity.md
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.batching import LABEL_PAD
from training.evaluate_file import TestSet

from .common import (
    add_sample_arguments,
    check_table_path,
    encode_sample,
    load_checkpoint,
    read_sample,
    run_command,
    sample_from_args,
    token_nll,
    write_table,
)

STACKS = ("encoder", "decoder")
# (step_idx, layer input, layer output tuple) -> a replacement output tuple, or None to keep it.
StepAction = Callable[[int, torch.Tensor, tuple], tuple | None]


class LinearMap(NamedTuple):
    """``y = x @ weight + bias``: ``weight`` (in, out), ``bias`` (out,), fitted on ``tokens``
    positions with coefficient of determination ``r2``."""

    weight: torch.Tensor
    bias: torch.Tensor
    tokens: int
    r2: float

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight.to(inputs.device), self.bias.to(inputs.device)
        return (inputs.double() @ weight + bias).to(inputs.dtype)


@contextmanager
def on_steps(stack: nn.Module, action: StepAction) -> Iterator[None]:
    """Call ``action`` after every depth step of ``stack`` (an encoder or decoder) with the step
    index, the layer's input state and its output tuple; a non-``None`` return replaces the
    output. Steps are counted per stack call, so a block run at several steps is told apart."""
    calls = [0]

    def reset(module: nn.Module, args: tuple) -> None:
        calls[0] = 0

    def after_layer(module: nn.Module, args: tuple, output: tuple) -> tuple | None:
        step_idx = calls[0]
        calls[0] += 1
        return action(step_idx, args[0], output)

    handles = [stack.register_forward_pre_hook(reset)]
    handles += [block.register_forward_hook(after_layer) for block in stack.layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _positions(batch: Mapping[str, torch.Tensor], stack: str) -> torch.Tensor:
    """(batch, len) mask of the real positions a stack's states have in this batch."""
    return batch["attention_mask"].bool() if stack == "encoder" else batch["labels"] != LABEL_PAD


@torch.no_grad()
def record_steps(
    model: PreTrainedModel, batches: Sequence[Mapping[str, torch.Tensor]]
) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """Every depth step's (input, output) states at real positions, teacher-forced over
    ``batches``: ``{(stack, step_idx): ((tokens, in_width), (tokens, out_width))}``."""
    records: dict[tuple[str, int], tuple[list, list]] = {}
    current: dict[str, torch.Tensor] = {}

    def recorder(stack: str) -> StepAction:
        def action(step_idx: int, inputs: torch.Tensor, output: tuple) -> None:
            mask = current[stack]
            ins, outs = records.setdefault((stack, step_idx), ([], []))
            ins.append(inputs[mask].cpu())
            outs.append(output[0][mask].cpu())

        return action

    base = model.base_model
    device = next(model.parameters()).device
    with on_steps(base.encoder, recorder("encoder")), on_steps(base.decoder, recorder("decoder")):
        for batch in batches:
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
            current.update({stack: _positions(batch, stack) for stack in STACKS})
            model(**batch)
    return {key: (torch.cat(ins), torch.cat(outs)) for key, (ins, outs) in records.items()}


def fit_linear_map(inputs: torch.Tensor, outputs: torch.Tensor) -> LinearMap:
    """Least-squares ``outputs ~ inputs @ A + b`` over rows (positions), in float64 (the
    minimum-norm solution when inputs are collinear).

    Raises:
        ValueError: with fewer rows than unknowns per output (in_width + 1): the fit would be
            underdetermined; use more sentences.
    """
    tokens, width = inputs.shape
    if tokens < width + 1:
        raise ValueError(
            f"{tokens} positions cannot determine a linear map from {width} inputs (+ bias); fit on more sentences "
            f"(at least {width + 1} target and source tokens)."
        )
    design = torch.cat([inputs.double(), inputs.new_ones(tokens, 1, dtype=torch.float64)], dim=1)
    targets = outputs.double()
    # SVD-based solver: a depth-wise LSTM's first step gets h = c (both the embeddings), duplicate
    # columns on which the default pivoted-QR driver returns a poor solution.
    solution = torch.linalg.lstsq(design, targets, driver="gelsd").solution  # (width + 1, out)
    residual = ((design @ solution - targets) ** 2).sum()
    spread = ((targets - targets.mean(dim=0)) ** 2).sum()
    r2 = float(1.0 - residual / spread) if spread > 0 else 1.0
    return LinearMap(solution[:-1], solution[-1], tokens, r2)


@contextmanager
def linearized_step(model: PreTrainedModel, stack: str, step_idx: int, linear_map: LinearMap) -> Iterator[None]:
    """Within the block, depth step ``step_idx`` of ``stack`` outputs ``linear_map(its input)``
    instead of running its layer's output (attention weights, if any, are kept)."""

    def replace(step: int, inputs: torch.Tensor, output: tuple) -> tuple | None:
        return (linear_map(inputs), *output[1:]) if step == step_idx else None

    with on_steps(getattr(model.base_model, stack), replace):
        yield


def nonlinearity_analysis(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sample: TestSet,
    fit_sample: TestSet | None = None,
    stacks: Sequence[str] = STACKS,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Replace each depth step in turn by its fitted linear map and report the loss increase.

    Args:
        model / tokenizer: Any hf_fusion model (residual, DLCL or depth-wise LSTM connection).
        sample: The parallel sentences the loss is measured on.
        fit_sample: The sentences the linear maps are fitted on (default: ``sample``).
        stacks: Which stacks to analyse.
        batch_size: Sentences per batch.

    Returns:
        One row per (stack, step): ``stack``, ``step`` (1-based), ``block`` (the parameter block
        it runs), ``fit_tokens``, ``fit_r2``, ``loss`` with the step linearised, ``delta_loss``
        over the unmodified model's loss (given in every row as ``base_loss``).
    """
    bad = [stack for stack in stacks if stack not in STACKS]
    if bad:
        raise ValueError(f"stacks {bad} are not supported; allowed: {', '.join(STACKS)}.")
    model.eval()
    batches = encode_sample(model, tokenizer, sample, batch_size)
    fit_batches = batches if fit_sample is None else encode_sample(model, tokenizer, fit_sample, batch_size)
    records = record_steps(model, fit_batches)
    base_loss = token_nll(model, batches)
    rows = []
    for stack in stacks:
        plan = getattr(model.config, f"{stack}_plan")
        for step_idx, block_idx in enumerate(plan):
            linear_map = fit_linear_map(*records[(stack, step_idx)])
            with linearized_step(model, stack, step_idx, linear_map):
                loss = token_nll(model, batches)
            rows.append({
                "stack": stack, "step": step_idx + 1, "block": block_idx, "fit_tokens": linear_map.tokens,
                "fit_r2": linear_map.r2, "base_loss": base_loss, "loss": loss, "delta_loss": loss - base_loss,
            })
    return rows


def main(argv: list[str] | None = None) -> Path:
    """``python -m hf_fusion.analysis.nonlinearity CHECKPOINT (--test_file F | --corpus C) --output T``."""
    parser = argparse.ArgumentParser(description="Per-step non-linearity: replace one depth step by a least-squares "
                                     "linear map of its input and report the loss increase.")
    parser.add_argument("checkpoint", help="saved model folder")
    parser.add_argument("--stacks", nargs="+", default=list(STACKS), choices=STACKS)
    parser.add_argument("--fit_split", default=None,
                        help="with --corpus: fit the maps on this split (default: the evaluated sentences)")
    parser.add_argument("--output", required=True, help="table to write (.md or .json)")
    add_sample_arguments(parser)
    args = parser.parse_args(argv)
    if args.fit_split is not None and args.corpus is None:
        parser.error("--fit_split needs --corpus")
    check_table_path(args.output)
    model, tokenizer = load_checkpoint(args.checkpoint, args.device)
    sample = sample_from_args(args)
    fit_sample = None if args.fit_split is None else read_sample(
        corpus=args.corpus, split=args.fit_split, max_sentences=args.max_sentences
    )
    rows = nonlinearity_analysis(model, tokenizer, sample, fit_sample, args.stacks, args.batch_size)
    notes = (f"{args.checkpoint} (depth_connection {model.config.depth_connection!r}); loss = teacher-forced NLL per "
             f"token on {len(sample.sources)} sentences of {sample.name}; maps fitted on "
             f"{'the same sentences' if fit_sample is None else fit_sample.name}.")
    path = write_table(rows, args.output, "Per-step non-linearity (one step replaced by a linear map)", notes)
    print(f"Wrote {path}")
    return path


if __name__ == "__main__":
    run_command(main)
