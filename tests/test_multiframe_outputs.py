"""Outputs of the frames of enhanced multi-frame CT and MR objects are classic single-frame CT/MR images with
each frame's plane geometry (docs/medical-io.md#geometry-of-dicom-outputs): a viewer places every output
pixel where the source frame's pixel lies. Sources: pydicom-data's Enhanced CT (eCT_Supplemental, real), an
Enhanced MR built from pydicom-data's emri_small (real pixels and pulse sequence) given a double-oblique
stack geometry with unequal row and column spacing, and Legacy Converted Enhanced CT and MR objects made by
highdicom from CT_small and MR_small slices; emri_small as published (no functional groups) stays a Secondary
Capture."""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage, generate_uid

from tests.conftest import dciodvfy_errors
from unimedvl_core.io.dicom_output import derived_image, write_dicom
from unimedvl_core.io.medical_io import frame_functional_groups, read_slices
from unimedvl_core.io.outputs import write_image_outputs
from unimedvl_core.io.synthetic import label_synthetic

WEIGHTS = "UniMedVL (ema.safetensors sha256:0123456789ab)"
MR_SPACING = (0.9, 0.75)  # between rows, between columns (mm): unequal, so a swap shows
MR_THICKNESS = 1.2


def _testdata(name: str) -> str:
    path = pydicom.data.get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name}: pydicom-data not installed")
    return path


def _item(**values) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _oblique_orientation() -> tuple[np.ndarray, np.ndarray]:
    """Row and column directions of a double-oblique plane (20 degrees about z, then 25 about x)."""
    a, b = np.radians(20), np.radians(25)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rotation = rx @ rz
    return rotation[:, 0], rotation[:, 1]


def _enhanced_mr(path) -> str:
    """emri_small with the functional groups an Enhanced MR scanner writes: shared orientation, pixel
    measures, rescale, timing and echo, frame type; per frame its position along the stack and a window."""
    ds = pydicom.dcmread(_testdata("emri_small.dcm"))
    row, col = _oblique_orientation()
    normal = np.cross(row, col)
    orientation = [round(float(v), 8) for v in (*row, *col)]
    shared = _item(
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=orientation)]),
        PixelMeasuresSequence=Sequence([_item(PixelSpacing=list(MR_SPACING), SliceThickness=MR_THICKNESS,
                                              SpacingBetweenSlices=MR_THICKNESS)]),
        PixelValueTransformationSequence=Sequence([_item(RescaleIntercept=0, RescaleSlope=1, RescaleType="US")]),
        MRTimingAndRelatedParametersSequence=Sequence([_item(RepetitionTime=8.1, FlipAngle=8.0,
                                                             EchoTrainLength=1)]),
        MREchoSequence=Sequence([_item(EffectiveEchoTime=3.7)]),
        MRImageFrameTypeSequence=Sequence([_item(FrameType=["ORIGINAL", "PRIMARY", "T1", "NONE"],
                                                 PixelPresentation="MONOCHROME", VolumetricProperties="VOLUME",
                                                 VolumeBasedCalculationTechnique="NONE",
                                                 ComplexImageComponent="MAGNITUDE", AcquisitionContrast="T1")]))
    first = np.array([-28.4, -51.7, 12.3])
    frames = []
    for k in range(int(ds.NumberOfFrames)):
        position = first + k * MR_THICKNESS * normal
        frames.append(_item(
            FrameContentSequence=Sequence([_item(StackID="1", InStackPositionNumber=k + 1,
                                                 DimensionIndexValues=[1, k + 1])]),
            PlanePositionSequence=Sequence([_item(ImagePositionPatient=[round(float(v), 6) for v in position])]),
            FrameVOILUTSequence=Sequence([_item(WindowCenter=600 + 10 * k, WindowWidth=1200)])))
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    organization = generate_uid()
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=organization)])
    ds.DimensionIndexSequence = Sequence([
        _item(DimensionOrganizationUID=organization, DimensionIndexPointer=tag, FunctionalGroupPointer=0x00209111)
        for tag in (0x00209056, 0x00209057)])
    ds.Manufacturer = "Philips"
    target = path / "enhanced_mr.dcm"
    ds.save_as(target, enforce_file_format=True)
    return str(target)


