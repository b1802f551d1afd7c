"""One model, one worker thread: requests are queued and run one at a time (the model is not thread-safe),
each with a status and, for image generation, step-by-step progress; queued or running generations can be
cancelled."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Job", "JobCancelled", "JobTimeout", "ModelWorker", "QueueFull"]


class JobCancelled(Exception):
    """Raised inside a running job when its cancellation was requested."""


class QueueFull(Exception):
    """Too many requests are waiting."""


class JobTimeout(Exception):
    """A request waited longer than allowed; its job was cancelled."""


@dataclass
class Job:
    id: str
    task: str
    fn: Callable[["Job"], Any]
    status: str = "queued"           # queued, running, done, failed, cancelled
    step: int = 0
    total: int = 0
    result: Any = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    cancel_requested: bool = False
    done_event: threading.Event = field(default_factory=threading.Event)
    meta: dict = field(default_factory=dict)  # what the route needs to answer for the result

    def progress(self, step: int, total: int) -> None:
        """The sampler's callback: records progress and stops the run if it was cancelled."""
        self.step, self.total = step, total
        if self.cancel_requested:
            raise JobCancelled(self.id)

    def public(self) -> dict:
        return {"id": self.id, "task": self.task, "status": self.status, "step": self.step, "total": self.total,
                "error": self.error}


class ModelWorker:
    def __init__(self, max_queue: int = 16, keep_finished: int = 64):
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.queue: queue.Queue[Job] = queue.Queue()
        self.max_queue, self.keep_finished = max_queue, keep_finished
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="unimedvl-model", daemon=True)
        self._thread.start()

    def submit(self, task: str, fn: Callable[[Job], Any], meta: dict | None = None) -> Job:
        with self._lock:
            waiting = sum(1 for j in self.jobs.values() if j.status in ("queued", "running"))
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests are waiting; try again later")
            job = Job(id=f"job-{next(self._ids)}", task=task, fn=fn, meta=meta or {})
            self.jobs[job.id] = job
            self._forget_old()
        self.queue.put(job)
        return job

    def run(self, task: str, fn: Callable[[Job], Any], timeout: float | None = None) -> Any:
        """Submit and wait; re-raises the job's exception."""
        job = self.submit(task, fn)
        if not job.done_event.wait(timeout):
            self.cancel(job.id)
            raise JobTimeout(f"{task} took longer than {timeout} s and was cancelled")
        if job.status == "failed":
            raise job.result  # the exception object
        if job.status == "cancelled":
            raise JobCancelled(job.id)
        return job.result

    def cancel(self, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        if job is not None and job.status in ("queued", "running"):
            job.cancel_requested = True
        return job

    def _forget_old(self) -> None:
        finished = [k for k, j in self.jobs.items() if j.status in ("done", "failed", "cancelled")]
        for key in finished[: max(0, len(finished) - self.keep_finished)]:
            del self.jobs[key]

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job.cancel_requested:
                job.status = "cancelled"
                job.done_event.set()
                continue
            job.status = "running"
            try:
                job.result = job.fn(job)
                job.status = "done"
            except JobCancelled:
                job.status = "cancelled"
            except Exception as err:  # reported to the client; the worker keeps serving
                job.status, job.result, job.error = "failed", err, f"{type(err).__name__}: {err}"
            finally:
                job.done_event.set()
