"""Training state to and from a folder: models, optimizers, the position in the data and every rank's RNG,
all loadable with `torch.load(weights_only=True)` (no pickled code)."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

STATE_FILE = "state.pt"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class TrainState:
    """What a training checkpoint holds, as torchtitan's `Stateful` components do: named components that
    give and take a `state_dict` (models, optimizers), the position in the data (step, epoch, batches used
    in that epoch), a loop's own counters, and the RNG of every rank, so a resumed run draws what the
    uninterrupted one would have drawn."""

    def __init__(self, counters: dict[str, int] | None = None, **components: Stateful | None):
        self.components = {name: part for name, part in components.items() if part is not None}
        self.counters = dict(counters or {})
        self.step = self.epoch = self.batch_in_epoch = 0

    @property
    def collective(self) -> bool:
        """Whether `state_dict` gathers across ranks (a component with `collective = True`, such as a sharded
        model's full state): then every rank calls it, and rank 0 alone gets the full state."""
        return any(getattr(part, "collective", False) for part in self.components.values())

    def state_dict(self, rng: list[dict[str, Any]]) -> dict[str, Any]:
        """Everything to checkpoint; `rng` holds one `rng_state()` per rank, in rank order."""
        state: dict[str, Any] = {name: _on_cpu(part) for name, part in self.components.items()}
        state.update(step=self.step, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch,
                     counters=dict(self.counters), rng=rng)
        return state

    def load_state_dict(self, state: dict[str, Any], rank: int) -> None:
        for name, part in self.components.items():
            part.load_state_dict(state[name])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.counters.update(state.get("counters", {}))
        rngs = state["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])  # a larger world: new ranks start as rank 0


def _on_cpu(part: Stateful) -> dict[str, Any]:
    """A module's tensors copied to the CPU (a checkpoint must load on a machine without the device)."""
    if isinstance(part, torch.nn.Module):
        return {key: value.detach().cpu() for key, value in part.state_dict().items()}
    return part.state_dict()


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def all_rng_states(world: int) -> list[dict[str, Any]]:
    """Every rank's `rng_state()`, in rank order; a collective call when the process group is up."""
    own = rng_state()
    if world == 1 or not dist.is_initialized():
        return [own]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, own)
    return gathered


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(folder: str | Path, state: dict[str, Any]) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    torch.save(state, Path(folder) / STATE_FILE)


def load_state(folder: str | Path) -> dict[str, Any]:
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
