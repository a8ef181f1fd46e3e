"""ViT-VQGAN pieces without Ray: quantizer search and gradients, codebook stats, losses, overfitting."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.metrics.codebook import CodebookUsage
from pipeline.models.discriminator import StyleGANDiscriminator
from pipeline.models.losses import (LOGIT_LAPLACE_EPS, Perceptual, PerceptualWeightsMissing,
                                    find_vgg16_weights, logit_laplace_nll, r1_penalty)
from pipeline.models.io import SETTINGS_FILE, WEIGHTS_FILE
from pipeline.models.quantize import VectorQuantizer, nearest_code
from pipeline.models.settings import QuantizerSettings
from pipeline.models.tokenizer import TokenizerSettings, ViTVQGAN, load_tokenizer, save_tokenizer


@pytest.mark.parametrize("cosine", [True, False])
def test_chunked_nearest_code_equals_brute_force(cosine):
    torch.manual_seed(0)
    z, codebook = torch.randn(1000, 16), torch.randn(300, 16)
    if cosine:
        z, codebook = F.normalize(z, dim=-1), F.normalize(codebook, dim=-1)
    brute = torch.cdist(z, codebook).argmin(1)
    assert torch.equal(nearest_code(z, codebook, cosine, max_elements=300 * 7), brute)  # 7 rows a chunk
    assert torch.equal(nearest_code(z, codebook, cosine), brute)


def test_straight_through_reaches_the_encoder_and_codes_have_unit_norm():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(64, QuantizerSettings(codebook_size=128, codebook_dim=8, l2_normalize=True))
    z = torch.randn(2, 10, 64, requires_grad=True)
    out = quantizer(z)
    (out.quantized.sum() + sum(out.losses.values())).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert quantizer.codebook.grad.abs().sum() > 0  # codebook term trains the codebook
    assert torch.allclose(quantizer.lookup_table().norm(dim=-1), torch.ones(128), atol=1e-5)
    assert set(out.losses) == {"commitment", "codebook"}
    assert torch.allclose(out.losses["commitment"], 0.25 * out.losses["codebook"].detach(), rtol=1e-5)


def test_plain_vq_has_no_projection_and_no_normalisation():
    quantizer = VectorQuantizer(16, QuantizerSettings(codebook_size=32, codebook_dim=None, l2_normalize=False))
    assert isinstance(quantizer.proj_in, torch.nn.Identity) and quantizer.codebook.shape == (32, 16)
    z = torch.randn(1, 5, 16)
    assert torch.equal(quantizer.encode(z)[0], torch.cdist(z[0], quantizer.codebook).argmin(1))


def _train_step_and_check_restarts(quantizer: VectorQuantizer, z: torch.Tensor, threshold: float) -> int:
    """One training step; checks that exactly the codes dead after this step's usage update were restarted
    onto current latents with fresh usage, and returns how many."""
    counts = torch.bincount(quantizer.encode(z).flatten(), minlength=quantizer.codebook_size).float()
    usage = quantizer.usage.clone().mul_(0.99).add_(counts, alpha=0.01)  # the quantizer's own update
    dead = usage < threshold
    out = quantizer(z)
    assert "codebook" not in out.losses
    restarted = quantizer.codebook.detach()[dead]
    assert (restarted[:, None] == z[0][None]).all(-1).any(1).all()  # each sits exactly on a current latent
    assert (quantizer.usage[dead] == 2 * threshold).all() and (quantizer.ema_count[dead] == 1).all()
    assert torch.equal(quantizer.ema_sum[dead], restarted)
    assert torch.equal(quantizer.usage[~dead], usage[~dead])  # live codes keep their usage
    assert out.stats["restarted_codes"] == int(dead.sum()) and out.stats["dead_codes"] == 0  # none left dead
    return int(dead.sum())


def test_ema_updates_pull_codes_towards_their_latents_and_dead_codes_restart():
    torch.manual_seed(0)
    threshold = 0.9  # usage starts at 1 and decays by 0.99 a step, so unused codes die on the 11th step
    quantizer = VectorQuantizer(4, QuantizerSettings(codebook_size=16, codebook_dim=None, l2_normalize=False, ema=True,
                                                     ema_decay=0.5, dead_code_threshold=threshold))
    z = torch.randn(1, 64, 4) + 5.0  # far from the N(0,1) codebook, so one code takes every latent
    before = (quantizer.codebook - 5).norm(dim=1).min()
    restarted = 0
    for step in range(30):
        restarted += _train_step_and_check_restarts(quantizer, z, threshold)
        if step == 9:  # no code has died yet: only the EMA has moved the codebook
            assert restarted == 0 and (quantizer.codebook - 5).norm(dim=1).min() < before / 2
    assert restarted == 15  # every code but the one in use


def test_codebook_usage_and_perplexity_on_hand_made_codes():
    stats = CodebookUsage(codebook_size=8, images_per_batch=2)
    stats.update(np.array([[0, 0], [1, 1], [2, 2], [2, 2]]))  # batch 1 uses {0, 1}; batch 2 uses {2}
    result = stats.result()
    assert result["usage_per_256"] == pytest.approx((2 / 8 + 1 / 8) / 2)
    assert result["usage_split"] == pytest.approx(3 / 8) and result["dead_codes"] == 5
    uniform = CodebookUsage(4)
    uniform.update(np.array([[0, 1, 2, 3]]))
    assert uniform.result()["perplexity"] == pytest.approx(4.0)


def test_logit_laplace_nll_matches_the_formula():
    x, mu, log_b = torch.tensor([0.3]), torch.tensor([0.1]), torch.tensor([-0.5])
    y = (1 - 2 * LOGIT_LAPLACE_EPS) * 0.3 + LOGIT_LAPLACE_EPS
    b = math.exp(-0.5)
    expected = math.log(2 * b * y * (1 - y)) + abs(math.log(y / (1 - y)) - 0.1) / b
    assert logit_laplace_nll(x, mu, log_b).item() == pytest.approx(expected, rel=1e-6)
    # It is a density: integrating exp(-NLL) over x in [0, 1] gives ~1 (Jacobian of the eps map included).
    grid = torch.linspace(0, 1, 200001)[1:-1]
    density = torch.exp(-torch.stack([logit_laplace_nll(v[None], mu, log_b) for v in grid[::1000]]))
    assert density.sum().item() * (1000 / 200000) * (1 - 2 * LOGIT_LAPLACE_EPS) == pytest.approx(1.0, abs=0.05)


def test_lpips_wiring_is_zero_for_identical_images_and_loads_a_local_vgg(tmp_path):
    import torchvision

    weights = tmp_path / "vgg16.pth"
    torch.save(torchvision.models.vgg16().state_dict(), weights)  # a stand-in checkpoint, same layout
    perceptual = Perceptual(weights)
    x = torch.rand(2, 3, 32, 32)
    assert perceptual(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert perceptual(x, torch.rand(2, 3, 32, 32)).item() > 0


def test_missing_vgg_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torchvision cache
    with pytest.raises(PerceptualWeightsMissing, match="perceptual_weight=0"):
        find_vgg16_weights(str(tmp_path / "absent.pth"))


def test_r1_is_positive_and_differentiable():
    torch.manual_seed(0)
    discriminator = StyleGANDiscriminator(32, base_channels=16)
    penalty = r1_penalty(discriminator, torch.rand(4, 3, 32, 32))
    assert penalty.item() > 0
    penalty.backward()
    assert discriminator.stem.weight.grad.abs().sum() > 0


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / F.mse_loss(a.clamp(0, 1), b)))


def test_tiny_tokenizer_overfits_sixteen_images(tmp_path):
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 16), torch.linspace(0, 1, 16), indexing="ij")
    images = torch.stack([torch.stack([(xx * (i % 4 + 1)) % 1, (yy * (i // 4 + 1)) % 1, (xx + yy) / 2])
                          for i in range(16)])
    model = ViTVQGAN(TokenizerSettings(image_size=16, patch_size=4, codebook_size=64, codebook_dim=8,
                                       codebook_init="data", dead_code_threshold=0.05))
    with torch.no_grad():
        start = _psnr(model(images)[0], images)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.99), weight_decay=1e-4)
    for _ in range(300):
        recon, raw, q = model(images)
        loss = F.mse_loss(recon, images) + 0.1 * logit_laplace_nll(images, raw["mu"], raw["log_b"]) + sum(q.losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        end = _psnr(model.decode(model.encode(images)), images)
    assert end > start + 8 and end > 19, (start, end)

    save_tokenizer(model, tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == sorted([SETTINGS_FILE, WEIGHTS_FILE])
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.settings == model.settings
    assert torch.equal(loaded.encode(images), model.encode(images))
    assert torch.allclose(loaded.decode(model.encode(images)), model.decode(model.encode(images)))


def test_an_older_settings_file_with_extra_still_loads(tmp_path):
    torch.manual_seed(0)
    model = ViTVQGAN(TokenizerSettings(image_size=16, patch_size=4, codebook_size=16, codebook_dim=4))
    save_tokenizer(model, tmp_path)
    settings = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert "extra" not in settings and settings["codebook_size"] == 16
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({**settings, "extra": {}}))  # as older versions wrote it
    loaded = load_tokenizer(tmp_path)
    assert loaded.settings == model.settings
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(loaded.encode(images), model.eval().encode(images))


def test_the_config_builds_the_tokenizer_settings_by_field_name():
    from pipeline.config import build_config

    cfg = build_config({}, ["tokenizer.codebook_dim=null", "tokenizer.ema=true", "tokenizer.encoder=mini"]).tokenizer
    settings = cfg.model_settings()
    assert type(settings) is TokenizerSettings
    assert settings.codebook_dim is None and settings.ema and settings.encoder == "mini"
    assert settings.model_dump() == {**{name: getattr(cfg, name) for name in TokenizerSettings.model_fields},
                                     "channels": 3}
    assert settings.grid == cfg.image_size // cfg.patch_size
    # channels: auto takes what the data is (the ingest manifest's record); 1 or 3 in the config win over it.
    assert cfg.channels == "auto" and cfg.model_settings(data_channels=1).channels == 1
    assert cfg.model_copy(update={"channels": 3}).model_settings(data_channels=1).channels == 3


@pytest.mark.parametrize("overrides", [
    ["tokenizer.codebook_dim=4"], ["tokenizer.codebook_dim=8"], ["tokenizer.codebook_dim=32"],
    ["tokenizer.codebook_dim=128", "tokenizer.encoder=mini"], ["tokenizer.codebook_dim=32", "tokenizer.l2_normalize=false"],
    ["tokenizer.codebook_dim=null", "tokenizer.l2_normalize=false"], ["tokenizer.ema=true"],
    ["tokenizer.output_head=linear", "tokenizer.logit_laplace_weight=0"]])
def test_codebook_ablations_come_from_config_alone(overrides):
    from pipeline.config import build_config
    from pipeline.train.tokenizer_objective import TokenizerObjective

    cfg = build_config({}, ["tokenizer.perceptual_weight=0", "tokenizer.image_size=16",
                            "tokenizer.disc_base_channels=8", *overrides]).tokenizer
    objective = TokenizerObjective(cfg)
    lookup = objective.model.quantizer.codebook.shape[1]
    assert lookup == (cfg.codebook_dim or 64)
    images = torch.rand(4, 3, 16, 16)
    loss, terms, reconstruction, _ = objective.generator_losses(objective.model, objective.discriminator, images, 0)
    loss.backward()
    assert torch.isfinite(loss) and reconstruction.shape == images.shape and "adversarial" in terms
    d_loss, d_terms = objective.discriminator_losses(objective.discriminator, images, reconstruction, 0)
    assert torch.isfinite(d_loss) and "r1" in d_terms


def test_inconsistent_tokenizer_settings_are_named():
    from pipeline.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="tokenizer.logit_laplace_weight=0"):
        build_config({}, ["tokenizer.output_head=linear"])
    with pytest.raises(ConfigError, match="patch_size"):
        build_config({}, ["tokenizer.image_size=30"])


# ---- the fast paths against the plain maths they replace ------------------------------------------


def _plain_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """The attention as the model computed it before (one permute of the qkv output), with the softmax
    written out instead of the fused kernel."""
    batch, tokens, dim = x.shape
    q, k, v = attn.qkv(x).view(batch, tokens, 3, attn.heads, dim // attn.heads).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // attn.heads), dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


def _previous_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """The attention exactly as the model computed it before (permute, fused kernel)."""
    batch, tokens, dim = x.shape
    q, k, v = attn.qkv(x).view(batch, tokens, 3, attn.heads, dim // attn.heads).permute(2, 0, 3, 1, 4)
    return attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim))


def _previous_blocks(blocks, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = x + _previous_attention(block.attn, block.norm1(x))
        x = x + block.mlp(block.norm2(x))
    return x


def _previous_encoder(encoder, images: torch.Tensor) -> torch.Tensor:
    x = encoder.patch(images).flatten(2).transpose(1, 2) + encoder.pos  # the strided stream it used to carry
    return encoder.head(encoder.norm(_previous_blocks(encoder.blocks, x)))


def _previous_decoder(decoder, tokens: torch.Tensor) -> torch.Tensor:
    patches = decoder.head(decoder.norm(_previous_blocks(decoder.blocks, tokens + decoder.pos)))
    batch, p, g, c = patches.shape[0], decoder.patch_size, decoder.grid, decoder.out_channels
    return patches.view(batch, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(batch, c, g * p, g * p)


def _previous_codes(model: ViTVQGAN, images: torch.Tensor) -> torch.Tensor:
    quantizer = model.quantizer
    latent = F.normalize(quantizer.proj_in(_previous_encoder(model.encoder, images * 2 - 1)), dim=-1)
    codes = nearest_code(latent.reshape(-1, latent.shape[-1]), F.normalize(quantizer.codebook, dim=-1), True)
    return codes.view(images.shape[0], model.settings.grid, model.settings.grid)


@pytest.mark.parametrize("shape", [(2, 16, 64, 4), (3, 64, 128, 8), (1, 7, 96, 2)])
def test_attention_equals_the_plain_maths_with_its_gradients(shape):
    from pipeline.models.vit import Attention

    batch, tokens, dim, heads = shape
    torch.manual_seed(0)
    attn = Attention(dim, heads).double()
    x = torch.randn(batch, tokens, dim, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(batch, tokens, dim, dtype=torch.float64)
    ours, plain = attn(x), _plain_attention(attn, x)
    assert torch.allclose(ours, plain, atol=1e-12)
    got = torch.autograd.grad(ours, [x, *attn.parameters()], grad)
    want = torch.autograd.grad(plain, [x, *attn.parameters()], grad)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-11)
    # In float32 it is the very computation the permuted layout did.
    attn, x = attn.float(), x.detach().float()
    assert torch.equal(attn(x), _previous_attention(attn, x))


def test_the_encoder_carries_a_contiguous_residual_stream():
    from pipeline.models.vit import ViTEncoder
    from pipeline.models.settings import VIT_SIZES

    encoder = ViTEncoder(VIT_SIZES["tiny"], image_size=16, patch_size=4)
    seen = []
    for block in encoder.blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    encoder(torch.rand(2, 3, 16, 16))
    assert seen == [True] * len(encoder.blocks)


@pytest.mark.parametrize("size,image,patch,batch", [("mini", 32, 4, 8), ("tiny", 48, 8, 5)])
def test_encode_gives_the_codes_of_the_previous_path(size, image, patch, batch):
    torch.manual_seed(0)
    model = ViTVQGAN(TokenizerSettings(image_size=image, patch_size=patch, encoder=size, decoder=size,
                                       codebook_size=512, codebook_dim=32)).eval()
    images = torch.rand(batch, 3, image, image)
    with torch.no_grad():
        assert torch.allclose(model.encoder(images * 2 - 1), _previous_encoder(model.encoder, images * 2 - 1),
                              atol=1e-6)
        codes = model.encode(images)
        assert torch.equal(codes, _previous_codes(model, images))
    assert len(codes.unique()) > 8  # a real test of the lookup, not one code everywhere


def test_training_step_matches_the_previous_path_in_outputs_and_gradients():
    torch.manual_seed(0)
    model = ViTVQGAN(TokenizerSettings(image_size=32, patch_size=4, encoder="mini", decoder="mini",
                                       codebook_size=256, codebook_dim=16)).train()
    images = torch.rand(4, 3, 32, 32)

    def loss_of(reconstruction, raw, losses):
        return (F.mse_loss(reconstruction, images) + logit_laplace_nll(images, raw["mu"], raw["log_b"])
                + sum(losses.values()))

    reconstruction, raw, quantized = model(images)
    ours = loss_of(reconstruction, raw, quantized.losses)
    got = torch.autograd.grad(ours, list(model.parameters()))

    q = model.quantizer(_previous_encoder(model.encoder, images * 2 - 1))
    previous_raw = _previous_decoder(model.decoder, model.bridge(q.quantized))
    assert torch.equal(q.codes, quantized.codes)
    previous = loss_of(model._pixels(previous_raw), model._split(previous_raw), q.losses)
    assert torch.allclose(ours, previous, rtol=1e-6)
    want = torch.autograd.grad(previous, list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name


def test_batch_stats_from_shared_counts_equal_the_plain_formulas():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(8, QuantizerSettings(codebook_size=64, codebook_dim=4, dead_code_threshold=0.5))
    quantizer.usage[:10] = 0.1  # ten codes below the threshold
    codes = torch.randint(0, 40, (300,))
    stats = quantizer._batch_stats(torch.bincount(codes, minlength=64).float())
    counts = torch.bincount(codes, minlength=64).float()
    probs = counts[counts > 0] / counts.sum()
    assert stats["usage_batch"] == pytest.approx(float((counts > 0).float().mean()))
    assert stats["perplexity_batch"] == pytest.approx(float(torch.exp(-(probs * probs.log()).sum())), rel=1e-6)
    assert stats["dead_codes"] == 10
