"""CPU speed of this project beside two public peers, in one process, at equal configuration.

    python benchmarks/peers.py --out benchmarks/results/peers-cpu.json [--what transformer|tokenizer|all]
                               [--size default|large|all] [--profile]

- transformer: the VIM Transformer's training step (the stage's own `accumulated_step`, with label dropout)
  against LlamaGen's class-conditional GPT, then KV-cache sampling with classifier-free guidance;
- tokenizer: ViT-VQGAN S/S (L2 + codebook loss) against enhancing-transformers' ViTVQ, then encoding.

Both sides run fp32 on the same threads, one warm-up step each, then alternating timed rounds; medians per
side. Ratios (ours over peer for throughput, peer over ours for sampling seconds: above 1, ours is faster)
are what carry from one machine to another. Each side keeps its own default dropout.

Ours runs twice in the same rounds: with the project's CPU linear layers (oneDNN, `pipeline.models.cpu_linear`)
and with PyTorch's own (`ours_aten`, the MKL matmuls the peers use), so the report shows how much of a ratio
is that one kernel choice. How much it is depends on the CPU: MKL runs only AVX2 kernels on non-Intel
processors. `gemm_gflops_1024` records both backends' fp32 matmul speed on this machine.

The peers' code is imported at run time from the shared folder `<repo>/../shared/peer-bench` (or
--peer-bench / PEER_BENCH), never copied here; without that folder the benchmark says so and writes nothing.
The tokenizer peer needs omegaconf and einops, pip-installed on first use into a temp folder (PEER_DEPS).
--profile adds the top operators of one project VIM step by self CPU time.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from common import ROOT, write_report

import torch

from pipeline import device as devices
from pipeline.models import cpu_linear
from pipeline.models.sampling import SamplingSettings, sample_tokens
from pipeline.models.settings import VIM_SIZES, TokenizerSettings, TransformerSettings, VimSize
from pipeline.models.tokenizer import ViTVQGAN
from pipeline.models.transformer import VIMTransformer
from pipeline.train.lm_step import accumulated_step, parameter_groups

PRESETS = {
    "transformer": {
        "default": {"dim": 512, "depth": 8, "heads": 8, "grid": 16, "vocab": 1024, "batch": 16,
                    "sample_batch": 8, "cfg": 1.5},
        "large": {"dim": 768, "depth": 12, "heads": 12, "grid": 32, "vocab": 1024, "batch": 4,
                  "sample_batch": 4, "cfg": 1.5},
    },
    "tokenizer": {
        "default": {"image": 64, "patch": 8, "codebook": 8192, "batch": 16},
        "large": {"image": 128, "patch": 8, "codebook": 8192, "batch": 8},
    },
}
BENCH_VIM_SIZE = "peer-bench"
NUM_CLASSES = 1000  # ImageNet's, as both peers are configured
SAMPLING_TRIES = 2
PROFILE_TOP = 15
PEER_NAMES = {"llamagen": "LlamaGen", "enhancing-transformers": "enhancing-transformers"}
DEPS_INSTALL_FAILED = 3  # exit code: the tokenizer peer's packages could not be installed


# ---------------------------------------------------------------------------------------------
# The shared folder, the peers' provenance and their extra packages


def peer_bench_folder(flag: str | None) -> Path:
    return Path(flag or os.environ.get("PEER_BENCH") or ROOT.parent / "shared" / "peer-bench").resolve()


def peer_commits(folder: Path) -> dict[str, dict[str, str]]:
    """Repository and commit of each peer, as the shared README records them ("owner/Name @abc1234")."""
    readme = (folder / "README.md").read_text() if (folder / "README.md").exists() else ""
    found = {repo.split("/")[1].lower(): (repo, commit) for repo, commit in
             re.findall(r"([\w.-]+/[\w.-]+) @([0-9a-f]{7,40})", readme)}
    commits = {}
    for key, name in PEER_NAMES.items():
        repo, commit = found.get(name.lower(), (name, "unknown"))
        commits[key] = {"repository": repo, "commit": commit}
    return commits


def peer_deps_folder() -> Path:
    """omegaconf and einops for the tokenizer peer, kept out of the project's environment (as run.sh does)."""
    deps = Path(os.environ.get("PEER_DEPS") or Path(tempfile.gettempdir()) / "peer-bench-deps")
    if not (deps / "omegaconf").exists():
        command = [sys.executable, "-m", "pip", "install", "-q", "--target", str(deps), "omegaconf", "einops"]
        if subprocess.run(command).returncode != 0:
            print(f"the tokenizer peer's packages could not be installed: {' '.join(command)}", file=sys.stderr)
            sys.exit(DEPS_INSTALL_FAILED)
    return deps


