"""What the MONAI bundle (``monai_bundle/configs/*.json``) instantiates: the network, the input list, a
MONAI transform that reads medical images, the task inferer, the runner that writes outputs, the
curriculum trainer and the evaluation runner. Everything else the bundle uses comes from this package."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.transforms import MapTransform, Transform
from pydicom.uid import generate_uid
from tqdm.auto import tqdm

from ..inference.embedded import load_model
from ..io.medical_io import (
    ImageReadError,
    MedicalImage,
    dicom_image_headers,
    is_dicom_file,
    read_key_slices,
    read_slices,
)
from ..io.outputs import write_image_outputs, write_nifti_slice, write_nifti_volume
from ..io.paths import check_output_location
from ..io.slide import SlideSelection
from ..io.synthetic import is_own_output
from ..tasks.catalog import TASKS
from ..tasks.registry import Applicability, RunOptions
from ..tasks.slides import parse_region, slide_selection

__all__ = ["Checkpoint", "resolve_checkpoint", "brief_errors", "load_network", "list_inputs", "task_items",
           "series_key_slices",
           "LoadMedicalSlices", "LoadMedicalSlicesd", "TaskInferer", "TaskRunner", "CurriculumData",
           "CurriculumTrainer", "EvaluationRunner", "read_lines"]

log = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".nii.gz", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".nii", ".dcm")


def load_network(ckpt_dir: str | None = None, device: str | torch.device | None = None, dtype: str | None = None,
                 progress: bool = False, revision: str | None = None, quantization: str | None = None,
                 residency: str = "all"):
    """The released checkpoint in ``ckpt_dir`` (a folder, or a Hub id at ``revision``), or the embedded
    default model when it is None; ``quantization`` and ``residency`` as in ``UniMedVL.from_pretrained``
    (docs/quantization.md)."""
    return load_model(ckpt_dir or None, device=device, dtype=dtype, progress=progress, quantization=quantization,
                      residency=residency, **({"revision": revision} if ckpt_dir and revision else {}))


def network_on_demand(ckpt_dir: str | None = None, device: str | None = None, dtype: str | None = None,
                      quantization: str | None = None, residency: str = "all"):
    """``load_network``'s model, loaded in this process only when an evaluation step runs here: datasets
    sent to Ray Data are answered by the actors' copies alone (docs/batch.md#evaluation)."""
    from ..batch.model_spec import ModelOnDemand

    options = {k: v for k, v in {"device": device, "dtype": dtype, "quantization": quantization,
                                 "residency": residency}.items() if v is not None}
    def load():
        return load_network(ckpt_dir, device, dtype, quantization=quantization, residency=residency)

    return ModelOnDemand(ckpt_dir or None, options, load)


def read_lines(path: str | None) -> list[str]:
    """Questions or prompts from a file: a JSON list, or one per line."""
    if not path:
        return []
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        return [str(q) for q in json.loads(text)]
    return [line.strip() for line in text.splitlines() if line.strip()]


# Where ``python -m monai.bundle download_large_files`` puts the released checkpoint (large_files.yml paths).
CHECKPOINT_SUBDIR = "models/UniMedVL"


@dataclass(frozen=True)
class Checkpoint:
    """The weights a bundle run loads: a folder, or None for the embedded model; ``notice`` is the one line
    the log and ``results.json`` carry when the bundle falls back to the embedded model."""

    path: str | None
    notice: str | None = None


def _expected_files(bundle_root: Path) -> list[str]:
    """The checkpoint's file names as ``large_files.yml`` lists them (one source of truth for the download)."""
    import yaml

    listing = bundle_root / "large_files.yml"
    if not listing.is_file():
        return ["ema.safetensors", "llm_config.json"]
    entries = yaml.safe_load(listing.read_text()).get("large_files", [])
    prefix = CHECKPOINT_SUBDIR + "/"
    return [e["path"][len(prefix):] for e in entries if e["path"].startswith(prefix)]


