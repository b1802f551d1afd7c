"""The same task with the same parameters and seed gives the same output through every surface: the Python
API, the CLI, the MONAI bundle, the server and the MONAI Deploy application (images bit-equal, text equal)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from monai.bundle import ConfigWorkflow
from PIL import Image
from pydicom.data import get_testdata_file

from unimedvl_core import UniMedVL
from unimedvl_core.io.medical_io import read_slices
from unimedvl_core.surfaces.cli import main
from unimedvl_core.surfaces.server.app import create_app

from .conftest import PARITY_CKPT
from .test_bundle import BUNDLE, CONFIGS
from .test_deploy import APP

QUESTION = "Is there a lesion in the left lung?"
TRANSLATION = {"source": "T1", "target": "T2", "num_inference_steps": 2, "seed": 3}
TOKENS = 6


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One CT image as a one-file DICOM series."""
    folder = tmp_path_factory.mktemp("study") / "ct"
    folder.mkdir()
    shutil.copyfile(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    return folder


@pytest.fixture(scope="module")
def cpu_model():
    model = UniMedVL.from_pretrained(PARITY_CKPT, device="cpu", progress=False)
    model.progress = False
    return model


@pytest.fixture(scope="module")
def api(study, cpu_model):
    src = read_slices(study / "ct.dcm", middle_only=True)[0]
    image = cpu_model.translate_contrast(src, "T1", "T2", num_inference_steps=2,
                                         generator=torch.Generator().manual_seed(TRANSLATION["seed"]))
    other_seed = cpu_model.translate_contrast(src, "T1", "T2", num_inference_steps=2,
                                              generator=torch.Generator().manual_seed(0))
    # the comparisons below can only pass by the same noise, parameters and input, not by a constant output
    assert np.asarray(image).std() > 1 and not np.array_equal(np.asarray(image), np.asarray(other_seed))
    return np.asarray(image), cpu_model.answer(src, QUESTION, max_new_tokens=TOKENS)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_cli_agrees_with_the_api(api, study, tmp_path, capsys):
    options = ["--ckpt", str(PARITY_CKPT), "--no-progress", "--image", str(study / "ct.dcm")]
    assert main(["contrast_translation", *options, "--source", "T1", "--target", "T2", "--num-inference-steps", "2",
                 "--seed", "3", "--out", str(tmp_path / "cli.png")]) == 0
    assert np.array_equal(_pixels(tmp_path / "cli.png"), api[0])
    capsys.readouterr()
    assert main(["vqa", *options, "--question", QUESTION, "--max-new-tokens", str(TOKENS)]) == 0
    assert capsys.readouterr().out.strip() == api[1]


def test_bundle_agrees_with_the_api(api, study, tmp_path):
    def run(task, params, out, **extra):
        wf = ConfigWorkflow(config_file=str(CONFIGS / "inference.json"), workflow_type="infer",
                            bundle_root=str(BUNDLE), task=task, task_params=params, dataset_dir=str(study.parent),
                            output_dir=str(out), ckpt_dir=str(PARITY_CKPT), device="cpu", **extra)
        wf.initialize()
        wf.run()
        return json.loads((out / "results.json").read_text())["results"]

    run("contrast_translation", TRANSLATION, tmp_path / "image", applies_to={})  # the MR task on this CT, as elsewhere
    assert np.array_equal(_pixels(next((tmp_path / "image").glob("*.png"))), api[0])
    texts = run("vqa", {"max_new_tokens": TOKENS}, tmp_path / "text", questions=[QUESTION])
    assert [r["text"] for r in texts] == [api[1]]


def test_server_agrees_with_the_api(api, study, cpu_model):
    with TestClient(create_app(model=cpu_model)) as client:
        data = (study / "ct.dcm").read_bytes()
        response = client.post("/v1/image-to-image/contrast_translation", files={"image": ("ct.dcm", data)},
                               data={"params": json.dumps(TRANSLATION), "output": "npy"})
        assert response.status_code == 200, response.text
        import io

        assert np.array_equal(np.load(io.BytesIO(response.content)), api[0])
        response = client.post("/v1/vqa", files={"image": ("ct.dcm", data)},
                               data={"question": QUESTION, "max_new_tokens": str(TOKENS)})
        assert response.json()["answer"] == api[1]


def test_map_agrees_with_the_api(api, study, tmp_path):
    tasks = tmp_path / "tasks.yaml"
    # applies_to: {} runs the MR task on this CT, as the other surfaces do (the MAP applies the registry's rules)
    tasks.write_text(yaml.safe_dump({"tasks": [{"task": "contrast_translation", **TRANSLATION, "applies_to": {}},
                                               {"task": "vqa", "questions": [QUESTION], "max_new_tokens": TOKENS}]}))
    out = tmp_path / "out"
    env = {**__import__("os").environ, "UNIMEDVL_TASKS": str(tasks)}
    result = subprocess.run([sys.executable, str(APP / "app.py"), "-i", str(study), "-o", str(out),
                             "-m", str(PARITY_CKPT)], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.array_equal(_pixels(next((out / "png").glob("*.png"))), api[0])
    summary = json.loads((out / "summary.json").read_text())
    assert [t["text"] for t in summary["series"][0]["texts"]] == [api[1]]
