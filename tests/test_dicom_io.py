"""DICOM as PACS hold it (tests/dicom_studies.py): every transfer syntax and colour model reads with the right
colours; derived images and SRs validate for every modality (no dciodvfy error the source does not have);
patient and study attributes keep their character set byte for byte (dcentvfy); outputs name the weights;
our own outputs are recognised from their headers."""

from __future__ import annotations

import re
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from tests.conftest import dciodvfy_errors
from tests.dicom_studies import CHARSET_NAMES, STUDIES, build_studies, colour_pattern, study_files
from unimedvl_core.io.dicom_output import derived_image, report_sr, write_dicom
from unimedvl_core.io.medical_io import read_image, read_slices
from unimedvl_core.io.outputs import write_image_outputs, write_nifti_slice
from unimedvl_core.io.provenance import Provenance
from unimedvl_core.io.synthetic import WEIGHTS_KEY, is_own_output, label_synthetic, save_png

WEIGHTS = "UniMedVL (ema.safetensors sha256:0123456789ab)"


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    return build_studies(tmp_path_factory.mktemp("studies"))


def _study(studies, name):
    if name not in studies:
        pytest.skip(f"{name}: source file unavailable (pydicom-data)")
    return studies[name]


def _is_colour(pixels: np.ndarray) -> bool:
    return np.abs(pixels[..., 0].astype(int) - pixels[..., 1]).mean() > 1 or \
        np.abs(pixels[..., 1].astype(int) - pixels[..., 2]).mean() > 1


@pytest.mark.parametrize("name", list(STUDIES))
def test_every_study_reads_with_its_shape_and_colours(studies, name):
    info, folder = STUDIES[name], _study(studies, name)
    image = read_image(folder)  # a series folder: also files without the preamble
    assert image.pixels.shape == (*info.shape, 3) and image.pixels.dtype == np.uint8
    assert image.num_frames == info.frames
    assert image.modality == info.modality
    if info.frames > 1:
        assert len(read_slices(folder, frames=[0, -1])) == 2
    if info.pattern:
        error = np.abs(image.pixels.astype(int) - colour_pattern(*info.shape)).mean()
        assert error <= info.tolerance, f"{name}: colours off by {error:.1f} on average"
    if not info.colour:
        assert not _is_colour(image.pixels)
    elif name not in ("sc_jpeg_no_colour_transform", "us_multiframe_jpeg"):  # near-white / grey middle frame
        assert _is_colour(image.pixels)


def test_jpeg_of_rgb_components_is_not_converted_from_ycbcr(studies):
    """An RGB baseline JPEG (Adobe marker, transform 0) decoded as YCbCr would turn red into a green-pink."""
    image = read_image(_study(studies, "sc_jpeg_rgb"))
    assert tuple(image.pixels[5, 5]) == (255, 0, 0) and tuple(image.pixels[40, 80]) == (0, 255, 255)


def _errors(path) -> set[str]:
    return {re.sub(r"\s+", " ", line) for line in dciodvfy_errors(path)}


@pytest.mark.parametrize("name", list(STUDIES))
def test_derived_outputs_add_no_dciodvfy_error(studies, name, tmp_path):
    source_file = study_files(_study(studies, name))[0]
    image = read_image(source_file)
    before = _errors(source_file)
    outputs = {
        "derived": derived_image(image.pixels, image, "edit", "Remove the lesion.", generate_uid(), 9901,
                                 provenance=WEIGHTS),
        "text_to_image": derived_image(image.pixels, image, "text_to_image", "a caption", generate_uid(), 9902,
                                       from_source=False, provenance=WEIGHTS),
        "sr": report_sr([image.dataset], ["Q: Is there a lesion? A: yes"], "Findings: none.", generate_uid(), 9903,
                        provenance=WEIGHTS),
    }
    for kind, ds in outputs.items():
        path = write_dicom(ds, tmp_path / f"{kind}.dcm")
        assert not _errors(path) - before, f"{name} {kind}: new dciodvfy errors"
        written = pydicom.dcmread(path)
        assert str(written.get("PatientName", "")) == str(image.dataset.get("PatientName", ""))
        assert written.StudyInstanceUID == image.dataset.StudyInstanceUID
        if kind != "sr":
            assert written.SyntheticData == "YES" and written.ImageType[0] == "DERIVED"
            assert written.DerivationDescription.startswith("AI-generated (UniMedVL")


