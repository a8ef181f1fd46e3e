"""The CNN-VQGAN baseline (tokenizer.architecture=cnn): every quantizer variant trains through the real losses,
the code grid is image_size / patch_size, codes round-trip, the two exported files reload it, bad sizes are
refused when the config loads, the ViT's hashes and files are untouched, and the real tokenizer and pretokenize
stages run it on a tiny data set."""
import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers import PRETOKENIZE_TINY
from pipeline.config import ConfigError, build_config, load_config
from pipeline.data.codes import codes_matrix
from pipeline.data.shards import iter_samples, list_shards
from pipeline.models.cnn import CNNDecoder, CNNEncoder, NonLocalBlock
from pipeline.models.io import SETTINGS_FILE
from pipeline.models.settings import TokenizerSettings
from pipeline.models.tokenizer import ViTVQGAN, load_tokenizer, save_tokenizer
from pipeline.storage import Manifest, RunDir

ROOT = Path(__file__).resolve().parents[1]
CODEBOOK = 64


def _cnn(**kwargs) -> TokenizerSettings:
    return TokenizerSettings(**{"architecture": "cnn", "image_size": 16, "patch_size": 4,
                                "codebook_size": CODEBOOK, "codebook_dim": 8, **kwargs})


VARIANTS = list(itertools.product([None, 8], [True, False], [False, True], ["logit_laplace", "linear"]))


@pytest.mark.parametrize("codebook_dim,l2_normalize,ema,head", VARIANTS)
def test_every_quantizer_variant_trains_through_the_real_losses(codebook_dim, l2_normalize, ema, head):
    from pipeline.train.tokenizer_objective import TokenizerObjective

    torch.manual_seed(0)
    # dead_code_threshold 1: usage starts at 1 and decays for every code this step misses, so each is restarted
    cfg = build_config({}, [
        "tokenizer.architecture=cnn", "tokenizer.image_size=16", f"tokenizer.codebook_size={CODEBOOK}",
        f"tokenizer.codebook_dim={'null' if codebook_dim is None else codebook_dim}",
        f"tokenizer.l2_normalize={str(l2_normalize).lower()}", f"tokenizer.ema={str(ema).lower()}",
        "tokenizer.dead_code_threshold=1.0", f"tokenizer.output_head={head}",
        f"tokenizer.logit_laplace_weight={0.1 if head == 'logit_laplace' else 0}", "tokenizer.perceptual_weight=0",
        "tokenizer.disc_base_channels=8"]).tokenizer
    objective = TokenizerObjective(cfg)
    model = objective.model.train()
    assert isinstance(model.encoder, CNNEncoder) and isinstance(model.decoder, CNNDecoder)
    assert model.quantizer.codebook.shape == (CODEBOOK, codebook_dim or cfg.latent_width)
    codebook_before = model.quantizer.codebook.detach().clone()
    images = torch.rand(2, 3, 16, 16)

    loss, terms, reconstruction, stats = objective.generator_losses(model, objective.discriminator, images, step=0)
    loss.backward()

    expected_terms = {"vq_commitment", "l2", "adversarial"} | ({"vq_codebook"} if not ema else set())
    expected_terms |= {"logit_laplace"} if head == "logit_laplace" else set()
    assert set(terms) == expected_terms and torch.isfinite(loss)
    assert reconstruction.shape == images.shape
    gradients = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in gradients.values()), \
        [n for n, g in gradients.items() if g is None or not torch.isfinite(g).all()]
    # through the straight-through estimator into the first conv, and the attention at the lowest level
    assert gradients["encoder.conv_in.weight"].abs().sum() > 0
    attention = next(m for m in model.encoder.levels[-1] if isinstance(m, NonLocalBlock))
    assert attention.qkv.weight.grad.abs().sum() > 0
    assert gradients["decoder.conv_out.weight"].shape[0] == (6 if head == "logit_laplace" else 3)
    if ema:
        assert "quantizer.codebook" not in gradients  # EMA updates it in place, without gradients
    else:
        assert model.quantizer.codebook.grad.abs().sum() > 0
    # 32 latents in this batch: at least 64 - 32 codes went unpicked and were restarted
    assert stats["restarted_codes"] >= CODEBOOK - 2 * 16
    assert not torch.equal(model.quantizer.codebook.detach(), codebook_before)

    d_loss, _ = objective.discriminator_losses(objective.discriminator, images, reconstruction, d_step=0)
    assert torch.isfinite(d_loss)


