"""The task registry: each task declared once, with its parameters, and the function that runs it.

Every surface (CLI, MONAI bundle, server, MAP task file, Slicer) reads tasks, defaults and limits from here
and runs them through ``Task.run``; none keeps its own list, defaults or dispatch. The built-in tasks are
in ``unimedvl_core.tasks.catalog``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .params import Param, TaskParameterError

__all__ = ["Task", "TaskRegistry", "TaskResult", "RunOptions", "ModelLimits", "UnknownTaskError", "canonical_name",
           "Batching", "Applicability"]


class UnknownTaskError(ValueError):
    pass


def canonical_name(name: str) -> str:
    """Task names are lower case with underscores; ``super-resolution`` is the same name."""
    return str(name).strip().lower().replace("-", "_")


@dataclass(frozen=True)
class ModelLimits:
    """Limits that depend on the checkpoint: the largest generated side and the multiple sides must be."""

    max_image_side: int
    size_multiple: int
    default_size: tuple[int, int]

    @classmethod
    def of(cls, config) -> "ModelLimits":
        """From a ``UniMedVLConfig``."""
        return cls(config.max_image_side, config.latent_downsample, tuple(config.default_generation_size))

    def describe(self) -> dict:
        return {"max_image_side": self.max_image_side, "size_multiple": self.size_multiple,
                "default_size": list(self.default_size)}

    def check_side(self, name: str, value: int) -> None:
        d, top = self.size_multiple, self.max_image_side
        if value % d or not d <= value <= top:
            raise TaskParameterError(f"{name} must be a multiple of {d} between {d} and {top} (got {value})")


@dataclass(frozen=True)
class Applicability:
    """Where a task applies, so that a study run records "not applicable" instead of running it where it
    makes no sense or would take an hour: the DICOM modalities it is for (``None``: any) and the largest
    in-plane side of an input (``None``: any size). Inputs without a modality (PNG, NIfTI) pass the modality
    rule."""

    modalities: tuple[str, ...] | None = None
    max_side: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Applicability":
        unknown = set(data) - {"modalities", "max_side"}
        if unknown:
            raise TaskParameterError(f"applies_to: unknown keys {sorted(unknown)} (known: modalities, max_side)")
        modalities = data.get("modalities")
        return cls(tuple(str(m).upper() for m in modalities) if modalities is not None else None, data.get("max_side"))

    def reason_not(self, image) -> str | None:
        """Why the task does not apply to ``image`` (a ``MedicalImage``), or ``None`` when it does."""
        modality = (getattr(image, "modality", None) or "").upper()
        if self.modalities is not None and modality and modality not in self.modalities:
            return f"not for {modality} images (applies to {', '.join(self.modalities)})"
        size = getattr(image, "size", None)
        if self.max_side is not None and size is not None and max(size) > self.max_side:
            return f"input side {max(size)} px exceeds {self.max_side} px"
        return None

    def describe(self) -> dict:
        return {"modalities": list(self.modalities) if self.modalities else None, "max_side": self.max_side}


@dataclass
class RunOptions:
    """How a run reports back, not what it computes: progress bars, ``callback(step, total)`` after each
    sampling step (raise inside it to cancel), ``streamer(text)`` for each decoded piece of text."""

    progress: bool = False
    callback: Callable[[int, int], None] | None = None
    streamer: Callable[[str], None] | None = None


@dataclass
class TaskResult:
    """What a task produced: text (an answer, a report, an explanation) and/or a generated image (a PIL image
    labelled synthetic)."""

    task: str
    text: str | None = None
    image: Any = None
    params: dict = field(default_factory=dict)


RunFunction = Callable[[Any, Any, dict, RunOptions], TaskResult]
BatchFunction = Callable[[Any, list, list[dict], RunOptions], list[TaskResult]]


@dataclass(frozen=True)
class Batching:
    """How requests of a task run together: ``per_request`` names the parameters each request keeps for
    itself (every other parameter must be equal), ``run_fn(model, images, params_list, options)`` runs them in
    one batched call, and ``available(model, params)`` says whether this request may join a batch."""

    per_request: tuple[str, ...]
    run_fn: BatchFunction
    available: Callable[[Any, dict], bool] = lambda model, params: True


@dataclass(frozen=True)
class Task:
    """A task: its canonical name, what it takes (``"image"`` or ``"text"`` only) and returns (``"text"`` or
    ``"image"``), its parameters, and ``run(model, image, params, options)``."""

    name: str
    summary: str
    takes: str
    returns: str
    params: tuple[Param, ...]
    run_fn: RunFunction
    aliases: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()
    batching: Batching | None = None
    applies: Applicability = Applicability()

    def __post_init__(self):
        if self.takes not in ("image", "text") or self.returns not in ("text", "image"):
            raise ValueError(f"task {self.name}: takes must be image|text and returns text|image")
        if self.name != canonical_name(self.name):
            raise ValueError(f"task name {self.name!r} is not canonical (lower case, underscores)")

    @property
    def needs_image(self) -> bool:
        return self.takes == "image"

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise TaskParameterError(f"{self.name} has no parameter {name!r}")

    def plural_params(self) -> dict[str, Param]:
        """List keys that repeat the task once per value (e.g. ``questions`` -> ``question``)."""
        return {p.plural: p for p in self.params if p.plural}

    def item_params(self, params: Mapping[str, Any], index: int) -> dict:
        """The parameters for the ``index``-th input of one run (slices of a volume, items of a dataset): each
        gets its own seed, ``seed + index``, so the first equals a single call with ``seed``."""
        out = dict(params)
        if any(p.name == "seed" for p in self.params):
            seed = out.get("seed")
            out["seed"] = int(self.param("seed").default if seed is None else seed) + index
        return out

    def resolve(self, values: Mapping[str, Any] | None = None, limits: ModelLimits | None = None) -> dict:
        """Every parameter's value: the given ones parsed and checked, the rest their defaults. Unknown or
        missing parameters raise ``TaskParameterError``."""
        values = dict(values or {})
        unknown = sorted(set(values) - {p.name for p in self.params})
        if unknown:
            known = ", ".join(p.name for p in self.params)
            raise TaskParameterError(f"{self.name}: unknown parameter(s) {', '.join(unknown)} (known: {known})")
        out = {}
        for p in self.params:
            value = p.parse(values.get(p.name, p.default if not p.required else None))
            if value is not None and p.limit == "image_side" and limits is not None:
                limits.check_side(p.name, value)
            out[p.name] = value
        return out

    def run(self, model, image=None, params: Mapping[str, Any] | None = None,
            options: RunOptions | None = None) -> TaskResult:
        """Resolve ``params`` against this task and the model's limits, then run it on ``image``."""
        if self.needs_image and image is None:
            raise TaskParameterError(f"{self.name}: needs an input image")
        resolved = self.resolve(params, ModelLimits.of(model.config))
        result = self.run_fn(model, image, resolved, options or RunOptions())
        result.params = resolved
        return result

    def not_applicable(self, image, rules: Applicability | None = None) -> str | None:
        """Why this task does not apply to ``image`` under ``rules`` (the task's own by default)."""
        return (rules or self.applies).reason_not(image)

    def describe(self) -> dict:
        return {"name": self.name, "summary": self.summary, "takes": self.takes, "returns": self.returns,
                "aliases": list(self.aliases), "params": [p.describe() for p in self.params],
                "applies_to": self.applies.describe(), "examples": list(self.examples)}


