"""Whole-slide reading (unimedvl_core/io/slide.py) against the ground truth of tests/slides.py: regions at every
level, every tile organisation, level choice, decoding only the tiles needed, the label never read, errors; grey
(fluorescence) slides mapped once per region like any grey image; highdicom's real grey test slides."""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import generate_frames

from tests.slides import DECLARED_SIZE, PATIENT_NAME, build_declared_slide, build_slide
from unimedvl_core.io import slide as slide_io
from unimedvl_core.io import slide_positions
from unimedvl_core.io.medical_io import (
    ImageReadError,
    dicom_image_headers,
    read_image,
    read_key_slices,
    read_slices,
)
from unimedvl_core.io.slide import SlideSelection, read_slide

REGION = (100, 200, 900, 700)  # level-0 x, y, width, height: partial tiles on every side
RAW = {
    "full": {"encoding": "raw"},
    "sparse_concatenated_planes": {"encoding": "raw", "organization": "TILED_SPARSE", "concatenate": 1,
                                   "focal_planes": 3},
    "full_planes_paths_concatenated": {"encoding": "raw", "focal_planes": 2, "optical_paths": 2, "concatenate": 0},
}
# JPEG quality 90, 4:2:2 chroma on 4-pixel texture and nuclei edges: measured mean absolute error against the
# unencoded truth 2.5 (level 0) to 4.5 (level 2) on this image; a misplaced tile or a YBR/RGB mix-up gives > 30.
JPEG_MEAN_ERROR = 6.0
# Against the same tiles decoded by Pillow to RGB: pydicom converts YCbCr to RGB itself, libjpeg-turbo with its
# own integer arithmetic and chroma upsampling; measured over 3 images x 3 levels: mean 0.18-0.29, 99.9th
# percentile <= 4, max 7 (at nuclei edges). A tile from the wrong frame or plane differs by tens on average.
JPEG_DECODER_MEAN, JPEG_DECODER_MAX = 0.5, 10


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    out = {name: build_slide(root / name, **kwargs) for name, kwargs in RAW.items()}
    out["jpeg"] = build_slide(root / "jpeg")
    out["declared"] = build_declared_slide(root / "declared")
    return out


def _truth(truth, image):
    where = image.geometry["slide_region"]
    return truth.levels[where.level][where.row:where.row + where.rows, where.column:where.column + where.columns]


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and PATIENT_NAME.split("^")[0] not in text and "P-7781" not in text
    return text


