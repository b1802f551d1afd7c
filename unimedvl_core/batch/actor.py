"""The model side of a batch job: ``TaskActor`` loads the checkpoint once and runs the registry's task on
each batch of rows Ray Data gives it, through the batched task API where the task has one
(``tasks/batching.py``), one row at a time otherwise. Generated images are written beside the records
(labelled synthetic, naming the weights, with a demonstration model's notice; DICOM when the input was
DICOM); every row comes back as one record, ok or failed."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import uuid
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from ..io.outputs import write_image_outputs
from ..tasks.batching import batch_key, run_batch
from ..tasks.catalog import TASKS
from ..tasks.registry import RunOptions, TaskResult
from .records import FAILED, OK, make_record

__all__ = ["TaskActor", "output_stem"]

log = logging.getLogger(__name__)


def output_stem(row_id: str) -> str:
    """A file name for a row id: safe characters only, with a short hash when anything was replaced (so
    ``a/b`` and ``a_b`` stay apart)."""
    import hashlib
    import re

    safe = re.sub(r"[^A-Za-z0-9._-]", "_", row_id)[:120].lstrip(".") or "row"
    return safe if safe == row_id else f"{safe}-{hashlib.sha1(row_id.encode()).hexdigest()[:8]}"


class TaskActor:
    """One model replica (one per GPU, or N on CPUs). Ray Data calls it with batches of
    ``{"id", "payload"}`` (``payload``: a pickled ``(Row, images)`` from ``reading.read_step``) and gets
    ``{"id", "record"}`` back, ``record`` being the JSON text of the row's record."""

    def __init__(self, task: str, ckpt: str | None, load_options: dict, output: str, threads: int | None = None):
        import torch

        from ..inference.embedded import load_model

        if threads:
            torch.set_num_threads(threads)
        self.task = TASKS.get(task, warn=False)
        self.model = load_model(ckpt, progress=False, **load_options)
        self.model.progress = False
        self.output = Path(output)
        provenance = self.model.provenance.to_dict()
        self.model_info = {"name": self.model.name, "weights": provenance}

    def __call__(self, batch: dict) -> dict:
        items = [pickle.loads(p) for p in batch["payload"]]
        records = self.run_rows([row for row, _ in items], [images for _, images in items])
        return {"id": [r["id"] for r in records], "record": [json.dumps(r, default=str) for r in records]}

    def run_rows(self, rows: list, images: list[list]) -> list[dict]:
        """One record per row, in order."""
        records: list[dict | None] = [None] * len(rows)
        groups: dict[Any, list[int]] = {}
        for i, row in enumerate(rows):
            if row.error is not None:
                records[i] = self._record(row, FAILED, row.fields, error=row.error)
            else:
                key = batch_key(self.model, self.task, row.fields)
                groups.setdefault(key if key is not None else ("alone", i), []).append(i)
        for members in groups.values():
            results = self._run_group(members, rows, images) if len(members) > 1 else None
            for k, i in enumerate(members):
                records[i] = self._finish(rows[i], images[i], results[k] if results else None)
        return records

    def _input(self, images: list):
        if not self.task.needs_image:
            return None
        return images[0] if len(images) == 1 else images

    def _run_group(self, members: list[int], rows: list, images: list) -> list[TaskResult] | None:
        """The rows of one batch key in one batched call; ``None`` (each row then runs alone, so one bad
        row cannot fail the others) when the batched call fails."""
        try:
            return run_batch(self.model, self.task, [self._input(images[i]) for i in members],
                             [rows[i].fields for i in members], RunOptions())
        except Exception as err:
            log.warning("batched %s call failed (%s); running its rows one by one", self.task.name, err)
            return None

    def _finish(self, row, images: list, result: TaskResult | None) -> dict:
        try:
            if result is None:
                result = self.task.run(self.model, self._input(images), row.fields, RunOptions())
            outputs = self._write_image(row, images, result) if result.image is not None else []
        except Exception as err:  # the row's failure is recorded; the batch goes on
            return self._record(row, FAILED, row.fields, error=f"{type(err).__name__}: {err}".splitlines()[0])
        return self._record(row, OK, result.params or row.fields, text=result.text, outputs=outputs)

    def _record(self, row, status: str, params: dict, **kwargs) -> dict:
        return make_record(row, status, params=params, model=self.model_info, task=self.task.name, **kwargs)

    def _write_image(self, row, images: list, result: TaskResult) -> list[str]:
        """The image (PNG, plus DICOM or NIfTI after the source) under ``images/``: written in a temporary
        folder and moved into place, so a killed job leaves no half-written file under a final name."""
        source = images[0] if images else None
        # one derived series per source series, whichever actor writes which slice
        series = generate_uid(entropy_srcs=[self.task.name, str(self.output.resolve()),
                                            row.series_uid or (row.images[0] if row.images else row.id)])
        folder = self.output / "images"
        tmp = folder / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            write_image_outputs(result.image, source, tmp / output_stem(row.id), result.task,
                                result.image.info.get("Description", ""), series, (row.frame or 0) + 1,
                                provenance=self.model.provenance)  # the weights and any demo notice
            if result.text is not None:  # an explanation beside the image
                (tmp / f"{output_stem(row.id)}.txt").write_text(result.text + "\n")
            final = []
            for path in sorted(tmp.iterdir()):
                os.replace(path, folder / path.name)
                final.append(f"images/{path.name}")
            return final
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
