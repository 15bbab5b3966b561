"""``hf-fusion compare GRID.yaml``: a resumable, multi-seed comparison of model variants.

    hf-fusion compare GRID.yaml [--work_dir D] [--results_dir D] [--max_cells N] [--only V ...]
    hf-fusion compare GRID.yaml --status        # what is done, stale, partial, to do
    hf-fusion compare GRID.yaml --report_only   # rewrite the report (and README table) from the results
    hf-fusion compare GRID.yaml --rekey         # keep recorded runs that match the current settings exactly
    hf-fusion compare GRID.yaml --analyses      # analyse the finished cells' models (cached), then report

The grid (``training/compare/grid.py``) names variants, seeds, corpora and budgets; every cell is
an ordinary ``hf-fusion train`` run (``training/compare/runner.py``); the results accumulate in
``RESULTS_DIR/results.jsonl`` and the report (``training/compare/report.py``) is regenerated from
it after every cell. ``--analyses`` runs the grid's analyses (``training/compare/analyses.py``) on
the exported models of the cells that are done, trains nothing, and rewrites the report; it is a
step of its own so that a runner's report after each cell stays quick. ``docs/evidence.md``
describes the method.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from collections import Counter
from functools import partial
from pathlib import Path

from .grid import REPO_ROOT, load_grid

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-fusion compare", description="Run a comparison grid, resumably.")
    parser.add_argument("grid", help="grid file (benchmarks/grids/*.yaml)")
    parser.add_argument("--work_dir", default=None, help="run folders (default: runs/compare/<grid name>)")
    parser.add_argument("--results_dir", default=None,
                        help="results file, predictions and report (default: benchmarks/results/claims/<grid name>)")
    parser.add_argument("--max_cells", type=int, default=None, help="run at most this many cells, then stop")
    parser.add_argument("--only", nargs="+", default=None, help="run only the cells of these variants")
    parser.add_argument("--status", action="store_true", help="list the cells and their state; run nothing")
    parser.add_argument("--report_only", action="store_true", help="rewrite the report from the results; run nothing")
    parser.add_argument("--rekey", action="store_true",
                        help="re-key recorded cells whose run was trained with exactly the current settings "
                        "(checked from the run folder), then list the states; run nothing")
    parser.add_argument("--analyses", action="store_true",
                        help="run the grid's analyses on the finished cells' exported models (in --work_dir) that "
                        "are not cached yet, then rewrite the report; train nothing")
    parser.add_argument("--readme", default=None,
                        help="README whose claims table (between its markers) the report fills; default: none")
    return parser


def _report_in_subprocess(grid: str, results_dir: Path, readme: Path | None) -> None:
    """Rewrite the report in a fresh process: a grid runs for days, and the report code it
    started with may have been improved since."""
    command = [sys.executable, "-m", "training.cli", "compare", grid, "--report_only", "--results_dir", str(results_dir)]
    subprocess.run([*command, *(["--readme", str(readme)] if readme else [])], check=True, cwd=REPO_ROOT,
                   stdout=subprocess.DEVNULL)


def main(argv: list[str]) -> int:
    """Entry point of ``hf-fusion compare``; returns the exit status."""
    from .runner import cell_states, rekey_equivalent, run_grid

    args = _parser().parse_args(argv)
    if args.max_cells is not None and args.max_cells < 0:
        raise ValueError(f"--max_cells must be >= 0, got {args.max_cells}.")
    grid = load_grid(args.grid)
    if args.only:
        for name in args.only:
            grid.variant(name)
    work_dir = Path(args.work_dir or Path("runs/compare") / grid.name).resolve()
    results_dir = Path(args.results_dir or REPO_ROOT / "benchmarks/results/claims" / grid.name).resolve()
    readme = Path(args.readme) if args.readme else None
    if args.rekey:
        for key in rekey_equivalent(grid, results_dir):
            print(f"re-keyed  {key}")
    if args.status or args.rekey:
        states = cell_states(grid, results_dir, work_dir)
        for cell, digest, state in states:
            print(f"{state:>8}  {cell.key}  {digest[:12]}")
        counts = Counter(state for _, _, state in states)
        print(", ".join(f"{count} {state}" for state, count in sorted(counts.items())))
        return 0
    if args.analyses:
        from .analyses import run_analyses
        from .report import current_records, group_records
        from .runner import RESULTS_NAME, read_results

        records, _ = current_records(grid, read_results(results_dir / RESULTS_NAME))
        computed = run_analyses(grid, group_records(records), results_dir, work_dir)
        print(f"Analyses: {len(computed)} measurement(s) computed, the others cached or waiting for their cells.")
    elif not args.report_only:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        logger.setLevel(logging.INFO)
        logging.getLogger("training.compare.runner").setLevel(logging.INFO)
        run_grid(grid, work_dir, results_dir, args.max_cells, args.only,
                 after_cell=partial(_report_in_subprocess, args.grid, results_dir, readme))
    from .report import write_report

    report = write_report(grid, results_dir, readme)
    print(f"Report: {report}")
    return 0