def _dcentvfy_errors(paths) -> list[str]:
    tool = shutil.which("dcentvfy")
    if tool is None:
        pytest.skip("dcentvfy (Debian dicom3tools) not installed")
    result = subprocess.run([tool, *map(str, paths)], capture_output=True, text=True, errors="replace")
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("name", [n for n in STUDIES if n.startswith("charset")])
def test_character_sets_are_kept_byte_for_byte(studies, name, tmp_path):
    source_file = study_files(_study(studies, name))[0]
    image = read_image(source_file)
    paths = [source_file]
    for k, from_source in enumerate((True, False)):
        ds = derived_image(image.pixels, image, "edit", "Entferne die Läsion", generate_uid(), 9901 + k,
                           from_source=from_source, provenance=WEIGHTS)
        paths.append(write_dicom(ds, tmp_path / f"out{k}.dcm"))
    sr = report_sr([image.dataset], ["Q: 病変はありますか? A: いいえ"], "Kein Befund – ok", generate_uid(), 9903)
    paths.append(write_dicom(sr, tmp_path / "sr.dcm"))
    raw = [pydicom.dcmread(p).get_item("PatientName").value for p in paths]  # undecoded bytes
    assert all(value == raw[0] for value in raw), name
    for path in paths[1:]:
        written = pydicom.dcmread(path)
        assert written.SpecificCharacterSet == CHARSET_NAMES[name][0]
        assert str(written.PatientName) == str(image.dataset.PatientName) == CHARSET_NAMES[name][1].rstrip("=")
        assert written.ReferringPhysicianName == CHARSET_NAMES[name][2]
        assert written.StudyDescription == CHARSET_NAMES[name][3]
    assert _dcentvfy_errors(paths) == []


def test_dcentvfy_sees_a_latin1_name_re_encoded_as_utf8(studies, tmp_path):
    """The check above can fail: the same name in UTF-8 is a conflict for dcentvfy."""
    source_file = study_files(_study(studies, "charset_latin1"))[0]
    ds = pydicom.dcmread(source_file)
    ds.SpecificCharacterSet, ds.SOPInstanceUID = "ISO_IR 192", generate_uid()
    ds.PatientName = str(ds.PatientName)
    ds.save_as(tmp_path / "utf8.dcm")
    assert _dcentvfy_errors([source_file, tmp_path / "utf8.dcm"])


def test_text_outside_the_source_character_set(studies, tmp_path):
    """ASCII patient data with a Latin-1 declaration: our Japanese text switches the output to UTF-8 (the
    patient and study bytes are the same); non-ASCII Latin-1 names keep Latin-1 (our text degrades)."""
    ct = read_image(study_files(_study(studies, "ct"))[0])
    sr = report_sr([ct.dataset], ["Q: 病変? A: はい"], None, generate_uid(), 9903)
    assert pydicom.dcmread(write_dicom(sr, tmp_path / "ct_sr.dcm")).SpecificCharacterSet == "ISO_IR 192"
    latin = read_image(study_files(_study(studies, "charset_latin1"))[0])
    with pytest.warns(UserWarning):
        sr = report_sr([latin.dataset], ["Q: 病変? A: はい"], None, generate_uid(), 9903)
        path = write_dicom(sr, tmp_path / "latin_sr.dcm")
    assert pydicom.dcmread(path).SpecificCharacterSet == "ISO_IR 100"


def _provenance(tmp_path) -> Provenance:
    weights = tmp_path / "ema.safetensors"
    weights.write_bytes(b"weights")
    return Provenance("UniMedVL-7B", weights)


def test_outputs_name_the_weights(studies, tmp_path):
    provenance = _provenance(tmp_path)
    image = read_image(study_files(_study(studies, "sc_jpeg_rgb"))[0])
    ds = pydicom.dcmread(write_dicom(derived_image(image.pixels, image, "edit", "x", generate_uid(), 9901,
                                                   provenance=provenance), tmp_path / "d.dcm"))
    ours = ds.ContributingEquipmentSequence[-1]
    assert ours.ManufacturerModelName == "UniMedVL" and provenance.short in ours.SoftwareVersions
    assert provenance.sha256 in ours.ContributionDescription
    assert ours.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Synthesizing Equipment"
    assert provenance.short in ds.SoftwareVersions and ds.SyntheticData == "YES"
    sr = pydicom.dcmread(write_dicom(report_sr([image.dataset], [], "r", generate_uid(), 9903,
                                               provenance=provenance, notes=["A note."]), tmp_path / "sr.dcm"))
    items = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in sr.ContentSequence
             if "TextValue" in item}
    assert items["Algorithm Name"].TextValue == "UniMedVL"
    assert provenance.short in items["Algorithm Version"].TextValue
    comments = [item.TextValue for item in sr.ContentSequence if "TextValue" in item]
    assert any(provenance.sha256 in text for text in comments) and "A note." in comments
    model_names = [item.TextValue for item in sr.ContentSequence if "TextValue" in item and
                   item.ConceptNameCodeSequence[0].CodeMeaning == "Device Observer Model Name"]
    assert model_names == [provenance.short]


