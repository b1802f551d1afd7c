"""Whole-slide images (DICOM VL Whole Slide Microscopy, modality SM): a region of a slide at one pyramid level.

A slide is a series: VOLUME instances are the pyramid levels (tiled multi-frame images of a total pixel matrix),
THUMBNAIL, LABEL and OVERVIEW instances are other pictures of it. Only VOLUME instances are read as levels (a
THUMBNAIL only when the series has no VOLUME); LABEL and OVERVIEW photograph the slide label, patient identity
burned in, and are refused, as is any instance flagged as showing the label. Only the tiles meeting the region
are decoded, one frame at a time from disk. Grey (MONOCHROME1/2, 8- or 16-bit) regions are assembled from their
stored values first, then mapped to 8 bits once for the whole region by ``voi.py``, as every other grey image
is. What is taken from several optical paths / focal planes (stored together or apart), what fills missing
sparse tiles and why ICC profiles are not applied: docs/medical-io.md, "Whole-slide images".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import iter_pixels
from pydicom.uid import VLWholeSlideMicroscopyImageStorage

from ..modeling.preprocessing import MAX_INPUT_PIXELS
from .dicom_files import dicom_image_headers, read_dicom, slide_image_kind, slide_label_shown
from .medical_image import MAX_DECLARED_BYTES, ImageReadError, MedicalImage
from .slide_positions import scanned_positions
from .voi import WindowArg, gray_to_rgb, grey_display, voi_attributes
from .withheld import withhold_dicom_values

__all__ = ["VL_WSI_STORAGE", "is_slide", "SlideSelection", "SlideRegion", "read_slide", "slide_from_headers",
           "BACKGROUND", "DARK_BACKGROUND"]

log = logging.getLogger(__name__)

VL_WSI_STORAGE = VLWholeSlideMicroscopyImageStorage
# What a sparse level's missing tiles show (docs/medical-io.md "Whole-slide images"): white, the glass of a
# brightfield slide, or dark, the glass of a fluorescence slide that emits no light.
BACKGROUND = 255
DARK_BACKGROUND = 0
# Illumination Type codes (DCM) of light passing through the glass to the camera: transmission, brightfield.
_LIGHT_THROUGH_GLASS = ("111741", "111744")
_PER_FRAME_GROUPS = 0x52009230  # (5200,9230) Per-Frame Functional Groups Sequence


def is_slide(ds: Dataset) -> bool:
    """Whether ``ds`` is a VL Whole Slide Microscopy instance."""
    return str(ds.get("SOPClassUID", "")) == VL_WSI_STORAGE


@dataclass(frozen=True)
class SlideSelection:
    """Which part of a slide to read, and at which pyramid level.

    Args:
        region: x, y, width, height in level-0 (finest) pixels; None = the whole slide.
        level: 0 = finest VOLUME level; None = choose automatically: with ``min_side``, the coarsest level whose
            region's long side is at least ``min_side`` (no finer than the model will look); without, the finest
            level whose region fits ``max_pixels``.
        min_side: see ``level``.
        max_pixels: a larger region is refused, naming the sizes and suggesting a region or level.
    """

    region: tuple[int, int, int, int] | None = None
    level: int | None = None
    min_side: int | None = None
    max_pixels: int = MAX_INPUT_PIXELS  # the model's own input limit


@dataclass(frozen=True)
class SlideRegion:
    """Where a read image lies on its slide (kept in ``MedicalImage.geometry["slide_region"]``)."""

    level: int                       # index among VOLUME levels, 0 = finest
    row: int                         # top-left, in that level's total pixel matrix (0-based)
    column: int
    rows: int                        # size read at that level
    columns: int
    spacing_mm: tuple[float, float]  # (row spacing, column spacing) of that level, mm
    level_count: int                 # how many VOLUME levels the slide has


@dataclass
class _Part:
    """One instance of a level: several for a concatenation. ``source`` is decoded from (path or dataset)."""

    source: Path | Dataset
    header: Dataset
    offset: int   # Concatenation Frame Offset Number: frames of the level before this instance
    frames: int


@dataclass
class _Level:
    parts: list[_Part]
    columns: int
    rows: int
    tile_columns: int
    tile_rows: int
    spacing: tuple[float, float]
    tiles: np.ndarray | None = None  # per-frame positions: (n, 3) row, column (0-based), level frame of each tile
    plane_frame: int = 0             # TILED_FULL: frames before the nominal focal plane's tiles

    @property
    def header(self) -> Dataset:
        return self.parts[0].header


# ----------------------------------------------------------------------------------------------------------
# Opening


def read_slide(source: Path | Dataset, selection: SlideSelection | None = None,
               series_uid: str | None = None, window: WindowArg = None) -> MedicalImage:
    """A region of a slide as one RGB image, from a series folder (``series_uid`` picks the series when the folder
    holds several), one instance file (a one-level slide) or a pydicom ``Dataset``. ``window`` (centre, width)
    or a preset name, in modality units, maps a grey slide's values instead of the file's window or the
    region's range; colour slides ignore it."""
    withhold_dicom_values()
    if isinstance(source, Dataset):
        return _read(_levels([(source, source)], "DICOM dataset", explicit=True), "DICOM dataset", selection,
                     window)
    path = Path(source)
    if path.is_dir():
        series: dict[str, list[tuple[Path, Dataset]]] = {}
        for file, header in dicom_image_headers(path):
            series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append((file, header))
        if series_uid is None and len(series) > 1:
            raise ImageReadError(f"{path.name}: holds {len(series)} series; choose one with series_uid: "
                                 + "; ".join(series))
        items = series.get(series_uid if series_uid is not None else next(iter(series), ""))
        if not items:
            raise ImageReadError(f"{path.name}: no {'series ' + series_uid if series_uid else 'DICOM images'}")
        return slide_from_headers(items, path.name, selection, window)
    if not path.is_file():
        raise ImageReadError(f"{path.name}: no such file or folder")
    return _read(_levels([(path, read_dicom(path, stop_before_pixels=True))], path.name, explicit=True),
                 path.name, selection, window)


