"""The MONAI Deploy application on studies of every modality and encoding, with the default task list: each
series is processed (an SR; derived images where the rules apply an image task), skipped with its reason,
or the run is rejected with one line; one failing task never stops the others; the model, the folders and
the study's earlier synthetic outputs are handled as documented in monai_deploy_app/README.md."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file

from .conftest import PARITY_CKPT
from .dicom_studies import STUDIES, build_studies
from .test_deploy import APP, errors_of_its_own, run_app

CHARSETS = [name for name in STUDIES if name.startswith("charset_")]
FAST = {"num_inference_steps": 2, "max_new_tokens": 4}


def default_tasks(folder: Path, **extra) -> Path:
    """The MAP's own task list with few sampling steps and tokens (registry defaults overridden at the top)."""
    data = {**yaml.safe_load((APP / "tasks.yaml").read_text()), **FAST, **extra}
    path = folder / "tasks.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _sources(folder: Path) -> dict[str, Path]:
    """Series Instance UID -> one input file of it."""
    return {str(pydicom.dcmread(p, stop_before_pixels=True, force=True).SeriesInstanceUID): p
            for p in sorted(folder.rglob("*.dcm"))}


def _check_outputs_valid(out: Path, sources: dict[str, Path]) -> None:
    summary = _summary(out)
    for entry in summary["series"]:
        for output in entry["outputs"]:
            errors = errors_of_its_own(out / output["file"], sources[entry["series_instance_uid"]])
            assert errors == [], (output["file"], errors)


def _sr_text(path: Path) -> str:
    """Every text of an SR (content items, device and equipment descriptions)."""
    return "\n".join(str(e.value) for e in pydicom.dcmread(path).iterall() if e.VR in ("UT", "LO", "ST", "LT"))


def _one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stdout + result.stderr, result.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def modality_run(tmp_path_factory):
    """Every built study but the character-set variants (copies of the same instances) in one input folder,
    with an RT structure set and a text file beside them, through the MAP with the default task list."""
    root = tmp_path_factory.mktemp("map")
    names = [n for n in STUDIES if n not in CHARSETS]
    folders = build_studies(root / "in", names)
    shutil.copy(get_testdata_file("rtstruct.dcm"), root / "in" / "rtstruct.dcm")
    (root / "in" / "notes.txt").write_text("not DICOM")
    result = run_app(root / "in", root / "out", default_tasks(root))
    return root, folders, result


