"""What limits the demo tokenizer: named variants of the demo recipe trained side by side on the demo's data.

    python benchmarks/tokenizer_quality.py --run-dir runs/demo-fresh \\
        --variant base: --variant grey:tokenizer.channels=1 --variant no_gan:tokenizer.adversarial_weight=0 \\
        --out benchmarks/results/tokenizer-quality.json

Each variant is configs/demo.yaml (or --config) plus its `--set`-style overrides; the pseudo-key `cpu_linear=aten`
runs it on PyTorch's own CPU linear layers instead of the project's oneDNN ones (`pipeline.models.cpu_linear`),
e.g. `--variant seed1:tokenizer.seed=1 --variant seed1_aten:tokenizer.seed=1,cpu_linear=aten`. It trains single process
with the stage's objective (discriminator included from `disc_start`), optimizer, learning-rate schedule and
augmentation, at the stage's global batch (per-worker batch x workers), on the run's ingested shards, then
reports the stage's validation figures (PSNR, SSIM, codebook usage, dead codes) on the first val images, their
domain rFID (the demo's evaluation network, trained once here), and its training seconds. The stage itself spreads the same work over Ray Train workers.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import ROOT, machine, write_report

import torch

from noble import batch_rows, read_images
from pipeline import device as devices
from pipeline.config import build_config, load_yaml_file
from pipeline.data.shards import iter_samples, list_shards
from pipeline.data.transforms import center, random_crop_flip, to_float
from pipeline.metrics.fid import GaussianStats, fid_from_stats
from pipeline.models import cpu_linear
from pipeline.models.domain_classifier import train_domain_classifier
from pipeline.schedules import warmup_cosine
from pipeline.train.optim import grad_norm, set_lr
from pipeline.train.tokenizer_objective import TokenizerObjective, generator_parameter_groups
from stages.tokenizer import evaluate_reconstruction

BACKEND = devices.detect("cpu")


def domain_rfid(classifier, real: torch.Tensor, tokenizer) -> float:
    """Frechet distance between the domain classifier's features of real val images and of their
    reconstructions (the evaluate stage's rfid_domain, on this benchmark's val images)."""
    with torch.no_grad():
        features = [torch.cat([classifier.features(batch) for batch in images.split(256)]).double().numpy()
                    for images in (real, torch.cat([tokenizer(b)[0].clamp(0, 1) for b in real.split(256)]))]
    return fid_from_stats(*map(GaussianStats.of, features), method="eigh")  # the demo's method


def train_variant(tcfg, train: torch.Tensor, val: torch.Tensor, channels: int, classifier) -> dict:
    """The stage's training step, single process, at the stage's global batch; -> final val figures."""
    batch = tcfg.batch_size * tcfg.resources.num_workers
    tcfg = tcfg.model_copy(update={"channels": tcfg.model_settings(channels).channels})
    torch.manual_seed(tcfg.seed)
    objective = TokenizerObjective(tcfg)
    model, discriminator = objective.model.train(), objective.discriminator
    optimizer = torch.optim.AdamW(generator_parameter_groups(model, tcfg.weight_decay), lr=tcfg.lr,
                                  betas=tcfg.betas, weight_decay=tcfg.weight_decay)
    d_optimizer = (torch.optim.AdamW(discriminator.parameters(), lr=tcfg.disc_lr, betas=tcfg.betas,
                                     weight_decay=tcfg.weight_decay) if discriminator is not None else None)
    d_steps, started = 0, time.perf_counter()
    for step in range(tcfg.steps):
        generator = torch.Generator().manual_seed(tcfg.seed * 1_000_003 + step * 97)
        images = random_crop_flip(to_float(train[batch_rows(step, batch, len(train), tcfg.seed)]), tcfg.image_size,
                                  tcfg.augment_pad, generator)
        set_lr(optimizer, tcfg.lr * warmup_cosine(step, tcfg.warmup_steps, tcfg.steps, tcfg.lr_floor / tcfg.lr))
        loss, _, reconstruction, _ = objective.generator_losses(model, discriminator, images, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm(model.parameters(), tcfg.grad_clip)
        optimizer.step()
        if discriminator is not None and objective.adversarial_on(step):
            d_loss, _ = objective.discriminator_losses(discriminator, images, reconstruction, d_steps)
            d_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            grad_norm(discriminator.parameters(), tcfg.grad_clip)
            d_optimizer.step()
            d_steps += 1
    seconds = time.perf_counter() - started
    batches = (val[i:i + 256] for i in range(0, len(val), 256))
    metrics = evaluate_reconstruction(model, batches, len(val), BACKEND)
    metrics["rfid_domain"] = domain_rfid(classifier, val, model.eval())
    keep = ("rfid_domain", "val_psnr", "val_ssim", "val_l2", "val_dead_codes", "val_usage_per_256", "val_perplexity")
    return {"train_seconds": round(seconds, 1), "images_per_second": round(tcfg.steps * batch / seconds, 1),
            "channels": tcfg.channels, **{k: round(metrics[k], 4) for k in keep},
            "dead_code_fraction": round(metrics["val_dead_codes"] / tcfg.codebook_size, 4)}


def parse_variant(text: str) -> tuple[str, list[str], str]:
    """NAME:KEY=V,KEY=V -> (name, config overrides, CPU linear backend)."""
    name, _, overrides = text.partition(":")
    items = [item for item in overrides.split(",") if item]
    backends = [item.partition("=")[2] for item in items if item.startswith("cpu_linear=")]
    return name, [item for item in items if not item.startswith("cpu_linear=")], (backends or ["onednn"])[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "demo-fresh"), help="a run with ingested shards")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--variant", action="append", required=True, metavar="NAME:KEY=V,KEY=V")
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--val-images", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="JSON report (common.write_report); printed either way")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shards = Path(args.run_dir) / "shards"
    base = load_yaml_file(args.config)
    train = read_images(shards / "train", args.train_images)
    val_raw = read_images(shards / "val", args.val_images)
    # What ingest records (a run ingested before it did has no record): 1 when every image is grey.
    images = torch.cat([train, val_raw])
    channels = 1 if bool((images == images[..., :1]).all()) else 3
    # The demo's evaluation network: width 16, 3 epochs on the first 4,000 train images.
    labels = torch.tensor([s["label"] for url in list_shards(str(shards / "train")) for s in iter_samples(url, False)])
    classifier = train_domain_classifier(train[:4000], labels[:4000], int(labels.max()) + 1, epochs=3, width=16)
    results = {}
    for name, overrides, linear_backend in map(parse_variant, args.variant):
        tcfg = build_config(base, overrides).tokenizer
        val = center(to_float(val_raw), tcfg.image_size)
        with cpu_linear.use_backend(linear_backend):
            results[name] = {"overrides": overrides, "cpu_linear": linear_backend,
                             **train_variant(tcfg, train, val, channels, classifier)}
        print(name, results[name], flush=True)
    report = {"run_dir": args.run_dir, "data_channels": channels, "train_images": len(train),
              "val_images": len(val_raw), "threads": args.threads, "variants": results}
    if args.out:
        write_report(args.out, "tokenizer_quality", report)
    else:
        print(machine())


if __name__ == "__main__":
    main()
