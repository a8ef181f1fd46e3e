"""Residual against vector quantization at an equal code budget, side by side in one run: on each data set, the
whole pipeline twice from one shared ingest, VQ on a 16x16 grid (256 codes per image, the VIM Transformer) and
RQ on 8x8x4 (the same 256 codes as 64 stacks of 4, the RQ-Transformer), with the same codebook size, tokenizer
and Transformer steps and batches, and the same evaluation. Then both trained Transformers sample the same
labels in this process, one after the other, for the sampling time.

    python benchmarks/rq_vs_vq.py --data demo --out benchmarks/results/rq-vs-vq-demo.json
    python benchmarks/rq_vs_vq.py --data cifar10 --out benchmarks/results/rq-vs-vq-cifar10.json
    python benchmarks/rq_vs_vq.py                            # both data sets, one report

The recipe is the demo's (configs/demo.yaml) at the benchmark's step counts, on both data sets; CIFAR-10 comes
from ../shared/data/cifar10-jpeg.tar.gz (or --cifar-images, a folder with train/ and test/ class folders).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tarfile
import time
from pathlib import Path

from common import ROOT, write_report

DEMO = ROOT / "configs" / "demo.yaml"
CIFAR_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"

# The paper's comparison at ImageNet 256 (its throughput figure): 256 codes per image as a 16x16 VQ map or an
# 8x8x4 RQ map.
VARIANTS = {
    "vq_16x16": ["tokenizer.patch_size=2", "transformer.size=nano"],
    "rq_8x8x4": ["tokenizer.patch_size=4", "tokenizer.quantizer=rq", "tokenizer.rq_depth=4",
                 "transformer.kind=rq", "transformer.rq_size=nano"],
}
# Both variants, both data sets: the demo recipe at the benchmark's budget; the probe and Inception are left out
# (the figures compared are the domain network's).
BUDGET = ["ingest.max_images_per_split=10000", "tokenizer.steps=400", "tokenizer.checkpoint_every=200",
          "tokenizer.image_every=400", "tokenizer.val_images=1000", "transformer.steps=200",
          "evaluate.samples_per_class=20", "evaluate.recon_images=1000", "evaluate.reference_images=2000",
          "evaluate.probe_train_images=0", "evaluate.inception_fid=false", "evaluate.inception_images=null"]
DATA = {
    "demo": [],
    "cifar10": ["ingest.source=image_folder", 'ingest.splits={"train": "train", "val": "test"}',
                "ingest.image_format=png"],
}
FIGURES = {  # name in the report -> (stage, metric)
    "tokenizer_val_psnr": ("tokenizer", "val_psnr"),
    "recon_psnr": ("evaluate", "recon_psnr"),
    "rfid_domain": ("evaluate", "rfid_domain"),
    "rfid_domain_floor": ("evaluate", "rfid_domain_floor"),
    "recon_usage_per_256": ("evaluate", "recon_usage_per_256"),
    "transformer_val_loss_nats_per_code": ("transformer", "val_loss_nats"),
    "transformer_codes_per_second": ("transformer", "train_tokens_per_second_overall"),
    "transformer_train_seconds": ("transformer", "train_seconds"),
    "tokenizer_train_seconds": ("tokenizer", "train_seconds"),
    "fid_domain": ("evaluate", "fid_domain"),
    "fid_domain_accepted": ("evaluate", "fid_domain_accepted"),
    "fid_domain_floor": ("evaluate", "fid_domain_floor"),
}


def cifar_images(out_dir: Path, given: str | None) -> str:
    if given:
        return given
    target = out_dir / "images"
    if not (target / "cifar10" / "train").is_dir():
        with tarfile.open(CIFAR_ARCHIVE) as archive:
            archive.extractall(target, filter="data")
    return str(target / "cifar10")


def run_variant(data: str, variant: str, overrides: list[str], out_dir: Path) -> dict:
    from orchestration.runner import run_pipeline
    from orchestration.sweep import link_shared_stages
    from pipeline.config import load_config

    cfg = load_config(DEMO, BUDGET + overrides + VARIANTS[variant])
    base = out_dir / data / "base"
    if not (base / "shards" / "manifest.json").exists():
        run_pipeline(cfg, str(base), only="ingest")
    run_dir = out_dir / data / variant
    link_shared_stages(base, run_dir, "tokenizer")
    started = time.perf_counter()
    outcomes = {o.name: o for o in run_pipeline(cfg, str(run_dir))}
    figures = {name: float((outcomes[stage].manifest.metrics or {}).get(metric, float("nan")))
               for name, (stage, metric) in FIGURES.items()}
    figures["stage_seconds"] = {name: round(o.manifest.wall_seconds, 1) for name, o in outcomes.items()}
    figures["pipeline_seconds_this_invocation"] = time.perf_counter() - started
    codes = outcomes["pretokenize"].manifest.outputs
    figures["code_shape"] = [*codes["grid"], codes.get("depth", 1)]
    figures["transformer_images_per_second"] = figures["transformer_codes_per_second"] / codes["length"]
    figures["transformer_sequence_length"] = codes["grid"][0] * codes["grid"][1]
    figures["run_dir"] = str(run_dir)
    return figures


def sampling_seconds_per_image(run_dirs: dict[str, Path], images: int, rounds: int) -> dict[str, dict]:
    """Both Transformers sample the same balanced labels through the evaluate stage's sampler, one after the
    other, `rounds` times; codes and the tokenizer's decoding timed apart."""
    import torch

    from pipeline.models.code_models import load_code_model, sample_codes
    from pipeline.models.sampling import SamplingSettings, balanced_labels
    from pipeline.models.tokenizer import load_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    loaded = {name: (load_code_model(run_dir / "transformer"), load_tokenizer(run_dir / "tokenizer"))
              for name, run_dir in run_dirs.items()}
    labels = balanced_labels(10, images // 10)
    times: dict[str, dict[str, list[float]]] = {name: {"codes": [], "decode": []} for name in loaded}
    for round_index in range(rounds):
        for name, (model, tokenizer) in loaded.items():
            generator = torch.Generator().manual_seed(round_index)
            started = time.perf_counter()
            codes = sample_codes(model, labels, SamplingSettings(guidance_scale=1.5), generator)
            sampled = time.perf_counter()
            tokenizer.decode(codes)
            times[name]["codes"].append((sampled - started) / len(labels))
            times[name]["decode"].append((time.perf_counter() - sampled) / len(labels))
    return {name: {"codes_seconds_per_image": statistics.median(t["codes"]),
                   "decode_seconds_per_image": statistics.median(t["decode"]),
                   "rounds": {k: [round(v, 5) for v in values] for k, values in t.items()}}
            for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(ROOT / "runs" / "rq-vs-vq"))
    parser.add_argument("--data", action="append", choices=sorted(DATA), help="default: both")
    parser.add_argument("--cifar-images", help="CIFAR-10 class folders (train/, test/); default: the shared archive")
    parser.add_argument("--sampling-images", type=int, default=50)
    parser.add_argument("--sampling-rounds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"], "PYTHONPATH": str(ROOT)}})
    out_dir = Path(args.out_dir).resolve()
    results = {"variants": VARIANTS, "budget": BUDGET, "recipe": str(DEMO.relative_to(ROOT)), "data": {}}
    for data in args.data or sorted(DATA):
        overrides = list(DATA[data])
        if data == "cifar10":
            overrides.append(f"ingest.root={json.dumps(cifar_images(out_dir, args.cifar_images))}")
        rows = {variant: run_variant(data, variant, overrides, out_dir) for variant in VARIANTS}
        timing = sampling_seconds_per_image({v: Path(row["run_dir"]) for v, row in rows.items()},
                                            args.sampling_images, args.sampling_rounds)
        for variant, row in rows.items():
            row.update(timing[variant])
        vq, rq = rows["vq_16x16"], rows["rq_8x8x4"]
        results["data"][data] = {"rows": rows, "rq_over_vq": {
            "training_images_per_second": rq["transformer_images_per_second"] / vq["transformer_images_per_second"],
            "sampling_speedup": vq["codes_seconds_per_image"] / rq["codes_seconds_per_image"],
            "recon_psnr_difference_db": rq["recon_psnr"] - vq["recon_psnr"],
            "rfid_domain_ratio": rq["rfid_domain"] / vq["rfid_domain"],
            "fid_domain_ratio": rq["fid_domain"] / vq["fid_domain"]}}
    ray.shutdown()
    write_report(args.out, "rq_vs_vq", results)


if __name__ == "__main__":
    main()
