"""Evaluation: scoring rules, readers of the public benchmark formats, and runners that write a results
table and a figure of sample outputs.

Scoring rules (the released code has none, see docs/training.md#evaluation; these are the usual ones of the medical VQA
literature, e.g. LLaVA-Med):

- closed questions (yes/no): the first yes/no word of the prediction must equal the answer;
- open questions: recall of the answer's tokens in the prediction (|answer ∩ prediction| / |answer|);
- multiple choice (OmniMedVQA, GMAI-MMBench): the option letter read from the prediction (or the option
  whose text the prediction states) must be the right one;
- images: PSNR and SSIM from ``monai.metrics`` on a 0..1 range; FID from ``monai.metrics.FIDMetric`` on
  features of a named extractor; reports: BLEU (sacrebleu) and ROUGE-L (rouge-score).

Benchmark readers take the files as their authors publish them; users bring the data.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..inference.prompts import multiple_choice_prompt

__all__ = ["VQAItem", "normalize_answer", "closed_correct", "open_recall", "choice_correct", "extract_choice",
           "score_vqa", "psnr_ssim", "fid_score", "text_metrics", "VQA_READERS", "read_vqa", "read_editing_pairs",
           "read_report_items", "evaluate_vqa", "evaluate_editing", "evaluate_reports", "evaluate_text_to_image",
           "write_results", "FeatureExtractor", "answer_items", "BATCH_THRESHOLD", "in_driver"]

YES_NO = ("yes", "no")


@dataclass
class VQAItem:
    image: Any                  # path, bytes or PIL image
    question: str
    answer: str
    kind: str                   # "closed", "open" or "choice"
    options: dict[str, str] = field(default_factory=dict)
    source: str = ""


# ----------------------------------------------------------------------------------------------------------
# scoring rules


def normalize_answer(text: str) -> str:
    text = text.lower().strip()
    text = text.translate(str.maketrans({c: " " for c in string.punctuation}))
    return " ".join(text.split())


def closed_correct(prediction: str, answer: str) -> bool:
    """The first yes/no word of the prediction equals the (yes/no) answer."""
    words = normalize_answer(prediction).split()
    first = next((w for w in words if w in YES_NO), None)
    return first is not None and first == normalize_answer(answer)


def open_recall(prediction: str, answer: str) -> float:
    """Share of the answer's tokens that appear in the prediction."""
    truth = normalize_answer(answer).split()
    if not truth:
        return 0.0
    said = set(normalize_answer(prediction).split())
    return sum(1 for t in truth if t in said) / len(truth)


_LETTER = re.compile(r"^\s*\(?([A-J])[\).:\s]|^\s*([A-J])\s*$|answer(?: is)?[:\s]*\(?([A-J])\b", re.IGNORECASE)


