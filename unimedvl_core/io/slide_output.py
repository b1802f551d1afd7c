"""A generated or derived image of a whole-slide region as a DICOM VL Whole Slide Microscopy image (PS3.3 A.32.8)
placed back over that region on the same slide, labelled synthetic like every output
(docs/medical-io.md#slide-outputs).

One VOLUME level, TILED_FULL, 256 x 256 tiles (edge tiles padded with white glass), uncompressed RGB: the
output is synthetic and small, and a second lossy step would add artefacts to what the model made. Same
slide as the source level: Frame of Reference, container and specimen, the optical path (with its ICC
profile, or the sRGB one when a grey source's path has none) and Image Orientation (Slide) are copied from its
header; the Total Pixel Matrix Origin is the slide position of the region's top-left pixel, and Pixel Spacing
is the region's physical size over the output's pixels, so a 4x super-resolution output covers the same area
with a quarter of the spacing.
"""

from __future__ import annotations

import copy
import datetime
import functools

import numpy as np
from PIL import ImageCms
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import VLWholeSlideMicroscopyImageStorage, generate_uid
from pydicom.valuerep import DSfloat

from .derived_labels import (
    WeightsArg,
    file_meta,
    finish_derived,
    label_derived,
    new_instance_in_series,
    source_reference,
    weights_of,
)
from .medical_io import MedicalImage
from .slide import BACKGROUND, SlideRegion
from .synthetic import SOFTWARE

__all__ = ["derived_slide_image", "TILE", "PADDING_VALUE", "region_origin_and_spacing"]

TILE = 256
PADDING_VALUE = BACKGROUND  # edge tiles are padded with what the reader shows where no tile is: glass
IMAGE_TYPE = ["DERIVED", "PRIMARY", "VOLUME", "NONE"]
# Header attributes that say which slide and specimen an image shows; copied so the output lies on the
# same slide (type 1 ones are checked first, the others copied when the source has them).
_SAME_SLIDE_REQUIRED = ("FrameOfReferenceUID", "ImageOrientationSlide", "TotalPixelMatrixOriginSequence",
                        "ContainerIdentifier", "SpecimenDescriptionSequence", "OpticalPathSequence")
_SAME_SLIDE_OPTIONAL = ("PositionReferenceIndicator", "IssuerOfTheContainerIdentifierSequence",
                        "AlternateContainerIdentifierSequence", "ContainerTypeCodeSequence", "ContainerDescription",
                        "ContainerComponentSequence", "AcquisitionDateTime", "AcquisitionDuration",
                        "ImagedVolumeDepth", "FocusMethod", "ExtendedDepthOfField", "NumberOfFocalPlanes",
                        "DistanceBetweenFocalPlanes", "LossyImageCompression", "LossyImageCompressionRatio",
                        "LossyImageCompressionMethod")
# Type 1 attributes of the Whole Slide Microscopy Image module a non-conformant source may lack.
_TYPE1_DEFAULTS = {"FocusMethod": "AUTO", "ExtendedDepthOfField": "NO", "LossyImageCompression": "00",
                   "ImagedVolumeDepth": 1.0}
_MAX_PIXEL_BYTES = 2**32 - 2  # an uncompressed Pixel Data element's length must fit 32 bits


def _ds(value: float) -> DSfloat:
    """A decimal string of at most 16 characters, as precise as that allows."""
    return DSfloat(float(value), auto_format=True)


def _rgb(pixels: np.ndarray) -> np.ndarray:
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3) \
            or min(pixels.shape[:2]) < 1:
        raise ValueError(f"slide output pixels must be (H, W, 3) or (H, W) uint8, got {pixels.shape} {pixels.dtype}")
    return np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels


