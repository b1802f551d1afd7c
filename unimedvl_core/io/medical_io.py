"""Medical image input: DICOM (files, series folders, multi-frame), NIfTI, PNG/JPEG/TIFF, arrays.

Everything becomes a display-ready 8-bit RGB image the model can read, without the reference's clipping of
16-bit data: DICOM pixels go through the Modality LUT (rescale slope/intercept), then the VOI transform
(a window given by the caller, the file's VOI LUT or window, a modality preset, or else the full data
range), MONOCHROME1 is inverted (``voi.py``, shared with the whole-slide reader), colour data (RGB, YBR,
palette) is converted to RGB by pydicom.
Errors name the file and the problem; file paths are the only identifiers ever logged (never patient data;
pydicom's messages that would quote a header value are redacted, ``withheld.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut

from ..modeling.preprocessing import MAX_INPUT_PIXELS, to_rgb
from .dicom_files import dicom_image_headers, is_dicom_file
from .dicom_files import read_dicom as _read_dicom
from .medical_image import MAX_DECLARED_BYTES, ImageReadError, MedicalImage
from .slide import SlideSelection, is_slide, read_slide, slide_from_headers
from .voi import (
    MODALITY_WINDOWS,
    WINDOW_PRESETS,
    WindowArg,
    frame_functional_groups,
    grey_display,
    to_uint8_range,
    voi_attributes,
)
from .voi import full_range_uint8 as _full_range
from .voi import gray_to_rgb as _gray_to_rgb
from .withheld import withhold_dicom_values

__all__ = ["MedicalImage", "ImageReadError", "read_image", "read_slices", "WINDOW_PRESETS", "MODALITY_WINDOWS",
           "MAX_DECLARED_BYTES", "to_uint8_range", "is_dicom_file", "dicom_image_headers", "read_key_slices",
           "key_slice_indices", "frame_functional_groups", "SlideSelection", "read_slide"]

log = logging.getLogger(__name__)

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def read_image(source: Any, frame: int | None = None, window: WindowArg = None,
               series_uid: str | None = None, slide: SlideSelection | None = None) -> MedicalImage:
    """One 2-D image from a PIL image, NumPy array, path (PNG/JPEG/TIFF, DICOM file, DICOM series folder,
    NIfTI), pydicom Dataset or ``MedicalImage``. Volumes and multi-frame objects give their middle slice
    unless ``frame`` says which; a whole slide gives the region and level ``slide`` selects."""
    slices = read_slices(source, frames=None if frame is None else [frame], window=window, series_uid=series_uid,
                         middle_only=frame is None, slide=slide)
    return slices[0]


def read_slices(source: Any, frames: list[int] | None = None, window: WindowArg = None,
                series_uid: str | None = None, middle_only: bool = False,
                slide: SlideSelection | None = None) -> list[MedicalImage]:
    """Every slice or frame of a source (or those listed in ``frames``), for per-slice processing. A whole slide
    (DICOM VL Whole Slide Microscopy) gives one image, the region and level ``slide`` selects (``slide.py``);
    ``frames`` and ``middle_only`` do not apply to it."""
    withhold_dicom_values()  # pydicom's value warnings would quote patient attributes
    if isinstance(source, MedicalImage):
        return [source]
    if isinstance(source, Image.Image):
        return [MedicalImage(_pil_to_rgb(source, "PIL image"), "PIL image")]
    if isinstance(source, np.ndarray):
        return _array_slices(source, frames, middle_only)
    if isinstance(source, Dataset):
        if is_slide(source):
            return [read_slide(source, slide, window=window)]
        return _dicom_slices(source, "DICOM dataset", frames, window, middle_only)
    if isinstance(source, (str, Path)):
        return _path_slices(Path(source), frames, window, series_uid, middle_only, slide)
    raise ImageReadError(f"unsupported image input of type {type(source).__name__}")


def _path_slices(path: Path, frames, window, series_uid, middle_only, slide) -> list[MedicalImage]:
    name = path.name
    if not path.exists():
        raise ImageReadError(f"{path}: no such file or folder")
    if path.is_dir():
        return _series_slices(path, frames, window, series_uid, middle_only, slide)
    if name.lower().endswith(_NIFTI_SUFFIXES):
        return _nifti_slices(path, frames, window, middle_only)
    if is_dicom_file(path) or name.lower().endswith(".dcm"):
        if is_slide(_read_dicom(path, stop_before_pixels=True)):  # a slide level is never decoded whole
            return [read_slide(path, slide, window=window)]
        return _dicom_slices(_read_dicom(path), name, frames, window, middle_only)
    try:
        with Image.open(path) as img:
            img.load()
            return [MedicalImage(_pil_to_rgb(img, name), name)]
    except (UnidentifiedImageError, OSError) as err:
        raise ImageReadError(f"{path}: not a readable image ({err})") from None


def key_slice_indices(count: int, wanted: int) -> list[int]:
    """``wanted`` slice indices spread evenly over ``count`` slices: the centres of equal sections, so the
    first and last slices (often outside the anatomy) are not taken unless every slice is."""
    if wanted >= count:
        return list(range(count))
    return sorted({int((i + 0.5) * count / wanted) for i in range(wanted)})


def read_key_slices(source: Any, count: int, window: WindowArg = None, series_uid: str | None = None,
                    frames: list[int] | None = None, slide: SlideSelection | None = None) -> list[MedicalImage]:
    """``count`` slices spread evenly over a volume (a path, array, dataset), over ``frames`` of it, or over a
    list of already read slices; a frame of a multi-frame DICOM (a ``MedicalImage`` keeps its dataset) gives
    frames of that object; any other 2-D image, a whole-slide region included, gives itself. Only the chosen
    slices are decoded."""
    if isinstance(source, (list, tuple)):
        return [source[i] for i in key_slice_indices(len(source), count)]
    if isinstance(source, MedicalImage):
        if source.dataset is None or "slide_region" in source.geometry \
                or int(source.dataset.get("NumberOfFrames", 1) or 1) < 2:
            return [source]
        slices = read_key_slices(source.dataset, count, window, series_uid, frames)
        for image in slices:
            image.source = source.source  # the file's name, not "DICOM dataset"
        return slices
    if frames is None:
        first = read_slices(source, window=window, series_uid=series_uid, middle_only=True, slide=slide)[0]
        if first.num_frames == 1:  # a 2-D image or a slide region: nothing to spread over
            return [first]
        frames = list(range(first.num_frames))
    if not frames:
        raise ImageReadError("no slices selected")
    picked = [frames[i] for i in key_slice_indices(len(frames), count)]
    return read_slices(source, frames=picked, window=window, series_uid=series_uid, slide=slide)


# ----------------------------------------------------------------------------------------------------------
# 8-bit conversion


def _pil_to_rgb(img: Image.Image, name: str) -> np.ndarray:
    if img.width * img.height > MAX_INPUT_PIXELS:
        raise ImageReadError(f"{name}: {img.width}x{img.height} exceeds {MAX_INPUT_PIXELS} pixels")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images: rescale the full range (PIL's convert("RGB") would clip at 255).
        return _gray_to_rgb(_full_range(np.asarray(img)))
    return np.asarray(to_rgb(img), dtype=np.uint8)


def _array_to_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        gray = arr if arr.dtype == np.uint8 else _full_range(arr)
        return _gray_to_rgb(gray)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        if arr.dtype != np.uint8:
            arr = _full_range(arr)
        img = Image.fromarray(arr, mode="RGBA" if arr.shape[-1] == 4 else "RGB")
        return np.asarray(to_rgb(img), dtype=np.uint8)
    raise ImageReadError(f"{name}: array of shape {arr.shape} is not an image (H, W), (H, W, 1|3|4)")


def _pick(count: int, frames: list[int] | None, middle_only: bool, name: str) -> list[int]:
    if frames is None:
        return [count // 2] if middle_only else list(range(count))
    bad = [f for f in frames if not -count <= f < count]
    if bad:
        raise ImageReadError(f"{name}: frame/slice {bad[0]} out of range (it has {count})")
    return [f % count for f in frames]


def _array_slices(arr: np.ndarray, frames, middle_only) -> list[MedicalImage]:
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4) or arr.ndim == 4:
        # A volume or stack: slices along the first axis.
        picked = _pick(arr.shape[0], frames, middle_only, "array")
        low, high = (float(np.nanmin(arr)), float(np.nanmax(arr))) if arr.dtype != np.uint8 else (0, 255)
        out = []
        for i in picked:
            sl = arr[i]
            pixels = _array_to_rgb(sl if arr.dtype == np.uint8 else to_uint8_range(sl, low, high), "array")
            out.append(MedicalImage(pixels, "array", frame=i, num_frames=arr.shape[0]))
        return out
    return [MedicalImage(_array_to_rgb(arr, "array"), "array")]


# ----------------------------------------------------------------------------------------------------------
# DICOM


def check_declared_size(ds: Dataset, name: str) -> None:
    """Refuse absurd declared sizes before any pixel buffer is allocated."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 8) or 8)
    except (AttributeError, TypeError, ValueError) as err:
        raise ImageReadError(f"{name}: missing or invalid image size attributes ({err})") from None
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise ImageReadError(f"{name}: invalid image size {rows}x{cols}x{frames}")
    if rows * cols > MAX_INPUT_PIXELS:
        raise ImageReadError(f"{name}: {cols}x{rows} per frame exceeds {MAX_INPUT_PIXELS} pixels")
    declared = rows * cols * frames * samples * max(bits, 8) // 8
    if declared > MAX_DECLARED_BYTES:
        raise ImageReadError(f"{name}: declared pixel data of {declared / 1024**3:.1f} GiB exceeds the "
                             f"{MAX_DECLARED_BYTES / 1024**3:.0f} GiB limit")


