"""NOBLE branches (pipeline/models/noble.py) without Ray: exactness with the branch silenced, the parameter
overhead, the learning-rate multipliers in the optimizer, gradients, KV-cache decoding, export and reload,
FSDP2's sharded parameters, and the config keys (hashes of configs without them unchanged)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import logits_through_the_cache
from pipeline.config import ConfigError, build_config, load_config
from pipeline.device import Backend
from pipeline.models.cpu_linear import Linear
from pipeline.models.io import SETTINGS_FILE
from pipeline.models.noble import CosNet, Noble, NobleBranch, NobleLinear, branch_lr_scales
from pipeline.models.settings import VIM_SIZES, VIT_SIZES, TokenizerSettings, TransformerSettings
from pipeline.models.tokenizer import ViTVQGAN, load_tokenizer, save_tokenizer
from pipeline.models.transformer import VIMTransformer, load_transformer, save_transformer
from pipeline.train.lm_step import accumulated_step, parameter_groups
from pipeline.train.optim import set_lr
from pipeline.train.tokenizer_objective import generator_parameter_groups

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _vim(device="cpu", **kwargs) -> VIMTransformer:
    torch.manual_seed(0)
    settings = TransformerSettings(**{"size": "pico", "vocab_size": 32, "grid": (4, 4), "num_classes": 5,
                                      "dropout": 0.0, "noble_rank": 8, **kwargs})
    return VIMTransformer(settings).to(device).eval()


def _tokenizer(**kwargs) -> ViTVQGAN:
    torch.manual_seed(0)
    return ViTVQGAN(TokenizerSettings(**{"image_size": 16, "patch_size": 4, "noble_rank": 8, **kwargs})).eval()


def _loud(model: nn.Module, scale: float = 300.0) -> nn.Module:
    """Scale every W_up so the branches change the output well beyond rounding (at init they are ~silent)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, NobleBranch):
                module.up.mul_(scale)
    return model


# ---- the layer --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation,branches", [("cosnet", 1), ("cosnet", 3), ("gelu", 1), ("gelu", 3)])
def test_with_w_up_zero_the_layer_is_the_plain_linear_layer_exactly(activation, branches, device):
    torch.manual_seed(0)
    layer = NobleLinear(24, 36, rank=4, activation=activation, branches=branches).to(device)
    plain = nn.Linear(24, 36).to(device)
    plain.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    x = torch.randn(5, 7, 24, device=device)
    assert not torch.equal(layer(x), plain(x))  # the branch is there at init (small, not zero)
    with torch.no_grad():
        layer.noble.up.zero_()
    assert torch.equal(layer(x), plain(x))


def test_the_branch_computes_the_papers_formula_per_q_k_v_slice():
    torch.manual_seed(0)
    layer = NobleLinear(16, 24, rank=4, activation="cosnet", branches=3)
    x = torch.randn(3, 16)
    branch, act = layer.noble, layer.noble.activation
    h = x @ branch.down.T + branch.down_bias
    expected = []
    for g in range(3):  # each output third: its own W_down rows, M, w, p and W_up rows
        s = slice(4 * g, 4 * g + 4)
        inner = torch.cos(act.frequency_in[s] * h[:, s] + act.phase_in[s])
        mixed = inner @ act.mix[g].T + act.mix_bias[s]
        sigma = torch.cos(act.frequency_out[s] * mixed + act.phase_out[s])
        expected.append(sigma @ branch.up[8 * g:8 * g + 8].T)
    reference = x @ layer.weight.T + layer.bias + torch.cat(expected, 1)
    assert torch.allclose(layer(x), reference, atol=1e-6)
    gelu = NobleLinear(16, 24, rank=4, activation="gelu")
    assert torch.allclose(gelu(x), F.linear(x, gelu.weight, gelu.bias)
                          + F.gelu(x @ gelu.noble.down.T + gelu.noble.down_bias) @ gelu.noble.up.T, atol=1e-6)


def test_initialisation_follows_the_reference_code():
    torch.manual_seed(0)
    rank, width = 32, 512
    branch = NobleBranch(width, width, rank)
    assert abs(branch.down.std().item() - 1 / math.sqrt(width)) < 0.05 / math.sqrt(width)
    assert abs(branch.up.std().item() - 0.01 / math.sqrt(rank)) < 0.05 * 0.01 / math.sqrt(rank)
    assert torch.count_nonzero(branch.down_bias) == 0
    act = branch.activation
    assert abs(act.mix.std().item() - 0.5 / math.sqrt(rank)) < 0.1 * 0.5 / math.sqrt(rank)
    for frequency in (act.frequency_in, act.frequency_out):
        assert 0.8 <= frequency.min() and frequency.max() <= 1.2
    phases = torch.cat([act.phase_in, act.phase_out])
    assert 0.05 < phases.std().item() < 0.15 and abs(phases.mean().item()) < 0.05


