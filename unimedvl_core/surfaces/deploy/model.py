"""Which weights the application runs, decided before anything is loaded.

- A model folder given with ``-m`` or ``HOLOSCAN_MODEL_PATH`` is always used, whatever checkpoint it holds
  (the embedded model's own folder included): the checkpoint is the folder itself or its one sub-folder
  holding one (the MAP packager copies ``-m /models/UniMedVL`` to ``<models>/UniMedVL/``). Several
  checkpoints, or a checkpoint with files missing, stop the application with a message naming them.
- A Hugging Face Hub id (``-m General-Medical-AI/UniMedVL``, or ``org/name@revision``) is the checkpoint
  in the Hub cache (fetched when the container may reach the Hub; ``HF_HUB_OFFLINE=1`` for the cache only).
- With no model folder (none given, or the given one absent or empty), the embedded phantom-trained
  demonstration model runs only when asked for (``UNIMEDVL_ALLOW_DEMO_MODEL=1`` or ``allow_demo_model: true``
  in the task file); otherwise the application stops and says how to give a model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ...io.checkpoint import VAE_FILE, WEIGHT_FILES, CheckpointError
from ...io.hub import is_hub_id, resolve_checkpoint, split_revision

__all__ = ["ModelChoice", "ModelFolderError", "DEMO_ENV", "checkpoint_problem", "choose_model"]

DEMO_ENV = "UNIMEDVL_ALLOW_DEMO_MODEL"
CONFIG_FILES = ("llm_config.json", "vit_config.json")
MARKERS = (*CONFIG_FILES, *WEIGHT_FILES.values(), VAE_FILE)


class ModelFolderError(ValueError):
    """The model folder cannot be used (several checkpoints, a broken one, none and no demo switch)."""


@dataclass(frozen=True)
class ModelChoice:
    """The checkpoint folder to load, or ``None`` for the embedded demonstration model."""

    checkpoint: Path | None
    demo: bool

    def describe(self) -> str:
        return str(self.checkpoint) if self.checkpoint else "embedded phantom-trained demonstration model"


def _has_markers(folder: Path) -> bool:
    return any((folder / name).is_file() for name in MARKERS)


def checkpoint_problem(folder: Path) -> str | None:
    """What a checkpoint folder lacks (configs, ``ema``/``model.safetensors``, ``ae.safetensors``), or ``None``."""
    missing = [n for n in (*CONFIG_FILES, VAE_FILE) if not (folder / n).is_file()]
    if not any((folder / n).is_file() for n in WEIGHT_FILES.values()):
        missing.append(" or ".join(WEIGHT_FILES.values()))
    return f"checkpoint {folder} is incomplete: {', '.join(missing)} missing" if missing else None


def _find_checkpoint(folder: Path) -> Path | None:
    """The checkpoint in ``folder`` (itself or its one sub-folder holding one); ``None`` when it holds none."""
    if _has_markers(folder):
        candidates = [folder]
    else:
        candidates = sorted(d for d in folder.iterdir() if d.is_dir() and _has_markers(d))
    if len(candidates) > 1:
        names = ", ".join(d.name for d in candidates)
        raise ModelFolderError(f"model folder {folder} holds several checkpoints ({names}); give -m the one to use")
    if not candidates:
        return None
    problem = checkpoint_problem(candidates[0])
    if problem:
        raise ModelFolderError(problem)
    return candidates[0]


def _demo_allowed(allow_demo_model: bool) -> bool:
    return allow_demo_model or os.environ.get(DEMO_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_checkpoint(repo: str, revision: str | None) -> Path:
    try:
        found = _find_checkpoint(resolve_checkpoint(repo, revision))
    except CheckpointError as err:
        raise ModelFolderError(str(err)) from None
    if found is None:
        raise ModelFolderError(f"Hub model {repo} holds no checkpoint (llm_config.json, ema.safetensors, ...)")
    return found


def choose_model(model_path: str | Path | None, allow_demo_model: bool = False) -> ModelChoice:
    """The weights to run (see the module docstring); raises ``ModelFolderError`` with a one-line reason."""
    repo, revision = split_revision(model_path) if model_path else (None, None)
    if repo is not None and is_hub_id(repo):
        return ModelChoice(_hub_checkpoint(repo, revision), demo=False)
    folder = Path(model_path) if model_path else None
    if folder is not None and folder.exists():
        if not folder.is_dir():
            raise ModelFolderError(f"model path {folder} is not a folder")
        found = _find_checkpoint(folder)
        if found is not None:
            from ...inference.embedded import DEFAULT_MODEL_DIR

            return ModelChoice(found, demo=found.resolve() == DEFAULT_MODEL_DIR.resolve())
    if _demo_allowed(allow_demo_model):
        return ModelChoice(None, demo=True)
    where = f"no checkpoint in the model folder {folder}" if folder is not None and folder.exists() else \
        "no model folder"
    raise ModelFolderError(f"{where} (expected llm_config.json, vit_config.json, ema.safetensors, ae.safetensors); "
                           f"give one with -m or HOLOSCAN_MODEL_PATH, or set {DEMO_ENV}=1 to run the embedded "
                           "phantom-only demonstration model")
