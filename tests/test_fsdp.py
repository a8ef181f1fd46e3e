"""FSDP2 (`pipeline/train/sharding.py`) on CPU: 2 gloo processes against a single process on the same global
batch, and the Transformer stage with `transformer.parallelism=fsdp` on a real local Ray.

The two-process run (spawned once for the module) shards a pico VIM Transformer, builds its optimizer groups
after sharding, takes steps with the stage's `accumulated_step`, checkpoints the full state through
`TrainState`, and resumes from it into fresh sharded processes; the test process then checks the results
against plain, unsharded models."""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.device import Backend
from pipeline.models.io import save_weights
from pipeline.models.settings import TransformerSettings
from pipeline.models.transformer import VIMTransformer, load_transformer
from pipeline.train.lm_step import accumulated_step, parameter_groups
from pipeline.train.sharding import FullModelState, FullOptimizerState, shard_transformer
from pipeline.train.state import TrainState, all_rng_states, load_state, rng_state, save_state, set_rng_state

CPU = Backend("cpu", torch.device("cpu"))
WORLD = 2
VOCAB, GRID, CLASSES = 64, (4, 4), 10
GLOBAL_BATCH, MICRO_BATCHES = 8, 2  # images per optimizer step over all ranks; micro-batches per rank
STEPS, CHECKPOINT_AT = 30, 20
LR, BETAS, WEIGHT_DECAY, CLIP = 3e-3, (0.9, 0.96), 0.01, 1.0
# A small pool of sequences drawn again and again: a model that learns shows it as a falling loss.
POOL = torch.randint(0, VOCAB, (16, GRID[0] * GRID[1]), generator=torch.Generator().manual_seed(7))
POOL_LABELS = torch.arange(16) % CLASSES


def settings() -> TransformerSettings:
    return TransformerSettings(size="pico", vocab_size=VOCAB, grid=GRID, num_classes=CLASSES, dropout=0.0,
                               label_dropout=0.0)


def new_model(seed: int) -> VIMTransformer:
    torch.manual_seed(seed)
    return VIMTransformer(settings())


def new_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameter_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS, fused=CPU.fused_adamw())


def micro_batches(step: int, rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of step `step`'s global batch, cut into MICRO_BATCHES equal micro-batches."""
    order = torch.randperm(len(POOL), generator=torch.Generator().manual_seed(1000 + step))[:GLOBAL_BATCH]
    mine = order.chunk(world)[rank]
    return [(POOL[part], POOL_LABELS[part]) for part in mine.chunk(MICRO_BATCHES)]


def global_step(model, optimizer, step: int, rank: int, world: int) -> tuple[float, float]:
    """One optimizer step; (the loss averaged over the global batch, the gradient norm)."""
    loss, norm = accumulated_step(model, micro_batches(step, rank, world), optimizer, CPU, CLIP)
    if world > 1:
        total = torch.tensor([loss])
        dist.all_reduce(total)
        loss = float(total) / world
    return loss, norm


def groups_by_name(model: torch.nn.Module) -> list[tuple[float, list[str]]]:
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [(group["weight_decay"], sorted(names[id(p)] for p in group["params"]))
            for group in parameter_groups(model, WEIGHT_DECAY)]


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return FullModelState(model).state_dict()


# ---------------------------------------------------------------------------------------------
# The two-process run


def _sharded_run(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = Path(out)
    result: dict = {}
    model = shard_transformer(new_model(seed=0), CPU)
    result["shards"] = {name: (tuple(p.to_local().shape), tuple(p.shape), [repr(x) for x in p.placements])
                        for name, p in model.named_parameters()}
    result["groups"] = groups_by_name(model)
    optimizer = new_optimizer(model)
    state = TrainState(model=FullModelState(model), optimizer=FullOptimizerState(model, optimizer))
    losses, norms = {}, {}
    for step in range(1, STEPS + 1):
        losses[step], norms[step] = global_step(model, optimizer, step, rank, world)
        state.step = step
        if step == 1:
            result["after_first_step"] = full_state(model)
            # The clipped gradient the step used, gathered from the shards (every rank takes part).
            result["first_gradient"] = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        if step == CHECKPOINT_AT:
            saved = state.state_dict(all_rng_states(world))  # every rank gathers; rank 0 holds the result
            if rank == 0:
                save_state(out / "checkpoint", saved)
        if step == CHECKPOINT_AT + 1:
            result["after_next_step"] = full_state(model)
    result["losses"], result["norms"] = losses, norms

    # A fresh sharded model and optimizer (other initial weights) resumed from the checkpoint.
    dist.barrier()
    model = shard_transformer(new_model(seed=1), CPU)
    optimizer = new_optimizer(model)
    resumed = TrainState(model=FullModelState(model), optimizer=FullOptimizerState(model, optimizer))
    resumed.load_state_dict(load_state(out / "checkpoint"), rank)
    result["resumed_step"] = resumed.step
    result["resumed_loss"], _ = global_step(model, optimizer, CHECKPOINT_AT + 1, rank, world)
    result["resumed_after_next_step"] = full_state(model)
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("fsdp")
    mp.start_processes(_sharded_run, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, start_method="spawn")
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)], out


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float) -> float:
    assert got.keys() == want.keys()
    worst = max(float((got[key] - want[key]).abs().max()) for key in want)
    assert worst <= atol, worst
    return worst


