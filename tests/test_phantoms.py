"""The phantom generator and analyser."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unimedvl_core.data.phantoms import (
    FAMILY_STYLES,
    REMOVE_LESIONS,
    analyze,
    caption,
    degrade_for_super_resolution,
    parse_count,
    render,
    report_text,
    sample_phantom,
    vqa_questions,
    write_dataset,
)
from unimedvl_core.training.datasets import FORMATS, ImageSource, JsonlRows, record_plan


@pytest.mark.parametrize("family", ["radiology", "xray", "histology"])
@pytest.mark.parametrize("count", [0, 1, 2, 3])
def test_analyser_counts_every_style_exactly(family, count):
    rng = np.random.default_rng(count * 10 + len(family))
    for _ in range(5):
        p = sample_phantom(rng, family, 64, count=count)
        assert p.count == count
        for style in FAMILY_STYLES[family]:
            assert analyze(render(p, style), style).count == count, (family, style)


def test_analyser_finds_lesions_where_they_are():
    p = sample_phantom(np.random.default_rng(3), "radiology", 64, count=2)
    found = analyze(render(p, "ct"), "ct").lesions
    for lesion in p.lesions:
        assert min(np.hypot(f["x"] + 0.5 - lesion.x, f["y"] + 0.5 - lesion.y) for f in found) < 1.5


def test_styles_share_the_anatomy_and_differ_in_contrast():
    p = sample_phantom(np.random.default_rng(5), "radiology", 64, count=1)
    t1, t2 = render(p, "mr_t1").mean(-1), render(p, "mr_t2").mean(-1)
    les = p.lesions[0]
    y, x = int(les.y), int(les.x)
    assert t1[y, x] < 80 and t2[y, x] > 180  # hypointense on T1, hyperintense on T2


def test_texts_state_the_truth():
    rng = np.random.default_rng(1)
    p = sample_phantom(rng, "xray", 64, count=2)
    assert "two nodules" in caption(p, "xray")
    assert parse_count(report_text(p, "xray").split("Impression:")[1]) == 2
    answers = {q: a for q, a, _ in vqa_questions(p, "xray", np.random.default_rng(0))}
    for q, a in answers.items():
        if q.startswith("How many"):
            assert a == "two"
        if q.startswith("Is there a nodule in this image"):
            assert a == "yes"


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_dataset_is_deterministic(tmp_path):
    write_dataset(tmp_path / "a", 6, seed=3)
    write_dataset(tmp_path / "b", 6, seed=3)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    write_dataset(tmp_path / "c", 6, seed=4)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_dataset_files_follow_the_released_formats(tmp_path):
    counts = write_dataset(tmp_path, 40, seed=2)
    assert all(counts[k] > 0 for k in ("vqa", "report", "t2i", "edit_sr", "edit_translation", "edit_staining",
                                      "counterfactual", "t2i_parquet"))
    formats = {"vqa": FORMATS[0], "report": FORMATS[0], "t2i": FORMATS[1], "edit_sr": FORMATS[3],
               "edit_translation": FORMATS[3], "edit_staining": FORMATS[3], "counterfactual": FORMATS[4]}
    rng = np.random.default_rng(0)
    for name, fmt in formats.items():
        rows = JsonlRows(tmp_path / f"{name}.jsonl")
        assert len(rows) == counts[name]
        for row in range(len(rows)):
            items, images = record_plan(fmt, rows[row], tmp_path / "images", rng)
            assert any(item.loss for item in items)
            for image in images:
                assert image.header_size() == (64, 64)
    table = pq.read_table(tmp_path / "t2i.parquet").to_pydict()
    items, images = record_plan("t2i_pretrain", {"image": table["image"][0], "captions": table["captions"][0]},
                                tmp_path, rng)
    assert items[0].text == json.loads(table["captions"][0])["short"]
    assert images[0].header_size() == (64, 64)


def test_interleaved_pairs(tmp_path):
    write_dataset(tmp_path, 20, seed=5)
    truth = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "truth.jsonl").read_text().splitlines()}
    for line in (tmp_path / "counterfactual.jsonl").read_text().splitlines():
        record = json.loads(line)
        target = np.asarray(Image.open(tmp_path / "images" / record["output_img"][0]["path"]))
        style = record["output_img"][0]["path"].split("_", 2)[2].rsplit("_clean", 1)[0]
        assert analyze(target, style).count == 0
        assert REMOVE_LESIONS.split("{")[0] in record["message"][0]["value"]
        assert parse_count(record["message"][1]["value"]) == len(truth[record["phantom"]]["lesions"])
    for line in (tmp_path / "edit_sr.jsonl").read_text().splitlines():
        record = json.loads(line)
        lr = np.asarray(ImageSource(tmp_path / "images" / record["input_img"][0]["path"]).open())
        hr = np.asarray(ImageSource(tmp_path / "images" / record["output_img"][0]["path"]).open())
        assert lr.shape == hr.shape
        assert np.array_equal(lr, degrade_for_super_resolution(hr))
