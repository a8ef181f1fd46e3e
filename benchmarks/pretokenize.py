"""Pretokenize throughput: the Ray Data stage (read -> views -> tokenizer actors -> Parquet) against a plain
single-process loop over the same shards, the same tokenizer and the same views, side by side.

    python benchmarks/pretokenize.py --out bench-out/pretokenize.json [--images 20000] [--size tiny]

Data: Fashion-MNIST at 32 px from the Debian package, ingested once. The tokenizer is the real stage's
export after one training step: encoding speed does not depend on how trained it is.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import ROOT, PeakMemory, write_report

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from pipeline.config import load_config
from pipeline.data.codes import CodesMeta, codes_table
from pipeline.data.shards import iter_samples, list_shards
from pipeline.data.transforms import to_float
from pipeline.data.views import VIEW_IDS, cut_view
from pipeline.models.tokenizer import load_tokenizer
from pipeline.storage import Manifest, RunDir
from stages.runner import run_pipeline


def bare_loop(run_dir: Path, views: list[str], batch_size: int, threads: int) -> dict:
    """One process: read the shards, cut views, encode, write Parquet. No Ray."""
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    grid = tokenizer.settings.grid
    out = Path(tempfile.mkdtemp(prefix="bare-codes-"))
    started = time.perf_counter()
    images = 0
    for split in ("train", "val"):
        meta = CodesMeta((grid, grid), tokenizer.settings.codebook_size, "bench", views=tuple(views), split=split)
        batch: list[dict] = []
        part = 0

        def flush() -> None:
            nonlocal part
            pixels = np.stack([s["image"] for s in batch])
            keys = [s["key"] for s in batch]
            labels = [s["label"] for s in batch]
            columns = {"key": [], "label": [], "view": [], "codes": []}
            for view in views:
                cut = cut_view(pixels, view, tokenizer.settings.image_size)
                with torch.inference_mode():
                    columns["codes"].append(tokenizer.encode(to_float(torch.from_numpy(cut))).numpy())
                columns["key"] += keys
                columns["label"] += labels
                columns["view"] += [VIEW_IDS[view]] * len(keys)
            table = codes_table(columns["key"], columns["label"], columns["view"],
                                np.concatenate(columns["codes"]), meta)
            pq.write_table(table, out / f"{split}-{part:05d}.parquet", compression="zstd")
            part += 1
            batch.clear()

        for url in list_shards(str(run_dir / "shards" / split)):
            for sample in iter_samples(url):
                batch.append(sample)
                images += 1
                if len(batch) == batch_size:
                    flush()
        if batch:
            flush()
    seconds = time.perf_counter() - started
    shutil.rmtree(out)
    return {"images": images, "seconds": round(seconds, 2), "images_per_s": round(images / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out/pretokenize.json")
    parser.add_argument("--images", type=int, default=20000, help="train images (val: a tenth)")
    parser.add_argument("--size", default="tiny", help="encoder size of the tokenizer")
    parser.add_argument("--views", default="plain,hflip")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--pools", default="1x1.5,2x0.75,1x1",
                        help="actor pools to measure: ACTORSxCPUS_PER_ACTOR, comma separated")
    args = parser.parse_args()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)  # never a stale head
    ray.data.DataContext.get_current().enable_progress_bars = False
    views = args.views.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-pretok-"))
    base = [f"ingest.max_images_per_split={args.images}", "ingest.cpus_per_task=0.5",
            f"tokenizer.encoder={args.size}", "tokenizer.steps=1", "tokenizer.adversarial_weight=0",
            "tokenizer.val_images=64", "tokenizer.resources.num_workers=1", f"pretokenize.views=[{','.join(views)}]",
            f"pretokenize.batch_size={args.batch_size}", "pretokenize.piece_images=1000000"]
    run_dir = work / "run"
    run_pipeline(load_config(ROOT / "configs" / "demo.yaml", base), str(run_dir), to_stage="tokenizer")
    shards = Manifest.read(RunDir(str(run_dir)), "shards")
    results: dict = {"images": {s: c["images"] for s, c in shards.counts.items()}, "views": views,
                     "tokenizer_encoder": args.size, "batch_size": args.batch_size}
    cpus = int(ray.cluster_resources().get("CPU", 1))
    results["bare_loop"] = bare_loop(run_dir, views, args.batch_size, threads=cpus)
    for pool in args.pools.split(","):
        actors, per_actor = pool.split("x")
        overrides = base + [f"pretokenize.actors={actors}", f"pretokenize.cpus_per_actor={per_actor}",
                            "pretokenize.cpus_per_task=0.25"]
        with PeakMemory() as memory:
            outcome = run_pipeline(load_config(ROOT / "configs" / "demo.yaml", overrides), str(run_dir),
                                   only="pretokenize", force=("pretokenize",))[0]
        rate = outcome.manifest.metrics["images_per_second"]
        results[f"ray_{pool}"] = {"actors": int(actors), "cpus_per_actor": float(per_actor),
                                  "images_per_s": round(rate, 1), "stage_seconds": round(outcome.seconds, 2),
                                  "ray_over_bare": round(rate / results["bare_loop"]["images_per_s"], 2),
                                  "peak_rss_mib_driver_and_workers": memory.peak_mib}
    shutil.rmtree(work)
    write_report(args.out, "pretokenize", results)


if __name__ == "__main__":
    main()
