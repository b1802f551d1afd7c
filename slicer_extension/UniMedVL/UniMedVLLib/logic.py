"""The Slicer module's logic, without Qt: MRML volume nodes and slices to model inputs, a backend (the
UniMedVL server over HTTP, or the model in this process; ``backends.py``) and results back into MRML nodes.

Work is split so that a GUI can run the slow part off its main thread (``jobs.BackgroundJob``):
``compute_*`` methods take and return plain values (NumPy arrays, text, messages) and never touch the scene;
``add_*`` methods and the conversation's ``messages`` touch the scene and must run on the main thread.
``ask``/``report``/``generate``/``image_to_image`` do both, for scripts and tests. Generated images become
volume nodes named and marked as AI-generated (attribute ``UniMedVL.SyntheticData`` = ``YES``, the weights
that made them); image-to-image outputs keep the source slice's geometry. With the embedded demonstration
model, its notice goes with every answer and output (``UniMedVL.Notice``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .backends import Cancel, Progress, shipped_module
from .conversation import Conversation

__all__ = ["UniMedVLLogic", "SYNTHETIC_ATTRIBUTE", "NOTICE_ATTRIBUTE", "EXPLANATION_TITLE", "task_label",
           "report_title", "image_to_image_tasks", "param_spec", "generation_bounds", "slice_count", "volume_array"]

SYNTHETIC_ATTRIBUTE = "UniMedVL.SyntheticData"
NOTICE_ATTRIBUTE = "UniMedVL.Notice"


# How the chat panel titles entries that are not chat turns (Conversation.note).
EXPLANATION_TITLE = "Explanation (AI-generated)"


def report_title(k: int) -> str:
    return f"Draft report (slice {k}, AI-generated)"


def task_label(name: str) -> str:
    """A registry task name as the GUI shows it (``virtual_staining`` -> ``virtual staining``)."""
    return name.replace("_", " ")


def image_to_image_tasks(document: dict) -> list[dict]:
    """The tasks of a registry document (``GET /v1/tasks``) that take a slice and give back an image."""
    return [t for t in document["tasks"] if t["takes"] == "image" and t["returns"] == "image"]


def param_spec(document: dict, task: str, name: str) -> dict:
    """One parameter of one task in a registry document: default, bounds, choices."""
    for t in document["tasks"]:
        if t["name"] == task:
            for p in t["params"]:
                if p["name"] == name:
                    return p
    raise KeyError(f"the backend's registry has no parameter {name!r} for {task!r}")


def generation_bounds(document: dict) -> dict:
    """What bounds the text-to-image controls: the model's size limits (largest side, multiple, default size)
    and the sampling parameters' ranges and defaults, from the registry document."""
    limits = document["limits"]
    steps, guidance = (param_spec(document, "text_to_image", n) for n in ("num_inference_steps", "cfg_text_scale"))
    return {"max_side": limits["max_image_side"], "multiple": limits["size_multiple"],
            "default_size": list(limits["default_size"]),
            "steps": (steps["minimum"], steps["maximum"], steps["default"]),
            "guidance": (guidance["minimum"], guidance["maximum"], guidance["default"])}


# ----------------------------------------------------------------------------------------------------------
# volumes <-> arrays


def volume_array(volume_node) -> np.ndarray:
    """Voxels as a NumPy array indexed (k, j, i[, component]), as Slicer's arrayFromVolume gives them."""
    from vtk.util import numpy_support

    image = volume_node.GetImageData()
    if image is None:
        raise ValueError(f"volume {volume_node.GetName()} has no image data")
    dims = image.GetDimensions()
    comps = image.GetNumberOfScalarComponents()
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    shape = (dims[2], dims[1], dims[0]) + ((comps,) if comps > 1 else ())
    return array.reshape(shape)


def slice_count(volume_node) -> int:
    """How many k slices the volume has: the slice index's upper bound (0 for no volume or no image)."""
    image = volume_node.GetImageData() if volume_node is not None else None
    return image.GetDimensions()[2] if image is not None else 0


