"""What every reader returns: ``MedicalImage`` (pixels ready for the model, with where they came from), the
error a reader raises for input it cannot read, and the size limit checked before decoding anything."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

__all__ = ["MedicalImage", "ImageReadError", "MAX_DECLARED_BYTES"]

# Refuse before decoding anything larger than this (declared rows x columns x frames x samples x bytes).
MAX_DECLARED_BYTES = 2 * 1024**3


class ImageReadError(ValueError):
    """An input image cannot be read or is not supported; the message names the source and the problem."""


@dataclass
class MedicalImage:
    """A 2-D image ready for the model, with where it came from.

    Args:
        pixels: (H, W, 3) uint8 RGB.
        source: a short name of the source (file name, "array", ...), safe to log.
        dataset: the DICOM object the pixels came from, kept for derived outputs (never logged).
        frame: index of the frame or slice within the source, if it had several.
        num_frames: how many frames or slices the source had.
        modality: DICOM Modality when known.
        window: (centre, width) applied, in modality units, when a window was used.
        value_range: modality values mapped linearly onto 0..255 (the window's edges, or the data range),
            so that derived outputs can be mapped back; None when a non-linear VOI LUT was used.
        geometry: spatial metadata of the slice when known (``pixel_spacing``, ``affine`` for NIfTI,
            ``dicom_frame``: the 0-based frame within a multi-frame DICOM object, which ``frame`` is not when
            the object is one file of a series folder).
    """

    pixels: np.ndarray = field(repr=False)
    source: str
    dataset: Dataset | None = field(default=None, repr=False)  # the header holds patient identity: never shown
    frame: int | None = None
    num_frames: int = 1
    modality: str | None = None
    window: tuple[float, float] | None = None
    geometry: dict[str, Any] = field(default_factory=dict)
    value_range: tuple[float, float] | None = None

    def to_pil(self) -> Image.Image:
        return Image.fromarray(self.pixels)

    def __repr__(self) -> str:
        return (f"MedicalImage({self.source}, {self.size[0]}x{self.size[1]}, modality={self.modality}, "
                f"frame={self.frame}/{self.num_frames}, dicom={self.dataset is not None})")

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]


