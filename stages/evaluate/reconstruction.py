"""Part 2, reconstruction: real val images (the reference set) and their tokenizer reconstructions through
the feature extractors: PSNR, SSIM, codebook usage, rFID (domain, and Inception when available), and a
grid of originals over reconstructions. Domain features are cheap and cover the whole reference set;
Inception runs on a capped prefix of it. Every subset is a prefix in shard order, read in order (`collect`)."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from pipeline.data.shards import iter_samples
from pipeline.data.transforms import center, to_float
from pipeline.metrics.codebook import CodebookUsage
from pipeline.metrics.extractors import ImageFeatures
from pipeline.metrics.fid import GaussianStats
from pipeline.models.tokenizer import load_tokenizer
from pipeline.stage import StageContext
from pipeline.storage import local_folder
from pipeline.viz import make_grid
from stages.datasets import shard_dataset
from stages.evaluate.common import CACHE, PartResult, Setup, Stopwatch, collect
from stages.evaluate.feature_networks import FeatureNetworks, image_features_args

GRID_IMAGES = 8


@dataclass
class Reconstruction(PartResult):
    reference_domain: GaussianStats | None = None  # domain features of the whole reference set
    reference_inception: GaussianStats | None = None  # Inception features of its first `inception_cap`
    inception_cap: int = 0


def reconstruction(ctx: StageContext, setup: Setup, nets: FeatureNetworks) -> Reconstruction:
    ecfg, split = setup.ecfg, setup.val_split
    clock = Stopwatch()
    # The reference set is the first `reference_images` val images in shard order and the reconstructions its
    # first `recon_images`: `collect` reads in order, so both are the same images on every run.
    val_ds = shard_dataset(ctx, split, read_cpus=ecfg.cpus_per_task)
    real_ds = val_ds.limit(max(ecfg.recon_images, ecfg.reference_images)) if ecfg.reference_images else val_ds
    real = collect(real_ds.map_batches(ImageFeatures, fn_constructor_kwargs=image_features_args(
        ctx, setup, nets, parts=["domain"], recon_parts=["domain"], keep_images=False), **setup.pool))
    n_recon = min(ecfg.recon_images, len(real["label"]))
    result = Reconstruction(metrics={"recon_psnr": float(real["psnr"][:n_recon].mean()),
                                     "recon_ssim": float(real["ssim"][:n_recon].mean()),
                                     "recon_images": float(n_recon)},
                            counts={"recon_images": n_recon})
    usage = CodebookUsage(setup.codebook_size)
    usage.update(real["codes"][:n_recon].astype(np.int64))
    result.metrics.update({f"recon_{k}": v for k, v in usage.result().items()})
    result.reference_domain = GaussianStats.of(real["domain_features"])
    result.metrics["rfid_domain"] = setup.frechet(result.reference_domain,
                                                  GaussianStats.of(real["recon_domain_features"][:n_recon]))
    result.inception_cap = ecfg.inception_images or len(real["label"])
    if nets.inception_path:
        reference, recon_inception = reference_inception(ctx, setup, nets, val_ds, result.inception_cap)
        result.reference_inception = reference
        result.metrics["rfid_inception"] = setup.frechet(reference, recon_inception)
        result.how["fid_inception"] = (
            f"TF-Inception pool3 (2048-d, {Path(nets.inception_path).name}), 8-bit input, TF1 bilinear resize "
            f"to 299, float64 Frechet distance by {ecfg.fid_method}; reference: {reference.count} {split} "
            f"images, cached as {ctx.folder}/ref_stats_{split}.npz")
    result.how["reconstruction"] = (
        f"{n_recon} {split} images through encode/decode; PSNR on [0,1] pixels, SSIM with an 11x11 Gaussian "
        f"window (sigma 1.5); rFID_domain vs {len(real['label'])} real images")
    result.seconds["real_and_reconstruction_features"] = clock()
    result.files["reconstructions.png"] = reconstruction_grid(ctx, split, setup.image_size)
    return result


def reference_inception(ctx: StageContext, setup: Setup, nets: FeatureNetworks, val_ds: ray.data.Dataset,
                        cap: int) -> tuple[GaussianStats, GaussianStats]:
    """Inception statistics of the first `cap` real images (cached per ingest, weights file and cap) and
    of their reconstructions (per run: the tokenizer changes). Writes the reference to the stage folder."""
    split = setup.val_split
    inception_name = Path(nets.inception_path).name
    # "first": the first `cap` images in shard order (caches of older, timing-dependent subsets are not reused)
    cache_key = f"ref-inception-{ctx.inputs['ingest'].fingerprint}-{split}-first{cap}-{inception_name}.npz"
    cached = ctx.run_dir.exists(CACHE, cache_key)
    features = collect(val_ds.limit(cap).map_batches(ImageFeatures, fn_constructor_kwargs=image_features_args(
        ctx, setup, nets, parts=[] if cached else ["inception"], recon_parts=["inception"], keep_images=False),
        **setup.pool))
    if cached:
        reference = GaussianStats.load(io.BytesIO(ctx.run_dir.read_bytes(CACHE, cache_key)))
    else:
        reference = GaussianStats.of(features["inception"])
        reference.save(buffer := io.BytesIO())
        ctx.run_dir.write_bytes(buffer.getvalue(), CACHE, cache_key)
    reference.save(buffer := io.BytesIO())
    ctx.run_dir.write_bytes(buffer.getvalue(), ctx.folder, f"ref_stats_{split}.npz")
    return reference, GaussianStats.of(features["recon_inception"])


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
