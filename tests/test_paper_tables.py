"""`jobs/paper_tables.py` end to end at its tiny size on a real Ray, a real MLflow store and a folder of real JPEGs:
both tables' sweeps, the shared evaluation network, the calibration that gives each architecture its steps, the
report's structure, its numbers against the trials' manifests and MLflow runs, the paper's numbers beside them,
and a rerun that resumes without training anything. Bad input stops before any work."""
import json
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from imagegen import jpeg, picture
from pipeline.storage import Manifest, RunDir

import paper_tables  # jobs/paper_tables.py

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("apple", "boat", "cloud", "dune")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """4 classes of generated pictures: 32 train and 16 test images each, as JPEG files."""
    root = tmp_path_factory.mktemp("paper-images")
    for split, count, offset in (("train", 32, 0), ("test", 16, 10_000)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i:03d}.jpg").write_bytes(jpeg(picture(offset + 100 * c + i)))
    return root


def test_each_architecture_gets_its_steps_and_the_evaluation_counts_in_a_trial(tmp_path):
    """Table 1's steps move with the swept architecture (`value_overrides`); the reconstruction evaluation's
    actor pool counts in what a trial holds."""
    from orchestration.paper_tables import Plan, table1_spec
    from orchestration.recon_eval import ReconstructionEvaluation
    from orchestration.sweep import trial_config, trial_resources

    plan = Plan(size="quick", out=str(tmp_path), images=str(tmp_path), val_split="test", dims=[4])
    spec = table1_spec(plan, {"vit": 70, "cnn": 55}, ReconstructionEvaluation("unused.pt"))
    configs = {arch: trial_config({"tokenizer.architecture": arch}, spec) for arch in ("vit", "cnn")}
    assert {arch: cfg.tokenizer.steps for arch, cfg in configs.items()} == {"vit": 70, "cnn": 55}
    need, formulas = trial_resources(list(configs.values()), "tokenizer", "tokenizer", spec.follow_up)
    assert need == {"CPU": 1.26}  # tokenizer 2 x 0.5 + 0.25; the evaluation's 0.5 actor + 0.25 task fits in it
    assert any(f.startswith("recon_eval: 1 actor(s) x 0.5 CPU + 0.25 per task") for f in formulas)
    spec.base = {**spec.base, "evaluate": {**spec.base["evaluate"], "cpus_per_actor": 1.5}}
    assert trial_resources([trial_config({"tokenizer.architecture": "vit"}, spec)], "tokenizer", "tokenizer",
                           spec.follow_up)[0] == {"CPU": 1.76}
    # Table 1 splits Table 4's global batch over its 2 workers.
    assert (configs["vit"].tokenizer.batch_size, configs["vit"].tokenizer.resources.num_workers) == (32, 2)


