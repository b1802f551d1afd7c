"""Request schemas derived from the task registry, so that no route names a parameter, a default or a bound:
a JSON body model per task (pydantic ``create_model``), one multipart form field per parameter, and the
image-to-image path ``Enum``. Each task's own ``resolve`` checks the values again (including the checkpoint's
size limits) before anything runs."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any, Literal

from fastapi import Form
from pydantic import BaseModel, ConfigDict, Field, create_model

from ...tasks.params import Param
from ...tasks.registry import Task, canonical_name

__all__ = ["OutputFormat", "JobInfo", "body_model", "form_parameters", "endpoint",
           "image_to_image_tasks", "image_task_enum"]

OutputFormat = Literal["png", "npy", "dicom"]
_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str, "bool": bool, "interval": tuple[float, float]}


class JobInfo(BaseModel):
    id: str
    task: str
    status: str
    step: int
    total: int
    error: str | None = None


def _constraints(p: Param) -> dict:
    out: dict[str, Any] = {"description": p.help}
    if p.choices:
        return {**out, "json_schema_extra": {"enum": list(p.choices)}}
    if p.minimum is not None:
        out["gt" if p.exclusive_minimum else "ge"] = p.minimum
    if p.maximum is not None:
        out["le"] = p.maximum
    if p.max_length is not None:
        out["max_length"] = p.max_length
    if p.required and p.type == "str":
        out["min_length"] = 1
    return out


def _annotation(p: Param, form: bool) -> Any:
    # a form field is text: an interval arrives as "START,END" and numeric choices as digits, which the
    # parameter's own parser reads (a Literal of numbers would refuse "2")
    text_choices = p.choices is not None and all(isinstance(c, str) for c in p.choices)
    if p.choices and (text_choices or not form):
        kind = Literal[p.choices]
    else:
        kind = str if form and p.type == "interval" else _TYPES[p.type]
    return kind if p.required or p.default is not None else kind | None


def _default(p: Param, form: bool) -> Any:
    if p.required:
        return ...
    if form and p.type == "interval" and p.default is not None:
        return ",".join(f"{v:g}" for v in p.default)
    return p.default


def body_model(task: Task, name: str, exclude: Iterable[str] = (), **extra: tuple[Any, Any]) -> type[BaseModel]:
    """A JSON body model of ``task``'s parameters but ``exclude`` (plus route fields in ``extra``); unknown keys
    are a 422."""
    fields = {p.name: (_annotation(p, False), Field(_default(p, False), **_constraints(p))) for p in task.params
              if p.name not in exclude}
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields, **extra)


def form_parameters(task: Task) -> list[inspect.Parameter]:
    """One keyword-only multipart form field per parameter of ``task``."""
    return [inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, annotation=_annotation(p, True),
                              default=Form(_default(p, True), **_constraints(p))) for p in task.params]


def endpoint(fn: Callable, *bound: Any, form: Task | None = None, **annotations: Any) -> Callable:
    """``fn(*bound, /, *, ...)`` as a FastAPI endpoint whose request fields are built at start-up: ``bound``
    passed first, the named keyword-only parameters annotated with ``annotations`` (registry models and
    enums), and with ``form`` one multipart field per parameter of that task, passed in ``fn``'s ``**values``."""
    sig = inspect.signature(fn, eval_str=True)
    own = [p.replace(annotation=annotations.get(p.name, p.annotation)) for p in sig.parameters.values()
           if p.kind == inspect.Parameter.KEYWORD_ONLY]

    def call(**values: Any) -> Any:
        return fn(*bound, **values)

    call.__signature__ = inspect.Signature([*own, *(form_parameters(form) if form is not None else ())])
    call.__name__ = call.__qualname__ = fn.__name__.lstrip("_")
    call.__doc__ = fn.__doc__
    return call


def image_to_image_tasks(tasks: Iterable[Task]) -> list[Task]:
    """The tasks that take an image and return one."""
    return [t for t in tasks if t.takes == "image" and t.returns == "image"]


def image_task_enum(tasks: Iterable[Task]) -> type[Enum]:
    """The ``{task}`` path values: each image-to-image task's name, its dashed spelling and its old names."""
    spellings: dict[str, str] = {}
    for task in image_to_image_tasks(tasks):
        for name in (task.name, *(canonical_name(a) for a in task.aliases)):
            spellings[name] = spellings[name.replace("_", "-")] = name
    return Enum("ImageTask", {s: s for s in spellings}, type=str)
