"""K-means: DiGIT's token vocabulary, the centroids of the SSL encoder's patch features (tokens: ssl_kmeans).

A seeded subset of the train images (`kmeans.image_fraction`, picked by a hash of each key, so the same images
on every run), each randomly cropped and flipped once (seeded by its content, so every pass sees the same
view), streams through Ray Data with one encoder per actor. k-means++ starts from a sample of their features;
each Lloyd iteration is one streaming pass whose actors return cluster sums (stages/kmeans_passes.py), so
memory does not grow with the images. After each iteration the centroids and inertia so far are saved, and a
killed run resumes at the next iteration. A last pass over the held-out split gives the tokens' own quality:
cluster purity against the labels and code usage.

Outputs: `kmeans/centroids.safetensors` (K x dim, float32) with the layer, K, iterations and the inertia of
each iteration in the manifest and in MLflow (metric `inertia`, step = iteration)."""
from __future__ import annotations

import json
import math
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline.config import KMeansConfig, PipelineConfig
from pipeline.data.transforms import center, to_float
from pipeline.models.kmeans import kmeans_plus_plus, purity_of_counts
from pipeline.stage import StageContext, StageResult
from pipeline.storage import local_folder

CENTROIDS = "centroids.safetensors"
PROGRESS = "_progress"


def encoder_source(ctx: StageContext, image_size: int) -> dict:
    """The SSL stage's encoder as an `EncoderSource` dict a worker can load: its exported folder, or the
    pretrained architecture and weights file it recorded."""
    ssl = ctx.inputs["ssl"]
    if ssl.outputs["kind"] == "pretrained":
        return dict(ssl.outputs["source"])
    return {"folder": ctx.uri_of("ssl"), "image_size": image_size, "feature_block": ssl.outputs["feature_block"]}


class PatchFeaturizer:
    """A picklable featurizer factory (stages/kmeans_passes.py): in each actor, loads the encoder once and
    returns batch -> (images x patches, dim) features, of each image's one augmented view when `augment`."""

    def __init__(self, source: dict, image_size: int, augment: bool, seed: int, threads: int = 1,
                 use_gpu: bool = False):
        self.source, self.image_size, self.augment, self.seed = source, image_size, augment, seed
        self.threads, self.use_gpu = threads, use_gpu

    def __call__(self):
        from pipeline.device import inference_device
        from pipeline.models.ssl_tokens import EncoderSource, load_feature_encoder, patch_features

        device = inference_device(self.threads, self.use_gpu)
        source = dict(self.source)
        if source.get("folder"):
            source["folder"] = local_folder(source["folder"])
        encoder = load_feature_encoder(EncoderSource(**source), device)

        def featurize(batch: dict[str, np.ndarray]) -> torch.Tensor:
            images = center(to_float(torch.from_numpy(np.ascontiguousarray(batch["image"]))), self.image_size)
            if self.augment:
                images = crop_flip_once(images, batch["key"], self.seed)
            return patch_features(encoder, images.to(device)).flatten(0, 1).cpu()
        return featurize


def crop_flip_once(images: torch.Tensor, keys, seed: int) -> torch.Tensor:
    """Each image's one random view (reflect-pad an eighth, crop back, maybe flip), drawn from its key: the
    same view in every pass and on every actor."""
    size = images.shape[-1]
    pad = max(1, size // 8)
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    out = torch.empty_like(images)
    for index, key in enumerate(keys):
        draw = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(str(key).encode()))
        top, left = torch.randint(0, 2 * pad + 1, (2,), generator=draw).tolist()
        view = padded[index, :, top:top + size, left:left + size]
        out[index] = view.flip(-1) if torch.rand((), generator=draw) < 0.5 else view
    return out


def keep_fraction(batch: dict[str, np.ndarray], fraction: float, seed: int) -> dict[str, np.ndarray]:
    """The rows whose key hashes below `fraction`: a seeded subset that does not depend on block order."""
    hashes = np.fromiter((zlib.crc32(f"{seed}:{k}".encode()) for k in batch["key"]), np.uint64, len(batch["key"]))
    keep = hashes < np.uint64(int(fraction * 2 ** 32))
    return {name: values[keep] for name, values in batch.items()}


def read_progress(run_dir, folder: str, fingerprint: str) -> tuple[torch.Tensor, list[float]] | None:
    """The centroids and inertia after the last finished iteration of an interrupted run of this fingerprint."""
    if not run_dir.exists(folder, PROGRESS, CENTROIDS):
        return None
    data = run_dir.read_bytes(folder, PROGRESS, CENTROIDS)
    metadata = safetensors_metadata(data)
    if metadata.get("fingerprint") != fingerprint:
        return None
    return load_safetensors(data)["centroids"], json.loads(metadata["inertia"])


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """A safetensors file's string metadata (its JSON header's `__metadata__`)."""
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    return header.get("__metadata__", {})


def _passes(kcfg: KMeansConfig) -> dict:
    return {"actors": kcfg.actors, "batch_size": kcfg.batch_size, "cpus_per_actor": kcfg.cpus_per_actor,
            "gpus_per_actor": kcfg.gpus_per_actor}


