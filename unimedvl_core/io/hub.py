"""Checkpoints named by Hugging Face Hub id (``org/name``), as transformers and diffusers users pass them.

A path that exists is a folder and is used as it is. Otherwise a name of the form ``org/name`` is a Hub repo:
``huggingface_hub.snapshot_download`` fetches only the files ``from_pretrained`` reads (configurations,
tokenizer files, the chosen weights and the VAE) into the Hugging Face cache, or finds them there; with
``HF_HUB_OFFLINE=1`` it never reaches the network. Anything else is a one-line error (docs/checkpoint.md#hub-ids).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..modeling.config import ConfigError
from .checkpoint import TOKENIZER_FILES, VAE_FILE, WEIGHT_FILES, CheckpointError

__all__ = ["HubError", "is_hub_id", "hub_files", "resolve_checkpoint", "resolve_config", "checkpoint_name",
           "split_revision"]

CONFIG_FILES = ("config.json", "llm_config.json", "vit_config.json")
# the Hub's rules for a repo id: one slash, names of letters, digits and . _ - (no leading or trailing . or -)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


class HubError(CheckpointError):
    """A Hub id that cannot be resolved (not cached while offline, unknown repo or revision, no network)."""


def is_hub_id(name: str | Path) -> bool:
    """``org/name`` with the Hub's characters; a path that exists on disk is never a Hub id."""
    text = str(name)
    return bool(_HUB_ID.match(text)) and ".." not in text and not Path(text).exists()


def hub_files(weights: str = "ema") -> list[str]:
    """The files of a checkpoint repo that ``from_pretrained`` reads: configurations, tokenizer files, the VAE
    and the chosen weights (``model.safetensors`` too for ``ema``, which falls back to it)."""
    chosen = [WEIGHT_FILES.get(weights, WEIGHT_FILES["ema"]), WEIGHT_FILES["model"]][: 2 if weights == "ema" else 1]
    return [*CONFIG_FILES, *TOKENIZER_FILES, VAE_FILE, *chosen]


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # a relative path that does not exist looks like a Hub id too: the message says both
    at = f"no folder {repo_id} here, and the Hub model {repo_id}@{revision or 'main'}"
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                      local_files_only=_offline()))
    except RevisionNotFoundError:
        raise HubError(f"{at}: no such revision") from None
    except GatedRepoError:
        raise HubError(f"{at} is gated: accept its terms on the Hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise HubError(f"{at} was not found (or private: log in with hf auth login)") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if _offline() else "the Hub could not be reached"
        raise HubError(f"{at} is not in the Hugging Face cache and {why}") from None
    except (HfHubHTTPError, OSError) as err:
        raise HubError(f"{at} could not be fetched ({type(err).__name__})") from None


def _resolve(path: str | Path, revision: str | None, patterns: list[str]) -> Path:
    if Path(path).exists():
        if revision is not None:
            raise CheckpointError(f"revision={revision!r} applies to Hub ids only; {path} is a local path")
        return Path(path)
    if not is_hub_id(path):
        raise ConfigError(f"checkpoint folder not found: {path} (neither a folder nor a Hub id org/name)")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise CheckpointError(f"{path} looks like a Hub id, and loading one needs huggingface_hub: "
                              "pip install 'unimedvl-core[hub]'") from None
    return _download(str(path), revision, patterns)


def resolve_checkpoint(path: str | Path, revision: str | None = None, weights: str = "ema") -> Path:
    """The local checkpoint folder for ``path``: the folder itself when it exists, else the cached snapshot
    of the Hub repo ``path`` at ``revision`` (a branch, tag or commit; the default branch when None)."""
    return _resolve(path, revision, hub_files(weights))


def resolve_config(path: str | Path, revision: str | None = None) -> Path:
    """As ``resolve_checkpoint``, but a Hub snapshot gets only the configuration files (kilobytes), so that a
    caller can check the model's limits before any weights are downloaded (``unimedvl tasks``, ``batch``)."""
    return _resolve(path, revision, list(CONFIG_FILES))


def checkpoint_name(path: str | Path, revision: str | None = None) -> str:
    """What outputs call the weights: the Hub id (with its revision when given) or the folder's name."""
    if is_hub_id(path):
        return f"{path}@{revision}" if revision else str(path)
    return Path(path).resolve().name


def split_revision(name: str) -> tuple[str, str | None]:
    """``org/name@revision`` as (``org/name``, ``revision``), for surfaces that take one string (the MAP's
    ``-m``); anything else as (``name``, None)."""
    repo, at, revision = str(name).partition("@")
    return (repo, revision) if at and revision and is_hub_id(repo) else (str(name), None)
