"""The end-of-run summary: one line per stage with its figures, and how to browse MLflow."""
from __future__ import annotations

from pipeline.storage import RunDir
from pipeline.tracking import PIPELINE_RUN_FILE, default_tracking_uri, runs_page


# The figures worth a glance per stage; the manifest and MLflow hold the rest.
HEADLINE = {
    "ingest": ("images_total", "skipped_total", "images_per_second"),
    "tokenizer": ("val_psnr", "val_l2", "val_usage_per_256", "val_perplexity", "val_dead_codes",
                  "train_images_per_second_overall"),
    "pretokenize": ("train_rows", "val_rows", "train_usage_split", "train_perplexity", "images_per_second"),
    "transformer": ("val_loss_nats", "val_bits_per_token", "train_tokens_per_second_overall", "parameters"),
    "evaluate": ("rfid_inception", "recon_psnr", "fid_inception", "fid_domain", "is_domain", "probe_top1_best",
                 "probe_top1_pixels"),
}


def _figures(stage: str, metrics: dict[str, float]) -> str:
    names = HEADLINE.get(stage) or tuple(metrics)[:6]
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in names if k in metrics)


def print_summary(outcomes, run_dir_location: str) -> None:
    run_dir = RunDir(run_dir_location)
    print("\nstage        status    seconds  figures")
    print("-" * 100)
    for outcome in outcomes:
        print(f"{outcome.name:<12} {outcome.status:<8} {outcome.seconds:8.1f}  {_figures(outcome.name, outcome.manifest.metrics)}")
    uri = default_tracking_uri(run_dir.location)
    print(f"\nrun directory: {run_dir.location}")
    print(f"browse results: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    if run_dir.exists(PIPELINE_RUN_FILE):
        print(f"then open {runs_page(run_dir.read_json(PIPELINE_RUN_FILE)['experiment_id'])}")
