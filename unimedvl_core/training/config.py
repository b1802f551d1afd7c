"""Training recipes: one YAML file naming the model, the data registry, the optimisation settings and the
stages; the curriculum stages and dataset registries are YAML files of their own (``configs/``).

A relative path in a recipe (preset, registry, curriculum) is taken from the working directory when it
exists there, else from the recipe's folder or the nearest folder above it that has it, so recipes work
from anywhere in the repository. Any value can be overridden with ``--set section.key=value`` (the value
is parsed as YAML).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

__all__ = ["TrainConfig", "StageConfig", "OptimConfig", "DataConfig", "ModelSection", "ParallelConfig",
           "CheckpointConfig", "load_recipe", "load_curriculum", "load_registry", "apply_overrides",
           "RecipeError", "CATEGORIES"]

CATEGORIES = ("i2t", "t2i", "interleaved")


class RecipeError(ValueError):
    """A training recipe, curriculum or registry file is missing, malformed or inconsistent."""


@dataclass
class ModelSection:
    preset: str | None = None          # model geometry (configs/models/*.json) for a fresh model
    init_from: str | None = None       # a checkpoint in the released layout to start from
    init_moe: bool = False             # copy the understanding expert into the generation expert
    tokenizer: str | None = None       # tokenizer folder; "build" trains one on the data text (stage 0)
    tokenizer_vocab_size: int = 768


@dataclass
class DataConfig:
    registry: str = ""
    data_dir: str | None = None        # overrides the registry's data_dir
    loader: str = "torch"              # "torch" (PIL in a DataLoader worker) or "dali"
    num_workers: int = 1               # 0 = in the training process; 1 = one background worker per rank
    expected_num_tokens: int = 32768
    max_num_tokens: int = 36864
    max_num_tokens_per_sample: int = 16384
    max_buffer_size: int = 50
    text_cond_dropout_prob: float = 0.1
    vit_cond_dropout_prob: float = 0.3
    vae_cond_dropout_prob: float = 0.3
    timestep_shift: float = 1.0
    shuffle: bool = True


@dataclass
class OptimConfig:
    ce_weight: float = 1.0             # the objective: weighted text cross-entropy + velocity MSE
    mse_weight: float = 1.0
    lr: float = 1e-4
    min_lr: float = 1e-7
    lr_scheduler: str = "constant"     # "constant" or "cosine" (both with linear warm-up)
    warmup_steps: int = 2000
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-15
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    ema: float = 0.9999
    freeze_vit: bool = False
    freeze_und: bool = False
    freeze_llm: bool = False


@dataclass
class StageConfig:
    stage: int
    steps: int
    kind: str = "curriculum"           # "curriculum" (the unified model) or "vae" (autoencoder pretraining)
    curriculum: str | None = None
    mixture: dict[str, float] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)   # overrides of the recipe's optim section
    data: dict[str, Any] = field(default_factory=dict)    # overrides of the recipe's data section
    batch_size: int = 32               # images per step of the VAE stage
    crop_size: int | None = None       # VAE stage: train on random crops of this side (default: vae resolution)
    name: str = ""


@dataclass
class ParallelConfig:
    strategy: str = "fsdp"             # "fsdp" (FSDP2 fully_shard) or "ddp", used when world size > 1
    activation_checkpointing: bool = False
    mixed_precision: str = "bf16"      # autocast dtype on GPU; CPU trains in fp32


@dataclass
class CheckpointConfig:
    save_every: int = 2000
    keep: int = 2


@dataclass
class TrainConfig:
    run_dir: str
    model: ModelSection
    data: DataConfig
    optim: OptimConfig
    stages: dict[int, StageConfig]
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = 4396
    log_every: int = 10
    source: str = ""

    def stage(self, number: int) -> StageConfig:
        if number not in self.stages:
            raise RecipeError(f"recipe {self.source} has no stage {number}; it has {sorted(self.stages)}")
        return self.stages[number]

    def optim_for(self, stage: StageConfig) -> OptimConfig:
        return _build(OptimConfig, {**_as_dict(self.optim), **stage.optim}, f"stage {stage.stage} optim")

    def data_for(self, stage: StageConfig) -> DataConfig:
        return _build(DataConfig, {**_as_dict(self.data), **stage.data}, f"stage {stage.stage} data")


def _as_dict(obj) -> dict:
    return {f.name: copy.deepcopy(getattr(obj, f.name)) for f in fields(obj)}


def _build(cls, data: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise RecipeError(f"{where}: unknown keys {sorted(unknown)}")
    if "betas" in data:
        data["betas"] = tuple(data["betas"])
    return cls(**data)


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: invalid YAML ({err})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level")
    return data


def load_curriculum(path: str | Path) -> dict[str, float]:
    """Category sampling shares of a curriculum stage, normalised to sum to 1."""
    data = _read_yaml(path)
    mixture = data.get("mixture")
    if not isinstance(mixture, dict) or set(mixture) - set(CATEGORIES):
        raise RecipeError(f"{path}: 'mixture' must map {CATEGORIES} to weights")
    return normalise_mixture(mixture, str(path))


def normalise_mixture(mixture: dict[str, float], where: str) -> dict[str, float]:
    total = float(sum(mixture.values()))
    if total <= 0 or any(v < 0 for v in mixture.values()):
        raise RecipeError(f"{where}: mixture weights must be >= 0 and not all zero")
    return {k: float(v) / total for k, v in mixture.items() if v > 0}


def load_registry(path: str | Path, data_dir: str | None = None) -> tuple[Path, dict[str, dict]]:
    """(data_dir, groups) of a dataset registry."""
    data = _read_yaml(path)
    groups = data.get("groups")
    if not isinstance(groups, dict) or not groups:
        raise RecipeError(f"{path}: 'groups' must be a non-empty mapping")
    for name, group in groups.items():
        for key in ("format", "category"):
            if key not in group:
                raise RecipeError(f"{path}: group {name} lacks '{key}'")
        if group["category"] not in CATEGORIES:
            raise RecipeError(f"{path}: group {name} has category {group['category']!r}; use one of {CATEGORIES}")
    root = data_dir or data.get("data_dir")
    if not root:
        raise RecipeError(f"{path}: no data_dir (set it in the registry or with data.data_dir)")
    return Path(root), groups


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form key.path=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            part = int(part) if part.isdigit() and isinstance(node, dict) and int(part) in node else part
            node = node.setdefault(part, {})
        last = int(parts[-1]) if parts[-1].isdigit() and int(parts[-1]) in node else parts[-1]
        node[last] = yaml.safe_load(value)
    return raw


def resolve_path(value: str | None, anchor: Path) -> str | None:
    """A relative path from the working directory, or from ``anchor`` or its nearest ancestor having it."""
    if not value or Path(value).is_absolute() or Path(value).exists():
        return value
    for folder in [anchor, *anchor.parents]:
        if (folder / value).exists():
            return str(folder / value)
    return value


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    raw = apply_overrides(_read_yaml(path), overrides or [])
    anchor = Path(path).resolve().parent
    for section, key in (("model", "preset"), ("data", "registry")):
        if isinstance(raw.get(section), dict) and raw[section].get(key):
            raw[section][key] = resolve_path(raw[section][key], anchor)
    for spec in (raw.get("stages") or {}).values():
        if isinstance(spec, dict) and spec.get("curriculum"):
            spec["curriculum"] = resolve_path(spec["curriculum"], anchor)
    for key in ("run_dir", "model", "data", "stages"):
        if key not in raw:
            raise RecipeError(f"{path}: missing '{key}'")
    stages = {}
    for number, spec in raw["stages"].items():
        spec = dict(spec or {})
        spec.setdefault("stage", int(number))
        stage = _build(StageConfig, spec, f"{path}: stage {number}")
        if stage.kind == "curriculum":
            if stage.curriculum:
                stage.mixture = load_curriculum(stage.curriculum)
            elif stage.mixture:
                stage.mixture = normalise_mixture(stage.mixture, f"{path}: stage {number}")
            else:
                raise RecipeError(f"{path}: stage {number} needs a curriculum file or a mixture")
        elif stage.kind != "vae":
            raise RecipeError(f"{path}: stage {number} has unknown kind {stage.kind!r}")
        if stage.steps < 1:
            raise RecipeError(f"{path}: stage {number} needs steps >= 1")
        stages[int(number)] = stage
    return TrainConfig(
        run_dir=str(raw["run_dir"]),
        model=_build(ModelSection, raw["model"], f"{path}: model"),
        data=_build(DataConfig, raw["data"], f"{path}: data"),
        optim=_build(OptimConfig, raw.get("optim", {}), f"{path}: optim"),
        stages=stages,
        parallel=_build(ParallelConfig, raw.get("parallel", {}), f"{path}: parallel"),
        checkpoint=_build(CheckpointConfig, raw.get("checkpoint", {}), f"{path}: checkpoint"),
        seed=int(raw.get("seed", 4396)),
        log_every=int(raw.get("log_every", 10)),
        source=str(path),
    )
