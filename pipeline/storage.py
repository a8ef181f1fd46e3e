"""The run directory: one folder per stage, atomic writes and stage manifests, on any `pyarrow.fs` URI.

A stage's outputs count only once its `_MANIFEST.json` exists; the manifest is written last, through a
temporary file and a rename, so a reader never sees half a commit.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import tempfile
import uuid
from dataclasses import MISSING, asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs

from pipeline.config import ConfigError, stable_hash

MANIFEST = "_MANIFEST.json"


TEMPORARY_MARK = ".tmp-"  # in the name of a file still being written (then moved to its name)


def json_bytes(obj: Any) -> bytes:
    """How the run directory writes JSON (manifests hash these bytes)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def is_uri(location: str) -> bool:
    """True for a `pyarrow.fs` URI (gs://, s3://, file://), false for a plain local path."""
    return "://" in location


def local_folder(location: str) -> str:
    """A local folder with the files directly inside `location`: the folder itself on a local disk, a fresh
    temporary copy when it lies on a bucket (model folders: a config and a weights file)."""
    folder = RunDir(location)
    if folder.is_local:
        return folder.root
    local = tempfile.mkdtemp(prefix="vim-folder-")
    for name in folder.list():
        if folder.fs.get_file_info(folder.path(name)).type == pafs.FileType.File:
            with open(os.path.join(local, name), "wb") as out:
                out.write(folder.read_bytes(name))
    return local


class RunDir:
    """A run directory on a local disk or a bucket. Paths inside it are '/'-joined relative names."""

    def __init__(self, location: str):
        if not is_uri(location):
            location = os.path.abspath(os.path.expanduser(location))
        self.location = location.rstrip("/")
        self.fs, self.root = pafs.FileSystem.from_uri(self.location if is_uri(self.location)
                                                      else "file://" + self.location)
        self.fs.create_dir(self.root, recursive=True)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        """Filesystem path (for self.fs) of a name inside the run directory."""
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def uri(self, *parts: str) -> str:
        """A location other processes can open: a plain path locally, a URI on a bucket."""
        if self.is_local:
            return self.path(*parts)
        return "/".join([self.location, *[p.strip("/") for p in parts if p]])

    # ---- plain file operations -------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def list(self, *parts: str) -> list[str]:
        """Names directly inside a folder (empty when it does not exist)."""
        if not self.exists(*parts):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(*parts)))
        return sorted(info.base_name for info in infos)

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write through a temporary sibling and a move, so the name appears complete or not at all."""
        final = self.path(*parts)
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        temp = f"{final}{TEMPORARY_MARK}{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(temp) as f:
            f.write(data)
        self.fs.move(temp, final)

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes(json_bytes(obj), *parts)

    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    def delete(self, *parts: str) -> None:
        info = self.fs.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(info.path)


@dataclass
class Manifest:
    """What a committed stage produced and exactly which configuration and inputs produced it."""

    stage: str
    config: dict[str, Any]
    config_hash: str
    inputs: dict[str, str]  # upstream stage -> that stage's fingerprint
    fingerprint: str
    outputs: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    wall_seconds: float = 0.0
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # relative name -> {"size", "sha256"}
    input_manifests: dict[str, str] = field(default_factory=dict)  # upstream stage -> sha256 of its manifest file
    # Not a field: the sha256 of the `_MANIFEST.json` bytes this manifest was read from or written as.
    sha256 = None

    @staticmethod
    def fingerprint_of(stage: str, config_hash: str, inputs: dict[str, str]) -> str:
        return stable_hash({"stage": stage, "config": config_hash, "inputs": inputs})

    @classmethod
    def read(cls, run_dir: RunDir, folder: str) -> "Manifest | None":
        """The committed manifest of a folder, None when there is none; a damaged one raises ManifestError."""
        if not run_dir.exists(folder, MANIFEST):
            return None
        raw = run_dir.read_bytes(folder, MANIFEST)
        where = f"{folder}/{MANIFEST} in {run_dir.location}"
        try:
            data = json.loads(raw)
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
            raise ManifestError(f"{where} is not valid JSON ({error}); the stage that writes {folder}/ "
                                f"must be rerun") from None
        required = [name for name, f in cls.__dataclass_fields__.items()
                    if f.default is MISSING and f.default_factory is MISSING]
        if not isinstance(data, dict) or any(name not in data for name in required):
            absent = [name for name in required if not isinstance(data, dict) or name not in data]
            raise ManifestError(f"{where} is not a stage manifest (no {', '.join(absent)}); the stage that "
                                f"writes {folder}/ must be rerun")
        known = set(cls.__dataclass_fields__)
        manifest = cls(**{k: v for k, v in data.items() if k in known})
        manifest.sha256 = hashlib.sha256(raw).hexdigest()
        return manifest

    def write(self, run_dir: RunDir, folder: str) -> None:
        self.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.versions = self.versions or software_versions()
        raw = json_bytes(asdict(self))
        run_dir.write_bytes(raw, folder, MANIFEST)
        self.sha256 = hashlib.sha256(raw).hexdigest()


def software_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("ray", "torch", "pyarrow", "webdataset", "mlflow", "numpy", "pillow"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


def check_run_dir(location: str) -> None:
    """Before Ray starts: a local run directory must be a folder this user can write, or a path where one can
    be created. Creates nothing; a URI (gs://, s3://) is not checked here. Raises a one-line ConfigError."""
    if is_uri(location):
        return
    path = os.path.abspath(os.path.expanduser(location))
    existing = path
    while not os.path.lexists(existing):  # the nearest part of the path that exists
        existing = os.path.dirname(existing)
    if existing == path:
        if not os.path.isdir(path):
            raise ConfigError(f"run directory {path} is a file, not a folder; pass a folder to --run-dir")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"run directory {path} is not writable by this user")
    elif not os.path.isdir(existing):
        raise ConfigError(f"run directory {path} cannot be created: {existing} is a file, not a folder")
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run directory {path} cannot be created: {existing} is not writable by this user")


class ManifestError(ValueError):
    """A `_MANIFEST.json` that cannot be read as a manifest (truncated, edited into invalid JSON)."""
