"""Batch inference over datasets on Ray Data (``unimedvl batch``; docs/batch.md). Ray is imported only
when a job runs, so this package imports without the ``batch`` extra."""

from .settings import BatchSettings, RayUnavailableError, ray_available

__all__ = ["run_batch", "BatchSettings", "RayUnavailableError", "ray_available", "read_source", "rows_from_items"]


def __getattr__(name):  # the job (and the model code it imports) load on first use
    if name == "run_batch":
        from .job import run_batch

        return run_batch
    if name in ("read_source", "rows_from_items"):
        from . import sources

        return getattr(sources, name)
    raise AttributeError(name)