def test_written_outputs_take_the_weights_from_the_image_labels(studies, tmp_path):
    image = read_image(study_files(_study(studies, "charset_ir87_sc"))[0])
    generated = label_synthetic(Image.fromarray(image.pixels), "edit", "x", weights=WEIGHTS)
    png, dcm = write_image_outputs(generated, image, tmp_path / "out", "edit", "x", generate_uid(), 1)
    ds = pydicom.dcmread(dcm)
    assert WEIGHTS in ds.SoftwareVersions and WEIGHTS in ds.ContributingEquipmentSequence[-1].SoftwareVersions
    assert ds.SpecificCharacterSet == ["", "ISO 2022 IR 87"] and ds.PatientName == image.dataset.PatientName
    assert Image.open(png).info[WEIGHTS_KEY] == WEIGHTS


def _nifti_source(tmp_path):
    volume = nib.Nifti1Image(np.random.default_rng(0).random((16, 12, 5)).astype(np.float32), np.eye(4))
    nib.save(volume, tmp_path / "t2.nii.gz")
    return read_image(tmp_path / "t2.nii.gz", frame=2)


def test_nifti_output_names_the_weights(tmp_path):
    source = _nifti_source(tmp_path)
    generated = label_synthetic(Image.new("RGB", (24, 32)), "edit", "x", weights=WEIGHTS)
    path = write_nifti_slice(generated, source, tmp_path / "out.nii.gz")
    header = nib.load(path).header
    assert header["descrip"].tobytes().rstrip(b"\0") == b"SYNTHETIC UniMedVL 0123456789ab"
    assert header["intent_name"].tobytes().rstrip(b"\0") == b"synthetic"
    assert header["aux_file"].tobytes().rstrip(b"\0") == b"sha256:0123456789ab"
    provenance = _provenance(tmp_path)
    path = write_nifti_slice(Image.new("RGB", (24, 32)), source, tmp_path / "p.nii.gz", weights=provenance)
    assert nib.load(path).header["descrip"].tobytes().rstrip(b"\0") == \
        b"SYNTHETIC UniMedVL " + provenance.sha256[:12].encode()


def test_is_own_output_recognises_what_we_wrote(studies, tmp_path):
    source_file = study_files(_study(studies, "ct"))[0]
    image = read_image(source_file)
    generated = label_synthetic(Image.fromarray(image.pixels), "edit", "x", weights=WEIGHTS)
    ours = [save_png(generated, tmp_path / "out.png"),
            write_dicom(derived_image(image.pixels, image, "edit", "x", generate_uid(), 9901), tmp_path / "d.dcm"),
            write_dicom(derived_image(image.pixels, image, "edit", "x", generate_uid(), 9901, from_source=False),
                        tmp_path / "t.dcm"),
            write_dicom(report_sr([image.dataset], [], "r", generate_uid(), 9903), tmp_path / "sr.dcm"),
            write_nifti_slice(generated, _nifti_source(tmp_path), tmp_path / "n.nii.gz")]
    assert all(is_own_output(p) for p in ours), [p.name for p in ours if not is_own_output(p)]
    Image.fromarray(image.pixels).save(tmp_path / "plain.png")
    relabelled = Image.fromarray(image.pixels)
    relabelled.info.update({"SyntheticData": "YES", "Software": "another tool"})
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    theirs = [source_file, tmp_path / "plain.png", save_png(relabelled, tmp_path / "other.png"),
              tmp_path / "t2.nii.gz", tmp_path / "junk.dcm", tmp_path / "missing.png"]
    assert not any(is_own_output(p) for p in theirs)
    assert generated.info[WEIGHTS_KEY] == WEIGHTS
