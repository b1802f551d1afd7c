"""OpenAI-compatible image making: ``POST /v1/images/generations`` (the registry's ``text_to_image``; its
parameters as extension fields) and ``POST /v1/images/edits`` (multipart; ``task`` picks the registry's
image-to-image task, ``edit`` by default, and ``prompt`` is its instruction; several images, ``image[]``,
are each edited ``n`` times, their results in ``data`` image after image). Images come back as
``b64_json`` PNGs labelled synthetic, with the weights and the demonstration-model notice
(docs/serving.md#images)."""

from __future__ import annotations

import base64
import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from pydantic import Field

from ....tasks.registry import Task, TaskRegistry, TaskResult
from ..dependencies import Runner, RunnerDep, ServedIdDep, SettingsDep, authorized, lookup_task
from ..media import labelled_png, load_upload
from ..openai_errors import OpenAIHTTPError
from ..openai_schemas import IMAGE_SIZE_PATTERN, ImageData, ImagesResponse
from ..schemas import body_model, endpoint, image_task_enum
from ..settings import Settings
from .chat import check_model

__all__ = ["build_router"]

SIZE = Field(None, pattern=IMAGE_SIZE_PATTERN, description="WIDTHxHEIGHT, multiples of the model's size multiple "
                                                           "up to its largest side (GET /info); auto: the model's")
FORMAT = Field("b64_json", description="b64_json only: the server keeps no images to link to")
_EDIT_FIELDS = {"image", "image[]", "prompt", "task", "n", "size", "response_format", "model", "mask", "user",
                "output_format"}


def _check(settings: Settings, n: int, response_format: str | None, model: str | None, served: str,
           inputs: int = 1) -> None:
    """The served model, b64_json, and at most ``max_images_per_request`` outputs (``n`` per input image)."""
    check_model(model, served)
    if response_format not in (None, "b64_json"):
        raise OpenAIHTTPError(400, "response_format: only b64_json is supported (the server keeps no images to "
                                   "link to)", "response_format")
    most = settings.max_images_per_request
    if not 1 <= n <= most:
        raise OpenAIHTTPError(400, f"n: must be between 1 and {most}", "n")
    if n * inputs > most:
        raise OpenAIHTTPError(400, f"n: {n} per image for {inputs} images makes {n * inputs} images, more than "
                                   f"{most} a request", "n")


def _size(size: str | None, task: Task) -> dict:
    """``WxH`` as the task's ``width``/``height`` (checked with the checkpoint's limits when resolved)."""
    if size in (None, "auto"):
        return {}
    if not {"width", "height"} <= {p.name for p in task.params}:
        raise OpenAIHTTPError(400, f"size: the {task.name} task keeps the input's size; leave size out or auto",
                              "size")
    width, height = (int(v) for v in size.split("x"))
    return {"width": width, "height": height}


def _resolve(runner: Runner, task: Task, values: dict, size: str | None) -> dict:
    sides = _size(size, task)
    try:
        return task.resolve({**values, **sides}, runner.limits)
    except ValueError as err:
        text = str(err)
        param = "size" if sides and text.split(":")[0].split()[0] in ("height", "width") else None
        raise OpenAIHTTPError(400, f"size {size}: {text}" if param else text, param) from None


def _answer(runner: Runner, task: Task, results: list[TaskResult]) -> ImagesResponse:
    provenance = runner.model.provenance
    data = [ImageData(b64_json=base64.b64encode(labelled_png(r.image, provenance)).decode()) for r in results]
    return ImagesResponse(created=int(time.time()), data=data, task=task.name, explanation=results[0].text,
                          weights=runner.model.provenance.short, notice=runner.notice)


def _generations(task: Task, /, *, req: Any, runner: RunnerDep, settings: SettingsDep, served: ServedIdDep):
    """Generate ``n`` images from ``prompt`` (seeds ``seed``, ``seed+1``, ...; run together when they can)."""
    _check(settings, req.n, req.response_format, req.model, served)
    values = req.model_dump(exclude={"model", "n", "size", "response_format", "output_format", "user"})
    params = _resolve(runner, task, values, req.size)
    return _answer(runner, task, runner.run_all(task, None, [task.item_params(params, i) for i in range(req.n)]))


