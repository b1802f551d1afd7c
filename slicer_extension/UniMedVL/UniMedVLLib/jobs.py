"""Slow work (loading the model, answering, generating) off Slicer's GUI thread, without Qt: a worker thread
puts events on a queue and the GUI takes them from a timer (``poll``) on its own thread, where it may touch
widgets and the scene. ``JobSlot`` lets one job run at a time: the model and its decoding workspaces are
shared, so a second job never starts while an earlier thread (even a cancelled, dropped one) still runs."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["BackgroundJob", "JobSlot", "JobBusy", "STOP_WAIT_S"]

# how long stopping (scene close) waits for a cancelled job: it stops at its next decoded piece or sampling
# step, normally well within this; if not, new jobs are refused until it has
STOP_WAIT_S = 10.0


class JobBusy(RuntimeError):
    """A job was asked to start while an earlier one still runs."""


class BackgroundJob:
    """Runs ``work(progress, cancelled, text)`` on a thread. ``poll()`` returns the events so far, in order:
    ("progress", (step, total)), ("text", piece), then one of ("done", result), ("error", exception) or
    ("cancelled", None). A job cancelled before its work ends ends "cancelled" whatever the work did, so a
    cancelled answer or image never lands.

    Args:
        work: called on the worker thread with ``progress(step, total)``, ``cancelled() -> bool`` (the work
            should check it often and stop by raising) and ``text(piece)`` (streamed answer text).
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

    @property
    def running(self) -> bool:
        """Whether the worker thread is still alive (after cancel, until the work has stopped)."""
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            result = self.work(lambda step, total: self.events.put(("progress", (step, total))), self._cancel.is_set,
                               self._text)
            self.events.put(("cancelled", None) if self.cancelled else ("done", result))
        except Exception as err:  # handed to the GUI thread, which shows it
            self.events.put(("cancelled", None) if self.cancelled else ("error", err))

    def _text(self, piece: str) -> None:
        if not self.cancelled:  # text decoded after cancel is not shown
            self.events.put(("text", piece))

    def poll(self) -> list[tuple[str, Any]]:
        """The events since the last poll (never blocks); ``finished`` turns True with the last one."""
        out = []
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return out
            out.append(event)
            self.finished = self.finished or event[0] in ("done", "error", "cancelled")

    def wait(self, timeout: float | None = None) -> list[tuple[str, Any]]:
        """Waits for the end (scripts and tests; the GUI polls instead) and returns every event."""
        self._thread.join(timeout)
        return self.poll()


class JobSlot:
    """One background job at a time. ``job`` is the job whose events the GUI polls; ``stop`` cancels it and
    drops its events, but its thread is remembered until it ends, and ``start`` refuses (``JobBusy``) while it
    or the current job still runs."""

    def __init__(self):
        self.job: BackgroundJob | None = None
        self._last: BackgroundJob | None = None  # the last started job, polled or dropped

    @property
    def busy(self) -> bool:
        """Whether a job's thread still runs (the current one, or a stopped one still finishing)."""
        return self._last is not None and self._last.running

    def refusal(self) -> str | None:
        """Why a job cannot start now (None when it can)."""
        if self.job is not None:
            return "another UniMedVL job is running: wait for it or cancel it first"
        if self.busy:
            return "the cancelled UniMedVL job is still stopping: try again in a moment"
        return None

    def start(self, work: Callable[..., Any]) -> BackgroundJob:
        """Starts ``work`` as the current job; ``JobBusy`` (saying why) while another job runs or stops."""
        refusal = self.refusal()
        if refusal is not None:
            raise JobBusy(refusal)
        self.job = self._last = BackgroundJob(work).start()
        return self.job

    def poll(self) -> list[tuple[str, Any]]:
        """The current job's new events; the job is let go once it has ended."""
        if self.job is None:
            return []
        events = self.job.poll()
        if self.job.finished:
            self.job = None
        return events

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def stop(self, timeout: float | None = STOP_WAIT_S) -> bool:
        """Cancels the current job, drops its events, and waits up to ``timeout`` seconds for its thread.
        True when no thread runs any more; else ``start`` keeps refusing until it has ended."""
        self.cancel()
        self.job = None
        if self._last is not None:
            self._last.wait(timeout)
        return not self.busy
