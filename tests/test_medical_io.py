"""Medical image input on pydicom's bundled files and files we build: windowing, 16-bit, MONOCHROME1,
colour models, multi-frame, series, NIfTI, and clear errors."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from unimedvl_core.io.medical_io import MAX_DECLARED_BYTES, ImageReadError, read_image, read_slices


def bundled(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} unavailable")
    return path


def test_ct_uses_rescale_and_the_soft_tissue_preset_when_no_window_is_stored():
    path = bundled("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds
    image = read_image(path)
    assert image.modality == "CT" and image.window == (40.0, 400.0)
    hu = apply_modality_lut(ds.pixel_array, ds)
    gray = image.pixels[..., 0]
    assert image.pixels.shape == (128, 128, 3) and image.pixels.dtype == np.uint8
    assert np.all(gray[hu <= 40 - 200] == 0) and np.all(gray[hu > 40 + 200] == 255)
    inside = (hu > -150) & (hu < 230)
    assert inside.any()
    expected = np.rint(((hu[inside] - 39.5) / 399 + 0.5) * 255)
    assert np.abs(gray[inside].astype(float) - expected).max() <= 1


def test_caller_window_and_presets_override_the_default():
    path = bundled("CT_small.dcm")
    lung = read_image(path, window="lung")
    explicit = read_image(path, window=(-600, 1500))
    assert lung.window == (-600.0, 1500.0)
    assert np.array_equal(lung.pixels, explicit.pixels)
    assert not np.array_equal(lung.pixels, read_image(path).pixels)
    with pytest.raises(ImageReadError, match="unknown window preset"):
        read_image(path, window="kidney-ish")


def test_mr_uses_the_stored_window():
    path = bundled("MR_small.dcm")
    ds = pydicom.dcmread(path)
    image = read_image(path)
    assert image.window == (float(ds.WindowCenter), float(ds.WindowWidth))


def test_16bit_grayscale_png_is_rescaled_not_clipped(tmp_path):
    ramp = (np.arange(256 * 64, dtype=np.uint32).reshape(64, 256) * 4).astype(np.uint16)  # 0 .. 65532
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    gray = read_image(path).pixels[..., 0]
    assert gray.min() == 0 and gray.max() == 255
    assert np.all(np.diff(gray.reshape(-1).astype(int)) >= 0)  # monotonic, not saturated
    assert (gray == 255).mean() < 0.01


def test_monochrome1_is_inverted():
    path = bundled("RG1_UNCI.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    as_is = read_image(path).pixels[..., 0].astype(int)
    ds.PhotometricInterpretation = "MONOCHROME2"
    flipped = read_image(ds).pixels[..., 0].astype(int)
    assert np.array_equal(as_is, 255 - flipped)


def test_multiframe_frame_choice_and_all_frames():
    path = bundled("emri_small.dcm")
    ds = pydicom.dcmread(path)
    count = int(ds.NumberOfFrames)
    middle = read_image(path)
    assert middle.frame == count // 2 and middle.num_frames == count
    third = read_image(path, frame=3)
    assert third.frame == 3 and not np.array_equal(third.pixels, middle.pixels)
    assert [s.frame for s in read_slices(path)] == list(range(count))
    with pytest.raises(ImageReadError, match="out of range"):
        read_image(path, frame=count)


@pytest.mark.parametrize("name", ["examples_rgb_color.dcm", "examples_ybr_color.dcm", "examples_palette.dcm",
                                  "SC_rgb_rle_16bit.dcm"])
def test_colour_models_become_rgb(name):
    path = bundled(name)
    image = read_image(path)
    assert image.pixels.ndim == 3 and image.pixels.shape[-1] == 3 and image.pixels.dtype == np.uint8
    assert image.pixels.std() > 1  # real content, not a blank


def test_ybr_is_converted_like_pydicom_converts_it():
    path = bundled("examples_ybr_color.dcm")
    ds = pydicom.dcmread(path)
    assert read_image(path, frame=0).pixels.tolist() == ds.pixel_array[0].tolist()


@pytest.mark.parametrize("name", ["MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm"])
def test_compressed_transfer_syntaxes_decode_to_the_same_image(name):
    reference = read_image(bundled("MR_small.dcm")).pixels
    assert np.array_equal(read_image(bundled(name)).pixels, reference)


def test_non_image_and_broken_inputs_are_refused_with_the_file_named(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.dcm")
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"hello, not DICOM at all")
    with pytest.raises(ImageReadError, match="fake.dcm"):
        read_image(fake)
    truncated = tmp_path / "truncated.dcm"
    data = open(bundled("CT_small.dcm"), "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated.dcm"):
        read_image(truncated)
    with pytest.raises(ImageReadError, match="no pixel data"):
        read_image(bundled("rtstruct.dcm"))
    text = tmp_path / "note.png"
    text.write_text("just text")
    with pytest.raises(ImageReadError, match="note.png: not a readable image"):
        read_image(text)


def test_huge_declared_sizes_are_refused_before_decoding():
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    ds.Rows, ds.Columns, ds.NumberOfFrames = 4096, 4096, 1000
    assert 4096 * 4096 * 1000 * 2 > MAX_DECLARED_BYTES
    with pytest.raises(ImageReadError, match="exceeds"):
        read_image(ds)
    ds.Rows, ds.Columns = 60000, 60000
    with pytest.raises(ImageReadError, match="exceeds"):
        read_image(ds)


def _series(tmp_path, positions):
    src = pydicom.dcmread(bundled("CT_small.dcm"))
    folder = tmp_path / "series"
    folder.mkdir()
    for i, z in enumerate(positions):
        ds = src.copy()
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber = i + 1
        arr = ds.pixel_array.copy()
        arr[:] = int(z) * 10 + 1024  # each slice a constant value (HU z*10) that says where it is
        ds.PixelData = arr.tobytes()
        ds.save_as(str(folder / f"{i:03d}.dcm"))
    return folder


def test_series_folder_is_sorted_along_the_slice_normal(tmp_path):
    folder = _series(tmp_path, [30, 10, 20, 0])
    slices = read_slices(folder, window=(0, 1000))
    values = [int(s.pixels[0, 0, 0]) for s in slices]
    assert values == sorted(values) and len(set(values)) == 4
    assert [s.frame for s in slices] == [0, 1, 2, 3]
    assert read_image(folder, window=(0, 1000)).frame == 2


def test_folder_with_two_series_asks_which(tmp_path):
    folder = _series(tmp_path, [0, 1])
    other = pydicom.dcmread(bundled("MR_small.dcm"))
    other.save_as(str(folder / "mr.dcm"))
    with pytest.raises(ImageReadError, match="2 image series"):
        read_image(folder)
    assert read_image(folder, series_uid=str(other.SeriesInstanceUID)).modality == "MR"


def test_nifti_slices_follow_radiological_display(tmp_path):
    data = np.zeros((8, 6, 4), dtype=np.float32)
    data[6, 4, 1] = 100.0  # patient right-ish (high x in RAS), anterior (high y), slice 1
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    image = read_image(path, frame=1)
    gray = image.pixels[..., 0]
    assert gray.shape == (6, 8)
    r, c = np.unravel_index(np.argmax(gray), gray.shape)
    assert (r, c) == (6 - 1 - 4, 8 - 1 - 6)  # anterior at the top, patient right on the left
    assert read_image(path).frame == 2 and len(read_slices(path)) == 4


def test_arrays_and_pil_images():
    arr16 = np.linspace(0, 4000, 32 * 32).reshape(32, 32).astype(np.uint16)
    gray = read_image(arr16).pixels[..., 0]
    assert gray.min() == 0 and gray.max() == 255
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    assert read_image(rgba).pixels.tolist() == np.full((8, 8, 3), 255).tolist()  # transparent -> white
    volume = np.random.default_rng(0).random((5, 16, 16)).astype(np.float32)
    assert len(read_slices(volume)) == 5
    with pytest.raises(ImageReadError, match="not an image"):
        read_image(np.zeros((2, 3, 4, 5, 6)))
    assert read_image(Image.new("L", (10, 12), 7)).pixels.shape == (12, 10, 3)


def test_repr_never_shows_patient_attributes():
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName, ds.PatientID = "DOE^JANE^SECRET", "MRN-4242"
    image = read_image(ds)
    shown = repr(image) + str(image)
    assert "SECRET" not in shown and "MRN-4242" not in shown and "CT" in shown


def test_key_slices_spread_over_the_volume_and_decode_only_those(tmp_path):
    from unimedvl_core.io.medical_io import key_slice_indices, read_key_slices

    assert key_slice_indices(10, 3) == [1, 5, 8] and key_slice_indices(4, 9) == [0, 1, 2, 3]
    assert key_slice_indices(100, 1) == [50]
    path = bundled("emri_small.dcm")  # 10 frames
    picked = read_key_slices(path, 3)
    assert [s.frame for s in picked] == [1, 5, 8]
    assert np.array_equal(picked[1].pixels, read_image(path, frame=5).pixels)
    assert [s.frame for s in read_key_slices(path, 2, frames=[4, 5, 6, 7])] == [5, 7]
    already = read_slices(path)
    assert [s.frame for s in read_key_slices(already, 4)] == [1, 3, 6, 8]
    # one frame of the object, as a surface that read one image holds it: the key frames of that object
    from_frame = read_key_slices(read_image(path), 3)
    assert [s.frame for s in from_frame] == [1, 5, 8] and from_frame[0].source == "emri_small.dcm"
    assert read_key_slices(read_image(bundled("CT_small.dcm")), 3)[0].frame is None  # single-frame: itself
    png = tmp_path / "a.png"
    Image.new("L", (8, 8)).save(png)
    assert len(read_key_slices(png, 5)) == 1  # a 2-D image is its own series


def test_an_interrupted_write_leaves_no_file_and_a_finished_one_replaces_whole(tmp_path):
    from unimedvl_core.io.atomic import atomic_path
    from unimedvl_core.io.synthetic import save_png

    target = tmp_path / "out.png"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"half a file")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    save_png(Image.new("RGB", (4, 4)), target)
    assert Image.open(target).size == (4, 4) and [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_outputs_of_several_nifti_slices_form_one_volume_in_the_source_space(tmp_path):
    from unimedvl_core.io.outputs import write_nifti_volume
    from unimedvl_core.io.provenance import Provenance

    affine = np.array([[-0.8, 0, 0, 90], [0, 0.9, 0, -120], [0, 0, 2.5, -40], [0, 0, 0, 1]])
    data = np.random.default_rng(0).random((20, 16, 7)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "t2.nii.gz")
    sources = read_slices(tmp_path / "t2.nii.gz", frames=[2, 3, 4])
    # outputs at twice the size (as super-resolution makes them), each the source slice upscaled
    outputs = [s.to_pil().resize((s.size[0] * 2, s.size[1] * 2), Image.Resampling.NEAREST) for s in sources]
    provenance = Provenance("demo weights", demo=True)
    path = write_nifti_volume(outputs, sources, tmp_path / "out.nii.gz", provenance)
    out = nib.as_closest_canonical(nib.load(path))
    assert out.shape == (40, 32, 3)
    src = nib.as_closest_canonical(nib.load(tmp_path / "t2.nii.gz"))
    # the physical extent of each slice and the slice positions are the source's
    corner = src.affine @ [-0.5, -0.5, 2, 1]
    assert np.allclose(out.affine @ [-0.5, -0.5, 0, 1], corner)
    assert np.allclose(out.affine @ [39.5, 31.5, 2, 1], src.affine @ [19.5, 15.5, 4, 1])
    # voxel (i, j) of output slice k shows source voxel (i//2, j//2) of slice 2 + k
    expected = read_slices(tmp_path / "t2.nii.gz", frames=[3])[0].pixels[..., 0][::-1, ::-1].T
    assert np.array_equal(np.asarray(out.dataobj)[::2, ::2, 1], expected)
    header = nib.load(path).header
    assert header["descrip"].tobytes().startswith(b"SYNTHETIC") and header["intent_name"].tobytes().startswith(
        b"synthetic")
    extension = json.loads(header.extensions[0].get_content())
    assert extension["synthetic"] is True and extension["weights"]["notice"] == provenance.notice
    # slices that do not form an even grid are not a volume
    assert write_nifti_volume(outputs[:2], [sources[0], sources[2]][::-1], tmp_path / "x.nii.gz") is None