def resolve_checkpoint(ckpt_dir: str | None = None, bundle_root: str = ".") -> Checkpoint:
    """The bundle's ``ckpt_dir``: a relative folder is read under ``bundle_root`` (as the zoo's bundles do),
    an absolute one as it is, a Hub id ("org/name", no such folder) is passed on. Unset: ``models/UniMedVL``
    under ``bundle_root`` when the download is complete there, else the embedded model, with a notice."""
    root = Path(bundle_root)
    if ckpt_dir:
        path = Path(ckpt_dir)
        if not path.is_absolute() and (root / path).exists():
            path = root / path
        return Checkpoint(str(path))
    folder = root / CHECKPOINT_SUBDIR
    missing = [name for name in _expected_files(root) if not (folder / name).is_file()]
    if not missing:
        return Checkpoint(str(folder))
    why = "is not there" if not folder.is_dir() else f"lacks {', '.join(missing)}"
    notice = (f"{CHECKPOINT_SUBDIR} under the bundle root {why} (python -m monai.bundle download_large_files "
              f"--bundle_path {bundle_root}): running the embedded phantom-only demonstration model")
    log.warning(notice)
    return Checkpoint(None, notice)


def _root_cause(err: BaseException) -> BaseException:
    seen = set()
    while id(err) not in seen and (err.__cause__ or err.__context__) is not None:
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return err


