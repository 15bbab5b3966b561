"""E2S2 pretraining: the collator's two views, each loss against an independent computation, the
wrapper on every hf_fusion family and on a stock BART, export, and the CLI (train + resume)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    BartConfig,
    BartForConditionalGeneration,
    PreTrainedTokenizerFast,
    get_scheduler,
)

from hf_fusion import MODEL_FAMILIES
from tests.helpers import TINY, run_in_clean_process
from training.e2s2 import (
    HEADS_WEIGHTS_NAME,
    E2S2DataCollator,
    E2S2ForPreTraining,
    denoising_loss,
    masked_mean_pool,
    poisson_span_mask,
)
from training.e2s2.pretrain import pack_texts, parse_pretrain_arguments
from training.e2s2.pretrain import pretrain as pretrain_main
from training.tokenizer import train_tokenizer

WORDS = (
    "the a cat dog sat ran on in at mat park house tree river sea flows into eventually quickly slowly "
    "red green blue big small old new man woman child book reads writes sings loud quiet because and but "
    "or if then when where why how one two three four five six seven eight nine ten yes no ! ? . ,"
).split()


def random_texts(count: int, seed: int, min_words: int = 3, max_words: int = 40) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(min_words, max_words + 1))) for _ in range(count)]


def build_tokenizer(with_mask: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS with the project's special ids (<s>=0, <pad>=1, </s>=2,
    <unk>=3, <mask>=4), wrapping each text in <s> ... </s> as BART's does."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"] + (["<mask>"] if with_mask else [])
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    extra = {"mask_token": "<mask>"} if with_mask else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", **extra
    )


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="module", params=["bart_layout", "project_tokenizer"])
def any_tokenizer(request, tokenizer) -> PreTrainedTokenizerFast:
    """BART's layout ``<s> X </s>`` (word level) and the project's subword tokenizer (``X </s>``)."""
    if request.param == "bart_layout":
        return tokenizer
    return train_tokenizer(random_texts(300, seed=123), vocab_size=90)


def tiny_bart() -> BartForConditionalGeneration:
    config = BartConfig(
        **TINY,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    )
    return BartForConditionalGeneration(config)


def tiny_backbone(kind: str) -> torch.nn.Module:
    if kind == "bart":
        return tiny_bart()
    config_class, _, lm_class = MODEL_FAMILIES[kind]
    return lm_class(config_class(**TINY))


BACKBONES = ["bart", *MODEL_FAMILIES]


# --- collator ----------------------------------------------------------------------------------


def unpadded(row: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    return row[mask.bool()].numpy()


def is_subsequence(needle: np.ndarray, haystack: np.ndarray) -> bool:
    it = iter(haystack.tolist())
    return all(token in it for token in needle.tolist())


def boundary_lengths(ids: np.ndarray, special: set[int]) -> tuple[int, int]:
    """Number of leading and trailing special tokens."""
    flags = [token in special for token in ids.tolist()]
    lead = next(i for i, flag in enumerate(flags) if not flag)
    trail = next(i for i, flag in enumerate(reversed(flags)) if not flag)
    return lead, trail


def test_collator_views_are_consistent_over_many_texts(any_tokenizer):
    tokenizer = any_tokenizer
    collator = E2S2DataCollator(tokenizer, seed=3)
    special = set(tokenizer.all_special_ids)
    mask_id = tokenizer.mask_token_id
    totals = dict(content=0, masked=0, masks=0, ordinary=0, replaceable=0, replaced=0, shuffled=0)
    for batch_idx in range(40):
        texts = random_texts(16, seed=batch_idx)
        batch = collator(texts)
        assert set(batch) == {"input_ids", "attention_mask", "labels", "second_input_ids", "second_attention_mask", "denoising_labels"}
        assert batch["input_ids"].shape == batch["second_input_ids"].shape == batch["denoising_labels"].shape
        torch.testing.assert_close(batch["attention_mask"], batch["second_attention_mask"])
        for row, text in enumerate(texts):
            original = np.asarray(tokenizer(text)["input_ids"])
            # Decoder labels: the original text, -100 on padding, the same for both views.
            labels = batch["labels"][row]
            assert labels[: len(original)].tolist() == original.tolist()
            assert (labels[len(original) :] == -100).all()

            attention = batch["attention_mask"][row]
            length = int(attention.sum())
            assert attention[:length].all() and not attention[length:].any()  # right padding
            assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()
            assert (batch["second_input_ids"][row, length:] == tokenizer.pad_token_id).all()
            assert (batch["denoising_labels"][row, length:] == -100).all()

            main = unpadded(batch["input_ids"][row], attention)
            second = unpadded(batch["second_input_ids"][row], attention)
            denoise = unpadded(batch["denoising_labels"][row], attention)

            # Second view = span masking of the original: same boundary tokens, kept tokens in
            # order, no two masks adjacent (one mask per span), and masked count from the lengths.
            lead, trail = boundary_lengths(original, special)
            assert second[:lead].tolist() == original[:lead].tolist()
            assert second[len(second) - trail :].tolist() == original[len(original) - trail :].tolist()
            content, view = original[lead : len(original) - trail], second[lead : len(second) - trail]
            kept = view[view != mask_id]
            assert is_subsequence(kept, content)
            is_mask = view == mask_id
            assert not (is_mask[1:] & is_mask[:-1]).any()
            totals["content"] += len(content)
            totals["masked"] += len(content) - len(kept)
            totals["masks"] += int(is_mask.sum())

            # Main view: labels aligned position by position with the main view's tokens.
            is_special = np.isin(main, list(special))
            assert ((denoise == -100) == is_special).all()
            assert (main[is_special] == second[is_special]).all()  # specials are never corrupted
            assert (main[denoise == 0] == second[denoise == 0]).all()
            assert (main[denoise == 2] != second[denoise == 2]).all()
            assert sorted(main[denoise == 1]) == sorted(second[denoise == 1])  # shuffling permutes
            assert (main[denoise == 1] != second[denoise == 1]).all()
            ordinary = ~np.isin(second, list(special))
            totals["ordinary"] += int(ordinary.sum())
            totals["shuffled"] += int((denoise == 1).sum())
            totals["replaceable"] += int((denoise != -100).sum() - (denoise == 1).sum())
            totals["replaced"] += int((denoise == 2).sum())

    assert abs(totals["masked"] / totals["content"] - 0.15) < 0.01, totals
    assert abs(totals["replaced"] / totals["replaceable"] - 0.15) < 0.015, totals
    # One trigram per 20-token window moves 2-3 tokens; windows lose trigrams near masks and ends.
    assert 0.03 < totals["shuffled"] / totals["ordinary"] < 0.15, totals
    assert totals["masks"] > 0


def test_span_lengths_follow_poisson():
    rng = np.random.default_rng(0)
    content = np.arange(10, 4010)
    masked_tokens, spans = 0, 0
    for _ in range(20):
        view = poisson_span_mask(content, rng, mask_ratio=0.15, poisson_lambda=3.0, mask_token_id=4, max_length=5000)
        masked_tokens += len(content) - int((view != 4).sum())
        spans += int((view == 4).sum())
    # Every span (zero-length ones included) becomes one mask: mean length ≈ λ = 3.
    assert abs(masked_tokens / spans - 3.0) < 0.15


def test_collator_is_deterministic_and_independent_of_batching(tokenizer):
    texts = random_texts(8, seed=11)
    first = E2S2DataCollator(tokenizer, seed=5)(texts)
    again = E2S2DataCollator(tokenizer, seed=5)(texts)
    other = E2S2DataCollator(tokenizer, seed=6)(texts)
    for key in first:
        torch.testing.assert_close(first[key], again[key])
    assert not torch.equal(first["input_ids"], other["input_ids"])

    # A text's noise does not depend on the batch it is in ...
    alone = E2S2DataCollator(tokenizer, seed=5)(texts[3:4])
    length = int(alone["attention_mask"].sum())
    for key in ("input_ids", "second_input_ids", "denoising_labels"):
        assert first[key][3, :length].tolist() == alone[key][0].tolist()
    # ... but changes with the epoch.
    collator = E2S2DataCollator(tokenizer, seed=5)
    collator.set_epoch(1)
    assert not torch.equal(collator(texts)["input_ids"], first["input_ids"])


def test_bart_objective_is_the_second_view(tokenizer):
    texts = random_texts(8, seed=2)
    e2s2 = E2S2DataCollator(tokenizer, seed=1)(texts)
    bart = E2S2DataCollator(tokenizer, objective="bart", seed=1)(texts)
    assert set(bart) == {"input_ids", "attention_mask", "labels"}
    torch.testing.assert_close(bart["input_ids"], e2s2["second_input_ids"])
    torch.testing.assert_close(bart["labels"], e2s2["labels"])


def test_truncation_and_padding_multiple(tokenizer):
    collator = E2S2DataCollator(tokenizer, max_length=12, pad_to_multiple_of=8, seed=0)
    batch = collator(random_texts(6, seed=4, min_words=30))
    assert batch["input_ids"].shape[1] == 16
    assert int(batch["attention_mask"].sum(1).max()) <= 12
    assert int((batch["labels"] != -100).sum(1).max()) == 12


def test_bad_input_raises(tokenizer):
    collator = E2S2DataCollator(tokenizer)
    with pytest.raises(ValueError, match="empty text"):
        collator(["the cat sat", "   "])
    with pytest.raises(ValueError, match="min_tokens = 3"):
        collator(["the cat"])
    with pytest.raises(ValueError, match="mask token"):
        E2S2DataCollator(build_tokenizer(with_mask=False))
    with pytest.raises(ValueError, match="mask_ratio"):
        E2S2DataCollator(tokenizer, mask_ratio=0.7)
    with pytest.raises(ValueError, match="objective"):
        E2S2DataCollator(tokenizer, objective="t5")
    with pytest.raises(ValueError, match="expected a string"):
        collator([{"text": None}])
    backbone = tiny_bart()
    for field in ("lambda_de", "lambda_cl", "nll_weight"):
        with pytest.raises(ValueError, match=field):
            E2S2ForPreTraining(backbone, **{field: -0.1})
    with pytest.raises(ValueError, match="temperature"):
        E2S2ForPreTraining(backbone, temperature=0.0)


# --- losses ------------------------------------------------------------------------------------


def reference_loss_terms(wrapper: E2S2ForPreTraining, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Every E2S2 term recomputed with explicit loops from the modules' own weights."""
    backbone = wrapper.backbone
    labels = batch["labels"]
    decoder_input_ids = torch.full_like(labels, backbone.config.pad_token_id)
    decoder_input_ids[:, 0] = backbone.config.decoder_start_token_id
    decoder_input_ids[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, backbone.config.pad_token_id)

    # A SurfaceFusion head returns log P itself (hard fusion: the unnormalised mixture it trains on).
    logits_are_log_probs = getattr(backbone.config, "output_head", "lm") == "surface_fusion"

    def nll(input_ids, attention_mask) -> float:
        logits = backbone(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
        log_probs = logits.double() if logits_are_log_probs else torch.log_softmax(logits.double(), -1)
        losses = [
            -log_probs[b, t][labels[b, t]].item()
            for b in range(labels.shape[0])
            for t in range(labels.shape[1])
            if labels[b, t] != -100
        ]
        return sum(losses) / len(losses)

    def pooled(input_ids, attention_mask) -> list[torch.Tensor]:
        states = backbone.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.double()
        vectors = []
        for b in range(states.shape[0]):
            rows = [states[b, t] for t in range(states.shape[1]) if attention_mask[b, t] == 1]
            mean = sum(rows) / len(rows)
            vectors.append(mean / mean.norm())
        return vectors, states

    main_vectors, main_states = pooled(batch["input_ids"], batch["attention_mask"])
    second_vectors, _ = pooled(batch["second_input_ids"], batch["second_attention_mask"])

    weight = wrapper.denoising_head.weight.double()
    bias = wrapper.denoising_head.bias.double()
    de_losses = []
    for b in range(main_states.shape[0]):
        for t in range(main_states.shape[1]):
            label = int(batch["denoising_labels"][b, t])
            if label != -100:
                scores = [float(weight[c] @ main_states[b, t] + bias[c]) for c in range(3)]
                de_losses.append(math.log(sum(math.exp(s) for s in scores)) - scores[label])

    vectors = main_vectors + second_vectors
    n, half, tau = len(vectors), len(main_vectors), wrapper.temperature
    cl = 0.0
    for i in range(n):
        positive = (i + half) % n
        denominator = sum(math.exp(float(vectors[i] @ vectors[k]) / tau) for k in range(n) if k != i)
        cl -= float(vectors[i] @ vectors[positive]) / tau - math.log(denominator)
    return {
        "nll_main": nll(batch["input_ids"], batch["attention_mask"]),
        "nll_second": nll(batch["second_input_ids"], batch["second_attention_mask"]),
        "denoising": sum(de_losses) / len(de_losses),
        "contrastive": cl / n,
    }


@pytest.mark.parametrize("kind", BACKBONES)
def test_every_loss_term_matches_an_independent_computation(kind, tokenizer):
    wrapper = E2S2ForPreTraining(
        tiny_backbone(kind), lambda_de=0.3, lambda_cl=0.2, temperature=0.5, nll_weight=0.7
    ).eval()
    batch = E2S2DataCollator(tokenizer, seed=0)(random_texts(5, seed=9, max_words=15))
    with torch.no_grad():
        output = wrapper(**batch)
        expected = reference_loss_terms(wrapper, batch)
    for name, value in expected.items():
        assert output.loss_terms[name].item() == pytest.approx(value, rel=1e-4, abs=1e-5), name
    total = 0.7 * (expected["nll_main"] + expected["nll_second"]) + 0.3 * expected["denoising"] + 0.2 * expected["contrastive"]
    assert output.loss.item() == pytest.approx(total, rel=1e-4)
    assert output.denoising_logits.shape == (*batch["input_ids"].shape, 3)
    assert output.sentence_embeddings.shape == (2, 5, 16)


@pytest.mark.parametrize("kind", BACKBONES)
def test_gradients_reach_heads_and_encoder(kind, tokenizer):
    wrapper = E2S2ForPreTraining(tiny_backbone(kind)).train()
    wrapper(**E2S2DataCollator(tokenizer)(random_texts(4, seed=1))).loss.backward()
    for name, parameter in wrapper.named_parameters():
        if name.startswith("denoising_head") or ".encoder.layers." in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_backbone_loss_terms_are_passed_on(tokenizer):
    """An hf_fusion head that reports its own loss components (seam 5) keeps them visible."""
    config_class, _, lm_class = MODEL_FAMILIES["fusion_transformer"]

    class WithTerms(lm_class):
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.loss_terms = {"aux": 2 * output.loss}
            return output

    output = E2S2ForPreTraining(WithTerms(config_class(**TINY)))(**E2S2DataCollator(tokenizer)(random_texts(3, seed=0)))
    torch.testing.assert_close(output.loss_terms["main/aux"], 2 * output.loss_terms["nll_main"])
    torch.testing.assert_close(output.loss_terms["second/aux"], 2 * output.loss_terms["nll_second"])


def test_padding_does_not_change_the_pooled_vector(tokenizer):
    hidden = torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    garbage = hidden.clone()
    garbage[0, 3:] = 1e4
    torch.testing.assert_close(masked_mean_pool(garbage, mask), masked_mean_pool(hidden, mask))
    torch.testing.assert_close(masked_mean_pool(hidden, mask)[0], hidden[0, :3].mean(0))

    # End to end: a text's sentence vector is the same alone and padded inside a batch.
    wrapper = E2S2ForPreTraining(tiny_backbone("fusion_transformer")).eval()
    collator = E2S2DataCollator(tokenizer, seed=0)
    texts = ["the cat sat on the mat", "one two three four five six seven eight nine ten yes no and but or"]
    with torch.no_grad():
        together = wrapper(**collator(texts)).sentence_embeddings
        alone = wrapper(**collator(texts[:1])).sentence_embeddings
    torch.testing.assert_close(together[:, 0], alone[:, 0], atol=1e-5, rtol=1e-5)


# --- export ------------------------------------------------------------------------------------


def test_export_of_bart_loads_as_plain_bart(tmp_path, tokenizer):
    wrapper = E2S2ForPreTraining(tiny_bart()).eval()
    batch = E2S2DataCollator(tokenizer)(random_texts(3, seed=0))
    wrapper.save_backbone(tmp_path / "plain")
    assert not (tmp_path / "plain" / HEADS_WEIGHTS_NAME).exists()
    plain = BartForConditionalGeneration.from_pretrained(tmp_path / "plain").eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, wrapper.backbone(**inputs).logits)

    wrapper.save_pretrained(tmp_path / "full")
    restored = E2S2ForPreTraining.from_pretrained(tmp_path / "full").eval()
    assert restored.hparams() == wrapper.hparams()
    with torch.no_grad():
        torch.testing.assert_close(restored(**batch).loss, wrapper(**batch).loss)


