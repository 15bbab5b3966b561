"""Refresh the model code saved next to a checkpoint.

``save_pretrained`` copies hf_fusion's model files into every checkpoint folder, and
``trust_remote_code`` runs *those* files, not the installed package, so a folder keeps the code of
the day it was saved. When transformers changes an interface that code relies on (5.24 renamed the
generation cache, see ``compat.py``), old folders need the current code: this module rewrites it.
Weights, config and tokenizer are untouched; the model classes keep their names, so ``auto_map``
stays valid. Not copied into checkpoints itself: nothing in the model files imports it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files

from .families import MODEL_FAMILIES


def model_code_files(model_type: str) -> list[Path]:
    """The source files ``save_pretrained`` writes for a family: the modules defining its config,
    base and LM classes, and every sibling module they import."""
    files: list[Path] = []
    for cls in MODEL_FAMILIES[model_type]:
        defining = Path(sys.modules[cls.__module__].__file__)
        for path in (defining, *map(Path, get_relative_import_files(str(defining)))):
            if path not in files:
                files.append(path)
    return files


def refuse_changed_semantics(folder: Path, config: dict) -> None:
    """Refuse a refresh that would change what the saved model computes.

    ``cycle_rev`` with a depth its block count does not divide now follows the paper's rule
    (``sharing.py``); a folder saved with the earlier rule would run a different plan under the
    new code, so its code is left alone.

    Raises:
        ValueError: naming the setting and what to do instead.
    """
    if config.get("sharing_strategy") != "cycle_rev":
        return
    for stack in ("encoder", "decoder"):
        steps, blocks = config.get(f"{stack}_layers"), config.get(f"{stack}_unique_layers")
        if isinstance(steps, int) and isinstance(blocks, int) and steps % blocks:
            raise ValueError(
                f"{folder} uses sharing_strategy='cycle_rev' with {stack}_layers = {steps} not divisible by "
                f"{stack}_unique_layers = {blocks}, whose execution plan the current code defines differently; "
                "refreshing its code would change the model. Keep its code and pin transformers<5.24 instead."
            )


def refresh_model_code(folder: str | Path) -> tuple[list[str], list[str]]:
    """Replace the model code in a saved hf_fusion folder with this installation's.

    Returns:
        (written, removed): file names copied in, and stale ``.py`` files of the old code that the
        current code no longer has (removed, so nothing can import them by mistake).

    Raises:
        FileNotFoundError: if ``folder`` has no ``config.json``.
        ValueError: if the folder is not an hf_fusion model, or the current code would compute
            something else with its weights (see :func:`refuse_changed_semantics`).
    """
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} is not a model folder: it has no config.json.")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in MODEL_FAMILIES:
        raise ValueError(
            f"{folder} holds a {model_type!r} model, not an hf_fusion family; allowed model_type: "
            f"{', '.join(MODEL_FAMILIES)}."
        )
    refuse_changed_semantics(folder, json.loads(config_file.read_text()))
    before = {path.name for path in folder.glob("*.py")}
    written = []
    for source in model_code_files(model_type):
        shutil.copyfile(source, folder / source.name)
        written.append(source.name)
    removed = sorted(before - set(written))
    for name in removed:
        (folder / name).unlink()
    return written, removed
