"""Will a loading mode fit the device? An estimate from the checkpoint's safetensors headers, made before any
weight is read, and a one-line error naming the modes that would fit (docs/quantization.md#will-it-fit).

The estimate is the weights each phase holds on the device (quantised sizes as torchao stores them) plus an
allowance for activations at the largest generated image; ``benchmarks/bench_gpu.py --modes`` measures the
real peaks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..modeling.config import UniMedVLConfig
from .quantization import QUANTIZATION_MODES, is_quantized_linear_weight
from .residency import is_generation_expert, is_understanding_only

__all__ = ["MemoryFitError", "Mode", "estimate_peak_bytes", "modes_that_fit", "check_fits", "header_shapes",
           "vae_numel"]

GB = 1e9
# CFG runs three branches of the latent tokens together (docs/sampling.md)
GUIDANCE_BRANCHES = 3


class MemoryFitError(ValueError):
    """The chosen loading mode is estimated not to fit the device's free memory."""


@dataclass(frozen=True)
class Mode:
    quantization: str | None = None
    residency: str = "all"

    def __str__(self) -> str:
        return f"quantization={self.quantization or 'none'}, residency={self.residency}"


def vae_numel(path: Path) -> int:
    """Values in ``ae.safetensors`` (0 when the VAE is embedded in the weights file)."""
    return sum(math.prod(s) for s in header_shapes(path).values()) if path.is_file() else 0


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header (no tensor data is read)."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}


def _quantized_bytes(shape: tuple[int, ...], mode: str) -> int:
    numel, rows = math.prod(shape), shape[0]
    if mode == "int8":
        return numel + rows * 5  # int8 values, a float32 scale and an int8 zero point per row
    if mode == "fp8":
        return numel + rows * 4  # float8 values, a float32 scale per row
    blocks = numel // 64
    return numel // 2 + blocks + 4 * max(1, blocks // 256) + 16  # nf4: 4-bit values, int8 block scales


def _tensor_bytes(name: str, shape: tuple[int, ...], itemsize: int, quantization: str | None) -> int:
    if quantization is not None and is_quantized_linear_weight(name):
        return _quantized_bytes(shape, quantization)
    return math.prod(shape) * itemsize


def activation_bytes(config: UniMedVLConfig, itemsize: int) -> int:
    """About the largest activations: a few MLP-wide rows for every guidance branch over a full-size
    latent, or the VAE decoder's top-resolution feature maps, whichever is larger. The factors put the
    released geometry's bf16 estimate at the 32 GB peak measured on an H200 (README, GPU figures)."""
    tokens = GUIDANCE_BRANCHES * config.max_latent_size ** 2
    llm = tokens * (4 * int(config.llm["intermediate_size"]) + 8 * int(config.llm["hidden_size"])) * itemsize
    side = config.max_image_side
    vae = 4 * side * side * config.vae.ch * config.vae.ch_mult[0] * itemsize
    return max(llm, vae)


def estimate_peak_bytes(shapes: dict[str, tuple[int, ...]], vae_numel: int, config: UniMedVLConfig,
                        dtype: torch.dtype, mode: Mode) -> int:
    """Estimated peak device bytes of the larger phase of ``mode``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    always = und = gen = 0
    layer_und: dict[str, int] = {}
    for name, shape in shapes.items():
        size = _tensor_bytes(name, shape, itemsize, mode.quantization)
        if is_generation_expert(name):
            gen += size
        elif is_understanding_only(name):
            und += size
            layer = name.split(".")[3] if name.startswith("language_model.model.layers.") else "head"
            layer_und[layer] = layer_und.get(layer, 0) + size
        else:
            always += size
    if mode.residency == "all":
        weights = always + und + gen
    else:  # the generation phase streams two layers of the understanding expert at a time
        streamed = 2 * max((v for k, v in layer_und.items() if k != "head"), default=0)
        weights = always + max(und, gen + streamed)
    return weights + vae_numel * itemsize + activation_bytes(config, itemsize)


def modes_that_fit(shapes, vae_numel: int, config: UniMedVLConfig, dtype: torch.dtype, budget: int,
                   quantizations=(None, *QUANTIZATION_MODES)) -> list[tuple[Mode, int]]:
    """Every (mode, estimated peak) whose estimate is within ``budget`` bytes, in order of preference
    (full precision first, then fewer bits; full residency before task residency)."""
    modes = [Mode(q, r) for q in quantizations for r in ("all", "task")]
    estimates = [(m, estimate_peak_bytes(shapes, vae_numel, config, dtype, m)) for m in modes]
    return [(m, e) for m, e in estimates if e <= budget]


def check_fits(weights_file: Path, vae_file: Path, config: UniMedVLConfig, dtype: torch.dtype, mode: Mode,
               budget: int, device_name: str, quantizations=(None, *QUANTIZATION_MODES)) -> int:
    """Raise ``MemoryFitError`` when ``mode`` is estimated over ``budget`` bytes; returns the estimate."""
    shapes = header_shapes(weights_file)
    vae = vae_numel(vae_file)
    need = estimate_peak_bytes(shapes, vae, config, dtype, mode)
    if need <= budget:
        return need
    fitting = modes_that_fit(shapes, vae, config, dtype, budget, quantizations)
    advice = ("; modes that fit: " + "; ".join(f"{m} (about {_size(e)})" for m, e in fitting) if fitting
              else "; no mode fits: use device_map='auto' to offload layers to the CPU")
    raise MemoryFitError(f"{mode} needs about {_size(need)} on {device_name} but {_size(budget)} is free{advice}")


def _size(nbytes: int) -> str:
    return f"{nbytes / GB:.1f} GB" if nbytes >= GB else f"{nbytes / 1e6:.1f} MB"
