"""The embedded default model that ships inside the package, so everything runs offline on a CPU."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .checkpoint import WEIGHT_FILES
from .config import UniMedVLConfig
from .model import UniMedVL

__all__ = ["DEFAULT_MODEL_DIR", "RANDOM_MODEL_NOTICE", "default_model_is_trained", "load_default_model",
           "load_model"]

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
RANDOM_MODEL_NOTICE = ("NOTE: the embedded default model has no trained weights in this build; a randomly "
                       "initialised model of its architecture is used, so its outputs are meaningless.")


def default_model_is_trained() -> bool:
    return (DEFAULT_MODEL_DIR / WEIGHT_FILES["ema"]).is_file()


def load_default_model(device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                       progress: bool = True) -> UniMedVL:
    if default_model_is_trained():
        return UniMedVL.from_pretrained(DEFAULT_MODEL_DIR, device=device, dtype=dtype, progress=progress)
    log.warning(RANDOM_MODEL_NOTICE)
    model = UniMedVL.from_config(UniMedVLConfig.from_dir(DEFAULT_MODEL_DIR), DEFAULT_MODEL_DIR, seed=0,
                                 device=device, dtype=dtype or torch.float32)
    model.name = "embedded default (randomly initialised)"
    return model


def load_model(ckpt: str | Path | None, device: str | torch.device | None = None, dtype=None,
               progress: bool = True, **kwargs) -> UniMedVL:
    """A checkpoint folder when given, else the embedded default."""
    if ckpt is None:
        return load_default_model(device or "cpu", dtype, progress)
    return UniMedVL.from_pretrained(ckpt, device=device, dtype=dtype, progress=progress, **kwargs)