def slide_from_headers(items: list[tuple[Path | Dataset, Dataset]], name: str,
                       selection: SlideSelection | None = None, window: WindowArg = None) -> MedicalImage:
    """A region of the slide made of these instances of one series: (file, its header without pixels) pairs, or
    (dataset, dataset) for datasets already in memory; instances other than VOLUME are passed over. ``window``:
    as for ``read_slide``."""
    withhold_dicom_values()
    return _read(_levels(items, name, explicit=False), name, selection, window)


def _levels(items: list[tuple[Path | Dataset, Dataset]], name: str, explicit: bool) -> list[_Level]:
    """The VOLUME levels, finest first (the THUMBNAIL when the series has no VOLUME). Instances showing the slide
    label are never read: given alone (``explicit``) an error, among others passed over."""
    kinds = [slide_image_kind(header) for _, header in items]
    if any(kind is None for kind in kinds):
        raise ImageReadError(f"{name}: not a VL Whole Slide Microscopy image")
    if explicit and slide_label_shown(items[0][1]):
        raise ImageReadError(f"{name}: {slide_label_shown(items[0][1])}; not read")
    usable = [(item, kind) for item, kind in zip(items, kinds) if not _shows_label(item)]
    volumes = ([item for item, kind in usable if kind == "VOLUME"]
               or [item for item, kind in usable if kind == "THUMBNAIL"])
    if not volumes:
        raise ImageReadError(f"{name}: no VOLUME instances (pyramid levels) in the slide series")
    groups: dict[str, list[_Part]] = {}
    for source, header in volumes:
        key = str(header.get("ConcatenationUID") or header.SOPInstanceUID)
        groups.setdefault(key, []).append(_part(source, header, name))
    return _one_per_size([_level(sorted(parts, key=lambda p: p.offset), name) for parts in groups.values()], name)


def _shows_label(item: tuple[Path | Dataset, Dataset]) -> bool:
    reason = slide_label_shown(item[1])
    if reason:
        log.info("skipping %s: %s", item[0].name if isinstance(item[0], Path) else "a dataset", reason)
    return reason is not None


