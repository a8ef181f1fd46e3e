"""The ingest stage on a real local Ray: generated ImageNet layouts, resume after a kill, determinism."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from mlflow.tracking import MlflowClient

from imagegen import WNIDS, make_imagenet
from pipeline.config import build_config
from pipeline.data.shards import iter_samples, list_shards
from pipeline.storage import Manifest, RunDir
from pipeline.tracking import default_tracking_uri
from orchestration.errors import PipelineError
from orchestration.run_lock import RunLock
from orchestration.runner import run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _imagenet_cfg(root: Path, layout: str, *extra: str):
    labels = "LOC_val_solution.csv" if layout == "tar" else "val_labels.txt"
    return build_config({"ingest": {
        "source": f"imagenet_{layout}", "root": str(root), "val_labels": str(root / labels),
        "synsets": str(root / "LOC_synset_mapping.txt"), "resolution": 32, "image_format": "jpg",
        "shard_size": 6, "cpus_per_task": 0.5}}, list(extra))


@pytest.mark.parametrize("layout", ["tar", "folder"])
def test_imagenet_layouts_become_mixed_shards(ray_cluster, tmp_path, layout):
    fake = make_imagenet(tmp_path / "src", layout)
    run_dir = tmp_path / "run"
    outcomes = run_pipeline(_imagenet_cfg(fake.root, layout), str(run_dir), only="ingest")
    assert [(o.name, o.status) for o in outcomes] == [("ingest", "ran")]

    manifest = Manifest.read(RunDir(str(run_dir)), "shards")
    train = manifest.counts["train"]
    assert train["skipped_by_reason"] == {"not_an_image": 1, "truncated": 1, "empty": 1}
    assert train["images"] == fake.train_count - 3 and train["images"] + train["skipped"] == train["indexed"]
    assert manifest.counts["val"]["images"] == fake.val_count
    assert sorted(s["origin"].rsplit("_", 1)[-1] for s in manifest.details["skipped"]) == [
        "JPEG", "JPEG", "JPEG"] or len(manifest.details["skipped"]) == 3
    classes = json.loads((run_dir / "shards" / "classes.json").read_text())
    assert [classes[str(i)]["wnid"] for i in range(3)] == WNIDS
    assert classes["0"]["name"] == "fish number 0"

    # Read back with the webdataset library: keys unique, labels right, images decoded to 32x32 RGB.
    urls = [str(p) for p in sorted((run_dir / "shards" / "train").glob("shard-*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("__key__", "jpg", "cls", "json"))
    keys = [s[0] for s in samples]
    assert len(keys) == len(set(keys)) == train["images"]
    for key, image, label, meta in samples:
        assert image.shape == (32, 32, 3)
        assert key.startswith(WNIDS[label]) and meta["label"] == label
    # ... and with tarfile alone: the same samples, and every shard holds several classes.
    per_shard = [[s["label"] for s in iter_samples(u)] for u in list_shards(str(run_dir / "shards" / "train"))]
    assert sum(len(s) for s in per_shard) == train["images"]
    assert sum(len(set(s)) > 1 for s in per_shard) >= len(per_shard) - 1
    val = [s for u in list_shards(str(run_dir / "shards" / "val")) for s in iter_samples(u)]
    assert {s["key"]: WNIDS[s["label"]] for s in val} == fake.val_truth

    # MLflow: a parent run and a finished child run for the stage with its figures.
    client = MlflowClient(default_tracking_uri(str(run_dir)))
    child = client.get_run(manifest.mlflow_run_id)
    assert child.info.status == "FINISHED" and child.data.metrics["images_per_second"] > 0
    assert child.data.params["resolution"] == "32" and child.data.tags["mlflow.parentRunId"]

    # Re-run: nothing to do. A changed key: the stage reruns.
    assert run_pipeline(_imagenet_cfg(fake.root, layout), str(run_dir), only="ingest")[0].status == "skipped"
    rerun = run_pipeline(_imagenet_cfg(fake.root, layout, "ingest.resolution=16"), str(run_dir), only="ingest")
    assert rerun[0].status == "ran"
    first = next(iter_samples(list_shards(str(run_dir / "shards" / "train"))[0]))
    assert first["image"].shape == (16, 16, 3)


def test_cifar10_image_folder(ray_cluster, cifar_root, tmp_path):
    cfg = build_config({"ingest": {"source": "image_folder", "root": str(cifar_root),
                                   "splits": {"train": "train", "val": "test"}, "resolution": None,
                                   "image_format": "png", "shard_size": 100, "max_images_per_split": 300,
                                   "cpus_per_task": 0.5}})
    run_pipeline(cfg, str(tmp_path / "run"), only="ingest")
    manifest = Manifest.read(RunDir(str(tmp_path / "run")), "shards")
    assert manifest.counts["train"]["images"] == 300 and manifest.counts["val"]["images"] == 300
    assert len(manifest.counts["train"]["class_histogram"]) == 10
    assert manifest.outputs["channels"] == 3  # colour data: tokenized as RGB
    sample = next(iter_samples(list_shards(str(tmp_path / "run" / "shards" / "train"))[0]))
    assert sample["image"].shape == (32, 32, 3)


def _fmnist_args(run_dir: Path) -> list[str]:
    return ["--config", str(ROOT / "configs" / "demo.yaml"), "--run-dir", str(run_dir),
            "--set", "ingest.max_images_per_split=1500", "--set", "ingest.shard_size=100",
            "--set", "ingest.cpus_per_task=0.5", "--only", "ingest"]


def test_killed_run_resumes_to_identical_shards(ray_cluster, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    killed = tmp_path / "killed"
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "full_pipeline.py"), *_fmnist_args(killed)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = killed / "shards" / "_progress"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(progress.glob("train-*.json"))) < 3:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = len(list(progress.glob("*-*.json")))
    assert 3 <= partial < 30 and not (killed / "shards" / "_MANIFEST.json").exists()

    from jobs.full_pipeline import main

    assert main(_fmnist_args(killed)) == 0  # the stale lock of the killed driver is taken over
    assert main(_fmnist_args(tmp_path / "clean")) == 0
    for split in ("train", "val"):
        resumed = sorted((killed / "shards" / split).iterdir())
        clean = sorted((tmp_path / "clean" / "shards" / split).iterdir())
        assert [p.name for p in resumed] == [p.name for p in clean] and len(clean) == 15
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(resumed, clean))  # same bytes
    keys = [s["key"] for u in list_shards(str(killed / "shards" / "train")) for s in iter_samples(u, False)]
    assert len(keys) == len(set(keys)) == 1500
    labels = Counter(s["label"] for u in list_shards(str(killed / "shards" / "train"))[:1]
                     for s in iter_samples(u, False))
    assert len(labels) >= 8  # a single shard of class-sorted input holds many classes


def test_a_live_pipeline_holds_the_run_directory(tmp_path):
    run_dir = RunDir(str(tmp_path / "run"))
    (tmp_path / "run" / "_LOCK.json").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getppid()}))
    with pytest.raises(PipelineError, match="in use by pid"):
        with RunLock(run_dir):
            pass


def test_config_error_stops_the_job_before_ray(tmp_path):
    started = time.time()
    result = subprocess.run([sys.executable, str(ROOT / "jobs" / "full_pipeline.py"), "--config",
                             str(ROOT / "configs" / "demo.yaml"), "--run-dir", str(tmp_path / "run"),
                             "--set", "ingest.shard_sise=3", "--only", "ingest"], capture_output=True, text=True,
                            env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})
    assert result.returncode == 2 and "ingest.shard_sise" in result.stderr and "shard_size" in result.stderr
    assert time.time() - started < 30 and not (tmp_path / "run").exists()


def test_missing_source_stops_the_job_before_ray(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "jobs" / "full_pipeline.py"), "--run-dir",
                             str(tmp_path / "run"), "--set", "ingest.source=image_folder",
                             "--set", f"ingest.root={tmp_path / 'nowhere'}"], capture_output=True, text=True,
                            env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})
    assert result.returncode == 2 and "not found" in result.stderr


def test_missing_vgg_weights_stop_the_job_before_ray(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "jobs" / "full_pipeline.py"), "--run-dir",
                             str(tmp_path / "run"), "--set", "tokenizer.vgg16_weights=/nowhere/vgg16.pth"],
                            capture_output=True, text=True,
                            env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1", "TORCH_HOME": str(tmp_path)})
    assert result.returncode == 2 and "tokenizer.perceptual_weight=0" in result.stderr


def _folder_cfg(root: Path, **extra):
    return build_config({"ingest": {"source": "image_folder", "root": str(root), "splits": {"train": "train"},
                                    "resolution": 16, "image_format": "png", "shard_size": 4,
                                    "cpus_per_task": 0.5, **extra}})


def _make_folder(root: Path, classes=("a", "b", "c"), per_class=8) -> Path:
    from imagegen import picture, png

    for n, cls in enumerate(classes):
        (root / "train" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / "train" / cls / f"{cls}{i}.png").write_bytes(png(picture(100 * n + i, (20, 20))))
    return root


def test_resume_after_the_source_changed_is_an_error_not_a_mix(ray_cluster, tmp_path, monkeypatch):
    from pipeline.data.sources import SourceError
    from pipeline.stage import Progress

    source = _make_folder(tmp_path / "src")
    run_dir = tmp_path / "run"
    real_update, calls = Progress.update, []

    def killed_after_two_shards(self, *args, **kwargs):  # the driver dies with 2 shards recorded
        calls.append(1)
        real_update(self, *args, **kwargs)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(Progress, "update", killed_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(_folder_cfg(source), str(run_dir), only="ingest")
    monkeypatch.setattr(Progress, "update", real_update)
    assert len(list((run_dir / "shards" / "_progress").glob("train-*.json"))) == 2

    (source / "train" / "b" / "b3.png").unlink()  # the source changes between the attempts
    with pytest.raises(SourceError, match="changed") as error:
        run_pipeline(_folder_cfg(source), str(run_dir), only="ingest")
    assert "b/b3.png" in str(error.value) and "removed" in str(error.value) and "--force" in str(error.value)
    assert not (run_dir / "shards" / "_MANIFEST.json").exists()

    # --force ingest: a clean restart on the new source, every image exactly once.
    outcomes = run_pipeline(_folder_cfg(source), str(run_dir), only="ingest", force=("ingest",))
    assert outcomes[0].status == "ran"
    keys = [s["key"] for u in list_shards(str(run_dir / "shards" / "train")) for s in iter_samples(u, False)]
    expected = sorted(f"{c}_{c}{i}" for c in "abc" for i in range(8) if f"{c}{i}" != "b3")
    assert sorted(keys) == expected
    manifest = Manifest.read(RunDir(str(run_dir)), "shards")
    assert manifest.counts["train"]["images"] == 23 and manifest.details["source_fingerprint"]


def test_a_split_with_no_valid_image_is_an_error(ray_cluster, tmp_path):
    from pipeline.data.sources import SourceError

    (tmp_path / "src" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "train" / "cat" / "corrupt.jpg").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "src" / "train" / "cat" / "empty.jpg").write_bytes(b"")
    run_dir = tmp_path / "run"
    with pytest.raises(SourceError, match="train") as error:
        run_pipeline(_folder_cfg(tmp_path / "src"), str(run_dir), only="ingest")
    text = str(error.value)
    assert "no valid image" in text and "2 skipped" in text and "empty" in text and "not_an_image" in text
    assert not (run_dir / "shards" / "_MANIFEST.json").exists()
