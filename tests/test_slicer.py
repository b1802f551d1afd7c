"""The Slicer extension: its Qt-free logic on MRML nodes (slicer-core) against a real server process on
loopback running a small model and against a model in this process, its settings and conversation through a
saved and reloaded scene, the client shipped for a bare Slicer, and the module, CMake and catalog files."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
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

from UniMedVLLib.backends import LocalBackend, RemoteBackend, missing_local_requirements, shipped_module  # noqa: E402
from UniMedVLLib.conversation import Conversation  # noqa: E402
from UniMedVLLib.jobs import BackgroundJob, JobBusy, JobSlot  # noqa: E402
from UniMedVLLib.logic import (  # noqa: E402
    NOTICE_ATTRIBUTE,
    SYNTHETIC_ATTRIBUTE,
    UniMedVLLogic,
    generation_bounds,
    slice_count,
    volume_array,
)
from UniMedVLLib.parameters import MANUAL_WIDGETS, SETTINGS, UNSAVED_WIDGETS, checkpoint_folder  # noqa: E402

from unimedvl_core.io.provenance import DEMO_NOTICE  # noqa: E402
from unimedvl_core.surfaces.client import Cancelled, ServerError, UniMedVLClient  # noqa: E402

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


def test_report_through_the_server(logic, scene):
    volume, _ = make_volume(scene)
    report, report_node = logic.report(volume, 1, max_new_tokens=6)
    assert report_node.GetText().startswith(report)
    assert report_node.GetAttribute("UniMedVL.Weights").startswith(logic.info["model"])
    assert logic.notice is None and report_node.GetAttribute(NOTICE_ATTRIBUTE) is None  # real (parity) weights


def test_conversation_through_the_server(logic, scene):
    if not hasattr(UniMedVLClient, "chat"):
        pytest.skip("UniMedVLClient.chat comes with the server's /v1/chat/completions (issue 15, point 3)")
    volume, _ = make_volume(scene)
    pieces = []
    first, _ = logic.ask(volume, 1, "Is there a lesion?", max_new_tokens=6, on_text=pieces.append)
    second, node = logic.ask(volume, 2, "And here?", max_new_tokens=6)
    assert "".join(pieces) == first and node.GetText() == f"Q: And here?\nA: {second}"
    assert [t.role for t in logic.conversation.turns] == ["user", "assistant", "user", "assistant"]


def _cancel_at_first_piece():
    """(pieces, on_text, cancelled): on_text keeps each piece and asks to cancel at the first."""
    pieces, cancel = [], threading.Event()

    def on_text(piece):
        pieces.append(piece)
        cancel.set()

    return pieces, on_text, cancel.is_set


def test_cancel_closes_a_streaming_remote_answer(logic, scene):
    """Cancel stops reading the server's stream (the server then stops decoding) and nothing lands; the
    server is free for the next question."""
    volume, _ = make_volume(scene)
    pieces, on_text, cancelled = _cancel_at_first_piece()
    with pytest.raises(Cancelled):
        logic.ask(volume, 1, _report_question()[0]["content"], max_new_tokens=24, on_text=on_text,
                  cancel=cancelled)
    assert len(pieces) == 1 and logic.conversation.turns == []
    assert scene.GetNumberOfNodesByClass("vtkMRMLTextNode") == 0
    answer, _ = logic.ask(volume, 1, "Is there a lesion?", max_new_tokens=4)
    assert answer and len(logic.conversation.turns) == 2


def test_a_remote_report_streams_into_the_logic(logic, scene):
    volume, _ = make_volume(scene)
    pieces = []
    logic.conversation = Conversation()
    report, node = logic.report(volume, 1, max_new_tokens=8, on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == report and node.GetText().startswith(report)
    assert report == logic.backend.client.report(UniMedVLLogic.display_slice(volume, 1), max_new_tokens=8)
    # the report stays in the chat panel (a note), but a following question is sent without it
    assert report in logic.conversation.transcript() and "Draft report (slice 1" in logic.conversation.transcript()
    logic.ask(volume, 1, "Is there a lesion?", max_new_tokens=2)
    assert [m["role"] for m in logic.conversation.messages(scene, UniMedVLLogic.display_slice)] == \
        ["user", "assistant"]


def test_notes_are_shown_and_saved_but_never_sent():
    conversation = Conversation()
    conversation.ask("a?", "vtkMRMLScalarVolumeNode1", 0)
    conversation.answer("yes")
    conversation.note("Explanation (AI-generated)", "Removed the lesion.")
    conversation.ask("b?", "vtkMRMLScalarVolumeNode1", 2)
    restored = Conversation.from_json(conversation.to_json())
    text = restored.transcript()
    assert text.index("UniMedVL: yes") < text.index("Removed the lesion.") < text.index("You (slice 2): b?")

    class Scene:
        def GetNodeByID(self, node_id):
            return node_id

    sent = restored.messages(Scene(), lambda volume, k: np.zeros((2, 2)))
    assert [m["content"] for m in sent] == ["a?", "yes", "b?"]


def test_cancel_closes_a_streaming_remote_report_and_the_server_stops(tiny_model, scene):
    """Cancel at the first piece of a report that would run to the longest allowed: ``Cancelled``, nothing
    lands, and the server's job ends cancelled (``done`` had it decoded on); the server answers the next."""
    from unimedvl_core.surfaces.server.app import Settings, create_app
    from unimedvl_core.tasks.catalog import MAX_NEW_TOKENS

    from .test_openai_compat import LoopbackServer

    app = create_app(model=tiny_model, settings=Settings(token=TOKEN))
    with LoopbackServer(app) as url:
        logic = UniMedVLLogic(RemoteBackend(url, TOKEN))
        volume, _ = make_volume(scene)
        pieces, on_text, cancelled = _cancel_at_first_piece()
        with pytest.raises(Cancelled):
            logic.report(volume, 1, max_new_tokens=MAX_NEW_TOKENS, cancel=cancelled, on_text=on_text)
        job = list(app.state.worker.jobs.values())[-1]
        assert len(pieces) == 1 and scene.GetNumberOfNodesByClass("vtkMRMLTextNode") == 0
        assert job.task == "report" and job.done_event.wait(60) and job.status == "cancelled"
        assert logic.report(volume, 1, max_new_tokens=2)[0]