def _one_per_size(candidates: list[_Level], name: str) -> list[_Level]:
    """One level per total pixel matrix size, finest first. Same-size instances are other optical paths or focal
    planes stored apart: every level takes the optical path chosen at the finest (its lowest identifier), then the
    instance whose origin Z is nearest 0, whatever the order of the files (docs/medical-io.md "Whole-slide
    images")."""
    by_size: dict[tuple[int, int], list[_Level]] = {}
    for level in candidates:
        by_size.setdefault((level.columns, level.rows), []).append(level)
    levels: list[_Level] = []
    path = None
    for size in sorted(by_size, reverse=True):
        same = by_size[size]
        if path is None:
            path = min((_optical_path(level.header) for level in same), key=_path_order)
        on_path = [level for level in same if _optical_path(level.header) == path]
        if not on_path:
            lowest = min((_optical_path(level.header) for level in same), key=_path_order)
            on_path = [level for level in same if _optical_path(level.header) == lowest]
        chosen = min(on_path, key=lambda level: (abs(_origin_z(level.header)), _instance_order(level.header)))
        if len(same) > 1:
            log.info("%s: %d VOLUME instances of %dx%d (optical paths or focal planes stored apart); optical path "
                     "%s at Z %g used", name, len(same), *size, _optical_path(chosen.header) or "-",
                     _origin_z(chosen.header))
        levels.append(chosen)
    return sorted(levels, key=lambda lv: (-lv.columns, -lv.rows))


def _optical_path(header: Dataset) -> str:
    """The identifier of the optical path read from an instance: its Optical Path Sequence's first item."""
    paths = header.get("OpticalPathSequence") or [Dataset()]
    return str(paths[0].get("OpticalPathIdentifier", "")).strip()


def _path_order(identifier: str) -> tuple:
    """Numeric identifiers by number ("2" before "10"), then others by text, a missing one last."""
    return (0, int(identifier), "") if identifier.isdecimal() else (1 if identifier else 2, 0, identifier)


