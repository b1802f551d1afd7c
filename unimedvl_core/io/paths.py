"""Outputs never overwrite inputs: an output may not be an input file, nor lie inside an input folder, nor
be a folder that holds an input."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = ["OutputLocationError", "check_output_location"]


class OutputLocationError(ValueError):
    """An output path that would overwrite or mix with the inputs."""


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_location(outputs: Iterable[str | Path], inputs: Iterable[str | Path]) -> None:
    """Raise ``OutputLocationError`` naming the first output that equals an input file, lies inside an input
    folder, or is a folder holding an input (paths are compared resolved, so links and ``..`` count)."""
    sources = [Path(p).resolve() for p in inputs]
    for output in outputs:
        target = Path(output).resolve()
        for source in sources:
            if target == source:
                raise OutputLocationError(f"output {output} is the input itself; choose another output path")
            if source.is_dir() and _inside(target, source):
                raise OutputLocationError(f"output {output} lies inside the input folder {source}; write elsewhere")
            if _inside(source, target) and target.is_dir():
                raise OutputLocationError(f"output folder {output} holds the input {source}; write elsewhere")
