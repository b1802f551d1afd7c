"""Background jobs: status with step/total progress, the result once done, and cancellation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from ..dependencies import ModelDep, authorized, get_worker
from ..media import http_error, result_response
from ..responses import TaskText, image_responses
from ..schemas import JobInfo
from ..worker import Job, ModelWorker

__all__ = ["router", "accepted", "get_job"]

WorkerDep = Annotated[ModelWorker, Depends(get_worker)]


def get_job(job_id: str, worker: WorkerDep) -> Job:
    job = worker.jobs.get(job_id)
    if job is None:
        raise http_error(404, f"no job {job_id}")
    return job


JobDep = Annotated[Job, Depends(get_job)]


def accepted(job: Job) -> JSONResponse:
    """The answer to a job submission: 202 with the job's status."""
    return JSONResponse(job.public(), status_code=202)


router = APIRouter(prefix="/v1/jobs", dependencies=[Depends(authorized)], tags=["jobs"])


@router.get("/{job_id}", response_model=JobInfo)
def job_status(job: JobDep) -> dict:
    """Status (queued, running, done, failed, cancelled) and sampling progress ``step``/``total``."""
    return job.public()


@router.delete("/{job_id}", response_model=JobInfo)
def job_cancel(job: JobDep, worker: WorkerDep) -> dict:
    """Cancel a queued or running job; it stops at the next sampling step."""
    return worker.cancel(job.id).public()


@router.get("/{job_id}/result", response_model=TaskText, responses=image_responses())
def job_result(job: JobDep, model: ModelDep):
    """The finished job's output: the image (labelled synthetic), or JSON for a text-only result; 409 while
    it runs or after it was cancelled, 422 when its parameters were refused."""
    if job.status in ("queued", "running"):
        raise http_error(409, f"job {job.id} is {job.status} ({job.step}/{job.total})")
    if job.status != "done":
        status = 422 if isinstance(job.result, ValueError) else 409
        raise http_error(status, f"job {job.id} {job.status}: {job.error or job.status}")
    return result_response(job.result, job.meta.get("output", "png"), job.meta.get("source"),
                           model.provenance)
