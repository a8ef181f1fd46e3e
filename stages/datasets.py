"""Ray Data views of committed stage outputs."""
from __future__ import annotations

import ray

from pipeline.storage import Manifest, RunDir


def shard_dataset(run_dir: RunDir, ingest: Manifest, split: str) -> ray.data.Dataset:
    """A split's WebDataset shards as rows {image: HWC uint8, label: int, key: str}."""
    files = ingest.outputs["shards"].get(split)
    if not files:
        raise ValueError(f"the ingest stage wrote no '{split}' shards")
    image_format = ingest.outputs["image_format"]
    dataset = ray.data.read_webdataset([run_dir.uri("shards", name) for name in files],
                                       suffixes=[image_format, "cls"])
    return dataset.select_columns(["__key__", image_format, "cls"]).rename_columns(
        {"__key__": "key", image_format: "image", "cls": "label"})
