"""Index every image of a source without reading pixels: ImageNet tars, ImageNet folders, image folders,
Fashion-MNIST idx files.

An index is a compact table (key, label, kind, path, offset, size, origin); `load_sample` turns one row
back into bytes or a PIL image. Tars are indexed by their headers alone and read by byte range, so
ImageNet is never extracted to disk. Problems with the source itself (missing path, no images, a label
file that does not match) raise `SourceError` before any shard is written.
"""
from __future__ import annotations

import csv
import functools
import gzip
import io
import os
import re
import tarfile
import zlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from PIL import Image

from pipeline.config import IngestConfig
from pipeline.storage import is_uri

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("label", pa.int32()), ("kind", pa.string()),  # kind: file | range | idx
    ("path", pa.string()), ("offset", pa.int64()), ("size", pa.int64()), ("origin", pa.string()),
])


class SourceError(ValueError):
    """The source cannot be ingested as configured (raised before any work)."""


@dataclass
class SplitIndex:
    table: pa.Table
    ignored: list[str] = field(default_factory=list)  # hidden files and the like, never images


@dataclass
class SourceIndex:
    classes: list[dict[str, str]]  # position = label; {"wnid": ..., "name": ...}
    splits: dict[str, SplitIndex]


# ---------------------------------------------------------------------------------------------
# File system helpers (local paths or any pyarrow.fs URI)


def open_fs(location: str) -> tuple[pafs.FileSystem, str]:
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))
    return pafs.FileSystem.from_uri(location)


def _join(root: str, child: str) -> str:
    if is_uri(child) or child.startswith("/"):
        return child
    return root.rstrip("/") + "/" + child


def _info(location: str) -> pafs.FileInfo:
    fs, path = open_fs(location)
    return fs.get_file_info(path)


def _require(location: str, what: str) -> pafs.FileInfo:
    info = _info(location)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"{what} not found: {location}")
    return info


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def make_key(*parts: str) -> str:
    """A WebDataset-safe key: no dots (they start the extension), no slashes."""
    return "_".join(_KEY_UNSAFE.sub("-", p).strip("-") for p in parts if p)


def _unique_keys(keys: list[str], origins: list[str]) -> list[str]:
    """Disambiguate keys that sanitising made equal, with a hash of the full origin (deterministic)."""
    seen: dict[str, int] = {}
    for key in keys:
        seen[key] = seen.get(key, 0) + 1
    return [f"{k}-{zlib.crc32(o.encode()):08x}" if seen[k] > 1 else k for k, o in zip(keys, origins)]


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("._")


# ---------------------------------------------------------------------------------------------
# Labels of flat validation splits


def _synset_names(location: str | None) -> dict[str, str]:
    if not location:
        return {}
    _require(location, "synset mapping")
    fs, path = open_fs(location)
    with fs.open_input_stream(path) as f:
        text = f.read().decode()
    names = {}
    for line in text.splitlines():
        parts = line.strip().split(maxsplit=1)
        if parts:
            names[parts[0]] = parts[1] if len(parts) > 1 else parts[0]
    return names


def read_val_labels(location: str) -> tuple[dict[str, str], dict[str, str]]:
    """-> ({file stem: class id (wnid or folder name)}, {wnid: human name} where the file says).

    Accepts the devkit folder (data/ILSVRC2012_validation_ground_truth.txt + data/meta.mat), the Kaggle
    LOC_val_solution.csv, or plain '<file name> <class>' lines.
    """
    info = _require(location, "validation label file")
    fs, path = open_fs(location)
    if info.type == pafs.FileType.Directory:
        return _read_devkit(location)
    with fs.open_input_stream(path) as f:
        text = f.read().decode()
    lines = text.splitlines()
    labels: dict[str, str] = {}
    if lines and lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        for row in csv.DictReader(io.StringIO(text)):
            key = {k.strip().lower(): v for k, v in row.items()}
            prediction = (key.get("predictionstring") or "").split()
            if not prediction:
                raise SourceError(f"{location}: row for {key.get('imageid')} has no PredictionString")
            labels[os.path.splitext(key["imageid"].strip())[0]] = prediction[0]
        return labels, {}
    for number, line in enumerate(lines, 1):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        if len(parts) != 2:
            raise SourceError(f"{location}:{number}: expected '<file name> <class>', got {line!r}")
        labels[os.path.splitext(os.path.basename(parts[0]))[0]] = parts[1]
    return labels, {}


