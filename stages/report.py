"""The end-of-run summary: one line per stage with its figures, and how to browse MLflow."""
from __future__ import annotations

from pipeline.storage import RunDir
from pipeline.tracking import default_tracking_uri


def _figures(metrics: dict[str, float], limit: int = 6) -> str:
    shown = [f"{k}={v:.4g}" for k, v in list(metrics.items())[:limit]]
    return ", ".join(shown)


def print_summary(outcomes, run_dir_location: str) -> None:
    run_dir = RunDir(run_dir_location)
    print("\nstage        status    seconds  figures")
    print("-" * 100)
    for outcome in outcomes:
        print(f"{outcome.name:<12} {outcome.status:<8} {outcome.seconds:8.1f}  {_figures(outcome.manifest.metrics)}")
    uri = default_tracking_uri(run_dir.location)
    print(f"\nrun directory: {run_dir.location}")
    print(f"browse results: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
