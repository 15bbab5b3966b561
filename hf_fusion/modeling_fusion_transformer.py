"""The hf_fusion seq2seq Transformer: one readable core with five seams.

Read top to bottom: outputs, pretrained base, encoder, decoder, model, LM model. The vanilla
configuration is BART / mBART / Marian exactly (same math, same checkpoint keys). A model family
changes the core only through a seam, chosen by a config key and looked up in that seam's table
(``seams.py``, which also writes each seam's interface down):

    1. execution plan     ``config.encoder_plan`` / ``decoder_plan``: depth step -> parameter block
    2. depth connection   ``DEPTH_CONNECTIONS``: residual stream (and the layers that fit it)
    3. encoder memory     ``ENCODER_MEMORIES``: what each decoder step's cross-attention reads
    4. output head        ``OUTPUT_HEADS``: top decoder state -> logits and loss
    5. loss terms         ``loss_terms`` in the output, logged beside the loss; E2S2 wraps the model

Structure is decided in ``__init__`` from the config; ``forward`` only runs the plan. Caches are
``EncoderDecoderCache`` with one slot per depth *step* (never per parameter block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import can_return_tuple

from .compat import cache_output, check_forward_kwargs, output_cache, resolve_cache
from .configuration_fusion_transformer import FusionTransformerConfig
from .heads import HeadContext
from .layers import ScaledWordEmbedding, build_position_embedding, causal_mask, embedding_scale, kernel_mask, padding_mask
from .seams import DEPTH_CONNECTIONS, ENCODER_MEMORIES, OUTPUT_HEADS, OwnInitialisation


def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Teacher forcing input: labels shifted one step right behind the start token, -100 -> pad."""
    shifted = input_ids.new_zeros(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1].clone()
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


@dataclass
class FusionEncoderOutput(BaseModelOutput):
    """Encoder output plus what the fusion seams read.

    Args:
        layer_states: ``(batch, num_encoder_layers + 1, src_len, d_model)``: the embedding layer
            output and every step's state (the top one before or after the final LayerNorm, as
            ``fusion_top_layer_norm`` says), kept only when the memory provider needs them. Batch
            first so ``generate`` expands it for beam search like any other encoder tensor.
        token_embeddings: ``(batch, src_len, d_model)`` scaled token embeddings without positions.
    """

    layer_states: torch.Tensor | None = None
    token_embeddings: torch.Tensor | None = None


@dataclass
class FusionDecoderOutput(BaseModelOutputWithPastAndCrossAttentions):
    """Decoder output plus what the output heads read: ``top_layer_state``, the last step's state
    before the stack's final LayerNorm (equal to ``last_hidden_state`` in post-norm models), and
    ``step_states``, the embedding output and every step's state, none of them normalised by the
    final LayerNorm (kept whether or not ``output_hidden_states`` is set; they are references to
    tensors the forward computes anyway)."""

    top_layer_state: torch.Tensor | None = None
    step_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class FusionSeq2SeqLMOutput(Seq2SeqLMOutput):
    """``Seq2SeqLMOutput`` plus ``loss_terms``: named components of the loss (seam 5), logged
    separately by the training tools. ``None`` unless the head has terms to report, so the tuple
    form (``return_dict=False``) is BART's."""

    loss_terms: dict[str, torch.Tensor] | None = None


class FusionTransformerPreTrainedModel(PreTrainedModel):
    """Weights initialisation and the HF capabilities every hf_fusion model shares."""

    config_class = FusionTransformerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    # Every layer class a depth connection can bring (device_map="auto" keeps each on one device).
    _no_split_modules = ["FusionEncoderLayer", "FusionDecoderLayer", "DepthwiseLSTMEncoderLayer", "DepthwiseLSTMDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _keys_to_ignore_on_load_unexpected = [r"embed_positions\.weight"]
    # Every kernel of the HF attention interface; ``layers.kernel_mask`` gives each its mask form.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    # generate(cache_implementation="static") preallocates the self-attention cache; the decoder
    # then receives a 4-D mask over the whole cache (see ``layers.causal_mask``).
    _can_compile_fullgraph = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, with a corrupt weights file reported as such
        instead of as a bare safetensors deserialisation error."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            raise OSError(
                f"The weights of {str(pretrained_model_name_or_path)!r} cannot be read: the safetensors file is "
                f"corrupt or truncated ({error}). Re-download or re-save the checkpoint."
            ) from error

    def _init_weights(self, module: nn.Module) -> None:
        """HF's initialisation, then each module's own (``seams.OwnInitialisation``: the paper
        initialisations of layer-mixing weights, derived tables, the zero logits bias)."""
        super()._init_weights(module)
        if isinstance(module, OwnInitialisation):
            module.init_own_weights()


