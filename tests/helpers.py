"""Small helpers shared by the Ray Train stage tests."""
from __future__ import annotations

import json
import time
from pathlib import Path

PRETOKENIZE_TINY = ["ingest.max_images_per_split=256", "ingest.shard_size=64", "ingest.resolution=16",
                    "ingest.cpus_per_task=0.5", "tokenizer.image_size=16", "tokenizer.codebook_size=64",
                    "tokenizer.steps=30", "tokenizer.batch_size=16", "tokenizer.adversarial_weight=0",
                    "tokenizer.val_images=64", "tokenizer.log_every=10", "tokenizer.resources.num_workers=1",
                    "pretokenize.views=[plain,hflip]", "pretokenize.rows_per_file=100", "pretokenize.piece_images=128",
                    "pretokenize.batch_size=64", "pretokenize.cpus_per_actor=0.5", "pretokenize.cpus_per_task=0.5"]


def checkpoint_registered(stage_folder: Path) -> bool:
    """True once the Train controller has registered a checkpoint (its snapshot names one). A worker
    killed between a checkpoint's upload and its registration rightly restarts from scratch."""
    for snapshot in (stage_folder / "checkpoints").glob("*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except (OSError, ValueError):  # being rewritten
            pass
    return False


def wait_for_checkpoint(stage_folder: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not checkpoint_registered(stage_folder):
        if time.time() > deadline:
            raise TimeoutError(f"no checkpoint appeared under {stage_folder}")
        time.sleep(0.05)
