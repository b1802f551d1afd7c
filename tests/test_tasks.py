"""The task registry: one declaration per task that every surface reads."""

from __future__ import annotations

import json
import warnings

import pytest
from monai.bundle import ConfigWorkflow
from PIL import Image

from unimedvl_core.inference.image_generation import EDITING_GUIDANCE, TEXT_TO_IMAGE_GUIDANCE
from unimedvl_core.inference.model import UniMedVL
from unimedvl_core.surfaces.cli import build_parser, main
from unimedvl_core.surfaces.deploy.config import load_deploy_config
from unimedvl_core.tasks.catalog import TASKS
from unimedvl_core.tasks.params import Param, TaskParameterError
from unimedvl_core.tasks.registry import ModelLimits, RunOptions, Task, TaskResult

from .conftest import PARITY, PARITY_CKPT
from .test_bundle import BUNDLE, CONFIGS


def _image_size(model, image, params: dict, options: RunOptions) -> TaskResult:
    width, height = image.size
    return TaskResult("image_size", text=f"{params['label']}: {width}x{height}")


TOY = Task("image_size", "report the input's size", "image", "text",
           (Param("label", "str", "size", "text before the size", max_length=20),), _image_size,
           aliases=("dimensions",))


@pytest.fixture
def toy_task():
    TASKS.register(TOY)
    try:
        yield TOY
    finally:
        TASKS.unregister(TOY.name)


def test_every_task_declares_typed_parameters_with_valid_defaults():
    limits = ModelLimits(1024, 16, (1024, 1024))
    for task in TASKS:
        params = {p.name: "x" for p in task.params if p.required}
        resolved = task.resolve(params, limits)
        assert set(resolved) == {p.name for p in task.params}
        assert all(resolved[p.name] == p.default for p in task.params if not p.required)


def test_defaults_are_the_released_settings_on_every_api():
    """The registry's defaults and the Python API's signature defaults are the same objects."""
    import inspect

    t2i, sr = TASKS.get("text_to_image"), TASKS.get("super_resolution")
    assert t2i.param("num_inference_steps").default == sr.param("num_inference_steps").default == 49
    signature = inspect.signature(UniMedVL.generate_image).parameters
    for name, value in TEXT_TO_IMAGE_GUIDANCE.__dict__.items():
        assert signature[name].default == value == t2i.param(name).default
    edit_signature = inspect.signature(UniMedVL.edit_image).parameters
    for name, value in EDITING_GUIDANCE.__dict__.items():
        assert edit_signature[name].default == value == sr.param(name).default
    assert TASKS.get("vqa").param("max_new_tokens").default == inspect.signature(UniMedVL.answer).parameters[
        "max_new_tokens"].default == 512


def test_parameters_are_parsed_and_checked_with_errors_naming_them():
    sr = TASKS.get("super-resolution")
    assert sr.name == "super_resolution"
    assert sr.resolve({"scale": "2", "cfg_interval": "0.1,0.9", "analyze_first": "yes"})["cfg_interval"] == (0.1, 0.9)
    for bad, message in (({"scale": 3}, "scale: expected one of 2, 4"),
                         ({"cfg_interval": "0.4"}, "cfg_interval: expected START,END"),
                         ({"num_inference_steps": 0}, "num_inference_steps: must be >= 1"),
                         ({"steps": 2}, "unknown parameter(s) steps"),
                         ({"cfg_renorm_type": "other"}, "cfg_renorm_type: expected one of")):
        with pytest.raises(TaskParameterError, match=message.replace("(", r"\(").replace(")", r"\)")):
            sr.resolve(bad)
    with pytest.raises(TaskParameterError, match="height must be a multiple of 16 between 16 and 128"):
        TASKS.get("text_to_image").resolve({"prompt": "x", "height": 256}, ModelLimits(128, 16, (64, 64)))
    with pytest.raises(TaskParameterError, match="question: required"):
        TASKS.get("vqa").resolve({})


def test_old_task_names_still_work_with_a_deprecation_warning():
    with pytest.warns(FutureWarning, match="'stain' is deprecated; use 'virtual_staining'"):
        assert TASKS.get("stain").name == "virtual_staining"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TASKS.get("contrast-translation").name == "contrast_translation"  # only the separator differs


def test_tasks_command_prints_the_registry(capsys):
    assert main(["tasks", "--json", "--ckpt", str(PARITY_CKPT)]) == 0
    from unimedvl_core.modeling.config import UniMedVLConfig

    expected = TASKS.describe(ModelLimits.of(UniMedVLConfig.from_dir(PARITY_CKPT)))
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(expected))


def test_cli_help_shows_defaults_and_examples(capsys):
    with pytest.raises(SystemExit):
        main(["super_resolution", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # help text is wrapped to the terminal's width
    assert "(default: 49)" in text and "(default: text_channel)" in text and "examples:" in text
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "--cfg-interval", "0.4"])
    assert "argument --cfg-interval" in capsys.readouterr().err


def test_a_new_task_appears_on_the_cli(toy_task, capsys):
    assert "image_size" in build_parser().format_help()
    assert main(["image_size", "--ckpt", str(PARITY_CKPT), "--image", str(PARITY / "image448.png"),
                 "--label", "px"]) == 0
    assert capsys.readouterr().out.strip() == "px: 448x448"
    assert main(["dimensions", "--ckpt", str(PARITY_CKPT), "--image", str(PARITY / "image448.png")]) == 0
    assert "deprecated" in capsys.readouterr().err


def test_a_new_task_appears_in_the_bundle(toy_task, tmp_path):
    data = tmp_path / "in"
    data.mkdir()
    Image.new("RGB", (40, 24)).save(data / "a.png")
    wf = ConfigWorkflow(config_file=str(CONFIGS / "inference.json"), workflow_type="infer", bundle_root=str(BUNDLE),
                        task="image_size", task_params={"label": "L"}, dataset_dir=str(data),
                        output_dir=str(tmp_path / "out"), ckpt_dir=str(PARITY_CKPT))
    wf.initialize()
    wf.run()
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert [r["text"] for r in results] == ["L: 40x24"]


def test_a_new_task_is_accepted_by_the_map_task_file(toy_task, tmp_path):
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("tasks:\n  - {task: image_size, label: mm}\n  - {task: vqa, questions: [a, b]}\n"
                     "max_new_tokens: 7\n")
    config = load_deploy_config(tasks)
    assert [(t.task, t.params) for t in config.tasks] == [("image_size", {"label": "mm"}),
                                                          ("vqa", {"max_new_tokens": 7})]
    assert [r["question"] for r in config.tasks[1].runs()] == ["a", "b"]
    tasks.write_text("tasks:\n  - {task: image_size, label: 7}\n")
    with pytest.raises(ValueError, match="task image_size: label: expected text"):
        load_deploy_config(tasks)


def test_a_new_task_runs_through_the_python_registry(toy_task, parity_model):
    result = TASKS.get("image_size").run(parity_model, Image.new("RGB", (5, 3)), {})
    assert result.text == "size: 5x3" and result.params == {"label": "size"}