def build_token_embedding(config: FusionTransformerConfig) -> ScaledWordEmbedding:
    """One stack's token embedding. Encoder, decoder and model each own one, as in BART, and
    ``_tied_weights_keys`` ties them to ``model.shared``: a module registered under three names
    would hide a missing ``shared.weight`` from the loader."""
    return ScaledWordEmbedding(config.vocab_size, config.d_model, config.pad_token_id, embedding_scale(config))


class FusionStack(nn.Module):
    """What the encoder and the decoder share: token and position embeddings (with the optional
    embedding LayerNorm), the parameter blocks the stack's execution plan runs, the depth
    connection joining them, and the optional final LayerNorm. Attribute names are BART's
    checkpoint keys.

    Args:
        config: The model config.
        stack: ``"encoder"`` or ``"decoder"``.
    """

    def __init__(self, config: FusionTransformerConfig, stack: str):
        super().__init__()
        spec = DEPTH_CONNECTIONS[config.depth_connection]
        layer_class = spec.encoder_layer if stack == "encoder" else spec.decoder_layer
        self.config = config
        self.dropout = config.dropout
        self.embed_tokens = build_token_embedding(config)
        self.embed_positions = build_position_embedding(config)
        self.layernorm_embedding = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.layernorm_embedding else None
        self.plan = getattr(config, f"{stack}_plan")
        self.layers = nn.ModuleList([layer_class(config) for _ in range(getattr(config, f"{stack}_unique_layers"))])
        self.connection = spec.connection(config, getattr(config, f"{stack}_layers"))
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.add_final_layer_norm else None

    def attention_kernel(self, output_attentions: bool) -> str:
        """The attention implementation this call's masks are built for: eager when attention
        weights are asked for (only eager returns them), else the configured one."""
        return "eager" if output_attentions else self.config._attn_implementation

    def embed(self, inputs_embeds: torch.Tensor, past_len: int | torch.Tensor, side: str) -> torch.Tensor:
        """Token embeddings (batch, len, d_model) + positions from ``past_len`` on, then the
        embedding LayerNorm and dropout: the input of the first depth step."""
        hidden_states = inputs_embeds + self.embed_positions(inputs_embeds.shape[1], past_len, side=side)
        if self.layernorm_embedding is not None:
            hidden_states = self.layernorm_embedding(hidden_states)
        return nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)


