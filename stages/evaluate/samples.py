"""Part 3, samples: class-balanced samples, decoded and scored by the evaluation network (the domain
classifier), and by TF-Inception when available.

Two sample sets of samples_per_class per class are scored the same way: all samples (the first drawn of each
class: the paper's protocol, acceptance 1.0) and, with rejection, the accepted ones: ceil(samples_per_class /
rejection_acceptance) drawn per class, the rejection network (not the evaluation network) keeps the most
likely of their intended class. Each set gets FID, IS, class agreement and precision/recall (k = 3) beside
what real images score at the same size (part 2's floors)."""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import ray
import torch

from pipeline.metrics.extractors import ImageFeatures, SampleImages
from pipeline.metrics.fid import GaussianStats
from pipeline.metrics.inception_score import inception_score
from pipeline.metrics.precision_recall import precision_recall
from pipeline.metrics.subsets import balanced_indices
from pipeline.models.sampling import balanced_labels
from pipeline.stage import StageContext
from pipeline.viz import make_grid
from stages.evaluate.common import PartResult, Setup, Stopwatch, collect
from stages.evaluate.feature_networks import FeatureNetworks, describe, image_features_args
from stages.evaluate.reconstruction import Reconstruction

GRID_PER_ROW = 10  # samples per class row in the grid, at most
ACCEPTED = "_accepted"  # the suffix of the rejection-sampled set's figures


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
    sets = {"": first_per_class(drawn["label"], per_class)}
    if ecfg.rejection_acceptance:
        sets[ACCEPTED] = rejection(drawn["rejection_probs"], drawn["label"], per_class)
        result.metrics["acceptance_rate"] = len(sets[ACCEPTED]) / len(drawn["label"])
        result.how["rejection"] = (
            f"drew {draw} per class, kept the {per_class} the rejection network ({describe(nets.rejection)}) "
            f"finds most likely of their intended class; every figure is graded by the evaluation network "
            f"({describe(nets.evaluation)}). Figures without a suffix: the first {per_class} drawn per class "
            f"(acceptance 1.0); '{ACCEPTED}': the kept ones; acceptance_rate: kept / drawn")
    result.counts.update({"samples_drawn": len(drawn["label"]), "samples": len(sets[""])})
    result.metrics["samples"] = float(len(sets[""]))
    for suffix, index in sets.items():
        chosen = {name: values[index] for name, values in drawn.items()}
        result.metrics.update(domain_figures(chosen, recon, setup, suffix))
        if nets.inception_path:
            clock = Stopwatch()
            result.metrics.update(inception_figures(ctx, setup, nets, recon, chosen, suffix))
            result.seconds[f"sample_inception_features{suffix}"] = clock()
        if ecfg.inception_is_weights:
            result.metrics[f"is_inception{suffix}"], result.metrics[f"is_inception_std{suffix}"] = \
                is_from_torch_fidelity(chosen["image"], ecfg.inception_is_weights)
    result.how["is_inception"] = (
        "torch-fidelity inception-v3-compat logits, 10 splits after a fixed shuffle" if ecfg.inception_is_weights
        else "unavailable: the offline FID network has no logits; set evaluate.inception_is_weights to "
             "torch-fidelity's weights-inception-2015-12-05 file")
    state = nets.evaluation.state
    result.how["domain"] = (
        f"evaluation network: {describe(nets.evaluation)}; {state['feature_dim']}-d penultimate features for FID "
        f"and precision/recall (k = 3, against a balanced reference subset of the same size), its softmax for "
        f"IS (10 splits after a fixed shuffle: order-free) and class agreement")
    shown = sets.get(ACCEPTED, sets[""])
    result.files["samples_grid.png"] = grid_png(drawn["image"][shown], drawn["label"][shown],
                                                min(per_class, GRID_PER_ROW))
    accepted = np.zeros(len(drawn["label"]), dtype=bool)
    accepted[sets.get(ACCEPTED, sets[""])] = True
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=drawn["image"], labels=drawn["label"], codes=drawn["codes"],
                        first_per_class=np.isin(np.arange(len(accepted)), sets[""]), accepted=accepted)
    result.files["samples.npz"] = buffer.getvalue()
    return result


