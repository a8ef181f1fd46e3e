"""What the evaluate parts share: their result type, the run's fixed facts, actor-pool settings, collection."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import ray

from pipeline.config import EvaluateConfig, PipelineConfig
from pipeline.metrics.fid import GaussianStats, fid_from_stats
from pipeline.stage import StageContext
from stages.datasets import held_out_split

CACHE = "_cache"  # run-directory folder for what later evaluate runs can reuse


@dataclass
class PartResult:
    """One numbered part of the evaluation: its figures, how each group was computed, where its time went,
    its counts and the files it made (name -> bytes, written to the stage folder)."""

    metrics: dict[str, float] = field(default_factory=dict)
    how: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Setup:
    """Facts of this run every part needs, read once from the config and the upstream manifests."""

    ecfg: EvaluateConfig
    num_classes: int
    image_size: int
    val_split: str
    codebook_size: int  # the pixel tokenizer's
    code_depth: int = 1  # codes per position (residual quantization)
    shared_codebook: bool = True

    @classmethod
    def of(cls, cfg: PipelineConfig, ctx: StageContext) -> "Setup":
        codes = ctx.inputs["pretokenize"]
        check_set_sizes(cfg.evaluate, int(ctx.inputs["ingest"].details.get("num_classes", 1)))
        return cls(ecfg=cfg.evaluate, num_classes=int(ctx.inputs["transformer"].outputs["settings"]["num_classes"]),
                   image_size=int(codes.outputs["image_size"]), val_split=held_out_split(ctx),
                   codebook_size=int(ctx.inputs["tokenizer"].outputs["codebook_size"]),
                   code_depth=int(codes.outputs.get("depth", 1)),
                   shared_codebook=bool(codes.outputs.get("shared_codebook", True)))

    @property
    def samples_per_set(self) -> int:
        """Images in one sample set (with or without rejection): samples_per_class of every class."""
        return self.ecfg.samples_per_class * max(self.num_classes, 1)

    def frechet(self, a: GaussianStats, b: GaussianStats) -> float:
        """The Frechet distance by the configured method."""
        return fid_from_stats(a, b, method=self.ecfg.fid_method)

    @property
    def pool(self) -> dict:
        """`map_batches` keywords for an actor pool of the configured size and resources."""
        ecfg = self.ecfg
        return {"compute": ray.data.ActorPoolStrategy(size=ecfg.actors), "num_cpus": ecfg.cpus_per_actor,
                "num_gpus": ecfg.gpus_per_actor, "batch_size": ecfg.batch_size}

    @property
    def actor_args(self) -> dict:
        """Constructor keywords every extractor takes: torch threads and whether to ask for a GPU."""
        return {"threads": max(1, round(self.ecfg.cpus_per_actor)), "use_gpu": self.ecfg.gpus_per_actor > 0}


def check_set_sizes(ecfg: EvaluateConfig, num_classes: int) -> None:
    """Every capped set is class-balanced, so a cap below the class count cannot hold all classes: say so
    before any work."""
    for key in ("reference_images", "recon_images", "inception_images"):
        value = getattr(ecfg, key)
        if value is not None and value < num_classes:
            raise ValueError(f"evaluate.{key}={value} cannot hold all {num_classes} classes of this data set in "
                             f"equal number: set it to at least {num_classes}")


def in_order(dataset: ray.data.Dataset) -> ray.data.Dataset:
    """The dataset, executed with Ray Data's `preserve_order`: rows arrive in input order (shards in the
    manifest's order, rows in file order), actor pools included. A `limit(n)` in it then takes the same first
    n rows on every run, whatever the task timing, and batches are made of the same rows. The setting lives
    in the context the dataset shares with the datasets it was derived from, not in the global one."""
    dataset.context.execution_options.preserve_order = True
    return dataset


def collect(dataset: ray.data.Dataset) -> dict[str, np.ndarray]:
    """A whole dataset on the driver, one concatenated array per column, rows in input order (`in_order`):
    every subset (`limit`) and row order the evaluation uses is a function of the config and the inputs."""
    parts: dict[str, list] = {}
    for batch in in_order(dataset).iter_batches(batch_size=None, batch_format="numpy"):
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    return {key: np.concatenate(values) for key, values in parts.items()}


class Stopwatch:
    """Seconds since it was made."""

    def __init__(self):
        self.started = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.started
