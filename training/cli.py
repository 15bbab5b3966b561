"""``hf-fusion``: train, evaluate and publish hf_fusion translation models, and build models from
other checkpoints.

    hf-fusion train CONFIG.yaml [--key value ...] [--model_config.FIELD value ...]
    hf-fusion evaluate MODEL --test_file FILE [--reference_file FILE] [--compare OTHER_MODEL] [--output_dir D]
    hf-fusion evaluate MODEL_FOLDER [--split test] [--output_dir D] [--key value ...]
    hf-fusion translate MODEL [--input FILE ...] [--output FILE] [--num_beams N] [...]
    hf-fusion prepare-data CONFIG.yaml [--key value ...]
    hf-fusion push MODEL_FOLDER --repo_id NAMESPACE/NAME [--revision BRANCH] [--private]
    hf-fusion refresh-code MODEL_FOLDER
    hf-fusion convert SOURCE OUTPUT_DIR [--model_type T] [--model_config.FIELD value ...]
    hf-fusion transfer TEACHER OUTPUT_DIR [--sharing_strategy S] [...] [--model_config.FIELD value ...]
    hf-fusion pretrain-e2s2 --model M --tokenizer TOK --train_files F ... [--key value ...]
        [--model_config.FIELD value ...]
    hf-fusion compare GRID.yaml [--work_dir D] [--max_cells N] [--status] [--analyses] [--report_only] [--readme README.md]

``CONFIG.yaml`` is an experiment file (see ``training/configs/``); ``--key value`` overrides any of
its keys, ``hf-fusion train --help`` lists them all; ``--model_config.FIELD value`` sets a config
field of the model, in every command that builds one. Multi-process training:
``torchrun --nproc_per_node N -m training.cli train CONFIG.yaml`` (CPU processes use gloo).
Every anticipated failure is reported as one line (``hf-fusion COMMAND: error: what; how to fix``)
with an exit status per class of failure (``HF_FUSION_TRACEBACK=1`` shows the traceback);
anything unanticipated keeps its traceback, exit status 1. ``docs/guarantees.md`` has the table:

    0 success            2 bad options/config   3 bad data file       4 output folder in use
    5 cannot resume      6 set-up missing       7 model/tokenizer     8 file system (disk full, permissions)
    130 interrupted (resume with --resume_from_checkpoint true)

``hf-fusion-convert``, ``hf-fusion-transfer``
and ``hf-fusion-pretrain-e2s2`` are the same commands under their old names.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from transformers import HfArgumentParser

from .arguments import ARGUMENT_CLASSES, Experiment, parse_experiment, split_config_options
from .errors import EXIT_FILESYSTEM, EXIT_INTERRUPTED, EXIT_USAGE, HfFusionError
from .evaluate_file import check_output_dir

logger = logging.getLogger("training")

USAGE = __doc__.split("\n\n")[1]
# Commands whose options are the experiment's (HfArgumentParser): their --help is the experiment help.
EXPERIMENT_COMMANDS = ("train", "evaluate", "prepare-data")


def _setup_logging(experiment: Experiment | None = None) -> None:
    import datasets
    import transformers

    main = experiment is None or experiment.training.process_index == 0
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO if main else logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    datasets.utils.logging.set_verbosity_warning()


def _print_help() -> None:
    print(USAGE)
    print("Options of train / evaluate / prepare-data (YAML keys or --key value):\n")
    HfArgumentParser(ARGUMENT_CLASSES, prog="hf-fusion train").print_help()


def _loading_snippet(folder: Path) -> str:
    return (
        "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{folder}", trust_remote_code=True)\n'
        f'model = AutoModelForSeq2SeqLM.from_pretrained("{folder}", trust_remote_code=True)\n'
        'batch = tokenizer(["Eventually the river flows into the sea."], return_tensors="pt")\n'
        "print(tokenizer.batch_decode(model.generate(**batch), skip_special_tokens=True))"
    )


def _report_scores(results: dict, split: str) -> str:
    beams = results.get("final_num_beams") or results.get("num_beams")
    return (
        f"{split} BLEU {results[f'{split}_bleu']:.2f}  chrF {results[f'{split}_chrf']:.2f}"
        f"  (sacreBLEU, beam {beams})"
    )


def command_train(argv: list[str]) -> int:
    from .pipeline import train

    if not argv or argv[0].startswith("-"):
        raise ValueError("train needs an experiment file: hf-fusion train CONFIG.yaml [--key value ...]")
    experiment = parse_experiment(argv[0], argv[1:])
    _setup_logging(experiment)
    result = train(experiment)
    if experiment.training.process_index != 0:
        return 0
    split = result.metrics.get("final_eval_split")
    print()
    if split:
        print(_report_scores(result.metrics, split))
    print(f"Hub-ready model folder: {result.export_dir}")
    print(f"Load it:\n{_loading_snippet(result.export_dir)}")
    if result.pushed_revision:
        print(f"Pushed to {experiment.training.hub_model_id} at revision {result.pushed_revision}")
    else:
        print(f"Publish it: hf-fusion push {result.export_dir} --repo_id NAMESPACE/NAME")
    return 0


def command_evaluate(argv: list[str]) -> int:
    """Two ways to score a model: on any test file (``--test_file``, nothing else needed), or on a
    split of the data the model was trained with (its recorded ``experiment.yaml``). Either way the
    results go to a folder of the evaluation's own, never into the model folder."""
    if "--test_file" in argv:
        from .evaluate_file import run

        results = run(argv)
        print(f"BLEU {results['bleu']:.2f}  chrF {results['chrf']:.2f}  (sacreBLEU, beam {results['num_beams']}, "
              f"{results['num_sentences']} sentences)")
        if "compare" in results:
            compared = results["compare"]
            for metric in ("bleu", "chrf"):
                test = compared["paired_bootstrap"][metric]
                print(f"{compared['model']}: {metric} {test['other']:.2f} vs {test['baseline']:.2f}, "
                      f"paired bootstrap p = {test['p_value']:.4f}")
        print(f"Results: {results['output_dir']}")
        return 0

    from .pipeline import evaluate_folder

    parser = argparse.ArgumentParser(prog="hf-fusion evaluate", add_help=False)
    parser.add_argument("folder")
    parser.add_argument("--split", default="test", choices=["test", "validation"])
    parser.add_argument("--output_dir", default=None)
    known, overrides = parser.parse_known_args(argv)
    folder = Path(known.folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a model folder (no config.json).")
    output_dir = Path(known.output_dir or Path("evaluations") / folder.resolve().name / known.split)
    check_output_dir(output_dir, str(folder))
    recorded = folder / "experiment.yaml"
    experiment = parse_experiment(
        recorded if recorded.is_file() else None,
        [
            *("--output_dir", str(output_dir), "--report_to", "none"),
            *("--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false"),
            *overrides,
            *("--model_name_or_path", str(folder)),
        ],
    )
    _setup_logging(experiment)
    results = evaluate_folder(experiment, known.split)
    if experiment.training.process_index == 0:
        print(_report_scores(results, known.split))
        print(f"Results: {results['results_file']}")
    return 0


def command_prepare_data(argv: list[str]) -> int:
    from .pipeline import describe_data

    if not argv or argv[0].startswith("-"):
        raise ValueError("prepare-data needs an experiment file: hf-fusion prepare-data CONFIG.yaml")
    experiment = parse_experiment(argv[0], argv[1:])
    _setup_logging(experiment)
    print(describe_data(experiment))
    return 0


def command_push(argv: list[str]) -> int:
    from .export import push_folder

    parser = argparse.ArgumentParser(prog="hf-fusion push", description="Upload an exported model folder.")
    parser.add_argument("folder", help="folder written by hf-fusion train (OUTPUT_DIR/final)")
    parser.add_argument("--repo_id", required=True, help="NAMESPACE/NAME of the model repository")
    parser.add_argument("--revision", default=None, help="branch to push to (created if needed)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    parser.add_argument("--commit_message", default="Upload hf_fusion model")
    args = parser.parse_args(argv)
    _setup_logging()
    commit = push_folder(
        args.folder,
        args.repo_id,
        revision=args.revision,
        private=args.private or None,
        token=args.token,
        commit_message=args.commit_message,
    )
    print(f"Pushed {args.folder} to {args.repo_id} (commit {commit}).")
    print(
        f'Load it: AutoModelForSeq2SeqLM.from_pretrained("{args.repo_id}", trust_remote_code=True, revision="{commit}")'
    )
    return 0


def command_refresh_code(argv: list[str]) -> int:
    from hf_fusion import refresh_model_code

    parser = argparse.ArgumentParser(
        prog="hf-fusion refresh-code",
        description="Replace the model code saved in a model folder with this installation's (weights untouched), "
        "e.g. for folders saved before transformers 5.24 renamed the generation cache.",
    )
    parser.add_argument("folder", help="a saved hf_fusion model folder")
    args = parser.parse_args(argv)
    written, removed = refresh_model_code(args.folder)
    print(f"Rewrote {len(written)} model code files in {args.folder}: {', '.join(written)}")
    if removed:
        print(f"Removed stale code files: {', '.join(removed)}")
    print("Upload the folder again (hf-fusion push) so that Hub users get the new code.")
    return 0


def command_convert(argv: list[str]) -> int:
    from hf_fusion.convert import main as convert

    options, config_fields, _ = split_config_options(argv)
    convert(options, config_fields=config_fields)
    return 0


def command_transfer(argv: list[str]) -> int:
    from hf_fusion.transfer import main as transfer

    options, config_fields, _ = split_config_options(argv)
    transfer(options, config_fields=config_fields)
    return 0


def command_pretrain_e2s2(argv: list[str]) -> int:
    from .e2s2.pretrain import pretrain

    pretrain(argv)
    return 0


def command_compare(argv: list[str]) -> int:
    from .compare import main as compare

    return compare(argv)


def command_translate(argv: list[str]) -> int:
    from .translate import main as translate

    _setup_logging()
    return translate(argv)


HANDLERS: dict[str, Callable[[list[str]], int]] = {
    "train": command_train,
    "evaluate": command_evaluate,
    "prepare-data": command_prepare_data,
    "push": command_push,
    "refresh-code": command_refresh_code,
    "convert": command_convert,
    "transfer": command_transfer,
    "pretrain-e2s2": command_pretrain_e2s2,
    "translate": command_translate,
    "compare": command_compare,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hf-fusion`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in HANDLERS:
        print(f"hf-fusion: unknown command {command!r}; choose from {', '.join(HANDLERS)}.", file=sys.stderr)
        return 2
    if command in EXPERIMENT_COMMANDS and any(flag in rest for flag in ("-h", "--help")):
        _print_help()
        return 0
    try:
        return HANDLERS[command](rest)
    except BaseException as error:  # noqa: BLE001 -- re-raised below unless anticipated
        status = exit_status(error)
        if status is None or os.environ.get("HF_FUSION_TRACEBACK"):
            raise
        print(f"hf-fusion {command}: error: {one_line(error)}", file=sys.stderr)
        return status


def exit_status(error: BaseException) -> int | None:
    """The exit status of an anticipated failure (``training/errors.py``), None for a bug."""
    if isinstance(error, HfFusionError):
        return error.exit_code
    if isinstance(error, (ValueError, FileNotFoundError)):
        return EXIT_USAGE
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, OSError) and error.errno in FILESYSTEM_ERRNOS:
        return EXIT_FILESYSTEM
    return None


FILESYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line, with the fix for the generic classes."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted; a run with checkpoints continues with --resume_from_checkpoint true."
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and error.errno in FILESYSTEM_ERRNOS:
        where = f" ({error.filename})" if error.filename else ""
        fix = "free some space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "fix the permissions"
        return f"{error.strerror or error}{where}: {fix}, then rerun (add --resume_from_checkpoint true to continue)."
    return " ".join(str(error).split())


def _alias(command: str) -> Callable[[], int]:
    """The console script of an older name: ``hf-fusion COMMAND`` with the same arguments."""

    def run() -> int:
        return main([command, *sys.argv[1:]])

    run.__doc__ = f"``hf-fusion {command}`` under its old console-script name."
    return run


convert_script = _alias("convert")
transfer_script = _alias("transfer")
pretrain_e2s2_script = _alias("pretrain-e2s2")


if __name__ == "__main__":
    sys.exit(main())
