"""Evaluation maths without Ray: Fréchet distance, Inception Score, precision/recall, balanced subsets, the linear
probe, PSNR/SSIM, the sampler, the block-feature extractor."""
import numpy as np
import pytest
import torch

from pipeline.metrics.fid import GaussianStats, fid_from_stats, frechet_distance
from pipeline.metrics.image_quality import psnr, ssim
from pipeline.metrics.inception_score import inception_score
from pipeline.metrics.precision_recall import precision_recall
from pipeline.metrics.probe import linear_probe
from pipeline.metrics.subsets import balanced_indices
from pipeline.models.sampling import (SamplingSettings, balanced_labels, filter_logits, guided_logits,
                                      sample_tokens)
from pipeline.models.transformer import TransformerSettings, VIMTransformer


def test_fid_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(500, 16))
    stats = GaussianStats.of(features)
    assert abs(fid_from_stats(stats, stats)) < 1e-6


def test_fid_of_two_gaussians_is_the_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    var1, var2 = rng.uniform(0.5, 2, size=8), rng.uniform(0.5, 2, size=8)
    closed = ((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * np.sqrt(var1 * var2)).sum()
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(closed, rel=1e-9)


def test_frechet_distance_matches_pytorch_fid():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(300, 32)), rng.normal(0.3, 1.2, size=(300, 32)) @ rng.normal(size=(32, 32)) * 0.3
    sa, sb = GaussianStats.of(a), GaussianStats.of(b)
    ours = fid_from_stats(sa, sb)
    theirs = fid_score.calculate_frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert ours == pytest.approx(theirs, rel=1e-6)
    # Rank-deficient covariances (fewer samples than dimensions) take the offset path in both.
    small_a, small_b = GaussianStats.of(a[:10]), GaussianStats.of(b[:10])
    assert fid_from_stats(small_a, small_b) == pytest.approx(
        fid_score.calculate_frechet_distance(small_a.mu, small_a.sigma, small_b.mu, small_b.sigma), rel=1e-6)


def test_eigh_route_agrees_with_sqrtm():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(400, 64)), rng.normal(0.2, 1.1, size=(400, 64)) @ rng.normal(size=(64, 64)) * 0.2
    for rows in (400, 40):  # full rank, and fewer samples than dimensions
        sa, sb = GaussianStats.of(a[:rows]), GaussianStats.of(b[:rows])
        assert fid_from_stats(sa, sb, method="eigh") == pytest.approx(fid_from_stats(sa, sb), rel=1e-6)
    with pytest.raises(ValueError, match="unknown Frechet method"):
        fid_from_stats(sa, sb, method="svd")


def test_gaussian_stats_round_trip(tmp_path):
    stats = GaussianStats.of(np.random.default_rng(3).normal(size=(50, 4)))
    stats.save(tmp_path / "ref.npz")
    again = GaussianStats.load(tmp_path / "ref.npz")
    assert again.count == 50 and np.array_equal(again.sigma, stats.sigma)


def test_inception_score_bounds():
    uniform = np.full((1000, 10), 0.1)
    assert inception_score(uniform)[0] == pytest.approx(1.0)
    one_hot = np.eye(10)[np.arange(1000) % 10]
    # One split sees the exact uniform marginal; shuffled splits of 100 rows hold the classes unevenly.
    assert inception_score(one_hot, splits=1)[0] == pytest.approx(10.0, rel=1e-6)
    assert 1.0 < inception_score(np.random.default_rng(0).dirichlet(np.ones(10), 1000))[0] < 10.0


def _confident(labels: np.ndarray, num_classes: int, top: float = 0.999) -> np.ndarray:
    """Predictions putting `top` on the label and the rest evenly on the other classes."""
    probabilities = np.full((len(labels), num_classes), (1 - top) / (num_classes - 1))
    probabilities[np.arange(len(labels)), labels] = top
    return probabilities


def test_inception_score_ignores_row_order():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(10), 60)  # class-sorted, as the evaluation writes samples
    logits = 6.0 * np.eye(10)[labels] + rng.normal(size=(600, 10))
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probabilities[300:320] = probabilities[0]  # identical rows must be interchangeable too
    shuffled = probabilities[rng.permutation(600)]
    for splits in (1, 10, 7):
        (mean, std), (mean_shuffled, std_shuffled) = (inception_score(probabilities, splits),
                                                      inception_score(shuffled, splits))
        assert abs(mean - mean_shuffled) <= 1e-9 and abs(std - std_shuffled) <= 1e-9
    assert inception_score(probabilities, seed=1) != inception_score(probabilities, seed=0)


@pytest.mark.parametrize("num_classes", [1, 10])
def test_inception_score_of_equiprobable_confident_classes_is_their_number(num_classes):
    labels = np.repeat(np.arange(num_classes), 1000)  # class-sorted
    mean, _ = inception_score(_confident(labels, 10))
    assert mean == pytest.approx(num_classes, rel=0.02)


