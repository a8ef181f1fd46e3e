"""Residual quantization across the stages' seams, without Ray: the Parquet contract's depth and every reader's
check of it, the config's rules, per-depth codebook figures, soft labels from stored stacks, and the one
loader and sampler the evaluate stage uses for either Transformer."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import ConfigError, build_config
from pipeline.data.codes import CodesError, CodesMeta, check_code_files, codes_matrix, codes_table
from pipeline.metrics.codebook import CodeStackUsage
from pipeline.metrics.extractors import sampling_settings
from pipeline.mlflow_models import decode_codes, encode_images
from pipeline.models.code_models import (code_model_settings, codes_per_image, load_code_model, position_blocks,
                                         sample_codes)
from pipeline.models.io import save_model
from pipeline.models.residual_quantize import ResidualQuantizer, StoredStackLabels
from pipeline.models.rq_transformer import RQSamplingSettings, RQTransformer
from pipeline.models.sampling import SamplingSettings
from pipeline.models.settings import QuantizerSettings, RQTransformerSettings, TokenizerSettings, TransformerSettings
from pipeline.models.tokenizer import ViTVQGAN
from pipeline.models.transformer import VIMTransformer


def _stacks_file(tmp_path, depth: int, name: str = "codes.parquet") -> str:
    meta = CodesMeta(grid=(4, 4), codebook_size=64, tokenizer_sha256="ab", depth=depth)
    codes = np.random.default_rng(0).integers(0, 64, (5, 4, 4, depth))
    path = str(tmp_path / name)
    pq.write_table(codes_table([f"k{i}" for i in range(5)], [0] * 5, [0] * 5, codes, meta), path)
    return path


def test_the_parquet_readers_refuse_codes_of_another_depth(tmp_path):
    stacks = _stacks_file(tmp_path, depth=4)
    check_code_files([stacks], grid=(4, 4), depth=4, codebook_size=64)  # what was written reads back
    table = pq.read_table(stacks)
    assert codes_matrix(table, CodesMeta.from_schema(table.schema)).shape == (5, 64)
    with pytest.raises(CodesError, match=r"codes\.parquet: codes of another shape \(depth 4 where 1 was expected\)"):
        check_code_files([stacks], grid=(4, 4), depth=1, codebook_size=64)
    with pytest.raises(CodesError, match="depth 4 where 2 was expected"):
        codes_matrix(table, CodesMeta(grid=(4, 4), codebook_size=64, tokenizer_sha256="ab", depth=2))
    # A file whose metadata claims a depth its rows do not have.
    lying = table.replace_schema_metadata({b"vim.codes": table.schema.metadata[b"vim.codes"].replace(
        b'"depth": 4', b'"depth": 2')})
    pq.write_table(lying, tmp_path / "lying.parquet")
    with pytest.raises(CodesError, match=r"not 32 int16 codes per row \(grid \(4, 4\) x depth 2\)"):
        check_code_files([str(tmp_path / "lying.parquet")], grid=(4, 4), depth=2, codebook_size=64)
    pq.write_table(pa.table({"codes": [[1, 2]]}), tmp_path / "foreign.parquet")
    with pytest.raises(CodesError, match="foreign.parquet: .*no 'vim.codes' schema metadata"):
        check_code_files([str(tmp_path / "foreign.parquet")], grid=(4, 4), depth=1, codebook_size=64)
    # Writing checks the row length against the depth too.
    with pytest.raises(CodesError, match=r"16 codes per image, expected 32 \(grid \(4, 4\) x depth 2\)"):
        codes_table(["k"], [0], [0], np.zeros((1, 4, 4)), CodesMeta((4, 4), 64, "ab", depth=2))


def test_the_config_pairs_the_rq_tokenizer_with_the_rq_transformer():
    rq = ["tokenizer.quantizer=rq", "transformer.kind=rq"]
    cfg = build_config({}, rq + ["tokenizer.rq_depth=3", "evaluate.top_k=[0,8,16]"])
    settings = cfg.transformer.model_settings(512, (8, 8), 10, code_depth=3, shared_codebook=False)
    assert isinstance(settings, RQTransformerSettings) and (settings.size, settings.code_depth) == ("pico", 3)
    assert not settings.shared_codebook and settings.dropout == cfg.transformer.dropout
    assert isinstance(build_config({}).transformer.model_settings(512, (8, 8), 10), TransformerSettings)
    refused = {"transformer.kind=rq": "needs tokenizer.quantizer=rq",
               "tokenizer.quantizer=rq": "set transformer.kind=rq",
               "evaluate.temperature=[1.0,0.5]": "one value per depth of an RQ-Transformer"}
    for override, message in refused.items():
        with pytest.raises(ConfigError, match=message):
            build_config({}, [override])
    for overrides, message in ((rq + ["evaluate.temperature=[1.0,0.5]"], "4 of them"),
                               (rq + ["transformer.parallelism=fsdp"], "FSDP and TPU hosts run the VIM"),
                               (rq + ["evaluate.top_p=[1.0,1.0,1.5,1.0]"], "1.5 is out of range")):
        with pytest.raises(ConfigError, match=message):
            build_config({}, overrides)


def test_per_depth_codebook_figures_match_counts_known_by_hand():
    # Two images, two positions, depth 2; codebook of 4. Depth 0 uses codes {0, 1}, depth 1 uses {1, 3}.
    codes = np.array([[[0, 1], [1, 3]], [[0, 3], [0, 1]]])
    shared = CodeStackUsage(4, depth=2, shared=True, images_per_batch=2)
    shared.update(codes)
    figures = shared.result()
    assert figures["usage_split"] == 3 / 4 and figures["dead_codes"] == 1  # {0, 1, 3} of 4 in one table
    assert figures["usage_split_depth0"] == 2 / 4 and figures["usage_split_depth1"] == 2 / 4
    assert figures["perplexity_depth0"] == pytest.approx(np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25))))
    separate = CodeStackUsage(4, depth=2, shared=False, images_per_batch=2)
    separate.update(codes)
    assert separate.result()["usage_split"] == 4 / 8  # two books of 4: codes 0, 1 of the first, 1, 3 of the second
    # Counts gathered elsewhere (pretokenize's pieces) give the same whole-split figures as the codes did.
    for is_shared, usage in ((True, shared), (False, separate)):
        counted = CodeStackUsage(4, depth=2, shared=is_shared)
        counted.add_counts(np.stack([np.bincount(codes[..., d].ravel(), minlength=4) for d in range(2)]))
        split_figures = {k: v for k, v in usage.result().items() if "per_256" not in k}
        assert {k: v for k, v in counted.result().items() if "per_256" not in k} == split_figures
    plain = CodeStackUsage(4)
    plain.update(codes[..., 0])
    assert set(plain.result()) == {"usage_per_256", "usage_split", "perplexity", "dead_codes"}


def test_soft_labels_from_stored_stacks_follow_the_stored_residuals():
    torch.manual_seed(0)
    table = torch.randn(16, 3)
    labeler = StoredStackLabels(table, codebook_size=16, depth=3, shared=True)
    stacks = torch.randint(0, 16, (2, 5, 3))
    targets, codes = labeler(stacks, temperature=0.5, stochastic=False)
    assert torch.equal(codes, stacks) and targets.shape == (2, 5, 3, 16)
    assert torch.allclose(targets.sum(-1), torch.ones(2, 5, 3))
    # Depth d's target is the softmax of -||r_d - e||^2 / T at r_d = the sum of the stored codes from d on.
    residual = table[stacks[..., 1]] + table[stacks[..., 2]]
    want = (-(residual[..., None, :] - table).pow(2).sum(-1) / 0.5).softmax(-1)
    assert torch.allclose(targets[..., 1, :], want, atol=1e-5)
    # Where the codes leave no residual (latents that are codes, a zero code in the book), the labels are the
    # quantizer's own, from the latents themselves, at every depth.
    table[0] = 0
    quantizer = ResidualQuantizer(3, QuantizerSettings(codebook_size=16, codebook_dim=None, l2_normalize=False),
                                  depth=3)
    quantizer.codebook.data.copy_(table)
    latents = table[torch.randint(1, 16, (2, 5))]
    direct, _ = quantizer.soft_codes(latents, 0.5, stochastic=False)
    stored = quantizer.encode(latents)
    assert (stored[..., 1:] == 0).all()
    assert torch.allclose(labeler(stored, 0.5, stochastic=False)[0], direct, atol=1e-6)
    # Stochastic codes: seeded, and drawn from the labels (a near-zero temperature draws the nearest code).
    first = labeler(stacks, 0.5, True, torch.Generator().manual_seed(3))[1]
    assert torch.equal(first, labeler(stacks, 0.5, True, torch.Generator().manual_seed(3))[1])
    assert torch.equal(labeler(stored, 1e-6, True, torch.Generator().manual_seed(3))[1], stored)


def test_one_loader_and_sampler_serve_both_transformers(tmp_path):
    torch.manual_seed(0)
    rq = RQTransformer(RQTransformerSettings(grid=(2, 2), num_classes=3, vocab_size=8, code_depth=2,
                                             label_dropout=0.1))
    vim = VIMTransformer(TransformerSettings(size="pico", grid=(2, 2), num_classes=3, vocab_size=8))
    for name, model in (("rq", rq), ("vim", vim)):
        save_model(model, tmp_path / name)
    loaded = {name: load_code_model(tmp_path / name) for name in ("rq", "vim")}
    assert isinstance(loaded["rq"], RQTransformer) and isinstance(loaded["vim"], VIMTransformer)
    assert (codes_per_image(rq.settings), codes_per_image(vim.settings)) == (8, 4)
    assert (position_blocks(rq.settings), position_blocks(vim.settings)) == (2, 2)
    assert isinstance(code_model_settings(rq.settings.model_dump()), RQTransformerSettings)
    labels = torch.tensor([0, 1, 2])
    per_depth = sampling_settings({"temperature": [1.0, 0.5], "top_k": 0, "top_p": 1.0, "guidance_scale": 1.5})
    assert isinstance(per_depth, RQSamplingSettings) and per_depth.temperature == (1.0, 0.5)
    stacks = sample_codes(loaded["rq"], labels, per_depth, torch.Generator().manual_seed(0))
    assert stacks.shape == (3, 8) and int(stacks.max()) < 8
    plain = sample_codes(loaded["rq"], labels, SamplingSettings(), torch.Generator().manual_seed(0))
    assert plain.shape == (3, 8)
    assert sample_codes(loaded["vim"], labels, SamplingSettings(), torch.Generator().manual_seed(0)).shape == (3, 4)
    with pytest.raises(ValueError, match="per-depth sampling settings are for the RQ-Transformer"):
        sample_codes(loaded["vim"], labels, per_depth, torch.Generator())
    # The probe's features: the spatial blocks over the four positions, from flattened rows or stacks alike.
    features = loaded["rq"].pooled_block_features(stacks, [0, 1])
    assert features.shape == (3, 2, 64)
    assert torch.allclose(features, loaded["rq"].pooled_block_features(stacks.view(3, 4, 2), [0, 1]))


def test_the_tokenizer_pyfunc_helpers_round_trip_code_stacks():
    torch.manual_seed(0)
    model = ViTVQGAN(TokenizerSettings(image_size=16, patch_size=4, codebook_size=32, quantizer="rq",
                                       rq_depth=3)).eval()
    images = (np.random.default_rng(0).random((2, 16, 16, 3)) * 255).astype(np.uint8)
    codes = encode_images(model, images)
    assert codes.shape == (2, 4, 4, 3)
    assert np.array_equal(decode_codes(model, codes), decode_codes(model, codes.reshape(2, -1)))
