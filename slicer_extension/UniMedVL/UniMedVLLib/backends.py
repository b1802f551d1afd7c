"""Where the model runs: a UniMedVL server over HTTP (remote) or Slicer's own Python (local). Both offer the
same calls, so the logic and the GUI do not care which.

Remote mode needs no unimedvl-core: the HTTP client and the prompt strings are dependency-free modules of
unimedvl-core that the extension's build copies into UniMedVLLib (``unimedvl_client.py``,
``unimedvl_prompts.py``; see the module's CMakeLists.txt). When unimedvl-core is installed, its own modules
are used, so there is one source of truth and no hand-kept copy.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np

__all__ = ["RemoteBackend", "LocalBackend", "openai_messages", "shipped_module", "SHIPPED", "LOCAL_PACKAGE",
           "missing_local_requirements", "load_local_backend", "check_cancel"]

# unimedvl-core module -> the copy the build puts next to this file
SHIPPED = {"surfaces.client": "unimedvl_client", "inference.prompts": "unimedvl_prompts"}
# what local mode installs with slicer.util.pip_install (torch comes first, from PyTorchUtils)
LOCAL_PACKAGE = "unimedvl-core"

Progress = Callable[[int, int], None]
Cancel = Callable[[], bool]
LOCK_POLL_S = 0.1  # how often a call waiting for the model asks whether it was cancelled


def shipped_module(name: str):
    """``unimedvl_core.<name>`` when unimedvl-core can be imported, else the copy shipped in UniMedVLLib."""
    try:
        return importlib.import_module(f"unimedvl_core.{name}")
    except ImportError:
        return importlib.import_module(f"{__package__}.{SHIPPED[name]}")


def missing_local_requirements() -> list[str]:
    """What local mode still needs in this Python: ``torch`` and/or ``unimedvl-core`` (empty when ready)."""
    missing = []
    for module, package in (("torch", "torch"), ("unimedvl_core.inference.embedded", LOCAL_PACKAGE)):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


def openai_messages(messages: list[dict], data_url: Callable[[np.ndarray], str]) -> list[dict]:
    """``UniMedVL.chat`` messages in the OpenAI chat format the server takes: a question with images becomes
    content parts, its images (as ``data_url`` makes them) before its text, as the model reads them."""
    out = []
    for message in messages:
        images = message.get("images") or []
        if not images:
            out.append({"role": message["role"], "content": message["content"]})
            continue
        parts = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
        out.append({"role": message["role"], "content": [*parts, {"type": "text", "text": message["content"]}]})
    return out


class RemoteBackend:
    """The UniMedVL server, through the dependency-free client."""

    def __init__(self, url: str, token: str | None = None):
        self.client = shipped_module("surfaces.client").UniMedVLClient(url, token=token or None)

    def info(self) -> dict:
        return self.client.info()

    def tasks(self) -> dict:
        return self.client.tasks()

    def chat(self, messages: list[dict], max_new_tokens: int | None, on_text: Callable[[str], None] | None,
             cancel: Cancel | None = None) -> str:
        """The conversation (``{"role", "content", "images"}`` messages, as ``UniMedVL.chat`` takes them)
        through the server's OpenAI-compatible chat route, streamed piece by piece to ``on_text``. On
        ``cancel`` the stream is closed (the server then stops decoding) and ``Cancelled`` raised."""
        wire = openai_messages(messages, shipped_module("surfaces.client").data_url)
        return _read_stream(self.client.chat(wire, max_tokens=max_new_tokens, stream=True), on_text, cancel)

    def report(self, image: np.ndarray, max_new_tokens: int | None, cancel: Cancel | None = None,
               on_text: Callable[[str], None] | None = None) -> str:
        """A draft report of the image, streamed from ``/v1/report`` piece by piece to ``on_text``; on
        ``cancel`` the stream is closed (the server then stops decoding) and ``Cancelled`` raised."""
        check_cancel(cancel)
        return _read_stream(self.client.report_stream(image, max_new_tokens=max_new_tokens), on_text, cancel)

    def generate(self, prompt: str, params: dict, progress: Progress | None, cancel: Cancel | None) -> np.ndarray:
        job = self.client.submit_generate(prompt, **params)
        return self.client.wait(job, progress=progress, should_cancel=cancel)[0]

    def image_task(self, task: str, image: np.ndarray, params: dict, progress: Progress | None,
                   cancel: Cancel | None) -> tuple[np.ndarray, str | None]:
        job = self.client.submit_image_task(task, image, params)
        return self.client.wait(job, progress=progress, should_cancel=cancel)


class LocalBackend:
    """A loaded model in Slicer's own Python; every call runs a task of the registry, as the server does.

    The model's decoding workspaces are shared, so calls that run it hold a lock: a second caller (another
    thread, the Python console) waits for the first, or gives up with ``Cancelled`` when it is cancelled
    while waiting. Every call takes ``cancel() -> bool``, asked at each decoded piece or sampling step."""

    def __init__(self, model):
        self.model = model
        self.model.progress = False
        self._lock = threading.Lock()

    def info(self) -> dict:
        m = self.model
        return {"model": m.name, "weights": m.provenance.to_dict(),
                "default_size": list(m.config.default_generation_size), "size_multiple": m.config.latent_downsample,
                "max_image_side": m.config.max_image_side}

    def tasks(self) -> dict:
        from unimedvl_core.tasks.catalog import TASKS
        from unimedvl_core.tasks.registry import ModelLimits

        return TASKS.describe(ModelLimits.of(self.model.config))

    @contextmanager
    def _model_turn(self, cancel: Cancel | None):
        """Holds the model for one call, waiting for an earlier call to end (cancellable while waiting)."""
        while not self._lock.acquire(timeout=LOCK_POLL_S):
            check_cancel(cancel)
        try:
            check_cancel(cancel)
            yield self.model
        finally:
            self._lock.release()

    def _run(self, task: str, image, params: dict, progress=None, cancel=None, on_text=None):
        from unimedvl_core.tasks.catalog import TASKS
        from unimedvl_core.tasks.registry import RunOptions

        options = RunOptions(callback=self._callback(progress, cancel), streamer=_streamer(on_text, cancel))
        with self._model_turn(cancel) as model:
            return TASKS.get(task).run(model, image, params, options)

    @staticmethod
    def _callback(progress, cancel):
        def callback(step, total):
            if progress is not None:
                progress(step, total)
            check_cancel(cancel)

        return callback

    def chat(self, messages, max_new_tokens, on_text, cancel=None):
        decoding = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
        with self._model_turn(cancel) as model:
            return model.chat(messages, streamer=_streamer(on_text, cancel), **decoding)

    def report(self, image, max_new_tokens, cancel=None, on_text=None):
        params = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
        return self._run("report", image, params, cancel=cancel, on_text=on_text).text

    def generate(self, prompt, params, progress, cancel):
        return np.asarray(self._run("text_to_image", None, {**params, "prompt": prompt}, progress, cancel).image)

    def image_task(self, task, image, params, progress, cancel):
        result = self._run(task, image, params, progress, cancel)
        return np.asarray(result.image), result.text


def check_cancel(cancel: Cancel | None) -> None:
    """Raises the client's ``Cancelled`` when ``cancel()`` says so: how a running call stops."""
    if cancel is not None and cancel():
        raise shipped_module("surfaces.client").Cancelled("cancelled")


