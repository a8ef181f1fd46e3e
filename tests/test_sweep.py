"""A 3-trial Ray Tune sweep over the lookup dimension on a real local Ray: ingest runs once and is shared,
each trial is a child MLflow run of the sweep run, and the comparison table and plot reach MLflow. ASHA
stops a trial that falls behind while it trains."""
import csv
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from pipeline.config import ConfigError
from orchestration.errors import PipelineError
from orchestration.sweep import (SweepSpec, parse_search, plan_concurrency, run_sweep, sweep_tracking_uri,
                                  trial_config, trial_resources, validate)

ROOT = Path(__file__).resolve().parents[1]
# Ray's workers do not see tests/: this module's classes travel to them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
TINY = ["ingest.max_images_per_split=96", "ingest.shard_size=48", "ingest.resolution=16",
        "ingest.cpus_per_task=0.5", "tokenizer.image_size=16", "tokenizer.codebook_size=64",
        "tokenizer.steps=8", "tokenizer.batch_size=16", "tokenizer.adversarial_weight=0",
        "tokenizer.val_images=32", "tokenizer.log_every=4", "tokenizer.resources.num_workers=1"]


def _spec(values: str = "4,8,16") -> SweepSpec:
    base = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    return SweepSpec(base=base, space=dict([parse_search("grid", f"tokenizer.codebook_dim={values}")]),
                     last_stage="tokenizer", metric="tokenizer.val_usage_per_256", mode="max", extra_overrides=TINY,
                     columns=("tokenizer.val_perplexity",))


def test_swept_values_read_as_numbers():
    assert parse_search("grid", "tokenizer.lr=1e-9,0.003,3") == ("tokenizer.lr", ("grid", [1e-9, 0.003, 3]))
    assert parse_search("grid", "tokenizer.l2_normalize=true,false")[1][1] == [True, False]


def test_bad_sweeps_are_refused_before_any_work():
    with pytest.raises(ConfigError, match="codebook_dim"):
        validate(_spec("4,-1"))  # one bad grid value names the key
    spec = _spec()
    spec.space["run.ray_address"] = ("grid", ["x"])
    with pytest.raises(ConfigError, match="only sections of the config.s stages"):
        validate(spec)
    spec = _spec()
    spec.scheduler = "asha"  # final-only metric: nothing to stop on while trials train
    with pytest.raises(ConfigError, match="tokenizer.val_psnr"):
        validate(spec)
    spec = _spec()
    spec.columns = ("evaluate.fid_domain",)  # a figure of a stage the trials never reach
    with pytest.raises(ConfigError, match="--column evaluate.fid_domain: use <stage>.<metric> of a stage up to "
                                          "tokenizer"):
        validate(spec)


def test_a_trial_reserves_its_read_tasks_and_sweeps_that_cannot_fit_are_refused():
    # The demo tokenizer on 2 cores: 2 workers x 0.5 + a 0.5-CPU read task + the trial's 0.01. Ray Data's
    # default read (1 CPU) beside 1.01 held never ran: the sweep hung (issue #22).
    spec = _spec()
    need, formulas = trial_resources([trial_config({}, spec)], "tokenizer", "tokenizer")
    assert need == {"CPU": 0.5 + 0.5 + 0.01}  # TINY: one worker
    assert plan_concurrency(need, formulas, {"CPU": 2.0}, {"CPU": 2.0}, None) == 1
    assert plan_concurrency(need, formulas, {"CPU": 4.0}, {"CPU": 4.0}, None) == 3
    with pytest.raises(PipelineError, match=r"--max-concurrent 2: .*CPU 2.02 \(the cluster has 2\)"):
        plan_concurrency(need, formulas, {"CPU": 2.0}, {"CPU": 2.0}, 2)
    # A trial through pretokenize (1.5-CPU actor + 0.5 task + 0.01) can never fit 2 CPUs: refused, named.
    spec = SweepSpec(base=_spec().base, space=dict([parse_search("grid", "tokenizer.codebook_dim=8,32")]),
                     last_stage="pretokenize")
    need, formulas = trial_resources([trial_config({"tokenizer.codebook_dim": 8}, spec)], "tokenizer", "pretokenize")
    assert need["CPU"] == 2.01
    with pytest.raises(PipelineError, match=r"one trial needs CPU 2.01 \(the cluster has 2\).*pretokenize: 1 actor"):
        plan_concurrency(need, formulas, {"CPU": 2.0}, {"CPU": 2.0}, None)
    # An autoscaling cluster's configured maximum counts: one GPU trial may wait for its nodes.
    gpu = {"num_workers": 2, "use_gpu": True}
    spec.base = {**spec.base, "tokenizer": {**spec.base["tokenizer"], "resources": gpu}}
    need, formulas = trial_resources([trial_config({}, spec)], "tokenizer", "tokenizer")
    assert need == {"CPU": 1.51, "GPU": 2.0}
    assert plan_concurrency(need, formulas, {"CPU": 8.0}, {"CPU": 40.0, "GPU": 8.0}, None) == 1
    with pytest.raises(PipelineError, match="GPU 2"):
        plan_concurrency(need, formulas, {"CPU": 8.0}, {"CPU": 8.0}, None)


