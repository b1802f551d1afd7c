"""Start and end of a MONAI Deploy application run: everything that can be checked is checked before the
Holoscan graph starts, and the run ends with one documented exit status.

Exit status:
    0  outputs written; ``summary.json`` says ``complete`` or ``partial`` (each failed task with its reason);
    2  rejected: the input, the output folder, the task file or the model folder cannot be used, or no
       series could be read; nothing is written to the output folder;
    1  an internal error.

A rejection or an error prints one line on stderr (``unimedvl: rejected: ...`` / ``unimedvl: error: ...``);
a traceback only with ``--debug`` or ``UNIMEDVL_DEBUG=1``. The summary (the same JSON as ``summary.json``,
with ``status`` ``rejected`` or ``error`` when nothing was written) is also written to the file named by
``UNIMEDVL_SUMMARY`` when that is set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ... import __version__
from ...io.hub import is_hub_id, split_revision
from .config import DeployConfig, load_deploy_config
from .inputs import InputError, InputScan, check_folders, scan_dicom_folder
from .model import ModelChoice, ModelFolderError, choose_model

__all__ = ["EXIT_OK", "EXIT_ERROR", "EXIT_REJECTED", "SUMMARY_ENV", "DEBUG_ENV", "Rejected", "Preflight",
           "parse_args", "preflight", "load_chosen_model", "conclude", "report_failure", "debug_wanted"]

EXIT_OK, EXIT_ERROR, EXIT_REJECTED = 0, 1, 2
SUMMARY_ENV = "UNIMEDVL_SUMMARY"
DEBUG_ENV = "UNIMEDVL_DEBUG"

log = logging.getLogger(__name__)


class Rejected(Exception):
    """The run cannot start or produced nothing: the message is the one line printed."""

    def __init__(self, message: str, findings: dict | None = None):
        super().__init__(message)
        self.findings = findings or {}


@dataclass
class Preflight:
    config: DeployConfig
    input_folder: Path
    output_folder: Path
    model: ModelChoice
    scan: InputScan


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The SDK's options (-i, -o, -m, -l, -w, -t; environment defaults as in the SDK) and ``--debug``, parsed
    without the SDK's side effects (it creates the output folder before anything is checked)."""
    parser = argparse.ArgumentParser(prog="unimedvl-map", description="UniMedVL MONAI Deploy application")
    parser.add_argument("-i", "--input", default=os.environ.get("HOLOSCAN_INPUT_PATH", "input"))
    parser.add_argument("-o", "--output", default=os.environ.get("HOLOSCAN_OUTPUT_PATH", "output"))
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("-l", "--log-level", type=str.upper, default=None,
                        choices=["DEBUG", "INFO", "WARN", "ERROR", "CRITICAL"])
    parser.add_argument("-w", "--workdir", default=None)
    parser.add_argument("-t", "--triton-server-netloc", default=None)
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    args = parser.parse_args(argv)
    args.model_given = args.model is not None
    if args.model is None:
        args.model = os.environ.get("HOLOSCAN_MODEL_PATH") or "models"
    return args


def debug_wanted(args: argparse.Namespace | None = None) -> bool:
    return bool(args is not None and args.debug) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def preflight(args: argparse.Namespace, tasks_file: str | Path) -> Preflight:
    """The task file, the folders, the model folder and the input files, checked; ``Rejected`` otherwise."""
    try:
        config = load_deploy_config(tasks_file)
    except (OSError, ValueError) as err:
        raise Rejected(f"task file {tasks_file}: {err}") from None
    input_folder, output_folder = Path(args.input), Path(args.output)
    try:
        check_folders(input_folder, output_folder)
        scan = scan_dicom_folder(input_folder, include_synthetic=config.include_synthetic_inputs)
        if args.model_given and not Path(args.model).exists() and not is_hub_id(split_revision(args.model)[0]):
            raise ModelFolderError(f"model folder {args.model} does not exist")
        model = choose_model(args.model, config.allow_demo_model)
    except (InputError, ModelFolderError) as err:
        raise Rejected(str(err), getattr(err, "findings", None)) from None
    if output_folder.exists() and not output_folder.is_dir():
        raise Rejected(f"output path {output_folder} is not a folder")
    return Preflight(config, input_folder, output_folder, model, scan)


def load_chosen_model(pre: Preflight):
    """The chosen weights loaded; a checkpoint that does not load is a rejection naming it."""
    from ...inference.embedded import load_model

    try:
        model = load_model(pre.model.checkpoint, device=pre.config.device, progress=False)
    except (OSError, ValueError, KeyError) as err:  # CheckpointError is a ValueError
        raise Rejected(f"model {pre.model.describe()} could not be loaded: {type(err).__name__}: {err}") from None
    model.progress = False
    if pre.model.demo:
        model.provenance.demo = True
    log.info("model: %s", model.provenance.short)
    return model


def _write_summary_file(summary: dict) -> None:
    target = os.environ.get(SUMMARY_ENV)
    if not target:
        return
    try:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    except OSError as err:
        print(f"unimedvl: could not write the summary to {target}: {err}", file=sys.stderr)


def report_failure(status: str, message: str, findings: dict | None = None, trace: str | None = None,
                   debug: bool = False) -> int:
    """One line on stderr (a traceback first with ``debug``), the summary to ``UNIMEDVL_SUMMARY``; the exit
    status."""
    code = EXIT_REJECTED if status == "rejected" else EXIT_ERROR
    summary = findings if findings and "status" in findings else {
        "application": "UniMedVL", "version": __version__, "status": status, "reason": message,
        "created": datetime.datetime.now().isoformat(timespec="seconds"), "series": [], **(findings or {})}
    summary = {**summary, "status": status, "reason": message, "exit_code": code}
    _write_summary_file(summary)
    if debug and trace:
        print(trace, file=sys.stderr, end="" if trace.endswith("\n") else "\n")
    print(f"unimedvl: {'rejected' if status == 'rejected' else 'error'}: {' '.join(message.split())}",
          file=sys.stderr)
    return code


def conclude(outcome, debug: bool = False) -> int:
    """The exit status of a finished graph run, from the operators' shared ``RunOutcome``."""
    if outcome.error is not None:
        return report_failure("error", outcome.error, outcome.summary, outcome.error_trace, debug)
    if outcome.rejected is not None or outcome.summary is None:
        return report_failure("rejected", outcome.rejected or "nothing was processed", outcome.summary)
    summary = {**outcome.summary, "exit_code": EXIT_OK}
    _write_summary_file(summary)
    return EXIT_OK
