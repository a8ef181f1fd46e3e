"""benchmarks/peers.py end to end at a tiny size: both comparisons run against the peers in the shared folder
and the report holds positive figures and ratios. Skipped where the shared folder is absent."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PEER_BENCH = Path(os.environ.get("PEER_BENCH") or ROOT.parent / "shared" / "peer-bench")
DEPS_INSTALL_FAILED = 3  # benchmarks/peers.py's exit code when pip cannot fetch omegaconf and einops

TINY = ["--what", "all", "--size", "default", "--rounds", "1", "--steps", "1", "--profile",
        "--dim", "64", "--depth", "2", "--heads", "2", "--grid", "4", "--vocab", "64", "--batch", "2",
        "--sample-batch", "2", "--image", "16", "--patch", "8", "--codebook", "64"]


@pytest.mark.skipif(not PEER_BENCH.is_dir(), reason=f"{PEER_BENCH} is absent (the shared folder beside the checkout)")
def test_tiny_side_by_side_run_reports_every_comparison(tmp_path):
    out = tmp_path / "peers.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--out", str(out),
                             "--peer-bench", str(PEER_BENCH), *TINY],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    if result.returncode == DEPS_INSTALL_FAILED:
        pytest.skip(f"the tokenizer peer's packages could not be installed: {result.stderr[-500:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == "peers" and report["commit"] and report["machine"]["cpus"]
    results = report["results"]
    assert results["peers"]["llamagen"]["commit"] != "unknown"
    assert results["peers"]["enhancing-transformers"]["commit"] != "unknown"

    comparisons = results["comparisons"]
    assert set(comparisons) == {"transformer-default", "tokenizer-default"}
    transformer, tokenizer = comparisons["transformer-default"], comparisons["tokenizer-default"]
    assert transformer["config"]["dim"] == 64 and tokenizer["config"]["image"] == 16  # the overrides took
    for comparison in comparisons.values():
        assert comparison["threads"] > 0
        assert comparison["params_ours_m"] > 0 and comparison["params_peer_m"] > 0
        assert comparison["train_ratio_ours_over_peer"] > 0
        for figures in [comparison["train"]] + ([comparison["encode"]] if "encode" in comparison else []):
            assert len(figures["rounds_ours"]) == len(figures["rounds_ours_aten"]) == len(figures["rounds_peer"]) == 1
            assert figures["median_ours"] > 0 and figures["median_ours_aten"] > 0 and figures["median_peer"] > 0
            # the ratio is of the unrounded medians the report shows to two decimals
            assert figures["ratio_ours_aten_over_peer"] == pytest.approx(
                figures["median_ours_aten"] / figures["median_peer"], rel=1e-3, abs=2e-3)
    sample = transformer["sample"]
    assert sample["seconds_ours"] > 0 and sample["seconds_ours_aten"] > 0 and sample["seconds_peer"] > 0
    assert transformer["sample_speed_ratio_ours_over_peer"] > 0
    assert transformer["sample_speed_ratio_ours_aten_over_peer"] > 0
    assert tokenizer["encode_ratio_ours_over_peer"] > 0
    for profile in ("profile_ours_step", "profile_ours_step_aten_linear"):  # after and before
        top_ops = transformer[profile]["top_ops"]
        assert 0 < len(top_ops) <= 15 and all(op["self_cpu_ms"] >= 0 for op in top_ops)
    assert results["cpu_linear"] in ("onednn", "aten")
    assert set(results["gemm_gflops_1024"]) == {"aten", "onednn"} and min(results["gemm_gflops_1024"].values()) > 0
    assert report["machine"]["processor"]
    assert "comparison" in result.stdout  # the table after the JSON