class FusionTransformerEncoder(FusionStack):
    """Embeddings, then the encoder steps of the execution plan through the depth connection.

    Args:
        config: The model config.
        needs_layer_states: Keep every layer's state for the encoder-memory seam.
    """

    def __init__(self, config: FusionTransformerConfig, needs_layer_states: bool):
        super().__init__(config, "encoder")
        self.needs_layer_states = needs_layer_states

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> FusionEncoderOutput | tuple:
        """Args:
            input_ids: (batch, src_len) token ids, or ``inputs_embeds`` (batch, src_len, d_model).
            attention_mask: (batch, src_len), 1 for tokens, 0 for padding.

        No ``**kwargs``: ``generate`` then passes the encoder only the arguments it names.
        """
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds to the encoder.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        hidden_states = self.embed(inputs_embeds, past_len=0, side="source (encoder)")
        batch, src_len = hidden_states.shape[:2]
        mask = kernel_mask(
            self.attention_kernel(output_attentions), padding_mask(attention_mask), attention_mask, batch, src_len, src_len,
            causal=False, device=hidden_states.device,
        )

        state = self.connection.start(hidden_states)
        layer_states = [self.connection.hidden(state)]
        attentions = []
        for step_idx, block_idx in enumerate(self.plan):
            layer_output, weights = self.layers[block_idx](
                self.connection.layer_input(state, step_idx), attention_mask=mask, output_attentions=output_attentions
            )
            state = self.connection.update(state, layer_output, step_idx)
            layer_states.append(self.connection.hidden(state))
            attentions.append(weights[0])
        top_state = self.connection.finish(state)
        hidden_states = top_state if self.layer_norm is None else self.layer_norm(top_state)
        # X^N as the fusion reads it: the output, or the raw top state (``fusion_top_layer_norm``).
        fused_top = top_state if self.config.fusion_top_layer_norm is False else hidden_states
        layer_states[-1] = hidden_states

        output = FusionEncoderOutput(
            last_hidden_state=hidden_states,
            hidden_states=tuple(layer_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            layer_states=torch.stack([*layer_states[:-1], fused_top], dim=1) if self.needs_layer_states else None,
            token_embeddings=inputs_embeds,
        )
        return output if return_dict is not False else output.to_tuple()


class FusionTransformerDecoder(FusionStack):
    """Causal decoder: each step runs its parameter block with its own cache slot and reads the
    memory the encoder-memory seam gives it. Without encoder states (a decoder used on its own)
    the cross-attention sub-layers are skipped, as in BART.

    Args:
        config: The model config.
        memory: The encoder-memory provider.
    """

    def __init__(self, config: FusionTransformerConfig, memory: nn.Module):
        super().__init__(config, "decoder")
        self.memory = memory

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        encoder_layer_states: torch.Tensor | None = None,
        encoder_token_embeddings: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> FusionDecoderOutput | tuple:
        """Args:
            input_ids: (batch, tgt_len) decoder input ids (only the new ones when cached).
            attention_mask: (batch, past_len + tgt_len) decoder padding mask, or the 4-D
                (batch, 1, tgt_len, kv_len) mask ``generate`` builds for a static cache.
            encoder_hidden_states: (batch, src_len, d_model) top encoder output.
            encoder_attention_mask: (batch, src_len) source padding mask.
            encoder_layer_states / encoder_token_embeddings: see :class:`FusionEncoderOutput`.
            past_key_values / cache: ``EncoderDecoderCache`` with one slot per decoder step
                (``cache`` is the name transformers uses from 5.24).
        """
        check_forward_kwargs(kwargs, type(self).__name__)
        cache = resolve_cache(past_key_values, cache)
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of decoder_input_ids or decoder_inputs_embeds to the decoder.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
        if cache is not None and not isinstance(cache, EncoderDecoderCache):
            raise TypeError(
                f"The decoder cache must be an EncoderDecoderCache (self- and cross-attention), got {type(cache).__name__}."
            )
        tgt_len = inputs_embeds.shape[1]
        past_len = cache.get_seq_length() if cache is not None else 0
        kv_len = cache.get_mask_sizes(tgt_len, 0)[0] if cache is not None else tgt_len

        hidden_states = self.embed(inputs_embeds, past_len, side="target (decoder)")
        kernel, batch, device = self.attention_kernel(output_attentions), inputs_embeds.shape[0], inputs_embeds.device
        self_padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        self_mask = kernel_mask(
            kernel, causal_mask(tgt_len, past_len, kv_len, attention_mask, device), self_padding, batch, tgt_len, kv_len,
            causal=True, device=device,
        )
        cross_mask = None
        if encoder_attention_mask is not None:
            cross_mask = kernel_mask(
                kernel, padding_mask(encoder_attention_mask), encoder_attention_mask, batch, tgt_len,
                encoder_attention_mask.shape[-1], causal=False, device=device,
            )

        state = self.connection.start(hidden_states)
        all_hidden = [self.connection.hidden(state)]
        self_attentions, cross_attentions = [], []
        for step_idx, block_idx in enumerate(self.plan):
            memory = encoder_hidden_states
            cross_cached = cache is not None and cache.is_updated.get(step_idx, False)
            if encoder_hidden_states is not None and not cross_cached:
                memory = self.memory(step_idx, encoder_hidden_states, encoder_layer_states, encoder_token_embeddings)
            layer_output, (self_weights, cross_weights) = self.layers[block_idx](
                self.connection.layer_input(state, step_idx),
                self_mask,
                memory,  # positional, so reentrant gradient checkpointing still reaches the encoder
                encoder_attention_mask=cross_mask,
                past_key_values=cache,
                cache_idx=step_idx,
                output_attentions=output_attentions,
            )
            state = self.connection.update(state, layer_output, step_idx)
            all_hidden.append(self.connection.hidden(state))
            self_attentions.append(self_weights)
            cross_attentions.append(cross_weights)
        top_layer_state = self.connection.finish(state)
        hidden_states = top_layer_state if self.layer_norm is None else self.layer_norm(top_layer_state)
        step_states = tuple(all_hidden)
        all_hidden[-1] = hidden_states

        output = FusionDecoderOutput(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(self_attentions) if output_attentions else None,
            cross_attentions=tuple(cross_attentions) if output_attentions and encoder_hidden_states is not None else None,
            top_layer_state=top_layer_state,
            step_states=step_states,
            **cache_output(cache if use_cache else None),
        )
        return output if return_dict is not False else output.to_tuple()


class FusionTransformerModel(FusionTransformerPreTrainedModel):
    """Shared embedding, encoder and decoder, without an output head."""

    _tied_weights_keys = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
    }

    def __init__(self, config: FusionTransformerConfig):
        super().__init__(config)
        self.shared = build_token_embedding(config)
        memory = ENCODER_MEMORIES[config.encoder_memory](config)
        self.encoder = FusionTransformerEncoder(config, memory.needs_layer_states)
        self.decoder = FusionTransformerDecoder(config, memory)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.shared = value
        self.encoder.embed_tokens = value
        self.decoder.embed_tokens = value

    def get_encoder(self, modality: str | None = None) -> FusionTransformerEncoder:
        return self.encoder

    def get_decoder(self) -> FusionTransformerDecoder:
        return self.decoder

    def encode_decode(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: FusionEncoderOutput | tuple | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> tuple[FusionEncoderOutput, FusionDecoderOutput]:
        """Encode (unless ``encoder_outputs`` are given) and decode; returns both stacks' outputs
        with the extras the seams read (encoder layer states and token embeddings, the decoder's
        pre-norm top state). Without decoder inputs the source is shifted right and decoded, as
        BART's denoising pre-training does."""
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Pass decoder_input_ids, decoder_inputs_embeds or input_ids (to shift right).")
            decoder_input_ids = shift_tokens_right(input_ids, self.config.pad_token_id, self.config.decoder_start_token_id)
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
            )
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = FusionEncoderOutput(
                last_hidden_state=encoder_outputs[0],
                hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
                attentions=encoder_outputs[2] if len(encoder_outputs) > 2 else None,
            )
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            encoder_layer_states=getattr(encoder_outputs, "layer_states", None),
            encoder_token_embeddings=getattr(encoder_outputs, "token_embeddings", None),
            cache=cache,
            inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        return encoder_outputs, decoder_outputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: FusionEncoderOutput | tuple | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> Seq2SeqModelOutput:
        """BART's ``BartModel.forward``: the decoder's last hidden state plus everything
        ``Seq2SeqModelOutput`` carries (``cache`` is ``past_key_values``' name from 5.24)."""
        check_forward_kwargs(kwargs, type(self).__name__)
        encoder_outputs, decoder_outputs = self.encode_decode(
            input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            cache=resolve_cache(past_key_values, cache),
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
            **cache_output(output_cache(decoder_outputs)),
        )


