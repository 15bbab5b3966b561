"""Knowledge distillation from a trained seq2seq teacher into a (smaller, e.g. shared-layer) student.

Kim & Rush, "Sequence-Level Knowledge Distillation" (EMNLP 2016, arXiv 1606.07947), as used by
Dabre & Fujita (arXiv 2106.10002) to close the gap between recurrently stacked and vanilla models:

- **Sequence-level KD** (:func:`sequence_level_kd_targets`, :func:`distill_dataset`): translate
  the training sources with the teacher's beam search and train the student on the teacher's
  outputs instead of the references. Translating a corpus is the expensive part, so the outputs are
  cached on disk, keyed by the teacher's weights and config, the tokenizer, the exact source
  sentences and the generation settings; an interrupted run resumes where it stopped.
- **Word-level KD** (:class:`WordLevelDistillationTrainer`): a ``Seq2SeqTrainer`` whose loss adds
  the temperature-scaled KL(teacher || student) of every non-padding target token to the
  cross-entropy: ``loss = (1 - kd_alpha) * CE + kd_alpha * T^2 * KL``. The T^2 factor keeps the
  gradient scale of the soft term independent of T (Hinton et al. 2015).

The teacher is any ``AutoModelForSeq2SeqLM`` (an hf_fusion model, BART, Marian, ...) that shares
the student's tokenizer (word-level KD compares distributions over the same vocabulary).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, Seq2SeqTrainer

DEFAULT_GENERATION = {"num_beams": 5, "max_new_tokens": 128}


# --- sequence-level KD -------------------------------------------------------------------------


def model_fingerprint(model: PreTrainedModel) -> str:
    """SHA-256 of a model's class, config and every weight: two models with the same fingerprint
    translate identically, whatever folder they were loaded from."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = {
        key: value
        for key, value in model.config.to_dict().items()
        if key not in ("_name_or_path", "transformers_version")
    }
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of a tokenizer's full definition (the backend JSON for fast tokenizers), leaving out
    the padding/truncation state that every call with ``padding=``/``truncation=`` rewrites."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("padding", None)
        definition.pop("truncation", None)
    else:
        definition = sorted(tokenizer.get_vocab().items())
    definition = json.dumps(definition, sort_keys=True)
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{special}\n{definition}".encode()).hexdigest()


def _generation_config(teacher: PreTrainedModel, generation_kwargs: dict[str, Any]) -> GenerationConfig:
    """The teacher's generation config updated with ``generation_kwargs``; unknown keys are refused
    so that a typo cannot silently fall back to a default."""
    config = copy.deepcopy(teacher.generation_config)
    unused = config.update(**generation_kwargs)
    if unused:
        raise ValueError(
            f"Unknown generation settings {sorted(unused)}; allowed: fields of transformers.GenerationConfig."
        )
    config.validate()
    return config


