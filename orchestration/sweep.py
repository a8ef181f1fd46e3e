"""Ray Tune sweeps over config keys, each trial a pipeline run from the first swept stage to `last_stage`.

Layout under the sweep directory (local):
    base/                 the stages before the first swept one, run once and shared by every trial
    trials/<name>/        one run directory per trial; the shared stages are symlinked in from base/
    tune/                 Ray Tune's experiment state (`Tuner.restore` resumes a killed sweep)
    comparison.csv/.md    one row per trial: swept values and figures; plus one plot per swept key
    mlflow.db             one MLflow experiment: the sweep run, each trial's pipeline run under it

Trial names come from their swept values, so a restored or re-submitted sweep finds each trial's committed
stages and skips them. With `scheduler="asha"` a trial reports its training stage's validation metric
as it goes (`orchestration/trial_progress.py`) and ASHA stops the trials that fall behind at each rung.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from pipeline import tracking
from pipeline.config import ConfigError, PipelineConfig, build_config, stable_hash
from stages import STAGE_NAMES, graph, names
from orchestration.errors import PipelineError
from orchestration.runner import run_pipeline
from orchestration.trial_progress import StageMetricWatcher, interim_metric, release_stopped_trial, run_while_watching

SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform")
SCHEDULERS = ("fifo", "asha")


class TrialFollowUp(Protocol):
    """Work each trial does after its pipeline, in the trial's own process (a reconstruction-only evaluation of
    the trained tokenizer, say). Its figures join the trial's result and the comparison as `<name>.<figure>`;
    it holds at most what the stage section `section` sizes (an actor pool plus a task), counted in the
    trial's resources like a stage."""

    name: str
    section: str
    columns: tuple[str, ...]  # its figures the comparison table shows, without the prefix

    def __call__(self, trial_dir: Path, cfg: PipelineConfig) -> dict[str, float]: ...


@dataclass
class SweepSpec:
    base: dict[str, Any]                              # the config as loaded from YAML (+ --set)
    space: dict[str, tuple[str, list[Any]]]           # dotted key -> (kind, values or bounds)
    last_stage: str = "evaluate"
    metric: str | None = None                         # "<stage>.<metric>", e.g. tokenizer.val_psnr
    mode: str = "max"
    num_samples: int = 1
    max_concurrent: int | None = None
    extra_overrides: list[str] = field(default_factory=list)
    scheduler: str = "fifo"                           # "asha": early stopping on `metric` by training step
    grace_period: int | None = None                   # ASHA: steps before a first cut (default: a quarter)
    reduction_factor: float = 2.0                     # ASHA: keep the best 1/rf of trials at each rung
    poll_seconds: float = 5.0                         # ASHA: how often a trial reads its metric from MLflow
    # More overrides for the trials whose swept key holds a value: key -> str(value) -> ["section.key=value"],
    # for settings that must move with a swept one (each architecture's own steps at equal training time).
    value_overrides: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    follow_up: TrialFollowUp | None = None            # run by each trial after its pipeline
    columns: tuple[str, ...] = ()                     # "<stage>.<metric>" figures comparison.md and the plots show

    @property
    def first_stage(self) -> str:
        return min((key.split(".")[0] for key in self.space), key=STAGE_NAMES.index)

    @property
    def first_stage_index(self) -> int:
        return STAGE_NAMES.index(self.first_stage)


def parse_search(kind: str, text: str) -> tuple[str, tuple[str, list[Any]]]:
    """`tokenizer.codebook_dim=4,8,16` -> ("tokenizer.codebook_dim", ("grid", [4, 8, 16]))."""
    if "=" not in text:
        raise ConfigError(f"--{kind} {text!r}: expected SECTION.KEY=V1,V2,...")
    key, values = text.split("=", 1)
    parsed = [_scalar(v) for v in values.split(",")]
    if kind in ("uniform", "loguniform") and (len(parsed) != 2 or not all(isinstance(v, (int, float)) for v in parsed)):
        raise ConfigError(f"--{kind} {key}: needs two numbers LOW,HIGH")
    return key.strip(), (kind, parsed)