class FusionTransformerForConditionalGeneration(FusionTransformerPreTrainedModel, GenerationMixin):
    """The seq2seq model with its output head, ready for ``Seq2SeqTrainer`` and ``generate``."""

    _tied_weights_keys = {"lm_head.weight": "model.shared.weight"}
    _keys_to_ignore_on_load_missing = ["final_logits_bias"]

    def __init__(self, config: FusionTransformerConfig):
        super().__init__(config)
        self.model = FusionTransformerModel(config)
        self.final_logits_bias = nn.Buffer(torch.zeros((1, config.vocab_size)))
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.output_head = OUTPUT_HEADS[config.output_head](config)
        self.post_init()

    def get_encoder(self, modality: str | None = None) -> FusionTransformerEncoder:
        return self.model.encoder

    def get_decoder(self) -> FusionTransformerDecoder:
        return self.model.decoder

    def init_own_weights(self) -> None:
        """``final_logits_bias`` starts at zero (BART's convention)."""
        init.zeros_(self.final_logits_bias)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """``PreTrainedModel.resize_token_embeddings`` that also resizes ``final_logits_bias``
        (new entries 0), as BART does; otherwise the projection and its bias disagree in size."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        new_size = embeddings.weight.shape[0]
        old_bias = self.final_logits_bias
        bias = old_bias.new_zeros((1, new_size))
        keep = min(new_size, old_bias.shape[-1])
        bias[:, :keep] = old_bias[:, :keep]
        self.final_logits_bias = nn.Buffer(bias)
        return embeddings

    def project(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The tied output projection ``E h + b``: (..., d_model) -> (..., vocab)."""
        return self.lm_head(hidden_states) + self.final_logits_bias.to(hidden_states.dtype)

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: FusionEncoderOutput | tuple | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> FusionSeq2SeqLMOutput:
        """Args beyond BART's: ``num_items_in_batch`` (from the Trainer) normalises the summed loss
        over an accumulated batch; ``cache`` is ``past_key_values``' name from transformers 5.24.
        Returns logits (batch, tgt_len, vocab), the head's loss, and its ``loss_terms``."""
        check_forward_kwargs(kwargs, type(self).__name__)
        if labels is not None:
            use_cache = False
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        encoder_outputs, decoder_outputs = self.model.encode_decode(
            input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            cache=resolve_cache(past_key_values, cache),
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        context = HeadContext(
            labels=labels,
            num_items_in_batch=num_items_in_batch,
            decoder_top_layer_state=decoder_outputs.top_layer_state,
            decoder_step_states=decoder_outputs.step_states,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_token_embeddings=getattr(encoder_outputs, "token_embeddings", None),
            encoder_attention_mask=attention_mask,
        )
        head = self.output_head(self.project, decoder_outputs.last_hidden_state, context)
        return FusionSeq2SeqLMOutput(
            loss=head.loss,
            logits=head.logits,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
            loss_terms=head.loss_terms or None,
            **cache_output(output_cache(decoder_outputs)),
        )


__all__ = [
    "FusionTransformerPreTrainedModel",
    "FusionTransformerModel",
    "FusionTransformerForConditionalGeneration",
    "FusionEncoderOutput",
    "FusionSeq2SeqLMOutput",
    "shift_tokens_right",
]
