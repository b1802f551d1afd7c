"""MONAI Deploy operators of the UniMedVL application (the SDK's own operators load and select series).

    ValidateDICOMInputOperator -> DICOMDataLoaderOperator -> DICOMSeriesSelectorOperator
        -> SliceSelectionOperator -> UniMedVLTaskOperator -> UniMedVLWriterOperator

Every task on every slice ends as done, failed or not applicable, each with its reason; one task failing
never stops the others. No operator raises into the Holoscan graph: an unexpected error is recorded in the
shared ``RunOutcome`` (the application's exit status is decided from it) and the operator emits nothing.
Outputs are written into a temporary folder inside the output folder and moved into place only when all of
them are written; a study where no series could be read writes nothing.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import shutil
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from monai.deploy.core import ConditionType, Fragment, Operator, OperatorSpec
from pydicom.uid import generate_uid

from ... import __version__
from ...io.dicom_output import derived_image, report_sr, write_dicom
from ...io.medical_io import MedicalImage, _slice_sort_key, read_key_slices, read_slices
from ...io.outputs import label_with_provenance
from ...io.slide import is_slide, slide_from_headers
from ...io.synthetic import save_png
from ...tasks.catalog import TASKS
from ...tasks.registry import Task
from ...tasks.slides import slide_region_record, slide_selection, text_task_selection
from .config import DeployConfig, TaskSpec
from .inputs import InputScan, scan_dicom_folder, stage_usable_files

__all__ = ["ValidateDICOMInputOperator", "SliceSelectionOperator", "UniMedVLTaskOperator", "UniMedVLWriterOperator",
           "SeriesSlices", "SeriesResults", "RunOutcome"]

log = logging.getLogger(__name__)

@dataclass
class RunOutcome:
    """What the run came to, shared by the operators and read by the application's ``main`` afterwards."""

    error: str | None = None                # an unexpected error (exit status 1)
    error_trace: str | None = None
    rejected: str | None = None             # nothing could be read (exit status 2)
    summary: dict | None = None             # as written to summary.json
    failed_series: list[dict] = field(default_factory=list)

    def record_error(self, where: str, err: BaseException) -> None:
        if self.error is None:
            self.error = f"{where}: {type(err).__name__}: {err}"
            self.error_trace = traceback.format_exc()
        log.error("internal error in %s: %s: %s", where, type(err).__name__, err)


def guarded(compute):
    """Record an error raised in an operator's ``compute`` in its ``outcome`` instead of raising it into the
    graph (where it would end in a GXF error log and a traceback)."""

    @functools.wraps(compute)
    def wrapper(self, op_input, op_output, context):
        try:
            compute(self, op_input, op_output, context)
        except Exception as err:
            self.outcome.record_error(type(self).__name__, err)

    return wrapper


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


@dataclass
class SlideInput:
    """The whole slide of a selected series (VL WSI instances): each task reads it at its own pyramid level
    (``tasks.slides``), within the task file's ``slide`` region and level; a reading is kept for the tasks
    that share its selection."""

    items: list = field(repr=False)  # (file or dataset, header) per instance (``slide_from_headers``)
    region: tuple[int, int, int, int] | None = None
    level: int | None = None
    window: Any = None
    _read: dict = field(default_factory=dict, repr=False)

    def image_for(self, task: Task | None) -> MedicalImage:
        """What ``task`` reads (``None``: what text tasks read, the series' placement image)."""
        selection = (text_task_selection(self.region, self.level) if task is None
                     else slide_selection(task, self.region, self.level))
        if selection not in self._read:
            self._read[selection] = slide_from_headers(self.items, "slide series", selection, window=self.window)
        return self._read[selection]


@dataclass
class SeriesSlices:
    """A selected series: the slices the per-slice tasks run on, and (for series reports) its instances in
    patient order, the window and the slice range, so that key slices can be read over the series."""

    series_uid: str
    description: str
    modality: str
    selection: str
    slices: list[MedicalImage]
    datasets: list = field(default_factory=list, repr=False)  # headers hold patient identity: never shown
    window: Any = None
    span: list[int] | None = None  # the slice range asked for; None: the whole series
    slide: SlideInput | None = None  # a whole slide: image tasks read it at their own level

    def key_slices(self, count: int) -> list[MedicalImage]:
        """``count`` key slices spread over the series (over ``span`` when set), chosen by the same code as
        the command line's series reports (``read_key_slices``); only those are decoded."""
        if not self.datasets:  # built from slices alone: key slices among them
            return read_key_slices(self.slices, count)
        if len(self.datasets) == 1:  # one (multi-frame) object: its frames are the slices
            return read_key_slices(self.datasets[0], count, self.window, frames=self.span)
        indexed = list(enumerate(self.datasets))
        if self.span is not None:
            indexed = [indexed[i] for i in self.span]
        return [read_instance(ds, i, len(self.datasets), self.window) for i, ds in read_key_slices(indexed, count)]


