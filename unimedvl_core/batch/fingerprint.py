"""What a row's result depends on, as one key: the task, the row's resolved parameters (its seed included),
its inputs (path, size and modification time of each file, of each file of a DICOM series folder; a hash of
inline bytes), its reference and the model. A resumed job counts a record as done only when it is ok and
its key equals the planned row's key (docs/batch.md#resume): a new task, parameter, prompt, model or input
file runs the row again."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .sources import Row

__all__ = ["row_keys", "model_identity"]

# the load options that change a row's result; the device and residency do not choose what is computed
_MODEL_OPTIONS = ("revision", "weights", "dtype", "quantization")
_DEFAULTS = {"weights": "ema"}


def model_identity(ckpt, load_options: Mapping[str, Any]) -> dict:
    """The checkpoint (None: the embedded model; a folder by its absolute path) and the load options that
    change results, defaults left out so that the CLI (which names them) and Python (which may not) agree."""
    given = {k: str(load_options[k]) for k in _MODEL_OPTIONS if load_options.get(k) not in (None, _DEFAULTS.get(k))}
    if ckpt is not None and Path(ckpt).exists():
        ckpt = Path(ckpt).resolve()
    return {"ckpt": None if ckpt is None else str(ckpt), **given}


def _stat(path: Path) -> list:
    try:
        st = path.stat()
    except OSError:
        return [path.name, None]  # missing: the row fails when read, and runs again once the file is there
    return [path.name, st.st_size, st.st_mtime_ns]


def _input(value: Any, folders: dict[str, list]) -> Any:
    """One input's fingerprint; a folder's (a DICOM series) is computed once per job in ``folders``."""
    if isinstance(value, (bytes, bytearray)):
        return hashlib.sha256(value).hexdigest()
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_dir():
            return [str(path), *_stat(path)[1:]]
        if str(path) not in folders:
            folders[str(path)] = [str(path), sorted(_stat(p) for p in path.iterdir() if p.is_file())]
        return folders[str(path)]
    if hasattr(value, "tobytes"):  # an in-memory image (PIL or array)
        return [type(value).__name__, hashlib.sha256(value.tobytes()).hexdigest()]
    return type(value).__name__


def row_keys(task: str, rows: list[Row], model: dict) -> None:
    """Sets ``row.key`` of every row (after ``plan_rows``: its parameters resolved)."""
    folders: dict[str, list] = {}
    for row in rows:
        what = {"task": task, "params": row.fields, "inputs": [_input(v, folders) for v in row.images],
                "reference": row.reference, "series": row.series_uid, "frame": row.frame, "model": model}
        text = json.dumps(what, sort_keys=True, default=str)
        row.key = hashlib.sha256(text.encode()).hexdigest()[:32]