# ---------------------------------------------------------------------------------------------
# The checks


def test_parameters_are_sharded_along_dim0(sharded):
    results, _ = sharded
    plain = dict(new_model(seed=0).named_parameters())
    assert results[0]["shards"].keys() == plain.keys()
    for name, parameter in plain.items():
        rows = parameter.shape[0]
        for rank, result in enumerate(results):
            local, full, placements = result["shards"][name]
            assert full == tuple(parameter.shape) and placements == ["Shard(dim=0)"], name
            # torch.chunk's split: the first rank holds ceil(rows / 2), the second the rest.
            assert local == (len(torch.arange(rows).chunk(WORLD)[rank]), *parameter.shape[1:]), (name, rank, local)
    mlp = results[1]["shards"]["blocks.0.mlp.0.weight"]
    assert mlp[0] == (128, 64) and mlp[1] == (256, 64)  # pico: MLP 256 x width 64, half on each rank


def test_parameter_groups_keep_the_unsharded_names(sharded):
    results, _ = sharded
    plain = groups_by_name(new_model(seed=0))
    assert all(names for _, names in plain)  # decayed matrices and undecayed vectors both present
    for result in results:
        assert [(decay, names) for decay, names in result["groups"]] == plain


def test_one_step_equals_a_single_process_on_the_global_batch(sharded):
    """fp32 on both sides; only the order of the sums differs (each rank's gradient, then their average in the
    reduce-scatter). The gradients agree to float rounding. Adam's first step divides each gradient by its own
    magnitude, which amplifies that rounding where a gradient is near Adam's eps (1e-8), so a few weights move
    by up to ~1% of the learning rate differently; the rest agree to ~1e-6."""
    results, _ = sharded
    model = new_model(seed=0)
    loss, norm = global_step(model, new_optimizer(model), 1, rank=0, world=1)
    assert abs(results[0]["losses"][1] - loss) < 1e-5
    # Clipping needs the global norm: each rank sees all of it, not its shard's.
    assert all(abs(result["norms"][1] - norm) < 1e-5 for result in results)
    for result in results:
        assert_close(result["first_gradient"], {name: p.grad for name, p in model.named_parameters()}, atol=1e-7)
    assert_close(results[0]["after_first_step"], model.state_dict(), atol=0.05 * LR)
    within = sum(int(((results[0]["after_first_step"][k] - v).abs() <= 1e-6).sum()) for k, v in
                 model.state_dict().items())
    assert within >= 0.999 * model.parameter_count(embeddings=True), within
    # Far from what a step without the other rank's half would give.
    alone = new_model(seed=0)
    accumulated_step(alone, micro_batches(1, 0, WORLD), new_optimizer(alone), CPU, CLIP)
    assert max(float((alone.state_dict()[k] - v).abs().max()) for k, v in model.state_dict().items()) > 1e-3
    assert results[1]["after_first_step"] == {}  # the full state is gathered to rank 0 only


def test_the_loss_falls(sharded):
    losses = sharded[0][0]["losses"]
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert first > 3.5 and last < first - 1.0, (first, last)  # from ~ln 64 = 4.16 nats


def test_resume_reproduces_the_next_step_on_two_ranks(sharded):
    results, _ = sharded
    assert results[0]["resumed_step"] == CHECKPOINT_AT
    assert abs(results[0]["resumed_loss"] - results[0]["losses"][CHECKPOINT_AT + 1]) < 1e-6
    assert_close(results[0]["resumed_after_next_step"], results[0]["after_next_step"], atol=1e-6)


