"""Every chip of every TPU host through torch_xla SPMD, free of Ray.

One process per host drives all of that host's chips. After `enable()` the process sees one virtual XLA
device that stands for every chip of every host, and torch_xla compiles one program per step that runs on
all of them (the same program on every host; the compiler inserts the collectives). The global mesh
spans all chips with the axes ("data", "fsdp"):

- data parallel (`transformer.parallelism: ddp`): mesh (N, 1), parameters replicated on every chip, each
  step's batch split over the N chips; the gradient all-reduce is the compiler's, not `xm.optimizer_step`'s.
- fully sharded (`fsdp`, the Large size): mesh (1, N), each parameter sharded along its largest dimension
  over the N chips (torch_xla's FSDPv2), the batch split the same way; the optimizer state takes its
  parameter's sharding.

Each host hands over only its own share of the batch (`shard_batch`); torch_xla assembles the global batch
from the hosts' shares. Checkpoints hold full, unsharded CPU tensors (the `TrainState` format of every
backend), so they load on any device or host count, and into the plain model for the export.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)  # a batch is split over both axes: over every chip, whichever mesh shape


def enable() -> None:
    """SPMD for this process; must come before any tensor reaches the XLA device."""
    import torch_xla.runtime as xr

    if not xr.is_spmd():
        xr.use_spmd()


def device_counts() -> tuple[int, int]:
    """(chips of every host in the mesh, chips this process drives)."""
    import torch_xla.runtime as xr

    return xr.global_runtime_device_count(), xr.addressable_runtime_device_count()


def check_one_mesh(workers: int) -> None:
    """Every worker's chips must be in this process's mesh. Hosts of separate TPU slices each see only their
    own chips: each would then step on its own share of the batch alone, as unsynchronised replicas."""
    mesh_chips, chips = device_counts()
    if mesh_chips != workers * chips:
        raise RuntimeError(f"{workers} workers of {chips} devices each, but torch_xla's mesh holds {mesh_chips}: "
                           "the workers must be the hosts of one TPU slice (one worker per host)")


def build_mesh(fully_sharded: bool):
    """The global mesh over every chip, set as torch_xla's global mesh: (N, 1) to replicate parameters,
    (1, N) to shard them."""
    import torch_xla.distributed.spmd as xs

    count = device_counts()[0]
    mesh = xs.Mesh(np.arange(count), (1, count) if fully_sharded else (count, 1), (DATA, FSDP))
    xs.set_global_mesh(mesh)
    return mesh


def global_mesh():
    import torch_xla.distributed.spmd as xs

    return xs.get_global_mesh() or build_mesh(fully_sharded=False)


def shard_model(model: nn.Module, fully_sharded: bool) -> nn.Module:
    """What the training step calls: `model` itself when replicated, or torch_xla's FSDPv2 wrapper around it,
    which shards every parameter of `model` in place (names and objects unchanged, so optimizer groups,
    checkpoints and the export keep using `model`) and the output's batch dimension."""
    mesh = build_mesh(fully_sharded)
    if not fully_sharded:
        return model
    from torch_xla.experimental.spmd_fully_sharded_data_parallel import SpmdFullyShardedDataParallel

    return SpmdFullyShardedDataParallel(model, mesh=mesh, extra_data_axis=DATA)


def shard_batch(tensor: torch.Tensor) -> torch.Tensor:
    """This host's share of a batch (dim 0) onto the device, split over its chips; with H hosts the step
    sees the H shares as one global batch. The share's rows must divide by the host's chip count."""
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.distributed.spmd as xs

    spec = xs.ShardingSpec(global_mesh(), (BATCH_AXES,) + (None,) * (tensor.dim() - 1), minibatch=True)
    return xm.send_cpu_data_to_device(tensor, torch_xla.device(), spec)[0]


def sharding_of(tensor: torch.Tensor) -> str:
    """torch_xla's sharding annotation of a device tensor, such as "{devices=[4,1]0,1,2,3}"; "" or
    "{replicated}" when every chip holds all of it."""
    import torch_xla

    return torch_xla._XLAC._get_xla_sharding_spec(tensor)


def local_shard_shapes(tensor: torch.Tensor) -> list[tuple[int, ...]]:
    """The shape each of this host's chips holds of `tensor`, padding left out (the full shape on every chip
    when replicated)."""
    from torch_xla.distributed.spmd import XLAShardedTensor

    return [tuple(shard.unpadded_data.shape) for shard in XLAShardedTensor(tensor).local_shards]


def _fully_sharded() -> bool:
    import torch_xla.distributed.spmd as xs

    mesh = xs.get_global_mesh()
    return mesh is not None and mesh.shape()[FSDP] > 1


def _shard_like_fsdp(tensor: torch.Tensor) -> None:
    """FSDPv2's placement for a parameter-shaped tensor (its largest dimension over "fsdp"), when the model
    is fully sharded: what a parameter or a moment loses when a checkpoint is copied into it."""
    import torch_xla.distributed.spmd as xs
    from torch_xla.experimental.spmd_fully_sharded_data_parallel import _prepare_spmd_partition_spec

    if not _fully_sharded() or tensor.dim() == 0:
        return
    xs.clear_sharding(tensor)
    xs.mark_sharding(tensor, global_mesh(), _prepare_spmd_partition_spec(tensor, shard_maximal=True))


def _to_cpu(value: Any) -> Any:
    """Tensors of a (nested) state dict gathered to full CPU tensors, copies even of CPU tensors (AdamW's
    step counts), so the state does not move on with the training."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


class ModelState:
    """A model on the XLA device as a checkpoint component (`TrainState`): full CPU tensors, whatever its
    sharding. Reading a tensor sharded across hosts runs a gathering program on every host, hence
    `collective`: every rank calls `state_dict` (rank 0 keeps the result)."""

    collective = True

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return _to_cpu(self.model.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = self.model.state_dict(keep_vars=True)
        if set(own) != set(state):
            raise KeyError(f"checkpoint and model disagree on {sorted(set(own) ^ set(state))[:5]}")
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(state[name].to(tensor.device))
        for parameter in self.model.parameters():  # FSDPv2 shards parameters, not buffers
            _shard_like_fsdp(parameter)


class OptimizerState:
    """An optimizer of a model on the XLA device as a checkpoint component: its state as full CPU tensors;
    on loading, each moment takes its parameter's sharding again. Collective like `ModelState`."""

    collective = True

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return _to_cpu(self.optimizer.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)  # moves each moment to its parameter's device
        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                for value in self.optimizer.state.get(parameter, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
                        _shard_like_fsdp(value)
