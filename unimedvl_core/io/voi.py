"""Grey values to 8-bit display values, as docs/medical-io.md "Windows" orders the steps: the Modality LUT
(Rescale Slope/Intercept or a Modality LUT Sequence), then the VOI step (the caller's window, the file's VOI
LUT or window, a modality preset, else the full data range of the values given), then MONOCHROME1 inverted.

Pure functions shared by the DICOM reader (``medical_io.py``) and the whole-slide reader (``slide.py``), so a
slide region and any other grey image are mapped by the same code.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from .medical_image import ImageReadError

__all__ = ["WINDOW_PRESETS", "MODALITY_WINDOWS", "WindowArg", "to_uint8_range", "full_range_uint8", "gray_to_rgb",
           "frame_functional_groups", "voi_attributes", "gray_to_uint8", "grey_display"]

# (centre, width) in modality units (Hounsfield for CT).
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "liver": (60.0, 160.0),
    "mediastinum": (50.0, 350.0),
}
# Used when a file carries no VOI information; other modalities use their full data range.
MODALITY_WINDOWS = {"CT": "soft_tissue"}

WindowArg = tuple[float, float] | str | None

_FRAME_VALUE_KEYWORDS = ("RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth",
                         "VOILUTFunction")


def to_uint8_range(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto [0, 255]; a constant image becomes 0."""
    values = values.astype(np.float64, copy=False)
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def full_range_uint8(values: np.ndarray) -> np.ndarray:
    """The finite range of ``values`` mapped onto 0..255."""
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    return to_uint8_range(np.nan_to_num(values.astype(np.float64)), float(finite.min()), float(finite.max()))


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def frame_functional_groups(ds: Dataset, frame: int | None) -> Dataset:
    """One frame's functional group macros of an enhanced multi-frame object, flattened: the attributes of
    each macro's item (Plane Position, Pixel Measures, Pixel Value Transformation, ...), per-frame values
    overriding shared ones; ``frame`` None: the shared ones only. Empty for objects without functional groups."""
    out = Dataset()
    groups = []
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    if frame is not None and "PerFrameFunctionalGroupsSequence" in ds \
            and 0 <= frame < len(ds.PerFrameFunctionalGroupsSequence):
        groups.append(ds.PerFrameFunctionalGroupsSequence[frame])
    for group in groups:
        for macro in group:
            if macro.VR == "SQ" and len(macro.value):
                for element in macro.value[0]:
                    out.add(element)
    return out


def voi_attributes(ds: Dataset, frame: int | None) -> Dataset:
    """A small dataset holding what the Modality LUT and VOI steps need for one frame (``frame`` None: for
    every frame, from the shared functional groups only), including the values an enhanced multi-frame object
    keeps in its shared or per-frame functional groups."""
    out = Dataset()
    for kw in ("PhotometricInterpretation", "BitsStored", "BitsAllocated", "PixelRepresentation", "RescaleSlope",
               "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "WindowCenter", "WindowWidth",
               "VOILUTFunction", "VOILUTSequence", "Modality"):
        if kw in ds:
            setattr(out, kw, ds[kw].value)
    groups = frame_functional_groups(ds, frame)
    for kw in _FRAME_VALUE_KEYWORDS:
        if kw in groups:
            setattr(out, kw, groups[kw].value)
    return out


def _first(value) -> float:
    return float(value[0]) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else float(value)


def _window_dataset(centre: float, width: float, function: str = "LINEAR") -> Dataset:
    """VOI attributes on an 8-bit unsigned output range, so pydicom's windowing yields 0..255 directly."""
    voi = Dataset()
    voi.PhotometricInterpretation = "MONOCHROME2"
    voi.BitsStored = 8
    voi.PixelRepresentation = 0
    voi.WindowCenter = centre
    voi.WindowWidth = max(width, 1.0)
    voi.VOILUTFunction = function
    return voi


def _apply_window(values: np.ndarray, centre: float, width: float, function: str = "LINEAR") -> np.ndarray:
    return np.rint(apply_voi_lut(values, _window_dataset(centre, width, function))).astype(np.uint8)


def gray_to_uint8(frame: np.ndarray, attrs: Dataset, window: WindowArg,
                  modality: str | None) -> tuple[np.ndarray, tuple[float, float] | None, tuple | None]:
    """8-bit display values of stored values ``frame`` (any shape), the (centre, width) used if any, and the
    modality-value range shown."""
    values = apply_modality_lut(frame, attrs) if ("RescaleSlope" in attrs or "ModalityLUTSequence" in attrs) \
        else frame.astype(np.float64)
    if isinstance(window, str):
        if window not in WINDOW_PRESETS:
            raise ImageReadError(f"unknown window preset {window!r}; choose from {sorted(WINDOW_PRESETS)}")
        window = WINDOW_PRESETS[window]
    def windowed(centre, width, function="LINEAR"):
        edges = (centre - width / 2, centre + width / 2) if function != "SIGMOID" else None
        return _apply_window(values, centre, width, function), (centre, width), edges

    if window is not None:
        return windowed(float(window[0]), float(window[1]))
    if "VOILUTSequence" in attrs and len(attrs.VOILUTSequence):
        out = apply_voi_lut(frame, attrs)  # a LUT indexes stored values
        bits = int(attrs.VOILUTSequence[0].LUTDescriptor[2])
        return to_uint8_range(out, 0, 2**bits - 1), None, None
    if "WindowCenter" in attrs and "WindowWidth" in attrs:
        function = str(attrs.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        return windowed(_first(attrs.WindowCenter), _first(attrs.WindowWidth), function)
    preset = MODALITY_WINDOWS.get(modality or "")
    if preset is not None:
        return windowed(*WINDOW_PRESETS[preset])
    finite = values[np.isfinite(values)]
    span = (float(finite.min()), float(finite.max())) if finite.size else None
    return full_range_uint8(values), None, span


def grey_display(frame: np.ndarray, attrs: Dataset, window: WindowArg,
                 modality: str | None) -> tuple[np.ndarray, tuple[float, float] | None, tuple | None]:
    """``gray_to_uint8``, then MONOCHROME1 (``attrs.PhotometricInterpretation``) inverted so that bright means
    a high value as in MONOCHROME2."""
    gray, used, span = gray_to_uint8(frame, attrs, window, modality)
    if str(attrs.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        gray = 255 - gray
    return gray, used, span
