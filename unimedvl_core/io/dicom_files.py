"""Finding and reading DICOM files: the preamble test, header reading that tolerates files without file meta
and reports failures in one line naming the file only, and the image headers of a folder (non-image objects
and whole-slide instances showing the slide label left out)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    VLWholeSlideMicroscopyImageStorage,
)

from .medical_image import ImageReadError

__all__ = ["is_dicom_file", "read_dicom", "dicom_image_headers", "slide_image_kind", "slide_label_shown",
           "SLIDE_PHOTO_KINDS"]

log = logging.getLogger(__name__)

# Whole-slide instances that photograph the slide label (patient identity burned in): never images of the slide.
SLIDE_PHOTO_KINDS = ("LABEL", "OVERVIEW")


def slide_image_kind(header: Dataset) -> str | None:
    """Value 3 of Image Type of a VL Whole Slide Microscopy instance (VOLUME, THUMBNAIL, LABEL, OVERVIEW);
    VOLUME when Image Type has fewer than 3 values but the instance has a total pixel matrix (a tiled level
    from a writer that left the value out, docs/medical-io.md "Whole-slide images"), else ""; None for any
    other object."""
    if str(header.get("SOPClassUID", "")) != VLWholeSlideMicroscopyImageStorage:
        return None
    image_type = list(header.get("ImageType", []) or [])
    if len(image_type) > 2:
        return str(image_type[2]).upper()
    return "VOLUME" if "TotalPixelMatrixColumns" in header else ""


def slide_label_shown(header: Dataset) -> str | None:
    """Why a whole-slide instance is never read, or None: it shows the slide label (patient identity), being a
    LABEL or OVERVIEW photograph, or any other kind flagged Specimen Label In Image or Burned In Annotation YES
    (e.g. a THUMBNAIL of the whole glass)."""
    kind = slide_image_kind(header)
    if kind in SLIDE_PHOTO_KINDS:
        return f"a slide {kind.lower()} photograph (may show patient identity)"
    if kind is not None and any(str(header.get(flag, "")).strip().upper() == "YES"
                                for flag in ("SpecimenLabelInImage", "BurnedInAnnotation")):
        return f"a slide {kind.lower() or 'image'} showing the slide label (may show patient identity)"
    return None


def is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_dicom(path: Path, stop_before_pixels: bool = False) -> Dataset:
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as err:
        # Older files often lack the preamble and file meta; accept them when they parse as a dataset
        # with an SOP class, which arbitrary bytes do not.
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels, force=True)
            if "SOPClassUID" in ds:
                return _with_transfer_syntax(ds)
        except Exception:
            pass
        raise ImageReadError(f"{path.name}: not a DICOM file ({err})") from None
    except Exception as err:  # truncated or corrupt files raise many types inside pydicom
        raise ImageReadError(f"{path.name}: unreadable DICOM ({type(err).__name__}: {err})") from None


def _with_transfer_syntax(ds: Dataset) -> Dataset:
    """A dataset read without file meta (no preamble) gets the transfer syntax it was read with, which
    pixel decoding needs."""
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def dicom_image_headers(folder: Path) -> Iterator[tuple[Path, Dataset]]:
    """(path, header) of every DICOM image file under ``folder``; unreadable files, non-image objects
    (SR, RT structure sets, ...) and whole-slide instances showing the slide label (``slide_label_shown``: label
    and overview photographs, instances flagged as showing it) are passed over with a log line naming the file
    only."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        # files without the preamble are tried when their name allows DICOM (".dcm" or no suffix)
        if not is_dicom_file(path) and path.suffix.lower() not in (".dcm", ""):
            continue
        try:
            header = read_dicom(path, stop_before_pixels=True)
        except ImageReadError:
            log.warning("skipping unreadable DICOM file %s", path.name)
            continue
        if "Rows" not in header:
            log.info("skipping %s: not an image (%s)", path.name, getattr(header.get("SOPClassUID"), "name", "?"))
            continue
        label = slide_label_shown(header)
        if label:
            log.info("skipping %s: %s", path.name, label)
            continue
        yield path, header