def _tiled_full_frames(pixels: np.ndarray, tile_rows: int, tile_cols: int) -> np.ndarray:
    """(frames, tile_rows, tile_cols, 3) in TILED_FULL order (PS3.3 C.7.6.17.3: along a row of tiles first,
    then down), the right and bottom tiles padded."""
    rows, cols = pixels.shape[:2]
    down, across = -(-rows // tile_rows), -(-cols // tile_cols)
    padded = np.full((down * tile_rows, across * tile_cols, 3), PADDING_VALUE, np.uint8)
    padded[:rows, :cols] = pixels
    tiles = padded.reshape(down, tile_rows, across, tile_cols, 3).swapaxes(1, 2)
    return np.ascontiguousarray(tiles.reshape(down * across, tile_rows, tile_cols, 3))


def region_origin_and_spacing(ref: Dataset, region: SlideRegion, rows: int, cols: int
                              ) -> tuple[tuple[float, float], tuple[float, float]]:
    """((X, Y) slide position in mm of the output's first pixel centre, (row, column) spacing in mm) for an
    output of ``rows`` x ``cols`` pixels covering ``region`` of the level whose header is ``ref``.

    Pixel (r, c) of the level lies at origin + c * column spacing * row direction + r * row spacing * column
    direction (Image Orientation (Slide): the first three values are the direction along a row). A resampled
    output keeps the region's outer corner, so its first pixel centre moves by half the change of spacing."""
    origin = ref.TotalPixelMatrixOriginSequence[0]
    start = np.array([float(origin.XOffsetInSlideCoordinateSystem), float(origin.YOffsetInSlideCoordinateSystem)])
    orient = np.array([float(v) for v in ref.ImageOrientationSlide])
    along_row, along_column = orient[:2], orient[3:5]  # Z offsets are in um and stay the source's
    row_spacing, col_spacing = (float(v) for v in region.spacing_mm)
    new_row, new_col = region.rows * row_spacing / rows, region.columns * col_spacing / cols
    first = start + along_row * (region.column * col_spacing + (new_col - col_spacing) / 2) \
        + along_column * (region.row * row_spacing + (new_row - row_spacing) / 2)
    return (float(first[0]), float(first[1])), (new_row, new_col)


def _copy_same_slide(ds: Dataset, ref: Dataset) -> None:
    missing = [k for k in _SAME_SLIDE_REQUIRED if k not in ref or ref[k].value in (None, "", [])]
    if missing:
        raise ValueError(f"slide source header lacks {', '.join(missing)}: cannot place the output on the slide")
    for keyword in (*_SAME_SLIDE_REQUIRED, *_SAME_SLIDE_OPTIONAL):
        if keyword in ref and keyword not in ("TotalPixelMatrixOriginSequence", "OpticalPathSequence"):
            ds.add(copy.deepcopy(ref.data_element(keyword)))
    for keyword, value in _TYPE1_DEFAULTS.items():
        if keyword not in ds or ds[keyword].value in (None, ""):
            setattr(ds, keyword, value)
    if "AcquisitionDateTime" not in ds:
        ds.AcquisitionDateTime = datetime.datetime.now().strftime("%Y%m%d%H%M%S")


@functools.cache
def _srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _optical_path(ds: Dataset, ref: Dataset) -> str:
    """The source's optical path the pixels were read through (its shared identification, else the first);
    returns its identifier. A path without an ICC profile (a grey source, e.g. fluorescence) gets the sRGB
    one: the output's pixels are RGB, which the Optical Path module requires a profile for."""
    items = list(ref.OpticalPathSequence)
    shared = (ref.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    wanted = (shared.get("OpticalPathIdentificationSequence") or [Dataset()])[0].get("OpticalPathIdentifier")
    item = copy.deepcopy(next((i for i in items if i.get("OpticalPathIdentifier") == wanted), items[0]))
    if not item.get("ICCProfile"):
        item.ICCProfile = _srgb_profile()
    ds.OpticalPathSequence = DicomSequence([item])
    ds.NumberOfOpticalPaths = 1
    return str(item.OpticalPathIdentifier)


def _pixel_measures(ref: Dataset, spacing: tuple[float, float]) -> Dataset:
    """Pixel Measures of the output: its spacing; the source's slice thickness (depth of field)."""
    shared = (ref.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    source = (shared.get("PixelMeasuresSequence") or [Dataset()])[0]
    measures = Dataset()
    measures.PixelSpacing = [_ds(spacing[0]), _ds(spacing[1])]
    thickness = source.get("SliceThickness")
    measures.SliceThickness = thickness if thickness not in (None, "") else _ds(float(ref.ImagedVolumeDepth) / 1000)
    return measures


def _shared_groups(ds: Dataset, ref: Dataset, spacing: tuple[float, float], path_id: str) -> None:
    frame_type, path = Dataset(), Dataset()
    frame_type.FrameType = list(IMAGE_TYPE)
    path.OpticalPathIdentifier = path_id
    group = Dataset()
    group.PixelMeasuresSequence = DicomSequence([_pixel_measures(ref, spacing)])
    group.WholeSlideMicroscopyImageFrameTypeSequence = DicomSequence([frame_type])
    group.OpticalPathIdentificationSequence = DicomSequence([path])
    ds.SharedFunctionalGroupsSequence = DicomSequence([group])


def _dimensions(ds: Dataset) -> None:
    """TILED_FULL organisation; the tile position dimensions (column, row in the total pixel matrix)."""
    organization = Dataset()
    organization.DimensionOrganizationUID = generate_uid()
    ds.DimensionOrganizationSequence = DicomSequence([organization])
    ds.DimensionOrganizationType = "TILED_FULL"
    indices = []
    for keyword in ("ColumnPositionInTotalImagePixelMatrix", "RowPositionInTotalImagePixelMatrix"):
        index = Dataset()
        index.DimensionOrganizationUID = organization.DimensionOrganizationUID
        index.DimensionIndexPointer = keyword
        index.FunctionalGroupPointer = "PlanePositionSlideSequence"
        indices.append(index)
    ds.DimensionIndexSequence = DicomSequence(indices)


def _placement(ds: Dataset, ref: Dataset, region: SlideRegion, rows: int, cols: int) -> tuple[float, float]:
    """Total pixel matrix size, origin and imaged area of the output; returns its (row, column) spacing."""
    (x, y), spacing = region_origin_and_spacing(ref, region, rows, cols)
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = _ds(x), _ds(y)
    source_origin = ref.TotalPixelMatrixOriginSequence[0]
    if "ZOffsetInSlideCoordinateSystem" in source_origin:
        origin.ZOffsetInSlideCoordinateSystem = source_origin.ZOffsetInSlideCoordinateSystem
    ds.TotalPixelMatrixOriginSequence = DicomSequence([origin])
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixFocalPlanes = rows, cols, 1
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = cols * spacing[1], rows * spacing[0]
    return spacing


def _set_pixels(ds: Dataset, pixels: np.ndarray) -> None:
    rows, cols = pixels.shape[:2]
    tile_rows, tile_cols = min(TILE, rows), min(TILE, cols)  # an output smaller than a tile is one frame
    frames = _tiled_full_frames(pixels, tile_rows, tile_cols)
    if frames.nbytes > _MAX_PIXEL_BYTES:
        raise ValueError(f"slide output of {cols} x {rows} pixels is too large for one uncompressed instance")
    ds.Rows, ds.Columns, ds.NumberOfFrames = tile_rows, tile_cols, len(frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = frames.tobytes()
    ds["PixelData"].VR = "OB"


def _referenced_series(ref: Dataset) -> Dataset:
    """Common Instance Reference: the source level instance, in its series of this study."""
    instance = Dataset()
    instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID = ref.SOPClassUID, ref.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = ref.SeriesInstanceUID
    series.ReferencedInstanceSequence = DicomSequence([instance])
    return series


def derived_slide_image(pixels: np.ndarray, source: MedicalImage, task: str, description: str,
                        series_instance_uid: str, series_number: int, instance_number: int = 1,
                        series_description: str | None = None, provenance: WeightsArg = None) -> Dataset:
    """A VL Whole Slide Microscopy image of ``pixels`` (H, W, 3 uint8) placed over the slide region
    ``source`` was read from (``source.geometry["slide_region"]``), in the source's patient, study and frame
    of reference, in the given series; labelled synthetic and naming the weights (``provenance``)."""
    ref, region = source.dataset, source.geometry.get("slide_region")
    if ref is None or not isinstance(region, SlideRegion):
        raise ValueError("a slide output needs a slide source read with its region (geometry['slide_region'])")
    pixels = _rgb(pixels)
    ds = Dataset()
    ds.SOPClassUID, ds.Modality = VLWholeSlideMicroscopyImageStorage, "SM"
    new_instance_in_series(ds, series_instance_uid, series_number, instance_number)
    _copy_same_slide(ds, ref)
    ds.ImageType, ds.VolumetricProperties, ds.SpecimenLabelInImage = list(IMAGE_TYPE), "VOLUME", "NO"
    ds.AcquisitionContextSequence = DicomSequence()
    spacing = _placement(ds, ref, region, *pixels.shape[:2])
    _shared_groups(ds, ref, spacing, _optical_path(ds, ref))
    _dimensions(ds)
    _set_pixels(ds, pixels)
    label_derived(ds, task, description, series_description, provenance)
    _, digest = weights_of(provenance)
    ds.DeviceSerialNumber = (digest or SOFTWARE)[:64]  # Enhanced General Equipment: this software, its weights
    ds.SourceImageSequence = DicomSequence([source_reference(source)])
    ds.ReferencedSeriesSequence = DicomSequence([_referenced_series(ref)])
    finish_derived(ds, ref, provenance)
    ds.file_meta = file_meta(ds)
    return ds
