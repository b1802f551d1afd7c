"""Running several requests of one task together (the server's request batching,
docs/sampling.md#batched-requests), as each task declares it (``Task.batching`` in the catalog).

A request is batchable with others when they share a ``batch_key``: the same task and the same parameters
apart from the ones each request keeps for itself (the prompt or question, and the seed).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from .registry import RunOptions, Task, TaskResult

__all__ = ["batch_key", "run_batch"]


def batch_key(model: Any, task: Task, params: dict) -> Hashable | None:
    """The key requests must share to run together, or ``None`` when this one runs alone."""
    batching = task.batching
    if batching is None or not batching.available(model, params):
        return None
    shared = sorted((k, repr(v)) for k, v in params.items() if k not in batching.per_request)
    return (task.name, tuple(shared))


def run_batch(model: Any, task: Task, images: Sequence[Any], params: Sequence[dict],
              options: RunOptions) -> list[TaskResult]:
    """Requests sharing a ``batch_key``, in one batched model call; one result per request, in order."""
    results = task.batching.run_fn(model, list(images), list(params), options)
    for result, p in zip(results, params):
        result.params = p
    return results