# ---- the models -------------------------------------------------------------------------------------------


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _overhead(in_features: int, out_features: int, rank: int, activation: str, branches: int) -> int:
    """The formula: W_down (r x in) and its bias per branch, W_up (out x r); CosNet adds M (r x r), b_M, w1,
    p1, w2, p2 per branch."""
    count = branches * (rank * in_features + rank) + out_features * rank
    return count + (branches * (rank * rank + 5 * rank) if activation == "cosnet" else 0)


def _block_overhead(dim: int, mlp_dim: int, rank: int, activation: str, layers: str) -> int:
    attention = _overhead(dim, 3 * dim, rank, activation, 3) + _overhead(dim, dim, rank, activation, 1)
    mlp = _overhead(dim, mlp_dim, rank, activation, 1) + _overhead(mlp_dim, dim, rank, activation, 1)
    return {"attention": attention, "mlp": mlp, "all": attention + mlp}[layers]


@pytest.mark.parametrize("activation,layers,rank", [("cosnet", "all", 8), ("gelu", "all", 4),
                                                     ("cosnet", "attention", 4), ("cosnet", "mlp", 16)])
def test_parameter_overhead_is_the_formula(activation, layers, rank):
    vim = _vim(noble_rank=rank, noble_activation=activation, noble_layers=layers)
    plain = _vim(noble_rank=0)
    shape = VIM_SIZES["pico"]
    assert vim.parameter_count() - plain.parameter_count() == shape.depth * _block_overhead(
        shape.dim, shape.mlp_dim, rank, activation, layers)
    tokenizer, plain_tokenizer = (_tokenizer(noble_rank=rank, noble_activation=activation, noble_layers=layers),
                                  _tokenizer(noble_rank=0))
    size = VIT_SIZES["tiny"]  # encoder and decoder
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(tokenizer) - count(plain_tokenizer) == 2 * size.depth * _block_overhead(
        size.dim, size.mlp_dim, rank, activation, layers)
    # Only the chosen layers carry a branch; the output heads and the quantizer's projections never do.
    mlp = ("mlp.0", "mlp.2", "mlp.3")  # the ViT's second MLP layer is mlp.2, the VIM's (after a dropout) mlp.3
    wanted = {"attention": ("qkv", "proj"), "mlp": mlp, "all": ("qkv", "proj", *mlp)}
    for model in (vim, tokenizer):
        branched = {name for name, m in _linears(model).items() if isinstance(m, NobleLinear)}
        assert branched and all(name.endswith(wanted[layers]) and ".blocks." in f".{name}" for name in branched)


def test_rank_zero_builds_the_models_and_hashes_of_before():
    vim, tokenizer = _vim(noble_rank=0), _tokenizer(noble_rank=0)
    for model in (vim, tokenizer):
        assert all(type(m) is Linear for m in _linears(model).values())  # no branch: the plain layer
        assert not any("noble" in key for key in model.state_dict())
    # Stage hashes of configs that predate NOBLE (and `tokenizer.channels`): the demo preset's values before
    # those keys existed, its tokenizer as it was before the demo recipe changed.
    demo = load_config("configs/demo.yaml", [
        "tokenizer.dead_code_threshold=0.02", "tokenizer.logit_laplace_weight=0.1", "tokenizer.adversarial_weight=0.1",
        "tokenizer.disc_start=400", "tokenizer.disc_base_channels=16", "tokenizer.steps=460", "tokenizer.lr=1e-3",
        "tokenizer.disc_lr=2e-4", "tokenizer.augment_pad=2", "transformer.steps=200", "transformer.decay_start=100"])
    assert (demo.tokenizer.hash(), demo.transformer.hash()) == ("8886fc990a990c75", "e436b8b8348d1721")
    assert build_config({}, ["transformer.noble_rank=0"]).transformer.hash() == build_config({}).transformer.hash()
    assert build_config({}, ["transformer.noble_rank=16"]).transformer.hash() != build_config({}).transformer.hash()
    assert build_config({}, ["tokenizer.noble_activation=gelu"]).tokenizer.hash() != build_config({}).tokenizer.hash()


# ---- the optimizer ----------------------------------------------------------------------------------------


