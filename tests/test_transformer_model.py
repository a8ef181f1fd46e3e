"""The VIM Transformer without Ray: causality, KV-cache decoding, conditioning, label dropout, gradient
accumulation, and a tiny model learning a small code set."""
import json
import math

import pytest
import torch

from helpers import logits_through_the_cache
from pipeline.device import Backend
from pipeline.models.io import SETTINGS_FILE, WEIGHTS_FILE, load_model, save_weights
from pipeline.models.settings import VIM_SIZES, TransformerSettings
from pipeline.models.transformer import VIMTransformer, load_transformer, save_transformer
from pipeline.train.lm_step import accumulated_step, parameter_groups

CPU = Backend("cpu", torch.device("cpu"))


def _model(**kwargs) -> VIMTransformer:
    torch.manual_seed(0)
    settings = TransformerSettings(**{"size": "pico", "vocab_size": 32, "grid": (4, 4), "num_classes": 5,
                                      "dropout": 0.0, **kwargs})
    return VIMTransformer(settings).eval()


def test_logits_at_t_ignore_tokens_after_t():
    model = _model()
    tokens = torch.randint(0, 32, (2, 16))
    labels = torch.tensor([1, 3])
    base = model(tokens, labels)
    for t in (0, 5, 15):
        changed = tokens.clone()
        changed[:, t:] = torch.randint(0, 32, changed[:, t:].shape)
        changed[:, t] = (tokens[:, t] + 1) % 32  # certainly different at t
        logits = model(changed, labels)
        assert torch.allclose(logits[:, : t + 1], base[:, : t + 1], atol=1e-5)  # t's logits predict token t
        if t < 15:
            assert not torch.allclose(logits[:, t + 1:], base[:, t + 1:])


@pytest.mark.parametrize("num_classes", [5, 0])
def test_kv_cache_decoding_equals_full_forward(num_classes):
    model = _model(num_classes=num_classes)
    tokens = torch.randint(0, 32, (3, 16))
    labels = torch.tensor([0, 4, 2]) if num_classes else None
    full = model(tokens, labels)
    assert torch.allclose(logits_through_the_cache(model, tokens, labels), full, atol=1e-5)
    # A prefix prefilled at once continues exactly as the token-by-token path.
    cache = model.new_cache(3)
    after_prefix = model.prefill(labels, cache, prefix=tokens[:, :6])
    assert torch.allclose(after_prefix, full[:, 6], atol=1e-5)
    assert torch.allclose(model.decode_step(tokens[:, 6], cache), full[:, 7], atol=1e-5)


def test_class_token_changes_the_output_and_null_class_exists():
    model = _model(label_dropout=0.1)
    tokens = torch.randint(0, 32, (1, 16))
    outs = [model(tokens, torch.tensor([c])) for c in range(6)]  # 5 classes + the null class
    assert all(not torch.allclose(outs[0], o) for o in outs[1:])
    with pytest.raises(IndexError):
        model(tokens, torch.tensor([6]))


def test_label_dropout_rate():
    model = _model(label_dropout=0.25)
    labels = torch.randint(0, 5, (40_000,))
    dropped = model.drop_labels(labels, torch.Generator().manual_seed(0))
    rate = float((dropped == model.settings.null_class).float().mean())
    assert abs(rate - 0.25) < 0.01
    kept = dropped != model.settings.null_class
    assert torch.equal(dropped[kept], labels[kept])
    assert torch.equal(_model(label_dropout=0.0).drop_labels(labels), labels)


def test_features_come_from_the_requested_block():
    model = _model()
    tokens = torch.randint(0, 32, (2, 16))
    features = model.features(tokens, torch.tensor([0, 1]), block=0)
    assert features.shape == (2, 16, VIM_SIZES["pico"].dim)
    assert not torch.allclose(features, model.features(tokens, torch.tensor([0, 1]), block=1))
    with pytest.raises(ValueError):
        model.features(tokens, None, block=2)


