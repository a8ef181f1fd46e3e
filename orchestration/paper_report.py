"""The paper tables' report: rows read back from each trial's manifests, reconstruction record and MLflow runs,
the paper's claims checked against them, `paper_tables.md`, `paper_tables.json`, two plots, and one MLflow run
that holds them all (tables and plots as artifacts, every figure as a metric)."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import yaml

from pipeline import tracking
from pipeline.storage import RunDir
from orchestration import paper_facts as paper
from orchestration.paper_tables import Outcome, experiment_name, steady_rate, trial_manifests
from orchestration.recon_eval import FOLDER as RECON_FOLDER, RECORD as RECON_RECORD

REPORT_RUN_FILE = "paper_tables_run.json"


def trial_row(row: dict[str, Any], manifest, tracking_uri: str) -> dict[str, Any]:
    """One trial's figures from its own files: the tokenizer manifest (config, steps, seconds, the stage's
    val figures), the reconstruction record (the evaluation's figures) and the stage's MLflow windows."""
    run_dir = RunDir(row["trial_dir"])
    record = run_dir.read_json(RECON_FOLDER, RECON_RECORD)
    recon, config, metrics = record["metrics"], manifest.config, manifest.metrics
    return {
        "architecture": config.get("architecture", "vit"), "codebook_dim": config["codebook_dim"],
        "l2_normalize": config["l2_normalize"], "steps": int(metrics["steps"]),
        "train_seconds": metrics["train_seconds"], "images_per_second": steady_rate(tracking_uri, manifest),
        "images_per_second_overall": metrics["train_images_per_second_overall"],
        "usage_per_256": recon["recon_usage_per_256"], "perplexity": recon["recon_perplexity"],
        "psnr": recon["recon_psnr"], "ssim": recon["recon_ssim"], "rfid_domain": recon["rfid_domain"],
        "rfid_domain_floor": recon.get("rfid_domain_floor"), "recon_images": recon["recon_images"],
        "tokenizer_val_psnr": metrics["val_psnr"], "tokenizer_val_usage_per_256": metrics["val_usage_per_256"],
        "tokenizer_val_perplexity": metrics["val_perplexity"],
        "reference_stats_digest": record["reference_stats_digest"], "trial_dir": row["trial_dir"],
        "tokenizer_mlflow_run_id": manifest.mlflow_run_id, "recon_eval_mlflow_run_id": record["mlflow_run_id"],
    }


def collect(outcome: Outcome) -> dict[str, Any]:
    """All figures of both tables, with the paper's beside them and the claims checked."""
    uri = outcome.tracking_uri
    table4 = [trial_row(row, m, uri) for row, m in trial_manifests(outcome.table4["rows"])]
    table4.sort(key=lambda r: (not r["l2_normalize"], r["codebook_dim"]))
    for row in table4:
        row["paper"] = paper.TABLE4.get((row["codebook_dim"], row["l2_normalize"]))
    table1 = [trial_row(row, m, uri) for row, m in trial_manifests(outcome.table1["rows"])]
    table1.sort(key=lambda r: r["architecture"] != "vit")
    digests = sorted({row["reference_stats_digest"] for row in table4 + table1})
    plan = outcome.plan
    return {
        "size": plan.size, "leaves_out": plan.spec.leaves_out, "images": plan.images, "dims": plan.dims,
        "overrides": plan.overrides, "setup": setup(plan.config()), "data": outcome.data,
        "evaluation_network": outcome.classifier,
        "reference_stats_digests": digests, "seconds": outcome.seconds,
        "table4": {"steps": plan.spec.steps, "concurrency": outcome.table4["concurrency"], "rows": table4,
                   "claims": table4_claims(table4)},
        "table1": {"calibration": outcome.calibration, "rows": table1, "claims": table1_claims(table1)},
        "paper": {"source": paper.SOURCE, "table4": [{"codebook_dim": d, "l2_normalize": l2, **v}
                                                     for (d, l2), v in paper.TABLE4.items()],
                  "table1": paper.TABLE1},
        "sweep_run_ids": {"table4": outcome.table4["sweep_run_id"], "table1": outcome.table1["sweep_run_id"]},
    }


def setup(cfg) -> dict[str, Any]:
    """The settings every trial shares (Table 4 sweeps the lookup dim and l2; Table 1 the architecture)."""
    t, e = cfg.tokenizer, cfg.evaluate
    return {"image_size": t.image_size, "patch_size": t.patch_size, "encoder": t.encoder, "decoder": t.decoder,
            "cnn_channels": t.cnn_channels, "codebook_size": t.codebook_size, "codebook_init": t.codebook_init,
            "dead_code_threshold": t.dead_code_threshold, "ema": t.ema, "l2_weight": t.l2_weight,
            "logit_laplace_weight": t.logit_laplace_weight, "perceptual_weight": t.perceptual_weight,
            "adversarial_weight": t.adversarial_weight, "batch_size_per_worker": t.batch_size,
            "workers": t.resources.num_workers, "cpus_per_worker": t.resources.cpus_per_worker, "lr": t.lr,
            "lr_floor": t.lr_floor, "warmup_steps": t.warmup_steps, "recon_images": e.recon_images,
            "reference_images": e.reference_images, "max_images_per_split": cfg.ingest.max_images_per_split}


def setup_text(s: dict[str, Any]) -> str:
    quantizer = ("the paper's quantizer (normal init, no dead-code restarts, no EMA)"
                 if s["codebook_init"] == "normal" and not s["dead_code_threshold"] and not s["ema"] else
                 f"codebook init {s['codebook_init']}, dead-code restarts below {s['dead_code_threshold']:g}, "
                 f"EMA {'on' if s['ema'] else 'off'}")
    losses = ", ".join(name for name, key in (("L2", "l2_weight"), ("logit-Laplace", "logit_laplace_weight"),
                                              ("perceptual", "perceptual_weight"), ("StyleGAN", "adversarial_weight"))
                       if s[key] > 0)
    return (f"{s['image_size']} px images, patch {s['patch_size']} ({(s['image_size'] // s['patch_size']) ** 2} tokens), "
            f"ViT {s['encoder']}/{s['decoder']} (Table 1's CNN: {s['cnn_channels']} channels at full resolution), "
            f"{s['codebook_size']} codes, {quantizer}; losses {losses}; {s['workers']} Ray Train worker(s) x "
            f"{s['cpus_per_worker']:g} CPU, batch {s['batch_size_per_worker']} per worker, lr {s['lr']:g} "
            f"(warm-up {s['warmup_steps']} steps, cosine to {s['lr_floor']:g})")


# ---------------------------------------------------------------------------------------------
# The paper's claims at this scale


def _claim(text: str, holds: str, evidence: str) -> dict[str, str]:
    return {"claim": text, "holds": holds, "evidence": evidence}


def _spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        for rank, index in enumerate(order):
            out[index] = float(rank)
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    norm = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / norm if norm else 0.0


def _pairs(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float, float]]:
    """(dim, with l2, without l2) of a figure, for the dims that have both."""
    by = {(r["codebook_dim"], r["l2_normalize"]): r[key] for r in rows}
    return [(d, by[(d, True)], by[(d, False)]) for d in sorted({r["codebook_dim"] for r in rows})
            if (d, True) in by and (d, False) in by]