def test_inception_score_of_class_sorted_rows_is_not_one():
    # Consecutive splits of 10 classes x 50 would each hold one class and score 1. Splits of 50 shuffled
    # rows hold the classes unevenly, which keeps the score a little under 10.
    mean, _ = inception_score(_confident(np.repeat(np.arange(10), 50), 10))
    assert 9.0 < mean < 10.0


def _brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    from scipy.spatial.distance import cdist

    def radii(points: np.ndarray) -> np.ndarray:
        distances = cdist(points, points)
        np.fill_diagonal(distances, np.inf)
        return np.sort(distances, 1)[:, k - 1]

    precision = (cdist(fake, real) <= radii(real)[None]).any(1).mean()
    recall = (cdist(real, fake) <= radii(fake)[None]).any(1).mean()
    return float(precision), float(recall)


def test_precision_recall_of_a_set_with_itself_and_of_far_apart_sets():
    rng = np.random.default_rng(6)
    real = rng.normal(size=(300, 8))
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, rng.normal(size=(200, 8)) + 100.0) == (0.0, 0.0)


def test_precision_recall_matches_brute_force_on_a_partial_overlap():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(400, 6))
    fake = np.concatenate([real[:200], rng.normal(size=(200, 6)) + 50.0])  # half copied, half far away
    precision, recall = precision_recall(real, fake, k=3, batch=37)  # blocks that do not divide the rows
    assert precision == 0.5
    assert 0.0 < recall < 1.0
    assert (precision, recall) == _brute_force_precision_recall(real, fake, k=3)
    noisy = real[:250] + 0.3 * rng.normal(size=(250, 6))
    assert precision_recall(real, noisy, k=5, batch=64) == _brute_force_precision_recall(real, noisy, k=5)


def test_precision_recall_balls_include_their_boundary():
    # Integer points keep every distance exact: (4, 0) is exactly 2 from (2, 0), whose radius is 2 for k=1.
    real = np.array([[0, 0], [2, 0], [10, 0], [12, 0]])
    fake = np.array([[4, 0], [5, 0], [20, 0]])  # radii 1, 1 and 15
    assert precision_recall(real, fake, k=1) == (1 / 3, 0.5)  # recall: (10, 0) and (12, 0) lie within 15 of (20, 0)


def test_precision_recall_ignores_row_order():
    rng = np.random.default_rng(8)
    real, fake = rng.normal(size=(300, 5)), rng.normal(0.5, 1.2, size=(250, 5))
    expected = precision_recall(real, fake, batch=50)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0
    assert precision_recall(real[rng.permutation(300)], fake[rng.permutation(250)], batch=50) == expected


def test_precision_recall_rejects_bad_inputs():
    features = np.zeros((10, 4))
    with pytest.raises(ValueError, match="2-d"):
        precision_recall(np.zeros(10), features)
    with pytest.raises(ValueError, match="differ in width"):
        precision_recall(features, np.zeros((10, 5)))
    with pytest.raises(ValueError, match="more than k=3 rows"):
        precision_recall(features, np.zeros((3, 4)))


def _class_counts(labels: np.ndarray, indices: np.ndarray) -> dict[int, int]:
    classes, counts = np.unique(labels[indices], return_counts=True)
    return dict(zip(classes.tolist(), counts.tolist()))


def test_balanced_indices_hold_every_class_equally_and_are_seeded():
    labels = np.random.default_rng(9).integers(0, 7, 700)
    chosen = balanced_indices(labels, 70, seed=3)
    assert _class_counts(labels, chosen) == {label: 10 for label in range(7)}
    assert np.array_equal(chosen, np.unique(chosen))  # sorted and unique
    assert np.array_equal(balanced_indices(labels, 70, seed=3), chosen)
    assert not np.array_equal(balanced_indices(labels, 70, seed=4), chosen)
    # The per-class share is capped by the smallest class.
    smallest = min(_class_counts(labels, np.arange(700)).values())
    assert set(_class_counts(labels, balanced_indices(labels, 7000, seed=3)).values()) == {smallest}
    with pytest.raises(ValueError, match="6 rows cannot hold all 7 classes"):
        balanced_indices(labels, 6, seed=3)


def test_balanced_indices_honour_exclude_and_reach_every_class_of_sorted_labels():
    labels = np.repeat(np.arange(10), 30)  # a prefix of 50 rows would hold classes 0 and 1 only
    chosen = balanced_indices(labels, 50, seed=0)
    assert _class_counts(labels, chosen) == {label: 5 for label in range(10)}
    excluded = np.arange(0, 300, 2)
    rest = balanced_indices(labels, 200, seed=0, exclude=excluded)
    assert not np.isin(rest, excluded).any()
    assert _class_counts(labels, rest) == {label: 15 for label in range(10)}  # 15 of each class are left
    # Excluding a whole class leaves the remaining classes only.
    assert set(_class_counts(labels, balanced_indices(labels, 90, seed=0, exclude=np.arange(30)))) == \
        set(range(1, 10))


