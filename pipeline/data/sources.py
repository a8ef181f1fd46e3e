"""Index every image of a source without reading pixels: ImageNet tars, ImageNet folders, image folders,
Fashion-MNIST idx files.

An index is a compact table (key, label, kind, path, offset, size, origin); `load_sample` turns one row
back into bytes or a PIL image. Tars are indexed by their headers alone and read by byte range, so
ImageNet is never extracted to disk. Problems with the source itself (missing path, no images, a label
file that does not match) raise `SourceError` before any shard is written.

Folders are listed with symbolic links followed once by real path: a link back into the tree (a loop), a
dangling link and a second way to a folder or file already listed are reported in `ignored`, never indexed
twice. Hidden files and folders are never images and never classes. The index also carries a listing of
the files it was built from (names, sizes, modification times) and its fingerprint, so a stage can tell
that the source changed under it.
"""
from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import os
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from functools import cached_property

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


# What an index was built from: (role: a split or a label file, name, size, modification time in ns).
FILES_SCHEMA = pa.schema([("role", pa.string()), ("name", pa.string()), ("size", pa.int64()),
                          ("mtime_ns", pa.int64())])


@dataclass
class SplitIndex:
    table: pa.Table
    ignored: list[str] = field(default_factory=list)  # hidden files, link loops and the like, never images


@dataclass
class SourceIndex:
    classes: list[dict[str, str]]  # position = label; {"wnid": ..., "name": ...}
    splits: dict[str, SplitIndex]
    files: pa.Table = field(default_factory=FILES_SCHEMA.empty_table)  # sorted by (role, name)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the listing (names, sizes, modification times): equal listings, equal fingerprints."""
        digest = hashlib.sha256()
        for row in zip(*(self.files.column(c).to_pylist() for c in FILES_SCHEMA.names)):
            digest.update(("\t".join(map(str, row)) + "\n").encode())
        return digest.hexdigest()


def describe_changes(before: pa.Table, after: pa.Table, limit: int = 5) -> str:
    """What differs between two listings (`SourceIndex.files`), in words: removed, added, modified."""
    def rows(table: pa.Table) -> dict[tuple[str, str], tuple[int, int]]:
        columns = [table.column(c).to_pylist() for c in FILES_SCHEMA.names]
        return {(r, n): (s, m) for r, n, s, m in zip(*columns)}

    old, new = rows(before), rows(after)
    parts = []
    for what, names in (("removed", sorted(old.keys() - new.keys())), ("added", sorted(new.keys() - old.keys())),
                        ("modified", sorted(k for k in old.keys() & new.keys() if old[k] != new[k]))):
        if names:
            shown = ", ".join(f"{role}: {name}" for role, name in names[:limit])
            parts.append(f"{len(names)} {what} ({shown}{', ...' if len(names) > limit else ''})")
    return "; ".join(parts) or "the listings differ in order only"


def _files_table(rows: list[tuple[str, str, int, int]]) -> pa.Table:
    rows = sorted(rows)
    return pa.table({c: [r[i] for r in rows] for i, c in enumerate(FILES_SCHEMA.names)}, schema=FILES_SCHEMA)


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


@dataclass
class _File:
    rel: str  # relative to the listed folder, '/'-separated (through a followed link: the link's name)
    path: str  # what to open: a local path or a URI
    size: int
    mtime_ns: int


def _stamp(location: str) -> tuple[int, int]:
    info = _info(location)
    return int(info.size or 0), int(info.mtime_ns or 0)


def _list_files(location: str) -> tuple[list[_File], list[str]]:
    """Every file below a folder, sorted by relative name -> (files, ignored). Hidden files and folders
    are ignored; local symbolic links are followed once by real path (see `_walk_local`)."""
    if not is_uri(location):
        return _walk_local(open_fs(location)[1])
    fs, root = open_fs(location)
    files, ignored = [], []
    for info in sorted(fs.get_file_info(pafs.FileSelector(root, recursive=True)), key=lambda i: i.path):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root):].strip("/")
        if any(_is_hidden(p) for p in rel.split("/")):
            ignored.append(rel)
            continue
        files.append(_File(rel, _join(location, rel), int(info.size or 0), int(info.mtime_ns or 0)))
    return files, ignored


