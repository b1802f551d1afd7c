"""The UniMedVL inference server (FastAPI): one model shared by all requests through a queue.

    unimedvl serve --ckpt DIR|org/name --host 127.0.0.1 --port 8765 [--token SECRET]

Tasks, their parameters, defaults and limits are the task registry's (``unimedvl_core.tasks``); the routes
derive their request schemas from it and run every task through ``Task.run``. Routes (OpenAPI schema at
``/openapi.json``, documentation at ``/docs``):

- ``GET /health``, ``GET /info``: liveness; model, limits and task names.
- ``GET /v1/tasks``: every task with its parameters and this checkpoint's limits (``unimedvl tasks --json``).
- ``POST /v1/vqa`` (multipart: image, question, decoding fields; ``stream=true`` streams tokens as
  server-sent events), ``POST /v1/report`` (multipart: image).
- ``POST /v1/generate`` (JSON): text-to-image.
- ``POST /v1/image-to-image/{task}`` (multipart: image + the task's parameters as form fields): one route per
  task that takes and returns an image (dashed and old names such as ``stain`` accepted).
- ``POST /v1/tasks/{name}`` (multipart: optional image + ``params`` JSON): any registered task.
- ``POST /v1/jobs/generate``, ``POST /v1/jobs/image-to-image/{task}``, ``POST /v1/jobs/tasks/{name}``: the
  same as background jobs; ``GET /v1/jobs/{id}`` (status, step/total), ``GET /v1/jobs/{id}/result``,
  ``DELETE /v1/jobs/{id}``.
- OpenAI-compatible: ``GET /v1/models``, ``POST /v1/chat/completions`` (multi-turn, ``image_url`` parts,
  ``stream=true``), ``POST /v1/images/generations``, ``POST /v1/images/edits`` (docs/serving.md).

Images come in as PNG/JPEG/TIFF, NumPy ``.npy`` or DICOM files and go out as PNG (default), ``.npy`` or
DICOM (when the input was DICOM); every generated image is labelled synthetic (PNG text chunks, the
``X-UniMedVL-Synthetic`` header, DICOM ``SyntheticData``). Answers of the embedded demonstration model carry
its notice once (a ``notice`` JSON field, the ``X-UniMedVL-Notice`` header). With a token, every route but
``/health`` (and the API documentation) needs ``Authorization: Bearer <token>``. Bad requests get 4xx with a
message; the server stays up.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from ... import __version__
from ...tasks.catalog import TASKS
from ...tasks.registry import TaskRegistry
from .openai_errors import http_error_handler, validation_error_handler
from .routers import chat, images, jobs, meta, openai_images, tasks, text
from .settings import Settings
from .worker import ModelWorker

__all__ = ["Settings", "create_app", "serve"]


@asynccontextmanager
async def _lifespan(app: FastAPI):
    """Load the model once (unless given) and start the worker that runs requests one at a time."""
    state = app.state
    if state.model is None:
        state.model = state.loader()
    state.model.progress = False
    settings = state.settings
    state.worker = ModelWorker(max_queue=settings.max_queue, batch_window=settings.batch_window,
                               max_batch=settings.max_batch)
    yield


def with_seed(registry: TaskRegistry, seed: int | None) -> TaskRegistry:
    """The tasks with ``seed`` as the default of their ``seed`` parameter (``serve --seed``), so that request
    schemas, ``GET /v1/tasks`` and every run agree on it; the registry itself when ``seed`` is None."""
    if seed is None:
        return registry
    for param in (p for task in registry for p in task.params if p.name == "seed"):
        param.parse(seed)  # within every task's bounds
    return TaskRegistry(dataclasses.replace(task, params=tuple(dataclasses.replace(p, default=seed)
                                                               if p.name == "seed" else p for p in task.params))
                        for task in registry)


def create_app(model=None, loader: Callable[[], Any] | None = None, settings: Settings | None = None,
               registry: TaskRegistry | None = None) -> FastAPI:
    """The server around ``model`` (or the one ``loader()`` returns at start-up) for the tasks of
    ``registry`` (the built-in catalogue by default; tasks registered later run through ``/v1/tasks/{name}``)."""
    if model is None and loader is None:
        raise ValueError("create_app needs a model or a loader")
    settings = settings or Settings()
    registry = with_seed(TASKS if registry is None else registry, settings.seed)
    # API documentation from assets installed with fastapi-offline, never a CDN (hospital networks block them)
    app = FastAPIOffline(title="UniMedVL server", version=__version__, lifespan=_lifespan,
                         description="Medical VQA, reports and image generation with UniMedVL, with OpenAI-compatible "
                                     "routes. Generated images are synthetic and labelled as such.")
    app.state.model, app.state.loader, app.state.worker = model, loader, None
    app.state.settings, app.state.tasks = settings, registry
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    for router in (meta.router, text.build_router(registry), images.build_router(registry), tasks.router,
                   jobs.router, chat.router, openai_images.build_router(registry)):
        app.include_router(router)
    return app


def serve(loader: Callable[[], Any], host: str, port: int, token: str | None,
          settings: Settings | None = None) -> None:
    """Run the server with uvicorn on the model ``loader()`` returns (the CLI's, honouring every model option);
    a token is required when listening beyond the loopback interface."""
    if not _is_loopback(host) and not token:
        raise ValueError(f"listening on {host} needs --token (or UNIMEDVL_TOKEN): only loopback may be open")
    settings = dataclasses.replace(settings or Settings(), token=token)
    with_seed(TASKS, settings.seed)  # a seed out of the registry's bounds is refused before loading
    import uvicorn

    # Loaded before the server starts, so that a missing or broken checkpoint is one clear error from the
    # command, not a failed start-up inside uvicorn.
    model = loader()
    uvicorn.run(create_app(model=model, settings=settings), host=host, port=port, log_level="info")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