def extract_choice(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter a prediction names: a leading letter ("B", "(B)", "B. text"), "answer is B", or
    the single option whose text it contains."""
    m = _LETTER.search(prediction.strip())
    if m:
        letter = next(g for g in m.groups() if g).upper()
        if letter in options:
            return letter
    said = normalize_answer(prediction)
    hits = [k for k, v in options.items() if normalize_answer(v) and normalize_answer(v) in said]
    return hits[0] if len(hits) == 1 else None


def choice_correct(prediction: str, options: dict[str, str], answer_letter: str) -> bool:
    return extract_choice(prediction, options) == answer_letter.strip().upper()


def score_vqa(records: Sequence[dict]) -> dict:
    """records: dicts with kind, prediction, answer (and options for choice). Returns the accuracies."""
    closed = [closed_correct(r["prediction"], r["answer"]) for r in records if r["kind"] == "closed"]
    opened = [open_recall(r["prediction"], r["answer"]) for r in records if r["kind"] == "open"]
    choice = [choice_correct(r["prediction"], r["options"], r["answer"]) for r in records if r["kind"] == "choice"]
    mean = lambda v: float(np.mean(v)) if v else None  # noqa: E731
    everything = [float(x) for x in closed] + opened + [float(x) for x in choice]
    return {"closed_accuracy": mean(closed), "closed_n": len(closed), "open_recall": mean(opened),
            "open_n": len(opened), "choice_accuracy": mean(choice), "choice_n": len(choice),
            "overall": mean(everything), "n": len(everything)}


def psnr_ssim(prediction: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """PSNR and SSIM of uint8 (H, W, 3) images on a 0..1 range, with MONAI's metrics."""
    from monai.metrics import PSNRMetric, SSIMMetric

    def tensor(a):
        return torch.from_numpy(np.asarray(a, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]

    if prediction.shape != reference.shape:
        raise ValueError(f"image shapes differ: {prediction.shape} vs {reference.shape}")
    p, r = tensor(prediction), tensor(reference)
    return PSNRMetric(max_val=1.0)(p, r).mean().item(), SSIMMetric(spatial_dims=2, data_range=1.0)(p, r).mean().item()


def fid_score(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    from monai.metrics import FIDMetric

    return float(FIDMetric()(features_a.double(), features_b.double()))


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU (sacrebleu, 0-100) and mean ROUGE-L F1 (rouge-score)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return {"bleu": bleu, "rouge_l": float(np.mean(rouge)) if rouge else None, "n": len(rouge)}


# ----------------------------------------------------------------------------------------------------------
# benchmark readers


def _kind(answer: str, answer_type: str | None = None) -> str:
    if answer_type:
        return "closed" if answer_type.strip().upper() == "CLOSED" else "open"
    return "closed" if normalize_answer(answer) in YES_NO else "open"


def read_vqa_rad(root: Path, split: str = "test") -> list[VQAItem]:
    """VQA-RAD (``VQA_RAD Dataset Public.json`` and ``VQA_RAD Image Folder/``); split ``test`` keeps the
    ``test_freeform``/``test_para`` questions, ``all`` keeps every one."""
    data = json.loads((root / "VQA_RAD Dataset Public.json").read_text())
    images = root / "VQA_RAD Image Folder"
    keep = [d for d in data if split == "all" or str(d.get("phrase_type", "")).startswith(split)]
    return [VQAItem(images / d["image_name"], d["question"], str(d["answer"]), _kind(str(d["answer"]),
                    d.get("answer_type")), source="VQA-RAD") for d in keep]


def read_slake(root: Path, split: str = "test") -> list[VQAItem]:
    """SLAKE 1.0 (``<split>.json``, images under ``imgs/``), English questions."""
    data = json.loads((root / f"{split}.json").read_text())
    return [VQAItem(root / "imgs" / d["img_name"], d["question"], str(d["answer"]),
                    _kind(str(d["answer"]), d.get("answer_type")), source="SLAKE")
            for d in data if d.get("q_lang", "en") == "en"]


def read_pathvqa(root: Path, split: str = "test") -> list[VQAItem]:
    """PathVQA as published on the Hugging Face hub (parquet: image{bytes}, question, answer)."""
    import pyarrow.parquet as pq

    files = sorted(root.glob(f"**/{split}-*.parquet")) or sorted(root.glob(f"**/{split}*.parquet"))
    if not files:
        raise FileNotFoundError(f"no {split} parquet files under {root}")
    out = []
    for f in files:
        table = pq.read_table(f).to_pydict()
        for image, question, answer in zip(table["image"], table["question"], table["answer"]):
            data = image["bytes"] if isinstance(image, dict) else image
            out.append(VQAItem(data, question, str(answer), _kind(str(answer)), source="PathVQA"))
    return out


def read_omnimedvqa(root: Path, access: str = "Open-access") -> list[VQAItem]:
    """OmniMedVQA (``QA_information/<access>/*.json``; image paths relative to the root)."""
    out = []
    for f in sorted((root / "QA_information" / access).glob("*.json")):
        for d in json.loads(f.read_text()):
            options = {k[-1]: str(d[k]) for k in ("option_A", "option_B", "option_C", "option_D", "option_E")
                       if d.get(k) not in (None, "")}
            letter = next((k for k, v in options.items() if v == str(d["gt_answer"])), None)
            if letter is None:
                continue
            out.append(VQAItem(root / d["image_path"], d["question"], letter, "choice", options, "OmniMedVQA"))
    return out


def read_gmai_mmbench(tsv: Path) -> list[VQAItem]:
    """GMAI-MMBench in the VLMEvalKit TSV layout (index, question, A..E, answer letter, base64 image)."""
    csv.field_size_limit(2**31 - 1)
    out = []
    with open(tsv, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            options = {k: row[k] for k in "ABCDEFGHIJ" if row.get(k) not in (None, "", "nan")}
            out.append(VQAItem(base64.b64decode(row["image"]), row["question"], row["answer"].strip().upper(),
                               "choice", options, "GMAI-MMBench"))
    return out


def _records(path: Path):
    for line in path.read_text().splitlines():
        if line.strip():
            yield json.loads(line)


def _human_text(record: dict) -> str:
    return next(t["value"] for t in record["message"] if t["from"] == "human").replace("<image>", "").strip()


def read_sft_jsonl(path: Path, data_dir: Path | None = None) -> list[VQAItem]:
    """The released SFT JSONL format (one image, one question, one answer per line); a ``kind`` or
    ``answer_type`` field, when present, says closed or open."""
    data_dir = data_dir or path.parent / "images"
    out = []
    for d in _records(path):
        images = d["input_img"] if isinstance(d["input_img"], list) else [d["input_img"]]
        answer = next(t["value"] for t in d["message"] if t["from"] == "gpt")
        kind = d.get("kind") or _kind(answer, d.get("answer_type"))
        out.append(VQAItem(data_dir / images[0]["path"], _human_text(d), answer, kind, source=path.name))
    return out


VQA_READERS = {"vqa_rad": read_vqa_rad, "slake": read_slake, "pathvqa": read_pathvqa, "omnimedvqa": read_omnimedvqa,
               "gmai_mmbench": read_gmai_mmbench, "sft_jsonl": read_sft_jsonl}


def read_vqa(fmt: str, path: str | Path) -> list[VQAItem]:
    if fmt not in VQA_READERS:
        raise ValueError(f"unknown VQA format {fmt!r}; choose from {sorted(VQA_READERS)}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{fmt} data not found at {path}")
    return VQA_READERS[fmt](path)


def read_editing_pairs(path: Path, data_dir: Path | None = None) -> list[dict]:
    """Pairs of the released editing JSONL format: input image, reference output, instruction."""
    data_dir = data_dir or path.parent / "images"
    return [{"input": data_dir / d["input_img"][0]["path"], "reference": data_dir / d["output_img"][0]["path"],
             "instruction": _human_text(d), "task": d.get("sub_task_type", "edit")} for d in _records(path)]


def read_report_items(path: Path, data_dir: Path | None = None) -> list[VQAItem]:
    return read_sft_jsonl(path, data_dir)


# ----------------------------------------------------------------------------------------------------------
# runners


def _open_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image)).convert("RGB")
    from ..io.medical_io import read_image

    return read_image(image).to_pil()


# Datasets with more items than this run on Ray Data (docs/batch.md) when Ray is installed; smaller ones,
# or any without Ray, run one item at a time in this process.
BATCH_THRESHOLD = 300


def in_driver(model):
    """The loaded model for a step that runs in this process: a ``ModelOnDemand`` loads here (once)."""
    from ..batch.model_spec import ModelOnDemand

    return model.get() if isinstance(model, ModelOnDemand) else model


def _answers_one_by_one(model, images: Sequence, questions: Sequence[str], max_new_tokens: int, desc: str,
                        progress: bool) -> list[str]:
    model = in_driver(model)
    return [model.answer(_open_image(image), question, max_new_tokens=max_new_tokens)
            for image, question in tqdm(list(zip(images, questions)), desc=desc, disable=not progress)]


def _answers_on_ray(model, images: Sequence, questions: Sequence[str], max_new_tokens: int,
                    progress: bool) -> list[str]:
    """The VQA task over every item on Ray Data, each actor loading the same weights as ``model``; an item
    that fails (an unreadable image) gets an empty prediction and a warning. A ``ModelOnDemand`` is not
    loaded here, and a copy it loaded for an earlier step is released first (docs/batch.md#evaluation)."""
    import logging
    import tempfile

    from ..batch import BatchSettings, rows_from_items, run_batch
    from ..batch.model_spec import ModelOnDemand, load_spec
    from ..batch.records import RecordStore
    from ..tasks.catalog import TASKS

    if isinstance(model, ModelOnDemand):
        model.release()
        ckpt, options = model.spec
    else:  # the caller holds it loaded: the actors load the same weights beside it
        ckpt, options = load_spec(model)
    items = [{"image": image, "question": question} for image, question in zip(images, questions)]
    with tempfile.TemporaryDirectory(prefix="unimedvl-eval-") as out:
        summary = run_batch("vqa", rows_from_items(items, TASKS.get("vqa")), out, {"max_new_tokens": max_new_tokens},
                            ckpt=ckpt, load_options=options, settings=BatchSettings(progress=progress))
        latest = RecordStore(out).load()
    if isinstance(model, ModelOnDemand):
        model.name = model.name or summary["model"].get("name")
        model.notice = model.notice or summary.get("notice")
    if summary["failed"]:
        logging.getLogger(__name__).warning("%d of %d items failed: %s", summary["failed"], len(items),
                                            summary["failures"][0]["error"])
    return [latest[str(i)]["text"] or "" if str(i) in latest else "" for i in range(len(items))]


def answer_items(model, images: Sequence, questions: Sequence[str], max_new_tokens: int, desc: str = "VQA",
                 progress: bool = True) -> list[str]:
    """Greedy answers to (image, question) pairs: on Ray Data above ``BATCH_THRESHOLD`` items when Ray is
    installed (the same answers: docs/batch.md), else one by one. ``model``: a loaded model, or a
    ``ModelOnDemand`` (batch/model_spec.py), loaded in this process only for the one-by-one path."""
    from ..batch import ray_available

    if len(questions) > BATCH_THRESHOLD and ray_available():
        return _answers_on_ray(model, images, questions, max_new_tokens, progress)
    return _answers_one_by_one(model, images, questions, max_new_tokens, desc, progress)


def evaluate_vqa(model, items: Sequence[VQAItem], max_new_tokens: int = 64,
                 progress: bool = True) -> tuple[list, dict]:
    questions = [multiple_choice_prompt(i.question, i.options) if i.kind == "choice" else i.question for i in items]
    predictions = answer_items(model, [i.image for i in items], questions, max_new_tokens, "VQA", progress)
    records = [{"question": item.question, "answer": item.answer, "prediction": prediction, "kind": item.kind,
                "options": item.options, "source": item.source} for item, prediction in zip(items, predictions)]
    return records, score_vqa(records)


def _steps(steps: int | None) -> dict:
    """Sampling steps when the caller chose them; otherwise the task's default (the task registry's)."""
    return {"num_inference_steps": steps} if steps else {}


def evaluate_editing(model, pairs: Sequence[dict], steps: int | None = None, seed: int = 0,
                     progress: bool = True) -> tuple[list, dict]:
    """PSNR/SSIM of the model's output and of the unchanged input against the reference, per task."""
    model, records = in_driver(model), []
    for i, pair in enumerate(tqdm(pairs, desc="image-to-image", disable=not progress)):
        source, reference = _open_image(pair["input"]), np.asarray(_open_image(pair["reference"]))
        out = model.edit_image(source, pair["instruction"], height=reference.shape[0], width=reference.shape[1],
                               generator=torch.Generator().manual_seed(seed + i), **_steps(steps),
                               progress=False)
        psnr, ssim = psnr_ssim(np.asarray(out), reference)
        base = np.asarray(source.resize((reference.shape[1], reference.shape[0]), Image.Resampling.BICUBIC))
        base_psnr, base_ssim = psnr_ssim(base, reference)
        records.append({"task": pair["task"], "psnr": psnr, "ssim": ssim, "input_psnr": base_psnr,
                        "input_ssim": base_ssim, "output": out, "input": source, "reference": reference})
    scores = {}
    for task in sorted({r["task"] for r in records}):
        rows = [r for r in records if r["task"] == task]
        scores[task] = {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "input_psnr", "input_ssim")}
        scores[task]["n"] = len(rows)
    return records, scores


def evaluate_reports(model, items: Sequence[VQAItem], max_new_tokens: int = 160,
                     progress: bool = True) -> tuple[list, dict]:
    predictions = answer_items(model, [i.image for i in items], [i.question for i in items], max_new_tokens,
                               "reports", progress)
    records = [{"prompt": item.question, "reference": item.answer, "prediction": prediction}
               for item, prediction in zip(items, predictions)]
    return records, text_metrics([r["prediction"] for r in records], [r["reference"] for r in records])


class FeatureExtractor:
    """Image features for FID: ``unimedvl-vit`` (the evaluated model's own SigLIP encoder, mean-pooled) or
    ``hf:<path>``, a vision model in the Hugging Face layout on disk (pooled output)."""

    def __init__(self, name: str, model=None):
        self.name = name
        if name == "unimedvl-vit":
            if model is None:
                raise ValueError("unimedvl-vit features need the model")
            self.model = in_driver(model)
        elif name.startswith("hf:"):
            from transformers import AutoImageProcessor, AutoModel

            path = name[3:]
            self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
            self.net = AutoModel.from_pretrained(path, local_files_only=True).eval()
        else:
            raise ValueError(f"unknown feature extractor {name!r}: use unimedvl-vit or hf:<path>")

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if self.name == "unimedvl-vit":
            from ..modeling.preprocessing import resize_to_rule, to_model_tensor

            m = self.model
            rule = m.config.transforms.vqa_vit
            feats = m.model.vit_model([to_model_tensor(resize_to_rule(img.convert("RGB"), rule)).to(m.device, m.dtype)
                                       for img in images])
            return torch.stack([f.float().mean(0) for f in feats]).cpu()
        inputs = self.processor(images=[img.convert("RGB") for img in images], return_tensors="pt")
        out = self.net(**inputs)
        pooled = getattr(out, "pooler_output", None)
        return (pooled if pooled is not None else out.last_hidden_state.mean(1)).float().reshape(len(images), -1)


def evaluate_text_to_image(model, prompts: Sequence[str], references: Sequence[Image.Image],
                           extractor: FeatureExtractor, size: tuple[int, int] | None = None, steps: int | None = None,
                           seed: int = 0, progress: bool = True) -> tuple[list, dict]:
    model, generated = in_driver(model), []
    for i, prompt in enumerate(tqdm(prompts, desc="text-to-image", disable=not progress)):
        h, w = size or model.config.default_generation_size
        generated.append(model.generate_image(prompt, height=h, width=w, **_steps(steps),
                                              generator=torch.Generator().manual_seed(seed + i), progress=False))
    fid = fid_score(extractor(generated), extractor(list(references)))
    return [{"prompt": p, "output": g} for p, g in zip(prompts, generated)], {"fid": fid, "extractor": extractor.name,
                                                                                "n": len(generated)}


# ----------------------------------------------------------------------------------------------------------
# writing results


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_results(out_dir: Path, results: dict,
                  figure_rows: Sequence[tuple[str, list[tuple[str, Image.Image]]]]) -> dict:
    """``results.json``, ``results.md`` (one table row per metric) and ``samples.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    lines = ["| evaluation | metric | value |", "|---|---|---|"]
    for section, metrics in results.items():
        if not isinstance(metrics, dict):
            continue
        for key, value in metrics.items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    lines.append(f"| {section} / {key} | {sub} | {_fmt(v)} |")
            elif value is not None:
                lines.append(f"| {section} | {key} | {_fmt(value)} |")
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    paths = {"json": str(out_dir / "results.json"), "table": str(out_dir / "results.md")}
    if figure_rows:
        paths["figure"] = str(_figure(out_dir / "samples.png", figure_rows))
    return paths


def _figure(path: Path, rows) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.4 * cols, 2.6 * len(rows)), squeeze=False)
    for r, (title, images) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(images):
                label, image = images[c]
                ax.imshow(np.asarray(image))
                ax.set_title(label, fontsize=7)
        axes[r][0].set_ylabel(title)
        axes[r][0].text(-0.05, 0.5, title, transform=axes[r][0].transAxes, rotation=90, va="center", ha="right",
                        fontsize=8)
    fig.suptitle("UniMedVL sample outputs (generated images are synthetic)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