def test_three_trial_sweep_shares_ingest_and_reports_to_mlflow(ray_cluster, tmp_path):
    summary = run_sweep(_spec(), str(tmp_path / "sweep"))
    root = Path(summary["root"])
    rows = list(csv.DictReader((root / "comparison.csv").open()))
    assert sorted(int(r["tokenizer.codebook_dim"]) for r in rows) == [4, 8, 16]
    assert all(0 < float(r["tokenizer.val_usage_per_256"]) <= 1 for r in rows)
    # Ingest ran once, in base/; every trial links it instead of recomputing it.
    trial_dirs = [Path(r["trial_dir"]) for r in rows]
    assert all((d / "shards").is_symlink() and (d / "shards").resolve() == root / "base" / "shards"
               for d in trial_dirs)
    assert len(list(root.glob("trials/*"))) == 3

    client = MlflowClient(sweep_tracking_uri(str(root)))
    sweep = client.get_run(summary["sweep_run_id"])
    assert sweep.info.status == "FINISHED" and sweep.data.metrics["trials"] == 3
    children = client.search_runs([sweep.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{sweep.info.run_id}'")
    assert sorted(run.data.params["tokenizer.codebook_dim"] for run in children) == ["16", "4", "8"]
    artifacts = {a.path for a in client.list_artifacts(sweep.info.run_id)}
    assert {"comparison.csv", "comparison.md", "plot_tokenizer_codebook_dim.png"} <= artifacts
    # The table shows the metric, then the asked-for columns, then the usual figures the trials have.
    header = (root / "comparison.md").read_text().splitlines()[0]
    assert header == ("| tokenizer.codebook_dim | tokenizer.val_usage_per_256 | tokenizer.val_perplexity | "
                      "tokenizer.val_psnr | status |")

    # The same sweep again: Tune restores the finished experiment and no trial trains again.
    committed = {d: (d / "tokenizer" / "_MANIFEST.json").stat().st_mtime_ns for d in trial_dirs}
    again = run_sweep(_spec(), str(root))
    assert len(again["rows"]) == 3
    assert committed == {d: (d / "tokenizer" / "_MANIFEST.json").stat().st_mtime_ns for d in trial_dirs}


class FailsOnce:
    """A follow-up that fails a trial the first time it runs there, as a transient error would."""

    name, section, columns = "flaky", "ingest", ("calls",)

    def __call__(self, trial_dir: Path, cfg) -> dict[str, float]:
        marker = trial_dir / "flaky-calls"
        calls = int(marker.read_text()) + 1 if marker.exists() else 1
        marker.write_text(str(calls))
        if calls == 1:
            raise RuntimeError("a transient failure")
        return {"calls": calls}


def test_a_trial_that_fails_once_is_retried_from_its_committed_stages(ray_cluster, tmp_path):
    spec = _spec("4")
    spec.follow_up = FailsOnce()
    summary = run_sweep(spec, str(tmp_path / "sweep"))
    (row,) = summary["rows"]
    assert row["status"] == "completed" and float(row["flaky.calls"]) == 2
    client = MlflowClient(sweep_tracking_uri(summary["root"]))
    assert client.get_run(summary["sweep_run_id"]).data.metrics["errored_trials"] == 0
    # The retry found the tokenizer committed and did not train it again: one tokenizer run under this sweep's
    # pipeline runs (the store may hold other sweeps' runs).
    experiment = [summary["experiment_id"]]
    pipelines = {run.info.run_id for run in client.search_runs(
        experiment, f"tags.mlflow.parentRunId = '{summary['sweep_run_id']}'")}
    tokenizer_runs = [run for run in client.search_runs(experiment, "tags.mlflow.runName = 'tokenizer'")
                      if run.data.tags.get("mlflow.parentRunId") in pipelines]
    assert pipelines and len(tokenizer_runs) == 1


def test_asha_stops_the_trial_that_falls_behind(ray_cluster, tmp_path):
    # On 2 CPUs trials run one at a time in grid order: the learning trial sets the rung at step 4, the
    # frozen one (lr 1e-9) reaches it below the cut and is stopped before it commits its tokenizer.
    base = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    spec = SweepSpec(base=base, space=dict([parse_search("grid", "tokenizer.lr=0.003,1e-9")]),
                     last_stage="tokenizer", metric="tokenizer.val_psnr", mode="max", scheduler="asha",
                     grace_period=4, poll_seconds=0.5,
                     extra_overrides=TINY + ["tokenizer.steps=12", "tokenizer.image_every=2", "tokenizer.warmup_steps=0"])
    summary = run_sweep(spec, str(tmp_path / "asha"))
    assert summary["concurrency"] == 1
    rows = {row["tokenizer.lr"]: row for row in summary["rows"]}
    assert rows[0.003]["status"] == "completed" and rows[0.003]["tokenizer.val_psnr"] > 0
    stopped = rows[1e-9]
    assert stopped["status"].startswith("stopped at step ")
    assert 4 <= int(stopped["status"].rsplit(" ", 1)[1]) < 12
    assert not (Path(stopped["trial_dir"]) / "tokenizer" / "_MANIFEST.json").exists()
    assert "stopped at step" in (Path(summary["root"]) / "comparison.md").read_text()

    client = MlflowClient(sweep_tracking_uri(summary["root"]))
    children = client.search_runs([client.get_run(summary["sweep_run_id"]).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{summary['sweep_run_id']}'")
    assert sorted(run.info.status for run in children) == ["FINISHED", "KILLED"]
    # The stopped trial's Ray Train placement group (named on its stage run) is gone: without a dashboard
    # Ray Train's own cleaner cannot see the trial die, and the CPUs would stay reserved for later work.
    from ray.util.placement_group import placement_group_table

    killed = next(run for run in children if run.info.status == "KILLED")
    stage_run = client.search_runs([killed.info.experiment_id], f"tags.mlflow.parentRunId = '{killed.info.run_id}'")[0]
    assert stage_run.info.status == "KILLED" and stage_run.data.tags["vim.placement_group"]
    # Removal is asynchronous (Tune's own trial group too): allow it a moment, then name what stays.
    deadline = time.time() + 60
    while (left := [g for g in placement_group_table().values() if g["state"] != "REMOVED"]) and time.time() < deadline:
        time.sleep(0.5)
    assert left == [], left
