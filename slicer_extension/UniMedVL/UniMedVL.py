"""UniMedVL in 3D Slicer: ask about the slice in view (a conversation: each question is sent with the earlier
ones), draft a report, generate images and run image-to-image tasks on the current volume, with the model on a
UniMedVL server (remote) or in Slicer's Python (local).

The widget is thin: every setting lives in the module's parameter node (saved with the scene; declared in
UniMedVLLib/parameters.py), slow work runs as a UniMedVLLib.jobs.BackgroundJob polled by a timer, and all
model and scene logic is in UniMedVLLib.logic (Qt-free, tested outside Slicer).
"""

from __future__ import annotations

import os

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from UniMedVLLib import logic as core
from UniMedVLLib.backends import LOCAL_PACKAGE, RemoteBackend, load_local_backend, missing_local_requirements
from UniMedVLLib.conversation import Conversation
from UniMedVLLib.jobs import BackgroundJob, JobBusy, JobSlot
from UniMedVLLib.parameters import BACKENDS, SETTINGS, checkpoint_folder, parameter_node_class


def _parameter_node_class():
    from slicer import parameterNodeWrapper  # Slicer's own (needs Qt): the wrapper and its validators

    return parameter_node_class(parameterNodeWrapper.parameterNodeWrapper, parameterNodeWrapper, slicer)


UniMedVLParameterNode = _parameter_node_class()


