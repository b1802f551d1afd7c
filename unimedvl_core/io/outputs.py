"""Writing generated images where they came from: a labelled PNG always, a DICOM image in the source study
when the source was DICOM, a NIfTI with the source's geometry when it was NIfTI (one volume for the outputs
of several slices). Every file is written whole or not at all (``atomic.py``)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .atomic import atomic_path
from .medical_io import MedicalImage
from .provenance import Provenance
from .synthetic import NIFTI_DESCRIP_PREFIX, NOTICE_KEY, SYNTHETIC_NOTICE, WEIGHTS_KEY, save_png

__all__ = ["write_image_outputs", "write_nifti_slice", "write_nifti_volume", "nifti_labels", "label_with_provenance",
           "OUTPUT_SERIES_NUMBER"]

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


def _gray_voxels(image: Image.Image) -> np.ndarray:
    """A displayed slice back in voxel order: medical_io shows data[:, :, k] as data[:, :, k].T[::-1, ::-1]."""
    return np.asarray(image.convert("L"))[::-1, ::-1].T


def _output_affine(source: MedicalImage, shape: tuple[int, int], first: int, step: int) -> np.ndarray:
    """The source's affine for an output of in-plane voxel ``shape`` whose slices start at source slice
    ``first`` and are ``step`` slices apart: the physical extent of a slice is kept (voxel centres move with
    the new spacing), and so are the slice positions."""
    a = np.array(source.geometry["affine"], dtype=np.float64)
    rows, cols = source.pixels.shape[:2]  # displayed (y, x) size of the source slice
    ratio = np.array([cols / shape[0], rows / shape[1], float(step)])
    out = a.copy()
    out[:3, :3] = a[:3, :3] * ratio[None, :]
    out[:3, 3] = a[:3, 3] + a[:3, 2] * first + (out[:3, :2] - a[:3, :2]).sum(axis=1) / 2
    return out


def _provenance_extension(labels: dict[str, bytes], weights: Provenance | str | None):
    """A NIfTI comment extension holding the full labels as JSON (the header fields are short)."""
    import nibabel as nib

    doc = {"synthetic": True, "notice": SYNTHETIC_NOTICE, "software": "unimedvl-core",
           "weights": weights.to_dict() if isinstance(weights, Provenance) else weights,
           "label": labels["descrip"].decode()}
    return nib.nifti1.Nifti1Extension("comment", json.dumps(doc).encode())


def _slice_step(sources: Sequence[MedicalImage]) -> int | None:
    """The spacing, in source slices, of evenly spaced increasing slices (1 for a single slice)."""
    frames = [s.frame for s in sources]
    if any(f is None for f in frames):
        return None
    steps = {b - a for a, b in zip(frames, frames[1:])}
    return 1 if not steps else (steps.pop() if len(steps) == 1 and min(steps) > 0 else None)


def write_nifti_volume(images: Sequence[Image.Image], sources: Sequence[MedicalImage], path: Path,
                       weights: Provenance | str | None = None) -> Path | None:
    """The outputs of several slices of one NIfTI volume as ONE grayscale NIfTI in the source's space (RAS):
    slice positions and physical extent kept, labelled synthetic with the weights (``weights``, else the
    first image's ``UniMedVLWeights`` label; see ``nifti_labels``) in the header and, in full, in a comment
    extension. None when the sources are not slices of a NIfTI volume, are not evenly spaced in increasing
    order, or the outputs differ in size."""
    import nibabel as nib

    if not images or any("affine" not in s.geometry for s in sources) or len({i.size for i in images}) != 1:
        return None
    step = _slice_step(sources)
    if step is None:
        return None
    data = np.stack([_gray_voxels(image) for image in images], axis=-1).astype(np.uint8)
    img = nib.Nifti1Image(data, _output_affine(sources[0], data.shape[:2], sources[0].frame, step))
    weights = weights if weights is not None else images[0].info.get(WEIGHTS_KEY)
    labels = nifti_labels(weights)
    for key, value in labels.items():
        img.header[key] = value
    img.header.extensions.append(_provenance_extension(labels, weights))
    with atomic_path(path) as temporary:
        nib.save(img, str(temporary))
    return path


def write_nifti_slice(image: Image.Image, source: MedicalImage, path: Path,
                      weights: Provenance | str | None = None) -> Path | None:
    """The output as a one-slice NIfTI in the source volume's space (``write_nifti_volume`` of one slice)."""
    return write_nifti_volume([image], [source], path, weights)


def label_with_provenance(image: Image.Image, provenance: Provenance | None) -> Image.Image:
    """Add the weights and, for a demonstration model, its notice to the image's labels (PNG text chunks)."""
    if provenance is not None:
        image.info[WEIGHTS_KEY] = provenance.short
        if provenance.notice:
            image.info[NOTICE_KEY] = provenance.notice
    return image


def write_image_outputs(image: Image.Image, source: MedicalImage | None, out: Path, task: str, description: str,
                        series_uid: str, instance: int, provenance: Provenance | None = None,
                        nifti: bool = True) -> list[Path]:
    """PNG (with the synthetic labels of ``image.info``), plus DICOM or NIfTI matching the source (no NIfTI
    with ``nifti=False``: the caller writes a volume). ``provenance`` (else the image's label) names the
    weights; a demonstration model's notice goes into the PNG text, the DICOM comments and equipment."""
    image.info.setdefault("Comment", SYNTHETIC_NOTICE)
    label_with_provenance(image, provenance)
    weights = provenance if provenance is not None else image.info.get(WEIGHTS_KEY)
    written = [save_png(image, out.parent / f"{out.name}.png")]  # names may contain dots (UIDs)
    if source is not None and source.dataset is not None:
        from .dicom_output import derived_image, write_dicom  # highdicom loads only when DICOM is written

        ds = derived_image(np.asarray(image.convert("RGB")), source, task, description, series_uid,
                           series_number=OUTPUT_SERIES_NUMBER, instance_number=instance, provenance=weights)
        written.append(write_dicom(ds, out.parent / f"{out.name}.dcm"))
    elif nifti and source is not None and "affine" in source.geometry:
        path = write_nifti_slice(image, source, out.parent / f"{out.name}.nii.gz", weights)
        if path is not None:
            written.append(path)
    return written
