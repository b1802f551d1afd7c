"""Outputs made from a whole-slide region (``io/slide_output.py``): a VL Whole Slide Microscopy image that
dciodvfy accepts, placed over the region it came from (positions computed here from PS3.3's definitions, not
the writer's), covering the same area when resampled, reading back pixel for pixel, labelled synthetic, and
with errors that name no patient data (docs/medical-io.md#slide-outputs)."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import ImageCms
from pydicom.uid import VLWholeSlideMicroscopyImageStorage, generate_uid

from tests.conftest import dciodvfy_errors
from tests.slides import PATIENT_NAME, build_slide
from unimedvl_core.io.dicom_output import derived_image, write_dicom
from unimedvl_core.io.medical_io import MedicalImage
from unimedvl_core.io.provenance import Provenance
from unimedvl_core.io.slide import SlideRegion, SlideSelection, read_slide
from unimedvl_core.io.slide_output import PADDING_VALUE, TILE
from unimedvl_core.io.synthetic import is_own_output

WEIGHTS = Provenance("UniMedVL-test-weights")


@pytest.fixture(scope="module", params=["jpeg", "raw"])
def slide(request, tmp_path_factory):
    return build_slide(tmp_path_factory.mktemp(f"slide_{request.param}") / "slide", encoding=request.param,
                       extras=False)


def _source(truth, level: int, row: int, column: int, rows: int, columns: int) -> MedicalImage:
    """What the slide reader gives for a region: its pixels (ground truth), the level's header, its place."""
    header = pydicom.dcmread(truth.volume_files[level][0], stop_before_pixels=True)
    region = SlideRegion(level=level, row=row, column=column, rows=rows, columns=columns,
                         spacing_mm=truth.spacings[level], level_count=len(truth.levels))
    pixels = truth.levels[level][row:row + rows, column:column + columns]
    return MedicalImage(np.array(pixels), "slide", header, modality="SM",
                        geometry={"slide_region": region, "pixel_spacing": truth.spacings[level]})


def _write(pixels, source, tmp_path, name="out.dcm", task="super_resolution"):
    ds = derived_image(pixels, source, task, "4x super-resolution", generate_uid(), 9900, provenance=WEIGHTS)
    return ds, write_dicom(ds, tmp_path / name)


def _slide_position(header, row: float, column: float) -> np.ndarray:
    """(X, Y) in mm of pixel (row, column) (0-based, fractional allowed) of a level's total pixel matrix:
    PS3.3 C.8.12.4.1.4 / C.7.6.2.1.1 with Image Orientation (Slide) and the level's Pixel Spacing."""
    origin = header.TotalPixelMatrixOriginSequence[0]
    f = [float(v) for v in header.ImageOrientationSlide]
    dr, dc = (float(v) for v in header.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing)
    x = float(origin.XOffsetInSlideCoordinateSystem) + f[0] * dc * column + f[3] * dr * row
    y = float(origin.YOffsetInSlideCoordinateSystem) + f[1] * dc * column + f[4] * dr * row
    return np.array([x, y])


