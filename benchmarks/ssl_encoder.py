"""Does DINO-style self-distillation learn anything at CPU scale? DiGIT's SSL encoder trained on an image folder
(CIFAR-10 by default) against the same encoder untrained and raw pixels: k-NN top-1 of the class-token feature,
the purity of K-means clusters of the patch features that DiGIT would turn into tokens, and the teacher's spread
(a collapse shows as equal entropies).

    python benchmarks/ssl_encoder.py --images runs/paper-tables-default/images/cifar10 --steps 400 \
        --out benchmarks/results/ssl-encoder-cpu.json
"""
from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

from common import write_report

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.multicrop import MultiCrop
from pipeline.models.kmeans import cluster_purity, kmeans_plus_plus, lloyd, nearest_centroids
from pipeline.models.settings import SSLEncoderSettings
from pipeline.models.ssl import SelfDistillation, SSLViT
from pipeline.schedules import warmup_cosine
from pipeline.train.ssl_step import DistillationSchedule, distillation_step, teacher_spread


def read_folder(root: Path, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `limit` images of root/<class>/*, a seeded random subset: float (N, 3, H, W) in [0, 1], labels."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, index) for index, name in enumerate(classes) for f in sorted((root / name).iterdir())]
    random.Random(seed).shuffle(files)
    files = files[:limit]
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in files])
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255,
            torch.tensor([label for _, label in files]))


def knn_top1(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
             k: int = 20, temperature: float = 0.07) -> float:
    """DINO's weighted k-NN classifier on l2-normalised features."""
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    similarity, index = (test @ train.T).topk(k, dim=1)
    votes = torch.zeros(len(test), int(train_labels.max()) + 1)
    votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
    return float((votes.argmax(1) == test_labels).float().mean())


@torch.no_grad()
def encoder_figures(encoder: SSLViT, train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
                    test_labels: torch.Tensor, clusters: int, seed: int) -> dict:
    encoder.eval()
    features = lambda images: torch.cat([encoder(chunk) for chunk in images.split(250)])  # noqa: E731
    patches = torch.cat([encoder.patch_features(chunk) for chunk in test.split(250)])
    per_image = patches.shape[1]
    flat = patches.flatten(0, 1)
    initial = kmeans_plus_plus(flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed))[:20000]],
                               clusters, torch.Generator().manual_seed(seed))
    centroids, inertia = lloyd(flat, initial, iterations=10)
    tokens, _ = nearest_centroids(flat, centroids)
    return {"knn_top1": knn_top1(features(train), train_labels, features(test), test_labels),
            "patch_kmeans_purity": cluster_purity(tokens, test_labels.repeat_interleave(per_image), clusters,
                                                  int(test_labels.max()) + 1),
            "codes_used": int(tokens.unique().numel()), "kmeans_inertia": inertia}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="a folder with train/<class>/ and test/<class>/")
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--size", default="mini")
    parser.add_argument("--clusters", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    root = Path(args.images)
    train, train_labels = read_folder(root / "train", args.train_images, args.seed)
    test, test_labels = read_folder(root / "test", args.test_images, args.seed)
    size = train.shape[-1]
    settings = SSLEncoderSettings(size=args.size, image_size=size, patch_size=4, channels=3, head_hidden=512,
                                  head_bottleneck=128, prototypes=1024)
    crops = MultiCrop(global_size=size, local_size=size // 2, local_crops=4)
    warmup = max(1, args.steps // 10)
    schedule = DistillationSchedule(steps=args.steps, teacher_temperature_steps=args.steps // 3,
                                    freeze_prototypes_steps=warmup)
    model = SelfDistillation(settings).train()
    untrained = encoder_figures(SelfDistillation(settings).encoder(), train, train_labels, test, test_labels,
                                args.clusters, args.seed)
    optimizer = torch.optim.AdamW(model.student.parameters(), lr=args.lr, weight_decay=0.04)
    generator = torch.Generator().manual_seed(args.seed)
    curve, started = [], time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warmup_cosine(step, warmup, args.steps, 0.01)
        rows = torch.randint(len(train), (args.batch,), generator=generator)
        figures = distillation_step(model, optimizer, train[rows], crops, schedule, step, generator)
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            model.eval()
            figures.update(teacher_spread(model, test[:512], schedule.temperature(step)))
            model.train()
            curve.append({"step": step, **{k: round(v, 4) for k, v in figures.items()}})
            print(curve[-1], flush=True)
    seconds = time.perf_counter() - started
    trained = encoder_figures(model.encoder(), train, train_labels, test, test_labels, args.clusters, args.seed)
    pixels = {"knn_top1": knn_top1(train.flatten(1), train_labels, test.flatten(1), test_labels)}
    results = {"images": str(root), "train_images": len(train), "test_images": len(test), "steps": args.steps,
               "batch": args.batch, "lr": args.lr, "settings": settings.model_dump(), "crops": vars(crops),
               "schedule": vars(schedule), "train_seconds": seconds,
               "images_per_second": args.steps * args.batch / seconds,
               "untrained": untrained, "trained": trained, "raw_pixels": pixels, "curve": curve,
               "chance_top1": 1 / int(test_labels.max() + 1), "log_prototypes": math.log(settings.prototypes)}
    write_report(args.out, "ssl_encoder", results)


if __name__ == "__main__":
    main()
