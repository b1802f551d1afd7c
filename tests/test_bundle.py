"""The MONAI bundle as users run it: metadata, properties, inference, the training overlays, evaluation."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pydicom
import pytest
import yaml
from monai.bundle import ConfigWorkflow, verify_metadata
from PIL import Image

from unimedvl_core import UniMedVL
from unimedvl_core.io.provenance import file_sha256

from .conftest import PARITY_CKPT

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "monai_bundle"
CONFIGS = BUNDLE / "configs"
SCHEMA = REPO / "tests" / "fixtures" / "meta_schema_20240725.json"
TINY_RECIPE = REPO / "tests" / "fixtures" / "training" / "tiny_recipe.yaml"


def bundle_run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(BUNDLE), *args]
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_metadata_is_valid_against_the_schema(tmp_path):
    schema = tmp_path / "schema.json"
    shutil.copyfile(SCHEMA, schema)  # offline: verify_metadata uses the file when it exists
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(schema))
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert {"network_data_format", "generation_data_format"} <= set(meta)
    assert meta["version"] in meta["changelog"]


def test_eval_metrics_are_the_embedded_models_measured_scores():
    meta = json.loads((CONFIGS / "metadata.json").read_text())["eval_metrics"]
    scores = json.loads((REPO / "unimedvl_core" / "default_model" / "scores.json").read_text())
    names = {"vqa_closed_accuracy": "vqa_closed_accuracy", "vqa_count_accuracy": "vqa_count_accuracy",
             "report_count_accuracy": "report_count_accuracy", "t2i_lesion_count_match": "t2i_count_match",
             "sr4x_psnr": "sr_psnr", "sr4x_bicubic_psnr": "sr_bicubic_psnr", "sr4x_ssim": "sr_ssim",
             "sr4x_bicubic_ssim": "sr_bicubic_ssim"}
    assert set(meta) == {f"phantom_{k}" for k in names}
    for key, source in names.items():
        assert meta[f"phantom_{key}"] == pytest.approx(scores[source], abs=0.006), key


@pytest.mark.parametrize("files,workflow", [
    (["inference.json"], "infer"),
    (["train.json", "stage1.json"], "train"),
    (["train.json", "stage0.json"], "train"),
    (["train.json", "multi_gpu_train.json", "stage3.json"], "train"),
])
def test_workflow_properties(files, workflow):
    wf = ConfigWorkflow(config_file=[str(CONFIGS / f) for f in files], meta_file=str(CONFIGS / "metadata.json"),
                        logging_file=str(CONFIGS / "logging.conf"), workflow_type=workflow,
                        bundle_root=str(BUNDLE))
    wf.initialize()
    assert wf.check_properties() in (None, [])


def test_inference_answers_every_sample_input(tmp_path):
    out = tmp_path / "vqa"
    bundle_run("--config_file", str(CONFIGS / "inference.json"), "--output_dir", str(out),
               "--task_params#max_new_tokens", "8", cwd=tmp_path)
    results = json.loads((out / "results.json").read_text())
    inputs = sorted({Path(r["input"]).name for r in results["results"]})
    assert inputs == ["ct_phantom.png", "dicom_ct_series", "mr_t2_phantom.nii.gz", "xray_phantom.png"]
    questions = json.loads((CONFIGS / "inference.json").read_text())["questions"]
    for name in inputs:  # each input: one answer per question, with the registry's parameters recorded
        records = [r for r in results["results"] if Path(r["input"]).name == name]
        assert [r["parameters"]["question"] for r in records] == questions
        assert all(isinstance(r["text"], str) and r["parameters"]["max_new_tokens"] == 8 for r in records)


def test_image_task_writes_labelled_png_dicom_and_nifti(tmp_path):
    out = tmp_path / "sr"
    bundle_run("--config_file", str(CONFIGS / "inference.json"), "--output_dir", str(out), "--task",
               "contrast_translation", "--task_params#num_inference_steps", "2", "--slices", "all",
               "--applies_to", "{'modalities': None}", cwd=tmp_path)  # translate the CT too (its rule: MR only)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 2 + 3 + 3  # two PNG inputs, three DICOM slices, three NIfTI slices
    assert all(Image.open(p).text["SyntheticData"] == "YES" for p in out.glob("*.png"))
    dicoms = [pydicom.dcmread(p) for p in sorted(out.glob("*.dcm"))]
    source = pydicom.dcmread(sorted((BUNDLE / "sample_data" / "dicom_ct_series").glob("*.dcm"))[0])
    assert len(dicoms) == 3 and {d.SeriesInstanceUID for d in dicoms} != {source.SeriesInstanceUID}
    assert all(d.SyntheticData == "YES" and d.StudyInstanceUID == source.StudyInstanceUID for d in dicoms)
    niftis = sorted(out.glob("*.nii.gz"))  # the three NIfTI slices' outputs: one volume in the source's space
    assert [p.name for p in niftis] == ["mr_t2_phantom.nii.gz"]
    img = nib.load(str(niftis[0]))
    assert b"SYNTHETIC" in img.header["descrip"].tobytes()
    src = nib.load(str(BUNDLE / "sample_data" / "mr_t2_phantom.nii.gz"))
    assert img.shape == src.shape and img.affine == pytest.approx(src.affine)


def test_task_rules_and_failures_are_recorded_per_run(tmp_path):
    """Where a task does not apply (translation is for MR; the sample CT series is CT) each run says so, the
    others are done, and the run's status says it all; an output folder inside the inputs is refused."""
    out = tmp_path / "rules"
    bundle_run("--config_file", str(CONFIGS / "inference.json"), "--output_dir", str(out), "--task",
               "contrast_translation", "--task_params#num_inference_steps", "1", cwd=tmp_path)
    summary = json.loads((out / "results.json").read_text())
    by_input = {Path(r["input"]).name: r for r in summary["results"]}
    assert by_input["dicom_ct_series"]["status"] == "not applicable"
    assert "not for CT images" in by_input["dicom_ct_series"]["reason"]
    assert by_input["ct_phantom.png"]["status"] == "done" and by_input["ct_phantom.png"]["outputs"]
    assert summary["status"] == "complete" and summary["weights"]["sha256"]
    data = tmp_path / "data"
    shutil.copytree(BUNDLE / "sample_data", data)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(BUNDLE), "--config_file",
           str(CONFIGS / "inference.json"), "--dataset_dir", str(data), "--output_dir", str(data / "out")]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "lies inside the input folder" in result.stderr
    assert not (data / "out").exists()


