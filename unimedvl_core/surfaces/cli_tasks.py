"""The task subcommands of ``unimedvl``, generated from the task registry: one subcommand per task, one
option per task parameter (its default shown in ``--help``), and one runner for all of them.

    unimedvl vqa --image chest.dcm --question "Is there a pleural effusion?"
    unimedvl super_resolution --image lowres.png --scale 4 --out sr.png     (super-resolution works too)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydicom.uid import generate_uid

from ..io.medical_io import MedicalImage, read_slices
from ..io.outputs import write_image_outputs
from ..io.paths import check_output_location
from ..tasks.catalog import TASKS
from ..tasks.params import Param, TaskParameterError
from ..tasks.registry import ModelLimits, RunOptions, Task, TaskResult, canonical_name

__all__ = ["add_task_commands", "check_task_command", "run_task_command", "add_model_args", "HelpFormatter"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option's help, examples kept as written."""


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


def _add_image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="PNG/JPEG/TIFF, DICOM file or series folder, NIfTI")
    p.add_argument("--slices", default=None, help="slice/frame of a volume: N, A:B or all (default: middle)")
    p.add_argument("--window", default=None, help="CENTRE,WIDTH or a preset (soft_tissue, lung, bone, brain...)")
    p.add_argument("--series-uid", default=None, help="series to read when a folder holds several")


def _option_type(param: Param):
    def parse(text: str):
        try:
            return param.parse(text)
        except TaskParameterError as err:
            raise argparse.ArgumentTypeError(str(err).split(": ", 1)[-1]) from None

    parse.__name__ = param.type  # argparse names the type in its messages
    return parse


def _add_param(p: argparse.ArgumentParser, param: Param) -> None:
    flags = [f"--{param.name.replace('_', '-')}", *param.flags]
    kwargs = dict(dest=param.name, help=param.help or " ", default=param.default)
    if param.type == "bool":
        p.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        return
    metavar = {"interval": "START,END", "int": "N", "float": "X", "str": "TEXT"}[param.type]
    if param.choices:
        metavar = "{" + ",".join(str(c) for c in param.choices) + "}"
    p.add_argument(*flags, type=_option_type(param), required=param.required, metavar=metavar, **kwargs)


def _add_task_command(sub, task: Task) -> None:
    aliases = [task.name.replace("_", "-")] if "_" in task.name else []
    aliases += [a for a in task.aliases if a not in aliases]
    examples = "examples:\n  " + "\n  ".join(task.examples) if task.examples else None
    p = sub.add_parser(task.name, aliases=aliases, help=task.summary, description=task.summary, epilog=examples,
                       formatter_class=HelpFormatter)
    add_model_args(p)
    if task.needs_image:
        _add_image_args(p)
    for param in task.params:
        _add_param(p, param)
    if task.returns == "image":
        p.add_argument("--out", type=Path, default=Path(f"{task.name}.png"),
                       help="output PNG path (a folder when several slices are processed)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.set_defaults(task=task.name)


def add_task_commands(sub) -> None:
    """One subcommand per registered task (read at call time, so a newly registered task appears)."""
    for task in TASKS:
        _add_task_command(sub, task)


def _window(text: str | None):
    if text is None or "," not in text:
        return text
    centre, width = text.split(",", 1)
    return float(centre), float(width)


def _slices(text: str | None) -> list[int] | None | str:
    """None (middle slice), "all", or a list of indices from "N" or "A:B" (B exclusive)."""
    if text is None or text == "all":
        return text
    if ":" in text:
        a, b = text.split(":", 1)
        return list(range(int(a), int(b)))
    return [int(text)]


def read_inputs(args) -> list[MedicalImage]:
    sel = _slices(args.slices)
    frames = None if sel in (None, "all") else sel
    return read_slices(args.image, frames=frames, window=_window(args.window), series_uid=args.series_uid,
                       middle_only=sel is None)


def _stem(path: Path) -> Path:
    """``--out result.png`` names the outputs result.png, result.dcm, ..."""
    return path.with_suffix("") if path.suffix.lower() == ".png" else path


def _write_image(result: TaskResult, src, out: Path, series_uid: str, instance: int) -> list[str]:
    image = result.image
    paths = write_image_outputs(image, src, out, result.task, image.info.get("Description", ""), series_uid, instance)
    if result.text is not None:  # an explanation beside the image
        (out.parent / f"{out.name}.txt").write_text(result.text + "\n")
    return [str(p) for p in paths]


def _report(task: Task, src, result: TaskResult, several: bool, paths: list[str]) -> dict:
    prefix = f"[slice {src.frame}] " if several and src is not None else ""
    if task.returns == "text":
        print(prefix + result.text)
    for path in paths:
        print(f"wrote {path}")
    if task.returns == "image" and result.text:
        print(f"explanation: {result.text}")
    return {"source": getattr(src, "source", None), "slice": getattr(src, "frame", None), "text": result.text,
            "outputs": paths}


def _planned_outputs(args, task: Task) -> list[Path]:
    """Every file this run may write: the image outputs (PNG, DICOM, NIfTI, explanation) and the JSON."""
    planned = [args.json] if args.json else []
    if task.returns == "image":
        stem = _stem(args.out)
        planned += [args.out, *(stem.parent / f"{stem.name}{suffix}" for suffix in (".png", ".dcm", ".nii.gz", ".txt"))]
    return planned


def check_task_command(args) -> None:
    """What can be checked before a model loads: outputs never overwrite or mix with the input."""
    task = TASKS.get(args.task, warn=False)
    if task.needs_image:
        check_output_location(_planned_outputs(args, task), [args.image])


def run_task_command(args, model) -> int:
    """Run the task named by the subcommand on every selected slice (or once, for text-only tasks)."""
    task = TASKS.get(args.task, warn=False)
    check_task_command(args)
    if canonical_name(args.command) in {canonical_name(a) for a in task.aliases}:
        print(f"warning: '{args.command}' is deprecated; use 'unimedvl {task.name}'", file=sys.stderr)
    params = task.resolve({p.name: getattr(args, p.name) for p in task.params}, ModelLimits.of(model.config))
    sources = read_inputs(args) if task.needs_image else [None]
    series_uid, several, records = generate_uid(), len(sources) > 1, []
    for i, src in enumerate(sources):
        result = task.run(model, src, task.item_params(params, i),
                          RunOptions(progress=not args.no_progress))
        paths = []
        if task.returns == "image":
            out = args.out / f"slice_{src.frame:04d}" if several else _stem(args.out)
            paths = _write_image(result, src, out, series_uid, i + 1)
        records.append(_report(task, src, result, several, paths))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": model.name, "weights": model.provenance.to_dict(), "task": task.name,
                                         "parameters": params, "results": records}, indent=2))
    return 0
