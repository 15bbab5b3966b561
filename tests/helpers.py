"""Checks every model family reuses: cached vs uncached decoding, clean-process round trips.

A family's test module calls these with its own tiny model, so "the cache works" and "the saved
folder loads without hf_fusion" are proved the same way for every family.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM

from hf_fusion.compat import cache_output, output_cache

REPO_ROOT = Path(__file__).resolve().parent.parent

# One model per family, each with the option that exercises its seam (a fusing memory, a sharing
# schedule with fewer blocks than steps): the families the kernel and compilation tests sweep.
FAMILIES = {
    "fusion_transformer": {},
    "encoder_fusion": {"fusion_mode": "fine_grained"},
    "surface_fusion": {},
    "recurrent_stacking": {"sharing_strategy": "cycle", "encoder_unique_layers": 1, "decoder_unique_layers": 1},
    "depthwise_lstm": {},
}

# A tiny config: width 16, 2+2 layers, vocab 100 (fast on a CPU, still exercises every path).
TINY = dict(
    vocab_size=100,
    d_model=16,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    max_position_embeddings=64,
    dropout=0.0,
)


def build_tiny(model_type: str = "fusion_transformer", **overrides) -> torch.nn.Module:
    """A tiny model of any family (``TINY`` sizes, ``overrides`` on top), through the Auto classes
    as a user would build it; in train mode, as built."""
    return AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(model_type, **{**TINY, **overrides}))


def random_batch(vocab_size: int = 100, batch: int = 3, src_len: int = 9, tgt_len: int = 6) -> dict[str, torch.Tensor]:
    """Source ids with ragged padding (pad id 1) and decoder inputs, ids drawn from 3..vocab-1."""
    input_ids = torch.randint(3, vocab_size, (batch, src_len))
    attention_mask = torch.ones_like(input_ids)
    for row in range(1, batch):
        attention_mask[row, src_len - 2 * row :] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 1)
    decoder_input_ids = torch.randint(3, vocab_size, (batch, tgt_len))
    decoder_input_ids[:, 0] = 2
    return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids}


@torch.no_grad()
def assert_cached_decoding_matches(model: torch.nn.Module, batch: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    """Feed the decoder one token at a time through the KV cache and compare every step's logits
    with one full, uncached forward over the whole prefix (an independent recomputation)."""
    model.eval()
    full = model(**batch, use_cache=False).logits  # (batch, tgt_len, vocab)
    encoder_outputs = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    past = None
    steps = []
    for position in range(batch["decoder_input_ids"].shape[1]):
        out = model(
            encoder_outputs=encoder_outputs,
            attention_mask=batch["attention_mask"],
            decoder_input_ids=batch["decoder_input_ids"][:, position : position + 1],
            **cache_output(past),
            use_cache=True,
        )
        past = output_cache(out)
        steps.append(out.logits)
    cached = torch.cat(steps, dim=1)
    torch.testing.assert_close(cached, full, atol=atol, rtol=1e-4)


def clean_process_env(tmp_path: Path) -> dict[str, str]:
    """Environment of a process in which hf_fusion cannot be imported: the repo is not on the
    path, the working directory is elsewhere, and an import hook refuses the name outright."""
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import sys
            class _Refuse:
                def find_spec(self, name, path=None, target=None):
                    if name == "hf_fusion" or name.startswith("hf_fusion.") or name == "training" or name.startswith("training."):
                        raise ImportError(f"{name} is deliberately not importable in this process")
                    return None
            sys.meta_path.insert(0, _Refuse())
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(blocker)
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_MODULES_CACHE"] = str(tmp_path / "clean_modules")
    return env


def run_in_clean_process(code: str, tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where hf_fusion is not importable; raise with its
    output if it fails."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env=clean_process_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"clean process failed:\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr}")
    return result


def assert_roundtrip_in_clean_process(
    model: torch.nn.Module, tmp_path: Path, model_id: str | None = None, atol: float = 1e-6
) -> Path:
    """Save ``model``, load it in a clean process with ``AutoModelForSeq2SeqLM`` and
    ``trust_remote_code=True`` (from the folder, or from ``model_id`` if given), and check the
    logits on a fixed batch equal the in-process ones. Returns the saved folder."""
    model.eval()
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    batch = random_batch(model.config.vocab_size)
    torch.save(batch, tmp_path / "batch.pt")
    with torch.no_grad():
        expected = model(**batch).logits
    run_in_clean_process(
        f"""
        import torch
        from transformers import AutoModelForSeq2SeqLM
        try:
            import hf_fusion
            raise SystemExit("hf_fusion must not be importable here")
        except ImportError:
            pass
        model = AutoModelForSeq2SeqLM.from_pretrained({str(model_id or folder)!r}, trust_remote_code=True).eval()
        assert "hf_fusion" not in type(model).__module__, type(model).__module__
        batch = torch.load("batch.pt")
        with torch.no_grad():
            torch.save(model(**batch).logits, "logits.pt")
            out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=2, max_new_tokens=4)
        assert out.shape[0] == batch["input_ids"].shape[0]
        """,
        tmp_path,
    )
    # rtol too: another process may use another thread count, so float sums differ in the last bits.
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=atol, rtol=1e-6)
    return folder
