"""A joint source/target subword tokenizer trained from scratch with HF ``tokenizers``.

Special tokens and their ids match the ``FusionTransformerConfig`` defaults (BART's layout):
``<s>``=0 (bos), ``<pad>``=1, ``</s>``=2 (eos, also ``decoder_start_token_id``), ``<unk>``=3,
``<mask>``=4 (for denoising objectives such as E2S2).

Design choices:

* One vocabulary for both languages, trained on source and target training text together: the
  models tie the encoder embedding, decoder embedding and output projection (``tie_word_embeddings``).
* Pre-tokenisation is SentencePiece-style ``Metaspace`` (a word-initial ``▁``) after NFKC
  normalisation, so decoding restores the original spacing without language-specific detokenisers;
  punctuation and single digits are split off so no piece glues a word to its full stop.
  ``model="unigram"`` (default, the SentencePiece unigram LM) or ``"bpe"``.
* The post-processor appends ``</s>`` to every sequence and prepends nothing: ``X </s>``. That is
  what a seq2seq model needs -- the encoder sees where the source ends, labels end with eos so the
  model learns to stop, and the decoder input ``</s> X`` is made by shifting the labels right with
  ``decoder_start_token_id=2`` -- and it is how T5/Marian tokenizers behave. BART also prepends
  ``<s>``; that token carries no information for a model trained from scratch, so we leave it out.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS: dict[str, str] = {
    "bos_token": "<s>",
    "pad_token": "<pad>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
}
# Listed in id order: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4.
SPECIAL_TOKEN_ORDER: tuple[str, ...] = tuple(SPECIAL_TOKENS.values())

TOKENIZER_MODELS = ("unigram", "bpe")


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8000,
    model: str = "unigram",
    model_max_length: int = 1024,
) -> PreTrainedTokenizerFast:
    """Train a joint subword tokenizer and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        texts: training sentences, source and target together (e.g. ``train["source"] +
            train["target"]``).
        vocab_size: size of the vocabulary, the 5 special tokens included. Unigram may stop
            short of it on a small corpus; ``len(tokenizer)`` is the true size.
        model: ``"unigram"`` or ``"bpe"``.
        model_max_length: stored in the tokenizer config (truncation limit by default); keep it
            at most the model's ``max_position_embeddings``.

    Returns:
        A fast tokenizer that appends ``</s>`` to every sequence, with bos/pad/eos/unk/mask set.
        ``save_pretrained`` + ``AutoTokenizer.from_pretrained`` round-trip it.
    """
    if model not in TOKENIZER_MODELS:
        raise ValueError(f"model={model!r} is not supported; allowed values: {list(TOKENIZER_MODELS)}.")
    if vocab_size <= len(SPECIAL_TOKEN_ORDER):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKEN_ORDER)} special tokens, got {vocab_size}.")
    unk = SPECIAL_TOKENS["unk_token"]
    if model == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKEN_ORDER), unk_token=unk, show_progress=False
        )
    else:
        tokenizer = Tokenizer(models.BPE(unk_token=unk))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKEN_ORDER), show_progress=False
        )
    tokenizer.normalizer = normalizers.NFKC()
    # Metaspace marks word starts with "▁"; splitting punctuation and digits off as well keeps
    # "sea." from becoming one piece and stays lossless, because "▁" alone encodes the spaces.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if model == "unigram":
        tokenizer = _canonical_unigram(tokenizer)

    eos = SPECIAL_TOKENS["eos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tokenizer.token_to_id(eos))]
    )
    for expected_id, token in enumerate(SPECIAL_TOKEN_ORDER):
        # The trainers put special tokens first, in the order given; the configs rely on it.
        assert tokenizer.token_to_id(token) == expected_id, (token, tokenizer.token_to_id(token))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model_max_length, **SPECIAL_TOKENS)


def _canonical_unigram(tokenizer: Tokenizer) -> Tokenizer:
    """The trained unigram tokenizer with its pieces in a canonical order: the special tokens first
    (ids 0-4), then every other piece sorted by its text.

    The unigram trainer finds the same pieces on every run but lists them in a different order
    (its scores differ in the last digits between processes), so ids would change from one
    training to the next on the same text. Ids never depend on the order of a unigram vocabulary
    for segmentation (scores do), so sorting makes a rerun of ``experiment.yaml`` give the same ids.
    """
    state = json.loads(tokenizer.to_str())
    vocab = state["model"]["vocab"]
    specials = len(SPECIAL_TOKEN_ORDER)
    assert [piece for piece, _ in vocab[:specials]] == list(SPECIAL_TOKEN_ORDER), vocab[:specials]
    state["model"]["vocab"] = vocab[:specials] + sorted(vocab[specials:], key=lambda item: item[0])
    state["model"]["unk_id"] = list(SPECIAL_TOKEN_ORDER).index(SPECIAL_TOKENS["unk_token"])
    return Tokenizer.from_str(json.dumps(state))


def config_fields_for(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The config fields that make a fresh model use ``tokenizer``: its vocabulary size and special
    ids, and ``decoder_start_token_id`` = the eos id (labels ``X </s>`` shift into decoder inputs
    ``</s> X``, BART's convention). :func:`check_tokenizer_fits` checks the same fields."""
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.eos_token_id,
    }


def check_tokenizer_fits(tokenizer: PreTrainedTokenizerFast, config) -> None:
    """Raise ``ModelLoadError`` (a ``ValueError``) if a model config cannot use this tokenizer.

    The embedding table must be exactly the tokenizer's size (``len(tokenizer) == config.vocab_size``:
    a smaller tokenizer than the checkpoint's is a different tokenizer, whose ids mean other
    pieces) and the special-token ids the model uses for padding, stopping and starting must be the
    tokenizer's. ``decoder_start_token_id`` is not a tokenizer field; it must equal the eos id
    for labels ``X </s>`` to shift into decoder inputs ``</s> X``.
    """
    problems = []
    if len(tokenizer) > config.vocab_size:
        problems.append(f"config.vocab_size={config.vocab_size} < len(tokenizer)={len(tokenizer)}")
    elif len(tokenizer) < config.vocab_size:
        problems.append(
            f"config.vocab_size={config.vocab_size} > len(tokenizer)={len(tokenizer)} (a different tokenizer from the "
            "one the model was trained with?)"
        )
    for field in ("pad_token_id", "eos_token_id", "bos_token_id"):
        config_id, tokenizer_id = getattr(config, field, None), getattr(tokenizer, field)
        if config_id != tokenizer_id:
            problems.append(f"config.{field}={config_id} != tokenizer.{field}={tokenizer_id}")
    start = getattr(config, "decoder_start_token_id", None)
    if start is not None and start != tokenizer.eos_token_id:
        problems.append(f"config.decoder_start_token_id={start} != tokenizer.eos_token_id={tokenizer.eos_token_id}")
    if problems:
        from .errors import ModelLoadError

        raise ModelLoadError(
            "Tokenizer does not fit the model config: " + "; ".join(problems) + ". Use the model's own tokenizer "
            "(omit tokenizer_name_or_path), or train a model from scratch for this tokenizer."
        )
