"""The rows of a batch job: a JSONL or Parquet manifest (the released SFT/T2I formats included), a folder of
DICOM studies / NIfTI volumes / PNG images, or rows given in memory (``unimedvl evaluate``).

A row is small (ids, paths or image bytes, text fields); images are read later, in Ray's CPU tasks
(``reading.py``). See docs/batch.md#sources for the rules.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io.dicom_files import slide_image_kind
from ..io.medical_io import dicom_image_headers, is_dicom_file
from ..io.synthetic import is_own_output
from ..tasks.registry import Task

__all__ = ["Row", "SourceError", "read_source", "rows_from_items", "text_param", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_NIFTI = (".nii", ".nii.gz")
_IMAGE_TOKEN = "<image>"


class SourceError(ValueError):
    """A source that cannot be read at all (missing manifest, unknown kind, duplicate ids)."""


@dataclass
class Row:
    """One input row: ``id`` (its ``id`` field, else its position), ``index`` (its position: the seed offset),
    ``images`` (paths, bytes or PIL images; empty for text-only tasks), ``fields`` (task parameter values it
    carries), ``reference`` (the expected answer when the manifest has one), the series and slice of a
    DICOM/NIfTI source, ``error`` when the row itself is unusable, ``key`` (what its result depends on:
    ``fingerprint.py``) and ``frames`` (the slices a series report read)."""

    id: str
    index: int
    images: list = field(default_factory=list)
    fields: dict = field(default_factory=dict)
    reference: str | None = None
    series_uid: str | None = None
    frame: int | None = None
    error: str | None = None
    key: str | None = None
    frames: list[int] | None = None

    def shown_inputs(self) -> list[str]:
        return [str(i) if isinstance(i, (str, Path)) else type(i).__name__ for i in self.images]


def text_param(task: Task) -> str | None:
    """The task's main text parameter (question, prompt or instruction): its first text parameter."""
    return next((p.name for p in task.params if p.type == "str" and p.max_length and p.max_length > 100), None)


# ----------------------------------------------------------------------------------------------------------
# manifests


def _jsonl_records(path: Path) -> Iterator[tuple[dict | None, str | None]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield None, f"line {number}: not JSON ({err.msg})"
                continue
            yield (record, None) if isinstance(record, dict) else (None, f"line {number}: not a JSON object")


def _parquet_records(path: Path) -> Iterator[tuple[dict | None, str | None]]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield record, None


def _human_text(record: dict) -> str | None:
    turns = record.get("message") or record.get("conversations")
    if not isinstance(turns, list):
        return None
    human = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "human"), None)
    return human.replace(_IMAGE_TOKEN, "").strip() if isinstance(human, str) else None


def _reference(record: dict) -> str | None:
    turns = record.get("message") or record.get("conversations") or []
    answer = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"), None)
    answer = answer if answer is not None else record.get("answer")
    return None if answer is None else str(answer)


def _caption(record: dict) -> str | None:
    """The released T2I parquet rows carry ``captions`` as JSON text: the first caption."""
    captions = record.get("captions")
    if isinstance(captions, str):
        try:
            captions = json.loads(captions)
        except json.JSONDecodeError:
            return captions
    if isinstance(captions, dict) and captions:
        return str(next(iter(captions.values())))
    return None


def _image_entries(record: dict) -> list:
    """Image references of a manifest row: ``input_img`` ([{"path"}] or a path), ``image``/``images`` (paths,
    ``{"bytes"|"path"}`` as Hugging Face datasets write them, or raw bytes), ``image_path``."""
    for key in ("input_img", "images", "image", "image_path"):
        value = record.get(key)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        out = []
        for v in values:
            if isinstance(v, dict):
                v = v.get("bytes") or v.get("path")
            if v is not None:
                out.append(v)
        return out
    return []


def _resolver(manifest: Path, data_dir: Path | None):
    """Relative paths resolve against ``data_dir`` when given, else the manifest's folder, then its
    ``images/`` sub-folder (where the released formats keep them)."""
    def resolve(value):
        if not isinstance(value, str):
            return value  # image bytes
        path = Path(value)
        if path.is_absolute():
            return str(path)
        if data_dir is not None:
            return str(data_dir / path)
        near, images = manifest.parent / path, manifest.parent / "images" / path
        return str(near if near.exists() or not images.exists() else images)
    return resolve


def _manifest_row(record: dict, index: int, task: Task, resolve) -> Row:
    names = {p.name for p in task.params}
    fields = {k: v for k, v in record.items() if k in names and v is not None}
    main = text_param(task)
    if main is not None and main not in fields:
        text = _human_text(record) or (_caption(record) if task.takes == "text" else None)
        if text is not None:
            fields[main] = text
    images = [resolve(v) for v in _image_entries(record)] if task.needs_image else []
    row = Row(str(record["id"]) if record.get("id") is not None else str(index), index, images, fields,
              _reference(record))
    if task.needs_image and not images:
        row.error = "no image in the row (input_img, image, images or image_path)"
    return row


