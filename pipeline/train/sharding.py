"""Fully sharded data parallelism for the VIM Transformer through PyTorch's `fully_shard` (FSDP2), and the
checkpoint state of a model and its optimizer as full, unsharded tensors. Free of Ray: the Transformer stage,
the tests and the GPU benchmark share it.

`fully_shard` works in place: the module keeps its class, methods and parameter names, its parameters become
DTensors sharded along dim 0 over the ranks, and each block gathers its weights just for its own forward and
backward. Optimizer groups are therefore built after sharding, from the same names as on the plain model.

Checkpoints hold full tensors (gathered to rank 0's CPU), never shards: a checkpoint written by N ranks
loads into M ranks, into DDP, or into a plain model (the export, evaluation, sampling).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from pipeline.device import Backend

# Saving: every rank takes part in the gather, and only rank 0 receives the full tensors, on its CPU.
GATHER_TO_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Loading: every rank holds the full state (read from the checkpoint) and keeps its own shard of it.
LOAD_FULL = StateDictOptions(full_state_dict=True)


def mixed_precision(backend: Backend) -> MixedPrecisionPolicy:
    """bf16 weights in forward and backward with fp32 gradient reduction on CUDA; fp32 elsewhere (CPUs
    without bf16 units run bf16 matmul far slower than fp32)."""
    if backend.kind == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_transformer(model: nn.Module, backend: Backend) -> nn.Module:
    """Shard each Transformer block, then the root (embeddings, position tables, final norm, head), over every
    rank of the default process group; returns the same module object. Identical initial weights on every
    rank are expected (a shared seed), as each rank keeps its slice of its own copy."""
    mesh = init_device_mesh(backend.device.type, (dist.get_world_size(),))
    policy = mixed_precision(backend)
    blocks = list(model.blocks)
    for index, block in enumerate(blocks):
        # The last block's weights would be gathered again at once for the backward: keep them.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=index < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` went through `fully_shard` (its forward then needs every rank)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


class FullModelState:
    """A model as a checkpoint component (`TrainState`): its full state dict on rank 0's CPU, whatever its
    sharding (plain, DDP's inner module, or FSDP2). A collective call: every rank calls `state_dict`, and
    every rank `load_state_dict` with the full state."""

    collective = True

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model, options=GATHER_TO_RANK0)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state, options=LOAD_FULL)


class FullOptimizerState:
    """An optimizer as a checkpoint component: its state keyed by parameter names (not positions), full
    tensors on rank 0's CPU; loads into any sharding of the same model. Collective like `FullModelState`."""

    collective = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer, options=GATHER_TO_RANK0)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, by_name(state, self.model, self.optimizer),
                                 options=LOAD_FULL)


def by_name(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A checkpoint written before optimizer states were keyed by name (`Optimizer.state_dict()`: parameters
    by position in the groups) in the by-name form, read with this optimizer's own order, which built those
    positions; a by-name state is returned as it is."""
    groups = state["param_groups"]
    if not groups or not groups[0]["params"] or isinstance(groups[0]["params"][0], str):
        return state
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    order = [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]
    return {"state": {order[int(index)]: value for index, value in state["state"].items()},
            "param_groups": [{**group, "params": [order[index] for index in group["params"]]} for group in groups]}
