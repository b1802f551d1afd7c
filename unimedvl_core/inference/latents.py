"""Steps shared by the text-to-image and editing pipelines: output size checks, the initial noise, and the
final latents turned into the requested output (a PIL image labelled synthetic, an array, or latents)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..io.synthetic import label_synthetic
from ..modeling.preprocessing import from_model_tensor
from ..modeling.vae import patchify_latent, unpatchify_latent, vae_decode
from .components import Components
from .image_generation import GuidanceSettings
from .sampling import RENORM_TYPES

__all__ = ["OUTPUT_TYPES", "check_size", "check_guidance", "size_from_latents", "initial_noise", "initial_noises",
           "decode_output"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_size(parts: Components, height: int, width: int) -> None:
    d, top = parts.config.latent_downsample, parts.config.max_image_side
    for name, side in (("height", height), ("width", width)):
        if not isinstance(side, (int, np.integer)) or side < d or side > top or side % d:
            raise ValueError(f"{name} must be a multiple of {d} between {d} and {top}, got {side!r}")


def check_guidance(settings: GuidanceSettings, output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if settings.cfg_renorm_type not in RENORM_TYPES:
        raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {settings.cfg_renorm_type!r}")
    lo, hi = settings.cfg_interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"cfg_interval must satisfy 0 <= start <= end <= 1, got {settings.cfg_interval}")
    if settings.num_inference_steps < 1 or settings.timestep_shift <= 0:
        raise ValueError("num_inference_steps must be >= 1 and timestep_shift > 0")


def size_from_latents(parts: Components, latents, height, width) -> tuple[int | None, int | None]:
    """Given latents and no size, the size they describe."""
    if latents is not None and height is None and width is None:
        down = parts.config.vae.downsample
        return int(latents.shape[-2]) * down, int(latents.shape[-1]) * down
    return height, width


def initial_noise(parts: Components, height: int, width: int, latents: torch.Tensor | None,
                  generator: torch.Generator | None) -> torch.Tensor:
    """The noise at t=1 as latent tokens: ``latents`` (z, H/8, W/8) when given, else drawn in fp32 from
    ``generator`` on its device (the reference draws on the CPU)."""
    z, down, p = parts.config.vae.z_channels, parts.config.vae.downsample, parts.config.latent_patch_size
    shape = (z, height // down, width // down)
    if latents is None:
        device = generator.device if generator is not None else torch.device("cpu")
        latents = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    else:
        latents = torch.as_tensor(latents)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (z_channels, H/{down}, W/{down}), "
                             f"got {tuple(latents.shape)}")
    return patchify_latent(latents.float(), p)


def initial_noises(parts: Components, count: int, height: int, width: int, latents: torch.Tensor | None,
                   generator: torch.Generator | list[torch.Generator] | None) -> list[torch.Tensor]:
    """The noise tokens of ``count`` images (docs/sampling.md#batched-requests): ``latents`` (count, z, H/8,
    W/8), or (z, H/8, W/8) when ``count`` is 1; else image k's from ``generator[k]`` (a list), or drawn
    from the one ``generator`` image after image, so image k's noise is the k-th of ``count`` single draws."""
    if latents is not None:
        latents = torch.as_tensor(latents)
        if latents.dim() == 3 and count == 1:
            latents = latents[None]
        if latents.dim() != 4 or latents.shape[0] != count:
            raise ValueError(f"latents must have shape ({count}, z_channels, H/8, W/8) for {count} image(s), "
                             f"got {tuple(latents.shape)}")
        return [initial_noise(parts, height, width, one, None) for one in latents]
    generators = generator if isinstance(generator, (list, tuple)) else [generator] * count
    if len(generators) != count:
        raise ValueError(f"got {len(generators)} generators for {count} images")
    return [initial_noise(parts, height, width, None, g) for g in generators]


def decode_output(parts: Components, tokens: torch.Tensor, height: int, width: int, output_type: str, task: str,
                  description: str):
    """Final latent tokens -> ``output_type``; PIL images carry the synthetic labels."""
    p, d = parts.config.latent_patch_size, parts.config.latent_downsample
    latent = unpatchify_latent(tokens, height // d, width // d, p)
    if output_type == "latent":
        return latent.cpu()
    with torch.inference_mode():
        image = vae_decode(parts.vae, latent[None].to(parts.device), parts.config.vae)[0]
    pixels = from_model_tensor(image)
    if output_type == "np":
        return pixels
    if output_type == "pt":
        return torch.from_numpy(pixels).permute(2, 0, 1)
    return label_synthetic(Image.fromarray(pixels), task, description, parts.provenance.short)
