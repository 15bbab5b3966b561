"""Write golden checkpoints: tiny saved models plus the outputs they gave when saved.

Usage: ``.venv/bin/python scripts/make_golden.py [VARIANT ...] [--out tests/golden] [--prefix NAME_]``

Each golden is a folder ``tests/golden/<prefix><variant>/`` holding exactly what ``save_pretrained``
writes (weights, config with ``auto_map``, the model code of the day) plus ``golden.safetensors``
(fixed inputs, teacher-forced logits, greedy and beam-search sequences) and ``golden.json`` (the
versions it was saved with). ``tests/test_golden_checkpoints.py`` loads every golden with
``trust_remote_code`` in a process that cannot import hf_fusion, under whatever transformers is
installed, and checks it reproduces those outputs. Goldens are written once per model-code era and
then never regenerated: they are the checkpoints users already have.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import hf_fusion  # noqa: E402  (registers the families)
from transformers import AutoConfig, AutoModelForSeq2SeqLM  # noqa: E402

TINY = dict(
    vocab_size=99,
    d_model=16,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    max_position_embeddings=64,
)
# variant -> (model_type, config overrides)
VARIANTS: dict[str, tuple[str, dict]] = {
    "fusion_transformer": ("fusion_transformer", {}),
    "fusion_transformer_prenorm_sinusoidal": (
        "fusion_transformer",
        {"normalize_before": True, "position_embedding_type": "sinusoidal", "scale_embedding": True, "add_final_layer_norm": True},
    ),
    "encoder_fusion_transparent": ("encoder_fusion", {"fusion_mode": "transparent"}),
    "encoder_fusion_fine_grained": ("encoder_fusion", {"fusion_mode": "fine_grained"}),
    "encoder_fusion_dlcl": ("encoder_fusion", {"fusion_mode": "dlcl"}),
    "surface_fusion_hard": ("surface_fusion", {}),
    "surface_fusion_soft_gate": ("surface_fusion", {"surface_fusion_mode": "soft"}),
    "recurrent_stacking_cycle_rev": (
        "recurrent_stacking",
        {"encoder_layers": 3, "decoder_layers": 3, "sharing_strategy": "cycle_rev", "encoder_unique_layers": 2,
         "decoder_unique_layers": 2},
    ),
    "depthwise_lstm": ("depthwise_lstm", {}),
}
NEW_TOKENS = 8


def golden_inputs() -> dict[str, torch.Tensor]:
    """Fixed source ids (one padded row) and teacher-forcing decoder inputs."""
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, TINY["vocab_size"], (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 1)
    decoder_input_ids = torch.randint(3, TINY["vocab_size"], (3, 6), generator=generator)
    decoder_input_ids[:, 0] = 2
    return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids}


def expected_outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Teacher-forced logits, greedy and beam-3 sequences (uncached, so they are right on any release)."""
    source = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
        greedy = model.generate(**source, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                num_beams=1, use_cache=False)
        beam = model.generate(**source, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              num_beams=3, use_cache=False)
    outputs = {**inputs, "logits": logits.float(), "greedy": greedy, "beam": beam}
    return {name: tensor.contiguous() for name, tensor in outputs.items()}


def write_golden(name: str, model_type: str, overrides: dict, out: Path) -> Path:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    model = AutoModelForSeq2SeqLM.from_config(config).eval()
    # Spread the weights a little beyond the initialisation so that outputs are far from uniform.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    folder = out / name
    model.save_pretrained(folder)
    save_file(expected_outputs(model, golden_inputs()), folder / "golden.safetensors")
    (folder / "golden.json").write_text(
        json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                    "hf_fusion_model_type": model_type, "overrides": overrides}, indent=2) + "\n"
    )
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tests" / "golden")
    parser.add_argument("--prefix", default="", help="folder name prefix, e.g. the code era")
    args = parser.parse_args()
    for variant in args.variants:
        model_type, overrides = VARIANTS[variant]
        print(write_golden(args.prefix + variant, model_type, overrides, args.out))


if __name__ == "__main__":
    main()