def test_gradient_accumulation_equals_one_big_batch():
    tokens, labels = torch.randint(0, 32, (8, 16)), torch.randint(0, 5, (8,))
    grads = []
    for micro in ([(tokens, labels)], [(tokens[:4], labels[:4]), (tokens[4:], labels[4:])]):
        model = _model().train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        accumulated_step(model, micro, optimizer, CPU, grad_clip=0.0)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_weight_decay_only_on_matrices():
    model = _model()
    decay, keep = parameter_groups(model, 0.01)
    assert all(p.dim() >= 2 for p in decay["params"])
    kept = {id(p) for p in keep["params"]}
    assert id(model.token_embedding.weight) in kept and id(model.position) in kept
    assert id(model.blocks[0].attn.qkv.weight) not in kept


def test_tiny_model_learns_a_small_code_set(tmp_path):
    torch.manual_seed(0)
    # 4 classes, each a fixed 16-token pattern with a little noise: learnable well below log(vocab).
    patterns = torch.randint(0, 32, (4, 16))
    labels = torch.arange(256) % 4
    tokens = patterns[labels].clone()
    noise = torch.rand(tokens.shape) < 0.05
    tokens[noise] = torch.randint(0, 32, (int(noise.sum()),))
    model = _model(num_classes=4, size="pico").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        index = torch.randint(0, 256, (32,))
        loss, _ = accumulated_step(model, [(tokens[index], labels[index])], optimizer, CPU, grad_clip=1.0)
    uniform = math.log(32)
    assert loss < 0.35 * uniform, (loss, uniform)
    save_transformer(model, tmp_path)
    again = load_transformer(tmp_path)
    assert again.settings == model.settings and again.settings.grid == (4, 4)
    assert torch.allclose(again(tokens[:2], labels[:2]), model.eval()(tokens[:2], labels[:2]), atol=1e-6)


def test_weights_exported_from_a_state_dict_load_like_a_saved_model(tmp_path):
    model = _model(label_dropout=0.1)
    save_weights(model.state_dict(), model.settings, tmp_path / "state")
    save_transformer(model, tmp_path / "model")
    for name in (SETTINGS_FILE, WEIGHTS_FILE):
        assert (tmp_path / "state" / name).read_bytes() == (tmp_path / "model" / name).read_bytes()
    assert json.loads((tmp_path / "model" / SETTINGS_FILE).read_text()) == {
        "size": "pico", "vocab_size": 32, "grid": [4, 4], "num_classes": 5, "dropout": 0.0, "label_dropout": 0.1}
    again = load_model(VIMTransformer, TransformerSettings, tmp_path / "state")
    tokens = torch.randint(0, 32, (2, 16))
    assert torch.equal(again(tokens), model(tokens)) and not again.training


@pytest.mark.parametrize("conditional", [True, False])
def test_the_config_builds_the_transformer_settings_by_field_name(conditional):
    from pipeline.config import build_config

    cfg = build_config({}, ["transformer.size=pico", "transformer.dropout=0.2",
                            f"transformer.conditional={str(conditional).lower()}"]).transformer
    settings = cfg.model_settings(vocab_size=64, grid=[4, 4], num_classes=10)
    assert type(settings) is TransformerSettings
    assert settings.model_dump() == {"size": "pico", "dropout": 0.2, "label_dropout": 0.0, "vocab_size": 64,
                                     "grid": (4, 4), "num_classes": 10 if conditional else 0,
                                     "noble_rank": 0, "noble_activation": "cosnet", "noble_layers": "all"}


def test_flops_accounting_is_the_6n_rule():
    model = _model(size="nano")
    shape = VIM_SIZES["nano"]
    assert model.flops_per_token() == 6 * model.parameter_count() + 12 * shape.depth * shape.dim * 16
    assert model.parameter_count() == pytest.approx(12 * shape.depth * shape.dim ** 2, rel=0.05)


def test_size_names_match_the_size_tables():
    from typing import get_args

    from pipeline.models.settings import VIM_SIZE_NAMES, VIT_SIZE_NAMES, VIT_SIZES

    assert set(get_args(VIM_SIZE_NAMES)) == set(VIM_SIZES)
    assert set(get_args(VIT_SIZE_NAMES)) == set(VIT_SIZES)
