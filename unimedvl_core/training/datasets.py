"""Readers of the released training formats and their sequence plans (docs/training.md).

A record becomes a list of ``PlanItem`` (text, ViT image, VAE image; with loss and guidance-dropout flags)
and the images it refers to. Formats, by their registry keys:

- ``SftJSONLIterableDataset_Ver1`` (VQA / reports): ``{"input_img": [{"path"}], "message": [{"from": "human"
  | "gpt", "value"}]}``; human turns are split at ``<image>`` into text blocks (no loss, never dropped) and
  ViT images (droppable); gpt turns are supervised text.
- ``T2IIterableDataset_Ver1`` (JSONL): ``{"output_img" | "input_img", "message"}``: the human text
  (droppable), supervised gpt text if any, one VAE target per image.
- ``t2i_pretrain`` (parquet): columns ``image`` (bytes) and ``captions`` (JSON object; one value is drawn).
- ``MedicalImageEditingIterableDataset_ver1``: ``{"input_img", "output_img", "message", ...}``: the input
  as a VAE condition and a ViT image, the instruction, supervised gpt text if any, the output as VAE target.
- ``CounterfactualMedicalIterableDataset_ver1``: as editing, but the gpt explanation follows the target.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["PlanItem", "ImageSource", "RecordError", "FORMATS", "JsonlRows", "ParquetRows", "open_rows",
           "record_plan", "IMAGE_TOKEN", "MAX_SIDE", "MAX_PIXELS"]

IMAGE_TOKEN = "<image>"
MAX_SIDE = 4096          # the reference skips images this large per side
MAX_PIXELS = 20_000_000

FORMATS = ("SftJSONLIterableDataset_Ver1", "T2IIterableDataset_Ver1", "t2i_pretrain",
           "MedicalImageEditingIterableDataset_ver1", "CounterfactualMedicalIterableDataset_ver1")


class RecordError(ValueError):
    """A record is malformed or refers to an unusable image; the sample is skipped and counted."""


@dataclass
class ImageSource:
    path: Path | None = None
    data: bytes | None = None

    def open(self) -> Image.Image:
        try:
            img = Image.open(self.path if self.path is not None else io.BytesIO(self.data))
            img.load()
        except FileNotFoundError:
            raise RecordError(f"missing image {self.path}") from None
        except Exception as err:
            raise RecordError(f"corrupt image {self.path or '<bytes>'}: {err}") from None
        return img

    def header_size(self) -> tuple[int, int]:
        """(width, height) from the header after an integrity check, without decoding the pixels."""
        try:
            with Image.open(self.path if self.path is not None else io.BytesIO(self.data)) as img:
                size = img.size
                img.verify()
        except FileNotFoundError:
            raise RecordError(f"missing image {self.path}") from None
        except Exception as err:
            raise RecordError(f"corrupt image {self.path or '<bytes>'}: {err}") from None
        if max(size) >= MAX_SIDE or size[0] * size[1] > MAX_PIXELS:
            raise RecordError(f"image too large ({size[0]}x{size[1]})")
        return size

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        try:
            return Path(self.path).read_bytes()
        except FileNotFoundError:
            raise RecordError(f"missing image {self.path}") from None


@dataclass
class PlanItem:
    kind: str                 # "text", "vit" or "vae"
    loss: bool = False        # supervised: next-token CE for text, velocity MSE for a VAE target
    cfg: bool = False         # may be dropped for classifier-free guidance training
    text: str = ""
    image: int = -1           # index into the record's images
    ids: list[int] = field(default_factory=list)


class JsonlRows:
    """Random access to the lines of a JSONL file through a byte-offset index."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise FileNotFoundError(f"dataset file not found: {path}")
        self.path = path
        offsets = []
        with open(path, "rb") as f:
            pos = 0
            for line in f:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self._file = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, row: int) -> dict:
        if self._file is None:
            self._file = open(self.path, "rb")
        self._file.seek(int(self.offsets[row]))
        line = self._file.readline()
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise RecordError(f"{self.path.name} line {row}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise RecordError(f"{self.path.name} line {row}: not a JSON object")
        return record

    def __getstate__(self):
        return {**self.__dict__, "_file": None}


class ParquetRows:
    """Rows of ``t2i_pretrain`` parquet files (``image`` bytes, ``captions`` JSON)."""

    def __init__(self, paths: list[Path]):
        import pyarrow.parquet as pq

        self.paths = paths
        self.index: list[tuple[int, int, int]] = []  # (file, row group, row in group)
        for f, path in enumerate(paths):
            if not path.is_file():
                raise FileNotFoundError(f"dataset file not found: {path}")
            meta = pq.ParquetFile(path).metadata
            for g in range(meta.num_row_groups):
                self.index.extend((f, g, r) for r in range(meta.row_group(g).num_rows))
        self._cache: tuple[tuple[int, int], Any] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, row: int) -> dict:
        import pyarrow.parquet as pq

        f, g, r = self.index[row]
        if self._cache is None or self._cache[0] != (f, g):
            table = pq.ParquetFile(self.paths[f]).read_row_group(g, columns=["image", "captions"])
            self._cache = ((f, g), table.to_pydict())
        cols = self._cache[1]
        return {"image": cols["image"][r], "captions": cols["captions"][r]}

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}


