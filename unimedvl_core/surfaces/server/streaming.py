"""Streaming a job's text as it is decoded: the model's ``streamer`` callback runs on the worker thread and
puts each piece in a queue that the response's generator reads (server-sent events)."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from typing import Any

from .dependencies import Runner
from .worker import Job

__all__ = ["Streamer", "stream_job"]

Streamer = Callable[[str], None]


def stream_job(runner: Runner, name: str, make_fn: Callable[[Streamer], Callable[[Job], Any]]
               ) -> Iterator[tuple[str, Any]]:
    """Queue ``make_fn(streamer)`` now (429 at once when the queue is full) and return the pieces it streams:
    ``("token", text)`` for each, then ``("done", result)``, or ``("error", message)`` when the job fails or is
    cancelled."""
    pieces: queue.Queue = queue.Queue()
    inner = make_fn(lambda text: pieces.put(("token", text)))

    def fn(job: Job) -> Any:
        result = inner(job)
        pieces.put(("done", result))
        return result

    return _pieces(runner.submit_call(name, fn), pieces)


def _pieces(job: Job, pieces: queue.Queue) -> Iterator[tuple[str, Any]]:
    while True:
        try:
            kind, value = pieces.get(timeout=0.5)
        except queue.Empty:
            if job.status in ("failed", "cancelled"):
                yield "error", job.error or job.status
                return
            continue
        yield kind, value
        if kind == "done":
            return
