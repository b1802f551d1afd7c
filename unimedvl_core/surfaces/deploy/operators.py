"""MONAI Deploy operators of the UniMedVL application (the SDK's own operators load and select series).

    ValidateDICOMInputOperator -> DICOMDataLoaderOperator -> DICOMSeriesSelectorOperator
        -> SliceSelectionOperator -> UniMedVLTaskOperator -> UniMedVLWriterOperator

Outputs are written into a temporary folder inside the output folder and moved into place only when all
of them are written, so a failed run leaves no partial output.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from monai.deploy.core import ConditionType, Fragment, Operator, OperatorSpec
from pydicom.uid import generate_uid

from ... import __version__
from ...io.dicom_output import derived_image, report_sr, write_dicom
from ...io.medical_io import MedicalImage, _slice_sort_key, read_slices
from ...io.synthetic import save_png
from ...tasks.catalog import TASKS
from .config import DeployConfig, TaskSpec
from .inputs import scan_dicom_folder, stage_usable_files

__all__ = ["ValidateDICOMInputOperator", "SliceSelectionOperator", "UniMedVLTaskOperator", "UniMedVLWriterOperator",
           "SeriesSlices", "SeriesResults"]

log = logging.getLogger(__name__)


@dataclass
class SeriesSlices:
    series_uid: str
    description: str
    modality: str
    selection: str
    slices: list[MedicalImage]


@dataclass
class SeriesResults:
    series: SeriesSlices
    texts: list[dict] = field(default_factory=list)      # {"task", "slice", "input" (e.g. the question), "text"}
    images: list[dict] = field(default_factory=list)     # {"task", "slice", "image", "source", "explanation", ...}


class ValidateDICOMInputOperator(Operator):
    """Scans the input folder (``unimedvl_core.surfaces.deploy.inputs``) and hands the SDK loader a folder of the
    usable files only; an input with nothing usable stops the application with a clear error."""

    def __init__(self, fragment: Fragment, *args, input_folder: str | Path, staging_folder: str | Path, **kwargs):
        self.input_folder, self.staging_folder = Path(input_folder), Path(staging_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.output("input_folder")
        spec.output("input_report")

    def compute(self, op_input, op_output, context):
        scan = scan_dicom_folder(self.input_folder)
        op_output.emit(stage_usable_files(scan, self.staging_folder), "input_folder")
        op_output.emit(scan.summary(), "input_report")


class SliceSelectionOperator(Operator):
    """Selected series -> the slices to run on: the key slice (middle), all slices, or a range
    [start, stop) in patient order; multi-frame instances count their frames as slices."""

    def __init__(self, fragment: Fragment, *args, mode: str = "key", start: int | None = None,
                 stop: int | None = None, window: Any = None, **kwargs):
        if mode not in ("key", "all", "range"):
            raise ValueError(f"slice mode must be key, all or range, got {mode!r}")
        # (start/stop would shadow the operator's own start()/stop() methods)
        self.slice_mode, self.range_start, self.range_stop, self.window = mode, start, stop, window
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
        out = []
        for index in self._pick(len(datasets)):
            image = read_slices(datasets[index], window=self.window, middle_only=True)[0]
            image.frame, image.num_frames = index, len(datasets)
            out.append(image)
        return out

    def compute(self, op_input, op_output, context):
        selected = op_input.receive("study_selected_series_list") or []
        result = []
        for study_selected in selected:
            for selected_series in study_selected.selected_series:
                series = selected_series.series
                datasets = [i.get_native_sop_instance() for i in series.get_sop_instances()]
                slices = self.select(datasets)
                if not slices:
                    log.warning("series %s: no slice in the requested range", series.SeriesInstanceUID)
                    continue
                result.append(SeriesSlices(str(series.SeriesInstanceUID),
                                           str(getattr(series, "SeriesDescription", "")),
                                           str(getattr(series, "Modality", "")), selected_series.selection_name,
                                           slices))
        if not result:
            raise ValueError("no supported image series in the input (see the series selection rules)")
        op_output.emit(result, "series_slices")


class UniMedVLTaskOperator(Operator):
    """Runs the configured tasks on every selected slice with one model, loaded once."""

    def __init__(self, fragment: Fragment, *args, config: DeployConfig, model_path: str | None = None, **kwargs):
        self.deploy_config, self.model_path = config, model_path
        self._model = None
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("series_slices")
        spec.output("results")

    def load_model(self):
        if self._model is None:
            from ...inference.embedded import load_model

            path = self.model_path if self.model_path and Path(self.model_path, "llm_config.json").is_file() else None
            if self.model_path and path is None:
                log.info("no checkpoint in the model folder; using the embedded default model")
            self._model = load_model(path, device=self.deploy_config.device, progress=False)
            self._model.progress = False
        return self._model

    def run_task(self, spec: TaskSpec, src: MedicalImage, k: int, results: SeriesResults) -> None:
        """Every run of one task-file entry on one slice (``k``-th of the series), through the registry."""
        task, model = TASKS.get(spec.task, warn=False), self.load_model()
        for params in spec.runs():
            value = params.get(spec.repeat[0]) if spec.repeat else None
            result = task.run(model, src if task.needs_image else None, task.item_params(params, k))
            record = {"task": task.name, "slice": src.frame if task.needs_image else None}
            if task.returns == "text":
                results.texts.append({**record, "input": value, "text": result.text})
            else:
                results.images.append({**record, "source": src, "image": result.image, "explanation": result.text,
                                       "input": value, "from_source": task.needs_image})

    def compute(self, op_input, op_output, context):
        all_results = []
        for series in op_input.receive("series_slices"):
            results = SeriesResults(series)
            for spec in self.deploy_config.tasks:
                if not TASKS.get(spec.task, warn=False).needs_image:  # once per series, placed in its study
                    self.run_task(spec, series.slices[len(series.slices) // 2], 0, results)
                    continue
                for k, src in enumerate(series.slices):
                    self.run_task(spec, src, k, results)
            all_results.append(results)
        op_output.emit(all_results, "results")


class UniMedVLWriterOperator(Operator):
    """Writes every result as DICOM (a Comprehensive SR per series for the text, a new derived series per
    image task), a PNG preview of each image, and ``summary.json``; all-or-nothing."""

    def __init__(self, fragment: Fragment, *args, output_folder: str | Path, model_name_getter=None, **kwargs):
        self.output_folder = Path(output_folder)
        self.model_name_getter = model_name_getter
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("results")
        spec.input("input_report").condition(ConditionType.NONE)

    def compute(self, op_input, op_output, context):
        results: list[SeriesResults] = op_input.receive("results")
        report = op_input.receive("input_report")
        self.write(results, report if isinstance(report, dict) else {})

    def write(self, results: list[SeriesResults], input_report: dict) -> Path:
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
        log.info("wrote %d series of results to %s", len(summary["series"]), self.output_folder)
        return self.output_folder

    def _write_into(self, out: Path, results: list[SeriesResults], input_report: dict) -> dict:
        summary = {"application": "UniMedVL", "version": __version__,
                   "model": self.model_name_getter() if self.model_name_getter else None,
                   "created": datetime.datetime.now().isoformat(timespec="seconds"), "input": input_report,
                   "series": [], "synthetic_images_labelled": True}
        series_number = 9900
        for res in results:
            entry = {"series_instance_uid": res.series.series_uid, "modality": res.series.modality,
                     "selection": res.series.selection, "slices": [s.frame for s in res.series.slices],
                     "texts": res.texts, "outputs": []}
            if res.texts:
                series_number += 1
                # answers to a given input (a question) are findings; free text (a report) is the report
                findings = [f"Slice {t['slice']}: Q: {t['input']} A: {t['text']}" if t["input"] is not None
                            else None for t in res.texts]
                reports = [f"Slice {t['slice']}: {t['text']}" for t in res.texts if t["input"] is None]
                evidence = _unique_datasets(res.series.slices)
                sr = report_sr(evidence, [f for f in findings if f], "\n".join(reports) or None, generate_uid(),
                               series_number)
                path = write_dicom(sr, out / "dicom" / f"sr_{res.series.series_uid[-12:]}.dcm")
                entry["outputs"].append({"kind": "sr", "file": str(path.relative_to(out))})
            by_task: dict[str, list[dict]] = {}
            for image in res.images:
                by_task.setdefault(image["task"], []).append(image)
            for task, images in by_task.items():
                series_number += 1
                series_uid = generate_uid()
                for n, item in enumerate(images, start=1):
                    pixels = np.asarray(item["image"].convert("RGB"))
                    description = item["image"].info.get("Description", task)
                    # an image made from text joins the study but claims neither geometry nor a source image
                    ds = derived_image(pixels, item["source"], task, description, series_uid, series_number, n,
                                       from_source=item["from_source"])
                    stem = f"{task}_{res.series.series_uid[-12:]}_{n:04d}"
                    dcm = write_dicom(ds, out / "dicom" / f"{stem}.dcm")
                    png = save_png(item["image"], out / "png" / f"{stem}.png")
                    record = {"kind": "image", "task": task, "slice": item["slice"], "file": str(dcm.relative_to(out)),
                              "preview": str(png.relative_to(out)), "sop_class": str(ds.SOPClassUID.name),
                              "series_instance_uid": series_uid, "synthetic": True}
                    if item["explanation"] is not None:
                        record["explanation"] = item["explanation"]
                    if item["input"] is not None:
                        record["input"] = item["input"]
                    entry["outputs"].append(record)
            summary["series"].append(entry)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def _unique_datasets(slices: list[MedicalImage]) -> list:
    seen, out = set(), []
    for s in slices:
        uid = str(s.dataset.SOPInstanceUID)
        if uid not in seen:
            seen.add(uid)
            out.append(s.dataset)
    return out

