"""Do the CPU dropout, attention and linear kernels train like the stock ones? The demo's Transformer recipe, on the
demo's own codes, trained with each kernel set and two seeds; loss per step, final val loss, step time.

    python benchmarks/loss_curve.py --codes runs/demo/codes --out benchmarks/results/loss-curve-cpu.json

"stock" swaps the project's `Dropout` modules for `nn.Dropout`, its attention for
`F.scaled_dot_product_attention(dropout_p=...)` and its oneDNN linear layers for PyTorch's (`cpu_linear` aten);
everything else (data order, schedule, step) is shared.
The kernels agree when the gap between the kernel sets is within the gap between seeds.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

from common import ROOT, write_report

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import device as devices
from pipeline.config import load_config
from pipeline.data.codes import codes_matrix
from pipeline.models import cpu_linear
from pipeline.models import transformer as transformer_module
from pipeline.models.dropout import Dropout
from pipeline.models.transformer import VIMTransformer
from pipeline.train.lm_step import accumulated_step, lr_at, next_token_loss, parameter_groups


def read_codes(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    table = pq.read_table(folder / split)
    codes = torch.from_numpy(codes_matrix(table).astype(np.int64))
    labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
    return codes, labels


def stock_attention(q, k, v, dropout):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)


@contextlib.contextmanager
def kernels(kind: str, model: nn.Module):
    """Inside: the model runs the chosen kernels ("project" leaves it as built)."""
    if kind == "project":
        yield
        return
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Dropout):
                setattr(parent, name, nn.Dropout(child.p))
    original = transformer_module.causal_attention
    transformer_module.causal_attention = stock_attention
    try:
        with cpu_linear.use_backend("aten"):
            yield
    finally:
        transformer_module.causal_attention = original


def train(kind: str, seed: int, data, val, cfg, settings, batch: int) -> dict:
    codes, labels = data
    torch.manual_seed(seed)
    model = VIMTransformer(settings).train()
    backend = devices.detect("cpu")
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  fused=backend.fused_adamw())
    order = torch.randperm(len(codes), generator=torch.Generator().manual_seed(1000 + seed))
    losses, started = [], time.perf_counter()
    with kernels(kind, model):
        for step in range(cfg.steps):
            rows = order[(step * batch) % len(order):][:batch]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg.lr, cfg.lr_floor, cfg.warmup_steps, cfg.decay_start, cfg.steps)
            loss, _ = accumulated_step(model, [(codes[rows], model.drop_labels(labels[rows]))], optimizer,
                                       backend, cfg.grad_clip)
            losses.append(round(loss, 5))
        seconds = time.perf_counter() - started
        model.eval()
        with torch.no_grad():
            val_loss = float(next_token_loss(model(val[0], val[1]), val[0]))
    return {"kernels": kind, "seed": seed, "train_loss": losses, "seconds": round(seconds, 2),
            "mean_loss_last_50": round(statistics.mean(losses[-50:]), 5), "val_loss_nats": round(val_loss, 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codes", default=str(ROOT / "runs" / "demo" / "codes"), help="a run's codes folder")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    folder = Path(args.codes)
    if not (folder / "train").is_dir():
        raise SystemExit(f"no codes at {folder}: run `make demo` first (or pass --codes)")
    pipeline_cfg = load_config(args.config)
    cfg = pipeline_cfg.transformer
    data, val = read_codes(folder, "train"), read_codes(folder, "val")
    val = (val[0][:cfg.val_images], val[1][:cfg.val_images])
    grid = int(round(data[0].shape[1] ** 0.5))
    settings = cfg.model_settings(pipeline_cfg.tokenizer.codebook_size, (grid, grid), int(data[1].max()) + 1)
    batch = cfg.batch_size * cfg.grad_accum * cfg.resources.num_workers  # the stage's global batch
    runs = [train(kind, seed, data, val, cfg, settings, batch)
            for seed in range(args.seeds) for kind in ("stock", "project")]
    by = {(r["kernels"], r["seed"]): r for r in runs}
    kernel_gap = [abs(by["project", s]["mean_loss_last_50"] - by["stock", s]["mean_loss_last_50"])
                  for s in range(args.seeds)]
    seed_gap = [abs(by[k, 0]["mean_loss_last_50"] - by[k, 1]["mean_loss_last_50"])
                for k in ("stock", "project")] if args.seeds > 1 else []
    time_ratio = statistics.mean(by["stock", s]["seconds"] / by["project", s]["seconds"] for s in range(args.seeds))
    write_report(args.out, "loss_curve", {
        "config": args.config, "codes": str(folder), "steps": cfg.steps, "batch": batch,
        "settings": settings.model_dump(mode="json"), "runs": runs,
        "kernel_gap_mean_loss_last_50": kernel_gap, "seed_gap_mean_loss_last_50": seed_gap,
        "speedup_project_over_stock": round(time_ratio, 3)})


if __name__ == "__main__":
    main()
