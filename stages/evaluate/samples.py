"""Part 3, samples: class-balanced samples (over-sampled for rejection), decoded and scored by the domain
classifier; FID/IS in the domain features, FID with Inception when available; the sample grid and file."""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import ray
import torch

from pipeline.metrics.extractors import ImageFeatures, SampleImages
from pipeline.metrics.fid import GaussianStats
from pipeline.metrics.inception_score import inception_score
from pipeline.models.sampling import balanced_labels
from pipeline.stage import StageContext
from pipeline.viz import make_grid
from stages.evaluate.common import PartResult, Setup, Stopwatch, collect
from stages.evaluate.feature_networks import FeatureNetworks, image_features_args
from stages.evaluate.reconstruction import Reconstruction

GRID_PER_ROW = 10  # samples per class row in the grid, at most


@dataclass
class Samples(PartResult):
    sampling: dict = field(default_factory=dict)  # the sampler's settings, for metrics.json


def samples(ctx: StageContext, setup: Setup, nets: FeatureNetworks, recon: Reconstruction) -> Samples:
    ecfg, per_class = setup.ecfg, setup.ecfg.samples_per_class
    clock = Stopwatch()
    sampling = {"temperature": ecfg.temperature, "top_k": ecfg.top_k, "top_p": ecfg.top_p,
                "guidance_scale": ecfg.guidance_scale}
    drawn, draw = draw_samples(ctx, setup, nets, sampling)
    result = Samples(seconds={"sampling": clock()},
                     sampling={**sampling, "samples_per_class": per_class, "seed": ecfg.seed,
                               "rejection_acceptance": ecfg.rejection_acceptance})
    if ecfg.rejection_acceptance:
        drawn, result.metrics["acceptance_rate"] = rejection(drawn, per_class)
        result.how["rejection"] = (f"drew {draw} per class, kept the {per_class} the domain classifier finds most "
                                   f"likely of their intended class")
    result.metrics["samples"] = float(len(drawn["label"]))
    result.counts["samples"] = int(result.metrics["samples"])
    result.metrics["fid_domain"] = setup.frechet(recon.reference_domain, GaussianStats.of(drawn["domain_features"]))
    result.metrics["is_domain"], result.metrics["is_domain_std"] = inception_score(drawn["domain_probs"])
    result.metrics["sample_class_agreement_domain"] = float(
        (drawn["domain_probs"].argmax(1) == drawn["label"]).mean())
    if nets.inception_path:
        clock = Stopwatch()
        result.metrics["fid_inception"] = sample_fid_inception(ctx, setup, nets, recon, drawn)
        result.seconds["sample_inception_features"] = clock()
    if ecfg.inception_is_weights:
        result.metrics["is_inception"], result.metrics["is_inception_std"] = is_from_torch_fidelity(
            drawn["image"], ecfg.inception_is_weights)
        result.how["is_inception"] = "torch-fidelity inception-v3-compat logits, 10 splits"
    else:
        result.how["is_inception"] = ("unavailable: the offline FID network has no logits; set "
                                      "evaluate.inception_is_weights to torch-fidelity's weights-inception-2015-12-05 "
                                      "file")
    state, info = nets.domain_state, nets.domain_info
    result.how["domain"] = (f"CNN (width {state['width']}) trained on {info['train_images']} train images for "
                            f"{info['epochs']} epochs (val top-1 {info['val_top1']:.3f}); "
                            f"{state['feature_dim']}-d penultimate features; IS over 10 splits")
    result.files["samples_grid.png"] = grid_png(drawn["image"], drawn["label"], min(per_class, GRID_PER_ROW))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=drawn["image"], labels=drawn["label"], codes=drawn["codes"])
    result.files["samples.npz"] = buffer.getvalue()
    return result


