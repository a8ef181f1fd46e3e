"""DiGIT's comparison at toy scale: the VIM Transformer on ViT-VQGAN codes against the same Transformer on
DiGIT-style tokens (K-means on a self-supervised encoder's features, rendered by a second stage), and the raw
pixels, on the demo data, at equal Transformer size and steps.

    python benchmarks/digit_vs_vim.py --out benchmarks/results/digit-vs-vim.json

Both systems share one ingest and one pixel tokenizer (configs/demo.yaml and configs/digit.yaml agree on them).
Each system's upstream stages run once; the Transformer (and the evaluation's sampling) then trains with three
seeds, each in its own run directory that links the shared stages. Per seed: the linear probe on the best
Transformer block and on the raw pixels (the evaluate stage's probe: the same train/val images), and the
rendered samples' domain FID (all and rejection-sampled), beside what real images score at that size.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from common import ROOT, write_report

CONFIGS = {"vim": ROOT / "configs" / "demo.yaml", "digit": ROOT / "configs" / "digit.yaml"}
SHARED = ["evaluate.inception_fid=false", "evaluate.inception_images=null"]  # the domain network's figures only
FIGURES = {  # name in the report -> (stage, metric)
    "probe_top1_best": ("evaluate", "probe_top1_best"),
    "probe_best_block": ("evaluate", "probe_best_block"),
    "probe_top1_pixels": ("evaluate", "probe_top1_pixels"),
    "fid_domain": ("evaluate", "fid_domain"),
    "fid_domain_accepted": ("evaluate", "fid_domain_accepted"),
    "fid_domain_floor": ("evaluate", "fid_domain_floor"),
    "class_agreement": ("evaluate", "sample_class_agreement_domain"),
    "transformer_val_loss_nats": ("transformer", "val_loss_nats"),
    "transformer_train_seconds": ("transformer", "train_seconds"),
}
UPSTREAM = {  # once per system: name -> (stage, metric)
    "recon_psnr": ("evaluate", "recon_psnr"),
    "rfid_domain": ("evaluate", "rfid_domain"),
    "ssl_knn_top1": ("ssl", "val_knn_top1"),
    "ssl_knn_top1_pixels": ("ssl", "val_knn_top1_pixels"),
    "ssl_train_seconds": ("ssl", "train_seconds"),
    "kmeans_purity": ("kmeans", "val_cluster_purity"),
    "kmeans_usage": ("kmeans", "val_usage"),
    "render_val_loss_nats": ("render", "val_loss_nats"),
    "tokens_usage_split": ("pretokenize", "train_usage_split"),
}


def link(source: Path, target: Path, folders: list[str]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        if (source / folder).exists() and not (target / folder).exists():
            (target / folder).symlink_to(source / folder, target_is_directory=True)


def run_seed(system: str, seed: int, out_dir: Path) -> dict:
    from orchestration.runner import run_pipeline
    from pipeline.config import load_config

    cfg = load_config(CONFIGS[system], SHARED + [f"transformer.seed={seed}", f"evaluate.seed={seed}"])
    run_dir = out_dir / system / f"seed{seed}"
    link(out_dir / "base", run_dir, ["shards", "tokenizer"])
    if seed:  # what does not depend on the Transformer's seed: from seed 0's run
        link(out_dir / system / "seed0", run_dir, ["ssl", "kmeans", "codes", "render"])
    started = time.perf_counter()
    outcomes = {o.name: o for o in run_pipeline(cfg, str(run_dir))}
    row = {name: float((outcomes[stage].manifest.metrics or {}).get(metric, float("nan")))
           for name, (stage, metric) in {**FIGURES, **UPSTREAM}.items() if stage in outcomes}
    row["stage_seconds"] = {name: round(o.manifest.wall_seconds, 1) for name, o in outcomes.items()}
    row["stages_ran"] = [name for name, o in outcomes.items() if o.status == "ran"]
    row["seconds_this_invocation"] = time.perf_counter() - started
    row["uniform_loss_nats"] = float(outcomes["transformer"].manifest.details.get("uniform_loss_nats", float("nan")))
    return row


def summary(rows: list[dict], key: str) -> dict:
    values = [row[key] for row in rows]
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(ROOT / "runs" / "digit-vs-vim"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    import ray

    from orchestration.runner import run_pipeline
    from pipeline.config import load_config

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"], "PYTHONPATH": str(ROOT)}})
    out_dir = Path(args.out_dir).resolve()
    run_pipeline(load_config(CONFIGS["vim"], SHARED), str(out_dir / "base"), to_stage="tokenizer")
    results: dict = {"configs": {k: str(v.relative_to(ROOT)) for k, v in CONFIGS.items()}, "overrides": SHARED,
                     "seeds": args.seeds, "systems": {}}
    for system in CONFIGS:
        rows = [run_seed(system, seed, out_dir) for seed in range(args.seeds)]
        results["systems"][system] = {
            "rows": rows, **{key: summary(rows, key) for key in ("probe_top1_best", "probe_top1_pixels", "fid_domain",
                                                                 "fid_domain_accepted", "transformer_val_loss_nats")}}
    ray.shutdown()
    write_report(args.out, "digit_vs_vim", results)


if __name__ == "__main__":
    main()
