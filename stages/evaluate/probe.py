"""Part 4, linear probe: a softmax layer on frozen, average-pooled transformer block features versus the
same on raw pixels, same images; the per-block accuracy plot. Off when evaluate.probe_train_images is 0.

The probe feeds no label: the class position holds the start token of an unconditional model or the
null class of a conditional one, which only label dropout trains. The trained model's own settings decide,
so a transformer trained elsewhere, or under another config, is checked before any feature is extracted."""
from __future__ import annotations

import io

import numpy as np
import ray

from pipeline.config import probe_class_token
from pipeline.data.codes import CodesError, check_code_files
from pipeline.metrics.extractors import BlockFeatures, stack_codes
from pipeline.metrics.probe import linear_probe
from pipeline.models.code_models import CodeModelSettings, code_model_settings, position_blocks
from pipeline.stage import StageContext, StageInputError
from stages.datasets import code_dataset, shard_dataset
from stages.evaluate.common import PartResult, Setup, Stopwatch, collect


def probe(ctx: StageContext, setup: Setup) -> PartResult:
    ecfg, val_split = setup.ecfg, setup.val_split
    if not ecfg.probe_on:
        return PartResult(how={"probe": "off (evaluate.probe_train_images: 0)"})
    clock = Stopwatch()
    settings, fed = probed_transformer(ctx)
    # The data's classes, not the model's: an unconditional model has none, its probe still has every label.
    classes = max(int(ctx.inputs["ingest"].details["num_classes"]), 2)
    blocks = ecfg.probe_blocks if ecfg.probe_blocks is not None else list(range(position_blocks(settings)))
    train_f, val_f = block_features(ctx, setup, blocks)
    result = PartResult(counts={"probe_train": len(train_f["label"]), "probe_val": len(val_f["label"])})
    accuracies = []
    for index, block in enumerate(blocks):
        top1 = linear_probe(train_f["features"][:, index], train_f["label"], val_f["features"][:, index],
                            val_f["label"], classes)["top1"]
        accuracies.append(top1)
        result.metrics[f"probe_top1_block_{block}"] = top1
    best = int(np.argmax(accuracies))
    result.metrics.update({"probe_top1_best": accuracies[best], "probe_best_block": float(blocks[best])})
    # The first probe images of each split in shard order, read in order (`collect`): the plain-view code rows
    # above are in the same order (pretokenize writes them in shard order), so the baseline sees the same images.
    pixel_train = collect(shard_dataset(ctx, "train", read_cpus=ecfg.cpus_per_task).limit(ecfg.probe_train_images))
    pixel_val = collect(shard_dataset(ctx, val_split, read_cpus=ecfg.cpus_per_task).limit(ecfg.probe_val_images))
    (train_pixels, val_pixels), pixel_note = pixel_vectors(pixel_train["image"], pixel_val["image"])
    pixels = linear_probe(train_pixels, pixel_train["label"], val_pixels, pixel_val["label"], classes)["top1"]
    result.metrics["probe_top1_pixels"] = pixels
    result.how["probe"] = (
        f"average-pooled block output over all image tokens, {fed} at the class position, standardised, "
        f"softmax layer by L-BFGS (L2 1e-4); {len(train_f['label'])} train / {len(val_f['label'])} {val_split} "
        f"images, plain view; baseline: the same on raw pixels ({pixel_note})")
    result.seconds["probe"] = clock()
    result.files["probe_accuracy_per_block.png"] = probe_plot(blocks, accuracies, pixels)
    return result


def probed_transformer(ctx: StageContext) -> tuple[CodeModelSettings, str]:
    """The trained transformer's settings, from the model-config file its manifest names (no weights are
    read), and the token the probe feeds it; a model the probe may not read is refused here, so this is
    cheap to call before any other work."""
    name = ctx.inputs["transformer"].outputs["config"]
    settings = code_model_settings(ctx.run_dir.read_json(ctx.folder_of("transformer"), name))
    return settings, probe_token(settings, f"the transformer at {ctx.uri_of('transformer', name)}")


def probe_token(settings: CodeModelSettings, source: str) -> str:
    """What the probe feeds a trained transformer at its class position (`pipeline.config.probe_class_token`,
    the rule the config is checked against); a conditional model trained without label dropout is refused,
    naming `source`."""
    try:
        return probe_class_token(settings.num_classes > 0, settings.label_dropout)
    except ValueError as error:
        raise StageInputError(f"{source} (num_classes {settings.num_classes}, label_dropout "
                              f"{settings.label_dropout:g}): {error}") from None


def block_features(ctx: StageContext, setup: Setup, blocks: list[int]) -> tuple[dict, dict]:
    """Pooled features of `blocks` for the plain-view codes of the train and val probe images."""
    ecfg, val_split = setup.ecfg, setup.val_split
    # The plain-view codes are small: read them here, then both splits go through one actor pool (actor
    # start-up dominates at this size). Reading inside the pooled dataset would wait on the pool's CPUs.
    rows: dict[str, list] = {"codes": [], "label": [], "split": []}
    codes = ctx.inputs["pretokenize"]
    code_files = codes.outputs["codes"]
    try:  # the contract of every file read, footers only
        check_code_files([ctx.run_dir.path(ctx.folder_of("pretokenize"), name) for names in code_files.values()
                          for name in names], grid=tuple(codes.outputs["grid"]), depth=setup.code_depth,
                         codebook_size=int(codes.outputs["codebook_size"]), filesystem=ctx.run_dir.fs)
    except CodesError as error:
        raise StageInputError(str(error)) from None
    for split_id, (split, limit) in enumerate((("train", ecfg.probe_train_images),
                                               (val_split, ecfg.probe_val_images))):
        files = [ctx.uri_of("pretokenize", name) for name in code_files[split]]
        plain = collect(code_dataset(files, ecfg.cpus_per_task, columns=["codes", "label", "view"]).filter(
            expr="view == 0").limit(limit))  # the first `limit` plain rows in file order (`collect` keeps order)
        rows["codes"].extend(stack_codes(plain["codes"]))
        rows["label"].extend(plain["label"].tolist())
        rows["split"].extend([split_id] * len(plain["label"]))
    probe_rows = [{"codes": c, "label": l, "split": s} for c, l, s in zip(rows["codes"], rows["label"], rows["split"])]
    features = collect(ray.data.from_items(probe_rows).map_batches(
        BlockFeatures, fn_constructor_kwargs={"transformer_uri": ctx.uri_of("transformer"), "blocks": blocks,
                                              **setup.actor_args}, **setup.pool))
    probe_sets = {split: {k: v[features["split"] == split_id] for k, v in features.items()}
                  for split_id, split in enumerate(("train", val_split))}
    return probe_sets["train"], probe_sets[val_split]


def pixel_vectors(*image_sets: np.ndarray) -> tuple[list[np.ndarray], str]:
    """Flattened [0, 1] pixels for the baseline probe. Grey data stored as RGB (Fashion-MNIST) keeps one
    channel: the copies add no information but triple the probe's input size and cost."""
    grey = all(np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(images[..., 0], images[..., 2])
               for images in image_sets if images.ndim == 4 and images.shape[-1] == 3)
    kept = [images[..., :1] if grey and images.ndim == 4 else images for images in image_sets]
    vectors = [images.reshape(len(images), -1).astype(np.float64) / 255 for images in kept]
    return vectors, f"{vectors[0].shape[1]} values per image" + (", one channel of grey images" if grey else "")


def probe_plot(blocks: list[int], accuracies: list[float], baseline: float) -> bytes:
    """PNG: probe top-1 per block, the raw-pixel baseline as a dashed line."""
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