def _decode(ds: Dataset, name: str) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop = getattr(ds, "SOPClassUID", None)
        what = sop.name if sop is not None else "unknown SOP class"
        raise ImageReadError(f"{name}: no pixel data ({what}); not an image")
    check_declared_size(ds, name)
    try:
        return ds.pixel_array
    except Exception as err:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = ""
        if ts is not None and ts.is_compressed:
            hint = f" (transfer syntax {ts.name}; install unimedvl-core[dicom-codecs] for its decoder)"
        raise ImageReadError(f"{name}: cannot decode pixel data{hint}: {err}") from None


def _colour_to_uint8(frame: np.ndarray, bits: int) -> np.ndarray:
    if frame.dtype == np.uint8:
        return frame
    return (frame.astype(np.uint64) >> max(bits - 8, 0)).astype(np.uint8) if frame.dtype.kind == "u" \
        else _full_range(frame)


def _dicom_slices(ds: Dataset, name: str, frames, window: WindowArg, middle_only: bool) -> list[MedicalImage]:
    arr = _decode(ds, name)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    count = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if count == 1:
        arr = arr[None]
    colour_bits = int(ds.get("BitsStored", 8) or 8)
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        samples = 3
        colour_bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    modality = ds.get("Modality")
    out = []
    for index in _pick(count, frames, middle_only, name):
        frame = arr[index]
        used = span = None
        if samples == 3:
            pixels = _colour_to_uint8(frame, colour_bits)
        elif photometric in ("MONOCHROME1", "MONOCHROME2"):
            gray, used, span = grey_display(frame, voi_attributes(ds, index), window, modality)
            pixels = _gray_to_rgb(gray)
        else:
            raise ImageReadError(f"{name}: unsupported photometric interpretation {photometric}")
        geometry = {}
        spacing = frame_functional_groups(ds, index).get("PixelSpacing") or ds.get("PixelSpacing")
        if spacing:
            geometry["pixel_spacing"] = [float(v) for v in spacing]
        if count > 1:
            geometry["dicom_frame"] = index
        out.append(MedicalImage(np.ascontiguousarray(pixels), name, dataset=ds, frame=index if count > 1 else None,
                                num_frames=count, modality=modality, window=used, geometry=geometry,
                                value_range=span))
    return out


