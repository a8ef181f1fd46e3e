"""Residual quantization and the RQ-Transformer without Ray: RQ at depth 1 is the vector quantizer, the error falls
with depth, straight-through gradients, dead-code restarts, soft labels, causality, both KV caches, sampling and
guidance, the paper's sizes."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.models.quantize import VectorQuantizer
from pipeline.models.residual_quantize import ResidualQuantizer, make_quantizer
from pipeline.models.rq_transformer import (RQSamplingSettings, RQTransformer, code_stack_loss, load_rq_transformer,
                                            sample_code_stacks, save_rq_transformer)
from pipeline.models.settings import (RQ_SIZES, QuantizerSettings, RQSettings, RQTransformerOptions,
                                      RQTransformerSettings, TokenizerSettings, later_fields_at_default)
from pipeline.models.tokenizer import ViTVQGAN

K, GRID, DEPTH = 32, (4, 4), 3
LENGTH = GRID[0] * GRID[1]


# ---- the residual quantizer -----------------------------------------------------------------------

@pytest.mark.parametrize("ema,threshold,init", [(False, 0.0, "normal"), (True, 0.995, "data")])
def test_depth_one_is_the_vector_quantizer_on_the_same_codebook(ema, threshold, init):
    settings = QuantizerSettings(codebook_size=32, codebook_dim=8, l2_normalize=False, ema=ema,
                                 dead_code_threshold=threshold, codebook_init=init)
    torch.manual_seed(0)
    vq, rq = VectorQuantizer(16, settings).train(), ResidualQuantizer(16, settings, depth=1).train()
    rq.load_state_dict(vq.state_dict())  # the same keys and shapes: the same codebook, buffers and projections
    z = torch.randn(4, 20, 16) * 2 + 1
    restarted = 0
    for step in range(3):
        outputs, grads = [], []
        for quantizer in (vq, rq):
            latent = z.clone().requires_grad_()
            torch.manual_seed(step)  # the same draws for data init and restarts
            out = quantizer(latent)
            (out.quantized.square().sum() + sum(out.losses.values())).backward()
            outputs.append(out)
            grads.append([latent.grad] + [p.grad for p in quantizer.parameters() if p.requires_grad])
        want, got = outputs
        assert torch.equal(got.codes[..., 0], want.codes)
        assert torch.allclose(got.quantized, want.quantized, atol=1e-6)
        assert set(got.losses) == set(want.losses) == ({"commitment"} if ema else {"commitment", "codebook"})
        for name in want.losses:
            assert torch.allclose(got.losses[name], want.losses[name], rtol=1e-6)
        for a, b in zip(*grads):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
        for (name, a), b in zip(vq.state_dict().items(), rq.state_dict().values()):
            assert torch.allclose(a.float(), b.float(), atol=1e-6), name  # EMA, usage and restarts alike
        for name in ("usage_batch", "perplexity_batch", "dead_codes", "restarted_codes"):
            assert got.stats[name] == pytest.approx(want.stats[name], rel=1e-6)
        restarted += want.stats["restarted_codes"]
        vq.zero_grad()
        rq.zero_grad()
    assert restarted > 0 if threshold else restarted == 0


def _trained_rq(shared: bool, steps: int) -> tuple[ResidualQuantizer, torch.Tensor]:
    torch.manual_seed(0)
    settings = QuantizerSettings(codebook_size=64, codebook_dim=None, l2_normalize=False, ema=True,
                                 dead_code_threshold=1.0, codebook_init="data")  # the paper's EMA and restarts
    quantizer = ResidualQuantizer(8, settings, depth=4, shared_codebook=shared).train()
    z = torch.randn(1, 512, 8)
    for _ in range(steps):
        quantizer(z)
    return quantizer.eval(), z


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("steps", [1, 20])  # the data-seeded codebook, and after EMA steps and restarts
def test_the_quantization_error_falls_with_depth_on_fixed_data(shared, steps):
    quantizer, z = _trained_rq(shared, steps)
    codes = quantizer.encode(z)
    assert codes.shape == (1, 512, 4)
    errors = [F.mse_loss(quantizer.embed(codes[..., :d + 1]), z).item() for d in range(4)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 2
    stats = quantizer(z).stats  # eval mode: no updates
    assert [stats[f"quantization_error_depth{d}"] for d in range(4)] == pytest.approx(errors, rel=1e-5)
    # Each depth's code is the one nearest to what the depths before it left (brute force).
    residual = z[0]
    for d in range(4):
        book = quantizer.codebook if shared else quantizer.codebook[d * 64:(d + 1) * 64]
        assert torch.equal(codes[0, :, d], torch.cdist(residual, book).argmin(1))
        residual = residual - book[codes[0, :, d]]


def test_the_straight_through_gradient_reaches_the_latent_unchanged():
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(16, QuantizerSettings(codebook_size=32, codebook_dim=8), depth=3)
    z = torch.randn(2, 10, 16, requires_grad=True)
    out = quantizer(z)
    weights = torch.randn_like(out.quantized)
    (out.quantized * weights).sum().backward()
    # The quantizer passes the gradient as if it were the identity between proj_in (and the l2 norm) and proj_out.
    plain = z.detach().clone().requires_grad_()
    (quantizer.proj_out(F.normalize(quantizer.proj_in(plain), dim=-1)) * weights).sum().backward()
    assert z.grad.abs().sum() > 0 and torch.allclose(z.grad, plain.grad, atol=1e-6)
    # l2_normalize normalises the latent only: the codes of z and of 5 z are the same.
    assert torch.equal(quantizer.encode(z), quantizer.encode(5 * z))
    # Commitment: beta x the mean over depths of ||z - sum of the codes up to d||^2.
    latent = F.normalize(quantizer.proj_in(z), dim=-1).detach()
    partial = quantizer.codebook[out.codes].cumsum(-2).detach()
    expected = 0.25 * torch.stack([F.mse_loss(latent, partial[..., d, :]) for d in range(3)]).mean()
    assert torch.allclose(out.losses["commitment"], expected, rtol=1e-5)
    # Codebook loss: the mean over depths of ||r_d - e_{k_d}||^2, each code pulled towards the residual it codes.
    chosen = quantizer.codebook[out.codes].detach()
    residuals = torch.cat([latent[..., None, :], latent[..., None, :] - partial[..., :-1, :]], -2)
    expected = torch.stack([F.mse_loss(chosen[..., d, :], residuals[..., d, :]) for d in range(3)]).mean()
    assert torch.allclose(out.losses["codebook"], expected, rtol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_data_init_seeds_each_depth_from_the_residuals_the_depths_before_leave(shared):
    torch.manual_seed(0)
    settings = QuantizerSettings(codebook_size=16, codebook_dim=None, l2_normalize=False, codebook_init="data")
    quantizer = ResidualQuantizer(4, settings, depth=2, shared_codebook=shared).train()
    z = torch.randn(1, 200, 4)
    quantizer(z)  # seeds the table; without EMA or an optimizer step nothing else moves it
    first, second = (quantizer.codebook[:8], quantizer.codebook[8:]) if shared else \
        (quantizer.codebook[:16], quantizer.codebook[16:])
    residuals = z[0] - first[torch.cdist(z[0], first).argmin(1)]  # what the first rows leave of the latents
    assert torch.cdist(first, z[0]).min(1).values.max() < 1e-2  # each a latent (plus a little noise)
    assert torch.cdist(second, residuals).min(1).values.max() < 1e-2  # each such a residual
    assert second.norm(dim=1).mean() < first.norm(dim=1).mean()  # finer codes for the finer depth


@pytest.mark.parametrize("architecture", ["vit", "cnn"])
def test_rq_trains_inside_the_vit_and_the_cnn_tokenizer(architecture):
    torch.manual_seed(0)
    settings = TokenizerSettings(image_size=16, patch_size=4, codebook_size=32, codebook_dim=8,
                                 architecture=architecture, cnn_channels=8, quantizer="rq", rq_depth=2)
    model = ViTVQGAN(settings)
    assert isinstance(model.quantizer, ResidualQuantizer) and settings.code_shape == (4, 4, 2)
    images = torch.rand(2, 3, 16, 16)
    reconstruction, _, quantized = model(images)
    assert quantized.codes.shape == (2, 16, 2)
    (F.mse_loss(reconstruction, images) + sum(quantized.losses.values())).backward()
    first = next(p for p in model.encoder.parameters() if p.requires_grad)
    assert first.grad is not None and first.grad.abs().sum() > 0
    # Encoding gives (B, h, w, D) stacks; decoding them, or the same flattened as a Parquet row holds them,
    # gives the forward pass's reconstruction.
    model.eval()
    with torch.no_grad():
        reconstruction = model(images)[0]
    codes = model.encode(images)
    assert codes.shape == (2, 4, 4, 2)
    assert torch.allclose(model.decode(codes), reconstruction.clamp(0, 1), atol=1e-5)
    assert torch.equal(model.decode(codes.flatten(1)), model.decode(codes))
    # The same settings with quantizer vq: the vector quantizer and plain (B, h, w) codes.
    vq = ViTVQGAN(settings.model_copy(update={"quantizer": "vq"}))
    assert vq.encode(images).shape == (2, 4, 4) and not isinstance(vq.quantizer, ResidualQuantizer)


@pytest.mark.parametrize("shared", [True, False])
def test_dead_codes_restart_at_residuals_of_their_depth(shared):
    torch.manual_seed(0)
    threshold = 1.0
    quantizer = ResidualQuantizer(4, QuantizerSettings(codebook_size=16, codebook_dim=None, l2_normalize=False,
                                                       ema=True, dead_code_threshold=threshold),
                                  depth=2, shared_codebook=shared).train()
    z = torch.randn(1, 64, 4) + 5.0  # far from the N(0, 1) codebook: few codes take all the latents
    codes, residuals = quantizer._search(z[0], quantizer.codebook)
    rows = codes + torch.tensor([0, 0 if shared else 16])
    counts = torch.bincount(rows.flatten(), minlength=quantizer.codebook.shape[0]).float()
    usage = quantizer.usage.clone().mul_(0.99).add_(counts, alpha=0.01)
    dead = usage < threshold
    out = quantizer(z)
    assert 0 < dead.sum() < len(dead) and out.stats["restarted_codes"] == int(dead.sum())
    assert out.stats["dead_codes"] == 0  # none left dead
    for d in range(2):
        in_book = torch.zeros_like(dead)
        in_book[(0 if shared else d * 16):(16 if shared else (d + 1) * 16)] = True
        pool = residuals.flatten(0, 1) if shared else residuals[d]  # any depth's residuals, or its own depth's
        restarted = quantizer.codebook.detach()[dead & in_book]
        assert (restarted[:, None] == pool[None]).all(-1).any(1).all()
    assert (quantizer.usage[dead] == 2 * threshold).all() and (quantizer.ema_count[dead] == 1).all()
    assert torch.equal(quantizer.ema_sum[dead], quantizer.codebook.detach()[dead])
    assert torch.equal(quantizer.usage[~dead], usage[~dead])  # live codes keep their usage


def test_soft_labels_are_the_papers_and_reduce_to_cross_entropy_as_the_temperature_falls():
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(8, QuantizerSettings(codebook_size=16, codebook_dim=None, l2_normalize=False),
                                  depth=3)
    z = torch.randn(2, 6, 8)
    logits = torch.randn(2, 6, 3, 16) * 3
    # Near zero temperature the labels are one-hot at the nearest codes, and the loss is plain cross-entropy.
    targets, codes = quantizer.soft_codes(z, 1e-6, stochastic=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(codes, quantizer.encode(z)) and torch.equal(targets, F.one_hot(codes, 16).float())
    ce = F.cross_entropy(logits.flatten(0, 2), codes.flatten())
    soft, _ = code_stack_loss(logits, codes, targets)
    hard, per_depth = code_stack_loss(logits, codes)
    assert torch.allclose(soft, ce) and torch.allclose(hard, ce)
    assert torch.allclose(per_depth, torch.stack([F.cross_entropy(logits[:, :, d].flatten(0, 1),
                                                                  codes[:, :, d].flatten()) for d in range(3)]))
    # At T = 0.5: depth d's labels are softmax(-||r_d - e_k||^2 / T) of the residual the codes before it left.
    targets, codes = quantizer.soft_codes(z, 0.5, stochastic=False)
    residual = z.flatten(0, 1)
    for d in range(3):
        expected = (-torch.cdist(residual, quantizer.codebook).square() / 0.5).softmax(-1)
        assert torch.allclose(targets[:, :, d].flatten(0, 1), expected, atol=1e-5)
        residual = residual - quantizer.codebook[codes[:, :, d].flatten()]
    soft, _ = code_stack_loss(logits, codes, targets)
    assert torch.allclose(soft, -(targets * logits.log_softmax(-1)).sum(-1).mean())
    assert soft > F.cross_entropy(logits.flatten(0, 2), codes.flatten()) - 10  # finite, a real number
    # Stochastic codes at a high temperature are not always the nearest ones.
    _, sampled = quantizer.soft_codes(z, 100.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(sampled, quantizer.encode(z))


def test_the_rq_settings_are_added_later_fields():
    # At their defaults they are left out of hashes and config.json, so existing stages and models keep theirs.
    assert later_fields_at_default(RQSettings()) == ["quantizer", "rq_depth", "rq_shared_codebook"]
    assert later_fields_at_default(RQSettings(quantizer="rq")) == []  # an RQ tokenizer records its depth
    assert set(later_fields_at_default(RQTransformerOptions())) == set(RQTransformerOptions.model_fields)
    assert isinstance(make_quantizer(8, QuantizerSettings(), RQSettings()), VectorQuantizer)
    assert not isinstance(make_quantizer(8, QuantizerSettings(), RQSettings()), ResidualQuantizer)


# ---- the RQ-Transformer ---------------------------------------------------------------------------

def _model(**kwargs) -> RQTransformer:
    torch.manual_seed(0)
    settings = RQTransformerSettings(**{"size": "pico", "vocab_size": K, "grid": GRID, "code_depth": DEPTH,
                                        "num_classes": 5, "dropout": 0.0, **kwargs})
    model = RQTransformer(settings).eval()
    with torch.no_grad():
        model.head.weight.mul_(20)  # well-separated logits, so greedy choices are not near-ties
    return model


def _logits_through_the_caches(model: RQTransformer, codes: torch.Tensor, labels) -> torch.Tensor:
    """Teacher-forced decoding, position by position and depth by depth, through both KV caches."""
    caches = model.new_caches(codes.shape[0])
    context, positions = model.prefill(labels, caches), []
    for t in range(codes.shape[1]):
        x, depths = context, []
        for d in range(codes.shape[2]):
            depths.append(model.depth_step(x, d, caches))
            embedded = model.embed_codes(codes[:, t, d:d + 1], d)[:, 0]
            x = embedded if d == 0 else x + embedded
        positions.append(torch.stack(depths, 1))
        if t + 1 < codes.shape[1]:
            context = model.spatial_step(codes[:, t], caches)
    return torch.stack(positions, 1)


@pytest.mark.parametrize("num_classes,shared", [(5, True), (0, True), (5, False)])
def test_kv_cache_decoding_equals_the_full_forward_pass(num_classes, shared):
    model = _model(num_classes=num_classes, shared_codebook=shared)
    codes = torch.randint(0, K, (3, LENGTH, DEPTH))
    labels = torch.tensor([0, 4, 2]) if num_classes else None
    full = model(codes, labels)
    assert full.shape == (3, LENGTH, DEPTH, K)
    assert torch.allclose(_logits_through_the_caches(model, codes, labels), full, atol=1e-4)


def test_logits_at_t_d_ignore_the_codes_from_t_d_on():
    model = _model()
    codes = torch.randint(0, K, (2, LENGTH, DEPTH))
    labels = torch.tensor([1, 3])
    base = model(codes, labels).flatten(1, 2)  # raster order, then depth
    for index in (0, 1, 2 * DEPTH + 2, 5 * DEPTH, LENGTH * DEPTH - 1):
        changed = codes.clone().flatten(1)
        changed[:, index:] = torch.randint(0, K, changed[:, index:].shape)
        changed[:, index] = (codes.flatten(1)[:, index] + 1) % K  # certainly different at (t, d)
        logits = model(changed.view_as(codes), labels).flatten(1, 2)
        assert torch.allclose(logits[:, :index + 1], base[:, :index + 1], atol=1e-5)
        if index + 1 < LENGTH * DEPTH:
            assert not torch.allclose(logits[:, index + 1:], base[:, index + 1:])


def test_greedy_sampling_through_the_caches_follows_the_full_forward_pass():
    model = _model(label_dropout=0.1)
    labels = torch.tensor([1, 3, 4])
    generator = torch.Generator().manual_seed(0)
    codes = sample_code_stacks(model, labels, RQSamplingSettings(top_k=1), generator)
    assert codes.shape == (3, LENGTH, DEPTH)
    assert torch.equal(codes, model(codes, labels).argmax(-1))
    # Settings per depth: greedy at depths 0 and 2, sampled at a high temperature at depth 1.
    codes = sample_code_stacks(model, labels, RQSamplingSettings(temperature=(1.0, 5.0, 1.0), top_k=(1, 0, 1)),
                               generator)
    greedy = model(codes, labels).argmax(-1)
    assert torch.equal(codes[..., 0], greedy[..., 0]) and torch.equal(codes[..., 2], greedy[..., 2])
    assert not torch.equal(codes[..., 1], greedy[..., 1])
    # Guided: greedy on u + s (c - u), with c and u the full forward pass under the labels and the null class.
    codes = sample_code_stacks(model, labels, RQSamplingSettings(top_k=1, guidance_scale=3.0), generator)
    conditional, unconditional = model(codes, labels), model(codes, torch.full_like(labels, 5))
    assert torch.equal(codes, (unconditional + 3.0 * (conditional - unconditional)).argmax(-1))
    assert not torch.equal(codes, conditional.argmax(-1))  # guidance changed something


def test_guidance_scale_one_is_the_unguided_sampler():
    model = _model(label_dropout=0.1)
    labels = torch.tensor([0, 2, 2, 4])

    def sample(**settings):
        return sample_code_stacks(model, labels, RQSamplingSettings(**settings), torch.Generator().manual_seed(7))

    plain = sample(top_p=0.9)
    assert torch.equal(sample(top_p=0.9, guidance_scale=1.0), plain)
    assert not torch.equal(sample(top_p=0.9, guidance_scale=2.0), plain)
    assert plain.min() >= 0 and plain.max() < K
    unconditional = sample_code_stacks(model, None, RQSamplingSettings(), torch.Generator().manual_seed(7), batch=2)
    assert unconditional.shape == (2, LENGTH, DEPTH)
    with pytest.raises(ValueError, match="label_dropout"):
        sample_code_stacks(_model(), labels, RQSamplingSettings(guidance_scale=2.0), torch.Generator())
    with pytest.raises(ValueError, match="3 values"):
        sample_code_stacks(model, labels, RQSamplingSettings(top_k=(1, 1)), torch.Generator())


@pytest.mark.parametrize("name,parameters", [("480M", 480e6), ("821M", 821e6), ("1.4B", 1.4e9), ("3.8B", 3.8e9)])
def test_the_paper_sizes_have_the_papers_parameter_counts(name, parameters):
    settings = RQTransformerSettings(size=name, vocab_size=16384, grid=(8, 8), code_depth=4, num_classes=1000)
    with torch.device("meta"):  # counted without allocating
        model = RQTransformer(settings)
    assert len(model.spatial_blocks) == RQ_SIZES[name].spatial_layers
    assert len(model.depth_blocks) == RQ_SIZES[name].depth_layers
    # within 6%: our code embeddings are learned tables where the paper's come from the RQ-VAE through a linear map
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(parameters, rel=0.06)


def test_a_saved_model_reloads_with_the_same_logits(tmp_path):
    model = _model(shared_codebook=False, label_dropout=0.1)
    codes = torch.randint(0, K, (2, LENGTH, DEPTH))
    save_rq_transformer(model, tmp_path)
    loaded = load_rq_transformer(tmp_path)
    assert loaded.settings == model.settings
    assert torch.equal(loaded(codes, torch.tensor([1, 2])), model(codes, torch.tensor([1, 2])))


def test_a_tiny_model_learns_a_small_set_of_code_stacks():
    torch.manual_seed(0)
    model = RQTransformer(RQTransformerSettings(size="pico", vocab_size=K, grid=GRID, code_depth=DEPTH,
                                                num_classes=2, dropout=0.0))
    data = torch.randint(0, K, (2, LENGTH, DEPTH))  # one stack grid per class
    labels = torch.tensor([0, 1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss, _ = code_stack_loss(model(data, labels), data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    model.eval()
    sampled = sample_code_stacks(model, labels, RQSamplingSettings(top_k=1), torch.Generator().manual_seed(0))
    assert torch.equal(sampled, data)
