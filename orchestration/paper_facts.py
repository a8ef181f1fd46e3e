"""The ViT-VQGAN paper's numbers that `jobs/paper_tables.py` sets its own beside (Yu et al., "Vector-quantized
Image Modeling with Improved VQGAN", ICLR 2022), as transcribed in the shared reference notes
(`../shared/reference/vim-facts.md`, sections 1.6 and 1.7). ImageNet at 256 px, 128 Cloud TPUv4 for the
throughputs; rFID there is Inception rFID, usage the share of codes used within a batch of 256 test images."""
from __future__ import annotations

SOURCE = "Yu et al. 2022 (ViT-VQGAN), Tables 1 and 4, via shared/reference/vim-facts.md sections 1.6-1.7"

# Table 4, codebook rows (Base encoder and decoder, ViT, StyleGAN discriminator): lookup dim, l2-normalised ->
# usage (fraction), rFID, IS, l2 loss (1e-3), logit-Laplace. The base row (32, l2) is the table's first.
TABLE4: dict[tuple[int, bool], dict[str, float]] = {
    (256, True): {"usage": 0.04, "rfid": 3.68, "is": 160.1, "l2": 4.28, "logit_laplace": -2.38},
    (128, True): {"usage": 0.14, "rfid": 2.77, "is": 173.9, "l2": 3.93, "logit_laplace": -2.44},
    (64, True): {"usage": 0.37, "rfid": 2.50, "is": 179.5, "l2": 3.37, "logit_laplace": -2.49},
    (32, True): {"usage": 0.96, "rfid": 1.55, "is": 190.2, "l2": 3.09, "logit_laplace": -2.54},
    (16, True): {"usage": 0.95, "rfid": 1.50, "is": 191.2, "l2": 2.96, "logit_laplace": -2.54},
    (8, True): {"usage": 0.96, "rfid": 1.52, "is": 189.5, "l2": 2.92, "logit_laplace": -2.55},
    (4, True): {"usage": 0.96, "rfid": 3.68, "is": 143.8, "l2": 4.18, "logit_laplace": -2.37},
    (32, False): {"usage": 0.02, "rfid": 5.44, "is": 123.6, "l2": 5.41, "logit_laplace": -2.20},
}

# Table 1 (speed and quality on the same 128 TPUv4), with the codebook usage of the same models from Table 4
# where it has them (the CNN x1 row is Table 4's architecture row: same throughput 946 and rFID 2.26).
TABLE1: list[dict[str, object]] = [
    {"model": "ViT-VQGAN Small-Small", "architecture": "vit", "images_per_second": 1520, "rfid": 1.99, "is": 184.4,
     "usage": 0.95},
    {"model": "CNN-VQGAN channels x1", "architecture": "cnn", "images_per_second": 946, "rfid": 2.26, "is": 178.7,
     "usage": 0.63},
    {"model": "ViT-VQGAN Base-Base", "architecture": "vit", "images_per_second": 960, "rfid": 1.55, "is": 190.2,
     "usage": 0.96},
    {"model": "CNN-VQGAN channels x2", "architecture": "cnn", "images_per_second": 400, "rfid": 1.91, "is": 183.4,
     "usage": None},
    {"model": "ViT-VQGAN Small-Large", "architecture": "vit", "images_per_second": 384, "rfid": 1.28, "is": 192.3,
     "usage": 0.95},
]

# What the paper's tables say, in the words the report checks at this scale.
TABLE4_CLAIMS = {
    "usage_falls_with_dim": "with l2 normalisation, codebook usage falls as the lookup dimension grows "
                            "(paper: 96% at 4-32, 37% at 64, 14% at 128, 4% at 256)",
    "l2_raises_usage": "l2 normalisation raises codebook usage (paper, at dim 32: 96% with it, 2% without)",
    "l2_improves_rfid": "l2 normalisation improves rFID (paper, at dim 32: 1.55 with it, 5.44 without)",
    "best_rfid_small_dim": "rFID is best at a small lookup dimension, 8-16, not at the smallest nor the largest "
                           "(paper: 1.50-1.52 at 8-16, 3.68 at 4 and at 256)",
}
TABLE1_CLAIMS = {
    "vit_better_rfid": "at equal throughput the ViT tokenizer reconstructs better than the CNN (paper: rFID 1.55 "
                       "for ViT Base-Base against 2.26 for CNN x1 at 960 vs 946 images/s)",
    "vit_higher_usage": "the ViT tokenizer uses more of its codebook than the CNN (paper: 96% against 63%)",
}
