"""One model, one worker thread: requests are queued and run one at a time (the model is not thread-safe),
each with a status and, for image generation, step-by-step progress; queued or running generations can be
cancelled.

Batching: a job with a ``batch_key`` waits up to ``batch_window`` seconds for more queued jobs with the same
key (at most ``max_batch`` in all); they run together in one call of its ``batch_fn(jobs)``, which returns
one result per job. Jobs of other keys keep their order in the queue. A job cancelled while its batch runs
is answered at once as cancelled; the batch stops only when every job in it is cancelled."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
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
    batch_key: Hashable | None = None  # jobs with equal keys may run together through batch_fn
    batch_fn: Callable[[list["Job"]], list[Any]] | None = None

    def progress(self, step: int, total: int) -> None:
        """The sampler's callback: records progress and stops the run if it was cancelled."""
        self.step, self.total = step, total
        if self.cancel_requested:
            raise JobCancelled(self.id)

    def public(self) -> dict:
        return {"id": self.id, "task": self.task, "status": self.status, "step": self.step, "total": self.total,
                "error": self.error}


class ModelWorker:
    def __init__(self, max_queue: int = 16, keep_finished: int = 64, batch_window: float = 0.0,
                 max_batch: int = 1):
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.queue: queue.Queue[Job] = queue.Queue()
        self.max_queue, self.keep_finished = max_queue, keep_finished
        self.batch_window, self.max_batch = batch_window, max_batch
        self.model_calls = 0  # runs of a job's fn or of a batch: what batching saves
        self._held: deque[Job] = deque()  # taken from the queue while collecting a batch, not of its key
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="unimedvl-model", daemon=True)
        self._thread.start()

    def submit(self, task: str, fn: Callable[[Job], Any], meta: dict | None = None, batch_key: Hashable | None = None,
               batch_fn: Callable[[list[Job]], list[Any]] | None = None) -> Job:
        """Queue ``fn(job)``; with a ``batch_key`` and ``batch_fn``, it may run with others of that key."""
        with self._lock:
            waiting = sum(1 for j in self.jobs.values() if j.status in ("queued", "running"))
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests are waiting; try again later")
            job = Job(id=f"job-{next(self._ids)}", task=task, fn=fn, meta=meta or {},
                      batch_key=batch_key if batch_fn is not None else None, batch_fn=batch_fn)
            self.jobs[job.id] = job
            self._forget_old()
        self.queue.put(job)
        return job

    def run(self, task: str, fn: Callable[[Job], Any], timeout: float | None = None,
            batch_key: Hashable | None = None, batch_fn: Callable[[list[Job]], list[Any]] | None = None) -> Any:
        """Submit and wait; re-raises the job's exception."""
        return self.run_job(self.submit(task, fn, batch_key=batch_key, batch_fn=batch_fn), timeout)

    def run_job(self, job: Job, timeout: float | None = None) -> Any:
        """Wait for a submitted job; re-raises its exception."""
        task = job.task
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

    @staticmethod
    def batch_progress(jobs: list[Job]) -> Callable[[int, int], None]:
        """The sampler's callback of a batch: every job's progress; a cancelled job is answered at once
        (its output is dropped); the run stops when no job is left."""
        def progress(step: int, total: int) -> None:
            for job in jobs:
                try:
                    job.progress(step, total)
                except JobCancelled:
                    _finish_cancelled(job)
            if all(job.cancel_requested for job in jobs):
                raise JobCancelled(jobs[0].id)

        return progress

    def _forget_old(self) -> None:
        finished = [k for k, j in self.jobs.items() if j.status in ("done", "failed", "cancelled")]
        for key in finished[: max(0, len(finished) - self.keep_finished)]:
            del self.jobs[key]

    def _next(self, timeout: float | None = None) -> Job:
        return self._held.popleft() if self._held else self.queue.get(timeout=timeout)

    def _collect(self, first: Job) -> list[Job]:
        """``first`` and the jobs of its key queued now or within the batch window, up to ``max_batch``."""
        group = [first]
        if first.batch_key is None or self.max_batch <= 1:
            return group
        kept = deque()
        for job in self._held:  # jobs already taken out of the queue come first
            same = job.batch_key == first.batch_key and not job.cancel_requested and len(group) < self.max_batch
            (group if same else kept).append(job)
        self._held = kept
        deadline = time.monotonic() + self.batch_window
        while len(group) < self.max_batch:
            try:
                job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            same = job.batch_key == first.batch_key and not job.cancel_requested
            (group if same else self._held).append(job)
        return group

    def _run(self) -> None:
        while True:
            job = self._next()
            if job.cancel_requested:
                _finish_cancelled(job)
                continue
            group = self._collect(job)
            self.model_calls += 1
            if len(group) == 1:
                self._run_one(job)
            else:
                self._run_batch(group)

    def _run_one(self, job: Job) -> None:
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

    def _run_batch(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.status = "running"
        try:
            results = jobs[0].batch_fn(jobs)
            for job, result in zip(jobs, results):
                if job.status == "running":
                    job.result, job.status = result, "done"
        except JobCancelled:
            pass
        except Exception as err:  # every job of the batch reports it; the worker keeps serving
            for job in jobs:
                if job.status == "running":
                    job.status, job.result, job.error = "failed", err, f"{type(err).__name__}: {err}"
        finally:
            for job in jobs:
                if job.status == "running":
                    job.status = "cancelled"
                job.done_event.set()


def _finish_cancelled(job: Job) -> None:
    job.status = "cancelled"
    job.done_event.set()
