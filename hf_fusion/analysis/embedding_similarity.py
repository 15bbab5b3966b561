"""Are source and target embeddings closer? SurfaceFusion's embedding claim (Liu et al., ICLR 2021,
arXiv 2012.14768).

SurfaceFusion feeds the source embeddings to the output softmax through the *shared* embedding
matrix, and its gradient reaches that matrix; Liu et al. argue this brings the embeddings of
source words and of their translations closer together. The measurement here: take word pairs
aligned by a bilingual lexicon, keep those whose source and target word are each one token of the
model's vocabulary, and compare rows of the shared token embedding matrix E (cosine similarity,
which the embedding scale does not change):

- ``aligned_cos``: the mean (and std) cosine of E[source word] and E[its translation];
- ``unaligned_cos``: the mean cosine of each lexicon source word with the lexicon's *other* target
  words, the baseline a generally anisotropic embedding space would reach anyway;
- ``gap`` = aligned - unaligned: "closer" means a larger gap, not just a larger cosine;
- ``p_at_1``: for each lexicon source word, whether its nearest lexicon target word (by cosine) is
  one of its translations: bilingual lexicon induction precision@1.

To compare models (e.g. vanilla vs SurfaceFusion, several seeds each) the same word pairs must be
used: with several models, only pairs that are single tokens for every model's tokenizer count.
Pairs whose two words are the same token (``"Hotel"`` both ways) are dropped: their cosine is 1 in
every model. How the paper selected its word pairs is not restated here (unconfirmed); this
protocol is the project's.

The lexicon: a TSV file (``source<TAB>target`` per line, ``#`` comments), or by default one built
offline from the Ding German-English dictionary the built-in ``ding`` corpus comes from (Debian
``trans-de-en``): of every dictionary entry, the alternatives that are one word of two or more
letters (after removing the dictionary's tags and an English verb's leading "to"), English as the
source and German as the target, the built-in corpus' direction.

Command line::

    python -m hf_fusion.analysis.embedding_similarity VANILLA SURFACE_FUSION --output similarity.md
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.corpora import (
    BUILTIN_CORPORA,
    default_cache_root,
    ding_sub_entries,
    fetch_debian_package,
    strip_ding_markup,
)

from .common import check_table_path, load_checkpoint, run_command, write_table

WordPair = tuple[str, str]


def _one_word_alternatives(entry: str, english: bool) -> Iterator[str]:
    """The ``;``-separated alternatives of one Ding sub-entry that are a single word."""
    for alternative in entry.split("; "):
        text = strip_ding_markup(alternative)
        if english and text.startswith("to "):
            text = text[3:]
        if text.isalpha() and len(text) > 1:  # single letters are symbols (music notes, grades)
            yield text


def read_ding_lexicon(path: str | os.PathLike) -> list[WordPair]:
    """(English, German) one-word translation pairs of a Ding dictionary file, in file order,
    without duplicates: every one-word English alternative of a sub-entry with every one-word
    German alternative of its counterpart (``training.corpora.ding_sub_entries``)."""
    pairs: dict[WordPair, None] = {}
    for german_entry, english_entry in ding_sub_entries(path):
        targets = list(_one_word_alternatives(german_entry, english=False))
        for source in _one_word_alternatives(english_entry, english=True):
            pairs.update(dict.fromkeys((source, target) for target in targets))
    return list(pairs)


def ding_lexicon() -> list[WordPair]:
    """The Ding lexicon of the installed (or already unpacked) ``trans-de-en`` package."""
    package, data_path = BUILTIN_CORPORA["ding"].packages[0]
    base, _ = fetch_debian_package(package, data_path, default_cache_root())
    return read_ding_lexicon(base / data_path)


def read_tsv_lexicon(path: str | os.PathLike) -> list[WordPair]:
    """(source, target) pairs of a two-column TSV file; empty lines and ``#`` lines are skipped.

    Raises:
        ValueError: naming the first line without exactly two tab-separated fields.
    """
    pairs = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not all(field.strip() for field in fields):
            raise ValueError(f"{path} line {number}: a lexicon line is 'source<TAB>target', got {line!r}.")
        pairs.append((fields[0].strip(), fields[1].strip()))
    return pairs


def single_token_ids(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> dict[str, int]:
    """The words the tokenizer encodes as one token (as a word on its own: with a SentencePiece
    style tokenizer the word-initial form), and that token's id; one batched call."""
    encoded = tokenizer(list(words), add_special_tokens=False)["input_ids"]
    return {word: ids[0] for word, ids in zip(words, encoded) if len(ids) == 1}