@pytest.mark.parametrize("image_size,patch_size", [(16, 1), (16, 2), (16, 4), (32, 8), (32, 16)])
def test_the_code_grid_is_image_size_over_patch_size(image_size, patch_size):
    model = ViTVQGAN(_cnn(image_size=image_size, patch_size=patch_size)).eval()
    halvings = int(np.log2(patch_size))
    assert len(model.encoder.levels) == halvings + 1
    assert sum(not isinstance(d, torch.nn.Identity) for d in model.encoder.downsamples) == halvings
    assert sum(not isinstance(u, torch.nn.Identity) for u in model.decoder.upsamples) == halvings
    images = torch.rand(3, 3, image_size, image_size)
    grid = image_size // patch_size
    assert model.encoder(images).shape == (3, grid * grid, model.settings.latent_width)
    codes = model.encode(images)
    assert codes.shape == (3, grid, grid) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < CODEBOOK
    decoded = model.decode(codes)
    assert decoded.shape == images.shape and 0 <= float(decoded.min()) and float(decoded.max()) <= 1


def test_decoding_the_codes_gives_the_forward_reconstruction():
    torch.manual_seed(1)
    model = ViTVQGAN(_cnn()).eval()
    images = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        reconstruction, _, quantized = model(images)
    codes = model.encode(images)
    assert torch.equal(codes.flatten(1), quantized.codes)
    assert torch.allclose(model.decode(codes), reconstruction.clamp(0, 1), atol=1e-5)


def test_the_default_widths_and_the_given_ones():
    assert _cnn(patch_size=1).cnn_levels == (1,)
    assert _cnn(patch_size=4).cnn_levels == (1, 2, 4)
    assert _cnn(patch_size=16).cnn_levels == (1, 2, 4, 4, 4)
    settings = _cnn(cnn_channels=8, cnn_channel_mult=(1, 3, 5), cnn_res_blocks=2)
    assert settings.latent_width == 40
    model = ViTVQGAN(settings)
    assert [level[0].conv1.out_channels for level in model.encoder.levels] == [8, 24, 40]
    # the encoder: 2 blocks per level, attention after each block of the lowest; the decoder one block more
    assert [len(level) for level in model.encoder.levels] == [2, 2, 4]
    assert [len(level) for level in model.decoder.levels] == [6, 3, 3]
    assert model.quantizer.proj_in.in_features == 40 and model.decoder.conv_in.in_channels == 40


def test_the_two_exported_files_reload_it(tmp_path):
    torch.manual_seed(2)
    model = ViTVQGAN(_cnn(cnn_channel_mult=(1, 2, 2), cnn_res_blocks=2, output_head="linear", ema=True)).eval()
    save_tokenizer(model, tmp_path)
    stored = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert stored["architecture"] == "cnn" and stored["cnn_channel_mult"] == [1, 2, 2]
    assert stored["cnn_res_blocks"] == 2 and stored["cnn_channels"] == 16  # a default, written because cnn is set
    loaded = load_tokenizer(tmp_path)
    assert loaded.settings == model.settings and isinstance(loaded.encoder, CNNEncoder)
    images = torch.rand(3, 3, 16, 16)
    codes = model.encode(images)
    assert torch.equal(loaded.encode(images), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))


def test_the_vit_default_keeps_its_hash_files_and_weights(tmp_path):
    cfg = build_config({})
    assert cfg.tokenizer.architecture == "vit"
    hashed = cfg.tokenizer.output_affecting()
    assert not {"architecture", "cnn_channels", "cnn_channel_mult", "cnn_res_blocks"} & set(hashed)
    # a CNN's sizes count once it is chosen, defaults included: a later default cannot rename its stage
    cnn_hashed = build_config({}, ["tokenizer.architecture=cnn"]).tokenizer.output_affecting()
    assert {"architecture", "cnn_channels", "cnn_channel_mult", "cnn_res_blocks"} <= set(cnn_hashed)
    save_tokenizer(ViTVQGAN(cfg.tokenizer.model_settings()), tmp_path)
    assert "architecture" not in json.loads((tmp_path / SETTINGS_FILE).read_text())
    model = load_tokenizer(tmp_path)
    assert all(key.split(".")[0] in {"encoder", "quantizer", "decoder"} for key in model.state_dict())
    assert "encoder.patch.weight" in model.state_dict()  # the ViT's own modules


