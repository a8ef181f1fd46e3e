"""Pretokenize: every image of the ingest shards, in every configured view, to its code grid, as Parquet.

One Ray Data stream covers every piece still to do, of both splits: read the shards, cut the views in CPU
tasks, encode on a pool of tokenizer actors (one per accelerator on a GPU cluster, a few on CPU) that
starts once for the whole stage. The stream keeps shard order, so the driver, writing the (small) code
rows to Parquet as they arrive, knows a piece is whole when the next one begins. A piece is a run of whole
shards: written to a staging folder, checked (rows = images x views, keys unique, codes in range), then
moved into place and recorded. A killed run redoes only the pieces without a record, and the manifest
lists only recorded files, so no reader ever sees half a piece.

Under DiGIT's tokens (tokens: ssl_kmeans) the same actors also hold the SSL encoder and the K-means centroids:
`codes` gets each view's SSL tokens (what the Transformer models) and `pixel_codes` the pixel tokenizer's
codes of the same view (what the render stage learns to predict from them).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from pipeline.config import PipelineConfig, PretokenizeConfig
from pipeline.data.codes import INT16_MAX, CodesMeta, codes_matrix, codes_table, file_sha256
from pipeline.data.transforms import to_float
from pipeline.data.views import VIEW_IDS, view_rows
from pipeline.device import exact_fp32, inference_device
from pipeline.metrics.codebook import CodeStackUsage
from pipeline.models.io import SETTINGS_FILE, WEIGHTS_FILE
from pipeline.models.settings import TokenizerSettings
from pipeline.models.tokenizer import load_tokenizer
from pipeline.stage import Progress, StageContext, StageInputError, StageResult
from pipeline.output_records import check_recorded
from pipeline.storage import Manifest, RunDir, local_folder

PROGRESS, STAGING = "_progress", "_staging"


class PretokenizeError(StageInputError):
    """Inputs that do not fit together: stale shards, a tokenizer unlike the config."""


# ---------------------------------------------------------------------------------------------
# The encoding step (the view step is `pipeline.data.views.view_rows`)


class EncodeBatches:
    """Actor: loads the exported tokenizer once (and, for SSL tokens, the encoder and centroids), then turns
    image batches into rows of the codes contract (plus the `piece` column the driver sorts them by)."""

    def __init__(self, tokenizer_location: str, meta: dict, threads: int, use_gpu: bool,
                 ssl_source: dict | None = None, centroids_location: tuple[str, str] | None = None):
        self.device = inference_device(threads, use_gpu)
        if self.device.type == "cuda":  # no TF32: its 10-bit mantissa would move codes near a tie off the CPU's
            exact_fp32()
        self.model = load_tokenizer(local_folder(tokenizer_location), self.device)
        self.meta = CodesMeta(**{**meta, "grid": tuple(meta["grid"]), "views": tuple(meta["views"]),
                                 "pixel_grid": tuple(meta["pixel_grid"]) if meta.get("pixel_grid") else None})
        self.encoder = self.centroids = None
        if ssl_source is not None:
            from pipeline.models.ssl_tokens import EncoderSource, load_feature_encoder

            source = dict(ssl_source)
            if source.get("folder"):
                source["folder"] = local_folder(source["folder"])
            self.encoder = load_feature_encoder(EncoderSource(**source), self.device)
            self.centroids = read_centroids(*centroids_location).to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]):
        images = to_float(torch.from_numpy(np.ascontiguousarray(batch["image"]))).to(self.device)
        with torch.inference_mode():
            codes = self.model.encode(images).cpu().numpy()
        if self.encoder is not None:
            from pipeline.models.ssl_tokens import ssl_tokens

            tokens = ssl_tokens(self.encoder, self.centroids, images).cpu().numpy()
            table = codes_table(batch["key"], batch["label"], batch["view"], tokens, self.meta, pixel_codes=codes)
        else:
            table = codes_table(batch["key"], batch["label"], batch["view"], codes, self.meta)
        return table.append_column("piece", pa.array(batch["piece"], pa.int32()))


def read_centroids(folder: str, name: str) -> torch.Tensor:
    """The K-means stage's centroids (K, dim) from its folder (a location any worker can open)."""
    from safetensors.torch import load as load_safetensors

    return load_safetensors(RunDir(folder).read_bytes(name))["centroids"]


