"""DiGIT's pipeline (tokens: ssl_kmeans): the stage graph the config picks, the code contract with pixel codes
beside the SSL tokens, and the whole pipeline sent with `ray job submit` to a local head, one of its SSL
encoder's Ray Train workers killed (SIGKILL) after a checkpoint and the job's driver killed inside K-means, then
submitted again; the finished run must hold every stage's outputs, the resumed SSL stage the losses of an
uninterrupted one, and K-means every iteration once."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from helpers import (EVALUATE_TINY, PRETOKENIZE_TINY, assert_resume_follows_uninterrupted, check_evaluation,
                     kill_a_train_worker_after_checkpoint, latest_by_step)
from job_head import job_status, ray_head, ray_job  # noqa: F401 (ray_head: the fixture)
from orchestration.errors import PipelineError
from orchestration.runner import preflight, select
from orchestration.sweep import SweepSpec, validate
from pipeline.config import ConfigError, load_config, load_yaml_file
from pipeline.data.codes import CodesError, CodesMeta, codes_matrix, codes_table
from pipeline.models.code_models import load_code_model
from pipeline.models.prefix_transformer import PrefixTransformer, PrefixTransformerSettings
from pipeline.train.lm_step import prefix_loss_of
from pipeline.storage import MANIFEST, Manifest, RunDir
from pipeline.tracking import default_tracking_uri
from stages import names
from stages.kmeans import CENTROIDS, crop_flip_once, keep_fraction
from stages.render import prefixed_rows

ROOT = Path(__file__).resolve().parents[1]
DIGIT = ROOT / "configs" / "digit.yaml"
# The tokenizer and ingest of the other tiny runs (16 px, 4x4 codes), an SSL encoder with 4x4 tokens that
# checkpoints every 6 of its 60 steps (the kill lands mid-stage), 32 centroids, pico Transformers.
DIGIT_TINY = PRETOKENIZE_TINY + [
    "ingest.max_images_per_split=600", "tokenizer.checkpoint_every=10",
    "ssl.image_size=16", "ssl.steps=60", "ssl.batch_size=16", "ssl.checkpoint_every=6", "ssl.log_every=3",
    "ssl.warmup_steps=2", "ssl.teacher_temperature_steps=8", "ssl.freeze_prototypes_steps=2",
    "kmeans.clusters=32", "kmeans.iterations=3", "kmeans.image_fraction=0.5", "kmeans.init_rows=2000",
    "kmeans.batch_size=64", "kmeans.cpus_per_actor=0.5",
    "transformer.size=pico", "transformer.steps=40", "transformer.batch_size=32", "transformer.warmup_steps=2",
    "transformer.decay_start=20", "transformer.checkpoint_every=20", "transformer.eval_every=20",
    "transformer.val_images=64", "transformer.resources.num_workers=1",
    "render.size=pico", "render.steps=40", "render.batch_size=32", "render.warmup_steps=2", "render.decay_start=20",
    "render.checkpoint_every=20", "render.eval_every=20", "render.val_images=64", "render.resources.num_workers=1",
    *EVALUATE_TINY]
ORDER = ["ingest", "tokenizer", "ssl", "kmeans", "pretokenize", "transformer", "render", "evaluate"]


# ---------------------------------------------------------------------------------------------
# Without Ray


def test_the_config_picks_the_stage_graph_and_names_what_does_not_fit():
    assert names("vq") == ("ingest", "tokenizer", "pretokenize", "transformer", "evaluate")
    assert list(names("ssl_kmeans")) == ORDER
    assert select("kmeans", None, tokens="ssl_kmeans") == ORDER[3:]
    assert select(None, None, "pretokenize", tokens="ssl_kmeans") == ORDER[:5]
    with pytest.raises(PipelineError, match="unknown stage 'ssl' for tokens=vq"):
        select(None, "ssl")
    cfg = load_config(DIGIT)
    assert cfg.tokens == "ssl_kmeans" and cfg.transformer == load_config(ROOT / "configs" / "demo.yaml").transformer
    with pytest.raises(ConfigError, match="ssl.image_size 28 differs from tokenizer.image_size 32"):
        load_config(DIGIT, ["ssl.image_size=28"])
    with pytest.raises(ConfigError, match="tokens=ssl_kmeans renders through the VIM codes"):
        load_config(DIGIT, ["tokenizer.quantizer=rq", "transformer.kind=rq"])
    with pytest.raises(ConfigError, match="ssl.pretrained and ssl.weights go together"):
        load_config(DIGIT, ["ssl.pretrained=vit_small_patch14_reg4_dinov2"])
    with pytest.raises(ConfigError, match="render.kind must be vim"):
        load_config(DIGIT, ["render.kind=rq"])
    # A sweep over a stage of the other graph is refused before any trial starts.
    demo, digit = (load_yaml_file(ROOT / "configs" / name) for name in ("demo.yaml", "digit.yaml"))
    with pytest.raises(ConfigError, match="swept key 'kmeans.clusters': only sections of the config's stages"):
        validate(SweepSpec(base=demo, space={"kmeans.clusters": ("grid", [64, 256])}))
    with pytest.raises(ConfigError, match="--last-stage render is not a stage of this config"):
        validate(SweepSpec(base=demo, space={"transformer.steps": ("grid", [1])}, last_stage="render"))
    assert validate(SweepSpec(base=digit, space={"kmeans.clusters": ("grid", [64, 256])})) == [
        {"kmeans.clusters": 64}, {"kmeans.clusters": 256}]


def test_a_missing_pretrained_encoder_file_is_named_before_any_ray_work(tmp_path):
    missing = tmp_path / "dinov2_vitb14_reg4.safetensors"
    cfg = load_config(DIGIT, ["ssl.pretrained=vit_base_patch14_reg4_dinov2", f"ssl.weights={missing}"])
    with pytest.raises(ConfigError, match=f"ssl.weights {missing}: no such file. Nothing is downloaded"):
        preflight(cfg)
    preflight(cfg, only="transformer")  # a stage that does not read the encoder does not ask for it


def test_code_files_carry_pixel_codes_beside_the_ssl_tokens():
    meta = CodesMeta(grid=(2, 2), codebook_size=8, tokenizer_sha256="x", pixel_grid=(3, 3), pixel_codebook_size=64)
    tokens, pixels = np.arange(8).reshape(2, 4) % 8, np.arange(18).reshape(2, 9) * 3
    table = codes_table(["a", "b"], [0, 1], [0, 0], tokens, meta, pixel_codes=pixels)
    assert CodesMeta.from_schema(table.schema) == meta
    assert np.array_equal(codes_matrix(table, meta), tokens)
    assert table.schema.field("pixel_codes").type.list_size == 9
    with pytest.raises(CodesError, match=r"pixel codes span \[0, 51\]"):
        codes_table(["a", "b"], [0, 1], [0, 0], tokens, CodesMeta(**{**meta.__dict__, "pixel_codebook_size": 50}),
                    pixel_codes=pixels)
    with pytest.raises(CodesError, match="pixel codes go with a meta that has a pixel grid"):
        codes_table(["a", "b"], [0, 1], [0, 0], tokens, meta)
    # The render stage's rows: the SSL tokens, then the pixel codes; the loss falls on the pixel codes only.
    rows = prefixed_rows(table)
    joined = codes_matrix(rows)
    assert np.array_equal(joined, np.concatenate([tokens, pixels], axis=1)) and "image_id" in rows.column_names
    # A file written without pixel codes keeps the metadata it always had.
    plain = CodesMeta(grid=(2, 2), codebook_size=8, tokenizer_sha256="x").schema()
    assert b"pixel" not in plain.metadata[b"vim.codes"] and plain.names == ["key", "label", "view", "codes"]


def test_the_render_loss_is_the_next_code_loss_of_the_prefixed_model():
    torch.manual_seed(0)
    settings = PrefixTransformerSettings(size="pico", vocab_size=16, grid=(2, 2), num_classes=0,
                                         prefix_vocab_size=8, prefix_grid=(3, 3))
    model = PrefixTransformer(settings).eval()
    prefix, codes = torch.randint(0, 8, (5, 9)), torch.randint(0, 16, (5, 4))
    loss = prefix_loss_of(9)(model, torch.cat([prefix, codes], 1), None)
    expected = torch.nn.functional.cross_entropy(model(codes, prefix).flatten(0, 1), codes.flatten())
    assert torch.allclose(loss, expected)
    changed = prefix.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 8
    assert not torch.allclose(loss, prefix_loss_of(9)(model, torch.cat([changed, codes], 1), None))


def test_kmeans_images_and_views_do_not_depend_on_batching():
    keys = np.array([f"img{i:04d}" for i in range(4000)])
    batch = {"key": keys, "label": np.arange(4000)}
    whole = keep_fraction(batch, 0.25, seed=3)["key"]
    halves = np.concatenate([keep_fraction({k: v[:1700] for k, v in batch.items()}, 0.25, 3)["key"],
                             keep_fraction({k: v[1700:] for k, v in batch.items()}, 0.25, 3)["key"]])
    assert np.array_equal(whole, halves) and 0.22 < len(whole) / len(keys) < 0.28
    assert not np.array_equal(whole, keep_fraction(batch, 0.25, seed=4)["key"])
    images = torch.rand(6, 3, 16, 16)
    once = crop_flip_once(images, keys[:6], seed=0)
    assert torch.equal(once[2:], crop_flip_once(images[2:], keys[2:6], seed=0))  # a view is the key's
    assert not torch.equal(once, images) and once.shape == images.shape


# ---------------------------------------------------------------------------------------------
# The pipeline through `ray job submit`


def _submit(head: dict, job_id: str, run_dir: Path, *extra: str, wait: bool = True):
    args = ["--config", str(DIGIT.relative_to(ROOT)), "--run-dir", str(run_dir), *extra]
    args += [a for o in DIGIT_TINY for a in ("--set", o)]
    return ray_job(head, "submit", *([] if wait else ["--no-wait"]), "--submission-id", job_id, "--working-dir",
                   str(ROOT), "--", "python", "jobs/full_pipeline.py", *args)


def _kill_driver_when(head: dict, job_id: str, run_dir: Path, reached, what: str) -> None:
    deadline = time.time() + 600
    while not reached():
        assert job_status(head, job_id) in ("PENDING", "RUNNING"), f"the job ended before {what}"
        assert time.time() < deadline, f"{what} never happened"
        time.sleep(0.05)
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if "jobs/full_pipeline.py" in command and str(run_dir) in command:
            process.send_signal(signal.SIGKILL)
    while job_status(head, job_id) not in ("STOPPED", "FAILED", "SUCCEEDED"):
        time.sleep(0.5)


@pytest.fixture(scope="module")
def digit_run(ray_head, tmp_path_factory):
    """The tiny DiGIT pipeline through `ray job submit`: one SSL worker killed after its first checkpoint (Ray
    Train restarts the group), the job's driver killed after K-means' first iteration, the same job submitted
    again; and an uninterrupted SSL stage on the same shards for reference."""
    run_dir = tmp_path_factory.mktemp("digit") / "run"
    killed: list[int] = []
    ssl_committed_at_kill: list[bool] = []

    def kill_an_ssl_worker(started: float) -> None:
        kill_a_train_worker_after_checkpoint(run_dir / "ssl", started, killed)
        ssl_committed_at_kill.append((run_dir / "ssl" / MANIFEST).exists())  # then it hit a later stage's worker

    killer = threading.Thread(target=kill_an_ssl_worker, args=(time.time(),), daemon=True)
    killer.start()
    submitted = _submit(ray_head, "digit", run_dir, wait=False)
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    _kill_driver_when(ray_head, "digit", run_dir, (run_dir / "kmeans" / "_progress" / CENTROIDS).exists,
                      "a K-means iteration")
    killer.join(timeout=5)
    assert killed and ssl_committed_at_kill == [False], "no SSL worker was killed inside the SSL stage"
    assert Manifest.read(RunDir(str(run_dir)), "ssl") is not None
    assert Manifest.read(RunDir(str(run_dir)), "kmeans") is None
    finished = _submit(ray_head, "digit-again", run_dir)
    assert finished.returncode == 0 and "succeeded" in finished.stdout, \
        finished.stdout[-3000:] + finished.stderr[-3000:]
    assert re.search(r"kmeans: resuming after iteration [123] of 3", finished.stdout), finished.stdout[-3000:]
    reference = run_dir.parent / "reference"
    shutil.copytree(run_dir / "shards", reference / "shards")
    done = _submit(ray_head, "digit-reference", reference, "--only", "ssl")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_dir, reference


def test_the_whole_digit_pipeline_runs_through_ray_job_submit(digit_run):
    run_dir, _ = digit_run
    run = RunDir(str(run_dir))
    manifests = {name: Manifest.read(run, folder) for name, folder in
                 zip(ORDER, ["shards", "tokenizer", "ssl", "kmeans", "codes", "transformer", "render", "eval"])}
    assert all(manifests.values()), [name for name, m in manifests.items() if m is None]
    assert json.loads((run_dir / "pipeline_config.json").read_text())["tokens"] == "ssl_kmeans"
    # The codes: SSL tokens (K = 32, the encoder's 4x4 grid) with the pixel codes (codebook 64) beside them.
    codes = manifests["pretokenize"]
    outputs = codes.outputs
    assert (outputs["codebook_size"], outputs["grid"], outputs["pixel_codebook_size"]) == (32, [4, 4], 64)
    for name in codes.outputs["codes"]["train"]:
        table = pq.read_table(run_dir / "codes" / name)
        meta = CodesMeta.from_schema(table.schema)
        assert meta.pixel_grid == (4, 4) and codes_matrix(table, meta).max() < 32
        assert codes_matrix(table.select(["pixel_codes"]).rename_columns(["codes"])).max() < 64
    # Stage 1 models the SSL tokens unchanged; stage 2 reads them as its prefix and predicts the pixel codes.
    stage1 = load_code_model(run_dir / "transformer")
    assert (stage1.settings.vocab_size, stage1.settings.grid) == (32, (4, 4))
    render = load_code_model(run_dir / "render")
    assert isinstance(render, PrefixTransformer) and render.settings.prefix_vocab_size == 32
    assert render.settings.vocab_size == 64 and render.settings.num_classes == 0
    for stage in ("transformer", "render"):
        manifest = manifests[stage]
        assert manifest.metrics["val_loss_nats"] < manifest.details["uniform_loss_nats"], (stage, manifest.metrics)
    # The evaluation: rendered samples through the pixel decoder, every figure explained; the probe on the
    # stage-1 Transformer's blocks.
    check_evaluation(run_dir, tokens=16)
    samples = np.load(run_dir / "eval" / "samples.npz")
    assert samples["codes"].shape[1] == 16 and samples["codes"].max() < 64
    # Only the tokenizer's model is registered: the stage-1 Transformer alone samples SSL tokens, not pictures.
    registered = [m.name for m in MlflowClient(default_tracking_uri(str(run_dir))).search_registered_models()]
    assert registered and all("tokenizer" in name for name in registered), registered


def test_the_kmeans_stage_records_its_centroids_and_every_iteration(digit_run):
    run_dir, _ = digit_run
    manifest = Manifest.read(RunDir(str(run_dir)), "kmeans")
    centroids = load_file(str(run_dir / "kmeans" / "centroids.safetensors"))["centroids"]
    ssl = Manifest.read(RunDir(str(run_dir)), "ssl")
    assert centroids.shape == (32, ssl.outputs["feature_dim"]) and torch.isfinite(centroids).all()
    inertia = manifest.outputs["inertia"]
    assert len(inertia) == 3 and all(b <= a * (1 + 1e-6) for a, b in zip(inertia, inertia[1:])), inertia
    assert manifest.outputs["feature_block"] == -3 and manifest.outputs["clusters"] == 32
    # Resumed after the driver's kill: one MLflow run, every iteration's inertia at its step (an iteration the
    # kill cut short after logging is logged again, with the value it had).
    logged = latest_by_step(run_dir, manifest.mlflow_run_id, "inertia")
    assert sorted(logged.items()) == [(i + 1, v) for i, v in enumerate(inertia)]
    metrics = manifest.metrics
    assert metrics["val_majority_class_rate"] <= metrics["val_cluster_purity"] <= 1  # never below one cluster
    assert 0 < metrics["val_usage"] <= 1 and not (run_dir / "kmeans" / "_progress").exists()


def test_the_ssl_stage_resumed_after_a_killed_worker_like_an_uninterrupted_one(digit_run):
    run_dir, reference = digit_run
    manifest = Manifest.read(RunDir(str(run_dir)), "ssl")
    assert manifest.counts["steps"] == 60 and manifest.outputs["kind"] == "trained"
    history = MlflowClient(default_tracking_uri(str(run_dir))).get_metric_history(manifest.mlflow_run_id,
                                                                                 "resumed_from_step")
    assert history and all(m.value % 6 == 0 and 6 <= m.value < 60 for m in history), [m.value for m in history]
    for key in ("train_loss", "train_grad_norm", "train_entropy_of_mean"):
        assert_resume_follows_uninterrupted(run_dir, reference, "ssl", key)
    assert np.isfinite(manifest.metrics["val_knn_top1"]) and 0 < manifest.metrics["val_knn_top1_pixels"] <= 1


def test_a_pretrained_encoder_from_a_local_file_makes_the_tokens(digit_run, ray_head, tmp_path):  # noqa: F811
    """The cluster users' route: a timm ViT's weights from a local file, at another resolution than the run's
    (its position table resampled), recorded by path and checksum, its patch features clustered and tokenized."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    weights = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    run_dir, _ = digit_run
    pretrained = tmp_path / "run"
    for folder in ("shards", "tokenizer"):
        shutil.copytree(run_dir / folder, pretrained / folder)
    done = _submit(ray_head, "digit-pretrained", pretrained, "--from", "ssl", "--to", "pretokenize",
                   "--set", "ssl.pretrained=vit_tiny_patch16_224", "--set", f"ssl.weights={weights}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = RunDir(str(pretrained))
    ssl = Manifest.read(run, "ssl")
    assert ssl.outputs["kind"] == "pretrained" and ssl.outputs["grid"] == 1 and ssl.outputs["feature_dim"] == 192
    assert ssl.details["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert not (pretrained / "ssl" / "checkpoints").exists()  # nothing trained
    codes = Manifest.read(run, "codes")
    assert codes.outputs["grid"] == [1, 1] and codes.outputs["pixel_grid"] == [4, 4]
    assert Manifest.read(run, "kmeans").outputs["dim"] == 192