def token_pairs(
    tokenizers: Sequence[PreTrainedTokenizerBase], lexicon: Iterable[WordPair]
) -> tuple[list[WordPair], list[list[tuple[int, int]]]]:
    """The lexicon pairs usable with every tokenizer: both words one token, the two tokens
    different. Returns the kept word pairs and, per tokenizer, their (source, target) token ids."""
    lexicon = list(lexicon)
    words = sorted({word for pair in lexicon for word in pair})
    vocabularies = [single_token_ids(tokenizer, words) for tokenizer in tokenizers]
    kept: list[WordPair] = []
    ids: list[list[tuple[int, int]]] = [[] for _ in tokenizers]
    for source, target in lexicon:
        found = [(vocabulary.get(source), vocabulary.get(target)) for vocabulary in vocabularies]
        if all(s is not None and t is not None and s != t for s, t in found):
            kept.append((source, target))
            for per_tokenizer, pair in zip(ids, found):
                per_tokenizer.append(pair)
    return kept, ids


@torch.no_grad()
def embedding_similarity(model: PreTrainedModel, pairs: Sequence[tuple[int, int]]) -> dict[str, float]:
    """The similarity measures of the module docstring for one model's shared embedding matrix.

    Args:
        model: A seq2seq model whose input embedding matrix is shared by source and target.
        pairs: (source token id, target token id) pairs, at least one.

    Returns:
        ``pairs``, ``aligned_cos``, ``aligned_cos_std``, ``unaligned_cos``, ``gap``, ``p_at_1``.
    """
    if not pairs:
        raise ValueError("No lexicon pair is usable with this vocabulary (both words one token, different tokens).")
    embeddings = torch.nn.functional.normalize(model.get_input_embeddings().weight.detach().double(), dim=-1)
    sources = sorted({s for s, _ in pairs})
    targets = sorted({t for _, t in pairs})
    similarity = embeddings[sources] @ embeddings[targets].T  # (unique sources, unique targets)
    aligned = torch.zeros_like(similarity, dtype=torch.bool)
    source_row = {token: row for row, token in enumerate(sources)}
    target_col = {token: col for col, token in enumerate(targets)}
    for s, t in pairs:
        aligned[source_row[s], target_col[t]] = True
    aligned_values = torch.stack([similarity[source_row[s], target_col[t]] for s, t in pairs])
    unaligned = similarity[~aligned]
    nearest = similarity.argmax(dim=1)
    hits = aligned[torch.arange(len(sources)), nearest]
    return {
        "pairs": len(pairs),
        "aligned_cos": float(aligned_values.mean()),
        "aligned_cos_std": float(aligned_values.std()) if len(pairs) > 1 else 0.0,
        "unaligned_cos": float(unaligned.mean()) if unaligned.numel() else float("nan"),
        "gap": float(aligned_values.mean() - unaligned.mean()) if unaligned.numel() else float("nan"),
        "p_at_1": float(hits.double().mean()),
    }


def compare_embedding_similarity(
    models: Sequence[tuple[str, PreTrainedModel, PreTrainedTokenizerBase]], lexicon: Iterable[WordPair]
) -> tuple[list[dict[str, Any]], list[WordPair]]:
    """:func:`embedding_similarity` of every model on the lexicon pairs usable with all of them.

    Args:
        models: (name, model, tokenizer) triples.
        lexicon: (source word, target word) pairs.

    Returns:
        One row per model (``model`` and the measures), and the word pairs used.
    """
    kept, ids = token_pairs([tokenizer for _, _, tokenizer in models], lexicon)
    rows = [{"model": name, **embedding_similarity(model, model_ids)} for (name, model, _), model_ids in zip(models, ids)]
    return rows, kept


def main(argv: list[str] | None = None) -> Path:
    """``python -m hf_fusion.analysis.embedding_similarity CHECKPOINT [CHECKPOINT ...] [--lexicon TSV] --output T``."""
    parser = argparse.ArgumentParser(description="Cosine similarity of lexicon-aligned source and target token "
                                     "embeddings, compared across checkpoints.")
    parser.add_argument("checkpoints", nargs="+", help="saved model folders")
    parser.add_argument("--lexicon", default=None,
                        help="TSV of source<TAB>target words (default: built from the Ding dictionary, English -> German)")
    parser.add_argument("--reverse", action="store_true", help="swap the lexicon's columns (a German -> English model)")
    parser.add_argument("--output", required=True, help="table to write (.md or .json)")
    args = parser.parse_args(argv)
    check_table_path(args.output)
    lexicon = read_tsv_lexicon(args.lexicon) if args.lexicon else ding_lexicon()
    if args.reverse:
        lexicon = [(target, source) for source, target in lexicon]
    models = [(checkpoint, *load_checkpoint(checkpoint)) for checkpoint in args.checkpoints]
    rows, kept = compare_embedding_similarity(models, lexicon)
    notes = (f"{len(kept)} of {len(lexicon)} lexicon pairs ({args.lexicon or 'Ding dictionary'}) are one token on "
             f"each side, different tokens, for every model; e.g. {', '.join(f'{s}={t}' for s, t in kept[:5])}.")
    path = write_table(rows, args.output, "Similarity of aligned source and target embeddings", notes)
    print(f"Wrote {path}")
    return path


if __name__ == "__main__":
    run_command(main)
