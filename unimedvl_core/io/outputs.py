"""Writing generated images where they came from: a labelled PNG always, a DICOM Secondary Capture in the
source study when the source was DICOM, a NIfTI slice with the source's geometry when it was NIfTI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .medical_io import MedicalImage
from .synthetic import SYNTHETIC_NOTICE, save_png

__all__ = ["write_image_outputs", "write_nifti_slice", "OUTPUT_SERIES_NUMBER"]

OUTPUT_SERIES_NUMBER = 9900


def write_nifti_slice(image: Image.Image, source: MedicalImage, path: Path) -> Path | None:
    """The output as a one-slice grayscale NIfTI in the source volume's space (RAS), physical extent kept;
    None when the source was not a NIfTI volume."""
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
    img.header["descrip"] = b"SYNTHETIC: AI-generated (UniMedVL)"
    img.header["intent_name"] = b"synthetic"
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
                                       series_number=OUTPUT_SERIES_NUMBER, instance_number=instance)
        written.append(write_dicom(ds, out.parent / f"{out.name}.dcm"))
    elif source is not None and "affine" in source.geometry:
        nifti = write_nifti_slice(image, source, out.parent / f"{out.name}.nii.gz")
        if nifti is not None:
            written.append(nifti)
    return written
