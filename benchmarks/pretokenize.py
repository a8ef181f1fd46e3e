"""Pretokenize throughput: the Ray Data stage (read -> views -> tokenizer actors -> Parquet) against a plain
single-process loop over the same shards, the same tokenizer and the same views, side by side.

    python benchmarks/pretokenize.py --out bench-out/pretokenize.json [--images 20000] [--size tiny] [--repeats 3]
    python benchmarks/pretokenize.py --gpu --resolution 256 --patch 8 --size S --pools 1x4   # a GPU machine

Data: Fashion-MNIST from the Debian package (or --fashion-root), ingested once at --resolution. The
tokenizer is the real stage's export after one training step: encoding speed does not depend on how
trained it is. With --gpu both paths encode on the GPU (one actor per GPU in the Ray path).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from statistics import median

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
from pipeline.device import exact_fp32
from pipeline.models.tokenizer import load_tokenizer
from pipeline.storage import Manifest, RunDir
from orchestration.runner import run_pipeline
from stages import spec


def bare_loop(run_dir: Path, views: list[str], batch_size: int, threads: int, device: str) -> dict:
    """One process: read the shards, cut views, encode, write Parquet. No Ray."""
    torch.set_num_threads(threads)
    exact_fp32()  # as the stage's actor: no TF32 in the encoder
    tokenizer = load_tokenizer(run_dir / spec("tokenizer").folder, device)
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
                    images_on_device = to_float(torch.from_numpy(cut)).to(device)
                    columns["codes"].append(tokenizer.encode(images_on_device).cpu().numpy())
                columns["key"] += keys
                columns["label"] += labels
                columns["view"] += [VIEW_IDS[view]] * len(keys)
            table = codes_table(columns["key"], columns["label"], columns["view"],
                                np.concatenate(columns["codes"]), meta)
            pq.write_table(table, out / f"{split}-{part:05d}.parquet", compression="zstd")
            part += 1
            batch.clear()

        for url in list_shards(str(run_dir / spec("ingest").folder / split)):
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
    parser.add_argument("--repeats", type=int, default=1, help="rounds of every path, alternating; medians reported")
    parser.add_argument("--cpus-per-task", type=float, default=0.25, help="CPUs of a read/view task")
    parser.add_argument("--resolution", type=int, default=32, help="ingest and tokenizer image size")
    parser.add_argument("--patch", type=int, default=4, help="tokenizer patch size")
    parser.add_argument("--gpu", action="store_true", help="encode on the GPU: 1 GPU per actor, the bare loop too")
    parser.add_argument("--fashion-root", help="folder of the Fashion-MNIST idx files (default: Debian's)")
    args = parser.parse_args()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)  # never a stale head
    ray.data.DataContext.get_current().enable_progress_bars = False
    views = args.views.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-pretok-"))
    base = [f"ingest.max_images_per_split={args.images}", "ingest.cpus_per_task=0.5",
            f"tokenizer.encoder={args.size}", "tokenizer.steps=1", "tokenizer.adversarial_weight=0",
            "tokenizer.val_images=64", "tokenizer.resources.num_workers=1", f"pretokenize.views=[{','.join(views)}]",
            f"pretokenize.batch_size={args.batch_size}", "pretokenize.piece_images=1000000",
            f"ingest.resolution={args.resolution}", f"tokenizer.image_size={args.resolution}",
            f"tokenizer.patch_size={args.patch}", "tokenizer.batch_size=8"]
    if args.fashion_root:
        base.append(f"ingest.root={args.fashion_root}")
    if args.gpu:
        base += ["tokenizer.resources.use_gpu=true", "pretokenize.gpus_per_actor=1"]
    run_dir = work / "run"
    run_pipeline(load_config(ROOT / "configs" / "demo.yaml", base), str(run_dir), to_stage="tokenizer")
    shards = Manifest.read(RunDir(str(run_dir)), spec("ingest").folder)
    results: dict = {"images": {s: c["images"] for s, c in shards.counts.items()}, "views": views,
                     "tokenizer_encoder": args.size, "resolution": args.resolution, "patch": args.patch,
                     "batch_size": args.batch_size, "device": "cuda" if args.gpu else "cpu"}
    cpus = int(ray.cluster_resources().get("CPU", 1))
    device = "cuda" if args.gpu else "cpu"
    # Rounds alternate the paths, so a slow spell of a shared machine hits both; the figures are medians.
    rates: dict[str, list[float]] = {"bare_loop": []}
    for _ in range(args.repeats):
        bare = bare_loop(run_dir, views, args.batch_size, threads=cpus, device=device)
        rates["bare_loop"].append(bare["images_per_s"])
        results["bare_loop"] = {"images": bare["images"], "images_per_s": round(median(rates["bare_loop"]), 1),
                                "rounds": rates["bare_loop"]}
        for pool in args.pools.split(","):
            actors, per_actor = pool.split("x")
            overrides = base + [f"pretokenize.actors={actors}", f"pretokenize.cpus_per_actor={per_actor}",
                                f"pretokenize.cpus_per_task={args.cpus_per_task}"]
            with PeakMemory() as memory:
                outcome = run_pipeline(load_config(ROOT / "configs" / "demo.yaml", overrides), str(run_dir),
                                       only="pretokenize", force=("pretokenize",))[0]
            rounds = rates.setdefault(pool, [])
            rounds.append(round(outcome.manifest.metrics["images_per_second"], 1))
            peak = max(memory.peak_mib, results.get(f"ray_{pool}", {}).get("peak_rss_mib_driver_and_workers", 0))
            results[f"ray_{pool}"] = {
                "actors": int(actors), "cpus_per_actor": float(per_actor), "images_per_s": round(median(rounds), 1),
                "rounds": rounds, "ray_over_bare": round(median(rounds) / median(rates["bare_loop"]), 2),
                "ray_over_bare_per_round": [round(r / b, 2) for r, b in zip(rounds, rates["bare_loop"])],
                "peak_rss_mib_driver_and_workers": peak}
    shutil.rmtree(work)
    write_report(args.out, "pretokenize", results)


if __name__ == "__main__":
    main()