def _read_devkit(location: str) -> tuple[dict[str, str], dict[str, str]]:
    import scipy.io

    data_dir = _join(location, "data")
    truth_loc = _join(data_dir, "ILSVRC2012_validation_ground_truth.txt")
    meta_loc = _join(data_dir, "meta.mat")
    _require(truth_loc, "devkit ground truth")
    _require(meta_loc, "devkit meta.mat")
    fs, truth_path = open_fs(truth_loc)
    with fs.open_input_stream(truth_path) as f:
        ids = [int(t) for t in f.read().decode().split()]
    _, meta_path = open_fs(meta_loc)
    with fs.open_input_stream(meta_path) as f:
        meta = scipy.io.loadmat(io.BytesIO(f.read()), squeeze_me=True)["synsets"]
    id_to_wnid, names = {}, {}
    for entry in np.atleast_1d(meta):
        ilsvrc_id, wnid, words = int(entry["ILSVRC2012_ID"]), str(entry["WNID"]), str(entry["words"])
        id_to_wnid[ilsvrc_id] = wnid
        names[wnid] = words
    try:
        labels = {f"ILSVRC2012_val_{i:08d}": id_to_wnid[ilsvrc_id] for i, ilsvrc_id in enumerate(ids, 1)}
    except KeyError as missing:
        raise SourceError(f"{truth_loc}: ILSVRC2012_ID {missing} is not in meta.mat") from None
    return labels, names


def _apply_labels(stems: list[str], labels: dict[str, str], class_ids: list[str], where: str) -> list[int]:
    missing = [s for s in stems if s not in labels]
    if missing:
        raise SourceError(f"label file does not match {where}: {len(missing)} of {len(stems)} images have "
                          f"no label (e.g. {missing[:3]})")
    position = {c: i for i, c in enumerate(class_ids)}
    unknown = sorted({labels[s] for s in stems} - set(position))
    if unknown:
        raise SourceError(f"label file does not match {where}: classes {unknown[:5]} are not among the "
                          f"{len(class_ids)} training classes")
    return [position[labels[s]] for s in stems]


# ---------------------------------------------------------------------------------------------
# Folder sources


def _list_files(location: str) -> list[pafs.FileInfo]:
    fs, path = open_fs(location)
    return [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if i.type == pafs.FileType.File]


def _index_class_folders(location: str, class_ids: list[str] | None, split: str) -> tuple[list[str], dict]:
    """`<split>/<class>/<image>` -> (class ids, columns). Files at any depth below a class count."""
    _, root = open_fs(location)
    files = _list_files(location)
    found = sorted({os.path.relpath(i.path, root).split(os.sep)[0] for i in files
                    if os.sep in os.path.relpath(i.path, root)})
    class_ids = class_ids if class_ids is not None else found
    position = {c: n for n, c in enumerate(class_ids)}
    strangers = sorted(set(found) - set(position))
    if strangers:
        raise SourceError(f"split '{split}' at {location} has class folders {strangers[:5]} that the train "
                          "split does not have")
    columns: dict[str, list] = {"key": [], "label": [], "path": [], "origin": []}
    ignored = []
    for info in sorted(files, key=lambda i: i.path):
        rel = os.path.relpath(info.path, root)
        parts = rel.split(os.sep)
        if len(parts) < 2 or any(_is_hidden(p) for p in parts):
            ignored.append(rel)
            continue
        stem = os.path.splitext(os.path.join(*parts[1:]))[0]
        columns["key"].append(make_key(parts[0], stem))
        columns["label"].append(position[parts[0]])
        columns["path"].append(_join(location, rel) if is_uri(location) else info.path)
        columns["origin"].append(rel)
    columns["ignored"] = ignored
    return class_ids, columns


def _index_flat_folder(location: str, labels: dict[str, str], class_ids: list[str], split: str) -> dict:
    _, root = open_fs(location)
    files = sorted((i for i in _list_files(location)), key=lambda i: i.path)
    ignored = [os.path.relpath(i.path, root) for i in files if _is_hidden(i.base_name)]
    files = [i for i in files if not _is_hidden(i.base_name)]
    stems = [os.path.splitext(i.base_name)[0] for i in files]
    return {"key": [make_key(s) for s in stems], "label": _apply_labels(stems, labels, class_ids, split),
            "path": [_join(location, os.path.relpath(i.path, root)) if is_uri(location) else i.path
                     for i in files],
            "origin": [os.path.relpath(i.path, root) for i in files], "ignored": ignored}


def _has_class_folders(location: str) -> bool:
    fs, path = open_fs(location)
    return any(i.type == pafs.FileType.Directory and not _is_hidden(i.base_name)
               for i in fs.get_file_info(pafs.FileSelector(path)))