@pytest.mark.slow
def test_export_of_hf_fusion_loads_without_hf_fusion(tmp_path, tokenizer):
    wrapper = E2S2ForPreTraining(tiny_backbone("fusion_transformer")).eval()
    folder = tmp_path / "export"
    wrapper.save_pretrained(folder)  # the pretraining checkpoint layout: plain model + heads file
    batch = E2S2DataCollator(tokenizer)(random_texts(3, seed=0))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    torch.save(inputs, tmp_path / "batch.pt")
    with torch.no_grad():
        expected = wrapper.backbone(**inputs).logits
    assert json.loads((folder / "config.json").read_text())["use_cache"] is True
    run_in_clean_process(
        f"""
        import torch
        from transformers import AutoModelForSeq2SeqLM
        model = AutoModelForSeq2SeqLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert "hf_fusion" not in type(model).__module__
        assert not any("denoising" in name for name, _ in model.named_parameters())
        with torch.no_grad():
            torch.save(model(**torch.load("batch.pt")).logits, "logits.pt")
        """,
        tmp_path,
    )
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-6, rtol=0)


# --- CLI ---------------------------------------------------------------------------------------


def cli_args(tmp_path: Path, output: str, model: str, *extra: str) -> list[str]:
    sizes = [option for k, v in TINY.items() if k != "vocab_size" for option in (f"--model_config.{k}", str(v))]
    return [
        "--model", model,
        "--tokenizer", str(tmp_path / "tokenizer"),
        "--train_files", str(tmp_path / "corpus.txt"),
        "--max_length", "48",
        "--output_dir", str(tmp_path / output),
        "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-3",
        "--logging_steps", "1",
        "--report_to", "none",
        "--use_cpu",
        "--seed", "0",
        *([] if Path(model).exists() else sizes),
        *extra,
    ]  # fmt: skip