def _manifest_rows(path: Path, task: Task, data_dir: Path | None) -> list[Row]:
    reader = _parquet_records if path.suffix.lower() == ".parquet" else _jsonl_records
    resolve, rows = _resolver(path, data_dir), []
    for index, (record, error) in enumerate(reader(path)):
        rows.append(Row(str(index), index, error=error) if record is None else
                    _manifest_row(record, index, task, resolve))
    return rows


# ----------------------------------------------------------------------------------------------------------
# folders


def _slice_count(path: Path, header=None) -> int:
    if header is not None:
        return int(header.get("NumberOfFrames", 1) or 1)
    if path.name.lower().endswith(_NIFTI):
        import nibabel as nib

        shape = nib.load(str(path)).shape  # header only
        return int(shape[2]) if len(shape) >= 3 else 1
    return 1


def _dicom_series(root: Path) -> dict[tuple[Path, str], list]:
    series: dict[tuple[Path, str], list] = {}
    for path, header in dicom_image_headers(root):
        if not is_own_output(path):
            series.setdefault((path.parent, str(header.get("SeriesInstanceUID", ""))), []).append(header)
    return series


def _file_slices(path: Path, count: bool) -> tuple[int, str | None]:
    """(slice count, error) of an image file or NIfTI volume; its header is read only when ``count``. A file
    that cannot be read is that row's failure, not the listing's."""
    if not count:
        return 1, None
    try:
        return _slice_count(path), None
    except Exception as err:  # nibabel's ImageFileError, a truncated gzip...
        return 1, f"{type(err).__name__}: {err}".splitlines()[0]


def _folder_entries(root: Path, count: bool) -> Iterator[tuple[str, str, str | None, int, str | None]]:
    """(id, path, series UID, slice count, error) of each input: every image file and NIfTI volume, every
    DICOM series (a folder may hold several). Slices are counted only when ``count``. Our own outputs
    (labelled synthetic) are passed over."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.name.lower()
        if name.endswith(IMAGE_SUFFIXES + _NIFTI) and not is_dicom_file(path) and not is_own_output(path):
            yield (str(path.relative_to(root)), str(path), None, *_file_slices(path, count))
    series = _dicom_series(root)
    for (folder, uid), headers in sorted(series.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        several = sum(1 for f, _ in series if f == folder) > 1
        name = str(folder.relative_to(root)) if folder != root else "."
        if slide_image_kind(headers[0]) is not None:  # a whole slide is one image, not slices
            total = 1
        else:
            total = len(headers) if len(headers) > 1 else _slice_count(folder, headers[0])
        yield (f"{name}#{uid}" if several else name), str(folder), uid, total, None


def _folder_rows(root: Path, slices: str) -> list[Row]:
    rows: list[Row] = []
    for name, path, uid, count, error in _folder_entries(root, count=slices == "all"):
        frames = range(count) if slices == "all" and count > 1 else [None]
        for frame in frames:
            rows.append(Row(name if frame is None else f"{name}:{frame}", len(rows), [path], series_uid=uid,
                            frame=frame, error=error))
    return rows


# ----------------------------------------------------------------------------------------------------------


def _check_unique(rows: Iterable[Row], where: str) -> None:
    seen: dict[str, int] = {}
    for row in rows:
        if row.id in seen:
            raise SourceError(f"{where}: id {row.id!r} is on rows {seen[row.id]} and {row.index}; ids must be unique")
        seen[row.id] = row.index


def read_source(source: str | Path, task: Task, data_dir: str | Path | None = None,
                slices: str = "middle") -> list[Row]:
    """The rows of a manifest (``.jsonl``/``.json`` lines or ``.parquet``) or a folder of images.

    ``slices``: for folders, ``"middle"`` gives one row per series or volume (its middle slice), ``"all"``
    one row per slice."""
    path = Path(source)
    if slices not in ("middle", "all"):
        raise SourceError(f"slices must be 'middle' or 'all' (got {slices!r})")
    if not path.exists():
        raise SourceError(f"input {path}: no such file or folder")
    if path.is_dir():
        if not task.needs_image:
            raise SourceError(f"{task.name} takes text: give a JSONL or Parquet manifest, not a folder")
        rows = _folder_rows(path, slices)
    elif path.suffix.lower() in (".jsonl", ".json", ".parquet"):
        rows = _manifest_rows(path, task, Path(data_dir) if data_dir else None)
    else:
        raise SourceError(f"input {path}: expected a .jsonl or .parquet manifest or a folder")
    _check_unique(rows, str(path))
    return rows


def rows_from_items(items: Iterable[Mapping[str, Any]], task: Task) -> list[Row]:
    """Rows from in-memory items (``{"id"?, "image"?, <task parameters>...}``); images may be paths, bytes
    or PIL images."""
    names = {p.name for p in task.params}
    rows = []
    for index, item in enumerate(items):
        image = item.get("image")
        rows.append(Row(str(item.get("id", index)), index, [] if image is None else [image],
                        {k: v for k, v in item.items() if k in names}, item.get("reference")))
    _check_unique(rows, "items")
    return rows
