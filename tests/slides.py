"""Realistic DICOM VL Whole Slide Microscopy test slides (PS3.3 A.32.8), built with pydicom only, independent of
the package, so a reader can be checked against ground truth. Every instance passes dciodvfy without errors.

    from tests.slides import build_slide, build_declared_slide, SlideTruth
    truth = build_slide(tmp_path / "slide")                        # 3 JPEG (YBR_FULL_422) TILED_FULL levels
    truth = build_slide(folder, encoding="raw", organization="TILED_SPARSE", concatenate=1)
    truth.levels[k]          # (rows, cols, 3) uint8 ground truth of VOLUME level k (0 = finest, 0.25 um)
    truth.volume_files[k]    # that level's instance file(s) (two for the concatenated level)
    truth.label_file         # LABEL: BurnedInAnnotation YES, ``PATIENT_NAME`` drawn in and in Label Text
    truth = build_declared_slide(folder)  # level 0 declares 98304 x 75264 at 0.25 um, holds 3 x 3 tiles

``build_slide`` arguments: ``size`` (columns, rows) of level 0 (default 1500 x 1100: partial edge tiles),
``tile`` (256), ``levels`` (3; each halves the previous one by 2 x 2 averaging, spacing doubles),
``encoding`` "jpeg" (baseline, YCbCr 4:2:2, quality 90) or "raw" (explicit VR little endian RGB),
``organization`` "TILED_FULL" (frame order of PS3.3 C.7.6.17.3: columns, rows, focal planes, optical paths)
or "TILED_SPARSE" (per-frame Plane Position (Slide); tiles written in reverse order, so a reader must use the
positions), ``concatenate`` (level index split into two instances of one concatenation, or None),
``focal_planes`` / ``optical_paths`` (extra planes and paths hold other content: the inverted image, so a reader
taking the wrong one is caught; the nominal plane is the first, Z offset 0), ``extras`` (THUMBNAIL, LABEL,
OVERVIEW instances). Edge tiles are padded with white. Patient name everywhere: ``PATIENT_NAME``.

Grey (fluorescence) slides: ``photometric`` "MONOCHROME2" or "MONOCHROME1" with ``bits`` 8 or 16 (raw encoding,
no extras) holds ``fluorescence_image``: a dark field with bright nuclei under illumination rising from left to
right, so tiles differ in brightness; ``truth.levels[k]`` are then the (rows, cols) stored values, and ``window``
(centre, width) writes a Window Center / Width (not in the IOD: dciodvfy warns of a Standard Extended SOP Class).
Epifluorescence optical paths, no ICC profile; edge tiles padded with 0. MONOCHROME1 is not allowed by the IOD
(dciodvfy rejects it), built for readers that meet such files anyway; MONOCHROME2 instances pass dciodvfy.

    truth = build_slide(folder, encoding="raw", photometric="MONOCHROME2", bits=16, extras=False)
"""

from __future__ import annotations

import datetime
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageDraw
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, VLWholeSlideMicroscopyImageStorage, generate_uid

__all__ = ["SlideTruth", "build_slide", "build_declared_slide", "he_image", "fluorescence_image", "downsample",
           "PATIENT_NAME", "DECLARED_SIZE", "LEVEL0_SPACING_MM", "JPEG_QUALITY", "GREY_PHOTOMETRICS"]

PATIENT_NAME = "Slideson^Paula"
LEVEL0_SPACING_MM = 0.00025  # 0.25 um: a 40x scan
DECLARED_SIZE = (98304, 75264)  # (columns, rows) of a real 40x slide, 24.6 x 18.8 mm of tissue area
JPEG_QUALITY = 90
WHITE = 255
GREY_PHOTOMETRICS = ("MONOCHROME2", "MONOCHROME1")


