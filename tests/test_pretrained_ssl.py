"""A pretrained SSL encoder from a local file (pipeline/models/pretrained_ssl.py): the features of the chosen
block through the final norm, prefix tokens left out; a clear error for a missing or mismatched file."""
import pytest
import torch
from safetensors.torch import save_file

from pipeline.models.pretrained_ssl import PretrainedSSLEncoder, PretrainedWeightsError

timm = pytest.importorskip("timm")
ARCH = "vit_tiny_patch16_224"  # the same timm ViT code as DINOv2's, small enough for a test


def saved(folder, **options):
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, img_size=32, **options)
    path = folder / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model.eval()


def test_features_are_the_chosen_blocks_output_through_the_final_norm(tmp_path):
    path, reference = saved(tmp_path)
    encoder = PretrainedSSLEncoder(ARCH, path, image_size=32, feature_block=-3)
    images = torch.rand(2, 3, 32, 32)
    features = encoder.patch_features(images)
    assert features.shape == (2, 4, encoder.feature_dim)  # 32 / 16 = 2x2 patches, the class token left out
    x = (images - encoder.mean) / encoder.std
    with torch.no_grad():
        x = reference.norm_pre(reference._pos_embed(reference.patch_embed(x)))
        for block in reference.blocks[:len(reference.blocks) - 2]:  # up to the third from last
            x = block(x)
        expected = reference.norm(x)[:, reference.num_prefix_tokens:]
    torch.testing.assert_close(features, expected)


def test_weights_of_another_architecture_are_refused_with_the_keys(tmp_path):
    path, _ = saved(tmp_path, reg_tokens=4)  # registers the plain architecture does not have
    with pytest.raises(PretrainedWeightsError, match="does not fit vit_tiny_patch16_224"):
        PretrainedSSLEncoder(ARCH, path, image_size=32)


def test_a_missing_file_is_named_before_anything_else(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="not found: .*nothing.pth.*Nothing is downloaded"):
        PretrainedSSLEncoder("vit_small_patch14_reg4_dinov2", tmp_path / "nothing.pth", image_size=224)


def test_a_checkpoint_of_another_resolution_gets_its_position_table_resampled(tmp_path):
    """Released checkpoints carry their training resolution's table (DINOv2: 37 x 37 at 518 px)."""
    path, reference = saved(tmp_path)  # 2 x 2 patches at 32 px
    encoder = PretrainedSSLEncoder(ARCH, path, image_size=64)
    assert encoder.model.pos_embed.shape == (1, 1 + 16, reference.embed_dim)
    torch.testing.assert_close(encoder.model.pos_embed[:, :1], reference.pos_embed[:, :1])  # the class row kept
    assert encoder.patch_features(torch.rand(2, 3, 64, 64)).shape == (2, 16, encoder.feature_dim)
