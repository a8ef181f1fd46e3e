"""Ray Data views of committed stage outputs."""
from __future__ import annotations

import ray

from pipeline.stage import StageContext


def shard_dataset(ctx: StageContext, split: str, files: list[str] | None = None,
                  read_cpus: float | None = None, with_source: bool = False,
                  with_images: bool = True) -> ray.data.Dataset:
    """A split's WebDataset shards from the ingest stage's outputs (or the given subset, of any split) as rows
    {image: HWC uint8, label: int, key: str}, plus `shard` (the file each row came from) with `with_source`;
    without `with_images`, {label, key} only, and no image is decoded.
    `read_cpus`: CPUs per read task (Ray's default is 1, too many beside an actor pool on 2 cores)."""
    ingest = ctx.inputs["ingest"]
    files = files if files is not None else ingest.outputs["shards"].get(split)
    if not files:
        raise ValueError(f"the ingest stage wrote no '{split}' shards")
    image_format = ingest.outputs["image_format"]
    suffixes = [image_format, "cls"] if with_images else ["cls"]
    dataset = ray.data.read_webdataset([ctx.uri_of("ingest", name) for name in files],
                                       suffixes=suffixes, num_cpus=read_cpus,
                                       override_num_blocks=len(files))  # a block per shard, not 20
    columns = {"__key__": "key", **({image_format: "image"} if with_images else {}), "cls": "label"}
    if with_source:
        columns["__url__"] = "shard"
    return dataset.select_columns(list(columns), num_cpus=read_cpus).rename_columns(columns, num_cpus=read_cpus)


def held_out_split(ctx: StageContext) -> str:
    """The split for validation: `val` when ingest wrote one, else `train`."""
    return "val" if "val" in ctx.inputs["ingest"].outputs["shards"] else "train"


def code_dataset(files: list[str], read_cpus: float | None = None, columns: list[str] | None = None) -> ray.data.Dataset:
    """Pretokenize's Parquet code files (locations workers can open) as a dataset, every task at `read_cpus`.

    Through Ray Data's V1 Parquet reader: the V2 one (Ray 2.60's default) first runs a file-listing task that
    asks for a whole CPU whatever `num_cpus` says, and a sweep trial on 2 cores (its workers plus the trial's
    own sliver) never has a whole one free, so the stage would wait forever. The paths are listed already.
    No Hive partitioning: a sweep trial's folder (`trials/rq_depth=1_<hash>/`) would become a column."""
    context = ray.data.DataContext.get_current()
    previous, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(files, num_cpus=read_cpus, columns=columns, partitioning=None)
    finally:
        context.use_datasource_v2 = previous