@dataclass
class SlideTruth:
    """What a reader must find in a built slide folder."""

    folder: Path
    series_uid: str
    levels: list[np.ndarray]                   # ground truth per VOLUME level, finest first
    spacings: list[tuple[float, float]]        # (row, column) spacing per level, mm
    volume_files: list[list[Path]]             # per level: its instance file(s), concatenation parts in order
    thumbnail_file: Path | None = None
    label_file: Path | None = None
    overview_file: Path | None = None
    lossy: bool = False
    tile: int = 256
    declared_size: tuple[int, int] | None = None    # (columns, rows) of level 0 when it declares more than it holds
    tile_origin: tuple[int, int] | None = None      # (x, y) in level 0 of the tiles a declared level holds
    frame_counts: list[int] = field(default_factory=list)  # frames per level (all instances of it)


# ----------------------------------------------------------------------------------------------------------
# Pixels


def _smooth_noise(rng: np.random.Generator, rows: int, cols: int, cell: int) -> np.ndarray:
    """Values in 0..1 varying smoothly over about ``cell`` pixels."""
    coarse = rng.random((rows // cell + 2, cols // cell + 2)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((cols + 2 * cell, rows + 2 * cell), Image.BICUBIC)
    return np.asarray(img)[cell:cell + rows, cell:cell + cols]


def he_image(cols: int, rows: int, seed: int = 0) -> np.ndarray:
    """(rows, cols, 3) uint8: an H&E-like field, white glass, pink eosin stroma, purple haematoxylin nuclei."""
    rng = np.random.default_rng(seed)
    tissue = _smooth_noise(rng, rows, cols, 160) > 0.42
    nuclei = _smooth_noise(rng, rows, cols, 9) > 0.72
    texture = _smooth_noise(rng, rows, cols, 4)[..., None] * 30 - 15
    glass = np.array([244, 242, 246], np.float32)
    eosin = np.array([226, 150, 196], np.float32)
    haematoxylin = np.array([92, 58, 146], np.float32)
    out = np.where(tissue[..., None], np.where(nuclei[..., None], haematoxylin, eosin) + texture, glass)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def fluorescence_image(cols: int, rows: int, seed: int = 0, bits: int = 16) -> np.ndarray:
    """(rows, cols) uint8 or uint16 (``bits``): a fluorescence field, dark background, dim tissue, bright nuclei,
    under illumination rising from 0.25 on the left to 1 on the right; values stay within 2 % .. 62 % of the
    range, so a reader that shifts bits or takes the type's range instead of the data's is caught."""
    rng = np.random.default_rng(seed)
    tissue = _smooth_noise(rng, rows, cols, 160)
    nuclei = np.clip((_smooth_noise(rng, rows, cols, 9) - 0.6) / 0.4, 0, 1)
    light = np.linspace(0.25, 1.0, cols, dtype=np.float32)[None, :]
    fraction = 0.02 + 0.6 * np.clip(0.08 + 0.12 * tissue + 0.8 * nuclei, 0, 1) * light
    return np.rint(fraction * (2**bits - 1)).astype(np.uint16 if bits == 16 else np.uint8)


def downsample(image: np.ndarray) -> np.ndarray:
    """Half size by 2 x 2 averaging (odd edges repeat their last row/column), rounded; (rows, cols, 3) or
    (rows, cols), 8- or 16-bit."""
    rows, cols = -(-image.shape[0] // 2) * 2, -(-image.shape[1] // 2) * 2
    samples = ((0, 0),) * (image.ndim - 2)
    padded = np.pad(image, ((0, rows - image.shape[0]), (0, cols - image.shape[1]), *samples), mode="edge")
    blocks = padded.astype(np.uint32).reshape(rows // 2, 2, cols // 2, 2, *image.shape[2:]).sum(axis=(1, 3))
    return ((blocks + 2) // 4).astype(image.dtype)


def _inverted(block: np.ndarray) -> np.ndarray:
    """Other content for extra planes and paths: the image upside down in value (white - x for 8-bit RGB)."""
    return np.iinfo(block.dtype).max - block


def _tiles(image: np.ndarray, tile: int) -> list[tuple[int, int, np.ndarray]]:
    """(row index, column index, tile) in row-major order; edge tiles padded with white (colour) or 0 (grey). A
    level smaller than a tile has tiles of its own size, as ``_instance`` declares (Rows, Columns)."""
    out = []
    pad = WHITE if image.ndim == 3 else 0
    th, tw = min(tile, image.shape[0]), min(tile, image.shape[1])
    for r in range(-(-image.shape[0] // th)):
        for c in range(-(-image.shape[1] // tw)):
            block = np.full((th, tw, *image.shape[2:]), pad, image.dtype)
            part = image[r * th:(r + 1) * th, c * tw:(c + 1) * tw]
            block[:part.shape[0], :part.shape[1]] = part
            out.append((r, c, block))
    return out


def _jpeg(tile: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(tile).save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=1)  # 1: 4:2:2
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Modules


@dataclass
class _Slide:
    """What every instance of one slide shares."""

    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    frame_uid: str = field(default_factory=generate_uid)
    specimen_uid: str = field(default_factory=generate_uid)
    container: str = "S24-01234 A1"
    icc: bytes = field(default_factory=lambda: ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    instance: int = 0


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _patient_study_series(ds: Dataset, slide: _Slide) -> None:
    day = datetime.date(2024, 5, 17).strftime("%Y%m%d")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = PATIENT_NAME, "P-7781", "19650302", "F"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = slide.study_uid, day, "093000"
    ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "A7781", "Referrer^Rita", "1"
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "SM", slide.series_uid, 1
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = slide.frame_uid, "SLIDE_CORNER"
    ds.Manufacturer, ds.ManufacturerModelName = "Test Scanner Inc.", "WSI-1"
    ds.DeviceSerialNumber, ds.SoftwareVersions = "SN-0042", "1.0"
    ds.ContentDate, ds.ContentTime = day, "094500"
    ds.AcquisitionDateTime, ds.AcquisitionDuration = day + "094000", 120.0


def _specimen(ds: Dataset, slide: _Slide) -> None:
    ds.ContainerIdentifier = slide.container
    ds.IssuerOfTheContainerIdentifierSequence = Sequence()
    ds.ContainerTypeCodeSequence = Sequence([_code("433466003", "SCT", "Microscope slide")])
    spec = Dataset()
    spec.SpecimenIdentifier, spec.SpecimenUID = "S24-01234 A1 1", slide.specimen_uid
    spec.IssuerOfTheSpecimenIdentifierSequence = Sequence()
    spec.SpecimenPreparationSequence = Sequence()
    ds.SpecimenDescriptionSequence = Sequence([spec])


def _optical_paths(ds: Dataset, slide: _Slide, count: int, grey: bool = False) -> None:
    """Brightfield paths with the sRGB profile, or (``grey``) epifluorescence channels excited at 405, 488, ...
    nm, without a profile (the pixels are no colour)."""
    items = []
    for i in range(count):
        path = Dataset()
        path.OpticalPathIdentifier = str(i + 1)
        if grey:
            path.OpticalPathDescription = f"Fluorescence channel {i + 1}"
            path.IlluminationTypeCodeSequence = Sequence([_code("111743", "DCM", "Epifluorescence illumination")])
            path.IlluminationWaveLength = (405.0, 488.0, 561.0, 640.0)[i % 4]
        else:
            path.OpticalPathDescription = "Brightfield" if i == 0 else f"Brightfield {i + 1}"
            path.IlluminationTypeCodeSequence = Sequence([_code("111744", "DCM", "Brightfield illumination")])
            path.IlluminationColorCodeSequence = Sequence([_code("414298005", "SCT", "Full Spectrum")])
            path.ICCProfile = slide.icc
        items.append(path)
    ds.OpticalPathSequence = Sequence(items)
    ds.NumberOfOpticalPaths = count


def _image_type(kind: str, level: int) -> list[str]:
    return ["ORIGINAL", "PRIMARY", kind, "NONE" if kind in ("LABEL", "OVERVIEW") or level == 0 else "RESAMPLED"]


def _instance(slide: _Slide, kind: str, level: int, cols: int, rows: int, spacing: float, tile: int,
              lossy: bool, grey: tuple[str, int] | None = None) -> Dataset:
    """Everything but the frames and the functional groups of one VL WSI instance; ``grey``: (photometric
    interpretation, bits) of grey pixels, else colour."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = VLWholeSlideMicroscopyImageStorage, generate_uid()
    _patient_study_series(ds, slide)
    _specimen(ds, slide)
    slide.instance += 1
    ds.InstanceNumber = slide.instance
    ds.ImageType = _image_type(kind, level)
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = cols, rows
    ds.Rows, ds.Columns = min(tile, rows), min(tile, cols)
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight, ds.ImagedVolumeDepth = cols * spacing, rows * spacing, 1.0
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 20.0, 40.0
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    _pixel_description(ds, lossy, grey)
    ds.LossyImageCompression = "01" if lossy else "00"
    if lossy:
        ds.LossyImageCompressionRatio, ds.LossyImageCompressionMethod = 12.0, "ISO_10918_1"
    ds.VolumetricProperties, ds.SpecimenLabelInImage = "VOLUME", "YES" if kind in ("LABEL", "OVERVIEW") else "NO"
    ds.BurnedInAnnotation = "YES" if kind == "LABEL" else "NO"
    ds.FocusMethod, ds.ExtendedDepthOfField = "AUTO", "NO"
    ds.AcquisitionContextSequence = Sequence()
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit if lossy else ExplicitVRLittleEndian
    return ds


def _pixel_description(ds: Dataset, lossy: bool, grey: tuple[str, int] | None) -> None:
    if grey is None:
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.PhotometricInterpretation = "YBR_FULL_422" if lossy else "RGB"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        return
    photometric, bits = grey
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if photometric == "MONOCHROME2":  # type 1C for MONOCHROME2, the only grey value the IOD allows
        ds.RescaleIntercept, ds.RescaleSlope, ds.PresentationLUTShape = 0, 1, "IDENTITY"


def _shared_groups(ds: Dataset, spacing: float, sparse: bool, planes: int) -> None:
    measures = Dataset()
    measures.PixelSpacing = [spacing, spacing]
    measures.SliceThickness = 0.001
    if planes > 1:
        measures.SpacingBetweenSlices = 0.001
    frame_type = Dataset()
    frame_type.FrameType = ds.ImageType
    group = Dataset()
    group.PixelMeasuresSequence = Sequence([measures])
    group.WholeSlideMicroscopyImageFrameTypeSequence = Sequence([frame_type])
    if ds.NumberOfOpticalPaths == 1 or sparse:
        path = Dataset()
        path.OpticalPathIdentifier = "1"
        group.OpticalPathIdentificationSequence = Sequence([path])
    ds.SharedFunctionalGroupsSequence = Sequence([group])


def _dimension_index(uid: str, tag: int) -> Dataset:
    item = Dataset()
    item.DimensionOrganizationUID = uid
    item.DimensionIndexPointer = tag
    item.FunctionalGroupPointer = 0x0048021A  # Plane Position (Slide) Sequence
    return item


def _dimensions(ds: Dataset, sparse: bool) -> None:
    uid = generate_uid()
    ds.DimensionOrganizationSequence = Sequence([Dataset()])
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = uid
    ds.DimensionOrganizationType = "TILED_SPARSE" if sparse else "TILED_FULL"
    # column, then row position in the total pixel matrix: (0048,021E), (0048,021F)
    ds.DimensionIndexSequence = Sequence([_dimension_index(uid, 0x0048021E), _dimension_index(uid, 0x0048021F)])


def _plane_position(ds: Dataset, row: int, col: int, spacing: float, z: float = 0.0) -> Dataset:
    """Per-frame group of a sparse tile at 0-based (row, col) of the total pixel matrix: slide position of the
    tile's top-left pixel centre along ImageOrientationSlide (rows along -X, columns along -Y)."""
    origin = ds.TotalPixelMatrixOriginSequence[0]
    position = Dataset()
    position.ColumnPositionInTotalImagePixelMatrix, position.RowPositionInTotalImagePixelMatrix = col + 1, row + 1
    position.XOffsetInSlideCoordinateSystem = round(float(origin.XOffsetInSlideCoordinateSystem) - row * spacing, 6)
    position.YOffsetInSlideCoordinateSystem = round(float(origin.YOffsetInSlideCoordinateSystem) - col * spacing, 6)
    position.ZOffsetInSlideCoordinateSystem = z
    index = Dataset()
    index.DimensionIndexValues = [col + 1, row + 1]
    group = Dataset()
    group.PlanePositionSlideSequence = Sequence([position])
    group.FrameContentSequence = Sequence([index])
    return group


def _set_frames(ds: Dataset, frames: list[np.ndarray], lossy: bool) -> None:
    ds.NumberOfFrames = len(frames)
    if lossy:
        ds.PixelData = encapsulate([_jpeg(f) for f in frames], has_bot=True)
        ds["PixelData"].VR = "OB"
    else:
        stacked = np.stack(frames)
        ds.PixelData = np.ascontiguousarray(stacked, stacked.dtype.newbyteorder("<")).tobytes()


def _save(ds: Dataset, path: Path) -> Path:
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------------------------------------
# Levels


def _full_frames(image: np.ndarray, tile: int, planes: int, paths: int) -> list[np.ndarray]:
    """TILED_FULL order: columns fastest, then rows, then focal planes, then optical paths; every plane and
    path but the first holds the inverted image."""
    tiles = [block for _, _, block in _tiles(image, tile)]
    out = []
    for p in range(paths):
        for z in range(planes):
            out += tiles if p == 0 and z == 0 else [_inverted(t) for t in tiles]
    return out


def _sparse_frames(ds: Dataset, image: np.ndarray, tile: int, spacing: float, planes: int,
                   origin: tuple[int, int] = (0, 0)) -> tuple[list[np.ndarray], list[Dataset]]:
    """Tiles in reverse order with their positions; extra focal planes at +/- 1 um hold the inverted image.
    ``origin`` (row, col) offsets the tiles within a larger declared matrix."""
    frames, groups = [], []
    offsets = [0.0] + [(1 if k % 2 else -1) * 0.001 * ((k + 1) // 2) for k in range(1, planes)]
    for r, c, block in reversed(_tiles(image, tile)):
        for z in reversed(offsets):
            frames.append(block if z == 0 else _inverted(block))
            groups.append(_plane_position(ds, origin[0] + r * tile, origin[1] + c * tile, spacing, z))
    return frames, groups


def _write_level(slide: _Slide, folder: Path, image: np.ndarray, level: int, spacing: float, opts: dict,
                 parts: int = 1) -> list[Path]:
    sparse, lossy, tile = opts["organization"] == "TILED_SPARSE", opts["encoding"] == "jpeg", opts["tile"]
    planes, paths, grey = opts["focal_planes"], opts["optical_paths"], opts.get("grey")
    ds = _instance(slide, "VOLUME", level, image.shape[1], image.shape[0], spacing, tile, lossy, grey)
    _optical_paths(ds, slide, 1 if sparse else paths, grey is not None)
    if opts.get("window") is not None:
        ds.WindowCenter, ds.WindowWidth = opts["window"]
    ds.TotalPixelMatrixFocalPlanes = planes
    _shared_groups(ds, spacing, sparse, planes)
    _dimensions(ds, sparse)
    if sparse:
        frames, groups = _sparse_frames(ds, image, tile, spacing, planes)
    else:
        frames, groups = _full_frames(image, tile, planes, paths), []
    return _write_parts(ds, folder / f"level{level}", frames, groups, lossy, parts)


def _write_parts(ds: Dataset, stem: Path, frames: list, groups: list, lossy: bool, parts: int) -> list[Path]:
    """One instance, or a concatenation of ``parts`` instances holding consecutive frames."""
    if parts == 1:
        if groups:
            ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
        _set_frames(ds, frames, lossy)
        return [_save(ds, stem.with_suffix(".dcm"))]
    source_uid, concatenation_uid = ds.SOPInstanceUID, generate_uid()
    bounds = [len(frames) * k // parts for k in range(parts + 1)]
    out = []
    for k in range(parts):
        part = ds.copy()
        part.file_meta = FileMetaDataset(ds.file_meta)
        part.SOPInstanceUID = source_uid if k == 0 else generate_uid()
        part.ConcatenationUID, part.SOPInstanceUIDOfConcatenationSource = concatenation_uid, source_uid
        part.ConcatenationFrameOffsetNumber, part.InConcatenationNumber = bounds[k], k + 1
        part.InConcatenationTotalNumber = parts
        if groups:
            part.PerFrameFunctionalGroupsSequence = Sequence(groups[bounds[k]:bounds[k + 1]])
        _set_frames(part, frames[bounds[k]:bounds[k + 1]], lossy)
        out.append(_save(part, Path(f"{stem}_part{k + 1}.dcm")))
    return out


def _single(slide: _Slide, folder: Path, kind: str, image: np.ndarray, spacing: float, name: str) -> Path:
    """THUMBNAIL, LABEL or OVERVIEW: one frame holding the whole image, JPEG as scanners store them."""
    ds = _instance(slide, kind, 1, image.shape[1], image.shape[0], spacing, max(image.shape[:2]), True)
    _optical_paths(ds, slide, 1)
    _shared_groups(ds, spacing, False, 1)
    _dimensions(ds, False)
    if kind == "LABEL":
        ds.LabelText, ds.BarcodeValue = f"{PATIENT_NAME} S24-01234", "S24-01234"
    _set_frames(ds, [image], True)
    return _save(ds, folder / name)


def _label_image() -> np.ndarray:
    img = Image.new("RGB", (240, 160), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    draw.text((10, 20), PATIENT_NAME, fill=(0, 0, 0))
    draw.text((10, 60), "S24-01234 A1  H&E", fill=(0, 0, 0))
    draw.rectangle((10, 100, 200, 140), outline=(0, 0, 0), width=3)
    return np.asarray(img)


def _extras(slide: _Slide, folder: Path, base: np.ndarray, truth: SlideTruth) -> None:
    thumb = base
    spacing = LEVEL0_SPACING_MM
    while max(thumb.shape[:2]) > 256:
        thumb, spacing = downsample(thumb), spacing * 2
    truth.thumbnail_file = _single(slide, folder, "THUMBNAIL", thumb, spacing, "thumbnail.dcm")
    truth.label_file = _single(slide, folder, "LABEL", _label_image(), 0.05, "label.dcm")
    overview = np.full((200, 500, 3), 250, np.uint8)
    part = thumb[:160, :340]
    overview[20:20 + part.shape[0], 140:140 + part.shape[1]] = part
    overview[20:180, 10:130] = _label_image()[:160, :120]
    truth.overview_file = _single(slide, folder, "OVERVIEW", overview, 0.1, "overview.dcm")


def build_slide(folder: Path, size: tuple[int, int] = (1500, 1100), tile: int = 256, levels: int = 3,
                encoding: str = "jpeg", organization: str = "TILED_FULL", concatenate: int | None = None,
                focal_planes: int = 1, optical_paths: int = 1, extras: bool = True, seed: int = 0,
                photometric: str | None = None, bits: int = 8,
                window: tuple[float, float] | None = None) -> SlideTruth:
    """Write one slide series into ``folder`` (created); see the module docstring."""
    grey = _grey_options(photometric, bits, encoding, extras, window)
    folder.mkdir(parents=True, exist_ok=True)
    slide = _Slide()
    opts = {"organization": organization, "encoding": encoding, "tile": tile, "focal_planes": focal_planes,
            "optical_paths": optical_paths, "grey": grey, "window": window}
    images = [he_image(*size, seed=seed) if grey is None else fluorescence_image(*size, seed=seed, bits=bits)]
    for _ in range(levels - 1):
        images.append(downsample(images[-1]))
    truth = SlideTruth(folder, slide.series_uid, images, [], [], lossy=encoding == "jpeg", tile=tile)
    for k, image in enumerate(images):
        spacing = LEVEL0_SPACING_MM * 2**k
        truth.spacings.append((spacing, spacing))
        files = _write_level(slide, folder, image, k, spacing, opts, parts=2 if concatenate == k else 1)
        truth.volume_files.append(files)
        planes = focal_planes * (optical_paths if organization == "TILED_FULL" else 1)
        truth.frame_counts.append(len(_tiles(image, tile)) * planes)
    if extras:
        _extras(slide, folder, images[0], truth)
    return truth


def _grey_options(photometric: str | None, bits: int, encoding: str, extras: bool,
                  window: tuple[float, float] | None) -> tuple[str, int] | None:
    if photometric is None:
        if bits != 8 or window is not None:
            raise ValueError("bits and window are for grey slides: give photometric MONOCHROME2 or MONOCHROME1")
        return None
    if photometric not in GREY_PHOTOMETRICS or bits not in (8, 16):
        raise ValueError(f"grey slides are {' or '.join(GREY_PHOTOMETRICS)} of 8 or 16 bits")
    if encoding != "raw" or extras:
        raise ValueError("grey slides are built uncompressed (encoding='raw') and without extras")
    return photometric, bits


def build_declared_slide(folder: Path, held: tuple[int, int] = (3, 3), tile: int = 256,
                         encoding: str = "jpeg", seed: int = 1) -> SlideTruth:
    """A sparse level 0 declaring ``DECLARED_SIZE`` at 0.25 um that holds ``held`` (rows, columns) tiles
    near the centre, plus a full 1/64 level (16 um) of the same declared area that is all glass except the
    held area's average; ``truth.levels[0]`` is the held tiles' content, at ``truth.tile_origin``."""
    folder.mkdir(parents=True, exist_ok=True)
    slide = _Slide()
    cols, rows = DECLARED_SIZE
    origin = (rows // 2 // tile * tile, cols // 2 // tile * tile)
    content = he_image(held[1] * tile, held[0] * tile, seed=seed)
    lossy = encoding == "jpeg"
    ds = _instance(slide, "VOLUME", 0, cols, rows, LEVEL0_SPACING_MM, tile, lossy)
    _optical_paths(ds, slide, 1)
    _shared_groups(ds, LEVEL0_SPACING_MM, True, 1)
    _dimensions(ds, True)
    frames, groups = _sparse_frames(ds, content, tile, LEVEL0_SPACING_MM, 1, origin)
    level0 = _write_parts(ds, folder / "level0", frames, groups, lossy, 1)
    coarse = np.full((rows // 64, cols // 64, 3), WHITE, np.uint8)
    small = content
    for _ in range(6):
        small = downsample(small)
    coarse[origin[0] // 64:origin[0] // 64 + small.shape[0], origin[1] // 64:origin[1] // 64 + small.shape[1]] = small
    opts = {"organization": "TILED_FULL", "encoding": encoding, "tile": tile, "focal_planes": 1, "optical_paths": 1}
    level1 = _write_level(slide, folder, coarse, 6, LEVEL0_SPACING_MM * 64, opts)
    truth = SlideTruth(folder, slide.series_uid, [content, coarse], [(LEVEL0_SPACING_MM,) * 2, (0.016, 0.016)],
                       [level0, level1], lossy=lossy, tile=tile, declared_size=DECLARED_SIZE,
                       tile_origin=(origin[1], origin[0]))
    truth.frame_counts = [len(frames), len(_tiles(coarse, tile))]
    return truth