def test_questions_go_to_the_server_in_the_openai_format(scene):
    import base64
    import io

    from UniMedVLLib.backends import openai_messages

    def npy_url(array):  # what the client's data_url makes: a .npy in a base64 data URL
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        return "data:application/x-npy;base64," + base64.b64encode(buf.getvalue()).decode()

    volume, _ = make_volume(scene)
    conversation = Conversation()
    conversation.ask("Is there a lesion?", volume.GetID(), 1)
    conversation.answer("yes")
    conversation.ask("Where?", volume.GetID(), 2)
    wire = openai_messages(conversation.messages(scene, UniMedVLLogic.display_slice), npy_url)
    assert [m["role"] for m in wire] == ["user", "assistant", "user"] and wire[1]["content"] == "yes"
    image_part, text_part = wire[2]["content"]
    assert text_part == {"type": "text", "text": "Where?"} and image_part["type"] == "image_url"
    sent = np.load(io.BytesIO(base64.b64decode(image_part["image_url"]["url"].split(",", 1)[1])))
    assert np.array_equal(sent, UniMedVLLogic.display_slice(volume, 2))
    json.dumps(wire)  # plain JSON, as the client posts it


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
        UniMedVLLogic(RemoteBackend(logic.backend.client.url, "wrong"))
    assert err.value.status == 401


# ----- local mode: the model in this process -----
@pytest.fixture(scope="module")
def local_logic():
    from unimedvl_core import UniMedVL

    return UniMedVLLogic(LocalBackend(UniMedVL.from_pretrained(PARITY_CKPT, device="cpu", progress=False)))


