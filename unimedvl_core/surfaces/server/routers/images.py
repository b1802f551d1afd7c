"""Making images: text-to-image (``/v1/generate``, a JSON body of the registry's ``text_to_image``
parameters) and image-to-image (``/v1/image-to-image/{task}``, any registry task that takes and returns an
image), each synchronous or as a background job with progress."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, Path, UploadFile
from pydantic import BaseModel, Field

from ....tasks.registry import Task, TaskRegistry
from ..dependencies import RegistryDep, Runner, RunnerDep, SettingsDep, authorized, lookup_task
from ..media import load_upload, parse_params, result_response
from ..schemas import JobInfo, OutputFormat, body_model, endpoint, image_task_enum, image_to_image_tasks
from ..settings import Settings
from .jobs import accepted

__all__ = ["build_router"]

PARAMS = Form("{}", description="the task's parameters as a JSON object (GET /v1/tasks lists them)")
OUTPUT = Form("png", description="png, npy, or dicom (DICOM inputs only)")
TASK = Path(..., description="an image-to-image task of the registry (old names accepted)")


def _generate_params(runner: Runner, task: Task, req: BaseModel) -> tuple[dict, str]:
    return runner.resolve(task, req.model_dump(exclude={"output"})), req.output


def _generate(task: Task, /, *, req: Any, runner: RunnerDep):
    """Generate an image from a description; labelled synthetic."""
    params, output = _generate_params(runner, task, req)
    return result_response(runner.run(task, None, params), output, None)


def _job_generate(task: Task, /, *, req: Any, runner: RunnerDep):
    """Start a text-to-image job; poll ``GET /v1/jobs/{id}`` for its progress."""
    params, output = _generate_params(runner, task, req)
    return accepted(runner.submit(task, runner.job_fn(task, None, params), {"output": output, "source": None},
                                  None, params))


def _image_request(runner: Runner, registry: TaskRegistry, settings: Settings, task: Any, image: UploadFile,
                   params: str) -> tuple[Task, Any, dict]:
    resolved = lookup_task(registry, task.value)
    values = runner.resolve(resolved, parse_params(params))
    return resolved, load_upload(image, settings), values


def _image_to_image(*, task: Any = TASK, runner: RunnerDep, registry: RegistryDep, settings: SettingsDep,
                    image: UploadFile = File(...), params: str = PARAMS, output: OutputFormat = OUTPUT):
    """Run an image-to-image task; the counterfactual's explanation comes in ``X-UniMedVL-Explanation``."""
    found, src, values = _image_request(runner, registry, settings, task, image, params)
    return result_response(runner.run(found, src, values), output, src)


def _job_image_to_image(*, task: Any = TASK, runner: RunnerDep, registry: RegistryDep, settings: SettingsDep,
                        image: UploadFile = File(...), params: str = PARAMS, output: OutputFormat = OUTPUT):
    """Start an image-to-image job; poll ``GET /v1/jobs/{id}`` for its progress."""
    found, src, values = _image_request(runner, registry, settings, task, image, params)
    return accepted(runner.submit(found, runner.job_fn(found, src, values), {"output": output, "source": src}))


def build_router(registry: TaskRegistry) -> APIRouter:
    """The image routes for the tasks registered now: the body model and the ``{task}`` values come from the
    registry."""
    router = APIRouter(dependencies=[Depends(authorized)], tags=["make"])
    t2i = registry.get("text_to_image", warn=False)
    body = body_model(t2i, "GenerateRequest", output=(Literal["png", "npy"], Field("png", description="png or npy")))
    kinds = image_task_enum(registry)
    names = ", ".join(t.name for t in image_to_image_tasks(registry))
    router.add_api_route("/v1/generate", endpoint(_generate, t2i, req=body), methods=["POST"], summary=t2i.summary)
    router.add_api_route("/v1/jobs/generate", endpoint(_job_generate, t2i, req=body), methods=["POST"],
                         status_code=202, response_model=JobInfo, summary=f"{t2i.summary} (background job)")
    router.add_api_route("/v1/image-to-image/{task}", endpoint(_image_to_image, task=kinds), methods=["POST"],
                         summary=f"image-to-image: {names}")
    router.add_api_route("/v1/jobs/image-to-image/{task}", endpoint(_job_image_to_image, task=kinds),
                         methods=["POST"], status_code=202, response_model=JobInfo,
                         summary=f"image-to-image as a background job: {names}")
    return router
