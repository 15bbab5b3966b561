"""Training curves as a PNG: loss, learning rate and validation metrics against the step.

Drawn from ``TrainerState.log_history`` (what TensorBoard also receives), so the picture exists
without a TensorBoard server, e.g. next to the model on the Hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

VALIDATION_METRICS = ("eval_bleu", "eval_chrf")


def _series(log_history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
    return [step for step, _ in points], [value for _, value in points]


def plot_training_curves(log_history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Write the curves of a run to ``path``; returns it, or None when nothing was logged yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("loss", [("loss", "train"), ("eval_loss", "validation")]),
        ("learning rate", [("learning_rate", "")]),
        ("validation BLEU / chrF", [(key, key.removeprefix("eval_")) for key in VALIDATION_METRICS]),
    ]
    panels = [(name, lines) for name, lines in panels if any(_series(log_history, key)[0] for key, _ in lines)]
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for axis, (name, lines) in zip(axes[0], panels):
        for key, label in lines:
            steps, values = _series(log_history, key)
            if steps:
                axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label or None)
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if any(label for _, label in lines):
            axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


class TrainingCurvesCallback(TrainerCallback):
    """Redraws ``OUTPUT_DIR/training_curves.png`` after every evaluation and at the end (main process)."""

    def __init__(self, title: str = ""):
        self.title = title

    def _draw(self, args, state) -> None:
        if state.is_world_process_zero:
            plot_training_curves(state.log_history, Path(args.output_dir) / "training_curves.png", self.title)

    def on_evaluate(self, args, state, control, **kwargs):
        self._draw(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._draw(args, state)
