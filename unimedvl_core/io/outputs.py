"""Writing generated images where they came from: a labelled PNG always, a DICOM Secondary Capture in the
source study when the source was DICOM, a NIfTI slice with the source's geometry when it was NIfTI."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from .medical_io import MedicalImage
from .provenance import Provenance
from .synthetic import NIFTI_DESCRIP_PREFIX, SYNTHETIC_NOTICE, WEIGHTS_KEY, save_png

__all__ = ["write_image_outputs", "write_nifti_slice", "nifti_labels", "OUTPUT_SERIES_NUMBER"]

OUTPUT_SERIES_NUMBER = 9900
_HASH = re.compile(r"sha256:([0-9a-f]{6,64})")


def nifti_labels(weights: Provenance | str | None) -> dict[str, bytes]:
    """NIfTI header labels of a synthetic slice: ``descrip`` (80 bytes) "SYNTHETIC UniMedVL <short hash>",
    ``intent_name`` (16) "synthetic", ``aux_file`` (24) "sha256:<16 hex>" when the weights' hash is known."""
    if isinstance(weights, Provenance):
        digest = weights.sha256
    else:
        found = _HASH.search(weights or "")
        digest = found.group(1) if found else None
    descrip = NIFTI_DESCRIP_PREFIX + b" UniMedVL" + (f" {digest[:12]}".encode() if digest else b"")
    labels = {"descrip": descrip[:79], "intent_name": b"synthetic"}
    if digest:
        labels["aux_file"] = f"sha256:{digest[:16]}".encode()
    return labels


def write_nifti_slice(image: Image.Image, source: MedicalImage, path: Path,
                      weights: Provenance | str | None = None) -> Path | None:
    """The output as a one-slice grayscale NIfTI in the source volume's space (RAS), physical extent kept,
    labelled synthetic with the weights (``weights``, else the image's ``UniMedVLWeights`` label; see
    ``nifti_labels``); None when the source was not a NIfTI volume."""
    import nibabel as nib

    affine = source.geometry.get("affine")
    if affine is None or source.frame is None:
        return None
    gray = np.asarray(image.convert("L"))
    # medical_io shows an axial slice as data[:, :, k].T[::-1, ::-1]; undo that
    data = gray[::-1, ::-1].T[:, :, None].astype(np.uint8)
    a = np.array(affine, dtype=np.float64)
    rows, cols = source.pixels.shape[:2]  # displayed (y, x) size of the source slice
    ratio = np.array([cols / data.shape[0], rows / data.shape[1], 1.0])
    out = a.copy()
    out[:3, :3] = a[:3, :3] * ratio[None, :]
    # keep the slice position and the physical extent: voxel centres move with the new spacing
    out[:3, 3] = a[:3, 3] + a[:3, 2] * source.frame + (out[:3, :2] - a[:3, :2]).sum(axis=1) / 2
    img = nib.Nifti1Image(data, out)
    for key, value in nifti_labels(weights if weights is not None else image.info.get(WEIGHTS_KEY)).items():
        img.header[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def write_image_outputs(image: Image.Image, source: MedicalImage | None, out: Path, task: str, description: str,
                        series_uid: str, instance: int) -> list[Path]:
    """PNG (with the synthetic labels of ``image.info``), plus DICOM or NIfTI matching the source."""
    image.info.setdefault("Comment", SYNTHETIC_NOTICE)
    written = [save_png(image, out.parent / f"{out.name}.png")]  # names may contain dots (UIDs)
    if source is not None and source.dataset is not None:
        from .dicom_output import derived_image, write_dicom  # highdicom loads only when DICOM is written

        ds = derived_image(np.asarray(image.convert("RGB")), source, task, description, series_uid,
                           series_number=OUTPUT_SERIES_NUMBER, instance_number=instance,
                           provenance=image.info.get(WEIGHTS_KEY))
        written.append(write_dicom(ds, out.parent / f"{out.name}.dcm"))
    elif source is not None and "affine" in source.geometry:
        nifti = write_nifti_slice(image, source, out.parent / f"{out.name}.nii.gz")
        if nifti is not None:
            written.append(nifti)
    return written
