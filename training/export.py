"""The Hub-ready folder of a trained model, and its upload.

``export_model`` writes what a user of the Hub needs and nothing else: safetensors weights,
``config.json`` with ``auto_map`` and ``use_cache=True`` (the Trainer saves checkpoints with
``use_cache=False``), the model code files that ``trust_remote_code`` loads (copied by
``save_pretrained`` because hf_fusion registers its classes for the Auto classes), the tokenizer,
``generation_config.json`` (beam size, max length), the model card, and the run's record
(``experiment.yaml``, ``results.json``, curves, predictions). ``check_export`` verifies all of it.

``push_folder`` uploads such a folder through ``transformers.utils.hub.hf_api()``, the same client
``push_to_hub`` uses, then pins the card's loading snippet to the commit it just made.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard
from transformers import GenerationConfig, PreTrainedModel

from .model_card import REPO_PLACEHOLDER, REVISION_PLACEHOLDER

SIBLING_IMPORT = re.compile(r"^\s*from \.(\w+) import", re.MULTILINE)
REQUIRED_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md")


def export_model(
    model: PreTrainedModel,
    tokenizer: Any,
    folder: str | Path,
    card: ModelCard,
    generation_config: GenerationConfig | None = None,
    extra_files: dict[str, str] | None = None,
    copy_files: list[Path] | None = None,
) -> Path:
    """Write the Hub-ready folder and check it (see the module docstring).

    Args:
        model: The trained model (unwrapped).
        tokenizer: Saved next to the model.
        folder: Destination (created; existing files are overwritten).
        card: The rendered model card, saved as README.md.
        generation_config: Saved as ``generation_config.json`` and set on the model; default: the
            model's own, as is (after a Trainer's evaluation it holds every library default).
        extra_files: ``{file name: text}`` written into the folder.
        copy_files: Files copied into the folder (e.g. the training curves).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if generation_config is not None:
        model.generation_config = generation_config
    model.config.use_cache = True
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text, encoding="utf-8")
    for path in copy_files or []:
        shutil.copy2(path, folder / Path(path).name)
    card.save(folder / "README.md")
    check_export(folder)
    return folder


def check_export(folder: str | Path) -> None:
    """Raise ValueError unless ``folder`` is a complete, self-contained hf_fusion model folder."""
    folder = Path(folder)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder} is not a complete model folder: missing {', '.join(missing)}.")
    config = json.loads((folder / "config.json").read_text())
    auto_map = config.get("auto_map") or {}
    if "AutoModelForSeq2SeqLM" not in auto_map or "AutoConfig" not in auto_map:
        raise ValueError(f"{folder}/config.json has no auto_map for AutoConfig and AutoModelForSeq2SeqLM.")
    if not config.get("use_cache", False):
        raise ValueError(f"{folder}/config.json has use_cache=false; generation would be slow.")
    # The files auto_map names, and every sibling module they import (trust_remote_code fetches
    # exactly these).
    pending = [reference.split(".")[0] + ".py" for reference in auto_map.values()]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if not (folder / name).is_file():
            raise ValueError(f"{folder} lacks the model code file {name} (needed by trust_remote_code).")
        imports = SIBLING_IMPORT.findall((folder / name).read_text(encoding="utf-8"))
        pending.extend(f"{module}.py" for module in imports)


def push_folder(
    folder: str | Path,
    repo_id: str,
    revision: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload hf_fusion model",
) -> str:
    """Upload an exported folder to the Hub; returns the commit that holds the model.

    The card's loading snippet names the repository and a ``revision`` to pin; after the upload
    the card is updated to name this repository and the commit just made (a second, card-only
    commit), so users pin exactly the code that was reviewed and uploaded.
    """
    from transformers.utils.hub import hf_api

    folder = Path(folder)
    check_export(folder)
    api = hf_api()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if revision:
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=commit_message, token=token
    )
    card_text = (folder / "README.md").read_text(encoding="utf-8")
    pinned = pin_card(card_text, repo_id, commit.oid)
    if pinned != card_text:
        api.upload_file(
            path_or_fileobj=pinned.encode("utf-8"),
            path_in_repo="README.md",
            repo_id=repo_id,
            revision=revision,
            commit_message=f"Model card: pin revision {commit.oid[:10]}",
            token=token,
        )
    return commit.oid


def pin_card(card_text: str, repo_id: str, revision: str) -> str:
    """Fill the repository and revision placeholders of a card's loading snippet."""
    text = card_text.replace(REVISION_PLACEHOLDER, revision)
    start = text.find(REPO_PLACEHOLDER)
    while start != -1:
        end = text.find('"', start)
        text = text[:start] + repo_id + text[end:]
        start = text.find(REPO_PLACEHOLDER)
    return text