def _expected_scale(branch: NobleBranch, name: str) -> float:
    ratio = min(branch.in_features, branch.out_features // branch.branches) / branch.rank
    return {"up": ratio ** 0.4, "activation.mix": ratio ** 0.5, "activation.mix_bias": ratio ** 0.5,
            "activation.frequency_in": 2.0, "activation.frequency_out": 2.0,
            "activation.phase_in": 4.0, "activation.phase_out": 4.0}.get(name, 1.0)


@pytest.mark.parametrize("kind", ["vim", "tokenizer"])
def test_multipliers_and_decay_reach_the_optimizer_and_survive_the_schedule(kind):
    model = _vim() if kind == "vim" else _tokenizer()
    groups = parameter_groups(model, 0.01) if kind == "vim" else generator_parameter_groups(model, 0.01)
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    owner = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert len(owner) == sum(1 for _ in model.parameters())  # every parameter once
    branches = [m for m in model.modules() if isinstance(m, NobleBranch)]
    assert len(branches) == (8 if kind == "vim" else 16)
    for lr in (3e-3, 1e-4):  # two points of a schedule: the ratio holds at both
        set_lr(optimizer, lr)
        for branch in branches:
            for name, parameter in branch.named_parameters():
                group = owner[id(parameter)]
                assert group["lr"] == pytest.approx(lr * _expected_scale(branch, name)), name
                assert group["weight_decay"] == (0.01 if parameter.dim() >= 2 else 0.0), name
    # Parameters outside the branches keep the learning rate and decay they had before NOBLE.
    others = [p for p in model.parameters() if id(p) not in branch_lr_scales(model)]
    assert all(owner[id(p)]["lr"] == pytest.approx(1e-4) for p in others)
    if kind == "tokenizer":  # the tokenizer decays everything else, as it always did
        assert all(owner[id(p)]["weight_decay"] == 0.01 for p in others)
    # A resumed optimizer keeps the multipliers (they are saved with its groups).
    again = torch.optim.AdamW(groups, lr=1.0)
    again.load_state_dict(optimizer.state_dict())
    set_lr(again, 2e-3)
    assert sorted(g["lr"] for g in again.param_groups) == pytest.approx(
        sorted(2e-3 * g.get("lr_scale", 1.0) for g in optimizer.param_groups))


def test_one_adamw_step_moves_each_branch_parameter_by_its_own_learning_rate():
    model = _loud(_vim()).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.0), lr=1.0, betas=(0.9, 0.96))
    set_lr(optimizer, 1e-3)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    tokens, labels = torch.randint(0, 32, (4, 16)), torch.randint(0, 5, (4,))
    accumulated_step(model, [(tokens, labels)], optimizer, Backend("cpu", torch.device("cpu")), grad_clip=0.0)
    branch = model.blocks[0].attn.qkv.noble
    for name, parameter in branch.named_parameters():
        moved = (parameter.detach() - before[id(parameter)]).abs()
        moved = moved[parameter.grad.abs() > 1e-5]  # Adam's first step is lr * g / (|g| + eps)
        assert moved.numel() and torch.allclose(moved, torch.full_like(moved, 1e-3 * _expected_scale(branch, name)),
                                                rtol=0.02), name


@pytest.mark.parametrize("device", DEVICES)
def test_branch_gradients_are_finite_and_nonzero_after_a_step(device):
    backend = Backend(device, torch.device(device))
    model = _vim(device, noble_activation="cosnet").train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=1.0)
    set_lr(optimizer, 3e-3)
    tokens = torch.randint(0, 32, (4, 16), device=device)
    labels = torch.randint(0, 5, (4,), device=device)
    for _ in range(2):  # after the first step, the second backward's gradients are checked
        accumulated_step(model, [(tokens, labels)], optimizer, backend, grad_clip=1.0)
    branch_parameters = [p for m in model.modules() if isinstance(m, NobleBranch) for p in m.parameters()]
    assert len(branch_parameters) == 2 * 4 * 9  # 2 blocks x 4 layers x (W_down, b_down, W_up, 6 of CosNet)
    for parameter in branch_parameters:
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0
    tokenizer = _tokenizer(noble_activation="gelu").train()
    reconstruction, _, quantized = tokenizer(torch.rand(2, 3, 16, 16))
    (F.mse_loss(reconstruction, torch.rand_like(reconstruction)) + sum(quantized.losses.values())).backward()
    for module in tokenizer.modules():
        if isinstance(module, NobleBranch):
            assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["cosnet", "gelu"])
def test_kv_cache_decoding_equals_the_full_forward_with_branches_on(activation, device):
    model = _loud(_vim(device, noble_activation=activation))
    tokens = torch.randint(0, 32, (3, 16), device=device)
    labels = torch.tensor([0, 4, 2], device=device)
    with torch.no_grad():
        full = model(tokens, labels)
        silent = _vim(device, noble_rank=0)
        silent.load_state_dict({k: v for k, v in model.state_dict().items() if "noble" not in k})
        assert (full - silent(tokens, labels)).abs().max() > 1e-2  # the branches shape the logits
    assert torch.allclose(logits_through_the_cache(model, tokens, labels), full, atol=1e-4)
    cache = model.new_cache(3)
    assert torch.allclose(model.prefill(labels, cache, prefix=tokens[:, :6]), full[:, 6], atol=1e-4)


