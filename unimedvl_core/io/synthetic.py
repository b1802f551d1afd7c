"""Labelling of generated images: every image the model makes says so, wherever it is written."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, PngImagePlugin

from .. import __version__
from .atomic import atomic_path

__all__ = ["SYNTHETIC_NOTICE", "SOFTWARE", "WEIGHTS_KEY", "NOTICE_KEY", "DICOM_MANUFACTURER", "DICOM_SR_DESCRIPTION",
           "NIFTI_DESCRIP_PREFIX", "label_synthetic", "is_labelled_synthetic", "save_png", "is_own_output"]

SYNTHETIC_NOTICE = "AI-generated synthetic image (UniMedVL). Not acquired from a patient; not for diagnosis."
SOFTWARE = f"unimedvl-core {__version__}"
# How the DICOM and NIfTI writers (dicom_output.py, outputs.py) sign what they write; is_own_output reads it.
DICOM_MANUFACTURER = "UniMedVL open implementation"
DICOM_SR_DESCRIPTION = "AI-generated answers and report (UniMedVL)"
DICOM_DERIVATION_PREFIX = "AI-generated (UniMedVL "
NIFTI_DESCRIP_PREFIX = b"SYNTHETIC"


WEIGHTS_KEY = "UniMedVLWeights"
NOTICE_KEY = "UniMedVLNotice"  # a demonstration model's notice (Provenance.notice), when it made the image


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
    """Save as PNG keeping every text entry of ``image.info`` (the synthetic labels among them); written
    whole or not at all."""
    path = Path(path)
    meta = PngImagePlugin.PngInfo()
    for key, value in image.info.items():
        if isinstance(value, str):
            meta.add_text(key, value)
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG", pnginfo=meta)
    return path


def _own_png(path: Path) -> bool:
    with Image.open(path) as img:  # reads the chunks before the image data only
        info = img.info
        return info.get("SyntheticData") == "YES" and str(info.get("Software", "")).startswith("unimedvl-core")


def _own_dicom(path: Path) -> bool:
    import pydicom

    keywords = ["SyntheticData", "Manufacturer", "DerivationDescription", "SeriesDescription", "SoftwareVersions"]
    ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=keywords, force=True)
    ours = ds.get("Manufacturer") == DICOM_MANUFACTURER
    if ds.get("SyntheticData") == "YES":
        return ours or str(ds.get("DerivationDescription", "")).startswith(DICOM_DERIVATION_PREFIX)
    return ours and ds.get("SeriesDescription") == DICOM_SR_DESCRIPTION  # our SR of answers and reports


def _own_nifti(path: Path) -> bool:
    import nibabel as nib

    header = nib.load(str(path)).header  # the image data is not read
    return bytes(header["descrip"].tobytes()).startswith(NIFTI_DESCRIP_PREFIX)


def is_own_output(path: str | Path) -> bool:
    """Whether ``path`` is a file this project wrote (so that surfaces can pass over it as an input), from its
    header only: a PNG with ``SyntheticData`` YES and our ``Software`` text chunk; a DICOM image with
    ``SyntheticData`` YES and our Manufacturer or derivation description, or our SR; a NIfTI whose
    ``descrip`` starts with SYNTHETIC. Unreadable or other files give False."""
    path = Path(path)
    name = path.name.lower()
    try:
        if not path.is_file():
            return False
        if name.endswith((".nii", ".nii.gz")):
            return _own_nifti(path)
        with open(path, "rb") as handle:
            head = handle.read(132)
        if head.startswith(b"\x89PNG"):
            return _own_png(path)
        if head[128:132] == b"DICM" or name.endswith(".dcm"):
            return _own_dicom(path)
    except Exception:  # a file we cannot parse is not one of ours
        return False
    return False
