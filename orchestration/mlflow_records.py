"""What a stage run records in MLflow beside its metrics: the data it read (MLflow's dataset inputs, digests
from the upstream manifests) and, for the tokenizer and the Transformer, the trained model as a registered
pyfunc (`pipeline/mlflow_models.py`)."""
from __future__ import annotations

import logging

from pipeline import tracking
from pipeline.config import PipelineConfig
from pipeline.models.io import SETTINGS_FILE, WEIGHTS_FILE
from pipeline.stage import StageSpec
from pipeline.storage import Manifest, RunDir
from stages import spec as stage_spec

log = logging.getLogger("vim.pipeline")

# How a stage uses each upstream output, as MLflow's dataset context.
INPUT_CONTEXT = {"ingest": "images", "tokenizer": "tokenizer", "pretokenize": "codes", "transformer": "transformer",
                 "ssl": "ssl encoder", "kmeans": "centroids", "render": "second-stage transformer"}
MODEL_STAGES = ("tokenizer", "transformer")


def model_stages(tokens: str) -> tuple[str, ...]:
    """Stages whose model is registered as a pyfunc that samples images. Under ssl_kmeans the Transformer
    samples SSL tokens, which only the render stage's model turns into pixel codes, so it is left out."""
    return MODEL_STAGES if tokens == "vq" else ("tokenizer",)


def _source_type(location: str) -> str:
    return location.split("://", 1)[0] if "://" in location else "local"


def stage_inputs(spec: StageSpec, cfg: PipelineConfig, run_dir: RunDir,
                 manifests: dict[str, Manifest]) -> list[dict[str, str]]:
    """The datasets a stage reads: each upstream stage's committed folder, its digest the sha256 of that
    stage's manifest (which lists every file's checksum); ingest reads the configured source."""
    if not spec.upstream:
        root = cfg.ingest.resolved_root()
        return [{"name": cfg.ingest.source, "digest": cfg.ingest.hash(), "source": root,
                 "source_type": _source_type(root), "context": "source images"}]
    datasets = []
    for upstream in spec.upstream:
        folder = stage_spec(upstream).folder
        datasets.append({"name": folder, "digest": manifests[upstream].sha256 or manifests[upstream].fingerprint,
                         "source": run_dir.uri(folder), "source_type": _source_type(run_dir.location),
                         "context": INPUT_CONTEXT[upstream]})
    return datasets


def _model_files(run_dir: RunDir, folder: str) -> dict[str, bytes]:
    return {name: run_dir.read_bytes(folder, name) for name in (WEIGHTS_FILE, SETTINGS_FILE)}


def log_stage_model(spec: StageSpec, run_dir: RunDir, manifest: Manifest, manifests: dict[str, Manifest],
                    child: tracking.Tracker, experiment: str) -> str | None:
    """Log and register the stage's model; a registry failure is logged, not raised (the stage's files are
    committed by then, and its model stays loadable from them). Returns the registered name."""
    from pipeline.mlflow_models import log_stage_model as log_pyfunc

    folders = {spec.name: _model_files(run_dir, spec.folder)}
    if spec.name == "transformer":  # sampling to images needs the run's tokenizer
        folders["tokenizer"] = _model_files(run_dir, stage_spec("tokenizer").folder)
    tags = {"vim.fingerprint": manifest.fingerprint, "vim.manifest_sha256": manifest.sha256 or "",
            "vim.run_dir": run_dir.location, "vim.stage_run_id": child.run_id}
    if "tokenizer" in manifests and spec.name == "transformer":
        tags["vim.tokenizer_fingerprint"] = manifests["tokenizer"].fingerprint
    try:
        name = log_pyfunc(child.tracking_uri, child.run_id, spec.name, folders, experiment, tags)
    except Exception as error:  # noqa: BLE001 - see the docstring
        log.warning("stage %s: the model was not logged to MLflow (%s: %s)", spec.name, type(error).__name__, error)
        return None
    log.info("stage %s: model registered in MLflow as %s", spec.name, name)
    return name