def test_a_failing_run_is_recorded_and_the_others_go_on(tiny_model, tmp_path):
    from unimedvl_core import read_slices
    from unimedvl_core.surfaces.bundle import TaskInferer, TaskRunner, list_inputs
    from unimedvl_core.tasks.catalog import TASKS
    from unimedvl_core.tasks.registry import Task, TaskResult

    def measure(model, image, params, options):
        if max(image.size) > 100:
            raise RuntimeError("input too large for this task")
        return TaskResult("measure", text=f"{image.size}")

    data = tmp_path / "in"
    data.mkdir()
    Image.new("RGB", (64, 64)).save(data / "small.png")
    Image.new("RGB", (800, 600)).save(data / "large.png")
    items = [{**i, "slices": read_slices(i["image"])} for i in list_inputs(data)]
    TASKS.register(Task("measure", "the input's size", "image", "text", (), measure))
    try:
        summary = TaskRunner(tiny_model, items, TaskInferer("measure"), str(tmp_path / "out"), progress=False).run()
    finally:
        TASKS.unregister("measure")
    records = {Path(r["input"]).name: r for r in summary["results"]}
    assert records["small.png"]["status"] == "done" and records["small.png"]["text"] == "(64, 64)"
    assert records["large.png"]["status"] == "failed"
    assert records["large.png"]["reason"] == "RuntimeError: input too large for this task"
    assert summary["status"] == "partial"


def test_text_to_image_task(tmp_path):
    out = tmp_path / "t2i"
    bundle_run("--config_file", str(CONFIGS / "inference.json"), "--output_dir", str(out), "--task", "text_to_image",
               "--prompts", "['CT image with one lesion.']", "--task_params#num_inference_steps", "2", cwd=tmp_path)
    assert [p.name for p in out.glob("*.png")] == ["prompt_0000.png"]
    assert json.loads((out / "results.json").read_text())["results"][0]["synthetic"] is True


@pytest.fixture(scope="module")
def phantom_dirs(tmp_path_factory):
    from unimedvl_core.data.phantoms import write_dataset

    root = tmp_path_factory.mktemp("bundle_phantoms")
    write_dataset(root / "train", 24, seed=31)
    write_dataset(root / "eval", 8, seed=32)
    return root


