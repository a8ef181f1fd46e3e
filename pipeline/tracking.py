"""MLflow tracking: one experiment per run directory (named for people, of MLflow's model-development kind),
a parent run per pipeline run, a child per stage, each with its source script and commit.

All calls go through `MlflowClient` with explicit run ids, so nothing depends on MLflow's global
"active run" state and the same code works in a driver, a Ray Data task or a Train worker.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.storage import is_uri

PIPELINE_RUN_FILE = "_mlflow_parent.json"
# MLflow 3's UI opens an experiment by its kind: without it, on the GenAI overview (traces), empty here.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def experiment_name(run_dir_location: str, prefix: str = "vim") -> str:
    """A name for people: `vim demo` for a run directory `.../demo` (`run.experiment` overrides it)."""
    return f"{prefix} {Path(run_dir_location.rstrip('/')).name}"


def runs_page(experiment_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The experiment's runs table in `mlflow ui`. MLflow 3.17's UI picks its GenAI or model-training pages from
    a toggle (this URL parameter, then the browser's last choice), not from the experiment's kind."""
    return f"{ui}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def source_tags() -> dict[str, str]:
    """What MLflow's Source column shows: the job script this process runs, and the commit."""
    import sys

    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    root = Path(__file__).resolve().parents[1]
    name = str(script.relative_to(root)) if script and script.is_relative_to(root) else (
        script.name if script else "python")
    return {"mlflow.source.name": name, "mlflow.source.type": "LOCAL", "mlflow.source.git.commit": git_commit()}


def default_tracking_uri(run_dir_location: str) -> str:
    """MLFLOW_TRACKING_URI wins; otherwise a SQLite file beside a local run directory."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if is_uri(run_dir_location):
        home_db = Path.home() / ".vim-pipeline" / "mlflow.db"
        home_db.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{home_db}"
    parent = Path(run_dir_location).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{parent / 'mlflow.db'}"


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """Logs to one MLflow run. Cheap to pickle: it carries only the URI and the run id."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    @property
    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, str(v)[:6000]) for k, v in sorted(flat.items())]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in flatten(metrics).items()
                 if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start:start + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, local_path, artifact_path)

    def log_artifact_bytes(self, data: bytes, artifact_file: str) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / Path(artifact_file).name
            path.write_bytes(data)
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(self.run_id, str(path), None if parent == "." else parent)

    def log_inputs(self, datasets: list[dict[str, str]]) -> None:
        """Each: name, digest, source (a URI), context (how the run used it). MLflow's Dataset column."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(name=d["name"], digest=d["digest"][:36], source_type=d.get("source_type", "local"),
                                       source=json.dumps({"uri": d["source"]})),
                               [InputTag("mlflow.data.context", d["context"])]) for d in datasets]
        self.client.log_inputs(self.run_id, datasets=inputs)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before the kind was recorded
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # created concurrently by another process
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def start_run(tracking_uri: str, experiment_id: str, name: str, tags: dict[str, str],
              parent_run_id: str | None = None) -> Tracker:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    all_tags = {"mlflow.runName": name, **source_tags(), **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, tags=all_tags)
    return Tracker(tracking_uri, run.info.run_id)


def reopen_run(tracking_uri: str, run_id: str) -> Tracker | None:
    """The run with that id set back to RUNNING, or None where the store no longer has it."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    if run.info.lifecycle_stage == "deleted":
        return None
    client.update_run(run_id, status="RUNNING")
    return Tracker(tracking_uri, run_id)


def find_unfinished_child(tracking_uri: str, experiment_id: str, parent_run_id: str,
                          fingerprint: str) -> Tracker | None:
    """The not-yet-finished child run of this parent for a stage with this fingerprint, reopened."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`vim.fingerprint` = '{fingerprint}'"),
        max_results=5)
    for run in runs:
        if run.info.status != "FINISHED":
            client.update_run(run.info.run_id, status="RUNNING")
            return Tracker(tracking_uri, run.info.run_id)
    return None