def _read_stream(stream, on_text: Callable[[str], None] | None, cancel: Cancel | None) -> str:
    """The text of a server stream (an iterator of pieces), each piece handed to ``on_text``. ``cancel`` is
    asked at every piece; once it says so the stream is closed, which closes the connection, and the
    server stops decoding at its next piece (docs/slicer.md#jobs-cancel-and-one-at-a-time)."""
    pieces = []
    try:
        for piece in stream:
            check_cancel(cancel)
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
    finally:
        stream.close()
    return "".join(pieces)


def _streamer(on_text: Callable[[str], None] | None, cancel: Cancel | None) -> Callable[[str], None] | None:
    """The model's text streamer: stops decoding (raises) once cancelled, else hands the piece on."""
    if on_text is None and cancel is None:
        return None

    def streamer(piece: str) -> None:
        check_cancel(cancel)
        if on_text is not None:
            on_text(piece)

    return streamer


def load_local_backend(ckpt_dir: str | None = None, device: str | None = None,
                       progress: Progress | None = None) -> LocalBackend:
    """Imports torch and unimedvl-core and loads the model (the embedded one without ``ckpt_dir``): the slow
    part of local mode, meant for a worker thread. ``progress`` hears (0, 3) import, (1, 3) load, (3, 3) ready."""
    report = progress or (lambda step, total: None)
    report(0, 3)
    from unimedvl_core.inference.embedded import load_model

    report(1, 3)
    backend = LocalBackend(load_model(ckpt_dir or None, device=device, progress=False))
    report(3, 3)
    return backend