def _walk_local(root: str) -> tuple[list[_File], list[str]]:
    """List a local folder, following symbolic links once by real path.

    The folder's own tree is walked first, so a real folder or file always wins over a link to it. Then
    links to folders are followed, each real folder once: a link to a folder that holds the link (a loop),
    a link to a folder already listed, a link to a file already listed and a dangling link are reported in
    `ignored` as '<name> (<why>)'."""
    ignored: list[str] = []
    seen_dirs: dict[str, str] = {os.path.realpath(root): "."}
    candidates: list[tuple[str, str, str, bool]] = []  # (rel, path, real path, through a link to a file)
    pending: list[tuple[str, str, str, str]] = []  # folder links: (rel, path, real target, real folder holding it)

    def walk(folder: str, rel_folder: str, real_folder: str) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as error:
            ignored.append(f"{rel_folder or '.'} (unreadable: {error.strerror})")
            return
        for entry in entries:
            rel = f"{rel_folder}/{entry.name}" if rel_folder else entry.name
            if _is_hidden(entry.name):
                ignored.append(rel + ("/" if entry.is_dir() else ""))
                continue
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if not os.path.exists(target):
                    ignored.append(f"{rel} (dangling link to {os.readlink(entry.path)})")
                elif os.path.isdir(target):
                    pending.append((rel, entry.path, target, real_folder))
                elif os.path.isfile(target):
                    candidates.append((rel, entry.path, target, True))
                else:
                    ignored.append(f"{rel} (link to something that is not a file)")
            elif entry.is_dir(follow_symlinks=False):
                real = os.path.join(real_folder, entry.name)
                if real in seen_dirs:  # reached again below a followed link
                    ignored.append(f"{rel} (folder already listed as {seen_dirs[real]})")
                    continue
                seen_dirs[real] = rel
                walk(entry.path, rel, real)
            elif entry.is_file(follow_symlinks=False):
                candidates.append((rel, entry.path, os.path.join(real_folder, entry.name), False))
            else:
                ignored.append(f"{rel} (not a regular file)")

    walk(root, "", os.path.realpath(root))
    while pending:
        rel, path, target, holder = pending.pop(0)
        if holder == target or holder.startswith(target.rstrip(os.sep) + os.sep):
            ignored.append(f"{rel} (symlink loop: links to {seen_dirs.get(target, target)}, which holds it)")
        elif target in seen_dirs:
            ignored.append(f"{rel} (link to a folder already listed as {seen_dirs[target]})")
        else:
            seen_dirs[target] = rel
            walk(path, rel, target)

    files: list[_File] = []
    seen_files: dict[str, str] = {}
    for rel, path, real, linked in sorted(candidates, key=lambda c: (c[3], c[0])):  # real files first
        if real in seen_files:
            ignored.append(f"{rel} (link to a file already listed as {seen_files[real]})")
            continue
        seen_files[real] = rel
        stat = os.stat(path)
        files.append(_File(rel, path, stat.st_size, stat.st_mtime_ns))
    return sorted(files, key=lambda f: f.rel), sorted(ignored)


def _listed(location: str, split: str) -> tuple[list[_File], list[str]]:
    """The files of a split folder; an error naming the split when none is left to index."""
    files, ignored = _list_files(location)
    if not files:
        what = f"; ignored: {', '.join(ignored[:5])}{', ...' if len(ignored) > 5 else ''}" if ignored else ""
        raise SourceError(f"split '{split}' at {location} is empty: it holds no files{what}")
    return files, ignored


def _index_class_folders(location: str, class_ids: list[str] | None, split: str,
                         listing: tuple[list[_File], list[str]] | None = None) -> tuple[list[str], dict]:
    """`<split>/<class>/<image>` -> (class ids, columns). Files at any depth below a class count; hidden
    folders are not classes."""
    files, ignored = listing or _listed(location, split)
    found = sorted({f.rel.split("/")[0] for f in files if "/" in f.rel})
    class_ids = class_ids if class_ids is not None else found
    position = {c: n for n, c in enumerate(class_ids)}
    strangers = sorted(set(found) - set(position))
    if strangers:
        raise SourceError(f"split '{split}' at {location} has class folders {strangers[:5]} that the train "
                          "split does not have")
    columns: dict[str, list] = {"key": [], "label": [], "path": [], "origin": [], "files": []}
    ignored = list(ignored)
    for f in files:
        parts = f.rel.split("/")
        if len(parts) < 2:
            ignored.append(f"{f.rel} (not in a class folder)")
            continue
        stem = os.path.splitext("/".join(parts[1:]))[0]
        columns["key"].append(make_key(parts[0], stem))
        columns["label"].append(position[parts[0]])
        columns["path"].append(f.path)
        columns["origin"].append(f.rel)
        columns["files"].append((split, f.rel, f.size, f.mtime_ns))
    columns["ignored"] = ignored
    return class_ids, columns


