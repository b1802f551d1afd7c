"""The ``unimedvl`` command line as users run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from unimedvl_core.data.phantoms import parse_count
from unimedvl_core.surfaces.cli import main

from .conftest import PARITY, PARITY_CKPT, dciodvfy_errors

CKPT = ["--ckpt", str(PARITY_CKPT), "--no-progress"]
FAST = ["--steps", "2"]


def test_vqa_prints_the_answer_and_writes_json(tmp_path, capsys):
    out = tmp_path / "answers.json"
    question = "Is there a lesion in the left lung? Answer yes or no."
    assert main(["vqa", *CKPT, "--image", str(PARITY / "image448.png"), "--question", question,
                 "--max-new-tokens", "8", "--json", str(out)]) == 0
    expected = json.loads((PARITY / "tiny_s0_expected.json").read_text())["vqa"]["text"]
    assert capsys.readouterr().out.strip() == expected
    assert json.loads(out.read_text())["results"][0]["text"] == expected


def test_generate_writes_a_labelled_png(tmp_path):
    out = tmp_path / "gen.png"
    assert main(["generate", *CKPT, *FAST, "--prompt", "two nodules", "--height", "64", "--width", "32",
                 "--out", str(out)]) == 0
    image = Image.open(out)
    assert image.size == (32, 64)
    assert image.text["SyntheticData"] == "YES" and "AI-generated" in image.text["Comment"]


def test_edit_of_a_dicom_writes_png_and_a_synthetic_derived_dicom(tmp_path):
    source_path = get_testdata_file("CT_small.dcm")
    out = tmp_path / "edit.png"
    assert main(["edit", *CKPT, *FAST, "--image", source_path, "--instruction", "Remove the lesion.",
                 "--out", str(out)]) == 0
    assert Image.open(out).text["SyntheticData"] == "YES"
    ds = pydicom.dcmread(out.with_suffix(".dcm"))
    src = pydicom.dcmread(source_path)
    assert ds.SyntheticData == "YES"
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert "AI-generated" in ds.DerivationDescription
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert dciodvfy_errors(out.with_suffix(".dcm")) == []


def test_per_slice_processing_of_a_multiframe_object(tmp_path):
    out = tmp_path / "slices"
    assert main(["translate", *CKPT, *FAST, "--image", get_testdata_file("emri_small.dcm"), "--slices", "2:4",
                 "--out", str(out)]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["slice_0002.png", "slice_0003.png"]
    dcms = [pydicom.dcmread(p) for p in sorted(out.glob("*.dcm"))]
    assert len({d.SeriesInstanceUID for d in dcms}) == 1 and [d.InstanceNumber for d in dcms] == [1, 2]
    assert [d.SourceImageSequence[0].ReferencedFrameNumber for d in dcms] == [3, 4]


def test_bad_input_exits_with_a_clear_message(tmp_path, capsys):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\x00" * 10)
    assert main(["vqa", *CKPT, "--image", str(bad), "--question", "Anything?"]) == 2
    err = capsys.readouterr().err
    assert "broken.dcm" in err and err.startswith("error:")
    assert main(["generate", *CKPT, "--prompt", "x", "--height", "33", "--out", str(tmp_path / "x.png")]) == 2
    assert "height must be a multiple of 16" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_console_script_runs_the_demo_on_the_embedded_default(tmp_path):
    exe = Path(sys.executable).with_name("unimedvl")  # the script installed beside this interpreter
    if not exe.is_file():
        pytest.skip("console script not installed")
    result = subprocess.run([exe, "demo", "--no-progress", "--steps", "2", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["outputs"]) == {"vqa", "report", "text_to_image", "super_resolution", "edit"}
    assert (tmp_path / "edit.dcm").is_file() and (tmp_path / "text_to_image.png").is_file()
    assert summary["model"] == "embedded default (phantom-trained)"
    # the input study is kept for the MAP, whose command is printed; the notice is said once
    study = tmp_path / "input" / "phantom_ct.dcm"
    assert pydicom.dcmread(study).SyntheticData == "YES" and summary["input_study"] == str(study.parent)
    assert f"python monai_deploy_app/app.py -i {study.parent} -o {tmp_path / 'map'}" in result.stdout
    assert summary["notice"] and result.stderr.count(summary["notice"]) == 1
    # The trained default reads the phantom's lesion count (deterministic: greedy decoding).
    assert parse_count(next(iter(summary["outputs"]["vqa"].values()))) == summary["truth"]["lesions"]
    assert pydicom.dcmread(tmp_path / "edit.dcm").SyntheticData == "YES"


def test_an_incomplete_embedded_model_is_a_clear_error(tmp_path, monkeypatch):
    import unimedvl_core.inference.embedded as defaults
    from unimedvl_core.io.checkpoint import CheckpointError

    monkeypatch.setattr(defaults, "DEFAULT_MODEL_DIR", tmp_path)
    with pytest.raises(CheckpointError, match="ema.safetensors, ae.safetensors missing"):
        defaults.load_default_model()


def test_outputs_never_overwrite_inputs(tmp_path, capsys):
    source = tmp_path / "orig.png"
    Image.open(PARITY / "image448.png").save(source)
    before = source.read_bytes()
    assert main(["contrast_translation", *CKPT, *FAST, "--image", str(source), "--out", str(source)]) == 2
    assert "is the input itself" in capsys.readouterr().err
    folder = tmp_path / "inputs"
    folder.mkdir()
    dicom = folder / "ct.dcm"
    dicom.write_bytes(open(get_testdata_file("CT_small.dcm"), "rb").read())
    # a PNG output named like the input DICOM would write its DICOM twin over the input
    assert main(["super_resolution", *CKPT, *FAST, "--image", str(dicom), "--out", str(folder / "ct.png")]) == 2
    assert "is the input itself" in capsys.readouterr().err
    assert main(["super_resolution", *CKPT, *FAST, "--image", str(folder), "--out", str(folder / "sr")]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert main(["edit", *CKPT, *FAST, "--image", str(dicom), "--instruction", "x", "--out", str(dicom)]) == 2
    assert source.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["ct.dcm"]


def test_exit_codes_and_one_line_errors(tmp_path, capsys, monkeypatch):
    import unimedvl_core.surfaces.cli as cli

    assert main(["serve", "--ckpt", str(tmp_path / "missing")]) == 2  # before any server starts
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint folder not found") and "Traceback" not in err

    def broken(args):
        raise RuntimeError("the model broke\nsecond line")

    monkeypatch.setattr(cli, "_load", broken)
    assert main(["vqa", "--image", str(PARITY / "image448.png"), "--question", "x"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "internal error: RuntimeError: the model broke" and "Traceback" not in err
    assert main(["--debug", "vqa", "--image", str(PARITY / "image448.png"), "--question", "x"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_json_names_the_weights(tmp_path):
    out = tmp_path / "a.json"
    assert main(["vqa", *CKPT, "--image", str(PARITY / "image448.png"), "--question", "x", "--max-new-tokens", "2",
                 "--json", str(out)]) == 0
    weights = json.loads(out.read_text())["weights"]
    assert weights["name"] == "tiny_s0" and weights["weights_file"] == "ema.safetensors"
    import hashlib

    assert weights["sha256"] == hashlib.sha256((PARITY_CKPT / "ema.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("argv, expected", [
    (["--slices", "abc"], "argument --slices: expected N (one slice"),
    (["--slices", "2:1"], "argument --slices: A:B needs 0 <= A < B"),
    (["--slices", "1:x"], "argument --slices: expected N"),
    (["--cfg-interval", "0.4"], "argument --cfg-interval: expected START,END"),
    (["--cfg-interval", "0.6,0.2"], "argument --cfg-interval: must satisfy 0 <= START <= END <= 1"),
    (["--steps", "0"], "argument --num-inference-steps/--steps: must be >= 1 and <= 200"),
    (["--window", "lungs"], "argument --window: expected CENTRE,WIDTH or a preset (soft_tissue, lung,"),
    (["--window", "40,-5"], "argument --window: the width must be above 0"),
])
def test_argument_errors_name_the_option_and_its_form(argv, expected, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["edit", "--image", str(PARITY / "image448.png"), "--instruction", "x", *argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and expected in err and "Traceback" not in err


def test_help_shows_defaults_limits_forms_and_examples(capsys):
    with pytest.raises(SystemExit):
        main(["text_to_image", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 49)" in text and "[>= 1 and <= 200]" in text and "(default: (0.4, 1.0))" in text
    assert "a multiple of 16, at most 128 for the embedded model" in text
    assert "examples: unimedvl text_to_image" in text and "(default: None)" not in text
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "A:B (slices A to B-1), all, or middle (default: middle)" in text
    assert "--series-report" in text and "--key-slices N" in text and "(default: 5)" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    from unimedvl_core.tasks.catalog import TASKS

    assert all(task.examples[0] in text for task in TASKS) and "unimedvl info" in text


def test_out_folder_names_files_from_the_input_and_task(tmp_path):
    folder = tmp_path / "results"
    assert main(["text_to_image", *CKPT, *FAST, "--prompt", "two nodules", "--out", f"{folder}/",
                 "--json", f"{folder}/"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["text_to_image.json", "text_to_image.png"]
    # an existing folder is a folder too, with or without the slash
    assert main(["edit", *CKPT, *FAST, "--image", get_testdata_file("CT_small.dcm"), "--instruction", "x",
                 "--out", str(folder)]) == 0
    assert {"CT_small_edit.png", "CT_small_edit.dcm"} <= {p.name for p in folder.iterdir()}
    assert not (tmp_path / "results.png").exists()


def test_ctrl_c_stops_cleanly_with_no_partial_file(tmp_path, capsys, monkeypatch):
    import unimedvl_core.io.dicom_output as dicom_output

    def interrupted(self, path, *args, **kwargs):
        Path(path).write_bytes(b"DICM half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(dicom_output.Dataset, "save_as", interrupted)
    out, record = tmp_path / "slices", tmp_path / "run.json"
    status = main(["translate", *CKPT, *FAST, "--image", get_testdata_file("emri_small.dcm"), "--slices", "2:4",
                   "--out", str(out), "--json", str(record)])
    err = capsys.readouterr().err
    assert status == 130 and "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["slice_0002.png"]  # whole files only, no .part left
    doc = json.loads(record.read_text())
    assert doc["status"] == "interrupted" and doc["results"] == []


def test_per_slice_outputs_of_a_nifti_volume_are_one_volume(tmp_path):
    import nibabel as nib
    import numpy as np

    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    data = np.random.default_rng(1).random((32, 32, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "t2.nii.gz")
    out = tmp_path / "flair"
    assert main(["contrast_translation", *CKPT, *FAST, "--image", str(tmp_path / "t2.nii.gz"), "--slices", "1:4",
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["flair.nii.gz"]
    volume = nib.load(out / "flair.nii.gz")
    assert volume.shape[2] == 3 and np.allclose(volume.affine[:3, 2], [0, 0, 3.0])
    assert np.allclose(volume.affine @ [-0.5, -0.5, 0, 1], affine @ [-0.5, -0.5, 1, 1])
    assert volume.header["descrip"].tobytes().startswith(b"SYNTHETIC")


def test_series_report_reads_key_slices_in_one_context(tmp_path, capsys, parity_model):
    from unimedvl_core.inference.prompts import report_prompt
    from unimedvl_core.io.medical_io import read_slices
    from unimedvl_core.tasks.catalog import TASKS

    path = get_testdata_file("emri_small.dcm")  # an MR of 10 frames
    record = tmp_path / "report.json"
    assert main(["report", *CKPT, "--image", path, "--series-report", "--key-slices", "3", "--max-new-tokens", "6",
                 "--json", str(record)]) == 0
    result = json.loads(record.read_text())["results"]
    assert len(result) == 1 and result[0]["slices"] == [1, 5, 8]
    key = read_slices(path, frames=[1, 5, 8])
    expected = parity_model.answer(key, report_prompt("MR"), max_new_tokens=6)
    assert result[0]["text"] == expected == capsys.readouterr().out.strip()
    # the registry gives every surface the same: a path in, one report of its key slices out
    run = TASKS.get("report").run(parity_model, path, {"series_report": True, "key_slices": 3, "max_new_tokens": 6})
    assert run.text == expected
    assert expected != parity_model.answer(key[1], report_prompt("MR"), max_new_tokens=6) or \
        expected != parity_model.answer(key[0], report_prompt("MR"), max_new_tokens=6)


def test_info_prints_limits_provenance_and_the_demo_notice(capsys):
    from unimedvl_core.io.provenance import DEMO_NOTICE

    assert main(["info", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "limits: generated images 16 to 128 px" in out and "20,000,000 pixels" in out
    assert "weights: embedded default (phantom-trained) (ema.safetensors sha256:" in out
    assert out.count(DEMO_NOTICE) == 2 and "phantom-only" in DEMO_NOTICE  # the line and the weights' JSON
    assert main(["info", *CKPT]) == 0
    out = capsys.readouterr().out
    assert DEMO_NOTICE not in out and '"notice": null' in out


def test_embedded_model_answers_and_images_say_it_is_a_demonstration_once(tmp_path, capsys):
    from unimedvl_core.io.provenance import DEMO_NOTICE

    record = tmp_path / "a.json"
    assert main(["vqa", "--no-progress", "--image", str(PARITY / "image448.png"), "--question", "Is this a CT?",
                 "--max-new-tokens", "4", "--json", str(record)]) == 0
    captured = capsys.readouterr()
    assert captured.err.count(DEMO_NOTICE) == 1 and DEMO_NOTICE not in captured.out
    assert json.loads(record.read_text())["notice"] == DEMO_NOTICE
    out = tmp_path / "edit.png"
    assert main(["edit", "--no-progress", *FAST, "--image", get_testdata_file("CT_small.dcm"), "--instruction", "x",
                 "--height", "32", "--width", "32", "--out", str(out)]) == 0
    assert capsys.readouterr().err.count(DEMO_NOTICE) == 1
    assert Image.open(out).text["UniMedVLNotice"] == DEMO_NOTICE
    assert DEMO_NOTICE in pydicom.dcmread(out.with_suffix(".dcm")).ImageComments
    assert main(["vqa", *CKPT, "--image", str(PARITY / "image448.png"), "--question", "x", "--max-new-tokens",
                 "2"]) == 0
    assert DEMO_NOTICE not in capsys.readouterr().err  # real (non-demo) weights: no notice
