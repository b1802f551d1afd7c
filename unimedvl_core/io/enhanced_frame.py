"""One frame of an enhanced multi-frame CT or MR object seen as a classic single-frame CT or MR header, so a
derived output of that frame can be written as a classic image with the frame's plane geometry
(``dicom_output.derived_image_like_source``; why: docs/medical-io.md#geometry-of-dicom-outputs).

The frame's functional groups (per-frame overriding shared, ``medical_io.frame_functional_groups``) give the
plane position and orientation, pixel spacing and slice thickness, rescale and window; the classic CT and
MR image modules' acquisition attributes are taken from the matching macros (X-Ray Details, MR Timing,
MR Echo, MR Modifier) and the MR pulse sequence module, or, for a Legacy Converted Enhanced object, from the
classic attributes its Unassigned Converted Attributes keep (flattened with the functional groups).
"""

from __future__ import annotations

import copy

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
)
from pydicom.valuerep import DSfloat

from .medical_io import frame_functional_groups

__all__ = ["CLASSIC_CLASS_OF_ENHANCED", "classic_frame_header"]

CLASSIC_CLASS_OF_ENHANCED = {
    str(EnhancedCTImageStorage): str(CTImageStorage), str(LegacyConvertedEnhancedCTImageStorage): str(CTImageStorage),
    str(EnhancedMRImageStorage): str(MRImageStorage), str(LegacyConvertedEnhancedMRImageStorage): str(MRImageStorage),
}
# Frame values that a classic image holds at the top level (classic keyword: the functional group keywords
# that give it, first found wins). A Legacy Converted Enhanced object keeps the classic keyword itself.
_FRAME_VALUES = {
    "ImagePositionPatient": ("ImagePositionPatient",), "ImageOrientationPatient": ("ImageOrientationPatient",),
    "PixelSpacing": ("PixelSpacing",), "SliceThickness": ("SliceThickness",),
    "SpacingBetweenSlices": ("SpacingBetweenSlices",), "RescaleSlope": ("RescaleSlope",),
    "RescaleIntercept": ("RescaleIntercept",), "RescaleType": ("RescaleType",),
    "EchoTime": ("EchoTime", "EffectiveEchoTime"),
}
# Classic CT and MR image module attributes taken as they are when the frame's groups hold them: the
# enhanced macros (X-Ray Details, MR Timing) use the same tags; legacy converted objects keep the rest.
_CLASSIC_ACQUISITION = {
    str(CTImageStorage): (
        "KVP", "AcquisitionNumber", "ScanOptions", "DataCollectionDiameter", "ReconstructionDiameter",
        "GantryDetectorTilt", "TableHeight", "RotationDirection", "ExposureTime", "XRayTubeCurrent", "Exposure",
        "FilterType", "FocalSpots", "ConvolutionKernel"),
    str(MRImageStorage): (
        "ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "SequenceName", "AngioFlag",
        "RepetitionTime", "InversionTime", "EchoTrainLength", "TriggerTime", "NumberOfAverages",
        "ImagingFrequency", "ImagedNucleus", "EchoNumbers", "MagneticFieldStrength", "NumberOfPhaseEncodingSteps",
        "PercentSampling", "PercentPhaseFieldOfView", "PixelBandwidth", "AcquisitionMatrix",
        "InPlanePhaseEncodingDirection", "FlipAngle", "VariableFlipAngleFlag", "SAR"),
}
# Attributes that describe the multi-frame structure or the enhanced image modules only.
_ENHANCED_ONLY = {
    "DimensionOrganizationSequence", "DimensionIndexSequence", "DimensionOrganizationType", "ConcatenationUID",
    "InConcatenationNumber", "InConcatenationTotalNumber", "ConcatenationFrameOffsetNumber",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "PixelPresentation",
    "VolumetricProperties", "VolumeBasedCalculationTechnique", "ComplexImageComponent", "AcquisitionContrast",
}
# Type 2 attributes of the classic CT and MR image modules: present, empty when the source does not say.
_TYPE2 = {str(CTImageStorage): ("KVP", "AcquisitionNumber", "SliceThickness"),
          str(MRImageStorage): ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength",
                                "SliceThickness")}


