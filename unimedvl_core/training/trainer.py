"""The curriculum trainer: one stage of the three-stage curriculum on packed sequences (docs/training.md).

Per step (``train_step``): VAE-encode the pack's images (frozen VAE, posterior sampled), noise the target
latents at their flow times (``modeling.flow_matching``), one forward over the packed sequence, CE + MSE
with weights, AdamW with warm-up, gradient clipping, EMA. The stage lifecycle (resume, checkpoints, metrics,
final folder) is the one every stage shares (``training.lifecycle``); a resumed run ends with the weights an
uninterrupted one would have (all randomness is a function of the run seed, the step and the data position).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..inference.model import UniMedVL
from ..io.checkpoint import TOKENIZER_FILES, VAE_FILE, WEIGHT_FILES, load_vae
from ..modeling.config import UniMedVLConfig
from ..modeling.flow_matching import flow_inputs, token_mean
from ..modeling.packing import Pack
from ..modeling.vae import patchify_latent, vae_encode
from .checkpointing import EMA, STATE_FILE, latest_checkpoint
from .config import OptimConfig, RecipeError, StageConfig, TrainConfig, load_registry
from .distributed import DistInfo, all_reduce_sum, barrier, gather_objects, wrap_model
from .lifecycle import CheckpointParts, StageRun, optimizer_and_schedule, stage_dir
from .stream import PackStream, TrainingPack, make_loader

__all__ = ["train_curriculum_stage", "train_step", "TrainState", "stage_dir", "initial_model", "apply_freezing",
           "encode_pack_latents"]

log = logging.getLogger(__name__)


def _previous_stage(cfg: TrainConfig, stage: int) -> int | None:
    earlier = [s for s in cfg.stages if s < stage]
    return max(earlier) if earlier else None


def initial_model(cfg: TrainConfig, stage: StageConfig) -> tuple[UniMedVL, dict | None, Path]:
    """Where a stage starts: the previous stage's final weights, a released-layout checkpoint, or a fresh
    model with the VAE and tokenizer of a VAE stage. Returns (model, initial EMA, tokenizer folder)."""
    prev = _previous_stage(cfg, stage.stage)
    if prev is not None:
        prev_final = stage_dir(cfg, prev) / "final"
        if not (prev_final / STATE_FILE).is_file() and not (prev_final / VAE_FILE).is_file():
            raise RecipeError(f"stage {prev} has not finished (no {prev_final}); run it first")
        if cfg.stages[prev].kind == "vae":
            if cfg.model.init_from:
                model = UniMedVL.from_pretrained(cfg.model.init_from, weights="ema", dtype=torch.float32,
                                                 device="cpu", progress=False)
                model.vae = load_vae(model.config, prev_final / VAE_FILE, torch.float32, torch.device("cpu"))
            else:
                config = UniMedVLConfig.from_dir(prev_final)
                model = UniMedVL.from_config(config, prev_final, seed=cfg.seed)
                model.vae = load_vae(config, prev_final / VAE_FILE, torch.float32, torch.device("cpu"))
            tokenizer_dir = prev_final
            ema = None
        else:
            model = UniMedVL.from_pretrained(prev_final, weights="model", dtype=torch.float32, device="cpu",
                                             progress=False)
            ema = load_file(str(prev_final / WEIGHT_FILES["ema"]))
            tokenizer_dir = prev_final
        return model, ema, tokenizer_dir
    if cfg.model.init_from:
        # Fine-tuning starts from the EMA weights (the reference's finetune_from_ema).
        model = UniMedVL.from_pretrained(cfg.model.init_from, weights="ema", dtype=torch.float32, device="cpu",
                                         progress=False)
        if cfg.model.init_moe:
            model.model.language_model.init_moe()
        return model, None, Path(cfg.model.init_from)
    raise RecipeError("stage has nothing to start from: give model.init_from (a checkpoint in the released layout) "
                      "or run a VAE stage before it")


def _stage_tokenizer(checkpoint: Path, stage_out: Path, info: DistInfo) -> Path:
    folder = stage_out / "tokenizer"
    if info.main:
        folder.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (checkpoint / name).is_file():
                shutil.copyfile(checkpoint / name, folder / name)
    barrier(info)
    return folder


def apply_freezing(model: torch.nn.Module, optim: OptimConfig) -> None:
    for name, param in model.named_parameters():
        frozen = name.endswith("pos_embed")  # fixed sin-cos tables
        if optim.freeze_vit and name.startswith("vit_model."):
            frozen = True
        if optim.freeze_llm and name.startswith("language_model."):
            frozen = True
        if optim.freeze_und and name.startswith("language_model.") and "_moe_gen" not in name:
            frozen = True  # the understanding expert, its embeddings, final norm and text head
        param.requires_grad_(not frozen)


@torch.no_grad()
def encode_pack_latents(tp: TrainingPack, vae, config: UniMedVLConfig, generator: torch.Generator,
                        device: torch.device) -> torch.Tensor:
    """Clean latent tokens of every VAE image of the pack, in order (posterior sampled, as in training)."""
    p = config.latent_patch_size
    tokens = []
    for image in tp.vae_images:
        latent = vae_encode(vae, image[None].to(device), config.vae, sample=True, generator=generator)[0]
        tokens.append(patchify_latent(latent.float(), p))
    return torch.cat(tokens) if tokens else torch.zeros(0, config.patch_latent_dim, device=device)


def _move_pack(tp: TrainingPack, device: torch.device) -> None:
    pack = tp.pack
    pack.vit_images = [img.to(device) for img in pack.vit_images]


@dataclass
class TrainState:
    """What an optimisation step changes: the network (as wrapped for data parallelism: its forward gives
    the loss sums), the unwrapped model, its EMA, the optimizer and the learning-rate schedule."""

    net: nn.Module
    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: object
    optim: OptimConfig
    trainable: list[nn.Parameter]
    info: DistInfo = field(default_factory=DistInfo)
    autocast: AbstractContextManager = field(default_factory=nullcontext)

    @classmethod
    def create(cls, net: nn.Module, optim: OptimConfig, steps: int, info: DistInfo | None = None,
               ema_init: dict | None = None, autocast: AbstractContextManager | None = None) -> TrainState:
        """EMA, AdamW and schedule over the trainable parameters of ``net`` (freezing applied before)."""
        model = net.module if hasattr(net, "module") else net
        ema = EMA(model, optim.ema, ema_init)
        trainable = [p for p in net.parameters() if p.requires_grad]
        optimizer, scheduler = optimizer_and_schedule(trainable, optim, steps, betas=optim.betas, eps=optim.eps,
                                                      weight_decay=optim.weight_decay)
        return cls(net, model, ema, optimizer, scheduler, optim, trainable, info or DistInfo(),
                   autocast or nullcontext())


def train_step(state: TrainState, pack: Pack, x0: torch.Tensor,
               generator: torch.Generator | None = None) -> dict[str, float]:
    """One optimisation step on one pack whose clean latent tokens are ``x0``: noise the targets, forward,
    CE + MSE normalised by the global token counts, backward, clip, optimizer and schedule step, EMA.
    Returns this rank's ``loss``, ``ce``, ``mse`` and the ``grad_norm`` before clipping."""
    info, optim = state.info, state.optim
    x_t, target = flow_inputs(x0, pack.vae_timesteps, pack.mse_index, generator)
    counts = all_reduce_sum(torch.tensor([len(pack.ce_index), len(pack.mse_index)], dtype=torch.float64,
                                         device=info.device), info)
    with state.autocast:
        sums = state.net(pack, x_t, target)
    ce = token_mean(sums["ce_sum"], counts[0], info.world)
    mse = token_mean(sums["mse_sum"], counts[1], info.world)
    loss = optim.ce_weight * ce + optim.mse_weight * mse
    values = {"loss": loss.item(), "ce": ce.item(), "mse": mse.item()}
    if not math.isfinite(values["loss"]):
        raise FloatingPointError(f"loss is {values['loss']} (ce {values['ce']}, mse {values['mse']}); lower the "
                                 "learning rate or check the data")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.trainable, optim.max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    state.optimizer.step()
    state.scheduler.step()
    state.ema.update(state.model)
    return {**values, "grad_norm": float(grad_norm)}