# ---------------------------------------------------------------------------------------------
# Timing


def alternating_rounds(workloads: dict[str, Callable[[], object]], rounds: int, steps: int,
                       units_per_step: int) -> dict[str, list[float]]:
    """Units per second of each workload per round. One untimed warm-up each, then the workloads take
    turns round by round, so a drift in the machine's speed hits both sides alike."""
    for run in workloads.values():
        run()
    per_round: dict[str, list[float]] = {name: [] for name in workloads}
    for _ in range(rounds):
        for name, run in workloads.items():
            started = time.perf_counter()
            for _ in range(steps):
                run()
            per_round[name].append(steps * units_per_step / (time.perf_counter() - started))
    return per_round


def best_seconds(workloads: dict[str, Callable[[], object]], tries: int) -> dict[str, float]:
    """The fastest of `tries` alternating runs of each workload (the first also warms up)."""
    best = {name: float("inf") for name in workloads}
    for _ in range(tries):
        for name, run in workloads.items():
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def with_aten_linear(run: Callable[[], object]) -> Callable[[], object]:
    """The same workload with PyTorch's own CPU linear layers instead of the project's oneDNN ones."""
    def aten_run() -> object:
        with cpu_linear.use_backend("aten"):
            return run()
    return aten_run


def throughput_summary(per_round: dict[str, list[float]], unit: str) -> dict:
    """Rounds, medians and the ratio over the peer of every workload ("ours", "ours_aten", "peer")."""
    medians = {name: statistics.median(values) for name, values in per_round.items()}
    summary = {"unit": unit}
    for name, values in per_round.items():
        summary[f"rounds_{name}"] = [round(v, 2) for v in values]
        summary[f"median_{name}"] = round(medians[name], 2)
    for name in per_round:
        if name != "peer":
            summary[f"ratio_{name}_over_peer"] = round(medians[name] / medians["peer"], 3)
    return summary


def gemm_gflops() -> dict[str, float]:
    """fp32 1024^2 matmul GFLOP/s through each CPU linear backend on this machine (the CPU MFU peak's measure)."""
    speeds = {}
    for name in cpu_linear.BACKENDS:
        with cpu_linear.use_backend(name):
            speeds[name] = round(devices.measure_cpu_matmul_flops(size=1024, repeats=10) / 1e9, 1)
    return speeds


def parameter_millions(model: torch.nn.Module, skip_prefix: str | None = None) -> float:
    count = sum(p.numel() for name, p in model.named_parameters()
                if skip_prefix is None or not name.startswith(skip_prefix))
    return round(count / 1e6, 2)