def classic_frame_header(ds: Dataset, frame: int) -> Dataset | None:
    """The header of frame ``frame`` (0-based) of an enhanced CT or MR object as a classic single-frame
    image of the matching class; None for other objects, and for MR when neither the frame nor the pulse
    sequence says its scanning sequence (a classic MR image must)."""
    classic = CLASSIC_CLASS_OF_ENHANCED.get(str(ds.get("SOPClassUID", "")))
    if classic is None:
        return None
    header = Dataset()
    for element in ds:
        if element.keyword not in _ENHANCED_ONLY and element.tag.group not in (0x5200, 0x7FE0):
            header.add(copy.copy(element))  # a copy: values set below must not change the source
    header.SOPClassUID = classic
    groups = frame_functional_groups(ds, frame)
    header.ImageType = groups.get("FrameType") or ds.get("ImageType")  # the frame's own when it says
    if groups.get("FrameLaterality") and "ImageLaterality" not in header:  # same terms, per image
        header.ImageLaterality = groups.FrameLaterality
    for keyword, group_keywords in (*_FRAME_VALUES.items(), *((k, (k,)) for k in _CLASSIC_ACQUISITION[classic])):
        value = next((groups[k].value for k in group_keywords if _stated(groups, k)), None)
        if value is not None:
            _set(header, keyword, value)
    if classic == str(MRImageStorage) and not _set_mr_sequence(header, ds, groups):
        return None
    for keyword in _TYPE2[classic]:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _stated(ds: Dataset, keyword: str) -> bool:
    return keyword in ds and ds[keyword].value not in (None, "")


def _set(header: Dataset, keyword: str, value) -> None:
    """Sets a value; a binary float (FD: effective echo time, inversion times) going into a DS attribute is
    written in at most 16 characters, as DS allows."""
    if dictionary_VR(keyword) == "DS":
        value = [_as_ds(v) for v in value] if isinstance(value, (list, tuple, MultiValue)) else _as_ds(value)
    setattr(header, keyword, value)


def _as_ds(value):
    if value is None or isinstance(value, (str, bytes)) or (isinstance(value, DSfloat) and len(str(value)) <= 16):
        return value
    return DSfloat(value, auto_format=True)


def _set_mr_sequence(header: Dataset, ds: Dataset, groups: Dataset) -> bool:
    """Scanning Sequence and Sequence Variant (type 1), and Inversion Time (type 2C, when IR) of a classic MR
    image: the frame's own classic values when it states them (legacy converted), else from the pulse
    sequence module and the MR Modifier macro. False when the scanning sequence is not known."""
    if "ScanningSequence" not in header:
        scanning = _mr_scanning_sequence(ds, groups)
        if not scanning:
            return False
        header.ScanningSequence = scanning
    if "SequenceVariant" not in header:
        header.SequenceVariant = _mr_sequence_variant(ds, groups)
    if "IR" in header.ScanningSequence and "InversionTime" not in header:
        times = groups.get("InversionTimes") or ds.get("InversionTimes")
        first = times[0] if isinstance(times, (list, tuple, MultiValue)) and len(times) else times
        _set(header, "InversionTime", first if first not in ("", None) else None)
    return True


def _pulse_value(ds: Dataset, groups: Dataset, keyword: str, default: str) -> str:
    """A pulse sequence or MR Modifier attribute: the frame's functional groups (the MR Modifier macro,
    shared or per frame) first, then the top level (MR Pulse Sequence module)."""
    value = groups.get(keyword) if _stated(groups, keyword) else ds.get(keyword)
    return str(value) if value not in (None, "") else default


def _mr_scanning_sequence(ds: Dataset, groups: Dataset) -> list[str]:
    """Scanning Sequence (SE, GR, EP, IR) from the MR Pulse Sequence module and the MR Modifier macro; empty
    when the echo pulse sequence is not stated."""
    echo = _pulse_value(ds, groups, "EchoPulseSequence", "")
    terms = {"SPIN": ["SE"], "GRADIENT": ["GR"], "BOTH": ["SE", "GR"]}.get(echo, [])
    if terms and _pulse_value(ds, groups, "EchoPlanarPulseSequence", "NO") == "YES":
        terms.append("EP")
    if terms and _pulse_value(ds, groups, "InversionRecovery", "NO") == "YES":
        terms.append("IR")
    return terms


def _mr_sequence_variant(ds: Dataset, groups: Dataset) -> list[str]:
    """Sequence Variant from the MR Pulse Sequence module and the MR Modifier macro (segmented k-space,
    steady state, spoiled, magnetization transfer, oversampling phase), NONE when none applies."""
    variants = []
    if _pulse_value(ds, groups, "SegmentedKSpaceTraversal", "SINGLE") != "SINGLE":
        variants.append("SK")
    steady = _pulse_value(ds, groups, "SteadyStatePulseSequence", "NONE")
    if steady != "NONE":
        variants.append("TRSS" if steady == "TIME_REVERSED" else "SS")
    for keyword, term in (("Spoiling", "SP"), ("MagnetizationTransfer", "MTC"), ("OversamplingPhase", "OSP")):
        if _pulse_value(ds, groups, keyword, "NONE") != "NONE":
            variants.append(term)
    return variants or ["NONE"]