def test_the_conversation_is_sent_whole(local_logic, scene):
    """The second question goes to the model with the first question, its slice and its answer: the answer
    is the model's answer to the whole conversation, not to the last question alone."""
    volume, _ = make_volume(scene)
    local_logic.conversation = Conversation()
    first, _ = local_logic.ask(volume, 1, "How many lesions are there?", max_new_tokens=8)
    streamed = []
    second, node = local_logic.ask(volume, 2, "Is there a lesion?", max_new_tokens=8, on_text=streamed.append)
    model = local_logic.backend.model
    expected = model.chat([
        {"role": "user", "content": "How many lesions are there?", "images": [UniMedVLLogic.display_slice(volume, 1)]},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Is there a lesion?", "images": [UniMedVLLogic.display_slice(volume, 2)]}],
        max_new_tokens=8)
    single = model.answer(UniMedVLLogic.display_slice(volume, 2), "Is there a lesion?", max_new_tokens=8)
    assert second == expected == "".join(streamed) and second != single
    assert node.GetText().startswith(f"Q: Is there a lesion?\nA: {second}")


def test_a_failed_answer_leaves_the_conversation_as_it_was(local_logic, scene):
    volume, _ = make_volume(scene)
    local_logic.conversation = Conversation()
    with pytest.raises(ValueError, match="outside the volume"):
        local_logic.ask(volume, 7, "Is there a lesion?")
    assert local_logic.conversation.turns == []


def test_the_demo_models_notice_goes_with_its_outputs(scene, tmp_path):
    from unimedvl_core.inference.embedded import load_default_model

    logic = UniMedVLLogic(LocalBackend(load_default_model("cpu", None, False)))
    assert logic.notice == DEMO_NOTICE
    node = logic.add_text_node(scene, "answer", "Q: ?\nA: yes")
    assert node.GetText().count(DEMO_NOTICE) == 1 and node.GetAttribute(NOTICE_ATTRIBUTE) == DEMO_NOTICE
    conversation = Conversation()
    conversation.ask("a?", "vtkMRMLScalarVolumeNode1", 0)
    conversation.answer("yes")
    conversation.ask("b?", "vtkMRMLScalarVolumeNode1", 0)
    conversation.answer("no")
    assert conversation.transcript(logic.notice).count(DEMO_NOTICE) == 1  # once, not with every answer
    image = logic.add_image_node(scene, np.zeros((16, 16), np.uint8), "x", "text-to-image: x")
    assert image.GetAttribute(SYNTHETIC_ATTRIBUTE) == "YES" and image.GetAttribute(NOTICE_ATTRIBUTE) == DEMO_NOTICE
    assert image.GetName().startswith("AI-generated (synthetic)")


def test_loading_runs_off_the_calling_thread_with_progress():
    from UniMedVLLib.backends import load_local_backend

    caller = threading.get_ident()
    ran_on = []

    def work(progress, cancelled, text):
        ran_on.append(threading.get_ident())
        return load_local_backend(str(PARITY_CKPT), device="cpu", progress=progress)

    job = BackgroundJob(work).start()
    events = job.wait(timeout=300)
    assert ran_on and ran_on[0] != caller and job.finished
    assert [e[1] for e in events if e[0] == "progress"] == [(0, 3), (1, 3), (3, 3)]
    kind, backend = events[-1]
    assert kind == "done" and backend.info()["weights"]["demo"] is False
    failing = BackgroundJob(lambda progress, cancelled, text: load_local_backend(str(PARITY_CKPT / "nope"))).start()
    kind, err = failing.wait(timeout=60)[-1]
    assert kind == "error" and "nope" in str(err)


def test_a_job_hears_cancel_and_streams_text():
    """A cancelled job ends "cancelled" even when its work returns a result: the result never lands."""
    started = threading.Event()

    def work(progress, cancelled, text):
        text("a")
        started.set()
        while not cancelled():
            threading.Event().wait(0.01)
        text("after cancel")
        return "stopped"

    job = BackgroundJob(work).start()
    started.wait(5)
    job.cancel()
    assert job.wait(timeout=5) == [("text", "a"), ("cancelled", None)]


def _report_question() -> list[dict]:
    """A question the embedded model answers at length (a report), as a one-turn conversation."""
    image = np.zeros((64, 48), np.uint8)
    image[20:40, 10:30], image[28:32, 18:22] = 100, 230
    return [{"role": "user", "content": shipped_module("inference.prompts").report_prompt(None), "images": [image]}]


def _pieces(logic, cancel) -> list[str]:
    pieces = []
    logic.compute_answer(_report_question(), 24, pieces.append, cancel)
    return pieces


def test_cancel_stops_a_streaming_local_answer_and_nothing_lands(embedded_model, scene):
    logic = UniMedVLLogic(LocalBackend(embedded_model))
    assert len(_pieces(logic, None)) > 4  # uncancelled, the answer streams on
    streamed = []

    def work(progress, cancelled, text):
        def on_text(piece):  # the user presses Cancel as the first piece shows
            streamed.append(piece)
            text(piece)
            job.cancel()

        return logic.compute_answer(_report_question(), 24, on_text, cancelled)

    job = BackgroundJob(work)
    events = job.start().wait(timeout=60)
    assert len(streamed) == 1 and events == [("text", streamed[0]), ("cancelled", None)]
    # through ask: the cancelled question leaves the conversation and the scene as they were
    volume, _ = make_volume(scene)
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        logic.ask(volume, 1, _report_question()[0]["content"], max_new_tokens=24,
                  on_text=lambda piece: cancel.set(), cancel=cancel.is_set)
    assert logic.conversation.turns == [] and scene.GetNumberOfNodesByClass("vtkMRMLTextNode") == 0
    asked = []  # a report asks at the model's turn and then at every decoded piece
    with pytest.raises(Cancelled):
        logic.compute_report(_report_question()[0]["images"][0], 24, lambda: asked.append(1) or len(asked) >= 3)
    assert len(asked) == 3


def test_a_local_report_streams_its_pieces(embedded_model):
    pieces = []
    report = LocalBackend(embedded_model).report(_report_question()[0]["images"][0], 24, None, pieces.append)
    assert len(pieces) > 3 and "".join(pieces) == report


def test_two_threads_never_run_the_local_model_at_once(embedded_model, monkeypatch):
    """A second call waits for the first (the model's decoding workspaces are shared); a call cancelled while
    waiting gives up without touching the model."""
    backend = LocalBackend(embedded_model)
    inside, peak, entries = [0], [0], []
    entered_twice = threading.Event()
    real_chat = embedded_model.chat

    def counting_chat(*args, **kwargs):
        inside[0] += 1
        peak[0] = max(peak[0], inside[0])
        entries.append(threading.current_thread().name)
        if len(entries) == 2:
            entered_twice.set()
        try:
            return real_chat(*args, **kwargs)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(embedded_model, "chat", counting_chat)
    results = {}

    def call(name, cancel=None):
        try:
            results[name] = backend.chat(_report_question(), 12, None, cancel)
        except Cancelled:
            results[name] = "cancelled"

    others = [threading.Thread(target=call, args=("second",), name="second"),
              threading.Thread(target=call, args=("gave up", lambda: True), name="gave up")]

    def first_piece(piece):
        if others[0].ident is None:  # at the first piece, while this call holds the model
            for thread in others:
                thread.start()
            others[1].join(10)  # the cancelled waiter gives up while the first call holds the model
            entered_twice.wait(1)  # without the lock the second call would be inside by now

    results["first"] = backend.chat(_report_question(), 12, first_piece)
    others[0].join(60)
    assert peak[0] == 1 and entries == [threading.current_thread().name, "second"]
    assert results["gave up"] == "cancelled" and results["first"] == results["second"] != "cancelled"


def test_one_job_at_a_time_even_after_a_stop():
    """Stopping (scene close) cancels and drops the job; while its thread still runs no job starts."""
    release = threading.Event()
    slot = JobSlot()
    slot.start(lambda progress, cancelled, text: release.wait(30) and "first")  # hears no cancel
    with pytest.raises(JobBusy, match="another UniMedVL job is running"):
        slot.start(lambda progress, cancelled, text: "second")
    assert slot.stop(timeout=0.05) is False and slot.job is None and slot.poll() == []
    with pytest.raises(JobBusy, match="still stopping"):
        slot.start(lambda progress, cancelled, text: "second")
    release.set()
    assert slot.stop() is True and slot.refusal() is None
    assert slot.start(lambda progress, cancelled, text: "second").wait(5) == [("done", "second")]
    assert slot.poll() == [] and slot.job is None and slot.refusal() is None  # polled to the end: let go


def test_scene_close_stops_a_streaming_local_job_and_waits_for_it(embedded_model):
    logic = UniMedVLLogic(LocalBackend(embedded_model))
    slot, streamed, first = JobSlot(), [], threading.Event()

    def work(progress, cancelled, text):
        def on_text(piece):
            streamed.append(piece)
            first.set()
            while not cancelled():  # hold decoding here until the close has cancelled the job
                threading.Event().wait(0.01)

        return logic.compute_answer(_report_question(), 24, on_text, cancelled)

    job = slot.start(work)
    assert first.wait(60)
    assert slot.stop() is True  # the close returns once the thread has ended
    assert not job.running and len(streamed) == 1 and slot.poll() == []
    assert slot.start(lambda progress, cancelled, text: "next").wait(5)[-1] == ("done", "next")


# ----- settings and conversation saved with the scene -----
def _save_and_reload(scene, folder):
    for node in [scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
                 for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]:
        storage = node.CreateDefaultStorageNode()
        storage.SetFileName(str(folder / f"{node.GetName()}.nrrd"))
        scene.AddNode(storage)
        node.SetAndObserveStorageNodeID(storage.GetID())
        assert storage.WriteData(node)
    scene.SetURL(str(folder / "scene.mrml"))
    assert scene.Commit()
    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(folder / "scene.mrml"))
    assert loaded.Connect()
    return loaded


