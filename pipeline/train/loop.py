"""The step bookkeeping every training loop shares, free of Ray: walking the data by epochs from a
`TrainState`'s position, the logging window with rate and ETA, and when to log, checkpoint and stop.

A loop reads top to bottom:

    for batch in run.batches(epoch_batches):   # resumes mid-epoch; every rank ends an epoch together
        ...one optimizer step...
        run.step_done(items)                     # step + 1, counted in the throughput window
        if run.log_due(cfg.log_every):
            rate, wait = run.window()
            run.log({...}, "loss ...")
        run.checkpoint_if_due(cfg.checkpoint_every)

Where checkpoints go is the caller's: `save_checkpoint(metrics, state)` is called on every rank, with the
state on rank 0 and None elsewhere (Ray Train's `report` in the stages, a folder in the tests).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist

from pipeline.device import Backend
from pipeline.train.state import TrainState, all_rng_states

Batch = TypeVar("Batch")
CheckpointSink = Callable[[dict[str, float], "dict[str, Any] | None"], None]


class TrainingLoop:
    def __init__(self, name: str, state: TrainState, total_steps: int, *, rank: int, world: int,
                 backend: Backend, save_checkpoint: CheckpointSink, tracker=None):
        self.name, self.state, self.total_steps = name, state, total_steps
        self.rank, self.world, self.backend = rank, world, backend
        self.save_checkpoint, self.tracker = save_checkpoint, tracker
        self.started = time.perf_counter()
        self._seconds_per_step = 0.0  # the last window's pace, for the ETA
        self._reset_window()

    @property
    def step(self) -> int:
        return self.state.step

    # ---- the data ---------------------------------------------------------------------------------
    def batches(self, epoch_batches: Callable[[int], Iterable[Batch]], empty_epoch: str,
                agree_on_end: bool = False) -> Iterator[Batch]:
        """Batches until `total_steps`, epoch after epoch, from where the state stands: a resumed run
        skips the batches its epoch had already used. `agree_on_end`: ranks whose shards may differ in
        length stop an epoch together (DDP would wait forever on a rank that had stopped alone).
        `empty_epoch` says what a fresh epoch without a single batch needs."""
        state = self.state
        while state.step < self.total_steps:
            iterator = iter(epoch_batches(state.epoch))
            for _ in range(state.batch_in_epoch):
                next(iterator, None)
            used_before = state.batch_in_epoch
            while state.step < self.total_steps:
                waited = time.perf_counter()
                batch = next(iterator, None)
                has_batch = self._all_agree(batch is not None) if agree_on_end else batch is not None
                if not has_batch:
                    break
                self._data_wait += time.perf_counter() - waited
                yield batch
            if state.step >= self.total_steps:
                return
            # A checkpoint on an epoch's last batch resumes into an empty rest of that epoch: move on.
            if state.batch_in_epoch == used_before == 0:
                raise ValueError(f"an epoch gave no full {self.name} step: {empty_epoch}")
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0

    def _all_agree(self, flag: bool) -> bool:
        if self.world == 1 or not dist.is_initialized():
            return flag
        value = torch.tensor([1 if flag else 0], device=self.backend.collective_device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    # ---- a step's bookkeeping ---------------------------------------------------------------------
    def step_done(self, items: int) -> None:
        """One optimizer step taken on `items` per rank (images, tokens)."""
        self.state.step += 1
        self.state.batch_in_epoch += 1
        self._window_steps += 1
        self._window_items += items * self.world

    def due(self, every: int) -> bool:
        return self.state.step % every == 0 or self.state.step == self.total_steps

    def log_due(self, every: int) -> bool:
        """Rank 0 logs; the other ranks only train."""
        return self.tracker is not None and self.due(every)

    def window(self) -> tuple[float, float]:
        """(items per second, fraction of the time spent waiting for data) since the last window."""
        self.backend.synchronize()
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        rate, wait = self._window_items / elapsed, self._data_wait / elapsed
        self._seconds_per_step = elapsed / max(self._window_steps, 1)
        self._reset_window()
        return rate, wait

    def log(self, metrics: dict[str, float], summary: str) -> None:
        """Rank 0: metrics at this step, and a progress line with the ETA of the last window's pace."""
        if self.tracker is None:
            return
        self.tracker.log_metrics(metrics, step=self.step)
        eta = (self.total_steps - self.step) * self._seconds_per_step
        print(f"[{self.name}] step {self.step}/{self.total_steps} {summary} ETA {eta:.0f}s", flush=True)

    def _reset_window(self) -> None:
        self._window_start = time.perf_counter()
        self._window_steps, self._window_items, self._data_wait = 0, 0, 0.0

    # ---- checkpoints ------------------------------------------------------------------------------
    def checkpoint_if_due(self, every: int) -> None:
        if self.due(every):
            self.checkpoint()

    def checkpoint(self) -> None:
        """Every rank calls this (the RNG states are gathered, and a sharded model's weights); rank 0 hands
        over the state."""
        rng = all_rng_states(self.world)
        state = self.state.state_dict(rng) if self.rank == 0 or self.state.collective else None
        self.save_checkpoint({"step": float(self.step)}, state if self.rank == 0 else None)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started
