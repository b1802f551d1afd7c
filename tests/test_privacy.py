"""Patient attributes never reach logs, stdout/stderr, reprs, error messages or result files: a DICOM study
whose patient has a known name, ID, birth date and age (the last two non-conformant, so that pydicom's value
checks would quote them) goes through the CLI (success and error paths, without --debug), the bundle's task
runner and the MONAI Deploy application, and none of those strings may appear in anything they say.
(The DICOM outputs themselves carry the patient module on purpose: they join the patient's study.) The
server's responses and logs are checked the same way in tests/test_server.py."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement
from pydicom.uid import generate_uid

from unimedvl_core.io.medical_io import read_image, read_slices
from unimedvl_core.surfaces.cli import main

from .conftest import PARITY_CKPT
from .dicom_studies import build_studies, study_files

NAME, PATIENT_ID, BIRTH_DATE, AGE = "Qwxzyk^Vbnmlo", "PRIV-4711-XQ", "1961-07-04", "63 years"
SECRETS = ("Qwxzyk", "Vbnmlo", PATIENT_ID, BIRTH_DATE, AGE)
CKPT = ["--ckpt", str(PARITY_CKPT), "--no-progress"]
APP = Path(__file__).resolve().parents[1] / "monai_deploy_app"


def _leaks(*texts: str) -> list[str]:
    return [s for s in SECRETS for text in texts if s in text]


def _with_patient(ds: pydicom.Dataset) -> pydicom.Dataset:
    ds.PatientName, ds.PatientID = NAME, PATIENT_ID
    quiet = pydicom_config.IGNORE  # the bad values are the point
    ds.add(DataElement(0x00100030, "DA", BIRTH_DATE, validation_mode=quiet))  # PatientBirthDate, not a date
    ds.add(DataElement(0x00101010, "AS", AGE, validation_mode=quiet))  # PatientAge, not an age string
    return ds


@pytest.fixture
def study(tmp_path) -> dict[str, Path]:
    """A CT study of this patient, and next to it a truncated copy and a header without pixel data."""
    folder = build_studies(tmp_path / "built", ["ct"])["ct"]
    ds = _with_patient(pydicom.dcmread(study_files(folder)[0]))
    good = tmp_path / "study" / "ct.dcm"
    good.parent.mkdir()
    ds.save_as(good, enforce_file_format=True)
    truncated = tmp_path / "broken" / "cut.dcm"
    truncated.parent.mkdir()
    truncated.write_bytes(good.read_bytes()[:-5000])
    header = tmp_path / "header" / "nopixels.dcm"
    header.parent.mkdir()
    del ds.PixelData
    ds.save_as(header, enforce_file_format=True)
    return {"good": good, "truncated": truncated, "header": header}


@pytest.fixture
def everything_logged(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        status = main(argv)
    except SystemExit as stop:  # argument errors
        status = stop.code
    out = capsys.readouterr()
    return status, out.out + out.err


def test_cli_success_and_error_paths_never_show_the_patient(study, tmp_path, capsys, everything_logged):
    good, said = str(study["good"]), []
    runs = [
        (["vqa", *CKPT, "--image", good, "--question", "Is there a lesion?", "--max-new-tokens", "3", "--json",
          str(tmp_path / "a.json")], 0),
        (["report", *CKPT, "--image", good, "--series-report", "--max-new-tokens", "3"], 0),
        (["edit", *CKPT, "--steps", "1", "--image", good, "--instruction", "x", "--height", "32", "--width", "32",
          "--out", str(tmp_path / "e.png")], 0),
        (["vqa", *CKPT, "--image", good, "--question", "x", "--slices", "3"], 2),  # no slice 3
        (["vqa", *CKPT, "--image", str(study["truncated"]), "--question", "x"], 2),
        (["vqa", *CKPT, "--image", str(study["header"]), "--question", "x"], 2),
        (["vqa", *CKPT, "--image", good, "--question", "x", "--window", "nonsense"], 2),
        (["edit", *CKPT, "--image", good, "--instruction", "x", "--out", good], 2),  # the input itself
    ]
    for argv, expected in runs:
        status, text = _cli(argv, capsys)
        assert status == expected, (argv, text)
        said.append(text)
    assert "out of range" in said[3] and "cut.dcm" in said[4] and "no pixel data" in said[5]
    assert _leaks(*said, everything_logged.text, (tmp_path / "a.json").read_text()) == []
    assert pydicom.dcmread(tmp_path / "e.dcm").PatientName == NAME  # the output does join the patient's study


def test_an_internal_error_about_the_image_names_it_without_the_patient(study, capsys, monkeypatch,
                                                                         everything_logged):
    import unimedvl_core.inference.model as model_module

    def broken(self, image, question, **kwargs):
        raise RuntimeError(f"cannot answer about {read_image(image)!r}: {question}")

    monkeypatch.setattr(model_module.UniMedVL, "answer", broken)
    status, text = _cli(["vqa", *CKPT, "--image", str(study["good"]), "--question", "x"], capsys)
    assert status == 1 and "MedicalImage(ct.dcm" in text
    assert _leaks(text, everything_logged.text) == []


def test_reprs_and_errors_of_images_and_results(study, everything_logged):
    from unimedvl_core.io.medical_io import ImageReadError
    from unimedvl_core.tasks.registry import TaskResult

    image = read_image(study["good"])
    from_dataset = read_slices(pydicom.dcmread(study["good"]))
    texts = [repr(image), str(image), repr(from_dataset), repr(TaskResult("vqa", "yes", params={"question": "x"}))]
    for path in (study["truncated"], study["header"]):
        with pytest.raises(ImageReadError) as err:
            read_image(path)
        texts.append(str(err.value))
    assert image.dataset.PatientName == NAME  # kept for outputs, never shown
    assert _leaks(*texts, everything_logged.text) == []


def test_pydicom_value_messages_are_withheld(everything_logged, recwarn):
    """Setting a non-conformant value makes pydicom quote it in a log record and a warning; once our reader
    has run (it installs the filter), neither carries the value."""
    from unimedvl_core.io.withheld import WITHHELD, withhold_dicom_values

    withhold_dicom_values()
    ds = pydicom.Dataset()
    ds.PatientAge = AGE
    assert f"Invalid value for VR AS: {WITHHELD}" in everything_logged.text
    assert _leaks(everything_logged.text, *(str(w.message) for w in recwarn)) == []


def test_bundle_runner_results_and_logs(study, tmp_path, capsys, everything_logged, parity_model):
    from unimedvl_core.surfaces.bundle import TaskInferer, TaskRunner, list_inputs

    items = [{**i, "slices": read_slices(i["image"])} for i in list_inputs(study["good"].parent)]
    out = tmp_path / "bundle"
    summary = TaskRunner(parity_model, items, TaskInferer("vqa", {"max_new_tokens": 3}, ["Is there a lesion?"]),
                         str(out), progress=False).run()
    assert summary["results"] and summary["results"][0]["status"] == "done"
    said = capsys.readouterr()
    files = [p.read_text() for p in out.rglob("*.json")]
    assert _leaks(json.dumps(summary), *files, said.out, said.err, everything_logged.text) == []


def _run_app(input_dir: Path, output_dir: Path, tasks: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "UNIMEDVL_TASKS": str(tasks)}
    env.pop("HOLOSCAN_MODEL_PATH", None)
    command = [sys.executable, str(APP / "app.py"), "-i", str(input_dir), "-o", str(output_dir), "-m",
               str(PARITY_CKPT), "-l", "DEBUG"]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)


def test_map_run_and_its_rejection_never_show_the_patient(study, tmp_path):
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"max_new_tokens": 3, "tasks": [
        {"task": "vqa", "questions": ["Is there a lesion?"]}, {"task": "report"}]}))
    rejected = _run_app(study["truncated"].parent, tmp_path / "none", tasks)  # nothing readable
    assert rejected.returncode == 2 and "cut.dcm" in rejected.stderr
    inputs = tmp_path / "in"
    shutil.copytree(study["good"].parent, inputs)
    other = pydicom.dcmread(study["good"])  # a broken instance of another series: skipped with its reason
    other.SeriesInstanceUID = other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    other.save_as(inputs / "cut.dcm", enforce_file_format=True)
    (inputs / "cut.dcm").write_bytes((inputs / "cut.dcm").read_bytes()[:-5000])
    done = _run_app(inputs, tmp_path / "out", tasks)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = (tmp_path / "out" / "summary.json").read_text()
    assert "cut.dcm" in summary and json.loads(summary)["series"]
    assert _leaks(rejected.stdout, rejected.stderr, done.stdout, done.stderr, summary) == []

