"""Any-size image-to-image: the tile grid, the blending window and the per-tile seeds (docs/tiling.md).

Pure functions on sizes and arrays, so that each can be tested alone; ``tiled_editing`` runs the model
with them. An image of any size up to ``MAX_OUTPUT_SIDE`` per side is padded to a multiple of the latent
grid, cut into overlapping tiles of the model's generation side, each tile is edited on its own (several
per forward), and the tiles are blended with a window that ramps (cosine by default) across each overlap.
The windows of neighbouring tiles sum to exactly 1 at every pixel, so a constant image stays constant and
no tile's border is ever seen unblended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..modeling.preprocessing import ResizeRule

__all__ = ["TILED", "WHOLE", "TILING_MODES", "WINDOWS", "DEFAULT_TILE_OVERLAP", "MAX_OUTPUT_SIDE", "AxisTiles",
           "TileGrid", "tile_side", "padded_size", "axis_tiles", "tile_grid", "axis_weights", "tile_weights",
           "tile_seed", "tile_generator", "base_seed", "pad_image", "Blender", "whole_generation_size",
           "check_tiling"]

TILED, WHOLE = "tiled", "whole"
TILING_MODES = (TILED, WHOLE)
WINDOWS = ("cosine", "linear")
# Neighbouring tiles share this fraction of the tile side (16 px of a 128-px tile, 128 px of a 1024-px tile).
DEFAULT_TILE_OVERLAP = 0.125
# Largest output side of an image-to-image run: a 4096 x 4096 RGB float accumulator is 200 MB.
MAX_OUTPUT_SIDE = 4096
_MASK64 = (1 << 64) - 1


def check_tiling(tiling: str, overlap: float) -> None:
    if tiling not in TILING_MODES:
        raise ValueError(f"tiling must be one of {TILING_MODES}, got {tiling!r}")
    if not 0.0 <= float(overlap) <= 0.5:
        raise ValueError(f"tile_overlap must be a fraction of the tile side between 0 and 0.5, got {overlap!r}")


def tile_side(max_image_side: int, rule: ResizeRule, multiple: int) -> int:
    """The side of a square tile: the largest square the model generates (``max_image_side``) that the
    generator's VAE rule leaves unchanged (long edge, pixel budget), a multiple of the latent grid. The
    released model: 1024; the embedded model: 128."""
    side = min(max_image_side, rule.max_size, math.isqrt(int(rule.max_pixels)))
    return max(multiple, side // multiple * multiple)


def padded_size(width: int, height: int, multiple: int, minimum: int) -> tuple[int, int]:
    """Sides rounded up to a multiple of the latent grid and to at least the rule's short edge, so that
    every tile passes the VAE rule unresized."""
    low = -(-minimum // multiple) * multiple
    return tuple(max(low, -(-side // multiple) * multiple) for side in (width, height))  # type: ignore[return-value]


@dataclass(frozen=True)
class AxisTiles:
    """Tiles along one axis of ``size`` pixels: their ``starts``, common ``length`` and the width of the
    blending ``ramp`` centred in each overlap."""

    size: int
    length: int
    starts: tuple[int, ...]
    ramp: float

    def __len__(self) -> int:
        return len(self.starts)


def axis_tiles(size: int, tile: int, overlap: int) -> AxisTiles:
    """The fewest tiles of ``tile`` pixels (fewer if the axis is shorter) that cover ``size`` pixels with
    at least ``overlap`` pixels shared by neighbours, spread evenly from edge to edge."""
    length = min(tile, size)
    overlap = min(max(0, overlap), length // 2)
    count = 1 if size <= length else 1 + math.ceil((size - length) / (length - overlap))
    starts = tuple(round(i * (size - length) / (count - 1)) for i in range(count)) if count > 1 else (0,)
    steps = [b - a for a, b in zip(starts, starts[1:])]
    # The ramp fits inside every overlap and ramps never meet, so at most two tiles blend at a pixel.
    ramp = float(min(min(length - s for s in steps), min(steps))) if steps else 0.0
    return AxisTiles(size, length, starts, ramp)


@dataclass(frozen=True)
class TileGrid:
    rows: AxisTiles
    cols: AxisTiles

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    @property
    def tile_size(self) -> tuple[int, int]:
        """(width, height) of every tile."""
        return self.cols.length, self.rows.length

    def boxes(self) -> list[tuple[int, int, int, int]]:
        """(left, top, right, bottom) of each tile, row after row; tile k of a run is the k-th box."""
        return [(x, y, x + self.cols.length, y + self.rows.length) for y in self.rows.starts for x in self.cols.starts]


def tile_grid(width: int, height: int, tile: int, overlap: int) -> TileGrid:
    return TileGrid(axis_tiles(height, tile, overlap), axis_tiles(width, tile, overlap))


def _ramp(u: np.ndarray, window: str) -> np.ndarray:
    u = np.clip(u, 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * u) if window == "cosine" else u


def axis_weights(axis: AxisTiles, window: str = "cosine") -> np.ndarray:
    """(tiles, size) weights along the axis: 1 inside a tile, ramping across the centre of each overlap,
    0 outside; the columns sum to 1 exactly (a tile's falling ramp is 1 minus its neighbour's rising one)."""
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    x = np.arange(axis.size, dtype=np.float64) + 0.5
    ends = [s + axis.length for s in axis.starts]
    centres = [(b + e) / 2 for b, e in zip(axis.starts[1:], ends)]
    width = max(axis.ramp, 1e-9)
    rising = [_ramp((x - c + width / 2) / width, window) for c in centres]
    out = np.ones((len(axis), axis.size))
    for k in range(len(axis)):
        if k > 0:
            out[k] *= rising[k - 1]
        if k < len(axis) - 1:
            out[k] *= 1.0 - rising[k]
    return out


def tile_weights(grid: TileGrid, index: int, window: str = "cosine") -> np.ndarray:
    """(tile height, tile width) blending weights of tile ``index`` (row-major), as float32."""
    row, col = divmod(index, len(grid.cols))
    y0, x0 = grid.rows.starts[row], grid.cols.starts[col]
    wy = axis_weights(grid.rows, window)[row, y0:y0 + grid.rows.length]
    wx = axis_weights(grid.cols, window)[col, x0:x0 + grid.cols.length]
    return np.outer(wy, wx).astype(np.float32)


def tile_seed(seed: int, index: int) -> int:
    """The noise seed of tile ``index`` of a run seeded with ``seed`` (SplitMix64 of both): the same seed
    always gives the same tiles, neighbouring tiles get unrelated noise."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(index) + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def tile_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(tile_seed(seed, index))