# ---------------------------------------------------------------------------------------------
# Checks before any Ray work


def check_inputs(cfg: PipelineConfig, ctx: StageContext) -> tuple[dict, str]:
    """The exported tokenizer's settings and hash, after checking it belongs to these shards and config."""
    ingest, tokenizer = ctx.inputs["ingest"], ctx.inputs["tokenizer"]
    if tokenizer.inputs.get("ingest") != ingest.fingerprint:
        raise PretokenizeError(
            f"the tokenizer in {ctx.run_dir.location} was trained on shards of another ingest run "
            f"({tokenizer.inputs.get('ingest')} != {ingest.fingerprint}); rerun the tokenizer (--from tokenizer)")
    shards, tokenizer_folder = ctx.folder_of("ingest"), ctx.folder_of("tokenizer")
    for split, files in ingest.outputs["shards"].items():
        missing = [f for f in files if not ctx.run_dir.exists(shards, f)]
        if missing:
            raise PretokenizeError(f"{len(missing)} {split} shard(s) listed by the ingest manifest are gone, "
                                   f"e.g. {shards}/{missing[0]}; rerun ingest (--from ingest --force ingest)")
    settings = json.loads(ctx.run_dir.read_bytes(tokenizer_folder, SETTINGS_FILE))
    tcfg = cfg.tokenizer
    expected = {"image_size": tcfg.image_size, "patch_size": tcfg.patch_size, "codebook_size": tcfg.codebook_size,
                "quantizer": tcfg.quantizer, "rq_depth": tcfg.rq_depth}
    if tcfg.quantizer != "rq":
        expected.pop("rq_depth")
    # fields added later are absent from the files of models that keep their default
    stored = {k: settings.get(k, TokenizerSettings.model_fields[k].default) for k in expected}
    wrong = {k: (stored[k], v) for k, v in expected.items() if stored[k] != v}
    if wrong:
        details = ", ".join(f"{k}: file {a} vs config {b}" for k, (a, b) in wrong.items())
        raise PretokenizeError(f"{tokenizer_folder}/{SETTINGS_FILE} does not match the tokenizer config ({details})")
    if settings["codebook_size"] > INT16_MAX + 1:
        raise PretokenizeError(f"codebook size {settings['codebook_size']} does not fit int16 codes")
    digest = file_sha256(ctx.run_dir.read_bytes(tokenizer_folder, WEIGHTS_FILE))
    damaged = check_recorded(tokenizer, tokenizer_folder, WEIGHTS_FILE, digest)  # read whole anyway: cheap
    if damaged:
        raise PretokenizeError(f"{damaged}: the weights changed since; rerun the tokenizer "
                               f"(--from tokenizer --force tokenizer)")
    return settings, digest[:16]


# ---------------------------------------------------------------------------------------------
# Pieces: resumable units of whole shards


@dataclass
class Piece:
    """Whole shards of one split, committed together as `codes/<split>/part-<number>-<index>.parquet`."""
    split: str
    number: int
    files: list[str]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.number:05d}"

    def staging(self, folder: str) -> str:
        """Where the piece's files are written before its commit."""
        return f"{folder}/{STAGING}/{self.name}"


