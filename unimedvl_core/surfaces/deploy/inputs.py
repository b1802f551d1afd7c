"""Checking a DICOM input folder before anything is loaded, as a hospital deployment needs:

- files that are not DICOM, and DICOM objects without pixel data (SR, RT structure sets, presentation
  states, ...), are skipped with a message;
- images whose declared size is absurd are refused before any pixel buffer is allocated;
- every image is decoded once (compressed transfer syntaxes through pydicom's plugins, e.g. pylibjpeg);
  a corrupt or truncated instance rejects its whole series (an incomplete series is not processed);
- files this project wrote (derived images, SRs) are skipped unless asked for, so a study folder holding the
  outputs of an earlier run is read as it was acquired;
- headers the SDK's loader and selector would silently drop (an empty Series Number, no Modality, no file
  meta header) are staged as corrected copies, each correction noted; the input files are never changed;
- an empty folder, or one with nothing usable, is an error naming what was found;
- the output folder may not be, or lie inside, or hold the input folder.

Patient data never reaches the log: files are named by path only.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from ...io.dicom_files import slide_image_kind, slide_label_shown
from ...io.dicom_output import ALGORITHM_NAME, MANUFACTURER
from ...io.medical_io import ImageReadError, check_declared_size, is_dicom_file
from ...io.slide import decode_frames

__all__ = ["InputError", "InputScan", "scan_dicom_folder", "stage_usable_files", "check_folders", "is_own_output"]

log = logging.getLogger(__name__)


class InputError(ValueError):
    """The input holds nothing that can be processed; the message says what was found, ``findings`` each
    file's reason."""

    def __init__(self, message: str, findings: dict | None = None):
        super().__init__(message)
        self.findings = findings or {}


@dataclass
class InputScan:
    usable: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)          # (file, reason)
    rejected_series: dict[str, str] = field(default_factory=dict)         # series UID -> reason
    series_files: dict[str, list[Path]] = field(default_factory=dict)
    corrections: dict[Path, list[str]] = field(default_factory=dict)   # file -> header fixes made when staging
    root: Path | None = None
    # whole-slide instances: SOP Instance UID -> file. They are staged as headers only (a level can be GBs) and
    # read from here, tile by tile (docs/medical-io.md#whole-slide-images)
    slide_files: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> dict:
        def name(path: Path) -> str:
            return str(path.relative_to(self.root)) if self.root else str(path)

        return {"usable_files": len(self.usable), "series": len(self.series_files),
                "skipped": [{"file": f, "reason": r} for f, r in self.skipped],
                "rejected_series": [{"series_instance_uid": u, "reason": r} for u, r in self.rejected_series.items()],
                "corrected": [{"file": name(p), "corrections": c} for p, c in self.corrections.items()]}


def check_folders(input_folder: str | Path, output_folder: str | Path) -> None:
    """Refuse an output folder that is the input folder, lies inside it or holds it (``InputError``)."""
    source, target = Path(input_folder).resolve(), Path(output_folder).resolve()
    if target == source or source in target.parents:
        raise InputError(f"output folder {output_folder} is or lies inside the input folder {input_folder}; "
                         "the input is never written to: choose another output folder")
    if target in source.parents:
        raise InputError(f"output folder {output_folder} holds the input folder {input_folder}; "
                         "choose an output folder apart from the input")


def _io_is_own_output():
    """The io layer's ``is_own_output(path)`` when this installation has it."""
    for module in ("synthetic", "outputs", "dicom_output", "medical_io"):
        found = getattr(importlib.import_module(f"unimedvl_core.io.{module}"), "is_own_output", None)
        if found is not None:
            return found
    return None


def is_own_output(path: Path, header) -> bool:
    """Whether a file is an output of this project (a derived image or SR written by UniMedVL)."""
    check = _io_is_own_output()
    if check is not None:
        return bool(check(path))
    ours = header.get("Manufacturer") == MANUFACTURER or header.get("ManufacturerModelName") == ALGORITHM_NAME
    return ours and (header.get("SyntheticData") == "YES" or header.get("Modality") == "SR")


