"""UniMedVL for MONAI and 3D Slicer: the model, medical image I/O, the CLI.

Names are imported on first use, so that light users (e.g. an HTTP client in Slicer) do not pay for
importing transformers and diffusers.
"""

from __future__ import annotations

import importlib
import logging

# transformers imports torchao whenever it is installed (the quantization extra); on a machine without the
# GPUs its prebuilt kernels target, torchao logs one warning per kernel library and torch one per enum it
# registers; diffusers warns that it cannot register torchao tensors for torch.load (we load safetensors only).
# None is actionable, and surfaces promise one clear line on stderr.
for _noisy in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

__version__ = "0.1.0"

_EXPORTS = {
    "UniMedVL": "inference.model", "CounterfactualResult": "inference.model",
    "UniMedVLConfig": "modeling.config", "VAEConfig": "modeling.config",
    "MedicalImage": "io.medical_io", "ImageReadError": "io.medical_io", "read_image": "io.medical_io",
    "read_slices": "io.medical_io",
    "load_model": "inference.embedded", "load_default_model": "inference.embedded",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'unimedvl_core' has no attribute {name!r}")
