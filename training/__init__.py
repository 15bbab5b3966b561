"""Training tools for hf_fusion models: data, tokenizers, metrics, pretraining objectives, CLIs."""
