"""What changes between transformers releases, decided once at import time.

The model code is copied next to every checkpoint and must run under whatever transformers the
user has, from the floor in ``pyproject.toml`` to the newest release. Everything that differs
between releases is resolved here, so the modeling files read the same on every release:

- **The key/value cache's name.** Up to 5.23 ``generate`` passes the cache to ``forward`` as
  ``past_key_values`` and outputs carry it under that name; from 5.24 both are ``cache`` (the old
  names still work through a shim that logs a deprecation warning). A ``forward(**kwargs)`` that
  knew only one name would silently drop the other and decode every step with an empty cache, so
  every forward accepts both names (:func:`resolve_cache`) and every output is built with the field
  the running release declares (:data:`CACHE_FIELD`), which keeps transformers' shim silent.
- **Keyword arguments nobody asked for.** ``**kwargs`` in our forwards carries only names that
  ``generate`` and the Trainer are known to pass and that these models may ignore
  (:data:`IGNORED_FORWARD_KWARGS`); anything else is refused by :func:`check_forward_kwargs`, so the
  next rename fails loudly instead of producing wrong output.
"""

from __future__ import annotations

import warnings
from dataclasses import fields
from typing import Any

from transformers.cache_utils import Cache
from transformers.modeling_outputs import Seq2SeqLMOutput

# The transformers releases the model code was tested on (docs/transformers_contract.md): the floor
# of pyproject.toml and the newest release at the last submission. Model cards state this range.
TESTED_TRANSFORMERS_RELEASES: tuple[str, ...] = ("5.23.0", "5.24.0")

# "cache" from transformers 5.24, "past_key_values" before.
CACHE_FIELD: str = "cache" if any(field.name == "cache" for field in fields(Seq2SeqLMOutput)) else "past_key_values"

# Names transformers may pass to a seq2seq forward that carry nothing these models need:
# positions are derived from the cache length (absolute positions, no packing), and the rest are
# switches of other architectures that generic code forwards to every model.
IGNORED_FORWARD_KWARGS: frozenset[str] = frozenset(
    {
        "position_ids",
        "decoder_position_ids",
        "cache_position",
        "head_mask",
        "decoder_head_mask",
        "cross_attn_head_mask",
        "logits_to_keep",
        "token_type_ids",
    }
)


def resolve_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    """The cache passed under either name (``past_key_values`` up to 5.23, ``cache`` from 5.24).

    On a release that renamed it, a caller still using ``past_key_values`` gets the same
    ``FutureWarning`` transformers' own models give, and the call works.

    Raises:
        ValueError: if two different caches were passed.
    """
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("Pass the key/value cache once, as `cache` or as `past_key_values`, not both.")
    if past_key_values is not None and CACHE_FIELD == "cache":
        warnings.warn(
            "`past_key_values` is deprecated in this transformers release and will be removed; pass `cache` instead.",
            FutureWarning,
            stacklevel=3,
        )
    return cache if cache is not None else past_key_values


def cache_output(cache: Cache | None) -> dict[str, Cache | None]:
    """``{field: cache}`` for building a model output under the running release's cache name."""
    return {CACHE_FIELD: cache}


def output_cache(output: Any) -> Cache | None:
    """Read the cache of a model output without touching a deprecated attribute."""
    return getattr(output, CACHE_FIELD, None)


def check_forward_kwargs(kwargs: dict[str, Any], where: str) -> None:
    """Refuse keyword arguments that a forward would otherwise swallow silently.

    Raises:
        TypeError: naming the unexpected arguments and ``where`` they were passed.
    """
    unexpected = sorted(set(kwargs) - IGNORED_FORWARD_KWARGS)
    if unexpected:
        raise TypeError(
            f"{where}.forward() got unexpected keyword argument(s) {', '.join(map(repr, unexpected))}. If a newer "
            "transformers release passes them, hf_fusion's model code needs updating: please report it."
        )
