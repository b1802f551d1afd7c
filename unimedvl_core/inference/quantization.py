"""8-bit and 4-bit weights through torchao (docs/quantization.md).

Only the Linear layers of the decoder layers are quantised: both experts' attention projections (q, k, v,
o) and MLPs (gate, up, down), 13.05B of the released model's 14.6B parameters (89 %). Norms, embeddings, the text
head, the ViT, the small generation heads and the VAE stay in the load dtype: together they are a few GB at
the released geometry, the head and embeddings decide every token, and the VAE decides every pixel.

Modes (all weight-only: activations and matmuls stay in the load dtype):

- ``int8``: symmetric int8 per output row (torchao ``Int8WeightOnlyConfig``); CPU and GPU.
- ``nf4``: 4-bit NormalFloat in blocks of 64 with int8 block scales (torchao ``NF4Tensor``, as in QLoRA);
  dequantised to the compute dtype at each matmul; CPU and GPU.
- ``fp8``: float8 e4m3 per output row (torchao ``Float8WeightOnlyConfig``); GPUs of compute capability
  8.9 or newer (Ada, Hopper).

Layers are quantised one at a time while the checkpoint streams in (``io/checkpoint.py``), so no
full-precision copy of the model ever exists on the device.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["QUANTIZATION_MODES", "QuantizationError", "check_quantization", "is_quantized_linear_weight",
           "quantize_linear", "quantize_model", "weight_bytes", "tensor_bytes"]

QUANTIZATION_MODES = ("int8", "nf4", "fp8")
LAYERS_PREFIX = "language_model.model.layers."
NF4_BLOCK = 64
NF4_SCALER_BLOCK = 256
FP8_MIN_CAPABILITY = (8, 9)


class QuantizationError(ValueError):
    """A quantisation mode that is unknown, or that this installation or device cannot run."""


def check_quantization(mode: str | None, device: torch.device) -> None:
    """Raise a one-line ``QuantizationError`` unless ``mode`` can run on ``device`` (None always can)."""
    if mode is None:
        return
    if mode not in QUANTIZATION_MODES:
        raise QuantizationError(f"unknown quantization {mode!r}; use one of {', '.join(QUANTIZATION_MODES)}")
    try:
        import torchao
    except ImportError as err:
        raise QuantizationError(f"quantization={mode!r} needs torchao: "
                                f"pip install 'unimedvl-core[quantization]'") from err
    try:  # the entry points moved between torchao releases: fail here, before any weight is read
        _nf4_converter() if mode == "nf4" else _torchao_config(mode)
    except ImportError as err:
        raise QuantizationError(f"quantization={mode!r} needs torchao >= 0.18 (installed: {torchao.__version__}): "
                                f"pip install -U 'unimedvl-core[quantization]'") from err
    if mode == "fp8":
        if device.type != "cuda":
            raise QuantizationError(f"quantization='fp8' needs a CUDA GPU of compute capability 8.9+ (Ada, Hopper); "
                                    f"the device is {device.type}: use int8 or nf4")
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            raise QuantizationError(f"quantization='fp8' needs compute capability 8.9+ (Ada, Hopper); "
                                    f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}: "
                                    f"use int8 or nf4")


def is_quantized_linear_weight(name: str) -> bool:
    """Whether the parameter ``name`` (a key of ``ema.safetensors``) is quantised: a decoder layer's Linear
    weight (attention projections and MLP of both experts). Biases and norms are not."""
    return name.startswith(LAYERS_PREFIX) and name.endswith(".weight") and "_proj" in name.rsplit(".", 2)[-2]


def _nf4_scaler_block(blocks: int) -> int | None:
    """The largest power-of-two scaler block (at most 256) dividing the number of blocks."""
    size = NF4_SCALER_BLOCK
    while size > 1 and blocks % size:
        size //= 2
    return size if size > 1 else None


def _torchao_config(mode: str):
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    # set_inductor_config=False: loading a model must not change global torch.compile settings
    if mode == "int8":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    return Float8WeightOnlyConfig(set_inductor_config=False)


def _nf4_converter():
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    return to_nf4


def quantize_linear(linear: nn.Linear, mode: str) -> bool:
    """Replace ``linear.weight`` by its quantised form in place (on the weight's device). Returns False
    (weight left as it is) for an nf4 weight whose size is not a whole number of 64-value blocks."""
    weight = linear.weight.detach()
    if mode == "nf4":
        to_nf4 = _nf4_converter()
        if weight.numel() % NF4_BLOCK:
            return False
        scaler = _nf4_scaler_block(weight.numel() // NF4_BLOCK)
        if scaler is None:
            return False
        linear.weight = nn.Parameter(to_nf4(weight, NF4_BLOCK, scaler), requires_grad=False)
        return True
    from torchao.quantization import quantize_

    quantize_(linear, _torchao_config(mode))
    return True


def quantize_model(model: nn.Module, mode: str) -> int:
    """Quantise every decoder-layer Linear of a loaded model (for models built outside ``from_pretrained``,
    e.g. benchmarks); returns how many were quantised."""
    done = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and is_quantized_linear_weight(name + ".weight"):
            done += quantize_linear(module, mode)
    return done


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, counting the inner tensors of torchao's quantised tensor subclasses."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, nn.Parameter):
        return tensor.numel() * tensor.element_size()
    names, _ = flatten()
    return sum(tensor_bytes(getattr(tensor, name)) for name in names)


def weight_bytes(module: nn.Module, device: torch.device | None = None) -> int:
    """Bytes of a module's parameters (on ``device`` only, when given)."""
    return sum(tensor_bytes(p) for p in module.parameters()
               if not p.is_meta and (device is None or p.device.type == device.type))
