"""The MONAI Deploy application: input checks, DICOM outputs, and the app run end to end on odd inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from unimedvl_core.io.dicom_output import derived_image, report_sr
from unimedvl_core.io.medical_io import read_image, read_slices
from unimedvl_core.surfaces.deploy.config import DEFAULT_SELECTION, load_deploy_config
from unimedvl_core.surfaces.deploy.inputs import InputError, scan_dicom_folder

from .conftest import PARITY_CKPT, dciodvfy_errors

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "monai_deploy_app"
SERIES = REPO / "monai_bundle" / "sample_data" / "dicom_ct_series"


def errors_of_its_own(output: Path, source: Path) -> list[str]:
    """Errors of the output that its source does not already have (those must not be made worse only)."""
    inherited = set(dciodvfy_errors(source))
    return [e for e in dciodvfy_errors(output) if e not in inherited]


def _copy(name: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(get_testdata_file(name), dest / name))


# ----- input checks -----
def test_empty_and_useless_folders_are_errors(tmp_path):
    with pytest.raises(InputError, match="is empty"):
        scan_dicom_folder(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    _copy("rtstruct.dcm", tmp_path)
    with pytest.raises(InputError, match="no usable DICOM image.*not a DICOM file.*not an image"):
        scan_dicom_folder(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        scan_dicom_folder(tmp_path / "missing")


def test_mixed_folder_keeps_good_series_and_says_why_others_were_skipped(tmp_path):
    for f in SERIES.glob("*.dcm"):
        shutil.copy(f, tmp_path / f"ct_{f.name}")
    _copy("MR_small_jp2klossless.dcm", tmp_path / "mr")  # compressed: decoded through pylibjpeg
    _copy("rtstruct.dcm", tmp_path)                       # not an image
    (tmp_path / "readme.txt").write_text("not dicom")
    broken = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    broken.SeriesInstanceUID = generate_uid()
    good_of_broken = tmp_path / "broken" / "a.dcm"
    good_of_broken.parent.mkdir()
    broken.save_as(str(good_of_broken))
    broken.SOPInstanceUID = generate_uid()
    broken.save_as(str(tmp_path / "broken" / "b.dcm"))
    data = (tmp_path / "broken" / "b.dcm").read_bytes()
    (tmp_path / "broken" / "b.dcm").write_bytes(data[: len(data) - 3000])  # truncated pixel data
    huge = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    huge.Rows, huge.Columns, huge.NumberOfFrames = 50000, 50000, 1
    huge.SeriesInstanceUID = generate_uid()
    huge.save_as(str(tmp_path / "huge.dcm"))

    scan = scan_dicom_folder(tmp_path)
    assert len(scan.series_files) == 2  # the CT series and the compressed MR
    reasons = dict(scan.skipped)
    assert reasons["readme.txt"] == "not a DICOM file"
    assert reasons["rtstruct.dcm"].startswith("not an image")
    assert "corrupt or truncated" in reasons[str(Path("broken") / "b.dcm")]
    assert "another instance is broken" in reasons[str(Path("broken") / "a.dcm")]
    assert "exceeds" in reasons["huge.dcm"]
    assert str(broken.SeriesInstanceUID) in scan.rejected_series


# ----- DICOM outputs -----
def test_derived_ct_keeps_geometry_and_maps_values_back(tmp_path):
    src = read_slices(SERIES, frames=[1])[0]
    assert src.value_range == (-1024.0, -24.0)  # the file's window: centre -524, width 1000
    gray = np.tile(np.linspace(0, 255, 128, dtype=np.uint8), (128, 1))  # an output upscaled 2x
    ds = derived_image(np.stack([gray] * 3, -1), src, "super_resolution", "test", generate_uid(), 9901)
    ref = src.dataset
    assert ds.SOPClassUID == ref.SOPClassUID and ds.FrameOfReferenceUID == ref.FrameOfReferenceUID
    assert ds.StudyInstanceUID == ref.StudyInstanceUID and ds.SeriesInstanceUID != ref.SeriesInstanceUID
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] and ds.SyntheticData == "YES"
    assert [float(v) for v in ds.PixelSpacing] == [0.5, 0.5]
    assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx([-0.25, -0.25, 3.0])  # same extent
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert hu[0, 0] == pytest.approx(-1024) and hu[0, -1] == pytest.approx(-24)
    path = tmp_path / "d.dcm"
    ds.save_as(str(path), enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    shown = read_image(path)  # our own reader shows it as the model made it
    assert np.abs(shown.pixels[..., 0].astype(int) - gray).max() <= 1


def test_other_sources_get_secondary_capture(tmp_path):
    src = read_image(get_testdata_file("examples_rgb_color.dcm"))
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[..., 0] = 200
    ds = derived_image(pixels, src, "virtual_staining", "test", generate_uid(), 9902)
    assert ds.SOPClassUID.name == "Secondary Capture Image Storage" and ds.PhotometricInterpretation == "RGB"
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.dataset.SOPInstanceUID
    path = tmp_path / "sc.dcm"
    ds.save_as(str(path), enforce_file_format=True)
    assert errors_of_its_own(path, Path(get_testdata_file("examples_rgb_color.dcm"))) == []


def test_patient_orientation_letters_are_single(tmp_path):
    from unimedvl_core.io.dicom_output import patient_orientation_of

    ds = pydicom.Dataset()
    ds.PatientOrientation = ["A", "FR"]  # mammography MLO
    assert patient_orientation_of(ds) == ("A", "F")
    oblique = pydicom.Dataset()
    oblique.ImageOrientationPatient = [0.8, 0.6, 0, 0, 0, -1]
    assert patient_orientation_of(oblique) == ("L", "F")
    src = read_image(get_testdata_file("examples_rgb_color.dcm"))
    src.dataset.PatientOrientation = ["A", "FR"]
    ds = derived_image(np.zeros((32, 32, 3), np.uint8), src, "edit", "x", generate_uid(), 9904)
    assert list(ds.PatientOrientation) == ["A", "F"]
    t2i = derived_image(np.zeros((32, 32, 3), np.uint8), src, "text_to_image", "x", generate_uid(), 9905,
                        from_source=False)
    assert "SourceImageSequence" not in t2i and t2i.StudyInstanceUID == src.dataset.StudyInstanceUID


def test_monochrome1_sources_are_written_back_the_right_way_round():
    ds = pydicom.dcmread(sorted(SERIES.glob("*.dcm"))[0])
    ds.PhotometricInterpretation = "MONOCHROME1"
    src = read_slices(ds)[0]
    shown = src.pixels
    out = derived_image(shown, src, "edit", "x", generate_uid(), 9906)
    assert out.PhotometricInterpretation == "MONOCHROME2"
    stored = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    written = out.pixel_array * float(out.RescaleSlope) + float(out.RescaleIntercept)
    assert np.corrcoef(stored.ravel(), written.ravel())[0, 1] > 0.9  # same polarity as the source


def test_report_sr(tmp_path):
    evidence = [pydicom.dcmread(p) for p in sorted(SERIES.glob("*.dcm"))]
    sr = report_sr(evidence, ["Q: Is there a lesion? A: yes\x10"], "Findings: two lesions.", generate_uid(), 9903)
    path = tmp_path / "sr.dcm"
    sr.save_as(str(path), enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    text = [item.TextValue for item in pydicom.dcmread(path).ContentSequence if "TextValue" in item]
    assert "Q: Is there a lesion? A: yes" in text and "Findings: two lesions." in text
    assert any("AI model" in t for t in text)


# ----- configuration and packaging files -----
def test_task_file_and_app_manifest():
    config = load_deploy_config(APP / "tasks.yaml")
    assert {t.task for t in config.tasks} == {"vqa", "report", "super_resolution"}
    assert config.series_selection == DEFAULT_SELECTION
    manifest = yaml.safe_load((APP / "app.yaml").read_text())
    assert manifest["application"]["inputFormats"] == ["file"] and manifest["resources"]["gpuMemory"].endswith("Gi")
    sys.path.insert(0, str(APP))
    from make_requirements import requirements

    assert (APP / "requirements.txt").read_text() == requirements()  # generated from pyproject, in sync
    assert "monai-deploy-app-sdk" in requirements() and "pylibjpeg" in requirements()


def test_bad_task_files(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("tasks: [{task: vqa}]")
    with pytest.raises(ValueError, match="question: required"):
        load_deploy_config(bad)
    bad.write_text("tasks: [{task: teleport}]")
    with pytest.raises(ValueError, match="unknown task"):
        load_deploy_config(bad)



def test_task_file_rules_and_switches(tmp_path):
    from unimedvl_core.io.medical_io import MedicalImage

    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"allow_demo_model": True, "tasks": [
        {"task": "super_resolution", "scale": 2}, {"task": "edit", "instruction": "x",
                                                   "applies_to": {"modalities": ["dx"], "max_side": 100}}]}))
    config = load_deploy_config(path)
    assert config.allow_demo_model and not config.include_synthetic_inputs
    big_cr = MedicalImage(np.zeros((3000, 2500, 3), np.uint8), "cr.dcm", modality="CR")
    assert "not for CR" in config.tasks[0].not_applicable(big_cr)  # the registry's rules
    assert "exceeds 100 px" in config.tasks[1].not_applicable(MedicalImage(np.zeros((200, 50, 3), np.uint8), "dx.dcm",
                                                                            modality="DX"))
    for bad in ({"max_side": "big"}, {"modality": ["CT"]}, ["CT"]):
        path.write_text(yaml.safe_dump({"tasks": [{"task": "edit", "instruction": "x", "applies_to": bad}]}))
        with pytest.raises(ValueError, match="applies_to"):
            load_deploy_config(path)
    path.write_text("tasks: [{task: vqa, questions: [Is it?]}]")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_deploy_config(path)


def test_model_folder_choice(tmp_path, monkeypatch):
    from unimedvl_core.inference.embedded import DEFAULT_MODEL_DIR
    from unimedvl_core.surfaces.deploy.model import ModelFolderError, choose_model

    monkeypatch.delenv("UNIMEDVL_ALLOW_DEMO_MODEL", raising=False)
    assert choose_model(PARITY_CKPT).checkpoint == PARITY_CKPT
    packaged = tmp_path / "models"
    shutil.copytree(PARITY_CKPT, packaged / "UniMedVL")
    assert choose_model(packaged).checkpoint == packaged / "UniMedVL"  # the MAP packager's layout
    assert choose_model(DEFAULT_MODEL_DIR).demo  # given explicitly: used, and known to be the demo model
    with pytest.raises(ModelFolderError, match="no model folder"):
        choose_model(None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="no checkpoint in the model folder"):
        choose_model(tmp_path / "empty")
    assert choose_model(None, allow_demo_model=True) == choose_model(tmp_path / "absent", True)
    monkeypatch.setenv("UNIMEDVL_ALLOW_DEMO_MODEL", "1")
    assert choose_model(None).checkpoint is None and choose_model(None).demo
    (packaged / "UniMedVL" / "ae.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="incomplete: ae.safetensors missing"):
        choose_model(packaged)
    shutil.copytree(PARITY_CKPT, packaged / "other")
    with pytest.raises(ModelFolderError, match="several checkpoints"):
        choose_model(packaged)


def test_output_folder_apart_from_input(tmp_path):
    from unimedvl_core.surfaces.deploy.inputs import check_folders

    check_folders(tmp_path / "in", tmp_path / "out")
    for out in (tmp_path / "in", tmp_path / "in" / "out", tmp_path):
        with pytest.raises(InputError, match="output folder"):
            check_folders(tmp_path / "in", out)

# ----- the application end to end -----
def run_app(input_dir: Path, output_dir: Path, tasks: Path | None = None, model: Path | None = PARITY_CKPT,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """The application as a subprocess, with the tiny parity checkpoint by default (``model=None``: no -m)."""
    env = {**__import__("os").environ, **(env or {})}
    env.pop("HOLOSCAN_MODEL_PATH", None)
    if tasks is not None:
        env["UNIMEDVL_TASKS"] = str(tasks)
    command = [sys.executable, str(APP / "app.py"), "-i", str(input_dir), "-o", str(output_dir)]
    return subprocess.run(command + (["-m", str(model)] if model is not None else []), capture_output=True,
                          text=True, timeout=900, env=env)


def test_app_processes_supported_series_and_writes_valid_labelled_dicom(tmp_path):
    inp = tmp_path / "in"
    shutil.copytree(SERIES, inp / "ct")
    _copy("MR_small_RLE.dcm", inp / "mr")
    _copy("rtstruct.dcm", inp)
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"slices": "all", "max_new_tokens": 4, "num_inference_steps": 2, "tasks": [
        {"task": "vqa", "questions": ["Is there a lesion?"]}, {"task": "report"},
        {"task": "contrast_translation", "source": "T1", "target": "T2", "applies_to": {}}]}))  # also on CT
    out = tmp_path / "out"
    result = run_app(inp, out, tasks)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["series"]) == 2 and summary["synthetic_images_labelled"]
    assert any(s["reason"].startswith("not an image") for s in summary["input"]["skipped"])
    ct = next(s for s in summary["series"] if s["modality"] == "CT")
    assert ct["slices"] == [0, 1, 2]
    images = [o for o in ct["outputs"] if o["kind"] == "image"]
    assert len(images) == 3 and {o["sop_class"] for o in images} == {"CT Image Storage"}
    sources = {str(pydicom.dcmread(p).SOPInstanceUID) for p in SERIES.glob("*.dcm")}
    for path in sorted((out / "dicom").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID in {pydicom.dcmread(next(SERIES.glob("*.dcm"))).StudyInstanceUID,
                                       pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm")).StudyInstanceUID}
        if ds.Modality != "SR":
            assert ds.SyntheticData == "YES" and "DERIVED" in ds.ImageType
            if ds.Modality == "CT":
                assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in sources
        assert dciodvfy_errors(path) == [], path.name
    assert len(list((out / "png").glob("*.png"))) == 4


def test_app_rejects_unusable_input_without_output(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "broken.dcm").write_bytes(b"DICM" + b"\x00" * 50)
    out = tmp_path / "out"
    result = run_app(inp, out)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"unimedvl: rejected: no usable DICOM image in {inp} (1 files; ")
    assert "broken.dcm: " in lines[0] and "Traceback" not in result.stdout + result.stderr
    assert not out.exists()
