"""Seam 2, the depth connection: how each depth step's output joins the running state.

A stack runs its steps through a connection object (the idea of x-transformers' interchangeable
``Residual``): ``start`` turns the embedding output into the running state, ``layer_input`` gives
the argument a step's layer receives, ``update`` folds the layer's output back in, ``hidden`` is
the state a step exposes (``output_hidden_states``, the encoder layer states that fusion reads),
and ``finish`` is what leaves the stack (before its optional final LayerNorm).

A connection comes with the layer classes that fit it (``seams.ConnectionSpec``): the residual
connection keeps its per-sub-layer ``x + f(x)`` joins and LayerNorms inside the layers, so at stack
level it is the identity; a connection that replaces the residual stream (a depth-wise LSTM) or
mixes all earlier outputs (DLCL) brings its own layers or keeps history here.

Connections (``depth_connection``):

    residual  x_{l+1} = y_l: the vanilla residual stream (the joins live inside the layers).
    dlcl      x_{l+1} = a learned linear combination of y_0..y_l: Wang et al., ACL 2019, "Learning
              Deep Transformer Models for Machine Translation" (arXiv 1906.01787), in encoder and
              decoder; see :class:`DLCLConnection`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from transformers import initialization as init

if TYPE_CHECKING:
    from .configuration_fusion_transformer import FusionTransformerConfig


class ResidualConnection(nn.Module):
    """Residual stream (pre- or post-norm): the state is the hidden tensor itself.

    Args:
        config: The model config.
        num_steps: Depth of the stack this connection runs.
    """

    def __init__(self, config: FusionTransformerConfig, num_steps: int):
        super().__init__()

    def start(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings

    def layer_input(self, state: torch.Tensor, step_idx: int) -> torch.Tensor:
        return state

    def update(self, state: torch.Tensor, layer_output: torch.Tensor, step_idx: int) -> torch.Tensor:
        return layer_output

    def hidden(self, state: torch.Tensor) -> torch.Tensor:
        return state

    def finish(self, state: torch.Tensor) -> torch.Tensor:
        return state


class DLCLState(NamedTuple):
    """The running state of a DLCL stack.

    Args:
        history: y_0..y_l as the combination reads them, each ``(batch, len, d_model)`` (in
            pre-norm models y_k for k >= 1 already passed through LN_k).
        last: y_l as the layer returned it: the state a step exposes.
    """

    history: tuple[torch.Tensor, ...]
    last: torch.Tensor


class DLCLConnection(nn.Module):
    """Dynamic linear combination of layers (Wang et al. 2019, arXiv 1906.01787).

    Every layer reads a learned linear combination of the outputs of *all* layers below it
    (y_0 = the embedding layer output, y_k = the output of step k)::

        pre-norm:   x_{l+1} = sum_{k<=l} W[l, k] * LN_k(y_k)      (y_0 enters un-normalised)
        post-norm:  x_{l+1} = LN_l(sum_{k<=l} W[l, k] * y_k)       (no LayerNorm for x_1 = W[0, 0] y_0)

    and the stack's output is the same combination over all N + 1 states (row N of W; the stack's
    final LayerNorm, if any, follows). W is ``(N + 1, N + 1)``, lower triangular, plain scalars
    without softmax, initialised to 1 / (l + 1) (the mean of the available layers). The layer
    norms and the handling of y_0 follow the official code (``LearnableDenseLayerHistory``): N
    LayerNorms, one per step, normalising that step's output (pre-norm) or the input it feeds
    (post-norm).

    How it combines with the residual layers: DLCL replaces the connection *between* layers, not
    inside them. Each layer keeps its own residual joins and LayerNorms (``FusionEncoderLayer``,
    ``FusionDecoderLayer`` unchanged), so y_l = x_l + F(x_l) as in the paper, where F is the
    layer's sub-layers. This is the official code's design too, and it is what makes DLCL compose
    with every other seam: sharing reuses layer blocks while W and the LayerNorms stay per depth
    step (mixing is a property of the depth, like the cache slot), and fused encoder memories read
    ``hidden`` = y_k. Consequences worth knowing: in post-norm models y_k is already normalised by
    the layer's last LayerNorm and the combination normalises again; no choice of W reproduces the
    plain residual stack exactly (LN_k sits on the path), so a vanilla checkpoint retrofitted with
    DLCL starts from a different function and needs fine-tuning. The connection acts per position
    across depth, so incremental decoding's key/value cache is unaffected.

    Args:
        config: The model config (``normalize_before``, ``d_model``, ``layer_norm_eps``).
        num_steps: Depth N of the stack this connection runs.
    """

    def __init__(self, config: FusionTransformerConfig, num_steps: int):
        super().__init__()
        self.normalize_before = config.normalize_before
        self.weight = nn.Parameter(torch.empty(num_steps + 1, num_steps + 1))  # W[row, k], row l feeds step l
        self.layer_norms = nn.ModuleList(
            [nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) for _ in range(num_steps)]
        )
        self.init_own_weights()

    def init_own_weights(self) -> None:
        """Row l = 1 / (l + 1) on its l + 1 entries, 0 above the diagonal (skipped once loaded)."""
        lower = torch.ones_like(self.weight, device="cpu").tril()
        init.copy_(self.weight, lower / lower.sum(dim=1, keepdim=True))

    def layer_weights(self) -> torch.Tensor:
        """W, ``(num_steps + 1, num_steps + 1)``: row l combines y_0..y_l into step l's input
        (row N: the stack output); entries above the diagonal are unused and returned as 0."""
        return self.weight.detach().float().tril()

    def combine(self, state: DLCLState, row: int) -> torch.Tensor:
        """Row ``row`` of W applied to the history y_0..y_row."""
        stacked = torch.stack(state.history, dim=0)  # (row + 1, batch, len, d_model)
        mixed = torch.tensordot(self.weight[row, : row + 1].to(stacked.dtype), stacked, dims=1)
        if self.normalize_before or row == 0:
            return mixed
        return self.layer_norms[row - 1](mixed)

    def start(self, embeddings: torch.Tensor) -> DLCLState:
        return DLCLState(history=(embeddings,), last=embeddings)

    def layer_input(self, state: DLCLState, step_idx: int) -> torch.Tensor:
        return self.combine(state, step_idx)

    def update(self, state: DLCLState, layer_output: torch.Tensor, step_idx: int) -> DLCLState:
        entry = self.layer_norms[step_idx](layer_output) if self.normalize_before else layer_output
        return DLCLState(history=state.history + (entry,), last=layer_output)

    def hidden(self, state: DLCLState) -> torch.Tensor:
        return state.last

    def finish(self, state: DLCLState) -> torch.Tensor:
        return self.combine(state, len(state.history) - 1)
