"""Part 2, real sets and reconstructions. From the held-out split it draws, class-balanced and seeded
(`pipeline/metrics/subsets.py`):
- the reference set (evaluate.reference_images) whose statistics every FID compares against;
- a balanced subset of it reconstructed by the tokenizer (evaluate.recon_images): PSNR, SSIM, codebook
  usage, rFID;
- a real set disjoint from the reference, for noise floors: the FID of real images against the reference at
  the sizes of each FID, and the IS and precision/recall real images get at a sample set's size.
Inception features (TF-1 pool3 at 299 px, costly on a CPU) cover balanced subsets of evaluate.inception_images
of each set. Sets are chosen by image key, so they do not depend on read order or task timing."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch

from pipeline.data.shards import iter_samples
from pipeline.data.transforms import center, to_float
from pipeline.metrics.codebook import CodeStackUsage
from pipeline.metrics.extractors import ImageFeatures
from pipeline.metrics.fid import GaussianStats
from pipeline.metrics.inception_score import inception_score
from pipeline.metrics.precision_recall import precision_recall
from pipeline.metrics.subsets import balanced_indices
from pipeline.models.tokenizer import load_tokenizer
from pipeline.stage import StageContext
from pipeline.storage import local_folder
from pipeline.viz import make_grid
from stages.datasets import shard_dataset
from stages.evaluate.common import CACHE, PartResult, Setup, Stopwatch, collect
from stages.evaluate.feature_networks import FeatureNetworks, image_features_args

GRID_IMAGES = 8
FLOOR_SEED_OFFSET = 1  # the floor set's seed: evaluate.seed + 1 (the reference set uses evaluate.seed)


@dataclass
class RealFeatures:
    """Features of real images, for comparisons against sample sets of a known size."""

    reference: GaussianStats  # the whole reference set (domain) or its Inception subset
    reference_subset: np.ndarray  # a balanced subset of the reference set as large as one sample set
    floor_sets: dict[int, np.ndarray] = field(default_factory=dict)  # size -> disjoint real set of that size


@dataclass
class Reconstruction(PartResult):
    domain: RealFeatures | None = None
    inception: RealFeatures | None = None
    inception_cap: int = 0  # the size of every Inception set


def reconstruction(ctx: StageContext, setup: Setup, nets: FeatureNetworks) -> Reconstruction:
    ecfg, split = setup.ecfg, setup.val_split
    clock = Stopwatch()
    val_ds = shard_dataset(ctx, split, read_cpus=ecfg.cpus_per_task)
    listing = collect(shard_dataset(ctx, split, read_cpus=ecfg.cpus_per_task, with_images=False))
    keys, labels = listing["key"], listing["label"]
    sample_count = setup.samples_per_set
    reference = balanced_indices(labels, ecfg.reference_images or len(labels), ecfg.seed)
    recon = reference[balanced_indices(labels[reference], ecfg.recon_images, ecfg.seed)]
    floor_size = max(len(recon), sample_count)
    floor = disjoint_set(labels, floor_size, ecfg.seed + FLOOR_SEED_OFFSET, exclude=reference)

    real_rows = reference if floor is None else np.union1d(reference, floor)
    real = features_by_key(ctx, setup, nets, val_ds, keys[real_rows], parts=["domain"])
    recon_features = features_by_key(ctx, setup, nets, val_ds, keys[recon], parts=[], recon_parts=["domain"])
    n_recon = len(recon)
    result = Reconstruction(metrics={"recon_psnr": float(recon_features["psnr"].mean()),
                                     "recon_ssim": float(recon_features["ssim"].mean()),
                                     "recon_images": float(n_recon), "reference_images": float(len(reference))},
                            counts={"recon_images": n_recon, "reference_images": len(reference)})
    usage = CodeStackUsage(setup.codebook_size, setup.code_depth, setup.shared_codebook)
    usage.update(recon_features["codes"].astype(np.int64))
    result.metrics.update({f"recon_{k}": v for k, v in usage.result().items()})

    row = {key: i for i, key in enumerate(real["key"])}

    def select(index: np.ndarray) -> np.ndarray:  # rows of `real` for split indices
        return np.array([row[key] for key in keys[index]], dtype=np.intp)

    reference_domain = GaussianStats.of(real["domain_features"][select(reference)])
    result.domain = RealFeatures(reference_domain, real["domain_features"][select(
        reference[balanced_indices(labels[reference], sample_count, ecfg.seed)])])
    result.metrics["rfid_domain"] = setup.frechet(reference_domain,
                                                  GaussianStats.of(recon_features["recon_domain_features"]))
    floor_note = "unavailable: the split has too few images beyond the reference set"
    if floor is not None:
        floor_rows = {size: select(floor[balanced_indices(labels[floor], size, ecfg.seed)])
                      for size in {n_recon, sample_count}}
        result.domain.floor_sets = {size: real["domain_features"][rows] for size, rows in floor_rows.items()}
        result.metrics["rfid_domain_floor"] = setup.frechet(
            reference_domain, GaussianStats.of(result.domain.floor_sets[n_recon]))
        _real_sample_figures(result, setup, "domain", sample_count)
        result.metrics["is_domain_real"], _ = inception_score(real["domain_probs"][floor_rows[sample_count]])
        floor_note = (f"FID of {len(floor)} real {split} images disjoint from the reference (balanced, seed "
                      f"{ecfg.seed + FLOOR_SEED_OFFSET}) at each FID's sizes")
    result.how["reference"] = (
        f"{len(reference)} {split} images, {len(reference) // max(1, len(np.unique(labels)))} per class, chosen "
        f"by seed {ecfg.seed} (evaluate.reference_images); floors: {floor_note}")
    result.how["reconstruction"] = (
        f"{n_recon} reference images (class-balanced) through encode/decode; PSNR on [0,1] pixels, SSIM with an "
        f"11x11 Gaussian window (sigma 1.5); rFID_domain: their reconstructions vs the reference statistics")
    result.seconds["real_and_reconstruction_features"] = clock()
    if nets.inception_path:
        clock = Stopwatch()
        reference_inception(ctx, setup, nets, val_ds, keys, labels, reference, floor, result)
        result.seconds["real_inception_features"] = clock()
    result.files["reconstructions.png"] = reconstruction_grid(ctx, split, setup.image_size)
    return result


def disjoint_set(labels: np.ndarray, size: int, seed: int, exclude: np.ndarray) -> np.ndarray | None:
    """A balanced set of `size` rows (size // classes of each) outside `exclude`, or None when the rows left
    cannot hold it: a smaller floor set would be a floor at other sizes than the FID it stands beside."""
    if len(exclude) >= len(labels):
        return None
    chosen = balanced_indices(labels, size, seed, exclude=exclude)
    return chosen if len(chosen) == size // len(np.unique(labels)) * len(np.unique(labels)) else None


def _real_sample_figures(result: Reconstruction, setup: Setup, space: str, size: int) -> None:
    """What real images score where a sample set of `size` is scored, in feature `space`: the FID floor (a
    disjoint real set against the reference) and its precision/recall against the reference subset."""
    features = getattr(result, space)
    floor = features.floor_sets[size]
    result.metrics[f"fid_{space}_floor"] = setup.frechet(features.reference, GaussianStats.of(floor))
    precision, recall = precision_recall(features.reference_subset, floor)
    result.metrics[f"precision_{space}_real"], result.metrics[f"recall_{space}_real"] = precision, recall


def features_by_key(ctx: StageContext, setup: Setup, nets: FeatureNetworks, dataset: ray.data.Dataset,
                    keys: np.ndarray, parts: list[str], recon_parts: list[str] | None = None) -> dict[str, np.ndarray]:
    """`ImageFeatures` of the rows with these image keys, in the order of `keys`."""
    wanted = set(keys.tolist())
    # The filter's tasks take the read tasks' CPUs: at Ray's default of 1 they would wait forever beside an
    # actor pool that holds the rest of a small machine.
    got = collect(dataset.filter(lambda row: row["key"] in wanted, num_cpus=setup.ecfg.cpus_per_task).map_batches(
        ImageFeatures, fn_constructor_kwargs=image_features_args(
            ctx, setup, nets, parts=parts, recon_parts=recon_parts, keep_images=False), **setup.pool))
    position = {key: i for i, key in enumerate(got["key"])}
    order = np.array([position[key] for key in keys], dtype=np.intp)
    return {name: values[order] for name, values in got.items()}


def reference_inception(ctx: StageContext, setup: Setup, nets: FeatureNetworks, val_ds: ray.data.Dataset,
                        keys: np.ndarray, labels: np.ndarray, reference: np.ndarray, floor: np.ndarray | None,
                        result: Reconstruction) -> None:
    """Inception features of balanced `inception_images`-subsets of the reference set, its reconstructions
    and the floor set: rFID, its floor and the sets samples are compared with. The reference statistics are
    cached per ingest, subset and weights file, and written to the stage folder."""
    ecfg, split = setup.ecfg, setup.val_split
    cap = min(ecfg.inception_images or len(reference), len(reference))
    subset = reference[balanced_indices(labels[reference], cap, ecfg.seed)]
    cap = result.inception_cap = len(subset)
    sample_cap = min(cap, setup.samples_per_set)
    pick = balanced_indices(labels[subset], sample_cap, ecfg.seed)  # the reference subset samples meet
    inception_name = Path(nets.inception_path).name
    cache_key = (f"ref-inception-{ctx.inputs['ingest'].fingerprint}-{split}-balanced{cap}-seed{ecfg.seed}-"
                 f"{inception_name}.npz")
    cached = ctx.run_dir.exists(CACHE, cache_key)
    real = features_by_key(ctx, setup, nets, val_ds, keys[subset], parts=[] if cached else ["inception"],
                           recon_parts=["inception"])
    if cached:
        stored = np.load(io.BytesIO(ctx.run_dir.read_bytes(CACHE, cache_key)))
        reference_stats = GaussianStats(stored["mu"], stored["sigma"], int(stored["count"]))
        reference_subset = stored["subset"]
    else:
        reference_stats, reference_subset = GaussianStats.of(real["inception"]), real["inception"][pick]
        np.savez(buffer := io.BytesIO(), mu=reference_stats.mu, sigma=reference_stats.sigma,
                 count=reference_stats.count, subset=reference_subset)
        ctx.run_dir.write_bytes(buffer.getvalue(), CACHE, cache_key)
    reference_stats.save(buffer := io.BytesIO())
    ctx.run_dir.write_bytes(buffer.getvalue(), ctx.folder, f"ref_stats_{split}.npz")
    result.inception = RealFeatures(reference_stats, reference_subset)
    result.metrics["rfid_inception"] = setup.frechet(reference_stats, GaussianStats.of(real["recon_inception"]))
    floor_note = "no floor: the split has too few images beyond the reference set"
    if floor is not None and len(floor) >= cap:
        floor_subset = floor[balanced_indices(labels[floor], cap, ecfg.seed)]
        floor_features = features_by_key(ctx, setup, nets, val_ds, keys[floor_subset], parts=["inception"])
        for size in sorted({cap, sample_cap}):
            chosen = balanced_indices(labels[floor_subset], size, ecfg.seed)
            result.inception.floor_sets[size] = floor_features["inception"][chosen]
        result.metrics["rfid_inception_floor"] = setup.frechet(
            reference_stats, GaussianStats.of(result.inception.floor_sets[cap]))
        _real_sample_figures(result, setup, "inception", sample_cap)
        floor_note = f"floor: {cap} real {split} images disjoint from the reference"
    result.how["fid_inception"] = (
        f"TF-Inception pool3 (2048-d, {inception_name}), 8-bit input, TF1 bilinear resize to 299, float64 "
        f"Frechet distance by {ecfg.fid_method}; reference: {cap} {split} images (class-balanced, seed "
        f"{ecfg.seed}, evaluate.inception_images), cached as {ctx.folder}/ref_stats_{split}.npz; rFID on their "
        f"reconstructions; samples: a balanced subset of {sample_cap} per set; {floor_note}")


def reconstruction_grid(ctx: StageContext, split: str, image_size: int) -> bytes:
    """PNG: the first images of the split's first shard over their reconstructions (tokenizer on the CPU)."""
    from PIL import Image

    first = ctx.inputs["ingest"].outputs["shards"][split][0]
    originals = []
    for sample in iter_samples(ctx.uri_of("ingest", first)):
        originals.append(sample["image"])
        if len(originals) == GRID_IMAGES:
            break
    images = center(to_float(torch.from_numpy(np.stack(originals))), image_size)
    tokenizer = load_tokenizer(local_folder(ctx.uri_of("tokenizer")), "cpu")
    with torch.no_grad():
        reconstruction = tokenizer.decode(tokenizer.encode(images))
    rows = torch.cat([images, reconstruction]).permute(0, 2, 3, 1).mul(255).round().byte().numpy()
    buffer = io.BytesIO()
    Image.fromarray(make_grid(list(rows), columns=GRID_IMAGES, scale=max(1, 64 // image_size))).save(
        buffer, format="PNG")
    return buffer.getvalue()