def open_rows(group: dict, data_dir: Path):
    fmt = group["format"]
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; supported: {FORMATS}")
    if fmt == "t2i_pretrain":
        files = group.get("parquet") or []
        return ParquetRows([data_dir / f for f in ([files] if isinstance(files, str) else files)])
    if "jsonl" not in group:
        raise ValueError(f"a {fmt} group needs a 'jsonl' file")
    return JsonlRows(data_dir / group["jsonl"])


# ----------------------------------------------------------------------------------------------------------
# sequence plans


def _images(value, image_dir: Path) -> list[ImageSource]:
    if value is None:
        return []
    entries = value if isinstance(value, list) else [value]
    out = []
    for entry in entries:
        path = entry.get("path") if isinstance(entry, dict) else entry
        if not isinstance(path, str) or not path:
            raise RecordError("image entry without a path")
        out.append(ImageSource(path=image_dir / path.lstrip("/\\")))
    return out


def _turns(record: dict) -> list[tuple[str, str]]:
    message = record.get("message")
    if not isinstance(message, list) or not message:
        raise RecordError("record has no 'message' list")
    turns = []
    for turn in message:
        valid = isinstance(turn, dict) and turn.get("from") in ("human", "gpt") and isinstance(turn.get("value"), str)
        if not valid:
            raise RecordError("message turns must be {'from': 'human'|'gpt', 'value': str}")
        turns.append((turn["from"], turn["value"]))
    return turns


def _text_pieces(value: str) -> list[str]:
    return [piece.strip() for piece in value.split(IMAGE_TOKEN)]


def record_plan(fmt: str, record: dict, image_dir: Path, rng: np.random.Generator,
                cfg_condition_images: bool = False) -> tuple[list[PlanItem], list[ImageSource]]:
    """The sequence plan of one record. ``cfg_condition_images`` lets editing inputs be dropped for
    guidance training (the released editing format keeps them, which leaves the image-unconditional branch
    untrained)."""
    if fmt == "t2i_pretrain":
        return _plan_t2i_pretrain(record, rng)
    if fmt == "SftJSONLIterableDataset_Ver1":
        return _plan_understanding(record, image_dir)
    if fmt == "T2IIterableDataset_Ver1":
        return _plan_t2i(record, image_dir)
    if fmt in ("MedicalImageEditingIterableDataset_ver1", "CounterfactualMedicalIterableDataset_ver1"):
        return _plan_editing(record, image_dir, cfg_condition_images, counterfactual=fmt.startswith("Counterfactual"))
    raise ValueError(f"unknown dataset format {fmt!r}")