@pytest.fixture
def cli_workspace(tmp_path, tokenizer) -> Path:
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    lines = random_texts(24, seed=7, max_words=20) + ["", "the cat"]  # an empty and a too-short line get dropped
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def state_dict_of(folder: Path) -> dict[str, torch.Tensor]:
    return E2S2ForPreTraining.from_pretrained(folder).state_dict()


@pytest.mark.slow
def test_cli_trains_logs_every_term_and_resumes_exactly(cli_workspace):
    tmp = cli_workspace
    straight = pretrain_main(cli_args(tmp, "straight", "fusion_transformer", "--max_steps", "8", "--save_steps", "4"))
    logged = [entry for entry in straight.state.log_history if "loss" in entry]
    assert len(logged) == 8
    terms = [f"loss_terms/{name}" for name in ("nll_main", "nll_second", "denoising", "contrastive")]
    for entry in logged:
        assert set(terms) <= set(entry)
    # 24 usable lines / batch 4 = 6 steps per epoch: the run crosses an epoch boundary.
    assert straight.state.epoch > 1

    resumed = pretrain_main(
        cli_args(
            tmp, "resumed", "fusion_transformer", "--max_steps", "8", "--save_steps", "4",
            "--resume_from_checkpoint", str(tmp / "straight" / "checkpoint-4"),
        )
    )  # fmt: skip
    assert resumed.state.global_step == 8
    # The resumed run logs exactly what the uninterrupted run logged after step 4 ...
    after = [e for e in logged if e["step"] > 4]
    again = [e for e in resumed.state.log_history if "loss" in e and e["step"] > 4]
    assert [e["step"] for e in again] == [5, 6, 7, 8]
    for entry, expected_entry in zip(again, after):
        for key in ("loss", *terms):
            assert entry[key] == pytest.approx(expected_entry[key], abs=1e-4), (entry["step"], key)
    expected, actual = state_dict_of(tmp / "straight"), state_dict_of(tmp / "resumed")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)

    # A checkpoint is also the plain model, ready for fine-tuning.
    plain = AutoModelForSeq2SeqLM.from_pretrained(tmp / "straight" / "checkpoint-4")
    assert type(plain).__name__ == "FusionTransformerForConditionalGeneration"