class UniMedVL(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "UniMedVL"
        self.parent.categories = ["Image Synthesis"]
        self.parent.dependencies = []
        self.parent.contributors = ["UniMedVL for MONAI and 3D Slicer contributors"]
        self.parent.helpText = (
            "Ask questions about the slice in view (follow-up questions are read with the earlier ones), draft a "
            "report, generate images and translate the current volume's slices with UniMedVL. Generated images "
            "are synthetic: their nodes are named and marked as AI-generated. Research use only.")
        self.parent.acknowledgementText = "UniMedVL model: arXiv 2510.15710."


class UniMedVLLogic(ScriptedLoadableModuleLogic):
    """Slicer's logic of the module: the typed parameter node, and the Qt-free logic (``core``) that talks to
    the backend and makes the nodes."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.core = core.UniMedVLLogic()

    def getParameterNode(self):
        return UniMedVLParameterNode(super().getParameterNode())


class UniMedVLWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._jobs = JobSlot()  # one job at a time: the local model is shared
        self._on_done = self._on_failed = None
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._poll)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/UniMedVL.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = UniMedVLLogic()
        self.ui.tokenEdit.text = os.environ.get("UNIMEDVL_TOKEN", "")  # never saved with the scene
        for button, slot in ((self.ui.connectButton, self.onConnect), (self.ui.askButton, self.onAsk),
                             (self.ui.reportButton, self.onReport), (self.ui.generateButton, self.onGenerate),
                             (self.ui.runTaskButton, self.onImageTask), (self.ui.cancelButton, self.onCancel),
                             (self.ui.clearChatButton, self.onClearChat)):
            button.connect("clicked(bool)", slot)
        self.ui.questionEdit.connect("returnPressed()", self.onAsk)
        self.ui.taskCombo.connect("currentIndexChanged(int)", self._task_chosen)
        self.ui.scaleCombo.connect("currentIndexChanged(int)", self._scale_chosen)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self._set_busy(False)
        self.initializeParameterNode()

    def cleanup(self):
        self._stop_job()
        self.removeObservers()

    # ----- parameter node: saved with the scene, restored on load, back to defaults after close -----
    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        # a result arriving after the close must not land in the next scene; the thread is waited for
        stopped = self._stop_job()
        self._set_busy(False, "" if stopped else "the cancelled job is still stopping")
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._update_gui)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._update_gui)
            self._apply_registry()  # connectGui sets the annotated ranges; the registry's are tighter
            self._update_gui()

    def _update_gui(self, caller=None, event=None):
        p = self._parameterNode
        if p is None:
            return
        self.ui.sliceSpin.maximum = max(core.slice_count(p.inputVolume) - 1, 0)
        self.ui.sliceSpin.enabled = not p.useViewSlice
        remote = p.backend == BACKENDS[0]
        self.ui.serverUrlEdit.enabled = self.ui.tokenEdit.enabled = remote
        self.ui.checkpointPath.enabled = not remote
        self._select(self.ui.taskCombo, p.task)
        self._select(self.ui.scaleCombo, p.scale)
        if self._jobs.job is None:  # while an answer streams in, the panel shows it as it comes
            self._show_conversation()

    @staticmethod
    def _select(combo, value):
        index = combo.findData(value)
        if index >= 0 and combo.currentIndex != index:
            combo.currentIndex = index

    def _task_chosen(self, index):
        if self._parameterNode and index >= 0:
            self._parameterNode.task = self.ui.taskCombo.itemData(index)
        self.ui.scaleCombo.enabled = self.ui.taskCombo.currentData == "super_resolution"

    def _scale_chosen(self, index):
        if self._parameterNode and index >= 0:
            self._parameterNode.scale = int(self.ui.scaleCombo.itemData(index))

    def _show_conversation(self):
        conversation = Conversation.from_json(self._parameterNode.conversation)
        text = conversation.transcript(self.logic.core.notice)
        if self.ui.chatBrowser.toPlainText() != text:
            self.ui.chatBrowser.setPlainText(text)

    # ----- the backend and its task registry -----
    def _apply_registry(self):
        """Task names, scale choices and the size, step and guidance bounds from the backend's registry."""
        registry = self.logic.core.registry
        if not registry:
            return
        p = self._parameterNode
        for combo, items in ((self.ui.taskCombo, [(core.task_label(t["name"]), t["name"])
                                                  for t in core.image_to_image_tasks(registry)]),
                             (self.ui.scaleCombo, [(str(s), s) for s in self.logic.core.choices("super_resolution",
                                                                                                  "scale")])):
            if [combo.itemData(i) for i in range(combo.count)] != [data for _, data in items]:
                combo.blockSignals(True)  # refilling must not overwrite the saved choice
                combo.clear()
                for label, data in items:
                    combo.addItem(label, data)
                combo.blockSignals(False)
        bounds = core.generation_bounds(registry)
        for spin in (self.ui.heightSpin, self.ui.widthSpin):
            spin.setRange(bounds["multiple"], bounds["max_side"])
            spin.singleStep = bounds["multiple"]
        self.ui.stepsSpin.setRange(*bounds["steps"][:2])
        self.ui.guidanceSpin.setRange(*bounds["guidance"][:2])
        if p is not None and p.steps == _default("steps") and p.guidance == _default("guidance"):
            p.steps, p.guidance = bounds["steps"][2], bounds["guidance"][2]  # untouched: the registry's defaults
        if p is not None and (p.height, p.width) == (_default("height"), _default("width")):
            p.height, p.width = bounds["default_size"]

    def onConnect(self):
        p = self._parameterNode
        if p.backend == BACKENDS[0]:
            with slicer.util.tryWithErrorDisplay("Could not reach the UniMedVL server.", waitCursor=True):
                self._connected(RemoteBackend(p.serverUrl.strip(), self.ui.tokenEdit.text.strip() or None))
            return
        if not self._install_local_requirements():
            return
        folder = checkpoint_folder(p.checkpoint)
        self._run("loading the model...",
                  lambda progress, cancelled, text: load_local_backend(folder, progress=progress), self._connected)

    def _connected(self, backend):
        info = self.logic.core.connect(backend)
        self._apply_registry()
        self.ui.statusLabel.text = f"connected: {info.get('model')}"
        notice = self.logic.core.notice
        self.ui.noticeLabel.text = notice or "Generated images and text are AI output: synthetic, not for diagnosis."
        self._update_gui()

    def _install_local_requirements(self) -> bool:
        """Local mode's packages in Slicer's Python: PyTorch through the PyTorch extension (it picks the build
        for this computer's GPU), then unimedvl-core from PyPI; each after the user agrees."""
        missing = missing_local_requirements()
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay("Running the model on this computer needs the PyTorch extension: install "
                                         "it from the Extensions Manager and restart Slicer, or use a server.")
                return False
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is None:
                return False
        if LOCAL_PACKAGE in missing_local_requirements():
            if not slicer.util.confirmOkCancelDisplay(
                    f"Running the model on this computer needs the {LOCAL_PACKAGE} package and its dependencies "
                    "(transformers, diffusers, pydicom, ...: several hundred MB) in Slicer's Python, from PyPI. "
                    "Install them now? Slicer is busy until it is done.", "UniMedVL: install packages"):
                return False
            with slicer.util.tryWithErrorDisplay(f"Could not install {LOCAL_PACKAGE}.", waitCursor=True):
                slicer.util.pip_install(LOCAL_PACKAGE)
        return not missing_local_requirements()

    # ----- background work -----
    def _set_busy(self, busy: bool, text: str = ""):
        for button in (self.ui.askButton, self.ui.reportButton, self.ui.generateButton, self.ui.runTaskButton,
                       self.ui.connectButton, self.ui.clearChatButton):
            button.enabled = not busy
        self.ui.cancelButton.enabled = busy
        self.ui.statusLabel.text = text
        if not busy:
            self.ui.progressBar.value = 0

    def _run(self, label: str, work, done, failed=None):
        """``work(progress, cancelled, text)`` on a worker thread; ``done(result)`` or ``failed()`` here."""
        try:
            self._jobs.start(work)
        except JobBusy as err:
            if failed is not None:
                failed()
            self.ui.statusLabel.text = str(err)
            return
        self._on_done, self._on_failed = done, failed
        self._set_busy(True, label)
        self._timer.start()

    def _poll(self):
        for kind, value in self._jobs.poll():
            if kind == "progress":
                self.ui.progressBar.maximum, self.ui.progressBar.value = max(value[1], 1), value[0]
            elif kind == "text":
                self.ui.chatBrowser.moveCursor(qt.QTextCursor.End)
                self.ui.chatBrowser.insertPlainText(value)
            else:
                self._finish(kind, value)

    def _finish(self, kind, value):
        done, failed = self._on_done, self._on_failed
        self._stop_job()
        if kind == "done":
            self._set_busy(False, "done")
            with slicer.util.tryWithErrorDisplay("Could not add the result to the scene."):
                done(value)
        else:  # failed or cancelled: nothing lands, an unanswered question is dropped
            self._set_busy(False, "cancelled" if kind == "cancelled" else f"failed: {value}")
            if failed is not None:
                failed()
            if kind == "error":
                slicer.util.errorDisplay(str(value))
        self._update_gui()

    def _stop_job(self) -> bool:
        """Cancels the running job, drops its result and waits a while for its thread (True once ended)."""
        self._timer.stop()
        self._on_done = self._on_failed = None
        return self._jobs.stop()

    def _ready(self) -> bool:
        refusal = self._jobs.refusal()
        if refusal is not None:
            self.ui.statusLabel.text = refusal
            return False
        if self.logic.core.backend is None:
            self.onConnect()
        return self.logic.core.backend is not None and self._jobs.job is None

    def _volume_and_slice(self):
        volume = self._parameterNode.inputVolume
        if volume is None:
            raise ValueError("choose an input volume")
        if self._parameterNode.useViewSlice:
            slice_to_ras = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode().GetSliceToRAS()
            point = tuple(slice_to_ras.GetElement(r, 3) for r in range(3))
            normal = tuple(slice_to_ras.GetElement(r, 2) for r in range(3))
            return volume, core.UniMedVLLogic.slice_index_from_ras(volume, point, normal)
        return volume, int(self._parameterNode.sliceIndex)

    # ----- actions -----
    def onAsk(self):
        if not self._ready():
            return
        p, logic = self._parameterNode, self.logic.core
        with slicer.util.tryWithErrorDisplay("Could not ask.", waitCursor=False):
            volume, k = self._volume_and_slice()
            conversation = Conversation.from_json(p.conversation)
            conversation.ask(p.question, volume.GetID(), k)
            messages = conversation.messages(slicer.mrmlScene, logic.display_slice)
            question, p.conversation, p.question = p.question.strip(), conversation.to_json(), ""
            self.ui.chatBrowser.setPlainText(conversation.transcript(logic.notice) + "\nUniMedVL: ")

            def done(answer):
                conversation.answer(answer)
                p.conversation = conversation.to_json()
                logic.add_text_node(slicer.mrmlScene, f"UniMedVL answer (slice {k})", f"Q: {question}\nA: {answer}")

            def failed():
                conversation.drop_unanswered()
                p.conversation = conversation.to_json()

            self._run("answering...", lambda progress, cancelled, text: logic.compute_answer(
                messages, None, text, cancelled), done, failed)

    def _note(self, title, text):
        """Keep a report or an explanation in the panel's conversation (shown, saved, never sent)."""
        conversation = Conversation.from_json(self._parameterNode.conversation)
        conversation.note(title, text)
        self._parameterNode.conversation = conversation.to_json()

    def onClearChat(self):
        self._parameterNode.conversation = ""

    def onReport(self):
        if not self._ready():
            return
        logic = self.logic.core
        with slicer.util.tryWithErrorDisplay("Could not draft a report."):
            volume, k = self._volume_and_slice()
            image = logic.display_slice(volume, k)

            def done(text):
                logic.add_text_node(slicer.mrmlScene, f"UniMedVL draft report (slice {k})", text)
                self._note(core.report_title(k), text)

            self.ui.chatBrowser.append(f"\n{core.report_title(k)}:\n")  # the report streams in
            self._run("drafting the report...", lambda progress, cancelled, text: logic.compute_report(
                image, None, cancelled, text), done)

    def _generation_params(self):
        p = self._parameterNode
        return {"num_inference_steps": int(p.steps), "cfg_text_scale": float(p.guidance), "seed": int(p.seed)}

    def onGenerate(self):
        if not self._ready():
            return
        p, logic = self._parameterNode, self.logic.core
        with slicer.util.tryWithErrorDisplay("Could not generate."):
            prompt = logic.text_to_image_prompt(p.modality, p.prompt.strip())
            params = {**self._generation_params(), "height": int(p.height), "width": int(p.width)}

            def done(image):
                node = logic.add_image_node(slicer.mrmlScene, image, prompt, f"text-to-image: {prompt}")
                slicer.util.setSliceViewerLayers(background=node)

            self._run("generating...", lambda progress, cancelled, text: logic.compute_generation(
                prompt, params, progress, cancelled), done)

    def onImageTask(self):
        if not self._ready():
            return
        p, logic = self._parameterNode, self.logic.core
        with slicer.util.tryWithErrorDisplay("Could not run the task."):
            volume, k = self._volume_and_slice()
            task, params = p.task, self._generation_params()
            if p.instruction.strip():
                params["instruction"] = p.instruction.strip()
            if task == "super_resolution":
                params["scale"] = int(p.scale)
            image = logic.display_slice(volume, k)

            def done(result):
                output, explanation = result
                name = f"{core.task_label(task)} of {volume.GetName()} slice {k}"
                node = logic.add_image_node(slicer.mrmlScene, output, name, name, source_node=volume, k=k)
                if explanation:
                    node.SetAttribute("UniMedVL.Explanation", explanation[:2000])
                    self._note(core.EXPLANATION_TITLE, explanation)
                slicer.util.setSliceViewerLayers(foreground=node, foregroundOpacity=0.5)

            self._run(f"{core.task_label(task)}...", lambda progress, cancelled, text: logic.compute_image_task(
                task, image, params, progress, cancelled), done)

    def onCancel(self):
        if self._jobs.job is not None:
            self._jobs.cancel()
            self.ui.statusLabel.text = "cancelling..."


def _default(name: str):
    return next(s.default for s in SETTINGS if s.name == name)


class UniMedVLTest(ScriptedLoadableModuleTest):
    """Runs in Slicer: the parameter node through a scene save and load, and (when unimedvl-core with torch is
    installed in Slicer's Python) a two-question conversation and a super-resolution on a synthetic volume."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_settings_are_saved_with_the_scene()
        self.setUp()
        self.test_logic_on_a_synthetic_volume()

    def test_settings_are_saved_with_the_scene(self):
        import tempfile

        import numpy as np

        volume = slicer.util.addVolumeFromArray(np.zeros((4, 8, 8), dtype=np.int16), name="phantom")
        parameters = UniMedVLLogic().getParameterNode()
        parameters.inputVolume, parameters.sliceIndex, parameters.prompt = volume, 3, "two lesions"
        parameters.conversation = Conversation([]).to_json()
        scene_file = os.path.join(tempfile.mkdtemp(), "scene.mrb")
        self.assertTrue(slicer.util.saveScene(scene_file))
        slicer.mrmlScene.Clear()
        self.assertEqual(UniMedVLLogic().getParameterNode().sliceIndex, 0)  # a closed scene: the defaults
        slicer.mrmlScene.Clear()
        slicer.util.loadScene(scene_file)
        restored = UniMedVLLogic().getParameterNode()
        self.assertEqual((restored.sliceIndex, restored.prompt), (3, "two lesions"))
        self.assertEqual(restored.inputVolume.GetName(), "phantom")

    def test_logic_on_a_synthetic_volume(self):
        import numpy as np

        if missing_local_requirements():
            self.delayDisplay("unimedvl-core with torch is not installed; skipping the model test")
            return
        array = np.zeros((3, 64, 64), dtype=np.int16)
        array[:, 20:40, 20:40] = 500
        volume = slicer.util.addVolumeFromArray(array, name="phantom")
        job = BackgroundJob(lambda progress, cancelled, text: load_local_backend(progress=progress)).start()
        kind, backend = job.wait()[-1]
        self.assertEqual(kind, "done")
        logic = core.UniMedVLLogic(backend)
        logic.ask(volume, 1, "How many lesions are there?", max_new_tokens=4)
        answer, node = logic.ask(volume, 1, "Where is it?", max_new_tokens=4)
        self.assertEqual(len(logic.conversation.turns), 4)
        self.assertTrue(node.GetText().startswith("Q: Where is it?"))
        out, _ = logic.image_to_image(volume, 1, "super_resolution", {"scale": 2, "num_inference_steps": 2})
        self.assertEqual(out.GetAttribute(core.SYNTHETIC_ATTRIBUTE), "YES")
        self.delayDisplay("UniMedVL logic test passed")
