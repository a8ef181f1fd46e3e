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
`fid_domain`, `is_domain`, `rfid_domain` use a CNN trained on this data set's train split (the evaluation
network) and are never reported under the Inception names. Sample figures without a suffix score all samples
(acceptance 1.0), `*_accepted` the rejection-sampled ones; `*_floor` is the same FID between two disjoint real
sets of the same sizes, `*_real` what real images score at a sample set's size. IS with Inception needs
logits, which the offline FID network lacks; it is computed only when `evaluate.inception_is_weights` points
at torch-fidelity's weights.
"""
from __future__ import annotations

from pipeline.config import PipelineConfig
from pipeline.stage import StageContext, StageResult
from stages.evaluate.common import PartResult, Setup
from stages.evaluate.feature_networks import feature_networks
from stages.evaluate.probe import probe, probed_transformer
from stages.evaluate.reconstruction import reconstruction
from stages.evaluate.samples import samples


def run(cfg: PipelineConfig, ctx: StageContext) -> StageResult:
    setup = Setup.of(cfg, ctx)
    if setup.ecfg.probe_on:
        probed_transformer(ctx)  # a model the probe may not read is refused before parts 1-3 run
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
    table = evaluation_table(merged.metrics)
    ctx.run_dir.write_bytes(table.encode(), ctx.folder, "metrics.md")
    ctx.tracker.log_artifact_bytes(table.encode(), "metrics.md")
    print("\n" + table)
    for key, text in merged.how.items():
        print(f"  [{key}] {text}")
    return StageResult(outputs={"metrics": "metrics.json", "table": "metrics.md", **{n: n for n in merged.files}},
                       counts=merged.counts, metrics=merged.metrics,
                       details={"how": merged.how, "seconds": merged.seconds})


def merge(parts: tuple[PartResult, ...]) -> PartResult:
    """The parts' metrics, recipes, seconds, counts and files in one result, in part order."""
    merged = PartResult()
    for part in parts:
        for name in ("metrics", "how", "seconds", "counts", "files"):
            getattr(merged, name).update(getattr(part, name))
    return merged


def evaluation_table(metrics: dict[str, float]) -> str:
    """The figures as a Markdown table: tokenizer and probe figures in one column; sample figures for all
    samples, the accepted ones (rejection), and what real images score at the same sizes (the floors)."""

    def cell(key: str) -> str:
        return f"{metrics[key]:.4g}" if key in metrics else "n/a"

    lines = ["| figure | value | real images (floor) |", "|---|---|---|"]
    for name, key, floor in (("rFID (domain)", "rfid_domain", "rfid_domain_floor"),
                             ("rFID (Inception)", "rfid_inception", "rfid_inception_floor"),
                             ("PSNR dB", "recon_psnr", None), ("SSIM", "recon_ssim", None),
                             ("codebook usage per 256", "recon_usage_per_256", None),
                             ("codebook perplexity", "recon_perplexity", None),
                             ("probe top-1, best block", "probe_top1_best", None),
                             ("probe top-1, raw pixels", "probe_top1_pixels", None)):
        lines.append(f"| {name} | {cell(key)} | {cell(floor) if floor else ''} |")
    lines += ["", "| samples | all (acceptance 1.0) | accepted | real images at the same size |", "|---|---|---|---|"]
    for name, key, real in (("FID (domain)", "fid_domain", "fid_domain_floor"),
                            ("IS (domain)", "is_domain", "is_domain_real"),
                            ("class agreement (domain)", "sample_class_agreement_domain", None),
                            ("precision (domain, k=3)", "precision_domain", "precision_domain_real"),
                            ("recall (domain, k=3)", "recall_domain", "recall_domain_real"),
                            ("FID (Inception)", "fid_inception", "fid_inception_floor"),
                            ("precision (Inception, k=3)", "precision_inception", "precision_inception_real"),
                            ("recall (Inception, k=3)", "recall_inception", "recall_inception_real"),
                            ("IS (Inception)", "is_inception", None)):
        lines.append(f"| {name} | {cell(key)} | {cell(key + '_accepted')} | {cell(real) if real else ''} |")
    lines.append(f"\nacceptance rate (kept / drawn): {cell('acceptance_rate')}")
    return "\n".join(lines)