class CurriculumSteps:
    """The per-step work of a curriculum stage: next pack, its latents, ``train_step``; log rows; checkpoints
    with the data position."""

    def __init__(self, run: StageRun, state: TrainState, model: UniMedVL, batches, data_state: dict | None,
                 tokenizer_dir: Path):
        self.run, self.state, self.vae, self.config = run, state, model.vae, model.config
        self.batches, self.data_state = batches, data_state
        self.parts = CheckpointParts(model.config, model.vae, tokenizer_dir, state.optimizer, state.scheduler,
                                     state.model, state.model, state.ema)

    def step(self, step: int) -> dict:
        tp: TrainingPack = next(self.batches)
        self.data_state = tp.state
        device = self.run.info.device
        generator = torch.Generator(device=device).manual_seed(tp.noise_seed)
        _move_pack(tp, device)
        x0 = encode_pack_latents(tp, self.vae, self.config, generator, device)
        try:
            values = train_step(self.state, tp.pack, x0, generator)
        except FloatingPointError as err:
            raise FloatingPointError(f"stage {self.run.stage.stage} step {step + 1}: {err}") from None
        return {**values, "tokens": tp.pack.length}

    def summary(self, rows: list[dict], elapsed: float) -> dict:
        world, n = self.run.info.world, len(rows)
        mean = {k: sum(r[k] / world for r in rows) / n for k in ("loss", "ce", "mse")}
        return {**mean, "lr": self.state.scheduler.get_last_lr()[0], "grad_norm": rows[-1]["grad_norm"],
                "tokens_per_s": sum(r["tokens"] for r in rows) * world / max(elapsed, 1e-9),
                "skipped": sum(self.data_state.get("skipped", {}).values())}

    def save(self, done: int) -> None:
        cfg = self.run.cfg
        data = gather_objects(self.data_state, self.run.info)
        self.run.save(self.parts, done, {"data": data, "recipe": cfg.source, "seed": cfg.seed})