def draw_samples(ctx: StageContext, setup: Setup, nets: FeatureNetworks,
                 sampling: dict) -> tuple[dict[str, np.ndarray], int]:
    """`draw` samples per class with their evaluation-network features (and rejection-network probabilities
    when rejecting), sorted by label (stable: draw order within a class); returns them and draw."""
    ecfg, per_class = setup.ecfg, setup.ecfg.samples_per_class
    draw = int(np.ceil(per_class / ecfg.rejection_acceptance)) if ecfg.rejection_acceptance else per_class
    labels = balanced_labels(max(setup.num_classes, 1), draw).numpy()
    chunks = [{"labels": labels[i:i + ecfg.batch_size].tolist(), "seed": ecfg.seed * 1_000_003 + n}
              for n, i in enumerate(range(0, len(labels), ecfg.batch_size))]
    sampled = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
        SampleImages, fn_constructor_kwargs={"transformer_uri": ctx.uri_of("transformer"),
                                             "tokenizer_uri": ctx.uri_of("tokenizer"), "settings": sampling,
                                             "render_uri": ctx.uri_of("render") if "render" in ctx.inputs else None,
                                             **setup.actor_args},
        **{**setup.pool, "batch_size": 1})  # a chunk per call: each chunk carries its own seed
    drawn = collect(sampled.map_batches(ImageFeatures, fn_constructor_kwargs=image_features_args(
        ctx, setup, nets, parts=["domain"], recon_parts=None, keep_images=True,
        rank_for_rejection=bool(ecfg.rejection_acceptance)), **setup.pool))
    # `collect` keeps the chunks' order, so "stable" means the same order on every run (ties in rejection too).
    order = np.lexsort((np.arange(len(drawn["label"])), drawn["label"]))
    return {k: v[order] for k, v in drawn.items()}, draw


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first `per_class` rows of every class, in row order: an unselected sample set."""
    rank = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        rank[index] = np.arange(len(index))
    return np.flatnonzero(rank < per_class)


def rejection(scores: np.ndarray, labels: np.ndarray, per_class: int) -> np.ndarray:
    """Per class, the indices (sorted) of the `per_class` candidates the ranking network's probabilities
    `scores` find most likely of that class; ties keep row order."""
    likelihood = scores[np.arange(len(labels)), labels]
    keep = []
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        keep.extend(index[np.argsort(-likelihood[index], kind="stable")[:per_class]])
    return np.sort(np.asarray(keep, dtype=np.intp))


def domain_figures(chosen: dict[str, np.ndarray], recon: Reconstruction, setup: Setup,
                   suffix: str) -> dict[str, float]:
    """FID, IS, class agreement and precision/recall of one sample set in the evaluation network's space."""
    features = chosen["domain_features"]
    figures = {"fid_domain": setup.frechet(recon.domain.reference, GaussianStats.of(features))}
    figures["is_domain"], figures["is_domain_std"] = inception_score(chosen["domain_probs"])
    figures["sample_class_agreement_domain"] = float((chosen["domain_probs"].argmax(1) == chosen["label"]).mean())
    figures["precision_domain"], figures["recall_domain"] = precision_recall(recon.domain.reference_subset,
                                                                             features)
    return {f"{name}{suffix}": value for name, value in figures.items()}


def inception_figures(ctx: StageContext, setup: Setup, nets: FeatureNetworks, recon: Reconstruction,
                      chosen: dict[str, np.ndarray], suffix: str) -> dict[str, float]:
    """Inception FID and precision/recall of a balanced, seeded subset of one sample set, as large as the
    reference subset it meets (evaluate.inception_images caps both)."""
    size = len(recon.inception.reference_subset)
    pick = balanced_indices(chosen["label"], size, setup.ecfg.seed)
    kept = ray.data.from_items([{"image": image, "label": label} for image, label in
                                zip(chosen["image"][pick], chosen["label"][pick])])
    features = collect(kept.map_batches(ImageFeatures, fn_constructor_kwargs=image_features_args(
        ctx, setup, nets, parts=["inception"], recon_parts=None, keep_images=False), **setup.pool))["inception"]
    figures = {"fid_inception": setup.frechet(recon.inception.reference, GaussianStats.of(features))}
    figures["precision_inception"], figures["recall_inception"] = precision_recall(
        recon.inception.reference_subset, features)
    return {f"{name}{suffix}": value for name, value in figures.items()}


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
