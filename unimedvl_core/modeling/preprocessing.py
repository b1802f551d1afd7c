"""Image preprocessing shared by inference and training: the resize rule and normalisation (docs/preprocessing.md)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image

__all__ = ["ResizeRule", "TransformSet", "resize_to_rule", "to_model_tensor", "from_model_tensor", "to_rgb",
           "MAX_INPUT_PIXELS"]

# The reference refuses images over 20 megapixels (pil_img2rgb).
MAX_INPUT_PIXELS = 20_000_000


@dataclass(frozen=True)
class ResizeRule:
    """Long edge at most ``max_size``, short edge at least ``min_size`` (the long-edge cap wins), sides
    multiples of ``stride``, at most ``max_pixels`` pixels (``MaxLongEdgeMinShortEdgeResize``)."""

    max_size: int
    min_size: int
    stride: int
    max_pixels: int = 14 * 14 * 9 * 1024

    def _divisible(self, value: float) -> int:
        return max(self.stride, int(round(value / self.stride) * self.stride))

    def _scaled(self, width: int, height: int, scale: float) -> tuple[int, int]:
        return self._divisible(round(width * scale)), self._divisible(round(height * scale))

    def target_size(self, width: int, height: int, image_count: int = 1) -> tuple[int, int]:
        """(width, height) after the rule; Python's round-half-to-even as in the reference."""
        scale = min(self.max_size / max(width, height), 1.0)
        scale = max(scale, self.min_size / min(width, height))
        new_w, new_h = self._scaled(width, height, scale)
        budget = self.max_pixels / image_count
        if new_w * new_h > budget:
            # The reference applies this area ratio as a linear factor (docs/deviations.md#pixel-budget); the side
            # factor is its root.
            new_w, new_h = self._scaled(new_w, new_h, math.sqrt(budget / (new_w * new_h)))
        if max(new_w, new_h) > self.max_size:
            new_w, new_h = self._scaled(new_w, new_h, self.max_size / max(new_w, new_h))
        return new_w, new_h


@dataclass(frozen=True)
class TransformSet:
    """The resize rules a checkpoint is used with. Defaults are the released scripts'
    (docs/preprocessing.md#rules-per-use)."""

    vqa_vit: ResizeRule = field(default_factory=lambda: ResizeRule(980, 378, 14, 2_007_040))
    gen_vae: ResizeRule = field(default_factory=lambda: ResizeRule(1024, 32, 16, 1_806_336))
    gen_vit: ResizeRule = field(default_factory=lambda: ResizeRule(980, 387, 14, 1_806_336))

    @classmethod
    def from_dict(cls, data: dict) -> "TransformSet":
        unknown = set(data) - {"vqa_vit", "gen_vae", "gen_vit"}
        if unknown:
            raise ValueError(f"unknown transform names {sorted(unknown)}")
        return cls(**{k: ResizeRule(**v) for k, v in data.items()})

    def to_dict(self) -> dict:
        return {name: asdict(getattr(self, name)) for name in ("vqa_vit", "gen_vae", "gen_vit")}


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; transparent images are composited on white (the reference's ``pil_img2rgb``)."""
    if image.width * image.height > MAX_INPUT_PIXELS:
        raise ValueError(f"image of {image.width}x{image.height} pixels exceeds {MAX_INPUT_PIXELS} pixels")
    if image.mode == "RGBA" or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.split()[3])
        return white
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_to_rule(image: Image.Image, rule: ResizeRule, image_count: int = 1) -> Image.Image:
    size = rule.target_size(image.width, image.height, image_count)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC)


def to_model_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB -> (3, H, W) float in [-1, 1]: ToTensor then Normalize(0.5, 0.5)."""
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    return (x - 0.5) / 0.5


def from_model_tensor(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8: clamp(x/2 + 1/2) * 255, truncated as the reference does."""
    x = (x.float() * 0.5 + 0.5).clamp(0, 1) * 255
    return x.permute(1, 2, 0).to(torch.uint8).cpu().numpy()
