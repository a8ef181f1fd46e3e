"""DiGIT's second stage (pipeline/models/prefix_transformer.py): the KV cache equals the full forward pass, the
prefix conditions the codes, the loss positions are the pixel codes', and it saves, loads and samples."""
import pytest
import torch

from pipeline.models.prefix_transformer import (PrefixTransformer, PrefixTransformerSettings, load_prefix_transformer,
                                                save_prefix_transformer)
from pipeline.models.sampling import SamplingSettings, sample_tokens

VOCAB, PREFIX_VOCAB, GRID, PREFIX_GRID = 24, 17, (3, 4), (2, 3)
LENGTH, PREFIX = GRID[0] * GRID[1], PREFIX_GRID[0] * PREFIX_GRID[1]


def model(num_classes: int = 5, label_dropout: float = 0.0) -> PrefixTransformer:
    torch.manual_seed(0)
    settings = PrefixTransformerSettings(size="pico", dropout=0.0, vocab_size=VOCAB, grid=GRID,
                                         num_classes=num_classes, label_dropout=label_dropout,
                                         prefix_vocab_size=PREFIX_VOCAB, prefix_grid=PREFIX_GRID)
    return PrefixTransformer(settings).eval()


def inputs(batch: int = 3, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(VOCAB, (batch, LENGTH), generator=generator),
            torch.randint(PREFIX_VOCAB, (batch, PREFIX), generator=generator),
            torch.randint(5, (batch,), generator=generator))


@pytest.mark.parametrize("num_classes", [0, 5])
def test_kv_cache_decoding_equals_the_full_forward_pass(num_classes):
    net = model(num_classes)
    tokens, prefix, labels = inputs()
    labels = labels if num_classes else None
    full = net(tokens, prefix, labels)
    assert full.shape == (3, LENGTH, VOCAB)
    cache = net.new_cache(3)
    steps = [net.prefill(labels, cache, condition=prefix)]
    for position in range(LENGTH - 1):
        steps.append(net.decode_step(tokens[:, position], cache))
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-4, atol=1e-5)
    assert cache.length == 1 + PREFIX + LENGTH - 1


def test_each_code_sees_the_whole_prefix_and_only_earlier_codes():
    net = model()
    tokens, prefix, labels = inputs(batch=1)
    base = net(tokens, prefix, labels)
    later = tokens.clone()
    later[0, 5] = (later[0, 5] + 1) % VOCAB  # a later code cannot change earlier predictions
    changed = net(later, prefix, labels)
    torch.testing.assert_close(changed[:, :6], base[:, :6])
    assert not torch.allclose(changed[:, 6:], base[:, 6:])
    moved = prefix.clone()
    moved[0, -1] = (moved[0, -1] + 1) % PREFIX_VOCAB  # the last SSL token reaches even the first code
    assert not torch.allclose(net(tokens, moved, labels)[:, 0], base[:, 0])


def test_a_wrong_prefix_length_is_named():
    net = model()
    tokens, prefix, labels = inputs()
    with pytest.raises(ValueError, match="prefix of 5 SSL tokens; the model reads 6"):
        net(tokens, prefix[:, :5], labels)
    with pytest.raises(ValueError, match="condition"):
        net.prefill(labels, net.new_cache(3))


def test_it_learns_a_code_that_only_the_prefix_determines():
    net = model(num_classes=0).train()
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(150):
        prefix = torch.randint(PREFIX_VOCAB, (32, PREFIX), generator=generator)
        tokens = torch.randint(VOCAB, (32, LENGTH), generator=generator)
        tokens[:, 0] = prefix[:, 2] % VOCAB  # the first code is a function of one SSL token
        loss = torch.nn.functional.cross_entropy(net(tokens, prefix)[:, 0].reshape(-1, VOCAB), tokens[:, 0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    prefix = torch.randint(PREFIX_VOCAB, (64, PREFIX), generator=generator)
    sampled = sample_tokens(net, None, SamplingSettings(temperature=1.0, top_k=1), generator, condition=prefix)
    assert sampled.shape == (64, LENGTH)
    assert float((sampled[:, 0] == prefix[:, 2] % VOCAB).float().mean()) > 0.95


def test_save_and_load_give_the_same_logits(tmp_path):
    net = model()
    tokens, prefix, labels = inputs()
    save_prefix_transformer(net, tmp_path / "stage2")
    loaded = load_prefix_transformer(tmp_path / "stage2")
    torch.testing.assert_close(loaded(tokens, prefix, labels), net(tokens, prefix, labels))
    assert loaded.settings == net.settings


def test_guided_sampling_duplicates_the_prefix():
    net = model(num_classes=5, label_dropout=0.1)
    _, prefix, labels = inputs(batch=4)
    settings = SamplingSettings(temperature=1.0, guidance_scale=2.0)
    first = sample_tokens(net, labels, settings, torch.Generator().manual_seed(0), condition=prefix)
    again = sample_tokens(net, labels, settings, torch.Generator().manual_seed(0), condition=prefix)
    assert torch.equal(first, again) and first.shape == (4, LENGTH)