def _plan_t2i_pretrain(record: dict, rng: np.random.Generator) -> tuple[list[PlanItem], list[ImageSource]]:
    """A parquet row: one of its captions, then the image as a generation target."""
    try:
        captions = json.loads(record["captions"]) if isinstance(record["captions"], str) else record["captions"]
        texts = [v for v in captions.values() if isinstance(v, str) and v.strip()]
    except (KeyError, ValueError, AttributeError):
        raise RecordError("parquet row without a usable 'captions' JSON object") from None
    if not texts or not isinstance(record.get("image"), (bytes, bytearray)):
        raise RecordError("parquet row without captions or image bytes")
    text = texts[int(rng.integers(len(texts)))]
    return [PlanItem("text", cfg=True, text=text.strip()), PlanItem("vae", loss=True, image=0)], \
        [ImageSource(data=bytes(record["image"]))]


def _plan_understanding(record: dict, image_dir: Path) -> tuple[list[PlanItem], list[ImageSource]]:
    """A conversation: human text with ViT images at its ``<image>`` placeholders, supervised answers."""
    turns = _turns(record)
    images = _images(record.get("input_img"), image_dir)
    items: list[PlanItem] = []
    used = 0
    for who, value in turns:
        if who == "gpt":
            if value.strip():
                items.append(PlanItem("text", loss=True, text=value.strip()))
            continue
        for i, piece in enumerate(_text_pieces(value)):
            if i > 0:
                if used >= len(images):
                    raise RecordError("more <image> placeholders than images")
                items.append(PlanItem("vit", cfg=True, image=used))
                used += 1
            if piece:
                items.append(PlanItem("text", text=piece))
    if used != len(images):
        raise RecordError(f"{len(images)} images but {used} <image> placeholders")
    return items, images


def _plan_t2i(record: dict, image_dir: Path) -> tuple[list[PlanItem], list[ImageSource]]:
    """The prompt turns (guidance-droppable), the answer turns supervised, then the images as targets."""
    turns = _turns(record)
    images = _images(record.get("output_img") or record.get("input_img"), image_dir)
    if not images:
        raise RecordError("text-to-image record without an image")
    items: list[PlanItem] = []
    for who, value in turns:
        if value.replace(IMAGE_TOKEN, "").strip():
            items.append(PlanItem("text", cfg=who == "human", loss=who == "gpt",
                                  text=value.replace(IMAGE_TOKEN, "").strip()))
    items.extend(PlanItem("vae", loss=True, image=i) for i in range(len(images)))
    return items, images


def _plan_editing(record: dict, image_dir: Path, cfg_condition_images: bool,
                  counterfactual: bool) -> tuple[list[PlanItem], list[ImageSource]]:
    """Each input as a VAE then a ViT block, the instruction, then the edited images as targets and the
    answers: the answers first, except in the counterfactual format, which puts the targets first."""
    turns = _turns(record)
    inputs = _images(record.get("input_img"), image_dir)
    outputs = _images(record.get("output_img"), image_dir)
    if not inputs or not outputs:
        raise RecordError("editing record needs input_img and output_img")
    items: list[PlanItem] = []
    for i in range(len(inputs)):
        items.append(PlanItem("vae", cfg=cfg_condition_images, image=i))
        items.append(PlanItem("vit", cfg=cfg_condition_images, image=i))
    for value in (v for who, v in turns if who == "human"):
        items.extend(PlanItem("text", cfg=True, text=piece) for piece in _text_pieces(value) if piece)
    targets = [PlanItem("vae", loss=True, image=len(inputs) + i) for i in range(len(outputs))]
    answers = [PlanItem("text", loss=True, text=v.strip()) for who, v in turns if who == "gpt" and v.strip()]
    items.extend(targets + answers if counterfactual else answers + targets)
    return items, inputs + outputs
