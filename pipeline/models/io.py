"""A model on disk is two files in one folder: its settings (config.json) and its weights (model.safetensors).

The same for every model here: a model class is built from one settings object, kept as `model.settings`,
so the two files are all it takes to rebuild it, without the pipeline config or anything else.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, TypeVar

import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.models.settings import later_fields_at_default

SETTINGS_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"

# Keys older settings files may hold that no settings class reads any more (the tokenizer's unused "extra").
RETIRED_KEYS = ("extra",)

M = TypeVar("M", bound=nn.Module)


def save_weights(state_dict: Mapping[str, torch.Tensor], settings: BaseModel, folder: str | Path) -> None:
    """Write both files from a state dict and its settings (e.g. exporting a checkpoint without a model)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(folder / WEIGHTS_FILE))
    # Fields added later (NOBLE's) are written only when set: a model without them writes the file it always did.
    data = settings.model_dump(mode="json", exclude=set(later_fields_at_default(settings)))
    (folder / SETTINGS_FILE).write_text(json.dumps(data, indent=2, sort_keys=True))


def save_model(model: nn.Module, folder: str | Path) -> None:
    """Write a model's weights and its `settings`."""
    save_weights(model.state_dict(), model.settings, folder)


def read_settings(settings_class: type[BaseModel], folder: str | Path) -> BaseModel:
    data = json.loads((Path(folder) / SETTINGS_FILE).read_text())
    for key in RETIRED_KEYS:
        if key not in settings_class.model_fields:
            data.pop(key, None)
    return settings_class.model_validate(data)


def load_model(model_class: type[M], settings_class: type[BaseModel], folder: str | Path,
               device: str | torch.device = "cpu") -> M:
    """A model from its two files, on `device`, in eval mode."""
    model = model_class(read_settings(settings_class, folder))
    model.load_state_dict(load_file(str(Path(folder) / WEIGHTS_FILE)))
    return model.to(device).eval()