def test_the_conversation_comes_back_with_the_scene(scene, tmp_path):
    """Kept in the parameter node (a scripted module node's parameter), the conversation survives saving and
    loading the scene, and its questions are sent again with the same slices."""
    volume, _ = make_volume(scene)
    conversation = Conversation()
    conversation.ask("How many lesions are there?", volume.GetID(), 1)
    conversation.answer("one")
    conversation.ask("Is it round?", volume.GetID(), 2)
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "UniMedVL")
    node.SetParameter("conversation", conversation.to_json())
    before = conversation.messages(scene, UniMedVLLogic.display_slice)
    loaded = _save_and_reload(scene, tmp_path)
    text = loaded.GetFirstNodeByName("UniMedVL").GetParameter("conversation")
    after = Conversation.from_json(text).messages(loaded, UniMedVLLogic.display_slice)
    assert [(m["role"], m["content"]) for m in after] == [(m["role"], m["content"]) for m in before]
    assert all(np.array_equal(a, b) for x, y in zip(after, before) for a, b in zip(x.get("images", []),
                                                                                   y.get("images", [])))
    loaded.RemoveNode(loaded.GetFirstNodeByName("phantom"))
    with pytest.raises(ValueError, match="no longer in the scene"):
        Conversation.from_json(text).messages(loaded, UniMedVLLogic.display_slice)
    with pytest.raises(ValueError, match="cannot be read"):
        Conversation.from_json("[{\"who\": 1}]")
    assert Conversation.from_json("").turns == []