@pytest.mark.slow
def test_cli_bart_baseline_then_e2s2_from_a_bart_checkpoint(cli_workspace):
    tmp = cli_workspace
    baseline = pretrain_main(cli_args(tmp, "bart", "bart", "--objective", "bart", "--max_steps", "2"))
    assert "loss_terms/denoising" not in baseline.state.log_history[0]
    assert isinstance(AutoModelForSeq2SeqLM.from_pretrained(tmp / "bart"), BartForConditionalGeneration)

    continued = pretrain_main(cli_args(tmp, "bart_e2s2", str(tmp / "bart"), "--max_steps", "2"))
    assert "loss_terms/contrastive" in continued.state.log_history[0]
    assert isinstance(AutoModelForSeq2SeqLM.from_pretrained(tmp / "bart_e2s2"), BartForConditionalGeneration)
    assert (tmp / "bart_e2s2" / HEADS_WEIGHTS_NAME).is_file()


def test_cli_refuses_bad_input(cli_workspace):
    tmp = cli_workspace
    (tmp / "empty.txt").write_text("\n\n")
    args = cli_args(tmp, "out", "fusion_transformer", "--max_steps", "1")
    with pytest.raises(ValueError, match="no non-empty line"):
        pretrain_main([*args[:5], str(tmp / "empty.txt"), *args[6:]])
    with pytest.raises(ValueError, match="lambda_cl"):
        pretrain_main([*args, "--lambda_cl", "-1"])
    with pytest.raises(ValueError, match="neither an existing folder nor a known model_type"):
        pretrain_main(cli_args(tmp, "out", "no_such_model", "--max_steps", "1"))