def read_instance(ds, index: int, count: int, window: Any) -> MedicalImage:
    """Instance ``index`` of a series of ``count`` single-frame instances as slice ``index``."""
    image = read_slices(ds, window=window, middle_only=True)[0]
    image.frame, image.num_frames = index, count
    return image


@dataclass
class SeriesResults:
    series: SeriesSlices
    texts: list[dict] = field(default_factory=list)      # {"task", "slice", "input" (e.g. the question), "text"}
    images: list[dict] = field(default_factory=list)     # {"task", "slice", "image", "source", "explanation", ...}
    runs: list[dict] = field(default_factory=list)       # {"task", "slice", "input", "status", "reason"}
    evidence: list[MedicalImage] = field(default_factory=list, repr=False)  # key slices a series report read

    def record(self, task: str, slice_: int | None, value: Any, status: str, reason: str | None = None) -> None:
        self.runs.append({"task": task, "slice": slice_, "input": value, "status": status, "reason": reason})
        if status != "done":
            log.warning("series %s, task %s, slice %s: %s: %s", self.series.series_uid, task, slice_,
                        status.replace("_", " "), reason)

    def notes(self) -> list[str]:
        """One line per task run that did not produce its result, for the SR."""
        return [f"{r['task']}" + (f" (slice {r['slice']})" if r["slice"] is not None else "")
                + (f" [{r['input']}]" if r["input"] is not None else "")
                + f": {r['status'].replace('_', ' ')}: {r['reason']}" for r in self.runs if r["status"] != "done"]


class ValidateDICOMInputOperator(Operator):
    """Hands the SDK loader a folder of the usable files only (``unimedvl_core.surfaces.deploy.inputs``); the
    application's ``main`` scans the input before the graph runs and passes the scan in."""

    def __init__(self, fragment: Fragment, *args, input_folder: str | Path, staging_folder: str | Path,
                 scan: InputScan | None = None, outcome: RunOutcome | None = None, **kwargs):
        self.input_folder, self.staging_folder, self.scan = Path(input_folder), Path(staging_folder), scan
        self.outcome = outcome or RunOutcome()
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.output("input_folder")
        spec.output("input_report")

    @guarded
    def compute(self, op_input, op_output, context):
        scan = self.scan or scan_dicom_folder(self.input_folder)
        op_output.emit(stage_usable_files(scan, self.staging_folder), "input_folder")
        op_output.emit({"folder": str(self.input_folder), **scan.summary()}, "input_report")