async def _extra_fields(request: Request) -> dict:
    """The form fields of an edit beyond OpenAI's: the chosen task's parameters (checked when resolved)."""
    form = await request.form()
    return {k: v for k, v in form.items() if k not in _EDIT_FIELDS}


def _instruction(task: Task, prompt: str, extra: dict) -> dict:
    """``prompt`` is the task's instruction (for tasks with their own instruction, a non-empty prompt
    overrides it)."""
    if "instruction" in extra:
        raise OpenAIHTTPError(400, "instruction: give it as prompt", "instruction")
    if not any(p.name == "instruction" for p in task.params):
        return extra
    if prompt.strip():
        return {**extra, "instruction": prompt}
    if task.param("instruction").required:
        raise OpenAIHTTPError(400, f"prompt: the {task.name} task needs an instruction", "prompt")
    return extra


def _inputs(image: list[UploadFile] | None, images: list[UploadFile] | None) -> list[UploadFile]:
    """The input images in the order sent: ``image`` (one, or repeated) then ``image[]`` (the openai client's
    form of a list)."""
    uploads = [*(image or []), *(images or [])]
    if not uploads:
        raise OpenAIHTTPError(400, "image: give an image to edit (image, or image[] for several)", "image")
    return uploads


def _edits(registry: TaskRegistry, /, *, runner: RunnerDep, settings: SettingsDep, served: ServedIdDep,
           image: list[UploadFile] | None = File(None, description="the input image: PNG/JPEG/TIFF, .npy or DICOM"),
           images: list[UploadFile] | None = File(None, alias="image[]", description="several input images, each "
                                                  "edited n times with the same prompt"),
           prompt: str = Form("", description="the instruction (edit, counterfactual), or an override of the "
                                              "task's own instruction (empty: keep it)"),
           task: Any = Form("edit", description="the registry's image-to-image task; its parameters (GET "
                                                "/v1/tasks) may be given as further form fields"),
           n: int = Form(1), size: str | None = Form(None, pattern=IMAGE_SIZE_PATTERN),
           response_format: Literal["b64_json", "url"] | None = Form("b64_json"), model: str | None = Form(None),
           mask: UploadFile | None = File(None, description="not supported: a 400"),
           user: str | None = Form(None), output_format: Literal["png"] | None = Form(None),
           extra: dict = Depends(_extra_fields)):
    """Run an image-to-image task ``n`` times on each input image (seeds ``seed``, ``seed+1``, ... for each,
    as a request with that image alone), all queued together; ``data`` holds image 1's ``n`` results, then
    image 2's, ..."""
    uploads = _inputs(image, images)
    _check(settings, n, response_format, model, served, len(uploads))
    if mask is not None:
        raise OpenAIHTTPError(400, "mask: not supported; describe the region in the prompt", "mask")
    found = lookup_task(registry, getattr(task, "value", task))  # the default arrives as text
    params = _resolve(runner, found, _instruction(found, prompt, extra), size)
    sources = [load_upload(upload, settings) for upload in uploads]
    jobs = [(src, found.item_params(params, i)) for src in sources for i in range(n)]
    return _answer(runner, found, runner.run_each(found, jobs))


def build_router(registry: TaskRegistry) -> APIRouter:
    """The routes; the generation body's fields and the edit's task names come from the registry."""
    router = APIRouter(dependencies=[Depends(authorized)], tags=["openai"])
    t2i = registry.get("text_to_image", warn=False)
    body = body_model(t2i, "ImageGenerationRequest", exclude=("height", "width"),
                      model=(str | None, Field(None, description="the served model id (GET /v1/models)")),
                      n=(int, Field(1, description="how many images (seeds seed, seed+1, ...)")),
                      size=(str | None, SIZE), response_format=(Literal["b64_json", "url"] | None, FORMAT),
                      output_format=(Literal["png"] | None, Field(None)), user=(str | None, Field(None)))
    router.add_api_route("/v1/images/generations", endpoint(_generations, t2i, req=body), methods=["POST"],
                         response_model=ImagesResponse, summary="OpenAI-compatible text-to-image")
    router.add_api_route("/v1/images/edits", endpoint(_edits, registry, task=image_task_enum(registry)),
                         methods=["POST"], response_model=ImagesResponse,
                         summary="OpenAI-compatible image-to-image (task: edit by default)")
    return router