@pytest.mark.parametrize("overrides,message", [
    (["tokenizer.image_size=24", "tokenizer.patch_size=3", "tokenizer.adversarial_weight=0"],
     "tokenizer.patch_size 3 is not a power of two"),
    (["tokenizer.cnn_channel_mult=[1,2]"], r"tokenizer.cnn_channel_mult \[1, 2\] has 2 level.*log2\(4\) \+ 1 = 3"),
    (["tokenizer.patch_size=8", "tokenizer.cnn_channel_mult=[1,2,4]"], "tokenizer.patch_size 8 needs"),
    (["tokenizer.cnn_channel_mult=[1,0,2]"], "every multiplier must be at least 1"),
    (["tokenizer.noble_rank=8"], "tokenizer.noble_rank 8"),
    (["tokenizer.codebook_dim=128"], r"tokenizer.codebook_dim 128 is wider than the CNN encoder.*64 channels"),
    (["tokenizer.cnn_channels=0"], "tokenizer.cnn_channels"),
])
def test_sizes_that_do_not_fit_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config({}, ["tokenizer.architecture=cnn", *overrides])


def test_the_checks_are_the_cnns_alone():
    with pytest.raises(ConfigError, match="tokenizer.architecture"):
        build_config({}, ["tokenizer.architecture=resnet"])
    # the ViT keeps taking any patch size that divides the image, and the cnn_* keys do not bind it
    vit = build_config({}, ["tokenizer.image_size=24", "tokenizer.patch_size=3", "tokenizer.adversarial_weight=0",
                            "tokenizer.cnn_channel_mult=[1,2]"]).tokenizer
    assert vit.grid == 8
    # and a codebook_dim wider than the CNN's latent passes where the CNN is wider
    assert build_config({}, ["tokenizer.architecture=cnn", "tokenizer.cnn_channels=32",
                             "tokenizer.codebook_dim=128"]).tokenizer.latent_width == 128
    with pytest.raises(ValueError, match="not a power of two"):  # the model's settings alone refuse it too
        TokenizerSettings(architecture="cnn", image_size=12, patch_size=6)


def test_the_tokenizer_and_pretokenize_stages_run_it(ray_cluster, tmp_path):
    from orchestration.runner import run_pipeline

    cfg = load_config(ROOT / "configs" / "demo.yaml", PRETOKENIZE_TINY + [
        "ingest.max_images_per_split=64", "tokenizer.architecture=cnn", "tokenizer.cnn_channels=8",
        "tokenizer.steps=6", "tokenizer.log_every=3", "tokenizer.adversarial_weight=0", "pretokenize.views=[plain]"])
    run_dir = tmp_path / "run"
    outcomes = run_pipeline(cfg, str(run_dir), to_stage="pretokenize")
    assert [o.name for o in outcomes] == ["ingest", "tokenizer", "pretokenize"]
    trained = Manifest.read(RunDir(str(run_dir)), "tokenizer")
    assert trained.counts["steps"] == 6 and np.isfinite(trained.metrics["val_psnr"])

    tokenizer = load_tokenizer(run_dir / "tokenizer")  # the two files alone
    assert tokenizer.settings.architecture == "cnn" and isinstance(tokenizer.decoder, CNNDecoder)
    samples = [s for url in list_shards(str(run_dir / "shards" / "val")) for s in iter_samples(url)]
    images = torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2).float() / 255
    direct = tokenizer.encode(images).flatten(1).numpy()
    codes = Manifest.read(RunDir(str(run_dir)), "codes")
    stored = {}
    for name in codes.outputs["codes"]["val"]:
        table = pq.read_table(run_dir / "codes" / name)
        stored.update(zip(table["key"].to_pylist(), codes_matrix(table)))
    assert np.array_equal(np.stack([stored[s["key"]] for s in samples]), direct)
    assert tokenizer.decode(torch.from_numpy(direct).view(-1, 4, 4)).shape == images.shape
