"""The task subcommands of ``unimedvl``, generated from the task registry: one subcommand per task, one
option per task parameter (its default shown in ``--help``), and one runner for all of them.

    unimedvl vqa --image chest.dcm --question "Is there a pleural effusion?"
    unimedvl super_resolution --image lowres.png --scale 4 --out sr.png     (super-resolution works too)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pydicom.uid import generate_uid

from ..io.atomic import write_text_atomic
from ..io.medical_io import WINDOW_PRESETS, read_key_slices, read_slices
from ..io.outputs import write_image_outputs, write_nifti_slice, write_nifti_volume
from ..io.paths import check_output_location
from ..tasks.catalog import TASKS
from ..tasks.params import Param, TaskParameterError
from ..tasks.registry import ModelLimits, RunOptions, Task, TaskResult, canonical_name
from ..tasks.slides import parse_region, slide_region_record, slide_selection

__all__ = ["add_task_commands", "check_task_command", "run_task_command", "add_model_args", "HelpFormatter"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option's help (unless the help already says it, or there is none), examples kept
    as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or action.default is None:
            return text
        return super()._get_help_string(action)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", type=Path, help="checkpoint folder in the released layout, or a Hugging Face Hub id "
                   "such as General-Medical-AI/UniMedVL (default: embedded model)")
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit of a --ckpt Hub id (None: main)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="which weights file to load")
    p.add_argument("--device-map", default=None, help="'auto' to spread over GPUs / offload (accelerate)")
    p.add_argument("--quantization", default=None, choices=["int8", "nf4", "fp8"],
                   help="8/4-bit decoder weights (torchao; fp8 needs an Ada/Hopper GPU; docs/quantization.md)")
    p.add_argument("--residency", default="all", choices=["all", "task"],
                   help="'task': only the expert a task uses on the device (docs/quantization.md#residency)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


SLICES_FORM = "N (one slice, from 0; negative counts from the end), A:B (slices A to B-1), all, or middle"


def parse_slices(text: str) -> list[int] | str:
    """``--slices``: "middle", "all", or the list of indices of "N" or "A:B" (B excluded, A < B)."""
    value = text.strip().lower()
    if value in ("all", "middle"):
        return value
    try:
        if ":" not in value:
            return [int(value)]
        start, stop = (int(v) for v in value.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {SLICES_FORM} (got {text!r})") from None
    if not 0 <= start < stop:
        raise argparse.ArgumentTypeError(f"A:B needs 0 <= A < B (slices A to B-1); {text!r} selects no slice")
    return list(range(start, stop))


parse_slices.__name__ = "slices"  # argparse names the type in its messages


def parse_window(text: str) -> tuple[float, float] | str:
    """``--window``: "CENTRE,WIDTH" (modality units, width > 0) or a preset name."""
    if "," not in text:
        if text not in WINDOW_PRESETS:
            raise argparse.ArgumentTypeError(f"expected CENTRE,WIDTH or a preset ({', '.join(WINDOW_PRESETS)}); "
                                             f"got {text!r}")
        return text
    try:
        centre, width = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CENTRE,WIDTH (two numbers) or a preset (got {text!r})") from None
    if not width > 0:
        raise argparse.ArgumentTypeError(f"the width must be above 0 (got {text!r})")
    return centre, width


parse_window.__name__ = "window"


def parse_slide_region(text: str) -> tuple[int, int, int, int]:
    """``--region``: X,Y,WIDTH,HEIGHT of a whole slide, in level-0 pixels."""
    try:
        return parse_region(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


parse_slide_region.__name__ = "region"


def _add_image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, metavar="PATH", help="PNG/JPEG/TIFF, DICOM file or series folder, NIfTI")
    p.add_argument("--slices", type=parse_slices, default="middle", metavar="SEL",
                   help=f"slices or frames of a volume: {SLICES_FORM}")
    p.add_argument("--window", type=parse_window, default=None, metavar="C,W|PRESET",
                   help="CENTRE,WIDTH or a preset (soft_tissue, lung, bone, brain, liver, mediastinum) "
                        "(default: the file's window, else a modality preset, else the full range)")
    p.add_argument("--series-uid", default=None, help="series to read when a folder holds several")
    p.add_argument("--region", type=parse_slide_region, default=None, metavar="X,Y,W,H",
                   help="whole-slide images: the part to read, in level-0 pixels (default: the whole slide)")
    p.add_argument("--level", type=int, default=None, metavar="N",
                   help="whole-slide images: pyramid level, 0 = finest (default: the task's rule, "
                        "docs/medical-io.md#whole-slide-images)")


def _option_type(param: Param):
    def parse(text: str):
        try:
            return param.parse(text)
        except TaskParameterError as err:
            raise argparse.ArgumentTypeError(str(err).split(": ", 1)[-1]) from None

    parse.__name__ = param.type  # argparse names the type in its messages
    return parse


def _param_help(param: Param, limits: ModelLimits | None) -> str:
    text = param.help or ""
    if param.limit == "image_side" and limits is not None:
        text += (f" [a multiple of {limits.size_multiple}, at most {limits.max_image_side} for the embedded model; "
                 "'unimedvl tasks --ckpt DIR' shows a checkpoint's]")
    elif param.bounds:
        text += f" [{param.bounds}]"
    return text or " "


def _add_param(p: argparse.ArgumentParser, param: Param, limits: ModelLimits | None) -> None:
    flags = [f"--{param.name.replace('_', '-')}", *param.flags]
    kwargs = dict(dest=param.name, help=_param_help(param, limits), default=param.default)
    if param.type == "bool":
        p.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        return
    metavar = {"interval": "START,END", "int": "N", "float": "X", "str": "TEXT"}[param.type]
    if param.choices:
        metavar = "{" + ",".join(str(c) for c in param.choices) + "}"
    p.add_argument(*flags, type=_option_type(param), required=param.required, metavar=metavar, **kwargs)


_OUT_HELP = ("output file (NAME.png: also NAME.dcm or NAME.nii.gz beside it for DICOM or NIfTI input) or folder "
             "(a path ending in / or an existing folder: files named from the input and task); several slices "
             "go into a folder of that name, with one NIfTI volume for a NIfTI input")


def _add_task_command(sub, task: Task, limits: ModelLimits | None) -> None:
    aliases = [task.name.replace("_", "-")] if "_" in task.name else []
    aliases += [a for a in task.aliases if a not in aliases]
    examples = "examples:\n  " + "\n  ".join(task.examples) if task.examples else None
    p = sub.add_parser(task.name, aliases=aliases, help=task.summary, description=task.summary, epilog=examples,
                       formatter_class=HelpFormatter)
    add_model_args(p)
    if task.needs_image:
        _add_image_args(p)
    for param in task.params:
        _add_param(p, param, limits)
    if task.returns == "image":
        p.add_argument("--out", default=f"{task.name}.png", metavar="FILE|DIR/", help=_OUT_HELP)
    p.add_argument("--json", default=None, metavar="FILE|DIR/",
                   help="also write the results to this JSON file (a folder: named from the input and task)")
    p.set_defaults(task=task.name)


def add_task_commands(sub, limits: ModelLimits | None = None) -> None:
    """One subcommand per registered task (read at call time, so a newly registered task appears); ``limits``
    (the embedded model's) are shown in the help of size options."""
    for task in TASKS:
        _add_task_command(sub, task, limits)


def _input_stem(image: str) -> str:
    name = Path(str(image).rstrip("/\\")).name
    for suffix in (".nii.gz", ".nii", ".dcm", ".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def is_folder_target(text: str) -> bool:
    """``--out DIR/`` (a trailing separator) or an existing folder means a folder."""
    return text.endswith(("/", os.sep)) or Path(text).is_dir()


def output_stem(text: str, args, task: Task) -> Path:
    """Where a run's files go, without suffix: ``--out result.png`` -> result (result.png, result.dcm, ...);
    a folder -> FOLDER/<input>_<task> (FOLDER/<task> for tasks without an input image)."""
    if is_folder_target(text):
        name = f"{_input_stem(args.image)}_{task.name}" if task.needs_image else task.name
        return Path(text) / name
    path = Path(text)
    return path.with_suffix("") if path.suffix.lower() == ".png" else path


def json_path(args, task: Task) -> Path:
    """``--json FILE``, or FOLDER/<input>_<task>.json for a folder."""
    if is_folder_target(args.json):
        stem = output_stem(args.json, args, task)
        return stem.with_name(stem.name + ".json")
    return Path(args.json)


def read_inputs(args, task: Task) -> list:
    """The slices to run on: one per selected slice, or one list of key slices for a series report; a whole
    slide gives the one image its selection reads."""
    window, sel = args.window, args.slices
    frames = None if sel in ("middle", "all") else sel
    slide = slide_selection(task, args.region, args.level)
    if getattr(args, "series_report", False):  # over the whole volume unless --slices narrows it
        inputs = [read_key_slices(args.image, args.key_slices, window, args.series_uid, frames=frames, slide=slide)]
    else:
        inputs = read_slices(args.image, frames=frames, window=window, series_uid=args.series_uid,
                             middle_only=sel == "middle", slide=slide)
    _check_slide_options(args, inputs)
    return inputs


def _check_slide_options(args, inputs: list) -> None:
    """--region and --level select part of a whole slide; on any other image they would be silently ignored."""
    if args.region is None and args.level is None:
        return
    first = inputs[0][0] if isinstance(inputs[0], list) else inputs[0]
    if "slide_region" not in first.geometry:
        raise ValueError(f"{first.source}: --region and --level apply to whole-slide images (DICOM VL WSI) only")


def _planned_outputs(args, task: Task) -> list[Path]:
    """Every file this run may write: the image outputs (PNG, DICOM, NIfTI, explanation) and the JSON."""
    planned = [json_path(args, task)] if args.json else []
    if task.returns == "image":
        stem = output_stem(args.out, args, task)
        planned += [stem, *(stem.parent / f"{stem.name}{suffix}" for suffix in (".png", ".dcm", ".nii.gz", ".txt"))]
    return planned


def check_task_command(args) -> None:
    """What can be checked before a model loads: outputs never overwrite or mix with the input."""
    task = TASKS.get(args.task, warn=False)
    if task.needs_image:
        check_output_location(_planned_outputs(args, task), [args.image])


def _write_image(result: TaskResult, src, out: Path, series_uid: str, instance: int, provenance,
                 nifti: bool) -> list[str]:
    image = result.image
    paths = write_image_outputs(image, src, out, result.task, image.info.get("Description", ""), series_uid, instance,
                                provenance=provenance, nifti=nifti)
    if result.text is not None:  # an explanation beside the image
        paths.append(write_text_atomic(out.parent / f"{out.name}.txt", result.text + "\n"))
    return [str(p) for p in paths]


def _where(src) -> dict:
    if isinstance(src, list):  # the key slices of a series report
        return {"source": src[0].source, "slices": [s.frame for s in src]}
    return {"source": getattr(src, "source", None), "slice": getattr(src, "frame", None), **slide_region_record(src)}


def _report(task: Task, src, result: TaskResult, several: bool, paths: list[str]) -> dict:
    prefix = f"[slice {src.frame}] " if several and src is not None else ""
    if task.returns == "text":
        print(prefix + result.text)
    for path in paths:
        print(f"wrote {path}")
    if task.returns == "image" and result.text:
        print(f"explanation: {result.text}")
    return {**_where(src), "text": result.text, "outputs": paths}


def _write_volume(run: dict, stem: Path, provenance) -> None:
    """The outputs of several slices of a NIfTI volume as one NIfTI volume in its space (one NIfTI per slice
    when they cannot form one: uneven slices or sizes)."""
    images, sources = zip(*run["volume"])
    path = write_nifti_volume(images, sources, stem / f"{stem.name}.nii.gz", provenance)
    paths = [path] if path else [write_nifti_slice(image, src, stem / f"slice_{src.frame:04d}.nii.gz", provenance)
                                 for image, src in run["volume"]]
    run["doc"]["volume"] = [str(p) for p in paths]
    for p in paths:
        print(f"wrote {p}")


def _run_all(args, model, task: Task, params: dict, sources: list, run: dict) -> None:
    several = len(sources) > 1
    stem = output_stem(args.out, args, task) if task.returns == "image" else None
    series_uid = generate_uid()
    for i, src in enumerate(sources):
        result = task.run(model, src, task.item_params(params, i), RunOptions(progress=not args.no_progress))
        paths = []
        if task.returns == "image":
            out = stem / f"slice_{src.frame:04d}" if several else stem
            paths = _write_image(result, src, out, series_uid, i + 1, model.provenance, nifti=not several)
            if several and "affine" in src.geometry:
                run["volume"].append((result.image, src))
        run["doc"]["results"].append(_report(task, src, result, several, paths))
    if run["volume"]:
        _write_volume(run, stem, model.provenance)


def _write_json(args, task: Task, doc: dict, status: str) -> None:
    if args.json:
        path = json_path(args, task)
        write_text_atomic(path, json.dumps({**doc, "status": status}, indent=2))
        if status != "complete":  # stdout keeps only the results
            print(f"the results finished before the interrupt are in {path}", file=sys.stderr)


def run_task_command(args, model) -> int:
    """Run the task named by the subcommand on every selected slice (once for text-only tasks, once on the
    key slices for a series report). A demonstration model's notice goes into the JSON and the image labels;
    an interrupt keeps the finished outputs and records them in the JSON as "interrupted"."""
    task = TASKS.get(args.task, warn=False)
    check_task_command(args)
    if canonical_name(args.command) in {canonical_name(a) for a in task.aliases}:
        print(f"warning: '{args.command}' is deprecated; use 'unimedvl {task.name}'", file=sys.stderr)
    notice = model.provenance.notice  # said on stderr by the command line once, recorded in the JSON here
    params = task.resolve({p.name: getattr(args, p.name) for p in task.params}, ModelLimits.of(model.config))
    sources = read_inputs(args, task) if task.needs_image else [None]
    doc = {"model": model.name, "weights": model.provenance.to_dict(), "notice": notice, "task": task.name,
           "parameters": params, "results": []}
    run = {"doc": doc, "volume": []}
    try:
        _run_all(args, model, task, params, sources, run)
    except KeyboardInterrupt:
        _write_json(args, task, doc, "interrupted")
        raise
    _write_json(args, task, doc, "complete")
    return 0
