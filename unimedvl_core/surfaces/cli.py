"""The ``unimedvl`` command line.

    unimedvl vqa --image chest.dcm --question "Is there a pleural effusion?" [--ckpt DIR]
    unimedvl report --image chest.dcm
    unimedvl text_to_image --prompt "Axial CT of the chest with two nodules" --out ct.png
    unimedvl edit --image t2.nii.gz --instruction "..." --out flair.png
    unimedvl super_resolution | virtual_staining | contrast_translation | counterfactual ...
    unimedvl tasks [--json]     (every task, its parameters, defaults and limits)
    unimedvl demo

The task subcommands are generated from the task registry (``unimedvl_core.tasks``).

Without ``--ckpt`` the embedded default model is used. Image outputs are PNG files labelled as synthetic,
plus DICOM Secondary Capture objects in the source study when the input was DICOM.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .. import __version__
from ..inference.embedded import DEFAULT_MODEL_DIR, load_model
from ..modeling.config import UniMedVLConfig
from ..tasks.catalog import TASKS
from ..tasks.registry import ModelLimits
from .cli_batch import add_batch_command, run_batch_command
from .cli_tasks import HelpFormatter, add_model_args, add_task_commands, check_task_command, run_task_command

__all__ = ["main", "build_parser"]

log = logging.getLogger("unimedvl")


def _add_tool_commands(sub) -> None:
    from ..training.launch import build_parser as train_parser

    train_parser(sub.add_parser("train", help="train a curriculum stage (see configs/train/)"))
    p = sub.add_parser("phantoms", help="write procedural phantom studies in the released training formats",
                       formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--n", type=int, default=1000, help="number of phantom studies")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p = sub.add_parser("phantom-eval", help="score a model on freshly generated phantoms",
                       formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--n", type=int, default=200, help="phantom studies for VQA")
    p.add_argument("--t2i", type=int, default=120, help="text-to-image samples")
    p.add_argument("--sr", type=int, default=60, help="super-resolution samples")
    p.add_argument("--steps", type=int, default=25,
                   help="sampling steps; 25 is the protocol of the embedded model's recorded scores")
    p.add_argument("--eval-seed", type=int, default=20261123, help="seed of the fresh phantoms")
    p.add_argument("--out", default=None, metavar="FILE|DIR/",
                   help="write the scores as JSON (a folder: DIR/phantom_eval.json)")


def _add_evaluate_command(sub) -> None:
    p = sub.add_parser("evaluate", help="score a model on benchmark or released-format data",
                       formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--vqa", action="append", default=[], metavar="FORMAT=PATH",
                   help="VQA data: vqa_rad, slake, pathvqa, omnimedvqa, gmai_mmbench or sft_jsonl (repeatable)")
    p.add_argument("--reports", default=None, help="report SFT JSONL (BLEU / ROUGE-L)")
    p.add_argument("--editing", action="append", default=[], help="editing JSONL (PSNR / SSIM; repeatable)")
    p.add_argument("--t2i", default=None, help="text-to-image JSONL with reference images (FID)")
    p.add_argument("--fid-extractor", default="unimedvl-vit", help="unimedvl-vit or hf:<path to a vision model>")
    p.add_argument("--data-dir", default=None, help="folder that relative data paths are in")
    p.add_argument("--limit", type=int, default=None, help="at most this many items per evaluation")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the task registry's)")
    p.add_argument("--out", type=Path, default=Path("outputs/eval"), help="output folder")


def _add_service_commands(sub) -> None:
    p = sub.add_parser("info", help="describe the model", formatter_class=HelpFormatter)
    add_model_args(p)
    p = sub.add_parser("tasks", help="list the tasks, their parameters, defaults and limits",
                       formatter_class=HelpFormatter)
    p.add_argument("--ckpt", type=Path, help="checkpoint whose limits to show (default: embedded model)")
    p.add_argument("--json", action="store_true", help="print the registry as JSON (as GET /v1/tasks serves it)")
    p = sub.add_parser("serve", help="run the HTTP inference server (FastAPI)", formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=int, default=8765, help="port")
    p.add_argument("--token", default=None, help="bearer token (None: UNIMEDVL_TOKEN); required beyond loopback")
    p.add_argument("--seed", type=int, default=None, help="seed of requests that give none (None: the registry's)")
    p.add_argument("--model-id", default=None, help="the id GET /v1/models lists (None: the weights' name)")
    p.add_argument("--allow-local-images", type=Path, default=None, metavar="DIR",
                   help="let chat image_url parts name files under DIR (None: data URLs only)")
    p = sub.add_parser("demo", help="run every kind of task on the embedded default model and write the results",
                       formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the task registry's)")


def _examples() -> str:
    """The first example of every task (from the registry), then the service commands."""
    lines = [task.examples[0] for task in TASKS if task.examples]
    lines += ["unimedvl info                  (the model, its weights and limits)",
              "unimedvl tasks [--json]        (every task, its parameters, defaults and limits)",
              "unimedvl demo --out outputs/demo",
              "unimedvl COMMAND --help        (every option with its default, limits and examples)"]
    return "examples:\n  " + "\n  ".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unimedvl", description="UniMedVL: read and make medical images.",
                                     formatter_class=HelpFormatter, epilog=_examples())
    parser.add_argument("--version", action="version", version=f"unimedvl-core {__version__}")
    parser.add_argument("--debug", action="store_true", help="log details and show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_task_commands(sub, ModelLimits.of(UniMedVLConfig.from_dir(DEFAULT_MODEL_DIR)))
    _add_service_commands(sub)
    _add_evaluate_command(sub)
    add_batch_command(sub)
    _add_tool_commands(sub)
    return parser


def _load(args):
    model = load_model(args.ckpt, device=args.device, dtype=args.dtype, progress=not args.no_progress,
                       quantization=args.quantization, residency=args.residency, **_checkpoint_options(args))
    model.progress = not args.no_progress
    return model


def _noted(model):
    """The model, after its notice (the demonstration model's) is printed once on stderr."""
    if model.provenance.notice:
        print(f"note: {model.provenance.notice}", file=sys.stderr)
    return model


def _checkpoint_options(args) -> dict:
    """The options that apply to a checkpoint given with --ckpt (the embedded model takes none)."""
    if not args.ckpt:
        return {}
    return {"weights": args.weights, "device_map": args.device_map, "revision": args.revision}


def _tasks(args) -> int:
    from ..io.hub import resolve_config

    # a Hub id fetches its configuration files only: the limits need no weights
    folder = resolve_config(args.ckpt, getattr(args, "revision", None)) if args.ckpt else DEFAULT_MODEL_DIR
    limits = ModelLimits.of(UniMedVLConfig.from_dir(folder))
    doc = TASKS.describe(limits)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"limits: {json.dumps(doc['limits'])}")
    for task in doc["tasks"]:
        aliases = f" (also {', '.join(task['aliases'])})" if task["aliases"] else ""
        print(f"\n{task['name']}{aliases}: {task['summary']} [{task['takes']} -> {task['returns']}]")
        for p in task["params"]:
            shown = "required" if p["required"] else f"default {p['default']}"
            bounds = TASKS.get(task["name"]).param(p["name"]).bounds
            print(f"  {p['name']:24s} {p['type']:8s} {shown:22s} {p['help']}" + (f" [{bounds}]" if bounds else ""))
    return 0