# ---------------------------------------------------------------------------------------------
# ImageNet tars, indexed by headers and read by byte range


def _tar_members(fileobj) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=fileobj, mode="r:") as archive:
        return [m for m in archive.getmembers() if m.isfile()]


def _index_train_tar(location: str) -> tuple[list[str], dict]:
    """ILSVRC2012_img_train.tar: a tar of per-class tars `<wnid>.tar` of JPEGs."""
    fs, path = open_fs(location)
    columns: dict[str, list] = {"key": [], "wnid": [], "offset": [], "size": [], "origin": []}
    ignored = []
    with fs.open_input_file(path) as f:
        try:
            outer = _tar_members(f)
        except tarfile.TarError as error:
            raise SourceError(f"{location} is not a readable tar: {error}") from None
        for member in sorted(outer, key=lambda m: m.name):
            name = os.path.basename(member.name)
            if not name.endswith(".tar") or _is_hidden(name):
                ignored.append(member.name)
                continue
            wnid = name[:-4]
            f.seek(member.offset_data)
            try:
                inner = _tar_members(f)
            except tarfile.TarError as error:
                raise SourceError(f"{location}: inner tar {member.name} is unreadable: {error}") from None
            end = member.offset_data + member.size
            for item in sorted(inner, key=lambda m: m.name):
                if item.offset_data + item.size > end:
                    raise SourceError(f"{location}: {member.name}/{item.name} runs past its inner tar")
                if _is_hidden(os.path.basename(item.name)):
                    ignored.append(f"{member.name}/{item.name}")
                    continue
                columns["key"].append(make_key(os.path.splitext(os.path.basename(item.name))[0]))
                columns["wnid"].append(wnid)
                columns["offset"].append(item.offset_data)
                columns["size"].append(item.size)
                columns["origin"].append(f"{member.name}/{item.name}")
    columns["ignored"] = ignored
    return sorted(set(columns["wnid"])), columns


def _index_flat_tar(location: str) -> dict:
    fs, path = open_fs(location)
    with fs.open_input_file(path) as f:
        try:
            members = sorted(_tar_members(f), key=lambda m: m.name)
        except tarfile.TarError as error:
            raise SourceError(f"{location} is not a readable tar: {error}") from None
    ignored = [m.name for m in members if _is_hidden(os.path.basename(m.name))]
    members = [m for m in members if not _is_hidden(os.path.basename(m.name))]
    return {"stem": [os.path.splitext(os.path.basename(m.name))[0] for m in members],
            "offset": [m.offset_data for m in members], "size": [m.size for m in members],
            "origin": [m.name for m in members], "ignored": ignored}


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST idx files


def _idx_file(root: str, prefix: str, kind: str) -> str:
    for suffix in (".gz", ""):
        candidate = _join(root, f"{prefix}-{kind}{suffix}")
        if _info(candidate).type == pafs.FileType.File:
            return candidate
    raise SourceError(f"Fashion-MNIST file {prefix}-{kind}[.gz] not found under {root} "
                      "(Debian: apt-get install dataset-fashion-mnist)")


@functools.lru_cache(maxsize=4)
def read_idx(location: str) -> np.ndarray:
    """An idx array (optionally gzipped), cached per process so each worker decompresses a file once."""
    fs, path = open_fs(location)
    with fs.open_input_stream(path) as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise SourceError(f"{location} is not an unsigned-byte idx file")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if array.size != int(np.prod(shape)):
        raise SourceError(f"{location}: idx header says {shape} but holds {array.size} values")
    return array.reshape(shape)


# ---------------------------------------------------------------------------------------------
# The index of a whole source


def _table(columns: dict, kind: str, path: str | list[str], offsets=None, sizes=None) -> pa.Table:
    count = len(columns["key"])
    keys = _unique_keys(columns["key"], columns["origin"])
    return pa.table({
        "key": keys, "label": pa.array(columns["label"], pa.int32()), "kind": [kind] * count,
        "path": path if isinstance(path, list) else [path] * count,
        "offset": pa.array(offsets if offsets is not None else [0] * count, pa.int64()),
        "size": pa.array(sizes if sizes is not None else [-1] * count, pa.int64()),
        "origin": columns["origin"],
    }, schema=INDEX_SCHEMA)


def check_source(cfg: IngestConfig) -> None:
    """Cheap checks (paths exist) to run before any Ray work; build_index does the thorough ones."""
    root = cfg.resolved_root()
    _require(root, f"{cfg.source} root")
    for split, rel in cfg.resolved_splits().items():
        if cfg.source == "fashion_mnist":
            _idx_file(root, rel, "images-idx3-ubyte")
            _idx_file(root, rel, "labels-idx1-ubyte")
        else:
            _require(_join(root, rel), f"split '{split}'")
    for location, what in ((cfg.val_labels, "validation label file"), (cfg.synsets, "synset mapping")):
        if location:
            _require(location, what)


