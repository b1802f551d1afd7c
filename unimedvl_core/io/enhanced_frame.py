"""One frame of an enhanced multi-frame CT or MR object seen as a classic single-frame CT or MR header, so a
derived output of that frame can be written as a classic image with the frame's plane geometry
(``dicom_output.derived_image_like_source``; why: docs/medical-io.md#geometry-of-dicom-outputs).

The frame's functional groups (per-frame overriding shared, ``medical_io.frame_functional_groups``) give the
plane position and orientation, pixel spacing and slice thickness, rescale and window; the classic CT and
MR image modules' acquisition attributes are taken from the matching macros (X-Ray Details, MR Timing,
MR Echo) and the MR pulse sequence module.
"""

from __future__ import annotations

import copy

from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
)

from .medical_io import frame_functional_groups

__all__ = ["CLASSIC_CLASS_OF_ENHANCED", "classic_frame_header"]

CLASSIC_CLASS_OF_ENHANCED = {
    str(EnhancedCTImageStorage): str(CTImageStorage), str(LegacyConvertedEnhancedCTImageStorage): str(CTImageStorage),
    str(EnhancedMRImageStorage): str(MRImageStorage), str(LegacyConvertedEnhancedMRImageStorage): str(MRImageStorage),
}
# Frame values that a classic image holds at the top level (classic keyword: the functional group's keyword).
_FRAME_VALUES = {
    "ImagePositionPatient": "ImagePositionPatient", "ImageOrientationPatient": "ImageOrientationPatient",
    "PixelSpacing": "PixelSpacing", "SliceThickness": "SliceThickness",
    "SpacingBetweenSlices": "SpacingBetweenSlices", "RescaleSlope": "RescaleSlope",
    "RescaleIntercept": "RescaleIntercept", "RescaleType": "RescaleType", "KVP": "KVP",
    "RepetitionTime": "RepetitionTime", "FlipAngle": "FlipAngle", "EchoTrainLength": "EchoTrainLength",
    "EchoTime": "EffectiveEchoTime",
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
    image of the matching class; None for other objects, and for MR when the pulse sequence does not say
    its scanning sequence (a classic MR image must)."""
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
    for keyword, group_keyword in _FRAME_VALUES.items():
        if group_keyword in groups and groups[group_keyword].value not in (None, ""):
            setattr(header, keyword, groups[group_keyword].value)
    if classic == str(MRImageStorage):
        scanning = _mr_scanning_sequence(ds)
        if not scanning:
            return None
        header.ScanningSequence, header.SequenceVariant = scanning, _mr_sequence_variant(ds)
    for keyword in _TYPE2[classic]:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _mr_scanning_sequence(ds: Dataset) -> list[str]:
    """Scanning Sequence (SE, GR, EP, IR) from the MR Pulse Sequence module; empty when it does not say."""
    terms = {"SPIN": ["SE"], "GRADIENT": ["GR"], "BOTH": ["SE", "GR"]}.get(str(ds.get("EchoPulseSequence", "")), [])
    if terms and ds.get("EchoPlanarPulseSequence") == "YES":
        terms.append("EP")
    if terms and ds.get("InversionRecovery") == "YES":
        terms.append("IR")
    return terms


def _mr_sequence_variant(ds: Dataset) -> list[str]:
    """Sequence Variant from the MR Pulse Sequence module (segmented k-space, steady state, spoiled,
    magnetization transfer, oversampling phase), NONE when none applies."""
    variants = []
    if str(ds.get("SegmentedKSpaceTraversal", "SINGLE")) not in ("SINGLE", ""):
        variants.append("SK")
    steady = str(ds.get("SteadyStatePulseSequence", "NONE"))
    if steady not in ("NONE", ""):
        variants.append("TRSS" if steady == "TIME_REVERSED" else "SS")
    for keyword, term in (("Spoiling", "SP"), ("MagnetizationTransfer", "MTC"), ("OversamplingPhase", "OSP")):
        if str(ds.get(keyword, "NONE")) not in ("NONE", ""):
            variants.append(term)
    return variants or ["NONE"]