def _matrix(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _set_image(volume_node, array: np.ndarray) -> None:
    import vtk
    from vtk.util import numpy_support

    array = np.ascontiguousarray(array)
    comps = array.shape[3] if array.ndim == 4 else 1
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    flat = numpy_support.numpy_to_vtk(array.reshape(-1, comps) if comps > 1 else array.ravel(), deep=True)
    image.GetPointData().SetScalars(flat)
    volume_node.SetAndObserveImageData(image)


@dataclass
class UniMedVLLogic:
    """The module's logic over one backend; ``conversation`` is the chat panel's, ``info`` and ``registry``
    what the backend said about its model and tasks when connected."""

    backend: object = None
    conversation: Conversation = field(default_factory=Conversation)
    info: dict = field(default_factory=dict)
    registry: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.backend is not None and not self.info:
            self.connect(self.backend)

    def connect(self, backend) -> dict:
        """Use ``backend``: asks for its model (name, weights, limits) and task registry."""
        self.backend, self.info, self.registry = backend, backend.info(), backend.tasks()
        return self.info

    @property
    def notice(self) -> str | None:
        """The demonstration model's one-line notice (None for real weights), shown once with its outputs."""
        return (self.info.get("weights") or {}).get("notice")

    @property
    def weights(self) -> str:
        weights = self.info.get("weights") or {}
        digest = weights.get("sha256")
        return f"{self.info.get('model')}" + (f" (sha256:{digest[:12]})" if digest else "")

    def choices(self, task: str, name: str) -> list:
        """A parameter's allowed values from the registry (e.g. the super-resolution scales)."""
        return list(param_spec(self.registry, task, name).get("choices") or [])

    def text_to_image_prompt(self, modality: str | None, description: str) -> str:
        """The prompt for a modality chosen in the GUI, framed as the model was trained (prompts module)."""
        if not modality or modality == "(none)":
            return description
        return shipped_module("inference.prompts").text_to_image_prompt(modality, description)

    # ----- inputs -----
    @staticmethod
    def slice_index_from_ras(volume_node, ras: tuple[float, float, float],
                             view_normal: tuple[float, float, float] | None = None) -> int:
        """The k index of the volume slice through a RAS point (e.g. a slice view's centre). With the view's
        normal, the view must show the volume's k slices (not an oblique or other-axis reformat)."""
        import vtk

        if view_normal is not None:
            ijk_to_ras = vtk.vtkMatrix4x4()
            volume_node.GetIJKToRASMatrix(ijk_to_ras)
            k_axis = _matrix(ijk_to_ras)[:3, 2]
            cosine = abs(np.dot(k_axis, view_normal)) / (np.linalg.norm(k_axis) * np.linalg.norm(view_normal))
            if cosine < 0.99:
                raise ValueError("the view does not show the volume's own slices (another axis or oblique); "
                                 "pick the slice by index, or use the view matching the acquisition plane")
        ras_to_ijk = vtk.vtkMatrix4x4()
        volume_node.GetRASToIJKMatrix(ras_to_ijk)
        ijk = _matrix(ras_to_ijk) @ np.array([*ras, 1.0])
        depth = volume_node.GetImageData().GetDimensions()[2]
        return int(np.clip(np.rint(ijk[2]), 0, depth - 1))

    @staticmethod
    def display_slice(volume_node, k: int) -> np.ndarray:
        """Slice k as the user sees it: the display node's window/level applied (1st-99th percentile of the
        volume without one) to 8 bits; colour volumes as they are."""
        array = volume_array(volume_node)
        if not 0 <= k < array.shape[0]:
            raise ValueError(f"slice {k} is outside the volume (0..{array.shape[0] - 1})")
        plane = array[k]
        if plane.ndim == 3:
            return plane[..., :3].astype(np.uint8) if plane.dtype == np.uint8 else \
                np.clip(plane[..., :3], 0, 255).astype(np.uint8)
        display = volume_node.GetDisplayNode() if hasattr(volume_node, "GetDisplayNode") else None
        if display is not None and hasattr(display, "GetWindow") and display.GetWindow() > 0 \
                and not display.GetAutoWindowLevel():
            low = display.GetLevel() - display.GetWindow() / 2
            high = display.GetLevel() + display.GetWindow() / 2
        else:
            low, high = np.percentile(array, [1, 99])
        if high <= low:
            high = low + 1
        return np.clip(np.rint((plane.astype(np.float64) - low) * 255.0 / (high - low)), 0, 255).astype(np.uint8)

    # ----- computations (no scene access) -----
    def compute_answer(self, messages: list[dict], max_new_tokens: int | None = None,
                       on_text: Callable[[str], None] | None = None, cancel: Cancel | None = None) -> str:
        """The answer to the last question of ``messages`` (``Conversation.messages``), with every earlier
        turn in the model's context. Decoding stops (``Cancelled``) at the first piece after ``cancel()``."""
        return self.backend.chat(messages, max_new_tokens, on_text, cancel)

    def compute_report(self, image: np.ndarray, max_new_tokens: int | None = None, cancel: Cancel | None = None,
                       on_text: Callable[[str], None] | None = None) -> str:
        """A draft report of ``image``, streamed piece by piece to ``on_text``; decoding stops (``Cancelled``)
        at the first piece after ``cancel()``."""
        return self.backend.report(image, max_new_tokens, cancel, on_text)

    def compute_generation(self, prompt: str, params: dict, progress: Progress | None = None,
                           cancel: Cancel | None = None) -> np.ndarray:
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        return self.backend.generate(prompt, params, progress, cancel)

    def compute_image_task(self, task: str, image: np.ndarray, params: dict, progress: Progress | None = None,
                           cancel: Cancel | None = None) -> tuple[np.ndarray, str | None]:
        names = [t["name"] for t in image_to_image_tasks(self.registry)]
        if task not in names:
            raise ValueError(f"unknown image-to-image task {task!r}; the backend offers {', '.join(names)}")
        return self.backend.image_task(task, image, params, progress, cancel)

    # ----- results into the scene (main thread) -----
    def _label(self, node) -> None:
        node.SetAttribute("UniMedVL.Weights", self.weights[:200])
        if self.notice:
            node.SetAttribute(NOTICE_ATTRIBUTE, self.notice)

    def add_text_node(self, scene, name: str, text: str):
        node = scene.AddNewNodeByClass("vtkMRMLTextNode", name)
        node.SetText(text + (f"\n\n[{self.notice}]" if self.notice else ""))
        node.SetAttribute("UniMedVL.Generated", "YES")
        self._label(node)
        return node

    def add_image_node(self, scene, image: np.ndarray, name: str, description: str, source_node=None,
                       k: int | None = None):
        """A volume node holding a generated (H, W[, 3]) image, marked as AI-generated. With a source
        volume and slice, it is placed on that slice with the same extent (spacing scaled to its size)."""
        gray = image.ndim == 2 or (np.abs(image[..., 0].astype(int) - image[..., 1]).max() <= 2 and
                                   np.abs(image[..., 0].astype(int) - image[..., 2]).max() <= 2)
        if image.ndim == 3 and gray:
            image = image[..., 0]
        node_class = "vtkMRMLScalarVolumeNode" if image.ndim == 2 else "vtkMRMLVectorVolumeNode"
        node = scene.AddNewNodeByClass(node_class, f"AI-generated (synthetic): {name}"[:120])
        _set_image(node, image[None].astype(np.uint8))
        if source_node is not None and k is not None:
            import vtk

            source = vtk.vtkMatrix4x4()
            source_node.GetIJKToRASMatrix(source)
            dims = source_node.GetImageData().GetDimensions()
            ri, rj = dims[0] / image.shape[1], dims[1] / image.shape[0]
            # output voxel (i', j') centre = source continuous index ((i'+.5)ri-.5, (j'+.5)rj-.5, k)
            place = np.array([[ri, 0, 0, 0.5 * ri - 0.5], [0, rj, 0, 0.5 * rj - 0.5], [0, 0, 1, k], [0, 0, 0, 1]])
            matrix = _matrix(source) @ place
            out = vtk.vtkMatrix4x4()
            for r in range(4):
                for c in range(4):
                    out.SetElement(r, c, matrix[r, c])
            node.SetIJKToRASMatrix(out)
        node.SetAttribute(SYNTHETIC_ATTRIBUTE, "YES")
        node.SetAttribute("UniMedVL.Description", description[:1000])
        self._label(node)
        if hasattr(node, "CreateDefaultDisplayNodes"):
            node.CreateDefaultDisplayNodes()
        return node

    # ----- one call each, for scripts and tests -----
    def ask(self, volume_node, k: int, question: str, max_new_tokens: int | None = None, scene=None, on_text=None,
            cancel=None):
        """Asks about slice ``k`` as the next turn of the conversation; the answer is added to it and to a
        text node. A failed or cancelled answer leaves the conversation and the scene as they were."""
        scene = scene or volume_node.GetScene()
        self.conversation.ask(question, volume_node.GetID(), k)
        try:
            answer = self.compute_answer(self.conversation.messages(scene, self.display_slice), max_new_tokens,
                                         on_text, cancel)
        except BaseException:
            self.conversation.drop_unanswered()
            raise
        self.conversation.answer(answer)
        return answer, self.add_text_node(scene, f"UniMedVL answer (slice {k})", f"Q: {question}\nA: {answer}")

    def report(self, volume_node, k: int, max_new_tokens: int | None = None, scene=None, cancel=None, on_text=None):
        """A draft report of slice ``k``: in a text node, and as a note in the chat panel's conversation."""
        text = self.compute_report(self.display_slice(volume_node, k), max_new_tokens, cancel, on_text)
        self.conversation.note(report_title(k), text)
        return text, self.add_text_node(scene or volume_node.GetScene(), f"UniMedVL draft report (slice {k})", text)

    def generate(self, scene, prompt: str, params: dict | None = None, progress=None, cancel=None):
        image = self.compute_generation(prompt, params or {}, progress, cancel)
        return self.add_image_node(scene, image, prompt, f"text-to-image: {prompt}")

    def image_to_image(self, volume_node, k: int, task: str, params: dict | None = None, progress=None, cancel=None):
        image, explanation = self.compute_image_task(task, self.display_slice(volume_node, k), params or {},
                                                     progress, cancel)
        name = f"{task_label(task)} of {volume_node.GetName()} slice {k}"
        node = self.add_image_node(volume_node.GetScene(), image, name, name, source_node=volume_node, k=k)
        if explanation:
            node.SetAttribute("UniMedVL.Explanation", explanation[:2000])
            self.conversation.note(EXPLANATION_TITLE, explanation)
        return node, explanation

