"""A sweep trial's results while its pipeline runs, for early stopping (ASHA).

The training stages log their validation figures to MLflow every few steps from their rank-0 worker. A
trial runs its pipeline in a thread and, meanwhile, reads the running stage's metric history from the
store and hands each new point to Tune. Tune stops a trial by ending its process, which takes the
pipeline thread along; `release_stopped_trial` then frees what the process cannot take with it (its Ray
Train placement group) and closes its MLflow runs.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable

from pipeline import tracking
from pipeline.config import ConfigError

# Final stage metric -> the name the stage logs for it during training. Only these can drive ASHA.
INTERIM_METRICS: dict[str, str] = {
    "tokenizer.val_psnr": "val_psnr_probe",            # a fixed val batch every tokenizer.image_every steps
    "transformer.val_bits_per_token": "val_bits_per_token",  # every transformer.eval_every steps
    "transformer.val_loss_nats": "val_loss_nats",
}


def interim_metric(metric: str | None) -> tuple[str, str]:
    """(stage, logged name) of a metric ASHA can follow; a clear error for any other."""
    if metric not in INTERIM_METRICS:
        raise ConfigError(f"--scheduler asha needs a --metric the training stages log as they go: "
                          f"{', '.join(INTERIM_METRICS)} (got {metric})")
    return metric.split(".")[0], INTERIM_METRICS[metric]


class StageMetricWatcher:
    """New (step, value) points of one metric of one stage of a pipeline run, read from MLflow."""

    def __init__(self, run_dir: Path, stage: str, name: str):
        self.run_dir, self.stage, self.name = run_dir, stage, name
        self.last_step = -1

    def new_points(self) -> list[tuple[int, float]]:
        from mlflow.tracking import MlflowClient

        pointer = self.run_dir / tracking.PIPELINE_RUN_FILE  # written when the pipeline run starts
        if not pointer.exists():
            return []
        parent = json.loads(pointer.read_text())
        client = MlflowClient(parent["tracking_uri"])
        runs = client.search_runs(
            [parent["experiment_id"]], order_by=["attributes.start_time DESC"], max_results=1,
            filter_string=f"tags.mlflow.parentRunId = '{parent['run_id']}' and tags.`vim.stage` = '{self.stage}'")
        if not runs:
            return []
        history = client.get_metric_history(runs[0].info.run_id, self.name)
        points = sorted({m.step: m.value for m in history if m.step > self.last_step}.items())
        if points:
            self.last_step = points[-1][0]
        return points


def run_while_watching(work: Callable[[], object], watcher: StageMetricWatcher, poll_seconds: float,
                       on_point: Callable[[int, float], None]) -> object:
    """`work()` in a thread; each new (step, value) of the watched metric goes to `on_point` from this
    thread (Tune's report must come from the trial's own thread). Returns work's result or raises its error."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = work()
        except BaseException as error:  # raised again in the trial's thread, which reports it to Tune
            outcome["error"] = error

    thread = threading.Thread(target=target, name="trial-pipeline", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(poll_seconds)
        for step, value in watcher.new_points():
            on_point(step, value)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def release_stopped_trial(trial_dir: Path) -> None:
    """After Tune ended a trial mid-stage: remove the placement group its training stage reserved (named by
    the `vim.placement_group` tag rank 0 sets) and mark its unfinished stage runs and pipeline run KILLED."""
    import ray
    from mlflow.tracking import MlflowClient
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    from stages.training import PLACEMENT_GROUP_TAG

    pointer = trial_dir / tracking.PIPELINE_RUN_FILE
    if not pointer.is_file():
        return
    parent = json.loads(pointer.read_text())
    client = MlflowClient(parent["tracking_uri"])
    stages = client.search_runs([parent["experiment_id"]], f"tags.mlflow.parentRunId = '{parent['run_id']}'")
    for run in stages:
        group_id = run.data.tags.get(PLACEMENT_GROUP_TAG)
        if group_id and ray.is_initialized():
            group = PlacementGroup(PlacementGroupID(bytes.fromhex(group_id)))
            if placement_group_table(group).get("state") not in (None, "REMOVED"):
                remove_placement_group(group)
        # The runner may have marked it FAILED first (the trainer raised as its controller died): the
        # cause is the stop.
        if run.info.status != "FINISHED":
            client.set_terminated(run.info.run_id, status="KILLED")
    client.set_terminated(parent["run_id"], status="KILLED")
