"""Training checkpoints: the released layout (``ema.safetensors``, ``model.safetensors``, ``ae.safetensors``,
configs, tokenizer) plus what resuming needs: optimizer state per rank (safetensors + JSON), scheduler,
step and data positions (``trainer_state.json``). A checkpoint is written into a temporary folder and
renamed when complete, so a run killed at any moment leaves only complete checkpoints; resuming picks the
newest. Nothing is unpickled: weights and optimizer tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..io.checkpoint import WEIGHT_FILES, atomic_save_safetensors, save_checkpoint
from ..modeling.config import UniMedVLConfig
from .distributed import DistInfo, barrier, full_tensor, is_dtensor

__all__ = ["EMA", "latest_checkpoint", "save_training_checkpoint", "optimizer_tensors", "restore_optimizer",
           "STATE_FILE", "prune_checkpoints", "load_optimizer_shard", "full_model_state"]

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^\d{7}$")


class EMA:
    """Exponential moving average of the trainable parameters (fp32); frozen ones keep their loaded
    values, as in the reference (docs/training.md)."""

    def __init__(self, model: torch.nn.Module, decay: float, initial: dict[str, torch.Tensor] | None = None):
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}
        self.trainable: set[str] = set()
        for name, param in model.named_parameters():
            source = initial[name] if initial is not None and name in initial else param.detach()
            value = source.to(torch.float32).clone()
            if is_dtensor(param) and not is_dtensor(value):  # a full tensor for a sharded parameter
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
            self.shadow[name] = value
            if param.requires_grad:
                self.trainable.add(name)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, param in model.named_parameters():
            if name in self.trainable:
                self.shadow[name].lerp_(param.detach().to(torch.float32), 1.0 - self.decay)

    def full_state(self) -> dict[str, torch.Tensor]:
        return {name: full_tensor(v).detach().cpu() for name, v in self.shadow.items()}


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded fp32 weights on the CPU (a collective under FSDP2)."""
    return {name: full_tensor(t).detach().to("cpu", torch.float32) for name, t in model.state_dict().items()}


def optimizer_tensors(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> tuple[dict, dict]:
    """This rank's AdamW state as named local tensors plus JSON metadata (param groups)."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, steps = {}, {}
    for param, state in optimizer.state.items():
        name = names[id(param)]
        for key, value in state.items():
            if key == "step":
                steps[name] = float(value)
            elif torch.is_tensor(value):
                local = value.to_local() if is_dtensor(value) else value
                tensors[f"{name}::{key}"] = local.detach().cpu()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return tensors, {"param_groups": groups, "steps": steps}


def restore_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, tensors: dict, meta: dict) -> None:
    params = dict(model.named_parameters())
    for name, step in meta["steps"].items():
        param = params[name]
        state = {"step": torch.tensor(step, dtype=torch.float32)}
        for key in ("exp_avg", "exp_avg_sq"):
            local = tensors[f"{name}::{key}"].to(param.device)
            if is_dtensor(param):
                from torch.distributed.tensor import DTensor

                local = DTensor.from_local(local, param.device_mesh, param.placements, run_check=False)
            state[key] = local
        optimizer.state[param] = state
    for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    if not ckpt_root.is_dir():
        return None
    done = [p for p in ckpt_root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name)) if done else None


def save_training_checkpoint(ckpt_root: Path, step: int, info: DistInfo, config: UniMedVLConfig,
                             model_state: dict | None, ema_state: dict | None, vae, tokenizer_dir: Path,
                             optimizer_state: tuple[dict, dict], trainer_state: dict, keep: int) -> Path:
    """Every rank calls this (each writes its optimizer shard); rank 0 writes the rest and publishes."""
    final = ckpt_root / f"{step:07d}"
    tmp = ckpt_root / f".{step:07d}.tmp"
    if info.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(info)
    tensors, meta = optimizer_state
    shard = f"optimizer.{info.rank:05d}-of-{info.world:05d}"
    atomic_save_safetensors(tensors, tmp / f"{shard}.safetensors")
    (tmp / f"{shard}.json").write_text(json.dumps(meta))
    barrier(info)
    if info.main:
        weights = {WEIGHT_FILES["ema"]: ema_state, WEIGHT_FILES["model"]: model_state}
        save_checkpoint(tmp, config, {k: v for k, v in weights.items() if v is not None}, vae,
                        tokenizer_dir=tokenizer_dir)
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        prune_checkpoints(ckpt_root, keep)
    barrier(info)
    return final


def load_optimizer_shard(ckpt: Path, info: DistInfo) -> tuple[dict, dict]:
    shard = f"optimizer.{info.rank:05d}-of-{info.world:05d}"
    if not (ckpt / f"{shard}.safetensors").is_file():
        raise FileNotFoundError(f"{ckpt} has no optimizer state for rank {info.rank} of {info.world} "
                                "(resume with the number of processes the run was started with)")
    return load_file(str(ckpt / f"{shard}.safetensors")), json.loads((ckpt / f"{shard}.json").read_text())


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    done = sorted((p for p in ckpt_root.iterdir() if _STEP_DIR.match(p.name)), key=lambda p: int(p.name))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
