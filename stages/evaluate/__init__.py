"""Evaluate: samples, FID/IS (Inception and domain), tokenizer reconstruction quality, linear probe.

Every figure says how it was computed (metrics.json carries a `how` entry per group). Heavy work runs as
Ray Data batch inference on actor pools: class-balanced sampling (transformer + tokenizer decode) and
feature extraction (Inception pool3, the domain classifier, reconstructions, transformer block
features). The driver only fits the small things: the domain classifier, Gaussian statistics, probes.

The numbered parts live in their own modules and each returns its metrics, recipes (`how`), seconds,
counts and files: 1 `feature_networks`, 2 `reconstruction`, 3 `samples`, 4 `probe`; `run` merges them
and writes the outputs (5). The batch extractors they run on actor pools are in
`pipeline/metrics/extractors.py`.

Metric names: `fid_inception` / `rfid_inception` use the standard TF-Inception pool features;
`fid_domain`, `is_domain`, `rfid_domain` use a CNN trained on this data set's train split and are never
reported under the Inception names. IS with Inception needs logits, which the offline FID network
lacks; it is computed only when `evaluate.inception_is_weights` points at torch-fidelity's weights.
"""
from __future__ import annotations

from pipeline.config import PipelineConfig
from pipeline.stage import StageContext, StageResult
from stages.evaluate.common import PartResult, Setup
from stages.evaluate.feature_networks import feature_networks
from stages.evaluate.probe import probe
from stages.evaluate.reconstruction import reconstruction
from stages.evaluate.samples import samples


def run(cfg: PipelineConfig, ctx: StageContext) -> StageResult:
    setup = Setup.of(cfg, ctx)
    nets = feature_networks(ctx, setup)  # 1. the domain classifier; TF-Inception when its weights exist
    recon = reconstruction(ctx, setup, nets)  # 2. real val images, their reconstructions, the reference stats
    drawn = samples(ctx, setup, nets, recon)  # 3. class-balanced samples, rejection, FID/IS
    probed = probe(ctx, setup)  # 4. linear probe on frozen transformer blocks vs raw pixels
    # 5. Outputs: metrics.json, grids, raw samples; all to MLflow.
    merged = merge((nets, recon, drawn, probed))
    for name, data in merged.files.items():
        ctx.run_dir.write_bytes(data, ctx.folder, name)
        if name.endswith(".png"):
            ctx.tracker.log_artifact_bytes(data, name)
    report = {"metrics": merged.metrics, "how": merged.how, "seconds": merged.seconds, "sampling": drawn.sampling}
    ctx.run_dir.write_json(report, ctx.folder, "metrics.json")
    ctx.tracker.log_dict(report, "metrics.json")
    ctx.tracker.set_tags({f"vim.how.{k}": v[:4900] for k, v in merged.how.items()})
    _print_table(merged.metrics, merged.how)
    return StageResult(outputs={"metrics": "metrics.json", **{n: n for n in merged.files}}, counts=merged.counts,
                       metrics=merged.metrics, details={"how": merged.how, "seconds": merged.seconds})


def merge(parts: tuple[PartResult, ...]) -> PartResult:
    """The parts' metrics, recipes, seconds, counts and files in one result, in part order."""
    merged = PartResult()
    for part in parts:
        for name in ("metrics", "how", "seconds", "counts", "files"):
            getattr(merged, name).update(getattr(part, name))
    return merged


def _print_table(metrics: dict[str, float], how: dict[str, str]) -> None:
    rows = [("tokenizer", "rFID (Inception)", "rfid_inception"), ("tokenizer", "rFID (domain)", "rfid_domain"),
            ("tokenizer", "PSNR dB", "recon_psnr"), ("tokenizer", "SSIM", "recon_ssim"),
            ("tokenizer", "usage per 256", "recon_usage_per_256"), ("tokenizer", "perplexity", "recon_perplexity"),
            ("samples", "FID (Inception)", "fid_inception"), ("samples", "IS (Inception)", "is_inception"),
            ("samples", "FID (domain)", "fid_domain"), ("samples", "IS (domain)", "is_domain"),
            ("samples", "class agreement (domain)", "sample_class_agreement_domain"),
            ("samples", "acceptance rate", "acceptance_rate"),
            ("probe", "best block top-1", "probe_top1_best"), ("probe", "best block", "probe_best_block"),
            ("probe", "raw pixels top-1", "probe_top1_pixels")]
    print("\nevaluation            metric                       value")
    print("-" * 64)
    for group, name, key in rows:
        value = f"{metrics[key]:.4g}" if key in metrics else "n/a"
        print(f"{group:<20}  {name:<27}  {value}")
    for key, text in how.items():
        print(f"  [{key}] {text}")
