"""The UniMedVL inference server (FastAPI): one model shared by all requests through a queue.

    unimedvl serve --ckpt DIR --host 127.0.0.1 --port 8765 [--token SECRET]

Tasks, their parameters, defaults and limits are the task registry's (``unimedvl_core.tasks``); the routes
derive their request schemas from it and run every task through ``Task.run``. Routes (OpenAPI schema at
``/openapi.json``, documentation at ``/docs``):

- ``GET /health``, ``GET /info``: liveness; model, limits and task names.
- ``GET /v1/tasks``: every task with its parameters and this checkpoint's limits (``unimedvl tasks --json``).
- ``POST /v1/vqa`` (multipart: image, question, decoding fields; ``stream=true`` streams tokens as
  server-sent events), ``POST /v1/report`` (multipart: image).
- ``POST /v1/generate`` (JSON): text-to-image.
- ``POST /v1/image-to-image/{task}`` (multipart: image + ``params`` JSON): every task that takes and returns
  an image (old names such as ``stain`` accepted).
- ``POST /v1/tasks/{name}`` (multipart: optional image + ``params`` JSON): any registered task.
- ``POST /v1/jobs/generate``, ``POST /v1/jobs/image-to-image/{task}``, ``POST /v1/jobs/tasks/{name}``: the
  same as background jobs; ``GET /v1/jobs/{id}`` (status, step/total), ``GET /v1/jobs/{id}/result``,
  ``DELETE /v1/jobs/{id}``.

Images come in as PNG/JPEG/TIFF, NumPy ``.npy`` or DICOM files and go out as PNG (default), ``.npy`` or
DICOM (when the input was DICOM); every generated image is labelled synthetic (PNG text chunks, the
``X-UniMedVL-Synthetic`` header, DICOM ``SyntheticData``). With a token, every route but ``/health`` needs
``Authorization: Bearer <token>``. Bad requests get 4xx with a message; the server stays up.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ... import __version__
from ...tasks.catalog import TASKS
from ...tasks.registry import TaskRegistry
from .routers import images, jobs, meta, tasks, text
from .schemas import image_to_image_tasks
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


async def _unknown_image_task(request: Request, exc: RequestValidationError):
    """A ``{task}`` that is no image-to-image task is a 404 naming the valid ones; other errors stay 422."""
    if any(tuple(e.get("loc", ()))[:2] == ("path", "task") for e in exc.errors()):
        names = ", ".join(t.name for t in image_to_image_tasks(request.app.state.tasks))
        task = request.path_params.get("task")
        return JSONResponse({"detail": f"unknown image-to-image task {task!r}; choose from {names}"}, 404)
    return await request_validation_exception_handler(request, exc)


def create_app(model=None, loader: Callable[[], Any] | None = None, settings: Settings | None = None,
               registry: TaskRegistry | None = None) -> FastAPI:
    """The server around ``model`` (or the one ``loader()`` returns at start-up) for the tasks of
    ``registry`` (the built-in catalogue by default; tasks registered later run through ``/v1/tasks/{name}``)."""
    if model is None and loader is None:
        raise ValueError("create_app needs a model or a loader")
    registry = TASKS if registry is None else registry
    app = FastAPI(title="UniMedVL server", version=__version__, lifespan=_lifespan,
                  description="Medical VQA, reports and image generation with UniMedVL. Generated images are "
                              "synthetic and labelled as such.")
    app.state.model, app.state.loader, app.state.worker = model, loader, None
    app.state.settings, app.state.tasks = settings or Settings(), registry
    app.add_exception_handler(RequestValidationError, _unknown_image_task)
    for router in (meta.router, text.build_router(registry), images.build_router(registry), tasks.router,
                   jobs.router):
        app.include_router(router)
    return app


def serve(ckpt: str | None, host: str, port: int, token: str | None, device: str | None = None,
          dtype: str | None = None, quantization: str | None = None, residency: str = "all") -> None:
    """Run the server with uvicorn; a token is required when listening beyond the loopback interface."""
    if not _is_loopback(host) and not token:
        raise ValueError(f"listening on {host} needs --token (or UNIMEDVL_TOKEN): only loopback may be open")
    import uvicorn

    from ...inference.embedded import load_model

    # Loaded before the server starts, so that a missing or broken checkpoint is one clear error from the
    # command, not a failed start-up inside uvicorn.
    model = load_model(ckpt, device=device, dtype=dtype, progress=True, quantization=quantization,
                       residency=residency)
    uvicorn.run(create_app(model=model, settings=Settings(token=token)), host=host, port=port, log_level="info")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