# Header values the SDK's DICOMDataLoaderOperator converts without checking: an empty one drops the instance.
_LOADER_CONVERTED = ("SeriesNumber", "AcquisitionNumber", "ImageOrientationPatient", "ImagePositionPatient",
                     "PixelSpacing", "ImagerPixelSpacing")


def _needed_corrections(path: Path, header) -> list[str]:
    """What the staged copy must fix for the SDK's loader and series selector to keep this instance."""
    fixes = [f"empty {k} removed" for k in _LOADER_CONVERTED if k in header and header[k].value in (None, "", [])]
    if not str(header.get("Modality", "") or "").strip():
        fixes.append("no Modality: treated as OT (other)")
    try:
        pydicom.dcmread(str(path), stop_before_pixels=True)
    except pydicom.errors.InvalidDicomError:
        fixes.append("no DICOM file header: staged with one")
    return fixes


def _with_transfer_syntax(ds):
    """A data set read without a file meta header gets the transfer syntax it was read in (so that its
    pixel data can be decoded and it can be staged with a header)."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = pydicom.dataset.FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = getattr(ds, "original_encoding", (True, True))
        meta.TransferSyntaxUID = (pydicom.uid.ImplicitVRLittleEndian if implicit is not False else
                                  pydicom.uid.ExplicitVRLittleEndian if little is not False else
                                  pydicom.uid.ExplicitVRBigEndian)
    return ds


def _unusable_header(header) -> str | None:
    missing = [k for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not header.get(k)]
    if missing:
        return f"missing {', '.join(missing)}"
    if str(header.get("SOPClassUID", "")) == "1.2.840.10008.1.3.10":
        return "a DICOMDIR, not an image"
    return None


def _read_header(path: Path):
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except pydicom.errors.InvalidDicomError:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
        if "SOPClassUID" not in ds:
            raise
        return ds


def _pixel_problem(path: Path, header, name: str, sop: str) -> tuple[str, bool] | None:
    """Why a file's pixels cannot be used, and whether that makes its series incomplete (declared too large,
    corrupt or truncated: yes; no pixel data at all: no), or None. Decoding here makes a broken file show up
    before the run. A whole slide's level is checked by its first and last tiles only (the reader decodes just
    the tiles under a region), and any problem with it makes the slide incomplete: without a level the pyramid
    would shift and a region in level-0 pixels would point at other tissue."""
    if slide_image_kind(header) is not None:
        try:
            last = max(int(header.get("NumberOfFrames", 1) or 1) - 1, 0)
            for _ in decode_frames(path, sorted({0, last})):
                pass
        except Exception as err:
            return f"corrupt, truncated or missing pixel data ({type(err).__name__}: {str(err)[:160]})", True
        return None
    try:
        check_declared_size(header, name)
        ds = _with_transfer_syntax(pydicom.dcmread(str(path), force=True))
        if "PixelData" not in ds and "FloatPixelData" not in ds:
            return f"no pixel data ({sop})", False
        _ = ds.pixel_array
    except ImageReadError as err:
        return str(err), True
    except Exception as err:
        return f"corrupt or truncated pixel data ({type(err).__name__}: {str(err)[:160]})", True
    return None


def _scan_file(path: Path, name: str, scan: InputScan, corrupt: dict[str, str], include_synthetic: bool) -> None:
    """Check one file; a usable image joins its series, anything else is noted with its reason."""
    try:
        header = _read_header(path)
    except Exception as err:  # not DICOM, or a header pydicom cannot parse
        reason = "not a DICOM file" if not is_dicom_file(path) else f"unreadable DICOM header ({type(err).__name__})"
        scan.skipped.append((name, reason))
        return
    sop = getattr(header.get("SOPClassUID"), "name", "unknown SOP class")
    if not include_synthetic and is_own_output(path, header):
        scan.skipped.append((name, "an output of UniMedVL (synthetic), not an acquired image"))
        return
    if "Rows" not in header or "Columns" not in header:
        scan.skipped.append((name, f"not an image ({sop})"))
        return
    unusable = _unusable_header(header)
    if unusable:
        scan.skipped.append((name, unusable))
        return
    shows_label = slide_label_shown(header)
    if shows_label:
        scan.skipped.append((name, f"{shows_label}, not read"))
        return
    series = str(header.get("SeriesInstanceUID", ""))
    earlier = scan.slide_files.get(str(header.SOPInstanceUID)) if slide_image_kind(header) is not None else None
    if earlier is not None:  # one instance per UID: a second copy would be staged whole and break the pyramid
        shown = earlier.relative_to(scan.root) if scan.root else earlier.name
        scan.skipped.append((name, f"same SOP Instance UID as {shown}, not read"))
        return
    problem = _pixel_problem(path, header, name, sop)
    if problem:
        reason, incomplete = problem
        scan.skipped.append((name, reason))
        if incomplete:
            corrupt.setdefault(series, f"{name}: {reason}")
        return
    scan.series_files.setdefault(series, []).append(path)
    if slide_image_kind(header) is not None:
        scan.slide_files[str(header.SOPInstanceUID)] = path
    fixes = _needed_corrections(path, header)
    if fixes:
        scan.corrections[path] = fixes


def scan_dicom_folder(folder: str | Path, include_synthetic: bool = False) -> InputScan:
    """Every file of ``folder`` checked (see the module docstring); ``InputError`` when nothing is usable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"input folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise InputError(f"input folder {folder} is empty")
    scan = InputScan(root=folder)
    corrupt: dict[str, str] = {}
    for path in files:
        _scan_file(path, str(path.relative_to(folder)), scan, corrupt, include_synthetic)
    for uid, reason in corrupt.items():
        if uid in scan.series_files:
            scan.rejected_series[uid] = f"incomplete series, {reason}"
            for path in scan.series_files.pop(uid):
                scan.corrections.pop(path, None)
                scan.skipped.append((str(path.relative_to(folder)), "series rejected: another instance is broken"))
    scan.usable = [p for paths in scan.series_files.values() for p in paths]
    for name, reason in scan.skipped:
        log.warning("input %s skipped: %s", name, reason)
    if not scan.usable:
        found = "; ".join(f"{f}: {r}" for f, r in scan.skipped[:10]) or "nothing"
        raise InputError(f"no usable DICOM image in {folder} ({len(files)} files; {found})", scan.summary())
    return scan


def _corrected_copy(path: Path, fixes: list[str], target: Path, header_only: bool = False) -> None:
    ds = _with_transfer_syntax(pydicom.dcmread(str(path), force=True, stop_before_pixels=header_only))
    for key in _LOADER_CONVERTED:
        if key in ds and ds[key].value in (None, "", []):
            del ds[key]
    if not str(ds.get("Modality", "") or "").strip():
        ds.Modality = "OT"
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.save_as(str(target), enforce_file_format=True)


def stage_usable_files(scan: InputScan, staging: Path) -> Path:
    """A folder for the SDK's DICOM loader with the usable files only: links to them, corrected copies of
    headers the loader or selector would drop (see ``InputScan.corrections``), and whole-slide instances as
    headers only (the loader reads whole files into memory; slides are read from ``InputScan.slide_files``)."""
    staging.mkdir(parents=True, exist_ok=True)
    slide_paths = set(scan.slide_files.values())
    for i, path in enumerate(scan.usable):
        link = staging / f"{i:06d}.dcm"
        if link.exists():
            continue
        if path in scan.corrections or path in slide_paths:
            _corrected_copy(path, scan.corrections.get(path, []), link, header_only=path in slide_paths)
        else:
            link.symlink_to(path.resolve())
    return staging
