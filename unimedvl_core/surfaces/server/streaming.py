"""Streaming a job's text as it is decoded: the model's ``streamer`` callback runs on the worker thread and
puts each piece in a queue that the response's generator reads (server-sent events). When the reader stops
early (the client went away), the job is cancelled at its next piece, freeing the model for other requests."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from typing import Any

from .dependencies import Runner
from .worker import Job, JobCancelled

__all__ = ["Streamer", "stream_job"]

Streamer = Callable[[str], None]


def stream_job(runner: Runner, name: str, make_fn: Callable[[Streamer], Callable[[Job], Any]]
               ) -> Iterator[tuple[str, Any]]:
    """Queue ``make_fn(streamer)`` now (429 at once when the queue is full) and return the pieces it streams:
    ``("token", text)`` for each, then ``("done", result)``, or ``("error", message)`` when the job fails or is
    cancelled."""
    pieces: queue.Queue = queue.Queue()
    jobs: list[Job] = []

    def streamer(text: str) -> None:
        if jobs and jobs[0].cancel_requested:
            raise JobCancelled(jobs[0].id)
        pieces.put(("token", text))

    inner = make_fn(streamer)

    def fn(job: Job) -> Any:
        result = inner(job)
        pieces.put(("done", result))
        return result

    jobs.append(runner.submit_call(name, fn))
    return _pieces(runner, jobs[0], pieces)


def _pieces(runner: Runner, job: Job, pieces: queue.Queue) -> Iterator[tuple[str, Any]]:
    finished = False
    try:
        while True:
            try:
                kind, value = pieces.get(timeout=0.5)
            except queue.Empty:
                if job.status in ("failed", "cancelled"):
                    finished = True
                    yield "error", job.error or job.status
                    return
                continue
            finished = kind == "done"
            yield kind, value
            if finished:
                return
    finally:
        if not finished:  # closed early
            runner.worker.cancel(job.id)
