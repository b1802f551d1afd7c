"""Whole slides (DICOM VL WSI) through the surfaces as users run them: the command line, the MONAI Deploy
application and the bundle's loader. Each task reads the slide at its own level (``tasks.slides``), the
label and overview images never reach the model, and image outputs are derived slides over their region."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
import yaml
from PIL import Image
from pydicom.uid import VLWholeSlideMicroscopyImageStorage

from unimedvl_core.batch.reading import load_images
from unimedvl_core.batch.sources import read_source
from unimedvl_core.surfaces.bundle import LoadMedicalSlices, slide_selection_of
from unimedvl_core.surfaces.cli import main
from unimedvl_core.surfaces.deploy.inputs import scan_dicom_folder, stage_usable_files
from unimedvl_core.surfaces.deploy.operators import SlideInput
from unimedvl_core.tasks.catalog import TASKS
from unimedvl_core.tasks.slides import slide_selection

from .conftest import PARITY, PARITY_CKPT
from .slides import PATIENT_NAME, build_slide
from .test_deploy import errors_of_its_own, run_app

CKPT = ["--ckpt", str(PARITY_CKPT), "--no-progress"]
REGION = (320, 192, 384, 256)  # x, y, width, height in level-0 pixels


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    # 4000 x 3000 at 0.25 um, then 2000 x 1500 and 1000 x 750: text tasks and image tasks part ways
    return build_slide(tmp_path_factory.mktemp("slide") / "slide", size=(4000, 3000))


def test_text_tasks_read_coarser_levels_than_image_tasks(slide):
    """VQA reads the coarsest level still as large as the model looks; staining the finest that fits."""
    loader_for = {name: LoadMedicalSlices(slide=slide_selection(TASKS.get(name)))
                  for name in ("vqa", "virtual_staining")}
    vqa = loader_for["vqa"](slide.folder)[0].geometry["slide_region"]
    stain = loader_for["virtual_staining"](slide.folder)[0].geometry["slide_region"]
    assert stain.level == 0 and (stain.rows, stain.columns) == slide.levels[0].shape[:2]
    sides = [max(level.shape[:2]) for level in slide.levels]
    assert vqa.level == max(k for k, side in enumerate(sides) if side >= 980) == 2
    region = LoadMedicalSlices(slide=slide_selection_of("virtual_staining", list(REGION), 1))(slide.folder)[0]
    where = region.geometry["slide_region"]
    assert (where.level, where.column, where.row, where.columns, where.rows) == (1, 160, 96, 192, 128)


def test_cli_stains_a_region_into_a_derived_slide(slide, tmp_path, capsys):
    out = tmp_path / "out" / "ihc.png"
    code = main(["virtual_staining", *CKPT, "--steps", "2", "--image", str(slide.folder),
                 "--region", ",".join(map(str, REGION)), "--out", str(out), "--json", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    assert Image.open(out).size == REGION[2:]
    ds = pydicom.dcmread(out.with_suffix(".dcm"))
    source = pydicom.dcmread(slide.volume_files[0][0], stop_before_pixels=True)
    assert ds.SOPClassUID == VLWholeSlideMicroscopyImageStorage and ds.SyntheticData == "YES"
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID and ds.ContainerIdentifier == source.ContainerIdentifier
    assert (ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows) == REGION[2:]
    where = json.loads((tmp_path / "r.json").read_text())["results"][0]["slide_region"]
    assert (where["level"], where["column"], where["row"]) == (0, REGION[0], REGION[1])


def test_cli_slide_options_on_other_images_and_bad_regions_are_one_line_errors(slide, capsys):
    assert main(["vqa", *CKPT, "--image", str(PARITY / "image448.png"), "--question", "Lesion?",
                 "--region", "0,0,64,64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "whole-slide images" in err[0]
    assert main(["vqa", *CKPT, "--image", str(slide.folder), "--question", "Lesion?", "--level", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "level" in err[0] and PATIENT_NAME.split("^")[0] not in err[0]
    with pytest.raises(SystemExit):
        main(["vqa", *CKPT, "--image", str(slide.folder), "--question", "Lesion?", "--region", "1,2,0,4"])
    assert "positive WIDTH and HEIGHT" in capsys.readouterr().err


def test_map_reads_each_task_at_its_level_and_never_the_label(tmp_path):
    truth = build_slide(tmp_path / "in" / "slide")
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"max_new_tokens": 4, "num_inference_steps": 2, "slide": {"region": list(REGION)},
                                     "tasks": [{"task": "vqa", "questions": ["Is there tumour?"]},
                                               {"task": "virtual_staining"}]}))
    result = run_app(tmp_path / "in", tmp_path / "out", tasks)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    skipped = {Path(s["file"]).name: s["reason"] for s in summary["input"]["skipped"]}
    assert {truth.label_file.name, truth.overview_file.name} <= set(skipped), skipped
    (entry,) = summary["series"]
    assert {r["task"]: r["status"] for r in entry["tasks"]} == {"vqa": "done", "virtual_staining": "done"}
    image = next(o for o in entry["outputs"] if o["kind"] == "image")
    # the region is smaller than the model's view at every level, so both read level 0
    assert image["slide_region"]["level"] == entry["slide_region"]["level"] == 0
    ds = pydicom.dcmread(tmp_path / "out" / image["file"])
    assert ds.SOPClassUID == VLWholeSlideMicroscopyImageStorage and ds.SyntheticData == "YES"
    assert errors_of_its_own(tmp_path / "out" / image["file"], truth.volume_files[0][0]) == []


def test_batch_folder_source_gives_one_row_per_slide_read_at_the_tasks_level(slide):
    vqa = TASKS.get("vqa")
    (row,) = read_source(slide.folder, vqa, slices="all")  # levels and label are not slices
    (image,) = load_images(row, slide=slide_selection(vqa))
    assert image.geometry["slide_region"].level == 2


def test_map_stages_slides_as_headers_and_reads_their_files(tmp_path):
    """The SDK's loader reads every staged file whole: a slide's levels go to it as headers only, and the
    slide is read tile by tile from the scanned files."""
    truth = build_slide(tmp_path / "in" / "slide", encoding="raw")
    scan = scan_dicom_folder(tmp_path / "in")
    staged = stage_usable_files(scan, tmp_path / "staged")
    files = sorted(staged.glob("*.dcm"))
    assert len(files) == len(scan.slide_files) == len(truth.volume_files) + 1  # the levels and the thumbnail
    for path in files:
        header = pydicom.dcmread(path)
        original = scan.slide_files[header.SOPInstanceUID]
        assert "PixelData" not in header and "PixelData" in pydicom.dcmread(original)
        assert path.stat().st_size < original.stat().st_size


def test_map_rejects_a_slide_with_a_broken_level_and_windows_grey_slides(tmp_path):
    inp = tmp_path / "in"
    broken = build_slide(inp / "broken", encoding="raw")
    level0 = broken.volume_files[0][0]
    level0.write_bytes(level0.read_bytes()[: level0.stat().st_size * 6 // 10])  # truncated: the pyramid would shift
    grey = build_slide(inp / "grey", photometric="MONOCHROME2", bits=16, encoding="raw", extras=False)
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"max_new_tokens": 2, "window": [3000, 2000],
                                     "tasks": [{"task": "vqa", "questions": ["Is there tumour?"]}]}))
    result = run_app(inp, tmp_path / "out", tasks)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    rejected = {r["series_instance_uid"]: r["reason"] for r in summary["input"]["rejected_series"]}
    assert broken.series_uid in rejected and "truncated" in rejected[broken.series_uid]
    (entry,) = summary["series"]
    assert entry["series_instance_uid"] == grey.series_uid and entry["tasks"][0]["status"] == "done"
    sr = pydicom.dcmread(tmp_path / "out" / entry["outputs"][0]["file"])
    assert sr.SOPClassUID.name.endswith("SR Storage")
    headers = [(path, pydicom.dcmread(path, stop_before_pixels=True)) for path in sorted(grey.folder.glob("*.dcm"))]
    assert SlideInput(headers, window=(3000, 2000)).image_for(None).window == (3000.0, 2000.0)  # the task file's


def test_map_scan_keeps_one_copy_of_a_slide_instance(tmp_path):
    """A second file with a level's SOP Instance UID is skipped with the first file's name, so every staged slide
    instance is a header and the pyramid keeps one instance per level."""
    truth = build_slide(tmp_path / "in" / "slide", encoding="raw", extras=False)
    (tmp_path / "in" / "copy").mkdir()
    shutil.copy(truth.volume_files[1][0], tmp_path / "in" / "copy" / "again.dcm")
    scan = scan_dicom_folder(tmp_path / "in")
    reasons = dict(scan.skipped)
    (name, reason), = reasons.items()
    assert "same SOP Instance UID as" in reason and len(scan.slide_files) == len(truth.volume_files)
    staged = stage_usable_files(scan, tmp_path / "staged")
    assert not any(path.is_symlink() for path in staged.glob("*.dcm"))
