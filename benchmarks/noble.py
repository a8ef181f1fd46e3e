"""NOBLE at demo scale: do nonlinear low-rank branches reach the baseline's loss in fewer steps and seconds?

    python benchmarks/noble.py --out benchmarks/results/noble-cpu.json      # the full run (about 20-25 min, 2 cores)
    python benchmarks/noble.py --quick --out bench-out/noble-quick.json     # the whole path in a couple of minutes

On the demo run's own data (`runs/demo`: `codes/` for the VIM Transformer, `shards/` for the tokenizer), each
model is trained with and without branches for the same number of steps, three seeds each, single process,
with the stages' model, loss, optimizer groups (NOBLE's multipliers included) and learning-rate schedule:
- the VIM Transformer: the demo recipe (configs/demo.yaml `transformer`, its global batch of 64), validation
  loss in nats per token on the val codes;
- the tokenizer: the demo recipe without the discriminator (it joins at step 400 in the demo and would
  triple the step cost), val L2 and PSNR on val images; once with the stage's random crop + flip
  augmentation and once without, since the paper reports stochastic augmentation cancelling the gain.
For each branch run: the steps and training seconds it took to reach the same-seed baseline's final
validation figure (linear between evaluations; null when it never did), the step-time and parameter
overheads, and the spread over seeds. Writes JSON (common.write_report) and a PNG of the curves beside it.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

from common import ROOT, write_report

import numpy as np
import torch

from loss_curve import read_codes
from pipeline import device as devices
from pipeline.config import load_config
from pipeline.data.shards import iter_samples, list_shards
from pipeline.data.transforms import center, random_crop_flip, to_float
from pipeline.models.transformer import VIMTransformer
from pipeline.schedules import warmup_cosine
from pipeline.train.lm_step import accumulated_step, lr_at, next_token_loss, parameter_groups
from pipeline.train.optim import grad_norm, set_lr
from pipeline.train.tokenizer_objective import TokenizerObjective, generator_parameter_groups
from stages.tokenizer import evaluate_reconstruction

BACKEND = devices.detect("cpu")


def batch_rows(step: int, batch: int, count: int, seed: int) -> torch.Tensor:
    """Rows of one step: a fresh permutation per epoch, each epoch's rows used once (the last partial batch
    of an epoch is dropped, as the stages' `drop_last`)."""
    per_epoch = count // batch
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(1000 + 7919 * seed + epoch))
    return order[index * batch:(index + 1) * batch]


# ---------------------------------------------------------------------------------------------
# The VIM Transformer


@torch.no_grad()
def vim_val_loss(model: VIMTransformer, codes: torch.Tensor, labels: torch.Tensor | None) -> float:
    """Mean NLL in nats per token, as stages.transformer.validation_loss computes it."""
    model.eval()
    total = 0.0
    for start in range(0, len(codes), 256):
        chunk = codes[start:start + 256]
        logits = model(chunk, labels[start:start + 256] if labels is not None else None)
        total += float(next_token_loss(logits, chunk)) * chunk.numel()
    model.train()
    return total / codes.numel()


def train_vim(settings, cfg, data, val, seed: int, steps: int, batch: int, eval_every: int) -> dict:
    codes, labels = data
    torch.manual_seed(seed)
    model = VIMTransformer(settings).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  fused=BACKEND.fused_adamw())
    val_labels = val[1] if cfg.conditional else None
    curve, seconds = [], 0.0
    for step in range(steps):
        rows = batch_rows(step, batch, len(codes), seed)
        micro = [(codes[rows], model.drop_labels(labels[rows]) if cfg.conditional else None)]
        set_lr(optimizer, lr_at(step, cfg.lr, cfg.lr_floor, cfg.warmup_steps, cfg.decay_start, steps))
        started = time.perf_counter()
        accumulated_step(model, micro, optimizer, BACKEND, cfg.grad_clip)
        seconds += time.perf_counter() - started
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "seconds": round(seconds, 3),
                          "val_loss_nats": round(vim_val_loss(model, val[0], val_labels), 5)})
    return {"seed": seed, "parameters": model.parameter_count(embeddings=True), "train_seconds": round(seconds, 2),
            "curve": curve}


# ---------------------------------------------------------------------------------------------
# The tokenizer


def read_images(folder: Path, limit: int) -> torch.Tensor:
    """Up to `limit` images of a shard folder as uint8 (N, H, W, 3), in shard order."""
    samples = itertools.islice((s for url in list_shards(str(folder)) for s in iter_samples(url)), limit)
    return torch.from_numpy(np.stack([s["image"] for s in samples]))


