"""How token-specific are the top states of a deep model at initialisation?

Companion to ``deep_convergence.py``, which found the 24+24-layer depth-wise LSTM with the
``"linear"`` candidate stuck at the unigram loss. The suspected cause: a ReLU candidate is
non-negative, so the cell ``c = f * c + i * c_hat`` sums non-negative vectors over depth and its
direction converges to one shared vector, whatever the token. If the top decoder states of all
tokens point the same way, the output layer can only learn token frequencies -- the unigram loss.

Measured here, for freshly initialised models of the benchmark's size (random token ids, no
training): the mean cosine similarity between the outputs of different tokens -- the encoder
output the cross-attention reads and the decoder output the LM head reads (after the final
LayerNorm where the model has one) -- next to the same number for the embeddings. Values near 1
mean the outputs barely depend on the input. A few seconds on a CPU::

    PYTHONPATH=. python benchmarks/dlstm_init_diagnostic.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hf_fusion import (
    DepthwiseLSTMConfig,
    DepthwiseLSTMForConditionalGeneration,
    FusionTransformerConfig,
    FusionTransformerForConditionalGeneration,
)


def mean_pairwise_cosine(states: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of distinct vectors of ``(..., d)`` states."""
    vectors = torch.nn.functional.normalize(states.reshape(-1, states.shape[-1]), dim=-1)  # (n, d)
    n = vectors.shape[0]
    return float(((vectors @ vectors.T).sum() - n) / (n * n - n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    common = dict(
        vocab_size=2000,
        d_model=args.d_model,
        encoder_layers=args.layers,
        decoder_layers=args.layers,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=4 * args.d_model,
        decoder_ffn_dim=4 * args.d_model,
        max_position_embeddings=32,
        dropout=0.0,
    )
    builders = {
        "residual_postnorm": lambda: FusionTransformerForConditionalGeneration(FusionTransformerConfig(**common)),
        "depthwise_lstm (linear, relu)": lambda: DepthwiseLSTMForConditionalGeneration(DepthwiseLSTMConfig(**common)),
        "depthwise_lstm (linear, gelu)": lambda: DepthwiseLSTMForConditionalGeneration(
            DepthwiseLSTMConfig(**common, dlstm_activation="gelu")
        ),
        "depthwise_lstm_ffn": lambda: DepthwiseLSTMForConditionalGeneration(
            DepthwiseLSTMConfig(**common, dlstm_candidate="ffn")
        ),
    }
    results = {name: {"embeddings": [], "encoder_output": [], "decoder_output": []} for name in builders}
    for seed in range(args.seeds):
        generator = torch.Generator().manual_seed(1000 + seed)
        source = torch.randint(5, 2000, (16, 14), generator=generator)
        target = torch.randint(5, 2000, (16, 14), generator=generator)
        for name, build in builders.items():
            torch.manual_seed(seed)
            model = build().eval()
            with torch.no_grad():
                out = model(input_ids=source, decoder_input_ids=target, output_hidden_states=True)
            results[name]["embeddings"].append(mean_pairwise_cosine(out.decoder_hidden_states[0]))
            results[name]["encoder_output"].append(mean_pairwise_cosine(out.encoder_last_hidden_state))
            results[name]["decoder_output"].append(mean_pairwise_cosine(out.decoder_hidden_states[-1]))
    summary = {name: {key: sum(v) / len(v) for key, v in r.items()} for name, r in results.items()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "per_seed": results, "mean": summary}
    (args.out_dir / "dlstm_init_diagnostic.json").write_text(json.dumps(report, indent=2, default=str))
    lines = [
        "# Token-specificity of top states at initialisation",
        "",
        f"{args.layers}+{args.layers} layers, d_model {args.d_model}, random token ids, mean over {args.seeds} seeds. "
        "Mean cosine similarity between the states of different tokens (1 = all tokens look alike). "
        "Produced by `benchmarks/dlstm_init_diagnostic.py`.",
        "",
        "| model | decoder embeddings | encoder output | decoder output |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in summary.items():
        lines.append(f"| {name} | {r['embeddings']:.3f} | {r['encoder_output']:.3f} | {r['decoder_output']:.3f} |")
    (args.out_dir / "dlstm_init_diagnostic.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
