"""Tokenizer speed and reconstruction quality.

    python benchmarks/tokenizer.py --out bench-out/tokenizer.json [--steps 600] [--device auto]

1. Train-step images/s (generator + discriminator step, as in the stage) for the small presets, and the
   paper's S/S at 256 px, on this machine's device.
2. Reconstruction quality on CIFAR-10 test after a fixed step budget on CIFAR-10 train (from ../shared):
   PSNR, L2, codebook usage per 256 images and over the split, perplexity. Skipped where ../shared is absent.
"""
from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import ROOT, write_report

from pipeline import device as devices
from pipeline.config import build_config
from pipeline.data.transforms import random_crop_flip
from pipeline.schedules import warmup_cosine
from pipeline.train.tokenizer_objective import TokenizerObjective
from stages.tokenizer import evaluate_reconstruction


def objective_for(overrides: dict) -> TokenizerObjective:
    base = {"perceptual_weight": 0.0, "disc_base_channels": 32, "disc_start": 0}
    return TokenizerObjective(build_config({"tokenizer": {**base, **overrides}}).tokenizer)


def step_speed(overrides: dict, batch: int, backend, repeats: int = 5) -> dict:
    torch.manual_seed(0)
    objective = objective_for(overrides).to(backend.device)
    optimizer = torch.optim.AdamW(objective.model.parameters(), 1e-4)
    d_optimizer = torch.optim.AdamW(objective.discriminator.parameters(), 1e-4) if objective.discriminator else None
    size = objective.cfg.image_size
    images = torch.rand(batch, 3, size, size, device=backend.device)
    timings = []
    for i in range(repeats + 1):
        backend.synchronize()
        started = time.perf_counter()
        with backend.autocast():
            loss, _, reconstruction, _ = objective.generator_losses(objective.model, objective.discriminator, images, 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if d_optimizer is not None:
            with backend.autocast():
                d_loss, _ = objective.discriminator_losses(objective.discriminator, images, reconstruction, i + 1)
            d_optimizer.zero_grad()
            d_loss.backward()
            d_optimizer.step()
        backend.synchronize()
        if i:  # the first step warms caches and kernels
            timings.append(time.perf_counter() - started)
    per_step = float(np.median(timings))
    params = sum(p.numel() for p in objective.model.parameters())
    return {"images_per_second": round(batch / per_step, 1), "batch": batch, "seconds_per_step": round(per_step, 4),
            "generator_params_m": round(params / 1e6, 2), **{k: overrides[k] for k in sorted(overrides)}}


def load_cifar(split_dir: Path, limit: int) -> torch.Tensor:
    files = sorted(split_dir.glob("*/*.jpg"))
    order = np.random.default_rng(0).permutation(len(files))[:limit]
    arrays = [np.asarray(Image.open(files[i]).convert("RGB")) for i in order]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)


def quality(overrides: dict, steps: int, backend, train: torch.Tensor, test: torch.Tensor) -> dict:
    torch.manual_seed(0)
    objective = objective_for(overrides).to(backend.device)
    cfg = objective.cfg
    optimizer = torch.optim.AdamW(objective.model.parameters(), cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    d_optimizer = (torch.optim.AdamW(objective.discriminator.parameters(), cfg.disc_lr, betas=cfg.betas,
                                     weight_decay=cfg.weight_decay) if objective.discriminator else None)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for step in range(steps):
        index = torch.randint(0, len(train), (cfg.batch_size,), generator=generator)
        images = random_crop_flip(train[index], cfg.image_size, cfg.augment_pad, generator).to(backend.device)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * warmup_cosine(step, cfg.warmup_steps, steps, cfg.lr_floor / cfg.lr)
        with backend.autocast():
            loss, _, reconstruction, _ = objective.generator_losses(objective.model, objective.discriminator, images, step)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.model.parameters(), cfg.grad_clip)
        optimizer.step()
        if d_optimizer is not None and objective.adversarial_on(step):
            with backend.autocast():
                d_loss, _ = objective.discriminator_losses(objective.discriminator, images, reconstruction, step)
            d_optimizer.zero_grad()
            d_loss.backward()
            d_optimizer.step()
    seconds = time.perf_counter() - started
    batches = (test[i:i + 256] for i in range(0, len(test), 256))
    metrics = evaluate_reconstruction(objective.model, batches, len(test), backend)
    return {**{k: round(v, 4) for k, v in metrics.items()}, "steps": steps, "train_seconds": round(seconds, 1),
            **{k: overrides[k] for k in sorted(overrides)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench-out/tokenizer.json")
    parser.add_argument("--steps", type=int, default=600, help="training steps for the quality runs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-paper-size", action="store_true")
    parser.add_argument("--quality-size", default="mini", help="encoder/decoder size of the quality runs")
    args = parser.parse_args()
    backend = devices.detect(args.device)
    small = {"image_size": 32, "patch_size": 4}
    results: dict = {"device": backend.kind, "speed": [], "quality": []}
    for sizes in ({"encoder": "tiny", "decoder": "tiny"}, {"encoder": "mini", "decoder": "mini"}):
        for adversarial in (0.0, 0.1):
            results["speed"].append(step_speed({**small, **sizes, "adversarial_weight": adversarial}, 64, backend))
            print(results["speed"][-1], flush=True)
    if not args.skip_paper_size:
        paper = {"image_size": 256, "patch_size": 8, "encoder": "S", "decoder": "S", "codebook_size": 8192,
                 "adversarial_weight": 0.1, "disc_base_channels": 64}
        results["speed"].append(step_speed(paper, 8 if backend.kind != "cpu" else 2, backend, repeats=2))
        print(results["speed"][-1], flush=True)

    cifar = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
    if not cifar.exists():
        results["quality"] = f"skipped: {cifar} is absent"
    else:
        target = Path(tempfile.mkdtemp(prefix="cifar-"))
        with tarfile.open(cifar) as archive:
            archive.extractall(target, filter="data")
        train, test = load_cifar(target / "cifar10" / "train", 20000), load_cifar(target / "cifar10" / "test", 2048)
        common = {**small, "encoder": args.quality_size, "decoder": args.quality_size, "codebook_size": 1024,
                  "batch_size": 64,
                  "lr": 1e-3, "lr_floor": 1e-4, "warmup_steps": 50, "codebook_init": "data",
                  "dead_code_threshold": 0.02, "adversarial_weight": 0.0}
        for variant in ({"codebook_dim": 32, "l2_normalize": True}, {"codebook_dim": 8, "l2_normalize": True},
                        {"codebook_dim": None, "l2_normalize": False, "codebook_init": "normal",
                         "dead_code_threshold": 0.0}):
            results["quality"].append(quality({**common, **variant}, args.steps, backend, train, test))
            print(results["quality"][-1], flush=True)
    write_report(args.out, "tokenizer", results)


if __name__ == "__main__":
    main()
