"""Knowledge distillation: sequence-level KD targets and cache, word-level KD loss and trainer."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, Seq2SeqTrainingArguments

from hf_fusion import (
    FusionTransformerConfig,
    FusionTransformerForConditionalGeneration,
    RecurrentStackingConfig,
    RecurrentStackingForConditionalGeneration,
)
from tests.helpers import TINY
from training.distill import (
    WordLevelDistillationTrainer,
    distill_dataset,
    sequence_level_kd_targets,
    word_level_kd_loss,
)

WORDS = [
    "the",
    "a",
    "river",
    "sea",
    "flows",
    "into",
    "house",
    "dog",
    "cat",
    "runs",
    "sleeps",
    "big",
    "small",
    "red",
    "green",
    "blue",
    "is",
    "was",
    "and",
    "or",
]
SOURCES = [
    "the river flows into the sea",
    "a dog runs",
    "the big red house is small and the green house was big",
    "cat",
    "the cat sleeps",
    "a blue sea",
    "dog and cat and river and sea and house",
]


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with the project's special ids (<s>=0, <pad>=1, </s>=2, <unk>=3)."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{word: index + 4 for index, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def make_model(vocab_size: int, seed: int, **overrides) -> FusionTransformerForConditionalGeneration:
    torch.manual_seed(seed)
    # A large init_std makes the output depend on the input (varied translations, some stopping early).
    config = FusionTransformerConfig(**{**TINY, "vocab_size": vocab_size, "init_std": 0.5, **overrides})
    return FusionTransformerForConditionalGeneration(config).eval()


# --- sequence-level KD ---------------------------------------------------------------------------


def test_teacher_translations_equal_one_by_one_generation(tokenizer, tmp_path) -> None:
    teacher = make_model(len(tokenizer), seed=1)
    settings = {"num_beams": 2, "max_new_tokens": 6}
    targets = sequence_level_kd_targets(
        teacher, tokenizer, SOURCES, tmp_path, batch_size=3, generation_kwargs=settings, show_progress=False
    )
    expected = []
    for source in SOURCES:  # independent: unbatched, unsorted, no padding
        encoded = tokenizer(source, return_tensors="pt")
        output = teacher.generate(**encoded, **settings)
        expected.append(tokenizer.decode(output[0], skip_special_tokens=True).strip())
    assert targets == expected
    assert len(set(targets)) > 1  # the check is not vacuous


@pytest.mark.slow
def test_translations_are_cached_by_teacher_data_and_settings(tokenizer, tmp_path, monkeypatch) -> None:
    teacher = make_model(len(tokenizer), seed=1)
    kwargs = {"batch_size": 2, "generation_kwargs": {"num_beams": 2, "max_new_tokens": 5}, "show_progress": False}
    first = sequence_level_kd_targets(teacher, tokenizer, SOURCES, tmp_path, **kwargs)
    assert len(list(tmp_path.glob("seqkd-*.jsonl"))) == 1 and not list(tmp_path.glob("*.partial.jsonl"))

    calls = []
    original_generate = teacher.generate
    monkeypatch.setattr(teacher, "generate", lambda *a, **k: calls.append(1) or original_generate(*a, **k))
    assert sequence_level_kd_targets(teacher, tokenizer, SOURCES, tmp_path, **kwargs) == first
    assert calls == []  # served from the cache

    sequence_level_kd_targets(teacher, tokenizer, SOURCES[:-1], tmp_path, **kwargs)  # other data
    sequence_level_kd_targets(
        teacher, tokenizer, SOURCES, tmp_path, **{**kwargs, "generation_kwargs": {"num_beams": 3, "max_new_tokens": 5}}
    )
    with torch.no_grad():
        teacher.model.shared.weight.add_(0.01)  # other teacher weights
    sequence_level_kd_targets(teacher, tokenizer, SOURCES, tmp_path, **kwargs)
    assert len(calls) == 3 + 4 + 4  # 6, 7, 7 sources in batches of 2
    assert len(list(tmp_path.glob("seqkd-*.jsonl"))) == 4


@pytest.mark.slow
def test_interrupted_translation_resumes(tokenizer, tmp_path, monkeypatch) -> None:
    teacher = make_model(len(tokenizer), seed=2)
    kwargs = {"batch_size": 2, "generation_kwargs": {"num_beams": 2, "max_new_tokens": 5}, "show_progress": False}
    reference = sequence_level_kd_targets(teacher, tokenizer, SOURCES, tmp_path / "reference", **kwargs)

    calls = []
    original_generate = teacher.generate

    def crash_on_third_batch(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original_generate(*args, **kw)

    monkeypatch.setattr(teacher, "generate", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        sequence_level_kd_targets(teacher, tokenizer, SOURCES, tmp_path, **kwargs)
    partial = next(tmp_path.glob("*.partial.jsonl"))
    assert len(partial.read_text().splitlines()) == 4
    with partial.open("a") as file:
        file.write('"a line cut off by a cra')  # a crash in the middle of writing a translation
    assert teacher.training is False
    calls.clear()
    assert sequence_level_kd_targets(teacher, tokenizer, SOURCES, tmp_path, **kwargs) == reference
    assert len(calls) == 2  # the two batches left of four


def test_distill_dataset_replaces_targets(tokenizer, tmp_path) -> None:
    teacher = make_model(len(tokenizer), seed=3)
    dataset = datasets.Dataset.from_dict({"source": SOURCES, "target": ["reference"] * len(SOURCES)})
    settings = {"num_beams": 2, "max_new_tokens": 4}
    distilled = distill_dataset(teacher, tokenizer, dataset, tmp_path, generation_kwargs=settings, show_progress=False)
    assert distilled["source"] == SOURCES
    assert distilled["target"] == sequence_level_kd_targets(
        teacher, tokenizer, SOURCES, tmp_path, generation_kwargs=settings, show_progress=False
    )
    with pytest.raises(ValueError, match=r"source_column = 'en' is not a column"):
        distill_dataset(teacher, tokenizer, dataset, tmp_path, source_column="en")


def test_sequence_level_bad_settings(tokenizer, tmp_path) -> None:
    teacher = make_model(len(tokenizer), seed=1)
    with pytest.raises(ValueError, match=r"Unknown generation settings \['num_beam'\]"):
        sequence_level_kd_targets(teacher, tokenizer, SOURCES, tmp_path, generation_kwargs={"num_beam": 2})
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer"):
        sequence_level_kd_targets(teacher, tokenizer, SOURCES, tmp_path, batch_size=0)


# --- word-level KD -------------------------------------------------------------------------------


def reference_kl(student_logits, teacher_logits, labels, temperature) -> tuple[float, int]:
    """Summed KL(teacher || student) over non-padding tokens, written out token by token."""
    total, count = 0.0, 0
    for row in range(labels.shape[0]):
        for position in range(labels.shape[1]):
            if labels[row, position] == -100:
                continue
            p = torch.softmax(teacher_logits[row, position].double() / temperature, dim=-1)
            q = torch.softmax(student_logits[row, position].double() / temperature, dim=-1)
            total += float(sum(p[v] * (math.log(p[v]) - math.log(q[v])) for v in range(p.shape[0])))
            count += 1
    return total, count


def test_word_level_kd_loss_matches_token_by_token_kl() -> None:
    student, teacher = torch.randn(2, 4, 7) * 3, torch.randn(2, 4, 7) * 3
    labels = torch.tensor([[5, 1, -100, -100], [2, 3, 4, -100]])
    total, count = reference_kl(student, teacher, labels, temperature=2.5)
    torch.testing.assert_close(
        word_level_kd_loss(student, teacher, labels, 2.5).double(), torch.tensor(total / count, dtype=torch.double)
    )
    torch.testing.assert_close(
        word_level_kd_loss(student, teacher, labels, 2.5, num_items_in_batch=11).double(),
        torch.tensor(total / 11, dtype=torch.double),
    )
    assert word_level_kd_loss(teacher, teacher, labels).abs() < 1e-6
    with pytest.raises(ValueError, match=r"share the tokenizer and vocabulary"):
        word_level_kd_loss(student, teacher[..., :5], labels)


def kd_batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    input_ids = torch.randint(3, 100, (3, 7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 1)
    labels = torch.randint(3, 100, (3, 5))
    labels[0, 3:] = -100
    labels[2, 4:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_trainer(tmp_path, student, teacher, **kwargs) -> WordLevelDistillationTrainer:
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=3,
        max_steps=2,
        learning_rate=1e-3,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    return WordLevelDistillationTrainer(model=student, args=args, teacher_model=teacher, **kwargs)


@pytest.mark.parametrize("num_items_in_batch", [None, 17])
def test_trainer_loss_equals_independent_computation(tmp_path, num_items_in_batch) -> None:
    student = RecurrentStackingForConditionalGeneration(RecurrentStackingConfig(**TINY))
    teacher = make_model(100, seed=7, encoder_layers=3, decoder_layers=3)
    trainer = make_trainer(tmp_path, student, teacher, kd_alpha=0.3, temperature=2.0)
    batch = kd_batch()
    loss = trainer.compute_loss(student.eval(), dict(batch), num_items_in_batch=num_items_in_batch)

    decoder_input_ids = torch.full_like(batch["labels"], 1)
    decoder_input_ids[:, 0] = 2
    decoder_input_ids[:, 1:] = batch["labels"][:, :-1].masked_fill(batch["labels"][:, :-1] == -100, 1)
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "decoder_input_ids": decoder_input_ids,
    }
    with torch.no_grad():
        student_logits, teacher_logits = student(**inputs).logits, teacher(**inputs).logits
    mask = batch["labels"] != -100
    ce_sum = (
        -torch.log_softmax(student_logits.double(), -1)
        .gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0][mask]
        .sum()
    )
    kl_sum, count = reference_kl(student_logits, teacher_logits, batch["labels"], 2.0)
    denominator = count if num_items_in_batch is None else num_items_in_batch
    expected = 0.7 * ce_sum / denominator + 0.3 * 4.0 * kl_sum / denominator
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)


def test_trainer_trains_student_and_leaves_teacher(tmp_path) -> None:
    student = RecurrentStackingForConditionalGeneration(RecurrentStackingConfig(**TINY))
    teacher = make_model(100, seed=7)
    teacher_before = {name: p.clone() for name, p in teacher.state_dict().items()}
    student_before = student.model.encoder.layers[0].fc1.weight.clone()
    train = datasets.Dataset.from_list(
        [{key: value[row].tolist() for key, value in kd_batch().items()} for row in range(3)]
    )
    trainer = make_trainer(tmp_path, student, teacher, kd_alpha=0.5, temperature=1.5)
    trainer.train_dataset = train
    trainer.train()
    assert not torch.equal(student.model.encoder.layers[0].fc1.weight, student_before)
    assert all(torch.equal(teacher.state_dict()[name], value) for name, value in teacher_before.items())
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kd_alpha": 1.5}, r"kd_alpha = 1.5 is out of range; allowed: a number in \[0, 1\]"),
        ({"temperature": 0}, r"temperature = 0 is out of range; allowed: a number > 0"),
    ],
)
def test_trainer_bad_arguments(tmp_path, kwargs, message) -> None:
    student = RecurrentStackingForConditionalGeneration(RecurrentStackingConfig(**TINY))
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, student, make_model(100, seed=0), **kwargs)


def test_trainer_refuses_other_vocabulary(tmp_path) -> None:
    student = RecurrentStackingForConditionalGeneration(RecurrentStackingConfig(**TINY))
    with pytest.raises(ValueError, match=r"Teacher vocab_size = 120 differs from the student's 100"):
        make_trainer(tmp_path, student, make_model(120, seed=0))
