"""The embedded default model that ships inside the package, so everything runs offline on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..io.checkpoint import VAE_FILE, WEIGHT_FILES, CheckpointError

if TYPE_CHECKING:  # the model's code is imported when a model is loaded, so DEFAULT_MODEL_DIR is cheap to import
    from .model import UniMedVL

__all__ = ["DEFAULT_MODEL_DIR", "load_default_model", "load_model"]

DEFAULT_MODEL_DIR = Path(__file__).parents[1] / "default_model"


def load_default_model(device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                       progress: bool = True, quantization: str | None = None, residency: str = "all") -> UniMedVL:
    """The embedded phantom-trained model; ``quantization`` and ``residency`` as in ``UniMedVL.from_pretrained``."""
    missing = [n for n in (WEIGHT_FILES["ema"], VAE_FILE) if not (DEFAULT_MODEL_DIR / n).is_file()]
    if missing:
        raise CheckpointError(f"the embedded default model is incomplete in this installation ({', '.join(missing)} "
                              f"missing from {DEFAULT_MODEL_DIR}); reinstall the package or pass --ckpt DIR")
    from .model import UniMedVL

    model = UniMedVL.from_pretrained(DEFAULT_MODEL_DIR, device=device, dtype=dtype, progress=progress,
                                     quantization=quantization, residency=residency)
    model.name = "embedded default (phantom-trained)"
    model.provenance.demo = True  # it knows procedural phantoms only: outputs say so
    return model


def load_model(ckpt: str | Path | None, device: str | torch.device | None = None, dtype=None,
               progress: bool = True, **kwargs) -> UniMedVL:
    """A checkpoint folder when given, else the embedded default. ``quantization`` and ``residency`` (in
    ``kwargs``) apply to both; the other ``from_pretrained`` arguments to a checkpoint folder only."""
    if ckpt is None:
        return load_default_model(device or "cpu", dtype, progress, kwargs.get("quantization"),
                                  kwargs.get("residency", "all"))
    from .model import UniMedVL

    return UniMedVL.from_pretrained(ckpt, device=device, dtype=dtype, progress=progress, **kwargs)
