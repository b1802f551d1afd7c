"""How to load again, in each actor, the model a caller already holds (``unimedvl evaluate`` hands its
loaded model to the evaluation, which sends large datasets to Ray Data)."""

from __future__ import annotations

from pathlib import Path

from ..io.checkpoint import WEIGHT_FILES

__all__ = ["load_spec"]


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