# --- the official code's two-class denoising ---------------------------------------------------


def independent_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, kept_classes: set[int]) -> float:
    """Mean of -log softmax(logits)[label] over the positions whose label is in ``kept_classes``,
    one position at a time in float64 (the softmax always runs over all 3 classes)."""
    losses = []
    for scores, label in zip(logits.detach().reshape(-1, 3).double(), labels.reshape(-1).tolist()):
        if label in kept_classes:
            losses.append(math.log(sum(math.exp(float(s)) for s in scores)) - float(scores[label]))
    return sum(losses) / len(losses)


def test_two_class_denoising_drops_the_shuffled_positions(tokenizer):
    torch.manual_seed(0)
    batch = E2S2DataCollator(tokenizer, shuffle_ratio=0.3, replace_ratio=0.3, seed=1)(random_texts(6, seed=4, min_words=12))
    labels = batch["denoising_labels"]
    assert {0, 1, 2} <= set(labels.unique().tolist())  # every class is present, so dropping one matters
    logits = torch.randn(*labels.shape, 3, requires_grad=True)

    three, two = denoising_loss(logits, labels, classes=3), denoising_loss(logits, labels, classes=2)
    assert three.item() == pytest.approx(independent_cross_entropy(logits, labels, {0, 1, 2}), rel=1e-6)
    assert two.item() == pytest.approx(independent_cross_entropy(logits, labels, {0, 2}), rel=1e-6)
    assert two.item() != pytest.approx(three.item(), rel=1e-3)

    # The official criterion: F.nll_loss with ignore_index = fairseq's padding index 1, which is also
    # the label of "shuffled" (padding is labelled 0 there; here it is -100 and stays out).
    official_labels = labels.masked_fill(labels == -100, 1)
    official = nn.functional.nll_loss(torch.log_softmax(logits.reshape(-1, 3), -1), official_labels.reshape(-1), ignore_index=1)
    assert two.item() == pytest.approx(official.item(), rel=1e-6)

    # No gradient reaches the logits of a shuffled position in the two-class loss; all of them
    # receive one in the three-class loss.
    (gradient,) = torch.autograd.grad(two, logits)
    assert gradient[labels == 1].abs().sum() == 0 and gradient[labels == 0].abs().sum() > 0
    (gradient,) = torch.autograd.grad(denoising_loss(logits, labels, classes=3), logits)
    assert gradient[labels == 1].abs().sum() > 0