def base_seed(generator: torch.Generator | None) -> int:
    """One draw from the run's generator (the global one when ``None``) that seeds all of an image's tiles,
    so that one generator drawn image after image still gives each image what a single call would."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device if generator else "cpu"))


def pad_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` extended to (width, height) at the right and bottom by mirroring its border."""
    if image.size == (width, height):
        return image
    pixels = np.asarray(image)
    pad = ((0, height - image.height), (0, width - image.width), (0, 0))
    mode = "reflect" if min(image.size) > 1 else "edge"
    return Image.fromarray(np.pad(pixels, pad, mode=mode))


class Blender:
    """Accumulates weighted tiles into an (height, width, 3) image."""

    def __init__(self, grid: TileGrid, window: str = "cosine"):
        self.grid, self.window = grid, window
        self.sum = np.zeros((grid.rows.size, grid.cols.size, 3), np.float32)
        self.boxes = grid.boxes()

    def add(self, index: int, pixels: np.ndarray) -> None:
        left, top, right, bottom = self.boxes[index]
        weights = tile_weights(self.grid, index, self.window)
        self.sum[top:bottom, left:right] += pixels.astype(np.float32) * weights[..., None]

    def result(self, width: int, height: int) -> np.ndarray:
        """The blended image cropped to (width, height), as uint8."""
        return np.clip(np.rint(self.sum[:height, :width]), 0, 255).astype(np.uint8)


def whole_generation_size(width: int, height: int, rule: ResizeRule, multiple: int, max_side: int) -> tuple[int, int]:
    """The size a whole-image run generates at for a requested (width, height): that size when the model
    makes it, else the generator's VAE rule applied to it (aspect ratio kept up to the latent grid)."""
    if all(side % multiple == 0 and multiple <= side <= max_side for side in (width, height)):
        return width, height
    return rule.target_size(width, height)
