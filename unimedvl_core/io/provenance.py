"""Which weights made an output: the checkpoint folder's name, the weights file and its SHA-256, and whether
it is the embedded phantom-trained demonstration model. Written into every output (PNG text chunks, DICOM,
SR, NIfTI description, JSON) so that a result can always be traced to its weights."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["Provenance", "file_sha256", "DEMO_NOTICE"]

# Said once with every answer or output of the embedded model (stderr line, JSON field, SR text, UI).
DEMO_NOTICE = ("Made by the embedded phantom-only demonstration model (trained on procedural phantoms, not on "
               "patient images): a software demonstration, not an interpretation of a real image; load the "
               "released UniMedVL checkpoint for real work.")

_CHUNK = 16 * 2**20


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Provenance:
    """The weights behind a model. ``sha256`` is computed on first use (a 29 GB file takes tens of seconds)
    and kept."""

    name: str
    weights_file: Path | None = None
    demo: bool = False
    _sha256: str | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str | None:
        if self._sha256 is None and self.weights_file is not None and Path(self.weights_file).is_file():
            self._sha256 = file_sha256(self.weights_file)
        return self._sha256

    @property
    def short(self) -> str:
        """``name (weights.safetensors sha256:0123456789ab)``: what labels and reports print."""
        if self.weights_file is None:
            return self.name
        digest = self.sha256
        return f"{self.name} ({Path(self.weights_file).name}" + (f" sha256:{digest[:12]})" if digest else ")")

    @property
    def notice(self) -> str | None:
        """The one-line warning every surface shows with a demonstration model's outputs; None otherwise."""
        return DEMO_NOTICE if self.demo else None

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("_sha256")
        out["weights_file"] = Path(self.weights_file).name if self.weights_file else None
        out["sha256"] = self.sha256
        out["notice"] = self.notice
        return out
