"""DICOM outputs of the model, labelled as AI-generated, in the source's study and patient, in new series.

- ``derived_image``: a generated or derived image. A single-frame CT or MR source with its geometry and a
  linear window gives a derived image of the same class that keeps the slice geometry (position,
  orientation, pixel spacing scaled to the output size, frame of reference), its pixel values mapped back
  to modality units through the window the model saw; a frame of an enhanced CT or MR object gives a
  classic CT or MR image the same way, with that frame's geometry (``enhanced_frame.py``); any other source
  gives a Secondary Capture (highdicom). All carry ``ImageType`` DERIVED/SECONDARY, ``SyntheticData`` YES,
  a derivation description and a reference to the source instance (docs/medical-io.md#geometry-of-dicom-outputs).
  A region of a whole slide gives a VL Whole Slide Microscopy image placed over that region on the same
  slide, labelled the same way (``slide_output.py``, docs/medical-io.md#slide-outputs).
- ``report_sr``: answers and reports as a Comprehensive SR (highdicom) whose observer is the algorithm,
  named with its version.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from .. import __version__
from .atomic import atomic_path
from .derived_labels import (
    ALGORITHM_NAME,
    MANUFACTURER,
    SYNTHETIC_COMMENT,
    WeightsArg,
    contributing_equipment,
    copy_patient_study,
    file_meta,
    finish_derived,
    frame_in_object,
    label_derived,
    new_instance_in_series,
    set_output_charset,
    source_reference,
    weights_of,
)
from .enhanced_frame import CLASSIC_CLASS_OF_ENHANCED, classic_frame_header
from .medical_io import MedicalImage
from .slide_output import derived_slide_image
from .synthetic import DICOM_SR_DESCRIPTION
from .withheld import withhold_dicom_values

__all__ = ["derived_image", "derived_secondary_capture", "derived_image_like_source", "report_sr",
           "patient_orientation_of", "write_dicom", "contributing_equipment", "copy_patient_study",
           "set_output_charset", "MANUFACTURER", "ALGORITHM_NAME", "SYNTHETIC_COMMENT"]

_AXES = (("L", "R"), ("P", "A"), ("H", "F"))
_SAME_CLASS = {str(CTImageStorage), str(MRImageStorage)}
_PLANE_KEYWORDS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")


def patient_orientation_of(ds: Dataset) -> tuple[str, str] | None:
    """Row and column directions as patient-orientation letters, from the source's Patient Orientation or
    Image Orientation (Patient); None when the source does not say."""
    if "PatientOrientation" in ds and ds.PatientOrientation and len(ds.PatientOrientation) == 2 \
            and all(ds.PatientOrientation):
        # highdicom takes one letter per direction: the dominant (first) one, e.g. "A\FR" -> ("A", "F")
        letters = tuple(str(v)[0] for v in ds.PatientOrientation)
        return letters if all(c in "APRLHF" for c in letters) else None
    if "ImageOrientationPatient" not in ds:
        return None
    cosines = [float(v) for v in ds.ImageOrientationPatient]

    def letters(vec) -> str:  # the dominant direction only (highdicom accepts single letters)
        i = int(np.argmax(np.abs(vec)))
        return _AXES[i][0 if vec[i] > 0 else 1]

    return letters(cosines[:3]), letters(cosines[3:])


def _is_gray(pixels: np.ndarray) -> bool:
    return pixels.ndim == 2 or (np.abs(pixels[..., 0].astype(int) - pixels[..., 1]).max() <= 2 and
                                np.abs(pixels[..., 0].astype(int) - pixels[..., 2]).max() <= 2)


def _luminance(pixels: np.ndarray) -> np.ndarray:
    return pixels if pixels.ndim == 2 else np.rint(pixels[..., :3].astype(np.float64).mean(-1)).astype(np.uint8)



def _laterality(ref: Dataset) -> str | None:
    """General Series Laterality (type 2C) for a derived object: the source's, else its Image Laterality
    when that names one side, else empty."""
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(ref.get(keyword, "") or "").upper()
        if value in ("L", "R"):
            return value
    return None


def derived_secondary_capture(pixels: np.ndarray, source: MedicalImage, task: str, description: str,
                              series_instance_uid: str, series_number: int, instance_number: int = 1,
                              series_description: str | None = None, from_source: bool = True,
                              provenance: WeightsArg = None) -> Dataset:
    """A Secondary Capture of ``pixels`` (H, W, 3 uint8; stored grayscale when it is gray) in the source's
    patient and study (copied unchanged, in the source's character set). With ``from_source=False``
    (text-to-image) it only joins the source's patient and study: no geometry, no source reference."""
    ref = source.dataset
    if ref is None:
        raise ValueError("a derived DICOM needs a DICOM source image")
    orientation = patient_orientation_of(ref) if from_source else None
    spacing = source.geometry.get("pixel_spacing") if from_source else None
    rows, cols = pixels.shape[:2]
    if spacing is not None and (rows, cols) != (int(ref.Rows), int(ref.Columns)):
        # resampled output: keep the physical extent
        spacing = (spacing[0] * int(ref.Rows) / rows, spacing[1] * int(ref.Columns) / cols)
    gray = _is_gray(pixels)
    # highdicom gets no patient or study text: it refuses valid character sets such as ['', 'ISO 2022 IR 87']
    # and non-conformant source values; those attributes are copied from the source afterwards
    sc = hd.sc.SCImage(
        pixel_array=np.ascontiguousarray(_luminance(pixels) if gray else pixels, dtype=np.uint8),
        photometric_interpretation="MONOCHROME2" if gray else "RGB", bits_allocated=8, coordinate_system="PATIENT",
        study_instance_uid=ref.StudyInstanceUID, series_instance_uid=series_instance_uid,
        series_number=series_number, sop_instance_uid=generate_uid(), instance_number=instance_number,
        manufacturer=MANUFACTURER, patient_orientation=orientation or ("L", "P"),
        pixel_spacing=tuple(spacing) if spacing is not None else None, transfer_syntax_uid=ExplicitVRLittleEndian)
    if orientation is None:
        sc.PatientOrientation = None  # type 2: present but empty when the source does not say
    sc.Laterality = _laterality(ref) if from_source else None  # type 2C in General Series
    sc.ImageType = ["DERIVED", "SECONDARY"]
    label_derived(sc, task, description, series_description, provenance)
    if from_source:
        sc.SourceImageSequence = DicomSequence([source_reference(source)])
    finish_derived(sc, ref, provenance)
    return sc


def derived_image_like_source(pixels: np.ndarray, source: MedicalImage, task: str, description: str,
                              series_instance_uid: str, series_number: int, instance_number: int = 1,
                              series_description: str | None = None, provenance: WeightsArg = None
                              ) -> Dataset | None:
    """A single-frame CT or MR image with the source slice's geometry holding the output, or None when the
    source is neither a single-frame CT/MR slice nor a frame of an enhanced CT/MR object with plane geometry
    and a linear value range (then a Secondary Capture is written)."""
    ref = _classic_header_of(source)
    if ref is None:
        return None
    ds = _copy_without_pixel_description(ref)
    values = _modality_values(pixels, source)
    rows, cols = values.shape
    _set_pixel_data(ds, ref, values)
    if source.window is not None:
        ds.WindowCenter, ds.WindowWidth = source.window
    _set_geometry_scaled_to(ds, ref, rows, cols)
    image_type = ref.get("ImageType", [])
    image_type = [image_type] if isinstance(image_type, str) else list(image_type)
    ds.ImageType = ["DERIVED", "SECONDARY", *image_type[2:]]
    new_instance_in_series(ds, series_instance_uid, series_number, instance_number)
    label_derived(ds, task, description, series_description, provenance)
    ds.SourceImageSequence = DicomSequence([source_reference(source)])
    finish_derived(ds, source.dataset, provenance)
    ds.file_meta = file_meta(ds)
    return ds


def _classic_header_of(source: MedicalImage) -> Dataset | None:
    """The header an output of this slice is written like: a single-frame CT/MR source's own, or one frame
    of an enhanced CT/MR object as a classic single-frame image (``classic_frame_header``); None when there
    is no plane geometry or the values were not shown linearly."""
    ref = source.dataset
    if ref is None or source.value_range is None:
        return None
    sop_class = str(ref.get("SOPClassUID", ""))
    if sop_class in _SAME_CLASS and int(ref.get("NumberOfFrames", 1) or 1) == 1:
        header = ref
    elif sop_class in CLASSIC_CLASS_OF_ENHANCED and frame_in_object(source) is not None:
        header = classic_frame_header(ref, frame_in_object(source))
    else:
        return None
    return header if header is not None and all(key in header for key in _PLANE_KEYWORDS) else None


def _copy_without_pixel_description(ref: Dataset) -> Dataset:
    ds = Dataset()
    for element in ref:
        # the image pixel description (0028), pixel data (7FE0), presentation LUT (2050) and private data are
        # replaced or dropped; everything else (patient, study, series, equipment, geometry) is kept
        if element.tag.is_private or element.tag.group in (0x0028, 0x2050, 0x7FE0):
            continue
        ds.add(copy.deepcopy(element))
    return ds


def _modality_values(pixels: np.ndarray, source: MedicalImage) -> np.ndarray:
    """The output's gray levels (H, W) in the source's modality units."""
    low, high = source.value_range
    gray = _luminance(pixels).astype(np.float64)
    if str(source.dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        gray = 255.0 - gray  # medical_io showed MONOCHROME1 inverted; undo before mapping back
    return low + gray * (high - low) / 255.0  # back to modality units through the window the model saw


def _set_pixel_data(ds: Dataset, ref: Dataset, values: np.ndarray) -> None:
    """16-bit MONOCHROME2 pixels holding ``values``; CT keeps the source's rescale, so stored values map back
    to the same units."""
    rows, cols = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    if str(ref.SOPClassUID) == str(CTImageStorage):
        slope = float(ref.get("RescaleSlope", 1) or 1)
        intercept = float(ref.get("RescaleIntercept", 0) or 0)
        stored = np.rint((values - intercept) / slope)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        if "RescaleType" in ref:
            ds.RescaleType = ref.RescaleType
    else:
        stored = np.rint(values)
    signed = stored.min() < 0
    ds.PixelRepresentation = 1 if signed else 0
    stored = np.clip(stored, -32768, 32767) if signed else np.clip(stored, 0, 65535)
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()


def _set_geometry_scaled_to(ds: Dataset, ref: Dataset, rows: int, cols: int) -> None:
    # pixel spacing scaled to the output size; the first pixel's centre moves with it (same extent)
    old_row, old_col = (float(v) for v in ref.PixelSpacing)
    new_row, new_col = old_row * int(ref.Rows) / rows, old_col * int(ref.Columns) / cols
    ds.PixelSpacing = [new_row, new_col]
    orient = np.array([float(v) for v in ref.ImageOrientationPatient])
    position = np.array([float(v) for v in ref.ImagePositionPatient])
    position = position + orient[:3] * (new_col - old_col) / 2 + orient[3:] * (new_row - old_row) / 2
    ds.ImagePositionPatient = [round(float(v), 6) for v in position]



def derived_image(pixels: np.ndarray, source: MedicalImage, task: str, description: str, series_instance_uid: str,
                  series_number: int, instance_number: int = 1, series_description: str | None = None,
                  from_source: bool = True, provenance: WeightsArg = None) -> Dataset:
    """The derived image in the most faithful form the source allows (see the module docstring). With
    ``from_source=False`` (an image generated from text) it is a Secondary Capture in the source's study
    that claims no geometry and references no source image. ``provenance`` names the weights (a
    ``Provenance``, or the ``UniMedVLWeights`` label of a generated image): Software Versions, Image
    Comments and the Contributing Equipment Sequence (synthesizing equipment) carry it."""
    args = (pixels, source, task, description, series_instance_uid, series_number, instance_number,
            series_description)
    if not from_source:
        return derived_secondary_capture(*args, from_source=False, provenance=provenance)
    if source.geometry.get("slide_region") is not None:  # a region of a whole slide: placed back on the slide
        return derived_slide_image(*args, provenance=provenance)
    return (derived_image_like_source(*args, provenance=provenance)
            or derived_secondary_capture(*args, provenance=provenance))


_REPORT = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging report")
_FINDING = hd.sr.CodedConcept("121071", "DCM", "Finding")
_IMPRESSION = hd.sr.CodedConcept("121073", "DCM", "Impression")
_COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")


def _text_value(text: str, limit: int = 10240) -> str:
    """Model text made safe for the UT value representation: no control characters but CR, LF and tab."""
    return "".join(c for c in text if c in "\r\n\t" or (ord(c) >= 32 and ord(c) != 127))[:limit]


_ALGORITHM_NAME = hd.sr.CodedConcept("111001", "DCM", "Algorithm Name")
_ALGORITHM_VERSION = hd.sr.CodedConcept("111003", "DCM", "Algorithm Version")
_EVIDENCE_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")


def _evidence_stub(ds: Dataset) -> Dataset:
    """What highdicom needs of an evidence instance (its UIDs, empty patient and study attributes): the
    real patient and study attributes are copied afterwards, unchanged and in their character set."""
    stub = Dataset()
    for keyword in _EVIDENCE_KEYWORDS:
        setattr(stub, keyword, ds[keyword].value)
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyDate", "StudyTime", "ReferringPhysicianName"):
        setattr(stub, keyword, None)
    return stub


def _algorithm_items(provenance: WeightsArg, notes: Sequence[str]) -> list:
    """Algorithm identification (name and version, with the weights), the AI notice, the weights in words
    and any further notes, as text items."""
    short, digest = weights_of(provenance)
    version = f"{__version__}" + (f"; weights {short}" if short else "")
    texts = ["Generated by an AI model (UniMedVL); not reviewed by a physician."]
    if short:
        texts.append(f"Model weights: {short}" + (f", sha256 {digest}" if digest else "") +
                     (" (demonstration model trained on phantoms)" if getattr(provenance, "demo", False) else ""))
    items = [hd.sr.TextContentItem(_ALGORITHM_NAME, ALGORITHM_NAME, relationship_type="CONTAINS"),
             hd.sr.TextContentItem(_ALGORITHM_VERSION, _text_value(version, 1024), relationship_type="CONTAINS")]
    return items + [hd.sr.TextContentItem(_COMMENT, _text_value(text), relationship_type="CONTAINS")
                    for text in [*texts, *notes]]


def report_sr(evidence: Sequence[Dataset], findings: Sequence[str], report: str | None, series_instance_uid: str,
              series_number: int, instance_number: int = 1, device_uid: str | None = None,
              provenance: WeightsArg = None, notes: Sequence[str] = ()) -> Dataset:
    """A Comprehensive SR in the evidence's study (patient and study attributes copied unchanged, in their
    character set): the algorithm as device observer (name, version, weights), its identification (Algorithm
    Name and Version items), a statement that it is AI output, ``notes`` as comments, each answer as a finding
    and the drafted report as the impression."""
    short, digest = weights_of(provenance)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid or generate_uid(), name=f"{ALGORITHM_NAME} {__version__}"[:64],
            manufacturer_name=MANUFACTURER, model_name=(short or ALGORITHM_NAME)[:64],
            serial_number=digest[:64] if digest else None))
    root = hd.sr.ContainerContentItem(name=_REPORT, template_id="2000")
    items = list(hd.sr.ObservationContext(observer_device_context=observer)) + _algorithm_items(provenance, notes)
    items += [hd.sr.TextContentItem(_FINDING, _text_value(text), relationship_type="CONTAINS") for text in findings]
    if report:
        items.append(hd.sr.TextContentItem(_IMPRESSION, _text_value(report), relationship_type="CONTAINS"))
    root.ContentSequence = items
    sr = hd.sr.ComprehensiveSR(
        evidence=[_evidence_stub(ds) for ds in evidence], content=root, series_instance_uid=series_instance_uid,
        series_number=series_number, sop_instance_uid=generate_uid(), instance_number=instance_number,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False, specific_character_set=None)
    sr.SeriesDescription = DICOM_SR_DESCRIPTION
    sr.SoftwareVersions = [__version__, short[:64]] if short else __version__
    finish_derived(sr, evidence[0], provenance)
    return sr


def write_dicom(ds: Dataset, path: str | Path) -> Path:
    """Save ``ds`` as a DICOM file (with file meta), whole or not at all."""
    withhold_dicom_values()
    with atomic_path(path) as temporary:
        ds.save_as(str(temporary), enforce_file_format=True)
    return Path(path)