def _demo(args, model) -> int:
    from .demo import run_demo

    run_demo(model, args.out, seed=args.seed, steps=args.steps, progress=not args.no_progress, ckpt=args.ckpt)
    return 0


def _phantoms(args) -> int:
    from ..data.phantoms import write_dataset

    counts = write_dataset(args.out, args.n, seed=args.seed, size=args.size)
    for name, count in counts.items():
        print(f"{name}: {count}")
    print(f"wrote {args.out}")
    return 0


def _phantom_eval(args, model) -> int:
    from ..data.phantom_eval import evaluate_phantoms
    from ..io.atomic import write_text_atomic
    from .cli_tasks import is_folder_target

    scores = evaluate_phantoms(model, n=args.n, t2i=args.t2i, sr=args.sr, steps=args.steps, seed=args.eval_seed,
                               progress=not args.no_progress)
    text = json.dumps(scores, indent=2)
    print(text)
    if args.out:
        write_text_atomic(Path(args.out) / "phantom_eval.json" if is_folder_target(args.out) else args.out,
                          text + "\n")
    return 0


def _evaluate(args) -> int:
    from ..batch.model_spec import ModelOnDemand
    from .bundle import EvaluationRunner
    from .cli_batch import load_options_of

    vqa = []
    for spec in args.vqa:
        if "=" not in spec:
            raise ValueError(f"--vqa takes FORMAT=PATH, got {spec!r}")
        fmt, path = spec.split("=", 1)
        vqa.append({"format": fmt, "path": path, "name": fmt})
    model = ModelOnDemand(args.ckpt, load_options_of(args), lambda: _load(args))  # docs/batch.md#evaluation
    results = EvaluationRunner(model, str(args.out), vqa=vqa, reports=args.reports, editing=args.editing,
                               text_to_image=args.t2i, fid_extractor=args.fid_extractor, data_dir=args.data_dir,
                               limit=args.limit, num_inference_steps=args.steps, progress=not args.no_progress).run()
    if model.notice:  # known once the model was loaded here or by the Ray actors
        print(f"note: {model.notice}", file=sys.stderr)
    print((args.out / "results.md").read_text())
    print(f"wrote {', '.join(results['files'].values())}")
    return 0