def brief_errors(debug: bool = False) -> None:
    """The bundle's ``initialize``: under ``python -m monai.bundle``, an error that stops the run prints one
    line naming its cause (not MONAI's chain of ConfigExpression tracebacks); ``--debug True`` keeps the
    traceback. Python callers of the workflow get the exceptions unchanged."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if debug or spec is None or not spec.name.startswith("monai.bundle"):
        return

    def hook(kind, err, tb):
        if issubclass(kind, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            return
        cause = _root_cause(err)
        text = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        print(f"error: {text} (--debug True shows the traceback)", file=sys.stderr)

    sys.excepthook = hook


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


def series_key_slices(task: str, params: dict | None = None) -> int | None:
    """How many key slices one report of a whole series reads when the task's parameters ask for a series
    report (the registry's ``series_report`` and ``key_slices``), else None (the task runs per slice)."""
    spec = TASKS.get(task, warn=False)
    if not spec.needs_image or not any(p.name == "series_report" for p in spec.params):
        return None
    resolved = spec.resolve({k: v for k, v in (params or {}).items() if k in ("series_report", "key_slices")})
    return resolved["key_slices"] if resolved["series_report"] else None


def slide_selection_of(task: str, region: Sequence[int] | str | None = None,
                       level: int | None = None) -> SlideSelection:
    """How the task reads a whole slide (``tasks.slides``): ``region`` x, y, width, height in level-0 pixels
    (None: the whole slide), ``level`` 0 = finest (None: the task's level rule)."""
    spec = TASKS.get(task, warn=False)
    return slide_selection(spec, None if region is None else parse_region(region), level)


class LoadMedicalSlices(Transform):
    """Path / image -> list of display-ready ``MedicalImage`` slices (``unimedvl_core.io.medical_io``).

    Args:
        slices: "middle" (default), "all", an index, or [start, stop).
        window: (centre, width) or a preset name; None uses the file's own or the modality's.
        key_slices: for a series report: one entry, the list of that many key slices spread over the volume
            (over the slices of an index or range), chosen as the command line chooses them.
        slide: how a whole slide is read (``slide_selection_of``); None: its finest level within the limits.
    """

    def __init__(self, slices: str | int | Sequence[int] = "middle", window: Any = None,
                 key_slices: int | None = None, slide: SlideSelection | None = None):
        self.slices, self.window, self.key_slices, self.slide = slices, window, key_slices, slide

    def __call__(self, source, series_uid: str | None = None):
        frames = None
        if self.slices not in ("middle", "all"):
            frames = [int(self.slices)] if isinstance(self.slices, (int, str)) else list(range(*self.slices))
        if self.key_slices is not None:
            return [read_key_slices(source, self.key_slices, self.window, series_uid, frames=frames,
                                    slide=self.slide)]
        return read_slices(source, frames=frames, window=self.window, series_uid=series_uid,
                           middle_only=self.slices == "middle", slide=self.slide)


class LoadMedicalSlicesd(MapTransform):
    """Dictionary version: reads ``d[key]`` (with ``d["series_uid"]`` when given) into ``d["slices"]``."""

    def __init__(self, keys="image", slices="middle", window=None, allow_missing_keys: bool = True,
                 key_slices: int | None = None, slide: SlideSelection | None = None):
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadMedicalSlices(slices, window, key_slices, slide)

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
        first = src[0] if isinstance(src, list) else src  # a series report's key slices: the series' rules
        reason = self.spec.not_applicable(first, self.rules) if src is not None else None
        if reason is not None:
            return {"status": "not applicable", "reason": reason, "result": None}
        try:
            return {"status": "done", "reason": None, "result": self.spec.run(network, src, params, RunOptions())}
        except Exception as err:  # one failed run is recorded; the others go on
            log.warning("%s failed: %s", self.task, err)
            return {"status": "failed", "reason": _one_line(err), "result": None}

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
                where = {"slices": [s.frame for s in src]} if isinstance(src, list) else {}
                out.append({"slice": getattr(src, "frame", None), **where, "source": src, "params": params,
                            **self.outcome(network, src, params)})
        return out


class TaskRunner:
    """The bundle's evaluator: every item of the dataset through the inferer; one record per run in
    ``results.json`` (status and reason, task parameters, text), images as labelled PNG plus DICOM (DICOM
    inputs) or NIfTI (NIfTI inputs; the outputs of several slices of one volume as ONE NIfTI volume in its
    space, recorded as each slice's ``volume``) in ``output_dir``, each naming the weights (and a
    demonstration model's notice). An input that cannot be read, a run that fails and an output that cannot
    be written are recorded (one line each) and the others go on; a failed write leaves no file behind, and
    ``results.json`` is written even when the run is interrupted, so that every file in ``output_dir`` is
    listed in it. ``notice`` (the checkpoint choice, see ``resolve_checkpoint``) is recorded."""

    def __init__(self, network, dataset, inferer: TaskInferer, output_dir: str, progress: bool = True,
                 notice: str | None = None):
        self.network, self.dataset, self.inferer = network, dataset, inferer
        self.output_dir, self.progress, self.notice = Path(output_dir), progress, notice

    def _write(self, result, record: dict, name: str, series_uid: str, n: int, nifti: bool) -> list[str]:
        stem = name if record["slice"] is None else f"{name}_slice{record['slice']:04d}"
        stem += f"_{n:02d}" if len(self.inferer.values()) > 1 else ""
        before = set(self.output_dir.iterdir())
        try:
            paths = write_image_outputs(result.image, record["source"], self.output_dir / stem, result.task,
                                        result.image.info.get("Description", ""), series_uid, instance=n + 1,
                                        provenance=self.network.provenance, nifti=nifti)
        except BaseException:
            for path in set(self.output_dir.iterdir()) - before:  # no half-written outputs
                path.unlink(missing_ok=True)
            raise
        return [str(p) for p in paths]

    def _entry(self, item: dict, record: dict, name: str, series_uid: str, n: int, nifti: bool = True) -> dict:
        result = record["result"]
        entry = {"input": item.get("image") or item.get("prompt"), "task": self.inferer.task,
                 "slice": record["slice"], **({"slices": record["slices"]} if "slices" in record else {}),
                 "status": record["status"], "reason": record["reason"],
                 "parameters": result.params if result else record["params"], "text": result.text if result else None}
        if result is not None and result.image is not None:
            try:
                entry["outputs"], entry["synthetic"] = self._write(result, record, name, series_uid, n, nifti), True
            except Exception as err:  # e.g. a full disk or a source the writer cannot place: recorded
                log.warning("could not write the output of %s: %s", entry["input"], err)
                entry["status"], entry["reason"] = "failed", _one_line(err)
        return entry

    def _write_volume(self, name: str, value: int, parts: list[tuple]) -> None:
        """The images of several slices of one NIfTI volume (one value of a list parameter) as one NIfTI
        volume, or one NIfTI per slice when they cannot form one (uneven slices or sizes); a volume that
        cannot be written marks its slices' entries failed."""
        images, sources, entries = zip(*parts)
        stem = name + (f"_{value:02d}" if len(self.inferer.values()) > 1 else "")
        provenance = self.network.provenance
        try:
            path = write_nifti_volume(images, sources, self.output_dir / f"{stem}.nii.gz", provenance)
            for image, src, entry in parts:
                if path is not None:
                    entry["volume"] = str(path)
                else:
                    png = entry["outputs"][0]
                    entry["outputs"].append(str(write_nifti_slice(image, src, Path(png[: -len(".png")] + ".nii.gz"),
                                                                  provenance)))
        except Exception as err:  # the atomic writers leave no partial file
            log.warning("could not write the NIfTI volume of %s: %s", entries[0]["input"], err)
            for entry in entries:
                entry["status"], entry["reason"] = "failed", f"NIfTI volume not written: {_one_line(err)}"

    def _run_item(self, item: dict, index: int, results: list[dict]) -> None:
        """The runs of one input; the image outputs of several NIfTI slices are gathered into volumes."""
        series_uid, name = generate_uid(), item.get("name") or f"prompt_{index:04d}"
        several, volumes = len(item.get("slices", [])) > 1, {}
        for n, record in enumerate(self.inferer(self.network, item)):
            src = record["source"]
            in_volume = several and isinstance(src, MedicalImage) and "affine" in src.geometry
            entry = self._entry(item, record, name, series_uid, n, nifti=not in_volume)
            results.append(entry)
            if in_volume and entry.get("outputs"):
                volumes.setdefault(n % len(self.inferer.values()), []).append((record["result"].image, src, entry))
        for value, parts in volumes.items():
            self._write_volume(name, value, parts)

    def _item(self, index: int) -> dict:
        """Item ``index`` read through the transforms; an input that cannot be read becomes an error item."""
        try:
            item = dict(self.dataset[index])
        except Exception as err:  # MONAI wraps a transform's error; the cause names the problem
            source = self.dataset.data[index] if hasattr(self.dataset, "data") else {}
            item = {"image": source.get("image"), "error": _one_line(_root_cause(err))}
        item.setdefault("index", index)
        return item

    def _summary(self, results: list[dict], errors: list[dict], interrupted: bool) -> dict:
        status = "interrupted" if interrupted else _run_status(results, errors)
        return {"model": self.network.name, "weights": self.network.provenance.to_dict(), "notice": self.notice,
                "task": self.inferer.task, "status": status, "results": results, "errors": errors}

    def run(self) -> dict:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        results, errors, interrupted = [], [], True
        try:
            for index in tqdm(range(len(self.dataset)), desc=self.inferer.task, disable=not self.progress):
                item = self._item(index)
                if item.get("error"):
                    errors.append({"input": item.get("image"), "error": item["error"]})
                    log.warning("skipped input: %s", item["error"])
                    continue
                self._run_item(item, index, results)
            interrupted = False
        finally:
            summary = self._summary(results, errors, interrupted)
            target = self.output_dir / "results.json"
            partial = target.with_suffix(".json.tmp")
            partial.write_text(json.dumps(summary, indent=2) + "\n")
            partial.replace(target)  # never a half-written results file
        log.info("wrote %d results to %s", len(results), self.output_dir)
        return summary


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0]


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

        results: dict[str, Any] = {"model": {"name": None}}  # named at the end: a ModelOnDemand may load late
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
        results["model"]["name"] = self.network.name
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