def top_ops_by_self_cpu(step: Callable[[], object], count: int = PROFILE_TOP) -> dict:
    """torch.profiler over one call of `step`: the operators that spend the most CPU time themselves."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = list(prof.key_averages())
    total_us = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:count]
    return {"self_cpu_total_ms": round(total_us / 1000, 2),
            "top_ops": [{"name": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 2),
                         "percent": round(100 * e.self_cpu_time_total / total_us, 1)} for e in top]}


# ---------------------------------------------------------------------------------------------
# Transformer: VIM against LlamaGen's GPT


def vim_settings(cfg: dict) -> TransformerSettings:
    VIM_SIZES[BENCH_VIM_SIZE] = VimSize(cfg["dim"], cfg["depth"], cfg["heads"], 4 * cfg["dim"])
    # `size` only validates against the named presets: check every other field on one, then name ours.
    checked = TransformerSettings(size="small", vocab_size=cfg["vocab"], grid=(cfg["grid"], cfg["grid"]),
                                  num_classes=NUM_CLASSES, label_dropout=0.1)
    return checked.model_copy(update={"size": BENCH_VIM_SIZE})


def vim_training_step(model: VIMTransformer, tokens: torch.Tensor, labels: torch.Tensor) -> Callable[[], object]:
    """The stage's step: fresh label dropout on the batch, then the shared accumulated step."""
    backend = devices.detect("cpu")
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=1e-4, betas=(0.9, 0.96),
                                  fused=backend.fused_adamw())
    return lambda: accumulated_step(model, [(tokens, model.drop_labels(labels))], optimizer, backend, grad_clip=1.0)


