"""UniMedVL in 3D Slicer: ask about the slice in view, draft a report, generate images and run image-to-image
tasks on the current volume, with the model on a UniMedVL server (remote) or in Slicer's Python (local).

The widget is thin: it reads the GUI, runs the logic (UniMedVLLib.logic) on a worker thread, polls it with a
timer, and puts results into the scene on the main thread.
"""

from __future__ import annotations

import os
import queue
import threading

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from UniMedVLLib.logic import ChatTurn, LocalBackend, RemoteBackend, UniMedVLLogic, image_to_image_tasks, task_label

DEFAULT_URL = "http://127.0.0.1:8765"


class UniMedVL(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "UniMedVL"
        self.parent.categories = ["Artificial Intelligence"]
        self.parent.dependencies = []
        self.parent.contributors = ["UniMedVL for MONAI and 3D Slicer contributors"]
        self.parent.helpText = (
            "Ask questions about the slice in view, draft a report, generate images and translate the current "
            "volume's slices with UniMedVL. Generated images are synthetic: their nodes are named and marked as "
            "AI-generated. Research use only.")
        self.parent.acknowledgementText = "UniMedVL model: arXiv 2510.15710."


class UniMedVLWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._results = queue.Queue()
        self._cancel = threading.Event()
        self._busy = False
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._poll)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/UniMedVL.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.ui.serverUrlEdit.text = os.environ.get("UNIMEDVL_SERVER", DEFAULT_URL)
        self.ui.connectButton.connect("clicked(bool)", self.onConnect)
        self.ui.askButton.connect("clicked(bool)", self.onAsk)
        self.ui.questionEdit.connect("returnPressed()", self.onAsk)
        self.ui.reportButton.connect("clicked(bool)", self.onReport)
        self.ui.generateButton.connect("clicked(bool)", self.onGenerate)
        self.ui.runTaskButton.connect("clicked(bool)", self.onImageTask)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.useViewSliceCheck.connect("toggled(bool)", lambda on: self.ui.sliceSpin.setEnabled(not on))
        self._set_busy(False)

    def cleanup(self):
        self._timer.stop()
        self.removeObservers()

    # ----- helpers -----
    def _backend(self):
        if self.ui.remoteRadio.checked:
            return RemoteBackend(self.ui.serverUrlEdit.text.strip(), self.ui.tokenEdit.text.strip() or None)
        return LocalBackend(self.ui.checkpointPath.currentPath or None)

    def _volume_and_slice(self):
        volume = self.ui.volumeSelector.currentNode()
        if volume is None:
            raise ValueError("choose an input volume")
        if self.ui.useViewSliceCheck.checked:
            slice_to_ras = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode().GetSliceToRAS()
            point = tuple(slice_to_ras.GetElement(r, 3) for r in range(3))
            normal = tuple(slice_to_ras.GetElement(r, 2) for r in range(3))
            return volume, UniMedVLLogic.slice_index_from_ras(volume, point, normal)
        return volume, int(self.ui.sliceSpin.value)

    def _set_busy(self, busy: bool, text: str = ""):
        self._busy = busy
        for button in (self.ui.askButton, self.ui.reportButton, self.ui.generateButton, self.ui.runTaskButton,
                       self.ui.connectButton):
            button.enabled = not busy
        self.ui.cancelButton.enabled = busy
        self.ui.statusLabel.text = text
        if not busy:
            self.ui.progressBar.value = 0

    def _start(self, label: str, work, done):
        """Run ``work(progress, cancelled)`` on a thread; ``done(result)`` runs on the main thread."""
        if self._busy:
            return
        if self.logic is None:
            self.onConnect()
            if self.logic is None:
                return
        self._cancel.clear()
        self._set_busy(True, label)

        def progress(step, total):
            self._results.put(("progress", (step, total)))

        def run():
            try:
                self._results.put(("done", (done, work(progress, self._cancel.is_set))))
            except Exception as err:  # shown in the status line and the error dialog
                self._results.put(("error", err))

        threading.Thread(target=run, daemon=True).start()
        self._timer.start()

    def _poll(self):
        while not self._results.empty():
            kind, value = self._results.get()
            if kind == "progress":
                step, total = value
                self.ui.progressBar.maximum = max(total, 1)
                self.ui.progressBar.value = step
            elif kind == "text":
                self.ui.chatBrowser.moveCursor(qt.QTextCursor.End)
                self.ui.chatBrowser.insertPlainText(value)
            elif kind == "done":
                callback, result = value
                self._timer.stop()
                self._set_busy(False, "done")
                with slicer.util.tryWithErrorDisplay("Could not add the result to the scene."):
                    callback(result)
            else:
                self._timer.stop()
                self._set_busy(False, f"failed: {value}")
                slicer.util.errorDisplay(str(value))

    # ----- actions -----
    def onConnect(self):
        with slicer.util.tryWithErrorDisplay("Could not reach the UniMedVL backend.", waitCursor=True):
            self.logic = UniMedVLLogic(self._backend())
            info = self.logic.backend.info()
            self.ui.statusLabel.text = f"connected: {info.get('model')}"
            size = info.get("default_size") or [256, 256]
            self.ui.heightSpin.value, self.ui.widthSpin.value = size
            self.ui.heightSpin.singleStep = self.ui.widthSpin.singleStep = info.get("size_multiple", 16)
            self._apply_task_registry(self.logic.backend.tasks())

    def _apply_task_registry(self, document: dict):
        """Task list and defaults from the backend's task registry (``GET /v1/tasks``): nothing is hard-coded."""
        self.ui.taskCombo.clear()
        for task in image_to_image_tasks(document):
            self.ui.taskCombo.addItem(task_label(task["name"]), task["name"])
        defaults = {p["name"]: p for t in document["tasks"] if t["name"] == "text_to_image" for p in t["params"]}
        steps, guidance = defaults.get("num_inference_steps"), defaults.get("cfg_text_scale")
        if steps:
            self.ui.stepsSpin.maximum, self.ui.stepsSpin.value = steps.get("maximum", 1000), steps["default"]
        if guidance:
            self.ui.guidanceSpin.value = guidance["default"]

    def onAsk(self):
        if self._busy:  # Enter in the question box while a request runs
            return
        with slicer.util.tryWithErrorDisplay("Could not ask.", waitCursor=False):
            volume, k = self._volume_and_slice()
            question = self.ui.questionEdit.text.strip()
            image = UniMedVLLogic.display_slice(volume, k)
            self.ui.chatBrowser.append(f"\nYou (slice {k}): {question}\nUniMedVL: ")
            self.ui.questionEdit.text = ""

            def work(progress, cancelled):
                return self.logic.compute_answer(image, question, on_text=lambda t: self._results.put(("text", t)))

            def done(answer):
                self.logic.history.append(ChatTurn(question, answer, k))
                self.logic.add_text_node(slicer.mrmlScene, f"UniMedVL answer (slice {k})",
                                         f"Q: {question}\nA: {answer}")

            self._start("answering...", work, done)

    def onReport(self):
        with slicer.util.tryWithErrorDisplay("Could not draft a report."):
            volume, k = self._volume_and_slice()
            image = UniMedVLLogic.display_slice(volume, k)

            def done(text):
                self.ui.chatBrowser.append(f"\nDraft report (slice {k}, AI-generated):\n{text}\n")
                self.logic.add_text_node(slicer.mrmlScene, f"UniMedVL draft report (slice {k})", text)

            self._start("drafting the report...", lambda progress, cancelled: self.logic.compute_report(image), done)

    def _generation_params(self):
        return {"num_inference_steps": int(self.ui.stepsSpin.value),
                "cfg_text_scale": float(self.ui.guidanceSpin.value), "seed": int(self.ui.seedSpin.value)}

    def onGenerate(self):
        with slicer.util.tryWithErrorDisplay("Could not generate."):
            prompt = self.ui.promptEdit.text.strip()
            modality = self.ui.modalityCombo.currentText
            if modality and modality != "(none)":
                from unimedvl_core.inference.prompts import text_to_image_prompt

                prompt = text_to_image_prompt(modality, prompt)
            params = {**self._generation_params(), "height": int(self.ui.heightSpin.value),
                      "width": int(self.ui.widthSpin.value)}

            def work(progress, cancelled):
                return self.logic.compute_generation(prompt, params, progress, cancelled)

            def done(image):
                node = self.logic.add_image_node(slicer.mrmlScene, image, prompt, f"text-to-image: {prompt}")
                slicer.util.setSliceViewerLayers(background=node)

            self._start("generating...", work, done)

    def onImageTask(self):
        with slicer.util.tryWithErrorDisplay("Could not run the task."):
            volume, k = self._volume_and_slice()
            task = self.ui.taskCombo.currentData
            params = {**self._generation_params()}
            if self.ui.instructionEdit.text.strip():
                params["instruction"] = self.ui.instructionEdit.text.strip()
            if task == "super_resolution":
                params["scale"] = int(self.ui.scaleSpin.value)
            image = UniMedVLLogic.display_slice(volume, k)

            def work(progress, cancelled):
                return self.logic.compute_image_task(task, image, params, progress, cancelled)

            def done(result):
                output, explanation = result
                name = f"{task_label(task)} of {volume.GetName()} slice {k}"
                node = self.logic.add_image_node(slicer.mrmlScene, output, name, name, source_node=volume, k=k)
                if explanation:
                    self.ui.chatBrowser.append(f"\nExplanation (AI-generated): {explanation}\n")
                slicer.util.setSliceViewerLayers(foreground=node, foregroundOpacity=0.5)

            self._start(f"{task_label(task)}...", work, done)

    def onCancel(self):
        self._cancel.set()
        self.ui.statusLabel.text = "cancelling..."


