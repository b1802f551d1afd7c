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
