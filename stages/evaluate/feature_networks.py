"""Part 1, feature networks: the domain classifier (always) and TF-Inception (when its weights exist)."""
from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.transforms import center, to_float
from pipeline.metrics.inception import InceptionUnavailable, find_fid_inception
from pipeline.models.domain_classifier import train_domain_classifier
from pipeline.stage import StageContext
from stages.datasets import shard_dataset
from stages.evaluate.common import CACHE, PartResult, Setup, Stopwatch, collect

DOMAIN_VAL_IMAGES = 2000  # enough for a stable val top-1 of the domain classifier


@dataclass
class FeatureNetworks(PartResult):
    domain_state: dict | None = None  # what `load_domain_classifier` rebuilds the classifier from
    domain_info: dict | None = None  # val_top1, train_images, epochs, seconds
    inception_path: str | None = None  # None: no Inception figures


def feature_networks(ctx: StageContext, setup: Setup) -> FeatureNetworks:
    clock = Stopwatch()
    state, info = domain_classifier(ctx, setup)
    result = FeatureNetworks(metrics={"domain_classifier_val_top1": info["val_top1"]},
                             seconds={"domain_classifier": clock()}, domain_state=state, domain_info=info)
    if setup.ecfg.inception_fid:
        try:
            result.inception_path = str(find_fid_inception(setup.ecfg.inception_fid_weights))
        except InceptionUnavailable as missing:
            ctx.log.warning("%s", missing)
            result.how["fid_inception"] = f"unavailable: {missing}"
    return result


def domain_classifier(ctx: StageContext, setup: Setup) -> tuple[dict, dict]:
    """Train (or reuse, per ingest fingerprint) the small CNN; returns its state and val accuracy."""
    ecfg, image_size = setup.ecfg, setup.image_size
    ingest = ctx.inputs["ingest"]
    # Everything the classifier depends on is in the key: the seed too, or a cache from another seed would
    # answer; "first" names the subset (the first images in shard order; caches of older, timing-dependent
    # subsets are not reused).
    key = (f"domain-{ingest.fingerprint}-first{ecfg.domain_train_images}-{ecfg.domain_epochs}-{ecfg.domain_width}-"
           f"{image_size}-seed{ecfg.seed}.pt")
    if ctx.run_dir.exists(CACHE, key):
        stored = torch.load(io.BytesIO(ctx.run_dir.read_bytes(CACHE, key)), weights_only=True)
        return stored["state"], stored["info"]
    num_classes = int(ingest.details.get("num_classes", 0))
    read_cpus = ecfg.cpus_per_task
    # The first images of each split in shard order (ingest shuffled them into shards by its seed), read in
    # order (`collect`): the same images in the same order on every run.
    train = collect(shard_dataset(ctx, "train", read_cpus=read_cpus).limit(ecfg.domain_train_images))
    val = collect(shard_dataset(ctx, setup.val_split, read_cpus=read_cpus).limit(DOMAIN_VAL_IMAGES))

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


def image_features_args(ctx: StageContext, setup: Setup, nets: FeatureNetworks, parts: list[str],
                        recon_parts: list[str] | None, keep_images: bool) -> dict:
    """`fn_constructor_kwargs` of an `ImageFeatures` pool over these feature networks."""
    return {"tokenizer_uri": ctx.uri_of("tokenizer"), "domain": nets.domain_state,
            "inception_path": nets.inception_path, "image_size": setup.image_size, "parts": parts,
            "recon_parts": recon_parts, "keep_images": keep_images, **setup.actor_args}
