"""What the MONAI bundle (``monai_bundle/configs/*.json``) instantiates: the network, the input list, a
MONAI transform that reads medical images, the task inferer, the runner that writes outputs, the
curriculum trainer and the evaluation runner. Everything else the bundle uses comes from this package."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.transforms import MapTransform, Transform
from pydicom.uid import generate_uid
from tqdm.auto import tqdm

from ..inference.embedded import load_model
from ..io.medical_io import ImageReadError, dicom_image_headers, is_dicom_file, read_slices
from ..io.outputs import write_image_outputs
from ..io.paths import check_output_location
from ..io.synthetic import is_own_output
from ..tasks.catalog import TASKS
from ..tasks.registry import Applicability, RunOptions

__all__ = ["load_network", "list_inputs", "task_items", "LoadMedicalSlices", "LoadMedicalSlicesd", "TaskInferer",
           "TaskRunner", "CurriculumData", "CurriculumTrainer", "EvaluationRunner", "read_lines"]

log = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".nii.gz", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".nii", ".dcm")


def load_network(ckpt_dir: str | None = None, device: str | torch.device | None = None, dtype: str | None = None,
                 progress: bool = False, revision: str | None = None):
    """The released checkpoint in ``ckpt_dir`` (a folder, or a Hub id at ``revision``), or the embedded
    default model when it is None."""
    return load_model(ckpt_dir or None, device=device, dtype=dtype, progress=progress,
                      **({"revision": revision} if ckpt_dir and revision else {}))


def read_lines(path: str | None) -> list[str]:
    """Questions or prompts from a file: a JSON list, or one per line."""
    if not path:
        return []
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        return [str(q) for q in json.loads(text)]
    return [line.strip() for line in text.splitlines() if line.strip()]


def list_inputs(dataset_dir: str | Path, include_synthetic: bool = False) -> list[dict]:
    """One entry per input: each DICOM series (a folder of DICOM files; several series in one folder are
    listed apart), each NIfTI file, each PNG/JPEG/TIFF image, each single DICOM file at the top. Files this
    project wrote (labelled synthetic) are passed over unless ``include_synthetic``."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset_dir {root} is not a folder")
    skip = (lambda path: False) if include_synthetic else is_own_output
    items: list[dict] = []
    series = {(path.parent, str(header.get("SeriesInstanceUID", ""))) for path, header in dicom_image_headers(root)
              if not skip(path)}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not skip(p)):
        if not is_dicom_file(path) and path.name.lower().endswith(_IMAGE_SUFFIXES):
            relative = str(path.relative_to(root))
            stem = relative[: -len(next(s for s in _IMAGE_SUFFIXES if relative.lower().endswith(s)))]
            items.append({"image": str(path), "name": stem.replace("/", "__")})
    for folder, uid in sorted(series):
        several = sum(1 for f, _ in series if f == folder) > 1
        name = str(folder.relative_to(root)).replace("/", "__") if folder != root else "dicom"
        items.append({"image": str(folder), "series_uid": uid, "name": f"{name}_{uid[-8:]}" if several else name})
    seen: dict[str, int] = {}
    for item in items:  # output names must not collide (a.png and a.jpg, or two series of one folder)
        count = seen.get(item["name"], 0)
        seen[item["name"]] = count + 1
        if count:
            item["name"] = f"{item['name']}_{count + 1}"
    return items


class LoadMedicalSlices(Transform):
    """Path / image -> list of display-ready ``MedicalImage`` slices (``unimedvl_core.io.medical_io``).

    Args:
        slices: "middle" (default), "all", an index, or [start, stop).
        window: (centre, width) or a preset name; None uses the file's own or the modality's.
    """

    def __init__(self, slices: str | int | Sequence[int] = "middle", window: Any = None):
        self.slices, self.window = slices, window

    def __call__(self, source, series_uid: str | None = None):
        if self.slices == "middle":
            return read_slices(source, window=self.window, series_uid=series_uid, middle_only=True)
        if self.slices == "all":
            return read_slices(source, window=self.window, series_uid=series_uid)
        frames = [int(self.slices)] if isinstance(self.slices, (int, str)) else list(range(*self.slices))
        return read_slices(source, frames=frames, window=self.window, series_uid=series_uid)