def _share(pairs: list[tuple[int, float, float]], better) -> str:
    wins = sum(better(on, off) for _, on, off in pairs)
    return "n/a" if not pairs else "yes" if wins == len(pairs) else "no" if wins == 0 else "partly"


def table4_claims(rows: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    l2 = sorted((r for r in rows if r["l2_normalize"]), key=lambda r: r["codebook_dim"])
    claims = {}
    if len(l2) >= 3:
        rho = _spearman([r["codebook_dim"] for r in l2], [r["usage_per_256"] for r in l2])
        holds = "yes" if rho <= -0.7 else "partly" if rho < 0 else "no"
        claims["usage_falls_with_dim"] = _claim(paper.TABLE4_CLAIMS["usage_falls_with_dim"], holds,
                                                f"rank correlation of usage with dim {rho:+.2f}; usage " + ", ".join(
                                                    f"{r['codebook_dim']}: {r['usage_per_256']:.3f}" for r in l2))
    else:
        claims["usage_falls_with_dim"] = _claim(paper.TABLE4_CLAIMS["usage_falls_with_dim"], "n/a",
                                                "fewer than 3 lookup dims")
    usage, rfid = _pairs(rows, "usage_per_256"), _pairs(rows, "rfid_domain")
    claims["l2_raises_usage"] = _claim(paper.TABLE4_CLAIMS["l2_raises_usage"], _share(usage, lambda a, b: a > b),
                                       "usage with / without l2: " + ", ".join(
                                           f"{d}: {a:.3f} / {b:.3f}" for d, a, b in usage))
    claims["l2_improves_rfid"] = _claim(paper.TABLE4_CLAIMS["l2_improves_rfid"], _share(rfid, lambda a, b: a < b),
                                        "domain rFID with / without l2: " + ", ".join(
                                            f"{d}: {_f(a)} / {_f(b)}" for d, a, b in rfid))
    if len(l2) >= 3:
        best = min(l2, key=lambda r: r["rfid_domain"])
        inner = best["codebook_dim"] not in (l2[0]["codebook_dim"], l2[-1]["codebook_dim"])
        holds = "yes" if best["codebook_dim"] in (8, 16) else "partly" if inner else "no"
        claims["best_rfid_small_dim"] = _claim(paper.TABLE4_CLAIMS["best_rfid_small_dim"], holds,
                                               f"best domain rFID with l2 at dim {best['codebook_dim']} "
                                               f"({_f(best['rfid_domain'])})")
    else:
        claims["best_rfid_small_dim"] = _claim(paper.TABLE4_CLAIMS["best_rfid_small_dim"], "n/a",
                                               "fewer than 3 lookup dims")
    return claims


def table1_claims(rows: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    by = {r["architecture"]: r for r in rows}
    if not {"vit", "cnn"} <= set(by):
        return {}
    vit, cnn = by["vit"], by["cnn"]
    return {
        "vit_better_rfid": _claim(paper.TABLE1_CLAIMS["vit_better_rfid"],
                                  "yes" if vit["rfid_domain"] < cnn["rfid_domain"] else "no",
                                  f"domain rFID ViT {_f(vit['rfid_domain'])} vs CNN {_f(cnn['rfid_domain'])} (the "
                                  f"verdict), PSNR {vit['psnr']:.2f} vs {cnn['psnr']:.2f} dB, SSIM {vit['ssim']:.3f} vs "
                                  f"{cnn['ssim']:.3f}, after {vit['train_seconds']:.0f} vs {cnn['train_seconds']:.0f} s "
                                  "of training"),
        "vit_higher_usage": _claim(paper.TABLE1_CLAIMS["vit_higher_usage"],
                                   "yes" if vit["usage_per_256"] > cnn["usage_per_256"] else "no",
                                   f"usage per 256 ViT {vit['usage_per_256']:.3f} vs CNN {cnn['usage_per_256']:.3f}"),
    }


# ---------------------------------------------------------------------------------------------
# Markdown


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.0f}%"


def markdown(report: dict[str, Any]) -> str:
    t4, t1 = report["table4"], report["table1"]
    cal = t1["calibration"]
    net = report["evaluation_network"]
    lines = [f"# The paper's Tables 4 and 1 at CPU scale ({report['size']} size)", "",
             f"Images: `{report['images']}` ({_ingest_counts(report)}). Every trial: {setup_text(report['setup'])}. "
             "Every figure below comes from a trial's tokenizer manifest, its reconstruction record "
             "(`recon_eval/metrics.json`, the evaluate stage's reconstruction part) and its MLflow runs.", "",
             f"Reconstruction figures: {t4['rows'][0]['recon_images']:.0f} val images (class-balanced, the same for "
             f"every trial), their PSNR, SSIM, codebook usage per 256 images and perplexity, and rFID in the feature "
             f"space of one domain CNN trained once on {net['train_images']} train images ({net['epochs']} epochs, "
             f"val top-1 {net['val_top1']:.3f}); reference statistics digest "
             f"{', '.join(report['reference_stats_digests'])} for every trial. Domain rFID is not the paper's "
             "Inception rFID: compare its trend, not its value.", "",
             f"Left out at this size: {report['leaves_out']}.", "",
             f"## Table 4: lookup dimension and l2 normalisation ({t4['steps']} steps per trial)", "",
             f"Trials ran {t4['concurrency']} at a time (one worker each), so their train seconds are not a speed "
             "(Table 1's are).", "",
             "| lookup dim | l2 | usage / 256 | paper usage | perplexity | PSNR dB | SSIM | rFID (domain) | paper rFID "
             "(Inception) | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in t4["rows"]:
        p = r["paper"] or {}
        lines.append(f"| {r['codebook_dim']} | {'on' if r['l2_normalize'] else 'off'} | {r['usage_per_256']:.3f} | "
                     f"{_pct(p.get('usage'))} | {r['perplexity']:.1f} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
                     f"{_f(r['rfid_domain'])} | {_f(p.get('rfid'))} | {r['train_seconds']:.0f} |")
    floor = next((r["rfid_domain_floor"] for r in t4["rows"] if r["rfid_domain_floor"] is not None), None)
    if floor is not None:
        lines += ["", f"Real images against the same reference (domain rFID floor): {_f(floor)}."]
    paper_only = sorted(set(paper.TABLE4) - {(r["codebook_dim"], r["l2_normalize"]) for r in t4["rows"]})
    if paper_only:
        lines += ["", "Paper rows not run here: " + "; ".join(
            f"dim {d} l2 {'on' if l2 else 'off'} (usage {_pct(paper.TABLE4[(d, l2)]['usage'])}, rFID "
            f"{paper.TABLE4[(d, l2)]['rfid']})" for d, l2 in paper_only) + "."]
    lines += ["", _claims_text(t4["claims"]), "",
              f"## Table 1: ViT vs CNN at equal training time ({cal['training_seconds']:g} s each)", "",
              "| architecture | steps | s at its rate | train s | images/s | PSNR dB | SSIM | rFID (domain) | "
              "usage / 256 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in t1["rows"]:
        at_rate = r["steps"] * cal["global_batch"] / r["images_per_second"]
        lines.append(f"| {r['architecture']} | {r['steps']} | {at_rate:.0f} | {r['train_seconds']:.0f} | "
                     f"{r['images_per_second']:.0f} | "
                     f"{r['psnr']:.2f} | {r['ssim']:.3f} | {_f(r['rfid_domain'])} | {r['usage_per_256']:.3f} |")
    lines += ["", "s at its rate: steps x images per step / its own images/s (the training time the calibration "
              "equalises); train s: the stage's training seconds, its workers' start and first reads included.", "",
              f"Calibration: {cal['how']}. Measured: " + "; ".join(
        f"{arch} {c['images_per_second']:.0f} images/s -> {c['steps']} steps"
        for arch, c in cal["architectures"].items()) + " (the trials' own rates are in the table).", "",
        "The paper's Table 1 (ImageNet, 256 px, 128 TPUv4; usage from its Table 4):", "",
        "| model | images/s | rFID (Inception) | IS | usage |", "|---|---|---|---|---|"]
    for p in paper.TABLE1:
        lines.append(f"| {p['model']} | {p['images_per_second']} | {p['rfid']} | {p['is']} | {_pct(p['usage'])} |")
    lines += ["", _claims_text(t1["claims"]), "", "## At this scale", "", summary_sentence(report), "",
              f"Source of the paper's numbers: {paper.SOURCE}.", "",
              "Seconds of the invocation that wrote this report (a resumed one skips finished work): " + ", ".join(
                  f"{k} {v:.0f}" for k, v in report["seconds"].items()) + "."]
    return "\n".join(lines) + "\n"


def _ingest_counts(report: dict[str, Any]) -> str:
    data = report["data"]
    return ", ".join(f"{count:,} {split}" for split, count in data["images"].items()) + f", {data['num_classes']} classes"


def _claims_text(claims: dict[str, dict[str, str]]) -> str:
    return "\n".join(f"- **{c['holds']}**: {c['claim']}. Here: {c['evidence']}." for c in claims.values())


def summary_sentence(report: dict[str, Any]) -> str:
    claims = {**report["table4"]["claims"], **report["table1"]["claims"]}
    checked = {k: c for k, c in claims.items() if c["holds"] != "n/a"}
    held = [c["claim"].split(" (")[0] for c in checked.values() if c["holds"] == "yes"]
    partly = [c["claim"].split(" (")[0] for c in checked.values() if c["holds"] == "partly"]
    failed = [c["claim"].split(" (")[0] for c in checked.values() if c["holds"] == "no"]
    parts = [f"Of the paper's {len(checked)} claims checked here, {len(held)} hold at this scale"
             + (f" ({'; '.join(held)})" if held else "")]
    if partly:
        parts.append(f"{len(partly)} hold in part ({'; '.join(partly)})")
    if failed:
        parts.append(f"{len(failed)} do not ({'; '.join(failed)})")
    s = report["setup"]
    return (", ".join(parts) + f". These are minutes of CPU training ({report['table4']['steps']} steps per Table 4 "
            f"trial) of a small tokenizer ({s['encoder']}/{s['decoder']} ViT) on {s['image_size']} px images, "
            "against 500k steps of ViT-VQGAN Base on ImageNet at 256 px in the paper: the shape of a result can "
            "show here, its size cannot, and one seed per row leaves the spread unmeasured.")


# ---------------------------------------------------------------------------------------------
# Plots


def _figure(columns: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, columns, figsize=(3.8 * columns, 3.2), dpi=110, squeeze=False)
    return plt, figure, axes[0]


def _png(plt, figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def table4_plot(rows: list[dict[str, Any]]) -> bytes:
    """Usage and domain rFID against the lookup dim, l2 on and off; the paper's usage (l2 on) dashed."""
    plt, figure, (usage, rfid) = _figure(2)
    for l2, style in ((True, "o-"), (False, "s-")):
        points = sorted((r["codebook_dim"], r["usage_per_256"], r["rfid_domain"]) for r in rows if r["l2_normalize"] == l2)
        label = f"ours, l2 {'on' if l2 else 'off'}"
        usage.plot([p[0] for p in points], [p[1] for p in points], style, label=label)
        rfid.plot([p[0] for p in points], [p[2] for p in points], style, label=label)
    ref = sorted((d, v["usage"]) for (d, l2), v in paper.TABLE4.items() if l2)
    usage.plot([p[0] for p in ref], [p[1] for p in ref], "k--", alpha=0.5, label="paper, l2 on")
    usage.plot([32], [paper.TABLE4[(32, False)]["usage"]], "kx", alpha=0.6, label="paper, l2 off")
    for axis, title in ((usage, "codebook usage per 256 images"), (rfid, "rFID (domain CNN)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("lookup dim (tokenizer.codebook_dim)")
        axis.set_title(title, fontsize=9)
        axis.legend(fontsize=7)
    return _png(plt, figure)


def table1_plot(rows: list[dict[str, Any]]) -> bytes:
    """ViT against CNN at equal training time: one bar pair per figure."""
    figures = (("images_per_second", "train images/s"), ("psnr", "PSNR dB"), ("ssim", "SSIM"),
               ("rfid_domain", "rFID (domain), lower is better"), ("usage_per_256", "usage per 256 images"))
    plt, figure, axes = _figure(len(figures))
    for axis, (key, title) in zip(axes, figures):
        axis.bar([r["architecture"] for r in rows], [r[key] for r in rows], color=["tab:blue", "tab:orange"][:len(rows)])
        axis.set_title(title, fontsize=9)
    return _png(plt, figure)


# ---------------------------------------------------------------------------------------------
# Files and MLflow


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Every figure of both tables as an MLflow metric name: table4.dim32_l2on.rfid_domain, table1.vit.psnr."""
    keys = ("usage_per_256", "perplexity", "psnr", "ssim", "rfid_domain", "rfid_domain_floor", "train_seconds",
            "steps", "images_per_second", "tokenizer_val_psnr", "tokenizer_val_usage_per_256")
    out: dict[str, float] = {}
    for r in report["table4"]["rows"]:
        name = f"table4.dim{r['codebook_dim']}_l2{'on' if r['l2_normalize'] else 'off'}"
        out.update({f"{name}.{k}": float(r[k]) for k in keys if r.get(k) is not None})
    for r in report["table1"]["rows"]:
        out.update({f"table1.{r['architecture']}.{k}": float(r[k]) for k in keys if r.get(k) is not None})
    for arch, c in report["table1"]["calibration"]["architectures"].items():
        out[f"table1.calibration.{arch}.images_per_second"] = float(c["images_per_second"])
    out.update({f"seconds.{k}": float(v) for k, v in report["seconds"].items()})
    return out


def write(outcome: Outcome, total_seconds: float) -> dict[str, Any]:
    """paper_tables.md/.json and the plots in the output folder, and the same in the MLflow run `paper-tables`
    (reopened on a rerun). Returns the report."""
    report = collect(outcome)
    report["seconds"]["total_this_invocation"] = total_seconds
    out = Path(outcome.plan.out)
    run = _report_run(out, outcome.tracking_uri)
    report["mlflow"] = {"tracking_uri": outcome.tracking_uri, "run_id": run.run_id}
    files = {"paper_tables.json": json.dumps(report, indent=2, default=str).encode(),
             "paper_tables.md": markdown(report).encode(), "table4.png": table4_plot(report["table4"]["rows"]),
             "table1.png": table1_plot(report["table1"]["rows"])}
    for name, data in files.items():
        (out / name).write_bytes(data)
        run.log_artifact_bytes(data, name)
    run.log_metrics(flat_metrics(report))
    run.set_tags({f"vim.sweep_run.{k}": v for k, v in report["sweep_run_ids"].items()})
    run.finish("FINISHED")
    return report


def _report_run(out: Path, tracking_uri: str) -> tracking.Tracker:
    key = out / REPORT_RUN_FILE
    experiment_id = tracking.ensure_experiment(tracking_uri, experiment_name(out), f"file://{out / '_mlflow_artifacts'}")
    if key.exists():
        reopened = tracking.reopen_run(tracking_uri, yaml.safe_load(key.read_text())["run_id"])
        if reopened is not None:
            return reopened
    run = tracking.start_run(tracking_uri, experiment_id, "paper-tables", {"vim.kind": "paper_tables"})
    key.write_text(yaml.safe_dump({"run_id": run.run_id}))
    return run