def test_make_paper_tables_submits_the_job_and_checks_the_archive_first(tmp_path):
    """`make paper-tables` sends jobs/paper_tables.py to the local head like sweep-demo, with absolute paths (the
    job runs from a copy of the tree); a missing archive stops make before the head starts."""
    dry = subprocess.run(["make", "-n", "--no-print-directory", "paper-tables", "QUICK=1", f"PAPER_DIR={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    submit = [shlex.split(line) for line in dry.stdout.replace("\\\n", " ").splitlines()
              if line.startswith("bash scripts/submit.sh ")]
    assert len(submit) == 1, dry.stdout
    command = submit[0][2:]
    assert command[:2] == ["python", "jobs/paper_tables.py"] and "--quick" in command
    assert command[command.index("--out") + 1] == str(tmp_path)
    assert Path(command[command.index("--archive") + 1]).is_absolute()
    missing = subprocess.run(["make", "--no-print-directory", "paper-tables", f"CIFAR_ARCHIVE={tmp_path}/none.tar.gz"],
                             cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode != 0 and "CIFAR-10 archive not found" in missing.stderr
    assert "ray_head.sh" not in missing.stdout  # nothing started


def test_missing_data_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    assert paper_tables.main(["--archive", str(tmp_path / "none.tar.gz"), "--out", str(out), "--quick"]) == 2
    assert "CIFAR-10 archive not found" in capsys.readouterr().err and not out.exists()
    assert paper_tables.main(["--images", str(tmp_path / "absent"), "--out", str(out)]) == 2
    assert "image folder not found" in capsys.readouterr().err and not out.exists()
    (tmp_path / "flat" / "train").mkdir(parents=True)
    assert paper_tables.main(["--images", str(tmp_path / "flat"), "--out", str(out)]) == 2
    assert "test/<class>/" in capsys.readouterr().err and not out.exists()


def test_tiny_paper_tables_end_to_end_and_resumed(ray_cluster, image_folder, tmp_path, capsys):
    out = tmp_path / "tables"
    argv = ["--images", str(image_folder), "--size", "tiny", "--out", str(out)]
    assert paper_tables.main(argv) == 0
    report = json.loads((out / "paper_tables.json").read_text())
    uri = report["mlflow"]["tracking_uri"]
    client = MlflowClient(uri)

    # Table 4: every lookup dim with and without l2; Table 1: ViT and CNN.
    t4, t1 = report["table4"]["rows"], report["table1"]["rows"]
    assert sorted((r["codebook_dim"], r["l2_normalize"]) for r in t4) == [(4, False), (4, True)]
    assert [r["architecture"] for r in t1] == ["vit", "cnn"]
    # One ingest and one evaluation network: every trial met the same reference statistics.
    assert len(report["reference_stats_digests"]) == 1
    trials = [Path(r["trial_dir"]) for r in t4 + t1]
    assert len({(trial / "shards").resolve() for trial in trials}) == 1

    # Each figure is the trial's own: its tokenizer manifest, its reconstruction record and MLflow runs.
    for row in t4 + t1:
        manifest = Manifest.read(RunDir(row["trial_dir"]), "tokenizer")
        assert manifest.mlflow_run_id == row["tokenizer_mlflow_run_id"]
        assert row["steps"] == manifest.metrics["steps"] and row["train_seconds"] == manifest.metrics["train_seconds"]
        assert client.get_run(manifest.mlflow_run_id).data.metrics["val_psnr"] == row["tokenizer_val_psnr"]
        recon = client.get_run(row["recon_eval_mlflow_run_id"]).data.metrics
        for key, name in (("rfid_domain", "rfid_domain"), ("psnr", "recon_psnr"), ("ssim", "recon_ssim"),
                          ("usage_per_256", "recon_usage_per_256"), ("perplexity", "recon_perplexity")):
            assert recon[name] == pytest.approx(row[key]) and np.isfinite(row[key]), key
        assert 0 < row["usage_per_256"] <= 1 and row["images_per_second"] > 0
        if row in t4:
            assert (manifest.config["codebook_dim"], manifest.config["l2_normalize"]) == (
                row["codebook_dim"], row["l2_normalize"])
    # Equal training time: each architecture trained the steps its calibration gave it.
    calibration = report["table1"]["calibration"]
    assert {r["architecture"]: r["steps"] for r in t1} == {
        arch: c["steps"] for arch, c in calibration["architectures"].items()}
    for arch, measured in calibration["architectures"].items():  # from the calibration trial's MLflow windows
        windows = client.get_metric_history(measured["mlflow_run_id"], "images_per_second")
        assert sorted(m.value for m in windows) == sorted(measured["windows"]) and measured["images_per_second"] > 0

    # The paper's numbers beside ours, the claims, the plots, and the same in MLflow.
    by_row = {(r["codebook_dim"], r["l2_normalize"]): r for r in t4}
    assert by_row[(4, True)]["paper"]["usage"] == 0.96 and by_row[(4, False)]["paper"] is None
    table = (out / "paper_tables.md").read_text()
    for text in ("## Table 4", "## Table 1", "| 4 | on |", "96%", "| CNN-VQGAN channels x1 | 946 | 2.26 |",
                 "paper rows not run here".capitalize(), "## At this scale", "Left out at this size"):
        assert text in table, text
    assert set(report["table4"]["claims"]) == {"usage_falls_with_dim", "l2_raises_usage", "l2_improves_rfid",
                                               "best_rfid_small_dim"}
    assert all(c["holds"] in ("yes", "no", "partly", "n/a") for c in report["table4"]["claims"].values())
    assert set(report["table1"]["claims"]) == {"vit_better_rfid", "vit_higher_usage"}
    for name in ("table4.png", "table1.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = client.get_run(report["mlflow"]["run_id"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "paper_tables.md", "paper_tables.json", "table4.png", "table1.png"}
    assert run.data.metrics["table4.dim4_l2off.rfid_domain"] == by_row[(4, False)]["rfid_domain"]
    assert run.data.metrics["table1.cnn.psnr"] == t1[1]["psnr"]
    sweep = client.get_run(report["sweep_run_ids"]["table4"])
    assert sweep.data.metrics["trials"] == 2 and sweep.data.metrics["errored_trials"] == 0

    # The same command again resumes: nothing is trained or evaluated again, the same figures come out.
    assert paper_tables.main(argv) == 0
    again = json.loads((out / "paper_tables.json").read_text())
    for first, second in zip(t4 + t1, again["table4"]["rows"] + again["table1"]["rows"]):
        assert {k: v for k, v in first.items() if k != "images_per_second_overall"} == {
            k: v for k, v in second.items() if k != "images_per_second_overall"}
    assert again["mlflow"]["run_id"] == report["mlflow"]["run_id"]
    # Another plan in the same folder is refused rather than mixed in.
    assert paper_tables.main([*argv, "--dims", "4,8"]) == 2
    assert "holds a paper-tables run of another plan (different dims)" in capsys.readouterr().err