class LoadMedicalSlicesd(MapTransform):
    """Dictionary version: reads ``d[key]`` (with ``d["series_uid"]`` when given) into ``d["slices"]``."""

    def __init__(self, keys="image", slices="middle", window=None, allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadMedicalSlices(slices, window)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d["slices"] = self.loader(d[key], d.get("series_uid"))
            except ImageReadError as err:
                d["slices"], d["error"] = [], str(err)
        return d


class TaskInferer:
    """Runs one registry task (``unimedvl_core.tasks``) on one input item; one outcome per slice and per value
    of a list parameter (``questions`` for VQA, ``prompts`` for text-to-image): done, not applicable (the
    task's rules of where it applies, or ``applies_to``) or failed, each with its reason.

    Args:
        task: a task name of the registry.
        params: the task's parameters (names, defaults and limits as ``unimedvl tasks`` lists them).
        questions, questions_file, prompts, prompts_file: list forms of the task's repeatable parameter.
        applies_to: ``{"modalities": [...] | None, "max_side": N | None}`` instead of the task's own rules.
    """

    def __init__(self, task: str = "vqa", params: dict | None = None, questions: Sequence[str] | None = None,
                 questions_file: str | None = None, prompts: Sequence[str] | None = None,
                 prompts_file: str | None = None, applies_to: dict | None = None):
        self.spec = TASKS.get(task)
        self.task = self.spec.name
        self.params = dict(params or {})
        self.rules = Applicability.from_dict(applies_to) if applies_to is not None else self.spec.applies
        lists = {"questions": [*(questions or []), *read_lines(questions_file)],
                 "prompts": [*(prompts or []), *read_lines(prompts_file)]}
        self.repeat = None  # (parameter name, values) the task runs once per value of
        for plural, param in self.spec.plural_params().items():
            if lists.get(plural) and param.name not in self.params:
                self.repeat = (param.name, lists[plural])
        filled = {self.repeat[0]: self.repeat[1][0]} if self.repeat else {}
        self.spec.resolve({**filled, **self.params})  # fail now, naming the parameter, not after loading

    def values(self) -> list[dict]:
        if self.repeat is None:
            return [{}]
        name, values = self.repeat
        return [{name: v} for v in values]

    def outcome(self, network, src, params: dict) -> dict:
        """One run: ``{"status": "done" | "not applicable" | "failed", "reason", "result"}``."""
        reason = self.spec.not_applicable(src, self.rules) if src is not None else None
        if reason is not None:
            return {"status": "not applicable", "reason": reason, "result": None}
        try:
            return {"status": "done", "reason": None, "result": self.spec.run(network, src, params, RunOptions())}
        except Exception as err:  # one failed run is recorded; the others go on
            log.warning("%s failed: %s", self.task, err)
            return {"status": "failed", "reason": f"{type(err).__name__}: {err}".splitlines()[0], "result": None}

    def __call__(self, network, item: dict) -> list[dict]:
        if not self.spec.needs_image:
            values = [{self.repeat[0]: item["prompt"]}] if self.repeat else [{}]
            sources = [(item.get("index", 0), None)]
        else:
            values, sources = self.values(), list(enumerate(item.get("slices", [])))
        out = []
        for k, src in sources:
            for value in values:
                params = self.spec.item_params({**self.params, **value}, k)
                out.append({"slice": getattr(src, "frame", None), "source": src, "params": params,
                            **self.outcome(network, src, params)})
        return out


class TaskRunner:
    """The bundle's evaluator: every item of the dataset through the inferer; one record per run in
    ``results.json`` (status and reason, task parameters, text), images as labelled PNG plus DICOM (DICOM
    inputs) or NIfTI (NIfTI inputs) in ``output_dir``. A run that fails is recorded and the others go on."""

    def __init__(self, network, dataset, inferer: TaskInferer, output_dir: str, progress: bool = True):
        self.network, self.dataset, self.inferer = network, dataset, inferer
        self.output_dir, self.progress = Path(output_dir), progress

    def _entry(self, item: dict, record: dict, name: str, series_uid: str, n: int) -> dict:
        result = record["result"]
        entry = {"input": item.get("image") or item.get("prompt"), "task": self.inferer.task,
                 "slice": record["slice"], "status": record["status"], "reason": record["reason"],
                 "parameters": result.params if result else record["params"], "text": result.text if result else None}
        if result is not None and result.image is not None:
            stem = name if record["slice"] is None else f"{name}_slice{record['slice']:04d}"
            stem += f"_{n:02d}" if len(self.inferer.values()) > 1 else ""
            paths = write_image_outputs(result.image, record["source"], self.output_dir / stem, result.task,
                                        result.image.info.get("Description", ""), series_uid, instance=n + 1)
            entry["outputs"], entry["synthetic"] = [str(p) for p in paths], True
        return entry

    def run(self) -> dict:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        results, errors = [], []
        for index in tqdm(range(len(self.dataset)), desc=self.inferer.task, disable=not self.progress):
            item = dict(self.dataset[index])
            item.setdefault("index", index)
            if item.get("error"):
                errors.append({"input": item.get("image"), "error": item["error"]})
                log.warning("skipped input: %s", item["error"])
                continue
            series_uid, name = generate_uid(), item.get("name") or f"prompt_{index:04d}"
            for n, record in enumerate(self.inferer(self.network, item)):
                results.append(self._entry(item, record, name, series_uid, n))
        summary = {"model": self.network.name, "weights": self.network.provenance.to_dict(),
                   "task": self.inferer.task, "status": _run_status(results, errors), "results": results,
                   "errors": errors}
        (self.output_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("wrote %d results to %s", len(results), self.output_dir)
        return summary


def _run_status(results: list[dict], errors: list[dict]) -> str:
    """complete: every input read and every applicable run done; partial: some; failed: none done."""
    done = sum(r["status"] == "done" for r in results)
    if done == 0 and any(r["status"] == "failed" for r in results) or (not results and errors):
        return "failed"
    return "partial" if errors or any(r["status"] == "failed" for r in results) else "complete"


def task_items(task: str, dataset_dir: str, prompts: Sequence[str] | None = None,
               prompts_file: str | None = None, output_dir: str | None = None,
               include_synthetic: bool = False) -> list[dict]:
    """The bundle's datalist: the inputs in ``dataset_dir`` for tasks that take images, else one item per
    prompt. The output folder may not be, hold or lie inside the input folder (outputs never mix with inputs)."""
    if TASKS.get(task, warn=False).needs_image:
        if output_dir is not None:
            check_output_location([output_dir], [dataset_dir])
        return list_inputs(dataset_dir, include_synthetic)
    items = [{"prompt": p, "index": i} for i, p in enumerate(list(prompts or []) + read_lines(prompts_file))]
    if not items:
        raise ValueError(f"the {task} task needs prompts (prompts=[...] or prompts_file=...)")
    return items


# ----------------------------------------------------------------------------------------------------------
# training


class CurriculumData:
    """The training data of a stage: a dataset registry and the folder its files are in (the bundle's
    ``train#dataset``); the curriculum file of the stage gives the category mixture."""

    def __init__(self, registry: str, data_dir: str):
        self.registry, self.data_dir = registry, data_dir

    def overrides(self) -> list[str]:
        return [f"data.registry={self.registry}", f"data.data_dir={self.data_dir}"]


class CurriculumTrainer:
    """The bundle's ``train#trainer``: one curriculum stage of a recipe (``unimedvl_core.training``).

    ``max_epochs`` is the stage's number of optimisation steps (one packed sequence per step and rank);
    None keeps the recipe's value. The loss weights of ``inferer`` (``train#inferer``) override the recipe's.
    """

    def __init__(self, recipe: str, stage: int, run_dir: str, dataset: CurriculumData, inferer=None,
                 max_epochs: int | None = None, device: str | torch.device | None = None,
                 overrides: Sequence[str] = (), progress: bool = True):
        self.recipe, self.stage, self.run_dir, self.dataset = recipe, int(stage), run_dir, dataset
        self.inferer, self.max_epochs, self.device = inferer, max_epochs, device
        self.overrides, self.progress = list(overrides), progress

    def run(self) -> Path:
        import torch.distributed as dist

        from ..training.config import load_recipe
        from ..training.distributed import init_distributed
        from ..training.launch import run_stage

        sets = [f"run_dir={self.run_dir}", *self.dataset.overrides(), *self.overrides]
        if self.max_epochs is not None:
            sets.append(f"stages.{self.stage}.steps={int(self.max_epochs)}")
        if self.inferer is not None:
            sets += [f"optim.ce_weight={self.inferer.ce_weight}", f"optim.mse_weight={self.inferer.mse_weight}"]
        info = init_distributed(str(self.device) if self.device is not None else None)
        try:
            cfg = load_recipe(self.recipe, sets)
            return run_stage(cfg, self.stage, info, self.progress)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


class PackedLossWeights:
    """The bundle's ``train#inferer``: how a packed sequence's losses combine (CE on text, MSE on velocity)."""

    def __init__(self, ce_weight: float = 1.0, mse_weight: float = 1.0):
        self.ce_weight, self.mse_weight = ce_weight, mse_weight


# ----------------------------------------------------------------------------------------------------------
# evaluation


class EvaluationRunner:
    """The bundle's evaluation: VQA (benchmark files or the released SFT format), reports (BLEU/ROUGE),
    image-to-image pairs (PSNR/SSIM) and text-to-image (FID on a named feature extractor); writes a results
    table and a figure of sample outputs."""

    def __init__(self, network, output_dir: str, vqa: Sequence[dict] = (), reports: str | None = None,
                 editing: Sequence[str] = (), text_to_image: str | None = None, fid_extractor: str = "unimedvl-vit",
                 data_dir: str | None = None, limit: int | None = None, num_inference_steps: int | None = None,
                 progress: bool = True):
        self.network, self.output_dir = network, Path(output_dir)
        self.vqa, self.reports, self.editing, self.t2i = list(vqa), reports, list(editing), text_to_image
        self.fid_extractor, self.limit, self.steps, self.progress = fid_extractor, limit, num_inference_steps, progress
        self.data_dir = Path(data_dir) if data_dir else None

    def _cut(self, items):
        return list(items)[: self.limit] if self.limit else list(items)

    def _path(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() or self.data_dir is None else self.data_dir / path

    def run(self) -> dict:
        from PIL import Image

        from ..data import evaluation as ev

        results: dict[str, Any] = {"model": {"name": self.network.name}}
        figure: list = []
        for spec in self.vqa:
            items = self._cut(ev.read_vqa(spec["format"], self._path(spec["path"])))
            records, scores = ev.evaluate_vqa(self.network, items, progress=self.progress)
            results[f"vqa:{spec.get('name', spec['format'])}"] = scores
            shown = [(f"Q: {r['question'][:28]}\nA: {r['prediction'][:28]}", ev._open_image(i.image))
                     for r, i in zip(records[:4], items[:4])]
            figure.append((f"VQA {spec.get('name', spec['format'])}", shown))
        if self.reports:
            items = self._cut(ev.read_report_items(self._path(self.reports)))
            records, scores = ev.evaluate_reports(self.network, items, progress=self.progress)
            results["reports"] = scores
        for path in self.editing:
            pairs = self._cut(ev.read_editing_pairs(self._path(path)))
            records, scores = ev.evaluate_editing(self.network, pairs, steps=self.steps, progress=self.progress)
            results[f"image_to_image:{Path(path).stem}"] = scores
            for r in records[:2]:
                figure.append((r["task"], [("input", r["input"]), ("output (synthetic)", r["output"]),
                                           ("reference", Image.fromarray(r["reference"]))]))
        if self.t2i:
            items = self._cut(_t2i_items(self._path(self.t2i)))
            extractor = ev.FeatureExtractor(self.fid_extractor, self.network)
            records, scores = ev.evaluate_text_to_image(self.network, [i[0] for i in items], [i[1] for i in items],
                                                        extractor, steps=self.steps, progress=self.progress)
            results["text_to_image"] = scores
            figure.append(("text-to-image", [(r["prompt"][:30], r["output"]) for r in records[:4]]))
        results["files"] = ev.write_results(self.output_dir, results, figure)
        return results


def _t2i_items(path: Path) -> list[tuple[str, Any]]:
    """(prompt, reference image) pairs of a text-to-image JSONL in the released format."""
    from PIL import Image

    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            images = d.get("output_img") or d.get("input_img")
            prompt = next(t["value"] for t in d["message"] if t["from"] == "human")
            out.append((prompt, Image.open(path.parent / "images" / images[0]["path"]).convert("RGB")))
    return out


# ----------------------------------------------------------------------------------------------------------
# sample inputs


def write_sample_inputs(folder: str | Path, seed: int = 7) -> list[Path]:
    """Small synthetic inputs for the bundle's default data folder: phantom PNGs, a NIfTI volume and a
    three-slice DICOM CT series of a synthetic patient (no real patient data)."""
    import nibabel as nib
    import numpy as np
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file

    from ..data.phantoms import render, sample_phantom

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = []
    ct = sample_phantom(rng, "radiology", 64, count=2, pid="sample_ct")
    xray = sample_phantom(rng, "xray", 64, count=1, pid="sample_xray")
    for name, image in (("ct_phantom.png", render(ct, "ct")), ("xray_phantom.png", render(xray, "xray"))):
        Image.fromarray(image).save(folder / name)
        written.append(folder / name)
    # NIfTI: three T2-like slices; medical_io shows slice k as data[:, :, k].T[::-1, ::-1]
    slices = [render(sample_phantom(rng, "radiology", 64, count=c), "mr_t2")[..., 0] for c in (0, 1, 3)]
    volume = np.stack([s[::-1, ::-1].T for s in slices], axis=-1).astype(np.float32)
    nifti = folder / "mr_t2_phantom.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 3.0, 1.0])), str(nifti))
    written.append(nifti)
    # DICOM CT series: stored = 1000 * intensity, HU = stored - 1024, window chosen to show the phantom range
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    series_dir = folder / "dicom_ct_series"
    series_dir.mkdir(exist_ok=True)
    for k, count in enumerate((1, 2, 3)):
        pixels = render(sample_phantom(rng, "radiology", 64, count=count), "ct")[..., 0].astype(np.float64) / 255
        ds = template.copy()
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "PHANTOM^SYNTHETIC", "PHANTOM-0001", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_ref
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDescription, ds.SeriesDescription = "Synthetic phantom study", "Phantom CT"
        ds.InstanceNumber, ds.SeriesNumber = k + 1, 1
        ds.Rows, ds.Columns, ds.PixelSpacing, ds.SliceThickness = 64, 64, [1.0, 1.0], 3.0
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 3.0 * k], [1, 0, 0, 0, 1, 0]
        ds.RescaleIntercept, ds.RescaleSlope, ds.WindowCenter, ds.WindowWidth = -1024, 1, -524, 1000
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.rint(pixels * 1000).astype(np.uint16).tobytes()
        for keyword in ("AccessionNumber", "InstitutionName", "ReferringPhysicianName", "OperatorsName"):
            if keyword in ds:
                setattr(ds, keyword, "")
        path = series_dir / f"slice_{k + 1:03d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        written.append(path)
    return written