def _serve(args) -> int:
    from .server.app import Settings, serve

    settings = Settings(seed=args.seed, model_id=args.model_id, local_image_root=args.allow_local_images)
    serve(lambda: _load(args), args.host, args.port, args.token or os.environ.get("UNIMEDVL_TOKEN"), settings)
    return 0


def _limits(model) -> dict:
    """What a run may ask of this model: its image sizes and the registry's and readers' bounds."""
    from ..io.medical_io import MAX_DECLARED_BYTES
    from ..modeling.preprocessing import MAX_INPUT_PIXELS
    from ..tasks.catalog import MAX_KEY_SLICES, MAX_NEW_TOKENS, MAX_STEPS, MAX_TEXT_CHARS

    return {**ModelLimits.of(model.config).describe(), "max_input_pixels": MAX_INPUT_PIXELS,
            "max_declared_pixel_bytes": MAX_DECLARED_BYTES, "max_steps": MAX_STEPS, "max_new_tokens": MAX_NEW_TOKENS,
            "max_text_chars": MAX_TEXT_CHARS, "max_key_slices": MAX_KEY_SLICES}


def _info(args, model) -> int:
    limits = _limits(model)
    print(model)
    print(f"weights: {model.provenance.short}")
    print(f"limits: generated images {limits['size_multiple']} to {limits['max_image_side']} px a side in multiples "
          f"of {limits['size_multiple']} (default {'x'.join(map(str, limits['default_size']))}); inputs up to "
          f"{limits['max_input_pixels']:,} pixels a frame and {limits['max_declared_pixel_bytes'] / 2**30:g} GiB "
          f"of pixel data; at most {limits['max_steps']} sampling steps, {limits['max_new_tokens']} new tokens, "
          f"{limits['max_text_chars']} characters of text, {limits['max_key_slices']} key slices a series report")
    if model.provenance.notice:
        print(f"note: {model.provenance.notice}")
    print(json.dumps({"weights": model.provenance.to_dict(), "limits": limits,
                      "config": model.config.to_dict()}, indent=2))
    return 0


def _without_model(args) -> int | None:
    """Commands that load no model (or load their own)."""
    if args.command == "train":
        from ..training.launch import run

        return run(args)
    handlers = {"phantoms": _phantoms, "serve": _serve, "tasks": _tasks, "batch": run_batch_command,
                "evaluate": _evaluate}
    return handlers[args.command](args) if args.command in handlers else None


EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 bad input or arguments (one line on stderr naming the problem), 1 an internal
    error (one line; the traceback only with ``--debug``), 130 interrupted; ``batch``: 3 some rows failed."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        status = _without_model(args)
        if status is not None:
            return status
        if getattr(args, "task", None):
            check_task_command(args)
        model = _load(args)
        if args.command != "info":  # info prints the notice itself
            _noted(model)
        handlers = {"info": _info, "demo": _demo, "phantom-eval": _phantom_eval}
        return handlers.get(args.command, run_task_command)(args, model)
    except BrokenPipeError:  # the reader went away (``unimedvl tasks | head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        return EXIT_OK
    except (ValueError, OSError) as err:  # ImageReadError, CheckpointError, TaskParameterError, missing files
        return _fail(args, EXIT_BAD_INPUT, f"error: {err}")
    except KeyboardInterrupt:  # files are written whole or not at all (io/atomic.py): nothing partial remains
        return _fail(args, EXIT_INTERRUPTED, "interrupted")
    except Exception as err:  # reported in one line; --debug shows where
        return _fail(args, EXIT_INTERNAL, f"internal error: {type(err).__name__}: {err}")


def _fail(args, status: int, message: str) -> int:
    print(message.splitlines()[0] if message else message, file=sys.stderr)
    if args.debug and sys.exc_info()[0] is not None:
        import traceback

        traceback.print_exc()
    return status


if __name__ == "__main__":
    sys.exit(main())
