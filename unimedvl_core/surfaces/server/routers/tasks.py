"""Any registered task by name, including ones registered by other code: ``POST /v1/tasks/{name}`` runs it
(multipart: an optional image and the parameters as a JSON object) and ``POST /v1/jobs/tasks/{name}`` starts
it as a background job. The task is looked up per request, so nothing here lists tasks."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, File, Form, UploadFile

from ....tasks.registry import Task, TaskRegistry
from ..dependencies import RegistryDep, Runner, RunnerDep, SettingsDep, authorized, lookup_task
from ..media import http_error, load_upload, parse_params, result_response
from ..responses import TaskText, image_responses
from ..schemas import JobInfo, OutputFormat
from ..settings import Settings
from .jobs import accepted

__all__ = ["router"]

router = APIRouter(dependencies=[Depends(authorized)], tags=["tasks"])

IMAGE = File(None, description="the input image, for tasks that take one (PNG/JPEG/TIFF, .npy or DICOM)")
PARAMS = Form("{}", description="the task's parameters as a JSON object, e.g. {\"scale\": 2} (GET /v1/tasks lists "
                               "each task's parameters, types, defaults and bounds; docs/serving.md)")
OUTPUT = Form("png", description="for image results: png, npy, or dicom (DICOM inputs only)")


def _request(runner: Runner, registry: TaskRegistry, settings: Settings, name: str, image: UploadFile | None,
             params: str) -> tuple[Task, Any, dict]:
    task = lookup_task(registry, name)
    values = runner.resolve(task, parse_params(params))
    if task.needs_image and image is None:
        raise http_error(422, f"{task.name}: needs an input image")
    if not task.needs_image and image is not None:
        raise http_error(422, f"{task.name}: takes no input image")
    return task, load_upload(image, settings) if image is not None else None, values


@router.post("/v1/tasks/{name}", response_model=TaskText, responses=image_responses())
def run_task(name: str, runner: RunnerDep, registry: RegistryDep, settings: SettingsDep,
             image: UploadFile | None = IMAGE, params: str = PARAMS, output: OutputFormat = OUTPUT):
    """Run a task: ``{"task", "text", "image": null}`` for a text result, else the image (labelled
    synthetic) with any text in ``X-UniMedVL-Explanation``."""
    task, src, values = _request(runner, registry, settings, name, image, params)
    return result_response(runner.run(task, src, values), output, src, runner.model.provenance)


@router.post("/v1/jobs/tasks/{name}", status_code=202, response_model=JobInfo)
def submit_task(name: str, runner: RunnerDep, registry: RegistryDep, settings: SettingsDep,
                image: UploadFile | None = IMAGE, params: str = PARAMS, output: OutputFormat = OUTPUT):
    """Start a task as a background job; poll ``GET /v1/jobs/{id}``, then fetch ``/result``."""
    task, src, values = _request(runner, registry, settings, name, image, params)
    return accepted(runner.submit(task, runner.job_fn(task, src, values), {"output": output, "source": src},
                                  src, values))