def _ui_widgets():
    tree = ET.parse(EXT / "Resources" / "UI" / "UniMedVL.ui")
    out = {}
    for widget in tree.iter("widget"):
        prop = next((p for p in widget.findall("property") if p.get("name") == "SlicerParameterName"), None)
        out[widget.get("name")] = (widget.get("class"), prop.find("string").text if prop is not None else None)
    return out


# the widget classes parameterNodeWrapper can bind to each kind of setting (docs/slicer.md#settings)
BINDABLE = {"node": {"qMRMLNodeComboBox"}, "bool": {"QCheckBox"}, "int": {"QSpinBox", "QSlider"},
            "float": {"QDoubleSpinBox", "ctkSliderWidget"}, "str": {"QLineEdit", "QTextEdit"},
            "path": {"ctkPathLineEdit"}, "choice": {"QComboBox"}}
INPUTS = {"QLineEdit", "QSpinBox", "QDoubleSpinBox", "QComboBox", "QCheckBox", "QRadioButton", "ctkPathLineEdit",
          "qMRMLNodeComboBox", "QSlider", "ctkSliderWidget", "QTextEdit"}


def test_every_gui_setting_is_in_the_parameter_node():
    widgets, settings = _ui_widgets(), {s.name: s for s in SETTINGS}
    bound = {name: parameter for name, (_, parameter) in widgets.items() if parameter}
    assert bound == {s.widget: s.name for s in SETTINGS if s.widget}  # the .ui and the table agree
    for widget, parameter in bound.items():
        assert widgets[widget][0] in BINDABLE[settings[parameter].kind], (widget, parameter)
    unsaved = {n for n, (cls, parameter) in widgets.items() if cls in INPUTS and not parameter}
    assert unsaved == set(MANUAL_WIDGETS) | UNSAVED_WIDGETS
    assert set(MANUAL_WIDGETS.values()) <= set(settings)
    for s in SETTINGS:  # defaults are values the bindings accept
        assert s.choices is None or s.default in s.choices, s.name
        assert s.minimum is None or s.minimum <= s.default <= s.maximum, s.name
    assert checkpoint_folder(settings["checkpoint"].default) is None
    assert checkpoint_folder("/m/UniMedVL") == "/m/UniMedVL"
    assert "QRadioButton" not in {cls for cls, _ in widgets.values()}  # no binding for radio buttons


