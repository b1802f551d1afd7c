"""Reading an image: visual question answering (optionally streamed as server-sent events) and reports.
The form fields are the registry's parameters of ``vqa`` and ``report``."""

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


def _vqa(task: Task, /, *, runner: RunnerDep, settings: SettingsDep, image: UploadFile = IMAGE,
         stream: bool = Form(False, description="stream the answer's tokens as server-sent events"),
         **values: Any):
    """Answer a question about an image: ``{"answer": ...}``, or with ``stream=true`` one event per token and
    a last ``{"done": true, "answer": ...}``."""
    params = runner.resolve(task, values)
    src = load_upload(image, settings)
    if not stream:
        return {"answer": runner.run(task, src, params).text, "notice": runner.notice}
    return _stream(runner, task, src, params)


def _stream(runner: Runner, task: Task, src: Any, params: dict) -> StreamingResponse:
    pieces = stream_job(runner, task.name, lambda streamer: runner.job_fn(task, src, params, streamer=streamer))
    return StreamingResponse(_events(pieces, runner.notice), media_type="text/event-stream")


def _events(pieces: Iterator[tuple[str, Any]], notice: str | None) -> Iterator[str]:
    for kind, value in pieces:
        if kind == "token":
            yield f"data: {json.dumps({'token': value})}\n\n"
        elif kind == "done":
            yield f"data: {json.dumps({'done': True, 'answer': value.text, 'notice': notice})}\n\n"
        else:
            yield f"data: {json.dumps({'error': value})}\n\n"


def _report(task: Task, /, *, runner: RunnerDep, settings: SettingsDep, image: UploadFile = IMAGE,
            modality: str | None = Form(None, max_length=16, description="the input's modality when the file "
                                        "does not say (DICOM Modality, e.g. CT, MR)"),
            **values: Any):
    """Draft a report for an image: ``{"report": ...}``."""
    params = runner.resolve(task, values)
    src = load_upload(image, settings)
    if modality:
        src = dataclasses.replace(src, modality=modality)
    return {"report": runner.run(task, src, params).text, "notice": runner.notice}


def build_router(registry: TaskRegistry) -> APIRouter:
    """The routes of the registry's ``vqa`` and ``report`` tasks."""
    router = APIRouter(dependencies=[Depends(authorized)], tags=["read"])
    events = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                    "description": "JSON, or with stream=true events {token}, then {done, answer, notice}"}}
    for name, fn, extra, model, more in (("vqa", _vqa, "stream", Answer, events), ("report", _report, "modality",
                                                                                  Report, None)):
        task, path = registry.get(name, warn=False), f"/v1/{name}"
        router.add_api_route(path, endpoint(fn, task, form=task), methods=["POST"], summary=task.summary,
                             dependencies=[Depends(known_form_fields(task, "image", extra))], response_model=model,
                             responses=more)
    return router
