"""Evaluate: samples, FID/IS (Inception and domain), tokenizer reconstruction quality, linear probe.

Every figure says how it was computed (metrics.json carries a `how` entry per group). Heavy work runs as
Ray Data batch inference on actor pools: class-balanced sampling (transformer + tokenizer decode) and
feature extraction (Inception pool3, the domain classifier, reconstructions, transformer block
features). The driver only fits the small things: the domain classifier, Gaussian statistics, probes.

Metric names: `fid_inception` / `rfid_inception` use the standard TF-Inception pool features;
`fid_domain`, `is_domain`, `rfid_domain` use a CNN trained on this data set's train split and are never
reported under the Inception names. IS with Inception needs logits, which the offline FID network
lacks; it is computed only when `evaluate.inception_is_weights` points at torch-fidelity's weights.
"""
from __future__ import annotations

import io
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import ray
import torch

from pipeline.config import EvaluateConfig, PipelineConfig
from pipeline.metrics.codebook import CodebookUsage
from pipeline.metrics.fid import GaussianStats, fid_from_stats
from pipeline.metrics.image_quality import psnr, ssim
from pipeline.metrics.inception import InceptionFeatures, InceptionUnavailable, find_fid_inception
from pipeline.metrics.inception_score import inception_score
from pipeline.metrics.probe import linear_probe
from pipeline.models.domain_classifier import DomainClassifier, train_domain_classifier
from pipeline.models.sampling import SamplingSettings, balanced_labels, sample_tokens
from pipeline.models.tokenizer import load_tokenizer
from pipeline.models.transformer import load_transformer
from pipeline.stage import StageContext, StageResult
from pipeline.storage import RunDir
from pipeline.viz import make_grid

CACHE = "_cache"


# ---------------------------------------------------------------------------------------------
# Actors


def _local_folder(location: str) -> str:
    from stages.pretokenize import fetch_tokenizer

    return fetch_tokenizer(location)


def _load_domain(state: dict) -> DomainClassifier:
    model = DomainClassifier(state["num_classes"], state["width"], state["feature_dim"])
    model(torch.zeros(1, 3, state["size"], state["size"]))
    model.load_state_dict(state["weights"])
    return model.eval()


