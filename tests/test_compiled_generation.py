"""The fast generation path: a static key/value cache and a compiled decoding step.

``generate(cache_implementation="static", compile_config=...)`` preallocates the self-attention
cache, hands the decoder 4-D masks and runs every decoding step through one ``torch.compile``d
graph (``fullgraph=True``: any graph break fails). On every family the compiled steps' logits
must equal a teacher-forced forward (an independent, eager, uncached computation).
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation import CompileConfig

from tests.helpers import FAMILIES, build_tiny, random_batch

pytestmark = pytest.mark.slow  # not in make test-fast



@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_compiled_static_cache_decoding_equals_teacher_forcing(model_type: str) -> None:
    model = build_tiny(model_type, **FAMILIES[model_type]).eval()
    batch = random_batch()
    source = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    compile_config = CompileConfig(fullgraph=True, dynamic=False)
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only by default
    out = model.generate(
        **source, max_new_tokens=6, min_new_tokens=6, do_sample=False, cache_implementation="static",
        compile_config=compile_config, output_logits=True, return_dict_in_generate=True,
    )
    assert hasattr(model, "_compiled_call"), "generate did not compile the decoding step"
    with torch.no_grad():
        expected = model(**source, decoder_input_ids=out.sequences[:, :-1], use_cache=False).logits.float()
    torch.testing.assert_close(torch.stack(out.logits, dim=1).float(), expected, atol=1e-5, rtol=1e-5)