def _scalar(text: str) -> Any:
    """YAML's reading of one value, except that `1e-9` is the number YAML 1.1 would leave as a string."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def validate(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every grid point (and each random key's bounds) builds a valid config, before any work starts.
    Returns the grid points."""
    graph_names = names(build_config(spec.base, spec.extra_overrides).tokens)
    for key in spec.space:
        section = key.split(".")[0]
        if section not in graph_names:
            raise ConfigError(f"swept key '{key}': only sections of the config's stages can be swept "
                              f"({', '.join(graph_names)})")
    if spec.last_stage not in graph_names:
        raise ConfigError(f"--last-stage {spec.last_stage} is not a stage of this config ({', '.join(graph_names)})")
    if STAGE_NAMES.index(spec.first_stage) > STAGE_NAMES.index(spec.last_stage):
        raise PipelineError(f"the swept stage {spec.first_stage} comes after --last-stage {spec.last_stage}")
    reached = STAGE_NAMES[:STAGE_NAMES.index(spec.last_stage) + 1]
    if spec.metric is not None and spec.metric.split(".")[0] not in reached:
        raise ConfigError(f"--metric {spec.metric}: use <stage>.<metric> of a stage up to {spec.last_stage}")
    for column in spec.columns:
        if "." not in column or column.split(".")[0] not in reached:
            raise ConfigError(f"--column {column}: use <stage>.<metric> of a stage up to {spec.last_stage}")
    grid_keys = [k for k, (kind, _) in spec.space.items() if kind == "grid"]
    points = [dict(zip(grid_keys, combo)) for combo in itertools.product(*(spec.space[k][1] for k in grid_keys))]
    random_ends = [{k: v for k, (kind, values) in spec.space.items() if kind != "grid" for v in [values[i]]}
                   for i in (0, -1)]
    for point in points:
        for ends in random_ends:
            trial_config({**point, **ends}, spec)
    if spec.scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler {spec.scheduler}: one of {', '.join(SCHEDULERS)}")
    if spec.scheduler == "asha":
        stage, _ = interim_metric(spec.metric)
        if not spec.first_stage_index <= STAGE_NAMES.index(stage) <= STAGE_NAMES.index(spec.last_stage):
            raise ConfigError(f"--metric {spec.metric}: ASHA needs a stage the trials run "
                              f"({spec.first_stage} to {spec.last_stage})")
        max_t = asha_max_steps(spec, points)
        if spec.grace_period is not None and not 0 < spec.grace_period <= max_t:
            raise ConfigError(f"--grace-period {spec.grace_period}: between 1 and the {stage} steps ({max_t})")
        if spec.reduction_factor <= 1:
            raise ConfigError(f"--reduction-factor {spec.reduction_factor}: must be above 1")
    return points