class SampleImages:
    """Actor: token grids from the transformer for a chunk of labels, decoded to images by the tokenizer."""

    def __init__(self, run_dir: str, settings: dict, threads: int, use_gpu: bool):
        torch.set_num_threads(threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        root = RunDir(run_dir)
        self.transformer = load_transformer(_local_folder(root.uri("transformer")), device)
        self.tokenizer = load_tokenizer(_local_folder(root.uri("tokenizer")), device)
        self.settings = SamplingSettings(**settings)

    def __call__(self, chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, labels, codes = [], [], []
        for chunk_labels, seed in zip(chunk["labels"], chunk["seed"]):
            label_tensor = torch.as_tensor(np.asarray(chunk_labels), dtype=torch.long)
            conditional = self.transformer.settings.num_classes > 0
            generator = torch.Generator().manual_seed(int(seed))
            tokens = sample_tokens(self.transformer, label_tensor if conditional else None, self.settings,
                                   generator, batch=len(label_tensor))
            grid = self.tokenizer.settings.grid
            pixels = self.tokenizer.decode(tokens.view(-1, grid, grid))
            images.append(pixels.mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy())
            labels.append(label_tensor.numpy())
            codes.append(tokens.cpu().numpy().astype(np.int16))
        return {"image": np.concatenate(images), "label": np.concatenate(labels), "codes": np.concatenate(codes)}


class ImageFeatures:
    """Actor: per uint8 image, the feature sets named in `parts`: "domain" (domain-classifier features and
    probabilities), "inception" (TF-Inception pool3). With `recon_parts` (not None), the tokenizer's
    reconstruction too: those feature sets of it, PSNR, SSIM and the codes. `keep_images` passes the
    images through."""

    def __init__(self, run_dir: str, domain: dict, inception_path: str | None, parts: list[str],
                 recon_parts: list[str] | None, keep_images: bool, image_size: int, threads: int, use_gpu: bool):
        torch.set_num_threads(threads)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        wanted = set(parts) | set(recon_parts or ())
        self.domain = _load_domain(domain).to(self.device) if "domain" in wanted else None
        self.inception = InceptionFeatures(inception_path, self.device) if "inception" in wanted else None
        self.tokenizer = (load_tokenizer(_local_folder(RunDir(run_dir).uri("tokenizer")), self.device)
                          if recon_parts is not None else None)
        self.parts, self.recon_parts = set(parts), set(recon_parts or ())
        self.keep_images, self.image_size = keep_images, image_size

    def _features(self, images: torch.Tensor, prefix: str, parts: set[str], out: dict) -> None:
        if "domain" in parts:
            with torch.no_grad():
                features = self.domain.features(images)
                out[f"{prefix}domain_features"] = features.cpu().numpy()
                out[f"{prefix}domain_probs"] = self.domain.classifier(features).softmax(-1).cpu().numpy()
        if "inception" in parts:
            out[f"{prefix}inception"] = self.inception(images).astype(np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.data.transforms import center, to_float

        images = center(to_float(torch.from_numpy(np.ascontiguousarray(batch["image"]))), self.image_size)
        images = images.to(self.device)
        out = {"label": np.asarray(batch["label"])}
        if self.keep_images:
            out["image"] = np.asarray(batch["image"])
        if "codes" in batch:
            out["codes"] = codes_matrix_from_numpy(batch["codes"])
        self._features(images, "", self.parts, out)
        if self.tokenizer is not None:
            with torch.no_grad():
                codes = self.tokenizer.encode(images)
                reconstruction = self.tokenizer.decode(codes)
            self._features(reconstruction, "recon_", self.recon_parts, out)
            out["psnr"] = psnr(reconstruction, images).cpu().numpy()
            out["ssim"] = ssim(reconstruction, images).cpu().numpy()
            out["codes"] = codes.flatten(1).cpu().numpy().astype(np.int16)
        return out


class BlockFeatures:
    """Actor: average-pooled token features of every transformer block (null class: no label leaks in)."""

    def __init__(self, run_dir: str, blocks: list[int], threads: int, use_gpu: bool):
        torch.set_num_threads(threads)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = load_transformer(_local_folder(RunDir(run_dir).uri("transformer")), self.device)
        self.blocks = blocks

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = torch.as_tensor(codes_matrix_from_numpy(batch["codes"]), dtype=torch.long, device=self.device)
        pooled = self.model.pooled_block_features(tokens, self.blocks)
        return {"label": np.asarray(batch["label"]), "split": np.asarray(batch["split"]),
                "features": pooled.cpu().numpy()}


def codes_matrix_from_numpy(column) -> np.ndarray:
    return np.stack(list(column)) if getattr(column, "dtype", None) == object else np.asarray(column)


# ---------------------------------------------------------------------------------------------
# Driver-side pieces


def _pool(ecfg: EvaluateConfig) -> dict:
    return {"compute": ray.data.ActorPoolStrategy(size=ecfg.actors), "num_cpus": ecfg.cpus_per_actor,
            "num_gpus": ecfg.gpus_per_actor, "batch_size": ecfg.batch_size}


def _actor_args(ecfg: EvaluateConfig) -> dict:
    return {"threads": max(1, round(ecfg.cpus_per_actor)), "use_gpu": ecfg.gpus_per_actor > 0}


def _collect(dataset: ray.data.Dataset) -> dict[str, np.ndarray]:
    parts: dict[str, list] = {}
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    return {key: np.concatenate(values) for key, values in parts.items()}


def _domain_classifier(ctx: StageContext, ecfg: EvaluateConfig, image_size: int) -> tuple[dict, dict]:
    """Train (or reuse, per ingest fingerprint) the small CNN; returns its state and val accuracy."""
    from stages.datasets import shard_dataset

    ingest = ctx.inputs["ingest"]
    key = (f"domain-{ingest.fingerprint}-{ecfg.domain_train_images}-{ecfg.domain_epochs}-{ecfg.domain_width}-"
           f"{image_size}.pt")
    if ctx.run_dir.exists(CACHE, key):
        stored = torch.load(io.BytesIO(ctx.run_dir.read_bytes(CACHE, key)), weights_only=True)
        return stored["state"], stored["info"]
    num_classes = int(ingest.details.get("num_classes", 0))
    read_cpus = ecfg.cpus_per_task
    train = _collect(shard_dataset(ctx.run_dir, ingest, "train", read_cpus=read_cpus).limit(ecfg.domain_train_images))
    val_split = "val" if "val" in ingest.outputs["shards"] else "train"
    val = _collect(shard_dataset(ctx.run_dir, ingest, val_split, read_cpus=read_cpus).limit(2000))
    from pipeline.data.transforms import center, to_float

    def prepare(images: np.ndarray) -> torch.Tensor:
        return center(to_float(torch.from_numpy(np.ascontiguousarray(images))), image_size)

    started = time.perf_counter()
    model = train_domain_classifier(prepare(train["image"]), torch.as_tensor(train["label"]), num_classes,
                                    epochs=ecfg.domain_epochs, seed=ecfg.seed, width=ecfg.domain_width)
    with torch.no_grad():
        accuracy = float((model(prepare(val["image"])).argmax(1).numpy() == val["label"]).mean())
    state = {"num_classes": num_classes, "width": model.width, "feature_dim": model.feature_dim,
             "size": image_size, "weights": model.state_dict()}
    info = {"val_top1": accuracy, "train_images": len(train["label"]), "epochs": ecfg.domain_epochs,
            "seconds": time.perf_counter() - started}
    buffer = io.BytesIO()
    torch.save({"state": state, "info": info}, buffer)
    ctx.run_dir.write_bytes(buffer.getvalue(), CACHE, key)
    return state, info


def _reference_inception(ctx: StageContext, val_ds: ray.data.Dataset, cap: int, common: dict, pool: dict,
                         split: str) -> tuple[GaussianStats, GaussianStats]:
    """Inception statistics of the first `cap` real images (cached per ingest, weights file and cap) and
    of their reconstructions (per run: the tokenizer changes)."""
    inception_name = Path(common["inception_path"]).name
    cache_key = f"ref-inception-{ctx.inputs['ingest'].fingerprint}-{split}-{cap}-{inception_name}.npz"
    cached = ctx.run_dir.exists(CACHE, cache_key)
    features = _collect(val_ds.limit(cap).map_batches(ImageFeatures, fn_constructor_kwargs={
        **common, "parts": [] if cached else ["inception"], "recon_parts": ["inception"], "keep_images": False},
        **pool))
    if cached:
        reference = GaussianStats.load(io.BytesIO(ctx.run_dir.read_bytes(CACHE, cache_key)))
    else:
        reference = GaussianStats.of(features["inception"])
        reference.save(buffer := io.BytesIO())
        ctx.run_dir.write_bytes(buffer.getvalue(), CACHE, cache_key)
    reference.save(buffer := io.BytesIO())
    ctx.run_dir.write_bytes(buffer.getvalue(), ctx.folder, f"ref_stats_{split}.npz")
    return reference, GaussianStats.of(features["recon_inception"])


def _is_from_torch_fidelity(images: np.ndarray, weights: str) -> tuple[float, float]:
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


def _rejection(samples: dict, per_class: int) -> tuple[dict, float]:
    """Per class, keep the `per_class` candidates the domain classifier finds most likely of that class."""
    scores = samples["domain_probs"][np.arange(len(samples["label"])), samples["label"]]
    keep = []
    for label in np.unique(samples["label"]):
        index = np.flatnonzero(samples["label"] == label)
        keep.extend(index[np.argsort(-scores[index])[:per_class]])
    keep = np.sort(np.asarray(keep))
    return {k: v[keep] for k, v in samples.items()}, len(keep) / len(samples["label"])


def _grid_png(images: np.ndarray, labels: np.ndarray, per_row: int) -> bytes:
    from PIL import Image

    rows = []
    for label in np.unique(labels):
        picked = images[labels == label][:per_row]
        rows.extend(list(picked) + [np.zeros_like(images[0])] * (per_row - len(picked)))
    grid = make_grid(rows, columns=per_row, scale=max(1, 64 // images.shape[1]))
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    return buffer.getvalue()


def _probe_plot(blocks: list[int], accuracies: list[float], baseline: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.2), dpi=120)
    axis.plot(blocks, [100 * a for a in accuracies], marker="o", label="VIM block features")
    axis.axhline(100 * baseline, color="grey", linestyle="--", label="raw pixels")
    axis.set_xlabel("block (0-based)")
    axis.set_ylabel("linear probe top-1 (%)")
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# The stage


def run(cfg: PipelineConfig, ctx: StageContext) -> StageResult:
    from stages.datasets import shard_dataset

    ecfg, run_dir, folder, log = cfg.evaluate, ctx.run_dir, ctx.folder, ctx.log
    ingest, codes_manifest = ctx.inputs["ingest"], ctx.inputs["pretokenize"]
    transformer = ctx.inputs["transformer"]
    settings = transformer.outputs["settings"]
    num_classes = int(settings["num_classes"])
    image_size = int(codes_manifest.outputs["image_size"])
    val_split = "val" if "val" in ingest.outputs["shards"] else "train"
    metrics: dict[str, float] = {}
    how: dict[str, str] = {}
    timings: dict[str, float] = {}

    # 1. Feature networks: the domain classifier (always) and TF-Inception (when its weights exist).
    started = time.perf_counter()
    domain_state, domain_info = _domain_classifier(ctx, ecfg, image_size)
    metrics["domain_classifier_val_top1"] = domain_info["val_top1"]
    timings["domain_classifier"] = time.perf_counter() - started
    inception_path = None
    if ecfg.inception_fid:
        try:
            inception_path = str(find_fid_inception(ecfg.inception_fid_weights))
        except InceptionUnavailable as missing:
            log.warning("%s", missing)
            how["fid_inception"] = f"unavailable: {missing}"

    # 2. Real val images (the reference set) and their reconstructions, through the feature actors. Domain
    # features are cheap and cover the whole reference set; Inception runs on a capped prefix of it.
    started = time.perf_counter()
    common = {"run_dir": run_dir.location, "domain": domain_state, "inception_path": inception_path,
              "image_size": image_size, **_actor_args(ecfg)}
    pool = _pool(ecfg)
    val_ds = shard_dataset(run_dir, ingest, val_split, read_cpus=ecfg.cpus_per_task)
    real_ds = val_ds.limit(max(ecfg.recon_images, ecfg.reference_images)) if ecfg.reference_images else val_ds
    real = _collect(real_ds.map_batches(ImageFeatures, fn_constructor_kwargs={
        **common, "parts": ["domain"], "recon_parts": ["domain"], "keep_images": False}, **pool))
    n_recon = min(ecfg.recon_images, len(real["label"]))
    metrics.update({"recon_psnr": float(real["psnr"][:n_recon].mean()),
                    "recon_ssim": float(real["ssim"][:n_recon].mean()), "recon_images": float(n_recon)})
    usage = CodebookUsage(int(codes_manifest.outputs["codebook_size"]))
    usage.update(real["codes"][:n_recon].astype(np.int64))
    metrics.update({f"recon_{k}": v for k, v in usage.result().items()})
    reference_domain = GaussianStats.of(real["domain_features"])
    frechet = partial(fid_from_stats, method=ecfg.fid_method)
    metrics["rfid_domain"] = frechet(reference_domain, GaussianStats.of(real["recon_domain_features"][:n_recon]))
    inception_cap = ecfg.inception_images or len(real["label"])
    if inception_path:
        reference, recon_inception = _reference_inception(ctx, val_ds, inception_cap, common, pool, val_split)
        metrics["rfid_inception"] = frechet(reference, recon_inception)
        how["fid_inception"] = (f"TF-Inception pool3 (2048-d, {Path(inception_path).name}), 8-bit input, TF1 "
                                f"bilinear resize to 299, float64 Frechet distance by {ecfg.fid_method}; "
                                f"reference: {reference.count} "
                                f"{val_split} images, cached as {folder}/ref_stats_{val_split}.npz")
    how["reconstruction"] = (f"{n_recon} {val_split} images through encode/decode; PSNR on [0,1] pixels, SSIM with "
                             f"an 11x11 Gaussian window (sigma 1.5); rFID_domain vs {len(real['label'])} real images")
    timings["real_and_reconstruction_features"] = time.perf_counter() - started

    # 3. Class-balanced samples (over-sampled for rejection), decoded and scored by the domain classifier.
    started = time.perf_counter()
    per_class = ecfg.samples_per_class
    draw = int(np.ceil(per_class / ecfg.rejection_acceptance)) if ecfg.rejection_acceptance else per_class
    labels = balanced_labels(max(num_classes, 1), draw).numpy()
    chunks = [{"labels": labels[i:i + ecfg.batch_size].tolist(), "seed": ecfg.seed * 1_000_003 + n}
              for n, i in enumerate(range(0, len(labels), ecfg.batch_size))]
    sampling = {"temperature": ecfg.temperature, "top_k": ecfg.top_k, "top_p": ecfg.top_p,
                "guidance_scale": ecfg.guidance_scale}
    sampled = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
        SampleImages, fn_constructor_kwargs={"run_dir": run_dir.location, "settings": sampling, **_actor_args(ecfg)},
        **{**pool, "batch_size": 1})
    samples = _collect(sampled.map_batches(ImageFeatures, fn_constructor_kwargs={
        **common, "parts": ["domain"], "recon_parts": None, "keep_images": True}, **pool))
    order = np.lexsort((np.arange(len(samples["label"])), samples["label"]))
    samples = {k: v[order] for k, v in samples.items()}
    timings["sampling"] = time.perf_counter() - started
    if ecfg.rejection_acceptance:
        samples, acceptance = _rejection(samples, per_class)
        metrics["acceptance_rate"] = acceptance
        how["rejection"] = (f"drew {draw} per class, kept the {per_class} the domain classifier finds most likely "
                            f"of their intended class")
    metrics["samples"] = float(len(samples["label"]))
    metrics["fid_domain"] = frechet(reference_domain, GaussianStats.of(samples["domain_features"]))
    metrics["is_domain"], metrics["is_domain_std"] = inception_score(samples["domain_probs"])
    metrics["sample_class_agreement_domain"] = float((samples["domain_probs"].argmax(1) == samples["label"]).mean())
    if inception_path:
        started = time.perf_counter()
        kept = ray.data.from_items([{"image": image, "label": label} for image, label in
                                    zip(samples["image"][:inception_cap], samples["label"][:inception_cap])])
        inception = _collect(kept.map_batches(ImageFeatures, fn_constructor_kwargs={
            **common, "parts": ["inception"], "recon_parts": None, "keep_images": False}, **pool))
        metrics["fid_inception"] = frechet(reference, GaussianStats.of(inception["inception"]))
        timings["sample_inception_features"] = time.perf_counter() - started
    if ecfg.inception_is_weights:
        metrics["is_inception"], metrics["is_inception_std"] = _is_from_torch_fidelity(samples["image"],
                                                                                      ecfg.inception_is_weights)
        how["is_inception"] = "torch-fidelity inception-v3-compat logits, 10 splits"
    else:
        how["is_inception"] = ("unavailable: the offline FID network has no logits; set evaluate.inception_is_weights "
                               "to torch-fidelity's weights-inception-2015-12-05 file")
    how["domain"] = (f"CNN (width {domain_state['width']}) trained on {domain_info['train_images']} train images for "
                     f"{domain_info['epochs']} epochs (val top-1 {domain_info['val_top1']:.3f}); "
                     f"{domain_state['feature_dim']}-d penultimate features; IS over 10 splits")

    # 4. Linear probe on frozen transformer blocks vs raw pixels, same images.
    started = time.perf_counter()
    depth = len(load_transformer_blocks(run_dir))
    blocks = ecfg.probe_blocks if ecfg.probe_blocks is not None else list(range(depth))
    # The plain-view codes are small: read them here, then both splits go through one actor pool (actor
    # start-up dominates at this size). Reading inside the pooled dataset would wait on the pool's CPUs.
    rows: dict[str, list] = {"codes": [], "label": [], "split": []}
    for split_id, (split, limit) in enumerate((("train", ecfg.probe_train_images),
                                               (val_split, ecfg.probe_val_images))):
        files = [run_dir.uri("codes", name) for name in codes_manifest.outputs["codes"][split]]
        plain = _collect(ray.data.read_parquet(files, columns=["codes", "label", "view"]).filter(
            expr="view == 0").limit(limit))
        rows["codes"].extend(codes_matrix_from_numpy(plain["codes"]))
        rows["label"].extend(plain["label"].tolist())
        rows["split"].extend([split_id] * len(plain["label"]))
    probe_rows = [{"codes": c, "label": l, "split": s} for c, l, s in zip(rows["codes"], rows["label"], rows["split"])]
    block_features = _collect(ray.data.from_items(probe_rows).map_batches(
        BlockFeatures, fn_constructor_kwargs={"run_dir": run_dir.location, "blocks": blocks, **_actor_args(ecfg)},
        **pool))
    probe_sets = {split: {k: v[block_features["split"] == split_id] for k, v in block_features.items()}
                  for split_id, split in enumerate(("train", val_split))}
    train_f, val_f = probe_sets["train"], probe_sets[val_split]
    accuracies = []
    for index, block in enumerate(blocks):
        result = linear_probe(train_f["features"][:, index], train_f["label"], val_f["features"][:, index],
                              val_f["label"], max(num_classes, 2))
        accuracies.append(result["top1"])
        metrics[f"probe_top1_block_{block}"] = result["top1"]
    best = int(np.argmax(accuracies))
    metrics.update({"probe_top1_best": accuracies[best], "probe_best_block": float(blocks[best])})
    pixel_train = _collect(shard_dataset(run_dir, ingest, "train", read_cpus=ecfg.cpus_per_task).limit(
        ecfg.probe_train_images))
    pixel_val = _collect(shard_dataset(run_dir, ingest, val_split, read_cpus=ecfg.cpus_per_task).limit(
        ecfg.probe_val_images))
    (train_pixels, val_pixels), pixel_note = _pixel_vectors(pixel_train["image"], pixel_val["image"])
    pixels = linear_probe(train_pixels, pixel_train["label"], val_pixels, pixel_val["label"], max(num_classes, 2))
    metrics["probe_top1_pixels"] = pixels["top1"]
    how["probe"] = (f"average-pooled block output over all tokens (null class token), standardised, softmax layer "
                    f"by L-BFGS (L2 1e-4); {len(train_f['label'])} train / {len(val_f['label'])} {val_split} images, "
                    f"plain view; baseline: the same on raw pixels ({pixel_note})")
    timings["probe"] = time.perf_counter() - started

    # 5. Outputs: metrics.json, grids, raw samples; all to MLflow.
    per_row = min(per_class, 10)
    artifacts = {
        "samples_grid.png": _grid_png(samples["image"], samples["label"], per_row),
        "reconstructions.png": _reconstruction_grid(run_dir, ingest, val_split, image_size),
        "probe_accuracy_per_block.png": _probe_plot(blocks, accuracies, pixels["top1"]),
    }
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=samples["image"], labels=samples["label"], codes=samples["codes"])
    artifacts["samples.npz"] = buffer.getvalue()
    for name, data in artifacts.items():
        run_dir.write_bytes(data, folder, name)
        if name.endswith(".png"):
            ctx.tracker.log_artifact_bytes(data, name)
    report = {"metrics": metrics, "how": how, "seconds": timings,
              "sampling": {**sampling, "samples_per_class": per_class, "seed": ecfg.seed,
                           "rejection_acceptance": ecfg.rejection_acceptance}}
    run_dir.write_json(report, folder, "metrics.json")
    ctx.tracker.log_dict(report, "metrics.json")
    ctx.tracker.set_tags({f"vim.how.{k}": v[:4900] for k, v in how.items()})
    _print_table(metrics, how)
    return StageResult(outputs={"metrics": "metrics.json", **{n: n for n in artifacts}},
                       counts={"samples": int(metrics["samples"]), "recon_images": n_recon,
                               "probe_train": len(train_f["label"]), "probe_val": len(val_f["label"])},
                       metrics=metrics, details={"how": how, "seconds": timings})


def _pixel_vectors(*image_sets: np.ndarray) -> tuple[list[np.ndarray], str]:
    """Flattened [0, 1] pixels for the baseline probe. Grey data stored as RGB (Fashion-MNIST) keeps one
    channel: the copies add no information but triple the probe's cost (83 s vs 27 s on 2 cores)."""
    grey = all(np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(images[..., 0], images[..., 2])
               for images in image_sets if images.ndim == 4 and images.shape[-1] == 3)
    kept = [images[..., :1] if grey and images.ndim == 4 else images for images in image_sets]
    vectors = [images.reshape(len(images), -1).astype(np.float64) / 255 for images in kept]
    return vectors, f"{vectors[0].shape[1]} values per image" + (", one channel of grey images" if grey else "")


def load_transformer_blocks(run_dir: RunDir) -> list[int]:
    settings = json.loads(run_dir.read_bytes("transformer", "config.json"))
    from pipeline.models.transformer import VIM_SIZES

    return list(range(VIM_SIZES[settings["size"]].depth))


def _reconstruction_grid(run_dir: RunDir, ingest, split: str, image_size: int) -> bytes:
    """Eight val images over their reconstructions."""
    from PIL import Image

    from pipeline.data.shards import iter_samples
    from pipeline.data.transforms import center, to_float

    first = ingest.outputs["shards"][split][0]
    originals = []
    for sample in iter_samples(run_dir.uri("shards", first)):
        originals.append(sample["image"])
        if len(originals) == 8:
            break
    images = center(to_float(torch.from_numpy(np.stack(originals))), image_size)
    tokenizer = load_tokenizer(_local_folder(run_dir.uri("tokenizer")))
    with torch.no_grad():
        reconstruction = tokenizer.decode(tokenizer.encode(images))
    rows = torch.cat([images, reconstruction]).permute(0, 2, 3, 1).mul(255).round().byte().numpy()
    buffer = io.BytesIO()
    Image.fromarray(make_grid(list(rows), columns=8, scale=max(1, 64 // image_size))).save(buffer, format="PNG")
    return buffer.getvalue()


def _print_table(metrics: dict[str, float], how: dict[str, str]) -> None:
    rows = [("tokenizer", "rFID (Inception)", "rfid_inception"), ("tokenizer", "rFID (domain)", "rfid_domain"),
            ("tokenizer", "PSNR dB", "recon_psnr"), ("tokenizer", "SSIM", "recon_ssim"),
            ("tokenizer", "usage per 256", "recon_usage_per_256"), ("tokenizer", "perplexity", "recon_perplexity"),
            ("samples", "FID (Inception)", "fid_inception"), ("samples", "IS (Inception)", "is_inception"),
            ("samples", "FID (domain)", "fid_domain"), ("samples", "IS (domain)", "is_domain"),
            ("samples", "class agreement (domain)", "sample_class_agreement_domain"),
            ("samples", "acceptance rate", "acceptance_rate"),
            ("probe", "best block top-1", "probe_top1_best"), ("probe", "best block", "probe_best_block"),
            ("probe", "raw pixels top-1", "probe_top1_pixels")]
    print("\nevaluation            metric                       value")
    print("-" * 64)
    for group, name, key in rows:
        value = f"{metrics[key]:.4g}" if key in metrics else "n/a"
        print(f"{group:<20}  {name:<27}  {value}")
    for key, text in how.items():
        print(f"  [{key}] {text}")
