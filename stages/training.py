"""Ray Train glue shared by the training stages, written once: the trainer and its worker environment,
a worker's start (resume from the latest checkpoint, MLflow on rank 0), checkpoint reports, and the export
of the final model from the last checkpoint.

Run names are derived from the stage fingerprint, so re-submitting the same job resumes the same run
from its latest checkpoint, while a changed configuration starts a fresh one.
"""
from __future__ import annotations

import gc
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import ray
import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pipeline.config import TrainerResources
from pipeline.device import PROCESS_GROUP_BACKEND, Backend
from pipeline.stage import StageContext
from pipeline.tracking import Tracker
from pipeline.train.loop import TrainingLoop
from pipeline.train.state import TrainState, load_state, save_state

CHECKPOINTS = "checkpoints"
PLACEMENT_GROUP_TAG = "vim.placement_group"


# ---------------------------------------------------------------------------------------------
# The driver's side


def train_and_export(ctx: StageContext, loop: Callable[[dict], dict | None], loop_config: dict[str, Any],
                     resources: TrainerResources, datasets: dict[str, Any],
                     save_model: Callable[[dict[str, Any], str], None]) -> dict[str, float]:
    """Fit the stage's loop on Ray Train, write the model of its last checkpoint into the stage's folder
    with `save_model(state_dict, folder)`, and return the final metrics the loop returned on rank 0."""
    result = fit(build_trainer(ctx, loop, loop_config, resources, datasets))
    if result.checkpoint is None or not result.return_value:
        raise RuntimeError(f"the {ctx.spec.name} stage's training ended without a checkpoint or final metrics")
    with result.checkpoint.as_directory() as folder:
        model_state = load_state(folder)["model"]
    with tempfile.TemporaryDirectory() as temp:
        save_model(model_state, temp)
        for path in sorted(Path(temp).iterdir()):
            ctx.run_dir.write_bytes(path.read_bytes(), ctx.folder, path.name)
    return dict(result.return_value)


def worker_environment(tracking_uri: str) -> dict[str, str]:
    """What every Ray process of a job needs from the driver's environment (the auth mode must agree
    everywhere, or Ray Data tasks hang)."""
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    if os.environ.get("RAY_AUTH_MODE"):
        env["RAY_AUTH_MODE"] = os.environ["RAY_AUTH_MODE"]
    return env


def build_trainer(ctx: StageContext, loop: Callable[[dict], Any], loop_config: dict[str, Any],
                  resources: TrainerResources, datasets: dict[str, Any]) -> TorchTrainer:
    """The stage's trainer; its loop gets `loop_config` plus the MLflow run to log to."""
    loop_config = {**loop_config, "tracking_uri": ctx.tracker.tracking_uri, "mlflow_run_id": ctx.tracker.run_id}
    run_name = f"{ctx.spec.name}-{ctx.fingerprint}"
    storage = ctx.run_dir.uri(ctx.folder, CHECKPOINTS)
    for stale in ctx.run_dir.list(ctx.folder, CHECKPOINTS):  # partial runs of other configurations
        if stale != run_name and not stale.startswith("."):
            ctx.run_dir.delete(ctx.folder, CHECKPOINTS, stale)
    per_worker: dict[str, float] = {"CPU": resources.cpus_per_worker}
    env = worker_environment(ctx.tracker.tracking_uri)
    if resources.tpu_hosts:
        # One worker per TPU host: claiming all its chips leaves them unmasked (no TPU_VISIBLE_CHIPS), and the
        # worker's torch_xla SPMD process drives them all, in one mesh with the other hosts' chips.
        per_worker["TPU"] = resources.tpu_chips_per_host
        env["PJRT_DEVICE"] = "TPU"
    kind = "cuda" if resources.use_gpu else "xla" if resources.tpu_hosts else "cpu"
    return TorchTrainer(
        loop, train_loop_config=loop_config,
        torch_config=TorchConfig(backend=PROCESS_GROUP_BACKEND[kind]),
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=resources.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             worker_runtime_env={"env_vars": env}),
        datasets=datasets, dataset_config=DataConfig(datasets_to_split=["train"], execution_options=_in_order()))


def _in_order():
    """Ray Data's defaults for Train, with blocks delivered in order: each worker then gets the same rows in
    the same order on every run, so a resumed epoch skips exactly the batches it had used and validation
    subsets do not depend on task timing."""
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def fit(trainer: TorchTrainer) -> ray.train.Result:
    """`trainer.fit()`, then let go of the finished run's controller.

    Ray Train 2.60 registers a SIGINT handler whose closure holds the controller's handle, so the
    controller (and the Ray Data split coordinator it owns, with a read task still holding a CPU) lives
    on until another trainer replaces the handler. The next stage of a pipeline would starve on a small
    machine; restoring the previous handler frees the handle and Ray reclaims those actors."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        return trainer.fit()
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
            gc.collect()


def tag_placement_group(tracker) -> None:
    """Rank 0 names its worker group's placement group on the stage run. A sweep that stops the trial
    removes it (`orchestration/trial_progress.py`): Ray Train's own cleaner asks the dashboard's state API whether
    the controller lives, and a cluster without a dashboard would keep the CPUs reserved until the job ends."""
    group = ray.util.get_current_placement_group() if ray.is_initialized() else None
    if group is not None:
        tracker.set_tags({PLACEMENT_GROUP_TAG: group.id.hex()})


# ---------------------------------------------------------------------------------------------
# A worker's side


def start_worker(name: str, loop_config: dict[str, Any], state: TrainState, total_steps: int,
                 backend: Backend) -> TrainingLoop:
    """Restore `state` from the latest checkpoint if there is one, open MLflow on rank 0, and return the
    loop's bookkeeping with checkpoints going to Ray Train."""
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:  # every rank: a sharded model keeps its slice of the full state
            state.load_state_dict(load_state(folder), rank)
        print(f"[{name} rank {rank}] resumed at step {state.step} (epoch {state.epoch}, "
              f"batch {state.batch_in_epoch})", flush=True)
    tracker = Tracker(loop_config["tracking_uri"], loop_config["mlflow_run_id"]) if rank == 0 else None
    if tracker is not None:
        tag_placement_group(tracker)
        if checkpoint is not None:
            tracker.log_metrics({"resumed_from_step": state.step}, step=state.step)
    return TrainingLoop(name, state, total_steps, rank=rank, world=world, backend=backend,
                        save_checkpoint=report, tracker=tracker)


def image_epochs(shard, batch_size: int, seed: int, rank: int) -> Callable[[int], Any]:
    """epoch -> the worker's uint8 image batches of that epoch, shuffled locally by seed, epoch and rank (so a
    resumed epoch replays the same order): what the image-training stages walk with `TrainingLoop.batches`."""
    import torch

    def epoch_batches(epoch: int):
        return shard.iter_torch_batches(batch_size=batch_size, dtypes={"image": torch.uint8}, drop_last=True,
                                        local_shuffle_buffer_size=batch_size * 8,
                                        local_shuffle_seed=seed * 100_003 + epoch * 101 + rank)
    return epoch_batches


def report(metrics: dict[str, float], state: dict[str, Any] | None) -> None:
    """Every rank calls this; rank 0 passes the state to checkpoint (others pass None)."""
    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_state(folder, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