class SliceSelectionOperator(Operator):
    """Selected series -> the slices to run on: the key slice (middle), all slices, or a range
    [start, stop) in patient order; multi-frame instances count their frames as slices. A series that cannot
    be read is recorded as failed; the others go on."""

    def __init__(self, fragment: Fragment, *args, mode: str = "key", start: int | None = None,
                 stop: int | None = None, window: Any = None, slide_region: tuple | None = None,
                 slide_level: int | None = None, slide_files: dict | None = None, outcome: RunOutcome | None = None,
                 **kwargs):
        if mode not in ("key", "all", "range"):
            raise ValueError(f"slice mode must be key, all or range, got {mode!r}")
        # (start/stop would shadow the operator's own start()/stop() methods)
        self.slice_mode, self.range_start, self.range_stop, self.window = mode, start, stop, window
        self.slide_region, self.slide_level = slide_region, slide_level
        self.slide_files = slide_files or {}  # SOP Instance UID -> file: slides are staged as headers only
        self.outcome = outcome or RunOutcome()
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("study_selected_series_list")
        spec.output("series_slices")

    def _pick(self, count: int) -> list[int]:
        if self.slice_mode == "key":
            return [count // 2]
        if self.slice_mode == "all":
            return list(range(count))
        start = max(0, self.range_start or 0)
        stop = min(count, self.range_stop if self.range_stop is not None else count)
        return list(range(start, stop))

    def select(self, datasets: list) -> list[MedicalImage]:
        datasets = sorted(datasets, key=_slice_sort_key)
        if len(datasets) == 1:
            count = int(datasets[0].get("NumberOfFrames", 1) or 1)
            return read_slices(datasets[0], frames=self._pick(count), window=self.window)
        return [read_instance(datasets[index], index, len(datasets), self.window)
                for index in self._pick(len(datasets))]

    def _span(self, datasets: list) -> list[int] | None:
        """The slice range a series report reads key slices over: the range asked for, else the series."""
        if self.slice_mode != "range":
            return None
        return self._pick(int(datasets[0].get("NumberOfFrames", 1) or 1) if len(datasets) == 1 else len(datasets))

    def _series_slices(self, selected_series) -> SeriesSlices | None:
        series = selected_series.series
        return self.series_slices(str(series.SeriesInstanceUID), str(getattr(series, "Modality", "") or ""),
                                  str(getattr(series, "SeriesDescription", "") or ""), selected_series.selection_name,
                                  [i.get_native_sop_instance() for i in series.get_sop_instances()])

    def _slide_of(self, datasets: list) -> SlideInput:
        """The slide of these instances, read from the scanned files where known (the loaded datasets of a
        staged slide are headers only)."""
        slides = [ds for ds in datasets if is_slide(ds)]
        if len(slides) < len(datasets):
            log.warning("a slide series holds %d instances of other kinds; they are not read",
                        len(datasets) - len(slides))
        items = [(self.slide_files.get(str(ds.get("SOPInstanceUID", "")), ds), ds) for ds in slides]
        return SlideInput(items, self.slide_region, self.slide_level, self.window)

    def series_slices(self, uid: str, modality: str, description: str, selection: str,
                      datasets: list) -> SeriesSlices | None:
        """The slices of one series' instances; None (the series recorded as failed) when none can be read.
        A whole slide gives one image, what text tasks read (docs/medical-io.md#whole-slide-images)."""
        slide = self._slide_of(datasets) if any(is_slide(ds) for ds in datasets) else None
        try:
            slices = [slide.image_for(None)] if slide else self.select(datasets)
        except Exception as err:  # an image our reader cannot turn into slices: this series only fails
            self.outcome.failed_series.append({"series_instance_uid": uid, "modality": modality,
                                               "reason": f"could not be read: {_reason(err)}"})
            log.warning("series %s could not be read: %s", uid, _reason(err))
            return None
        if not slices:
            self.outcome.failed_series.append({"series_instance_uid": uid, "modality": modality,
                                               "reason": "no slice in the requested range"})
            return None
        return SeriesSlices(uid, description, modality, selection, slices, sorted(datasets, key=_slice_sort_key),
                            self.window, None if slide else self._span(datasets), slide)

    @guarded
    def compute(self, op_input, op_output, context):
        selected = op_input.receive("study_selected_series_list") or []
        result = [s for study in selected for item in study.selected_series
                  if (s := self._series_slices(item)) is not None]
        op_output.emit(result, "series_slices")


class UniMedVLTaskOperator(Operator):
    """Runs the configured tasks on every selected slice with one model. Each run is recorded as done, failed
    (the error, the other runs go on) or not applicable (the task's rules, ``TaskSpec.not_applicable``)."""

    def __init__(self, fragment: Fragment, *args, config: DeployConfig, model=None, model_path: str | None = None,
                 outcome: RunOutcome | None = None, **kwargs):
        self.deploy_config, self.model_path, self._model = config, model_path, model
        self.outcome = outcome or RunOutcome()
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("series_slices")
        spec.output("results")

    def load_model(self):
        if self._model is None:
            from ...inference.embedded import load_model

            self._model = load_model(self.model_path, progress=False, **self.deploy_config.load_options())
        self._model.progress = False
        return self._model

    def run_task(self, spec: TaskSpec, src: MedicalImage | list[MedicalImage], k: int,
                 results: SeriesResults) -> None:
        """Every run of one task-file entry on one slice (``k``-th of the series), or on the key slices of a
        series report (a list), through the registry."""
        task, model = TASKS.get(spec.task, warn=False), self.load_model()
        several = isinstance(src, list)
        slice_ = src.frame if task.needs_image and not several else None
        for params in spec.runs():
            value = params.get(spec.repeat[0]) if spec.repeat else None
            reason = spec.not_applicable(src[0] if several else src) if task.needs_image else None
            if reason:
                results.record(task.name, slice_, value, "not_applicable", reason)
                continue
            try:
                result = task.run(model, src if task.needs_image else None, task.item_params(params, k))
            except Exception as err:  # this run fails; the other tasks and slices go on
                results.record(task.name, slice_, value, "failed", _reason(err))
                log.debug("task %s failed", task.name, exc_info=True)
                continue
            record = {"task": task.name, "slice": slice_, **({"slices": [s.frame for s in src]} if several else {})}
            if task.returns == "text":
                results.texts.append({**record, "input": value, "text": result.text})
            else:
                results.images.append({**record, "source": src, "image": result.image, "explanation": result.text,
                                       "input": value, "from_source": task.needs_image})
            results.record(task.name, slice_, value, "done")

    def run_spec(self, spec: TaskSpec, series: SeriesSlices, results: SeriesResults) -> None:
        """One task-file entry on a series: per selected slice; once (text-only tasks, placed in the study
        by its middle slice); or, for a series report, once on key slices of the series read together."""
        task = TASKS.get(spec.task, warn=False)
        if not task.needs_image:
            self.run_task(spec, series.slices[len(series.slices) // 2], 0, results)
        elif series.slide is not None:
            self.run_on_slide(spec, task, series.slide, results)
        elif spec.key_slices is not None:
            try:
                key = series.key_slices(spec.key_slices)
            except Exception as err:  # e.g. an instance the reader cannot decode: this report fails
                results.record(spec.task, None, None, "failed", f"key slices could not be read: {_reason(err)}")
                return
            results.evidence += key
            self.run_task(spec, key, 0, results)
        else:
            for k, src in enumerate(series.slices):
                self.run_task(spec, src, k, results)

    def run_on_slide(self, spec: TaskSpec, task: Task, slide: SlideInput, results: SeriesResults) -> None:
        """One task-file entry on a whole slide, read at the task's level (a series report reads it too)."""
        try:
            image = slide.image_for(task)
        except Exception as err:  # e.g. the region is too large at every level: this task fails
            results.record(spec.task, None, None, "failed", f"slide could not be read: {_reason(err)}")
            return
        self.run_task(spec, [image] if spec.key_slices is not None else image, 0, results)

    def process(self, series_list: list[SeriesSlices]) -> list[SeriesResults]:
        all_results = []
        for series in series_list:
            results = SeriesResults(series)
            for spec in self.deploy_config.tasks:
                self.run_spec(spec, series, results)
            all_results.append(results)
        return all_results

    @guarded
    def compute(self, op_input, op_output, context):
        op_output.emit(self.process(op_input.receive("series_slices")), "results")


class UniMedVLWriterOperator(Operator):
    """Writes every result as DICOM (a Comprehensive SR per series for the text and the notes of task runs
    that failed or did not apply, a new derived series per image task), a PNG preview of each image, and
    ``summary.json``; all-or-nothing per run. Nothing is written when no series could be read."""

    def __init__(self, fragment: Fragment, *args, output_folder: str | Path, model_getter=None,
                 outcome: RunOutcome | None = None, **kwargs):
        self.output_folder, self.model_getter = Path(output_folder), model_getter
        self.outcome = outcome or RunOutcome()
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("results")
        spec.input("input_report").condition(ConditionType.NONE)

    @guarded
    def compute(self, op_input, op_output, context):
        results: list[SeriesResults] = op_input.receive("results")
        report = op_input.receive("input_report")
        self.write(results, report if isinstance(report, dict) else {})

    @property
    def provenance(self):
        model = self.model_getter() if self.model_getter else None
        return getattr(model, "provenance", None)

    def write(self, results: list[SeriesResults], input_report: dict) -> Path | None:
        if not results:
            reasons = "; ".join(f["reason"] for f in self.outcome.failed_series[:3])
            self.outcome.rejected = ("no series could be read" + (f" ({reasons})" if reasons else
                                     " (no image series matched the series selection rules)"))
            self.outcome.summary = self._summary([], input_report, "rejected")
            log.error("nothing written: %s", self.outcome.rejected)
            return None
        self.output_folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".unimedvl-", dir=self.output_folder))
        try:
            summary = self._write_into(tmp, results, input_report)
            for item in tmp.iterdir():
                target = self.output_folder / item.name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
                os.replace(item, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.outcome.summary = summary
        log.info("wrote %d series of results to %s (%s)", len(summary["series"]), self.output_folder,
                 summary["status"])
        return self.output_folder

    def _summary(self, entries: list[dict], input_report: dict, status: str | None = None) -> dict:
        provenance = self.provenance
        model = provenance.to_dict() if provenance is not None else None
        failed = any(r["status"] == "failed" for e in entries for r in e["tasks"]) or self.outcome.failed_series
        status = status or ("partial" if failed else "complete")
        return {"application": "UniMedVL", "version": __version__, "status": status,
                "reason": self.outcome.rejected if status == "rejected" else
                ("some tasks or series failed; see tasks and failed_series" if status == "partial" else None),
                "model": model, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                "input": input_report, "series": entries, "failed_series": list(self.outcome.failed_series),
                "synthetic_images_labelled": True}

    def _write_into(self, out: Path, results: list[SeriesResults], input_report: dict) -> dict:
        entries, series_number = [], 9900
        for res in results:
            entry = {"series_instance_uid": res.series.series_uid, "modality": res.series.modality,
                     "selection": res.series.selection, "slices": [s.frame for s in res.series.slices],
                     **slide_region_record(res.series.slices[0]), "texts": res.texts, "tasks": res.runs,
                     "outputs": []}
            if res.texts or res.notes():
                series_number += 1
                entry["outputs"].append(self._write_sr(out, res, series_number))
            by_task: dict[str, list[dict]] = {}
            for image in res.images:
                by_task.setdefault(image["task"], []).append(image)
            for task, images in by_task.items():
                series_number += 1
                entry["outputs"] += self._write_images(out, res, task, images, series_number)
            entries.append(entry)
        summary = self._summary(entries, input_report)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        return summary

    def _write_sr(self, out: Path, res: SeriesResults, series_number: int) -> dict:
        """The series' Comprehensive SR: answers to a given input (a question) are findings, free text (a
        report) the report, and every run without its result a note with the reason; the weights (and a
        demonstration model's notice) are the algorithm's identification. It references the instances the
        tasks read: the selected slices and the key slices of a series report."""
        findings = [_at(t["slice"], f"Q: {t['input']} A: {t['text']}") for t in res.texts if t["input"] is not None]
        reports = [_at(t["slice"], t["text"]) for t in res.texts if t["input"] is None]
        notes = [f"Not done: {n}" for n in res.notes()]
        sr = report_sr(_unique_datasets(res.series.slices + res.evidence), findings, "\n".join(reports) or None,
                       generate_uid(), series_number, provenance=self.provenance, notes=notes)
        path = write_dicom(sr, out / "dicom" / f"sr_{res.series.series_uid[-12:]}.dcm")
        return {"kind": "sr", "file": str(path.relative_to(out))}

    def _write_images(self, out: Path, res: SeriesResults, task: str, images: list[dict],
                      series_number: int) -> list[dict]:
        series_uid, records = generate_uid(), []
        provenance = self.provenance
        for n, item in enumerate(images, start=1):
            image = label_with_provenance(item["image"], provenance)  # weights and notice in the PNG text
            pixels = np.asarray(image.convert("RGB"))
            description = image.info.get("Description", task)
            # an image made from text joins the study but claims neither geometry nor a source image
            ds = derived_image(pixels, item["source"], task, description, series_uid, series_number, n,
                               from_source=item["from_source"], provenance=provenance)
            stem = f"{task}_{res.series.series_uid[-12:]}_{n:04d}"
            dcm = write_dicom(ds, out / "dicom" / f"{stem}.dcm")
            png = save_png(image, out / "png" / f"{stem}.png")
            record = {"kind": "image", "task": task, "slice": item["slice"], "file": str(dcm.relative_to(out)),
                      "preview": str(png.relative_to(out)), "sop_class": str(ds.SOPClassUID.name),
                      "series_instance_uid": series_uid, "synthetic": True, **slide_region_record(item["source"])}
            for key in ("explanation", "input"):
                if item[key] is not None:
                    record[key] = item[key]
            records.append(record)
        return records


def _at(slice_: int | None, text: str) -> str:
    """Model text for the SR, prefixed with its slice; tabs (not allowed in UT) become spaces."""
    text = str(text).replace("\t", " ")
    return f"Slice {slice_}: {text}" if slice_ is not None else text


def _unique_datasets(slices: list[MedicalImage]) -> list:
    seen, out = set(), []
    for s in slices:
        uid = str(s.dataset.SOPInstanceUID)
        if uid not in seen:
            seen.add(uid)
            out.append(s.dataset)
    return out