def _index_flat_folder(location: str, labels: dict[str, str], class_ids: list[str], split: str,
                       listing: tuple[list[_File], list[str]] | None = None) -> dict:
    files, ignored = listing or _listed(location, split)
    stems = [os.path.splitext(f.rel.rsplit("/", 1)[-1])[0] for f in files]
    return {"key": [make_key(s) for s in stems], "label": _apply_labels(stems, labels, class_ids, split),
            "path": [f.path for f in files], "origin": [f.rel for f in files], "ignored": list(ignored),
            "files": [(split, f.rel, f.size, f.mtime_ns) for f in files]}


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
    listing: list[tuple[str, str, int, int]] = _label_files(cfg)

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
            for location in (images_loc, _idx_file(root, prefix, "labels-idx1-ubyte")):
                listing.append((split, location, *_stamp(location)))
        return SourceIndex(classes, splits, _files_table(listing))

    splits: dict[str, SplitIndex] = {}
    if cfg.source == "imagenet_tar":
        class_ids, columns = _index_train_tar(split_locations["train"])
        position = {c: i for i, c in enumerate(class_ids)}
        columns["label"] = [position[w] for w in columns["wnid"]]
        splits["train"] = SplitIndex(_table(columns, "range", _fs_path(split_locations["train"]),
                                            columns["offset"], columns["size"]), columns["ignored"])
        listing.append(("train", split_locations["train"], *_stamp(split_locations["train"])))
        if "val" in split_locations:
            labels, devkit_names = read_val_labels(_needs_labels(cfg))
            names = {**devkit_names, **names}
            flat = _index_flat_tar(split_locations["val"])
            columns = {"key": [make_key(s) for s in flat["stem"]], "origin": flat["origin"],
                       "label": _apply_labels(flat["stem"], labels, class_ids, "val")}
            splits["val"] = SplitIndex(_table(columns, "range", _fs_path(split_locations["val"]),
                                              flat["offset"], flat["size"]), flat["ignored"])
            listing.append(("val", split_locations["val"], *_stamp(split_locations["val"])))
    else:  # image_folder, imagenet_folder
        class_ids, columns = _index_class_folders(split_locations["train"], None, "train")
        splits["train"] = SplitIndex(_table(columns, "file", columns["path"]), columns["ignored"])
        listing.extend(columns["files"])
        if "val" in split_locations:
            val = split_locations["val"]
            files = _listed(val, "val")  # an empty folder is empty, not flat
            if any("/" in f.rel for f in files[0]):
                _, columns = _index_class_folders(val, class_ids, "val", files)
            else:
                labels, devkit_names = read_val_labels(_needs_labels(cfg))
                names = {**devkit_names, **names}
                columns = _index_flat_folder(val, labels, class_ids, "val", files)
            splits["val"] = SplitIndex(_table(columns, "file", columns["path"]), columns["ignored"])
            listing.extend(columns["files"])

    for split, index in splits.items():
        if index.table.num_rows == 0:
            ignored = index.ignored
            what = f"; ignored: {', '.join(ignored[:5])}{', ...' if len(ignored) > 5 else ''}" if ignored else ""
            raise SourceError(f"split '{split}' at {split_locations[split]} is empty: it holds no files{what}")
    classes = [{"wnid": c, "name": names.get(c, c)} for c in class_ids]
    return SourceIndex(classes, splits, _files_table(listing))


def _label_files(cfg: IngestConfig) -> list[tuple[str, str, int, int]]:
    """The label and name files the index reads, for its listing (a devkit folder: its two files)."""
    rows = []
    for role, location in (("val_labels", cfg.val_labels), ("synsets", cfg.synsets)):
        if not location:
            continue
        if _info(location).type == pafs.FileType.Directory:
            for name in ("ILSVRC2012_validation_ground_truth.txt", "meta.mat"):
                part = _join(_join(location, "data"), name)
                rows.append((role, part, *_stamp(part)))
        else:
            rows.append((role, location, *_stamp(location)))
    return rows


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
