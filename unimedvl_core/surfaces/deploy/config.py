"""The task file of the MONAI Deploy application (YAML or JSON), read once at start-up and checked against
the task registry (``unimedvl tasks`` lists every task, parameter, default and limit).

    series_selection: {selections: [...]}   # DICOMSeriesSelectorOperator rules; default: supported modalities
    slices: key                              # key | all | {start: 10, stop: 20}
    window: null                             # [centre, width] or a preset name; null = the file's own
    slide: {region: [x, y, w, h], level: 2}  # whole slides (VL WSI): part and pyramid level to read; default:
                                             # all of it, at each task's level (docs/medical-io.md#whole-slide-images)
    tasks:                                   # each: a registry task name and any of its parameters
      - {task: vqa, questions: ["Is there a pleural effusion?"]}     # list form: once per question
      - {task: report}                     # series_report: true: one report from key slices of the series
      - {task: super_resolution, scale: 2, applies_to: {modalities: [CT, MR], max_side: 512}}
      - {task: contrast_translation, source: T2, target: FLAIR}
      - {task: counterfactual, instruction: "Remove the effusion."}
      - {task: text_to_image, prompts: ["..."]}   # only when asked for
    num_inference_steps: 49                  # a task parameter at the top applies to every task that has it
    seed: 0
    device: null                             # cuda when available, else cpu
    quantization: null                       # int8, nf4 or fp8 weights (docs/quantization.md)
    residency: all                           # task: only the expert a task uses on the GPU
    allow_demo_model: false                  # with no model folder, run the embedded phantom demonstration model
    include_synthetic_inputs: false          # read images this application made (skipped by default)

``applies_to`` (any task) replaces the registry's rules of where the task applies (``Task.applies``:
modalities, largest input side); where it does not apply the run records "not applicable" with the reason.
``applies_to: {}`` applies the task everywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ...tasks.catalog import TASKS
from ...tasks.registry import Applicability
from ...tasks.slides import parse_region

__all__ = ["TaskSpec", "DeployConfig", "load_deploy_config", "parse_task", "DEFAULT_SELECTION"]

# Image modalities the model reads; SR, RT, KO, PR and other non-image objects never match.
DEFAULT_SELECTION = {"selections": [{
    "name": "supported image series",
    "conditions": {"Modality": "(?i)^(CT|MR|CR|DX|DR|MG|US|XA|RF|PT|NM|SM|OT|XC|ES|GM|OP|IO|PX|RG)$"},
}]}

SETTINGS = ("tasks", "series_selection", "slices", "window", "slide", "device", "allow_demo_model",
            "include_synthetic_inputs", "quantization", "residency")


@dataclass
class TaskSpec:
    """One entry of the task file: a registry task, its parameters, and the values of its repeatable
    parameter (e.g. the questions of VQA) when given as a list, and where it applies (``None``: the registry's
    rules)."""

    task: str
    params: dict = field(default_factory=dict)
    repeat: tuple[str, list] | None = None
    rules: Applicability | None = None

    def not_applicable(self, image) -> str | None:
        """Why this entry does not apply to ``image`` (a ``MedicalImage``), or ``None``."""
        return TASKS.get(self.task, warn=False).not_applicable(image, self.rules)

    @property
    def key_slices(self) -> int | None:
        """How many key slices one report of the whole series reads (``series_report``), or None: per slice."""
        params = TASKS.get(self.task, warn=False).resolve(self.runs()[0])
        return params["key_slices"] if params.get("series_report") else None

    def runs(self) -> list[dict]:
        """The parameters of each run: one per value of the repeated parameter."""
        if self.repeat is None:
            return [dict(self.params)]
        name, values = self.repeat
        return [{**self.params, name: v} for v in values]


def parse_task(entry: dict, defaults: dict | None = None) -> TaskSpec:
    """A task-file entry checked against the registry; ``defaults`` (top-level parameters) fill in the
    parameters the entry leaves out. Raises ``ValueError`` naming the task and the parameter."""
    if not isinstance(entry, dict) or "task" not in entry:
        raise ValueError(f"each task needs a 'task' name, got {entry!r}")
    entry = dict(entry)
    task = TASKS.get(entry.pop("task"))
    rules = _rules(task.name, entry.pop("applies_to", None))
    repeat = None
    for plural, param in task.plural_params().items():
        if plural in entry:
            values = entry.pop(plural)
            if not isinstance(values, list) or not values:
                raise ValueError(f"{task.name}: {plural} must be a non-empty list")
            repeat = (param.name, values)
    names = {p.name for p in task.params}
    params = {**{k: v for k, v in (defaults or {}).items() if k in names}, **entry}
    spec = TaskSpec(task.name, params, repeat, rules)
    try:
        for run in spec.runs():
            task.resolve(run)
    except ValueError as err:
        raise ValueError(f"task {task.name}: {err}") from None
    return spec


def _rules(task: str, data: Any) -> Applicability | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"task {task}: applies_to must be a mapping of modalities and/or max_side, got {data!r}")
    side, modalities = data.get("max_side"), data.get("modalities")
    if side is not None and (isinstance(side, bool) or not isinstance(side, int) or side < 1):
        raise ValueError(f"task {task}: applies_to.max_side must be a positive integer, got {side!r}")
    if modalities is not None and not isinstance(modalities, list):
        raise ValueError(f"task {task}: applies_to.modalities must be a list, got {modalities!r}")
    try:
        return Applicability.from_dict(data)
    except ValueError as err:
        raise ValueError(f"task {task}: {err}") from None


def _slide_setting(data) -> tuple[tuple[int, int, int, int] | None, int | None]:
    """``slide: {region: [x, y, w, h], level: N}`` (both optional) -> (region, level)."""
    if data is None:
        return None, None
    if not isinstance(data, dict) or set(data) - {"region", "level"}:
        raise ValueError(f"slide must be a mapping with region and/or level, got {data!r}")
    level = data.get("level")
    if level is not None and (isinstance(level, bool) or not isinstance(level, int) or level < 0):
        raise ValueError(f"slide.level must be a pyramid level (0 = finest), got {level!r}")
    region = data.get("region")
    return (None if region is None else parse_region(region)), level


@dataclass
class DeployConfig:
    tasks: list[TaskSpec]
    series_selection: dict = field(default_factory=lambda: DEFAULT_SELECTION)
    slices: Any = "key"
    window: Any = None
    device: str | None = None
    allow_demo_model: bool = False
    include_synthetic_inputs: bool = False
    quantization: str | None = None
    residency: str = "all"
    slide: dict | None = None

    def __post_init__(self):
        for name in ("allow_demo_model", "include_synthetic_inputs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self.slide_region, self.slide_level = _slide_setting(self.slide)
        if self.quantization not in (None, "int8", "nf4", "fp8") or self.residency not in ("all", "task"):
            raise ValueError(f"quantization must be null, int8, nf4 or fp8 and residency all or task, got "
                             f"{self.quantization!r} and {self.residency!r}")

    def load_options(self) -> dict:
        """The model-loading options of the task file (``load_model`` keywords)."""
        return {"device": self.device, "quantization": self.quantization, "residency": self.residency}

    @property
    def slice_mode(self) -> tuple[str, int | None, int | None]:
        if isinstance(self.slices, dict):
            return "range", self.slices.get("start"), self.slices.get("stop")
        if self.slices not in ("key", "all"):
            raise ValueError(f"slices must be key, all or {{start, stop}}, got {self.slices!r}")
        return self.slices, None, None


def load_deploy_config(path: str | Path) -> DeployConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                         f"{' '.join(str(err).split())}") from None
    if not isinstance(data, dict) or not data.get("tasks"):
        raise ValueError(f"{path}: needs a 'tasks' list")
    parameter_names = {p.name for task in TASKS for p in task.params}
    unknown = set(data) - set(SETTINGS) - parameter_names
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    defaults = {k: v for k, v in data.items() if k in parameter_names}
    tasks = [parse_task(t, defaults) for t in data["tasks"]]
    settings = {k: v for k, v in data.items() if k in SETTINGS and k != "tasks"}
    return DeployConfig(tasks=tasks, **settings)
