"""UniMedVL as a MONAI Deploy application: DICOM in; DICOM SR, derived DICOM images and a JSON summary out.

    python monai_deploy_app/app.py -i DICOM_DIR -o OUT_DIR [-m MODEL_DIR] [--debug]

Inputs, outputs and the model folder follow the SDK's conventions (-i/-o/-m or HOLOSCAN_INPUT_PATH,
HOLOSCAN_OUTPUT_PATH, HOLOSCAN_MODEL_PATH). The model folder holds a checkpoint in the released layout, itself
or in its one sub-folder; the embedded phantom-only demonstration model runs only when asked for
(UNIMEDVL_ALLOW_DEMO_MODEL=1 or ``allow_demo_model: true``). The tasks come from the file named by
UNIMEDVL_TASKS (default: tasks.yaml next to this file).

Exit status: 0 outputs written (summary.json: complete or partial), 2 rejected (nothing written; one line on
stderr), 1 internal error (see README.md; unimedvl_core.surfaces.deploy.runner).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

# Holoscan warns about the stack size on import; the application's stderr is kept for its own one-line messages.
warnings.filterwarnings("ignore", message="Current stack size")
import unimedvl_core  # noqa: E402,F401  first: it quiets libraries' import-time log lines (see its __init__)

# isort: split

from monai.deploy.conditions import CountCondition  # noqa: E402
from monai.deploy.core import Application  # noqa: E402
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator  # noqa: E402
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator  # noqa: E402

from unimedvl_core.surfaces.deploy.operators import (  # noqa: E402
    RunOutcome,
    SliceSelectionOperator,
    UniMedVLTaskOperator,
    UniMedVLWriterOperator,
    ValidateDICOMInputOperator,
)
from unimedvl_core.surfaces.deploy.runner import (  # noqa: E402
    EXIT_ERROR,
    Preflight,
    Rejected,
    conclude,
    debug_wanted,
    load_chosen_model,
    parse_args,
    preflight,
    report_failure,
)

TASKS_ENV = "UNIMEDVL_TASKS"
DEFAULT_TASKS = Path(__file__).with_name("tasks.yaml")


class UniMedVLApp(Application):
    """Reads a study, answers the configured questions, drafts the report and produces the configured
    derived images, all as standard DICOM labelled as AI-generated."""

    name = "unimedvl"
    description = "UniMedVL: medical visual question answering, reports and image generation"
    version = "0.1.0"

    def prepare(self, pre: Preflight, model, outcome: RunOutcome) -> UniMedVLApp:
        self.pre, self.model, self.outcome = pre, model, outcome
        return self

    def compose(self):
        pre, outcome, config = self.pre, self.outcome, self.pre.config
        staging = Path(tempfile.mkdtemp(prefix="unimedvl-input-"))
        atexit.register(shutil.rmtree, staging, True)  # links to (or corrected copies of) the usable files
        mode, start, stop = config.slice_mode
        validate = ValidateDICOMInputOperator(self, CountCondition(self, 1), input_folder=pre.input_folder,
                                              staging_folder=staging, scan=pre.scan, outcome=outcome,
                                              name="validate_input")
        # The loader's input port is optional; without a count it would tick again and again.
        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=staging, name="dicom_loader")
        selector = DICOMSeriesSelectorOperator(self, rules=json.dumps(config.series_selection), all_matched=True,
                                               name="series_selector")
        slicer = SliceSelectionOperator(self, mode=mode, start=start, stop=stop, window=config.window,
                                        slide_region=config.slide_region, slide_level=config.slide_level,
                                        slide_files=pre.scan.slide_files, outcome=outcome, name="slice_selector")
        tasks = UniMedVLTaskOperator(self, config=config, model=self.model, outcome=outcome, name="unimedvl_tasks")
        writer = UniMedVLWriterOperator(self, output_folder=pre.output_folder, model_getter=lambda: self.model,
                                        outcome=outcome, name="dicom_writer")
        self.add_flow(validate, loader, {("input_folder", "input_folder")})
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, slicer, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(slicer, tasks, {("series_slices", "series_slices")})
        self.add_flow(tasks, writer, {("results", "results")})
        self.add_flow(validate, writer, {("input_report", "input_report")})


def _setup_logging(level: str | None) -> None:
    # the log goes to stdout: stderr carries only the one-line verdict of a rejected or failed run
    logging.basicConfig(level=getattr(logging, level or "INFO", logging.INFO), stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.captureWarnings(True)  # library warnings (pydicom's about odd files) join the log


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "WARN")  # Holoscan's own info lines are not the application's
    args = parse_args(argv)
    debug = debug_wanted(args)
    _setup_logging(args.log_level)
    try:
        pre = preflight(args, os.environ.get(TASKS_ENV) or DEFAULT_TASKS)
        model = load_chosen_model(pre)
        outcome = RunOutcome()
        UniMedVLApp([sys.executable, str(Path(__file__).resolve())]).prepare(pre, model, outcome).run()
    except Rejected as err:
        return report_failure("rejected", str(err), {"input": {"folder": args.input, **err.findings}})
    except Exception as err:  # noqa: BLE001 - the one place an unexpected error becomes exit status 1
        message = f"{type(err).__name__}: {err}"
        return report_failure("error", message, trace=traceback.format_exc(), debug=debug) or EXIT_ERROR
    return conclude(outcome, debug)


if __name__ == "__main__":
    sys.exit(main())
