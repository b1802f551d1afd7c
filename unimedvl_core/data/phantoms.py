"""Procedural 2-D "digital phantom" studies with exact ground truth, and an analyser that measures them.

Three anatomy families, each rendered in modality-like styles of the same anatomy:

- ``radiology``: a body with an organ holding 0-3 round lesions, as CT (lesions hyperdense), T1-weighted
  MRI (hypointense) and T2-weighted MRI (hyperintense);
- ``xray``: a chest radiograph with two lung fields holding 0-3 nodules;
- ``histology``: a tissue patch with scattered nuclei and 0-3 tumour nests, as H&E and a matching IHC
  stain (nests brown, other nuclei blue).

``write_dataset`` writes studies to disk in the released training formats (docs/training.md#dataset-formats): VQA
and report SFT
JSONL with ``<image>`` placeholders, text-to-image JSONL and parquet, editing JSONL for 4x super-resolution,
T1->T2 translation and H&E->IHC staining, and counterfactual lesion removal with an explanation. All
prompts come from ``unimedvl_core.tasks.prompts`` so the task API and the training data agree.

``analyze`` finds lesions in any image of a known style, so generated images can be scored.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..inference.prompts import (
    report_prompt,
    staining_instruction,
    super_resolution_instruction,
    text_to_image_prompt,
    translation_instruction,
)

__all__ = ["Lesion", "Phantom", "STYLES", "FAMILY_STYLES", "MODALITY", "sample_phantom", "render", "analyze",
           "Findings", "vqa_questions", "report_text", "caption", "counterfactual_explanation", "write_dataset",
           "COUNT_WORDS", "parse_count", "degrade_for_super_resolution", "REMOVE_LESIONS",
           "SUPER_RESOLUTION_FAMILIES"]

STYLES = ("ct", "mr_t1", "mr_t2", "xray", "he", "ihc")
FAMILY_STYLES = {"radiology": ("ct", "mr_t1", "mr_t2"), "xray": ("xray",), "histology": ("he", "ihc")}
MODALITY = {"ct": "CT", "mr_t1": "T1-weighted MRI", "mr_t2": "T2-weighted MRI", "xray": "chest X-ray",
            "he": "H&E pathology", "ihc": "IHC pathology"}
SHORT_MODALITY = {"ct": "CT", "mr_t1": "T1", "mr_t2": "T2", "xray": "X-ray", "he": "H&E", "ihc": "IHC"}
COUNT_WORDS = ["zero", "one", "two", "three", "four", "five"]
LESION_WORD = {"radiology": "lesion", "xray": "nodule", "histology": "tumour nest"}
REMOVE_LESIONS = "Remove all {things} from this image."
SUPER_RESOLUTION_FAMILIES = ("radiology", "xray")
MAX_LESIONS = 3


@dataclass
class Lesion:
    x: float  # centre, pixels
    y: float
    r: float  # radius, pixels

    @property
    def large(self) -> bool:
        return self.r >= 4.5 * self._scale

    _scale: float = field(default=1.0, repr=False, compare=False)


@dataclass
class Phantom:
    id: str
    family: str
    size: int
    lesions: list[Lesion]
    geometry: dict
    seed: int

    @property
    def count(self) -> int:
        return len(self.lesions)

    @property
    def thing(self) -> str:
        return LESION_WORD[self.family]

    def to_json(self) -> dict:
        return {"id": self.id, "family": self.family, "size": self.size, "seed": self.seed, "geometry": self.geometry,
                "lesions": [{"x": round(les.x, 2), "y": round(les.y, 2), "r": round(les.r, 2)} for les in self.lesions]}


# --------------------------------------------------------------------------------------------------------
# sampling and rendering


def _inside_ellipse(x, y, cx, cy, rx, ry, margin=0.0):
    return ((x - cx) / max(rx - margin, 1e-3)) ** 2 + ((y - cy) / max(ry - margin, 1e-3)) ** 2 <= 1.0


def _place_lesions(rng, count, regions, r_range, scale):
    """``count`` non-overlapping discs inside the given ellipses (cx, cy, rx, ry); radii shrink if the
    regions are too crowded for the requested count."""
    lo, hi = r_range
    for _shrink in range(8):
        lesions: list[Lesion] = []
        for _ in range(count):
            for _attempt in range(300):
                cx, cy, rx, ry = regions[rng.integers(len(regions))]
                r = rng.uniform(lo, hi)
                x, y = rng.uniform(cx - rx, cx + rx), rng.uniform(cy - ry, cy + ry)
                if not _inside_ellipse(x, y, cx, cy, rx, ry, margin=r + 1.5 * scale):
                    continue
                if all(math.hypot(x - les.x, y - les.y) > r + les.r + 2.5 * scale for les in lesions):
                    lesions.append(Lesion(x, y, r, _scale=scale))
                    break
        if len(lesions) == count:
            return lesions
        lo, hi = max(2.5 * scale, lo * 0.85), max(2.5 * scale, hi * 0.85)
    raise RuntimeError(f"cannot place {count} lesions in the phantom")


def sample_phantom(rng: np.random.Generator, family: str | None = None, size: int = 64,
                   count: int | None = None, pid: str = "p") -> Phantom:
    family = family or str(rng.choice(["radiology", "radiology", "xray", "histology"]))
    s = size / 64.0
    count = int(rng.integers(0, MAX_LESIONS + 1)) if count is None else count
    c = size / 2
    if family == "radiology":
        body = [c + rng.uniform(-2, 2) * s, c + rng.uniform(-2, 2) * s, rng.uniform(26, 29) * s,
                rng.uniform(21, 25) * s]
        organ = [body[0] + rng.uniform(-5, 5) * s, body[1] + rng.uniform(-3, 3) * s, rng.uniform(15, 19) * s,
                 rng.uniform(12, 15) * s]
        geometry = {"body": body, "organ": organ}
        lesions = _place_lesions(rng, count, [organ], (3.0 * s, 6.0 * s), s)
    elif family == "xray":
        lungs = [[c - 12 * s + rng.uniform(-1, 1) * s, c - 2 * s, rng.uniform(8, 10) * s, rng.uniform(18, 21) * s],
                 [c + 12 * s + rng.uniform(-1, 1) * s, c - 2 * s, rng.uniform(8, 10) * s, rng.uniform(18, 21) * s]]
        geometry = {"lungs": lungs, "heart": [c - 3 * s, c + 10 * s, 9 * s, 7 * s]}
        lesions = _place_lesions(rng, count, lungs, (2.5 * s, 4.5 * s), s)
    elif family == "histology":
        nuclei = [[float(rng.uniform(0, size)), float(rng.uniform(0, size)), float(rng.uniform(0.9, 1.4) * s)]
                  for _ in range(int(30 * s * s))]
        geometry = {"nuclei": nuclei}
        lesions = _place_lesions(rng, count, [[c, c, c - 2 * s, c - 2 * s]], (4.5 * s, 7.0 * s), s)
        # nuclei never sit inside a nest (the nest has its own texture)
        geometry["nuclei"] = [n for n in nuclei if all(math.hypot(n[0] - les.x, n[1] - les.y) > les.r + 1.5 * s
                                                        for les in lesions)]
    else:
        raise ValueError(f"unknown phantom family {family!r}")
    return Phantom(pid, family, size, lesions, geometry, int(rng.integers(2**31)))


def _disc(xx, yy, x, y, r):
    return np.clip(r + 0.5 - np.hypot(xx - x, yy - y), 0.0, 1.0)  # anti-aliased coverage


def _ellipse(xx, yy, cx, cy, rx, ry):
    d = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    return np.clip((1.0 - d) * min(rx, ry) + 0.5, 0.0, 1.0)


def _blend(base, mask, value):
    return base * (1 - mask[..., None]) + mask[..., None] * np.asarray(value, dtype=np.float64)


_GRAY = {  # background, body, organ, lesion
    "ct": (0.02, 0.35, 0.52, 0.88),
    "mr_t1": (0.02, 0.62, 0.50, 0.18),
    "mr_t2": (0.02, 0.30, 0.38, 0.88),
}


def render(p: Phantom, style: str, lesions: list[Lesion] | None = None) -> np.ndarray:
    """(size, size, 3) uint8 image of the phantom in a style; ``lesions`` overrides the phantom's own."""
    if style not in FAMILY_STYLES[p.family]:
        raise ValueError(f"style {style!r} does not belong to family {p.family!r}")
    lesions = p.lesions if lesions is None else lesions
    n = p.size
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) + 0.5
    rng = np.random.default_rng(p.seed + STYLES.index(style))
    g = p.geometry
    if p.family == "radiology":
        bg, body_v, organ_v, lesion_v = _GRAY[style]
        img = np.full((n, n, 3), bg)
        img = _blend(img, _ellipse(xx, yy, *g["body"]), [body_v] * 3)
        img = _blend(img, _ellipse(xx, yy, *g["organ"]), [organ_v] * 3)
        for les in lesions:
            img = _blend(img, _disc(xx, yy, les.x, les.y, les.r), [lesion_v] * 3)
        img += rng.normal(0, 0.02, (n, n, 1))
    elif p.family == "xray":
        img = np.full((n, n, 3), 0.45)
        for lung in g["lungs"]:
            img = _blend(img, _ellipse(xx, yy, *lung), [0.15] * 3)
        img = _blend(img, _ellipse(xx, yy, *g["heart"]), [0.5] * 3)
        spine = np.clip(3.0 * n / 64 - np.abs(xx - n / 2), 0, 1)
        img = _blend(img, spine, [0.6] * 3)
        for les in lesions:
            img = _blend(img, _disc(xx, yy, les.x, les.y, les.r), [0.88] * 3)
        img += rng.normal(0, 0.02, (n, n, 1))
    else:
        he = style == "he"
        img = np.empty((n, n, 3))
        img[:] = (0.96, 0.80, 0.88) if he else (0.95, 0.94, 0.90)
        img += rng.normal(0, 0.015, (n, n, 3))
        nucleus = (0.45, 0.22, 0.60) if he else (0.35, 0.42, 0.72)
        for x, y, r in g["nuclei"]:
            img = _blend(img, _disc(xx, yy, x, y, r), nucleus)
        nest = (0.40, 0.15, 0.52) if he else (0.50, 0.30, 0.12)
        for les in lesions:
            img = _blend(img, _disc(xx, yy, les.x, les.y, les.r), nest)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def degrade_for_super_resolution(image: np.ndarray, scale: int = 4) -> np.ndarray:
    """A scale-x lower-resolution acquisition shown on the original grid: area downsampling, then bicubic
    upsampling back (what ``UniMedVL.super_resolve`` feeds the model, so PSNR of this input is the bicubic
    baseline)."""
    n = image.shape[0]
    small = Image.fromarray(image).resize((n // scale, n // scale), Image.Resampling.BOX)
    return np.asarray(small.resize((n, n), Image.Resampling.BICUBIC))


# --------------------------------------------------------------------------------------------------------
# analysis


@dataclass
class Findings:
    count: int
    lesions: list[dict]


def _lesion_mask(img: np.ndarray, style: str) -> np.ndarray:
    f = img.astype(np.float64) / 255.0
    gray = f.mean(-1)
    if style in ("ct", "mr_t2"):
        return gray > 0.70
    if style == "xray":
        return gray > 0.74
    if style == "mr_t1":
        return gray < 0.34
    if style == "he":
        return (gray < 0.42) & (f[..., 1] < 0.30)
    if style == "ihc":
        return (f[..., 0] - f[..., 2] > 0.18) & (gray < 0.6)
    raise ValueError(f"unknown style {style!r}")


def analyze(image, style: str) -> Findings:
    """Count lesions (radiology), nodules (X-ray) or tumour nests (histology) in an image of ``style``.

    Pixels are classified by the style's contrast; connected regions large enough to be a lesion (not a
    nucleus or noise) and, for dark lesions, not touching the border (the background) are counted.
    """
    from scipy import ndimage

    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    n = img.shape[0]
    s2 = (n / 64.0) ** 2
    mask = ndimage.binary_opening(_lesion_mask(img, style), iterations=1)
    labels, num = ndimage.label(mask)
    found = []
    for index in range(1, num + 1):
        region = labels == index
        area = int(region.sum())
        ys, xs = np.nonzero(region)
        touches_border = ys.min() == 0 or xs.min() == 0 or ys.max() == n - 1 or xs.max() == n - 1
        if area < 12 * s2 or area > 400 * s2 or (style == "mr_t1" and touches_border):
            continue
        found.append({"x": float(xs.mean()), "y": float(ys.mean()), "r": float(math.sqrt(area / math.pi))})
    return Findings(len(found), found)


# --------------------------------------------------------------------------------------------------------
# text


def _count_phrase(p: Phantom) -> str:
    word = COUNT_WORDS[p.count]
    return f"{word} {p.thing}{'' if p.count == 1 else 's'}"


def _side(les: Lesion, n: int) -> str:
    vertical = "upper" if les.y < n / 2 else "lower"
    horizontal = "left" if les.x < n / 2 else "right"
    return f"{vertical} {horizontal}"


def parse_count(text: str) -> int | None:
    """The first count word or digit in an answer."""
    for token in text.lower().replace(".", " ").replace(",", " ").split():
        if token in COUNT_WORDS:
            return COUNT_WORDS.index(token)
        if token.isdigit():
            return int(token)
    return None


def vqa_questions(p: Phantom, style: str, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(question, answer, kind) triples; kind is "closed" (yes/no) or "open"."""
    thing, n = p.thing, p.size
    yes_no = lambda b: "yes" if b else "no"
    left = any(les.x < n / 2 for les in p.lesions)
    other = str(rng.choice([s for s in STYLES if s != style]))
    asked_style = style if rng.random() < 0.5 else other
    closed = [
        (f"Is there a {thing} in this image?", yes_no(p.count > 0)),
        (f"Is there more than one {thing}?", yes_no(p.count > 1)),
        (f"Is there a {thing} in the left half of the image?", yes_no(left)),
        (f"Is this a {MODALITY[asked_style]} image?", yes_no(asked_style == style)),
        (f"Is there a large {thing}?", yes_no(any(les.large for les in p.lesions))),
    ]
    open_ = [
        (f"How many {thing}s are there?", COUNT_WORDS[p.count]),
        ("What is the imaging modality?", MODALITY[style]),
    ]
    picks = [closed[i] for i in rng.choice(len(closed), size=2, replace=False)]
    return [(q, a, "closed") for q, a in picks] + [(*open_[int(rng.integers(2))], "open")]


def report_text(p: Phantom, style: str) -> str:
    mod, thing = MODALITY[style], p.thing
    if p.count == 0:
        findings = f"{mod} image. No {thing} is seen."
        impression = f"No {thing}."
    else:
        parts = [f"a {'large' if les.large else 'small'} {thing} in the {_side(les, p.size)}" for les in p.lesions]
        verb = "is" if p.count == 1 else "are"
        findings = f"{mod} image. There {verb} {_count_phrase(p)}: " + "; ".join(parts) + "."
        impression = f"{_count_phrase(p).capitalize()}."
    return f"Findings: {findings} Impression: {impression}"


def caption(p: Phantom, style: str) -> str:
    return text_to_image_prompt(MODALITY[style], f"{_count_phrase(p)}.")


def counterfactual_explanation(p: Phantom) -> str:
    where = ", ".join(_side(les, p.size) for les in p.lesions)
    return f"Removed {_count_phrase(p)} ({where}); the tissue there now matches its surroundings."


# --------------------------------------------------------------------------------------------------------
# writing a dataset in the released formats


def _png(path: Path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return path.name


def _line(f, record: dict) -> None:
    f.write(json.dumps(record) + "\n")


_JSONL_FILES = ("vqa", "report", "t2i", "edit_sr", "edit_translation", "edit_staining", "counterfactual", "truth")


class _DatasetFiles:
    """The open JSONL files of a dataset being written, its image folder, the text-to-image rows that go to
    parquet at the end, and how many records each file got."""

    def __init__(self, out: Path):
        self.images = out / "images"
        self.files = {name: open(out / f"{name}.jsonl", "w") for name in _JSONL_FILES}
        self.parquet_rows: list[dict] = []
        self.counts = dict.fromkeys([*_JSONL_FILES, "t2i_parquet"], 0)

    def write(self, name: str, record: dict) -> None:
        _line(self.files[name], record)
        self.counts[name] += 1

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def write_dataset(out: str | Path, n: int, seed: int = 0, size: int = 64, parquet_fraction: float = 0.25) -> dict:
    """Write ``n`` phantom studies under ``out``; returns counts per file. Image paths in the JSONL files
    are relative to ``out/images`` (the datasets' ``data_dir``)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dataset = _DatasetFiles(out)
    try:
        for i in range(n):
            _write_study(dataset, sample_phantom(rng, size=size, pid=f"{seed:04d}_{i:06d}"), rng, parquet_fraction)
    finally:
        dataset.close()
    counts = dataset.counts
    if dataset.parquet_rows:
        _write_parquet(dataset.parquet_rows, out / "t2i.parquet")
        counts["t2i_parquet"] = len(dataset.parquet_rows)
    (out / "phantoms.json").write_text(json.dumps({"n": n, "seed": seed, "size": size, "counts": counts}, indent=2))
    return counts


def _write_study(dataset: _DatasetFiles, p: Phantom, rng: np.random.Generator, parquet_fraction: float) -> None:
    """All records of one phantom. The order of the random draws is part of the dataset: keep it."""
    dataset.write("truth", p.to_json())
    rendered = {style: render(p, style) for style in FAMILY_STYLES[p.family]}
    paths = {style: _png(dataset.images / f"{p.id}_{style}.png", img) for style, img in rendered.items()}
    for style, path in paths.items():
        _write_vqa_and_report(dataset, p, style, path, rng)
        _write_text_to_image(dataset, p, style, path, rendered[style], rng, parquet_fraction)
    _write_edits(dataset, p, rendered, paths, rng)
    if p.count > 0 and p.family != "histology":
        _write_counterfactual(dataset, p, paths, rng)


def _write_vqa_and_report(dataset: _DatasetFiles, p: Phantom, style: str, path: str,
                          rng: np.random.Generator) -> None:
    for q, a, kind in vqa_questions(p, style, rng):
        dataset.write("vqa", {"input_img": [{"path": path}], "kind": kind, "phantom": p.id,
                              "message": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})
    # Half of the prompts name the modality, half do not, as the task API may or may not know it.
    named = MODALITY[style] if rng.random() < 0.5 else None
    dataset.write("report", {"input_img": [{"path": path}], "phantom": p.id,
                             "message": [{"from": "human", "value": "<image>\n" + report_prompt(named)},
                                         {"from": "gpt", "value": report_text(p, style)}]})


def _write_text_to_image(dataset: _DatasetFiles, p: Phantom, style: str, path: str, image: np.ndarray,
                         rng: np.random.Generator, parquet_fraction: float) -> None:
    """One caption-image pair, in the parquet rows (image bytes inline) or in the JSONL file."""
    if rng.random() < parquet_fraction:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        dataset.parquet_rows.append({"image": buf.getvalue(), "captions": json.dumps({"short": caption(p, style)})})
    else:
        dataset.write("t2i", {"output_img": [{"path": path}], "phantom": p.id,
                              "message": [{"from": "human", "value": caption(p, style)}]})


def _write_edits(dataset: _DatasetFiles, p: Phantom, rendered: dict[str, np.ndarray], paths: dict[str, str],
                 rng: np.random.Generator) -> None:
    """Super-resolution, T1->T2 translation and H&E->IHC staining pairs, where the family has them."""
    # drawn for every family, so that later draws do not depend on which families came before
    style = str(rng.choice(list(paths)))
    # 4x super-resolution of radiology images (the published task is MRI super-resolution); the
    # nuclei of histology patches are smaller than a low-resolution pixel and are left out
    if p.family in SUPER_RESOLUTION_FAMILIES:
        lr = _png(dataset.images / f"{p.id}_{style}_x4lr.png", degrade_for_super_resolution(rendered[style]))
        named = MODALITY[style] if rng.random() < 0.5 else None
        dataset.write("edit_sr", _edit_record(lr, paths[style], super_resolution_instruction(4, named),
                                              "super_resolution", p.id))
    if p.family == "radiology":
        dataset.write("edit_translation", _edit_record(paths["mr_t1"], paths["mr_t2"],
                                                       translation_instruction("T1", "T2"), "t1_to_t2", p.id))
    if p.family == "histology":
        dataset.write("edit_staining", _edit_record(paths["he"], paths["ihc"], staining_instruction("IHC"),
                                                    "he_to_ihc", p.id))


def _write_counterfactual(dataset: _DatasetFiles, p: Phantom, paths: dict[str, str],
                          rng: np.random.Generator) -> None:
    """One image of the phantom paired with the same image without its lesions, and the explanation."""
    style = str(rng.choice(list(paths)))
    clean = _png(dataset.images / f"{p.id}_{style}_clean.png", render(p, style, lesions=[]))
    dataset.write("counterfactual", {
        "input_img": [{"path": paths[style]}], "output_img": [{"path": clean}],
        "main_task_type": "counterfactual", "sub_task_type": "lesion_removal", "dataset": "phantom",
        "phantom": p.id,
        "message": [{"from": "human", "value": "<image>\n" + REMOVE_LESIONS.format(things=p.thing + "s")},
                    {"from": "gpt", "value": counterfactual_explanation(p)}]})


def _write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def _edit_record(src: str, dst: str, instruction: str, sub_task: str, pid: str) -> dict:
    return {"input_img": [{"path": src}], "output_img": [{"path": dst}], "main_task_type": "image_to_image",
            "sub_task_type": sub_task, "dataset": "phantom", "phantom": pid,
            "message": [{"from": "human", "value": "<image>\n" + instruction}, {"from": "gpt", "value": ""}]}