def test_the_parameter_node_class_is_built_from_the_table():
    """What parameterNodeWrapper reads (type hints with their validators, class defaults), checked with
    stand-ins for Slicer's wrapper and validators, which need Slicer's Qt."""
    import typing
    from dataclasses import dataclass as data

    from UniMedVLLib.parameters import parameter_node_class

    validators = type("Validators", (), {"Choice": data(type("Choice", (), {"__annotations__": {"choices": list}})),
                                         "WithinRange": data(type("WithinRange", (), {"__annotations__": {
                                             "minimum": float, "maximum": float}}))})
    cls = parameter_node_class(lambda c: c, validators, slicer)
    hints = typing.get_type_hints(cls, include_extras=True)
    assert list(hints) == [s.name for s in SETTINGS]
    assert hints["inputVolume"] is slicer.vtkMRMLScalarVolumeNode and not hasattr(cls, "inputVolume")
    assert typing.get_args(hints["sliceIndex"]) == (int, validators.WithinRange(0, 2**31 - 1))
    assert typing.get_args(hints["backend"])[1].choices == ["UniMedVL server", "this computer"]
    assert (cls.steps, cls.guidance, cls.useViewSlice, cls.conversation) == (49, 4.0, True, "")


def test_spin_boxes_are_bounded_by_the_volume_and_the_registry(scene):
    from unimedvl_core.inference.embedded import load_default_model

    volume, _ = make_volume(scene)
    assert slice_count(volume) == 3 and slice_count(None) == 0
    logic = UniMedVLLogic(LocalBackend(load_default_model("cpu", None, False)))
    bounds = generation_bounds(logic.registry)
    limits = logic.info
    assert (bounds["max_side"], bounds["multiple"]) == (limits["max_image_side"], limits["size_multiple"])
    assert bounds["default_size"] == limits["default_size"]
    assert bounds["steps"] == (1, 200, 49) and bounds["guidance"][2] == 4.0
    assert logic.choices("super_resolution", "scale") == [2, 4]  # no 3
    ui = ET.parse(EXT / "Resources" / "UI" / "UniMedVL.ui")
    classes = {w.get("name"): w.get("class") for w in ui.iter("widget")}
    assert classes["scaleCombo"] == "QComboBox" and "scaleSpin" not in classes


