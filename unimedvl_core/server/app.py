"""The UniMedVL inference server (FastAPI): one model shared by all requests through a queue.

    unimedvl serve --ckpt DIR --host 127.0.0.1 --port 8765 [--token SECRET]

Routes (OpenAPI schema at ``/openapi.json``, documentation at ``/docs``):

- ``GET /health``, ``GET /info``: liveness; model, limits and tasks.
- ``POST /v1/vqa`` (multipart: image, question; ``stream=true`` streams tokens as server-sent events),
  ``POST /v1/report`` (multipart: image).
- ``POST /v1/generate`` (JSON): text-to-image.
- ``POST /v1/image-to-image/{task}`` (multipart: image + parameters): edit, super_resolution,
  virtual_staining, contrast_translation, counterfactual.
- ``POST /v1/jobs/generate``, ``POST /v1/jobs/image-to-image/{task}``: the same as background jobs;
  ``GET /v1/jobs/{id}`` (status, step/total), ``GET /v1/jobs/{id}/result``, ``DELETE /v1/jobs/{id}``.

Images come in as PNG/JPEG/TIFF, NumPy ``.npy`` or DICOM files and go out as PNG (default), ``.npy`` or
DICOM (when the input was DICOM); every generated image is labelled synthetic (PNG text chunks, the
``X-UniMedVL-Synthetic`` header, DICOM ``SyntheticData``). With a token, every route but ``/health`` needs
``Authorization: Bearer <token>``. Bad requests get 4xx with a message; the server stays up.
"""

from __future__ import annotations

import io
import json
import logging
import queue
import re
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pydicom
from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image, PngImagePlugin, UnidentifiedImageError
from pydantic import BaseModel, Field

from .. import __version__
from ..medical_io import ImageReadError, MedicalImage, read_image
from ..preprocessing import MAX_INPUT_PIXELS
from .worker import Job, JobCancelled, JobTimeout, ModelWorker, QueueFull

__all__ = ["Settings", "create_app", "IMAGE_TASKS"]

log = logging.getLogger(__name__)

IMAGE_TASKS = ("edit", "super_resolution", "virtual_staining", "contrast_translation", "counterfactual")
OutputFormat = Literal["png", "npy", "dicom"]


@dataclass
class Settings:
    token: str | None = None
    max_image_pixels: int = MAX_INPUT_PIXELS
    max_upload_bytes: int = 256 * 1024 * 1024
    max_new_tokens: int = 1024
    max_steps: int = 100
    max_prompt_chars: int = 4000
    max_queue: int = 16
    request_timeout: float = 3600.0


class GenerateRequest(BaseModel):
    prompt: str = Field(min_length=1, description="what to generate")
    height: int | None = Field(None, ge=16, description="multiple of 16; the model's default when omitted")
    width: int | None = Field(None, ge=16)
    num_inference_steps: int = Field(25, ge=1)
    cfg_text_scale: float = Field(4.0, ge=0.0, le=30.0)
    cfg_img_scale: float = Field(1.0, ge=0.0, le=30.0)
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    timestep_shift: float = Field(3.0, gt=0.0, le=20.0)
    cfg_renorm_type: Literal["global", "channel", "text_channel"] = "global"
    seed: int = 0
    output: Literal["png", "npy"] = "png"


class JobInfo(BaseModel):
    id: str
    task: str
    status: str
    step: int
    total: int
    error: str | None = None


