"""Real image files for tests: JPEGs of several modes, broken files, and both ImageNet layouts."""
from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

WNIDS = ["n01440764", "n01443537", "n01484850"]


def picture(seed: int, size=(48, 40)) -> Image.Image:
    """A smooth, non-trivial RGB picture (gradients plus a disc), different for every seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)
    image = np.stack([(base[c] + x * rng.uniform(-3, 3) + y * rng.uniform(-3, 3)) % 256 for c in range(3)], -1)
    cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, 12)
    image[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return Image.fromarray(image.astype(np.uint8), "RGB")


def jpeg(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def odd_files(seed: int) -> dict[str, bytes]:
    """name -> bytes: readable odd modes and broken files (the latter must be skipped and counted)."""
    good = jpeg(picture(seed))
    rgba = picture(seed + 1).convert("RGBA")
    rgba.putalpha(128)
    return {
        "cmyk.JPEG": jpeg(picture(seed + 2).convert("CMYK")),
        "gray.JPEG": jpeg(picture(seed + 3).convert("L")),
        "alpha_png.JPEG": png(rgba),  # ImageNet has PNGs named .JPEG
        "palette.JPEG": png(picture(seed + 4).convert("P")),
        "corrupt.JPEG": bytes(np.random.default_rng(seed).integers(0, 256, 3000, dtype=np.uint8)),
        "truncated.JPEG": good[: len(good) // 2],
        "empty.JPEG": b"",
    }


BROKEN = {"corrupt.JPEG": "not_an_image", "truncated.JPEG": "truncated", "empty.JPEG": "empty"}


@dataclass
class FakeImageNet:
    root: Path
    train_count: int  # files, broken ones included
    val_count: int
    broken: dict[str, str] = field(default_factory=dict)  # origin suffix -> reason
    val_truth: dict[str, str] = field(default_factory=dict)  # val stem -> wnid


def _train_files(per_class: int) -> dict[str, dict[str, bytes]]:
    files: dict[str, dict[str, bytes]] = {}
    for c, wnid in enumerate(WNIDS):
        files[wnid] = {f"{wnid}_{i}.JPEG": jpeg(picture(100 * c + i)) for i in range(per_class)}
    files[WNIDS[0]].update({f"{WNIDS[0]}_{k}": v for k, v in odd_files(7).items()})
    return files


def _val_files(per_class: int) -> tuple[dict[str, bytes], dict[str, str]]:
    files, truth = {}, {}
    for n in range(per_class * len(WNIDS)):
        stem = f"ILSVRC2012_val_{n + 1:08d}"
        files[stem + ".JPEG"] = jpeg(picture(5000 + n))
        truth[stem] = WNIDS[n % len(WNIDS)]
    return files, truth


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_imagenet(root: Path, layout: str, per_class: int = 8, val_per_class: int = 3) -> FakeImageNet:
    """layout 'tar': ILSVRC2012_img_{train,val}.tar + LOC_val_solution.csv + LOC_synset_mapping.txt;
    layout 'folder': train/<wnid>/*.JPEG + a flat val/ + a '<file> <wnid>' label list."""
    root.mkdir(parents=True, exist_ok=True)
    train = _train_files(per_class)
    val, truth = _val_files(val_per_class)
    if layout == "tar":
        outer = {f"{wnid}.tar": _tar_bytes(files) for wnid, files in train.items()}
        (root / "ILSVRC2012_img_train.tar").write_bytes(_tar_bytes(outer))
        (root / "ILSVRC2012_img_val.tar").write_bytes(_tar_bytes(val))
        rows = ["ImageId,PredictionString"] + [f"{s},{w} 1 2 30 40 {w} 5 6 70 80" for s, w in truth.items()]
        (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    else:
        for wnid, files in train.items():
            (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (root / "train" / wnid / name).write_bytes(data)
        (root / "val").mkdir(parents=True, exist_ok=True)
        for name, data in val.items():
            (root / "val" / name).write_bytes(data)
        (root / "val_labels.txt").write_text("".join(f"{s}.JPEG {w}\n" for s, w in truth.items()))
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} fish number {i}\n" for i, w in enumerate(WNIDS)))
    broken = {f"{WNIDS[0]}_{name}": reason for name, reason in BROKEN.items()}
    return FakeImageNet(root, sum(len(f) for f in train.values()), len(val), broken, truth)
