"""The curriculum trainer: one stage of the three-stage curriculum on packed sequences (spec 6.4).

Per step: VAE-encode the pack's images (frozen VAE, posterior sampled), noise the target latents at their
flow times, one forward over the packed sequence, CE + MSE with weights, AdamW with warm-up, gradient
clipping, EMA. Checkpoints (released layout plus optimizer, scheduler and data position) are atomic; a
stage resumes from its newest checkpoint, and a resumed run ends with the weights an uninterrupted one
would have (all randomness is a function of the run seed, the step and the data position).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

from ..checkpoint import TOKENIZER_FILES, VAE_FILE, WEIGHT_FILES, load_vae
from ..config import UniMedVLConfig
from ..model import UniMedVL
from ..modeling.vae import patchify_latent, vae_encode
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
from .config import OptimConfig, RecipeError, StageConfig, TrainConfig, load_registry
from .distributed import DistInfo, all_reduce_sum, barrier, gather_objects, wrap_model
from .metrics import MetricsLog
from .stream import PackStream, TrainingPack, make_loader

__all__ = ["train_curriculum_stage", "stage_dir", "initial_model", "apply_freezing", "encode_pack_latents"]

log = logging.getLogger(__name__)


def stage_dir(cfg: TrainConfig, stage: int) -> Path:
    return Path(cfg.run_dir) / f"stage{stage}"


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


def lr_schedule(optimizer, optim: OptimConfig, steps: int):
    if optim.lr_scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, optim.warmup_steps)
    if optim.lr_scheduler == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, optim.warmup_steps, steps, min_lr=optim.min_lr)
    raise RecipeError(f"lr_scheduler must be 'constant' or 'cosine', got {optim.lr_scheduler!r}")


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


def train_curriculum_stage(cfg: TrainConfig, stage: StageConfig, info: DistInfo, progress: bool = True) -> Path:
    out = stage_dir(cfg, stage.stage)
    final = out / "final"
    if (final / STATE_FILE).is_file():
        if info.main:
            log.info("stage %d already finished: %s", stage.stage, final)
        return final
    optim_cfg, data_cfg = cfg.optim_for(stage), cfg.data_for(stage)
    ckpt_root = out / "checkpoints"
    resume = latest_checkpoint(ckpt_root)
    if resume is not None:
        state = json.loads((resume / STATE_FILE).read_text())
        model = UniMedVL.from_pretrained(resume, weights="model", dtype=torch.float32, device="cpu", progress=False)
        ema_init = load_file(str(resume / WEIGHT_FILES["ema"]))
        # Copy the tokenizer out of the checkpoint: pruning will delete the checkpoint we resume from.
        tokenizer_dir, start = _stage_tokenizer(resume, out, info), int(state["step"])
        if info.main:
            log.info("resuming stage %d from %s (step %d)", stage.stage, resume, start)
    else:
        state = None
        model, ema_init, tokenizer_dir = initial_model(cfg, stage)
        start = 0
    config = model.config
    net, vae = model.model, model.vae
    apply_freezing(net, optim_cfg)
    net.to(info.device).train()
    vae.to(info.device).eval().requires_grad_(False)
    net = wrap_model(net, info, cfg.parallel.strategy, cfg.parallel.activation_checkpointing,
                     cfg.parallel.mixed_precision)
    raw = net.module if hasattr(net, "module") else net
    ema = EMA(raw, optim_cfg.ema, ema_init)
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=optim_cfg.lr, betas=optim_cfg.betas, eps=optim_cfg.eps,
                                  weight_decay=optim_cfg.weight_decay)
    scheduler = lr_schedule(optimizer, optim_cfg, stage.steps)
    if state is not None:
        restore_optimizer(optimizer, raw, *load_optimizer_shard(resume, info))
        scheduler.load_state_dict(state["scheduler"])

    data_dir, groups = load_registry(_registry_path(data_cfg), data_cfg.data_dir)
    data_state = state["data"][info.rank] if state is not None else None
    stream = PackStream((groups, data_dir, stage.mixture), str(tokenizer_dir), config, data_cfg, cfg.seed,
                        stage.stage, info.rank, info.world, data_state)
    num_workers = 0 if data_cfg.loader == "dali" else data_cfg.num_workers
    batches = iter(make_loader(stream, num_workers))

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if info.device.type == "cuda" and \
        cfg.parallel.mixed_precision == "bf16" else nullcontext()
    metrics = MetricsLog(out, info.main, resume_step=start)
    bar = tqdm(total=stage.steps, initial=start, desc=f"stage {stage.stage}", disable=not (progress and info.main))
    last_state, window = data_state, {"loss": 0.0, "ce": 0.0, "mse": 0.0, "tokens": 0, "n": 0}
    t_window = time.perf_counter()
    for step in range(start, stage.steps):
        tp: TrainingPack = next(batches)
        last_state = tp.state
        generator = torch.Generator(device=info.device).manual_seed(tp.noise_seed)
        _move_pack(tp, info.device)
        x0 = encode_pack_latents(tp, vae, config, generator, info.device)
        pack = tp.pack
        t = pack.vae_timesteps.to(info.device)[:, None]
        eps = torch.randn(x0.shape, generator=generator, device=info.device)
        x_t = (1 - t) * x0 + t * eps
        mse_rows = pack.mse_index.to(info.device)
        target = (eps - x0)[mse_rows]
        counts = all_reduce_sum(torch.tensor([len(pack.ce_index), len(pack.mse_index)], dtype=torch.float64,
                                             device=info.device), info)
        with autocast:
            out_ = net(pack, x_t, target)
        world = info.world
        ce = out_["ce_sum"] * world / counts[0].clamp(min=1)
        mse = out_["mse_sum"] * world / counts[1].clamp(min=1)
        loss = optim_cfg.ce_weight * ce + optim_cfg.mse_weight * mse
        loss_value, ce_value, mse_value = loss.item(), ce.item(), mse.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"stage {stage.stage} step {step + 1}: loss is {loss_value} (ce {ce_value}, "
                                     f"mse {mse_value}); lower the learning rate or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, optim_cfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        scheduler.step()
        ema.update(raw)

        window["loss"] += loss_value / world
        window["ce"] += ce_value / world
        window["mse"] += mse_value / world
        window["tokens"] += pack.length
        window["n"] += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == stage.steps:
            elapsed = time.perf_counter() - t_window
            row = {"step": done, "loss": window["loss"] / window["n"], "ce": window["ce"] / window["n"],
                   "mse": window["mse"] / window["n"], "lr": scheduler.get_last_lr()[0],
                   "grad_norm": float(grad_norm), "tokens_per_s": window["tokens"] * world / max(elapsed, 1e-9),
                   "skipped": sum(last_state.get("skipped", {}).values())}
            metrics.log(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}", mse=f"{row['mse']:.3f}")
            window = {k: 0 if k in ("tokens", "n") else 0.0 for k in window}
            t_window = time.perf_counter()
        bar.update(1)
        if done % cfg.checkpoint.save_every == 0 or done == stage.steps:
            _save(ckpt_root, done, info, config, raw, ema, vae, tokenizer_dir, optimizer, scheduler, last_state,
                  cfg, stage)
    bar.close()
    metrics.close()
    final_ckpt = latest_checkpoint(ckpt_root)
    if info.main:
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(final_ckpt, final)
        metrics.plot(out / "loss.png")
        skipped = json.loads((final / STATE_FILE).read_text())["data"][0].get("skipped", {})
        if skipped:
            log.warning("stage %d skipped samples: %s", stage.stage, skipped)
    barrier(info)
    return final


def _save(ckpt_root, step, info, config, raw, ema, vae, tokenizer_dir, optimizer, scheduler, data_state, cfg, stage):
    model_state = full_model_state(raw)
    ema_state = ema.full_state()
    data_states = gather_objects(data_state, info)
    trainer_state = {"step": step, "stage": stage.stage, "scheduler": scheduler.state_dict(), "data": data_states,
                     "world": info.world, "recipe": cfg.source, "seed": cfg.seed}
    save_training_checkpoint(ckpt_root, step, info, config, model_state if info.main else None,
                             ema_state if info.main else None, vae, Path(tokenizer_dir),
                             optimizer_tensors(optimizer, raw), trainer_state, cfg.checkpoint.keep)


def _registry_path(data_cfg) -> str:
    if not data_cfg.registry:
        raise RecipeError("data.registry is not set")
    return data_cfg.registry

