"""Realistic DICOM test studies, one folder each, built from pydicom's bundled files, pydicom-data and
objects made here (deflated, JPEG, JPEG 2000, JPEG-LS and RLE Secondary Captures, DX, NM, character-set
variants). Used by tests/test_dicom_io.py and by the MONAI Deploy tests (run each folder through the MAP).

    from tests.dicom_studies import build_studies, STUDIES, colour_pattern
    folders = build_studies(tmp_path)            # {name: folder holding that study's .dcm files}
    folders = build_studies(tmp_path, ["sc_jpeg_rgb", "charset_ir87"])   # only some
    info = STUDIES["sc_jpeg_rgb"]                # StudyInfo: what a reader must find in it

Every study is one series in its own study (own Study Instance UID) unless ``StudyInfo.series`` says more.
Studies whose source file is missing (pydicom-data not installed) are left out of the returned dict.
Names:

- modalities: ct, mr, mr_rle, enhanced_mr (10 frames), enhanced_ct, cr (MONOCHROME1), dx (built), us (RGB),
  us_palette, us_multiframe_jpeg (YBR_FULL_422 JPEG, 120 frames), nm (built, 4 frames), nm_sc_jpeg_lossless
- transfer syntaxes / colour: sc_deflated (RGB, built), sc_deflated_dfl (pydicom's, empty Series Number),
  sc_jpeg_rgb (baseline JPEG, RGB components, no YCbCr, built), sc_jpeg_ybr (baseline JPEG YBR_FULL_422,
  built), sc_jpeg_no_colour_transform (pydicom's; no Modality), sc_j2k_no_patient (JPEG 2000 lossless with
  RCT, no patient module, built), sc_j2k_gdcm_no_patient (pydicom's; no patient module, no Modality),
  sc_jpegls (JPEG-LS lossless RGB, built), sc_rle (RGB RLE), sc_ybr_full, sc_ybr_full_422, ot_palette (no
  preamble, palette colour)
- character sets (patient name, referring physician, study and institution in the set): charset_ir87
  (['', 'ISO 2022 IR 87'], MR), charset_ir87_sc (the same, SC RGB), charset_ir13_ir87
  (['ISO 2022 IR 13', 'ISO 2022 IR 87'], SC RGB), charset_gb18030 (GB18030, CT), charset_utf8
  (ISO_IR 192, SC RGB), charset_latin1 (ISO_IR 100, CT)
"""

from __future__ import annotations

import datetime
import io
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    NuclearMedicineImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

__all__ = ["StudyInfo", "STUDIES", "build_studies", "study_files", "colour_pattern", "CHARSET_NAMES"]


@dataclass(frozen=True)
class StudyInfo:
    """What a reader must find: ``shape`` (rows, cols) of a frame, ``frames`` per series (frames of a
    multi-frame object, or instances), ``colour`` (RGB content), ``pattern`` (pixels equal
    ``colour_pattern(*shape)`` within ``tolerance`` mean absolute error), ``modality`` as written."""

    description: str
    shape: tuple[int, int]
    frames: int = 1
    colour: bool = False
    pattern: bool = False
    tolerance: float = 0.0
    modality: str | None = None
    charset: str | list[str] | None = None


