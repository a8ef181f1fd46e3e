"""Ingest: any configured image source -> seeded-shuffled WebDataset shards, one Ray Data task per shard.

The driver indexes the source (headers and file names only), shuffles the index with the configured
seed and cuts it into shards, so which image lands in which shard is fixed before any pixel is read.
Ray Data then writes the shards in parallel. Each finished shard leaves a small progress record, so a
killed run resumes with exactly the shards it is missing and never duplicates a key.

The plan is only the same on resume if the source is: the first attempt records the listing the index was
built from (names, sizes, modification times) and its fingerprint, and a resume over a changed source is an
error naming what changed (`--force ingest` starts over), never a mix of two plans.
"""
from __future__ import annotations

import io
import json
import time
from collections import Counter
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import ray

from pipeline.config import PipelineConfig
from pipeline.data.shards import ShardStats, shard_name, write_shard
from pipeline.data.sources import FILES_SCHEMA, SourceError, build_index, check_source, describe_changes
from pipeline.stage import Progress, StageContext, StageResult
from pipeline.storage import TEMPORARY_MARK

PROGRESS = "_progress"
SOURCE_LISTING = "source.arrow"  # in PROGRESS: the listing the first attempt indexed


def _to_ipc(table: pa.Table, compression: str | None = None) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


def plan_shards(table: pa.Table, seed: int, shard_size: int, limit: int | None) -> list[pa.Table]:
    """Seeded shuffle (so class-sorted sources mix), optional truncation, cut into shards."""
    order = np.random.default_rng(seed).permutation(table.num_rows)
    if limit is not None:
        order = order[:limit]
    shuffled = table.take(pa.array(order))
    return [shuffled.slice(start, shard_size) for start in range(0, shuffled.num_rows, shard_size)]


def _write_one(item: dict, resolution: int | None, image_format: str, jpeg_quality: int) -> dict:
    stats = write_shard(_from_ipc(item["rows"]), item["split"], item["shard"], item["location"],
                        resolution, image_format, jpeg_quality)
    return {"stats": json.dumps(asdict(stats))}


def preflight(cfg: PipelineConfig) -> None:
    check_source(cfg.ingest)


def run(cfg: PipelineConfig, ctx: StageContext) -> StageResult:
    icfg = cfg.ingest
    run_dir, folder, log = ctx.run_dir, ctx.folder, ctx.log
    started = time.perf_counter()
    index = build_index(icfg)  # source errors surface here, before any shard exists
    index_seconds = time.perf_counter() - started
    total_indexed = {s: i.table.num_rows for s, i in index.splits.items()}
    log.info("indexed %s in %.1fs; %d classes", total_indexed, index_seconds, len(index.classes))

    _start_or_resume(ctx, index)
    done, todo, planned = _plan(ctx, index)
    images_to_write = sum(item["images"] for item in todo)
    if done:
        log.info("resuming: %d shards already written, %d to go", len(done), len(todo))

    write_started = time.perf_counter()
    progress = Progress(log, images_to_write, "images")
    if todo:
        dataset = ray.data.from_items(todo, override_num_blocks=len(todo)).map(
            _write_one, num_cpus=icfg.cpus_per_task,
            fn_kwargs={"resolution": icfg.resolution, "image_format": icfg.image_format,
                       "jpeg_quality": icfg.jpeg_quality})
        for row in dataset.iter_rows():
            stats = ShardStats(**json.loads(row["stats"]))
            stats.labels = {int(k): v for k, v in stats.labels.items()}
            run_dir.write_json(asdict(stats), folder, PROGRESS, f"{stats.split}-{stats.shard:06d}.json")
            done[(stats.split, stats.shard)] = stats
            progress.update(stats.count + len(stats.skipped), f"shard {stats.split}/{stats.shard}")
    write_seconds = time.perf_counter() - write_started

    counts, skipped, shard_files = _summaries(index, done, planned, total_indexed)
    run_dir.write_json({str(i): c for i, c in enumerate(index.classes)}, folder, "classes.json")
    run_dir.delete(folder, PROGRESS)
    written_now = progress.done
    total_images = sum(c["images"] for c in counts.values())
    metrics = {
        "images_total": float(total_images),
        "skipped_total": float(sum(c["skipped"] for c in counts.values())),
        "index_seconds": index_seconds,
        "write_seconds": write_seconds,
        "images_per_second": written_now / write_seconds if written_now and write_seconds > 0 else 0.0,
    }
    for split, c in counts.items():
        metrics[f"{split}_images"] = float(c["images"])
        metrics[f"{split}_skipped"] = float(c["skipped"])
    log.info("wrote %d images (%d skipped) at %.1f images/s", total_images, metrics["skipped_total"],
             metrics["images_per_second"])
    # Grey data is tokenized as one channel (stages/tokenizer.py): every image written must be grey, as counted
    # from the decoded pixels, so one colour image anywhere keeps three.
    all_grey = all(c["grey_images"] == c["images"] for c in counts.values())
    return StageResult(
        outputs={"classes": "classes.json", "shards": shard_files, "image_format": icfg.image_format,
                 "resolution": icfg.resolution, "channels": 1 if all_grey else 3},
        counts=counts, metrics=metrics,
        details={"skipped": skipped, "ignored": {s: i.ignored for s, i in index.splits.items()},
                 "num_classes": len(index.classes), "source_fingerprint": index.fingerprint})