def plan_pieces(files: list[str], shard_size: int, piece_images: int) -> list[list[str]]:
    per_piece = max(1, piece_images // max(shard_size, 1))
    return [files[i:i + per_piece] for i in range(0, len(files), per_piece)]


def _actor_env(pcfg: PretokenizeConfig) -> dict:
    """A CPU actor's torch threads sleep between batches instead of spinning (OpenMP's default), so the read
    and view tasks beside it get the cores: 1.05-1.11 -> 1.23 of the bare loop (two rounds of one run, 2 cores)."""
    if pcfg.gpus_per_actor > 0:
        return {}
    return {"runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}}  # merged with the job's runtime_env


def _stream_codes(ctx: StageContext, pcfg: PretokenizeConfig, pieces: list[Piece], meta: CodesMeta,
                  image_size: int) -> Iterator[pa.Table]:
    """Code rows (with a `piece` column indexing `pieces`) in shard order, from one stream and actor pool."""
    from stages.datasets import shard_dataset

    files = [name for piece in pieces for name in piece.files]
    piece_of_shard = {name: index for index, piece in enumerate(pieces) for name in piece.files}
    dataset = shard_dataset(ctx, pieces[0].split, files, read_cpus=pcfg.cpus_per_task, with_source=True)
    # Views in big batches (few tasks, little scheduling), encoding in the configured batch size. The view
    # step lives in a torch-free module: these tasks start fast and leave the CPU to the encoder.
    dataset = dataset.map_batches(view_rows, batch_size=pcfg.batch_size * 8, num_cpus=pcfg.cpus_per_task,
                                  fn_kwargs={"views": list(pcfg.views), "size": image_size,
                                             "crop_scale": pcfg.crop_scale, "group_of_shard": piece_of_shard})
    meta_dict = {**meta.__dict__, "grid": list(meta.grid), "views": list(meta.views)}
    ssl_tokens = {}
    if "kmeans" in ctx.inputs:
        from stages.kmeans import encoder_source

        ssl_tokens = {"ssl_source": encoder_source(ctx, image_size),
                      "centroids_location": (ctx.uri_of("kmeans"), ctx.inputs["kmeans"].outputs["centroids"])}
    dataset = dataset.map_batches(
        EncodeBatches, batch_size=pcfg.batch_size, num_cpus=pcfg.cpus_per_actor, num_gpus=pcfg.gpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=pcfg.actors), **_actor_env(pcfg),
        fn_constructor_kwargs={"tokenizer_location": ctx.uri_of("tokenizer"), "meta": meta_dict,
                               "threads": max(1, round(pcfg.cpus_per_actor)),
                               "use_gpu": pcfg.gpus_per_actor > 0, **ssl_tokens})
    dataset.context.execution_options.preserve_order = True  # a piece is whole once the next one begins
    yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")


class PieceWriter:
    """One piece's Parquet files in its staging folder, a new file every `rows_per_file` rows."""

    def __init__(self, run_dir: RunDir, staging: str, schema: pa.Schema, rows_per_file: int, compression: str):
        self.run_dir, self.staging, self.schema = run_dir, staging, schema
        self.rows_per_file, self.compression = rows_per_file, compression
        self.files, self.writer, self.rows_in_file = 0, None, 0
        run_dir.makedirs(staging)

    def write(self, table: pa.Table) -> None:
        table = pa.Table.from_arrays(table.select(self.schema.names).columns, schema=self.schema)
        while table.num_rows:
            if self.writer is None or self.rows_in_file == self.rows_per_file:
                self.close()
                path = self.run_dir.path(self.staging, f"{self.files:05d}.parquet")
                self.writer = pq.ParquetWriter(path, self.schema, filesystem=self.run_dir.fs,
                                               compression=self.compression)
                self.files, self.rows_in_file = self.files + 1, 0
            take = min(table.num_rows, self.rows_per_file - self.rows_in_file)
            self.writer.write_table(table.slice(0, take))
            self.rows_in_file += take
            table = table.slice(take)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _check_piece(run_dir: RunDir, staging: str, meta: CodesMeta, views: int) -> dict:
    """Rows, keys and a code histogram of a staged piece (per depth, depth-major: depth x codebook_size counts);
    raises on anything the contract forbids."""
    files = [name for name in run_dir.list(staging) if name.endswith(".parquet")]
    histogram = np.zeros(meta.depth * meta.codebook_size, np.int64)
    depth_offsets = np.arange(meta.depth, dtype=np.int64) * meta.codebook_size
    seen: set[tuple[str, int]] = set()
    keys: set[str] = set()
    rows = 0
    for name in files:
        table = pq.read_table(run_dir.path(staging, name), filesystem=run_dir.fs)
        if CodesMeta.from_schema(table.schema) != meta:
            raise PretokenizeError(f"{staging}/{name}: schema metadata differs from the stage's")
        pairs = set(zip(table.column("key").to_pylist(), table.column("view").to_pylist()))
        if len(pairs) != table.num_rows or seen & pairs:
            raise PretokenizeError(f"{staging}/{name}: duplicate (key, view) rows")
        seen |= pairs
        keys.update(k for k, _ in pairs)
        codes = codes_matrix(table, meta)
        by_depth = codes.reshape(len(codes), -1, meta.depth).astype(np.int64) + depth_offsets
        histogram += np.bincount(by_depth.ravel(), minlength=len(histogram))
        rows += table.num_rows
    if rows != len(keys) * views:
        raise PretokenizeError(f"{staging}: {rows} rows for {len(keys)} images x {views} views")
    return {"files": files, "rows": rows, "images": len(keys), "histogram": histogram}


# ---------------------------------------------------------------------------------------------
# The stage


def _commit_piece(run_dir: RunDir, folder: str, piece: Piece, meta: CodesMeta, views: int, seconds: float) -> dict:
    """Checked staged files moved into place, then the record that makes them count."""
    staging = piece.staging(folder)
    checked = _check_piece(run_dir, staging, meta, views)
    names = []
    run_dir.makedirs(folder, piece.split)
    for index, name in enumerate(sorted(checked["files"])):
        final = f"part-{piece.number:05d}-{index:04d}.parquet"
        run_dir.fs.move(run_dir.path(staging, name), run_dir.path(folder, piece.split, final))
        names.append(final)
    run_dir.delete(staging)
    done = {"files": names, "rows": checked["rows"], "images": checked["images"],
            "histogram": checked["histogram"].tolist(), "seconds": seconds}
    run_dir.write_json(done, folder, PROGRESS, f"{piece.name}.json")
    return done


def _encode_pending(cfg: PipelineConfig, ctx: StageContext, pending: list[Piece], metas: dict[str, CodesMeta],
                    image_size: int, images_to_do: int) -> tuple[dict[str, dict], float]:
    """Encodes and commits the pieces without a record, in order. Returns their records and the seconds."""
    pcfg, run_dir, folder, log = cfg.pretokenize, ctx.run_dir, ctx.folder, ctx.log
    for piece in pending:  # parts of a move the kill interrupted
        for stale in run_dir.list(folder, piece.split):
            if stale.startswith(f"part-{piece.number:05d}-"):
                run_dir.delete(folder, piece.split, stale)
    progress = Progress(log, images_to_do, "images")
    any_meta = CodesMeta(**{**metas[pending[0].split].__dict__, "split": ""})
    started = last = time.perf_counter()
    current, writer, records = -1, None, {}

    def finish(index: int) -> None:
        nonlocal last
        writer.close()
        piece, now = pending[index], time.perf_counter()
        done = _commit_piece(run_dir, folder, piece, metas[piece.split], len(pcfg.views), now - last)
        records[piece.name] = done
        log.info("%s piece %d: %d images -> %d rows in %.1fs", piece.split, piece.number + 1, done["images"],
                 done["rows"], now - last)
        progress.update(done["images"], f"{piece.split} piece {piece.number + 1}")
        last = now

    for table in _stream_codes(ctx, pcfg, pending, any_meta, image_size):
        piece_column = table.column("piece").to_numpy()
        starts = [0, *(np.flatnonzero(np.diff(piece_column)) + 1).tolist()]
        for begin, end in zip(starts, starts[1:] + [table.num_rows]):
            index = int(piece_column[begin])
            if index != current:
                if index < current:  # only if Ray Data broke its order promise; never write a piece twice
                    raise PretokenizeError(f"rows of {pending[index].name} arrived after that piece was committed")
                if writer is not None:
                    finish(current)
                if index > current + 1:
                    raise PretokenizeError(f"{pending[current + 1].name} gave no rows: are its shards empty?")
                current = index
                piece = pending[index]
                writer = PieceWriter(run_dir, piece.staging(folder), metas[piece.split].schema(), pcfg.rows_per_file,
                                     pcfg.compression)
            writer.write(table.slice(begin, end - begin))
    if writer is not None:
        finish(current)
    if current != len(pending) - 1:
        raise PretokenizeError(f"{pending[current + 1].name} gave no rows: are its shards empty?")
    return records, time.perf_counter() - started


def check_resources(pcfg: PretokenizeConfig) -> None:
    """The actor pool plus one read/view task must fit the cluster, or the stream waits forever."""
    available = ray.cluster_resources()
    needed = pcfg.actors * pcfg.cpus_per_actor + pcfg.cpus_per_task
    if needed > available.get("CPU", 0):
        raise PretokenizeError(
            f"pretokenize.actors x pretokenize.cpus_per_actor + pretokenize.cpus_per_task = {needed:g} CPUs, "
            f"but the cluster has {available.get('CPU', 0):g}: nothing would be left to read the shards")
    if pcfg.gpus_per_actor and pcfg.actors * pcfg.gpus_per_actor > available.get("GPU", 0):
        raise PretokenizeError(f"pretokenize asks for {pcfg.actors * pcfg.gpus_per_actor:g} GPUs; the cluster "
                               f"has {available.get('GPU', 0):g} (set pretokenize.gpus_per_actor=0 on CPU)")


def run(cfg: PipelineConfig, ctx: StageContext) -> StageResult:
    pcfg, run_dir, folder, log = cfg.pretokenize, ctx.run_dir, ctx.folder, ctx.log
    ingest: Manifest = ctx.inputs["ingest"]
    settings, tokenizer_hash = check_inputs(cfg, ctx)
    check_resources(pcfg)
    grid = settings["image_size"] // settings["patch_size"]
    depth = settings["rq_depth"] if settings.get("quantizer") == "rq" else 1  # codes per position
    shared = settings.get("rq_shared_codebook", True)
    shard_size = int(ingest.config.get("shard_size", 1000))

    marker = {"fingerprint": ctx.fingerprint, "piece_images": pcfg.piece_images, "tokenizer": tokenizer_hash}
    if not run_dir.exists(folder, PROGRESS, "marker.json") or run_dir.read_json(folder, PROGRESS, "marker.json") != marker:
        run_dir.delete(folder)  # another configuration's partial output is not resumable
        run_dir.write_json(marker, folder, PROGRESS, "marker.json")
    run_dir.delete(folder, STAGING)

    pixel = {}
    if "kmeans" in ctx.inputs:  # DiGIT: SSL tokens in `codes`, the pixel codes beside them
        kmeans = ctx.inputs["kmeans"]
        pixel = {"pixel_grid": (grid, grid), "pixel_codebook_size": settings["codebook_size"]}
        grid, tokens_vocab = int(kmeans.outputs["grid"]), int(kmeans.outputs["clusters"])
        tokenizer_hash = f"{tokenizer_hash}+kmeans-{kmeans.fingerprint}"
    else:
        tokens_vocab = settings["codebook_size"]
    metas = {split: CodesMeta(grid=(grid, grid), codebook_size=tokens_vocab, depth=depth,
                               tokenizer_sha256=tokenizer_hash, views=tuple(pcfg.views), split=split, **pixel)
             for split in ingest.outputs["shards"]}
    pieces = {split: [Piece(split, number, files) for number, files in
                      enumerate(plan_pieces(shard_files, shard_size, pcfg.piece_images))]
              for split, shard_files in ingest.outputs["shards"].items()}
    recorded = {piece.name: run_dir.read_json(folder, PROGRESS, f"{piece.name}.json")
                for split_pieces in pieces.values() for piece in split_pieces
                if run_dir.exists(folder, PROGRESS, f"{piece.name}.json")}
    pending = [piece for split_pieces in pieces.values() for piece in split_pieces if piece.name not in recorded]
    if recorded:
        log.info("pretokenize: %d of %d pieces already written, kept", len(recorded), len(recorded) + len(pending))
    encode_seconds, images_now = 0.0, 0
    if pending:
        images_to_do = sum(ingest.counts[s]["images"] for s in pieces) - sum(r["images"] for r in recorded.values())
        written, encode_seconds = _encode_pending(cfg, ctx, pending, metas, settings["image_size"], images_to_do)
        images_now = sum(done["images"] for done in written.values())
        recorded.update(written)

    outputs: dict[str, list[str]] = {}
    counts: dict[str, dict] = {}
    metrics: dict[str, float] = {}
    for split, split_pieces in pieces.items():
        meta, expected = metas[split], ingest.counts[split]["images"]
        usage = CodeStackUsage(meta.codebook_size, meta.depth, shared)
        split_files: list[str] = []
        rows = images = 0
        for piece in split_pieces:
            done = recorded[piece.name]
            split_files += [f"{split}/{name}" for name in done["files"]]
            rows += done["rows"]
            images += done["images"]
            usage.add_counts(done["histogram"])
        if images != expected:
            raise PretokenizeError(f"{split}: encoded {images} images but the ingest manifest has {expected}")
        stats = usage.result()  # whole-split figures over the table, and per depth (`_depth<d>`) under RQ
        outputs[split] = split_files
        counts[split] = {"rows": rows, "images": images, "files": len(split_files)}
        metrics.update({f"{split}_rows": float(rows), f"{split}_images": float(images)})
        metrics.update({f"{split}_{name}": value for name, value in stats.items()  # per 256 needs the images
                        if name.split("_depth")[0] in ("usage_split", "perplexity", "dead_codes")})
        by_depth = [level.histogram.tolist() for level in usage.depths] or usage.table.histogram.tolist()
        ctx.tracker.log_dict({"codebook_size": meta.codebook_size, "depth": meta.depth, "histogram": by_depth},
                             f"code_histogram_{split}.json")
    run_dir.delete(folder, PROGRESS)
    run_dir.delete(folder, STAGING)
    metrics["images_per_second"] = images_now / encode_seconds if encode_seconds else 0.0
    metrics["encode_seconds"] = encode_seconds
    log.info("pretokenize: %s; %.1f images/s", counts, metrics["images_per_second"])
    if pixel:
        metrics["tokens_per_image"] = float(grid * grid)
    return StageResult(
        outputs={"codes": outputs, "grid": [grid, grid], "depth": depth, "codebook_size": tokens_vocab,
                 **({"tokens": "ssl_kmeans", "pixel_grid": list(pixel["pixel_grid"]),
                     "pixel_codebook_size": pixel["pixel_codebook_size"]} if pixel else {}),
                 "shared_codebook": shared, "length": grid * grid * depth,  # length: codes per image
                 "views": {v: VIEW_IDS[v] for v in pcfg.views},
                 "tokenizer_sha256": tokenizer_hash, "image_size": settings["image_size"],
                 "channels": settings.get("channels", 3)},
        counts=counts, metrics=metrics,
        details={"rows_per_file": pcfg.rows_per_file, "piece_images": pcfg.piece_images})
