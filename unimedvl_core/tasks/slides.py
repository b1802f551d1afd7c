"""At which pyramid level a task reads a whole slide (docs/medical-io.md#whole-slide-images).

Text tasks (VQA, reports) read no finer than the model looks: the coarsest level at which the region's long
side still reaches the understanding resize rule's longest side, since the ViT input is shrunk to that
anyway. Image tasks (staining, super-resolution, ...) read the finest level at which the region fits the
input pixel limit, so an output keeps the scanner's magnification wherever the region allows it.
"""

from __future__ import annotations

import dataclasses

from ..io.slide import SlideSelection
from ..modeling.preprocessing import TransformSet
from .registry import Task

__all__ = ["slide_selection", "text_task_selection", "parse_region", "slide_region_record"]

Region = tuple[int, int, int, int]


def slide_selection(task: Task, region: Region | None = None, level: int | None = None,
                    transforms: TransformSet | None = None) -> SlideSelection:
    """The selection ``task`` reads a slide with; ``region`` (x, y, width, height in level-0 pixels) and
    ``level`` (0 = finest) are the user's, ``None`` for the whole slide and the task's own level rule."""
    if task.returns == "text":
        return text_task_selection(region, level, transforms)
    return SlideSelection(region=region, level=level)


def text_task_selection(region: Region | None = None, level: int | None = None,
                        transforms: TransformSet | None = None) -> SlideSelection:
    """What text tasks read: the coarsest level whose region reaches the understanding rule's longest side."""
    longest = (transforms or TransformSet()).vqa_vit.max_size
    return SlideSelection(region=region, level=level, min_side=longest)


def parse_region(value) -> Region:
    """``X,Y,W,H`` (text) or a sequence of four integers: a region in level-0 pixels with a positive size."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        x, y, width, height = (int(str(p).strip()) for p in parts)
    except ValueError:
        raise ValueError(f"a slide region is X,Y,WIDTH,HEIGHT in level-0 pixels (got {value!r})") from None
    if x < 0 or y < 0 or width <= 0 or height <= 0:
        raise ValueError(f"a slide region needs X, Y >= 0 and a positive WIDTH and HEIGHT (got {value!r})")
    return x, y, width, height


def slide_region_record(image) -> dict:
    """``{"slide_region": {...}}`` saying which level and pixels of a slide an image is (for JSON results and
    summaries), or ``{}`` for any other image."""
    region = getattr(image, "geometry", {}).get("slide_region")
    return {"slide_region": dataclasses.asdict(region)} if region is not None else {}