def colour_pattern(rows: int = 64, cols: int = 96) -> np.ndarray:
    """(rows, cols, 3) uint8: 2 x 3 flat blocks red, green, blue / yellow, magenta, cyan (JPEG-friendly)."""
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255]],
                       np.uint8)
    r = np.minimum(np.arange(rows) * 2 // rows, 1)[:, None]
    c = np.minimum(np.arange(cols) * 3 // cols, 2)[None, :]
    return colours[r * 3 + c]


# Non-Latin names, as in pydicom's charset test files (chrH31, chrH32, chrX1, chrX2, chrFren).
CHARSET_NAMES = {
    "charset_ir87": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "やまだ^たろう", "頭部"),
    "charset_ir87_sc": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "やまだ^たろう", "頭部"),
    "charset_ir13_ir87": (["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう", "ﾔﾏﾀﾞ^ﾀﾛｳ",
                          "ｶﾞｿﾞｳ"),
    "charset_gb18030": ("GB18030", "Wang^XiaoDong=王^小东=", "李^明", "胸部 CT 平扫"),
    "charset_utf8": ("ISO_IR 192", "Wang^XiaoDong=王^小東=", "Gómez^José", "Thorax – Übersicht"),
    "charset_latin1": ("ISO_IR 100", "Buc^Jérôme", "Äneas^Rüdiger", "Thorax Übersicht"),
}


def _bundled(name: str) -> Path | None:
    try:
        path = get_testdata_file(name)
    except Exception:  # pydicom-data files are fetched on demand; offline that fails
        return None
    return Path(path) if path else None


def _copy(name: str) -> Callable[[Path], list[Path] | None]:
    def build(folder: Path) -> list[Path] | None:
        source = _bundled(name)
        if source is None:
            return None
        target = folder / name
        shutil.copyfile(source, target)
        return [target]
    return build


# ----------------------------------------------------------------------------------------------------------
# Objects built here


def _base(sop_class: str, modality: str | None, rows: int, cols: int, patient: bool = True) -> Dataset:
    """Patient, general study/series/equipment/image and SOP common modules of a new instance."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    today = datetime.date(2024, 5, 17).strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "A1234", "Referrer^Rita", "1"
    if patient:
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", "P-0001", "19700101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    if modality is not None:
        ds.Modality = modality
    ds.SeriesNumber, ds.InstanceNumber = 3, 1
    ds.Manufacturer = "Test Modality Inc."
    ds.PatientOrientation = ""
    ds.Rows, ds.Columns = rows, cols
    ds.PixelRepresentation = 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _pixels(ds: Dataset, arr: np.ndarray, photometric: str | None = None, frames: bool = False) -> Dataset:
    colour = arr.ndim == (4 if frames else 3)
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric or ("RGB" if colour else "MONOCHROME2")
    if colour:
        ds.PlanarConfiguration = 0
    bits = arr.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    return ds


def _secondary_capture(arr: np.ndarray, modality: str | None = "OT", patient: bool = True) -> Dataset:
    ds = _base(SecondaryCaptureImageStorage, modality, arr.shape[0], arr.shape[1], patient)
    ds.ConversionType = "WSD"
    return _pixels(ds, arr)


def _save(ds: Dataset, path: Path) -> list[Path]:
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return [path]


def _sc_deflated(folder: Path) -> list[Path]:
    ds = _secondary_capture(colour_pattern())
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return _save(ds, folder / "sc_deflated.dcm")


def _jpeg_frame(arr: np.ndarray, keep_rgb: bool) -> bytes:
    buffer = io.BytesIO()
    options = {"keep_rgb": True, "subsampling": 0} if keep_rgb else {"subsampling": 1}  # 1: 4:2:2
    Image.fromarray(arr).save(buffer, format="JPEG", quality=95, **options)
    return buffer.getvalue()


def _sc_jpeg(folder: Path, keep_rgb: bool) -> list[Path]:
    """Baseline JPEG: RGB components without colour transform (Adobe marker, transform 0), or YCbCr 4:2:2."""
    arr = colour_pattern()
    ds = _secondary_capture(arr)
    ds.PhotometricInterpretation = "RGB" if keep_rgb else "YBR_FULL_422"
    ds.PixelData = encapsulate([_jpeg_frame(arr, keep_rgb)])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return _save(ds, folder / ("sc_jpeg_rgb.dcm" if keep_rgb else "sc_jpeg_ybr.dcm"))


def _sc_compressed(folder: Path, name: str, syntax: str, patient: bool = True, **kwargs) -> list[Path] | None:
    ds = _secondary_capture(colour_pattern(), patient=patient)
    try:
        ds.compress(syntax, generate_instance_uid=False, **kwargs)
    except (RuntimeError, ValueError, ImportError):  # no encoder installed (pyjpegls, pylibjpeg-openjpeg)
        return None
    if syntax == JPEG2000Lossless:
        ds.PhotometricInterpretation = "YBR_RCT"  # the encoder applied the reversible colour transform
    return _save(ds, folder / f"{name}.dcm")


def _dx(folder: Path) -> list[Path]:
    """A DX For Presentation image (12 bits in 16, MONOCHROME2) with the DX modules' Type 1 attributes."""
    ramp = (np.add.outer(np.arange(96), np.arange(80)) * 20).astype(np.uint16)
    ds = _base(DigitalXRayImageStorageForPresentation, "DX", *ramp.shape)
    _pixels(ds, ramp)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LIN", 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationLUTShape, ds.LossyImageCompression = "IDENTITY", "00"
    ds.WindowCenter, ds.WindowWidth = 2000, 4000
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.ImageLaterality, ds.Laterality, ds.PatientOrientation = "L", "L", ["A", "F"]
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.DetectorType, ds.BurnedInAnnotation = "SCINTILLATOR", "NO"
    ds.AcquisitionDate, ds.AcquisitionTime = ds.StudyDate, ds.StudyTime
    ds.ContentDate, ds.ContentTime = ds.StudyDate, ds.StudyTime
    ds.KVP, ds.ExposureTime = 120, 10
    return _save(ds, folder / "dx.dcm")


def _nm(folder: Path) -> list[Path]:
    """A 4-frame NM static image (one energy window, one detector) with its frame increment pointers."""
    frames = np.stack([(np.indices((64, 64)).sum(0) * (k + 1)).astype(np.uint16) for k in range(4)])
    ds = _base(NuclearMedicineImageStorage, "NM", 64, 64)
    _pixels(ds, frames, frames=True)
    ds.NumberOfFrames = 4
    ds.ImageType = ["ORIGINAL", "PRIMARY", "STATIC", "EMISSION"]
    ds.FrameIncrementPointer = [pydicom.tag.Tag("EnergyWindowVector"), pydicom.tag.Tag("DetectorVector")]
    ds.EnergyWindowVector, ds.NumberOfEnergyWindows = [1] * 4, 1
    ds.DetectorVector, ds.NumberOfDetectors = [1] * 4, 1
    window = Dataset()
    window.EnergyWindowRangeSequence = Sequence([Dataset()])
    window.EnergyWindowRangeSequence[0].EnergyWindowLowerLimit = 126
    window.EnergyWindowRangeSequence[0].EnergyWindowUpperLimit = 154
    ds.EnergyWindowInformationSequence = Sequence([window])
    detector = Dataset()
    detector.ImagePositionPatient, detector.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.DetectorInformationSequence = Sequence([detector])
    ds.PixelSpacing, ds.PatientOrientation = [4.0, 4.0], ["L", "P"]
    ds.Laterality = "R"
    ds.ImageID = "1"
    ds.PatientPosition = ""
    ds.AcquisitionDate, ds.AcquisitionTime = ds.StudyDate, ds.StudyTime
    ds.RadiopharmaceuticalInformationSequence = Sequence([])
    ds.LossyImageCompression = "00"
    return _save(ds, folder / "nm.dcm")


def _charset_variant(name: str, base: Callable[[Path], list[Path] | None]) -> Callable[[Path], list[Path] | None]:
    """``base``'s object re-encoded in one of ``CHARSET_NAMES``: patient and referring physician names,
    study description and institution in that character set (pydicom encodes them on writing)."""
    def build(folder: Path) -> list[Path] | None:
        files = base(folder)
        if not files:
            return None
        charset, patient, referrer, study = CHARSET_NAMES[name]
        ds = pydicom.dcmread(files[0])
        ds.SpecificCharacterSet = charset
        ds.PatientName, ds.ReferringPhysicianName = patient, referrer
        ds.StudyDescription, ds.InstitutionName = study, study
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        files[0].unlink()
        return _save(ds, folder / f"{name}.dcm")
    return build


def _built_sc(name: str) -> Callable[[Path], list[Path]]:
    return lambda folder: _save(_secondary_capture(colour_pattern()), folder / f"{name}.dcm")


_COLOUR = dict(colour=True, pattern=True)
STUDIES: dict[str, StudyInfo] = {
    "ct": StudyInfo("pydicom CT_small", (128, 128), modality="CT"),
    "mr": StudyInfo("pydicom MR_small", (64, 64), modality="MR"),
    "mr_rle": StudyInfo("pydicom MR_small_RLE (RLE lossless)", (64, 64), modality="MR"),
    "enhanced_mr": StudyInfo("pydicom-data emri_small: Enhanced MR, 10 frames", (64, 64), 10, modality="MR"),
    "enhanced_ct": StudyInfo("pydicom-data eCT_Supplemental: Enhanced CT, 2 frames", (512, 512), 2, modality="CT"),
    "cr": StudyInfo("pydicom-data RG1_UNCI: CR, MONOCHROME1", (1955, 1841), modality="CR"),
    "dx": StudyInfo("built DX For Presentation, 12-bit", (96, 80), modality="DX"),
    "us": StudyInfo("pydicom-data US1_UNCI: US RGB", (480, 640), colour=True, modality="US"),
    "us_palette": StudyInfo("pydicom-data OBXXXX1A: US palette colour", (600, 800), colour=True, modality="US"),
    "us_multiframe_jpeg": StudyInfo("pydicom-data color3d_jpeg_baseline: US YBR_FULL_422 JPEG, 120 frames",
                                    (480, 640), 120, colour=True, modality="US"),
    "nm": StudyInfo("built NM, 4 frames", (64, 64), 4, modality="NM"),
    "nm_sc_jpeg_lossless": StudyInfo("pydicom-data JPEG-LL: SC with Modality NM, JPEG lossless", (1024, 256),
                                     modality="NM"),
    "sc_deflated": StudyInfo("built SC RGB, Deflated Explicit VR Little Endian", (64, 96), modality="OT", **_COLOUR),
    "sc_deflated_dfl": StudyInfo("pydicom image_dfl: deflated grey SC, empty Series/Instance Number", (512, 512),
                                 modality="OT"),
    "sc_jpeg_rgb": StudyInfo("built SC, baseline JPEG of RGB components (no YCbCr)", (64, 96), tolerance=6,
                             modality="OT", **_COLOUR),
    "sc_jpeg_ybr": StudyInfo("built SC, baseline JPEG YBR_FULL_422", (64, 96), tolerance=8, modality="OT",
                             **_COLOUR),
    "sc_jpeg_no_colour_transform": StudyInfo("pydicom SC_jpeg_no_color_transform: RGB JPEG, no Modality",
                                             (256, 256), colour=True),
    "sc_j2k_no_patient": StudyInfo("built SC, JPEG 2000 lossless with RCT, no patient module", (64, 96),
                                   modality="OT", **_COLOUR),
    "sc_j2k_gdcm_no_patient": StudyInfo("pydicom GDCMJ2K_TextGBR: J2K lossless YBR_RCT, no patient module, "
                                        "no Modality", (400, 400), colour=True),
    "sc_jpegls": StudyInfo("built SC, JPEG-LS lossless RGB", (64, 96), modality="OT", **_COLOUR),
    "sc_rle": StudyInfo("pydicom SC_rgb_rle: RGB RLE", (100, 100), colour=True, modality="OT"),
    "sc_ybr_full": StudyInfo("pydicom-data SC_ybr_full_uncompressed", (100, 100), colour=True, modality="OT"),
    "sc_ybr_full_422": StudyInfo("pydicom SC_ybr_full_422_uncompressed", (100, 100), colour=True, modality="OT"),
    "ot_palette": StudyInfo("pydicom-data OT-PAL-8-face: palette colour, no preamble", (480, 640), colour=True,
                            modality="OT"),
    **{name: StudyInfo(f"character set {CHARSET_NAMES[name][0]}", shape, modality=modality,
                       charset=CHARSET_NAMES[name][0], **extra)
       for name, shape, modality, extra in (
           ("charset_ir87", (64, 64), "MR", {}), ("charset_ir87_sc", (64, 96), "OT", _COLOUR),
           ("charset_ir13_ir87", (64, 96), "OT", _COLOUR),
           ("charset_gb18030", (128, 128), "CT", {}), ("charset_utf8", (64, 96), "OT", _COLOUR),
           ("charset_latin1", (128, 128), "CT", {}))},
}

_BUILDERS: dict[str, Callable[[Path], list[Path] | None]] = {
    "ct": _copy("CT_small.dcm"), "mr": _copy("MR_small.dcm"), "mr_rle": _copy("MR_small_RLE.dcm"),
    "enhanced_mr": _copy("emri_small.dcm"), "enhanced_ct": _copy("eCT_Supplemental.dcm"),
    "cr": _copy("RG1_UNCI.dcm"), "dx": _dx, "us": _copy("US1_UNCI.dcm"), "us_palette": _copy("OBXXXX1A.dcm"),
    "us_multiframe_jpeg": _copy("color3d_jpeg_baseline.dcm"), "nm": _nm, "nm_sc_jpeg_lossless": _copy("JPEG-LL.dcm"),
    "sc_deflated": _sc_deflated, "sc_deflated_dfl": _copy("image_dfl.dcm"),
    "sc_jpeg_rgb": lambda folder: _sc_jpeg(folder, keep_rgb=True),
    "sc_jpeg_ybr": lambda folder: _sc_jpeg(folder, keep_rgb=False),
    "sc_jpeg_no_colour_transform": _copy("SC_jpeg_no_color_transform.dcm"),
    "sc_j2k_no_patient": lambda folder: _sc_compressed(folder, "sc_j2k_no_patient", JPEG2000Lossless, patient=False),
    "sc_j2k_gdcm_no_patient": _copy("GDCMJ2K_TextGBR.dcm"),
    "sc_jpegls": lambda folder: _sc_compressed(folder, "sc_jpegls", JPEGLSLossless),
    "sc_rle": _copy("SC_rgb_rle.dcm"), "sc_ybr_full": _copy("SC_ybr_full_uncompressed.dcm"),
    "sc_ybr_full_422": _copy("SC_ybr_full_422_uncompressed.dcm"), "ot_palette": _copy("OT-PAL-8-face.dcm"),
    "charset_ir87": _charset_variant("charset_ir87", _copy("MR_small.dcm")),
    "charset_ir87_sc": _charset_variant("charset_ir87_sc", _built_sc("charset_ir87_sc_base")),
    "charset_ir13_ir87": _charset_variant("charset_ir13_ir87", _built_sc("charset_ir13_ir87_base")),
    "charset_gb18030": _charset_variant("charset_gb18030", _copy("CT_small.dcm")),
    "charset_utf8": _charset_variant("charset_utf8", _built_sc("charset_utf8_base")),
    "charset_latin1": _charset_variant("charset_latin1", _copy("CT_small.dcm")),
}


def build_studies(folder: str | Path, names: Iterable[str] | None = None) -> dict[str, Path]:
    """Write each study (all of ``STUDIES``, or ``names``) into ``folder/<name>/`` and return
    {name: that folder}. Studies whose bundled source is unavailable are left out."""
    folder = Path(folder)
    out = {}
    for name in names if names is not None else STUDIES:
        target = folder / name
        target.mkdir(parents=True, exist_ok=True)
        if _BUILDERS[name](target):
            out[name] = target
        else:
            shutil.rmtree(target)
    return out


def study_files(study_folder: str | Path) -> list[Path]:
    """The DICOM files of one built study, sorted."""
    return sorted(p for p in Path(study_folder).iterdir() if p.suffix == ".dcm")