# ----- remote mode in a bare Slicer: the shipped client -----
def _build_shipped(tmp_path) -> Path:
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    stub = "".join(f"macro({m})\nendmacro()\n" for m in ("slicerMacroBuildScriptedModule",
                                                          "slicer_add_python_unittest", "install"))
    script = tmp_path / "build.cmake"
    script.write_text(stub + f'set(CMAKE_BINARY_DIR "{tmp_path / "build"}")\n'
                      "set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/qt-scripted-modules)\n"
                      f'include("{EXT / "CMakeLists.txt"}")\n')
    out = subprocess.run([cmake, "-P", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return tmp_path / "build" / "lib" / "qt-scripted-modules"


def test_the_build_ships_the_client_and_a_bare_slicer_uses_it(tmp_path, server_url):
    """CMake copies unimedvl-core's client and prompts into UniMedVLLib; with unimedvl-core not importable
    (a bare Slicer), the backend takes the copies and talks to the server; with it, the package's modules."""
    lib = _build_shipped(tmp_path)
    client = lib / "UniMedVLLib" / "unimedvl_client.py"
    assert client.read_text() == (REPO / "unimedvl_core" / "surfaces" / "client.py").read_text()
    assert shipped_module("surfaces.client").__name__ == "unimedvl_core.surfaces.client"
    # the build tree's UniMedVLLib: the module's sources (as the build copies them) next to the shipped files
    for source in (EXT / "UniMedVLLib").glob("*.py"):
        shutil.copyfile(source, lib / "UniMedVLLib" / source.name)
    probe = (f"import sys; sys.modules['unimedvl_core'] = None; sys.path.insert(0, {str(lib)!r})\n"
             "from UniMedVLLib.backends import RemoteBackend, shipped_module, missing_local_requirements\n"
             "from UniMedVLLib.logic import UniMedVLLogic\n"
             f"logic = UniMedVLLogic(RemoteBackend({server_url!r}, {TOKEN!r}))\n"
             "print(shipped_module('surfaces.client').__file__)\n"
             "print(logic.info['model'], missing_local_requirements())\n"
             "print(logic.text_to_image_prompt('CT', 'two lesions.'))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    shipped_file, info, prompt = out.stdout.strip().splitlines()
    assert Path(shipped_file) == client
    assert info.endswith("['unimedvl-core']")
    from unimedvl_core.inference.prompts import text_to_image_prompt

    assert prompt == text_to_image_prompt("CT", "two lesions.")


def test_missing_local_requirements_names_what_to_install():
    assert missing_local_requirements() == []
    probe = (f"import sys; sys.modules['torch'] = None; sys.path.insert(0, {str(EXT)!r})\n"
             "from UniMedVLLib.backends import missing_local_requirements; print(missing_local_requirements())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.strip() == "['torch', 'unimedvl-core']", out.stderr[-2000:]


# ----- the module's files -----
def test_module_file_widget_names_exist_in_the_ui():
    source = (EXT / "UniMedVL.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    names = {w.get("name") for w in ET.parse(EXT / "Resources" / "UI" / "UniMedVL.ui").iter("widget")}
    assert used and used <= names, used - names
    tree = ast.parse(source)
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert classes == {"UniMedVL", "UniMedVLLogic", "UniMedVLWidget", "UniMedVLTest"}  # nothing unused
    for method in ("setParameterNode", "initializeParameterNode", "onSceneStartClose", "onSceneEndClose"):
        assert f"def {method}(" in source, method
    assert "installTorch(askConfirmation=True)" in source and "pip_install(LOCAL_PACKAGE)" in source
    assert "unimedvl_core" not in source  # a bare Slicer has no unimedvl-core: only UniMedVLLib imports it


# What the current Extensions Index entries carry (docs/slicer.md#extensions-index): the catalog entry schema
# v1.0.1 allows these keys only, requires three, and knows two source control types and three tiers.
CATALOG_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["$schema", "category", "scm_url"],
    "properties": {"$schema": {"type": "string"}, "category": {"type": "string"}, "scm_url": {"type": "string"},
                   "scm_revision": {"type": "string"}, "scm_type": {"enum": ["git", "local"]},
                   "build_dependencies": {"type": "array", "items": {"type": "string"}},
                   "build_subdirectory": {"type": "string"}, "enabled": {"type": "boolean"},
                   "tier": {"enum": [1, 3, 5]}}}
SCHEMA_URL = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#"


def test_catalog_entry_follows_the_extensions_index():
    jsonschema = pytest.importorskip("jsonschema")
    path = REPO / "slicer_extension" / "UniMedVL.json"
    raw = path.read_bytes()
    assert b"\r" not in raw and raw.endswith(b"\n")  # the index's checks want LF line endings
    entry = json.loads(raw)
    jsonschema.validate(entry, CATALOG_SCHEMA)
    assert entry["$schema"] == SCHEMA_URL
    assert entry["scm_url"].startswith("https://") and entry["category"] == "Image Synthesis"
    assert entry["build_dependencies"] == ["PyTorch"]  # PyTorchUtils installs torch for local mode
    top = (REPO / "CMakeLists.txt").read_text()
    assert re.search(r"project\((\w+)\)", top).group(1) == path.stem  # the index matches them by name
    assert f'set(EXTENSION_CATEGORY "{entry["category"]}")' in top and 'set(EXTENSION_DEPENDS "PyTorch")' in top
    for key in ("scmurl", "scmrevision"):  # the old key spellings the current index no longer accepts
        assert key not in entry


def test_cmake_files(tmp_path):
    top = (REPO / "CMakeLists.txt").read_text()
    assert "find_package(Slicer REQUIRED)" in top and "include(${Slicer_EXTENSION_CPACK})" in top
    subdir = re.search(r"add_subdirectory\((\S+)\)", top).group(1)
    module = (REPO / subdir / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in module
    listed = set(re.findall(r"\$\{MODULE_NAME\}(Lib/\w+\.py)", module))
    assert listed == {f"Lib/{p.name}" for p in (EXT / "UniMedVLLib").glob("*.py")}  # every module file ships
    for resource in re.findall(r"(Resources/[\w./${}]+)", module):
        assert (REPO / subdir / resource.replace("${MODULE_NAME}", "UniMedVL")).is_file(), resource
    _build_shipped(tmp_path)  # the files parse and run as CMake, with Slicer's macros stubbed
