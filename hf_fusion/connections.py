"""Seam 2, the depth connection: how each depth step's output joins the running state.

A stack runs its steps through a connection object (the idea of x-transformers' interchangeable
``Residual``): ``start`` turns the embedding output into the running state, ``layer_input`` gives
the argument a step's layer receives, ``update`` folds the layer's output back in, ``hidden`` is
the state a step exposes (``output_hidden_states``, the encoder layer states that fusion reads),
and ``finish`` is what leaves the stack (before its optional final LayerNorm).

A connection comes with the layer classes that fit it (:class:`ConnectionSpec`): the residual
connection keeps its per-sub-layer ``x + f(x)`` joins and LayerNorms inside the layers, so at stack
level it is the identity; a connection that replaces the residual stream (a depth-wise LSTM) or
mixes all earlier outputs (DLCL) brings its own layers or keeps history here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .configuration_fusion_transformer import FusionTransformerConfig
from .layers import FusionDecoderLayer, FusionEncoderLayer


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


class ConnectionSpec(NamedTuple):
    """A depth connection and the encoder/decoder layer classes it runs."""

    connection: type[nn.Module]
    encoder_layer: type[nn.Module]
    decoder_layer: type[nn.Module]


RESIDUAL = ConnectionSpec(ResidualConnection, FusionEncoderLayer, FusionDecoderLayer)

