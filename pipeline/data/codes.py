"""The code-array format between pretokenize and the Transformer: plain Parquet any reader can open.

Columns: `key` string, `label` int32, `view` int8, `codes` fixed_size_list<int16>[h*w*depth] (raster
order). The schema metadata says how to read the codes back: grid, depth, codebook size, the tokenizer's
hash and the view names, so a file is self-describing without Ray or this package.

Under DiGIT's tokens (tokens: ssl_kmeans) `codes` holds the K-means tokens of the SSL encoder (codebook size K,
the encoder's grid), which the Transformer models unchanged, and a `pixel_codes` column beside it holds the
pixel tokenizer's codes of the same view (`pixel_grid`, `pixel_codebook_size` in the metadata), which the
second stage learns to predict.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

INT16_MAX = 32767
METADATA_KEY = b"vim.codes"


class CodesError(ValueError):
    """Code arrays that cannot be stored or read as the contract says."""


@dataclass(frozen=True)
class CodesMeta:
    grid: tuple[int, int]
    codebook_size: int
    tokenizer_sha256: str
    depth: int = 1
    views: tuple[str, ...] = ("plain",)
    split: str = ""
    pixel_grid: tuple[int, int] | None = None  # DiGIT's tokens: the pixel codes' grid and codebook
    pixel_codebook_size: int | None = None

    @property
    def length(self) -> int:
        return self.grid[0] * self.grid[1] * self.depth

    @property
    def pixel_length(self) -> int | None:
        return self.pixel_grid[0] * self.pixel_grid[1] if self.pixel_grid is not None else None

    def schema(self) -> pa.Schema:
        data = {k: v for k, v in asdict(self).items() if v is not None}  # files without pixel codes as before
        fields = [
            pa.field("key", pa.string(), nullable=False),
            pa.field("label", pa.int32(), nullable=False),
            pa.field("view", pa.int8(), nullable=False),
            pa.field("codes", pa.list_(pa.int16(), self.length), nullable=False),
        ]
        if self.pixel_grid is not None:
            fields.append(pa.field("pixel_codes", pa.list_(pa.int16(), self.pixel_length), nullable=False))
        return pa.schema(fields, metadata={METADATA_KEY: json.dumps(data, sort_keys=True).encode()})

    @classmethod
    def from_schema(cls, schema: pa.Schema) -> "CodesMeta":
        raw = (schema.metadata or {}).get(METADATA_KEY)
        if raw is None:
            raise CodesError("this Parquet file has no 'vim.codes' schema metadata: not written by pretokenize")
        data = json.loads(raw)
        return cls(grid=tuple(data["grid"]), codebook_size=int(data["codebook_size"]),
                   tokenizer_sha256=data["tokenizer_sha256"], depth=int(data.get("depth", 1)),
                   views=tuple(data.get("views", ("plain",))), split=data.get("split", ""),
                   pixel_grid=tuple(data["pixel_grid"]) if data.get("pixel_grid") else None,
                   pixel_codebook_size=data.get("pixel_codebook_size"))


def _code_column(codes: np.ndarray, length: int, codebook_size: int, what: str,
                 shape: str) -> pa.FixedSizeListArray:
    codes = np.asarray(codes).reshape(len(codes), -1)
    if codes.shape[1] != length:
        raise CodesError(f"{codes.shape[1]} {what} per image, expected {length} ({shape})")
    if codes.size and (codes.min() < 0 or codes.max() > INT16_MAX or codes.max() >= codebook_size):
        raise CodesError(f"{what} span [{codes.min()}, {codes.max()}]; they must lie in "
                         f"[0, {min(codebook_size - 1, INT16_MAX)}] to be stored as int16")
    return pa.FixedSizeListArray.from_arrays(pa.array(codes.astype(np.int16, copy=False).ravel(), pa.int16()), length)


def codes_table(keys, labels, views, codes: np.ndarray, meta: CodesMeta,
                pixel_codes: np.ndarray | None = None) -> pa.Table:
    """Rows of the contract from arrays; codes (rows, ...) are flattened per row and must fit int16. With
    `meta.pixel_grid`, `pixel_codes` are the pixel tokenizer's codes of the same rows."""
    columns = [
        pa.array(np.asarray(keys).astype(str), pa.string()),
        pa.array(np.asarray(labels, np.int32), pa.int32()),
        pa.array(np.asarray(views, np.int8), pa.int8()),
        _code_column(codes, meta.length, meta.codebook_size, "codes", f"grid {meta.grid} x depth {meta.depth}"),
    ]
    if (pixel_codes is None) != (meta.pixel_grid is None):
        raise CodesError("pixel codes go with a meta that has a pixel grid, and only then")
    if pixel_codes is not None:
        columns.append(_code_column(pixel_codes, meta.pixel_length, meta.pixel_codebook_size, "pixel codes",
                                    f"grid {meta.pixel_grid}"))
    return pa.Table.from_arrays(columns, schema=meta.schema())


def codes_matrix(table: pa.Table, meta: CodesMeta | None = None) -> np.ndarray:
    """The `codes` column as an int16 (rows, length) array, zero-copy where Arrow allows; with `meta`, after
    checking the table is of that contract (its schema metadata, and rows of meta.length codes)."""
    if meta is not None:
        check_schema(table.schema, meta.grid, meta.depth, meta.codebook_size, "this table")
    column = table.column("codes").combine_chunks()
    length = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, length)


def read_meta(path: str, filesystem=None) -> CodesMeta:
    return CodesMeta.from_schema(pq.read_schema(path, filesystem=filesystem))


def check_schema(schema: pa.Schema, grid: tuple[int, int], depth: int, codebook_size: int, source: str) -> CodesMeta:
    """The contract of a code file's schema against what its reader expects: grid, depth (codes per position),
    codebook size, and a `codes` column of grid x grid x depth codes per row. Raises CodesError naming `source`."""
    try:
        meta = CodesMeta.from_schema(schema)
    except CodesError as error:
        raise CodesError(f"{source}: {error}") from None
    expected = {"grid": tuple(grid), "depth": depth, "codebook_size": codebook_size}
    wrong = {k: (getattr(meta, k), v) for k, v in expected.items() if getattr(meta, k) != v}
    if wrong:
        said = ", ".join(f"{k} {found} where {want} was expected" for k, (found, want) in wrong.items())
        raise CodesError(f"{source}: codes of another shape ({said})")
    column = schema.field("codes").type if "codes" in schema.names else None
    if not isinstance(column, pa.FixedSizeListType) or column.list_size != meta.length:
        raise CodesError(f"{source}: the codes column is {column}, not {meta.length} int16 codes per row "
                         f"(grid {meta.grid} x depth {meta.depth})")
    return meta


def check_code_files(paths: list[str], grid: tuple[int, int], depth: int, codebook_size: int,
                     filesystem=None) -> None:
    """`check_schema` for every file (only their footers are read)."""
    for path in paths:
        check_schema(pq.read_schema(path, filesystem=filesystem), grid, depth, codebook_size, path)


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
