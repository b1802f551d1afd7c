"""The Slicer module's logic, without Qt: MRML volume nodes and slices to model inputs, a backend (the
UniMedVL server over HTTP, or the model in this process) and results back into MRML nodes.

Work is split so that a GUI can run the slow part off its main thread: ``compute_*`` methods take and
return plain values (NumPy arrays, text) and never touch the scene; ``add_*`` methods create nodes and
must run on the main thread. ``ask``/``report``/``generate``/``image_to_image`` do both, for scripts and
tests. Generated images become volume nodes named and marked as AI-generated (attribute
``UniMedVL.SyntheticData`` = ``YES``); image-to-image outputs keep the source slice's geometry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["UniMedVLLogic", "RemoteBackend", "LocalBackend", "SYNTHETIC_ATTRIBUTE", "ChatTurn", "task_label",
           "image_to_image_tasks"]

SYNTHETIC_ATTRIBUTE = "UniMedVL.SyntheticData"


def task_label(name: str) -> str:
    """A registry task name as the GUI shows it (``virtual_staining`` -> ``virtual staining``)."""
    return name.replace("_", " ")


def image_to_image_tasks(document: dict) -> list[dict]:
    """The tasks of a registry document (``GET /v1/tasks``) that take a slice and give back an image."""
    return [t for t in document["tasks"] if t["takes"] == "image" and t["returns"] == "image"]

Progress = Callable[[int, int], None]
Cancel = Callable[[], bool]


def _slicer():
    import slicer  # the Slicer application, or slicer-core's MRML classes outside it

    return slicer


# ----------------------------------------------------------------------------------------------------------
# backends: the same five calls over HTTP or in process


class RemoteBackend:
    """The UniMedVL server, through the dependency-free client of unimedvl-core."""

    def __init__(self, url: str, token: str | None = None):
        from unimedvl_core.surfaces.client import UniMedVLClient

        self.client = UniMedVLClient(url, token=token or None)

    def info(self) -> dict:
        return self.client.info()

    def tasks(self) -> dict:
        return self.client.tasks()

    def vqa(self, image: np.ndarray, question: str, max_new_tokens: int, on_text: Callable[[str], None] | None):
        if on_text is None:
            return self.client.vqa(image, question, max_new_tokens=max_new_tokens)
        pieces = []
        for piece in self.client.vqa_stream(image, question, max_new_tokens=max_new_tokens):
            pieces.append(piece)
            on_text(piece)
        return "".join(pieces)

    def report(self, image: np.ndarray, max_new_tokens: int) -> str:
        return self.client.report(image, max_new_tokens=max_new_tokens)

    def generate(self, prompt: str, params: dict, progress: Progress | None, cancel: Cancel | None) -> np.ndarray:
        job = self.client.submit_generate(prompt, **params)
        return self.client.wait(job, progress=progress, should_cancel=cancel)[0]

    def image_task(self, task: str, image: np.ndarray, params: dict, progress: Progress | None,
                   cancel: Cancel | None) -> tuple[np.ndarray, str | None]:
        job = self.client.submit_image_task(task, image, params)
        return self.client.wait(job, progress=progress, should_cancel=cancel)


class LocalBackend:
    """The model in Slicer's own Python (needs torch and unimedvl-core with its dependencies); every call runs a
    task of the registry, as the server does."""

    def __init__(self, ckpt_dir: str | None = None, device: str | None = None):
        from unimedvl_core.inference.embedded import load_model

        self.model = load_model(ckpt_dir or None, device=device, progress=False)
        self.model.progress = False

    def info(self) -> dict:
        m = self.model
        return {"model": m.name, "default_size": list(m.config.default_generation_size),
                "size_multiple": m.config.latent_downsample, "max_image_side": m.config.max_image_side}

    def tasks(self) -> dict:
        from unimedvl_core.tasks.catalog import TASKS
        from unimedvl_core.tasks.registry import ModelLimits

        return TASKS.describe(ModelLimits.of(self.model.config))

    def _run(self, task: str, image, params: dict, progress=None, cancel=None, on_text=None):
        from unimedvl_core.tasks.catalog import TASKS
        from unimedvl_core.tasks.registry import RunOptions

        options = RunOptions(callback=self._callback(progress, cancel), streamer=on_text)
        return TASKS.get(task).run(self.model, image, params, options)

    def vqa(self, image, question, max_new_tokens, on_text):
        params = {"question": question, **({"max_new_tokens": max_new_tokens} if max_new_tokens else {})}
        return self._run("vqa", image, params, on_text=on_text).text

    def report(self, image, max_new_tokens):
        return self._run("report", image, {"max_new_tokens": max_new_tokens} if max_new_tokens else {}).text

    @staticmethod
    def _callback(progress, cancel):
        from unimedvl_core.surfaces.server.worker import JobCancelled

        def callback(step, total):
            if progress is not None:
                progress(step, total)
            if cancel is not None and cancel():
                raise JobCancelled("cancelled")

        return callback

    def generate(self, prompt, params, progress, cancel):
        result = self._run("text_to_image", None, {**params, "prompt": prompt}, progress, cancel)
        return np.asarray(result.image)

    def image_task(self, task, image, params, progress, cancel):
        result = self._run(task, image, params, progress, cancel)
        return np.asarray(result.image), result.text


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
class ChatTurn:
    question: str
    answer: str
    slice_index: int


@dataclass
class UniMedVLLogic:
    backend: object = None
    history: list[ChatTurn] = field(default_factory=list)

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
    def compute_answer(self, image: np.ndarray, question: str, max_new_tokens: int | None = None,
                       on_text: Callable[[str], None] | None = None) -> str:
        if not question.strip():
            raise ValueError("the question is empty")
        return self.backend.vqa(image, question, max_new_tokens, on_text)

    def compute_report(self, image: np.ndarray, max_new_tokens: int | None = None) -> str:
        return self.backend.report(image, max_new_tokens)

    def compute_generation(self, prompt: str, params: dict, progress: Progress | None = None,
                           cancel: Cancel | None = None) -> np.ndarray:
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        return self.backend.generate(prompt, params, progress, cancel)

    def compute_image_task(self, task: str, image: np.ndarray, params: dict, progress: Progress | None = None,
                           cancel: Cancel | None = None) -> tuple[np.ndarray, str | None]:
        names = [t["name"] for t in image_to_image_tasks(self.backend.tasks())]
        if task not in names:
            raise ValueError(f"unknown image-to-image task {task!r}; the backend offers {', '.join(names)}")
        return self.backend.image_task(task, image, params, progress, cancel)

    # ----- results into the scene (main thread) -----
    def add_text_node(self, scene, name: str, text: str):
        node = scene.AddNewNodeByClass("vtkMRMLTextNode", name)
        node.SetText(text)
        node.SetAttribute("UniMedVL.Generated", "YES")
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
        if hasattr(node, "CreateDefaultDisplayNodes"):
            node.CreateDefaultDisplayNodes()
        return node

    # ----- one call each, for scripts and tests -----
    def ask(self, volume_node, k: int, question: str, max_new_tokens: int | None = None, scene=None, on_text=None):
        answer = self.compute_answer(self.display_slice(volume_node, k), question, max_new_tokens, on_text)
        self.history.append(ChatTurn(question, answer, k))
        node = self.add_text_node(scene or volume_node.GetScene(), f"UniMedVL answer (slice {k})",
                                  f"Q: {question}\nA: {answer}")
        return answer, node

    def report(self, volume_node, k: int, max_new_tokens: int | None = None, scene=None):
        text = self.compute_report(self.display_slice(volume_node, k), max_new_tokens)
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
        return node, explanation
