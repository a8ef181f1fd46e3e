"""Pretokenize on a real local Ray with a tiny trained tokenizer: the Parquet contract, codes equal to a
direct encode, decode reproduces the reconstruction, a killed run resumes to the same rows, clear errors."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from helpers import PRETOKENIZE_TINY as TINY
from pipeline.config import load_config
from pipeline.data.codes import CodesMeta, codes_matrix
from pipeline.data.shards import iter_samples, list_shards
from pipeline.models.tokenizer import load_tokenizer
from pipeline.storage import Manifest, RunDir
from orchestration.runner import run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _rows(run_dir: Path, split: str) -> dict[tuple[str, int], tuple[int, bytes]]:
    manifest = Manifest.read(RunDir(str(run_dir)), "codes")
    rows = {}
    for name in manifest.outputs["codes"][split]:
        table = pq.read_table(run_dir / "codes" / name)
        codes = codes_matrix(table)
        for key, view, label, row in zip(table["key"].to_pylist(), table["view"].to_pylist(),
                                         table["label"].to_pylist(), codes):
            assert (key, view) not in rows
            rows[(key, view)] = (label, row.tobytes())
    return rows


def test_parquet_contract_and_counts(coded_run):
    manifest = Manifest.read(RunDir(str(coded_run)), "codes")
    shards = Manifest.read(RunDir(str(coded_run)), "shards")
    for split in ("train", "val"):
        images = shards.counts[split]["images"]
        assert manifest.counts[split] == {"rows": images * 2, "images": images,
                                          "files": len(manifest.outputs["codes"][split])}
        files = [coded_run / "codes" / n for n in manifest.outputs["codes"][split]]
        assert len(files) >= 2 * images // 100  # rows_per_file respected: 100 at most
        for path in files:
            table = pq.read_table(path)  # plain pyarrow, no Ray types
            assert table.num_rows <= 100
            codes_type = table.schema.field("codes").type
            assert codes_type.list_size == 16 and str(codes_type.value_type) == "int16"
            assert table.schema.field("label").type == "int32" and table.schema.field("view").type == "int8"
            meta = CodesMeta.from_schema(table.schema)
            assert meta.grid == (4, 4) and meta.codebook_size == 64 and meta.split == split
            assert meta.tokenizer_sha256 == manifest.outputs["tokenizer_sha256"]
        frame = pq.read_table(files[0]).to_pandas()  # and pandas
        assert list(frame.columns) == ["key", "label", "view", "codes"] and len(frame["codes"][0]) == 16
        rows = _rows(coded_run, split)
        keys = {k for k, _ in rows}
        assert len(rows) == 2 * images and len(keys) == images
        assert {v for _, v in rows} == {0, 1}
    assert 0 < manifest.metrics["train_usage_split"] <= 1 and manifest.metrics["images_per_second"] > 0
    # Not resumable leftovers: progress records and staging are gone once committed.
    assert not (coded_run / "codes" / "_progress").exists() and not (coded_run / "codes" / "_staging").exists()


def test_codes_equal_a_direct_encode_and_decode_reproduces(coded_run):
    tokenizer = load_tokenizer(coded_run / "tokenizer")
    samples = [s for url in list_shards(str(coded_run / "shards" / "val")) for s in iter_samples(url)]
    keys = [s["key"] for s in samples]
    images = np.stack([s["image"] for s in samples])
    plain = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    direct = {0: tokenizer.encode(plain), 1: tokenizer.encode(plain.flip(-1))}
    rows = _rows(coded_run, "val")
    for view, codes in direct.items():
        stored = np.stack([np.frombuffer(rows[(k, view)][1], np.int16) for k in keys])
        assert np.array_equal(stored, codes.flatten(1).numpy()), f"view {view}"
        assert [rows[(k, view)][0] for k in keys] == [s["label"] for s in samples]
    stored = torch.from_numpy(np.stack([np.frombuffer(rows[(k, 0)][1], np.int16) for k in keys]).astype(np.int64))
    with torch.no_grad():
        reconstruction = tokenizer(plain)[0].clamp(0, 1)
    assert torch.allclose(tokenizer.decode(stored.view(-1, 4, 4)), reconstruction, atol=1e-5)


def _copy_upstream(source: Path, target: Path) -> None:
    for folder in ("shards", "tokenizer"):
        shutil.copytree(source / folder, target / folder, ignore=shutil.ignore_patterns("checkpoints"))


def _job(run_dir: Path, ray_cluster, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "full_pipeline.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
            "--run-dir", str(run_dir), *[a for t in TINY for a in ("--set", t)], *extra]


def test_killed_run_resumes_to_the_same_rows(coded_run, ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    _copy_upstream(coded_run, run_dir)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    # Small pieces and batches (runtime-only: the same rows) so that the stage outlasts its first piece by far.
    small_pieces = ["--only", "pretokenize", "--set", "pretokenize.piece_images=16", "--set", "pretokenize.batch_size=8"]
    process = subprocess.Popen(_job(run_dir, ray_cluster, *small_pieces), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_piece = run_dir / "codes" / "_progress" / "train-00000.json"
    deadline = time.time() + 240
    while not first_piece.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert first_piece.exists(), "the first piece was never recorded"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert Manifest.read(RunDir(str(run_dir)), "codes") is None  # nothing committed

    from jobs.full_pipeline import main

    assert main(_job(run_dir, ray_cluster, *small_pieces)[2:]) == 0
    for split in ("train", "val"):
        assert _rows(run_dir, split) == _rows(coded_run, split)


def test_mismatched_inputs_are_named(coded_run, ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    _copy_upstream(coded_run, run_dir)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    wrong_grid = subprocess.run(_job(run_dir, ray_cluster, "--only", "pretokenize", "--set", "tokenizer.patch_size=2"),
                                env=env, capture_output=True, text=True, timeout=300)
    assert wrong_grid.returncode == 2 and "patch_size: file 4 vs config 2" in wrong_grid.stderr
    assert run_pipeline(load_config(ROOT / "configs" / "demo.yaml", TINY + ["ingest.seed=1"]), str(run_dir),
                        only="ingest")[0].status == "ran"
    stale = subprocess.run(_job(run_dir, ray_cluster, "--only", "pretokenize"), env=env, capture_output=True,
                           text=True, timeout=300)
    assert stale.returncode == 2 and "trained on shards of another ingest run" in stale.stderr


def test_view_rows_keep_piece_order_and_import_no_torch():
    """The view step's rows: one per (image, view), grouped by piece; its module must not pull torch into the
    Ray Data workers (seconds of CPU each on a small machine) unless a view needs resizing."""
    from pipeline.data.views import VIEW_IDS, view_rows

    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (4, 8, 8), dtype=np.uint8),  # grayscale, as Fashion-MNIST decodes
             "key": np.array(["a", "b", "c", "d"]), "label": np.arange(4),
             "shard": np.array(["s3://bucket/run/shards/train/shard-000001.tar"] * 2
                               + ["/local/run/shards/train/shard-000000.tar"] * 2)}
    rows = view_rows(batch, ["plain", "hflip"], 8, 1.125,
                     {"train/shard-000000.tar": 0, "train/shard-000001.tar": 1})
    assert rows["piece"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert rows["key"].tolist() == ["c", "d", "c", "d", "a", "b", "a", "b"]
    assert rows["view"].tolist() == [VIEW_IDS[v] for v in ["plain"] * 2 + ["hflip"] * 2] * 2
    assert rows["image"].shape == (8, 8, 8, 3)
    np.testing.assert_array_equal(rows["image"][0][..., 0], batch["image"][2])
    np.testing.assert_array_equal(rows["image"][2][..., 0], batch["image"][2][:, ::-1])

    probe = ("import sys, numpy as np; from pipeline.data.views import cut_view; "
             "cut_view(np.zeros((2, 8, 8, 3), np.uint8), 'crop_br_hflip', 7); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"
