"""Process groups and model wrapping on PyTorch's own engine: FSDP2 (``fully_shard``) or DDP under torchrun,
nothing in a single process. CPU runs use the gloo backend, GPUs NCCL."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn

__all__ = ["DistInfo", "init_distributed", "wrap_model", "replicate", "all_reduce_sum", "barrier", "gather_objects",
           "full_tensor", "is_dtensor"]


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device: str | None = None) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def wrap_model(model: nn.Module, info: DistInfo, strategy: str, activation_checkpointing: bool,
               mixed_precision: str | None) -> nn.Module:
    """Shard or replicate across ranks. FSDP2 shards each decoder layer, each ViT layer and the rest."""
    if activation_checkpointing:
        model.language_model.model.gradient_checkpointing = True
        # transformers' GradientCheckpointingLayer reads both attributes
        checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        for layer in model.vit_model.vision_model.encoder.layers:
            layer.gradient_checkpointing = True
            layer._gradient_checkpointing_func = checkpoint
    if not info.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    if strategy != "fsdp":
        raise ValueError(f"parallel strategy must be 'fsdp' or 'ddp', got {strategy!r}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world,))
    policy = MixedPrecisionPolicy()
    if info.device.type == "cuda" and mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.language_model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    for layer in model.vit_model.vision_model.encoder.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def replicate(model: nn.Module, info: DistInfo) -> nn.Module:
    """Plain data parallelism (DDP) for small modules such as the autoencoder."""
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def gather_objects(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a possibly sharded parameter (a collective for DTensors)."""
    return t.full_tensor() if is_dtensor(t) else t