def _assemble(ds) -> np.ndarray:
    """The total pixel matrix from a TILED_FULL instance's frames (row-major tiles), cropped."""
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns, 3)
    down = -(-int(ds.TotalPixelMatrixRows) // ds.Rows)
    across = -(-int(ds.TotalPixelMatrixColumns) // ds.Columns)
    assert len(frames) == down * across
    full = frames.reshape(down, across, ds.Rows, ds.Columns, 3).swapaxes(1, 2)
    full = full.reshape(down * ds.Rows, across * ds.Columns, 3)
    return full[:int(ds.TotalPixelMatrixRows), :int(ds.TotalPixelMatrixColumns)], full


def _turned_and_anisotropic(source: MedicalImage) -> MedicalImage:
    """The same region on a level scanned rotated (rows along +X, columns along +Y) with unequal row and
    column spacing, so that a writer mixing up rows and columns or a direction's sign is caught."""
    header = source.dataset
    header.ImageOrientationSlide = [0, 1, 0, 1, 0, 0]
    spacing = (0.0006, 0.0004)
    header.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = list(spacing)
    region = source.geometry["slide_region"]
    source.geometry["slide_region"] = SlideRegion(region.level, region.row, region.column, region.rows,
                                                  region.columns, spacing, region.level_count)
    return source


def test_slide_output_passes_dciodvfy(slide, tmp_path):
    source = _source(slide, 1, 100, 130, 300, 280)
    pixels = np.kron(source.pixels, np.ones((4, 4, 1), np.uint8))  # 1200 x 1120: partial edge tiles
    _, path = _write(pixels, source, tmp_path)
    assert dciodvfy_errors(path) == []


@pytest.mark.parametrize("level, row, column", [(0, 0, 0), (0, 517, 301), (2, 33, 71)])
@pytest.mark.parametrize("turned", [False, True])
def test_same_size_output_lies_on_its_source_pixels(slide, tmp_path, level, row, column, turned):
    rows, columns = min(200, slide.levels[level].shape[0] - row), 150
    source = _source(slide, level, row, column, rows, columns)
    if turned:
        source = _turned_and_anisotropic(source)
    ds, path = _write(source.pixels, source, tmp_path)
    out = pydicom.dcmread(path, stop_before_pixels=True)
    origin = out.TotalPixelMatrixOriginSequence[0]
    expected = _slide_position(source.dataset, row, column)
    assert np.allclose([float(origin.XOffsetInSlideCoordinateSystem), float(origin.YOffsetInSlideCoordinateSystem)],
                       expected, atol=1e-9, rtol=0)
    spacing = out.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert np.allclose([float(v) for v in spacing], source.geometry["slide_region"].spacing_mm, rtol=1e-12, atol=0)
    # the output's last pixel lies on the region's last pixel
    assert np.allclose(_slide_position(out, rows - 1, columns - 1),
                       _slide_position(source.dataset, row + rows - 1, column + columns - 1), atol=1e-9, rtol=0)
    for keyword in ("FrameOfReferenceUID", "ImageOrientationSlide", "ContainerIdentifier"):
        assert out[keyword].value == source.dataset[keyword].value


@pytest.mark.parametrize("turned", [False, True])
def test_super_resolution_output_covers_the_same_area(slide, tmp_path, turned):
    row, column, rows, columns = 260, 300, 180, 90
    source = _source(slide, 1, row, column, rows, columns)
    if turned:
        source = _turned_and_anisotropic(source)
    _, path = _write(np.kron(source.pixels, np.ones((4, 4, 1), np.uint8)), source, tmp_path)
    out = pydicom.dcmread(path, stop_before_pixels=True)
    spacing = [float(v) for v in out.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    region_spacing = source.geometry["slide_region"].spacing_mm
    assert np.allclose(spacing, np.array(region_spacing) / 4, rtol=1e-9, atol=0)
    assert (int(out.TotalPixelMatrixRows), int(out.TotalPixelMatrixColumns)) == (4 * rows, 4 * columns)
    # outer corners of the first and last pixels (half a pixel beyond their centres) coincide
    last = (row + rows - 0.5, column + columns - 0.5)
    for out_corner, source_corner in (((-0.5, -0.5), (row - 0.5, column - 0.5)),
                                      ((4 * rows - 0.5, 4 * columns - 0.5), last)):
        assert np.allclose(_slide_position(out, *out_corner), _slide_position(source.dataset, *source_corner),
                           atol=1e-9, rtol=0)
    assert np.isclose(float(out.ImagedVolumeWidth), columns * region_spacing[1], rtol=1e-6)
    assert np.isclose(float(out.ImagedVolumeHeight), rows * region_spacing[0], rtol=1e-6)


def test_pixels_read_back_exactly(slide, tmp_path):
    source = _source(slide, 0, 40, 50, 600, 530)
    pixels = np.random.default_rng(3).integers(0, 256, (600, 530, 3), dtype=np.uint8)
    _, path = _write(pixels, source, tmp_path)
    ds = pydicom.dcmread(path)
    assert (ds.Rows, ds.Columns, int(ds.NumberOfFrames)) == (TILE, TILE, 9)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.PhotometricInterpretation == "RGB" and ds.DimensionOrganizationType == "TILED_FULL"
    cropped, full = _assemble(ds)
    assert np.array_equal(cropped, pixels)
    assert (full[600:] == PADDING_VALUE).all() and (full[:, 530:] == PADDING_VALUE).all()
    image = read_slide(path, SlideSelection(level=0))
    assert np.array_equal(image.pixels, pixels)
    region = image.geometry["slide_region"]
    assert (region.row, region.column, region.rows, region.columns) == (0, 0, 600, 530)
    assert np.allclose(region.spacing_mm, slide.spacings[0], rtol=1e-9, atol=0)


def test_output_is_labelled_synthetic_and_references_its_source(slide, tmp_path):
    source = _source(slide, 2, 10, 20, 100, 120)
    series = generate_uid()
    ds = derived_image(source.pixels, source, "stain_transfer", "H&E to IHC", series, 9901, provenance=WEIGHTS)
    path = write_dicom(ds, tmp_path / "label.dcm")
    out = pydicom.dcmread(path, stop_before_pixels=True)
    ref = source.dataset
    assert out.SOPClassUID == VLWholeSlideMicroscopyImageStorage and out.Modality == "SM"
    assert list(out.ImageType) == ["DERIVED", "PRIMARY", "VOLUME", "NONE"]
    assert out.SyntheticData == "YES" and out.BurnedInAnnotation == "NO" and out.SpecimenLabelInImage == "NO"
    assert "stain_transfer" in out.DerivationDescription and "synthetic" in out.SeriesDescription.lower()
    assert out.SeriesInstanceUID == series and out.SeriesNumber == 9901
    assert out.SOPInstanceUID != ref.SOPInstanceUID and out.SeriesInstanceUID != ref.SeriesInstanceUID
    assert out.SourceImageSequence[0].ReferencedSOPInstanceUID == ref.SOPInstanceUID
    assert out.ReferencedSeriesSequence[0].SeriesInstanceUID == ref.SeriesInstanceUID
    assert WEIGHTS.short in out.SoftwareVersions and WEIGHTS.short in out.ImageComments
    assert WEIGHTS.short in out.ContributingEquipmentSequence[-1].ContributionDescription
    assert out.Manufacturer != ref.Manufacturer and out.DeviceSerialNumber and out.ManufacturerModelName
    assert out.PatientName == ref.PatientName and out.StudyInstanceUID == ref.StudyInstanceUID
    assert out.SpecimenDescriptionSequence[0].SpecimenUID == ref.SpecimenDescriptionSequence[0].SpecimenUID
    assert out.OpticalPathSequence[0].ICCProfile == ref.OpticalPathSequence[0].ICCProfile
    assert out.LossyImageCompression == ref.LossyImageCompression  # a JPEG source's loss is not forgotten
    assert is_own_output(path)


def test_errors_name_no_patient_data(slide):
    source = _source(slide, 1, 0, 0, 64, 64)
    del source.dataset.ImageOrientationSlide
    with pytest.raises(ValueError) as error:
        derived_image(source.pixels, source, "super_resolution", "x", generate_uid(), 9900)
    message = str(error.value)
    assert "ImageOrientationSlide" in message and "\n" not in message
    header = source.dataset
    for value in (PATIENT_NAME, *PATIENT_NAME.split("^"), str(header.PatientID), header.ContainerIdentifier):
        assert value not in message
    with pytest.raises(ValueError, match="uint8"):
        derived_image(source.pixels.astype(np.float32), _source(slide, 1, 0, 0, 64, 64), "sr", "x", generate_uid(), 1)


def test_text_to_image_with_a_slide_context_claims_no_place_on_the_slide(slide):
    source = _source(slide, 1, 0, 0, 64, 64)
    ds = derived_image(source.pixels, source, "generation", "text", generate_uid(), 9900, from_source=False)
    assert ds.SOPClassUID != VLWholeSlideMicroscopyImageStorage and "SourceImageSequence" not in ds


def test_region_read_by_the_slide_reader_is_written_back_over_itself(slide, tmp_path):
    x, y, width, height = 402, 318, 520, 380  # level-0 pixels; read at level 1 (half)
    image = read_slide(slide.folder, SlideSelection(region=(x, y, width, height), level=1))
    region = image.geometry["slide_region"]
    _, path = _write(image.pixels, image, tmp_path)
    assert dciodvfy_errors(path) == []
    out = pydicom.dcmread(path, stop_before_pixels=True)
    level1 = pydicom.dcmread(slide.volume_files[1][0], stop_before_pixels=True)
    origin = out.TotalPixelMatrixOriginSequence[0]
    assert np.allclose([float(origin.XOffsetInSlideCoordinateSystem), float(origin.YOffsetInSlideCoordinateSystem)],
                       _slide_position(level1, region.row, region.column), atol=1e-9, rtol=0)
    assert out.SourceImageSequence[0].ReferencedSOPInstanceUID == level1.SOPInstanceUID
    assert np.array_equal(read_slide(path).pixels, image.pixels)


def test_output_of_a_grey_fluorescence_region(tmp_path):
    """A 16-bit MONOCHROME2 epifluorescence source: the RGB output passes dciodvfy (its optical path, copied
    from the source's, gets the sRGB profile the source's grey path lacks) and reads back pixel for pixel."""
    truth = build_slide(tmp_path / "grey", encoding="raw", photometric="MONOCHROME2", bits=16, extras=False,
                        levels=2)
    image = read_slide(truth.folder, SlideSelection(region=(402, 318, 520, 380), level=1))
    assert "ICCProfile" not in image.dataset.OpticalPathSequence[0]
    pixels = np.kron(image.pixels, np.ones((4, 4, 1), np.uint8))  # as a 4x super-resolution output
    _, path = _write(pixels, image, tmp_path)
    assert dciodvfy_errors(path) == []
    out = pydicom.dcmread(path)
    path_item = out.OpticalPathSequence[0]
    assert path_item.OpticalPathIdentifier == image.dataset.OpticalPathSequence[0].OpticalPathIdentifier
    assert path_item.IlluminationTypeCodeSequence[0].CodeValue == "111743"
    assert ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(path_item.ICCProfile))).startswith("sRGB")
    assert out.PhotometricInterpretation == "RGB" and out.SamplesPerPixel == 3
    assert np.array_equal(read_slide(path).pixels, pixels)
    region = image.geometry["slide_region"]
    level1 = pydicom.dcmread(truth.volume_files[1][0], stop_before_pixels=True)
    # outer corners of the output's first pixel and of the region's coincide (placement from PS3.3, as above)
    assert np.allclose(_slide_position(out, -0.5, -0.5),
                       _slide_position(level1, region.row - 0.5, region.column - 0.5), atol=1e-9, rtol=0)
