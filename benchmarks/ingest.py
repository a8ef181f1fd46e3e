"""Ingest throughput and peak memory: Ray Data path vs a plain single-process loop, same shards.

    python benchmarks/ingest.py --out bench-out/ingest.json [--cifar-limit 10000]

Data: CIFAR-10 JPEG folders from ../shared (skipped where absent) and generated ~500x375 JPEGs
resized to 256. Generated sets of two sizes show whether peak memory grows with the image count.
"""
from __future__ import annotations

import argparse
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from common import ROOT, PeakMemory, write_report

import ray

from pipeline.config import build_config
from pipeline.data.shards import shard_name, write_shard
from pipeline.data.sources import build_index
from stages.ingest import plan_shards
from orchestration.runner import run_pipeline


def generated_jpegs(root: Path, count: int) -> Path:
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from imagegen import jpeg, picture

    for n in range(count):
        folder = root / "train" / f"class{n % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{n:05d}.jpg").write_bytes(jpeg(picture(n, size=(500, 375))))
    return root


def bare_loop(cfg) -> float:
    """The same shards written by one process, no Ray: the baseline the Ray path is compared with."""
    index = build_index(cfg.ingest)
    out = Path(tempfile.mkdtemp(prefix="bare-"))
    started = time.perf_counter()
    images = 0
    for split, split_index in index.splits.items():
        for number, rows in enumerate(plan_shards(split_index.table, cfg.ingest.seed, cfg.ingest.shard_size,
                                                  cfg.ingest.max_images_per_split)):
            images += write_shard(rows, split, number, str(out / split / shard_name(number)),
                                  cfg.ingest.resolution, cfg.ingest.image_format, cfg.ingest.jpeg_quality).count
    seconds = time.perf_counter() - started
    shutil.rmtree(out)
    return images / seconds


def measure(name: str, cfg) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    with PeakMemory() as memory:
        outcome = run_pipeline(cfg, str(run_dir / "run"), only="ingest")[0]
    metrics = outcome.manifest.metrics
    bare = bare_loop(cfg)
    shutil.rmtree(run_dir)
    return {"images": int(metrics["images_total"]), "ray_images_per_s": round(metrics["images_per_second"], 1),
            "bare_loop_images_per_s": round(bare, 1),
            "ray_over_bare": round(metrics["images_per_second"] / bare, 2),
            "index_seconds": round(metrics["index_seconds"], 2), "peak_rss_mib_driver_and_workers": memory.peak_mib,
            "resolution": cfg.ingest.resolution, "format": cfg.ingest.image_format}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench-out/ingest.json")
    parser.add_argument("--cifar-limit", type=int, default=10000, help="images per split from CIFAR-10")
    parser.add_argument("--generated", type=int, nargs="+", default=[1000, 2000])
    args = parser.parse_args()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)  # never a stale head
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = {}
    cifar = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
    if cifar.exists():
        target = Path(tempfile.mkdtemp(prefix="cifar-"))
        with tarfile.open(cifar) as archive:
            archive.extractall(target, filter="data")
        results["cifar10_32px_png"] = measure("cifar", build_config({"ingest": {
            "source": "image_folder", "root": str(target / "cifar10"), "splits": {"train": "train", "val": "test"},
            "resolution": None, "image_format": "png", "shard_size": 1000,
            "max_images_per_split": args.cifar_limit}}))
        shutil.rmtree(target)
    else:
        results["cifar10_32px_png"] = f"skipped: {cifar} is absent"
    for count in args.generated:
        source = generated_jpegs(Path(tempfile.mkdtemp(prefix="gen-")), count)
        results[f"generated_{count}_500x375_to_256_jpg"] = measure("gen", build_config({"ingest": {
            "source": "image_folder", "root": str(source), "splits": {"train": "train"}, "resolution": 256,
            "image_format": "jpg", "jpeg_quality": 95, "shard_size": 100}}))
        shutil.rmtree(source)
    write_report(args.out, "ingest", results)


if __name__ == "__main__":
    main()