def test_training_overlays_run_every_stage(tmp_path, phantom_dirs):
    run_dir = tmp_path / "runs"
    common = ["--recipe", str(TINY_RECIPE), "--dataset_dir", str(phantom_dirs / "train"), "--run_dir", str(run_dir),
              "--train#trainer#max_epochs", "2", "--overrides", "['data.num_workers=0']"]
    for stage in (0, 1, 2, 3):
        files = f"['{CONFIGS / 'train.json'}','{CONFIGS / f'stage{stage}.json'}']"
        bundle_run("--config_file", files, *common, cwd=tmp_path)
        assert (run_dir / f"stage{stage}" / "final").is_dir()
    state = json.loads((run_dir / "stage3" / "final" / "trainer_state.json").read_text())
    assert state["step"] == 2  # max_epochs is the stage's step count
    model = UniMedVL.from_pretrained(run_dir / "stage3" / "final", progress=False)
    assert model.answer(next((phantom_dirs / "eval" / "images").glob("*.png")), "How many lesions are there?",
                        max_new_tokens=2) is not None


def test_evaluation_writes_table_and_figure(tmp_path, phantom_dirs):
    out = tmp_path / "eval"
    bundle_run("--config_file", str(CONFIGS / "evaluate.json"), "--dataset_dir", str(phantom_dirs / "eval"),
               "--output_dir", str(out), "--limit", "3", "--num_inference_steps", "2", cwd=tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert results["vqa:phantom"]["n"] == 3
    assert {"bleu", "rouge_l"} <= set(results["reports"])
    assert "psnr" in results["image_to_image:edit_sr"]["super_resolution"]
    assert results["text_to_image"]["n"] == 3 and results["text_to_image"]["fid"] >= 0
    assert (out / "results.md").read_text().startswith("| evaluation | metric | value |")
    assert Image.open(out / "samples.png").size[0] > 500


def test_our_own_outputs_are_not_read_back_as_inputs(tiny_model, tmp_path):
    from unimedvl_core.io.synthetic import label_synthetic, save_png
    from unimedvl_core.surfaces.bundle import list_inputs

    data = tmp_path / "in"
    data.mkdir()
    Image.new("RGB", (32, 32)).save(data / "scan.png")
    save_png(label_synthetic(Image.new("RGB", (32, 32)), "super_resolution"), data / "scan_sr.png")
    assert [Path(i["image"]).name for i in list_inputs(data)] == ["scan.png"]
    assert len(list_inputs(data, include_synthetic=True)) == 2


# ----- model-zoo conventions -----
ZOO_FILE_LIMIT = 25 * 2**20  # the zoo keeps files above 25 MB out of the repository (large_files.yml instead)
# the fields the zoo's schema for Hugging Face-hosted models requires (docs/bundle.md#metadata)
HF_REQUIRED = {"schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
               "required_packages_version", "name", "task", "description", "authors", "copyright", "huggingface_url"}


def test_every_bundle_file_is_under_the_zoo_size_limit():
    tracked = subprocess.run(["git", "ls-files", "monai_bundle"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    assert "monai_bundle/large_files.yml" in tracked and "monai_bundle/configs/metadata.json" in tracked
    too_big = {p: (REPO / p).stat().st_size for p in tracked if (REPO / p).stat().st_size >= ZOO_FILE_LIMIT}
    assert not too_big


def test_metadata_has_the_hugging_face_fields():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert HF_REQUIRED <= set(meta)
    assert meta["huggingface_url"] == f"https://huggingface.co/{meta['huggingface_model_id']}"
    listing = yaml.safe_load((BUNDLE / "large_files.yml").read_text())["large_files"]
    for entry in listing:  # every download comes from the model id the metadata names
        assert entry["url"].startswith(meta["huggingface_url"] + "/resolve/"), entry["url"]
        assert entry["hash_type"] == "sha256" and re.fullmatch(r"|[0-9a-f]{64}", entry["hash_val"])


def test_checkpoint_is_read_under_the_bundle_root(tmp_path, monkeypatch):
    from unimedvl_core.surfaces.bundle import CHECKPOINT_SUBDIR, Checkpoint, resolve_checkpoint

    root = tmp_path / "bundle"
    root.mkdir()
    shutil.copyfile(BUNDLE / "large_files.yml", root / "large_files.yml")
    monkeypatch.chdir(tmp_path)
    empty = resolve_checkpoint(None, str(root))
    assert empty.path is None and "download_large_files" in empty.notice and "\n" not in empty.notice
    shutil.copytree(PARITY_CKPT, root / CHECKPOINT_SUBDIR)
    (root / CHECKPOINT_SUBDIR / "merges.txt").unlink()  # an unfinished download is not used
    partial = resolve_checkpoint(None, str(root))
    assert partial.path is None and "lacks merges.txt" in partial.notice
    shutil.copyfile(PARITY_CKPT / "merges.txt", root / CHECKPOINT_SUBDIR / "merges.txt")
    assert resolve_checkpoint(None, str(root)) == Checkpoint(str(root / CHECKPOINT_SUBDIR), None)
    # a relative --ckpt_dir is the folder under bundle_root, not under the working directory
    assert resolve_checkpoint(CHECKPOINT_SUBDIR, str(root)).path == str(root / CHECKPOINT_SUBDIR)
    assert resolve_checkpoint("org/name", str(root)).path == "org/name"  # no such folder: a Hub id, passed on


def test_a_downloaded_checkpoint_is_used_and_the_fallback_is_said(tmp_path):
    """A bundle whose models/UniMedVL holds the download runs it (no notice); the bundle without it runs
    the embedded model and says so in the log and results.json."""
    root = tmp_path / "bundle"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("models", "outputs", "runs", "eval"))
    shutil.copytree(PARITY_CKPT, root / "models" / "UniMedVL")
    common = ["--config_file", str(root / "configs" / "inference.json"), "--questions", "['How many lesions?']",
              "--task_params#max_new_tokens", "2", "--dataset_dir", str(BUNDLE / "sample_data" / "dicom_ct_series")]
    bundle_run("--bundle_root", str(root), *common, "--output_dir", str(tmp_path / "a"), cwd=tmp_path)
    used = json.loads((tmp_path / "a" / "results.json").read_text())
    assert used["notice"] is None and used["weights"]["demo"] is False
    assert used["weights"]["sha256"] == file_sha256(PARITY_CKPT / "ema.safetensors")
    shutil.rmtree(root / "models")
    run = bundle_run("--bundle_root", str(root), *common, "--output_dir", str(tmp_path / "b"), cwd=tmp_path)
    fallback = json.loads((tmp_path / "b" / "results.json").read_text())
    assert fallback["weights"]["demo"] is True and "download_large_files" in fallback["notice"]
    assert fallback["notice"] in run.stdout + run.stderr


def test_bad_inputs_are_recorded_and_leave_no_stray_files(tmp_path):
    """Unreadable inputs are errors in results.json, the good input is done, no traceback; a bad setting
    stops the run with one line naming it, before any output folder exists."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(BUNDLE / "sample_data" / "ct_phantom.png", data / "ct_phantom.png")
    (data / "broken.png").write_bytes(b"\x89PNG not really")
    (data / "broken.nii.gz").write_bytes(b"not a volume")
    out = tmp_path / "out"
    run = bundle_run("--config_file", str(CONFIGS / "inference.json"), "--dataset_dir", str(data), "--output_dir",
                     str(out), "--task", "edit", "--task_params#instruction", "Brighten it.",
                     "--task_params#num_inference_steps", "1", cwd=tmp_path)
    assert "Traceback" not in run.stderr
    summary = json.loads((out / "results.json").read_text())
    assert summary["status"] == "partial"
    assert sorted(Path(e["input"]).name for e in summary["errors"]) == ["broken.nii.gz", "broken.png"]
    listed = {Path(p).name for r in summary["results"] for p in r.get("outputs", [])}
    assert {p.name for p in out.iterdir()} == listed | {"results.json"} and listed == {"ct_phantom.png"}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(BUNDLE), "--config_file",
           str(CONFIGS / "inference.json"), "--dataset_dir", str(data), "--output_dir", str(tmp_path / "bad"),
           "--task", "super_resolution", "--task_params#scale", "3"]
    failed = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "scale" in last
    assert not (tmp_path / "bad").exists()


def test_an_output_that_cannot_be_written_is_recorded_and_removed(tiny_model, tmp_path):
    """The PNG of a DICOM input is written, then its DICOM cannot be (a folder holds the name): the record
    says failed, and the PNG is gone, so no file lacks its record."""
    from unimedvl_core.surfaces.bundle import LoadMedicalSlicesd, TaskInferer, TaskRunner, list_inputs

    items = list_inputs(BUNDLE / "sample_data" / "dicom_ct_series")
    dataset = [LoadMedicalSlicesd()(item) for item in items]
    out = tmp_path / "out"
    (out / "dicom_slice0001.dcm").mkdir(parents=True)
    inferer = TaskInferer("super_resolution", {"scale": 2, "num_inference_steps": 1})
    summary = TaskRunner(tiny_model, dataset, inferer, str(out), progress=False).run()
    record = summary["results"][0]
    assert record["status"] == "failed" and record["reason"].startswith("IsADirectoryError")
    assert "outputs" not in record and summary["status"] == "failed"
    assert sorted(p.name for p in out.iterdir()) == ["dicom_slice0001.dcm", "results.json"]