def draw_samples(ctx: StageContext, setup: Setup, nets: FeatureNetworks,
                 sampling: dict) -> tuple[dict[str, np.ndarray], int]:
    """`draw` samples per class with their domain features, sorted by label (stable); returns them and draw."""
    ecfg, per_class = setup.ecfg, setup.ecfg.samples_per_class
    draw = int(np.ceil(per_class / ecfg.rejection_acceptance)) if ecfg.rejection_acceptance else per_class
    labels = balanced_labels(max(setup.num_classes, 1), draw).numpy()
    chunks = [{"labels": labels[i:i + ecfg.batch_size].tolist(), "seed": ecfg.seed * 1_000_003 + n}
              for n, i in enumerate(range(0, len(labels), ecfg.batch_size))]
    sampled = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
        SampleImages, fn_constructor_kwargs={"transformer_uri": ctx.uri_of("transformer"),
                                             "tokenizer_uri": ctx.uri_of("tokenizer"), "settings": sampling,
                                             **setup.actor_args},
        **{**setup.pool, "batch_size": 1})  # a chunk per call: each chunk carries its own seed
    drawn = collect(sampled.map_batches(ImageFeatures, fn_constructor_kwargs=image_features_args(
        ctx, setup, nets, parts=["domain"], recon_parts=None, keep_images=True), **setup.pool))
    # `collect` keeps the chunks' order, so "stable" means the same order on every run (ties in rejection too).
    order = np.lexsort((np.arange(len(drawn["label"])), drawn["label"]))
    return {k: v[order] for k, v in drawn.items()}, draw


def sample_fid_inception(ctx: StageContext, setup: Setup, nets: FeatureNetworks, recon: Reconstruction,
                         drawn: dict[str, np.ndarray]) -> float:
    """Inception FID of the first `inception_cap` kept samples against the reference statistics."""
    cap = recon.inception_cap
    kept = ray.data.from_items([{"image": image, "label": label} for image, label in
                                zip(drawn["image"][:cap], drawn["label"][:cap])])
    inception = collect(kept.map_batches(ImageFeatures, fn_constructor_kwargs=image_features_args(
        ctx, setup, nets, parts=["inception"], recon_parts=None, keep_images=False), **setup.pool))
    return setup.frechet(recon.reference_inception, GaussianStats.of(inception["inception"]))


def rejection(drawn: dict, per_class: int) -> tuple[dict, float]:
    """Per class, keep the `per_class` candidates the domain classifier finds most likely of that class;
    returns the kept samples and the fraction kept."""
    scores = drawn["domain_probs"][np.arange(len(drawn["label"])), drawn["label"]]
    keep = []
    for label in np.unique(drawn["label"]):
        index = np.flatnonzero(drawn["label"] == label)
        keep.extend(index[np.argsort(-scores[index])[:per_class]])
    keep = np.sort(np.asarray(keep))
    return {k: v[keep] for k, v in drawn.items()}, len(keep) / len(drawn["label"])


def is_from_torch_fidelity(images: np.ndarray, weights: str) -> tuple[float, float]:
    """Inception Score with torch-fidelity's TF-Inception port (logits) from a local weights file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["logits_unbiased"],
                                            feature_extractor_weights_path=weights).eval()
    logits = []
    for start in range(0, len(images), 50):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + 50])).permute(0, 3, 1, 2)
        with torch.no_grad():
            logits.append(extractor(batch)[0])
    return inception_score(torch.cat(logits).softmax(-1).double().numpy())


def grid_png(images: np.ndarray, labels: np.ndarray, per_row: int) -> bytes:
    """PNG: one row per class, its first `per_row` samples (blank-padded)."""
    from PIL import Image

    rows = []
    for label in np.unique(labels):
        picked = images[labels == label][:per_row]
        rows.extend(list(picked) + [np.zeros_like(images[0])] * (per_row - len(picked)))
    grid = make_grid(rows, columns=per_row, scale=max(1, 64 // images.shape[1]))
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    return buffer.getvalue()
