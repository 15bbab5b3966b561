"""Configuration of the depth-wise LSTM family (``model_type = "depthwise_lstm"``).

Paper: Xu et al., "Rewiring the Transformer with Depth-Wise LSTMs", arXiv 2007.06257. The model
code is the core's, with seam 2 set to ``depth_connection = "depthwise_lstm"`` (the layers and the
connection live in ``depthwise_lstm.py``, whose docstring lists the design choices). This config
only fixes that seam and changes one default: ``add_final_layer_norm = True``, because the LSTM
output ``h = o * c`` is not normalised and its scale grows with depth (Neutron normalises the
stack outputs too).
"""

from __future__ import annotations

from .configuration_fusion_transformer import FusionTransformerConfig, check_choice


class DepthwiseLSTMConfig(FusionTransformerConfig):
    r"""Configuration of [`DepthwiseLSTMModel`]: a FusionTransformer whose layers are joined by a
    depth-wise LSTM instead of residual connections.

    Accepts every [`FusionTransformerConfig`] field (so it composes with parameter sharing,
    encoder-memory and output-head choices). Differences:

    Args:
        depth_connection: Always ``"depthwise_lstm"`` (a residual model is the vanilla
            ``fusion_transformer`` family).
        dlstm_decoder_mode / dlstm_gate_norm / dlstm_activation / dlstm_candidate /
            dlstm_attention_residual: the cell's options, defaulting to the authors' cell
            (``"concat"``, ``"joint"``, ``"tanh"``, ``"linear"``, ``True``); see ``depthwise_lstm.py``.
        add_final_layer_norm: Defaults to ``True`` here.

    Example: recurrent stacking of one depth-wise LSTM layer::

        DepthwiseLSTMConfig(sharing_strategy="recurrent", encoder_layers=6, decoder_layers=6)
    """

    model_type = "depthwise_lstm"

    depth_connection: str = "depthwise_lstm"
    add_final_layer_norm: bool = True

    def validate_fields(self) -> None:
        check_choice(type(self).__name__, "depth_connection", self.depth_connection, ("depthwise_lstm",))
        super().validate_fields()


__all__ = ["DepthwiseLSTMConfig"]
