"""jobs/run_stage.py: one stage on an existing run directory with the config its last pipeline run stored."""
import full_pipeline
import run_stage

from pipeline.storage import Manifest, RunDir

TINY = ["--set", "ingest.max_images_per_split=60", "--set", "ingest.shard_size=30",
        "--set", "ingest.resolution=16", "--set", "ingest.cpus_per_task=0.5"]


def test_run_stage_reuses_the_stored_config(ray_cluster, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert run_stage.main(["ingest", "--run-dir", run_dir]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "run").exists()  # refused, not made
    (tmp_path / "run").mkdir()
    assert run_stage.main(["ingest", "--run-dir", run_dir]) == 2
    assert "no stored config" in capsys.readouterr().err

    assert full_pipeline.main(["--config", "configs/demo.yaml", "--run-dir", run_dir, "--only", "ingest"] + TINY) == 0
    first = Manifest.read(RunDir(run_dir), "shards")
    assert run_stage.main(["ingest", "--run-dir", run_dir]) == 0  # same stored config: committed, skipped
    assert "skipped" in capsys.readouterr().out
    assert Manifest.read(RunDir(run_dir), "shards").fingerprint == first.fingerprint

    assert run_stage.main(["ingest", "--run-dir", run_dir, "--set", "ingest.shard_size=20"]) == 0
    rerun = Manifest.read(RunDir(run_dir), "shards")
    assert rerun.fingerprint != first.fingerprint and rerun.counts["train"]["shards"] == 3
    assert run_stage.main(["tokenizer", "--run-dir", run_dir, "--set", "tokenizer.codebook_dim=-3"]) == 2