def test_the_checkpoint_resumes_in_one_plain_process_and_exports(sharded, tmp_path):
    """A checkpoint written by 2 sharded ranks: full tensors under the plain model's names. It loads into one
    unsharded process that takes the same next step, and exports weights equal to the full state."""
    results, out = sharded
    saved = load_state(out / "checkpoint")
    model = new_model(seed=1)
    model.load_state_dict(saved["model"])  # strict: the plain model's own keys and shapes
    optimizer = new_optimizer(model)
    state = TrainState(model=FullModelState(model), optimizer=FullOptimizerState(model, optimizer))
    own_rng = rng_state()
    state.load_state_dict(saved, rank=0)  # also sets this process's RNG to the checkpoint's: put back below
    set_rng_state(own_rng)
    assert len(optimizer.state) == len(list(model.parameters()))  # Adam moments restored for every weight
    loss, _ = global_step(model, optimizer, CHECKPOINT_AT + 1, rank=0, world=1)
    assert abs(loss - results[0]["losses"][CHECKPOINT_AT + 1]) < 1e-5
    assert_close(model.state_dict(), results[0]["after_next_step"], atol=1e-5)

    save_weights(saved["model"], settings(), tmp_path / "export")
    exported = load_transformer(tmp_path / "export").state_dict()
    assert exported.keys() == saved["model"].keys()
    assert all(torch.equal(exported[key], saved["model"][key]) for key in exported)


# ---------------------------------------------------------------------------------------------
# The stage on a real local Ray


def test_stage_with_fsdp_resumes_after_a_kill_and_matches_ddp(coded_run, ray_cluster, tmp_path):
    """`transformer.parallelism=fsdp` on 2 CPU workers: a killed worker group resumes from the gathered
    checkpoint, the losses after the resume are those of an uninterrupted DDP run of the same configuration
    (the two are the same maths), and the export holds the last checkpoint's full weights."""
    from helpers import kill_a_train_worker_after_checkpoint, latest_by_step
    from mlflow.tracking import MlflowClient
    from orchestration.runner import run_pipeline
    from pipeline.config import load_config
    from pipeline.storage import Manifest, RunDir
    from pipeline.tracking import default_tracking_uri
    from test_transformer_stage import ROOT, TINY, _copy_upstream

    overrides = [o for o in TINY if not o.startswith(("transformer.steps=", "transformer.eval_every="))]
    overrides += ["transformer.steps=40", "transformer.eval_every=20"]
    run_dir, reference = tmp_path / "fsdp", tmp_path / "ddp"
    for folder in (run_dir, reference):
        _copy_upstream(coded_run, folder)
    killed, started = [], time.time()
    killer = threading.Thread(target=kill_a_train_worker_after_checkpoint,
                              args=(run_dir / "transformer", started, killed), daemon=True)
    killer.start()
    fsdp = load_config(ROOT / "configs" / "demo.yaml", overrides + ["transformer.parallelism=fsdp"])
    assert [o.status for o in run_pipeline(fsdp, str(run_dir), only="transformer")] == ["ran"]
    killer.join(timeout=5)
    assert killed, "no worker was killed"
    run_pipeline(load_config(ROOT / "configs" / "demo.yaml", overrides), str(reference), only="transformer")

    manifests = {run: Manifest.read(RunDir(str(run)), "transformer") for run in (run_dir, reference)}
    assert manifests[run_dir].counts["steps"] == 40
    resumed_at = max(latest_by_step(run_dir, manifests[run_dir].mlflow_run_id, "resumed_from_step").values())
    assert resumed_at in (10, 20, 30)
    for key in ("train_loss_nats", "grad_norm", "val_loss_nats"):
        got, want = (latest_by_step(run, manifests[run].mlflow_run_id, key) for run in (run_dir, reference))
        assert sorted(got) == sorted(want) and max(got) == 40 and any(s > resumed_at for s in got), key
        assert all(abs(got[s] - want[s]) <= 1e-4 * abs(want[s]) for s in want), \
            (key, [(s, got[s], want[s]) for s in sorted(want)])
    client = MlflowClient(default_tracking_uri(str(run_dir)))
    assert 0 < client.get_metric_history(manifests[run_dir].mlflow_run_id, "mfu")[-1].value < 1

    # The export is the last checkpoint's full model, and it is close to the DDP run's.
    saved = [load_state(path.parent) for path in (run_dir / "transformer" / "checkpoints").glob("*/*/state.pt")]
    full = max(saved, key=lambda state: state["step"])["model"]
    exported = load_transformer(run_dir / "transformer").state_dict()
    assert exported.keys() == full.keys() and all(torch.equal(exported[k], full[k]) for k in full)
    from_ddp = load_transformer(reference / "transformer").state_dict()
    assert max(float((exported[k] - from_ddp[k]).abs().max()) for k in full) < 1e-3