def test_two_class_switch_reaches_the_wrapper_and_its_checkpoint(tmp_path, tokenizer):
    batch = E2S2DataCollator(tokenizer, shuffle_ratio=0.3, seed=1)(random_texts(4, seed=4, min_words=12))
    wrapper = E2S2ForPreTraining(tiny_backbone("fusion_transformer"), denoising_classes=2).eval()
    with torch.no_grad():
        output = wrapper(**batch)
    expected = independent_cross_entropy(output.denoising_logits, batch["denoising_labels"], {0, 2})
    assert output.loss_terms["denoising"].item() == pytest.approx(expected, rel=1e-5)
    wrapper.save_pretrained(tmp_path)
    assert E2S2ForPreTraining.from_pretrained(tmp_path).denoising_classes == 2
    with pytest.raises(ValueError, match="denoising_classes = 1 is not supported; allowed values: 3, 2"):
        E2S2ForPreTraining(tiny_backbone("fusion_transformer"), denoising_classes=1)


# --- recipes ---------------------------------------------------------------------------------


def recipe_argv(recipe: str, *extra: str) -> list[str]:
    return ["--recipe", recipe, "--model", "fusion_transformer", "--tokenizer", "TOK", "--output_dir", "out", *extra]


def test_paper_recipe_is_the_authors_train_sh():
    """The values of the authors' train.sh (restated in docs/presets.md); tests/test_presets.py
    compares the whole file with the docs table."""
    args, training, overrides = parse_pretrain_arguments(recipe_argv("paper"))
    assert (training.learning_rate, training.warmup_steps, training.max_steps) == (1.5e-6, 6000, 50000)
    assert (training.adam_beta1, training.adam_beta2, training.adam_epsilon) == (0.9, 0.98, 1e-6)
    assert (training.weight_decay, training.max_grad_norm) == (0.01, 0.0)
    assert (args.max_length, args.pack_texts, args.objective) == (1024, True, "e2s2")
    assert (args.nll_weight, args.lambda_de, args.lambda_cl) == (0.5, 0.05, 0.05)
    assert overrides == {"dropout": 0.1, "attention_dropout": 0.1}

    # fairseq's polynomial_decay (end lr 0, power 1): linear warmup to the peak, then a straight
    # line to 0 at the last update; the recipe's Trainer schedule follows it step by step.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=training.learning_rate)
    schedule = get_scheduler(
        training.lr_scheduler_type, optimizer, num_warmup_steps=training.warmup_steps,
        num_training_steps=training.max_steps, scheduler_specific_kwargs=training.lr_scheduler_kwargs,
    )  # fmt: skip
    peak, warmup, total = 1.5e-6, 6000, 50000
    for step in (0, 1, 3000, 6000, 6001, 28000, 49999, 50000):
        expected = peak * step / warmup if step < warmup else peak * (1 - (step - warmup) / (total - warmup))
        assert schedule.lr_lambdas[0](step) * peak == pytest.approx(expected, abs=1e-15), step


