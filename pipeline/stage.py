"""What a stage receives and returns. Stages are `run(cfg, ctx) -> StageResult` functions."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.storage import Manifest, RunDir
from pipeline.tracking import Tracker


class StageInputError(ValueError):
    """A stage's inputs do not fit together (stale upstream outputs, a model unlike the config)."""


@dataclass(frozen=True)
class StageSpec:
    name: str  # what users type: --only ingest
    folder: str  # where its outputs live in the run directory
    upstream: tuple[str, ...]  # stages whose committed outputs it reads
    entry: str  # "module:function"


@dataclass
class StageResult:
    outputs: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    spec: StageSpec
    cfg: PipelineConfig
    run_dir: RunDir
    fingerprint: str
    inputs: dict[str, Manifest]
    tracker: Tracker | None = None
    folders: dict[str, str] = field(default_factory=dict)  # every stage's folder, from the stage table

    @property
    def folder(self) -> str:
        return self.spec.folder

    def folder_of(self, stage: str) -> str:
        """The run-directory folder of a stage, by stage name (`ingest` -> `shards`)."""
        if stage == self.spec.name:
            return self.spec.folder
        if stage not in self.folders:
            raise KeyError(f"stage '{stage}' is not in the stage table ({', '.join(self.folders)})")
        return self.folders[stage]

    def uri_of(self, stage: str, *parts: str) -> str:
        """A location workers can open for a name inside a stage's folder (the folder itself without parts)."""
        return self.run_dir.uri(self.folder_of(stage), *parts)

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"vim.{self.spec.name}")


class Progress:
    """A per-item log line with rate and ETA, at most every `every_s` seconds."""

    def __init__(self, log: logging.Logger, total: int, unit: str, every_s: float = 5.0):
        self.log, self.total, self.unit, self.every_s = log, total, unit, every_s
        self.started = self.last = time.perf_counter()
        self.done = 0

    def update(self, amount: int, label: str = "") -> None:
        self.done += amount
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            self.log.info("%s %d/%d %s (%.1f %s/s, ETA %.0fs)", label, self.done, self.total, self.unit,
                          rate, self.unit, eta)

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.started, 1e-9)