def _origin_z(header: Dataset) -> float:
    """Z offset (mm) of the instance's plane: its Total Pixel Matrix Origin, else its shared Plane Position
    (Slide); 0 when neither states it."""
    origin = (header.get("TotalPixelMatrixOriginSequence") or [Dataset()])[0]
    z = origin.get("ZOffsetInSlideCoordinateSystem")
    if z is None:
        shared = (header.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
        z = _frame_value(Dataset(), shared, "PlanePositionSlideSequence", "ZOffsetInSlideCoordinateSystem")
    try:
        return float(z) if z is not None else 0.0
    except (TypeError, ValueError):
        return 0.0


def _instance_order(header: Dataset) -> tuple:
    """A tie-break independent of file order: Instance Number, then SOP Instance UID."""
    try:
        number = int(header.get("InstanceNumber"))
    except (TypeError, ValueError):
        number = math.inf
    return number, str(header.get("SOPInstanceUID", ""))


def _part(source: Path | Dataset, header: Dataset, name: str) -> _Part:
    try:
        frames = int(header.get("NumberOfFrames", 1) or 1)
        offset = int(header.get("ConcatenationFrameOffsetNumber", 0) or 0)
    except (TypeError, ValueError):
        raise ImageReadError(f"{name}: invalid Number of Frames or Concatenation Frame Offset Number") from None
    return _Part(source, header, offset, frames)


def _level(parts: list[_Part], name: str) -> _Level:
    header = parts[0].header
    total = int(header.get("InConcatenationTotalNumber", 1) or 1)
    if len(parts) != total or any(a.offset + a.frames != b.offset for a, b in zip(parts, parts[1:])):
        raise ImageReadError(f"{name}: a level stored as a concatenation of {total} instances has "
                             f"{len(parts)}; give the whole series folder")
    try:
        level = _Level(parts, int(header.TotalPixelMatrixColumns), int(header.TotalPixelMatrixRows),
                       int(header.Columns), int(header.Rows), _spacing(header, name))
    except (AttributeError, TypeError, ValueError):
        raise ImageReadError(f"{name}: missing or invalid total pixel matrix or tile size") from None
    if min(level.columns, level.rows, level.tile_columns, level.tile_rows) <= 0:
        raise ImageReadError(f"{name}: invalid total pixel matrix {level.columns}x{level.rows}")
    organization = str(header.get("DimensionOrganizationType", "")).strip().upper()
    # positions when stated; TILED_FULL order when declared or when no frame has a position (older files leave
    # the type out): docs/medical-io.md "Whole-slide images"
    if organization == "TILED_SPARSE" or (organization != "TILED_FULL" and _has_frame_positions(parts)):
        level.tiles = _sparse_tiles(parts, name)
    else:
        level.plane_frame = _full_plane_frame(level)
    return level


def _has_frame_positions(parts: list[_Part]) -> bool:
    groups = parts[0].header.get("PerFrameFunctionalGroupsSequence") or [Dataset()]
    return bool(groups[0].get("PlanePositionSlideSequence"))


def _focal_planes(header: Dataset) -> int:
    for keyword in ("TotalPixelMatrixFocalPlanes", "NumberOfFocalPlanes"):
        try:
            if int(header.get(keyword) or 0) > 0:
                return int(header.get(keyword))
        except (TypeError, ValueError):
            continue
    return 1


def _full_plane_frame(level: _Level) -> int:
    """TILED_FULL: the first frame of the focal plane nearest Z 0, the planes' Z taken from per-frame Plane
    Positions, else the origin's Z stepped by Spacing Between Slices; the first plane when neither is stated
    (frame order: docs/medical-io.md "Whole-slide images")."""
    header = level.header
    per_plane = -(-level.columns // level.tile_columns) * -(-level.rows // level.tile_rows)
    planes = min(_focal_planes(header), sum(part.frames for part in level.parts) // per_plane)
    if planes <= 1:
        return 0
    shared = (header.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    groups = [g for part in level.parts for g in (part.header.get("PerFrameFunctionalGroupsSequence") or [])]
    zs = [_frame_value(groups[k * per_plane], Dataset(), "PlanePositionSlideSequence",
                       "ZOffsetInSlideCoordinateSystem") if len(groups) >= planes * per_plane else None
          for k in range(planes)]
    if any(z is None for z in zs):
        origin = (header.get("TotalPixelMatrixOriginSequence") or [Dataset()])[0].get("ZOffsetInSlideCoordinateSystem")
        step = _frame_value(Dataset(), shared, "PixelMeasuresSequence", "SpacingBetweenSlices")
        if origin is None or step is None:
            return 0
        zs = [float(origin) + k * float(step) for k in range(planes)]
    return int(np.argmin(np.abs(np.asarray(zs, np.float64)))) * per_plane


def _spacing(header: Dataset, name: str) -> tuple[float, float]:
    """Pixel Spacing of the shared Pixel Measures, else the imaged volume over the total pixel matrix."""
    shared = header.get("SharedFunctionalGroupsSequence") or [Dataset()]
    measures = shared[0].get("PixelMeasuresSequence") or [Dataset()]
    spacing = measures[0].get("PixelSpacing") or header.get("PixelSpacing")
    if spacing:
        return float(spacing[0]), float(spacing[1])
    if "ImagedVolumeHeight" in header and "ImagedVolumeWidth" in header:
        return (float(header.ImagedVolumeHeight) / int(header.TotalPixelMatrixRows),
                float(header.ImagedVolumeWidth) / int(header.TotalPixelMatrixColumns))
    raise ImageReadError(f"{name}: no pixel spacing")


def _frame_value(group: Dataset, shared: Dataset, sequence: str, keyword: str):
    for holder in (group, shared):
        items = holder.get(sequence)
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return None


def _sparse_tiles(parts: list[_Part], name: str) -> np.ndarray:
    """(row, column, level frame) of each tile position of the first optical path: the frame nearest Z offset 0
    there, the first frame on a tie. A level of one focal plane takes each position's first frame whatever its
    Z, which scanners may set to each tile's own focus height (docs/medical-io.md "Whole-slide images")."""
    rows, cols, zs, frames = _scanned_frame_positions(parts) or _frame_positions(parts, name)
    if not len(frames):
        return np.zeros((0, 3), np.int64)
    order = np.lexsort((frames, np.round(np.abs(zs), 9), cols, rows))  # by position, nearness to Z 0, frame
    _, first = np.unique(np.stack([rows[order], cols[order]], axis=1), axis=0, return_index=True)
    chosen = order[first]
    return np.stack([rows[chosen], cols[chosen], frames[chosen]], axis=1)


def _first_path(header: Dataset) -> str | None:
    """The optical path whose frames are read (the Optical Path Sequence's first item); None when none is listed."""
    paths = header.get("OpticalPathSequence") or []
    return str(paths[0].get("OpticalPathIdentifier", "")) if paths else None


def _on_path(path, first_path: str | None) -> bool:
    """Whether a frame of optical path ``path`` (None: not stated) is read."""
    return first_path is None or path is None or str(path) == first_path


def _frame_positions(parts: list[_Part], name: str) -> tuple[np.ndarray, ...]:
    """Row, column (0-based), Z offset (0 where the level has one focal plane: not read) and level frame of every
    frame of the instance's first optical path, from pydicom's decoding of the per-frame groups."""
    header = parts[0].header
    first_path, want_z = _first_path(header), _focal_planes(header) > 1
    shared = (header.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    rows, cols, zs, frames = [], [], [], []
    for part in parts:
        groups = part.header.get("PerFrameFunctionalGroupsSequence") or []
        if len(groups) != part.frames:
            raise ImageReadError(f"{name}: a level of per-frame tile positions without a position for each of "
                                 "its frames")
        for i, group in enumerate(groups):
            if not _on_path(_frame_value(group, shared, "OpticalPathIdentificationSequence",
                                         "OpticalPathIdentifier"), first_path):
                continue
            row = _frame_value(group, shared, "PlanePositionSlideSequence", "RowPositionInTotalImagePixelMatrix")
            col = _frame_value(group, shared, "PlanePositionSlideSequence", "ColumnPositionInTotalImagePixelMatrix")
            if row is None or col is None:
                raise ImageReadError(f"{name}: frame {part.offset + i + 1} has no tile position")
            z = _frame_value(group, shared, "PlanePositionSlideSequence", "ZOffsetInSlideCoordinateSystem")
            rows.append(int(row) - 1)
            cols.append(int(col) - 1)
            zs.append(float(z) if want_z and z is not None else 0.0)
            frames.append(part.offset + i)
    return (np.asarray(rows, np.int64), np.asarray(cols, np.int64), np.asarray(zs, np.float64),
            np.asarray(frames, np.int64))


def _scanned_frame_positions(parts: list[_Part]) -> tuple[np.ndarray, ...] | None:
    """What ``_frame_positions`` gives, with the positions scanned from the undecoded per-frame bytes
    (``slide_positions.py``), in the one common layout where that is provably the same: one focal plane and no
    per-frame optical path; None (pydicom decodes them) for anything else, so uncommon layouts trade speed for
    safety (docs/medical-io.md "Whole-slide images"). Frames are selected here on every call, never kept."""
    header = parts[0].header
    if _focal_planes(header) > 1:
        return None
    scanned = []
    for part in parts:
        raw = part.header.get_item(_PER_FRAME_GROUPS, keep_deferred=True)
        if not (isinstance(raw, RawDataElement) and raw.is_little_endian and isinstance(raw.value, bytes)):
            return None  # decoded already (perhaps edited since), deferred, or big endian
        positions = scanned_positions(raw.value, bool(raw.is_implicit_VR), part.frames)
        if positions is None:
            return None
        scanned.append((*positions, part.offset + np.arange(part.frames, dtype=np.int64)))
    shared = (header.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    # no frame states its own optical path: each is the shared groups' (if any)
    path = _frame_value(Dataset(), shared, "OpticalPathIdentificationSequence", "OpticalPathIdentifier")
    keep = _on_path(path, _first_path(header))
    rows, cols, frames = (np.concatenate([part[k] for part in scanned]) if keep else np.zeros(0, np.int64)
                          for k in range(3))
    return rows - 1, cols - 1, np.zeros(len(frames), np.float64), frames



# ----------------------------------------------------------------------------------------------------------
# Region and level


def _level0_box(levels: list[_Level], region, name: str) -> tuple[int, int, int, int]:
    """The region (x, y, width, height) clipped to level 0; refused when empty or outside the slide."""
    base = levels[0]
    if region is None:
        return 0, 0, base.columns, base.rows
    try:
        x, y, width, height = (int(v) for v in region)
    except (TypeError, ValueError):
        raise ImageReadError(f"{name}: region must be four integers x, y, width, height") from None
    if width <= 0 or height <= 0:
        raise ImageReadError(f"{name}: empty region {width}x{height}")
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + width, base.columns), min(y + height, base.rows)
    if x1 <= x0 or y1 <= y0:
        raise ImageReadError(f"{name}: region {x},{y} {width}x{height} lies outside the slide "
                             f"({base.columns}x{base.rows} at level 0)")
    return x0, y0, x1 - x0, y1 - y0


def _at_level(level: _Level, base: _Level, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The level-0 box in ``level``'s pixels (row, column, rows, columns), scaled by the matrix sizes."""
    sx, sy = level.columns / base.columns, level.rows / base.rows
    x, y, width, height = box
    c0, r0 = math.floor(x * sx), math.floor(y * sy)
    c1 = min(max(math.ceil((x + width) * sx), c0 + 1), level.columns)
    r1 = min(max(math.ceil((y + height) * sy), r0 + 1), level.rows)
    return r0, c0, r1 - r0, c1 - c0


def _choose_level(levels: list[_Level], box, selection: SlideSelection, name: str) -> int:
    sizes = [_at_level(level, levels[0], box)[2:] for level in levels]
    if selection.level is not None:
        if not 0 <= selection.level < len(levels):
            raise ImageReadError(f"{name}: no level {selection.level}; the slide has levels 0..{len(levels) - 1}")
        chosen = selection.level
    elif selection.min_side is not None:
        wide = [k for k, (rows, cols) in enumerate(sizes) if max(rows, cols) >= selection.min_side]
        chosen = wide[-1] if wide else 0
    else:
        chosen = next((k for k, (rows, cols) in enumerate(sizes) if rows * cols <= selection.max_pixels),
                      len(levels) - 1)
    rows, cols = sizes[chosen]
    if rows * cols > selection.max_pixels or rows * cols * 3 > MAX_DECLARED_BYTES:
        listing = ", ".join(f"{k}: {c}x{r}" for k, (r, c) in enumerate(sizes))
        raise ImageReadError(f"{name}: region of {cols}x{rows} pixels at level {chosen} exceeds the limit of "
                             f"{min(selection.max_pixels, MAX_DECLARED_BYTES // 3)} pixels (region per level "
                             f"{listing}); choose a smaller --region or a coarser --level")
    return chosen


# ----------------------------------------------------------------------------------------------------------
# Tiles


def decode_frames(source: Path | Dataset, indices: list[int]) -> Iterator[np.ndarray]:
    """The frames ``indices`` (0-based, ascending) of one instance, decoded one at a time, as RGB when the
    tiles are YBR. A dataset read without its pixel data is decoded from the file it was read from."""
    if isinstance(source, Dataset) and "PixelData" not in source and isinstance(source.filename, str):
        source = Path(source.filename)
    yield from iter_pixels(str(source) if isinstance(source, Path) else source, indices=indices)


def _tile_frames(level: _Level, r0: int, c0: int, rows: int, cols: int) -> Iterable[tuple[int, int, int]]:
    """(tile row, tile column, level frame) of the tiles meeting rows r0.. and columns c0.. of the level."""
    th, tw = level.tile_rows, level.tile_columns
    if level.tiles is not None:
        t = level.tiles
        meets = (t[:, 0] < r0 + rows) & (t[:, 0] + th > r0) & (t[:, 1] < c0 + cols) & (t[:, 1] + tw > c0)
        return [tuple(int(v) for v in tile) for tile in t[meets]]
    across, first = -(-level.columns // tw), level.plane_frame
    return [(tr * th, tc * tw, first + tr * across + tc) for tr in range(r0 // th, (r0 + rows - 1) // th + 1)
            for tc in range(c0 // tw, (c0 + cols - 1) // tw + 1)]


def _assemble(level: _Level, r0: int, c0: int, rows: int, cols: int,
              name: str) -> tuple[np.ndarray | None, np.ndarray]:
    """The level's stored values at rows r0..r0+rows, columns c0..c0+cols as decoded (RGB for colour tiles),
    and which of those pixels a tile covers (a sparse level's missing tiles do not); None when no tile does."""
    out, covered = None, np.zeros((rows, cols), bool)
    wanted: dict[int, list[tuple[int, int, int]]] = {}
    for tile_row, tile_col, frame in _tile_frames(level, r0, c0, rows, cols):
        part = next((k for k, p in enumerate(level.parts) if p.offset <= frame < p.offset + p.frames), None)
        if part is None:
            raise ImageReadError(f"{name}: tile frame {frame + 1} is not in the level's instances")
        wanted.setdefault(part, []).append((frame - level.parts[part].offset, tile_row, tile_col))
    for k, tiles in wanted.items():
        tiles.sort()
        try:
            decoded = decode_frames(level.parts[k].source, [local for local, _, _ in tiles])
            for (_, tile_row, tile_col), tile in zip(tiles, decoded):
                if out is None:
                    out = np.zeros((rows, cols, *tile.shape[2:]), tile.dtype)
                _place(out, tile, tile_row - r0, tile_col - c0)
                _place(covered, np.ones(tile.shape[:2], bool), tile_row - r0, tile_col - c0)
        except ImageReadError:
            raise
        except Exception as err:  # codecs raise many types
            raise ImageReadError(_decode_problem(name, err)) from None
    return out, covered


def _decode_problem(name: str, err: Exception) -> str:
    """One line: the error's first line, and the codec install hint only when pydicom says the decoder for the
    transfer syntax is missing (not when a tile is corrupt)."""
    text = str(err).strip()
    first = text.splitlines()[0].rstrip(":") if text else ""
    hint = ("; install unimedvl-core[dicom-codecs] for its decoder" if "missing dependencies" in text
            else "")
    return f"{name}: cannot decode slide tiles ({type(err).__name__}: {first}){hint}"


def _background(header: Dataset) -> int:
    """What pixels no tile covers show: the glass, white where light passes through it (colour, or grey with
    transmitted or brightfield illumination), dark where the slide emits the light (fluorescence, darkfield)."""
    if int(header.get("SamplesPerPixel", 1) or 1) > 1:
        return BACKGROUND
    paths = header.get("OpticalPathSequence") or [Dataset()]
    illumination = paths[0].get("IlluminationTypeCodeSequence") or [Dataset()]
    return BACKGROUND if str(illumination[0].get("CodeValue", "")) in _LIGHT_THROUGH_GLASS else DARK_BACKGROUND


def _display(raw: np.ndarray | None, covered: np.ndarray, header: Dataset, window: WindowArg,
             name: str) -> tuple[np.ndarray, tuple[float, float] | None, tuple | None]:
    """8-bit RGB of the region, the window used and the modality-value range shown. Grey values are mapped
    all at once (one mapping for every tile), from the pixels tiles cover only, as ``voi.py`` maps any grey
    image: the caller's window, else the level's own (shared, not per-frame, values), else their full range."""
    background = _background(header)
    if raw is None:
        return np.full((*covered.shape, 3), background, np.uint8), None, None
    everywhere = bool(covered.all())
    if raw.ndim == 3:
        if raw.dtype != np.uint8:
            raise ImageReadError(f"{name}: colour slide tiles of {raw.dtype} are not supported (8-bit only)")
        rgb = raw[..., :3]
        return (rgb if everywhere else np.where(covered[..., None], rgb, np.uint8(background))), None, None
    photometric = str(header.get("PhotometricInterpretation", "")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(f"{name}: unsupported photometric interpretation {photometric} of grey slide tiles")
    gray, used, span = grey_display(raw if everywhere else raw[covered], voi_attributes(header, None), window, "SM")
    if everywhere:
        return gray_to_rgb(gray), used, span
    out = np.full((*covered.shape, 3), background, np.uint8)
    out[covered] = gray[:, None]
    return out, used, span


def _place(out: np.ndarray, tile: np.ndarray, top: int, left: int) -> None:
    """Copy the part of ``tile`` (top-left at ``top``, ``left`` of ``out``) that falls inside ``out``."""
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + tile.shape[0], out.shape[0]), min(left + tile.shape[1], out.shape[1])
    if r1 > r0 and c1 > c0:
        out[r0:r1, c0:c1] = tile[r0 - top:r1 - top, c0 - left:c1 - left]


def _read(levels: list[_Level], name: str, selection: SlideSelection | None, window: WindowArg) -> MedicalImage:
    selection = selection or SlideSelection()
    box = _level0_box(levels, selection.region, name)
    chosen = _choose_level(levels, box, selection, name)
    level = levels[chosen]
    row, column, rows, cols = _at_level(level, levels[0], box)
    raw, covered = _assemble(level, row, column, rows, cols, name)
    pixels, used, span = _display(raw, covered, level.header, window, name)
    where = SlideRegion(chosen, row, column, rows, cols, level.spacing, len(levels))
    return MedicalImage(pixels, name, dataset=level.header, modality="SM", frame=None, num_frames=1, window=used,
                        value_range=span, geometry={"slide_region": where, "pixel_spacing": level.spacing})
