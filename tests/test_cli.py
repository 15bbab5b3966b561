"""The training tool end to end: every debug config, resumption, data errors, batching.

Runs train on a few hundred real Ding pairs (tests/cli_helpers.py) with tiny models, so each
end-to-end run takes seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import hf_fusion  # noqa: F401  (registers the families with the Auto classes)
from tests.cli_helpers import (
    CONFIG_DIR,
    REPO_ROOT,
    RecordingHub,
    data_overrides,
    debug_configs,
    ding_files,
    random_pairs,
    requires_ding,
)
from tests.helpers import run_in_clean_process
from training.arguments import load_settings, parse_experiment
from training.batching import PairCollator
from training.cli import main
from training.export import check_export

QUIET = ["--disable_tqdm", "true"]


def _scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events_dir,) = list((run_dir / "runs").iterdir())
    accumulator = EventAccumulator(str(events_dir))
    accumulator.Reload()
    return {tag: [event.value for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def _generate(folder: Path, sentences: list[str], tmp_path: Path) -> tuple[list[str], list[str]]:
    """Beam-search ``sentences`` with the folder's generation config, in a process where hf_fusion
    cannot be imported (remote code) and in this one (the installed package)."""
    result = run_in_clean_process(
        f"""
        import json
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
        model = AutoModelForSeq2SeqLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert model.config.use_cache and "hf_fusion" not in type(model).__module__
        batch = tokenizer({sentences!r}, return_tensors="pt", padding=True)
        print(json.dumps(tokenizer.batch_decode(model.generate(**batch), skip_special_tokens=True)))
        """,
        tmp_path,
    )
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    with torch.no_grad():
        local = tokenizer.batch_decode(
            model.generate(**tokenizer(sentences, return_tensors="pt", padding=True)), skip_special_tokens=True
        )
    return remote, local


@pytest.mark.slow
@requires_ding
@pytest.mark.parametrize("config", debug_configs(), ids=lambda path: path.stem)
def test_debug_config_trains_evaluates_exports_and_reloads(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    hub = RecordingHub()
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", hub)
    run = tmp_path / "run"
    status = main(
        ["train", str(config), "--output_dir", str(run), *data_overrides(), *QUIET,
         "--push_to_hub", "--hub_model_id", "test-org/debug-model"]
    )
    printed = capsys.readouterr().out
    assert status == 0
    results = json.loads((run / "results.json").read_text())
    assert f"test BLEU {results['test_bleu']:.2f}" in printed and "trust_remote_code=True" in printed
    assert results["train_steps"] == parse_experiment(config).training.max_steps

    final = run / "final"
    check_export(final)  # weights, config with auto_map and use_cache, code files, tokenizer, card
    assert len((final / "test_predictions.txt").read_text().splitlines()) == 16
    card = ModelCard.load(final / "README.md")
    scores = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert scores == {"bleu": round(results["test_bleu"], 2), "chrf": round(results["test_chrf"], 2)}
    assert (final / "training_curves.png").stat().st_size > 0
    scalars = _scalars(run)
    assert {"train/loss", "train/learning_rate", "train/tokens_per_second", "eval/bleu", "eval/chrf"} <= set(scalars)

    # The push went through the Hub client with the exported folder, then pinned the card.
    assert [name for name, _ in hub.calls] == ["create_repo", "upload_folder", "upload_file"]
    (_, first_oid, uploaded), (_, _, pinned) = hub.commits
    assert uploaded["config.json"] == (final / "config.json").read_bytes()
    assert f'revision = "{first_oid}"' in pinned["README.md"].decode()

    sentences = ding_files()["test"].read_text().splitlines()[:3]
    sources = [json.loads(line)["source"] for line in sentences]
    remote, local = _generate(final, sources, tmp_path)
    assert remote == local and len(remote) == 3

    # `hf-fusion evaluate` on the exported folder reproduces the test scores of the run.
    assert main(["evaluate", str(final), "--output_dir", str(tmp_path), *QUIET]) == 0
    evaluated = json.loads((tmp_path / "test_results.json").read_text())
    assert evaluated["test_bleu"] == pytest.approx(results["test_bleu"], abs=1e-9)
    assert evaluated["test_chrf"] == pytest.approx(results["test_chrf"], abs=1e-9)


@requires_ding
def test_prepare_data_builds_the_builtin_corpus_and_reports_padding(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = CONFIG_DIR / "fusion_transformer_debug.yaml"
    cache = str(ding_files()["cache_dir"])
    assert main(["prepare-data", str(config), "--data_cache_dir", cache, "--output_dir", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    assert "train: 256 pairs" in report and "test: 16 pairs" in report
    bucketed, random = re.search(r"batches per epoch, ([\d.]+)% padding \(random batches of 32: ([\d.]+)%", report).groups()
    assert float(bucketed) < float(random)
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()


TRAIN_IN_SUBPROCESS = """
import os, signal, sys
from transformers import TrainerCallback
from training.arguments import parse_experiment
from training.pipeline import train

class KillAfterCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ.get("KILL_AFTER_STEP", -1)):
            os.kill(os.getpid(), signal.SIGKILL)

train(parse_experiment(sys.argv[1], sys.argv[2:]), callbacks=[KillAfterCheckpoint()])
"""


def _train_in_subprocess(options: list[str], kill_after_step: int | None = None) -> subprocess.CompletedProcess:
    """A training run in a fresh process with one thread (so every run computes bit for bit the
    same), optionally SIGKILLed right after the checkpoint of ``kill_after_step`` is written."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    if kill_after_step is not None:
        env["KILL_AFTER_STEP"] = str(kill_after_step)
    config = str(CONFIG_DIR / "fusion_transformer_debug.yaml")
    return subprocess.run(
        [sys.executable, "-c", TRAIN_IN_SUBPROCESS, config, *options],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
@requires_ding
def test_a_killed_run_resumes_and_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    # 64 training pairs make 3 batches per epoch: the kill at step 4 falls inside the second
    # epoch, so resumption has to restore the epoch's batch order, the position in it, the RNG
    # (dropout), the optimizer and the schedule.
    options = [
        *data_overrides(), *QUIET, "--max_train_samples", "64", "--max_tokens_per_batch", "768",
        "--max_steps", "8", "--save_steps", "4", "--eval_strategy", "no", "--load_best_model_at_end", "false",
        "--report_to", "none", "--plot_training_curves", "false",
    ]  # fmt: skip
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert _train_in_subprocess(["--output_dir", str(straight), *options]).returncode == 0
    # The same tokenizer for both runs (unigram training is not bit-reproducible across processes).
    options += ["--tokenizer_name_or_path", str(straight / "tokenizer")]

    killed = _train_in_subprocess(["--output_dir", str(interrupted), *options], kill_after_step=4)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (interrupted / "checkpoint-4").is_dir() and not (interrupted / "final").exists()
    resumed = _train_in_subprocess(["--output_dir", str(interrupted), *options, "--resume_from_checkpoint", "true"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def losses(run: Path) -> list[float]:
        state = json.loads((run / "checkpoint-8" / "trainer_state.json").read_text())
        return [entry["loss"] for entry in state["log_history"] if "loss" in entry]

    assert len(losses(straight)) == 8
    assert losses(interrupted) == losses(straight)
    weights = load_file(straight / "final" / "model.safetensors")
    weights_after_resume = load_file(interrupted / "final" / "model.safetensors")
    assert weights.keys() == weights_after_resume.keys()
    for name, tensor in weights.items():
        assert torch.equal(weights_after_resume[name], tensor), name


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@requires_ding
@pytest.mark.parametrize(
    "case",
    ["missing_file", "empty_file", "missing_column", "no_validation", "typo", "family", "config_field", "smoothing"],
)
def test_bad_input_is_one_clear_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = str(CONFIG_DIR / "fusion_transformer_debug.yaml")
    files = data_overrides()
    cases = {
        "missing_file": (["--train_file", str(tmp_path / "nope.jsonl")], "does not exist"),
        "empty_file": (["--train_file", _write(tmp_path / "empty.jsonl", "")], "is empty"),
        "missing_column": (
            ["--train_file", _write(tmp_path / "cols.jsonl", '{"english": "Hi.", "german": "Hallo."}\n')],
            "english",  # the message names the columns the file has
        ),
        "no_validation": (["--train_file", files[1]], "needs a validation split"),
        "typo": ([*files, "--lerning_rate", "0.1"], "did you mean 'learning_rate'"),
        "family": ([*files, "--model_type", "fusion_transfomer"], "allowed: fusion_transformer"),
        "config_field": ([*files, "--model_config.sharing_strategy", "bogus"], "sharing_strategy = 'bogus'"),
        "config_typo": ([*files, "--model_config.encoder_layer", "6"], "did you mean 'encoder_layers'"),
        "config_type": ([*files, "--model_config.normalize_before", "'false'"], "normalize_before = 'false' has the wrong type"),
        "smoothing": ([*files, "--label_smoothing_factor", "0.1"], "model_config.label_smoothing"),
    }
    options, expected = cases[case]
    status = main(["train", config, "--output_dir", str(tmp_path / "run"), *QUIET, *options])
    error = capsys.readouterr().err
    # Exit status 3: bad data; 2: bad options (training/errors.py, docs/guarantees.md).
    assert status == (3 if case in ("missing_file", "empty_file", "missing_column") else 2)
    message = [line for line in error.splitlines() if line.startswith("hf-fusion train: error:")]
    assert len(message) == 1 and expected in message[0], error
    assert "Traceback" not in error


def test_yaml_options_and_command_line_overrides(tmp_path: Path) -> None:
    path = tmp_path / "experiment.yaml"
    path.write_text(
        "output_dir: out\nlearning_rate: 0.001\nreport_to: [none]\nmodel_config:\n  d_model: 64\n  dropout: 0.2\n"
    )
    experiment = parse_experiment(
        path, ["--learning_rate", "3e-4", "--model_config.d_model", "32", "--model_config.normalize_before=true"]
    )
    assert experiment.training.learning_rate == 3e-4  # the command line wins
    assert experiment.model.model_config == {"d_model": 32, "dropout": 0.2, "normalize_before": True}
    assert experiment.training.export_dir == str(Path("out") / "final")
    # The recorded experiment reproduces the run.
    path.write_text(experiment.to_yaml())
    again = parse_experiment(path)
    assert again.training.learning_rate == 3e-4 and again.model.model_config == experiment.model.model_config
    with pytest.raises(ValueError, match="did you mean 'max_steps'"):
        parse_experiment(path, ["--max_step", "3"])
    path.write_text("output_dir: out\nmax_step: 3\n")
    with pytest.raises(ValueError, match="Unknown option 'max_step'"):
        parse_experiment(path)


def test_a_config_extends_a_base_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    configs = tmp_path / "configs"  # bases resolve relative to the file, not the working directory
    configs.mkdir()
    (configs / "base.yaml").write_text(
        "output_dir: base\nlearning_rate: 0.001\nseed: 3\nmodel_config:\n  d_model: 64\n  dropout: 0.1\n"
    )
    (configs / "child.yaml").write_text(
        "extends: base.yaml\nlearning_rate: 0.002\nmodel_config:\n  dropout: 0.3\n  encoder_layers: 2\n"
    )
    (configs / "grandchild.yaml").write_text("extends: child.yaml\noutput_dir: grand\n")
    experiment = parse_experiment(configs / "grandchild.yaml", ["--model_config.d_model", "32"])
    assert experiment.training.learning_rate == 0.002  # the child overrides its base
    assert experiment.training.seed == 3 and experiment.training.output_dir == "grand"
    # model_config merges field by field, through the whole chain, and the command line still wins.
    assert experiment.model.model_config == {"d_model": 32, "dropout": 0.3, "encoder_layers": 2}

    # experiment.yaml holds the resolved settings: it reproduces the run on its own, anywhere.
    recorded = yaml.safe_load(experiment.to_yaml())
    assert "extends" not in recorded and recorded["seed"] == 3 and recorded["learning_rate"] == 0.002
    (tmp_path / "experiment.yaml").write_text(experiment.to_yaml())
    again = parse_experiment(tmp_path / "experiment.yaml")
    assert again.settings == experiment.settings and again.model.model_config == experiment.model.model_config

    (configs / "orphan.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"orphan\.yaml extends .*nowhere\.yaml.*does not exist"):
        parse_experiment(configs / "orphan.yaml")
    (configs / "base.yaml").write_text("extends: grandchild.yaml\nseed: 3\n")
    cycle = r"cycle \(.*grandchild\.yaml -> .*child\.yaml -> .*base\.yaml -> .*grandchild\.yaml\)"
    with pytest.raises(ValueError, match=cycle):
        parse_experiment(configs / "grandchild.yaml")
    (configs / "typo.yaml").write_text("extends: child.yaml\nlerning_rate: 0.1\n")
    typo = r"Unknown option 'lerning_rate' in .*typo\.yaml; did you mean 'learning_rate'"
    with pytest.raises(ValueError, match=typo):
        parse_experiment(configs / "typo.yaml")
    # The CLI reports either as one line, exit status 2.
    for config in ("orphan.yaml", "grandchild.yaml"):
        assert main(["train", str(configs / config)]) == 2
        error = capsys.readouterr().err
        assert len(error.strip().splitlines()) == 1 and "Traceback" not in error


@pytest.mark.parametrize("config", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_shipped_config_resolves_to_a_valid_model_config(config: Path) -> None:
    from transformers import AutoConfig

    experiment = parse_experiment(config)
    model = experiment.model
    AutoConfig.for_model(model.model_type, **{"vocab_size": 100, **model.model_config})
    assert "extends" not in experiment.settings


@pytest.mark.slow
@requires_ding
def test_fine_tuning_converts_a_bart_checkpoint_and_keeps_its_tokenizer(tmp_path: Path) -> None:
    from transformers import BartConfig, BartForConditionalGeneration

    from training.tokenizer import train_tokenizer

    rows = [json.loads(line) for line in ding_files()["train"].read_text().splitlines()]
    tokenizer = train_tokenizer([r["source"] for r in rows] + [r["target"] for r in rows], vocab_size=300)
    bart = BartForConditionalGeneration(
        BartConfig(
            vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=80,
            forced_eos_token_id=None,
        )
    )  # fmt: skip
    bart.save_pretrained(tmp_path / "bart")
    tokenizer.save_pretrained(tmp_path / "bart")
    settings = load_settings(CONFIG_DIR / "fusion_transformer_debug.yaml")
    settings["model_config"] = {"dropout": 0.2}  # a fine-tuning config overrides, it does not size
    settings["model_name_or_path"] = str(tmp_path / "bart")
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(settings))

    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "finetune.yaml"), "--output_dir", str(run), *data_overrides(), *QUIET]) == 0
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["model_type"] == "fusion_transformer" and config["d_model"] == 16 and config["dropout"] == 0.2
    assert not (run / "tokenizer").exists()  # the checkpoint's tokenizer was used, not a new one
    assert AutoTokenizer.from_pretrained(run / "final").get_vocab() == tokenizer.get_vocab()
    card = ModelCard.load(run / "final" / "README.md")
    assert card.data.base_model == str(tmp_path / "bart")


def test_convert_transfer_and_pretraining_are_hf_fusion_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from transformers import BartConfig, BartForConditionalGeneration

    from tests.helpers import TINY
    from training.cli import convert_script, transfer_script
    from training.tokenizer import train_tokenizer

    BartForConditionalGeneration(BartConfig(**TINY, forced_eos_token_id=None)).save_pretrained(tmp_path / "bart")
    # Config fields take the syntax of hf-fusion train, typed the same way.
    assert main(["convert", str(tmp_path / "bart"), str(tmp_path / "fusion"), "--model_config.dropout", "0.2"]) == 0
    converted = json.loads((tmp_path / "fusion" / "config.json").read_text())
    assert converted["model_type"] == "fusion_transformer" and converted["dropout"] == 0.2
    options = [str(tmp_path / "fusion"), str(tmp_path / "shared"), "--sharing_strategy", "recurrent"]
    assert main(["transfer", *options, "--model_config.dropout=0.3"]) == 0
    shared = json.loads((tmp_path / "shared" / "config.json").read_text())
    assert (shared["model_type"], shared["sharing_strategy"]) == ("recurrent_stacking", "recurrent")
    assert shared["dropout"] == 0.3
    assert "Converted" in capsys.readouterr().out

    # The old console scripts are the same commands.
    again = [str(tmp_path / "bart"), str(tmp_path / "again"), "--model_config.dropout", "0.25"]
    monkeypatch.setattr(sys, "argv", ["hf-fusion-convert", *again])
    assert convert_script() == 0
    assert json.loads((tmp_path / "again" / "config.json").read_text())["dropout"] == 0.25
    monkeypatch.setattr(sys, "argv", ["hf-fusion-transfer", str(tmp_path / "fusion"), str(tmp_path / "student")])
    assert transfer_script() == 0 and (tmp_path / "student" / "config.json").is_file()

    # Their errors are one line, exit status 2, like every command's.
    train_tokenizer(["The cat sat on the mat.", "Die Katze saß auf der Matte."], vocab_size=40).save_pretrained(
        tmp_path / "tokenizer"
    )
    (tmp_path / "empty.txt").write_text("\n")
    pretrain = ["pretrain-e2s2", "--model", "fusion_transformer", "--tokenizer", str(tmp_path / "tokenizer")]
    assert main([*pretrain, "--train_files", str(tmp_path / "empty.txt"), "--output_dir", str(tmp_path / "e2s2")]) == 2
    error = capsys.readouterr().err
    assert "hf-fusion pretrain-e2s2: error:" in error and "no non-empty line" in error and "Traceback" not in error
    assert main(["no-such-command"]) == 2
    assert "convert, transfer, pretrain-e2s2" in capsys.readouterr().err


def test_loss_terms_and_throughput_are_logged_beside_the_loss(tmp_path: Path) -> None:
    """A head's named loss components reach the logs, averaged like the loss itself."""
    from transformers import Seq2SeqTrainingArguments

    from tests.helpers import TINY
    from training.trainer import FusionSeq2SeqTrainer

    class TwoTermModel(hf_fusion.FusionTransformerForConditionalGeneration):
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            if output.loss is not None:
                output.loss_terms = {"whole": output.loss, "third": output.loss / 3}
            return output

    rng = np.random.default_rng(0)
    pairs = random_pairs([(int(rng.integers(3, 9)), int(rng.integers(3, 9))) for _ in range(24)])
    model = TwoTermModel(hf_fusion.FusionTransformerConfig(**{**TINY, "vocab_size": 60}))
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = FusionSeq2SeqTrainer(model=model, args=args, train_dataset=pairs, data_collator=PairCollator(1))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert entry["loss_terms/whole"] == pytest.approx(entry["loss"], rel=1e-5)
        assert entry["loss_terms/third"] == pytest.approx(entry["loss"] / 3, rel=1e-5)
        assert entry["tokens_per_second"] > 0


def test_training_options_become_callbacks() -> None:
    from transformers import EarlyStoppingCallback

    from training.curves import TrainingCurvesCallback
    from training.pipeline import _callbacks
    from training.trainer import TimeBudgetCallback

    experiment = parse_experiment(
        CONFIG_DIR / "fusion_transformer_debug.yaml", ["--early_stopping_patience", "2", "--max_train_minutes", "0.5"]
    )
    callbacks = {type(callback): callback for callback in _callbacks(experiment.training, "title")}
    assert callbacks[EarlyStoppingCallback].early_stopping_patience == 2
    assert callbacks[TimeBudgetCallback].seconds == 30
    assert TrainingCurvesCallback in callbacks