def llamagen_training_step(model, tokens: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """LlamaGen's c2i recipe; its label dropout happens inside the model in train mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)

    def step() -> None:
        _, loss = model(idx=tokens[:, :-1], cond_idx=labels, targets=tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def compare_transformer(cfg: dict, rounds: int, steps: int, peer_folder: Path, profile: bool) -> dict:
    llamagen = str(peer_folder / "peers" / "llamagen")
    if llamagen not in sys.path:
        sys.path.insert(0, llamagen)  # its modules import top-level `autoregressive` and `utils`
    from autoregressive.models.generate import generate
    from autoregressive.models.gpt import ModelArgs, Transformer

    length = cfg["grid"] ** 2
    torch.manual_seed(0)
    ours = VIMTransformer(vim_settings(cfg)).train()
    peer = Transformer(ModelArgs(dim=cfg["dim"], n_layer=cfg["depth"], n_head=cfg["heads"], vocab_size=cfg["vocab"],
                                 block_size=length, num_classes=NUM_CLASSES, cls_token_num=1,
                                 model_type="c2i")).train()
    tokens = torch.randint(0, cfg["vocab"], (cfg["batch"], length))
    labels = torch.randint(0, NUM_CLASSES, (cfg["batch"],))
    ours_step = vim_training_step(ours, tokens, labels)
    train = throughput_summary(alternating_rounds(
        {"ours": ours_step, "ours_aten": with_aten_linear(ours_step),
         "peer": llamagen_training_step(peer, tokens, labels)},
        rounds, steps, cfg["batch"] * length), "tokens/s")
    result = {"config": cfg, "threads": torch.get_num_threads(),
              "params_ours_m": round(ours.parameter_count(embeddings=True) / 1e6, 2),
              "params_peer_m": parameter_millions(peer), "train": train,
              "train_ratio_ours_over_peer": train["ratio_ours_over_peer"]}
    if profile:  # the step with PyTorch's linear layers (before) and with the project's (after)
        result["profile_ours_step_aten_linear"] = top_ops_by_self_cpu(with_aten_linear(ours_step))
        result["profile_ours_step"] = top_ops_by_self_cpu(ours_step)

    # Sampling last: LlamaGen's generate leaves KV caches in its attention layers, which training cannot pass.
    ours.eval()
    peer.eval()
    sample_labels = torch.randint(0, NUM_CLASSES, (cfg["sample_batch"],))
    def ours_sample() -> torch.Tensor:
        return sample_tokens(ours, sample_labels, SamplingSettings(guidance_scale=cfg["cfg"]),
                             torch.Generator().manual_seed(0))

    seconds = best_seconds({
        "ours": ours_sample, "ours_aten": with_aten_linear(ours_sample),
        "peer": lambda: generate(peer, sample_labels, length, cfg_scale=cfg["cfg"], cfg_interval=-1,
                                 temperature=1.0, top_k=0, top_p=1.0, sample_logits=True),
    }, SAMPLING_TRIES)
    result["sample"] = {"unit": "seconds", "images": cfg["sample_batch"], "tokens_per_image": length,
                        "best_of": SAMPLING_TRIES, **{f"seconds_{name}": round(value, 3)
                                                      for name, value in seconds.items()}}
    result["sample_speed_ratio_ours_over_peer"] = round(seconds["peer"] / seconds["ours"], 3)
    result["sample_speed_ratio_ours_aten_over_peer"] = round(seconds["peer"] / seconds["ours_aten"], 3)
    return result


# ---------------------------------------------------------------------------------------------
# Tokenizer: ViT-VQGAN against enhancing-transformers' ViTVQ


@functools.cache
def enhancing_vitvq(peer_folder: Path):
    """The peer's ViTVQ class, OmegaConf and its source tree, behind the shared CPU shims (Lightning and
    wandb stubs, pure-torch fused ops, a random LPIPS trunk): process-wide patches, installed once."""
    sys.path.append(str(peer_deps_folder()))  # after the project's environment: its packages come first
    sys.path.insert(0, str(peer_folder))  # the shared shims module
    import bench_vitvqgan as shims

    source = peer_folder / "peers" / "enhancing-transformers"
    shims.import_enhancing_package_without_init(str(source))
    shims.install_shims()
    from enhancing.modules.stage1.vitvqgan import ViTVQ
    from omegaconf import OmegaConf

    return ViTVQ, OmegaConf, source


def tokenizer_training_step(forward: Callable, optimizer: torch.optim.Optimizer,
                            images: torch.Tensor) -> Callable[[], None]:
    """Reconstruction L2 plus the quantizer's losses, backward, one AdamW step."""
    def step() -> None:
        reconstruction, quantizer_loss = forward(images)
        ((reconstruction - images).pow(2).mean() + quantizer_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def ours_reconstruction(model: ViTVQGAN) -> Callable:
    def forward(images: torch.Tensor):
        reconstruction, _, quantized = model(images)
        return reconstruction, sum(quantized.losses.values())

    return forward


def compare_tokenizer(cfg: dict, rounds: int, steps: int, peer_folder: Path) -> dict:
    ViTVQ, OmegaConf, source = enhancing_vitvq(peer_folder)
    torch.manual_seed(0)
    peer_params = OmegaConf.load(source / "configs" / "imagenet_vitvq_small.yaml").model.params
    peer_params.image_size, peer_params.patch_size = cfg["image"], cfg["patch"]
    peer_params.quantizer.n_embed = cfg["codebook"]
    peer = ViTVQ(**peer_params)
    peer.learning_rate = 1e-4
    (peer_optimizer, _discriminator_optimizer), _ = peer.configure_optimizers()
    ours = ViTVQGAN(TokenizerSettings(image_size=cfg["image"], patch_size=cfg["patch"], encoder="S", decoder="S",
                                      codebook_size=cfg["codebook"], codebook_dim=32))
    # The peer's optimizer settings, run the way the tokenizer stage runs its optimizer (fused where it can).
    ours_optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-4,
                                       fused=devices.detect("cpu").fused_adamw())
    images = torch.rand(cfg["batch"], 3, cfg["image"], cfg["image"])

    ours.train()
    peer.train()
    ours_step = tokenizer_training_step(ours_reconstruction(ours), ours_optimizer, images)
    train = throughput_summary(alternating_rounds(
        {"ours": ours_step, "ours_aten": with_aten_linear(ours_step),
         "peer": tokenizer_training_step(peer, peer_optimizer, images)},  # the peer returns (reconstruction, loss)
        rounds, steps, cfg["batch"]), "images/s")

    ours.eval()
    peer.eval()
    with torch.no_grad():
        def ours_encode() -> torch.Tensor:
            return ours.encode(images)

        encode = throughput_summary(alternating_rounds(
            {"ours": ours_encode, "ours_aten": with_aten_linear(ours_encode),
             "peer": lambda: peer.encode_codes(images)}, rounds, steps, cfg["batch"]), "images/s")
    return {"config": cfg, "threads": torch.get_num_threads(), "params_ours_m": parameter_millions(ours),
            "params_peer_m": parameter_millions(peer, skip_prefix="loss."),  # not its LPIPS and discriminator
            "train": train, "encode": encode, "train_ratio_ours_over_peer": train["ratio_ours_over_peer"],
            "encode_ratio_ours_over_peer": encode["ratio_ours_over_peer"]}