@pytest.mark.parametrize("name", sorted(RAW))
@pytest.mark.parametrize("level", [0, 1, 2])
def test_uncompressed_region_equals_truth_at_every_level(slides, name, level):
    image = read_slide(slides[name].folder, SlideSelection(region=REGION, level=level))
    where = image.geometry["slide_region"]
    assert (where.row, where.column, where.level_count) == (200 // 2**level, 100 // 2**level, 3)
    assert image.pixels.shape == (700 // 2**level, 900 // 2**level, 3)
    assert np.array_equal(image.pixels, _truth(slides[name], image))
    assert where.spacing_mm == slides[name].spacings[level] == image.geometry["pixel_spacing"]
    assert image.modality == "SM" and image.num_frames == 1 and image.frame is None


def _pillow_level(path, truth_level, tile):
    """The level's tiles decoded by Pillow and placed on the grid: an independent decode of the same bytes."""
    ds = pydicom.dcmread(path)
    rows, cols = truth_level.shape[:2]
    across = -(-cols // tile)
    out = np.zeros((-(-rows // tile) * tile, across * tile, 3), np.uint8)
    for k, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames))):
        r, c = divmod(k, across)
        out[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = np.asarray(Image.open(io.BytesIO(frame)).convert("RGB"))
    return out[:rows, :cols]


@pytest.mark.parametrize("level", [0, 1, 2])
def test_jpeg_ybr_tiles_come_out_as_rgb_close_to_truth(slides, level):
    truth = slides["jpeg"]
    image = read_slide(truth.folder, SlideSelection(region=REGION, level=level))
    error = np.abs(image.pixels.astype(int) - _truth(truth, image))
    assert error.mean() < JPEG_MEAN_ERROR
    where = image.geometry["slide_region"]
    pillow = _pillow_level(truth.volume_files[level][0], truth.levels[level], truth.tile)
    region = pillow[where.row:where.row + where.rows, where.column:where.column + where.columns]
    difference = np.abs(image.pixels.astype(int) - region)
    assert difference.mean() < JPEG_DECODER_MEAN and difference.max() <= JPEG_DECODER_MAX


def test_sparse_and_concatenation_give_the_pixels_of_tiled_full(slides):
    full = read_slide(slides["full"].folder, SlideSelection(level=1))
    for name in ("sparse_concatenated_planes", "full_planes_paths_concatenated"):
        assert np.array_equal(read_slide(slides[name].folder, SlideSelection(level=1)).pixels, full.pixels)


def test_automatic_level_by_max_pixels_and_min_side(slides):
    folder = slides["full"].folder
    assert read_slide(folder).geometry["slide_region"].level == 0           # 1500 x 1100 fits
    assert read_slide(folder, SlideSelection(max_pixels=600 * 500)).geometry["slide_region"].level == 2
    assert read_slide(folder, SlideSelection(max_pixels=750 * 550)).geometry["slide_region"].level == 1
    region = (0, 0, 800, 800)   # long side 800, 400, 200 at levels 0, 1, 2
    assert read_slide(folder, SlideSelection(region, min_side=400)).geometry["slide_region"].level == 1
    assert read_slide(folder, SlideSelection(region, min_side=401)).geometry["slide_region"].level == 0
    assert read_slide(folder, SlideSelection(region, min_side=100)).geometry["slide_region"].level == 2
    assert read_slide(folder, SlideSelection(region, min_side=5000)).geometry["slide_region"].level == 0


def test_region_is_clipped_to_the_slide(slides):
    truth = slides["full"]
    image = read_slide(truth.folder, SlideSelection(region=(1400, -50, 500, 150), level=0))
    assert image.pixels.shape == (100, 100, 3)
    assert np.array_equal(image.pixels, truth.levels[0][:100, 1400:])


def _counting(monkeypatch) -> list[int]:
    decoded: list[int] = []
    original = slide_io.decode_frames

    def counted(source, indices):
        for frame in original(source, indices):
            decoded.append(1)
            yield frame
    monkeypatch.setattr(slide_io, "decode_frames", counted)
    return decoded


def test_declared_real_size_slide_decodes_only_the_needed_tiles(slides, monkeypatch):
    truth = slides["declared"]
    decoded = _counting(monkeypatch)
    x, y = truth.tile_origin
    # 100 px left of and 50 px above the held 3 x 3 tiles: 3 x 3 tile positions met, 2 x 2 of them held
    image = read_slide(truth.folder, SlideSelection(region=(x - 100, y - 50, 600, 500), level=0))
    assert len(decoded) == 4
    assert (image.pixels[:50] == slide_io.BACKGROUND).all() and (image.pixels[:, :100] == slide_io.BACKGROUND).all()
    assert np.abs(image.pixels[50:, 100:].astype(int) - truth.levels[0][:450, :500]).mean() < JPEG_MEAN_ERROR
    decoded.clear()
    empty = read_slide(truth.folder, SlideSelection(region=(1000, 1000, 2048, 2048), level=0))
    assert not decoded and (empty.pixels == slide_io.BACKGROUND).all()


def test_declared_slide_whole_is_read_at_the_level_that_fits(slides, monkeypatch):
    truth = slides["declared"]
    decoded = _counting(monkeypatch)
    image = read_image(truth.folder)
    where = image.geometry["slide_region"]
    assert (where.level, where.columns, where.rows) == (1, DECLARED_SIZE[0] // 64, DECLARED_SIZE[1] // 64)
    assert len(decoded) == truth.frame_counts[1]
    with pytest.raises(ImageReadError) as err:
        read_slide(truth.folder, SlideSelection(level=0))
    text = _one_line(err)
    assert "98304x75264" in text and "--region" in text and "--level" in text
    assert not decoded[truth.frame_counts[1]:]  # refused before decoding anything


def test_label_and_overview_are_never_read(slides):
    truth = slides["jpeg"]
    headers = [header for _, header in dicom_image_headers(truth.folder)]
    assert sorted(h.ImageType[2] for h in headers) == ["THUMBNAIL", "VOLUME", "VOLUME", "VOLUME"]
    image = read_image(truth.folder)
    assert image.dataset.ImageType[2] == "VOLUME" and "PixelData" not in image.dataset
    for path in (truth.label_file, truth.overview_file):
        with pytest.raises(ImageReadError) as err:
            read_image(path)
        assert path.name in _one_line(err) and "patient identity" in str(err.value)


def test_a_thumbnail_alone_is_a_one_level_slide(slides):
    image = read_image(slides["jpeg"].thumbnail_file)
    assert image.geometry["slide_region"].level_count == 1 and image.pixels.shape == (138, 188, 3)


def test_medical_io_gives_one_image_per_slide(slides):
    truth = slides["full"]
    assert len(read_slices(truth.folder)) == 1
    assert len(read_key_slices(truth.folder, 5, slide=SlideSelection(level=2))) == 1
    level1 = read_image(truth.volume_files[1][0])  # one instance: a one-level slide
    assert np.array_equal(level1.pixels, truth.levels[1]) and level1.source == "level1.dcm"
    # a dataset alone is a one-level slide: the region is in its own pixels
    from_dataset = read_image(pydicom.dcmread(truth.volume_files[2][0]), slide=SlideSelection(region=REGION))
    assert np.array_equal(from_dataset.pixels, truth.levels[2][200:, 100:1000])
    image = read_image(truth.folder, slide=SlideSelection(region=REGION, level=1))
    assert read_key_slices(image, 3) == [image]


@pytest.mark.parametrize("selection, problem", [
    (SlideSelection(region=(0, 0, 0, 10)), "empty region"),
    (SlideSelection(region=(0, 0, -5, 10)), "empty region"),
    (SlideSelection(region=(5000, 0, 10, 10)), "outside the slide"),
    (SlideSelection(level=3), "no level 3"),
    (SlideSelection(level=-1), "no level -1"),
    (SlideSelection(max_pixels=50_000), "exceeds the limit"),
])
def test_errors_are_one_line_without_patient_data(slides, selection, problem):
    with pytest.raises(ImageReadError) as err:
        read_image(slides["full"].folder, slide=selection)
    assert problem in _one_line(err)


def test_one_part_of_a_concatenation_is_refused(slides):
    part = slides["sparse_concatenated_planes"].volume_files[1][0]
    with pytest.raises(ImageReadError) as err:
        read_image(part)
    assert "concatenation" in _one_line(err)


def test_datasets_in_memory_make_the_same_slide(slides):
    """As the MONAI Deploy loader hands them: whole datasets of every instance, the label among them."""
    truth = slides["sparse_concatenated_planes"]
    datasets = [pydicom.dcmread(path) for path in sorted(truth.folder.glob("*.dcm"))]
    image = slide_io.slide_from_headers([(ds, ds) for ds in datasets], "slide", SlideSelection(REGION, level=1))
    assert np.array_equal(image.pixels, _truth(truth, image))


def test_a_header_read_without_pixels_is_decoded_from_its_file(slides):
    truth = slides["jpeg"]
    header = pydicom.dcmread(truth.volume_files[0][0], stop_before_pixels=True)
    image = read_slide(header, SlideSelection(REGION))
    assert np.abs(image.pixels.astype(int) - _truth(truth, image)).mean() < JPEG_MEAN_ERROR


# ----------------------------------------------------------------------------------------------------------
# Grey (fluorescence) slides: stored values assembled, then one mapping for the region (docs/medical-io.md)

GREY = {
    "grey16_full": {"bits": 16},
    "grey16_sparse_concatenated_planes": {"bits": 16, "organization": "TILED_SPARSE", "concatenate": 1,
                                          "focal_planes": 3},
    "grey8_full_paths_concatenated": {"bits": 8, "optical_paths": 2, "concatenate": 0},
    "grey16_monochrome1": {"bits": 16, "photometric": "MONOCHROME1"},
    "grey16_window": {"bits": 16, "window": (14000.0, 12000.0)},
}
# highdicom's test files (real-encoding slide examples) are not in its wheel: set HIGHDICOM_TEST_FILES to the
# data/test_files folder of a highdicom checkout to run the tests that read them
HIGHDICOM_TEST_FILES = os.environ.get("HIGHDICOM_TEST_FILES")


@pytest.fixture(scope="module")
def grey_slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("grey_slides")
    return {name: build_slide(root / name, encoding="raw", extras=False,
                              **{"photometric": "MONOCHROME2", **kwargs}) for name, kwargs in GREY.items()}


def _full_range_of(values: np.ndarray) -> np.ndarray:
    """Stored values onto 0..255 by their own minimum and maximum (no rescale in these files)."""
    low, high = float(values.min()), float(values.max())
    return np.clip(np.rint((values.astype(np.float64) - low) * 255.0 / (high - low)), 0, 255).astype(np.uint8)


def _linear_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1, LINEAR, onto 0..255."""
    x = values.astype(np.float64)
    y = ((x - (centre - 0.5)) / (width - 1) + 0.5) * 255.0
    y = np.where(x <= centre - 0.5 - (width - 1) / 2, 0.0, np.where(x > centre - 0.5 + (width - 1) / 2, 255.0, y))
    return np.rint(y).astype(np.uint8)


def _grey(image) -> np.ndarray:
    assert image.pixels.dtype == np.uint8 and image.pixels.shape[2] == 3
    assert (image.pixels == image.pixels[..., :1]).all()  # grey -> RGB: three equal channels
    return image.pixels[..., 0]


@pytest.mark.parametrize("name", ["grey16_full", "grey16_sparse_concatenated_planes", "grey8_full_paths_concatenated"])
@pytest.mark.parametrize("level", [0, 2])
def test_grey_region_is_its_stored_values_over_their_full_range(grey_slides, name, level):
    truth = grey_slides[name]
    image = read_slide(truth.folder, SlideSelection(region=REGION, level=level))
    values = _truth(truth, image)
    assert values.dtype == (np.uint8 if "grey8" in name else np.uint16)
    assert np.array_equal(_grey(image), _full_range_of(values))
    assert image.value_range == (float(values.min()), float(values.max())) and image.window is None
    assert image.pixels.shape[:2] == values.shape


def test_grey_tiles_share_one_mapping(grey_slides):
    """Four tiles of rising brightness (the illumination rises to the right): one mapping for all, so the dim
    tiles stay dim; each tile read alone is stretched to its own range."""
    truth = grey_slides["grey16_full"]
    region = (0, 256, 1024, 256)  # level-0 tiles (1, 0) .. (1, 3)
    image = read_slide(truth.folder, SlideSelection(region=region, level=0))
    grey, values = _grey(image), truth.levels[0][256:512, :1024]
    order = np.argsort(values, axis=None, kind="stable")
    assert (np.diff(grey.ravel()[order].astype(int)) >= 0).all()  # one non-decreasing function of the values
    tile_maxima = [int(grey[:, 256 * k:256 * (k + 1)].max()) for k in range(4)]
    assert tile_maxima == sorted(tile_maxima) and tile_maxima[0] < 200 and tile_maxima[3] == 255
    alone = read_slide(truth.folder, SlideSelection(region=(0, 256, 256, 256), level=0))
    assert _grey(alone).max() == 255 and _grey(alone).min() == 0


def test_monochrome1_is_inverted(grey_slides):
    truth = grey_slides["grey16_monochrome1"]
    image = read_slide(truth.folder, SlideSelection(region=REGION, level=1))
    values = _truth(truth, image)
    assert np.array_equal(_grey(image), 255 - _full_range_of(values))
    assert image.value_range == (float(values.min()), float(values.max()))


def test_grey_window_from_the_file_then_the_callers(grey_slides):
    truth = grey_slides["grey16_window"]
    image = read_image(truth.folder, slide=SlideSelection(region=REGION, level=0))
    values = _truth(truth, image)
    assert np.array_equal(_grey(image), _linear_window(values, 14000.0, 12000.0))
    assert image.window == (14000.0, 12000.0) and image.value_range == (8000.0, 20000.0)
    # the same window in the shared functional groups (Frame VOI LUT) of a dataset in memory
    ds = pydicom.dcmread(truth.volume_files[0][0])
    voi = pydicom.Dataset()
    voi.WindowCenter, voi.WindowWidth = ds.WindowCenter, ds.WindowWidth
    del ds.WindowCenter, ds.WindowWidth
    ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence = pydicom.Sequence([voi])
    assert np.array_equal(read_slide(ds, SlideSelection(region=REGION)).pixels, image.pixels)
    callers = read_image(truth.folder, window=(30000.0, 20000.0), slide=SlideSelection(region=REGION, level=0))
    assert np.array_equal(_grey(callers), _linear_window(values, 30000.0, 20000.0)) and callers.window == (30000, 20000)


def _without_top_left_tile(path) -> pydicom.Dataset:
    """A TILED_SPARSE level in memory without its top-left tile (written last: tiles are in reverse order)."""
    ds = pydicom.dcmread(path)
    frames = int(ds.NumberOfFrames)
    frame_bytes = len(ds.PixelData) // frames
    ds.PixelData = ds.PixelData[:frame_bytes * (frames - 1)]
    ds.NumberOfFrames = frames - 1
    ds.PerFrameFunctionalGroupsSequence = pydicom.Sequence(list(ds.PerFrameFunctionalGroupsSequence)[:-1])
    position = ds.PerFrameFunctionalGroupsSequence[-1].PlanePositionSlideSequence[0]
    assert (position.RowPositionInTotalImagePixelMatrix, position.ColumnPositionInTotalImagePixelMatrix) != (1, 1)
    return ds


def test_missing_grey_tiles_are_dark_and_leave_the_range_alone(tmp_path):
    truth = build_slide(tmp_path / "sparse", encoding="raw", organization="TILED_SPARSE", photometric="MONOCHROME2",
                        bits=16, extras=False, levels=1, size=(700, 600))
    ds = _without_top_left_tile(truth.volume_files[0][0])
    image = read_slide(ds, SlideSelection(region=(100, 100, 400, 300)))
    grey, values = _grey(image), truth.levels[0][100:400, 100:500]
    assert (grey[:156, :156] == slide_io.DARK_BACKGROUND).all()
    held = np.ones(values.shape, bool)
    held[:156, :156] = False
    assert np.array_equal(grey[held], _full_range_of(values[held]))  # the range of the held tiles only
    assert image.value_range == (float(values[held].min()), float(values[held].max()))
    nothing = read_slide(ds, SlideSelection(region=(0, 0, 200, 200)))
    assert (nothing.pixels == slide_io.DARK_BACKGROUND).all() and nothing.value_range is None
    # a grey brightfield scan shows its missing tiles as white glass
    ds.OpticalPathSequence[0].IlluminationTypeCodeSequence[0].CodeValue = "111744"
    assert (read_slide(ds, SlideSelection(region=(0, 0, 200, 200))).pixels == slide_io.BACKGROUND).all()


@pytest.mark.parametrize("name", ["sm_image_grayscale", "sm_image_grayscale_reversed"])
def test_real_highdicom_grey_slides(name, tmp_path):
    """highdicom's 16-bit MONOCHROME2 epifluorescence test slides: 5 x 5 tiles of 10 x 10, TILED_FULL, each
    frame one value (0..24, or 24..0 reversed)."""
    path = Path(HIGHDICOM_TEST_FILES or "") / f"{name}.dcm"
    if not HIGHDICOM_TEST_FILES or not path.is_file():
        pytest.skip("HIGHDICOM_TEST_FILES (a highdicom checkout's data/test_files) not set or without the file")
    frames = pydicom.dcmread(path).pixel_array  # (25, 10, 10) uint16, independent of the reader
    stored = frames.reshape(5, 5, 10, 10).swapaxes(1, 2).reshape(50, 50)
    image = read_image(path)
    assert np.array_equal(_grey(image), _full_range_of(stored)) and image.value_range == (0.0, 24.0)
    corner = read_slide(path, SlideSelection(region=(5, 5, 10, 10)))  # over four tiles
    assert np.array_equal(_grey(corner), _full_range_of(stored[5:15, 5:15]))


# ----------------------------------------------------------------------------------------------------------
# Tile positions, focal planes and optical paths as scanners write them; label flags; decode errors

SMALL = {"size": (600, 500), "levels": 1, "encoding": "raw", "extras": False}  # 3 x 2 tiles of 256


def _edit(path, change) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def _positions(ds):
    return [group.PlanePositionSlideSequence[0] for group in ds.PerFrameFunctionalGroupsSequence]


def test_one_plane_sparse_level_keeps_tiles_whatever_their_z(tmp_path):
    """A scanner recording each tile's own autofocus height as its Z offset on a level of one focal plane."""
    truth = build_slide(tmp_path / "slide", organization="TILED_SPARSE", **SMALL)

    def autofocus(ds):
        assert ds.TotalPixelMatrixFocalPlanes == 1
        for i, position in enumerate(_positions(ds)):
            position.ZOffsetInSlideCoordinateSystem = round(0.0015 + 0.0001 * i, 7)
    _edit(truth.volume_files[0][0], autofocus)
    assert np.array_equal(read_slide(truth.folder).pixels, truth.levels[0])
    _edit(truth.volume_files[0][0], lambda ds: ds.__delattr__("TotalPixelMatrixFocalPlanes"))  # absent: one plane
    assert np.array_equal(read_slide(truth.folder).pixels, truth.levels[0])


def test_sparse_focal_plane_is_chosen_per_tile(tmp_path):
    """Three planes (nominal Z 0, +/- 1 um) whose heights follow the tissue: each tile's planes shifted by up to
    0.4 um, so only one tile has a plane at exactly Z 0, yet every tile's nominal plane is its nearest to 0."""
    truth = build_slide(tmp_path / "slide", organization="TILED_SPARSE", focal_planes=3, **SMALL)

    def tilted(ds):
        for position in _positions(ds):
            row, column = position.RowPositionInTotalImagePixelMatrix, position.ColumnPositionInTotalImagePixelMatrix
            tile = (row // 256) * 3 + column // 256
            position.ZOffsetInSlideCoordinateSystem = round(float(position.ZOffsetInSlideCoordinateSystem)
                                                            + 0.00008 * tile, 7)
    _edit(truth.volume_files[0][0], tilted)
    assert np.array_equal(read_slide(truth.folder).pixels, truth.levels[0])


def test_frame_positions_are_used_when_the_organization_type_is_absent(tmp_path):
    """Older files: no Dimension Organization Type; per-frame positions (tiles in reverse order) are used, and a
    level without them is in TILED_FULL order."""
    sparse = build_slide(tmp_path / "sparse", organization="TILED_SPARSE", **SMALL)
    full = build_slide(tmp_path / "full", **SMALL)
    for truth in (sparse, full):
        _edit(truth.volume_files[0][0], lambda ds: ds.__delattr__("DimensionOrganizationType"))
        assert np.array_equal(read_slide(truth.folder).pixels, truth.levels[0])


def _copy_instance(source, target, change) -> None:
    """Another instance of the same level (new SOP Instance UID) holding the inverted image."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.PixelData = (np.iinfo(ds.pixel_array.dtype).max - ds.pixel_array).astype(ds.pixel_array.dtype).tobytes()
    change(ds)
    ds.save_as(target)


def _second_channel(ds) -> None:
    ds.OpticalPathSequence[0].OpticalPathIdentifier = "2"
    ds.OpticalPathSequence[0].IlluminationWaveLength = 488.0
    ds.SharedFunctionalGroupsSequence[0].OpticalPathIdentificationSequence[0].OpticalPathIdentifier = "2"


@pytest.mark.parametrize("names", [("a_level0_ch2.dcm", "z_level1_ch2.dcm"), ("z_level0_ch2.dcm", "a_level1_ch2.dcm")])
def test_optical_paths_stored_apart_give_the_same_path_at_every_level(tmp_path, names):
    truth = build_slide(tmp_path / "slide", size=(600, 500), levels=2, encoding="raw", photometric="MONOCHROME2",
                        extras=False)
    for level, name in enumerate(names):
        _copy_instance(truth.volume_files[level][0], truth.folder / name, _second_channel)
    for level in (0, 1):
        image = read_slide(truth.folder, SlideSelection(level=level))
        assert image.dataset.OpticalPathSequence[0].OpticalPathIdentifier == "1"
        assert image.geometry["slide_region"].level_count == 2
        assert np.array_equal(_grey(image), _full_range_of(truth.levels[level]))


def test_focal_planes_stored_apart_give_the_plane_nearest_z0(tmp_path):
    truth = build_slide(tmp_path / "slide", **SMALL)

    def deeper(ds):
        ds.TotalPixelMatrixOriginSequence[0].ZOffsetInSlideCoordinateSystem = 0.002
    _copy_instance(truth.volume_files[0][0], truth.folder / "a_plane_2um.dcm", deeper)
    _edit(truth.volume_files[0][0],
          lambda ds: setattr(ds.TotalPixelMatrixOriginSequence[0], "ZOffsetInSlideCoordinateSystem", -0.0005))
    assert np.array_equal(read_slide(truth.folder).pixels, truth.levels[0])


def test_tiled_full_z_stack_takes_the_plane_nearest_z0(tmp_path):
    """Plane 0 (the image) at the origin's Z -1 um, plane 1 (inverted) one Spacing Between Slices (1 um) above:
    at Z 0, so it is the nominal plane, as for a sparse level; with no Z stated, the first plane."""
    truth = build_slide(tmp_path / "slide", focal_planes=2, **SMALL)
    assert np.array_equal(read_slide(truth.folder).pixels, truth.levels[0])
    _edit(truth.volume_files[0][0],
          lambda ds: setattr(ds.TotalPixelMatrixOriginSequence[0], "ZOffsetInSlideCoordinateSystem", -0.001))
    assert np.array_equal(read_slide(truth.folder).pixels, 255 - truth.levels[0])


def test_corrupt_tile_is_one_line_without_a_codec_hint(tmp_path, monkeypatch):
    truth = build_slide(tmp_path / "slide", size=(600, 500), levels=1, extras=False)

    def damaged(ds):
        frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
        frames[0] = frames[0][:40] + b"\x00" * 10 + frames[0][200:300]
        ds.PixelData = pydicom.encaps.encapsulate(frames)
    _edit(truth.volume_files[0][0], damaged)
    with pytest.raises(ImageReadError) as err:
        read_slide(truth.folder, SlideSelection(region=(0, 0, 100, 100)))
    assert "cannot decode slide tiles" in _one_line(err) and "install" not in str(err.value)
    # pydicom finding no usable decoder for the transfer syntax: then the hint
    from pydicom.pixels import get_decoder
    monkeypatch.setattr(get_decoder(pydicom.uid.JPEGBaseline8Bit), "_available", {})
    with pytest.raises(ImageReadError) as err:
        read_slide(truth.folder, SlideSelection(region=(300, 300, 100, 100)))
    assert "missing dependencies" in _one_line(err) and "unimedvl-core[dicom-codecs]" in str(err.value)


@pytest.mark.parametrize("flag", ["SpecimenLabelInImage", "BurnedInAnnotation"])
def test_instances_flagged_as_showing_the_label_are_never_read(tmp_path, flag, caplog):
    truth = build_slide(tmp_path / "slide", size=(600, 500), levels=2)
    for path in (truth.thumbnail_file, truth.volume_files[1][0]):
        _edit(path, lambda ds: setattr(ds, flag, "YES"))
    with caplog.at_level("INFO"):
        listed = [path.name for path, _ in dicom_image_headers(truth.folder)]
    assert listed == ["level0.dcm"]
    assert "thumbnail.dcm" in caplog.text and PATIENT_NAME.split("^")[0] not in caplog.text
    for path in (truth.thumbnail_file, truth.volume_files[1][0]):
        with pytest.raises(ImageReadError) as err:
            read_image(path)
        assert path.name in _one_line(err) and "patient identity" in str(err.value)
    image = read_image(truth.folder)
    assert image.geometry["slide_region"].level_count == 1
    datasets = [pydicom.dcmread(path) for path in sorted(truth.folder.glob("*.dcm"))]
    in_memory = slide_io.slide_from_headers([(ds, ds) for ds in datasets], "slide")
    assert in_memory.geometry["slide_region"].level_count == 1


def test_a_folder_of_a_thumbnail_only_is_a_one_level_slide(slides, tmp_path):
    folder = tmp_path / "thumbnail_only"
    folder.mkdir()
    (folder / "thumbnail.dcm").write_bytes(slides["jpeg"].thumbnail_file.read_bytes())
    image = read_image(folder)
    assert image.geometry["slide_region"].level_count == 1
    assert np.array_equal(image.pixels, read_image(slides["jpeg"].thumbnail_file).pixels)


def test_an_image_type_of_two_values_is_a_volume(tmp_path):
    truth = build_slide(tmp_path / "slide", size=(600, 500), levels=2, encoding="raw", extras=False)
    _edit(truth.volume_files[1][0], lambda ds: setattr(ds, "ImageType", ["DERIVED", "PRIMARY"]))
    image = read_slide(truth.folder, SlideSelection(level=1))
    assert image.geometry["slide_region"].level_count == 2 and np.array_equal(image.pixels, truth.levels[1])
    assert np.array_equal(read_image(truth.volume_files[1][0]).pixels, truth.levels[1])


# ----------------------------------------------------------------------------------------------------------
# Tile positions scanned from the per-frame groups as read, against pydicom's decoding of them; the level cache


def _resave(path, syntax, undefined_items: bool = False) -> None:
    """Rewrite an instance in another transfer syntax; ``undefined_items``: every item and nested sequence of
    undefined length, with delimiters, as some scanners write (the per-frame sequence itself keeps its length:
    pydicom decodes an undefined-length sequence while reading the file)."""
    ds = pydicom.dcmread(path)
    for element in ds.iterall():
        if element.VR == "SQ":
            element.is_undefined_length = undefined_items and element.tag != 0x52009230
            for item in element.value:
                item.is_undefined_length_sequence_item = undefined_items
    ds.file_meta.TransferSyntaxUID = syntax
    if syntax.is_little_endian:
        ds.save_as(path, enforce_file_format=True)
    else:  # pydicom converts to big endian only when forced
        pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False, force_encoding=True)


def _per_frame_paths(ds) -> None:
    """A second optical path stored in the same instance, its (inverted) frames first, each frame naming its
    path in its own Optical Path Identification, so a reader must select by those."""
    second = pydicom.Dataset()
    second.update(ds.OpticalPathSequence[0])
    second.OpticalPathIdentifier = "2"
    ds.OpticalPathSequence.append(second)
    ds.NumberOfOpticalPaths = 2
    del ds.SharedFunctionalGroupsSequence[0].OpticalPathIdentificationSequence
    groups = []
    for path in ("2", "1"):
        for group in pydicom.dcmread(ds.filename).PerFrameFunctionalGroupsSequence:
            identification = pydicom.Dataset()
            identification.OpticalPathIdentifier = path
            group.OpticalPathIdentificationSequence = pydicom.Sequence([identification])
            groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = pydicom.Sequence(groups)
    frames = ds.pixel_array
    ds.PixelData = np.concatenate([255 - frames, frames]).tobytes()
    ds.NumberOfFrames = 2 * len(frames)


SPARSE = dict(SMALL, organization="TILED_SPARSE")
# scanned: one focal plane and no per-frame optical path, the one layout the scan reads
SCANNED_KINDS = {
    "sparse": ({}, None),
    "concatenated": ({"levels": 2, "concatenate": 0}, None),
    "implicit_vr": ({}, lambda path: _resave(path, pydicom.uid.ImplicitVRLittleEndian)),
    "undefined_items": ({}, lambda path: _resave(path, pydicom.uid.ExplicitVRLittleEndian, True)),
    "implicit_undefined_items": ({}, lambda path: _resave(path, pydicom.uid.ImplicitVRLittleEndian, True)),
}
# decoded by pydicom whatever their bytes: several focal planes, per-frame optical paths (docs/medical-io.md)
DECODED_KINDS = {
    "focal_planes": ({"focal_planes": 3}, None),
    "implicit_focal_planes": ({"focal_planes": 2},
                              lambda path: _resave(path, pydicom.uid.ImplicitVRLittleEndian, True)),
    "optical_paths": ({}, lambda path: _edit(path, _per_frame_paths)),
}


@pytest.fixture(scope="module")
def scanned_slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("scanned")
    out = {}
    for kind, (options, change) in {**SCANNED_KINDS, **DECODED_KINDS}.items():
        out[kind] = build_slide(root / kind, **dict(SPARSE, **options))
        for path in out[kind].volume_files[0]:
            if change:
                change(path)
    out["declared"] = build_declared_slide(root / "declared")
    return out


def _parts(files) -> list:
    """The level's instances as the reader gets them: headers read without pixels, per-frame groups undecoded."""
    return sorted((slide_io._part(path, pydicom.dcmread(path, stop_before_pixels=True), path.name) for path in files),
                  key=lambda part: part.offset)


def _decoded_tiles(files, monkeypatch) -> np.ndarray:
    with monkeypatch.context() as patch:
        patch.setattr(slide_io, "_scanned_frame_positions", lambda parts: None)
        return slide_io._sparse_tiles(_parts(files), "slide")


@pytest.mark.parametrize("kind", [*SCANNED_KINDS, "declared"])
def test_scanned_tile_positions_are_exactly_the_decoded_ones(scanned_slides, kind, monkeypatch):
    truth = scanned_slides[kind]
    files = truth.volume_files[0]
    scanned = slide_io._scanned_frame_positions(_parts(files))
    assert scanned is not None  # the scan was sure of every frame
    decoded = slide_io._frame_positions(_parts(files), "slide")
    for which in range(4):
        assert np.array_equal(scanned[which], decoded[which]) and scanned[which].dtype == decoded[which].dtype
    assert len(scanned[0]) == truth.frame_counts[0]
    tiles = slide_io._sparse_tiles(_parts(files), "slide")
    assert np.array_equal(tiles, _decoded_tiles(files, monkeypatch))
    assert len(tiles) == (9 if kind == "declared" else 6)  # one frame per tile position
    if kind != "declared":
        assert np.array_equal(read_slide(truth.folder, SlideSelection(level=0)).pixels, truth.levels[0])


@pytest.mark.parametrize("kind", DECODED_KINDS)
def test_several_planes_or_per_frame_paths_are_decoded_by_pydicom(scanned_slides, kind):
    truth = scanned_slides[kind]
    assert slide_io._scanned_frame_positions(_parts(truth.volume_files[0])) is None
    assert np.array_equal(read_slide(truth.folder, SlideSelection(level=0)).pixels, truth.levels[0])


def _rows_of_top_tiles_shared(ds) -> None:
    """The top row of tiles takes its Row Position from the shared groups, not its own."""
    shared = pydicom.Dataset()
    shared.RowPositionInTotalImagePixelMatrix = 1
    ds.SharedFunctionalGroupsSequence[0].PlanePositionSlideSequence = pydicom.Sequence([shared])
    for position in _positions(ds):
        if position.RowPositionInTotalImagePixelMatrix == 1:
            del position.RowPositionInTotalImagePixelMatrix


def _row_elsewhere_too(ds) -> None:
    """A Row Position where it is not the frame's: inside the first frame's Frame Content item."""
    ds.PerFrameFunctionalGroupsSequence[0].FrameContentSequence[0].RowPositionInTotalImagePixelMatrix = 9999


def _as_many_rows_but_not_one_per_frame(ds) -> None:
    """Six Row Positions for six frames, but two in each bottom tile's frame and none in the top tiles' own."""
    _rows_of_top_tiles_shared(ds)
    for group in ds.PerFrameFunctionalGroupsSequence[:3]:
        group.FrameContentSequence[0].RowPositionInTotalImagePixelMatrix = 9999


def _private(group, element: int, vr: str, value) -> None:
    group.add_new(0x00290010, "LO", "ACME")
    group.add_new(0x00291000 | element, vr, value)


def _path_bytes_in_a_private_ob(ds) -> None:
    """(0048,0106) bytes inside a private OB value of each frame; the frames state no optical path."""
    for group in ds.PerFrameFunctionalGroupsSequence:
        _private(group, 1, "OB", b"\x48\x00\x06\x01SH\x02\x002 ")


def _path_in_a_private_sequence(ds) -> None:
    for group in ds.PerFrameFunctionalGroupsSequence:
        inner = pydicom.Dataset()
        inner.OpticalPathIdentifier = "2"
        _private(group, 2, "SQ", pydicom.Sequence([inner]))


def _path_in_a_source_image_item(ds) -> None:
    for group in ds.PerFrameFunctionalGroupsSequence:
        source = pydicom.Dataset()
        source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = ds.SOPClassUID, "1.2.3"
        source.OpticalPathIdentifier = "2"
        derivation = pydicom.Dataset()
        derivation.SourceImageSequence = pydicom.Sequence([source])
        group.DerivationImageSequence = pydicom.Sequence([derivation])


def _positions_only_in_a_private_sequence(ds) -> None:
    """Each frame's Row and Column moved out of its Plane Position into a private sequence: pydicom has none."""
    for group, position in zip(ds.PerFrameFunctionalGroupsSequence, _positions(ds)):
        inner = pydicom.Dataset()
        inner.RowPositionInTotalImagePixelMatrix = position.RowPositionInTotalImagePixelMatrix
        inner.ColumnPositionInTotalImagePixelMatrix = position.ColumnPositionInTotalImagePixelMatrix
        del position.RowPositionInTotalImagePixelMatrix, position.ColumnPositionInTotalImagePixelMatrix
        _private(group, 2, "SQ", pydicom.Sequence([inner]))


def _positions_in_a_second_plane_position_item(ds) -> None:
    """Row and Column in the Plane Position's second item; pydicom reads the first, then the shared groups."""
    shared = pydicom.Dataset()
    shared.RowPositionInTotalImagePixelMatrix = shared.ColumnPositionInTotalImagePixelMatrix = 1
    ds.SharedFunctionalGroupsSequence[0].PlanePositionSlideSequence = pydicom.Sequence([shared])
    for group in ds.PerFrameFunctionalGroupsSequence:
        position = group.PlanePositionSlideSequence[0]
        second = pydicom.Dataset()
        second.RowPositionInTotalImagePixelMatrix = position.RowPositionInTotalImagePixelMatrix
        second.ColumnPositionInTotalImagePixelMatrix = position.ColumnPositionInTotalImagePixelMatrix
        del position.RowPositionInTotalImagePixelMatrix, position.ColumnPositionInTotalImagePixelMatrix
        group.PlanePositionSlideSequence.append(second)


def _positions_nested_in_the_plane_position(ds) -> None:
    """Row and Column inside a private sequence within the Plane Position item: not its own elements."""
    for position in _positions(ds):
        inner = pydicom.Dataset()
        inner.RowPositionInTotalImagePixelMatrix = position.RowPositionInTotalImagePixelMatrix
        inner.ColumnPositionInTotalImagePixelMatrix = position.ColumnPositionInTotalImagePixelMatrix
        del position.RowPositionInTotalImagePixelMatrix, position.ColumnPositionInTotalImagePixelMatrix
        _private(position, 2, "SQ", pydicom.Sequence([inner]))


@pytest.mark.parametrize("change, decoded", [
    (_rows_of_top_tiles_shared, "truth"),
    (_row_elsewhere_too, "truth"),
    (_as_many_rows_but_not_one_per_frame, "truth"),
    (_path_bytes_in_a_private_ob, "truth"),
    (_path_in_a_private_sequence, "truth"),
    (_path_in_a_source_image_item, "truth"),
    (_positions_only_in_a_private_sequence, ImageReadError),
    (_positions_in_a_second_plane_position_item, "stacked"),
    (_positions_nested_in_the_plane_position, ImageReadError),
    ("big_endian", "truth"),
])
def test_scan_refuses_what_it_cannot_be_sure_of(tmp_path, change, decoded, monkeypatch):
    truth = build_slide(tmp_path / "slide", **SPARSE)
    files = truth.volume_files[0]
    if change == "big_endian":
        _resave(files[0], pydicom.uid.ExplicitVRBigEndian)
    else:
        _edit(files[0], change)
    assert slide_io._scanned_frame_positions(_parts(files)) is None
    if decoded is ImageReadError:  # pydicom's decoding has no position for a frame: refused, not guessed
        with pytest.raises(ImageReadError, match="has no tile position"):
            read_slide(truth.folder)
        return
    tiles = slide_io._sparse_tiles(_parts(files), "slide")
    assert np.array_equal(tiles, _decoded_tiles(files, monkeypatch))
    if decoded == "truth":
        assert np.array_equal(read_slide(truth.folder).pixels, truth.levels[0])
    else:  # every frame at the shared position (1, 1): one tile, the first frame
        assert tiles.tolist() == [[0, 0, 0]]


def _un_bytes(path, vr: bytes, length: bytes) -> None:
    """Every per-frame Optical Path Identifier rewritten in place with VR ``vr`` (UN or LO, as archives whose
    dictionary lacks the tag write it), lengths of the enclosing sequences kept right."""
    ds = pydicom.dcmread(path)
    for element in ds.iterall():
        if element.VR == "SQ":
            element.is_undefined_length = element.tag != 0x52009230
            for item in element.value:
                item.is_undefined_length_sequence_item = True
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    start = data.index(b"\x00\x52\x30\x92SQ\x00\x00") + 12
    end = start + int.from_bytes(data[start - 4:start], "little")
    body = data[start:end].replace(b"\x48\x00\x06\x01SH\x02\x00", b"\x48\x00\x06\x01" + vr + length)
    path.write_bytes(data[:start - 4] + len(body).to_bytes(4, "little") + body + data[end:])


@pytest.mark.parametrize("vr, length", [(b"SH", b"\x02\x00"), (b"LO", b"\x02\x00"),
                                        (b"UN", b"\x00\x00\x02\x00\x00\x00")])
def test_per_frame_paths_of_any_vr_are_decoded_by_pydicom(tmp_path, vr, length):
    """Two optical paths per tile, the frames naming theirs; path 2 (the inverted image) first."""
    truth = build_slide(tmp_path / "slide", **SPARSE)
    path = truth.volume_files[0][0]
    _edit(path, _per_frame_paths)
    _un_bytes(path, vr, length)
    assert pydicom.dcmread(path).PerFrameFunctionalGroupsSequence[0].OpticalPathIdentificationSequence[0] \
        .OpticalPathIdentifier == "2"
    assert slide_io._scanned_frame_positions(_parts([path])) is None
    assert np.array_equal(read_slide(truth.folder).pixels, truth.levels[0])


@pytest.mark.parametrize("identifier", [b"1 ", b"1\x00", b" 1", b"\x1b(B1 ", b"1\\2 "])
def test_per_frame_path_identifiers_of_any_form_are_decoded_by_pydicom(tmp_path, identifier):
    truth = build_slide(tmp_path / "slide", **SPARSE)

    def path_one(ds):
        for group in ds.PerFrameFunctionalGroupsSequence:
            item = pydicom.Dataset()
            item.add_new(0x00480106, "SH", identifier)
            group.OpticalPathIdentificationSequence = pydicom.Sequence([item])
    _edit(truth.volume_files[0][0], path_one)
    assert slide_io._scanned_frame_positions(_parts(truth.volume_files[0])) is None


def test_scan_refuses_per_frame_groups_already_decoded(scanned_slides):
    parts = _parts(scanned_slides["sparse"].volume_files[0])
    assert slide_io._scanned_frame_positions(parts) is not None
    assert len(parts[0].header.PerFrameFunctionalGroupsSequence) == 6  # decoded now, as an edit would
    assert slide_io._scanned_frame_positions(parts) is None


@pytest.fixture
def scans(monkeypatch):
    """Calls of the byte scan, with an empty cache of scanned positions."""
    monkeypatch.setattr(slide_positions, "_kept", OrderedDict())
    calls = []
    scan = slide_positions._scan
    monkeypatch.setattr(slide_positions, "_scan", lambda *args: calls.append(1) or scan(*args))
    return calls


def test_a_level_read_again_is_not_scanned_again(tmp_path, scans, monkeypatch):
    truth = build_slide(tmp_path / "slide", **SPARSE)
    first = read_slide(truth.folder)
    assert np.array_equal(read_slide(truth.folder, SlideSelection(region=(0, 0, 300, 300))).pixels,
                          first.pixels[:300, :300])
    path = truth.volume_files[0][0]
    read_slide(pydicom.dcmread(path))  # in memory: the same per-frame bytes
    assert len(scans) == 1
    _edit(path, _without_top_left_tile_positions)  # changed bytes are scanned again
    assert (read_slide(truth.folder).pixels[:256, :256] == slide_io.BACKGROUND).all() and len(scans) == 2
    decoded = pydicom.dcmread(path)
    decoded.PerFrameFunctionalGroupsSequence[0].PlanePositionSlideSequence[0].RowPositionInTotalImagePixelMatrix = 257
    read_slide(decoded)  # decoded (perhaps edited) groups: pydicom's values, nothing scanned or kept
    assert len(scans) == 2 and len(slide_positions._kept) == 2
    monkeypatch.setattr(slide_positions, "_KEPT", 2)
    for k in range(3):
        read_slide(build_slide(tmp_path / f"other{k}", **dict(SPARSE, size=(600 + 256 * k, 500))).folder)
    assert len(slide_positions._kept) == 2


def test_a_file_rewritten_in_place_with_the_same_size_and_time_is_read_anew(tmp_path, scans):
    truth = build_slide(tmp_path / "slide", **SPARSE)
    path = truth.volume_files[0][0]
    before = read_slide(truth.folder).pixels
    stat = path.stat()

    def swap_two_tiles(ds):
        one, two = _positions(ds)[:2]
        one.ColumnPositionInTotalImagePixelMatrix, two.ColumnPositionInTotalImagePixelMatrix = \
            two.ColumnPositionInTotalImagePixelMatrix, one.ColumnPositionInTotalImagePixelMatrix
    _edit(path, swap_two_tiles)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    after = read_slide(truth.folder).pixels
    assert len(scans) == 2 and not np.array_equal(before, after)
    assert np.array_equal(after, read_slide(pydicom.dcmread(path)).pixels)


def test_the_frames_of_the_shared_path_are_chosen_on_every_read(tmp_path, scans):
    """Two datasets with the same per-frame bytes, one whose shared groups name another optical path than
    its Optical Path Sequence's first: that one shows none of its frames, as pydicom's decoding gives."""
    truth = build_slide(tmp_path / "slide", **SPARSE)
    path = truth.volume_files[0][0]
    other = pydicom.dcmread(path)
    other.SharedFunctionalGroupsSequence[0].OpticalPathIdentificationSequence[0].OpticalPathIdentifier = "2"
    assert np.array_equal(read_slide(pydicom.dcmread(path)).pixels, truth.levels[0])
    assert (read_slide(other).pixels == slide_io.BACKGROUND).all() and len(scans) == 1


def test_scanned_positions_are_shared_safely_between_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(slide_positions, "_kept", OrderedDict())
    monkeypatch.setattr(slide_positions, "_KEPT", 2)
    truths = [build_slide(tmp_path / f"slide{k}", **dict(SPARSE, size=(600 + 256 * k, 500))) for k in range(4)]
    expected = [slide_io._sparse_tiles(_parts(truth.volume_files[0]), "slide") for truth in truths]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda k: slide_io._sparse_tiles(_parts(truths[k % 4].volume_files[0]), "slide"),
                            range(40)))
    assert all(np.array_equal(tiles, expected[k % 4]) for k, tiles in enumerate(got))
    assert len(slide_positions._kept) == 2


def _without_top_left_tile_positions(ds) -> None:
    """The top-left tile (written last) and its frame removed."""
    frames = int(ds.NumberOfFrames)
    ds.PixelData = ds.PixelData[:len(ds.PixelData) // frames * (frames - 1)]
    ds.NumberOfFrames = frames - 1
    ds.PerFrameFunctionalGroupsSequence = pydicom.Sequence(list(ds.PerFrameFunctionalGroupsSequence)[:-1])