class UniMedVLLogicWrapper(ScriptedLoadableModuleLogic):
    """Slicer's logic class for this module: the Qt-free UniMedVLLib logic with a backend."""

    def __init__(self, backend=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.logic = UniMedVLLogic(backend)


class UniMedVLTest(ScriptedLoadableModuleTest):
    """Runs in Slicer: the logic on a synthetic volume against the local embedded model (skipped when
    unimedvl-core with torch is not installed in Slicer's Python)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_logic_on_a_synthetic_volume()

    def test_logic_on_a_synthetic_volume(self):
        import numpy as np

        try:
            backend = LocalBackend()
        except ImportError:
            self.delayDisplay("unimedvl-core with torch is not installed; skipping")
            return
        array = np.zeros((3, 64, 64), dtype=np.int16)
        array[:, 20:40, 20:40] = 500
        volume = slicer.util.addVolumeFromArray(array, name="phantom")
        logic = UniMedVLLogic(backend)
        answer, node = logic.ask(volume, 1, "How many lesions are there?", max_new_tokens=4)
        self.assertTrue(isinstance(answer, str) and node.GetText().startswith("Q:"))
        out, _ = logic.image_to_image(volume, 1, "super_resolution", {"scale": 2, "num_inference_steps": 2})
        self.assertEqual(out.GetAttribute("UniMedVL.SyntheticData"), "YES")
        self.delayDisplay("UniMedVL logic test passed")
