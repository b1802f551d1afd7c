"""Scoring rules on hand-made examples whose right answers are known, and the benchmark readers on files
written in each published layout."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from unimedvl_core.data.evaluation import (
    closed_correct,
    extract_choice,
    fid_score,
    open_recall,
    psnr_ssim,
    read_vqa,
    score_vqa,
    text_metrics,
)


@pytest.mark.parametrize("prediction,answer,expected", [
    ("Yes.", "yes", True), ("yes, there is a nodule", "Yes", True), ("No", "yes", False),
    ("There is no effusion.", "no", True), ("The lesion is large", "yes", False), ("", "no", False),
    ("Yes? No.", "no", False),
])
def test_closed_questions_score_the_first_yes_or_no(prediction, answer, expected):
    assert closed_correct(prediction, answer) is expected


@pytest.mark.parametrize("prediction,answer,expected", [
    ("left lower lobe", "left lower lobe", 1.0), ("in the left lung", "left lower lobe", 1 / 3),
    ("Pleural effusion.", "pleural effusion", 1.0), ("nothing", "chest", 0.0), ("two", "Two", 1.0),
])
def test_open_questions_score_answer_token_recall(prediction, answer, expected):
    assert open_recall(prediction, answer) == pytest.approx(expected)


def test_multiple_choice_reads_the_letter_or_the_option_text():
    options = {"A": "CT", "B": "MRI", "C": "Ultrasound"}
    assert extract_choice("B", options) == "B"
    assert extract_choice("(C) Ultrasound", options) == "C"
    assert extract_choice("The answer is A.", options) == "A"
    assert extract_choice("It looks like an MRI scan", options) == "B"
    assert extract_choice("Z", options) is None
    assert extract_choice("CT or MRI", options) is None  # ambiguous


def test_score_vqa_aggregates_by_kind():
    records = [
        {"kind": "closed", "prediction": "yes", "answer": "yes"},
        {"kind": "closed", "prediction": "no", "answer": "yes"},
        {"kind": "open", "prediction": "right lung", "answer": "right lung apex"},
        {"kind": "choice", "prediction": "A", "answer": "A", "options": {"A": "x", "B": "y"}},
    ]
    scores = score_vqa(records)
    assert scores["closed_accuracy"] == 0.5 and scores["open_recall"] == pytest.approx(2 / 3)
    assert scores["choice_accuracy"] == 1.0 and scores["n"] == 4
    assert scores["overall"] == pytest.approx((1 + 0 + 2 / 3 + 1) / 4)


def test_psnr_ssim_on_known_images():
    a = np.full((32, 32, 3), 100, dtype=np.uint8)
    b = a.copy()
    b[0, 0, 0] = 110  # MSE = 100 / (32*32*3) on a 0..255 scale
    psnr, ssim = psnr_ssim(b, a)
    mse = (10 / 255) ** 2 / (32 * 32 * 3)
    assert psnr == pytest.approx(10 * np.log10(1 / mse), rel=1e-4)
    assert 0.99 < ssim <= 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        psnr_ssim(a, a[:16])


def test_fid_is_zero_for_identical_features_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    assert fid_score(x, x) == pytest.approx(0.0, abs=1e-6)
    assert fid_score(x + 3.0, x) == pytest.approx(9.0 * 8, rel=0.05)  # mean shift of 3 in 8 dimensions


def test_text_metrics_perfect_and_disjoint():
    perfect = text_metrics(["there is a small nodule"], ["there is a small nodule"])
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["rouge_l"] == pytest.approx(1.0)
    disjoint = text_metrics(["alpha beta gamma delta"], ["one two three four"])
    assert disjoint["bleu"] == pytest.approx(0.0, abs=1e-6) and disjoint["rouge_l"] == 0.0


def _png_bytes(value=80):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def test_readers_of_the_published_layouts(tmp_path):
    # VQA-RAD
    rad = tmp_path / "rad"
    (rad / "VQA_RAD Image Folder").mkdir(parents=True)
    (rad / "VQA_RAD Image Folder" / "synpic1.jpg").write_bytes(_png_bytes())
    (rad / "VQA_RAD Dataset Public.json").write_text(json.dumps([
        {"image_name": "synpic1.jpg", "question": "Is there a mass?", "answer": "Yes", "answer_type": "CLOSED",
         "phrase_type": "test_freeform"},
        {"image_name": "synpic1.jpg", "question": "Where?", "answer": "left", "answer_type": "OPEN",
         "phrase_type": "freeform"}]))
    items = read_vqa("vqa_rad", rad)
    assert [(i.kind, i.answer) for i in items] == [("closed", "Yes")]  # test split only
    # SLAKE
    slake = tmp_path / "slake"
    (slake / "imgs" / "xmlab1").mkdir(parents=True)
    (slake / "test.json").write_text(json.dumps([
        {"img_name": "xmlab1/source.jpg", "question": "Which organ?", "answer": "Liver", "answer_type": "OPEN",
         "q_lang": "en"},
        {"img_name": "xmlab1/source.jpg", "question": "哪个器官?", "answer": "肝", "answer_type": "OPEN",
         "q_lang": "zh"}]))
    assert [(i.question, i.kind) for i in read_vqa("slake", slake)] == [("Which organ?", "open")]
    # PathVQA (Hugging Face parquet)
    path = tmp_path / "pathvqa" / "data"
    path.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"image": {"bytes": _png_bytes(), "path": None}, "question": "Is it benign?",
                                          "answer": "no"}]), path / "test-00000-of-00001.parquet")
    item = read_vqa("pathvqa", tmp_path / "pathvqa")[0]
    assert item.kind == "closed" and isinstance(item.image, bytes)
    # OmniMedVQA
    omni = tmp_path / "omni"
    (omni / "QA_information" / "Open-access").mkdir(parents=True)
    (omni / "QA_information" / "Open-access" / "set.json").write_text(json.dumps([
        {"question": "Modality?", "gt_answer": "MRI", "image_path": "Images/a.png", "option_A": "CT",
         "option_B": "MRI", "option_C": "X-ray"}]))
    item = read_vqa("omnimedvqa", omni)[0]
    assert item.kind == "choice" and item.answer == "B" and item.options == {"A": "CT", "B": "MRI", "C": "X-ray"}
    # GMAI-MMBench (VLMEvalKit TSV)
    tsv = tmp_path / "gmai.tsv"
    tsv.write_text("index\tquestion\tA\tB\tanswer\timage\n0\tWhich stain?\tH&E\tIHC\tB\t"
                   + base64.b64encode(_png_bytes()).decode() + "\n")
    item = read_vqa("gmai_mmbench", tsv)[0]
    assert (item.kind, item.answer, item.options) == ("choice", "B", {"A": "H&E", "B": "IHC"})
    with pytest.raises(ValueError, match="unknown VQA format"):
        read_vqa("mmlu", tsv)
    with pytest.raises(FileNotFoundError):
        read_vqa("slake", tmp_path / "nowhere")
