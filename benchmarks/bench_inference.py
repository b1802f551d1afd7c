"""Inference speed and loading memory for a tiny and a small model of the released architecture.

    python benchmarks/bench_inference.py [--device cpu|cuda] [--configs tiny small] [--steps 20]

Prints, per configuration: checkpoint size; the peak resident memory a fresh process adds while loading
it (from_pretrained; safetensors pages are mapped, so weights become resident when first used) and
after a first answer (every weight the answer uses is then resident: about one copy of the weights);
VQA prefill time (image + question, up to the first token's logits), decode throughput, and
text-to-image and editing time, and text-to-image of 4 prompts batched in one call against one by one.
Timings are medians of repeated runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PARITY = REPO / "tests" / "fixtures" / "parity"

# Peak resident memory added by loading: the process's high-water mark is reset after the imports
# (Linux: writing 5 to /proc/self/clear_refs), so only the load itself counts.
_LOAD_PROBE = """
import re, sys, torch
from unimedvl_core import UniMedVL
import unimedvl_core.inference.model, unimedvl_core.io.checkpoint
# the libraries loading imports on first use (docs/performance.md#import-time): not part of the load's cost
import accelerate, diffusers.models.autoencoders.autoencoder_kl, transformers.models.qwen2.modeling_qwen2
import transformers.models.siglip.modeling_siglip
torch.set_num_threads(2)
def kb(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
before = kb("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
model = UniMedVL.from_pretrained(sys.argv[1], device=sys.argv[2], progress=False)
loaded = kb("VmHWM") - before
model.answer(sys.argv[3], "Is there a lesion?", max_new_tokens=2)  # touches every weight it uses
print(loaded * 1024, (kb("VmHWM") - before) * 1024)
"""


def checkpoint_for(name: str, workdir: Path) -> Path:
    if name == "tiny":
        return PARITY / "tiny_s0"
    from unimedvl_core import UniMedVL
    from unimedvl_core.modeling.config import UniMedVLConfig

    config = UniMedVLConfig.from_preset(REPO / "configs" / "models" / f"{name}.json")
    model = UniMedVL.from_config(config, REPO / "unimedvl_core" / "default_model", seed=0, zero_llm2vae=False)
    if config.llm["vocab_size"] < len(model.tokenizer):
        raise SystemExit(f"preset {name} has too small a vocabulary for the tokenizer")
    return model.save_pretrained(workdir / name)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def bench(name: str, ckpt: Path, device: str, steps: int, repeats: int) -> dict:
    from unimedvl_core import UniMedVL

    size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    probe = subprocess.run([sys.executable, "-c", _LOAD_PROBE, str(ckpt), device, str(PARITY / "image448.png")],
                           capture_output=True, text=True, check=True)
    load_peak, used_peak = (int(v) for v in probe.stdout.strip().splitlines()[-1].split())

    model = UniMedVL.from_pretrained(ckpt, device=device, progress=False)
    model.progress = False
    params = sum(p.numel() for p in model.model.parameters())
    image = Image.open(PARITY / "image448.png")
    question = "Is there a lesion in the left lung? Answer yes or no."
    new_tokens = 32
    prefill = timed(lambda: model.answer(image, question, max_new_tokens=1, stop_token_ids=[-1]), repeats)
    full = timed(lambda: model.answer(image, question, max_new_tokens=new_tokens + 1, stop_token_ids=[-1]), repeats)
    decode_tps = new_tokens / max(full - prefill, 1e-9)
    side = min(256, model.config.max_image_side)
    t2i = timed(lambda: model.generate_image("Axial CT of the chest with two nodules", height=side, width=side,
                                             num_inference_steps=steps, generator=torch.Generator().manual_seed(0)),
                max(1, repeats // 2))
    edit = timed(lambda: model.edit_image(image.resize((side, side)), "Translate this T2 image to FLAIR contrast.",
                                          num_inference_steps=steps, generator=torch.Generator().manual_seed(0)),
                 max(1, repeats // 2))
    batched, one_by_one = t2i_batched_vs_sequential(model, side, steps, max(1, repeats // 2))
    vqa_batched, vqa_one_by_one = vqa_batched_vs_sequential(model, image, new_tokens, repeats)
    return {
        "config": name, "device": device, "dtype": str(model.dtype).replace("torch.", ""),
        "params_M": round(params / 1e6, 2), "checkpoint_MB": round(size / 1e6, 1),
        "load_peak_rss_MB": round(load_peak / 1e6, 1), "peak_rss_after_answer_MB": round(used_peak / 1e6, 1),
        "vqa_prefill_s": round(prefill, 4), "decode_tokens_per_s": round(decode_tps, 1),
        f"t2i_{side}px_{steps}steps_s": round(t2i, 3), f"edit_{side}px_{steps}steps_s": round(edit, 3),
        "t2i_4prompts_batched_s": round(batched, 3), "t2i_4prompts_one_by_one_s": round(one_by_one, 3),
        "vqa_8pairs_batched_s": round(vqa_batched, 3), "vqa_8pairs_one_by_one_s": round(vqa_one_by_one, 3),
        "vqa_8pairs_speedup": round(vqa_one_by_one / vqa_batched, 2),
    }


PROMPTS = ["Axial CT of the chest with two nodules", "Chest X-ray with a right lower lobe consolidation",
           "Axial T2 MRI of the brain", "CT image with one lesion"]


def t2i_batched_vs_sequential(model, side: int, steps: int, repeats: int) -> tuple[float, float]:
    """Text-to-image of 4 prompts in one batch (docs/sampling.md#batched-requests) and one by one, seconds."""
    gens = lambda: [torch.Generator().manual_seed(k) for k in range(len(PROMPTS))]
    kwargs = dict(height=side, width=side, num_inference_steps=steps)
    batched = timed(lambda: model.generate_image(PROMPTS, generator=gens(), **kwargs), repeats)
    one_by_one = timed(lambda: [model.generate_image(p, generator=g, **kwargs) for p, g in zip(PROMPTS, gens())],
                       repeats)
    return batched, one_by_one


def vqa_batched_vs_sequential(model, image, tokens: int, repeats: int) -> tuple[float, float]:
    """8 different (image, question) pairs, ``tokens`` tokens each: ``answer_batch`` against one by one."""
    images = [image.resize((s, s)) for s in (448, 224, 308, 140, 392, 266, 448, 182)]
    questions = [f"Is there a lesion in region {k}? Describe it." for k in range(len(images))]
    run = dict(max_new_tokens=tokens, stop_token_ids=[-1])
    batched = timed(lambda: model.answer_batch(images, questions, **run), repeats)
    one_by_one = timed(lambda: [model.answer(i, q, **run) for i, q in zip(images, questions)], repeats)
    return batched, one_by_one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            rows.append(bench(name, checkpoint_for(name, Path(tmp)), args.device, args.steps, args.repeats))
            print(json.dumps(rows[-1]))
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print()
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row.get(k, "")) for k in keys))


if __name__ == "__main__":
    main()
