"""The CPU step of a batch job (run in Ray tasks, apart from the model): read a row's images (DICOM with
windowing, NIfTI, PNG; bytes from Parquet), so the model actors only run the model. A row that cannot be
read keeps its reason and goes on to be recorded as failed."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from PIL import Image

from ..io.medical_io import MedicalImage, read_image, read_key_slices
from ..io.slide import SlideSelection
from .sources import Row

__all__ = ["load_images", "read_step"]


def _load_one(value: Any, row: Row, window, slide: SlideSelection | None) -> MedicalImage:
    if isinstance(value, (bytes, bytearray)):
        with Image.open(io.BytesIO(value)) as img:
            return read_image(img.convert("RGB"))
    return read_image(value, frame=row.frame, window=window, series_uid=row.series_uid, slide=slide)


def load_images(row: Row, window=None, slide: SlideSelection | None = None) -> list[MedicalImage]:
    """The row's images, read and windowed; raises ``ImageReadError`` (or PIL's errors) naming the file. A
    series report reads the key slices of its volume or DICOM series (as ``unimedvl report --series-report``
    does), not one slice, and notes them in ``row.frames``. A whole slide is read with ``slide`` (the job's
    task's level rule, ``tasks.slides``)."""
    if row.fields.get("series_report") and len(row.images) == 1 and isinstance(row.images[0], (str, Path)):
        images = read_key_slices(row.images[0], row.fields["key_slices"], window, row.series_uid, slide=slide)
        row.frames = [image.frame for image in images]
        return images
    return [_load_one(value, row, window, slide) for value in row.images]


def read_step(item: dict, window=None, slide: SlideSelection | None = None) -> dict:
    """``{"id", "payload"}`` -> the same with ``(row, images)`` pickled in ``payload``; a row that cannot
    be read carries its reason in ``row.error``."""
    row: Row = pickle.loads(item["payload"])
    images: list[MedicalImage] = []
    if row.error is None:
        try:
            images = load_images(row, window, slide)
        except Exception as err:  # an unreadable input is that row's failure, not the job's
            row.error = f"{type(err).__name__}: {err}".splitlines()[0]
    return {"id": item["id"], "payload": pickle.dumps((row, images))}