def test_command_line_wins_over_the_recipe():
    args, training, overrides = parse_pretrain_arguments(
        recipe_argv("paper", "--learning_rate", "0.001", "--denoising_classes", "2", "--model_config.dropout", "0.3")
    )
    assert training.learning_rate == 0.001 and training.warmup_steps == 6000
    assert args.denoising_classes == 2
    assert overrides == {"dropout": 0.3, "attention_dropout": 0.1}
    # Without a recipe the defaults are Hugging Face's, not the paper's.
    _, plain, _ = parse_pretrain_arguments(recipe_argv("paper")[2:])
    assert plain.learning_rate == 5e-5 and plain.warmup_steps == 0


def test_small_recipe_builds_a_cpu_sized_model():
    args, training, overrides = parse_pretrain_arguments(recipe_argv("small"))
    assert overrides["d_model"] == 96 and training.max_steps == 500 and args.max_length == 64
    config = AutoConfig.for_model("fusion_transformer", vocab_size=100, **overrides)
    assert config.max_position_embeddings >= args.max_length


def test_bad_recipes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'nope' is not a preset; allowed: .*paper.*small"):
        parse_pretrain_arguments(recipe_argv("nope"))
    typo = tmp_path / "typo.yaml"
    typo.write_text("lamda_de: 0.1\n")
    with pytest.raises(ValueError, match="'lamda_de' is no option"):
        parse_pretrain_arguments(recipe_argv(str(typo)))