def sequence_level_kd_targets(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sources: Sequence[str],
    cache_dir: str | os.PathLike,
    batch_size: int = 32,
    max_source_length: int = 256,
    generation_kwargs: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> list[str]:
    """Translate ``sources`` with the teacher's beam search, cached on disk.

    Sources are translated in batches of similar length (less padding, so faster), then returned
    in the original order. After every batch the outputs so far are appended to a partial file, so
    an interrupted run resumes; the finished file is reused by every later call with the same key.

    Args:
        teacher: Any seq2seq model with ``generate``; it runs on the device it is on.
        tokenizer: The tokenizer of teacher and student; used to encode sources and decode outputs.
        sources: Source sentences.
        cache_dir: Folder for the cache files (``seqkd-<key>.jsonl`` and ``.meta.json``).
        batch_size: Sentences per ``generate`` call.
        max_source_length: Sources are truncated to this many tokens.
        generation_kwargs: ``GenerationConfig`` fields on top of the teacher's generation config;
            default ``{"num_beams": 5, "max_new_tokens": 128}``.
        show_progress: Show a tqdm progress bar over batches.

    Returns:
        One teacher translation per source, in the order of ``sources``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    sources = list(sources)
    generation_config = _generation_config(teacher, {**DEFAULT_GENERATION, **(generation_kwargs or {})})
    generation_settings = {
        key: value for key, value in generation_config.to_dict().items() if key != "transformers_version"
    }
    key_parts = {
        "teacher": model_fingerprint(teacher),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "sources": hashlib.sha256(json.dumps(sources).encode()).hexdigest(),
        "generation": generation_settings,
        "max_source_length": max_source_length,
    }
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:24]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final_path = cache_dir / f"seqkd-{key}.jsonl"
    if final_path.exists():
        return [json.loads(line) for line in final_path.read_text(encoding="utf-8").splitlines()]
    (cache_dir / f"seqkd-{key}.meta.json").write_text(
        json.dumps({**key_parts, "num_sources": len(sources)}, indent=2, default=str)
    )

    # Longest first: similar lengths share a batch, and a too-long batch fails at once, not at the end.
    order = sorted(range(len(sources)), key=lambda index: -len(sources[index]))
    partial_path = cache_dir / f"seqkd-{key}.partial.jsonl"
    done = []
    if partial_path.exists():
        for line in partial_path.read_text(encoding="utf-8").splitlines(keepends=True):
            if not line.endswith("\n"):  # cut off by a crash mid-write: translate that sentence again
                break
            done.append(json.loads(line))
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    try:
        with partial_path.open("w", encoding="utf-8") as partial, torch.no_grad():
            partial.writelines(json.dumps(text) + "\n" for text in done)
            bar = tqdm(
                total=len(sources),
                initial=len(done),
                desc="teacher translations",
                unit="sent",
                disable=not show_progress,
            )
            for start in range(len(done), len(sources), batch_size):
                batch = [sources[index] for index in order[start : start + batch_size]]
                encoded = tokenizer(
                    batch,
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=max_source_length,
                    padding_side="right",
                ).to(device)
                output_ids = teacher.generate(
                    input_ids=encoded["input_ids"],
                    attention_mask=encoded["attention_mask"],
                    generation_config=generation_config,
                )
                texts = [text.strip() for text in tokenizer.batch_decode(output_ids, skip_special_tokens=True)]
                partial.writelines(json.dumps(text) + "\n" for text in texts)
                partial.flush()
                done.extend(texts)
                bar.update(len(texts))
            bar.close()
    finally:
        teacher.train(was_training)

    targets = [""] * len(sources)
    for position, index in enumerate(order):
        targets[index] = done[position]
    final_path.write_text("".join(json.dumps(text) + "\n" for text in targets), encoding="utf-8")
    partial_path.unlink()
    return targets


def distill_dataset(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: datasets.Dataset,
    cache_dir: str | os.PathLike,
    source_column: str = "source",
    target_column: str = "target",
    **kwargs: Any,
) -> datasets.Dataset:
    """``dataset`` with ``target_column`` replaced by the teacher's translations of ``source_column``
    (sequence-level KD training data). ``kwargs`` go to :func:`sequence_level_kd_targets`."""
    if source_column not in dataset.column_names:
        raise ValueError(
            f"source_column = {source_column!r} is not a column of the dataset; columns: {dataset.column_names}."
        )
    targets = sequence_level_kd_targets(teacher, tokenizer, dataset[source_column], cache_dir, **kwargs)
    if target_column in dataset.column_names:
        dataset = dataset.remove_columns(target_column)
    return dataset.add_column(target_column, targets)


# --- word-level KD -----------------------------------------------------------------------------


def word_level_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened distributions, over non-padding tokens.

    Args:
        student_logits / teacher_logits: ``(batch, tgt_len, vocab)``.
        labels: ``(batch, tgt_len)``; positions with -100 are padding and ignored.
        temperature: Softmax temperature T applied to both distributions.
        num_items_in_batch: Divide the summed KL by this (the token count of a whole accumulated
            batch, as the Trainer does for the cross-entropy) instead of by this batch's tokens.

    Returns:
        The mean (or accumulated-batch normalised) per-token KL, a scalar (not yet scaled by T^2).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "word-level KD needs teacher and student to share the tokenizer and vocabulary."
        )
    mask = labels.ne(-100)  # (batch, tgt_len)
    student_log_probs = nn.functional.log_softmax(student_logits[mask].float() / temperature, dim=-1)  # (tokens, vocab)
    teacher_log_probs = nn.functional.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)
    kl_sum = nn.functional.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum")
    denominator = mask.sum() if num_items_in_batch is None else num_items_in_batch
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(kl_sum.device)
    return kl_sum / denominator


class WordLevelDistillationTrainer(Seq2SeqTrainer):
    """``Seq2SeqTrainer`` with word-level knowledge distillation from a frozen teacher.

    ``loss = (1 - kd_alpha) * CE + kd_alpha * temperature**2 * KL(teacher || student)``, where CE is
    the student's own loss (its label smoothing and output head included) and KL is averaged over
    the same non-padding target tokens, normalised the way the Trainer normalises CE (per batch, or
    over the whole accumulated batch when it passes ``num_items_in_batch``).

    Args:
        teacher_model: Any seq2seq model over the student's vocabulary; frozen and put in eval mode
            on the training device.
        kd_alpha: Weight of the distillation term in [0, 1].
        temperature: Softmax temperature T > 0.
        *args / **kwargs: Everything ``Seq2SeqTrainer`` takes.
    """

    def __init__(
        self, *args: Any, teacher_model: PreTrainedModel, kd_alpha: float = 0.5, temperature: float = 1.0, **kwargs: Any
    ):
        if isinstance(kd_alpha, bool) or not isinstance(kd_alpha, (int, float)) or not 0.0 <= kd_alpha <= 1.0:
            raise ValueError(f"kd_alpha = {kd_alpha!r} is out of range; allowed: a number in [0, 1].")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature = {temperature!r} is out of range; allowed: a number > 0.")
        super().__init__(*args, **kwargs)
        student_vocab = getattr(self.model.config, "vocab_size", None)
        teacher_vocab = getattr(teacher_model.config, "vocab_size", None)
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"Teacher vocab_size = {teacher_vocab} differs from the student's {student_vocab}: word-level KD "
                "needs both models to share one tokenizer."
            )
        self.teacher_model = teacher_model.to(self.args.device).eval().requires_grad_(False)
        self.kd_alpha = float(kd_alpha)
        self.temperature = float(temperature)

    def _device_loss_scale(self, num_items_in_batch: int | torch.Tensor | None) -> int:
        """The factor ``Trainer.compute_loss`` multiplies a token-count-normalised loss by, so that
        gradient averaging across devices sees a global token mean; applied to KL as to CE."""
        if (
            self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        ):
            return self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
        return 1

    def _loss_is_scaled_for_ga(self, num_items_in_batch: int | torch.Tensor | None) -> bool:
        """Whether the Trainer treats the CE as normalised over the accumulated batch (then KL must be too)."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if "labels" not in inputs:
            raise ValueError("Word-level distillation needs `labels` in every batch (the target tokens to match).")
        labels = inputs["labels"]
        if "decoder_input_ids" not in inputs:
            # Build the decoder inputs once so that teacher and student read exactly the same prefix.
            student = self.accelerator.unwrap_model(model)
            inputs = {**inputs, "decoder_input_ids": student.prepare_decoder_input_ids_from_labels(labels=labels)}
        cross_entropy, outputs = super().compute_loss(
            model, dict(inputs), return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        with torch.no_grad():
            teacher_logits = self.teacher_model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs.get("attention_mask"),
                decoder_input_ids=inputs["decoder_input_ids"],
                decoder_attention_mask=inputs.get("decoder_attention_mask"),
                use_cache=False,
            ).logits
        normaliser = num_items_in_batch if self._loss_is_scaled_for_ga(num_items_in_batch) else None
        kl = word_level_kd_loss(outputs.logits, teacher_logits, labels, self.temperature, normaliser)
        kl = kl * self._device_loss_scale(num_items_in_batch)
        loss = (1.0 - self.kd_alpha) * cross_entropy + self.kd_alpha * self.temperature**2 * kl
        return (loss, outputs) if return_outputs else loss


__all__ = [
    "DEFAULT_GENERATION",
    "WordLevelDistillationTrainer",
    "distill_dataset",
    "model_fingerprint",
    "sequence_level_kd_targets",
    "tokenizer_fingerprint",
    "word_level_kd_loss",
]