def train_tokenizer(tcfg, train: torch.Tensor, val: torch.Tensor, seed: int, steps: int, eval_every: int,
                    augment: bool) -> dict:
    torch.manual_seed(seed)
    objective = TokenizerObjective(tcfg)
    model = objective.model.train()
    optimizer = torch.optim.AdamW(generator_parameter_groups(model, tcfg.weight_decay), lr=tcfg.lr,
                                  betas=tcfg.betas, weight_decay=tcfg.weight_decay, fused=BACKEND.fused_adamw())
    curve, seconds = [], 0.0
    for step in range(steps):
        images = to_float(train[batch_rows(step, tcfg.batch_size, len(train), seed)])
        if augment:  # the stage's augmentation, with its per-step generator
            images = random_crop_flip(images, tcfg.image_size, tcfg.augment_pad,
                                      torch.Generator().manual_seed(seed * 1_000_003 + step * 97))
        else:
            images = center(images, tcfg.image_size)
        set_lr(optimizer, tcfg.lr * warmup_cosine(step, tcfg.warmup_steps, steps, tcfg.lr_floor / tcfg.lr))
        started = time.perf_counter()
        loss, _, _, _ = objective.generator_losses(model, None, images, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm(model.parameters(), tcfg.grad_clip)
        BACKEND.optimizer_step(optimizer)
        seconds += time.perf_counter() - started
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            batches = (val[i:i + 256] for i in range(0, len(val), 256))
            metrics = evaluate_reconstruction(model, batches, len(val), BACKEND)
            curve.append({"step": step + 1, "seconds": round(seconds, 3), "val_l2": round(metrics["val_l2"], 6),
                          "val_psnr": round(metrics["val_psnr"], 4)})
    return {"seed": seed, "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(seconds, 2), "curve": curve}


# ---------------------------------------------------------------------------------------------
# Comparing runs


def reach(curve: list[dict], metric: str, target: float, lower_is_better: bool) -> dict:
    """Steps and seconds at which `curve` first reaches `target`, linear between evaluations; None if never."""
    better = (lambda v: v <= target) if lower_is_better else (lambda v: v >= target)
    previous = {"step": 0, "seconds": 0.0, metric: None}
    for point in curve:
        if better(point[metric]):
            if previous[metric] is None or point[metric] == previous[metric]:
                return {"steps": point["step"], "seconds": point["seconds"]}
            share = (previous[metric] - target) / (previous[metric] - point[metric])
            return {"steps": round(previous["step"] + share * (point["step"] - previous["step"]), 1),
                    "seconds": round(previous["seconds"] + share * (point["seconds"] - previous["seconds"]), 3)}
        previous = point
    return {"steps": None, "seconds": None}


def spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": round(statistics.mean(values), 5), "std": round(statistics.stdev(values), 5) if len(values) > 1
            else 0.0, "min": round(min(values), 5), "max": round(max(values), 5), "n": len(values)}


def compare(baseline: list[dict], branch: list[dict], metric: str, lower_is_better: bool) -> dict:
    """Per seed: the branch run against the same-seed baseline's final figure; then the spread over seeds."""
    per_seed = []
    for base, noble in zip(baseline, branch):
        target = base["curve"][-1][metric]
        reached = reach(noble["curve"], metric, target, lower_is_better)
        steps, seconds = base["curve"][-1]["step"], base["train_seconds"]
        per_seed.append({
            "seed": base["seed"], "baseline_final": target, "noble_final": noble["curve"][-1][metric],
            "noble_steps_to_baseline_final": reached["steps"], "noble_seconds_to_baseline_final": reached["seconds"],
            "step_speedup": round(steps / reached["steps"], 3) if reached["steps"] else None,
            "wallclock_speedup": round(seconds / reached["seconds"], 3) if reached["seconds"] else None,
            "step_time_ratio": round((noble["train_seconds"] / noble["curve"][-1]["step"])
                                     / (base["train_seconds"] / steps), 4)})
    reached_all = all(row["step_speedup"] for row in per_seed)
    gap = [row["noble_final"] - row["baseline_final"] for row in per_seed]
    summary = {
        "metric": metric, "lower_is_better": lower_is_better,
        "baseline_final": spread([row["baseline_final"] for row in per_seed]),
        "noble_final": spread([row["noble_final"] for row in per_seed]),
        "final_gap_noble_minus_baseline": spread(gap),
        "step_speedup": spread([row["step_speedup"] for row in per_seed]),
        "wallclock_speedup": spread([row["wallclock_speedup"] for row in per_seed]),
        "step_time_overhead": spread([row["step_time_ratio"] - 1 for row in per_seed]),
        "parameter_overhead": round(branch[0]["parameters"] / baseline[0]["parameters"] - 1, 4),
        "seeds_reaching_baseline_final": sum(1 for row in per_seed if row["step_speedup"]),
        "step_gain_holds": reached_all and all(row["step_speedup"] > 1 for row in per_seed),
        "wallclock_gain_holds": reached_all and all((row["wallclock_speedup"] or 0) > 1 for row in per_seed),
    }
    return {"per_seed": per_seed, "summary": summary}


def _pm(stats: dict, digits: int = 4) -> str:
    if stats["mean"] is None:
        return "never"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown_table(comparisons: dict[str, dict]) -> str:
    lines = ["| comparison | metric | baseline final | NOBLE final | steps speed-up | wall-clock speed-up | "
             "step-time overhead | parameters | seeds reaching | gain holds (steps / wall-clock) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, comparison in comparisons.items():
        s = comparison["summary"]
        lines.append(
            f"| {name} | {s['metric']} | {_pm(s['baseline_final'])} | {_pm(s['noble_final'])} | "
            f"{_pm(s['step_speedup'], 2)} | {_pm(s['wallclock_speedup'], 2)} | {_pm(s['step_time_overhead'], 3)} | "
            f"+{100 * s['parameter_overhead']:.1f} % | {s['seeds_reaching_baseline_final']}/{s['noble_final']['n']} | "
            f"{'yes' if s['step_gain_holds'] else 'no'} / {'yes' if s['wallclock_gain_holds'] else 'no'} |")
    return "\n".join(lines)


def plot(panels: list[tuple[str, str, list[dict], list[dict]]], path: Path) -> None:
    """One panel per comparison: each variant's mean curve over seeds with its min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), dpi=110, squeeze=False)
    for axis, (title, metric, baseline, branch) in zip(axes[0], panels):
        for runs, label, colour in ((baseline, "baseline", "tab:blue"), (branch, "NOBLE", "tab:orange")):
            steps = [p["step"] for p in runs[0]["curve"]]
            values = np.array([[p[metric] for p in run["curve"]] for run in runs])
            axis.plot(steps, values.mean(0), color=colour, label=f"{label} (mean of {len(runs)})")
            axis.fill_between(steps, values.min(0), values.max(0), color=colour, alpha=0.2)
        axis.axhline(statistics.mean(run["curve"][-1][metric] for run in baseline), color="tab:blue", ls="--", lw=0.8)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("step")
        axis.set_ylabel(metric)
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "demo"), help="a demo run: codes/ and shards/")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--activation", default="cosnet", choices=("cosnet", "gelu"))
    parser.add_argument("--vim-rank", type=int, default=8, help="branch rank of the VIM Transformer (dim 128)")
    parser.add_argument("--vim-steps", type=int, default=None, help="default: the demo's transformer.steps")
    parser.add_argument("--vim-eval-every", type=int, default=20)
    parser.add_argument("--vim-val-images", type=int, default=None, help="default: the demo's val_images")
    parser.add_argument("--tokenizer-rank", type=int, default=8, help="branch rank of the tokenizer (dim 64)")
    parser.add_argument("--tokenizer-steps", type=int, default=400)
    parser.add_argument("--tokenizer-eval-every", type=int, default=25)
    parser.add_argument("--tokenizer-train-images", type=int, default=20000)
    parser.add_argument("--tokenizer-val-images", type=int, default=1024)
    parser.add_argument("--skip", choices=("vim", "tokenizer"), action="append", default=[])
    parser.add_argument("--quick", action="store_true", help="a few steps and images: checks the whole path")
    parser.add_argument("--out", default=None, help="JSON report; the plot goes beside it (.png)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.vim_steps, args.vim_eval_every, args.vim_val_images = 2, 12, 4, 64
        args.tokenizer_steps, args.tokenizer_eval_every = 12, 4
        args.tokenizer_train_images, args.tokenizer_val_images = 512, 64
    run_dir = Path(args.run_dir)
    base_cfg = load_config(args.config)
    results: dict = {"config": args.config, "run_dir": str(run_dir), "seeds": args.seeds, "quick": args.quick,
                     "activation": args.activation, "device": BACKEND.kind, "threads": torch.get_num_threads()}
    comparisons: dict[str, dict] = {}
    panels = []

    if "vim" not in args.skip:
        if not (run_dir / "codes" / "train").is_dir():
            raise SystemExit(f"no codes at {run_dir / 'codes'}: run `make demo` first (or pass --run-dir)")
        cfg = base_cfg.transformer
        data, val = read_codes(run_dir / "codes", "train"), read_codes(run_dir / "codes", "val")
        val_images = args.vim_val_images or cfg.val_images
        val = (val[0][:val_images], val[1][:val_images])
        grid = int(round(data[0].shape[1] ** 0.5))
        steps = args.vim_steps or cfg.steps
        batch = cfg.batch_size * cfg.grad_accum * cfg.resources.num_workers  # the stage's global batch
        runs = {}
        for rank in (0, args.vim_rank):
            vcfg = load_config(args.config, [f"transformer.noble_rank={rank}",
                                             f"transformer.noble_activation={args.activation}"]).transformer
            settings = vcfg.model_settings(base_cfg.tokenizer.codebook_size, (grid, grid), int(data[1].max()) + 1)
            runs[rank] = []
            for seed in range(args.seeds):
                runs[rank].append(train_vim(settings, vcfg, data, val, seed, steps, batch, args.vim_eval_every))
                print(f"vim rank {rank} seed {seed}: val {runs[rank][-1]['curve'][-1]['val_loss_nats']:.4f} nats, "
                      f"{runs[rank][-1]['train_seconds']:.1f} s", flush=True)
        comparisons["VIM Transformer"] = compare(runs[0], runs[args.vim_rank], "val_loss_nats", True)
        results["vim"] = {"size": cfg.size, "rank": args.vim_rank, "steps": steps, "batch": batch,
                          "val_images": len(val[0]), "eval_every": args.vim_eval_every,
                          "baseline_runs": runs[0], "noble_runs": runs[args.vim_rank]}
        panels.append(("VIM Transformer: val loss", "val_loss_nats", runs[0], runs[args.vim_rank]))

    if "tokenizer" not in args.skip:
        shards = run_dir / "shards"
        if not (shards / "train").is_dir():
            raise SystemExit(f"no shards at {shards}: run `make demo` first (or pass --run-dir)")
        train = read_images(shards / "train", args.tokenizer_train_images)
        stage = base_cfg.tokenizer
        recipe = ["tokenizer.adversarial_weight=0", f"tokenizer.steps={args.tokenizer_steps}",
                  f"tokenizer.batch_size={stage.batch_size * stage.resources.num_workers}"]  # the global batch
        tcfg = load_config(args.config, recipe).tokenizer
        val = center(to_float(read_images(shards / "val", args.tokenizer_val_images)), tcfg.image_size)
        results["tokenizer"] = {"encoder": tcfg.encoder, "decoder": tcfg.decoder, "rank": args.tokenizer_rank,
                                "steps": args.tokenizer_steps, "batch": tcfg.batch_size, "train_images": len(train),
                                "val_images": len(val), "eval_every": args.tokenizer_eval_every,
                                "augment_pad": tcfg.augment_pad, "adversarial_weight": 0.0}
        for augment in (True, False):
            runs = {}
            for rank in (0, args.tokenizer_rank):
                rcfg = load_config(args.config, [*recipe, f"tokenizer.noble_rank={rank}",
                                                 f"tokenizer.noble_activation={args.activation}"]).tokenizer
                runs[rank] = []
                for seed in range(args.seeds):
                    runs[rank].append(train_tokenizer(rcfg, train, val, seed, args.tokenizer_steps,
                                                      args.tokenizer_eval_every, augment))
                    last = runs[rank][-1]["curve"][-1]
                    print(f"tokenizer augment={augment} rank {rank} seed {seed}: val L2 {last['val_l2']:.5f} "
                          f"PSNR {last['val_psnr']:.2f} dB, {runs[rank][-1]['train_seconds']:.1f} s", flush=True)
            label = "tokenizer, crop+flip" if augment else "tokenizer, no augmentation"
            for metric, lower in (("val_l2", True), ("val_psnr", False)):
                comparisons[f"{label} ({metric})"] = compare(runs[0], runs[args.tokenizer_rank], metric, lower)
            results["tokenizer"]["augmented" if augment else "plain"] = {
                "baseline_runs": runs[0], "noble_runs": runs[args.tokenizer_rank]}
            panels.append((f"{label}: val L2", "val_l2", runs[0], runs[args.tokenizer_rank]))

    results["comparisons"] = comparisons
    results["table_md"] = markdown_table(comparisons)
    if args.out and panels:
        figure = Path(args.out).with_suffix(".png")
        plot(panels, figure)
        results["plot"] = str(figure.relative_to(ROOT) if figure.is_absolute() and ROOT in figure.parents else figure)
    write_report(args.out, "noble", results)
    print(results["table_md"])


if __name__ == "__main__":
    main()
