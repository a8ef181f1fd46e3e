"""Print a shard set's counts and class histogram, and write a sample grid PNG.

    python jobs/inspect_shards.py runs/demo/shards --grid runs/demo/shards-grid.png
"""
import argparse
import json
import sys
from collections import Counter

import _bootstrap  # noqa: F401

import numpy as np
from PIL import Image

from pipeline.data.shards import iter_samples, list_shards
from pipeline.data.sources import open_fs
from pipeline.viz import make_grid


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", help="the shards folder of a run (holds train/, val/, classes.json)")
    parser.add_argument("--grid", help="write a grid PNG of the first images of each class here")
    parser.add_argument("--per-class", type=int, default=8)
    args = parser.parse_args(argv)

    fs, root = open_fs(args.shards)
    with fs.open_input_stream(f"{root}/classes.json") as f:
        classes = json.loads(f.read())
    picked: dict[int, list[np.ndarray]] = {}
    for split in ("train", "val"):
        shards = list_shards(f"{args.shards.rstrip('/')}/{split}")
        histogram: Counter[int] = Counter()
        for shard in shards:
            for sample in iter_samples(shard, decode_images=bool(args.grid) and split == "train"):
                histogram[sample["label"]] += 1
                if args.grid and split == "train" and len(picked.setdefault(sample["label"], [])) < args.per_class:
                    picked[sample["label"]].append(sample["image"])
        print(f"{split}: {sum(histogram.values())} images in {len(shards)} shards, {len(histogram)} classes")
        for label in sorted(histogram):
            name = classes.get(str(label), {}).get("name", "?")
            print(f"  {label:>5} {name[:40]:<40} {histogram[label]:>8}")
    if args.grid:
        rows = [picked[label] + [np.full_like(picked[label][0], 255)] * (args.per_class - len(picked[label]))
                for label in sorted(picked)]
        scale = max(1, 64 // rows[0][0].shape[0])
        grid = make_grid([image for row in rows for image in row], columns=args.per_class, scale=scale)
        Image.fromarray(grid).save(args.grid)
        print(f"grid ({len(rows)} classes x {args.per_class}) written to {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