def test_probe_separates_separable_features_and_not_random_labels():
    rng = np.random.default_rng(4)
    centers = rng.normal(size=(5, 20)) * 4
    labels = rng.integers(0, 5, 1000)
    features = centers[labels] + rng.normal(size=(1000, 20))
    result = linear_probe(features[:800], labels[:800], features[800:], labels[800:], 5)
    assert result["top1"] > 0.95
    random_labels = rng.integers(0, 5, 1000)
    chance = linear_probe(rng.normal(size=(800, 20)), random_labels[:800], rng.normal(size=(200, 20)),
                          random_labels[800:], 5)
    assert chance["top1"] < 0.35  # chance is 0.2


def test_psnr_and_ssim():
    images = torch.rand(4, 3, 32, 32)
    assert torch.allclose(ssim(images, images), torch.ones(4), atol=1e-6)
    noisy = (images + 0.1 * torch.randn_like(images)).clamp(0, 1)
    assert (ssim(noisy, images) < 0.99).all()
    assert torch.allclose(psnr(images * 0 + 0.5, images * 0 + 0.6), torch.full((4,), 20.0), atol=1e-3)


def _model(label_dropout=0.1) -> VIMTransformer:
    torch.manual_seed(0)
    return VIMTransformer(TransformerSettings(size="pico", vocab_size=32, grid=(4, 4), num_classes=3,
                                              dropout=0.0, label_dropout=label_dropout)).eval()


def test_sampling_is_reproducible_and_class_balanced():
    model = _model()
    labels = balanced_labels(3, 4)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    settings = SamplingSettings(top_k=10, top_p=0.9)
    first = sample_tokens(model, labels, settings, torch.Generator().manual_seed(7))
    again = sample_tokens(model, labels, settings, torch.Generator().manual_seed(7))
    other = sample_tokens(model, labels, settings, torch.Generator().manual_seed(8))
    assert first.shape == (12, 16) and torch.equal(first, again) and not torch.equal(first, other)


def test_guidance_scale_one_is_the_plain_conditional_path():
    cond, uncond = torch.randn(2, 32), torch.randn(2, 32)
    assert torch.equal(guided_logits(cond, uncond, 1.0), cond)
    assert torch.allclose(guided_logits(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))
    model = _model()
    labels = torch.tensor([0, 2])
    plain = sample_tokens(model, labels, SamplingSettings(guidance_scale=1.0), torch.Generator().manual_seed(1))
    # The same path by hand: prefill + decode_step with the conditional labels only.
    generator = torch.Generator().manual_seed(1)
    cache = model.new_cache(2)
    logits = model.prefill(labels, cache)
    tokens = []
    for position in range(16):
        token = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
        tokens.append(token)
        if position < 15:
            logits = model.decode_step(token, cache)
    assert torch.equal(plain, torch.stack(tokens, 1))
    with pytest.raises(ValueError):
        sample_tokens(_model(label_dropout=0.0), labels, SamplingSettings(guidance_scale=2.0),
                      torch.Generator().manual_seed(1))


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, SamplingSettings(top_k=2))[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, SamplingSettings(top_p=0.7))[0])
    assert kept.tolist() == [True, True, False, False]  # 0.5 < 0.7, then 0.8 crosses it: kept


def test_block_features_extractor_loads_a_saved_model_and_pools_each_block(tmp_path):
    from pipeline.metrics.extractors import BlockFeatures
    from pipeline.models.transformer import save_transformer

    model = _model()
    save_transformer(model, tmp_path / "transformer")
    extractor = BlockFeatures(str(tmp_path / "transformer"), blocks=[1, 0], threads=1, use_gpu=False)
    assert extractor.device.type == "cpu"
    codes = torch.randint(0, 32, (5, 16), generator=torch.Generator().manual_seed(0))
    column = np.empty(5, dtype=object)  # Ray Data hands list columns over as object arrays
    column[:] = list(codes.numpy().astype(np.int16))
    out = extractor({"codes": column, "label": np.arange(5), "split": np.zeros(5, dtype=np.int64)})
    assert out["features"].shape == (5, 2, 64)  # pico: dim 64
    assert out["label"].tolist() == list(range(5)) and out["split"].tolist() == [0] * 5
    expected = model.pooled_block_features(codes, [1, 0]).numpy()
    np.testing.assert_allclose(out["features"], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(out["features"][:, 0], out["features"][:, 1])