def _slice_sort_key(ds: Dataset) -> tuple:
    """Position along the slice normal (from orientation and position), else the instance number."""
    try:
        orient = np.array([float(v) for v in ds.ImageOrientationPatient])
        normal = np.cross(orient[:3], orient[3:])
        return (0, float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])))
    except (AttributeError, ValueError, TypeError):
        return (1, float(ds.get("InstanceNumber", 0) or 0))


def _series_slices(folder: Path, frames, window, series_uid, middle_only,
                   slide: SlideSelection | None = None) -> list[MedicalImage]:
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    for path, header in dicom_image_headers(folder):
        series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append((path, header))
    if not series:
        raise ImageReadError(f"{folder}: no DICOM image files found")
    if series_uid is None and len(series) > 1:
        listing = "; ".join(f"{uid} ({len(items)} images)" for uid, items in series.items())
        raise ImageReadError(f"{folder}: holds {len(series)} image series; choose one with series_uid: {listing}")
    uid = series_uid if series_uid is not None else next(iter(series))
    if uid not in series:
        raise ImageReadError(f"{folder}: no series {uid}")
    if any(is_slide(header) for _, header in series[uid]):
        return [slide_from_headers(series[uid], folder.name, slide, window)]
    items = sorted(series[uid], key=lambda item: _slice_sort_key(item[1]))
    if len(items) == 1:
        path = items[0][0]
        return _dicom_slices(_read_dicom(path), path.name, frames, window, middle_only)
    out = []
    for index in _pick(len(items), frames, middle_only, folder.name):
        path = items[index][0]
        image = _dicom_slices(_read_dicom(path), path.name, None, window, True)[0]
        image.frame, image.num_frames = index, len(items)
        out.append(image)
    return out