def run(cfg: PipelineConfig, ctx: StageContext) -> StageResult:
    from stages.datasets import held_out_split, shard_dataset
    from stages.kmeans_passes import feature_sample, fit_kmeans, label_counts

    kcfg, run_dir, folder, log = cfg.kmeans, ctx.run_dir, ctx.folder, ctx.log
    ssl, ingest = ctx.inputs["ssl"], ctx.inputs["ingest"]
    image_size = int(ssl.outputs["image_size"])
    source = encoder_source(ctx, image_size)
    threads = max(1, round(kcfg.cpus_per_actor))
    featurizer = PatchFeaturizer(source, image_size, kcfg.augment, kcfg.seed, threads, kcfg.gpus_per_actor > 0)
    read = kcfg.cpus_per_task
    train = shard_dataset(ctx, "train", read_cpus=read).select_columns(["image", "key"], num_cpus=read)
    train = train.map_batches(keep_fraction, fn_kwargs={"fraction": kcfg.image_fraction, "seed": kcfg.seed},
                              batch_format="numpy", num_cpus=read)
    images = ingest.counts["train"]["images"]
    expected_rows = images * kcfg.image_fraction * int(ssl.outputs["grid"]) ** 2

    progress = read_progress(run_dir, folder, ctx.fingerprint)
    if progress is not None:
        centroids, inertia = progress
        log.info("kmeans: resuming after iteration %d of %d", len(inertia), kcfg.iterations)
    else:
        run_dir.delete(folder)
        keep = min(1.0, 2.0 * kcfg.init_rows / max(expected_rows, 1.0))
        sample = feature_sample(train, featurizer, rows=kcfg.init_rows, keep=keep, seed=kcfg.seed, **_passes(kcfg))
        if len(sample) < kcfg.clusters:
            raise ValueError(f"kmeans.clusters {kcfg.clusters} exceeds the {len(sample)} feature rows sampled: raise "
                             f"kmeans.image_fraction or kmeans.init_rows, or lower kmeans.clusters")
        centroids = kmeans_plus_plus(sample.float(), kcfg.clusters, torch.Generator().manual_seed(kcfg.seed))
        inertia = []
        log.info("kmeans: k-means++ on %d feature rows of dim %d -> %d centroids", len(sample), sample.shape[1],
                 kcfg.clusters)

    def on_iteration(index: int, current: torch.Tensor, value: float) -> None:
        inertia.append(value)
        # Logged before the state is saved: a kill in between redoes the iteration and logs its step again,
        # never leaves it unlogged. Centroids and inertia so far go in one file, written whole or not at all.
        ctx.tracker.log_metrics({"inertia": value, "inertia_per_row": value / max(expected_rows, 1.0)},
                                step=len(inertia))
        run_dir.write_bytes(save_safetensors({"centroids": current.contiguous()}, metadata={
            "fingerprint": ctx.fingerprint, "inertia": json.dumps(inertia)}), folder, PROGRESS, CENTROIDS)
        log.info("kmeans: iteration %d/%d, inertia %.6g", len(inertia), kcfg.iterations, value)

    remaining = kcfg.iterations - len(inertia)
    if remaining > 0:
        centroids, _ = fit_kmeans(train, featurizer, centroids, iterations=remaining, on_iteration=on_iteration,
                                  **_passes(kcfg))

    classes = max(int(ingest.details.get("num_classes", 1)), 1)
    plain = PatchFeaturizer(source, image_size, False, kcfg.seed, threads, kcfg.gpus_per_actor > 0)
    held_out = shard_dataset(ctx, held_out_split(ctx), read_cpus=read).select_columns(["image", "label"], num_cpus=read)
    table = label_counts(held_out, plain, centroids, classes, **_passes(kcfg))
    used = int((table.sum(1) > 0).sum())
    per_cluster = table.sum(1).double()
    probs = per_cluster[per_cluster > 0] / per_cluster.sum()
    quality = {"val_cluster_purity": purity_of_counts(table), "val_codes_used": float(used),
               "val_usage": used / kcfg.clusters, "val_perplexity": float(torch.exp(-(probs * probs.log()).sum())),
               "val_majority_class_rate": float(table.sum(0).max()) / float(table.sum())}
    run_dir.write_bytes(save_safetensors({"centroids": centroids.float().contiguous()}, metadata={
        "clusters": str(kcfg.clusters), "feature_block": str(ssl.outputs["feature_block"]),
        "iterations": str(kcfg.iterations)}), folder, CENTROIDS)
    run_dir.delete(folder, PROGRESS)
    metrics = {"final_inertia": inertia[-1], "final_inertia_per_row": inertia[-1] / max(expected_rows, 1.0), **quality}
    ctx.tracker.log_metrics(quality)
    log.info("kmeans: purity %.3f, %d of %d codes used on the held-out split", quality["val_cluster_purity"], used,
             kcfg.clusters)
    return StageResult(
        outputs={"centroids": CENTROIDS, "clusters": kcfg.clusters, "dim": int(centroids.shape[1]),
                 "feature_block": ssl.outputs["feature_block"], "grid": ssl.outputs["grid"],
                 "iterations": kcfg.iterations, "inertia": inertia},
        counts={"train_images_sampled_expected": int(math.floor(images * kcfg.image_fraction)),
                "feature_rows_expected": int(expected_rows)},
        metrics=metrics,
        details={"purity": "held-out patches: the fraction whose image's label is their cluster's majority label",
                 "augment": "one random crop (reflect pad 1/8) and flip per image" if kcfg.augment else "none"})