def _resource_points(spec: SweepSpec, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every grid point with each random key at each of its choices or both ends of its range (where a swept
    resource peaks)."""
    keys = [k for k, (kind, _) in spec.space.items() if kind != "grid"]
    options = [spec.space[k][1] if spec.space[k][0] == "choice" else [spec.space[k][1][0], spec.space[k][1][-1]]
               for k in keys]
    return [{**point, **dict(zip(keys, combo))} for point in points or [{}] for combo in itertools.product(*options)]


def asha_max_steps(spec: SweepSpec, points: list[dict[str, Any]]) -> int:
    """The most steps any trial's ASHA stage trains for: ASHA's max_t."""
    stage, _ = interim_metric(spec.metric)
    return max(getattr(trial_config(point, spec), stage).steps for point in points or [{}])


def trial_config(values: dict[str, Any], spec: SweepSpec) -> PipelineConfig:
    linked = [text for key, value in values.items() for text in spec.value_overrides.get(key, {}).get(str(value), [])]
    # JSON is YAML: overrides read back exactly these values.
    return build_config(spec.base, spec.extra_overrides + linked + [f"{k}={json.dumps(v)}" for k, v in values.items()])


def trial_name(values: dict[str, Any]) -> str:
    readable = "_".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(values.items()))
    safe = "".join(c if c.isalnum() or c in "=._-" else "-" for c in readable)[:80]
    return f"{safe}_{stable_hash(values)[:6]}"


def link_shared_stages(base_dir: Path, trial_dir: Path, first_stage: str, tokens: str = "vq") -> None:
    """The trial's run directory sees the base's committed upstream stages as its own (symlinks)."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    for spec in graph(tokens):
        if spec.name == first_stage:
            break
        target, link = base_dir / spec.folder, trial_dir / spec.folder
        if target.exists() and not link.exists():
            link.symlink_to(target, target_is_directory=True)


def _stage_metrics(outcomes) -> dict[str, float]:
    figures = {}
    for outcome in outcomes:
        for key, value in (outcome.manifest.metrics or {}).items():
            if isinstance(value, (int, float)):
                figures[f"{outcome.name}.{key}"] = float(value)
    return figures


def _trainable(config: dict[str, Any]) -> None:
    """One trial: the pipeline from the first swept stage to the last, in its own run directory."""
    from ray import tune

    spec: SweepSpec = config["__spec"]
    values = {k: v for k, v in config.items() if not k.startswith("__")}
    root = Path(config["__root"])
    os.environ["MLFLOW_TRACKING_URI"] = config["__tracking_uri"]
    trial_dir = root / "trials" / trial_name(values)
    cfg = trial_config(values, spec)
    link_shared_stages(root / "base", trial_dir, spec.first_stage, cfg.tokens)

    def pipeline():
        return run_pipeline(cfg, str(trial_dir), to_stage=spec.last_stage, sweep_run_id=config["__sweep_run_id"])

    if spec.scheduler != "asha":
        figures = {**_stage_metrics(pipeline()), **_follow_up_figures(spec, trial_dir, cfg)}
        tune.report({**figures, "trial_dir": str(trial_dir), "completed": True})
        return
    stage, logged_name = interim_metric(spec.metric)
    outcomes = run_while_watching(
        pipeline, StageMetricWatcher(trial_dir, stage, logged_name), spec.poll_seconds,
        lambda step, value: tune.report({spec.metric: value, "step": step, "trial_dir": str(trial_dir)}))
    figures = {**_stage_metrics(outcomes), **_follow_up_figures(spec, trial_dir, cfg)}
    tune.report({**figures, "step": int(figures.get(f"{stage}.steps", 0)), "trial_dir": str(trial_dir),
                 "completed": True})


def _follow_up_figures(spec: SweepSpec, trial_dir: Path, cfg: PipelineConfig) -> dict[str, float]:
    if spec.follow_up is None:
        return {}
    figures = spec.follow_up(trial_dir, cfg)
    return {f"{spec.follow_up.name}.{key}": float(value) for key, value in figures.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def _search_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    return {key: make[kind](values) for key, (kind, values) in spec.space.items()}


# The trial's own process only waits on its stages, which request their resources themselves; Tune refuses
# an empty request, so it holds a token CPU, which counts like any other.
TRIAL_PROCESS_CPUS = 0.01
TRIAL_RETRIES = 1  # a failed trial runs once more, from its committed stages


def stage_resources(section) -> dict[str, float]:
    """What one stage holds at once while it runs, so that none of its tasks can wait on a CPU that is not
    there: Ray Train workers plus one Ray Data task feeding them (`resources.read_cpus`), or an actor pool plus
    one task beside it (`cpus_per_task`). Ray Data reads default to a whole CPU; a stage that asks for more
    than is left beside what is reserved waits forever (a sweep on 2 cores: 0.01 + 2 x 0.5 held, 1 wanted)."""
    if hasattr(section, "resources"):
        res = section.resources
        need = {"CPU": res.num_workers * res.cpus_per_worker + res.read_cpus,
                "GPU": float(res.num_workers) if res.use_gpu else 0.0,
                "TPU": float(res.num_workers * res.tpu_chips_per_host) if res.tpu_hosts else 0.0}
    elif hasattr(section, "cpus_per_actor"):
        need = {"CPU": section.actors * section.cpus_per_actor + section.cpus_per_task,
                "GPU": section.actors * section.gpus_per_actor}
    else:
        need = {"CPU": getattr(section, "cpus_per_task", 1.0)}
    return {key: value for key, value in need.items() if value > 0}


def _stage_formula(name: str, section) -> str:
    if hasattr(section, "resources"):
        res = section.resources
        return (f"{name}: {res.num_workers} workers x {res.cpus_per_worker:g} CPU + {res.read_cpus:g} per read task "
                f"(resources.read_cpus)" + (f", {res.num_workers} GPU" if res.use_gpu else ""))
    if hasattr(section, "cpus_per_actor"):
        return (f"{name}: {section.actors} actor(s) x {section.cpus_per_actor:g} CPU + {section.cpus_per_task:g} "
                f"per task" + (f", {section.actors * section.gpus_per_actor:g} GPU" if section.gpus_per_actor else ""))
    return f"{name}: {getattr(section, 'cpus_per_task', 1.0):g} CPU per task"


def trial_resources(configs: list[PipelineConfig], first_stage: str, last_stage: str,
                    follow_up: TrialFollowUp | None = None) -> tuple[dict[str, float], list[str]]:
    """What one trial holds at its busiest, over every trial's config: per resource, the most any of its stages
    (or its follow-up, sized by its section) holds (they run one after another), plus the trial's own token CPU.
    Also each stage's arithmetic."""
    need: dict[str, float] = {}
    formulas: dict[str, tuple[float, str]] = {}
    span = STAGE_NAMES[STAGE_NAMES.index(first_stage):STAGE_NAMES.index(last_stage) + 1]
    for cfg in configs:
        parts = [(name, name) for name in span if name in names(cfg.tokens)]
        if follow_up is not None:
            parts.append((follow_up.name, follow_up.section))
        for name, section_name in parts:
            section = getattr(cfg, section_name)
            stage = stage_resources(section)
            for key, value in stage.items():
                need[key] = max(need.get(key, 0.0), value)
            if stage.get("CPU", 0.0) >= formulas.get(name, (-1.0, ""))[0]:
                formulas[name] = (stage.get("CPU", 0.0), _stage_formula(name, section))
    need["CPU"] = round(need.get("CPU", 0.0) + TRIAL_PROCESS_CPUS, 6)
    return need, [formula for _, formula in formulas.values()] + [f"the trial's process: {TRIAL_PROCESS_CPUS:g} CPU"]


def cluster_capacity() -> tuple[dict[str, float], dict[str, float]]:
    """(what the cluster has now, the most it can have): an autoscaling cluster's configured maximum where
    Ray knows it (as Ray Train checks its worker group), else what it has now."""
    import ray

    now = {key: float(value) for key, value in ray.cluster_resources().items()}
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # private API: without it, what is there now is all we know
        most = {}
    return now, {key: max(now.get(key, 0.0), float(most.get(key, 0.0))) for key in {*now, *most}}


def plan_concurrency(need: dict[str, float], formulas: list[str], now: dict[str, float], most: dict[str, float],
                     max_concurrent: int | None) -> int:
    """How many trials run at once so that every stage of each can always be scheduled: the cluster's
    resources over one trial's need (`max_concurrent` if given). Refuses, naming what is missing, when even
    one trial (or the `max_concurrent` asked for) cannot fit."""
    def shortfall(trials: int) -> list[str]:
        return [f"{key} {trials * value:g} (the cluster has {most.get(key, 0.0):g})"
                for key, value in sorted(need.items()) if trials * value > most.get(key, 0.0) + 1e-9]

    breakdown = "; ".join(formulas)
    missing = shortfall(1)
    if missing:
        raise PipelineError(
            f"one trial needs {', '.join(missing)} at once, so its stages could never all be scheduled and the "
            f"sweep would hang: {breakdown}. Lower those settings (--set ...) or use a larger cluster")
    if max_concurrent is not None:
        if max_concurrent < 1:
            raise ConfigError(f"--max-concurrent {max_concurrent}: at least 1")
        missing = shortfall(max_concurrent)
        if missing:
            raise PipelineError(f"--max-concurrent {max_concurrent}: that many trials need {', '.join(missing)} "
                                f"at once ({breakdown} per trial); lower --max-concurrent")
        return max_concurrent
    return max(1, min(int(now.get(key, 0.0) / value + 1e-9) for key, value in need.items()))


def sweep_tracking_uri(sweep_dir: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(sweep_dir).resolve() / 'mlflow.db'}"


def sweep_experiment(root: Path) -> str:
    """One MLflow experiment per sweep folder: the sweep run and every trial's pipeline run under it."""
    return tracking.experiment_name(str(root), "vim sweep")


def run_sweep(spec: SweepSpec, sweep_dir: str, name: str = "sweep") -> dict[str, Any]:
    from ray import tune

    root = Path(sweep_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    points = validate(spec)
    tracking_uri = sweep_tracking_uri(sweep_dir)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    spec.base = {**spec.base, "run": {**spec.base.get("run", {}), "experiment": sweep_experiment(root)}}
    base_cfg = build_config(spec.base, spec.extra_overrides)

    # Every trial must fit the cluster with all of its stages, before any work (shared stages included).
    need, formulas = trial_resources([trial_config(point, spec) for point in _resource_points(spec, points)],
                                     spec.first_stage, spec.last_stage, spec.follow_up)
    concurrency = plan_concurrency(need, formulas, *cluster_capacity(), spec.max_concurrent)

    # Shared upstream stages, once.
    stage_names = names(base_cfg.tokens)
    first = stage_names.index(spec.first_stage)
    if first > 0:
        run_pipeline(base_cfg, str(root / "base"), to_stage=stage_names[first - 1])

    sweep_run = _sweep_run(root, tracking_uri, spec)
    param_space = {**_search_space(spec), "__spec": spec, "__root": str(root), "__tracking_uri": tracking_uri,
                   "__sweep_run_id": sweep_run.run_id}
    trainable = tune.with_resources(_trainable, {"cpu": TRIAL_PROCESS_CPUS})
    scheduler = None
    if spec.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        max_t = asha_max_steps(spec, points)
        # stop_last_trials=False: a trial that reaches max_t still runs its later stages.
        scheduler = ASHAScheduler(time_attr="step", max_t=max_t, grace_period=spec.grace_period or max(1, max_t // 4),
                                  reduction_factor=spec.reduction_factor, stop_last_trials=False)
    storage = str(root / "tune")
    if tune.Tuner.can_restore(os.path.join(storage, name)):
        tuner = tune.Tuner.restore(os.path.join(storage, name), trainable, resume_errored=True,
                                   param_space=param_space)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune.TuneConfig(
            num_samples=spec.num_samples, max_concurrent_trials=concurrency, scheduler=scheduler,
            metric=spec.metric, mode=spec.mode if spec.metric else None),
            # One retry per trial: Ray Data has failed a trial's evaluation once in a long sweep on a transient
            # scheduling error (ActorUnschedulableError from its actor-location lookup); the retry skips the
            # trial's committed stages and resumes the rest.
            run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=[_stopped_trial_callback()],
                                      failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES)))
    results = tuner.fit()
    rows = _comparison_rows(results, spec)
    for row in rows:  # also after a restore (no callback then); releasing twice is harmless
        if row["status"] != "completed" and row["trial_dir"]:
            release_stopped_trial(Path(row["trial_dir"]))
    status = "FINISHED" if not results.errors else "FAILED"
    _write_comparison(root, rows, spec, sweep_run)
    sweep_run.log_metrics({"trials": float(len(rows)), "errored_trials": float(len(results.errors))})
    sweep_run.finish(status)
    if results.errors:
        raise PipelineError(f"{len(results.errors)} trial(s) failed: {results.errors[0]}")
    return {"rows": rows, "concurrency": concurrency, "trial_resources": need, "sweep_run_id": sweep_run.run_id,
            "experiment_id": sweep_run.client.get_run(sweep_run.run_id).info.experiment_id, "root": str(root)}


def _release_after_exit(actor, trial_dir: Path, deadline_s: float = 120.0) -> None:
    """Waits for the stopped trial's process to end (Tune calls its callbacks before it ends it), so that
    no worker of the trial re-reserves what is released, then releases its placement group and runs."""
    import ray

    end = time.time() + deadline_s
    while actor is not None and time.time() < end:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=2)
        except ray.exceptions.RayActorError:
            break
        except ray.exceptions.GetTimeoutError:
            pass
        time.sleep(1)
    release_stopped_trial(trial_dir)


