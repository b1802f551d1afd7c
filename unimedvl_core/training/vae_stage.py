"""Stage 0 for models trained from scratch: the FLUX-architecture autoencoder and the tokenizer.

The released model reuses the FLUX VAE and the Qwen2.5 tokenizer; a new small model has neither. This
stage trains the autoencoder (L1 + MSE reconstruction, a small KL term) on every image the registry
refers to, measures the latent mean and standard deviation to set ``shift_factor`` and ``scale_factor``
(as FLUX did for its VAE), and trains a byte-level BPE tokenizer on the registry's text. Its ``final``
folder holds the model configuration, ``ae.safetensors`` and the tokenizer for stage 1.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..checkpoint import VAE_FILE, load_vae, save_checkpoint
from ..config import UniMedVLConfig
from ..modeling.vae import build_vae, flux_to_diffusers
from ..preprocessing import resize_to_rule, to_model_tensor, to_rgb
from ..tokenizer import train_tokenizer
from .checkpointing import (
    STATE_FILE,
    latest_checkpoint,
    load_optimizer_shard,
    optimizer_tensors,
    restore_optimizer,
    save_training_checkpoint,
)
from .config import RecipeError, StageConfig, TrainConfig, load_registry
from .datasets import RecordError, open_rows, record_plan
from .distributed import DistInfo, barrier, replicate
from .metrics import MetricsLog
from .trainer import lr_schedule, stage_dir

__all__ = ["train_vae_stage", "collect_images_and_texts"]

log = logging.getLogger(__name__)


def collect_images_and_texts(groups: dict, data_dir: Path, limit: int = 200_000) -> tuple[list, list[str]]:
    """Every distinct image and every text of the registry's records (up to ``limit`` records per group)."""
    images, seen, texts = [], set(), []
    rng = np.random.default_rng(0)
    for group in groups.values():
        rows = open_rows(group, data_dir)
        image_dir = data_dir / group.get("image_dir", "images")
        for row in range(min(len(rows), limit)):
            try:
                items, sources = record_plan(group["format"], rows[row], image_dir, rng)
            except RecordError:
                continue
            texts.extend(item.text for item in items if item.kind == "text" and item.text)
            for source in sources:
                key = str(source.path) if source.path is not None else hash(source.data)
                if key not in seen:
                    seen.add(key)
                    images.append(source)
    return images, texts