def _bad(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def _decode_upload(data: bytes, filename: str, settings: Settings) -> MedicalImage:
    """An uploaded file as a model input; 400 for unreadable data, 413 for oversized images."""
    if not data:
        raise _bad(400, "empty image upload")
    if len(data) > settings.max_upload_bytes:
        raise _bad(413, f"upload of {len(data)} bytes exceeds {settings.max_upload_bytes}")
    name = filename or "upload"
    try:
        if data[128:132] == b"DICM" or name.lower().endswith(".dcm"):
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            return read_image(ds)
        if data[:6] == b"\x93NUMPY" or name.lower().endswith(".npy"):
            array = np.load(io.BytesIO(data), allow_pickle=False)
            if array.size > settings.max_image_pixels * 4:
                raise _bad(413, f"array of shape {array.shape} is too large")
            return read_image(array)
        with Image.open(io.BytesIO(data)) as probe:
            if probe.width * probe.height > settings.max_image_pixels:
                raise _bad(413, f"{probe.width}x{probe.height} exceeds {settings.max_image_pixels} pixels")
        return read_image(Image.open(io.BytesIO(data)))
    except HTTPException:
        raise
    except ImageReadError as err:
        status = 413 if "exceeds" in str(err) else 400
        raise _bad(status, f"{name}: {err}") from None
    except Image.DecompressionBombError:
        raise _bad(413, f"{name}: image too large") from None
    except (UnidentifiedImageError, ValueError, OSError, pydicom.errors.InvalidDicomError) as err:
        raise _bad(400, f"{name}: not a readable image ({type(err).__name__})") from None
    except Exception as err:  # corrupt files can fail in many ways inside the readers
        raise _bad(400, f"{name}: unreadable ({type(err).__name__})") from None


def _read(upload: UploadFile, settings: Settings) -> bytes:
    """The upload's bytes, reading no more than one byte past the limit (the size check comes next)."""
    return upload.file.read(settings.max_upload_bytes + 1)


def _image_response(image: Image.Image, output: str, source: MedicalImage | None, task: str,
                    extra_headers: dict | None = None) -> Response:
    headers = {"X-UniMedVL-Synthetic": "YES", "X-UniMedVL-Task": task,
               "X-UniMedVL-Description": _ascii(image.info.get("Description", ""))[:500], **(extra_headers or {})}
    if output == "npy":
        buf = io.BytesIO()
        np.save(buf, np.asarray(image))
        return Response(buf.getvalue(), media_type="application/x-npy", headers=headers)
    if output == "dicom":
        if source is None or source.dataset is None:
            raise _bad(400, "output=dicom needs a DICOM input image")
        from pydicom.uid import generate_uid

        from ..dicom_output import derived_image

        ds = derived_image(np.asarray(image.convert("RGB")), source, task, image.info.get("Description", task),
                           generate_uid(), 9900)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return Response(buf.getvalue(), media_type="application/dicom", headers=headers)
    meta = PngImagePlugin.PngInfo()
    for key, value in image.info.items():
        if isinstance(value, str):
            meta.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return Response(buf.getvalue(), media_type="image/png", headers=headers)


def _ascii(text: str) -> str:
    """Header-safe: ASCII without control characters."""
    return re.sub(r"[\x00-\x1f\x7f]", " ", text.encode("ascii", "replace").decode("ascii"))


def create_app(model=None, loader=None, settings: Settings | None = None) -> FastAPI:
    """The server around ``model`` (or the one ``loader()`` returns at start-up)."""
    settings = settings or Settings()
    state: dict[str, Any] = {"model": model}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state["model"] is None:
            state["model"] = loader()
        state["model"].progress = False
        state["worker"] = ModelWorker(max_queue=settings.max_queue)
        yield

    app = FastAPI(title="UniMedVL server", version=__version__, lifespan=lifespan,
                  description="Medical VQA, reports and image generation with UniMedVL. Generated images are "
                              "synthetic and labelled as such.")

    def authorized(request: Request) -> None:
        if settings.token is None:
            return
        header = request.headers.get("authorization", "")
        if not secrets.compare_digest(header.encode(), f"Bearer {settings.token}".encode()):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    def model_():
        return state["model"]

    def worker() -> ModelWorker:
        return state["worker"]

    def run(task: str, fn) -> Any:
        try:
            return worker().run(task, fn, timeout=settings.request_timeout)
        except QueueFull as err:
            raise _bad(429, str(err)) from None
        except JobCancelled:
            raise _bad(409, "the request was cancelled") from None
        except JobTimeout as err:
            raise _bad(504, str(err)) from None
        except ValueError as err:  # argument errors of the task API
            raise _bad(422, str(err)) from None

    def check_tokens(max_new_tokens: int) -> None:
        if not 1 <= max_new_tokens <= settings.max_new_tokens:
            raise _bad(422, f"max_new_tokens must be between 1 and {settings.max_new_tokens}")

    def check_text(name: str, text: str | None) -> None:
        if text is not None and len(text) > settings.max_prompt_chars:
            raise _bad(422, f"{name} longer than {settings.max_prompt_chars} characters")

    def check_steps(steps: int) -> None:
        if steps > settings.max_steps:
            raise _bad(422, f"num_inference_steps must be at most {settings.max_steps}")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok" if state.get("worker") is not None else "starting"}

    @app.get("/info", dependencies=[Depends(authorized)])
    def info() -> dict:
        m = model_()
        return {"name": "UniMedVL", "version": __version__, "model": m.name, "device": str(m.device),
                "dtype": str(m.dtype).replace("torch.", ""), "default_size": list(m.config.default_generation_size),
                "max_image_side": m.config.max_image_side, "size_multiple": m.config.latent_downsample,
                "tasks": ["vqa", "report", "generate", *IMAGE_TASKS],
                "limits": {"max_image_pixels": settings.max_image_pixels, "max_new_tokens": settings.max_new_tokens,
                           "max_steps": settings.max_steps, "max_prompt_chars": settings.max_prompt_chars},
                "synthetic_label": "X-UniMedVL-Synthetic: YES"}

    @app.post("/v1/vqa", dependencies=[Depends(authorized)])
    def vqa(image: UploadFile = File(...), question: str = Form(..., min_length=1),
            max_new_tokens: int = Form(256), do_sample: bool = Form(False), temperature: float = Form(1.0, gt=0.0),
            top_p: float = Form(1.0, gt=0.0, le=1.0), stream: bool = Form(False)):
        check_tokens(max_new_tokens)
        check_text("question", question)
        src = _decode_upload(_read(image, settings), image.filename, settings)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p)
        if not stream:
            return {"answer": run("vqa", lambda job: model_().answer(src, question, **kwargs))}
        pieces: queue.Queue = queue.Queue()

        def job_fn(job: Job):
            text = model_().answer(src, question, streamer=lambda t: pieces.put(("token", t)), **kwargs)
            pieces.put(("done", text))
            return text

        try:
            job = worker().submit("vqa", job_fn)
        except QueueFull as err:
            raise _bad(429, str(err)) from None

        def events():
            while True:
                try:
                    kind, value = pieces.get(timeout=1.0)
                except queue.Empty:
                    if job.status in ("failed", "cancelled"):
                        yield f"data: {json.dumps({'error': job.error or job.status})}\n\n"
                        return
                    continue
                if kind == "token":
                    yield f"data: {json.dumps({'token': value})}\n\n"
                else:
                    yield f"data: {json.dumps({'done': True, 'answer': value})}\n\n"
                    return

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/report", dependencies=[Depends(authorized)])
    def report(image: UploadFile = File(...), prompt: str | None = Form(None), modality: str | None = Form(None),
               max_new_tokens: int = Form(512)):
        check_tokens(max_new_tokens)
        check_text("prompt", prompt)
        src = _decode_upload(_read(image, settings), image.filename, settings)
        text = run("report", lambda job: model_().generate_report(
            src, prompt=prompt, modality=modality or src.modality, max_new_tokens=max_new_tokens))
        return {"report": text}

    def generate_fn(req: GenerateRequest):
        check_steps(req.num_inference_steps)
        check_text("prompt", req.prompt)
        import torch

        def fn(job: Job):
            return model_().generate_image(
                req.prompt, height=req.height, width=req.width, num_inference_steps=req.num_inference_steps,
                cfg_text_scale=req.cfg_text_scale, cfg_img_scale=req.cfg_img_scale, cfg_interval=req.cfg_interval,
                timestep_shift=req.timestep_shift, cfg_renorm_type=req.cfg_renorm_type,
                generator=torch.Generator().manual_seed(req.seed), callback=job.progress, progress=False)

        return fn

    @app.post("/v1/generate", dependencies=[Depends(authorized)])
    def generate(req: GenerateRequest):
        image = run("generate", generate_fn(req))
        return _image_response(image, req.output, None, "text-to-image")

    def image_task_fn(task: str, src: MedicalImage, params: dict):
        if task not in IMAGE_TASKS:
            raise _bad(404, f"unknown task {task!r}; choose from {IMAGE_TASKS}")
        import torch

        allowed = {"instruction", "scale", "stain", "source", "target", "height", "width", "num_inference_steps",
                   "cfg_text_scale", "cfg_img_scale", "cfg_interval", "timestep_shift", "cfg_renorm_type", "seed"}
        unknown = set(params) - allowed
        if unknown:
            raise _bad(422, f"unknown parameters {sorted(unknown)}")
        for key in ("instruction", "stain", "source", "target"):
            check_text(key, params.get(key))
        steps = int(params.pop("num_inference_steps", 25))
        check_steps(steps)
        seed = int(params.pop("seed", 0))
        if "cfg_interval" in params:
            params["cfg_interval"] = tuple(params["cfg_interval"])

        def fn(job: Job):
            m = model_()
            common = dict(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                          callback=job.progress, progress=False)
            p = dict(params)
            if task == "edit":
                if not p.get("instruction"):
                    raise ValueError("edit needs an instruction")
                return m.edit_image(src, p.pop("instruction"), **p, **common), None
            if task == "counterfactual":
                if not p.get("instruction"):
                    raise ValueError("counterfactual needs an instruction")
                out = m.counterfactual_edit(src, p.pop("instruction"), **p, **common)
                return out.image, out.explanation
            method = {"super_resolution": m.super_resolve, "virtual_staining": m.virtual_stain,
                      "contrast_translation": m.translate_contrast}[task]
            return method(src, **p, **common), None

        return fn

    def parse_params(params: str) -> dict:
        try:
            value = json.loads(params or "{}")
        except json.JSONDecodeError as err:
            raise _bad(422, f"params is not JSON: {err.msg}") from None
        if not isinstance(value, dict):
            raise _bad(422, "params must be a JSON object")
        return value

    @app.post("/v1/image-to-image/{task}", dependencies=[Depends(authorized)])
    def image_to_image(task: str, image: UploadFile = File(...), params: str = Form("{}"),
                       output: Literal["png", "npy", "dicom"] = Form("png")):
        src = _decode_upload(_read(image, settings), image.filename, settings)
        result, explanation = run(task, image_task_fn(task, src, parse_params(params)))
        headers = {"X-UniMedVL-Explanation": _ascii(explanation)[:2000]} if explanation else None
        return _image_response(result, output, src, task, headers)

    # ----- background jobs with progress -----
    def submit(task: str, fn, meta: dict) -> JSONResponse:
        try:
            job = worker().submit(task, fn, meta)
        except QueueFull as err:
            raise _bad(429, str(err)) from None
        return JSONResponse(job.public(), status_code=202)

    @app.post("/v1/jobs/generate", status_code=202, response_model=JobInfo, dependencies=[Depends(authorized)])
    def job_generate(req: GenerateRequest):
        return submit("generate", generate_fn(req), {"output": req.output, "source": None, "task": "text-to-image"})

    @app.post("/v1/jobs/image-to-image/{task}", status_code=202, response_model=JobInfo,
              dependencies=[Depends(authorized)])
    def job_image_to_image(task: str, image: UploadFile = File(...), params: str = Form("{}"),
                           output: Literal["png", "npy", "dicom"] = Form("png")):
        src = _decode_upload(_read(image, settings), image.filename, settings)
        return submit(task, image_task_fn(task, src, parse_params(params)),
                      {"output": output, "source": src, "task": task})

    def get_job(job_id: str) -> Job:
        job = worker().jobs.get(job_id)
        if job is None:
            raise _bad(404, f"no job {job_id}")
        return job

    @app.get("/v1/jobs/{job_id}", response_model=JobInfo, dependencies=[Depends(authorized)])
    def job_status(job_id: str):
        return get_job(job_id).public()

    @app.delete("/v1/jobs/{job_id}", response_model=JobInfo, dependencies=[Depends(authorized)])
    def job_cancel(job_id: str):
        get_job(job_id)
        return worker().cancel(job_id).public()

    @app.get("/v1/jobs/{job_id}/result", dependencies=[Depends(authorized)])
    def job_result(job_id: str):
        job = get_job(job_id)
        if job.status in ("queued", "running"):
            raise _bad(409, f"job {job_id} is {job.status} ({job.step}/{job.total})")
        if job.status != "done":
            detail = job.error or job.status
            raise _bad(422 if isinstance(job.result, ValueError) else 409, f"job {job_id} {job.status}: {detail}")
        meta = job.meta
        result = job.result
        image, explanation = result if isinstance(result, tuple) else (result, None)
        headers = {"X-UniMedVL-Explanation": _ascii(explanation)[:2000]} if explanation else None
        return _image_response(image, meta.get("output", "png"), meta.get("source"), meta.get("task", job.task),
                               headers)

    app.state.settings = settings
    app.state.runtime = state
    return app


def serve(ckpt: str | None, host: str, port: int, token: str | None, device: str | None = None,
          dtype: str | None = None) -> None:
    """Run the server with uvicorn; a token is required when listening beyond the loopback interface."""
    import ipaddress

    import uvicorn

    from ..defaults import load_model

    loopback = host in ("localhost",) or (_is_ip(host) and ipaddress.ip_address(host).is_loopback)
    if not loopback and not token:
        raise ValueError(f"listening on {host} needs --token (or UNIMEDVL_TOKEN): only loopback may be open")
    app = create_app(loader=lambda: load_model(ckpt, device=device, dtype=dtype, progress=True),
                     settings=Settings(token=token))
    uvicorn.run(app, host=host, port=port, log_level="info")


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
