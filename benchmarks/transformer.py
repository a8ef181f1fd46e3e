"""VIM Transformer training speed: tokens/s and model FLOPs utilisation per size, and the Ray Train stage
over real Parquet codes against the same step on in-memory tokens, with its data-wait share.

    python benchmarks/transformer.py --out bench-out/transformer.json [--sizes pico,nano,micro] [--steps 30]

MFU = achieved training FLOP/s (6 N + attention per token) over the peak: a dense fp32 matmul measured
here on CPU, the datasheet bf16 peak on GPU. On a GPU machine, pass --sizes B to time VIM-Base.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from statistics import mean

from common import ROOT, write_report

import torch

from pipeline import device as devices
from pipeline.models.settings import VIM_SIZES, TransformerSettings
from pipeline.models.transformer import VIMTransformer
from pipeline.train.lm_step import accumulated_step, parameter_groups


def compute_only(size: str, steps: int, batch: int, grid: int, vocab: int, backend) -> dict:
    """The training step alone on tokens already in memory: the ceiling for the stage."""
    torch.manual_seed(0)
    model = VIMTransformer(TransformerSettings(size=size, vocab_size=vocab, grid=(grid, grid),
                                               num_classes=10)).to(backend.device).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=1e-4, betas=(0.9, 0.96),
                                  fused=backend.fused_adamw())
    tokens = torch.randint(0, vocab, (batch, grid * grid), device=backend.device)
    labels = torch.randint(0, 10, (batch,), device=backend.device)
    for _ in range(3):  # warm-up (allocator, kernels, autotuning)
        accumulated_step(model, [(tokens, labels)], optimizer, backend, 1.0)
    backend.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        accumulated_step(model, [(tokens, labels)], optimizer, backend, 1.0)
    backend.synchronize()
    seconds = time.perf_counter() - started
    tokens_per_s = steps * batch * grid * grid / seconds
    peak, source = backend.peak_flops()
    return {"size": size, "parameters_m": round(model.parameter_count(embeddings=True) / 1e6, 2),
            "batch": batch, "tokens_per_image": grid * grid, "tokens_per_s": round(tokens_per_s),
            "step_ms": round(1000 * seconds / steps, 1), "mfu": round(tokens_per_s * model.flops_per_token() / peak, 4),
            "peak_flops": peak, "peak_source": source}


def through_the_stage(images: int, size: str, steps: int, batch: int) -> dict:
    """The real stage (2 Train workers x 0.5 CPU, Ray Data over Parquet) on Fashion-MNIST codes."""
    import ray
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config
    from pipeline.tracking import default_tracking_uri
    from orchestration.runner import run_pipeline

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    work = Path(tempfile.mkdtemp(prefix="bench-vim-"))
    overrides = [f"ingest.max_images_per_split={images}", "ingest.cpus_per_task=0.5", "tokenizer.steps=1",
                 "tokenizer.adversarial_weight=0", "tokenizer.val_images=64", "tokenizer.resources.num_workers=1",
                 f"transformer.size={size}", f"transformer.steps={steps}", f"transformer.batch_size={batch}",
                 "transformer.log_every=10", f"transformer.eval_every={steps}", "transformer.val_images=256"]
    outcome = run_pipeline(load_config(ROOT / "configs" / "demo.yaml", overrides), str(work / "run"),
                           to_stage="transformer")[-1]
    client = MlflowClient(default_tracking_uri(str(work / "run")))
    history = {key: [m.value for m in sorted(client.get_metric_history(outcome.manifest.mlflow_run_id, key),
                                               key=lambda m: m.step)][1:]  # the first window holds start-up
               for key in ("tokens_per_second", "mfu", "data_wait_fraction")}
    shutil.rmtree(work)
    ray.shutdown()
    return {"size": size, "workers": 2, "cpus_per_worker": 0.5, "batch_per_worker": batch,
            "tokens_per_s": round(mean(history["tokens_per_second"])), "mfu": round(mean(history["mfu"]), 4),
            "data_wait_fraction": round(mean(history["data_wait_fraction"]), 4),
            "val_loss_nats": round(outcome.manifest.metrics["val_loss_nats"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out/transformer.json")
    parser.add_argument("--sizes", default="pico,nano,micro", help=f"of {', '.join(VIM_SIZES)}")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--grid", type=int, default=8, help="tokens per side (32 on ImageNet 256)")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--stage-images", type=int, default=10000, help="0 skips the Ray stage run")
    parser.add_argument("--stage-size", default="nano")
    args = parser.parse_args()
    backend = devices.detect("auto")
    results: dict = {"device": backend.kind, "compute_only": [
        compute_only(size, args.steps, args.batch, args.grid, args.vocab, backend) for size in args.sizes.split(",")]}
    if args.stage_images:
        stage = through_the_stage(args.stage_images, args.stage_size, 200, args.batch // 2)
        loop = compute_only(args.stage_size, args.steps, args.batch, args.grid, args.vocab, backend)
        stage["over_compute_only_loop"] = round(stage["tokens_per_s"] / loop["tokens_per_s"], 2)
        results["ray_stage"] = stage
    write_report(args.out, "transformer", results)


if __name__ == "__main__":
    main()
