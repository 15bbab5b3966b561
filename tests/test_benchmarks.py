"""The benchmark scripts compute what they claim: FLOP ratios and efficiencies from their own
counts, attention counted on the CPU kernel, memory measured per process, the README table
written only between its markers, and ``benchmarks/gpu.sh`` running end to end in its dry-run
mode. No test times anything: speed is never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import levers, readme_table, speed
from tests.helpers import REPO_ROOT


def test_flop_counter_counts_the_cpu_attention_kernel() -> None:
    batch, heads, q_len, k_len, dim = 2, 3, 5, 7, 4
    query = torch.randn(batch, heads, q_len, dim, requires_grad=True)
    key, value = torch.randn(batch, heads, k_len, dim), torch.randn(batch, heads, k_len, dim)
    product = 2 * batch * heads * q_len * k_len * dim  # one (q_len x dim x k_len) product, 2 FLOPs per multiply-add
    with speed.flop_counter() as counter:
        output = torch.nn.functional.scaled_dot_product_attention(query, key, value)
    assert counter.get_total_flops() == 2 * product  # Q K^T and weights V
    with speed.flop_counter() as counter:
        output.sum().backward()
    assert counter.get_total_flops() == 5 * product  # scores recomputed, then the gradients of Q, K, V and the weights


def test_speed_run_derives_ratios_and_efficiency_from_its_own_measurements() -> None:
    report = speed.run(["bart", "fusion_transformer", "surface_fusion"], "cpu", "tiny", rounds=1, batch_args=(2, 6, 5),
                       new_tokens=3, steps=1, attn_implementation=None, measure_memory=False)
    rows = report["results"]
    assert set(rows) == {"bart", "fusion_transformer", "surface_fusion"}
    # The vanilla core does BART's arithmetic exactly; SurfaceFusion adds a second vocabulary projection.
    assert rows["fusion_transformer"]["train_flops"] == rows["bart"]["train_flops"]
    assert rows["surface_fusion"]["train_flops"] > rows["bart"]["train_flops"]
    for row in rows.values():
        assert row["train_flops_vs_bart"] == row["train_flops"] / rows["bart"]["train_flops"]
        assert row["train_speed_vs_bart"] == rows["bart"]["train_step_s"] / row["train_step_s"]
        assert row["train_efficiency"] == pytest.approx(row["train_speed_vs_bart"] * row["train_flops_vs_bart"])
        assert row["greedy_efficiency"] == pytest.approx(row["greedy_speed_vs_bart"] * row["greedy_flops_vs_bart"])
    assert len(report["meta"]["load_before"]) == 3 and len(report["meta"]["load_per_round"]) == 1
    table = speed.speed_table(report)
    assert f"| surface_fusion | {rows['surface_fusion']['params_m']:.2f} | {rows['surface_fusion']['train_flops_vs_bart']:.2f} |" in table


@pytest.mark.parametrize("name", [name for name, lever in levers.LEVERS.items() if not lever.compiled_measures])
def test_a_code_path_lever_switches_paths_that_compute_the_same_loss(name) -> None:
    """A lever is only a fair A/B when both paths compute the same thing; and the patch must
    really switch the path (the off path runs a different set of operators)."""
    lever = levers.LEVERS[name]
    model = speed.build("fusion_transformer", speed.SIZES["tiny"]).eval()
    batch = speed.make_batch(speed.SIZES["tiny"]["vocab_size"], 3, 7, 5, "cpu")
    losses, operators = {}, {}
    for path in ("off", "on"):
        with getattr(lever, path)(), torch.no_grad(), torch.profiler.profile() as profile:
            losses[path] = model(**batch).loss
        operators[path] = {event.key for event in profile.key_averages()}
    torch.testing.assert_close(losses["on"], losses["off"], rtol=1e-5, atol=1e-6)
    assert operators["on"] != operators["off"]


def test_levers_report_gains_and_ratios_to_bart_from_their_own_samples() -> None:
    result = levers.measure_lever("fused_qkv", rounds=1, batch_args=(2, 6, 5), new_tokens=2, size_name="tiny")
    for key in ("train_step_s", "greedy_tok_s", "beam4_tok_s"):
        for stat in ("best", "median"):
            on, off, bart = (result[f"{key}_{path}_{stat}"] for path in ("on", "off", "bart"))
            if key == "train_step_s":  # seconds: a smaller time is a gain
                on, off, bart = 1 / on, 1 / off, 1 / bart
            assert result[f"{key}_gain_{stat}"] == pytest.approx(on / off)
            assert result[f"{key}_on_vs_bart_{stat}"] == pytest.approx(on / bart)
    assert result["first_call"] == {}  # nothing compiles
    compile_cost = levers._compilation_cost("greedy_tok_s", 2.0, {"greedy_tok_s_on_median": 20.0,
                                                                  "greedy_tok_s_off_median": 10.0}, tokens=10)
    # 10 tokens at 2 tok/s = 5 s first call; typical on 0.5 s, off 1 s: 4.5 s of compilation, 9 calls.
    assert compile_cost == {"compile_s": 4.5, "calls_to_pay_off": 9}


@pytest.mark.slow  # two fresh interpreters
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_memory_probe_runs_in_a_fresh_process_and_grows_with_the_batch() -> None:
    small = speed.peak_memory_mb("fusion_transformer", "cpu", "tiny", (2, 8, 8), None)
    large = speed.peak_memory_mb("fusion_transformer", "cpu", "tiny", (64, 64, 64), None)
    assert 0 < small["step_peak_mb"] <= small["train_peak_mb"]
    # 32x the tokens: the step's saved activations (and the logits) dominate and must show.
    assert large["step_peak_mb"] > small["step_peak_mb"] + 10


def test_readme_table_replaces_only_the_marked_block() -> None:
    readme = f"# Title\n\nbefore\n{readme_table.START}\nold table\n{readme_table.END}\nafter\n"
    updated = readme_table.update(readme, "new table")
    assert updated == f"# Title\n\nbefore\n{readme_table.START}\nnew table\n{readme_table.END}\nafter\n"
    assert readme_table.update(updated, "new table") == updated
    with pytest.raises(ValueError, match="exactly one"):
        readme_table.update("# no markers\n", "new table")


def test_committed_readme_table_is_generated_from_the_committed_results() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/readme_table.py", "--check"], check=False, cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.slow  # builds every family, twice over, on the CPU
def test_gpu_script_dry_run_writes_every_results_file(tmp_path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run", str(tmp_path)], cwd=REPO_ROOT, env=env, check=True,
                   capture_output=True, text=True, timeout=600)
    speed_report = json.loads((tmp_path / "speed_cpu_tiny.json").read_text())
    throughput = json.loads((tmp_path / "throughput_cpu.json").read_text())
    assert set(speed_report["results"]) == set(speed.VARIANTS) == set(throughput["results"])
    for row in throughput["results"].values():
        assert row["mfu"] == pytest.approx(row["step_flops"] / row["step_s"] / (throughput["meta"]["peak_tflops"] * 1e12))
        assert row["step_flops"] > 0
    assert (tmp_path / "speed_cpu_tiny.md").read_text().count("\n| ") == len(speed.VARIANTS) + 1