class TaskRegistry:
    """Tasks by canonical name; old spellings resolve with a deprecation warning."""

    def __init__(self, tasks: Iterable[Task] = ()):
        self._tasks: dict[str, Task] = {}
        for task in tasks:
            self.register(task)

    def register(self, task: Task) -> Task:
        taken = set(self._tasks) | {canonical_name(a) for t in self._tasks.values() for a in t.aliases}
        clash = ({task.name} | {canonical_name(a) for a in task.aliases}) & taken
        if clash:
            raise ValueError(f"task name(s) {sorted(clash)} already registered")
        self._tasks[task.name] = task
        return task

    def unregister(self, name: str) -> None:
        self._tasks.pop(canonical_name(name), None)

    def names(self) -> list[str]:
        return list(self._tasks)

    def __iter__(self):
        return iter(self._tasks.values())

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name, warn=False)
            return True
        except UnknownTaskError:
            return False

    def get(self, name: str, warn: bool = True) -> Task:
        key = canonical_name(name)
        if key in self._tasks:
            return self._tasks[key]
        for task in self._tasks.values():
            if key in {canonical_name(a) for a in task.aliases}:
                if warn:
                    warnings.warn(f"task name {name!r} is deprecated; use {task.name!r}", FutureWarning,
                                  stacklevel=2)
                return task
        raise UnknownTaskError(f"unknown task {name!r}; choose from {', '.join(self._tasks)}")

    def describe(self, limits: ModelLimits | None = None) -> dict:
        """The registry as a JSON-ready document; with ``limits``, the checkpoint's own limits too."""
        doc: dict[str, Any] = {"tasks": [t.describe() for t in self]}
        if limits is not None:
            doc["limits"] = limits.describe()
        return doc
