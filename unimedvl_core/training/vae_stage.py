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

from ..io.checkpoint import VAE_FILE, load_vae, save_checkpoint
from ..modeling.config import UniMedVLConfig
from ..modeling.preprocessing import resize_to_rule, to_model_tensor, to_rgb
from ..modeling.tokenizer import train_tokenizer
from ..modeling.vae import build_vae, flux_to_diffusers
from .checkpointing import STATE_FILE
from .config import RecipeError, StageConfig, TrainConfig, load_registry
from .datasets import RecordError, open_rows, record_plan
from .distributed import DistInfo, barrier, replicate
from .lifecycle import CheckpointParts, StageRun, optimizer_and_schedule

__all__ = ["train_vae_stage", "collect_images_and_texts"]

log = logging.getLogger(__name__)

KL_WEIGHT = 1e-6  # small: the latent stays close to a unit Gaussian without blurring reconstructions


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


class AutoencoderSteps:
    """The per-step work of the VAE stage: a batch of random crops, reconstruction + KL, one AdamW step."""

    def __init__(self, run: StageRun, net: torch.nn.Module, parts: CheckpointParts, sources: list, rule, size: int):
        self.run, self.net, self.parts = run, net, parts
        self.sources, self.rule, self.size = sources, rule, size

    def step(self, step: int) -> dict:
        run, vae, optimizer = self.run, self.parts.vae, self.parts.optimizer
        rng = np.random.default_rng([run.cfg.seed, run.stage.stage, run.info.rank, step])
        indices = rng.integers(len(self.sources), size=run.stage.batch_size)
        x = _batch(self.sources, indices, self.rule, self.size, rng).to(run.info.device)
        g = torch.Generator(device=run.info.device).manual_seed(int(rng.integers(2**62)))
        recon, kl = self.net(x, g)
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        self.parts.scheduler.step()
        return {"loss": loss.item()}

    def summary(self, rows: list[dict], elapsed: float) -> dict:
        return {"loss": float(np.mean([r["loss"] for r in rows])), "lr": self.parts.optimizer.param_groups[0]["lr"]}

    def save(self, done: int) -> None:
        self.run.save(self.parts, done)


def train_vae_stage(cfg: TrainConfig, stage: StageConfig, info: DistInfo, progress: bool = True) -> Path:
    run = StageRun.open(cfg, stage, info)
    if run.finished:
        return run.final
    if not cfg.model.preset:
        raise RecipeError("a VAE stage needs model.preset (the geometry of the model being built)")
    config = UniMedVLConfig.from_preset(cfg.model.preset)
    optim_cfg, data_cfg = cfg.optim_for(stage), cfg.data_for(stage)
    data_dir, groups = load_registry(data_cfg.registry, data_cfg.data_dir)
    sources, texts = collect_images_and_texts(groups, data_dir)
    if not sources:
        raise RecipeError(f"no images found through the registry {data_cfg.registry} in {data_dir}")
    tokenizer_dir = _stage_tokenizer(run, texts)
    vae = _starting_vae(run, config)
    vae.to(info.device).train().requires_grad_(True)
    net = replicate(AutoencoderTraining(vae), info)
    optimizer, scheduler = optimizer_and_schedule(vae.parameters(), optim_cfg, stage.steps, betas=(0.9, 0.99),
                                                  weight_decay=0.0)
    run.restore(optimizer, scheduler, vae)
    parts = CheckpointParts(config, vae, tokenizer_dir, optimizer, scheduler, vae)
    rule = config.transforms.gen_vae
    size = stage.crop_size or config.vae.resolution  # convolutions learn the same from crops, faster
    run.run_steps(AutoencoderSteps(run, net, parts, sources, rule, size), f"stage {stage.stage} (VAE)", progress)
    vae.eval()
    stats = _latent_stats(vae, sources, rule, config.vae.resolution, info.device, cfg.seed)
    config.vae.shift_factor = stats["mean"]
    config.vae.scale_factor = 1.0 / stats["std"]

    def write_final(folder: Path) -> None:
        save_checkpoint(folder, config, {}, vae, tokenizer_dir=tokenizer_dir)
        (folder / "vae_stats.json").write_text(json.dumps({**stats, "vae_config": asdict(config.vae)}, indent=2))
        (folder / STATE_FILE).write_text(json.dumps({"step": stage.steps, "stage": stage.stage, "kind": "vae"}))

    return run.publish(write_final)


def _stage_tokenizer(run: StageRun, texts: list[str]) -> Path:
    """The stage's tokenizer: trained on the registry's text, or copied from ``model.tokenizer``."""
    tokenizer_dir = run.out / "tokenizer"
    model_cfg = run.cfg.model
    if run.info.main and not (tokenizer_dir / "tokenizer.json").is_file():
        if model_cfg.tokenizer in (None, "build"):
            train_tokenizer(texts, tokenizer_dir, vocab_size=model_cfg.tokenizer_vocab_size)
        else:
            shutil.copytree(model_cfg.tokenizer, tokenizer_dir, dirs_exist_ok=True)
    barrier(run.info)
    return tokenizer_dir


def _starting_vae(run: StageRun, config: UniMedVLConfig):
    """The autoencoder of the checkpoint resumed from, else a fresh one seeded by the run (FLUX weights when
    ``model.init_from`` is given)."""
    if run.resume is not None:
        return load_vae(config, run.resume / VAE_FILE, torch.float32, run.info.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.cfg.seed)
        vae = build_vae(config.vae)
    if run.cfg.model.init_from:
        state = flux_to_diffusers(load_file(str(Path(run.cfg.model.init_from) / VAE_FILE)), config.vae)
        vae.load_state_dict(state, strict=True)
    return vae


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
