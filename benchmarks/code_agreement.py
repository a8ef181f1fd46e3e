"""Codes of one tokenizer computed two ways: the share of tokens, and of whole images, whose codes agree.

- `--compare cpu-cuda` (needs a CUDA device): CPU against GPU, with TF32 off on the GPU as in the pretokenize
  stage (`pipeline.device.exact_fp32`);
- `--compare onednn-aten`: on CPU, the project's oneDNN linear layers against PyTorch's own
  (`pipeline.models.cpu_linear`), i.e. the pretokenize stage's codes after and before that kernel change.

    python benchmarks/code_agreement.py --run-dir runs/demo --out benchmarks/results/code-agreement-demo.json
    python benchmarks/code_agreement.py --out benchmarks/results/code-agreement-s256.json   # generated images
    python benchmarks/code_agreement.py --compare onednn-aten --run-dir runs/demo --split train --images 20000

With --run-dir: the run's exported tokenizer and the first --images images of its --split shards, plain view.
Without: smooth generated images and an untrained tokenizer (--size, --resolution, --patch), which says how
the two devices' arithmetic differs but not how often a trained codebook sits near a tie.
"""
from __future__ import annotations

import argparse
import itertools
import os
import time

from common import write_report

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.shards import iter_samples, list_shards
from pipeline.data.transforms import to_float
from pipeline.data.views import cut_view
from pipeline.device import exact_fp32
from pipeline.models import cpu_linear
from pipeline.models.settings import TokenizerSettings
from pipeline.models.tokenizer import ViTVQGAN, load_tokenizer
from pipeline.storage import local_folder
from stages import spec


def run_images(run_dir: str, split: str, count: int, size: int) -> np.ndarray:
    """The first `count` images of a run's shards of `split`, in shard order, plain view: uint8 (N, H, W, C)."""
    shards = list_shards(f"{run_dir.rstrip('/')}/{spec('ingest').folder}/{split}")
    samples = itertools.islice((s for url in shards for s in iter_samples(url)), count)
    return np.stack([cut_view(s["image"][None], "plain", size)[0] for s in samples])


def generated_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random pictures: 8 x 8 noise, bicubic up to `size`. uint8 (N, H, W, C)."""
    noise = torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    pictures = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return pictures.mul(255).round().byte().permute(0, 2, 3, 1).numpy()


# Each comparison: two sides, each (name, device, CPU linear backend).
COMPARISONS = {"cpu-cuda": (("cpu", "cpu", "onednn"), ("cuda", "cuda", "onednn")),
               "onednn-aten": (("onednn", "cpu", "onednn"), ("aten", "cpu", "aten"))}


def encode_all(tokenizer: ViTVQGAN, images: np.ndarray, device: str, batch_size: int,
               linear_backend: str = "onednn") -> tuple[np.ndarray, float]:
    """Codes of every image (N, h, w) on `device`, and the seconds it took."""
    model = tokenizer.to(device)
    started, codes = time.perf_counter(), []
    with torch.inference_mode(), cpu_linear.use_backend(linear_backend):
        for start in range(0, len(images), batch_size):
            batch = to_float(torch.from_numpy(images[start:start + batch_size])).to(device)
            codes.append(model.encode(batch).cpu().numpy())
    return np.concatenate(codes), round(time.perf_counter() - started, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="cpu-cuda")
    parser.add_argument("--run-dir", help="a run directory with committed ingest and tokenizer stages")
    parser.add_argument("--split", default="val", help="shards to read with --run-dir")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", default="S", help="encoder size of the untrained tokenizer (no --run-dir)")
    parser.add_argument("--resolution", type=int, default=256, help="image size of the untrained tokenizer")
    parser.add_argument("--patch", type=int, default=8, help="patch size of the untrained tokenizer")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.compare == "cpu-cuda" and not torch.cuda.is_available():
        raise SystemExit("code_agreement.py compares CPU and GPU codes and needs a CUDA device; "
                         "torch.cuda.is_available() is False on this machine")
    exact_fp32()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.run_dir:
        tokenizer = load_tokenizer(local_folder(f"{args.run_dir.rstrip('/')}/{spec('tokenizer').folder}"))
        images = run_images(args.run_dir, args.split, args.images, tokenizer.settings.image_size)
        source = f"{args.run_dir} {args.split} shards, first {len(images)} images, plain view, its tokenizer"
    else:
        torch.manual_seed(0)
        tokenizer = ViTVQGAN(TokenizerSettings(image_size=args.resolution, patch_size=args.patch,
                                               encoder=args.size, decoder="tiny", codebook_size=8192)).eval()
        images = generated_images(args.images, args.resolution)
        source = "generated smooth images (8x8 noise, bicubic), untrained tokenizer (seed 0)"
    (first, first_device, first_linear), (second, second_device, second_linear) = COMPARISONS[args.compare]
    first_codes, first_seconds = encode_all(tokenizer, images, first_device, args.batch_size, first_linear)
    second_codes, second_seconds = encode_all(tokenizer, images, second_device, args.batch_size, second_linear)
    equal = first_codes == second_codes
    write_report(args.out, "code_agreement", {
        "compare": args.compare, "source": source, "images": len(images), "tokens_per_image": int(equal[0].size),
        "token_agreement": float(equal.mean()), "images_with_all_codes_equal": float(equal.all((1, 2)).mean()),
        "tokenizer": tokenizer.settings.model_dump(mode="json"),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "seconds": {first: first_seconds, second: second_seconds}, "cpu_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