# ----------------------------------------------------------------------------------------------------------
# NIfTI


def _nifti_slices(path: Path, frames, window: WindowArg, middle_only: bool) -> list[MedicalImage]:
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        shape = img.shape
    except Exception as err:
        raise ImageReadError(f"{path.name}: unreadable NIfTI ({err})") from None
    if len(shape) < 2:
        raise ImageReadError(f"{path.name}: NIfTI of shape {shape} is not an image")
    if shape[0] * shape[1] > MAX_INPUT_PIXELS:
        raise ImageReadError(f"{path.name}: slices of {shape[0]}x{shape[1]} exceed {MAX_INPUT_PIXELS} pixels")
    declared = int(np.prod(shape)) * 4
    if declared > MAX_DECLARED_BYTES:
        raise ImageReadError(f"{path.name}: volume of {declared / 1024**3:.1f} GiB exceeds the limit")
    data = np.asarray(img.get_fdata(dtype=np.float32))
    while data.ndim > 3:  # 4-D and more: the first volume
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if isinstance(window, str):
        if window not in WINDOW_PRESETS:
            raise ImageReadError(f"unknown window preset {window!r}; choose from {sorted(WINDOW_PRESETS)}")
        window = WINDOW_PRESETS[window]
    if window is not None:
        low, high = window[0] - window[1] / 2, window[0] + window[1] / 2
    else:
        finite = data[np.isfinite(data)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    out = []
    for k in _pick(data.shape[2], frames, middle_only, path.name):
        # RAS+ voxels shown as radiologists view an axial slice: anterior up, patient right on the left.
        gray = to_uint8_range(data[:, :, k].T[::-1, ::-1], low, high)
        out.append(MedicalImage(_gray_to_rgb(gray), path.name, frame=k, num_frames=data.shape[2],
                                window=tuple(window) if window is not None else None,
                                geometry={"affine": img.affine.tolist(), "slice_axis": 2}, value_range=(low, high)))
    return out
