"""Quality and size of each weight mode against full precision, on the CPU (docs/quantization.md#quality).

    python benchmarks/bench_quantization.py [--modes int8,nf4] [--questions 60] [--phantom-n 40] [--markdown]

For the embedded phantom-trained model and for a random model of the ``small`` preset saved in the released
layout, prints one JSON line per (model, mode): weight bytes (all parameters, and the quantised decoder
Linear weights alone); VQA on fresh phantoms: relative error of the first answer step's logits (mean and
max) and the fraction of questions whose greedy answer is identical to full precision; text-to-image
final-latent relative error with the same noise; and, for the embedded model, its phantom scores
(``unimedvl phantom-eval`` with fewer samples). ``--markdown`` ends with the README table. fp8 joins on a
CUDA GPU of compute capability 8.9+ (``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unimedvl_core import UniMedVL
from unimedvl_core.data.phantom_eval import evaluate_phantoms
from unimedvl_core.data.phantoms import FAMILY_STYLES, caption, render, sample_phantom, vqa_questions
from unimedvl_core.inference.embedded import DEFAULT_MODEL_DIR
from unimedvl_core.inference.quantization import is_quantized_linear_weight, tensor_bytes, weight_bytes
from unimedvl_core.modeling.config import UniMedVLConfig

REPO = Path(__file__).resolve().parents[1]
SEED = 20261127  # fresh phantoms: not the training seeds, not phantom-eval's default seed


def vqa_set(count: int, size: int = 64) -> list[tuple[Image.Image, str]]:
    rng = np.random.default_rng(SEED)
    items: list[tuple[Image.Image, str]] = []
    while len(items) < count:
        p = sample_phantom(rng, size=size, pid=f"q{len(items)}")
        style = str(rng.choice(FAMILY_STYLES[p.family]))
        image = Image.fromarray(render(p, style))
        items += [(image, question) for question, _, _ in vqa_questions(p, style, rng)]
    return items[:count]


def captions(count: int) -> list[str]:
    rng = np.random.default_rng(SEED + 1)
    out = []
    for i in range(count):
        p = sample_phantom(rng, size=64, pid=f"c{i}")
        out.append(caption(p, str(rng.choice(FAMILY_STYLES[p.family]))))
    return out


def answers(model, items, tokens: int) -> list:
    return [model.answer(image, question, max_new_tokens=tokens, output_logits=True) for image, question in items]


def latents(model, prompts, steps: int, side: int) -> list[torch.Tensor]:
    return [model.generate_image(p, height=side, width=side, num_inference_steps=steps, output_type="latent",
                                 generator=torch.Generator().manual_seed(i), progress=False).float()
            for i, p in enumerate(prompts)]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def compare(ref: dict, got: dict) -> dict:
    first = [relative(g.logits[0], r.logits[0]) for g, r in zip(got["answers"], ref["answers"])]
    same = [g.token_ids == r.token_ids for g, r in zip(got["answers"], ref["answers"])]
    lat = [relative(g, r) for g, r in zip(got["latents"], ref["latents"])]
    return {"vqa_first_logits_rel_err_mean": round(float(np.mean(first)), 5),
            "vqa_first_logits_rel_err_max": round(float(np.max(first)), 5),
            "vqa_greedy_identical": round(float(np.mean(same)), 3),
            "t2i_final_latent_rel_err_mean": round(float(np.mean(lat)), 5)}


def sizes(model) -> dict:
    linear = sum(tensor_bytes(p) for n, p in model.model.named_parameters() if is_quantized_linear_weight(n))
    return {"weight_MB": round(weight_bytes(model.model) / 1e6, 2), "quantised_linears_MB": round(linear / 1e6, 2)}


def run_mode(path: Path, mode: str | None, args, items, prompts, phantoms: bool) -> dict:
    start = time.perf_counter()
    model = UniMedVL.from_pretrained(path, device=args.device, dtype=args.dtype, quantization=mode, progress=False)
    model.progress = False
    side = min(64, model.config.max_image_side)
    out = {"answers": answers(model, items, args.tokens), "latents": latents(model, prompts, args.steps, side),
           "row": {"mode": mode or args.dtype, **sizes(model)}}
    out["row"]["compare_s"] = round(time.perf_counter() - start, 1)
    if phantoms:
        scores = evaluate_phantoms(model, n=args.phantom_n, t2i=args.phantom_t2i, sr=args.phantom_sr, steps=args.steps,
                                   progress=False)
        out["row"].update({k: round(scores[k], 3) for k in ("vqa_closed_accuracy", "vqa_count_accuracy",
                                                            "t2i_count_match", "sr_psnr")})
        out["row"]["phantom_samples"] = f"vqa {args.phantom_n}, t2i {args.phantom_t2i}, sr {args.phantom_sr}"
    return out


def small_checkpoint(folder: Path) -> Path:
    """A random model of the ``small`` preset (about 60M parameters), saved in the released layout."""
    config = UniMedVLConfig.from_preset(REPO / "configs" / "models" / "small.json")
    return UniMedVL.from_config(config, DEFAULT_MODEL_DIR, seed=0, zero_llm2vae=False).save_pretrained(folder)


def bench_model(name: str, path: Path, args, phantoms: bool) -> list[dict]:
    items = vqa_set(args.questions if phantoms else args.small_questions)
    prompts = captions(args.prompts if phantoms else 1)
    ref = run_mode(path, None, args, items, prompts, phantoms)
    rows = [{"model": name, **ref["row"]}]
    print(json.dumps(rows[-1]), flush=True)
    for mode in args.modes:
        got = run_mode(path, mode, args, items, prompts, phantoms)
        rows.append({"model": name, **got["row"], **compare(ref, got)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


COLUMNS = ["model", "mode", "weight_MB", "quantised_linears_MB", "vqa_first_logits_rel_err_mean",
           "vqa_greedy_identical", "t2i_final_latent_rel_err_mean", "vqa_closed_accuracy", "vqa_count_accuracy",
           "t2i_count_match", "sr_psnr"]


def markdown(rows: list[dict], machine: str) -> str:
    lines = [f"Machine: {machine}.", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="int8,nf4", help="comma-separated: int8, nf4, fp8 (CUDA 8.9+)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="the full-precision baseline's dtype")
    parser.add_argument("--questions", type=int, default=60, help="VQA questions for agreement and logits")
    parser.add_argument("--tokens", type=int, default=12, help="greedy answer tokens")
    parser.add_argument("--prompts", type=int, default=4, help="text-to-image prompts for the latent error")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (phantom-eval's protocol)")
    parser.add_argument("--phantom-n", type=int, default=40)
    parser.add_argument("--phantom-t2i", type=int, default=16)
    parser.add_argument("--phantom-sr", type=int, default=6)
    parser.add_argument("--small-questions", type=int, default=3,
                        help="VQA questions on the small preset (its ViT sees 980 px: seconds per question)")
    parser.add_argument("--skip-small", action="store_true", help="only the embedded model")
    parser.add_argument("--skip-embedded", action="store_true", help="only the small preset")
    parser.add_argument("--markdown", action="store_true", help="end with the table as Markdown")
    args = parser.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    torch.manual_seed(0)
    rows = [] if args.skip_embedded else bench_model("embedded (phantom-trained)", DEFAULT_MODEL_DIR, args, True)
    if not args.skip_small:
        with tempfile.TemporaryDirectory(prefix="unimedvl-small-") as folder:
            rows += bench_model("small preset (random)", small_checkpoint(Path(folder) / "small"), args,
                                phantoms=False)
    if args.markdown:
        cpu = platform.processor() or platform.machine()
        print(markdown(rows, f"{cpu}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"))


if __name__ == "__main__":
    main()