def test_packing_keeps_texts_whole_and_fills_blocks(tokenizer):
    texts = random_texts(40, seed=3, max_words=12)
    collator = E2S2DataCollator(tokenizer, max_length=32)
    lengths = collator.content_lengths(texts)
    assert collator.boundary_tokens(texts[0]) == 2  # <s> ... </s>
    budget = 32 - 2
    blocks = pack_texts(texts, lengths, budget)
    assert " ".join(blocks) == " ".join(texts)  # in order, nothing lost
    # Which texts each block holds (word-level tokenizer: one token per word).
    first = 0
    for block_idx, block in enumerate(blocks):
        words, last = len(block.split()), first
        while sum(lengths[first:last]) < words:
            last += 1
        assert " ".join(texts[first:last]) == block  # whole texts only
        assert collator.content_lengths([block])[0] == sum(lengths[first:last]) <= budget
        if block_idx < len(blocks) - 1:  # greedy: the next text would not have fitted
            assert sum(lengths[first:last]) + lengths[last] > budget
        first = last
    assert first == len(texts)


@pytest.mark.slow
def test_cli_with_a_recipe_packs_texts_into_blocks(cli_workspace):
    tmp = cli_workspace
    # The recipe's sizes and lengths give way to the command line's (tiny model, max_length 48).
    trainer = pretrain_main(cli_args(tmp, "packed", "fusion_transformer", "--recipe", "small", "--pack_texts", "true", "--max_steps", "1"))
    blocks = trainer.train_dataset["text"]
    texts = [line for line in (tmp / "corpus.txt").read_text().splitlines() if len(line.split()) >= 3]
    assert " ".join(blocks) == " ".join(texts) and len(blocks) < len(texts)
    assert trainer.model.backbone.config.d_model == TINY["d_model"]
    assert trainer.args.learning_rate == 1e-3 and trainer.args.warmup_steps == 50  # the recipe's schedule
