"""Render: DiGIT's second stage (tokens: ssl_kmeans), a Transformer that reads an image's SSL tokens as a prefix
and predicts its pixel tokenizer codes (pipeline/models/prefix_transformer.py), trained with Ray Train on the
pretokenized pairs by the Transformer stage's own loop: the same checkpoints, resume, views, schedule and
MLflow figures. At sampling time it turns the stage-1 Transformer's SSL tokens into codes the pixel decoder
draws (stages/evaluate, `SampleImages`)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import PipelineConfig
from pipeline.models.prefix_transformer import PrefixTransformer, PrefixTransformerSettings
from pipeline.stage import StageContext, StageInputError, StageResult
from stages.transformer import train_code_model, with_image_ids


def prefixed_rows(table: pa.Table) -> pa.Table:
    """Rows with one `codes` sequence: the SSL tokens, then the pixel codes (what `prefix_loss_of` splits)."""
    def matrix(name: str) -> np.ndarray:  # a fixed-size list column, or a plain list one after a filter
        flat = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(table.num_rows, -1)

    joined = np.concatenate([matrix("codes"), matrix("pixel_codes")], axis=1)
    sequence = pa.FixedSizeListArray.from_arrays(pa.array(joined.ravel(), pa.int16()), joined.shape[1])
    return with_image_ids(table.drop_columns(["codes", "pixel_codes"]).append_column("codes", sequence))


def run(cfg: PipelineConfig, ctx: StageContext) -> StageResult:
    from stages.datasets import code_dataset

    codes, ingest = ctx.inputs["pretokenize"], ctx.inputs["ingest"]
    if codes.outputs.get("tokens") != "ssl_kmeans":
        raise StageInputError(f"the codes in {ctx.uri_of('pretokenize')} hold no SSL tokens beside pixel codes: "
                              "rerun pretokenize with tokens=ssl_kmeans (--from pretokenize)")
    rcfg = cfg.render
    files = {split: [ctx.uri_of("pretokenize", name) for name in names]
             for split, names in codes.outputs["codes"].items()}
    val_split = "val" if files.get("val") else "train"
    read = rcfg.resources.read_cpus
    columns = ["key", "label", "view", "codes", "pixel_codes"]
    train = code_dataset(files["train"], read, columns).map_batches(prefixed_rows, batch_format="pyarrow",
                                                                    num_cpus=read)
    val = (code_dataset(files[val_split], read, columns).filter(lambda row: row["view"] == 0, num_cpus=read)
           .map_batches(prefixed_rows, batch_format="pyarrow", num_cpus=read))
    base = rcfg.model_settings(vocab_size=codes.outputs["pixel_codebook_size"],
                               grid=tuple(codes.outputs["pixel_grid"]),
                               num_classes=int(ingest.details.get("num_classes", 0)))
    settings = PrefixTransformerSettings.model_validate({
        **base.model_dump(), "prefix_vocab_size": codes.outputs["codebook_size"],
        "prefix_grid": tuple(codes.outputs["grid"])})
    with torch.device("meta"):
        parameters = PrefixTransformer(settings).parameter_count(embeddings=True)
    ctx.log.info("render: %s, %.2fM parameters, %d SSL tokens -> %d pixel codes per image", rcfg.size,
                 parameters / 1e6, settings.prefix_length, settings.length)
    ctx.tracker.set_tags({"vim.transformer_kind": "prefix", "vim.transformer_size": rcfg.size})
    loop_config = {"transformer": rcfg.model_dump(mode="json"), "settings": settings.model_dump(mode="json"),
                   "view_ids": sorted(codes.outputs["views"].values()), "codebook": None, "stage": "render"}
    return train_code_model(ctx, rcfg, settings, loop_config, {"train": train, "val": val})