def build_index(cfg: IngestConfig) -> SourceIndex:
    check_source(cfg)
    root = cfg.resolved_root()
    split_locations = {split: _join(root, rel) for split, rel in cfg.resolved_splits().items()}
    names = _synset_names(cfg.synsets)

    if cfg.source == "fashion_mnist":
        classes = [{"wnid": str(i), "name": n} for i, n in enumerate(FASHION_MNIST_CLASSES)]
        splits = {}
        for split in split_locations:
            prefix = cfg.resolved_splits()[split]
            images_loc = _idx_file(root, prefix, "images-idx3-ubyte")
            labels = read_idx(_idx_file(root, prefix, "labels-idx1-ubyte"))
            images = read_idx(images_loc)
            if len(images) != len(labels):
                raise SourceError(f"{prefix}: {len(images)} images but {len(labels)} labels")
            count = len(labels)
            columns = {"key": [f"fmnist-{prefix}-{i:06d}" for i in range(count)],
                       "label": labels.astype(np.int32).tolist(),
                       "origin": [f"{prefix}[{i}]" for i in range(count)]}
            splits[split] = SplitIndex(_table(columns, "idx", images_loc, offsets=list(range(count))))
        return SourceIndex(classes, splits)

    splits: dict[str, SplitIndex] = {}
    if cfg.source == "imagenet_tar":
        class_ids, columns = _index_train_tar(split_locations["train"])
        position = {c: i for i, c in enumerate(class_ids)}
        columns["label"] = [position[w] for w in columns["wnid"]]
        splits["train"] = SplitIndex(_table(columns, "range", _fs_path(split_locations["train"]),
                                            columns["offset"], columns["size"]), columns["ignored"])
        if "val" in split_locations:
            labels, devkit_names = read_val_labels(_needs_labels(cfg))
            names = {**devkit_names, **names}
            flat = _index_flat_tar(split_locations["val"])
            columns = {"key": [make_key(s) for s in flat["stem"]], "origin": flat["origin"],
                       "label": _apply_labels(flat["stem"], labels, class_ids, "val")}
            splits["val"] = SplitIndex(_table(columns, "range", _fs_path(split_locations["val"]),
                                              flat["offset"], flat["size"]), flat["ignored"])
    else:  # image_folder, imagenet_folder
        class_ids, columns = _index_class_folders(split_locations["train"], None, "train")
        splits["train"] = SplitIndex(_table(columns, "file", columns["path"]), columns["ignored"])
        if "val" in split_locations:
            val = split_locations["val"]
            if _has_class_folders(val):
                _, columns = _index_class_folders(val, class_ids, "val")
            else:
                labels, devkit_names = read_val_labels(_needs_labels(cfg))
                names = {**devkit_names, **names}
                columns = _index_flat_folder(val, labels, class_ids, "val")
            splits["val"] = SplitIndex(_table(columns, "file", columns["path"]), columns["ignored"])

    for split, index in splits.items():
        if index.table.num_rows == 0:
            raise SourceError(f"split '{split}' at {split_locations[split]} holds no files")
    classes = [{"wnid": c, "name": names.get(c, c)} for c in class_ids]
    return SourceIndex(classes, splits)


def _fs_path(location: str) -> str:
    return location if is_uri(location) else os.path.abspath(location)


def _needs_labels(cfg: IngestConfig) -> str:
    if not cfg.val_labels:
        raise SourceError("the val split is flat (no class folders): set ingest.val_labels to "
                          "LOC_val_solution.csv, the devkit folder, or a '<file> <class>' list")
    return cfg.val_labels


# ---------------------------------------------------------------------------------------------
# Reading one indexed sample back


class SampleReader:
    """Reads indexed samples, keeping tar files open across the samples of one shard."""

    def __init__(self):
        self._open: dict[str, object] = {}

    def read(self, kind: str, path: str, offset: int, size: int) -> bytes | Image.Image:
        if kind == "idx":
            return Image.fromarray(read_idx(path)[offset])
        if kind == "range":
            handle = self._open.get(path)
            if handle is None:
                fs, fs_path = open_fs(path)
                handle = self._open[path] = fs.open_input_file(fs_path)
            return handle.read_at(size, offset)
        fs, fs_path = open_fs(path)
        with fs.open_input_stream(fs_path) as f:
            return f.read()

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()
