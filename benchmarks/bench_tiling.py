"""Tiled image-to-image on phantoms with the embedded model (docs/tiling.md): 4x super-resolution of a 256-px
phantom (64-px input, tiled at the model's 128-px side) against bicubic, seam visibility, and seconds per
output megapixel on this machine. Prints JSON.

    .venv/bin/python benchmarks/bench_tiling.py [--steps 49] [--cases 3] [--slice512]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from PIL import Image

from unimedvl_core.data.evaluation import psnr_ssim
from unimedvl_core.data.phantoms import render, sample_phantom
from unimedvl_core.inference.embedded import load_default_model
from unimedvl_core.inference.tiling import DEFAULT_TILE_OVERLAP, tile_grid


def seam_mask(size: int, tile: int, overlap: float, band: int = 2) -> np.ndarray:
    """Pixels within ``band`` of a tile edge (inside the image), where an unblended seam would show."""
    grid = tile_grid(size, size, tile, round(overlap * tile))
    mask = np.zeros((size, size), bool)
    for axis in (grid.rows, grid.cols):
        edges = {s for s in axis.starts[1:]} | {s + axis.length for s in axis.starts[:-1]}
        for e in edges:
            lo, hi = max(0, e - band), min(size, e + band)
            if axis is grid.rows:
                mask[lo:hi] = True
            else:
                mask[:, lo:hi] = True
    return mask


def band_psnr(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    err = (pred.astype(np.float64) - truth.astype(np.float64)) ** 2
    return float(10 * np.log10(255.0**2 / max(err[mask].mean(), 1e-12)))


def run_case(model, rng, steps: int, overlap: float) -> dict:
    truth = render(sample_phantom(rng, "radiology", size=256), "ct")
    low = Image.fromarray(truth).resize((64, 64), Image.Resampling.BOX)
    bicubic = np.asarray(low.resize((256, 256), Image.Resampling.BICUBIC))
    start = time.perf_counter()
    sr = model.super_resolve(low, scale=4, num_inference_steps=steps, tile_overlap=overlap, output_type="np",
                             generator=torch.Generator().manual_seed(0), progress=False)
    seconds = time.perf_counter() - start
    mask = seam_mask(256, 128, overlap)
    return {"psnr": psnr_ssim(sr, truth)[0], "ssim": psnr_ssim(sr, truth)[1],
            "bicubic_psnr": psnr_ssim(bicubic, truth)[0], "bicubic_ssim": psnr_ssim(bicubic, truth)[1],
            "seam_band_psnr": band_psnr(sr, truth, mask), "elsewhere_psnr": band_psnr(sr, truth, ~mask),
            "bicubic_seam_band_psnr": band_psnr(bicubic, truth, mask),
            "bicubic_elsewhere_psnr": band_psnr(bicubic, truth, ~mask), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=49)
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--overlap", type=float, default=DEFAULT_TILE_OVERLAP)
    parser.add_argument("--slice512", action="store_true", help="also time a 512x512 slice at x2 (minutes)")
    args = parser.parse_args()
    model = load_default_model(progress=False)
    model.progress = False
    rng = np.random.default_rng(20261123)
    cases = [run_case(model, rng, args.steps, args.overlap) for _ in range(args.cases)]
    mean = {k: float(np.mean([c[k] for c in cases])) for k in cases[0]}
    out = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
           "steps": args.steps, "tile_overlap": args.overlap, "tile_side": 128, "cases": args.cases,
           "sr4x_256": mean, "seconds_per_output_megapixel": mean["seconds"] / (256 * 256 / 1e6)}
    if args.slice512:
        src = Image.fromarray(render(sample_phantom(rng, "radiology", size=512), "ct"))
        start = time.perf_counter()
        model.super_resolve(src, scale=2, num_inference_steps=args.steps, tile_overlap=args.overlap,
                            output_type="np", generator=torch.Generator().manual_seed(0), progress=False)
        out["slice512_x2_seconds"] = time.perf_counter() - start
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
