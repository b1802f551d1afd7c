"""Labelling of generated images: every image the model makes says so, wherever it is written."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, PngImagePlugin

from .. import __version__

__all__ = ["SYNTHETIC_NOTICE", "SOFTWARE", "WEIGHTS_KEY", "label_synthetic", "is_labelled_synthetic", "save_png"]

SYNTHETIC_NOTICE = "AI-generated synthetic image (UniMedVL). Not acquired from a patient; not for diagnosis."
SOFTWARE = f"unimedvl-core {__version__}"


WEIGHTS_KEY = "UniMedVLWeights"


def label_synthetic(image: Image.Image, task: str, description: str = "", weights: str | None = None) -> Image.Image:
    """Attach the synthetic-content labels to ``image.info`` (written as PNG text chunks by ``save_png``, and
    read by the DICOM and NIfTI writers): synthetic, the software, the task, and the weights that made it."""
    image.info.update({
        "SyntheticData": "YES",
        "Software": SOFTWARE,
        "Comment": SYNTHETIC_NOTICE,
        "UniMedVLTask": task,
    })
    if description:
        image.info["Description"] = description
    if weights:
        image.info[WEIGHTS_KEY] = weights
    return image


def is_labelled_synthetic(image: Image.Image) -> bool:
    return image.info.get("SyntheticData") == "YES"


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Save as PNG keeping every text entry of ``image.info`` (the synthetic labels among them)."""
    path = Path(path)
    meta = PngImagePlugin.PngInfo()
    for key, value in image.info.items():
        if isinstance(value, str):
            meta.add_text(key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=meta)
    return path