def _stopped_trial_callback():
    from ray import tune

    class ReleaseStoppedTrials(tune.Callback):
        """Once ASHA has ended a trial: free its training placement group, so the next trial can start."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            if result.get("trial_dir") and not result.get("completed"):
                threading.Thread(target=_release_after_exit, daemon=True, name="release-stopped-trial",
                                 args=(trial.temporary_state.ray_actor, Path(result["trial_dir"]))).start()

    return ReleaseStoppedTrials()


def _sweep_run(root: Path, tracking_uri: str, spec: SweepSpec) -> tracking.Tracker:
    key = root / "sweep_run.json"
    experiment_id = tracking.ensure_experiment(tracking_uri, sweep_experiment(root), f"file://{root / '_mlflow_artifacts'}")
    if key.exists():
        reopened = tracking.reopen_run(tracking_uri, yaml.safe_load(key.read_text())["run_id"])
        if reopened is not None:
            return reopened
    run = tracking.start_run(tracking_uri, experiment_id, "sweep", {
        "vim.kind": "sweep", "vim.git_commit": tracking.git_commit(), "vim.last_stage": spec.last_stage,
        "vim.swept": ",".join(spec.space)})
    run.log_params({f"sweep.{k}": f"{kind}:{values}" for k, (kind, values) in spec.space.items()})
    key.write_text(yaml.safe_dump({"run_id": run.run_id}))
    return run


def _comparison_rows(results, spec: SweepSpec) -> list[dict[str, Any]]:
    rows = []
    prefixes = set(STAGE_NAMES) | ({spec.follow_up.name} if spec.follow_up is not None else set())
    for result in results:
        if result.metrics is None or result.error:
            continue
        row = {key: result.config[key] for key in spec.space}
        row.update({k: v for k, v in result.metrics.items() if "." in k and k.split(".")[0] in prefixes})
        row["status"] = "completed" if result.metrics.get("completed") else f"stopped at step {result.metrics.get('step')}"
        row["trial_dir"] = result.metrics.get("trial_dir")
        rows.append(row)
    keys = list(spec.space)
    return sorted(rows, key=lambda r: tuple(str(r[k]) for k in keys))


def _figure_columns(rows: list[dict[str, Any]], spec: SweepSpec) -> list[str]:
    preferred = ([spec.metric] if spec.metric else []) + list(spec.columns)
    if spec.follow_up is not None:
        preferred += [f"{spec.follow_up.name}.{column}" for column in spec.follow_up.columns]
    preferred += ["tokenizer.val_usage_per_256", "tokenizer.val_psnr", "evaluate.rfid_domain",
                  "evaluate.rfid_inception", "evaluate.fid_domain", "evaluate.probe_top1_best",
                  "transformer.val_bits_per_token"]
    present = set().union(*(row.keys() for row in rows)) if rows else set()
    return list(dict.fromkeys(c for c in preferred if c and c in present))


def _write_comparison(root: Path, rows: list[dict[str, Any]], spec: SweepSpec, sweep_run: tracking.Tracker) -> None:
    keys, figures = list(spec.space), _figure_columns(rows, spec)
    all_columns = keys + sorted({c for row in rows for c in row if c not in keys and c != "trial_dir"}) + ["trial_dir"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=all_columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    markdown = ["| " + " | ".join(keys + figures + ["status"]) + " |", "|" + "---|" * (len(keys) + len(figures) + 1)]
    for row in rows:
        cells = [str(row[k]) for k in keys] + [f"{row[c]:.4g}" if c in row else "" for c in figures]
        markdown.append("| " + " | ".join(cells + [row["status"]]) + " |")
    outputs = {"comparison.csv": buffer.getvalue().encode(), "comparison.md": ("\n".join(markdown) + "\n").encode()}
    completed = [row for row in rows if row["status"] == "completed"]  # a stopped trial's figure is mid-training
    for key in keys:
        if figures and completed:
            outputs[f"plot_{key.replace('.', '_')}.png"] = _plot(completed, key, figures)
    for file_name, data in outputs.items():
        (root / file_name).write_bytes(data)
        sweep_run.log_artifact_bytes(data, file_name)


def _plot(rows: list[dict[str, Any]], key: str, figures: list[str]) -> bytes:
    """Each figure against the swept value (the paper's Table 4 view: usage and rFID vs lookup dim)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(figures), figsize=(3.6 * len(figures), 3), dpi=110, squeeze=False)
    labels = [str(row[key]) for row in rows]
    numeric = all(isinstance(row[key], (int, float)) and not isinstance(row[key], bool) for row in rows)
    for axis, column in zip(axes[0], figures):
        points = [(row[key], row[column]) for row in rows if column in row]
        if numeric:
            points.sort()
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o")
            if len({p[0] for p in points}) > 2 and min(p[0] for p in points) > 0:
                axis.set_xscale("log", base=2)
        else:
            axis.bar(labels, [row.get(column, float("nan")) for row in rows])
        axis.set_xlabel(key)
        axis.set_title(column, fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