class AutoencoderTraining(torch.nn.Module):
    """One forward for data-parallel training: reconstruction from a sampled posterior, and its KL."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator, device=x.device)
        return self.vae.decode(z).sample, posterior.kl().mean()


def _batch(sources, indices, rule, size: int, rng: np.random.Generator) -> torch.Tensor:
    out = []
    for i in indices:
        try:
            img = resize_to_rule(to_rgb(sources[i].open()), rule)
        except RecordError as err:
            log.warning("VAE stage skips an image: %s", err)
            continue
        x = to_model_tensor(img)
        _, h, w = x.shape
        if h < size or w < size:
            x = F.pad(x, (0, max(0, size - w), 0, max(0, size - h)), value=-1.0)
            _, h, w = x.shape
        top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        out.append(x[:, top:top + size, left:left + size])
    if not out:
        raise RecordError("no readable image in the batch")
    return torch.stack(out)


def train_vae_stage(cfg: TrainConfig, stage: StageConfig, info: DistInfo, progress: bool = True) -> Path:
    out = stage_dir(cfg, stage.stage)
    final = out / "final"
    if (final / STATE_FILE).is_file():
        return final
    if not cfg.model.preset:
        raise RecipeError("a VAE stage needs model.preset (the geometry of the model being built)")
    config = UniMedVLConfig.from_preset(cfg.model.preset)
    optim_cfg, data_cfg = cfg.optim_for(stage), cfg.data_for(stage)
    data_dir, groups = load_registry(data_cfg.registry, data_cfg.data_dir)
    sources, texts = collect_images_and_texts(groups, data_dir)
    if not sources:
        raise RecipeError(f"no images found through the registry {data_cfg.registry} in {data_dir}")

    tokenizer_dir = out / "tokenizer"
    if info.main and not (tokenizer_dir / "tokenizer.json").is_file():
        if cfg.model.tokenizer in (None, "build"):
            train_tokenizer(texts, tokenizer_dir, vocab_size=cfg.model.tokenizer_vocab_size)
        else:
            shutil.copytree(cfg.model.tokenizer, tokenizer_dir, dirs_exist_ok=True)
    barrier(info)

    ckpt_root = out / "checkpoints"
    resume = latest_checkpoint(ckpt_root)
    if resume is not None:
        vae = load_vae(config, resume / VAE_FILE, torch.float32, info.device)
        start = json.loads((resume / STATE_FILE).read_text())["step"]
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            vae = build_vae(config.vae)
        if cfg.model.init_from:
            state = flux_to_diffusers(load_file(str(Path(cfg.model.init_from) / VAE_FILE)), config.vae)
            vae.load_state_dict(state, strict=True)
        start = 0
    vae.to(info.device).train().requires_grad_(True)
    net = replicate(AutoencoderTraining(vae), info)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=optim_cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    scheduler = lr_schedule(optimizer, optim_cfg, stage.steps)
    if resume is not None:
        restore_optimizer(optimizer, vae, *load_optimizer_shard(resume, info))
        scheduler.load_state_dict(json.loads((resume / STATE_FILE).read_text())["scheduler"])
    rule = config.transforms.gen_vae
    size = stage.crop_size or config.vae.resolution  # convolutions learn the same from crops, faster
    metrics = MetricsLog(out, info.main, resume_step=start)
    bar = tqdm(total=stage.steps, initial=start, desc=f"stage {stage.stage} (VAE)",
               disable=not (progress and info.main))
    kl_weight = 1e-6
    window = []
    for step in range(start, stage.steps):
        rng = np.random.default_rng([cfg.seed, stage.stage, info.rank, step])
        x = _batch(sources, rng.integers(len(sources), size=stage.batch_size), rule, size, rng).to(info.device)
        g = torch.Generator(device=info.device).manual_seed(int(rng.integers(2**62)))
        recon, kl = net(x, g)
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        window.append(loss.item())
        done = step + 1
        if done % cfg.log_every == 0 or done == stage.steps:
            metrics.log({"step": done, "loss": float(np.mean(window)), "lr": optimizer.param_groups[0]["lr"]})
            bar.set_postfix(loss=f"{np.mean(window):.4f}")
            window = []
        bar.update(1)
        if done % cfg.checkpoint.save_every == 0 or done == stage.steps:
            state = {"step": done, "stage": stage.stage, "world": info.world, "scheduler": scheduler.state_dict()}
            save_training_checkpoint(ckpt_root, done, info, config, None, None, vae, tokenizer_dir,
                                     optimizer_tensors(optimizer, vae), state, cfg.checkpoint.keep)
    bar.close()
    metrics.close()
    vae.eval()
    stats = _latent_stats(vae, sources, rule, config.vae.resolution, info.device, cfg.seed)
    config.vae.shift_factor = stats["mean"]
    config.vae.scale_factor = 1.0 / stats["std"]
    if info.main:
        tmp = out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_checkpoint(tmp, config, {}, vae, tokenizer_dir=tokenizer_dir)
        (tmp / "vae_stats.json").write_text(json.dumps({**stats, "vae_config": asdict(config.vae)}, indent=2))
        (tmp / STATE_FILE).write_text(json.dumps({"step": stage.steps, "stage": stage.stage, "kind": "vae"}))
        metrics.plot(out / "loss.png")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    barrier(info)
    return final


@torch.no_grad()
def _latent_stats(vae, sources, rule, size, device, seed: int, count: int = 512) -> dict:
    rng = np.random.default_rng([seed, 99])
    means = []
    indices = rng.permutation(len(sources))[:count]
    for start in range(0, len(indices), 64):
        x = _batch(sources, indices[start:start + 64], rule, size, rng).to(device)
        means.append(vae.encode(x).latent_dist.mean.float().cpu())
    z = torch.cat(means)
    return {"mean": float(z.mean()), "std": float(z.std()), "images": int(len(z))}
