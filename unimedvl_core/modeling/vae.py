"""FLUX-style autoencoder as diffusers' ``AutoencoderKL`` (docs/checkpoint.md#vae), latent scaling and
latent patchification (docs/architecture.md#latent-path), and the key mapping between ``ae.safetensors`` and
diffusers names.

Loading uses diffusers' own converter; saving needs the inverse, which diffusers does not ship, so
``diffusers_to_flux_key`` is written here and tested as the exact inverse of the converter.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from .config import VAEConfig

if TYPE_CHECKING:  # diffusers is imported when a VAE is built or converted, not with this module
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

__all__ = ["build_vae", "vae_encode", "vae_decode", "patchify_latent", "unpatchify_latent", "flux_to_diffusers",
           "diffusers_to_flux", "diffusers_to_flux_key", "strip_module_prefixes"]


def build_vae(config: VAEConfig) -> AutoencoderKL:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    return AutoencoderKL(**config.to_diffusers())


def vae_encode(vae: AutoencoderKL, images: torch.Tensor, config: VAEConfig, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> scaled latents scale * (z - shift). Posterior mean unless ``sample``.

    Sampling draws mean + std * eps with the reference's unclamped std (diffusers clamps logvar, which the
    reference does not).
    """
    moments = vae.encode(images.to(vae.dtype)).latent_dist.parameters
    mean, logvar = torch.chunk(moments, 2, dim=1)
    z = mean
    if sample:
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * eps
    return config.scale_factor * (z - config.shift_factor)


def vae_decode(vae: AutoencoderKL, latents: torch.Tensor, config: VAEConfig) -> torch.Tensor:
    """Scaled latents (N, z, h, w) -> images (N, 3, 8h, 8w), unclamped."""
    z = latents.to(vae.dtype) / config.scale_factor + config.shift_factor
    return vae.decode(z).sample


def patchify_latent(latent: torch.Tensor, p: int) -> torch.Tensor:
    """(z, p*h, p*w) -> (h*w, p*p*z) tokens in (h, w, py, px, c) order."""
    z, hh, ww = latent.shape
    h, w = hh // p, ww // p
    x = latent[:, : h * p, : w * p].reshape(z, h, p, w, p)
    return x.permute(1, 3, 2, 4, 0).reshape(h * w, p * p * z)


def unpatchify_latent(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """(h*w, p*p*z) tokens -> (z, p*h, p*w): the exact inverse of ``patchify_latent``."""
    z = tokens.shape[-1] // (p * p)
    x = tokens.reshape(h, w, p, p, z)
    return x.permute(4, 0, 2, 1, 3).reshape(z, h * p, w * p)


def strip_module_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DDP-saved VAE files carry ``module.`` in their keys; the reference loader removes every occurrence."""
    return {k.replace("module.", ""): v for k, v in state.items()}


def flux_to_diffusers(state: dict[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(state, config.to_diffusers())


_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def diffusers_to_flux_key(key: str, num_levels: int) -> str:
    """One diffusers ``AutoencoderKL`` key -> its name in a FLUX ``ae.safetensors``."""
    part, rest = key.split(".", 1)
    rest = rest.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    m = re.match(r"down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.*)", rest)
    if m:
        level, kind, idx, tail = m.groups()
        rest = f"down.{level}.block.{idx}.{tail}" if kind == "resnets" else f"down.{level}.downsample.{tail}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)", rest)
    if m:
        level, kind, idx, tail = m.groups()
        level = num_levels - 1 - int(level)  # diffusers orders decoder levels from the bottom
        rest = f"up.{level}.block.{idx}.{tail}" if kind == "resnets" else f"up.{level}.upsample.{tail}"
    m = re.match(r"mid_block\.resnets\.(\d)\.(.*)", rest)
    if m:
        rest = f"mid.block_{int(m.group(1)) + 1}.{m.group(2)}"
    m = re.match(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", rest)
    if m:
        rest = f"mid.attn_1.{_ATTN[m.group(1)]}.{m.group(2)}"
    return f"{part}.{rest}"


def diffusers_to_flux(state: dict[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    """diffusers state dict -> FLUX layout; attention projections become 1x1 convolutions again."""
    out = {}
    n = len(config.ch_mult)
    for key, value in state.items():
        new = diffusers_to_flux_key(key, n)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out