# ---------------------------------------------------------------------------------------------
# Command line


OVERRIDES = {"transformer": ("dim", "depth", "heads", "grid", "vocab", "batch", "sample_batch", "cfg"),
             "tokenizer": ("image", "patch", "codebook", "batch")}


def configuration(what: str, size: str, args: argparse.Namespace) -> dict:
    cfg = dict(PRESETS[what][size])
    for key in OVERRIDES[what]:
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    return cfg


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/peers-cpu.json")
    parser.add_argument("--what", choices=["transformer", "tokenizer", "all"], default="all")
    parser.add_argument("--size", choices=["default", "large", "all"], default="default")
    parser.add_argument("--peer-bench", help="the shared peer-bench folder (default: PEER_BENCH or "
                                             "<repo>/../shared/peer-bench)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per side")
    parser.add_argument("--steps", type=int, default=3, help="steps (or encodings) per round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both sides (0: torch's default)")
    parser.add_argument("--profile", action="store_true", help="top ops of one project VIM step by self CPU time")
    overrides = parser.add_argument_group("size overrides (for smoke runs; --batch applies to both kinds)")
    for name, kind in (("dim", int), ("depth", int), ("heads", int), ("grid", int), ("vocab", int), ("batch", int),
                       ("sample-batch", int), ("cfg", float), ("image", int), ("patch", int), ("codebook", int)):
        overrides.add_argument(f"--{name}", type=kind)
    return parser.parse_args()


def print_table(comparisons: dict[str, dict]) -> None:
    rows = [("comparison", "measure", "ours", "ours (aten linear)", "peer", "ratio", "ratio (aten linear)")]
    for name, result in comparisons.items():
        for key in ("train", "encode"):
            if key in result:
                figures = result[key]
                rows.append((name, f"{key} {figures['unit']}", f"{figures['median_ours']:g}",
                             f"{figures['median_ours_aten']:g}", f"{figures['median_peer']:g}",
                             f"{figures['ratio_ours_over_peer']:g}", f"{figures['ratio_ours_aten_over_peer']:g}"))
        if "sample" in result:
            sample = result["sample"]
            rows.append((name, "sample seconds", f"{sample['seconds_ours']:g}", f"{sample['seconds_ours_aten']:g}",
                         f"{sample['seconds_peer']:g}", f"{result['sample_speed_ratio_ours_over_peer']:g}x faster",
                         f"{result['sample_speed_ratio_ours_aten_over_peer']:g}x faster"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))


def main() -> None:
    args = parse_args()
    folder = peer_bench_folder(args.peer_bench)
    if not folder.is_dir():
        print(f"skipped: the peer bench folder {folder} was not found (set --peer-bench or PEER_BENCH)")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = ["transformer", "tokenizer"] if args.what == "all" else [args.what]
    sizes = ["default", "large"] if args.size == "all" else [args.size]
    comparisons: dict[str, dict] = {}
    for kind in kinds:
        for size in sizes:
            cfg = configuration(kind, size, args)
            if kind == "transformer":
                result = compare_transformer(cfg, args.rounds, args.steps, folder, args.profile)
                result["peer"] = "llamagen"
            else:
                result = compare_tokenizer(cfg, args.rounds, args.steps, folder)
                result["peer"] = "enhancing-transformers"
            comparisons[f"{kind}-{size}"] = result
    write_report(args.out, "peers", {"device": "cpu", "precision": "fp32", "threads": torch.get_num_threads(),
                                     "cpu_linear": cpu_linear.backend(), "gemm_gflops_1024": gemm_gflops(),
                                     "rounds": args.rounds, "steps_per_round": args.steps,
                                     "peer_bench": str(folder), "peers": peer_commits(folder),
                                     "comparisons": comparisons})
    print_table(comparisons)


if __name__ == "__main__":
    main()
