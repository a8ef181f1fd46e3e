"""Runs stages in order over one run directory: skip what is committed and current, resume the rest.

A stage's fingerprint covers its own config section and its upstream stages' fingerprints, so a changed
key reruns that stage and everything after it, and nothing before it.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

from pipeline import tracking
from pipeline.config import PipelineConfig, check_stage_consistency
from pipeline.stage import StageContext, StageResult, StageSpec
from orchestration import mlflow_records
from orchestration.errors import PipelineError
from orchestration.input_checks import changed_manifests, check_inputs, check_outputs, read_manifest
from orchestration.run_lock import RunLock
from pipeline.output_records import record_outputs
from pipeline.storage import MANIFEST, Manifest, RunDir
from stages import folders as stage_folders, graph, names

log = logging.getLogger("vim.pipeline")


@dataclass
class StageOutcome:
    name: str
    status: str  # ran | skipped
    manifest: Manifest
    seconds: float


def select(from_stage: str | None, only: str | None, to_stage: str | None = None, tokens: str = "vq") -> list[str]:
    """The stages to run of the graph `tokens` picks (the config's `tokens`)."""
    stage_names = names(tokens)
    for name in (from_stage, only, to_stage):
        if name is not None and name not in stage_names:
            raise PipelineError(f"unknown stage '{name}' for tokens={tokens}; stages: {', '.join(stage_names)}")
    if only:
        return [only]
    start = stage_names.index(from_stage) if from_stage else 0
    stop = stage_names.index(to_stage) + 1 if to_stage else len(stage_names)
    if stop <= start:
        raise PipelineError(f"--to {to_stage} comes before --from {from_stage}")
    return list(stage_names[start:stop])


def preflight(cfg: PipelineConfig, from_stage: str | None = None, only: str | None = None,
              to_stage: str | None = None) -> None:
    """Each selected stage's cheap input checks, so bad paths fail before Ray starts."""
    selected = select(from_stage, only, to_stage, cfg.tokens)
    check_stage_consistency(cfg, selected)  # settings the selected stages share
    for spec in graph(cfg.tokens):
        if spec.name in selected:
            module = importlib.import_module(spec.entry.split(":")[0])
            if hasattr(module, "preflight"):
                module.preflight(cfg)


PIPELINE_CONFIG_FILE = "pipeline_config.json"


def stored_config(run_dir_location: str) -> dict | None:
    """The whole config of the last pipeline run on this run directory (None before the first)."""
    run_dir = RunDir(run_dir_location)
    return run_dir.read_json(PIPELINE_CONFIG_FILE) if run_dir.exists(PIPELINE_CONFIG_FILE) else None


def _section_hash(cfg: PipelineConfig, spec: StageSpec) -> tuple[dict, str]:
    section = getattr(cfg, spec.name)
    return section.output_affecting(), section.hash()


def _parent_run(run_dir: RunDir, cfg: PipelineConfig, uri: str,
                sweep_run_id: str | None = None) -> tracking.Tracker:
    experiment = cfg.run.experiment or tracking.experiment_name(run_dir.location)
    experiment_id = tracking.ensure_experiment(uri, experiment, run_dir.uri("_mlflow_artifacts")
                                               if not run_dir.is_local else
                                               "file://" + run_dir.path("_mlflow_artifacts"))
    key = tracking.PIPELINE_RUN_FILE
    if run_dir.exists(key):
        stored = run_dir.read_json(key)
        if stored.get("tracking_uri") == uri:
            reopened = tracking.reopen_run(uri, stored["run_id"])
            if reopened is not None:
                return reopened
    parent = tracking.start_run(uri, experiment_id, "pipeline", {
        "vim.kind": "pipeline", "vim.run_dir": run_dir.location, "vim.git_commit": tracking.git_commit(),
        "vim.config_hash": cfg.hash()}, parent_run_id=sweep_run_id)
    parent.log_params(cfg.model_dump(mode="json"))
    parent.log_inputs(mlflow_records.stage_inputs(graph(cfg.tokens)[0], cfg, run_dir, {}))  # the images it starts from
    run_dir.write_json({"tracking_uri": uri, "run_id": parent.run_id, "experiment_id": experiment_id}, key)
    return parent


def run_pipeline(cfg: PipelineConfig, run_dir_location: str, from_stage: str | None = None,
                 only: str | None = None, force: tuple[str, ...] = (),
                 to_stage: str | None = None, sweep_run_id: str | None = None,
                 verify: bool = False) -> list[StageOutcome]:
    """`sweep_run_id`: the MLflow run this pipeline run nests under (a sweep trial). Committed outputs a stage
    reads, or that are skipped, are checked against their manifests' sizes, and with `verify` checksums."""
    selected = select(from_stage, only, to_stage, cfg.tokens)
    for name in force:
        select(name, None, tokens=cfg.tokens)
    run_dir = RunDir(run_dir_location)
    uri = tracking.default_tracking_uri(run_dir.location)
    outcomes: list[StageOutcome] = []
    with RunLock(run_dir):
        parent = _parent_run(run_dir, cfg, uri, sweep_run_id)
        run_dir.write_json(cfg.model_dump(mode="json"), PIPELINE_CONFIG_FILE)  # what `jobs/run_stage.py` reuses
        status = "FAILED"
        try:
            manifests: dict[str, Manifest] = {}
            ran: set[str] = set()  # stages run in this pipeline run
            verified: set[str] = set()  # committed stages whose files were checked in this pipeline run
            for spec in graph(cfg.tokens):
                config, config_hash = _section_hash(cfg, spec)
                if spec.name not in selected:
                    existing = read_manifest(run_dir, spec)
                    if existing is not None:
                        manifests[spec.name] = existing
                    continue
                missing = [u for u in spec.upstream if u not in manifests]
                if missing:
                    raise PipelineError(f"stage '{spec.name}' needs committed {missing} in {run_dir.location}; "
                                        f"run them first (e.g. --from {missing[0]})")
                inputs = {u: manifests[u].fingerprint for u in spec.upstream}
                fingerprint = Manifest.fingerprint_of(spec.name, config_hash, inputs)
                existing = read_manifest(run_dir, spec)
                rerun_upstream = []
                if existing is not None and existing.fingerprint == fingerprint and spec.name not in force:
                    rerun_upstream = changed_manifests(spec, existing, manifests, ran)
                    if not rerun_upstream:
                        check_outputs(run_dir, spec, existing, verify, f"stage {spec.name} (skipped)")
                        verified.add(spec.name)
                        log.info("stage %s: committed and up to date, skipped", spec.name)
                        manifests[spec.name] = existing
                        outcomes.append(StageOutcome(spec.name, "skipped", existing, 0.0))
                        continue
                    log.info("stage %s: upstream %s rerun just now", spec.name, ", ".join(rerun_upstream))
                check_inputs(run_dir, spec, manifests, ran, verified, verify)
                if existing is not None or spec.name in force:  # stale, or forced (a partial attempt too)
                    log.info("stage %s: %s, rerunning", spec.name,
                             "forced" if spec.name in force else "config or inputs changed")
                    run_dir.delete(spec.folder, MANIFEST)
                    run_dir.delete(spec.folder)
                manifests[spec.name] = _run_stage(spec, cfg, run_dir, uri, parent, config, config_hash,
                                                  inputs, fingerprint, manifests)
                outcomes.append(StageOutcome(spec.name, "ran", manifests[spec.name],
                                             manifests[spec.name].wall_seconds))
                ran.add(spec.name)
            status = "FINISHED"
        finally:
            parent.finish(status)
    return outcomes


def _run_stage(spec: StageSpec, cfg: PipelineConfig, run_dir: RunDir, uri: str, parent: tracking.Tracker,
               config: dict, config_hash: str, inputs: dict[str, str], fingerprint: str,
               manifests: dict[str, Manifest]) -> Manifest:
    module_name, function_name = spec.entry.split(":")
    entry = getattr(importlib.import_module(module_name), function_name)
    experiment_id = parent.client.get_run(parent.run_id).info.experiment_id
    # A stage that was interrupted keeps logging into the same MLflow run when it resumes.
    child = tracking.find_unfinished_child(uri, experiment_id, parent.run_id, fingerprint)
    if child is None:
        child = tracking.start_run(uri, experiment_id, spec.name, {
            "vim.kind": "stage", "vim.stage": spec.name, "vim.fingerprint": fingerprint,
            "vim.git_commit": tracking.git_commit(), "vim.config_hash": config_hash}, parent_run_id=parent.run_id)
        child.log_params(config)
        child.log_inputs(mlflow_records.stage_inputs(spec, cfg, run_dir, manifests))
    ctx = StageContext(spec, cfg, run_dir, fingerprint, {u: manifests[u] for u in spec.upstream}, child,
                       folders=stage_folders())
    log.info("stage %s: running (fingerprint %s)", spec.name, fingerprint)
    started = time.perf_counter()
    try:
        result: StageResult = entry(cfg, ctx)
    except BaseException:
        child.finish("FAILED")
        raise
    seconds = time.perf_counter() - started
    child.log_metrics({**result.metrics, "stage_wall_seconds": seconds})
    manifest = Manifest(stage=spec.name, config=config, config_hash=config_hash, inputs=inputs,
                        fingerprint=fingerprint, outputs=result.outputs, counts=result.counts,
                        metrics=result.metrics, details=result.details, mlflow_run_id=child.run_id,
                        wall_seconds=seconds, files=record_outputs(run_dir, spec.folder),
                        input_manifests={u: manifests[u].sha256 for u in spec.upstream})
    manifest.write(run_dir, spec.folder)
    child.log_dict(json.loads(json.dumps(asdict(manifest), default=str)), "manifest.json")
    if spec.name in mlflow_records.model_stages(cfg.tokens):
        experiment = child.client.get_experiment(experiment_id).name
        mlflow_records.log_stage_model(spec, run_dir, manifest, manifests, child, experiment)
    child.finish("FINISHED")
    log.info("stage %s: committed in %.1fs", spec.name, seconds)
    return manifest


def connect_ray(cfg: PipelineConfig, tracking_uri: str) -> None:
    """Attach to the cluster (RAY_ADDRESS under `ray job submit`) or start a local one."""
    import ray

    from stages.training import worker_environment

    if ray.is_initialized():
        return
    ray.init(address=cfg.run.ray_address or os.environ.get("RAY_ADDRESS"),
             runtime_env={"env_vars": worker_environment(tracking_uri)}, log_to_driver=True)
    # Bars redraw in place on a terminal; in job logs they are noise. Stages log their own progress.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stdout.isatty()


def run_job(make_config: Callable[[], PipelineConfig], run_dir_location: str, from_stage: str | None = None,
            only: str | None = None, to_stage: str | None = None, force: tuple[str, ...] = (),
            verify: bool = False) -> int:
    """What the job scripts share: config, input checks, Ray, the stages, the summary. A user's mistake
    (config, paths, missing inputs) prints one line and exits 2, before Ray starts where it can."""
    from pipeline.config import ConfigError
    from pipeline.data.sources import SourceError
    from pipeline.models.losses import PerceptualWeightsMissing
    from pipeline.stage import StageInputError
    from orchestration.report import print_summary
    from pipeline.storage import check_run_dir

    try:
        check_run_dir(run_dir_location)  # a file or an unwritable folder: one line, before anything reads it
        cfg = make_config()
        preflight(cfg, from_stage, only, to_stage)
        connect_ray(cfg, tracking.default_tracking_uri(run_dir_location))
        outcomes = run_pipeline(cfg, run_dir_location, from_stage, only, force, to_stage, verify=verify)
    except (ConfigError, PipelineError, SourceError, PerceptualWeightsMissing, StageInputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_summary(outcomes, run_dir_location)
    return 0
