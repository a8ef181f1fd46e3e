"""WebDataset shards: writing one shard from indexed samples, and reading shard sets back.

A shard is a plain POSIX tar; each sample is `<key>.<jpg|png>`, `<key>.cls` (decimal label) and
`<key>.json` (source and original size). Member times are fixed, so the same input and seed give
byte-identical shards. A shard is written under a temporary name and moved into place when complete.
"""
from __future__ import annotations

import io
import json
import tarfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from PIL import Image

from pipeline.data.images import BadImage, decode, encode, resize_center_crop, to_rgb
from pipeline.data.sources import SampleReader, open_fs
from pipeline.storage import TEMPORARY_MARK

IMAGE_EXTENSIONS = ("jpg", "png")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


@dataclass
class ShardStats:
    split: str
    shard: int
    path: str
    count: int = 0
    bytes: int = 0
    labels: dict[int, int] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    grey: int | None = None  # images whose R, G and B are equal everywhere (None: a record from before the count)


def is_grey(image: Image.Image) -> bool:
    """True when the RGB image carries no colour: its three channels are equal at every pixel."""
    pixels = np.asarray(image)
    return bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes: same input, same shard
    info.mode = 0o644
    info.uname = info.gname = "vim"
    archive.addfile(info, io.BytesIO(data))


def write_shard(rows: pa.Table, split: str, shard: int, location: str, resolution: int | None,
                image_format: str, jpeg_quality: int) -> ShardStats:
    """Decode, resize, re-encode and write the indexed `rows` as one tar at `location` (atomically)."""
    started = time.perf_counter()
    fs, final_path = open_fs(location)
    fs.create_dir(final_path.rsplit("/", 1)[0], recursive=True)
    temp_path = f"{final_path}{TEMPORARY_MARK}{uuid.uuid4().hex[:8]}"
    stats = ShardStats(split, shard, location, grey=0)
    labels: Counter[int] = Counter()
    reader = SampleReader()
    try:
        with fs.open_output_stream(temp_path) as stream, tarfile.open(fileobj=stream, mode="w|") as tar:
            for row in rows.to_pylist():
                try:
                    raw = reader.read(row["kind"], row["path"], row["offset"], row["size"])
                    image = to_rgb(raw) if isinstance(raw, Image.Image) else decode(raw)
                    original_size = list(image.size)
                    image = resize_center_crop(image, resolution)
                    data = encode(image, image_format, jpeg_quality)
                except BadImage as bad:
                    stats.skipped.append({"key": row["key"], "origin": row["origin"], "reason": bad.reason,
                                          "detail": bad.detail})
                    continue
                except OSError as error:  # the source itself failed to read: count it, keep going
                    stats.skipped.append({"key": row["key"], "origin": row["origin"], "reason": "read_error",
                                          "detail": str(error)[:200]})
                    continue
                meta = {"source": row["origin"], "original_size": original_size, "label": row["label"]}
                _add(tar, f"{row['key']}.{image_format}", data)
                _add(tar, f"{row['key']}.cls", str(row["label"]).encode())
                _add(tar, f"{row['key']}.json", json.dumps(meta, sort_keys=True).encode())
                stats.count += 1
                stats.grey += is_grey(image)
                stats.bytes += len(data)
                labels[row["label"]] += 1
        fs.move(temp_path, final_path)
    except BaseException:
        try:
            fs.delete_file(temp_path)
        except OSError:
            pass
        raise
    finally:
        reader.close()
    stats.labels = dict(sorted(labels.items()))
    stats.seconds = time.perf_counter() - started
    return stats


# ---------------------------------------------------------------------------------------------
# Reading shards back (plain tarfile: no dependency on a data loader)


def list_shards(location: str) -> list[str]:
    """The committed shard files of one split folder, in order."""
    fs, path = open_fs(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path))
    names = sorted(i.base_name for i in infos if i.base_name.startswith("shard-") and i.base_name.endswith(".tar"))
    return [f"{location.rstrip('/')}/{n}" for n in names]


def iter_samples(shard_location: str, decode_images: bool = True) -> Iterator[dict]:
    """Yield {key, image (HWC uint8 or bytes), label, meta} from one shard, in tar order."""
    fs, path = open_fs(shard_location)
    with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        current: dict = {}
        for member in tar:
            key, _, ext = member.name.partition(".")
            if current and current["key"] != key:
                yield current
                current = {}
            current.setdefault("key", key)
            data = tar.extractfile(member).read()
            if ext in IMAGE_EXTENSIONS:
                current["image"] = (np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                                    if decode_images else data)
            elif ext == "cls":
                current["label"] = int(data)
            elif ext == "json":
                current["meta"] = json.loads(data)
        if current:
            yield current
