"""Any-size image-to-image (docs/tiling.md): the tile grid, the blending window, per-tile seeds, output sizes,
whole-image runs, seams, and a radiograph-sized run at the released model's 1024-px tile."""

from __future__ import annotations

import inspect
import time

import numpy as np
import pytest
import torch
from PIL import Image

from unimedvl_core import UniMedVL
from unimedvl_core.inference.tiling import (
    MAX_OUTPUT_SIDE,
    axis_tiles,
    axis_weights,
    padded_size,
    tile_grid,
    tile_seed,
    tile_side,
    tile_weights,
)
from unimedvl_core.modeling.config import VAEConfig
from unimedvl_core.modeling.preprocessing import ResizeRule, TransformSet
from unimedvl_core.tasks.catalog import TASK_TILING, TASKS

from .conftest import PARITY_CKPT, random_model, tiny_config

ONE_STEP = dict(num_inference_steps=1, progress=False)


def smooth_image(width: int, height: int) -> Image.Image:
    """A smooth gradient with a soft blob: no edges of its own, so any edge in an output is a seam."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    blob = np.exp(-(((xx - 0.6 * width) / (0.3 * width)) ** 2 + ((yy - 0.4 * height) / (0.3 * height)) ** 2))
    gray = 40 + 120 * xx / width + 60 * yy / height + 30 * blob
    return Image.fromarray(np.repeat(gray[..., None], 3, -1).clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def small_tiles():
    """A random model whose tile is 64 px (max_latent_size 4), so a few hundred pixels are many tiles."""
    model = random_model(seed=1, max_latent_size=4)
    model.progress = False
    return model


@pytest.mark.parametrize("size,tile,overlap", [(1000, 128, 16), (130, 128, 16), (128, 128, 32), (4000, 1024, 128),
                                               (257, 64, 0), (300, 64, 32), (48, 64, 8)])
def test_tiles_cover_the_axis_with_the_overlap_and_weights_sum_to_one(size, tile, overlap):
    axis = axis_tiles(size, tile, overlap)
    assert axis.starts[0] == 0 and axis.starts[-1] + axis.length == size and axis.length <= tile
    assert all(b - a <= axis.length - overlap for a, b in zip(axis.starts, axis.starts[1:]))  # shared >= overlap
    for window in ("cosine", "linear"):
        w = axis_weights(axis, window)
        assert np.allclose(w.sum(0), 1.0, atol=1e-12) and (w >= 0).all()
        for k, start in enumerate(axis.starts):  # nothing outside its tile
            assert w[k, :start].sum() == 0 and w[k, start + axis.length:].sum() == 0


def test_2d_weights_sum_to_one_everywhere():
    grid = tile_grid(300, 200, 64, 16)
    total = np.zeros((200, 300))
    for k, (left, top, right, bottom) in enumerate(grid.boxes()):
        total[top:bottom, left:right] += tile_weights(grid, k)
    assert len(grid) > 6 and np.allclose(total, 1.0, atol=1e-6)


def test_tile_side_and_padding():
    assert tile_side(1024, ResizeRule(1024, 32, 16, 1_806_336), 16) == 1024  # the released checkpoint
    assert tile_side(128, ResizeRule(128, 32, 16, 16384), 16) == 128  # the embedded model
    assert tile_side(1024, ResizeRule(980, 32, 16), 16) == 976
    assert padded_size(200, 130, 16, 32) == (208, 144) and padded_size(20, 8, 16, 32) == (32, 32)


def test_tile_seeds_are_a_deterministic_function_of_seed_and_index():
    seeds = {tile_seed(s, k) for s in range(4) for k in range(50)}
    assert len(seeds) == 200 and tile_seed(3, 7) == tile_seed(3, 7) and 0 <= tile_seed(2**62, 0) < 2**63


def test_registry_declares_tiling_with_the_api_defaults():
    api = {"super_resolution": UniMedVL.super_resolve, "virtual_staining": UniMedVL.virtual_stain,
           "contrast_translation": UniMedVL.translate_contrast, "counterfactual": UniMedVL.counterfactual_edit,
           "edit": UniMedVL.edit_image}
    assert TASK_TILING == {"super_resolution": "tiled", "virtual_staining": "tiled", "contrast_translation": "tiled",
                           "counterfactual": "whole", "edit": "whole"}
    for name, method in api.items():
        task, signature = TASKS.get(name), inspect.signature(method).parameters
        assert task.param("tiling").default == signature["tiling"].default == TASK_TILING[name]
        assert task.param("tile_overlap").default == signature["tile_overlap"].default
    with pytest.raises(ValueError, match="tiling"):
        TASKS.get("super_resolution").resolve({"tiling": "mosaic"})


def test_output_sizes_are_what_was_asked(small_tiles, tiny_model):
    # one 1024-px tile, padded to 400 x 272 and cropped; 4 x 3 tiles of 64 px
    for model, (w, h) in ((tiny_model, (200, 130)), (small_tiles, (100, 65))):
        sr = model.super_resolve(smooth_image(w, h), scale=2, **ONE_STEP, tile_overlap=0.0,
                                 generator=torch.Generator().manual_seed(0))
        assert sr.size == (2 * w, 2 * h) and sr.info["UniMedVLTask"] == "super-resolution"
    flair = small_tiles.translate_contrast(smooth_image(300, 200), **ONE_STEP, output_type="np")
    assert flair.shape == (200, 300, 3)
    with pytest.raises(ValueError, match="exceeds the largest output side"):
        small_tiles.super_resolve(Image.new("RGB", (MAX_OUTPUT_SIDE // 2 + 1, 8)), scale=2)
    with pytest.raises(ValueError, match="no common latents"):
        small_tiles.virtual_stain(smooth_image(300, 200), **ONE_STEP, output_type="latent")


def test_a_tiled_run_repeats_with_its_seed_and_differs_with_another(small_tiles):
    src = smooth_image(150, 100)
    run = lambda seed, **kw: small_tiles.virtual_stain(src, **ONE_STEP, output_type="np",
                                                       generator=torch.Generator().manual_seed(seed), **kw)
    a = run(0)
    assert np.array_equal(a, run(0)) and not np.array_equal(a, run(1))
    steps = []
    chunked = run(0, batch_size=2, callback=lambda s, t: steps.append((s, t)))
    # 6 tiles of 64 px (3 x 2 for 160 x 112 padded): chunks of 2 tiles give 3 forwards of one step each
    assert steps[-1] == (3, 3) and np.abs(chunked.astype(int) - a).max() <= 1


def test_whole_mode_keeps_the_aspect_ratio_and_gives_the_requested_size(small_tiles):
    src = smooth_image(300, 200)
    out = small_tiles.translate_contrast(src, **ONE_STEP, tiling="whole")
    assert out.size == (300, 200)
    latent = small_tiles.translate_contrast(src, **ONE_STEP, tiling="whole", output_type="latent")
    h, w = (s * 8 for s in latent.shape[-2:])
    assert max(h, w) == 64 and abs(w / h - 1.5) < 0.2  # the model's size, the aspect ratio up to the 16-px grid
    edit = small_tiles.edit_image(src, "Brighter.", height=120, width=250, **ONE_STEP)
    assert edit.size == (250, 120)
    cf = small_tiles.counterfactual_edit(src, "Remove the lesion.", max_explanation_tokens=3, **ONE_STEP)
    tiled = small_tiles.counterfactual_edit(src, "Remove the lesion.", max_explanation_tokens=3, tiling="tiled",
                                            **ONE_STEP)
    assert cf.image.size == tiled.image.size == (300, 200) and cf.explanation == tiled.explanation


def _edge_jumps(image: np.ndarray, axis: int) -> np.ndarray:
    gray = image.astype(np.float64).mean(-1)
    return np.abs(np.diff(gray, axis=axis)).mean(axis=1 - axis)


def test_no_seam_at_tile_borders_beyond_the_interior(small_tiles):
    """On a smooth input, the pixel-to-pixel change across a tile border (where tiles meet, blended) is no
    larger than the changes inside tiles; unblended, the border would jump."""
    src = smooth_image(256, 64)
    out = small_tiles.translate_contrast(src, **ONE_STEP, output_type="np", tile_overlap=0.25,
                                         generator=torch.Generator().manual_seed(0))
    grid = tile_grid(256, 64, 64, 16)
    jumps = _edge_jumps(out, axis=1)  # jumps[x] = mean |out[:, x+1] - out[:, x]|
    borders = sorted({s - 1 for s in grid.cols.starts[1:]} | {s + grid.cols.length - 1 for s in grid.cols.starts[:-1]})
    interior = np.delete(jumps, borders)
    assert jumps[borders].mean() <= 1.5 * np.median(interior) + 1.0
    hard = small_tiles.translate_contrast(src, **ONE_STEP, output_type="np", tile_overlap=0.0,
                                          generator=torch.Generator().manual_seed(0))
    assert hard.shape == out.shape


def test_a_radiograph_sized_input_through_1024_px_tiles():
    """A 2000-px-wide CR-like image, x2 to 4000 px, through the tiling path at the released model's tile side
    (max_latent_size 64: 1024 px) with a narrow random model and one step: the path, not the quality."""
    config = tiny_config(max_latent_size=64, llm=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1),
                         vae=VAEConfig(resolution=64, ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=0, z_channels=4),
                         transforms=TransformSet(gen_vit=ResizeRule(112, 56, 14, 12544)))
    model = UniMedVL.from_config(config, PARITY_CKPT, seed=0, zero_llm2vae=False)
    yy, xx = np.mgrid[0:480, 0:2000]
    chest = 60 + 100 * np.exp(-((xx - 1000) / 700.0) ** 2 - ((yy - 240) / 300.0) ** 2)
    lungs = ((np.abs(xx - 1000) - 420) / 300.0) ** 2 + ((yy - 240) / 200.0) ** 2 < 1
    cr = Image.fromarray(np.repeat(np.where(lungs, chest - 40, chest)[..., None], 3, -1).astype(np.uint8))
    steps = []
    start = time.perf_counter()
    out = model.super_resolve(cr, scale=2, **ONE_STEP, cfg_text_scale=1.0, batch_size=5, output_type="np",
                              generator=torch.Generator().manual_seed(0), callback=lambda s, t: steps.append(t))
    assert out.shape == (960, 4000, 3) and steps == [1]  # 5 tiles of 1024 x 960, one forward
    assert time.perf_counter() - start < 120