def _legacy_converted(path, modality: str) -> str:
    """A Legacy Converted Enhanced CT or MR made by highdicom from three CT_small or MR_small slices 5 mm
    apart, each with its own instance number."""
    import highdicom as hd

    base = pydicom.dcmread(_testdata(f"{modality}_small.dcm"))
    series, slices = generate_uid(), []
    for k in range(3):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = generate_uid(), series, k + 1
        x, y, z = (float(v) for v in base.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 5.0 * k]
        slices.append(ds)
    convert = {"CT": hd.legacy.LegacyConvertedEnhancedCTImage, "MR": hd.legacy.LegacyConvertedEnhancedMRImage}
    converted = convert[modality](slices, series_instance_uid=generate_uid(), series_number=5,
                                  sop_instance_uid=generate_uid(), instance_number=1)
    target = path / f"legacy_converted_{modality.lower()}.dcm"
    converted.save_as(target, enforce_file_format=True)
    return str(target)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("enhanced")
    return {"enhanced_ct": _testdata("eCT_Supplemental.dcm"), "enhanced_mr": _enhanced_mr(folder),
            "legacy_converted_ct": _legacy_converted(folder, "CT"),
            "legacy_converted_mr": _legacy_converted(folder, "MR")}


def _frame_plane(ds: Dataset, frame: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(position, orientation, spacing) of one frame, read directly from its functional groups."""
    def value(macro: str, keyword: str):
        for groups in (ds.PerFrameFunctionalGroupsSequence[frame], ds.SharedFunctionalGroupsSequence[0]):
            if macro in groups and keyword in groups[macro][0]:
                return np.array([float(v) for v in groups[macro][0][keyword].value])
        raise AssertionError(f"frame {frame} has no {keyword}")

    return (value("PlanePositionSequence", "ImagePositionPatient"),
            value("PlaneOrientationSequence", "ImageOrientationPatient"),
            value("PixelMeasuresSequence", "PixelSpacing"))


def _world(position, orientation, spacing, row: float, col: float) -> np.ndarray:
    """Patient coordinates (mm) of pixel (row, col) as a viewer computes them (PS3.3 C.7.6.2.1.1)."""
    return position + orientation[:3] * spacing[1] * col + orientation[3:] * spacing[0] * row


def _resized(pixels: np.ndarray, scale: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    return np.asarray(Image.fromarray(pixels).resize((width * scale, height * scale), Image.BICUBIC))


def _errors(path) -> set[str]:
    return {" ".join(line.split()) for line in dciodvfy_errors(path)}


@pytest.mark.parametrize("name", ["enhanced_ct", "enhanced_mr", "legacy_converted_ct", "legacy_converted_mr"])
@pytest.mark.parametrize("scale", [1, 2])
def test_each_frame_output_is_a_classic_image_on_the_frame_plane(sources, name, scale, tmp_path):
    source_path = sources[name]
    source = pydicom.dcmread(source_path)
    series = generate_uid()
    slices = read_slices(source_path)
    assert len(slices) == int(source.NumberOfFrames) > 1
    inherited = _errors(source_path)  # emri_small's own header has errors (see docs/medical-io.md#dciodvfy)
    for image in slices:
        pixels = _resized(image.pixels, scale)
        ds = derived_image(pixels, image, "super_resolution", f"x{scale}", series, 9900, image.frame + 1,
                           provenance=WEIGHTS)
        path = write_dicom(ds, tmp_path / f"{image.frame}.dcm")
        assert not _errors(path) - inherited, f"{name} frame {image.frame}: new dciodvfy errors"
        out = pydicom.dcmread(path)
        classic = MRImageStorage if name.endswith("_mr") else CTImageStorage
        assert out.SOPClassUID == classic and "NumberOfFrames" not in out
        assert "PerFrameFunctionalGroupsSequence" not in out and "SharedFunctionalGroupsSequence" not in out
        assert out.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert out.StudyInstanceUID == source.StudyInstanceUID and out.SeriesInstanceUID == series
        assert out.SyntheticData == "YES" and list(out.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert out.DerivationDescription.startswith("AI-generated (UniMedVL super_resolution)")
        reference = out.SourceImageSequence[0]
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert reference.ReferencedFrameNumber == image.frame + 1

        position, orientation, spacing = _frame_plane(source, image.frame)
        np.testing.assert_allclose([float(v) for v in out.ImageOrientationPatient], orientation, atol=1e-6)
        np.testing.assert_allclose([float(v) for v in out.PixelSpacing], spacing / scale, rtol=1e-6)
        assert float(out.SliceThickness) == pytest.approx(float(
            frame_functional_groups(source, image.frame).SliceThickness))
        if scale == 1:
            np.testing.assert_allclose([float(v) for v in out.ImagePositionPatient], position, atol=1e-5)
        # a viewer's corners: the outer corner of the first pixel and of the last pixel are the frame's
        out_plane = ([float(v) for v in out.ImagePositionPatient], orientation, [float(v) for v in out.PixelSpacing])
        out_plane = tuple(np.array(v) for v in out_plane)
        rows, cols = int(source.Rows), int(source.Columns)
        for (r, c), (r_out, c_out) in (((-0.5, -0.5), (-0.5, -0.5)),
                                       ((rows - 0.5, cols - 0.5), (out.Rows - 0.5, out.Columns - 0.5))):
            np.testing.assert_allclose(_world(*out_plane, r_out, c_out), _world(position, orientation, spacing, r, c),
                                       atol=1e-4)


@pytest.mark.parametrize("name", ["enhanced_ct", "enhanced_mr"])
def test_output_values_are_the_frames_modality_units(sources, name, tmp_path):
    """The model saw the frame through its own rescale and window; the output holds those gray levels back
    in modality units (Hounsfield for CT, through the frame's rescale), to within half a stored step."""
    image = read_slices(sources[name], frames=[-1])[0]
    groups = frame_functional_groups(pydicom.dcmread(sources[name]), image.frame)
    assert image.window == (float(groups.WindowCenter), float(groups.WindowWidth))
    ds = derived_image(image.pixels, image, "edit", "identity", generate_uid(), 9900, provenance=WEIGHTS)
    out = pydicom.dcmread(write_dicom(ds, tmp_path / "out.dcm"))
    assert (float(out.WindowCenter), float(out.WindowWidth)) == image.window
    slope, intercept = float(out.get("RescaleSlope", 1)), float(out.get("RescaleIntercept", 0))
    if name == "enhanced_ct":
        assert (slope, intercept) == (float(groups.RescaleSlope), float(groups.RescaleIntercept))
    low, high = image.value_range
    expected = low + image.pixels[..., 0] * (high - low) / 255.0
    written = out.pixel_array * slope + intercept
    assert np.abs(written - expected).max() <= slope / 2 + 1e-6


def test_per_frame_groups_override_shared_ones(sources, tmp_path):
    """A frame whose own Pixel Measures differ from the shared ones is written with its own spacing."""
    ds = pydicom.dcmread(sources["enhanced_ct"])
    own = _item(PixelSpacing=[0.5, 0.45], SliceThickness=5.0)
    ds.PerFrameFunctionalGroupsSequence[1].PixelMeasuresSequence = Sequence([own])
    before = copy.deepcopy(ds)
    first, second = read_slices(ds)
    outputs = [derived_image(s.pixels, s, "edit", "identity", generate_uid(), 9900) for s in (first, second)]
    assert [float(v) for v in outputs[0].PixelSpacing] == pytest.approx([0.388672, 0.388672])
    assert [float(v) for v in outputs[1].PixelSpacing] == pytest.approx([0.5, 0.45])
    assert [float(outputs[0].SliceThickness), float(outputs[1].SliceThickness)] == [10.0, 5.0]
    assert second.geometry["pixel_spacing"] == [0.5, 0.45]
    assert ds == before, "writing an output changed the source dataset"


def test_sources_without_frame_geometry_stay_secondary_captures(sources, tmp_path):
    """emri_small as published has no functional groups (no plane geometry); an Enhanced MR whose pulse
    sequence is not stated cannot fill a classic MR's Scanning Sequence: both give Secondary Captures."""
    bare = read_slices(_testdata("emri_small.dcm"), frames=[3])[0]
    no_sequence = pydicom.dcmread(sources["enhanced_mr"])
    del no_sequence.EchoPulseSequence
    for image in (bare, read_slices(no_sequence, frames=[3])[0]):
        ds = derived_image(image.pixels, image, "edit", "identity", generate_uid(), 9900, provenance=WEIGHTS)
        assert ds.SOPClassUID == SecondaryCaptureImageStorage and ds.SyntheticData == "YES"
        assert ds.SourceImageSequence[0].ReferencedFrameNumber == 4
        assert not _errors(write_dicom(ds, tmp_path / "sc.dcm")) - _errors(_testdata("emri_small.dcm"))


def test_written_series_of_an_enhanced_ct_overlays_its_source(sources, tmp_path):
    """The writer every surface uses (PNG + DICOM per slice) gives a CT series on the source's planes."""
    slices = read_slices(sources["enhanced_ct"])
    series = generate_uid()
    written = []
    for k, image in enumerate(slices):
        output = label_synthetic(Image.fromarray(_resized(image.pixels, 2)), "super_resolution", "x2")
        written += write_image_outputs(output, image, tmp_path / f"slice_{k:04d}", "super_resolution", "x2",
                                       series, k + 1)
    outputs = [pydicom.dcmread(p) for p in written if p.suffix == ".dcm"]
    assert [o.SOPClassUID for o in outputs] == [CTImageStorage] * len(slices)
    source = pydicom.dcmread(sources["enhanced_ct"])
    for k, out in enumerate(outputs):
        position, orientation, spacing = _frame_plane(source, k)
        centre = _world(position, orientation, spacing, (source.Rows - 1) / 2, (source.Columns - 1) / 2)
        out_centre = _world(np.array([float(v) for v in out.ImagePositionPatient]), orientation,
                            np.array([float(v) for v in out.PixelSpacing]), (out.Rows - 1) / 2,
                            (out.Columns - 1) / 2)
        np.testing.assert_allclose(out_centre, centre, atol=1e-4)


def test_frames_of_multi_frame_files_in_a_series_folder(sources, tmp_path):
    """A series folder of two Enhanced CT files gives one slice per file (its middle frame); the output and
    its reference name that frame of that file, not the file's place in the series."""
    folder = tmp_path / "series"
    folder.mkdir()
    for k in range(2):
        ds = pydicom.dcmread(sources["enhanced_ct"])
        ds.SOPInstanceUID, ds.InstanceNumber = generate_uid(), k + 1
        for frame in ds.PerFrameFunctionalGroupsSequence:
            x, y, z = (float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient)
            frame.PlanePositionSequence[0].ImagePositionPatient = [x, y, z + 20.0 * k]
        ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
    slices = read_slices(folder)
    assert [s.frame for s in slices] == [0, 1]
    for k, image in enumerate(slices):
        out = derived_image(image.pixels, image, "edit", "identity", generate_uid(), 9900, k + 1)
        middle = int(image.dataset.NumberOfFrames) // 2
        assert out.SourceImageSequence[0].ReferencedFrameNumber == middle + 1
        position, _, _ = _frame_plane(image.dataset, middle)
        np.testing.assert_allclose([float(v) for v in out.ImagePositionPatient], position, atol=1e-5)


def _output(source: Dataset, frame: int, tmp_path) -> tuple[Dataset, str]:
    """The output of one frame as written and read back, and its path."""
    image = read_slices(source, frames=[frame])[0]
    ds = derived_image(image.pixels, image, "edit", "identity", generate_uid(), 9900, provenance=WEIGHTS)
    path = write_dicom(ds, tmp_path / f"frame_{frame}.dcm")
    return pydicom.dcmread(path), path


def _assert_no_new_errors(paths, source: Dataset, tmp_path) -> None:
    """dciodvfy finds no error in the outputs that the source does not have itself."""
    source_path = tmp_path / "source.dcm"
    source.save_as(source_path, enforce_file_format=True)
    inherited = _errors(source_path)
    for path in paths:
        assert not _errors(path) - inherited, f"{path}: new dciodvfy errors"


def test_inversion_recovery_of_the_mr_modifier_macro(sources, tmp_path):
    """Standard Enhanced MR states inversion recovery and magnetization transfer in the MR Modifier macro
    (shared, or per frame overriding it): the classic output says IR with its inversion time, and MTC."""
    ds = pydicom.dcmread(sources["enhanced_mr"])
    ds.SharedFunctionalGroupsSequence[0].MRModifierSequence = Sequence([_item(
        InversionRecovery="YES", InversionTimes=[2500.0], MagnetizationTransfer="ON_RESONANCE")])
    ds.PerFrameFunctionalGroupsSequence[1].MRModifierSequence = Sequence([_item(
        InversionRecovery="YES", InversionTimes=[900.0, 1800.0], MagnetizationTransfer="NONE")])
    ds.PerFrameFunctionalGroupsSequence[2].MRModifierSequence = Sequence([_item(
        InversionRecovery="NO", MagnetizationTransfer="NONE")])
    (shared, _), (own, _), (none, _) = written = [_output(ds, frame, tmp_path) for frame in (0, 1, 2)]
    assert [o.SOPClassUID for o in (shared, own, none)] == [MRImageStorage] * 3
    assert list(shared.ScanningSequence) == ["GR", "IR"] and float(shared.InversionTime) == 2500
    assert "MTC" in shared.SequenceVariant and "SP" in shared.SequenceVariant  # MTC shared, SP top level
    assert list(own.ScanningSequence) == ["GR", "IR"] and float(own.InversionTime) == 900
    assert "MTC" not in own.SequenceVariant
    assert none.ScanningSequence == "GR" and "InversionTime" not in none
    _assert_no_new_errors([path for _, path in written], ds, tmp_path)


def test_legacy_converted_mr_outputs_keep_the_classic_mr_attributes(sources, tmp_path):
    """A Legacy Converted Enhanced MR has no MR Pulse Sequence module: its slices' Scanning Sequence,
    Sequence Variant and times are in the Unassigned Converted Attributes, and the outputs keep them."""
    source = pydicom.dcmread(sources["legacy_converted_mr"])
    original = pydicom.dcmread(_testdata("MR_small.dcm"))
    heights, paths = [], []
    for frame in range(int(source.NumberOfFrames)):
        out, path = _output(source, frame, tmp_path)
        paths.append(path)
        assert out.SOPClassUID == MRImageStorage
        assert out.ScanningSequence == original.ScanningSequence == "SE"
        assert out.SequenceVariant == original.SequenceVariant
        assert out.MRAcquisitionType == original.MRAcquisitionType
        for keyword in ("EchoTime", "RepetitionTime", "FlipAngle", "ImagingFrequency"):
            assert float(out[keyword].value) == float(original[keyword].value), keyword
        position, _, _ = _frame_plane(source, frame)
        np.testing.assert_allclose([float(v) for v in out.ImagePositionPatient], position, atol=1e-5)
        heights.append(float(out.ImagePositionPatient[2]) - float(original.ImagePositionPatient[2]))
    assert sorted(heights) == pytest.approx([0.0, 5.0, 10.0])  # each slice's own plane (in the converter's order)
    _assert_no_new_errors(paths, source, tmp_path)


def test_binary_floats_are_written_as_valid_decimal_strings(sources, tmp_path):
    """Effective Echo Time and Inversion Times are FD (often float32 values widened); the classic Echo Time
    and Inversion Time are DS, at most 16 characters: written rounded to fit, read back unchanged."""
    ds = pydicom.dcmread(sources["enhanced_mr"])
    echo, inversion = float(np.float32(4.6)), float(np.float32(2500.3))
    assert len(repr(echo)) > 16 and len(repr(inversion)) > 16
    ds.SharedFunctionalGroupsSequence[0].MREchoSequence[0].EffectiveEchoTime = echo
    ds.SharedFunctionalGroupsSequence[0].MRModifierSequence = Sequence([_item(
        InversionRecovery="YES", InversionTimes=[inversion])])
    out, path = _output(ds, 0, tmp_path)
    for keyword, value in (("EchoTime", echo), ("InversionTime", inversion)):
        text = str(out[keyword].value)
        assert len(text) <= 16, f"{keyword} {text!r} is not a valid DS"
        assert float(text) == pytest.approx(value, rel=1e-6)
    _assert_no_new_errors([path], ds, tmp_path)
