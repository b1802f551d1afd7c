"""Checking a DICOM input folder before anything is loaded, as a hospital deployment needs:

- files that are not DICOM, and DICOM objects without pixel data (SR, RT structure sets, presentation
  states, ...), are skipped with a message;
- images whose declared size is absurd are refused before any pixel buffer is allocated;
- every image is decoded once (compressed transfer syntaxes through pydicom's plugins, e.g. pylibjpeg);
  a corrupt or truncated instance rejects its whole series (an incomplete series is not processed);
- an empty folder, or one with nothing usable, is an error naming what was found.

Patient data never reaches the log: files are named by path only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from ...io.medical_io import ImageReadError, check_declared_size, is_dicom_file

__all__ = ["InputError", "InputScan", "scan_dicom_folder", "stage_usable_files"]

log = logging.getLogger(__name__)


class InputError(ValueError):
    """The input holds nothing that can be processed; the message says what was found."""


@dataclass
class InputScan:
    usable: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)          # (file, reason)
    rejected_series: dict[str, str] = field(default_factory=dict)         # series UID -> reason
    series_files: dict[str, list[Path]] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"usable_files": len(self.usable), "series": len(self.series_files),
                "skipped": [{"file": f, "reason": r} for f, r in self.skipped],
                "rejected_series": [{"series_instance_uid": u, "reason": r} for u, r in self.rejected_series.items()]}


def _read_header(path: Path):
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except pydicom.errors.InvalidDicomError:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
        if "SOPClassUID" not in ds:
            raise
        return ds


def scan_dicom_folder(folder: str | Path) -> InputScan:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"input folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise InputError(f"input folder {folder} is empty")
    scan = InputScan()
    corrupt: dict[str, str] = {}
    for path in files:
        name = str(path.relative_to(folder))
        try:
            header = _read_header(path)
        except Exception as err:  # not DICOM, or a header pydicom cannot parse
            reason = ("not a DICOM file" if not is_dicom_file(path)
                      else f"unreadable DICOM header ({type(err).__name__})")
            scan.skipped.append((name, reason))
            continue
        sop = header.get("SOPClassUID")
        if "Rows" not in header or "Columns" not in header:
            scan.skipped.append((name, f"not an image ({getattr(sop, 'name', 'unknown SOP class')})"))
            continue
        series = str(header.get("SeriesInstanceUID", ""))
        try:
            check_declared_size(header, name)
            ds = pydicom.dcmread(str(path), force=True)
            if "PixelData" not in ds and "FloatPixelData" not in ds:
                scan.skipped.append((name, f"no pixel data ({getattr(sop, 'name', 'unknown SOP class')})"))
                continue
            _ = ds.pixel_array  # decode now: truncated or undecodable pixel data shows up here
        except ImageReadError as err:
            scan.skipped.append((name, str(err)))
            corrupt.setdefault(series, f"{name}: {err}")
            continue
        except Exception as err:
            reason = f"corrupt or truncated pixel data ({type(err).__name__}: {str(err)[:160]})"
            scan.skipped.append((name, reason))
            corrupt.setdefault(series, f"{name}: {reason}")
            continue
        scan.series_files.setdefault(series, []).append(path)
    for uid, reason in corrupt.items():
        if uid in scan.series_files:
            scan.rejected_series[uid] = f"incomplete series, {reason}"
            for path in scan.series_files.pop(uid):
                scan.skipped.append((str(path.relative_to(folder)), "series rejected: another instance is broken"))
    scan.usable = [p for paths in scan.series_files.values() for p in paths]
    for name, reason in scan.skipped:
        log.warning("input %s skipped: %s", name, reason)
    if not scan.usable:
        found = "; ".join(f"{f}: {r}" for f, r in scan.skipped[:10]) or "nothing"
        raise InputError(f"no usable DICOM image in {folder} ({len(files)} files; {found})")
    return scan


def stage_usable_files(scan: InputScan, staging: Path) -> Path:
    """A folder of links to the usable files only, for the SDK's DICOM loader."""
    staging.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(scan.usable):
        link = staging / f"{i:06d}.dcm"
        if not link.exists():
            link.symlink_to(path.resolve())
    return staging
