"""Reading an image: visual question answering and reports, each optionally streamed as server-sent events
(``stream=true``: one event per decoded piece; a client that closes the stream stops the decoding). The form
fields are the registry's parameters of ``vqa`` and ``report``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import StreamingResponse

from ....tasks.registry import Task, TaskRegistry
from ..dependencies import Runner, RunnerDep, SettingsDep, authorized, known_form_fields
from ..media import load_upload
from ..responses import Answer, Report
from ..schemas import endpoint
from ..streaming import stream_job

__all__ = ["build_router"]

IMAGE = File(..., description="the image: PNG/JPEG/TIFF, NumPy .npy or DICOM")
STREAM = Form(False, description="stream the text's tokens as server-sent events")


def _vqa(task: Task, /, *, runner: RunnerDep, settings: SettingsDep, image: UploadFile = IMAGE,
         stream: bool = STREAM, **values: Any):
    """Answer a question about an image: ``{"answer": ...}``, or with ``stream=true`` one event per token and
    a last ``{"done": true, "answer": ...}``."""
    params = runner.resolve(task, values)
    src = load_upload(image, settings)
    return _answer(runner, task, src, params, "answer", stream)


def _answer(runner: Runner, task: Task, src: Any, params: dict, key: str, stream: bool):
    """The task's text as ``{key: ..., "notice": ...}``, or streamed (``_events``)."""
    if not stream:
        return {key: runner.run(task, src, params).text, "notice": runner.notice}
    pieces = stream_job(runner, task.name, lambda streamer: runner.job_fn(task, src, params, streamer=streamer))
    return StreamingResponse(_events(pieces, key, runner.notice), media_type="text/event-stream")


def _events(pieces: Iterator[tuple[str, Any]], key: str, notice: str | None) -> Iterator[str]:
    """``{"token"}`` per piece, then ``{"done": true, key: the whole text, "notice"}`` or ``{"error"}``."""
    for kind, value in pieces:
        if kind == "token":
            yield f"data: {json.dumps({'token': value})}\n\n"
        elif kind == "done":
            yield f"data: {json.dumps({'done': True, key: value.text, 'notice': notice})}\n\n"
        else:
            yield f"data: {json.dumps({'error': value})}\n\n"


def _report(task: Task, /, *, runner: RunnerDep, settings: SettingsDep, image: UploadFile = IMAGE,
            modality: str | None = Form(None, max_length=16, description="the input's modality when the file "
                                        "does not say (DICOM Modality, e.g. CT, MR)"),
            stream: bool = STREAM, **values: Any):
    """Draft a report for an image: ``{"report": ...}``, or with ``stream=true`` one event per token and a
    last ``{"done": true, "report": ...}``."""
    params = runner.resolve(task, values)
    src = load_upload(image, settings)
    if modality:
        src = dataclasses.replace(src, modality=modality)
    return _answer(runner, task, src, params, "report", stream)


def _events_doc(key: str) -> dict:
    """The 200 of a route that answers JSON or, with ``stream=true``, server-sent events."""
    return {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                  "description": f"JSON, or with stream=true events {{token}}, then {{done, {key}, notice}}"}}


def build_router(registry: TaskRegistry) -> APIRouter:
    """The routes of the registry's ``vqa`` and ``report`` tasks."""
    router = APIRouter(dependencies=[Depends(authorized)], tags=["read"])
    for name, fn, extra, model, key in (("vqa", _vqa, (), Answer, "answer"),
                                        ("report", _report, ("modality",), Report, "report")):
        task, path = registry.get(name, warn=False), f"/v1/{name}"
        router.add_api_route(path, endpoint(fn, task, form=task), methods=["POST"], summary=task.summary,
                             dependencies=[Depends(known_form_fields(task, "image", "stream", *extra))],
                             response_model=model, responses=_events_doc(key))
    return router
