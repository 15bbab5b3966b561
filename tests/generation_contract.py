"""hf_fusion's generation contract, run as transformers' ``GenerationTesterMixin`` stand-in.

transformers' sdist does not ship ``tests/generation/test_utils.py``, so these are our own checks,
written to the standard that matters: for every decoding strategy, the logits ``generate`` computed
at each step (``output_logits=True``) must equal the logits of one teacher-forced forward over the
generated sequence with ``use_cache=False``, within 1e-5. Comparing tokens is not enough: a tiny
random model repeats one token, so a broken cache agrees by accident. ``min_new_tokens`` keeps EOS
from ending the comparison early, and one source row is padded so that masks are exercised.

The mixin runs in the same classes as ``ModelTesterMixin`` (``tests/test_transformers_contract.py``),
for BART as the control and for every hf_fusion family and mode.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import transformers
from transformers.utils import logging as hf_logging

from hf_fusion.compat import CACHE_FIELD

NEW_TOKENS = 8
ATOL = 1e-5
# Deprecations a model's own code can cause (the cache's old names); transformers' internal ones,
# e.g. assisted decoding passing both a generation config and arguments, are not the model's.
MODEL_FACING_NAMES = ("past_key_values", "cache_params")


@contextmanager
def no_deprecation_messages() -> Iterator[None]:
    """Fail if transformers logs or warns about anything deprecated inside the block (its
    ``warning_once`` cache is cleared first, so a message shown earlier in the process counts)."""
    hf_logging.warning_once.cache_clear()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logger.removeHandler(handler)
    messages = [record.getMessage() for record in records] + [str(warning.message) for warning in caught]
    deprecated = [
        message
        for message in messages
        if "deprecat" in message.lower() and any(name in message for name in MODEL_FACING_NAMES)
    ]
    assert not deprecated, f"deprecation messages about the model's interface during generation: {deprecated}"


class GenerationContractMixin:
    """Step logits of greedy, sampling, beam, assisted and static-cache generation against a
    teacher-forced forward, for every class in ``all_generative_model_classes``."""

    def _generation_inputs(self) -> tuple[transformers.PreTrainedConfig, dict[str, torch.Tensor]]:
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        input_ids = inputs["input_ids"][:4].clone()
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, -2:] = 0  # one padded source row
        input_ids = input_ids.masked_fill(attention_mask == 0, config.pad_token_id)
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}

    def _teacher_forced(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], sequences: torch.Tensor) -> torch.Tensor:
        """Logits of one uncached forward over ``sequences`` (rows, 1 + new): (rows, new, vocab);
        with several sequences per source the source rows are repeated."""
        repeats = sequences.shape[0] // inputs["input_ids"].shape[0]
        inputs = {name: tensor.repeat_interleave(repeats, dim=0) for name, tensor in inputs.items()}
        with torch.no_grad():
            return model(**inputs, decoder_input_ids=sequences[:, :-1], use_cache=False).logits.float()

    def _check_generate(self, strategy: str, **generate_kwargs) -> None:
        for model_class in self.all_generative_model_classes:
            config, inputs = self._generation_inputs()
            torch.manual_seed(0)
            model = model_class(config).eval()
            if strategy == "assisted":
                inputs = {name: tensor[:1] for name, tensor in inputs.items()}  # assisted decoding: batch 1
                torch.manual_seed(1)
                generate_kwargs["assistant_model"] = model_class(config).eval()
            torch.manual_seed(0)
            with torch.no_grad(), no_deprecation_messages():
                out = model.generate(
                    **inputs,
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    return_dict_in_generate=True,
                    output_logits=True,
                    **generate_kwargs,
                )
            if generate_kwargs.get("use_cache", True) and strategy != "assisted":
                # The cache generate got back holds every decoded position: it was really used.
                cache = getattr(out, CACHE_FIELD)
                self.assertEqual(int(cache.get_seq_length()), out.sequences.shape[1] - 1, f"{model_class.__name__} {strategy}")
            expected = self._teacher_forced(model, inputs, out.sequences)
            steps = torch.stack(out.logits, dim=1).float()  # (batch * beams, new, vocab)
            if getattr(out, "beam_indices", None) is not None:
                # Beam search reorders beams: follow each returned sequence back through its beams.
                beam_indices = out.beam_indices[:, : steps.shape[1]]
                steps = steps[beam_indices, torch.arange(steps.shape[1])[None, :]]
            self.assertEqual(steps.shape, expected.shape, f"{model_class.__name__} {strategy}")
            difference = (steps - expected).abs().max().item()
            self.assertLessEqual(
                difference, ATOL, f"{model_class.__name__}: {strategy} step logits differ from teacher forcing by {difference:.2e}"
            )

    def test_generate_greedy_step_logits_equal_teacher_forcing(self) -> None:
        self._check_generate("greedy", do_sample=False, num_beams=1)

    def test_generate_sample_step_logits_equal_teacher_forcing(self) -> None:
        self._check_generate("sample", do_sample=True, top_k=0, num_beams=1)

    def test_generate_beam_search_step_logits_equal_teacher_forcing(self) -> None:
        self._check_generate("beam", do_sample=False, num_beams=3, num_return_sequences=2)

    def test_generate_assisted_step_logits_equal_teacher_forcing(self) -> None:
        self._check_generate("assisted", do_sample=False, num_beams=1)

    def test_generate_static_cache_step_logits_equal_teacher_forcing(self) -> None:
        self._check_generate("static", do_sample=False, num_beams=1, cache_implementation="static")

    def test_generate_without_cache_step_logits_equal_teacher_forcing(self) -> None:
        self._check_generate("uncached", do_sample=False, num_beams=1, use_cache=False)
