"""The Slicer extension: its Qt-free logic on MRML nodes (slicer-core) against a real server process on
loopback running a small model, and the module and CMake files."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EXT = REPO / "slicer_extension" / "UniMedVL"
sys.path.insert(0, str(EXT))

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
vtk = pytest.importorskip("vtk")

from UniMedVLLib.logic import SYNTHETIC_ATTRIBUTE, RemoteBackend, UniMedVLLogic, volume_array  # noqa: E402

from unimedvl_core.surfaces.client import Cancelled, ServerError  # noqa: E402

from .conftest import PARITY_CKPT  # noqa: E402

TOKEN = "slicer-test-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url():
    port = _free_port()
    exe = Path(sys.executable).with_name("unimedvl")
    cmd = [str(exe), "serve", "--ckpt", str(PARITY_CKPT), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
           "--token", TOKEN]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    from unimedvl_core.surfaces.client import UniMedVLClient

    client = UniMedVLClient(url)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if client.health()["status"] == "ok":
                break
        except (ConnectionError, ServerError):
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def make_volume(scene, name="phantom"):
    array = np.zeros((3, 64, 48), dtype=np.int16)
    array[:, 20:40, 10:30] = 400
    array[1, 28:32, 18:22] = 900
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(48, 64, 3)
    from vtk.util import numpy_support

    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True))
    node.SetAndObserveImageData(image)
    node.SetSpacing(0.8, 0.8, 3.0)
    node.SetOrigin(-20.0, -25.0, 10.0)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(1000, 500)
    return node, array


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture
def logic(server_url):
    return UniMedVLLogic(RemoteBackend(server_url, TOKEN))


def test_display_slice_and_slice_lookup(scene):
    volume, array = make_volume(scene)
    assert np.array_equal(volume_array(volume), array)
    shown = UniMedVLLogic.display_slice(volume, 1)
    assert shown.dtype == np.uint8 and shown.shape == (64, 48)
    assert (shown[30, 20], shown[25, 15], shown[0, 0]) == (230, 102, 0)  # window 0..1000: 900, 400, 0
    assert UniMedVLLogic.slice_index_from_ras(volume, (-20 + 10 * 0.8, -25 + 5 * 0.8, 10 + 2 * 3.0)) == 2
    with pytest.raises(ValueError, match="outside the volume"):
        UniMedVLLogic.display_slice(volume, 3)
    assert UniMedVLLogic.slice_index_from_ras(volume, (0, 0, 13.0), (0, 0, 1)) == 1
    with pytest.raises(ValueError, match="does not show the volume's own slices"):
        UniMedVLLogic.slice_index_from_ras(volume, (0, 0, 13.0), (1, 0, 0))  # a sagittal view


def test_ask_and_report_through_the_server(logic, scene):
    volume, _ = make_volume(scene)
    pieces = []
    answer, node = logic.ask(volume, 1, "Is there a lesion?", max_new_tokens=6, on_text=pieces.append)
    assert isinstance(answer, str) and "".join(pieces) == answer
    assert node.GetText() == f"Q: Is there a lesion?\nA: {answer}"
    assert logic.history[-1].slice_index == 1
    report, report_node = logic.report(volume, 1, max_new_tokens=6)
    assert report_node.GetText() == report
    assert scene.GetNumberOfNodesByClass("vtkMRMLTextNode") == 2


def test_generation_becomes_a_synthetic_volume(logic, scene):
    steps = []
    node = logic.generate(scene, "CT image with one lesion.", {"height": 32, "width": 48, "num_inference_steps": 2},
                          progress=lambda s, t: steps.append((s, t)))
    assert node.GetAttribute(SYNTHETIC_ATTRIBUTE) == "YES" and node.GetName().startswith("AI-generated (synthetic)")
    assert node.GetImageData().GetDimensions()[:2] == (48, 32)
    assert steps and steps[-1] == (2, 2)
    with pytest.raises(Cancelled):
        logic.generate(scene, "CT image with one lesion.", {"height": 32, "width": 32, "num_inference_steps": 30},
                       cancel=lambda: True)


def test_image_to_image_keeps_the_source_slice_geometry(logic, scene):
    volume, _ = make_volume(scene)
    node, _ = logic.image_to_image(volume, 1, "super_resolution", {"scale": 2, "num_inference_steps": 2})
    assert node.GetAttribute(SYNTHETIC_ATTRIBUTE) == "YES"
    dims = node.GetImageData().GetDimensions()
    assert dims == (96, 128, 1)
    assert node.GetSpacing() == pytest.approx((0.4, 0.4, 3.0))

    def corner(n, ijk):
        m = vtk.vtkMatrix4x4()
        n.GetIJKToRASMatrix(m)
        return np.array(m.MultiplyPoint((*ijk, 1.0))[:3])

    # the outer edge of the first output voxel meets the outer edge of the first source voxel of slice 1
    assert corner(node, (-0.5, -0.5, 0)) == pytest.approx(corner(volume, (-0.5, -0.5, 1)))
    assert corner(node, (95.5, 127.5, 0)) == pytest.approx(corner(volume, (47.5, 63.5, 1)))


def test_counterfactual_explanation_comes_back(logic, scene):
    volume, _ = make_volume(scene)
    node, explanation = logic.image_to_image(volume, 1, "counterfactual",
                                             {"instruction": "Remove the lesion.", "num_inference_steps": 2})
    assert isinstance(explanation, str) and node.GetAttribute("UniMedVL.Explanation") == explanation[:2000]


def test_server_errors_reach_the_logic(logic, scene):
    volume, _ = make_volume(scene)
    with pytest.raises(ServerError) as err:
        logic.image_to_image(volume, 1, "edit", {"num_inference_steps": 2})  # edit needs an instruction
    assert err.value.status == 422
    with pytest.raises(ValueError, match="unknown (image-to-image )?task"):
        logic.image_to_image(volume, 1, "teleport")
    with pytest.raises(ServerError) as err:
        UniMedVLLogic(RemoteBackend(logic.backend.client.url, "wrong")).compute_report(np.zeros((8, 8), np.uint8))
    assert err.value.status == 401


# ----- the module's files -----
def test_module_file_widget_names_exist_in_the_ui():
    source = (EXT / "UniMedVL.py").read_text()
    ast.parse(source)
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    names = {w.get("name") for w in ET.parse(EXT / "Resources" / "UI" / "UniMedVL.ui").iter("widget")}
    assert used and used <= names, used - names
    tree = ast.parse(source)
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"UniMedVL", "UniMedVLWidget", "UniMedVLTest"} <= classes
    assert any(n.name.endswith("Logic") or "Logic" in n.name for n in tree.body if isinstance(n, ast.ClassDef))


def test_cmake_and_catalog_files(tmp_path):
    top = (REPO / "CMakeLists.txt").read_text()
    assert "find_package(Slicer REQUIRED)" in top and "include(${Slicer_EXTENSION_CPACK})" in top
    subdir = re.search(r"add_subdirectory\((\S+)\)", top).group(1)
    module = (REPO / subdir / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in module
    listed = re.findall(r"\$\{MODULE_NAME\}([\w./]*)", module)
    for suffix in listed:
        if suffix.startswith((".py", "Lib/")):
            assert (REPO / subdir / f"UniMedVL{suffix}").is_file(), suffix
    for resource in re.findall(r"(Resources/[\w./${}]+)", module):
        assert (REPO / subdir / resource.replace("${MODULE_NAME}", "UniMedVL")).is_file(), resource
    catalog = json.loads((REPO / "slicer_extension" / "UniMedVL.json").read_text())
    assert {"$schema", "build_subdirectory", "category", "scmurl", "scmrevision"} <= set(catalog)
    cmake = shutil.which("cmake")
    if cmake:
        # the files parse as CMake: a script mode run of the module file with the Slicer macro stubbed
        stub = "macro(slicerMacroBuildScriptedModule)\nendmacro()\nmacro(slicer_add_python_unittest)\nendmacro()\n"
        script = tmp_path / "cmake_check.cmake"
        script.write_text(stub + f'set(BUILD_TESTING ON)\ninclude("{REPO / subdir / "CMakeLists.txt"}")\n')
        out = subprocess.run([cmake, "-P", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
