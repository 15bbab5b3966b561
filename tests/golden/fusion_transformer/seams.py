"""The five seams of the core: each one's interface, and its table of implementations.

A model family changes the vanilla Transformer only at these seams, each chosen by a string key in
the config. The tables below are the single source of the allowed keys: the config validates
against ``SEAM_CHOICES``, which is derived from them, so adding a variant means adding one table
entry. Every entry must satisfy its seam's interface (``tests/test_core.py`` checks each one).

    seam               config key           table               interface
    1 execution plan   sharing_strategy     EXECUTION_PLANS     ExecutionPlan: (N steps, M blocks) -> block per step
    2 depth connection depth_connection     DEPTH_CONNECTIONS   ConnectionSpec: a DepthConnection + its layer classes
    3 encoder memory   encoder_memory       ENCODER_MEMORIES    EncoderMemory: decoder step -> cross-attention memory
    4 output head      output_head          OUTPUT_HEADS        OutputHead: decoder state (+ HeadContext) -> HeadOutput
    5 loss terms       (none: reported)     -                   LossTerms: named loss components in the output

Seam 5 has no key: a head reports the components of its loss as ``LossTerms`` and training tools log
them; E2S2 adds its terms by wrapping the model (``training/e2s2``).

This module sits below the configuration in the import graph (the config validates against the
tables), so the seam implementations import the config class for type annotations only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from .connections import DLCLConnection, ResidualConnection
from .depthwise_lstm import DepthwiseLSTMConnection, DepthwiseLSTMDecoderLayer, DepthwiseLSTMEncoderLayer
from .heads import HeadContext, HeadOutput, LMHead, LossTerms
from .layers import FusionDecoderLayer, FusionEncoderLayer
from .memory import FineGrainedLayerAttentionMemory, LastLayerMemory, TransparentAttentionMemory
from .sharing import EXECUTION_PLANS, ExecutionPlan
from .surface_fusion import SurfaceFusionHead

if TYPE_CHECKING:
    from .configuration_fusion_transformer import FusionTransformerConfig


@runtime_checkable
class DepthConnection(Protocol):
    """Seam 2: how each depth step's output joins the running state of a stack.

    ``start`` turns the embedding output into the state, ``layer_input`` is what step
    ``step_idx``'s layer receives (one tensor, for reentrant checkpointing), ``update`` folds the
    layer's output back in, ``hidden`` is the ``(batch, len, d_model)`` state a step exposes
    (hidden states, encoder layer states), and ``finish`` is what leaves the stack.
    """

    def start(self, embeddings: torch.Tensor) -> Any: ...

    def layer_input(self, state: Any, step_idx: int) -> torch.Tensor: ...

    def update(self, state: Any, layer_output: torch.Tensor, step_idx: int) -> Any: ...

    def hidden(self, state: Any) -> torch.Tensor: ...

    def finish(self, state: Any) -> torch.Tensor: ...


class ConnectionSpec(NamedTuple):
    """A depth connection and the encoder/decoder layer classes it runs (a connection that
    replaces the residual stream brings its own layers)."""

    connection: Callable[[FusionTransformerConfig, int], DepthConnection]
    encoder_layer: Callable[[FusionTransformerConfig], nn.Module]
    decoder_layer: Callable[[FusionTransformerConfig], nn.Module]


@runtime_checkable
class EncoderMemory(Protocol):
    """Seam 3: the memory decoder step ``step_idx``'s cross-attention reads, ``(batch, src_len,
    d_model)``. ``needs_layer_states`` asks the encoder to keep every layer's state."""

    needs_layer_states: bool

    def forward(
        self,
        step_idx: int,
        encoder_hidden_states: torch.Tensor,
        encoder_layer_states: torch.Tensor | None = None,
        encoder_token_embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


@runtime_checkable
class OutputHead(Protocol):
    """Seam 4: the top decoder state -> logits, and the loss with its ``LossTerms`` (seam 5).
    ``project`` is the model's tied output projection, so every head uses the same weights."""

    def forward(
        self,
        project: Callable[[torch.Tensor], torch.Tensor],
        decoder_hidden_states: torch.Tensor,
        context: HeadContext,
    ) -> HeadOutput: ...


@runtime_checkable
class OwnInitialisation(Protocol):
    """A module whose parameters or buffers have an initialisation of their own (a paper's, or a
    derived table), applied by ``_init_weights`` and skipped for weights loaded from a checkpoint."""

    def init_own_weights(self) -> None: ...


DEPTH_CONNECTIONS: dict[str, ConnectionSpec] = {
    "residual": ConnectionSpec(ResidualConnection, FusionEncoderLayer, FusionDecoderLayer),
    "dlcl": ConnectionSpec(DLCLConnection, FusionEncoderLayer, FusionDecoderLayer),
    "depthwise_lstm": ConnectionSpec(DepthwiseLSTMConnection, DepthwiseLSTMEncoderLayer, DepthwiseLSTMDecoderLayer),
}
ENCODER_MEMORIES: dict[str, Callable[[FusionTransformerConfig], EncoderMemory]] = {
    "last": LastLayerMemory,
    "transparent": TransparentAttentionMemory,
    "fine_grained": FineGrainedLayerAttentionMemory,
}
OUTPUT_HEADS: dict[str, Callable[[FusionTransformerConfig], OutputHead]] = {
    "lm": LMHead,
    "surface_fusion": SurfaceFusionHead,
}
SEAM_TABLES: dict[str, dict[str, Any]] = {
    "sharing_strategy": EXECUTION_PLANS,
    "depth_connection": DEPTH_CONNECTIONS,
    "encoder_memory": ENCODER_MEMORIES,
    "output_head": OUTPUT_HEADS,
}
# The allowed values of every seam key, in table order.
SEAM_CHOICES: dict[str, tuple[str, ...]] = {key: tuple(table) for key, table in SEAM_TABLES.items()}

__all__ = [
    "DEPTH_CONNECTIONS",
    "ENCODER_MEMORIES",
    "EXECUTION_PLANS",
    "OUTPUT_HEADS",
    "SEAM_CHOICES",
    "SEAM_TABLES",
    "ConnectionSpec",
    "DepthConnection",
    "EncoderMemory",
    "ExecutionPlan",
    "LossTerms",
    "OutputHead",
    "OwnInitialisation",
]