def test_every_modality_and_encoding_is_processed_or_skipped(modality_run):
    root, folders, result = modality_run
    assert result.returncode == 0, result.stderr[-3000:]
    summary = _summary(root / "out")
    assert summary["status"] == "complete" and summary["model"]["name"] == PARITY_CKPT.name
    skipped = {s["file"]: s["reason"] for s in summary["input"]["skipped"]}
    assert skipped["notes.txt"] == "not a DICOM file" and skipped["rtstruct.dcm"].startswith("not an image")
    series = {e["series_instance_uid"]: e for e in summary["series"]}
    for name, folder in folders.items():
        uids = {str(pydicom.dcmread(p, stop_before_pixels=True, force=True).SeriesInstanceUID)
                for p in folder.glob("*.dcm")}
        for uid in uids:
            entry = series[uid]  # every study was read, those PACS accept without a Modality or patient module too
            assert [o["kind"] for o in entry["outputs"]][0] == "sr", name
            runs = {r["task"]: r for r in entry["tasks"]}
            assert runs["vqa"]["status"] == runs["report"]["status"] == "done", (name, entry["tasks"])
            sr_run = runs["super_resolution"]
            images = [o for o in entry["outputs"] if o["kind"] == "image"]
            assert sr_run["status"] in ("done", "not_applicable"), (name, sr_run)
            assert bool(images) == (sr_run["status"] == "done"), name
    cr = series[str(pydicom.dcmread(next(folders["cr"].glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)]
    assert "not for CR" in next(r["reason"] for r in cr["tasks"] if r["task"] == "super_resolution")
    corrected = {c["file"] for c in summary["input"]["corrected"]}
    assert {"sc_deflated_dfl/image_dfl.dcm", "sc_jpeg_no_colour_transform/SC_jpeg_no_color_transform.dcm",
            "sc_j2k_gdcm_no_patient/GDCMJ2K_TextGBR.dcm"} <= corrected


def test_outputs_of_every_modality_are_valid_dicom(modality_run):
    root, _, result = modality_run
    assert result.returncode == 0, result.stderr[-3000:]
    _check_outputs_valid(root / "out", _sources(root / "in"))


def test_character_sets_and_packaged_model_layout(tmp_path):
    """ISO 2022 and other character sets through the writer; the checkpoint found in the packager's
    ``models/<name>/`` layout and named (with its SHA-256) in the summary and the SR."""
    build_studies(tmp_path / "in", CHARSETS)
    models = tmp_path / "models"
    shutil.copytree(PARITY_CKPT, models / "UniMedVL")
    result = run_app(tmp_path / "in", tmp_path / "out", default_tasks(tmp_path), model=models)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = _summary(tmp_path / "out")
    digest = hashlib.sha256((PARITY_CKPT / "ema.safetensors").read_bytes()).hexdigest()
    assert summary["model"]["name"] == "UniMedVL" and summary["model"]["sha256"] == digest
    assert not summary["model"]["demo"]
    assert len(summary["series"]) == len(CHARSETS)
    assert digest[:12] in _sr_text(tmp_path / "out" / summary["series"][0]["outputs"][0]["file"])
    _check_outputs_valid(tmp_path / "out", _sources(tmp_path / "in"))


def test_a_failing_task_leaves_the_others_and_earlier_outputs_are_not_read(modality_run, tmp_path):
    root, folders, _ = modality_run
    study = tmp_path / "in"
    shutil.copytree(folders["ct"], study / "ct")
    earlier = _summary(root / "out")
    ct_uid = str(pydicom.dcmread(next(folders["ct"].glob("*.dcm"))).SeriesInstanceUID)
    for output in next(e for e in earlier["series"] if e["series_instance_uid"] == ct_uid)["outputs"]:
        shutil.copy(root / "out" / output["file"], study / "ct")  # our SR and derived CT beside the source
    # text_to_image at 4096 px passes the task file's checks but exceeds the model's limit when it runs
    tasks = default_tasks(tmp_path)
    data = yaml.safe_load(tasks.read_text())
    data["tasks"].append({"task": "text_to_image", "prompts": ["a chest CT"], "width": 4096, "height": 4096})
    tasks.write_text(yaml.safe_dump(data))
    result = run_app(study, tmp_path / "out", tasks)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = _summary(tmp_path / "out")
    assert summary["status"] == "partial" and len(summary["series"]) == 1
    runs = {r["task"]: r for r in summary["series"][0]["tasks"]}
    assert runs["text_to_image"]["status"] == "failed" and "4096" in runs["text_to_image"]["reason"]
    assert all(runs[t]["status"] == "done" for t in ("vqa", "report", "super_resolution"))
    own = [s for s in summary["input"]["skipped"] if "output of UniMedVL" in s["reason"]]
    assert len(own) == 2 and summary["input"]["usable_files"] == 1
    text = _sr_text(tmp_path / "out" / summary["series"][0]["outputs"][0]["file"])
    assert "text_to_image" in text and "failed" in text


def test_demo_model_only_when_asked_and_then_labelled(tmp_path):
    build_studies(tmp_path / "in", ["mr"])
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({**FAST, "tasks": [{"task": "vqa", "questions": ["Is there a lesion?"]}]}))
    refused = run_app(tmp_path / "in", tmp_path / "out", tasks, model=None)
    assert refused.returncode == 2 and "UNIMEDVL_ALLOW_DEMO_MODEL=1" in _one_line(refused)
    assert not (tmp_path / "out").exists()
    result = run_app(tmp_path / "in", tmp_path / "out", tasks, model=None, env={"UNIMEDVL_ALLOW_DEMO_MODEL": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = _summary(tmp_path / "out")
    assert summary["model"]["demo"] and "phantom-only demonstration model" in summary["model"]["notice"]
    assert "demonstration" in _sr_text(tmp_path / "out" / summary["series"][0]["outputs"][0]["file"])


def test_model_folder_with_two_checkpoints_is_rejected(tmp_path):
    build_studies(tmp_path / "in", ["ct"])
    for name in ("a", "b"):
        shutil.copytree(PARITY_CKPT, tmp_path / "models" / name)
    result = run_app(tmp_path / "in", tmp_path / "out", default_tasks(tmp_path), model=tmp_path / "models")
    assert result.returncode == 2 and "several checkpoints (a, b)" in _one_line(result)
    assert not (tmp_path / "out").exists()


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_output_inside_the_input_is_refused_and_the_input_untouched(tmp_path):
    study = build_studies(tmp_path, ["ct"])["ct"]
    before = _tree(study)
    result = run_app(study, study / "out", default_tasks(tmp_path))
    assert result.returncode == 2 and "lies inside the input folder" in _one_line(result)
    assert _tree(study) == before and not (study / "out").exists()


def test_rejected_input_summary_goes_to_the_named_file(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(get_testdata_file("rtstruct.dcm"), inp / "rtstruct.dcm")
    (inp / "scan.txt").write_text("not DICOM")
    target = tmp_path / "verdict" / "summary.json"
    result = run_app(inp, tmp_path / "out", default_tasks(tmp_path), env={"UNIMEDVL_SUMMARY": str(target)})
    line = _one_line(result)
    assert result.returncode == 2 and line.startswith("unimedvl: rejected: no usable DICOM image")
    assert "rtstruct.dcm: not an image" in line and not (tmp_path / "out").exists()
    summary = json.loads(target.read_text())
    assert summary["status"] == "rejected" and summary["exit_code"] == 2
    assert {s["file"] for s in summary["input"]["skipped"]} == {"rtstruct.dcm", "scan.txt"}
