"""UniMedVL as a MONAI Deploy application: DICOM in; DICOM SR, derived DICOM images and a JSON summary out.

    python monai_deploy_app/app.py -i DICOM_DIR -o OUT_DIR [-m MODEL_DIR]

Inputs, outputs and the model folder follow the SDK's conventions (-i/-o/-m or HOLOSCAN_INPUT_PATH,
HOLOSCAN_OUTPUT_PATH, HOLOSCAN_MODEL_PATH). The model folder holds the released checkpoint (or any
checkpoint in the released layout); without one the embedded default model is used. The tasks come from
the file named by UNIMEDVL_TASKS (default: tasks.yaml next to this file).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator

from unimedvl_core.surfaces.deploy.config import load_deploy_config
from unimedvl_core.surfaces.deploy.operators import (
    SliceSelectionOperator,
    UniMedVLTaskOperator,
    UniMedVLWriterOperator,
    ValidateDICOMInputOperator,
)

TASKS_ENV = "UNIMEDVL_TASKS"
DEFAULT_TASKS = Path(__file__).with_name("tasks.yaml")


class UniMedVLApp(Application):
    """Reads a study, answers the configured questions, drafts the report and produces the configured
    derived images, all as standard DICOM labelled as AI-generated."""

    name = "unimedvl"
    description = "UniMedVL: medical visual question answering, reports and image generation"
    version = "0.1.0"

    def compose(self):
        context = Application.init_app_context(self.argv)
        config = load_deploy_config(os.environ.get(TASKS_ENV) or DEFAULT_TASKS)
        output = Path(context.output_path)
        staging = Path(tempfile.mkdtemp(prefix="unimedvl-input-"))
        atexit.register(shutil.rmtree, staging, True)  # links to the usable input files only
        mode, start, stop = config.slice_mode
        validate = ValidateDICOMInputOperator(self, CountCondition(self, 1), input_folder=context.input_path,
                                              staging_folder=staging, name="validate_input")
        # The loader's input port is optional; without a count it would tick again and again.
        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=staging, name="dicom_loader")
        selector = DICOMSeriesSelectorOperator(self, rules=json.dumps(config.series_selection), all_matched=True,
                                               name="series_selector")
        slicer = SliceSelectionOperator(self, mode=mode, start=start, stop=stop, window=config.window,
                                        name="slice_selector")
        tasks = UniMedVLTaskOperator(self, config=config, model_path=context.model_path or None, name="unimedvl_tasks")
        writer = UniMedVLWriterOperator(self, output_folder=output, model_name_getter=lambda: tasks.load_model().name,
                                        name="dicom_writer")
        self.add_flow(validate, loader, {("input_folder", "input_folder")})
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, slicer, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(slicer, tasks, {("series_slices", "series_slices")})
        self.add_flow(tasks, writer, {("results", "results")})
        self.add_flow(validate, writer, {("input_report", "input_report")})


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    UniMedVLApp().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
