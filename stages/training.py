"""Ray Train glue shared by the training stages: the trainer, checkpoint reporting and restoring.

Run names are derived from the stage fingerprint, so re-submitting the same job resumes the same run
from its latest checkpoint, while a changed configuration starts a fresh one.
"""
from __future__ import annotations

import gc
import signal
import tempfile
import threading
from typing import Any, Callable

import ray
import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pipeline.config import TrainerResources
from pipeline.stage import StageContext
from pipeline.train.state import load_state, save_state

CHECKPOINTS = "checkpoints"
PLACEMENT_GROUP_TAG = "vim.placement_group"


def build_trainer(ctx: StageContext, loop: Callable[[dict], None], loop_config: dict[str, Any],
                  resources: TrainerResources, datasets: dict[str, Any],
                  split: tuple[str, ...] = ("train",)) -> TorchTrainer:
    run_name = f"{ctx.spec.name}-{ctx.fingerprint}"
    storage = ctx.run_dir.uri(ctx.folder, CHECKPOINTS)
    for stale in ctx.run_dir.list(ctx.folder, CHECKPOINTS):  # partial runs of other configurations
        if stale != run_name and not stale.startswith("."):
            ctx.run_dir.delete(ctx.folder, CHECKPOINTS, stale)
    per_worker: dict[str, float] = {"CPU": resources.cpus_per_worker}
    if resources.tpu_hosts:
        per_worker["TPU"] = resources.tpu_chips_per_host  # one worker per TPU host; torch_xla drives its chips
    return TorchTrainer(
        loop, train_loop_config=loop_config,
        torch_config=TorchConfig(backend="gloo" if not resources.use_gpu else "nccl"),
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=resources.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             worker_runtime_env={"env_vars": loop_config.get("env", {})}),
        datasets=datasets, dataset_config=DataConfig(datasets_to_split=list(split)))


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
    removes it (`stages/trial_progress.py`): Ray Train's own cleaner asks the dashboard's state API whether
    the controller lives, and a cluster without a dashboard would keep the CPUs reserved until the job ends."""
    group = ray.util.get_current_placement_group() if ray.is_initialized() else None
    if group is not None:
        tracker.set_tags({PLACEMENT_GROUP_TAG: group.id.hex()})


def restore_state() -> dict[str, Any] | None:
    """The latest checkpoint's state on this worker, or None on a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return load_state(folder)


def report(metrics: dict[str, float], state: dict[str, Any] | None) -> None:
    """Every rank calls this; rank 0 passes the state to checkpoint (others pass None)."""
    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_state(folder, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
