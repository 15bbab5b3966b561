"""``E2S2Trainer``: the ``Trainer`` of E2S2 (and BART-baseline) pretraining."""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from ..trainer import LossTermLogging, SetEpochCallback
from .collator import E2S2DataCollator
from .model import E2S2ForPreTraining


class E2S2Trainer(LossTermLogging, Trainer):
    """``Trainer`` that logs each of the model's ``loss_terms`` beside the loss (as
    ``loss_terms/<name>``), gives the collator the epoch, and checkpoints
    :class:`E2S2ForPreTraining` as a plain-backbone folder plus the heads.

    Works unchanged for a plain seq2seq model (the BART baseline, or an hf_fusion model whose head
    reports terms). FSDP/DeepSpeed state-dict gathering is not supported for the wrapper.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(self.data_collator, E2S2DataCollator):
            # Fresh noise every epoch, and a resumed run draws the noise of the epoch it resumes in.
            self.add_callback(SetEpochCallback(lambda: self.data_collator))
        if self._is_e2s2_model() and self.args.load_best_model_at_end:
            raise ValueError("E2S2Trainer does not support load_best_model_at_end with E2S2ForPreTraining; set it to False.")

    def _is_e2s2_model(self) -> bool:
        return isinstance(self.accelerator.unwrap_model(self.model), E2S2ForPreTraining)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self._is_e2s2_model():
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not isinstance(target, E2S2ForPreTraining):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        target.load_checkpoint(resume_from_checkpoint)
