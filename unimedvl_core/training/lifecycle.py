"""The lifecycle every training stage shares, the VAE stage and the curriculum stages alike (docs/training.md).

A stage resumes from its newest complete checkpoint (weights, optimizer, scheduler and step), runs its
steps with a metrics log and a progress bar, writes an atomic checkpoint every ``save_every`` steps and at
the end, and publishes its ``final`` folder through a temporary one, so a finished stage is complete. What
a step does, what a log row holds and what a checkpoint adds is the stage's own (``StageSteps``).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

from ..modeling.config import UniMedVLConfig
from .checkpointing import (
    EMA,
    STATE_FILE,
    full_model_state,
    latest_checkpoint,
    load_optimizer_shard,
    optimizer_tensors,
    restore_optimizer,
    save_training_checkpoint,
)
from .config import OptimConfig, RecipeError, StageConfig, TrainConfig
from .distributed import DistInfo, barrier
from .metrics import MetricsLog, plot_metrics

__all__ = ["StageRun", "StageSteps", "CheckpointParts", "stage_dir", "lr_schedule", "optimizer_and_schedule"]


def stage_dir(cfg: TrainConfig, stage: int) -> Path:
    return Path(cfg.run_dir) / f"stage{stage}"


@dataclass
class StageRun:
    """One stage of a run: where it writes, and the checkpoint it resumes from (None: a fresh start)."""

    cfg: TrainConfig
    stage: StageConfig
    info: DistInfo
    resume: Path | None = None
    state: dict | None = None          # trainer_state.json of ``resume``

    @classmethod
    def open(cls, cfg: TrainConfig, stage: StageConfig, info: DistInfo) -> StageRun:
        resume = latest_checkpoint(stage_dir(cfg, stage.stage) / "checkpoints")
        state = json.loads((resume / STATE_FILE).read_text()) if resume is not None else None
        return cls(cfg, stage, info, resume, state)

    @property
    def out(self) -> Path:
        return stage_dir(self.cfg, self.stage.stage)

    @property
    def final(self) -> Path:
        return self.out / "final"

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    @property
    def finished(self) -> bool:
        return (self.final / STATE_FILE).is_file()

    @property
    def start(self) -> int:
        """The first step to run: the resumed checkpoint's step, else 0."""
        return int(self.state["step"]) if self.state is not None else 0

    def restore(self, optimizer, scheduler, module: nn.Module) -> None:
        """Optimizer and scheduler state of the checkpoint resumed from (nothing on a fresh start);
        ``module`` names the optimizer's parameters."""
        if self.resume is not None:
            restore_optimizer(optimizer, module, *load_optimizer_shard(self.resume, self.info))
            scheduler.load_state_dict(self.state["scheduler"])

    def run_steps(self, steps: StageSteps, desc: str, progress: bool = True) -> None:
        """Steps from the resumed one to the stage's last, logging every ``log_every`` and saving every
        ``save_every`` steps and at the end."""
        total, main = self.stage.steps, self.info.main
        metrics = MetricsLog(self.out, main, resume_step=self.start)
        bar = tqdm(total=total, initial=self.start, desc=desc, disable=not (progress and main))
        rows, t_window = [], time.perf_counter()
        for step in range(self.start, total):
            rows.append(steps.step(step))
            done = step + 1
            if done % self.cfg.log_every == 0 or done == total:
                row = {"step": done, **steps.summary(rows, time.perf_counter() - t_window)}
                metrics.log(row)
                bar.set_postfix({k: f"{row[k]:.4f}" for k in ("loss", "ce", "mse") if k in row})
                rows, t_window = [], time.perf_counter()
            bar.update(1)
            if done % self.cfg.checkpoint.save_every == 0 or done == total:
                steps.save(done)
        bar.close()
        metrics.close()

    def save(self, parts: CheckpointParts, step: int, extra_state: dict | None = None) -> Path:
        """An atomic checkpoint after ``step`` steps. Every rank calls this (weights are gathered
        collectively); ``extra_state`` joins trainer_state.json."""
        model_state = full_model_state(parts.model) if parts.model is not None else None
        ema_state = parts.ema.full_state() if parts.ema is not None else None
        trainer_state = {"step": step, "stage": self.stage.stage, "scheduler": parts.scheduler.state_dict(),
                         "world": self.info.world, **(extra_state or {})}
        main = self.info.main
        return save_training_checkpoint(self.ckpt_root, step, self.info, parts.config, model_state if main else None,
                                        ema_state if main else None, parts.vae, Path(parts.tokenizer_dir),
                                        optimizer_tensors(parts.optimizer, parts.optimized), trainer_state,
                                        self.cfg.checkpoint.keep)

    def publish(self, write: Callable[[Path], None]) -> Path:
        """The main rank has ``write`` fill a temporary folder, plots the loss curves and renames the folder
        to ``final``: a killed run never leaves a partial ``final``. Every rank waits for it."""
        if self.info.main:
            tmp = self.out / ".final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            write(tmp)
            plot_metrics(self.out / "metrics.jsonl", self.out / "loss.png")
            shutil.rmtree(self.final, ignore_errors=True)
            tmp.rename(self.final)
        barrier(self.info)
        return self.final


def lr_schedule(optimizer, optim: OptimConfig, steps: int):
    if optim.lr_scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, optim.warmup_steps)
    if optim.lr_scheduler == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, optim.warmup_steps, steps, min_lr=optim.min_lr)
    raise RecipeError(f"lr_scheduler must be 'constant' or 'cosine', got {optim.lr_scheduler!r}")


def optimizer_and_schedule(params: Iterable[nn.Parameter], optim: OptimConfig, steps: int, **adamw):
    """AdamW at the recipe's learning rate (``adamw``: its other settings) and the warm-up schedule."""
    optimizer = torch.optim.AdamW(params, lr=optim.lr, **adamw)
    return optimizer, lr_schedule(optimizer, optim, steps)


class StageSteps(Protocol):
    """What is particular to a stage inside the shared loop."""

    def step(self, step: int) -> dict:
        """Run step ``step`` (0-based); returns its values for the log window."""

    def summary(self, rows: list[dict], elapsed: float) -> dict:
        """The metrics row of a log window (``rows``: the values of its steps)."""

    def save(self, done: int) -> None:
        """Write the checkpoint after ``done`` steps."""


@dataclass
class CheckpointParts:
    """What a stage checkpoint holds besides its step: weights, optimizer and scheduler state."""

    config: UniMedVLConfig
    vae: nn.Module
    tokenizer_dir: Path
    optimizer: torch.optim.Optimizer
    scheduler: object
    optimized: nn.Module               # the module whose parameter names key the optimizer state
    model: nn.Module | None = None     # the unwrapped UniMedVLModel (None: the VAE stage)
    ema: EMA | None = None
