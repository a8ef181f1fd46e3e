"""What a committed stage wrote (each file's size and sha256, kept in its manifest), and checking that it
is still there as written."""
from __future__ import annotations

import hashlib
from typing import Any

import pyarrow.fs as pafs

from pipeline.storage import TEMPORARY_MARK, Manifest, RunDir

# Working state inside a stage folder, not outputs: Ray Train's checkpoints, and every name starting with "_"
# (resumption records, staged pieces, caches, the manifest itself).
WORKING_FOLDERS = ("checkpoints",)
CHUNK_BYTES = 8 << 20


def is_output_name(relative: str) -> bool:
    """True for a file a stage commits: not the manifest, working state or a file still being written."""
    top, base = relative.split("/", 1)[0], relative.rsplit("/", 1)[-1]
    return not (top in WORKING_FOLDERS or top.startswith("_") or TEMPORARY_MARK in base)


def file_sizes(run_dir: RunDir, folder: str) -> dict[str, int]:
    """Every file under a folder (one listing, also on a bucket): relative '/'-joined name -> size."""
    base = run_dir.path(folder)
    infos = run_dir.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {info.path[len(base) + 1:]: info.size for info in infos if info.type == pafs.FileType.File}


def sha256_of(run_dir: RunDir, *parts: str) -> str:
    """A file's sha256, read in chunks (shards and weights can be large)."""
    digest = hashlib.sha256()
    with run_dir.fs.open_input_stream(run_dir.path(*parts)) as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def record_outputs(run_dir: RunDir, folder: str) -> dict[str, dict[str, Any]]:
    """What `Manifest.files` holds: each output file's size and sha256, at commit (files are written once)."""
    return {name: {"size": size, "sha256": sha256_of(run_dir, folder, name)}
            for name, size in sorted(file_sizes(run_dir, folder).items()) if is_output_name(name)}


def verify_outputs(run_dir: RunDir, folder: str, manifest: Manifest, checksums: bool = False) -> list[str]:
    """Problems with the files a manifest recorded, one line each naming the file and expected vs found:
    missing, another size, and with `checksums` another sha256. Manifests from before file records: none."""
    if not manifest.files:
        return []
    found = file_sizes(run_dir, folder)
    problems = []
    for name, record in sorted(manifest.files.items()):
        shown = f"{folder}/{name}"
        if name not in found:
            problems.append(f"{shown} is missing (recorded {record['size']} bytes)")
        elif found[name] != record["size"]:
            problems.append(f"{shown} has {found[name]} bytes, the manifest recorded {record['size']}")
        elif checksums:
            digest = sha256_of(run_dir, folder, name)
            if digest != record["sha256"]:
                problems.append(f"{shown} checksum (sha256) {digest[:16]} differs from the recorded "
                                f"{record['sha256'][:16]}, at the same size: changed in place")
    return problems


def check_recorded(manifest: Manifest, folder: str, name: str, digest: str) -> str | None:
    """A problem line when a file read whole anyway has another sha256 than its manifest recorded."""
    recorded = manifest.files.get(name, {}).get("sha256")
    if recorded and recorded != digest:
        return (f"{folder}/{name} checksum (sha256) {digest[:16]} differs from the {recorded[:16]} recorded "
                f"when stage {manifest.stage} committed")
    return None
