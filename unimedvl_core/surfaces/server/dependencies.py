"""What routes depend on (FastAPI ``Depends``): the settings, the task registry, the lifespan-loaded model,
the worker queue, bearer-token auth, and the ``Runner`` that runs registry tasks through the queue."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request

from ...tasks.batching import batch_key, run_batch
from ...tasks.registry import ModelLimits, RunOptions, Task, TaskRegistry, TaskResult, UnknownTaskError
from .media import http_error
from .settings import Settings
from .worker import Job, JobCancelled, JobTimeout, ModelWorker, QueueFull

__all__ = ["Runner", "get_settings", "get_registry", "get_model", "get_worker", "get_runner", "authorized",
           "SettingsDep", "RegistryDep", "ModelDep", "RunnerDep", "lookup_task", "known_form_fields",
           "served_model_id", "ServedIdDep", "DEMO_MODEL_ID"]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_registry(request: Request) -> TaskRegistry:
    return request.app.state.tasks


def get_model(request: Request) -> Any:
    return request.app.state.model


def get_worker(request: Request) -> ModelWorker:
    worker = getattr(request.app.state, "worker", None)
    if worker is None:
        raise http_error(503, "the model is still loading")
    return worker


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[TaskRegistry, Depends(get_registry)]
ModelDep = Annotated[Any, Depends(get_model)]

DEMO_MODEL_ID = "unimedvl-embedded-demo"


def served_model_id(model: ModelDep, settings: SettingsDep) -> str:
    """The one model id this server serves (``GET /v1/models``): ``--model-id``, else the weights' name."""
    if settings.model_id:
        return settings.model_id
    return DEMO_MODEL_ID if model.provenance.demo else model.name


ServedIdDep = Annotated[str, Depends(served_model_id)]


def authorized(request: Request, settings: SettingsDep) -> None:
    """Every route but ``/health`` needs ``Authorization: Bearer <token>`` when the server has a token."""
    if settings.token is None:
        return
    header = request.headers.get("authorization", "")
    if not secrets.compare_digest(header.encode(), f"Bearer {settings.token}".encode()):
        raise HTTPException(status_code=401, detail="missing or wrong bearer token",
                            headers={"WWW-Authenticate": "Bearer"})


@dataclass
class Runner:
    """The one model behind its queue: resolves a task's parameters up front (so bad ones are a 422 before
    anything is queued) and runs the task only through ``Task.run``."""

    model: Any
    worker: ModelWorker
    settings: Settings

    @property
    def limits(self) -> ModelLimits:
        return ModelLimits.of(self.model.config)

    def resolve(self, task: Task, values: dict) -> dict:
        try:
            return task.resolve(values, self.limits)
        except ValueError as err:
            raise http_error(422, str(err)) from None

    @property
    def notice(self) -> str | None:
        """The demonstration-model notice every answer of the embedded model carries once."""
        return self.model.provenance.notice

    def job_fn(self, task: Task, image: Any, params: dict,
               streamer: Callable[[str], None] | None = None) -> Callable[[Job], TaskResult]:
        def fn(job: Job) -> TaskResult:
            return task.run(self.model, image, params, RunOptions(callback=job.progress, streamer=streamer))

        return fn

    def batch(self, task: Task, image: Any, params: dict) -> dict:
        """``batch_key``/``batch_fn`` for the worker when this request may run with others of its task
        (``unimedvl_core.tasks.batching``); empty otherwise."""
        key = batch_key(self.model, task, params)
        if key is None:
            return {}
        item = (image, task.resolve(params, self.limits))

        def batch_fn(jobs: list[Job]) -> list[TaskResult]:
            items = [job.meta["batch_item"] for job in jobs]
            return run_batch(self.model, task, [i for i, _ in items], [p for _, p in items],
                             RunOptions(callback=ModelWorker.batch_progress(jobs)))

        return {"batch_key": key, "batch_fn": batch_fn, "item": item}

    def run(self, task: Task, image: Any, params: dict) -> TaskResult:
        """Queue the task and wait for it (``wait``)."""
        return self.wait(self.submit(task, self.job_fn(task, image, params), None, image, params))

    def run_all(self, task: Task, image: Any, params: list[dict]) -> list[TaskResult]:
        """Several runs of ``task`` on one input queued together (so that the worker may batch them)."""
        return self.run_each(task, [(image, p) for p in params])

    def run_each(self, task: Task, runs: list[tuple[Any, dict]]) -> list[TaskResult]:
        """Runs of ``task``, each an ``(image, params)``, queued together and waited for; results in order."""
        jobs = [self.submit(task, self.job_fn(task, image, p), None, image, p) for image, p in runs]
        return [self.wait(job) for job in jobs]

    def wait(self, job: Job) -> Any:
        """A queued job's result: 504 on timeout, 409 when cancelled, 422 for argument errors found while
        running; other failures propagate."""
        try:
            return self.worker.run_job(job, timeout=self.settings.request_timeout)
        except JobCancelled:
            raise http_error(409, "the request was cancelled") from None
        except JobTimeout as err:
            raise http_error(504, str(err)) from None
        except ValueError as err:  # argument errors found while running
            raise http_error(422, str(err)) from None

    def submit(self, task: Task, fn: Callable[[Job], Any], meta: dict | None = None, image: Any = None,
               params: dict | None = None) -> Job:
        """Queue ``fn``; with the request's ``image`` and ``params`` it may be batched (``batch``)."""
        batch = self.batch(task, image, params) if params is not None else {}
        meta = dict(meta or {}, **({"batch_item": batch.pop("item")} if batch else {}))
        return self.submit_call(task.name, fn, meta, **batch)

    def submit_call(self, name: str, fn: Callable[[Job], Any], meta: dict | None = None, **batch: Any) -> Job:
        """Queue ``fn`` under ``name`` (a task's, or ``chat``); 429 when the queue is full."""
        try:
            return self.worker.submit(name, fn, meta, **batch)
        except QueueFull as err:
            raise http_error(429, str(err)) from None


def get_runner(model: ModelDep, worker: Annotated[ModelWorker, Depends(get_worker)],
               settings: SettingsDep) -> Runner:
    return Runner(model, worker, settings)


RunnerDep = Annotated[Runner, Depends(get_runner)]


def lookup_task(registry: TaskRegistry, name: str) -> Task:
    """A task by any spelling (old names included, without a warning per request); 404 naming the tasks."""
    try:
        return registry.get(name, warn=False)
    except UnknownTaskError as err:
        raise http_error(404, str(err)) from None


def known_form_fields(task: Task, *extra: str) -> Callable:
    """A dependency refusing form fields that are neither a parameter of ``task`` nor in ``extra`` (422 naming
    them), as the task itself refuses unknown parameters."""
    allowed = {p.name for p in task.params} | set(extra)

    async def check(request: Request) -> None:
        unknown = sorted(set(await request.form()) - allowed)
        if unknown:
            raise http_error(422, f"{task.name}: unknown parameter(s) {', '.join(unknown)} "
                                  f"(known: {', '.join(sorted(allowed))})")

    return check
