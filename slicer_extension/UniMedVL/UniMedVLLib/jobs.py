"""Slow work (loading the model, answering, generating) off Slicer's GUI thread, without Qt: a worker thread
puts events on a queue and the GUI takes them from a timer (``poll``) on its own thread, where it may touch
widgets and the scene."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["BackgroundJob"]


class BackgroundJob:
    """Runs ``work(progress, cancelled, text)`` on a thread. ``poll()`` returns the events so far, in order:
    ("progress", (step, total)), ("text", piece), then one of ("done", result) or ("error", exception).

    Args:
        work: called on the worker thread with ``progress(step, total)``, ``cancelled() -> bool`` and
            ``text(piece)`` (streamed answer text).
    """

    def __init__(self, work: Callable[..., Any]):
        self.work = work
        self.events: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="UniMedVL job")
        self.finished = False

    def start(self) -> BackgroundJob:
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _run(self) -> None:
        try:
            result = self.work(lambda step, total: self.events.put(("progress", (step, total))), self._cancel.is_set,
                               lambda piece: self.events.put(("text", piece)))
            self.events.put(("done", result))
        except Exception as err:  # handed to the GUI thread, which shows it
            self.events.put(("error", err))

    def poll(self) -> list[tuple[str, Any]]:
        """The events since the last poll (never blocks); ``finished`` turns True with the last one."""
        out = []
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return out
            out.append(event)
            self.finished = self.finished or event[0] in ("done", "error")

    def wait(self, timeout: float | None = None) -> list[tuple[str, Any]]:
        """Waits for the end (scripts and tests; the GUI polls instead) and returns every event."""
        self._thread.join(timeout)
        return self.poll()
