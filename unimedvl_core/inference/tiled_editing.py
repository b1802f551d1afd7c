"""Image-to-image at any size (docs/tiling.md): each input runs whole or tiled, and comes back at the size
asked for (the input's, or ``height`` x ``width``).

- ``whole``: the input is edited at the size the model makes (the requested size when the model makes it,
  else the generator's VAE rule applied to it) and the result resized to the requested size.
- ``tiled``: the input, resized to the requested size if needed, is padded to the latent grid, cut into
  overlapping tiles of the model's generation side, each tile edited with noise from its own seed (the run's
  seed and the tile's index, ``tiling.tile_seed``), several tiles per forward, and the tiles blended.

An input the model can make in one go (one tile, no padding; or, whole, a size the model makes) runs exactly
as ``EditingPipeline`` runs it, so model-sized inputs give the same outputs as before. Explicit ``latents``
fix the generation size; such an input runs untiled at that size, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..io.medical_io import read_image
from ..io.synthetic import label_synthetic
from .components import Components
from .editing import EditingPipeline, per_item
from .image_generation import EDITING_GUIDANCE, GuidanceSettings, batch_groups
from .latents import check_guidance
from .tiling import (
    DEFAULT_TILE_OVERLAP,
    MAX_OUTPUT_SIDE,
    WHOLE,
    Blender,
    TileGrid,
    base_seed,
    check_tiling,
    pad_image,
    padded_size,
    tile_generator,
    tile_grid,
    tile_side,
    whole_generation_size,
)

__all__ = ["AnySizeEditing", "tiles_per_forward"]

# Tiles per forward unless ``batch_size`` says otherwise: as many as keep a forward within this many latent
# tokens (memory), at most MAX_TILE_BATCH (beyond it a CPU gains nothing). 2 tiles of 1024 px; 16 of 64 px.
TILE_TOKEN_BUDGET = 8192
MAX_TILE_BATCH = 16


def tiles_per_forward(tile: int, multiple: int) -> int:
    return max(1, min(MAX_TILE_BATCH, TILE_TOKEN_BUDGET // (tile // multiple) ** 2))


@dataclass
class Job:
    """One input: what the editing pipeline gets (``image``, ``height``, ``width``, ``latents``), the size
    it generates at (``key``), what is done to its output (``post``: resize or crop to ``out_size``), and for a
    run over several tiles its ``grid``."""

    image: Any
    height: int | None
    width: int | None
    latents: Any
    key: tuple[int, int]
    out_size: tuple[int, int]
    post: str | None = None
    grid: TileGrid | None = None


@dataclass
class RunArgs:
    """The arguments every input of one call shares."""

    settings: GuidanceSettings
    vae_posterior: str
    analyze_first: bool
    output_type: str
    progress: bool | None
    task: str
    explain_tokens: int
    batch_size: int | None


class _Steps:
    """``callback(step, total)`` over all the pipeline calls of one run."""

    def __init__(self, callback: Callable[[int, int], None] | None, total: int):
        self.callback, self.total, self.done = callback, total, 0

    def call(self) -> Callable[[int, int], None] | None:
        if self.callback is None:
            return None
        offset = self.done
        return lambda step, _total: self.callback(offset + step, self.total)

    def advance(self, steps: int) -> None:
        self.done += steps


def _requested_size(source, height, width) -> tuple[int, int]:
    out_w, out_h = width or source.size[0], height or source.size[1]
    for name, side in (("height", out_h), ("width", out_w)):
        if not isinstance(side, (int, np.integer)) or not 1 <= side <= MAX_OUTPUT_SIDE:
            raise ValueError(f"a {source.size[0]}x{source.size[1]} input: output {name} must be between 1 and "
                             f"{MAX_OUTPUT_SIDE} (got {side!r}); crop or downsample it first")
    return int(out_w), int(out_h)


class AnySizeEditing:
    def __init__(self, parts: Components):
        self.parts = parts
        self.pipeline = EditingPipeline(parts)

    @property
    def tile(self) -> int:
        """At most the checkpoint's own generation size: the scale it was trained to make (1024 px for the
        released model; 64 px for the embedded phantom model, whose position table would allow 128)."""
        cfg = self.parts.config
        trained = max(cfg.default_generation_size)
        return tile_side(min(cfg.max_image_side, trained), cfg.transforms.gen_vae, cfg.latent_downsample)

    @property
    def tiles_per_forward(self) -> int:
        return tiles_per_forward(self.tile, self.parts.config.latent_downsample)

    def _latent_size(self, latents, height, width, source) -> tuple[int, int]:
        down = self.parts.config.vae.downsample
        if height is None and width is None:
            return int(latents.shape[-1]) * down, int(latents.shape[-2]) * down
        rule_w, rule_h = self.parts.config.transforms.gen_vae.target_size(*source.size)
        return width or rule_w, height or rule_h

    def plan_whole(self, image, source, height, width) -> Job:
        cfg = self.parts.config
        rule, d = replace(cfg.transforms.gen_vae, max_size=self.tile), cfg.latent_downsample
        out = _requested_size(source, height, width)
        if height is None and width is None and rule.target_size(*source.size) == source.size:
            return Job(image, None, None, None, source.size, out)
        gen = whole_generation_size(*out, rule, d, cfg.max_image_side)
        if gen == out:
            return Job(image, out[1], out[0], None, out, out)
        # The model sees the input at the size it generates (for an output of the input's shape, exactly the
        # editing pipeline's own resize), and the result is resized to the requested size.
        resized = source.to_pil().resize(gen, Image.Resampling.BICUBIC)
        return Job(resized, gen[1], gen[0], None, gen, out, "resize")

    def plan_tiled(self, image, source, height, width, overlap: float, output_type: str) -> Job:
        cfg = self.parts.config
        out = _requested_size(source, height, width)
        work = source.to_pil()
        if work.size != out:
            image = work = work.resize(out, Image.Resampling.BICUBIC)
        size = padded_size(*out, cfg.latent_downsample, cfg.transforms.gen_vae.min_size)
        grid = tile_grid(*size, self.tile, round(overlap * self.tile))
        if len(grid) == 1:
            if size == out:
                return Job(image, out[1], out[0], None, out, out)
            return Job(pad_image(work, *size), size[1], size[0], None, size, out, "crop")
        if output_type == "latent":
            raise ValueError(f"a {out[0]}x{out[1]} output takes {len(grid)} tiles, which have no common latents; "
                             "ask for an image (output_type 'pil', 'np' or 'pt') or use tiling='whole'")
        return Job(pad_image(work, *size), None, None, None, grid.tile_size, out, "crop", grid)

    def plan(self, image, height, width, latents, tiling: str, overlap: float, output_type: str) -> Job:
        source = read_image(image)
        if latents is not None:
            _requested_size(source, height, width)
            key = self._latent_size(torch.as_tensor(latents), height, width, source)
            return Job(image, height, width, latents, key, key)
        if tiling == WHOLE:
            return self.plan_whole(image, source, height, width)
        return self.plan_tiled(image, source, height, width, overlap, output_type)

    def finish(self, result, job: Job, output_type: str):
        """A pipeline result (PIL, or latents) resized or cropped to the requested size, as ``output_type``."""
        if job.post is None or output_type == "latent":
            return result
        size = job.out_size
        out = result.resize(size, Image.Resampling.BICUBIC) if job.post == "resize" else result.crop((0, 0, *size))
        out.info = dict(result.info)
        return _as_output(out, output_type)

    def run_untiled(self, jobs: list[Job], instructions: list[str], generators: list, args: RunArgs,
                    steps: _Steps) -> list:
        """Inputs of one stretch without tiles, together: same-size ones share forwards."""
        posted = any(job.post for job in jobs) and args.output_type != "latent"
        kind = "pil" if posted else args.output_type
        out = self.pipeline.batch(
            [j.image for j in jobs], instructions, [j.height for j in jobs], [j.width for j in jobs],
            args.settings, generators, [j.latents for j in jobs], args.vae_posterior, args.analyze_first, kind,
            args.progress, steps.call(), args.task, args.explain_tokens, batch_size=args.batch_size)
        steps.advance(len(batch_groups([j.key for j in jobs], args.batch_size)) * args.settings.num_inference_steps)
        if not posted:
            return out
        finish = lambda result, job: self.finish(result, job, args.output_type)
        if args.explain_tokens:
            return [(finish(image, job), text) for (image, text), job in zip(out, jobs)]
        return [finish(result, job) for result, job in zip(out, jobs)]

    def run_tiles(self, job: Job, source, instruction: str, generator, args: RunArgs, steps: _Steps):
        """One input over several tiles: its seed drawn from ``generator``, tiles edited a chunk at a time and
        blended; the explanation (if asked) is the whole input's."""
        seed = base_seed(generator)
        whole = self.plan_whole(source, read_image(source), None, None).image  # the input at the model's size
        if args.analyze_first:
            instruction = self.pipeline.analyze_image(whole, instruction)
        boxes, blender = job.grid.boxes(), Blender(job.grid)
        chunk = args.batch_size or self.tiles_per_forward
        width, height = job.grid.tile_size
        several = len(boxes) > chunk  # one bar over the tiles, not one sampling bar per chunk of them
        bar = tqdm(total=len(boxes), desc="tiles", unit="tile", disable=not args.progress or not several)
        for start in range(0, len(boxes), chunk):
            index = range(start, min(start + chunk, len(boxes)))
            tiles = self.pipeline.batch(
                [job.image.crop(boxes[k]) for k in index], instruction, height, width, args.settings,
                [tile_generator(seed, k) for k in index], None, args.vae_posterior, False, "np",
                args.progress and not several, steps.call(), args.task, batch_size=chunk)
            steps.advance(args.settings.num_inference_steps)
            for k, pixels in zip(index, tiles):
                blender.add(k, pixels)
            bar.update(len(index))
        bar.close()
        pixels = blender.result(*job.out_size)
        image = _labelled(self.parts, pixels, args.output_type, args.task, instruction)
        if args.explain_tokens:
            return image, self.pipeline.explain(whole, instruction, args.settings, args.explain_tokens)
        return image

    def _total_steps(self, jobs: list[Job], args: RunArgs) -> int:
        total, stretch = 0, []
        for job in [*jobs, None]:
            if job is not None and job.grid is None:
                stretch.append(job.key)
                continue
            total += len(batch_groups(stretch, args.batch_size)) if stretch else 0
            stretch = []
            if job is not None:
                total += -(-len(job.grid) // (args.batch_size or self.tiles_per_forward))
        return total * args.settings.num_inference_steps

    def batch(self, images: list, instructions, height=None, width=None, settings: GuidanceSettings = EDITING_GUIDANCE,
              generator=None, latents=None, vae_posterior: str = "mean", analyze_first: bool = False,
              output_type: str = "pil", progress: bool | None = None, callback=None, task: str = "image-to-image",
              explain_tokens: int = 0, batch_size: int | None = None, tiling: str = WHOLE,
              tile_overlap: float = DEFAULT_TILE_OVERLAP) -> list:
        """``EditingPipeline.batch`` for inputs of any size (``tiling`` ``"whole"`` or ``"tiled"``); inputs are
        run in order, consecutive untiled ones together, so one generator is drawn input after input."""
        check_tiling(tiling, tile_overlap)
        check_guidance(settings, output_type)
        count = len(images)
        instructions = per_item(instructions, count, "instructions")
        if latents is not None and not isinstance(latents, (list, tuple)) and torch.as_tensor(latents).dim() == 4:
            latents = list(torch.as_tensor(latents))
        generators = generator if isinstance(generator, (list, tuple)) else [generator] * count
        if len(generators) != count:
            raise ValueError(f"got {len(generators)} generators for {count} images")
        lats, heights, widths = (per_item(v, count, n) for v, n in ((latents, "latents"), (height, "height"),
                                                                  (width, "width")))
        jobs = [self.plan(images[k], heights[k], widths[k], lats[k], tiling, tile_overlap, output_type)
                for k in range(count)]
        args = RunArgs(settings, vae_posterior, analyze_first, output_type, progress, task, explain_tokens, batch_size)
        return self._run(jobs, images, instructions, generators, args, _Steps(callback, self._total_steps(jobs, args)))

    def _run(self, jobs: list[Job], images: list, instructions: list[str], generators: list, args: RunArgs,
             steps: _Steps) -> list:
        out: list = [None] * len(jobs)
        stretch: list[int] = []
        for k in [*range(len(jobs)), None]:
            if k is not None and jobs[k].grid is None:
                stretch.append(k)
                continue
            if stretch:
                done = self.run_untiled([jobs[i] for i in stretch], [instructions[i] for i in stretch],
                                        [generators[i] for i in stretch], args, steps)
                for i, result in zip(stretch, done):
                    out[i] = result
                stretch = []
            if k is not None:
                out[k] = self.run_tiles(jobs[k], images[k], instructions[k], generators[k], args, steps)
        return out


def _as_output(image: Image.Image, output_type: str):
    if output_type == "pil":
        return image
    pixels = np.asarray(image).copy()
    return pixels if output_type == "np" else torch.from_numpy(pixels).permute(2, 0, 1)


def _labelled(parts: Components, pixels: np.ndarray, output_type: str, task: str, description: str):
    if output_type == "pil":
        return label_synthetic(Image.fromarray(pixels), task, description, parts.provenance.short)
    return _as_output(Image.fromarray(pixels), output_type)
