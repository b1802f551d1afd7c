"""How to load again, in each actor, the model a caller already holds (``unimedvl evaluate`` hands its
model to the evaluation, which sends large datasets to Ray Data), and a model that is loaded in the caller's
process only when a step runs there (docs/batch.md#evaluation)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..io.checkpoint import WEIGHT_FILES

__all__ = ["load_spec", "ModelOnDemand"]


def load_spec(model) -> tuple[str | None, dict]:
    """``(ckpt, load_options)`` that load the same weights in the same dtype: the embedded model when it is
    the demonstration model, else the checkpoint folder of its weights file and which weights file."""
    options = {"dtype": str(model.dtype).removeprefix("torch."), "quantization": model.quantization,
               "residency": "task" if model.residency is not None else "all"}  # docs/quantization.md
    provenance = model.provenance
    if provenance.demo or provenance.weights_file is None:
        return None, options
    weights_file = Path(provenance.weights_file)
    which = next((k for k, name in WEIGHT_FILES.items() if name == weights_file.name), "ema")
    return str(weights_file.parent), {**options, "weights": which}


class ModelOnDemand:
    """A model given as ``(ckpt, load_options)`` (what the Ray actors load) and the ``load`` call that makes
    it in this process. ``get`` loads it once, when a step runs here; the Ray path hands ``spec`` to its
    actors and ``release``s a copy loaded before, so that one GPU does not hold this process's copy beside
    the actors'."""

    def __init__(self, ckpt: str | Path | None, load_options: dict, load: Callable[[], Any]):
        self.spec = (None if ckpt is None else str(ckpt), dict(load_options))
        self._load, self._model = load, None
        self.name: str | None = None  # the weights' name, once loaded here or reported by the actors
        self.notice: str | None = None  # the demonstration model's notice, known the same way

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def get(self):
        if self._model is None:
            self._model = self._load()
            self.name = self._model.name
            self.notice = self._model.provenance.notice
        return self._model

    def release(self) -> None:
        """Drop this process's copy (the next ``get`` loads it again) and return its GPU memory."""
        if self._model is None:
            return
        self._model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