def test_export_and_reload_keep_the_branch(tmp_path):
    vim = _loud(_vim(noble_activation="gelu", noble_layers="mlp"))
    save_transformer(vim, tmp_path / "vim")
    stored = json.loads((tmp_path / "vim" / SETTINGS_FILE).read_text())
    assert (stored["noble_rank"], stored["noble_activation"], stored["noble_layers"]) == (8, "gelu", "mlp")
    again = load_transformer(tmp_path / "vim")
    tokens = torch.randint(0, 32, (2, 16))
    assert torch.equal(again(tokens), vim(tokens))
    tokenizer = _loud(_tokenizer())
    save_tokenizer(tokenizer, tmp_path / "tok")
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(load_tokenizer(tmp_path / "tok")(images)[0], tokenizer(images)[0])
    # Without a branch the settings file holds no NOBLE key: the file every older model wrote.
    save_transformer(_vim(noble_rank=0), tmp_path / "plain")
    assert not any(k.startswith("noble") for k in json.loads((tmp_path / "plain" / SETTINGS_FILE).read_text()))


def test_the_driver_can_build_a_branched_model_on_the_meta_device():
    settings = TransformerSettings(size="nano", noble_rank=32)
    with torch.device("meta"):
        count = VIMTransformer(settings).parameter_count(embeddings=True)
    assert count == VIMTransformer(settings).parameter_count(embeddings=True)
    assert count > VIMTransformer(TransformerSettings(size="nano")).parameter_count(embeddings=True)


def test_parameter_groups_find_the_branches_under_fsdp2(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _vim().train()
    expected = {f"{name}.{local}": _expected_scale(module, local) for name, module in model.named_modules()
                if isinstance(module, NobleBranch) for local, _ in module.named_parameters()}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=1.0)
        set_lr(optimizer, 1e-3)
        owner = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        sharded = dict(model.named_parameters())
        assert len(owner) == len(sharded) and set(expected) < set(sharded)
        assert type(sharded["blocks.0.attn.qkv.noble.up"]).__name__ != "Tensor"  # a DTensor parameter now
        for name, parameter in sharded.items():
            assert owner[id(parameter)]["lr"] == pytest.approx(1e-3 * expected.get(name, 1.0)), name
        tokens, labels = torch.randint(0, 32, (2, 16)), torch.randint(0, 5, (2,))
        accumulated_step(model, [(tokens, labels)], optimizer, Backend("cpu", torch.device("cpu")), grad_clip=1.0)
    finally:
        dist.destroy_process_group()


# ---- the config -------------------------------------------------------------------------------------------


def test_config_keys_reach_the_models_and_bad_values_are_named():
    cfg = build_config({}, ["transformer.noble_rank=16", "transformer.noble_activation=gelu",
                            "transformer.noble_layers=attention", "tokenizer.noble_rank=4"])
    settings = cfg.transformer.model_settings(vocab_size=64, grid=(4, 4), num_classes=10)
    assert Noble.of(settings) == Noble(16, "gelu", "attention")
    assert Noble.of(cfg.tokenizer.model_settings()) == Noble(4, "cosnet", "all")
    for override, key in (("transformer.noble_rank=-1", "transformer.noble_rank"),
                          ("tokenizer.noble_activation=relu", "tokenizer.noble_activation"),
                          ("transformer.noble_layers=heads", "transformer.noble_layers")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            build_config({}, [override])


def test_a_noble_rank_grid_is_a_valid_sweep():
    from orchestration.sweep import SweepSpec, parse_search, trial_config, validate

    spec = SweepSpec(base={}, space=dict([parse_search("grid", "transformer.noble_rank=0,16,32,64")]),
                     last_stage="transformer")
    points = validate(spec)
    assert [p["transformer.noble_rank"] for p in points] == [0, 16, 32, 64]
    assert [trial_config(p, spec).transformer.noble_rank for p in points] == [0, 16, 32, 64]
    with pytest.raises(ConfigError, match="transformer.noble_rank"):
        validate(SweepSpec(base={}, space=dict([parse_search("grid", "transformer.noble_rank=0,-8")]),
                           last_stage="transformer"))


def test_cosnet_is_a_module_the_inits_of_the_models_leave_alone():
    model = _vim()
    cosnet = model.blocks[0].mlp[0].noble.activation
    assert isinstance(cosnet, CosNet) and not isinstance(cosnet, nn.Linear)
    # The GPT-2 residual init touched the main weight of mlp.3 but not its branch's W_up.
    up = model.blocks[0].mlp[3].noble.up
    assert abs(up.std().item() - 0.01 / math.sqrt(8)) < 0.3 * 0.01 / math.sqrt(8)
