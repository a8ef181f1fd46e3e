"""Damaged committed outputs are caught before a stage uses them, on real files of a tiny committed run
(`coded_run`: ingest + tokenizer + pretokenize) and a real local Ray: a truncated shard, an edited manifest,
deleted or altered tokenizer weights, a truncated Parquet file, an invalid `_MANIFEST.json`, and a flipped
byte that only `--verify` (checksums) finds. Each fails with one message naming the file and the command
to rerun, before the damaged input's stage does any Ray work."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from helpers import PRETOKENIZE_TINY
from pipeline.config import load_config
from pipeline.storage import MANIFEST, Manifest, RunDir
from orchestration.runner import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
# A tiny transformer, as in tests/test_transformer_stage.py (what a damaged-input run would otherwise train).
TRANSFORMER_TINY = PRETOKENIZE_TINY + [
    "transformer.size=pico", "transformer.steps=20", "transformer.batch_size=16", "transformer.checkpoint_every=10",
    "transformer.log_every=10", "transformer.eval_every=20", "transformer.val_images=64",
    "transformer.resources.num_workers=1", "transformer.resources.cpus_per_worker=0.5"]
FAST_S = 30  # a damaged input is caught before Ray work: well under a stage's run


def _cfg(overrides=PRETOKENIZE_TINY):
    return load_config(ROOT / "configs" / "demo.yaml", overrides)


def _copy(coded_run: Path, tmp_path: Path) -> Path:
    """The committed run (and the MLflow store beside it) copied, so a test can damage its own copy."""
    run_dir = tmp_path / "run"
    shutil.copytree(coded_run, run_dir, ignore=shutil.ignore_patterns("checkpoints", "_LOCK.json"))
    if (coded_run.parent / "mlflow.db").exists():
        shutil.copy(coded_run.parent / "mlflow.db", tmp_path / "mlflow.db")
    return run_dir


def _manifest(run_dir: Path, folder: str) -> Manifest:
    return Manifest.read(RunDir(str(run_dir)), folder)


def _raises(run_dir: Path, cfg, **kwargs) -> str:
    """The message of the error a pipeline run stops with, after checking it stopped quickly."""
    started = time.perf_counter()
    with pytest.raises(Exception) as error:
        run_pipeline(cfg, str(run_dir), **kwargs)
    assert time.perf_counter() - started < FAST_S, "caught only after the stage's Ray work"
    return str(error.value)


def test_truncated_shard_stops_a_forced_tokenizer_run(coded_run, tmp_path):
    run_dir = _copy(coded_run, tmp_path)
    shard = _manifest(run_dir, "shards").outputs["shards"]["train"][0]
    path = run_dir / "shards" / shard
    size = path.stat().st_size
    with open(path, "r+b") as f:  # at a 512-byte tar block boundary: a reader takes the rest as complete
        f.truncate((size // 2) // 512 * 512)
    message = _raises(run_dir, _cfg(), only="tokenizer", force=("tokenizer",))
    assert f"shards/{shard}" in message and str(size) in message, message
    assert "--from ingest --force ingest" in message, message


def test_edited_manifest_is_caught_by_the_stage_that_read_it(coded_run, tmp_path):
    run_dir = _copy(coded_run, tmp_path)
    path = run_dir / "shards" / MANIFEST
    data = json.loads(path.read_text())
    data["counts"]["train"]["images"] -= 10
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    message = _raises(run_dir, _cfg(), to_stage="pretokenize")
    assert f"shards/{MANIFEST}" in message and "tokenizer" in message, message
    assert "--from ingest --force ingest" in message, message


def test_deleted_tokenizer_weights_are_named(coded_run, tmp_path):
    run_dir = _copy(coded_run, tmp_path)
    (run_dir / "tokenizer" / "model.safetensors").unlink()
    message = _raises(run_dir, _cfg(), only="pretokenize", force=("pretokenize",))
    assert "tokenizer/model.safetensors" in message and "missing" in message, message
    assert "--from tokenizer --force tokenizer" in message, message


def test_altered_tokenizer_weights_fail_the_checksum_pretokenize_computes_anyway(coded_run, tmp_path):
    run_dir = _copy(coded_run, tmp_path)
    path = run_dir / "tokenizer" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor: same size, still loads
    path.write_bytes(bytes(data))
    message = _raises(run_dir, _cfg(), only="pretokenize", force=("pretokenize",))  # no --verify
    assert "tokenizer/model.safetensors" in message and "checksum" in message, message
    assert "--force tokenizer" in message, message


def test_truncated_parquet_file_is_named(coded_run, tmp_path):
    run_dir = _copy(coded_run, tmp_path)
    name = _manifest(run_dir, "codes").outputs["codes"]["train"][0]
    path = run_dir / "codes" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = _raises(run_dir, _cfg(TRANSFORMER_TINY), only="transformer")
    assert f"codes/{name}" in message, message
    assert "--from pretokenize --force pretokenize" in message, message


def test_invalid_manifest_json_is_named(coded_run, tmp_path):
    run_dir = _copy(coded_run, tmp_path)
    path = run_dir / "codes" / MANIFEST
    path.write_text(path.read_text()[:100])
    message = _raises(run_dir, _cfg(TRANSFORMER_TINY), only="transformer")
    assert f"codes/{MANIFEST}" in message and "pretokenize" in message, message
    assert "--from pretokenize --force pretokenize" in message, message


def test_verify_flag_checks_checksums_of_skipped_stages(coded_run, tmp_path, capsys):
    import full_pipeline

    run_dir = _copy(coded_run, tmp_path)
    manifest = _manifest(run_dir, "shards")
    assert manifest.files and all(set(entry) == {"size", "sha256"} for entry in manifest.files.values())
    assert not any(name.startswith("_") or ".tmp-" in name for name in manifest.files)
    assert set(_manifest(run_dir, "codes").input_manifests) == {"ingest", "tokenizer"}
    shard = manifest.outputs["shards"]["val"][0]
    path = run_dir / "shards" / shard
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # same size: only a checksum sees it
    path.write_bytes(bytes(data))
    argv = ["--config", str(ROOT / "configs" / "demo.yaml"), "--run-dir", str(run_dir), "--to", "tokenizer"]
    for override in PRETOKENIZE_TINY:
        argv += ["--set", override]
    assert full_pipeline.main(argv) == 0  # sizes only: both stages skipped
    capsys.readouterr()
    assert full_pipeline.main(argv + ["--verify"]) == 2
    err = capsys.readouterr().err
    assert f"shards/{shard}" in err and "checksum" in err and "--from ingest --force ingest" in err, err
    assert err.count("\n") == 1, err  # one line, no traceback


def test_old_manifests_without_file_records_still_load(tmp_path):
    from pipeline.output_records import verify_outputs

    run_dir = RunDir(str(tmp_path / "run"))
    run_dir.write_json({"stage": "ingest", "config": {}, "config_hash": "h", "inputs": {}, "fingerprint": "f"},
                       "shards", MANIFEST)
    manifest = Manifest.read(run_dir, "shards")
    assert manifest.files == {} and manifest.input_manifests == {}
    assert verify_outputs(run_dir, "shards", manifest, checksums=True) == []


def test_an_upstream_manifest_rerun_now_makes_its_consumer_stale_and_an_edit_is_an_error():
    from orchestration.errors import PipelineError
    from orchestration.input_checks import changed_manifests
    from stages import spec

    def manifest(stage, fingerprint, sha, inputs=None, read=None):
        made = Manifest(stage=stage, config={}, config_hash="c", inputs=inputs or {}, fingerprint=fingerprint,
                        input_manifests=read or {})
        made.sha256 = sha
        return made

    tokenizer = manifest("tokenizer", "t", "t-sha", inputs={"ingest": "i"}, read={"ingest": "old"})
    assert changed_manifests(spec("tokenizer"), tokenizer, {"ingest": manifest("ingest", "i", "old")}, set()) == []
    changed = {"ingest": manifest("ingest", "i", "new")}
    assert changed_manifests(spec("tokenizer"), tokenizer, changed, {"ingest"}) == ["ingest"]  # forced just now
    with pytest.raises(PipelineError, match=r"shards/_MANIFEST.json changed after stage tokenizer read it"):
        changed_manifests(spec("tokenizer"), tokenizer, changed, set())
    other = {"ingest": manifest("ingest", "i2", "new")}  # another ingest commit: stale, fingerprints handle it
    assert changed_manifests(spec("tokenizer"), tokenizer, other, set()) == []
