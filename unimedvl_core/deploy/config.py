"""The task file of the MONAI Deploy application (YAML or JSON), read once at start-up.

    series_selection: {selections: [...]}   # DICOMSeriesSelectorOperator rules; default: supported modalities
    slices: key                              # key | all | {start: 10, stop: 20}
    window: null                             # [centre, width] or a preset name; null = the file's own
    tasks:
      - {task: vqa, questions: ["Is there a pleural effusion?"]}
      - {task: report}
      - {task: super_resolution, scale: 4}
      - {task: contrast_translation, source: T2, target: FLAIR}
      - {task: virtual_staining, stain: IHC}
      - {task: counterfactual, instruction: "Remove the effusion."}
      - {task: text_to_image, prompts: ["..."]}   # only when asked for
    max_new_tokens: 256
    num_inference_steps: 25
    seed: 0
    device: null                              # cuda when available, else cpu
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["TaskSpec", "DeployConfig", "load_deploy_config", "DEFAULT_SELECTION", "TASK_NAMES"]

TASK_NAMES = ("vqa", "report", "super_resolution", "virtual_staining", "contrast_translation", "edit",
              "counterfactual", "text_to_image")

# Image modalities the model reads; SR, RT, KO, PR and other non-image objects never match.
DEFAULT_SELECTION = {"selections": [{
    "name": "supported image series",
    "conditions": {"Modality": "(?i)^(CT|MR|CR|DX|DR|MG|US|XA|RF|PT|NM|SM|OT|XC|ES|GM|OP|IO|PX|RG)$"},
}]}


@dataclass
class TaskSpec:
    task: str
    questions: list[str] = field(default_factory=list)
    prompt: str | None = None
    prompts: list[str] = field(default_factory=list)
    instruction: str | None = None
    scale: int = 4
    stain: str = "IHC"
    source: str = "T2"
    target: str = "FLAIR"

    def __post_init__(self):
        if self.task not in TASK_NAMES:
            raise ValueError(f"unknown task {self.task!r}; choose from {TASK_NAMES}")
        if self.task == "vqa" and not self.questions:
            raise ValueError("a vqa task needs questions")
        if self.task in ("edit", "counterfactual") and not self.instruction:
            raise ValueError(f"a {self.task} task needs an instruction")
        if self.task == "text_to_image" and not self.prompts:
            raise ValueError("a text_to_image task needs prompts")


@dataclass
class DeployConfig:
    tasks: list[TaskSpec]
    series_selection: dict = field(default_factory=lambda: DEFAULT_SELECTION)
    slices: Any = "key"
    window: Any = None
    max_new_tokens: int = 256
    num_inference_steps: int = 25
    seed: int = 0
    device: str | None = None

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
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict) or not data.get("tasks"):
        raise ValueError(f"{path}: needs a 'tasks' list")
    known = {"tasks", "series_selection", "slices", "window", "max_new_tokens", "num_inference_steps", "seed", "device"}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    tasks = [TaskSpec(**t) for t in data.pop("tasks")]
    return DeployConfig(tasks=tasks, **data)