def _start_or_resume(ctx: StageContext, index) -> None:
    """A partial run of another configuration is not resumable: start clean, recording the source. One of
    this configuration over a source that changed since is not resumable either, and not silently restarted."""
    run_dir, folder, icfg = ctx.run_dir, ctx.folder, ctx.cfg.ingest
    marker = run_dir.read_json(folder, PROGRESS, "fingerprint.json") if run_dir.exists(
        folder, PROGRESS, "fingerprint.json") else None
    if marker is not None and marker.get("fingerprint") == ctx.fingerprint and "source" in marker:
        if marker["source"] != index.fingerprint:
            raise SourceError(_source_changed(run_dir, folder, index, icfg))
    else:
        run_dir.delete(folder)
        run_dir.write_bytes(_to_ipc(index.files, compression="zstd"), folder, PROGRESS, SOURCE_LISTING)
        run_dir.write_json({"fingerprint": ctx.fingerprint, "source": index.fingerprint},
                           folder, PROGRESS, "fingerprint.json")
    for split in index.splits:  # temporary files of shards whose writer was killed
        for name in run_dir.list(folder, split):
            if TEMPORARY_MARK in name:
                run_dir.delete(folder, split, name)


def _plan(ctx: StageContext, index) -> tuple[dict[tuple[str, int], ShardStats], list[dict], dict[str, int]]:
    """(shards an earlier attempt finished, shards to write, images planned per split)."""
    run_dir, folder, icfg = ctx.run_dir, ctx.folder, ctx.cfg.ingest
    done: dict[tuple[str, int], ShardStats] = {}
    todo: list[dict] = []
    planned: dict[str, int] = {}
    for split, split_index in index.splits.items():
        shards = plan_shards(split_index.table, icfg.seed, icfg.shard_size, icfg.max_images_per_split)
        planned[split] = sum(s.num_rows for s in shards)
        for number, rows in enumerate(shards):
            record = (folder, PROGRESS, f"{split}-{number:06d}.json")
            if run_dir.exists(*record) and run_dir.exists(folder, split, shard_name(number)):
                done[(split, number)] = ShardStats(**run_dir.read_json(*record))
                continue
            todo.append({"split": split, "shard": number, "rows": _to_ipc(rows), "images": rows.num_rows,
                         "location": run_dir.uri(folder, split, shard_name(number))})
    return done, todo, planned


def _summaries(index, done: dict[tuple[str, int], ShardStats], planned: dict[str, int],
               total_indexed: dict[str, int]) -> tuple[dict[str, dict], list[dict], dict[str, list[str]]]:
    """Counts, skipped files and shard names per split for the manifest, from every shard (written now or in
    an earlier attempt); an incomplete split, or one without a valid image, is an error."""
    counts: dict[str, dict] = {}
    skipped: list[dict] = []
    shard_files: dict[str, list[str]] = {}
    for split in index.splits:
        stats = [done[k] for k in sorted(done) if k[0] == split]
        histogram: Counter[int] = Counter()
        for s in stats:
            histogram.update({int(k): v for k, v in s.labels.items()})
            skipped.extend({**x, "split": split} for x in s.skipped)
        reasons = Counter(x["reason"] for s in stats for x in s.skipped)
        written = sum(s.count for s in stats)
        # A shard recorded before grey counting (None) counts as colour: unknown is not grey.
        grey = sum(s.grey or 0 for s in stats)
        counts[split] = {"images": written, "grey_images": grey, "skipped": sum(reasons.values()),
                         "skipped_by_reason": dict(reasons),
                         "planned": planned[split], "indexed": total_indexed[split], "shards": len(stats),
                         "bytes": sum(s.bytes for s in stats),
                         "class_histogram": {str(k): histogram[k] for k in sorted(histogram)},
                         "ignored_files": len(index.splits[split].ignored)}
        shard_files[split] = [f"{split}/{shard_name(s.shard)}" for s in stats]
        if written + counts[split]["skipped"] != planned[split]:
            raise RuntimeError(f"{split}: {written} written + {counts[split]['skipped']} skipped != "
                               f"{planned[split]} planned; shards are incomplete")
        if written == 0:
            why = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
            examples = ", ".join(x["origin"] for s in stats for x in s.skipped[:3])[:300]
            raise SourceError(f"split '{split}' has no valid image: 0 written, {counts[split]['skipped']} skipped "
                              f"({why}; e.g. {examples}) of {planned[split]} planned, "
                              f"{counts[split]['ignored_files']} files ignored; nothing was committed")
    return counts, skipped, shard_files


def _source_changed(run_dir, folder: str, index, icfg) -> str:
    """The error for a resume over a source that changed since the first attempt, naming what changed."""
    if run_dir.exists(folder, PROGRESS, SOURCE_LISTING):
        recorded = _from_ipc(run_dir.read_bytes(folder, PROGRESS, SOURCE_LISTING))
        changes = describe_changes(recorded.cast(FILES_SCHEMA), index.files)
    else:
        changes = "the listing of the first attempt is missing"
    return (f"the {icfg.source} source at {icfg.resolved_root()} changed since this ingest started, so its "
            f"written shards and a new plan would mix: {changes}. Restore the source to resume, or rerun "
            "with --force ingest to start over from the source as it is now")
