"""The joint subword tokenizer and the bundled BLEU/chrF metric."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sacrebleu
from transformers import AutoTokenizer

from hf_fusion import FusionTransformerConfig
from training.metrics import TRANSLATION_METRICS_PATH, load_translation_metric
from training.tokenizer import SPECIAL_TOKENS, check_tokenizer_fits, train_tokenizer
from tests.helpers import TINY

ENGLISH = [
    "Eventually the river flows into the sea.",
    "The house at the end of the street is very old.",
    "She turned him down, and he was sad for days.",
    "We met each other at university in 1999.",
    "Do you want to go out with me tonight?",
    "My father divided up the rest of the cash.",
    "Prices have begun to fall in sympathy with the yen.",
    "The older ones amongst us will remember.",
]
GERMAN = [
    "Der Fluss mündet schließlich ins Meer.",
    "Das Haus am Ende der Straße ist sehr alt.",
    "Sie hat ihm einen Korb gegeben, und er war tagelang traurig.",
    "Wir haben uns 1999 an der Uni kennengelernt.",
    "Willst du heute Abend mit mir ausgehen?",
    "Mein Vater teilte das restliche Bargeld auf.",
    "Die Preise sinken langsam im Gleichklang mit dem Yen.",
    "Die Älteren unter uns werden sich erinnern.",
]


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def tokenizer(request: pytest.FixtureRequest):
    return train_tokenizer((ENGLISH + GERMAN) * 4, vocab_size=300, model=request.param)


def test_special_token_ids_match_the_config_defaults(tokenizer) -> None:
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in SPECIAL_TOKENS.items()}
    assert ids == {"bos_token": 0, "pad_token": 1, "eos_token": 2, "unk_token": 3, "mask_token": 4}
    config = FusionTransformerConfig(**TINY)
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (
        config.bos_token_id,
        config.pad_token_id,
        config.eos_token_id,
    )
    assert tokenizer.mask_token == "<mask>" and tokenizer.mask_token_id == 4
    assert tokenizer.unk_token_id == 3
    assert len(tokenizer) <= 300


def test_every_sequence_ends_with_eos_and_decodes_losslessly(tokenizer) -> None:
    batch = tokenizer(ENGLISH, text_target=GERMAN)
    for input_ids, labels, source, target in zip(batch["input_ids"], batch["labels"], ENGLISH, GERMAN):
        # "X </s>": exactly one eos, at the end; no bos; no unknown pieces for training text.
        assert input_ids[-1] == 2 and labels[-1] == 2
        assert input_ids.count(2) == 1 and 0 not in input_ids and 3 not in input_ids
        assert tokenizer.decode(input_ids, skip_special_tokens=True) == source
        assert tokenizer.decode(labels, skip_special_tokens=True) == target
    # Punctuation is its own piece, never glued to a word.
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("into the sea.")["input_ids"])
    assert pieces[-2:] == [".", "</s>"]
    # Padding uses <pad>=1 and masks it out.
    padded = tokenizer(["a b c.", ENGLISH[1]], padding=True)
    assert padded["input_ids"][0][-1] == 1 and padded["attention_mask"][0][-1] == 0


def test_save_and_reload_with_auto_tokenizer(tokenizer, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = ENGLISH + GERMAN + ["Unbekannte Wörter wie Quizshow & Ω bleiben heil."]
    assert reloaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert len(reloaded) == len(tokenizer)
    for name, token in SPECIAL_TOKENS.items():
        assert getattr(reloaded, name) == token
    assert (reloaded.bos_token_id, reloaded.pad_token_id, reloaded.eos_token_id, reloaded.mask_token_id) == (0, 1, 2, 4)
    assert reloaded.model_max_length == tokenizer.model_max_length


def test_train_tokenizer_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"model='wordpiece' is not supported; allowed values: \['unigram', 'bpe'\]"):
        train_tokenizer(ENGLISH, model="wordpiece")
    with pytest.raises(ValueError, match="vocab_size must exceed the 5 special tokens, got 5"):
        train_tokenizer(ENGLISH, vocab_size=5)


def test_check_tokenizer_fits(tokenizer) -> None:
    check_tokenizer_fits(tokenizer, FusionTransformerConfig(**{**TINY, "vocab_size": len(tokenizer)}))
    with pytest.raises(ValueError, match=rf"config.vocab_size=100 < len\(tokenizer\)={len(tokenizer)}"):
        check_tokenizer_fits(tokenizer, FusionTransformerConfig(**TINY))
    with pytest.raises(ValueError, match=r"config.pad_token_id=0 != tokenizer.pad_token_id=1"):
        check_tokenizer_fits(tokenizer, FusionTransformerConfig(**{**TINY, "vocab_size": 400, "pad_token_id": 0}))
    with pytest.raises(ValueError, match=r"config.eos_token_id=5 != tokenizer.eos_token_id=2"):
        check_tokenizer_fits(tokenizer, FusionTransformerConfig(**{**TINY, "vocab_size": 400, "eos_token_id": 5}))
    with pytest.raises(ValueError, match=r"config.decoder_start_token_id=0 != tokenizer.eos_token_id=2"):
        check_tokenizer_fits(
            tokenizer, FusionTransformerConfig(**{**TINY, "vocab_size": 400, "decoder_start_token_id": 0})
        )


# ------------------------------------------------------------------------------------------------
# Metric
# ------------------------------------------------------------------------------------------------

PREDICTIONS = [
    "Der Fluss fließt schließlich ins Meer.",
    "Das Haus am Ende der Strasse ist alt.",
    "Wir trafen uns an der Universität.",
    "willst du heute mit mir ausgehen?",
]


def test_metric_loads_offline_by_path() -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    metric = load_translation_metric()
    assert Path(metric.__module__.replace(".", "/")).name == TRANSLATION_METRICS_PATH.stem
    perfect = metric.compute(predictions=GERMAN[:2], references=GERMAN[:2])
    assert perfect == pytest.approx({"bleu": 100.0, "chrf": 100.0})


def test_metric_equals_sacrebleu_single_and_multi_reference() -> None:
    metric = load_translation_metric()
    references = GERMAN[:4]
    scores = metric.compute(predictions=PREDICTIONS, references=references)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [references]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, [references]).score)
    assert 0.0 < scores["bleu"] < 100.0

    second = ["Der Fluss fließt schließlich ins Meer.", "Das Haus ist alt.", "Wir trafen uns.", "Willst du?"]
    multi = metric.compute(predictions=PREDICTIONS, references=[[a, b] for a, b in zip(references, second)])
    assert multi["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [references, second]).score)
    assert multi["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, [references, second]).score)
    assert multi["bleu"] > scores["bleu"]

    options = metric.compute(
        predictions=PREDICTIONS, references=references, lowercase=True, chrf_word_order=2, bleu_tokenize="intl"
    )
    bleu = sacrebleu.metrics.BLEU(lowercase=True, tokenize="intl").corpus_score(PREDICTIONS, [references])
    chrf_plus = sacrebleu.metrics.CHRF(word_order=2, lowercase=True).corpus_score(PREDICTIONS, [references])
    assert options == pytest.approx({"bleu": bleu.score, "chrf": chrf_plus.score})


def test_metric_rejects_ragged_references() -> None:
    metric = load_translation_metric()
    with pytest.raises(ValueError, match=r"same number of references; got counts \[1, 2\]"):
        metric.compute(predictions=PREDICTIONS[:2], references=[["a b c"], ["a b c", "d e f"]])
