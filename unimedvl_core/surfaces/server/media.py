"""Images in and out of the server: uploads decoded within the size limits, results written as PNG, NumPy or
DICOM and always labelled synthetic, naming the weights (with a demonstration model's notice) in the file."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pydicom
from fastapi import HTTPException, UploadFile
from fastapi.responses import JSONResponse, Response
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from ...io.medical_io import ImageReadError, MedicalImage, read_image
from ...io.outputs import label_with_provenance
from ...io.provenance import Provenance
from ...io.synthetic import WEIGHTS_KEY
from ...tasks.registry import TaskResult
from .settings import Settings

__all__ = ["http_error", "load_upload", "decode_upload", "image_response", "result_response", "header_text",
           "parse_params", "labelled_png"]


def http_error(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def load_upload(upload: UploadFile, settings: Settings) -> MedicalImage:
    """An uploaded file as a model input, reading no more than one byte past the size limit."""
    return decode_upload(upload.file.read(settings.max_upload_bytes + 1), upload.filename, settings)


def _decode(data: bytes, name: str, settings: Settings) -> MedicalImage:
    if data[128:132] == b"DICM" or name.lower().endswith(".dcm"):
        return read_image(pydicom.dcmread(io.BytesIO(data), force=True))
    if data[:6] == b"\x93NUMPY" or name.lower().endswith(".npy"):
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.size > settings.max_image_pixels * 4:
            raise http_error(413, f"array of shape {array.shape} is too large")
        return read_image(array)
    with Image.open(io.BytesIO(data)) as probe:
        if probe.width * probe.height > settings.max_image_pixels:
            raise http_error(413, f"{probe.width}x{probe.height} exceeds {settings.max_image_pixels} pixels")
    return read_image(Image.open(io.BytesIO(data)))


def decode_upload(data: bytes, filename: str | None, settings: Settings) -> MedicalImage:
    """PNG/JPEG/TIFF, ``.npy`` or DICOM bytes as a model input; 400 for unreadable data, 413 for oversized."""
    if not data:
        raise http_error(400, "empty image upload")
    if len(data) > settings.max_upload_bytes:
        raise http_error(413, f"upload of {len(data)} bytes exceeds {settings.max_upload_bytes}")
    name = filename or "upload"
    try:
        return _decode(data, name, settings)
    except HTTPException:
        raise
    except ImageReadError as err:
        raise http_error(413 if "exceeds" in str(err) else 400, f"{name}: {err}") from None
    except Image.DecompressionBombError:
        raise http_error(413, f"{name}: image too large") from None
    except (UnidentifiedImageError, ValueError, OSError, pydicom.errors.InvalidDicomError) as err:
        raise http_error(400, f"{name}: not a readable image ({type(err).__name__})") from None
    except Exception as err:  # corrupt files can fail in many ways inside the readers
        raise http_error(400, f"{name}: unreadable ({type(err).__name__})") from None


def parse_params(text: str) -> dict:
    """The ``params`` form field: a JSON object of task parameters (checked later by the task itself)."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as err:
        raise http_error(422, f"params is not JSON: {err.msg}") from None
    if not isinstance(value, dict):
        raise http_error(422, "params must be a JSON object")
    return value


def header_text(text: str) -> str:
    """Header-safe: ASCII without control characters."""
    return re.sub(r"[\x00-\x1f\x7f]", " ", text.encode("ascii", "replace").decode("ascii"))


def _dicom(image: Image.Image, source: MedicalImage | None, task: str, from_source: bool,
           provenance: Provenance | None) -> bytes:
    if source is None or source.dataset is None:
        raise http_error(400, "output=dicom needs a DICOM input image")
    from pydicom.uid import generate_uid

    from ...io.dicom_output import derived_image

    ds = derived_image(np.asarray(image.convert("RGB")), source, task, image.info.get("Description", task),
                       generate_uid(), 9900, from_source=from_source, provenance=provenance)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def labelled_png(image: Image.Image, provenance: Provenance | None = None) -> bytes:
    """The image as PNG with its labels (synthetic, task, weights; ``provenance`` adds the weights and a
    demonstration model's notice) in text chunks."""
    label_with_provenance(image, provenance)
    meta = PngImagePlugin.PngInfo()
    for key, value in image.info.items():
        if isinstance(value, str):
            meta.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def image_response(image: Image.Image, output: str, source: MedicalImage | None, task: str,
                   extra_headers: dict | None = None, from_source: bool = True,
                   provenance: Provenance | None = None) -> Response:
    """A generated image with its synthetic labels: the header always, PNG text chunks or DICOM
    ``SyntheticData`` in the file; the weights of ``provenance`` in the file and headers, and a
    demonstration model's notice in ``X-UniMedVL-Notice``, the PNG text and the DICOM Image Comments."""
    label_with_provenance(image, provenance)
    notice = provenance.notice if provenance is not None else None
    headers = {"X-UniMedVL-Synthetic": "YES", "X-UniMedVL-Task": task,
               "X-UniMedVL-Description": header_text(image.info.get("Description", ""))[:500],
               "X-UniMedVL-Weights": header_text(image.info.get(WEIGHTS_KEY, ""))[:300],
               **({"X-UniMedVL-Notice": header_text(notice)} if notice else {}), **(extra_headers or {})}
    if output == "npy":
        buf = io.BytesIO()
        np.save(buf, np.asarray(image))
        return Response(buf.getvalue(), media_type="application/x-npy", headers=headers)
    if output == "dicom":
        return Response(_dicom(image, source, task, from_source, provenance), media_type="application/dicom",
                        headers=headers)
    return Response(labelled_png(image), media_type="image/png", headers=headers)


def result_response(result: TaskResult, output: str, source: MedicalImage | None,
                    provenance: Provenance | None = None) -> Response:
    """Any task's result: JSON for text only (with a demonstration model's notice), else the image with the
    text (an explanation) in a header; ``provenance``: the weights of the model that made it."""
    if result.image is None:
        notice = provenance.notice if provenance is not None else None
        return JSONResponse({"task": result.task, "text": result.text, "image": None, "notice": notice})
    headers = {"X-UniMedVL-Explanation": header_text(result.text)[:2000]} if result.text else None
    return image_response(result.image, output, source, result.task, headers, from_source=source is not None,
                          provenance=provenance)
