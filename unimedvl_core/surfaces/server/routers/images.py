"""Making images: text-to-image (``/v1/generate``, a JSON body of the registry's ``text_to_image``
parameters) and image-to-image (``/v1/image-to-image/{task}``, one route per registry task that takes and
returns an image, its parameters typed form fields), each synchronous or as a background job with progress."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, Field

from ....tasks.registry import Task, TaskRegistry, canonical_name
from ..dependencies import Runner, RunnerDep, SettingsDep, authorized, known_form_fields
from ..media import http_error, load_upload, parse_params, result_response
from ..responses import image_responses
from ..schemas import JobInfo, OutputFormat, body_model, endpoint, image_to_image_tasks
from .jobs import accepted

__all__ = ["build_router"]

OUTPUT = Form("png", description="png, npy, or dicom (DICOM inputs only)")
PARAMS = Form(None, description="deprecated: parameters as one JSON object, taking precedence over the form "
                                "fields (the typed fields above are the same parameters)")
IMAGE = File(..., description="the input image: PNG/JPEG/TIFF, NumPy .npy or DICOM")


def _generate_params(runner: Runner, task: Task, req: BaseModel) -> tuple[dict, str]:
    return runner.resolve(task, req.model_dump(exclude={"output"})), req.output


def _generate(task: Task, /, *, req: Any, runner: RunnerDep):
    """Generate an image from a description; labelled synthetic."""
    params, output = _generate_params(runner, task, req)
    return result_response(runner.run(task, None, params), output, None, runner.model.provenance)


def _job_generate(task: Task, /, *, req: Any, runner: RunnerDep):
    """Start a text-to-image job; poll ``GET /v1/jobs/{id}`` for its progress."""
    params, output = _generate_params(runner, task, req)
    return accepted(runner.submit(task, runner.job_fn(task, None, params), {"output": output, "source": None},
                                  None, params))


def _values(values: dict, params: str | None) -> dict:
    return {**values, **parse_params(params)} if params else values


def _image_to_image(task: Task, /, *, runner: RunnerDep, settings: SettingsDep, image: UploadFile = IMAGE,
                    output: OutputFormat = OUTPUT, params: str | None = PARAMS, **values: Any):
    """Run the task; the counterfactual's explanation comes in ``X-UniMedVL-Explanation``."""
    params = runner.resolve(task, _values(values, params))
    src = load_upload(image, settings)
    return result_response(runner.run(task, src, params), output, src, runner.model.provenance)


def _job_image_to_image(task: Task, /, *, runner: RunnerDep, settings: SettingsDep, image: UploadFile = IMAGE,
                        output: OutputFormat = OUTPUT, params: str | None = PARAMS, **values: Any):
    """Start the task as a job; poll ``GET /v1/jobs/{id}``, then fetch ``/result``."""
    params = runner.resolve(task, _values(values, params))
    src = load_upload(image, settings)
    return accepted(runner.submit(task, runner.job_fn(task, src, params), {"output": output, "source": src}))


def _unknown(tasks: list[Task]):
    names = ", ".join(t.name for t in tasks)

    def unknown(task: str, request: Request):
        raise http_error(404, f"unknown image-to-image task {task!r}; choose from {names}")

    return unknown


def _image_routes(router: APIRouter, task: Task) -> None:
    """The task's routes under its name; its dashed spelling and old names answer too (not in the schema)."""
    check = [Depends(known_form_fields(task, "image", "output", "params"))]
    spellings = dict.fromkeys([task.name, task.name.replace("_", "-"), *map(canonical_name, task.aliases)])
    for i, name in enumerate(spellings):
        router.add_api_route(f"/v1/image-to-image/{name}", endpoint(_image_to_image, task, form=task),
                             methods=["POST"], summary=task.summary, dependencies=check, response_class=Response,
                             responses=image_responses(), include_in_schema=i == 0,
                             operation_id=f"image_to_image_{name}".replace("-", "_"))
        router.add_api_route(f"/v1/jobs/image-to-image/{name}", endpoint(_job_image_to_image, task, form=task),
                             methods=["POST"], status_code=202, response_model=JobInfo, dependencies=check,
                             summary=f"{task.summary} (background job)", include_in_schema=i == 0,
                             operation_id=f"job_image_to_image_{name}".replace("-", "_"))


def build_router(registry: TaskRegistry) -> APIRouter:
    """The image routes for the tasks registered now: the body model and the per-task form fields come from
    the registry."""
    router = APIRouter(dependencies=[Depends(authorized)], tags=["make"])
    t2i = registry.get("text_to_image", warn=False)
    body = body_model(t2i, "GenerateRequest", output=(Literal["png", "npy"], Field("png", description="png or npy")))
    router.add_api_route("/v1/generate", endpoint(_generate, t2i, req=body), methods=["POST"], summary=t2i.summary,
                         response_class=Response, responses=image_responses(("image/png", "application/x-npy")))
    router.add_api_route("/v1/jobs/generate", endpoint(_job_generate, t2i, req=body), methods=["POST"],
                         status_code=202, response_model=JobInfo, summary=f"{t2i.summary} (background job)")
    tasks = image_to_image_tasks(registry)
    for task in tasks:
        _image_routes(router, task)
    for path in ("/v1/image-to-image/{task}", "/v1/jobs/image-to-image/{task}"):
        router.add_api_route(path, _unknown(tasks), methods=["POST"], include_in_schema=False)
    return router
