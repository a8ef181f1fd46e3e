"""Part 1, feature networks: the evaluation network (a domain classifier that grades every sample figure),
the rejection network (a second domain classifier that only ranks candidates for rejection sampling) and
TF-Inception (when its weights exist).

The two classifiers are different networks by construction: the rejection network trains on the train
images that follow the evaluation network's, with another seed, so a sample chosen because one network likes
it is graded by a network that did not choose it (the paper ranks with a ResNet and scores with Inception)."""
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

DOMAIN_VAL_IMAGES = 2000  # enough for a stable val top-1 of the domain classifiers
MIN_REJECTION_TRAIN_IMAGES = 32  # fewer leave the rejection network guessing
REJECTION_SEED_OFFSET = 1  # the rejection network's seed: evaluate.seed + 1


@dataclass
class Classifier:
    """A trained domain classifier: what `load_domain_classifier` rebuilds it from, and how it was made."""

    state: dict  # num_classes, width, feature_dim, size, weights
    info: dict  # val_top1, train_images, first_train_image, epochs, seed, seconds


@dataclass
class FeatureNetworks(PartResult):
    evaluation: Classifier | None = None
    rejection: Classifier | None = None  # None without rejection sampling
    inception_path: str | None = None  # None: no Inception figures


def feature_networks(ctx: StageContext, setup: Setup) -> FeatureNetworks:
    ecfg = setup.ecfg
    clock = Stopwatch()
    result = FeatureNetworks(evaluation=domain_classifier(ctx, setup, first=0, seed=ecfg.seed))
    result.metrics["domain_classifier_val_top1"] = result.evaluation.info["val_top1"]
    result.seconds["domain_classifier"] = clock()
    if ecfg.rejection_acceptance:
        clock = Stopwatch()
        result.rejection = domain_classifier(ctx, setup, first=ecfg.domain_train_images,
                                             seed=ecfg.seed + REJECTION_SEED_OFFSET)
        result.metrics["rejection_classifier_val_top1"] = result.rejection.info["val_top1"]
        result.seconds["rejection_classifier"] = clock()
    if ecfg.inception_fid:
        try:
            result.inception_path = str(find_fid_inception(ecfg.inception_fid_weights))
        except InceptionUnavailable as missing:
            ctx.log.warning("%s", missing)
            result.how["fid_inception"] = f"unavailable: {missing}"
    return result


def domain_classifier(ctx: StageContext, setup: Setup, first: int, seed: int) -> Classifier:
    """Train (or reuse, per ingest fingerprint) the small CNN on train images [first, first + n) in shard
    order, n = evaluate.domain_train_images (fewer when the split ends sooner)."""
    ecfg, image_size = setup.ecfg, setup.image_size
    ingest = ctx.inputs["ingest"]
    # Everything the classifier depends on is in the key: the seed and the image range too, or a cache of the
    # other network would answer.
    key = (f"domain-{ingest.fingerprint}-from{first}-first{ecfg.domain_train_images}-{ecfg.domain_epochs}-"
           f"{ecfg.domain_width}-{image_size}-seed{seed}.pt")
    if ctx.run_dir.exists(CACHE, key):
        stored = torch.load(io.BytesIO(ctx.run_dir.read_bytes(CACHE, key)), weights_only=True)
        return Classifier(stored["state"], stored["info"])
    num_classes = int(ingest.details.get("num_classes", 0))
    read_cpus = ecfg.cpus_per_task
    # Images in shard order (ingest shuffled them into shards by its seed), read in order (`collect`): the
    # same images in the same order on every run.
    train = collect(shard_dataset(ctx, "train", read_cpus=read_cpus).limit(first + ecfg.domain_train_images))
    train = {k: v[first:] for k, v in train.items()}
    if first and len(train["label"]) < MIN_REJECTION_TRAIN_IMAGES:
        raise ValueError(
            f"the rejection network trains on the train images after the evaluation network's first "
            f"{first} (evaluate.domain_train_images), but only {len(train['label'])} are left: lower "
            f"evaluate.domain_train_images to at most half the train split, or turn rejection off "
            f"(evaluate.rejection_acceptance: null)")
    val = collect(shard_dataset(ctx, setup.val_split, read_cpus=read_cpus).limit(DOMAIN_VAL_IMAGES))

    def prepare(images: np.ndarray) -> torch.Tensor:
        return center(to_float(torch.from_numpy(np.ascontiguousarray(images))), image_size)

    started = time.perf_counter()
    model = train_domain_classifier(prepare(train["image"]), torch.as_tensor(train["label"]), num_classes,
                                    epochs=ecfg.domain_epochs, seed=seed, width=ecfg.domain_width)
    with torch.no_grad():
        accuracy = float((model(prepare(val["image"])).argmax(1).numpy() == val["label"]).mean())
    state = {"num_classes": num_classes, "width": model.width, "feature_dim": model.feature_dim,
             "size": image_size, "weights": model.state_dict()}
    info = {"val_top1": accuracy, "train_images": len(train["label"]), "first_train_image": first,
            "epochs": ecfg.domain_epochs, "seed": seed, "seconds": time.perf_counter() - started}
    buffer = io.BytesIO()
    torch.save({"state": state, "info": info}, buffer)
    ctx.run_dir.write_bytes(buffer.getvalue(), CACHE, key)
    return Classifier(state, info)


def describe(classifier: Classifier) -> str:
    """One line on how a domain classifier was made, for the `how` texts."""
    state, info = classifier.state, classifier.info
    return (f"CNN (width {state['width']}, seed {info['seed']}) trained on train images "
            f"{info['first_train_image']}-{info['first_train_image'] + info['train_images'] - 1} for "
            f"{info['epochs']} epochs (val top-1 {info['val_top1']:.3f})")


def image_features_args(ctx: StageContext, setup: Setup, nets: FeatureNetworks, parts: list[str],
                        recon_parts: list[str] | None, keep_images: bool, rank_for_rejection: bool = False) -> dict:
    """`fn_constructor_kwargs` of an `ImageFeatures` pool over these feature networks."""
    return {"tokenizer_uri": ctx.uri_of("tokenizer"), "domain": nets.evaluation.state,
            "rejection": nets.rejection.state if rank_for_rejection else None,
            "inception_path": nets.inception_path, "image_size": setup.image_size, "parts": parts,
            "recon_parts": recon_parts, "keep_images": keep_images, **setup.actor_args}