def train_curriculum_stage(cfg: TrainConfig, stage: StageConfig, info: DistInfo, progress: bool = True) -> Path:
    run = StageRun.open(cfg, stage, info)
    if run.finished:
        if info.main:
            log.info("stage %d already finished: %s", stage.stage, run.final)
        return run.final
    model, ema_init, tokenizer_dir = _starting_point(run)
    state = _train_state(run, model, ema_init)
    batches, data_state = _pack_batches(run, tokenizer_dir, model.config)
    steps = CurriculumSteps(run, state, model, batches, data_state, tokenizer_dir)
    run.run_steps(steps, f"stage {stage.stage}", progress)
    run.publish(lambda folder: shutil.copytree(latest_checkpoint(run.ckpt_root), folder))
    if info.main:
        skipped = json.loads((run.final / STATE_FILE).read_text())["data"][0].get("skipped", {})
        if skipped:
            log.warning("stage %d skipped samples: %s", stage.stage, skipped)
    return run.final


def _starting_point(run: StageRun) -> tuple[UniMedVL, dict | None, Path]:
    """(model, initial EMA, tokenizer folder): the checkpoint resumed from, else where the stage starts."""
    if run.resume is None:
        return initial_model(run.cfg, run.stage)
    model = UniMedVL.from_pretrained(run.resume, weights="model", dtype=torch.float32, device="cpu", progress=False)
    ema_init = load_file(str(run.resume / WEIGHT_FILES["ema"]))
    # Copy the tokenizer out of the checkpoint: pruning will delete the checkpoint we resume from.
    tokenizer_dir = _stage_tokenizer(run.resume, run.out, run.info)
    if run.info.main:
        log.info("resuming stage %d from %s (step %d)", run.stage.stage, run.resume, run.start)
    return model, ema_init, tokenizer_dir


def _train_state(run: StageRun, model: UniMedVL, ema_init: dict | None) -> TrainState:
    """Freezing, devices, data-parallel wrapping, EMA, optimizer and schedule, restored when resuming."""
    optim_cfg, info, parallel = run.cfg.optim_for(run.stage), run.info, run.cfg.parallel
    net = model.model
    apply_freezing(net, optim_cfg)
    net.to(info.device).train()
    model.vae.to(info.device).eval().requires_grad_(False)
    net = wrap_model(net, info, parallel.strategy, parallel.activation_checkpointing, parallel.mixed_precision)
    bf16 = info.device.type == "cuda" and parallel.mixed_precision == "bf16"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    state = TrainState.create(net, optim_cfg, run.stage.steps, info, ema_init, autocast)
    run.restore(state.optimizer, state.scheduler, state.model)
    return state


def _pack_batches(run: StageRun, tokenizer_dir: Path, config: UniMedVLConfig):
    """This rank's stream of packs, from the resumed data position; returns (iterator, that position)."""
    data_cfg, info = run.cfg.data_for(run.stage), run.info
    data_dir, groups = load_registry(_registry_path(data_cfg), data_cfg.data_dir)
    data_state = run.state["data"][info.rank] if run.state is not None else None
    stream = PackStream((groups, data_dir, run.stage.mixture), str(tokenizer_dir), config, data_cfg, run.cfg.seed,
                        run.stage.stage, info.rank, info.world, data_state)
    num_workers = 0 if data_cfg.loader == "dali" else data_cfg.num_workers
    return iter(make_loader(stream, num_workers)), data_state


def _registry_path(data_cfg) -> str:
    if not data_cfg.registry:
        raise RecipeError("data.registry is not set")
    return data_cfg.registry

