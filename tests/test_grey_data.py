"""Grey data stays grey: ingest records it, the tokenizer codes and decodes it as one channel, and every picture
that comes back out has R = G = B exactly (no colour cast)."""
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from imagegen import picture
from pipeline.config import build_config
from pipeline.data.shards import iter_samples, list_shards
from pipeline.models.tokenizer import ViTVQGAN, load_tokenizer
from pipeline.models.settings import TokenizerSettings
from pipeline.storage import Manifest, RunDir
from orchestration.runner import run_pipeline


def channel_spread(images: np.ndarray | torch.Tensor, axis: int) -> float:
    """Largest difference between any two colour channels at any pixel (0 for a grey picture)."""
    images = torch.as_tensor(np.asarray(images)).float()
    return float((images.amax(axis) - images.amin(axis)).max())


def test_fashion_mnist_is_coded_as_one_channel_and_comes_back_grey(coded_run):
    run = RunDir(str(coded_run))
    ingest, tokenizer_manifest, codes = (Manifest.read(run, folder) for folder in ("shards", "tokenizer", "codes"))
    assert ingest.outputs["channels"] == 1
    assert all(c["grey_images"] == c["images"] > 0 for c in ingest.counts.values())
    assert tokenizer_manifest.outputs["channels"] == codes.outputs["channels"] == 1
    assert json.loads((coded_run / "tokenizer" / "config.json").read_text())["channels"] == 1
    tokenizer = load_tokenizer(coded_run / "tokenizer")
    assert tokenizer.encoder.patch.weight.shape[1] == 1  # the encoder reads one plane

    samples = [s for url in list_shards(str(coded_run / "shards" / "val")) for s in iter_samples(url)]
    images = torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2).float() / 255
    assert channel_spread(images, 1) == 0
    with torch.no_grad():
        reconstruction, raw, _ = tokenizer(images)
    assert reconstruction.shape == images.shape and channel_spread(reconstruction, 1) == 0
    assert channel_spread(raw["mu"], 1) == 0 and channel_spread(raw["log_b"], 1) == 0
    # The stored codes decode to grey pictures too: what the evaluate stage and the samples go through.
    table = pq.read_table(coded_run / "codes" / codes.outputs["codes"]["val"][0])
    stored = torch.tensor(table.column("codes").to_pylist()[:32], dtype=torch.int64)
    decoded = tokenizer.decode(stored.view(-1, *codes.outputs["grid"]))
    assert decoded.shape[1] == 3 and channel_spread(decoded, 1) == 0


def test_a_grey_model_learns_the_one_plane_a_colour_model_splits_three_ways():
    """The luma the grey encoder reads is the grey value itself; a colour model on the same settings
    predicts three planes, which differ before training."""
    settings = TokenizerSettings(image_size=16, patch_size=4, codebook_size=16, channels=1)
    grey, colour = ViTVQGAN(settings), ViTVQGAN(settings.model_copy(update={"channels": 3}))
    images = torch.rand(2, 1, 16, 16).expand(-1, 3, -1, -1)
    assert torch.allclose(grey._model_input(images), images[:, :1] * 2 - 1, atol=1e-6)
    with torch.no_grad():
        assert channel_spread(grey.decode(grey.encode(images)), 1) == 0
        assert channel_spread(colour.decode(colour.encode(images)), 1) > 0


def _folder(root: Path, colour_images: int) -> Path:
    """train/ and val/ class folders of grey PNGs and JPEGs (mode L), the first `colour_images` in colour."""
    for split in ("train", "val"):
        for index in range(8):
            folder = root / split / f"class{index % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            image = picture(index + (0 if split == "train" else 100), size=(20, 20))
            if not (split == "train" and index < colour_images):
                image = image.convert("L")
            image.save(folder / f"{index}.{'png' if index % 2 else 'jpg'}")
    return root


def test_ingest_records_grey_only_when_every_image_is_grey(ray_cluster, tmp_path):
    for colour_images, channels in ((0, 1), (1, 3)):
        root = _folder(tmp_path / f"source{colour_images}", colour_images)
        cfg = build_config({"ingest": {"source": "image_folder", "root": str(root), "resolution": 16,
                                       "image_format": "png", "shard_size": 4, "cpus_per_task": 0.5}})
        run_dir = tmp_path / f"run{colour_images}"
        run_pipeline(cfg, str(run_dir), only="ingest")
        manifest = Manifest.read(RunDir(str(run_dir)), "shards")
        assert manifest.outputs["channels"] == channels
        assert manifest.counts["train"]["grey_images"] == 8 - colour_images
        assert manifest.counts["val"]["grey_images"] == 8
        # The stored pictures are what was counted: grey ones have equal channels, the colour one does not.
        stored = [s["image"] for url in list_shards(str(run_dir / "shards" / "train")) for s in iter_samples(url)]
        assert sum(channel_spread(image, 2) == 0 for image in stored) == 8 - colour_images
        assert Image.open(root / "train" / "class0" / "0.jpg").mode == ("RGB" if colour_images else "L")
